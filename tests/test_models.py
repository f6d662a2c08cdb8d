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
