"""Model zoo: small-width, plain-PyTorch versions of standard CNN topologies.

Every factory takes ``width`` (a channel multiplier, ``ch(base) = round(base * width)``
without divisibility rounding) and ``num_classes``; at each model's default width
all channel counts are even, so ``width / 2`` is exactly the half-width model.

    >>> from onnxprune.models import build, example_input
    >>> model = build("resnet18")            # eval mode, seeded, BN stats randomized
    >>> y = model(example_input("resnet18"))  # (1, 10)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import (
    alexnet,
    densenet,
    efficientnet,
    googlenet,
    inception,
    mnasnet,
    mobilenet,
    regnet,
    resnet,
    shufflenet,
    squeezenet,
    vgg,
)
from .common import normalize_activations
from .transformers import TRANSFORMERS  # noqa: F401  (attention models; not in ZOO, whose tests assume CNNs)

__all__ = ["ModelSpec", "ZOO", "build", "example_input", "randomize_bn"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., nn.Module]  # build(width=..., num_classes=10) -> nn.Module in eval() mode
    input_shape: tuple[int, ...]  # e.g. (1, 3, 32, 32)
    width: float  # default width (all channel counts even)
    grouped: bool = False  # has grouped (not depthwise) convs


_S32 = (1, 3, 32, 32)
_S64 = (1, 3, 64, 64)

ZOO: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("resnet18", resnet.resnet18, _S32, 0.125),
        ModelSpec("resnet50", resnet.resnet50, _S32, 0.125),
        ModelSpec("vgg11_bn", vgg.vgg11_bn, _S32, 0.125),
        ModelSpec("alexnet", alexnet.alexnet, _S64, 0.125),
        ModelSpec("squeezenet", squeezenet.squeezenet1_1, _S32, 0.25),
        ModelSpec("mobilenet_v1", mobilenet.mobilenet_v1, _S32, 0.25),
        ModelSpec("mobilenet_v2", mobilenet.mobilenet_v2, _S32, 0.25),
        ModelSpec("mobilenet_v3", mobilenet.mobilenet_v3_small, _S32, 0.5),
        ModelSpec("mnasnet", mnasnet.mnasnet0_5, _S32, 0.5),
        ModelSpec("efficientnet_b0", efficientnet.efficientnet_b0, _S32, 0.5),
        ModelSpec("googlenet", googlenet.googlenet, _S32, 0.25),
        ModelSpec("inception", inception.inception_v3_small, _S64, 0.125),
        ModelSpec("densenet", densenet.densenet, _S32, 0.25),
        ModelSpec("shufflenet_v2", shufflenet.shufflenet_v2, _S32, 0.5),
        ModelSpec("resnext", resnet.resnext, _S32, 0.125, grouped=True),
        ModelSpec("wide_resnet", resnet.wide_resnet, _S32, 0.125),
        ModelSpec("regnet", regnet.regnet_y, _S32, 0.5, grouped=True),
    )
}


def randomize_bn(model: nn.Module, seed: int) -> None:
    """Give every BatchNorm non-trivial, seed-deterministic parameters and statistics.

    running_mean ~ N(0, 0.2), running_var ~ U[0.5, 2], weight ~ U[0.5, 1.5],
    bias ~ N(0, 0.2) -- so that BN folding is really exercised.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)


def build(name: str, width: float | None = None, seed: int = 0, num_classes: int = 10) -> nn.Module:
    """Build ``ZOO[name]`` deterministically from ``seed``, in eval mode.

    ``torch.manual_seed(seed)`` -> construct -> :func:`randomize_bn` -> rescale
    every conv / linear so its output has unit std on a seeded random batch
    (:func:`models.common.normalize_activations`), which keeps the output
    sensitive to the input through deep stacks with random BN statistics.
    """
    spec = ZOO[name]
    torch.manual_seed(seed)
    model = spec.build(width=spec.width if width is None else width, num_classes=num_classes).eval()
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    normalize_activations(model, torch.randn((8, *spec.input_shape[1:]), generator=g))
    return model


def example_input(name: str, seed: int = 0) -> torch.Tensor:
    """A seeded N(0, 1) input of ``ZOO[name].input_shape``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ZOO[name].input_shape, generator=g)
