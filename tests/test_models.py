"""Tests for the model zoo in kcd_fast.models (CPU, a few seconds)."""

import pytest
import torch

from kcd_fast.models import available_models, build_model, default_models

IMAGENET = ["resnet18", "resnet34", "resnet50"]
CIFAR = ["resnet20", "resnet56", "resnet110", "resnet8x4", "resnet32x4",
         "wrn_16_2", "wrn_40_2", "vgg8", "vgg13"]
SMALL = ["cnn_small", "cnn_large"]

# Published parameter counts of the CIFAR-100 models (100 classes).
CIFAR_PARAMS = {
    "resnet20": 0.27e6, "resnet56": 0.86e6, "resnet110": 1.7e6,
    "resnet8x4": 1.2e6, "resnet32x4": 7.4e6, "wrn_16_2": 0.70e6,
    "wrn_40_2": 2.2e6, "vgg8": 3.9e6, "vgg13": 9.4e6,
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Batch-2 forwards gain nothing from intra-op threads, and on a busy 2-core
    machine oversubscribed OpenMP threads can make them 10-50x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def run(model, shape):
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        return model(torch.randn(*shape))


def check_logits(y, num_classes):
    assert isinstance(y, torch.Tensor)
    assert y.shape == (2, num_classes)
    assert torch.isfinite(y).all()


def test_available_models():
    names = available_models()
    assert names == sorted(names)
    assert set(names) == set(IMAGENET + CIFAR + SMALL)


@pytest.mark.parametrize("name", IMAGENET)
@pytest.mark.parametrize("in_channels", [3, 1])
def test_imagenet_resnets(name, in_channels):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels)
    check_logits(run(model, (2, in_channels, 64, 64)), 10)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_models(name):
    torch.manual_seed(0)
    model = build_model(name, 100)
    check_logits(run(model, (2, 3, 32, 32)), 100)
    # Adaptive pooling: smallest supported and odd-sized inputs work too.
    check_logits(run(model, (2, 3, 8, 8)), 100)
    check_logits(run(model, (2, 3, 13, 11)), 100)
    assert n_params(model) == pytest.approx(CIFAR_PARAMS[name], rel=0.15)


# The CIFAR-100 model zoo that CRD (HobbitLong/RepDistiller), megvii-research/mdistiller and
# the official KCD code (dzy3/KCD) share: parameter count, number of state_dict entries and
# some of its keys with their shapes, for num_classes=100, as the zoo's own model classes
# (models/{resnet,wrn,vgg}.py; vgg8/vgg13 are its vgg8_bn/vgg13_bn) give them. Checked against
# those classes when written; pinned here so that the zoo's teacher checkpoints keep loading
# with load_state_dict(strict=True).
ZOO = {
    "resnet20": (278_324, 128, {
        "conv1.weight": (16, 3, 3, 3), "bn1.running_mean": (16,), "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1), "layer2.0.downsample.1.running_var": (32,),
        "layer3.2.bn2.running_var": (64,), "fc.weight": (100, 64), "fc.bias": (100,)}),
    "resnet56": (861_620, 344, {
        "conv1.weight": (16, 3, 3, 3), "layer1.8.conv2.weight": (16, 16, 3, 3),
        "layer3.0.downsample.0.weight": (64, 32, 1, 1), "layer3.8.bn2.running_var": (64,),
        "fc.weight": (100, 64)}),
    "resnet110": (1_736_564, 668, {
        "conv1.weight": (16, 3, 3, 3), "layer2.0.conv1.weight": (32, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1), "layer3.17.bn2.running_var": (64,),
        "fc.weight": (100, 64)}),
    "resnet8x4": (1_233_540, 62, {
        "conv1.weight": (32, 3, 3, 3), "bn1.weight": (32,), "layer1.0.conv1.weight": (64, 32, 3, 3),
        "layer1.0.downsample.0.weight": (64, 32, 1, 1), "layer1.0.downsample.1.weight": (64,),
        "layer3.0.bn2.running_var": (256,), "fc.weight": (100, 256)}),
    "resnet32x4": (7_433_860, 206, {
        "conv1.weight": (32, 3, 3, 3), "layer1.0.downsample.0.weight": (64, 32, 1, 1),
        "layer2.0.downsample.1.bias": (128,), "layer3.4.conv2.weight": (256, 256, 3, 3),
        "layer3.4.bn2.running_var": (256,), "fc.weight": (100, 256)}),
    "wrn_16_2": (703_284, 83, {
        "conv1.weight": (16, 3, 3, 3), "block1.layer.0.bn1.weight": (16,),
        "block1.layer.0.conv1.weight": (32, 16, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block2.layer.1.bn2.running_var": (64,), "block3.layer.1.conv2.weight": (128, 128, 3, 3),
        "bn1.running_var": (128,), "fc.weight": (100, 128)}),
    "wrn_40_2": (2_255_156, 227, {
        "conv1.weight": (16, 3, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block3.layer.0.convShortcut.weight": (128, 64, 1, 1), "block3.layer.5.conv2.weight": (128, 128, 3, 3),
        "bn1.running_var": (128,), "fc.weight": (100, 128)}),
    "vgg8": (3_965_028, 37, {
        "block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.1.running_var": (64,),
        "block2.0.weight": (256, 128, 3, 3), "block4.1.running_var": (512,), "classifier.weight": (100, 512)}),
    "vgg13": (9_462_180, 72, {
        "block0.0.weight": (64, 3, 3, 3), "block0.3.weight": (64, 64, 3, 3), "block0.4.weight": (64,),
        "block2.3.weight": (256, 256, 3, 3), "block4.4.running_var": (512,), "classifier.weight": (100, 512)}),
}
# Keys the zoo does not have (a stage without a width change has no projection).
NOT_ZOO = {"resnet20": ["layer1.0.downsample.0.weight"], "resnet8x4": ["layer1.1.conv1.weight"],
           "wrn_16_2": ["block1.layer.1.convShortcut.weight"], "vgg8": ["block0.3.weight"]}


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_zoo_names(name):
    """Our CIFAR models have the zoo's state_dict keys and shapes, so the zoo's teachers load."""
    params, entries, shapes = ZOO[name]
    model = build_model(name, 100)
    state = model.state_dict()
    assert n_params(model) == params
    assert len(state) == entries
    for key, shape in shapes.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    for key in NOT_ZOO.get(name, []):
        assert key not in state, key
    # The trainer finds the classifier as the last 2-D weight.
    last = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1]
    assert last in ("fc.weight", "classifier.weight") and state[last].shape[0] == 100
    # A zoo checkpoint is exactly such a state_dict: strict loading takes it.
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)


def test_zoo_checkpoint_loads_as_teacher(tmp_path):
    """A checkpoint saved the zoo's way ({'model': state_dict, ...}, keys as in ZOO, from a
    DataParallel model) loads through --teacher-weights and gives the same logits."""
    from kcd_fast.train import load_teacher_weights

    torch.manual_seed(0)
    src = build_model("resnet8x4", 100).train()
    with torch.no_grad():  # non-trivial BN running statistics
        src(torch.randn(4, 3, 32, 32))
    state = {"module." + k: v for k, v in src.state_dict().items()}
    assert "module.layer1.0.downsample.0.weight" in state and "module.fc.weight" in state
    torch.save({"model": state, "accuracy": 73.1, "epoch": 240}, tmp_path / "resnet8x4.pth")
    dst = build_model("resnet8x4", 100)
    load_teacher_weights(dst, str(tmp_path / "resnet8x4.pth"), 100)
    torch.testing.assert_close(run(dst, (2, 3, 32, 32)), run(src, (2, 3, 32, 32)))


def test_cifar_in_channels():
    check_logits(run(build_model("resnet8x4", 10, in_channels=1), (2, 1, 32, 32)), 10)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [8, 28, 11])
def test_small_cnns(name, in_channels, size):
    torch.manual_seed(0)
    model = build_model(name, 10, in_channels)
    check_logits(run(model, (2, in_channels, size, size)), 10)


def test_small_cnn_sizes():
    small, large = n_params(build_model("cnn_small", 10, 1)), n_params(build_model("cnn_large", 10, 1))
    assert 10_000 <= small < 100_000
    assert 100_000 <= large < 1_000_000


def test_cnn_small_backward():
    torch.manual_seed(0)
    model = build_model("cnn_small", 10, 1).train()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def test_unknown_model():
    with pytest.raises(ValueError, match="no_such_net") as exc:
        build_model("no_such_net", 10)
    for name in available_models():
        assert name in str(exc.value)


@pytest.mark.parametrize("kwargs, arg", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=-3), "num_classes"),
    (dict(num_classes=10, in_channels=0), "in_channels"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        build_model("cnn_small", **kwargs)


def test_default_models():
    assert default_models("digits") == ("cnn_large", "cnn_small")
    assert default_models("fashion-mnist") == ("cnn_large", "cnn_small")
    assert default_models("cifar100") == ("resnet32x4", "resnet8x4")
    assert default_models("imagenet") == ("resnet34", "resnet18")
    assert default_models("fake") == ("resnet34", "resnet18")
    for ds in ["digits", "fashion-mnist", "cifar100", "imagenet", "fake"]:
        assert all(name in available_models() for name in default_models(ds))
    with pytest.raises(ValueError, match="mnist2"):
        default_models("mnist2")
