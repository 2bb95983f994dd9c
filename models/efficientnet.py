"""EfficientNet-B0 (torchvision topology): MBConv blocks with SE and SiLU.

MBConv: [1x1 expand -> SiLU] -> dw kxk -> SiLU -> SE(SiLU, Sigmoid) -> 1x1 project [+ x].
Stochastic depth is a no-op in eval mode and is left out.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, SqueezeExcite, init_weights, round_to, scaler

Scale = Callable[[float], int]


class Stage(NamedTuple):
    expand: int
    kernel: int
    stride: int
    in_ch: int
    out_ch: int
    repeats: int


# B0 stages; real repeats are (1, 2, 2, 3, 3, 4, 1).
B0_STAGES = (
    Stage(1, 3, 1, 32, 16, 1),
    Stage(6, 3, 2, 16, 24, 2),
    Stage(6, 5, 2, 24, 40, 2),
    Stage(6, 3, 2, 40, 80, 2),
    Stage(6, 5, 1, 80, 112, 2),
    Stage(6, 5, 2, 112, 192, 2),
    Stage(6, 3, 1, 192, 320, 1),
)


class MBConv(nn.Module):
    def __init__(self, ch: Scale, in_base: int, out_base: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = ch(in_base * expand)
        # torchvision squeezes to in_channels // 4; rounded (in base units) to a
        # multiple of 4 so the scaled count stays even at the default width.
        squeeze = ch(round_to(in_base / 4, 4))
        self.use_residual = stride == 1 and in_base == out_base
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(ch(in_base), hidden, 1, act=nn.SiLU))
        layers += [
            ConvBNAct(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcite(hidden, squeeze, act=nn.SiLU, gate=nn.Sigmoid),
            ConvBNAct(hidden, ch(out_base), 1, act=None),
        ]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class EfficientNet(nn.Module):
    def __init__(self, stages: tuple[Stage, ...], last_channel: int, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        layers: list[nn.Module] = [ConvBNAct(3, ch(stages[0].in_ch), 3, 2, act=nn.SiLU)]
        for st in stages:
            in_base = st.in_ch
            for i in range(st.repeats):
                layers.append(MBConv(ch, in_base, st.out_ch, st.kernel, st.stride if i == 0 else 1, st.expand))
                in_base = st.out_ch
        layers.append(ConvBNAct(ch(stages[-1].out_ch), ch(last_channel), 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = GlobalPoolFlatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(ch(last_channel), num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def efficientnet_b0(width: float = 0.5, num_classes: int = 10) -> EfficientNet:
    return EfficientNet(B0_STAGES, 1280, width, num_classes).eval()
