"""Mobile networks of the CRD / KCD / mdistiller CIFAR-100 model zoo: MobileNetV2 (the
zoo's ``mobile_half``), ShuffleNetV1 (``ShuffleV1``) and ShuffleNetV2 (``ShuffleV2``).

As in :mod:`kcd_fast.models.cifar`, each network has the zoo's module names, so its
``state_dict()`` has exactly the keys and shapes of the zoo's checkpoints
(``blocks.2.0.conv.3.weight``, ``classifier.0.weight``, ``layer1.0.conv3.weight``,
``linear.weight``, ...) and loads them with ``load_state_dict(strict=True)``; the forward
computes the zoo's logits and returns them only.

Designed for 32x32 inputs; all use adaptive average pooling before the classifier (the
zoo pools a fixed window that covers the whole last feature map of a 32x32 input), so any
input of at least 8x8 works.

As there, values that feature distillers read but a functional ``F.relu`` computes pass through
``nn.Identity`` tap points named ``tap_*`` (no state_dict entries; see
:mod:`kcd_fast.distillers.taps`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cifar import _global_pool, _init_weights

__all__ = ["CifarMobileNetV2", "ShuffleNetV1", "ShuffleNetV2", "CIFAR_MOBILE_MODELS"]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list:
    """[conv (no bias, "same" padding), BN, ReLU] as a list, to splice into a Sequential."""
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: [B, g*c, H, W] viewed as [B, g, c, H, W],
    transposed to [B, c, g, H, W] and flattened back."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class InvertedResidual(nn.Module):
    """MobileNetV2 block, held as ``conv`` (a Sequential, so its keys read ``conv.0.weight``
    .. ``conv.7.running_var``): 1x1 expansion to ``expand * cin`` channels-BN-ReLU, 3x3
    depthwise (carrying the stride)-BN-ReLU, 1x1 linear projection-BN; plus the input where
    the stride is 1 and the width does not change. As in the zoo, the expansion conv is
    there even for an expansion of 1."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"an InvertedResidual has stride 1 or 2, got {stride}")
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.conv = nn.Sequential(
            *_conv_bn_relu(cin, mid, 1),
            *_conv_bn_relu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class CifarMobileNetV2(nn.Module):
    """The zoo's CIFAR MobileNetV2 (``mobilenetv2_T_w``; ``MobileNetV2`` is ``mobile_half``:
    expansion 6, width multiplier 0.5): a 3x3 stride-2 ``conv1``-BN-ReLU of ``32 * width``
    channels, seven stages ``blocks.0..6`` of InvertedResiduals with ``width`` times 16,
    24, 32, 64, 96, 160, 320 channels (1, 2, 3, 4, 3, 3, 1 blocks; strides 1, 1, 2, 2, 1,
    2, 1; the first stage expands by 1, the others by ``expand``), a 1x1 ``conv2``-BN-ReLU
    to 1280 channels (``1280 * width`` when ``width`` > 1), global average pool and
    ``classifier`` (a Sequential holding one Linear, so its key is ``classifier.0.weight``).

    Channel counts are ``int(c * width)``, as in the zoo."""

    # expansion (None: ``expand``), channels, blocks, stride of the first block
    SETTINGS = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
                (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1))

    def __init__(self, expand: int = 6, width: float = 0.5, num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        cin = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn_relu(in_channels, cin, 3, 2))
        self.blocks = nn.ModuleList()
        for t, c, n, s in self.SETTINGS:
            cout = int(c * width)
            stage = []
            for j in range(n):
                stage.append(InvertedResidual(cin, cout, s if j == 0 else 1, expand if t is None else t))
                cin = cout
            self.blocks.append(nn.Sequential(*stage))
        last = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(cin, last, 1))
        self.classifier = nn.Sequential(nn.Linear(last, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return self.classifier(_global_pool(self.conv2(x)))


class ShuffleV1Block(nn.Module):
    """ShuffleNetV1 bottleneck unit: 1x1 group ``conv1``-bn1-ReLU to a quarter of the branch
    width, channel shuffle, 3x3 depthwise ``conv2``-bn2-ReLU (carrying the stride), 1x1 group
    ``conv3``-bn3; then ReLU of the sum with the input (stride 1) or of the concatenation with
    the input's 3x3 stride-2 average pool (stride 2; the branch then makes ``cout - cin``
    channels). ``group_first=False`` leaves ``conv1`` ungrouped (and unshuffled), as the zoo
    does for the unit that follows the 24-channel stem."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int, group_first: bool = True):
        super().__init__()
        if stride not in (1, 2) or (stride == 1 and cin != cout):
            raise ValueError("a ShuffleV1Block keeps its width at stride 1 and downsamples at stride 2")
        self.stride = stride
        branch = cout - cin if stride == 2 else cout
        mid = branch // 4
        self.groups1 = groups if group_first else 1
        self.conv1 = nn.Conv2d(cin, mid, 1, groups=self.groups1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, branch, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(branch)
        self.tap_preact = nn.Identity()  # tap point: the merged branches before the final ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.groups1)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            # The zoo's nn.AvgPool2d(3, stride=2, padding=1): zero padding counts in the mean.
            return F.relu(self.tap_preact(torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)))
        return F.relu(self.tap_preact(out + x))


class ShuffleNetV1(nn.Module):
    """The zoo's CIFAR ShuffleNetV1 (``ShuffleV1``: widths 240, 480, 960, 4, 8, 4 units,
    3 groups): a 1x1 ``conv1``-``bn1``-ReLU stem of 24 channels, stages ``layer1..3`` of
    ShuffleV1Blocks, each starting with a stride-2 unit, global average pool, ``linear``."""

    def __init__(self, widths=(240, 480, 960), depths=(4, 8, 4), groups: int = 3,
                 num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.tap_stem = nn.Identity()  # tap point: the stem's output, after its ReLU
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, depths)):
            units = []
            for j in range(n):
                units.append(ShuffleV1Block(cin, cout, 2 if j == 0 else 1, groups,
                                            group_first=(i, j) != (0, 0)))
                cin = cout
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
        self.linear = nn.Linear(cin, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(_global_pool(x))


class ShuffleV2Block(nn.Module):
    """ShuffleNetV2 basic unit: the channels are split in halves; the second half goes through
    1x1 ``conv1``-bn1-ReLU, 3x3 depthwise ``conv2``-bn2, 1x1 ``conv3``-bn3-ReLU and is
    concatenated after the untouched first half; then a channel shuffle of 2 groups.

    The final ReLU is applied after the concatenation and shuffle (both channel permutations),
    through the tap point ``tap_preact``: the same output, since the untouched half is itself a
    ReLU output (the unit's input is a ShuffleV2 unit's output), so ReLU leaves it as it is;
    its gradient is the same too, as the upstream ReLU passes none where the half is 0. The tap
    point sees the zoo's pre-activation feature, shuffle(cat(half, bn3(conv3(...))))."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.conv1 = nn.Conv2d(half, half, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.conv2 = nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.conv3 = nn.Conv2d(half, half, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(half)
        self.tap_preact = nn.Identity()  # tap point: the shuffled unit before the final ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[1] // 2
        keep, x = x[:, :half], x[:, half:]
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self.bn2(self.conv2(out))))
        return F.relu(self.tap_preact(_channel_shuffle(torch.cat([keep, out], 1), 2)))


class ShuffleV2DownBlock(nn.Module):
    """ShuffleNetV2 downsampling unit, two branches of ``cout / 2`` channels each, concatenated
    and channel-shuffled (2 groups): left, 3x3 stride-2 depthwise ``conv1``-bn1, 1x1
    ``conv2``-bn2-ReLU; right, 1x1 ``conv3``-bn3-ReLU, 3x3 stride-2 depthwise ``conv4``-bn4,
    1x1 ``conv5``-bn5-ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        mid = cout // 2
        self.conv1 = nn.Conv2d(cin, cin, 3, 2, 1, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv2 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return _channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    """The zoo's CIFAR ShuffleNetV2 (``ShuffleV2``, net size 1: widths 116, 232, 464, then
    1024; 3, 7, 3 basic units): a 1x1 ``conv1``-``bn1``-ReLU stem of 24 channels, stages
    ``layer1..3`` of a ShuffleV2DownBlock followed by ShuffleV2Blocks, a 1x1
    ``conv2``-``bn2``-ReLU, global average pool, ``linear``."""

    def __init__(self, widths=(116, 232, 464, 1024), depths=(3, 7, 3), num_classes: int = 100,
                 in_channels: int = 3):
        super().__init__()
        if len(widths) != len(depths) + 1:
            raise ValueError("ShuffleNetV2 needs one width per stage and one for conv2")
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.tap_stem = nn.Identity()  # tap point: the stem's output, after its ReLU
        cin = 24
        for i, (cout, n) in enumerate(zip(widths, depths)):
            units = [ShuffleV2DownBlock(cin, cout)] + [ShuffleV2Block(cout) for _ in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*units))
            cin = cout
        self.conv2 = nn.Conv2d(cin, widths[-1], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[-1])
        self.linear = nn.Linear(widths[-1], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tap_stem(F.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.linear(_global_pool(x))


# name -> factory(num_classes, in_channels), under the zoo's model_dict names.
CIFAR_MOBILE_MODELS = {
    "MobileNetV2": lambda nc, ic: CifarMobileNetV2(6, 0.5, nc, ic),
    "ShuffleV1": lambda nc, ic: ShuffleNetV1((240, 480, 960), (4, 8, 4), 3, nc, ic),
    "ShuffleV2": lambda nc, ic: ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), nc, ic),
}
