"""SqueezeNet 1.1 (torchvision topology: no batch norm, biased convs, Fire modules).

The classifier is a 1x1 conv to ``num_classes`` followed by ReLU and a global
average pool -- the output layer is a Conv2d, not a Linear.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .common import init_weights, scaler


class Fire(nn.Module):
    """squeeze 1x1 -> ReLU -> cat([expand 1x1 -> ReLU, expand 3x3 -> ReLU])."""

    def __init__(self, ch: Callable[[float], int], in_base: int, squeeze: int, expand1x1: int,
                 expand3x3: int) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(ch(in_base), ch(squeeze), 1)
        self.expand1x1 = nn.Conv2d(ch(squeeze), ch(expand1x1), 1)
        self.expand3x3 = nn.Conv2d(ch(squeeze), ch(expand3x3), 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


class SqueezeNet(nn.Module):
    def __init__(self, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        self.features = nn.Sequential(
            nn.Conv2d(3, ch(64), 3, stride=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(ch, 64, 16, 64, 64),
            Fire(ch, 128, 16, 64, 64),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(ch, 128, 32, 128, 128),
            Fire(ch, 256, 32, 128, 128),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(ch, 256, 48, 192, 192),
            Fire(ch, 384, 48, 192, 192),
            Fire(ch, 384, 64, 256, 256),
            Fire(ch, 512, 64, 256, 256),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Conv2d(ch(512), num_classes, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def squeezenet1_1(width: float = 0.25, num_classes: int = 10) -> SqueezeNet:
    """32x32 inputs: 15 -> 7 -> 3 -> 1 spatially."""
    return SqueezeNet(width, num_classes).eval()
