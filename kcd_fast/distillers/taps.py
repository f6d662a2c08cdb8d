"""Feature taps: the intermediate values of a model that feature distillers read, by canonical name,
taken with forward hooks instead of a rewritten ``forward``.

Canonical names (``tap_points(model)`` lists those a model has):

* ``stem``: the stem's output, after its ReLU (before any max-pool); the conv output itself for a
  pre-activation WRN. The small CNNs have none.
* ``stage1`` .. ``stageK``: the output of each residual stage (block group), i.e. of the last block
  at each resolution: K = 4 for torchvision's ResNets, the zoo's ``ResNet50``, its VGGs and its
  MobileNetV2; 3 for its ResNets, WRNs, ShuffleV1 and ShuffleV2; the number of stages for a
  small CNN (3 for ``cnn_small``, 4 for ``cnn_large``). These are the features ``feat[1:-1]`` of
  the CRD code base (HobbitLong/RepDistiller) and of mdistiller, stage by stage.
* ``stage{i}_pre``: the same value before the stage's final ReLU (the "preact" features of those
  code bases). In a pre-activation WRN, a stage's output has no ReLU: its ``_pre`` is the output of
  the BN that the next ReLU reads (``block{i+1}.layer.0.bn1``, then ``bn1``). MobileNetV2's stages
  end in a linear bottleneck, so there ``stage{i}_pre`` is ``stage{i}``.
* ``pooled``: the classifier's input, [B, C] (global average pool, flattened).

How a value is taken (:class:`TapPoint`'s ``kind``):

* ``"output"``: a forward hook on the module; its output.
* ``"input"``: a forward pre-hook on the module; its first input, copied first when the module is
  an in-place ReLU (a forward hook on one sees the value after the ReLU overwrote it).
* ``"last_input"``: the input of the final call of a module called several times inside ``scope``
  (torchvision's blocks call one in-place ``relu`` module two or three times; the residual sum is
  the input of the final one). A pre-hook on ``scope`` arms the tap, the module's pre-hook copies
  each input it sees while armed, and the forward hook of ``scope`` keeps the last copy.

Where the zoo computes a value with a functional ``F.relu`` (no module to hook), its forward
passes that value through an ``nn.Identity`` tap point named ``tap_*``
(:mod:`kcd_fast.models.cifar`, :mod:`kcd_fast.models.cifar_mobile`); Identity modules own no
parameters or buffers, so state_dict keys, and the zoo's checkpoints, are unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import torch
import torchvision
from torch import nn

from kcd_fast.models.cifar import CifarBottleneckResNet, CifarResNet, CifarVGG, WideResNet
from kcd_fast.models.cifar_mobile import CifarMobileNetV2, ShuffleNetV1, ShuffleNetV2
from kcd_fast.models.small import FeatureClassifier

__all__ = ["TapPoint", "tap_points", "architecture_name", "FeatureTaps", "probe_shapes", "stage_names"]

KINDS = ("output", "input", "last_input")


@dataclasses.dataclass(frozen=True)
class TapPoint:
    """Where a tap is taken: the module at dotted path ``module`` of the model, the ``kind`` of hook
    (see the module docstring) and, for ``"last_input"``, the module ``scope`` whose forward holds
    the calls."""

    module: str
    kind: str = "output"
    scope: str | None = None


def _out(path: str) -> TapPoint:
    return TapPoint(path, "output")


def _stages(points: dict, outputs: list[str], pres: list[TapPoint | None]) -> dict:
    """Add ``stage{i}`` (the output of module ``outputs[i-1]``) and ``stage{i}_pre`` where given."""
    for i, (path, pre) in enumerate(zip(outputs, pres), 1):
        points[f"stage{i}"] = _out(path)
        if pre is not None:
            points[f"stage{i}_pre"] = pre
    return points


def _torchvision_resnet(model) -> dict:
    """torchvision ResNet: ``relu`` (the stem's, used once), ``layer1..4``; the residual sum of the last
    block of a layer is the input of that block's ``relu`` (an in-place module) at its final use."""
    points = {"stem": _out("relu")}
    outputs, pres = [], []
    for i in range(1, 5):
        last = f"layer{i}.{len(getattr(model, f'layer{i}')) - 1}"
        outputs.append(f"layer{i}")
        pres.append(TapPoint(f"{last}.relu", "last_input", scope=last))
    _stages(points, outputs, pres)
    points["pooled"] = TapPoint("fc", "input")
    return points


def _residual_stages(model, stem: str, n: int, classifier: str) -> dict:
    """The zoo's ResNets and ShuffleNets: ``layer1..n``, whose last unit has a ``tap_preact`` point."""
    points = {"stem": _out(stem)}
    outputs, pres = [], []
    for i in range(1, n + 1):
        layer = getattr(model, f"layer{i}")
        last = layer[len(layer) - 1]
        outputs.append(f"layer{i}")
        has_pre = hasattr(last, "tap_preact")  # a ShuffleV2 stage of only its down-sampling unit has none
        pres.append(_out(f"layer{i}.{len(layer) - 1}.tap_preact") if has_pre else None)
    _stages(points, outputs, pres)
    points["pooled"] = TapPoint(classifier, "input")
    return points


def _cifar_resnet(model) -> dict:
    return _residual_stages(model, "tap_stem", 3, "fc")


def _cifar_bottleneck_resnet(model) -> dict:
    return _residual_stages(model, "tap_stem", 4, "linear")


def _shufflenet(model) -> dict:
    return _residual_stages(model, "tap_stem", 3, "linear")


def _wide_resnet(model) -> dict:
    """Pre-activation WRN: a stage's output is the raw residual sum; the BN that the next ReLU reads
    gives its ``_pre``: the next stage's first ``bn1``, or the final ``bn1``."""
    pres = [_out("block2.layer.0.bn1"), _out("block3.layer.0.bn1"), _out("bn1")]
    points = _stages({"stem": _out("conv1")}, ["block1", "block2", "block3"], pres)
    points["pooled"] = TapPoint("fc", "input")
    return points


def _cifar_vgg(model) -> dict:
    """VGG: ``block{i}`` ends at its last BN (the ReLU is functional): the block's output is the
    ``_pre``, the tap point ``tap_relu{i}`` the stage output; block0 is the stem."""
    points = _stages({"stem": _out("tap_relu0")}, [f"tap_relu{i}" for i in range(1, 5)],
                     [_out(f"block{i}") for i in range(1, 5)])
    points["pooled"] = TapPoint("classifier", "input")
    return points


def _mobilenet_v2(model) -> dict:
    """MobileNetV2: the last block group at each resolution of a 32x32 input (16, 8, 4, 2): blocks 1, 2,
    4, 6. Linear bottlenecks: no final ReLU, so ``_pre`` is the output itself."""
    groups = [f"blocks.{i}" for i in (1, 2, 4, 6)]
    points = _stages({"stem": _out("conv1")}, groups, [_out(g) for g in groups])
    points["pooled"] = TapPoint("classifier", "input")
    return points


def _small_cnn(model) -> dict:
    """Small CNNs: ``features`` is a flat Sequential of conv-BN-ReLU with max-pools between stages; a
    stage's output is its last ReLU (in place: its ``_pre`` is copied in a pre-hook)."""
    points, relu, stage = {}, None, 0
    for i, layer in enumerate(model.features):
        if isinstance(layer, nn.MaxPool2d) and relu is not None:
            stage += 1
            points[f"stage{stage}"], points[f"stage{stage}_pre"] = _out(relu), TapPoint(relu, "input")
            relu = None
        elif isinstance(layer, nn.ReLU):
            relu = f"features.{i}"
    if relu is not None:
        stage += 1
        points[f"stage{stage}"], points[f"stage{stage}_pre"] = _out(relu), TapPoint(relu, "input")
    points["pooled"] = TapPoint("fc", "input")
    return points


# Architecture (the model's class) -> the function that lists its tap points.
TAP_TABLE: dict[type, Callable[[nn.Module], dict]] = {
    torchvision.models.ResNet: _torchvision_resnet,
    CifarResNet: _cifar_resnet,
    CifarBottleneckResNet: _cifar_bottleneck_resnet,
    WideResNet: _wide_resnet,
    CifarVGG: _cifar_vgg,
    CifarMobileNetV2: _mobilenet_v2,
    ShuffleNetV1: _shufflenet,
    ShuffleNetV2: _shufflenet,
    FeatureClassifier: _small_cnn,
}


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside DataParallel / DistributedDataParallel (``.module``) or torch.compile."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def architecture_name(model: nn.Module) -> str:
    """The class name of the network (inside any wrapper), as errors name it."""
    return type(unwrap(model)).__name__


def tap_points(model: nn.Module) -> dict[str, TapPoint]:
    """The taps ``model`` offers, canonical name -> :class:`TapPoint`, in network order. Raises
    ValueError for an architecture without a tap table (the supported ones listed)."""
    net = unwrap(model)
    for cls in type(net).__mro__:
        if cls in TAP_TABLE:
            return TAP_TABLE[cls](net)
    known = ", ".join(sorted(c.__name__ for c in TAP_TABLE))
    raise ValueError(f"tap_points: the architecture {type(net).__name__} has no tap table; "
                     f"supported: {known}")


def stage_names(names: Iterable[str]) -> list[str]:
    """``stage1``, ``stage2``, ... among ``names``, as long as they run without a gap."""
    names, found = set(names), []
    while f"stage{len(found) + 1}" in names:
        found.append(f"stage{len(found) + 1}")
    return found


class FeatureTaps:
    """Hooks on ``model`` that record the taps ``names`` at every forward: after ``model(x)``,
    ``taps.values`` maps each name to its tensor (in the autograd graph when gradients are on).

    A forward pre-hook on the model itself starts a new ``values`` dict at each forward, so a dict
    read before stays as it was. ``remove()`` (or leaving a ``with`` block) takes all hooks off.
    ``label`` names the model in errors (default: its class name). A name the architecture lacks
    raises one ValueError naming the architecture, the tap and the taps it has."""

    def __init__(self, model: nn.Module, names: Iterable[str], *, label: str | None = None):
        names = tuple(names)
        self.label = label or architecture_name(model)
        points = tap_points(model)
        for name in names:
            if not isinstance(name, str) or name not in points:
                raise ValueError(f"FeatureTaps: the architecture {self.label} has no tap {name!r}; "
                                 f"its taps: {', '.join(points)}")
        self.names = names
        self.values: dict[str, torch.Tensor] = {}
        self._armed: dict[str, bool] = {}
        self._pending: dict[str, torch.Tensor | None] = {}
        net = unwrap(model)
        self._handles = [model.register_forward_pre_hook(self._start)]
        for name in names:
            self._attach(net, name, points[name])

    def _start(self, module, args):
        self.values = {}

    def _attach(self, net: nn.Module, name: str, point: TapPoint) -> None:
        module = net.get_submodule(point.module)
        if point.kind == "output":
            self._handles.append(module.register_forward_hook(self._output_hook(name)))
        elif point.kind == "input":
            self._handles.append(module.register_forward_pre_hook(self._input_hook(name, module)))
        elif point.kind == "last_input":
            scope = net.get_submodule(point.scope)
            self._armed[name] = False
            self._handles += [scope.register_forward_pre_hook(self._arm_hook(name)),
                              module.register_forward_pre_hook(self._candidate_hook(name)),
                              scope.register_forward_hook(self._commit_hook(name))]
        else:
            raise ValueError(f"FeatureTaps: tap point kind must be one of {KINDS}, got {point.kind!r}")

    def _output_hook(self, name):
        def hook(module, args, output):
            self.values[name] = output
        return hook

    def _input_hook(self, name, module):
        in_place = bool(getattr(module, "inplace", False))  # the module overwrites its input: copy it first

        def hook(module, args):
            self.values[name] = args[0].clone() if in_place else args[0]
        return hook

    def _arm_hook(self, name):
        def hook(module, args):
            self._armed[name], self._pending[name] = True, None
        return hook

    def _candidate_hook(self, name):
        def hook(module, args):
            if self._armed[name]:  # a copy, since the (in-place) module is about to overwrite it
                self._pending[name] = args[0].clone()
        return hook

    def _commit_hook(self, name):
        def hook(module, args, output):
            self._armed[name] = False
            self.values[name] = self._pending.pop(name)
        return hook

    def remove(self) -> None:
        """Take every hook off the model (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FeatureTaps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def probe_shapes(model: nn.Module, names: Iterable[str], sample: torch.Tensor, *,
                 label: str | None = None) -> dict[str, torch.Size]:
    """The shapes of the taps ``names`` of ``model`` for the input ``sample`` (e.g. one batch of
    zeros of the training size): one forward in eval mode without gradients, hooks removed and the
    train/eval modes restored after, so BN running statistics do not change."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with FeatureTaps(model, names, label=label) as taps, torch.no_grad():
            model(sample)
            return {name: taps.values[name].shape for name in taps.names}
    finally:
        for m, mode in modes.items():
            m.training = mode
