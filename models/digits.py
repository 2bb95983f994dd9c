"""A real (small) image task without downloads: scikit-learn's bundled digits at CIFAR size.

`load_digits_32` turns `sklearn.datasets.load_digits` (1797 grayscale 8x8 digits that ship inside
the scikit-learn package) into CIFAR-shaped tensors: upsampled to 32x32 (bilinear), repeated to 3
channels, standardised with the training split's mean and std, split stratified with
`random_state=seed`. `augment` draws random shifts and small affine warps with torch ops, from a
`torch.Generator`, so training runs repeat exactly.

    >>> from onnxprune.models.digits import load_digits_32, augment
    >>> data = load_digits_32(seed=0)           # x_train [1437, 3, 32, 32] float32, y_train int64 ...
    >>> xb = augment(data.x_train[:64], torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

SIZE = 32
CHANNELS = 3
NUM_CLASSES = 10


class DigitsSplit(NamedTuple):
    x_train: torch.Tensor   # [N_train, 3, 32, 32] float32, standardised
    y_train: torch.Tensor   # [N_train] int64
    x_test: torch.Tensor    # [N_test, 3, 32, 32] float32, standardised with the training statistics
    y_test: torch.Tensor    # [N_test] int64
    mean: float             # of the upsampled training images (raw pixel values 0..16)
    std: float


def load_digits_32(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """The digits data set as 3x32x32 float32 tensors, split stratified (`random_state=seed`)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("load_digits_32 needs scikit-learn for its bundled digits data set: "
                          "pip install scikit-learn (or the [bench] / [test] extras)") from e
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = load_digits()
    x = torch.from_numpy(digits.images.astype("float32"))[:, None]           # [1797, 1, 8, 8], 0..16
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).repeat(1, CHANNELS, 1, 1)
    y = torch.from_numpy(digits.target.astype("int64"))
    idx_tr, idx_te = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                      random_state=seed, stratify=y.numpy())
    idx_tr, idx_te = torch.from_numpy(idx_tr), torch.from_numpy(idx_te)
    x_tr, x_te = x[idx_tr], x[idx_te]
    mean, std = float(x_tr.mean()), float(x_tr.std())
    return DigitsSplit(((x_tr - mean) / std).contiguous(), y[idx_tr].clone(),
                       ((x_te - mean) / std).contiguous(), y[idx_te].clone(), mean, std)


def augment(x: torch.Tensor, generator: torch.Generator, max_shift: int = 3, max_rotation: float = 10.0,
            scale: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
    """A random shift (whole pixels, up to `max_shift` each way), rotation (up to `max_rotation`
    degrees each way) and isotropic scale (in `scale`) per image, applied with `F.affine_grid` /
    `F.grid_sample` (bilinear; outside pixels repeat the border, i.e. the background). Every random
    number comes from `generator`: the same generator state gives the same batch. Shape and dtype
    are kept."""
    if x.ndim != 4:
        raise ValueError(f"augment expects a batch [N, C, H, W], got shape {list(x.shape)}")
    n, _, h, w = x.shape
    g = dict(generator=generator, dtype=torch.float64)
    angle = (torch.rand(n, **g) * 2 - 1) * math.radians(max_rotation)
    s = scale[0] + torch.rand(n, **g) * (scale[1] - scale[0])
    shift = torch.randint(-max_shift, max_shift + 1, (n, 2), generator=generator).to(torch.float64)
    # affine_grid maps output coordinates (normalised to [-1, 1]) to input coordinates: the inverse
    # of the warp applied to the image. Rotate by `angle`, zoom by `s`, move by `shift` pixels.
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    theta[:, 0, 2] = -shift[:, 0] * 2.0 / w
    theta[:, 1, 2] = -shift[:, 1] * 2.0 / h
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


__all__ = ["load_digits_32", "augment", "DigitsSplit", "SIZE", "CHANNELS", "NUM_CLASSES"]
