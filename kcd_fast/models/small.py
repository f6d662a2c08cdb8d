"""Small CNNs for scikit-learn digits (1x8x8) and Fashion-MNIST (1x28x28).

Both use 3x3 padded convs, ceil-mode max-pools and global average pooling, so any
input of at least 8x8 and any number of input channels works. Sized to train in
seconds on a couple of CPU cores.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallCNN", "SMALL_MODELS"]


class FeatureClassifier(nn.Module):
    """``features`` (the given layers), global average pooling, one linear layer."""

    def __init__(self, layers, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _cbr(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(FeatureClassifier):
    """Stages of 3x3 conv-BN-ReLU separated by 2x2 max-pools, then global average pool
    and a linear classifier. ``stages`` lists the conv widths of each stage."""

    def __init__(self, stages, num_classes: int = 10, in_channels: int = 1):
        layers, cin = [], in_channels
        for i, stage in enumerate(stages):
            if i > 0:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            for cout in stage:
                layers += _cbr(cin, cout)
                cin = cout
        super().__init__(layers, cin, num_classes)


# name -> factory(num_classes, in_channels)
SMALL_MODELS = {
    # student, ~22k params, 3 convs: 8 | 32 | 64 (the full-resolution stage is kept
    # narrow because it dominates CPU time on 28x28 inputs)
    "cnn_small": lambda nc, ic: SmallCNN([[8], [32], [64]], nc, ic),
    # teacher, ~0.29M params, 7 convs: 16 | 32, 32 | 64, 64 | 128, 128
    "cnn_large": lambda nc, ic: SmallCNN([[16], [32, 32], [64, 64], [128, 128]], nc, ic),
}
