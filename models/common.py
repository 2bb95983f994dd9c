"""Building blocks shared by the model zoo.

Channel-count convention: every model is written in *base* channel counts (the
numbers of the original paper / torchvision definition) and scaled with
``ch = scaler(width)``, ``ch(base) = round(base * width)`` -- deliberately
without ``make_divisible`` rounding, so that ``width / 2`` gives exactly half
the channels in every layer.  Derived counts (expanded widths, SE squeeze
widths, dense-block totals ...) are always computed in base units first and
scaled last.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

ActFactory = Callable[[], nn.Module]


def scaler(width: float) -> Callable[[float], int]:
    """``ch(base) = int(round(base * width))`` (no divisibility rounding)."""

    def ch(base: float) -> int:
        c = int(round(base * width))
        if c < 1:
            raise ValueError(f"width {width} scales {base} channels down to {c}")
        return c

    return ch


def round_to(x: float, multiple: int) -> int:
    """Round ``x`` to the nearest positive multiple of ``multiple`` (halves go up).

    Used only on *base* counts (e.g. SE squeeze widths) so that the scaled
    counts stay even at the default width.
    """
    return multiple * max(1, math.floor(x / multiple + 0.5))


def _same_padding(kernel_size: int | tuple[int, int], dilation: int = 1) -> int | tuple[int, int]:
    if isinstance(kernel_size, tuple):
        return tuple((k - 1) // 2 * dilation for k in kernel_size)  # type: ignore[return-value]
    return (kernel_size - 1) // 2 * dilation


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> optional activation.

    ``padding=None`` means "same" padding for odd kernels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int = 1,
        groups: int = 1,
        act: ActFactory | None = nn.ReLU,
        padding: int | tuple[int, int] | None = None,
        bn_eps: float = 1e-5,
    ) -> None:
        if padding is None:
            padding = _same_padding(kernel_size)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels, eps=bn_eps),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate: ``x * gate(fc2(act(fc1(avgpool(x)))))``.

    The two "fully connected" layers are 1x1 convs with bias, as in torchvision.
    """

    def __init__(
        self,
        channels: int,
        squeeze_channels: int,
        act: ActFactory = nn.ReLU,
        gate: ActFactory = nn.Sigmoid,
    ) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * s


class GlobalPoolFlatten(nn.Sequential):
    """AdaptiveAvgPool2d(1) -> Flatten: N x C x H x W -> N x C."""

    def __init__(self) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_in, so grouped / depthwise convs are scaled per group)
    convs and linears, unit BN, zero biases.

    Keeps activations O(1) through deep stacks, so that outputs really depend on
    the input (torchvision's fan_out init makes depthwise nets nearly constant).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)


@torch.no_grad()
def normalize_activations(model: nn.Module, x: torch.Tensor) -> None:
    """LSUV-style data-dependent rescaling, done in one forward pass.

    Each Conv2d / Linear (weight and bias) is divided by the standard deviation
    of its output on ``x``, and the normalized output is what flows on, so every
    layer sees unit-scale inputs.  Without this the random BatchNorm offsets
    swamp the input-dependent signal in deep depthwise / SE nets, whose outputs
    then hardly depend on the input.  Assumes each conv / linear is called once.
    """

    def hook(module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        s = out.std()
        if not torch.isfinite(s) or s <= 0:
            return out
        module.weight.div_(s)
        if module.bias is not None:
            module.bias.div_(s)
        return out / s

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
