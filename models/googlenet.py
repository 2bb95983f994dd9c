"""GoogLeNet / Inception v1 (torchvision topology with BN, no auxiliary heads).

Inception block: cat([1x1, 1x1 -> 3x3, 1x1 -> 5x5, maxpool3 -> 1x1]).  The third
branch uses a real 5x5 conv as in the paper (torchvision uses 3x3 there).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, init_weights, scaler

Scale = Callable[[float], int]
BN_EPS = 1e-3


class InceptionCfg(NamedTuple):
    ch1x1: int
    ch3x3red: int
    ch3x3: int
    ch5x5red: int
    ch5x5: int
    pool_proj: int

    @property
    def out_ch(self) -> int:
        return self.ch1x1 + self.ch3x3 + self.ch5x5 + self.pool_proj


# torchvision's inception 3a..5b configs.  4c and 4d are left out.
INC3 = (InceptionCfg(64, 96, 128, 16, 32, 32), InceptionCfg(128, 128, 192, 32, 96, 64))
INC4 = (InceptionCfg(192, 96, 208, 16, 48, 64), InceptionCfg(160, 112, 224, 24, 64, 64),
        InceptionCfg(256, 160, 320, 32, 128, 128))
INC5 = (InceptionCfg(256, 160, 320, 32, 128, 128), InceptionCfg(384, 192, 384, 48, 128, 128))


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> ConvBNAct:
    return ConvBNAct(cin, cout, k, stride, bn_eps=BN_EPS)


class Inception(nn.Module):
    def __init__(self, ch: Scale, in_base: int, cfg: InceptionCfg) -> None:
        super().__init__()
        cin = ch(in_base)
        self.branch1 = _conv(cin, ch(cfg.ch1x1), 1)
        self.branch2 = nn.Sequential(_conv(cin, ch(cfg.ch3x3red), 1), _conv(ch(cfg.ch3x3red), ch(cfg.ch3x3), 3))
        self.branch3 = nn.Sequential(_conv(cin, ch(cfg.ch5x5red), 1), _conv(ch(cfg.ch5x5red), ch(cfg.ch5x5), 5))
        self.branch4 = nn.Sequential(nn.MaxPool2d(3, 1, padding=1, ceil_mode=True), _conv(cin, ch(cfg.pool_proj), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class GoogLeNet(nn.Module):
    def __init__(self, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        self.stem = nn.Sequential(
            _conv(3, ch(64), 7, 2),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            _conv(ch(64), ch(64), 1),
            _conv(ch(64), ch(192), 3),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        in_base = 192
        layers: list[nn.Module] = []
        for stage, pool in ((INC3, nn.MaxPool2d(3, 2, ceil_mode=True)),
                            (INC4, nn.MaxPool2d(2, 2, ceil_mode=True)),
                            (INC5, None)):
            for cfg in stage:
                layers.append(Inception(ch, in_base, cfg))
                in_base = cfg.out_ch
            if pool is not None:
                layers.append(pool)
        self.inception = nn.Sequential(*layers)
        self.pool = GlobalPoolFlatten()
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(ch(in_base), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.inception(self.stem(x)))
        return self.fc(self.dropout(x))


def googlenet(width: float = 0.25, num_classes: int = 10) -> GoogLeNet:
    """32x32 inputs: 16 -> 8 -> 4 -> 2 -> 1 spatially."""
    return GoogLeNet(width, num_classes).eval()
