"""RegNet X / Y (torchvision topology; RegNetX-200MF / RegNetY-200MF widths).

Block (bottleneck ratio 1): 1x1 -> grouped 3x3 (stride) -> [SE] -> 1x1, plus a
projection shortcut when the shape changes.  The number of groups of every
stage is fixed (base width / base group width), so scaling ``width`` scales the
channels per group.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, SqueezeExcite, init_weights, round_to, scaler

Scale = Callable[[float], int]

STEM = 32
WIDTHS_200MF = (24, 56, 152, 368)
GROUP_WIDTH_200MF = 8


class RegNetBlock(nn.Module):
    def __init__(self, ch: Scale, in_base: int, out_base: int, stride: int, groups: int, se: bool) -> None:
        super().__init__()
        w = ch(out_base)
        layers: list[nn.Module] = [
            ConvBNAct(ch(in_base), w, 1),
            ConvBNAct(w, w, 3, stride, groups=groups),
        ]
        if se:
            # torchvision squeezes to round(0.25 * in_channels); rounded (in base
            # units) to a multiple of 4 so the scaled count stays even.
            layers.append(SqueezeExcite(w, ch(round_to(0.25 * in_base, 4))))
        layers.append(ConvBNAct(w, w, 1, act=None))
        self.f = nn.Sequential(*layers)
        self.proj = None
        if stride != 1 or in_base != out_base:
            self.proj = ConvBNAct(ch(in_base), w, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.proj is None else self.proj(x)
        return self.relu(self.f(x) + identity)


class RegNet(nn.Module):
    def __init__(self, depths: Sequence[int], widths: Sequence[int], group_width: int, width: float,
                 num_classes: int = 10, se: bool = False) -> None:
        super().__init__()
        ch = scaler(width)
        self.stem = ConvBNAct(3, ch(STEM), 3, 2)
        in_base = STEM
        stages = []
        for depth, w in zip(depths, widths):
            if w % group_width:
                raise ValueError(f"stage width {w} is not a multiple of group width {group_width}")
            groups = w // group_width
            blocks = []
            for i in range(depth):
                blocks.append(RegNetBlock(ch, in_base, w, 2 if i == 0 else 1, groups, se))
                in_base = w
            stages.append(nn.Sequential(*blocks))
        self.trunk = nn.Sequential(*stages)
        self.pool = GlobalPoolFlatten()
        self.fc = nn.Linear(ch(in_base), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.trunk(self.stem(x))))


# Real 200MF depths are (1, 1, 4, 7).
DEPTHS = (1, 1, 2, 2)


def regnet_x(width: float = 0.5, num_classes: int = 10) -> RegNet:
    return RegNet(DEPTHS, WIDTHS_200MF, GROUP_WIDTH_200MF, width, num_classes, se=False).eval()


def regnet_y(width: float = 0.5, num_classes: int = 10) -> RegNet:
    return RegNet(DEPTHS, WIDTHS_200MF, GROUP_WIDTH_200MF, width, num_classes, se=True).eval()
