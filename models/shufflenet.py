"""ShuffleNet V2 (torchvision topology; base channels of the 0.5x model).

Stride-1 unit: split channels in halves (chunk), transform the second half,
concatenate, channel-shuffle with 2 groups.  Stride-2 unit: both branches see
the whole input (branch 1: dw 3x3/2 -> 1x1), concatenated and shuffled.

Half-width note: because the shuffle interleaves the two branches and the next
unit's ``chunk`` re-splits the result, zeroing the *upper half* of every branch
output does NOT leave the half-width model (the next unit's second chunk would
be all zero).  What does: with m stride-1 units in a stage, the stride-2 unit's
two branch outputs keep the lower half of each of 2**m equal blocks, the i-th
stride-1 unit's branch output the lower half of each of 2**(m - i) blocks; the
stage output then has its lower half live (see tests/test_models.py,
``_halving_groups``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, init_weights, scaler

Scale = Callable[[float], int]

# torchvision shufflenet_v2_x0_5: stem, three stages, last conv.
STAGE_OUT_0_5 = (24, 48, 96, 192, 1024)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w)
    x = x.transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, ch: Scale, in_base: int, out_base: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        branch_base = out_base // 2
        bf = ch(branch_base)
        if stride > 1:
            cin = ch(in_base)
            self.branch1: nn.Module = nn.Sequential(
                ConvBNAct(cin, cin, 3, stride, groups=cin, act=None),
                ConvBNAct(cin, bf, 1),
            )
            b2_in = cin
        else:
            if in_base != out_base:
                raise ValueError("stride-1 ShuffleNet unit needs in == out channels")
            self.branch1 = nn.Identity()
            b2_in = bf
        self.branch2 = nn.Sequential(
            ConvBNAct(b2_in, bf, 1),
            ConvBNAct(bf, bf, 3, stride, groups=bf, act=None),
            ConvBNAct(bf, bf, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat([x1, self.branch2(x2)], 1)
        else:
            out = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats: Sequence[int], stage_out: Sequence[int], width: float,
                 num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        self.stem = nn.Sequential(ConvBNAct(3, ch(stage_out[0]), 3, 2), nn.MaxPool2d(3, 2, padding=1))
        in_base = stage_out[0]
        stages = []
        for n, out_base in zip(repeats, stage_out[1:4]):
            units = [ShuffleUnit(ch, in_base, out_base, 2)]
            units += [ShuffleUnit(ch, out_base, out_base, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            in_base = out_base
        self.stages = nn.Sequential(*stages)
        self.conv5 = ConvBNAct(ch(in_base), ch(stage_out[4]), 1)
        self.pool = GlobalPoolFlatten()
        self.fc = nn.Linear(ch(stage_out[4]), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv5(self.stages(self.stem(x)))))


def shufflenet_v2(width: float = 0.5, num_classes: int = 10) -> ShuffleNetV2:
    # Real repeats are (4, 8, 4).
    return ShuffleNetV2((2, 2, 2), STAGE_OUT_0_5, width, num_classes).eval()
