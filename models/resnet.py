"""ResNet-18 / ResNet-50, ResNeXt and Wide ResNet (torchvision topology).

Stem conv7x7/2 -> maxpool3/2 -> 4 stages (strides 1, 2, 2, 2) -> global pool -> fc.
Bottleneck mid width = planes * width_per_group / 64 * groups (torchvision rule);
``groups`` is fixed, so scaling ``width`` scales the channels *per group*.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .common import ConvBNAct, GlobalPoolFlatten, init_weights, scaler


def _shortcut(ch: Callable[[float], int], in_base: int, out_base: int, stride: int) -> nn.Module | None:
    """Projection shortcut (1x1 conv + BN) when shape changes, else identity."""
    if stride == 1 and in_base == out_base:
        return None
    return ConvBNAct(ch(in_base), ch(out_base), 1, stride, act=None)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, ch: Callable[[float], int], in_base: int, planes: int, stride: int = 1,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        if groups != 1 or width_per_group != 64:
            raise ValueError("BasicBlock supports only groups=1, width_per_group=64")
        self.conv1 = ConvBNAct(ch(in_base), ch(planes), 3, stride)
        self.conv2 = ConvBNAct(ch(planes), ch(planes), 3, act=None)
        self.downsample = _shortcut(ch, in_base, planes, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, ch: Callable[[float], int], in_base: int, planes: int, stride: int = 1,
                 groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        mid = planes * width_per_group / 64 * groups
        out = planes * self.expansion
        self.conv1 = ConvBNAct(ch(in_base), ch(mid), 1)
        self.conv2 = ConvBNAct(ch(mid), ch(mid), 3, stride, groups=groups)
        self.conv3 = ConvBNAct(ch(mid), ch(out), 1, act=None)
        self.downsample = _shortcut(ch, in_base, out, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


def stages(block, ch, in_base: int, widths: Sequence[int], depths: Sequence[int], groups: int = 1,
           width_per_group: int = 64) -> tuple[nn.Sequential, int]:
    """The residual stages: stage i has depths[i] blocks of widths[i] planes, its first block
    strided (but for the first stage); returns them and the final base width."""
    out = []
    for i, (planes, n) in enumerate(zip(widths, depths)):
        blocks = []
        for j in range(n):
            blocks.append(block(ch, in_base, planes, 2 if i > 0 and j == 0 else 1, groups, width_per_group))
            in_base = planes * block.expansion
        out.append(nn.Sequential(*blocks))
    return nn.Sequential(*out), in_base


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int], width: float,
                 num_classes: int = 10, groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        ch = scaler(width)
        self.stem = nn.Sequential(
            ConvBNAct(3, ch(64), 7, 2, padding=3),
            nn.MaxPool2d(3, 2, padding=1),
        )
        self.layers, in_base = stages(block, ch, 64, (64, 128, 256, 512), layers, groups, width_per_group)
        self.pool = GlobalPoolFlatten()
        self.fc = nn.Linear(ch(in_base), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))))


def resnet18(width: float = 0.125, num_classes: int = 10) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), width, num_classes).eval()


def resnet50(width: float = 0.125, num_classes: int = 10) -> ResNet:
    # Real ResNet-50 has (3, 4, 6, 3) bottlenecks; (1, 2, 1, 1) keeps a stride-1
    # projection block (stage 1), stride-2 projection blocks and an identity block.
    return ResNet(Bottleneck, (1, 2, 1, 1), width, num_classes).eval()


def resnext(width: float = 0.125, num_classes: int = 10) -> ResNet:
    # ResNeXt "4x32d": 4 groups of 32 base channels in the first stage (mid = 128,
    # like ResNeXt-50 32x4d); at the default width each group has 4 channels.
    return ResNet(Bottleneck, (1, 2, 1, 1), width, num_classes, groups=4, width_per_group=32).eval()


def wide_resnet(width: float = 0.125, num_classes: int = 10) -> ResNet:
    # Wide ResNet-50-2: bottleneck mid width doubled (width_per_group = 128).
    return ResNet(Bottleneck, (1, 2, 1, 1), width, num_classes, width_per_group=128).eval()


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): conv3x3 16 -> 3 stages of BasicBlocks at
    16 / 32 / 64 channels (strides 1, 2, 2) -> global pool -> fc, for 32x32 inputs. Shortcuts
    that change shape are 1x1 conv + BN projections (option B)."""

    def __init__(self, blocks_per_stage: int, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        self.stem = ConvBNAct(3, ch(16), 3, 1)
        self.layers, in_base = stages(BasicBlock, ch, 16, (16, 32, 64), (blocks_per_stage,) * 3)
        self.pool = GlobalPoolFlatten()
        self.fc = nn.Linear(ch(in_base), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))))


def resnet20(width: float = 1.0, num_classes: int = 10) -> CifarResNet:
    # 3 stages x 3 BasicBlocks x 2 convs + stem + fc = 20 weighted layers (plus 2 projections).
    # Not in ZOO (whose tests build every entry at a small width): build it directly.
    return CifarResNet(3, width, num_classes).eval()
