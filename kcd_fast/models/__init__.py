"""Model zoo: ImageNet ResNets (torchvision), CIFAR-style networks and small CNNs.

``build_model(name, num_classes, in_channels)`` returns an ``nn.Module`` whose
``forward(x)`` gives logits of shape [B, num_classes].
"""
from __future__ import annotations

import torchvision
from torch import nn

from .cifar import (
    CIFAR_MODELS,
    CifarBottleneckResNet,
    CifarResNet,
    CifarVGG,
    WideResNet,
)
from .cifar_mobile import (
    CIFAR_MOBILE_MODELS,
    CifarMobileNetV2,
    ShuffleNetV1,
    ShuffleNetV2,
)
from .small import SMALL_MODELS, SmallCNN

__all__ = [
    "build_model", "available_models", "default_models",
    "CifarResNet", "WideResNet", "CifarVGG", "CifarBottleneckResNet",
    "CifarMobileNetV2", "ShuffleNetV1", "ShuffleNetV2", "SmallCNN",
]


def _imagenet_resnet(arch: str):
    def factory(num_classes: int, in_channels: int) -> nn.Module:
        """torchvision ResNet, randomly initialised (never downloads weights)."""
        model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        return model
    return factory


_REGISTRY = {
    **{a: _imagenet_resnet(a) for a in ("resnet18", "resnet34", "resnet50")},
    **CIFAR_MODELS,  # the CIFAR zoo; its "ResNet50" is not torchvision's "resnet50"
    **CIFAR_MOBILE_MODELS,
    **SMALL_MODELS,
}

_DEFAULTS = {
    "digits": ("cnn_large", "cnn_small"),
    "fashion-mnist": ("cnn_large", "cnn_small"),
    "cifar100": ("resnet32x4", "resnet8x4"),
    "imagenet": ("resnet34", "resnet18"),
    "fake": ("resnet34", "resnet18"),
}


def available_models() -> list[str]:
    """Sorted names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way classifier for ``in_channels`` inputs."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}")
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if int(in_channels) != in_channels or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
    return _REGISTRY[name](int(num_classes), int(in_channels))


def default_models(dataset: str) -> tuple[str, str]:
    """Default (teacher, student) model names for ``dataset``."""
    key = dataset.lower().replace("_", "-")
    if key not in _DEFAULTS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(_DEFAULTS))}")
    return _DEFAULTS[key]
