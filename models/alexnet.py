"""AlexNet (torchvision topology, no batch norm; convs and linears carry biases).

For 64x64 inputs the feature extractor ends at 1x1; torchvision's
AdaptiveAvgPool2d((6, 6)) is replaced by AdaptiveAvgPool2d(1), so the first
classifier Linear sees 256 (scaled) features instead of 256 * 6 * 6.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights, scaler


class AlexNet(nn.Module):
    def __init__(self, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        self.features = nn.Sequential(
            nn.Conv2d(3, ch(64), 11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(ch(64), ch(192), 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(ch(192), ch(384), 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch(384), ch(256), 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(ch(256), ch(256), 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(ch(256), ch(4096)),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(ch(4096), ch(4096)),
            nn.ReLU(),
            nn.Linear(ch(4096), num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def alexnet(width: float = 0.125, num_classes: int = 10) -> AlexNet:
    """Expects 64x64 inputs (15 -> 7 -> 3 -> 1 spatially)."""
    return AlexNet(width, num_classes).eval()
