"""VGG-11 with batch norm (torchvision ``vgg11_bn`` topology).

For 32x32 inputs the last max-pool of the feature extractor is dropped so the
classifier flattens a 2x2 map (flatten -> Linear with H*W > 1), replacing
torchvision's AdaptiveAvgPool2d((7, 7)), which does not export at small sizes.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import ConvBNAct, init_weights, scaler

# "M" = 2x2 max-pool.  torchvision cfg "A" ends with one more "M".
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)
HIDDEN = 4096


class VGG(nn.Module):
    def __init__(self, cfg: tuple[int | str, ...], width: float, num_classes: int = 10,
                 final_spatial: int = 2) -> None:
        super().__init__()
        ch = scaler(width)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(ConvBNAct(in_ch, ch(v), 3))
                in_ch = ch(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_ch * final_spatial * final_spatial, ch(HIDDEN)),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(ch(HIDDEN), ch(HIDDEN)),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(ch(HIDDEN), num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def vgg11_bn(width: float = 0.125, num_classes: int = 10) -> VGG:
    """Expects 32x32 inputs (4 pools -> 2x2 map before the classifier)."""
    return VGG(VGG11_CFG, width, num_classes, final_spatial=2).eval()
