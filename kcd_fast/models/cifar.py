"""CIFAR-style networks (the CRD / KCD / mdistiller CIFAR-100 model zoo).

Designed for 32x32 inputs; all use adaptive average pooling before the
classifier, so any input of at least 8x8 works.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeatureClassifier", "CifarResNet", "WideResNet", "CifarVGG", "CIFAR_MODELS"]


class FeatureClassifier(nn.Module):
    """``features`` (the given layers), global average pooling, one linear layer: the head every
    model of this zoo shares."""

    def __init__(self, layers, channels: int, num_classes: int):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN (+ shortcut), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            _conv3x3(cout, cout), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class CifarResNet(FeatureClassifier):
    """CIFAR ResNet of depth 6n+2: a 3x3 stem of ``widths[0]`` channels, then three
    stages of n BasicBlocks with ``widths[1:]`` channels (strides 1, 2, 2)."""

    def __init__(self, depth: int, widths, num_classes: int = 100, in_channels: int = 3):
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        layers = [_conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            for j in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        super().__init__(layers, cin, num_classes)
        _init_weights(self)


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv-BN-ReLU-(dropout)-conv (+ shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            _conv3x3(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(), _conv3x3(cout, cout),
        )
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        # The projection shortcut reads the pre-activated input, the identity the raw one.
        return self.body(a) + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(FeatureClassifier):
    """Wide ResNet WRN-depth-k (depth 6n+4): widths 16, 16k, 32k, 64k."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100,
                 in_channels: int = 3, dropout: float = 0.0):
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        layers = [_conv3x3(in_channels, 16)]
        cin = 16
        for i, cout in enumerate((16 * widen, 32 * widen, 64 * widen)):
            for j in range(n):
                layers.append(WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = cout
        layers += [nn.BatchNorm2d(cin), nn.ReLU(inplace=True)]
        super().__init__(layers, cin, num_classes)
        _init_weights(self)


VGG_CFGS = {
    8: [[64], [128], [256], [512], [512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}


class CifarVGG(FeatureClassifier):
    """CIFAR VGG with BatchNorm: five stages of 3x3 conv-BN-ReLU, 2x2 max-pool after the
    first four (ceil mode, so 8x8 inputs survive), global average pool, one linear layer."""

    def __init__(self, cfg, num_classes: int = 100, in_channels: int = 3):
        layers, cin = [], in_channels
        for i, stage in enumerate(cfg):
            for cout in stage:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            if i < len(cfg) - 1:
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        super().__init__(layers, cin, num_classes)
        _init_weights(self)


# name -> factory(num_classes, in_channels)
CIFAR_MODELS = {
    "resnet20": lambda nc, ic: CifarResNet(20, (16, 16, 32, 64), nc, ic),
    "resnet56": lambda nc, ic: CifarResNet(56, (16, 16, 32, 64), nc, ic),
    "resnet110": lambda nc, ic: CifarResNet(110, (16, 16, 32, 64), nc, ic),
    "resnet8x4": lambda nc, ic: CifarResNet(8, (32, 64, 128, 256), nc, ic),
    "resnet32x4": lambda nc, ic: CifarResNet(32, (32, 64, 128, 256), nc, ic),
    "wrn_16_2": lambda nc, ic: WideResNet(16, 2, nc, ic),
    "wrn_40_2": lambda nc, ic: WideResNet(40, 2, nc, ic),
    "vgg8": lambda nc, ic: CifarVGG(VGG_CFGS[8], nc, ic),
    "vgg13": lambda nc, ic: CifarVGG(VGG_CFGS[13], nc, ic),
}
