"""MNASNet (torchvision ``mnasnet0_5`` topology).

Base depths are torchvision's alpha=0.5 depths; ``width`` scales them further.
Inverted residuals without SE: 1x1 expand -> ReLU -> dw kxk -> ReLU -> 1x1 project [+ x].
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, init_weights, scaler

Scale = Callable[[float], int]

# torchvision _get_depths(0.5)
DEPTHS_0_5 = (16, 8, 16, 24, 40, 48, 96, 160)
LAST_CHANNEL = 1280
# (kernel, stride, expansion, repeats) of the six stacks; real repeats are (3, 3, 3, 2, 4, 1).
STACKS = ((3, 2, 3, 2), (5, 2, 3, 2), (5, 2, 6, 2), (3, 1, 6, 2), (5, 2, 6, 2), (3, 1, 6, 1))


class MnasInvertedResidual(nn.Module):
    def __init__(self, ch: Scale, in_base: int, out_base: int, kernel: int, stride: int,
                 expansion: int) -> None:
        super().__init__()
        mid = ch(in_base * expansion)
        self.use_residual = stride == 1 and in_base == out_base
        self.layers = nn.Sequential(
            ConvBNAct(ch(in_base), mid, 1),
            ConvBNAct(mid, mid, kernel, stride, groups=mid),
            ConvBNAct(mid, ch(out_base), 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.use_residual else y


class MNASNet(nn.Module):
    def __init__(self, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        d = DEPTHS_0_5
        layers: list[nn.Module] = [
            ConvBNAct(3, ch(d[0]), 3, 2),
            ConvBNAct(ch(d[0]), ch(d[0]), 3, groups=ch(d[0])),
            ConvBNAct(ch(d[0]), ch(d[1]), 1, act=None),
        ]
        in_base = d[1]
        for out_base, (kernel, stride, expansion, repeats) in zip(d[2:], STACKS):
            for i in range(repeats):
                layers.append(MnasInvertedResidual(ch, in_base, out_base, kernel, stride if i == 0 else 1,
                                                   expansion))
                in_base = out_base
        layers.append(ConvBNAct(ch(in_base), ch(LAST_CHANNEL), 1))
        self.layers = nn.Sequential(*layers)
        self.pool = GlobalPoolFlatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(ch(LAST_CHANNEL), num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.layers(x)))


def mnasnet0_5(width: float = 0.5, num_classes: int = 10) -> MNASNet:
    return MNASNet(width, num_classes).eval()
