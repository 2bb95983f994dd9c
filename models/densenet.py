"""DenseNet-121-style network (torchvision topology, fewer layers per block).

Dense layer (pre-activation): cat(previous features) -> BN -> ReLU -> 1x1 conv
(bn_size * growth) -> BN -> ReLU -> 3x3 conv (growth).  Each dense block outputs
the concatenation of its input and all its layers' outputs, in order.
Transition: BN -> ReLU -> 1x1 conv (halve channels) -> 2x2 avg-pool.
The growth rate is a base channel count and scales with ``width``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, init_weights, scaler

Scale = Callable[[float], int]


class DenseLayer(nn.Module):
    def __init__(self, ch: Scale, in_base: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(ch(in_base))
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(ch(in_base), ch(bn_size * growth), 1, bias=False)
        self.norm2 = nn.BatchNorm2d(ch(bn_size * growth))
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(ch(bn_size * growth), ch(growth), 3, padding=1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseBlock(nn.ModuleList):
    def __init__(self, ch: Scale, in_base: int, num_layers: int, growth: int, bn_size: int) -> None:
        super().__init__(DenseLayer(ch, in_base + i * growth, growth, bn_size) for i in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        features = [x]
        for layer in self:
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.AvgPool2d(2, 2),
        )


class DenseNet(nn.Module):
    def __init__(self, block_config: Sequence[int], width: float, num_classes: int = 10, growth: int = 32,
                 init_features: int = 64, bn_size: int = 4) -> None:
        super().__init__()
        ch = scaler(width)
        layers: list[nn.Module] = [ConvBNAct(3, ch(init_features), 7, 2, padding=3), nn.MaxPool2d(3, 2, padding=1)]
        n_base = init_features
        for i, num_layers in enumerate(block_config):
            layers.append(DenseBlock(ch, n_base, num_layers, growth, bn_size))
            n_base += num_layers * growth
            if i != len(block_config) - 1:
                layers.append(Transition(ch(n_base), ch(n_base / 2)))
                n_base = n_base / 2
        layers += [nn.BatchNorm2d(ch(n_base)), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.pool = GlobalPoolFlatten()
        self.classifier = nn.Linear(ch(n_base), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


def densenet(width: float = 0.25, num_classes: int = 10) -> DenseNet:
    """DenseNet-121 hyper-parameters (growth 32, bn_size 4, 64 initial features)
    with 4 layers per dense block instead of (6, 12, 24, 16)."""
    return DenseNet((4, 4, 4, 4), width, num_classes).eval()
