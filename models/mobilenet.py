"""MobileNet V1, V2 and V3-Small.

* V1: depthwise-separable convs (dw 3x3 -> BN -> ReLU -> pw 1x1 -> BN -> ReLU).
* V2: inverted residuals with linear bottlenecks, ReLU6 (torchvision topology).
* V3-Small: inverted residuals with SE (ReLU / Hardsigmoid) and Hardswish
  (torchvision ``mobilenet_v3_small`` config; SE squeeze widths are
  torchvision's ``_make_divisible(expanded // 4, 8)`` values, taken as base counts).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from .common import ActFactory, ConvBNAct, GlobalPoolFlatten, SqueezeExcite, init_weights, scaler

Scale = Callable[[float], int]


# --------------------------------------------------------------------------- V1

# (out_channels, stride) of the depthwise-separable blocks; the real network
# repeats the (512, 1) block five times.
V1_CFG = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (1024, 2), (1024, 1))


class DepthwiseSeparable(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__(
            ConvBNAct(in_ch, in_ch, 3, stride, groups=in_ch),
            ConvBNAct(in_ch, out_ch, 1),
        )


class MobileNetV1(nn.Module):
    def __init__(self, width: float, num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        layers: list[nn.Module] = [ConvBNAct(3, ch(32), 3, 2)]
        in_base = 32
        for out_base, stride in V1_CFG:
            layers.append(DepthwiseSeparable(ch(in_base), ch(out_base), stride))
            in_base = out_base
        self.features = nn.Sequential(*layers)
        self.pool = GlobalPoolFlatten()
        self.fc = nn.Linear(ch(in_base), num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))


# --------------------------------------------------------------------------- V2

# (expand ratio t, out channels c, repeats n, first stride s); real n is (1, 2, 3, 4, 3, 3, 1).
V2_CFG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2), (6, 96, 2, 1), (6, 160, 2, 2), (6, 320, 1, 1))
V2_REAL_REPEATS = (1, 2, 3, 4, 3, 3, 1)  # the paper's depth, for benchmarks


class InvertedResidual(nn.Module):
    """[1x1 expand -> ReLU6] -> dw 3x3 -> ReLU6 -> 1x1 project (linear) [+ x]."""

    def __init__(self, ch: Scale, in_base: int, out_base: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_base * expand
        self.use_residual = stride == 1 and in_base == out_base
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(ConvBNAct(ch(in_base), ch(hidden), 1, act=nn.ReLU6))
        layers += [
            ConvBNAct(ch(hidden), ch(hidden), 3, stride, groups=ch(hidden), act=nn.ReLU6),
            ConvBNAct(ch(hidden), ch(out_base), 1, act=None),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class MobileNetV2(nn.Module):
    def __init__(self, width: float, num_classes: int = 10, repeats=None) -> None:
        super().__init__()
        ch = scaler(width)
        layers: list[nn.Module] = [ConvBNAct(3, ch(32), 3, 2, act=nn.ReLU6)]
        in_base = 32
        repeats = repeats or [n for _, _, n, _ in V2_CFG]
        for (t, c, _, s), n in zip(V2_CFG, repeats):
            for i in range(n):
                layers.append(InvertedResidual(ch, in_base, c, s if i == 0 else 1, t))
                in_base = c
        layers.append(ConvBNAct(ch(in_base), ch(1280), 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.pool = GlobalPoolFlatten()
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(ch(1280), num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# --------------------------------------------------------------------------- V3


class V3Block(NamedTuple):
    in_ch: int
    kernel: int
    expanded: int
    out_ch: int
    se: int  # SE squeeze channels (base), 0 = no SE
    hswish: bool
    stride: int


# torchvision mobilenet_v3_small config (SE squeeze = _make_divisible(expanded // 4, 8)).
V3_SMALL_CFG = (
    V3Block(16, 3, 16, 16, 8, False, 2),
    V3Block(16, 3, 72, 24, 0, False, 2),
    V3Block(24, 3, 88, 24, 0, False, 1),
    V3Block(24, 5, 96, 40, 24, True, 2),
    V3Block(40, 5, 240, 40, 64, True, 1),
    V3Block(40, 5, 240, 40, 64, True, 1),
    V3Block(40, 5, 120, 48, 32, True, 1),
    V3Block(48, 5, 144, 48, 40, True, 1),
    V3Block(48, 5, 288, 96, 72, True, 2),
    V3Block(96, 5, 576, 96, 144, True, 1),
    V3Block(96, 5, 576, 96, 144, True, 1),
)


class InvertedResidualV3(nn.Module):
    """[1x1 expand] -> dw kxk -> [SE] -> 1x1 project [+ x]; ReLU or Hardswish."""

    def __init__(self, ch: Scale, cfg: V3Block) -> None:
        super().__init__()
        act: ActFactory = nn.Hardswish if cfg.hswish else nn.ReLU
        self.use_residual = cfg.stride == 1 and cfg.in_ch == cfg.out_ch
        layers: list[nn.Module] = []
        if cfg.expanded != cfg.in_ch:
            layers.append(ConvBNAct(ch(cfg.in_ch), ch(cfg.expanded), 1, act=act))
        layers.append(ConvBNAct(ch(cfg.expanded), ch(cfg.expanded), cfg.kernel, cfg.stride,
                                groups=ch(cfg.expanded), act=act))
        if cfg.se:
            layers.append(SqueezeExcite(ch(cfg.expanded), ch(cfg.se), act=nn.ReLU, gate=nn.Hardsigmoid))
        layers.append(ConvBNAct(ch(cfg.expanded), ch(cfg.out_ch), 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_residual else y


class MobileNetV3(nn.Module):
    def __init__(self, cfg: tuple[V3Block, ...], last_conv: int, last_channel: int, width: float,
                 num_classes: int = 10) -> None:
        super().__init__()
        ch = scaler(width)
        layers: list[nn.Module] = [ConvBNAct(3, ch(cfg[0].in_ch), 3, 2, act=nn.Hardswish)]
        layers += [InvertedResidualV3(ch, c) for c in cfg]
        layers.append(ConvBNAct(ch(cfg[-1].out_ch), ch(last_conv), 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = GlobalPoolFlatten()
        self.classifier = nn.Sequential(
            nn.Linear(ch(last_conv), ch(last_channel)),
            nn.Hardswish(),
            nn.Dropout(0.2),
            nn.Linear(ch(last_channel), num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# --------------------------------------------------------------------------- factories


def mobilenet_v1(width: float = 0.25, num_classes: int = 10) -> MobileNetV1:
    return MobileNetV1(width, num_classes).eval()


def mobilenet_v2(width: float = 0.25, num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(width, num_classes).eval()


def mobilenet_v3_small(width: float = 0.5, num_classes: int = 10) -> MobileNetV3:
    return MobileNetV3(V3_SMALL_CFG, 576, 1024, width, num_classes).eval()
