"""Masks that make zeros in PyTorch models (weights only: biases and BN stay, so that the constant
outputs of zeroed filters are really exercised)."""

from __future__ import annotations

import re

import torch
from torch import nn


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def zero_random_filters(model: nn.Module, fraction: float = 0.5, seed: int = 0, keep_classifier: bool = True) -> int:
    """Zero a random `fraction` of the output filters of every Conv2d/Linear; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    layers = _layers(model)[:-1] if keep_classifier else _layers(model)
    total = 0
    for m in layers:
        n = m.weight.shape[0]
        k = int(n * fraction)
        idx = torch.randperm(n, generator=gen)[:k]
        m.weight[idx] = 0
        total += k
    return total


@torch.no_grad()
def zero_upper_half(model: nn.Module, keep_classifier: bool = True) -> None:
    """Zero the upper half of every layer's filters (per group for grouped convs): with the
    models/ zoo at its default width, what survives is exactly the half-width model."""
    layers = _layers(model)[:-1] if keep_classifier else _layers(model)
    # a grouped conv removes channels by group-local index: its own outputs, the outputs of the
    # layer feeding it and the SE gate over its outputs are halved inside each group
    groups_of = {id(m): max(_grouping(m), _grouping(nxt)) for m, nxt in zip(layers, layers[1:] + [None])}
    for se in model.modules():
        if hasattr(se, "fc1") and hasattr(se, "fc2") and se.fc1 in layers and layers.index(se.fc1) > 0:
            groups_of[id(se.fc2)] = groups_of[id(layers[layers.index(se.fc1) - 1])]
    groups_of.update(_shuffle_groups(model))
    for m in layers:
        groups = groups_of[id(m)]
        per_group = m.weight.shape[0] // groups
        w = m.weight.view(groups, per_group, *m.weight.shape[1:])
        w[:, per_group // 2:] = 0


# ShuffleNetV2 splits the *shuffled* tensor in halves, so "the upper half of every output" is not
# the half-width model there. With m stride-1 units in a stage, the stride-2 unit's branch outputs
# keep the lower half of each of 2^m blocks and the i-th stride-1 unit's of 2^(m-i) blocks; the stage
# then ends with its lower half live.
_SHUFFLE_BRANCH_OUT = re.compile(r"stages\.(\d+)\.(\d+)\.(branch1\.1\.0|branch2\.2\.0)$")


def _shuffle_groups(model: nn.Module) -> dict[int, int]:
    units: dict[str, set] = {}
    for name, _ in model.named_modules():
        found = re.match(r"stages\.(\d+)\.(\d+)$", name)
        if found:
            units.setdefault(found.group(1), set()).add(int(found.group(2)))
    out = {}
    for name, m in model.named_modules():
        found = _SHUFFLE_BRANCH_OUT.match(name)
        if found:
            m_units = len(units[found.group(1)]) - 1
            out[id(m)] = 2 ** (m_units - int(found.group(2))) if int(found.group(2)) else 2 ** m_units
    return out


def _grouping(m) -> int:
    grouped = isinstance(m, nn.Conv2d) and m.groups > 1 and m.in_channels // m.groups > 1
    return m.groups if grouped else 1


def conv_linear_weight_count(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in _layers(model))
