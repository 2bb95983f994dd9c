"""Inception-v3-style network (torchvision block definitions, shortened).

stem -> InceptionA x2 -> InceptionB (grid reduction) -> InceptionC x2 (1x7 / 7x1
factorized convs) -> InceptionE (split 1x3 / 3x1 branches) -> pool -> fc.
InceptionD (the second reduction) and the aux head are left out so that a
64x64 input works (stem: 64 -> 31 -> 29 -> 14 -> 12 -> 5; B: 5 -> 2).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, init_weights, scaler

Scale = Callable[[float], int]
BN_EPS = 1e-3


def _conv(cin: int, cout: int, k: int | tuple[int, int], stride: int = 1,
          padding: int | tuple[int, int] | None = 0) -> ConvBNAct:
    return ConvBNAct(cin, cout, k, stride, padding=padding, bn_eps=BN_EPS)


def _pool_branch(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionA(nn.Module):
    """cat([1x1, 1x1 -> 5x5, 1x1 -> 3x3 -> 3x3, avgpool -> 1x1]); out = 224 + pool_features."""

    def __init__(self, ch: Scale, in_base: int, pool_features: int) -> None:
        super().__init__()
        cin = ch(in_base)
        self.branch1x1 = _conv(cin, ch(64), 1)
        self.branch5x5 = nn.Sequential(_conv(cin, ch(48), 1), _conv(ch(48), ch(64), 5, padding=2))
        self.branch3x3dbl = nn.Sequential(_conv(cin, ch(64), 1), _conv(ch(64), ch(96), 3, padding=1),
                                          _conv(ch(96), ch(96), 3, padding=1))
        self.branch_pool = _conv(cin, ch(pool_features), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch5x5(x), self.branch3x3dbl(x),
                          self.branch_pool(_pool_branch(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction: cat([3x3/2, 1x1 -> 3x3 -> 3x3/2, maxpool3/2]); out = 480 + in."""

    def __init__(self, ch: Scale, in_base: int) -> None:
        super().__init__()
        cin = ch(in_base)
        self.branch3x3 = _conv(cin, ch(384), 3, stride=2)
        self.branch3x3dbl = nn.Sequential(_conv(cin, ch(64), 1), _conv(ch(64), ch(96), 3, padding=1),
                                          _conv(ch(96), ch(96), 3, stride=2))
        self.pool = nn.MaxPool2d(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), self.branch3x3dbl(x), self.pool(x)], 1)


class InceptionC(nn.Module):
    """Factorized 7x7: cat([1x1, 1x1 -> 1x7 -> 7x1, 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7, avgpool -> 1x1])."""

    def __init__(self, ch: Scale, in_base: int, channels_7x7: int) -> None:
        super().__init__()
        cin, c7 = ch(in_base), ch(channels_7x7)
        self.branch1x1 = _conv(cin, ch(192), 1)
        self.branch7x7 = nn.Sequential(
            _conv(cin, c7, 1),
            _conv(c7, c7, (1, 7), padding=(0, 3)),
            _conv(c7, ch(192), (7, 1), padding=(3, 0)),
        )
        self.branch7x7dbl = nn.Sequential(
            _conv(cin, c7, 1),
            _conv(c7, c7, (7, 1), padding=(3, 0)),
            _conv(c7, c7, (1, 7), padding=(0, 3)),
            _conv(c7, c7, (7, 1), padding=(3, 0)),
            _conv(c7, ch(192), (1, 7), padding=(0, 3)),
        )
        self.branch_pool = _conv(cin, ch(192), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), self.branch7x7(x), self.branch7x7dbl(x),
                          self.branch_pool(_pool_branch(x))], 1)


class InceptionE(nn.Module):
    """Expanded filter bank: 3x3 branches split into parallel 1x3 / 3x1 convs that are concatenated."""

    def __init__(self, ch: Scale, in_base: int) -> None:
        super().__init__()
        cin = ch(in_base)
        self.branch1x1 = _conv(cin, ch(320), 1)
        self.branch3x3_1 = _conv(cin, ch(384), 1)
        self.branch3x3_2a = _conv(ch(384), ch(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = _conv(ch(384), ch(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _conv(cin, ch(448), 1)
        self.branch3x3dbl_2 = _conv(ch(448), ch(384), 3, padding=1)
        self.branch3x3dbl_3a = _conv(ch(384), ch(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _conv(ch(384), ch(384), (3, 1), padding=(1, 0))
        self.branch_pool = _conv(cin, ch(192), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(_pool_branch(x))], 1)


class InceptionV3Small(nn.Module):
    def __init__(self, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        self.stem = nn.Sequential(
            _conv(3, ch(32), 3, stride=2),
            _conv(ch(32), ch(32), 3),
            _conv(ch(32), ch(64), 3, padding=1),
            nn.MaxPool2d(3, 2),
            _conv(ch(64), ch(80), 1),
            _conv(ch(80), ch(192), 3),
            nn.MaxPool2d(3, 2),
        )
        self.blocks = nn.Sequential(
            InceptionA(ch, 192, pool_features=32),   # -> 256
            InceptionA(ch, 256, pool_features=64),   # -> 288
            InceptionB(ch, 288),                     # -> 768
            InceptionC(ch, 768, channels_7x7=128),   # -> 768
            InceptionC(ch, 768, channels_7x7=160),   # -> 768
            InceptionE(ch, 768),                     # -> 2048
        )
        self.pool = GlobalPoolFlatten()
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(ch(2048), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.pool(self.blocks(self.stem(x)))))


def inception_v3_small(width: float = 0.125, num_classes: int = 10) -> InceptionV3Small:
    """Expects 64x64 inputs."""
    return InceptionV3Small(width, num_classes).eval()
