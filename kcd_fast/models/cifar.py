"""CIFAR-style networks (the CRD / KCD / mdistiller CIFAR-100 model zoo).

Each network has the zoo's module names, so ``model.state_dict()`` has exactly the keys
and shapes of the checkpoints that HobbitLong/RepDistiller (CRD), megvii-research/mdistiller
and dzy3/KCD share (``conv1.weight``, ``layer1.0.bn2.running_var``,
``block2.layer.0.convShortcut.weight``, ``block3.1.weight``, ``layer4.0.shortcut.0.weight``,
``fc.weight`` / ``classifier.weight`` / ``linear.weight``, ...), and their teachers load with
``load_state_dict(strict=True)``. The forward computes the zoo's logits (the zoo's models
also return features; ours return logits only). The zoo's MobileNetV2, ShuffleV1 and
ShuffleV2 are in :mod:`kcd_fast.models.cifar_mobile`.

Designed for 32x32 inputs; all use adaptive average pooling before the classifier (the
zoo's ResNets and WRNs pool a fixed 8x8 window, the same thing on 32x32 inputs), so any
input of at least 8x8 works.

Where a value that feature distillers read is computed by a functional ``F.relu``, the forward
passes it through an ``nn.Identity`` named ``tap_*`` (a tap point for the forward hooks of
:mod:`kcd_fast.distillers.taps`): it owns no parameters or buffers, so the state_dict keys stay
the zoo's and its checkpoints still load strictly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "WideResNet", "CifarVGG", "CifarBottleneckResNet", "CIFAR_MODELS"]


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def _global_pool(x: torch.Tensor) -> torch.Tensor:
    """Average over the spatial dimensions: [B, C, H, W] -> [B, C]."""
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv1-bn1-ReLU-conv2-bn2 (+ shortcut), ReLU.
    The projection shortcut (1x1 conv, BN) is ``downsample``, as in the zoo."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.tap_preact = nn.Identity()  # tap point: the sum before the final ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(self.tap_preact(out + (x if self.downsample is None else self.downsample(x))))


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2: a 3x3 stem (``conv1``, ``bn1``) of ``widths[0]``
    channels, then three stages ``layer1..3`` of n BasicBlocks with ``widths[1:]``
    channels (strides 1, 2, 2), global average pool, ``fc``."""

    def __init__(self, depth: int, widths, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.tap_stem = nn.Identity()  # tap point: the stem's output, after its ReLU
        cin = widths[0]
        for i, cout in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(_global_pool(x))


class Bottleneck(nn.Module):
    """Post-activation bottleneck block: 1x1 conv1-bn1-ReLU, 3x3 conv2-bn2-ReLU (carrying the
    stride), 1x1 conv3-bn3 to ``4 * width`` channels (+ shortcut), ReLU. The projection
    shortcut (1x1 conv, BN) is ``shortcut``, as in the zoo's ``resnetv2``; the identity
    shortcut has no module (no state_dict entries)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = self.expansion * width
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )
        self.tap_preact = nn.Identity()  # tap point: the sum before the final ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(self.tap_preact(out + (x if self.shortcut is None else self.shortcut(x))))


class CifarBottleneckResNet(nn.Module):
    """The zoo's CIFAR ``ResNet50`` (``resnetv2``): an ImageNet-style bottleneck ResNet with
    a CIFAR stem, i.e. a 3x3 stride-1 ``conv1`` of 64 channels and ``bn1`` (no max-pool),
    stages ``layer1..4`` of ``depths`` Bottlenecks of widths 64, 128, 256, 512 (outputs 4x
    that; strides 1, 2, 2, 2), global average pool, ``linear``.

    Not torchvision's ImageNet ``resnet50`` (7x7 stride-2 stem, max-pool, ``fc``)."""

    def __init__(self, depths=(3, 4, 6, 3), num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if len(depths) != 4:
            raise ValueError(f"a bottleneck ResNet has 4 stages, got {len(depths)}")
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        self.tap_stem = nn.Identity()  # tap point: the stem's output, after its ReLU
        cin = 64
        for i, (width, n) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * Bottleneck.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(_global_pool(x))


class WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: bn1-ReLU-conv1-bn2-ReLU-(dropout)-conv2 (+ shortcut).
    Where the width changes, the shortcut is a 1x1 conv (``convShortcut``, the zoo's name)
    of the pre-activated input; otherwise it is the raw input."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        if stride != 1 and cin == cout:
            raise ValueError("a strided WideBlock must also change the width")
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.dropout = dropout
        self.convShortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(a)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.convShortcut is None else self.convShortcut(a))


class WideStage(nn.Module):
    """A stage of WideBlocks, held as ``layer`` (so its keys read ``block1.layer.0.conv1``)."""

    def __init__(self, blocks):
        super().__init__()
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """Wide ResNet WRN-depth-k (depth 6n+4): a 3x3 ``conv1`` of 16 channels, stages
    ``block1..3`` of n WideBlocks with 16k, 32k, 64k channels (strides 1, 2, 2), a final
    ``bn1``-ReLU, global average pool, ``fc``."""

    def __init__(self, depth: int, widen: int, num_classes: int = 100,
                 in_channels: int = 3, dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        self.conv1 = _conv3x3(in_channels, 16)
        cin = 16
        for i, cout in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(cin, cout, 2 if (i > 0 and j == 0) else 1, dropout))
                cin = cout
            self.add_module(f"block{i + 1}", WideStage(blocks))
        self.bn1 = nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(_global_pool(F.relu(self.bn1(x))))


VGG_CFGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class CifarVGG(nn.Module):
    """CIFAR VGG with BatchNorm (the zoo's ``vgg8_bn`` .. ``vgg19_bn``): five stages
    ``block0..4`` of 3x3 conv-BN-ReLU (the conv has a bias; each stage's last ReLU is
    applied outside it), 2x2 max-pools ``pool0..2`` after the first three stages, global
    average pool, ``classifier``.

    As in the zoo, a fourth max-pool (``pool3``, after ``block3``) is applied only to
    64-pixel-high inputs (Tiny-ImageNet), so 32x32 inputs reach ``block4`` at 4x4."""

    def __init__(self, cfg, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        if len(cfg) != 5:
            raise ValueError(f"a CIFAR VGG has 5 stages, got {len(cfg)}")
        cin = in_channels
        for i, stage in enumerate(cfg):
            layers = []
            for cout in stage:
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
                cin = cout
            self.add_module(f"block{i}", nn.Sequential(*layers[:-1]))
        for i in range(4):
            self.add_module(f"pool{i}", nn.MaxPool2d(2, 2))
        for i in range(5):  # tap points: each stage's output after its ReLU
            self.add_module(f"tap_relu{i}", nn.Identity())
        self.classifier = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiny_imagenet = x.shape[2] == 64
        x = self.pool0(self.tap_relu0(F.relu(self.block0(x))))
        x = self.pool1(self.tap_relu1(F.relu(self.block1(x))))
        x = self.pool2(self.tap_relu2(F.relu(self.block2(x))))
        x = self.tap_relu3(F.relu(self.block3(x)))
        if tiny_imagenet:
            x = self.pool3(x)
        x = self.tap_relu4(F.relu(self.block4(x)))
        return self.classifier(_global_pool(x))


# name -> factory(num_classes, in_channels), under the zoo's model_dict names.
CIFAR_MODELS = {
    "resnet8": lambda nc, ic: CifarResNet(8, (16, 16, 32, 64), nc, ic),
    "resnet14": lambda nc, ic: CifarResNet(14, (16, 16, 32, 64), nc, ic),
    "resnet20": lambda nc, ic: CifarResNet(20, (16, 16, 32, 64), nc, ic),
    "resnet32": lambda nc, ic: CifarResNet(32, (16, 16, 32, 64), nc, ic),
    "resnet44": lambda nc, ic: CifarResNet(44, (16, 16, 32, 64), nc, ic),
    "resnet56": lambda nc, ic: CifarResNet(56, (16, 16, 32, 64), nc, ic),
    "resnet110": lambda nc, ic: CifarResNet(110, (16, 16, 32, 64), nc, ic),
    "resnet8x4": lambda nc, ic: CifarResNet(8, (32, 64, 128, 256), nc, ic),
    "resnet32x4": lambda nc, ic: CifarResNet(32, (32, 64, 128, 256), nc, ic),
    "ResNet50": lambda nc, ic: CifarBottleneckResNet((3, 4, 6, 3), nc, ic),
    "wrn_16_1": lambda nc, ic: WideResNet(16, 1, nc, ic),
    "wrn_16_2": lambda nc, ic: WideResNet(16, 2, nc, ic),
    "wrn_40_1": lambda nc, ic: WideResNet(40, 1, nc, ic),
    "wrn_40_2": lambda nc, ic: WideResNet(40, 2, nc, ic),
    "vgg8": lambda nc, ic: CifarVGG(VGG_CFGS[8], nc, ic),
    "vgg11": lambda nc, ic: CifarVGG(VGG_CFGS[11], nc, ic),
    "vgg13": lambda nc, ic: CifarVGG(VGG_CFGS[13], nc, ic),
    "vgg16": lambda nc, ic: CifarVGG(VGG_CFGS[16], nc, ic),
    "vgg19": lambda nc, ic: CifarVGG(VGG_CFGS[19], nc, ic),
}
