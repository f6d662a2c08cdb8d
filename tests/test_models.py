"""Tests for the model zoo in kcd_fast.models (CPU, a few seconds)."""

import pytest
import torch

from kcd_fast.models import available_models, build_model, default_models

IMAGENET = ["resnet18", "resnet34", "resnet50"]
CIFAR = ["resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
         "resnet8x4", "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
         "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
SMALL = ["cnn_small", "cnn_large"]

# Published parameter counts of the CIFAR-100 models (100 classes).
CIFAR_PARAMS = {
    "resnet8": 0.08e6, "resnet14": 0.18e6, "resnet20": 0.27e6, "resnet32": 0.47e6,
    "resnet44": 0.67e6, "resnet56": 0.86e6, "resnet110": 1.7e6,
    "resnet8x4": 1.2e6, "resnet32x4": 7.4e6, "ResNet50": 23.7e6,
    "wrn_16_1": 0.18e6, "wrn_16_2": 0.70e6, "wrn_40_1": 0.57e6, "wrn_40_2": 2.2e6,
    "vgg8": 3.9e6, "vgg11": 9.3e6, "vgg13": 9.4e6, "vgg16": 14.8e6, "vgg19": 20.1e6,
    "MobileNetV2": 0.81e6, "ShuffleV1": 0.95e6, "ShuffleV2": 1.36e6,
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
# (models/{resnet,resnetv2,wrn,vgg,mobilenetv2,ShuffleNetv1,ShuffleNetv2}.py; vgg8..vgg19 are its
# vgg8_bn..vgg19_bn, MobileNetV2 its mobile_half) give them. Checked against
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
    "resnet8": (83_892, 56, {
        "conv1.weight": (16, 3, 3, 3), "layer1.0.conv1.weight": (16, 16, 3, 3),
        "layer2.0.downsample.0.weight": (32, 16, 1, 1), "layer3.0.bn2.running_var": (64,), "fc.weight": (100, 64)}),
    "resnet14": (181_108, 92, {
        "layer1.1.conv2.weight": (16, 16, 3, 3), "layer3.0.downsample.1.running_var": (64,),
        "layer3.1.bn2.running_var": (64,), "fc.weight": (100, 64)}),
    "resnet32": (472_756, 200, {
        "layer1.4.conv2.weight": (16, 16, 3, 3), "layer2.0.downsample.0.weight": (32, 16, 1, 1),
        "layer3.4.bn2.running_var": (64,), "fc.weight": (100, 64)}),
    "resnet44": (667_188, 272, {
        "layer1.6.conv2.weight": (16, 16, 3, 3), "layer3.0.downsample.0.weight": (64, 32, 1, 1),
        "layer3.6.bn2.running_var": (64,), "fc.weight": (100, 64)}),
    "ResNet50": (23_705_252, 320, {
        "conv1.weight": (64, 3, 3, 3), "bn1.running_var": (64,), "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.shortcut.0.weight": (256, 64, 1, 1),
        "layer1.0.shortcut.1.running_var": (256,), "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer2.0.shortcut.0.weight": (512, 256, 1, 1), "layer3.5.bn3.running_var": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1), "linear.weight": (100, 2048), "linear.bias": (100,)}),
    "wrn_16_1": (180_916, 82, {
        "conv1.weight": (16, 3, 3, 3), "block1.layer.0.conv1.weight": (16, 16, 3, 3),
        "block1.layer.1.bn2.running_var": (16,), "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block3.layer.1.conv2.weight": (64, 64, 3, 3), "bn1.running_var": (64,), "fc.weight": (100, 64)}),
    "wrn_40_1": (569_780, 226, {
        "block1.layer.5.conv2.weight": (16, 16, 3, 3), "block2.layer.0.convShortcut.weight": (32, 16, 1, 1),
        "block3.layer.0.convShortcut.weight": (64, 32, 1, 1), "block3.layer.5.conv2.weight": (64, 64, 3, 3),
        "bn1.running_var": (64,), "fc.weight": (100, 64)}),
    "vgg11": (9_277_284, 58, {
        "block0.0.weight": (64, 3, 3, 3), "block1.0.weight": (128, 64, 3, 3), "block2.3.weight": (256, 256, 3, 3),
        "block4.4.running_var": (512,), "classifier.weight": (100, 512)}),
    "vgg16": (14_774_436, 93, {
        "block0.3.weight": (64, 64, 3, 3), "block2.6.weight": (256, 256, 3, 3), "block3.7.running_var": (512,),
        "block4.6.weight": (512, 512, 3, 3), "classifier.weight": (100, 512)}),
    "vgg19": (20_086_692, 114, {
        "block0.3.weight": (64, 64, 3, 3), "block2.9.weight": (256, 256, 3, 3), "block3.10.running_var": (512,),
        "block4.9.weight": (512, 512, 3, 3), "classifier.weight": (100, 512)}),
    "MobileNetV2": (812_836, 320, {
        "conv1.0.weight": (16, 3, 3, 3), "conv1.1.running_var": (16,), "blocks.0.0.conv.0.weight": (16, 16, 1, 1),
        "blocks.0.0.conv.3.weight": (16, 1, 3, 3), "blocks.0.0.conv.6.weight": (8, 16, 1, 1),
        "blocks.1.0.conv.0.weight": (48, 8, 1, 1), "blocks.2.0.conv.3.weight": (72, 1, 3, 3),
        "blocks.6.0.conv.7.running_var": (160,), "conv2.0.weight": (1280, 160, 1, 1),
        "conv2.1.running_var": (1280,), "classifier.0.weight": (100, 1280), "classifier.0.bias": (100,)}),
    "ShuffleV1": (949_258, 296, {
        "conv1.weight": (24, 3, 1, 1), "bn1.running_var": (24,), "layer1.0.conv1.weight": (54, 24, 1, 1),
        "layer1.0.conv2.weight": (54, 1, 3, 3), "layer1.0.conv3.weight": (216, 18, 1, 1),
        "layer1.1.conv1.weight": (60, 80, 1, 1), "layer2.0.conv1.weight": (60, 80, 1, 1),
        "layer2.0.conv3.weight": (240, 20, 1, 1), "layer3.3.conv3.weight": (960, 80, 1, 1),
        "layer3.3.bn3.running_var": (960,), "linear.weight": (100, 960)}),
    "ShuffleV2": (1_355_528, 338, {
        "conv1.weight": (24, 3, 1, 1), "bn1.running_var": (24,), "layer1.0.conv1.weight": (24, 1, 3, 3),
        "layer1.0.conv2.weight": (58, 24, 1, 1), "layer1.0.conv3.weight": (58, 24, 1, 1),
        "layer1.0.conv4.weight": (58, 1, 3, 3), "layer1.0.bn5.running_var": (58,),
        "layer1.1.conv1.weight": (58, 58, 1, 1), "layer1.1.conv2.weight": (58, 1, 3, 3),
        "layer2.7.conv3.weight": (116, 116, 1, 1), "layer3.3.bn3.running_var": (232,),
        "conv2.weight": (1024, 464, 1, 1), "bn2.running_var": (1024,), "linear.weight": (100, 1024)}),
}
# Keys the zoo does not have (a stage without a width change has no projection; the zoo's
# ShuffleV1 downsamples its shortcut with a parameter-free average pool).
NOT_ZOO = {"resnet20": ["layer1.0.downsample.0.weight"], "resnet8x4": ["layer1.1.conv1.weight"],
           "wrn_16_2": ["block1.layer.1.convShortcut.weight"], "vgg8": ["block0.3.weight"],
           "resnet8": ["layer1.1.conv1.weight", "layer1.0.downsample.0.weight"],
           "wrn_16_1": ["block1.layer.0.convShortcut.weight"],
           "ResNet50": ["layer1.1.shortcut.0.weight", "fc.weight"],
           "MobileNetV2": ["blocks.0.0.conv.8.weight", "classifier.weight"],
           "ShuffleV1": ["layer1.0.shortcut.0.weight"]}


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
    assert last in ("fc.weight", "classifier.weight", "classifier.0.weight", "linear.weight")
    assert state[last].shape[0] == 100
    # A zoo checkpoint is exactly such a state_dict: strict loading takes it.
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)


def test_zoo_checkpoint_loads_as_teacher(tmp_path):
    """A checkpoint saved the zoo's way ({'model': state_dict, ...}, keys as in ZOO, from a
    DataParallel model) loads through --teacher-weights and gives the same logits."""
    from kcd_fast.train.teacher import load_weights

    torch.manual_seed(0)
    src = build_model("resnet8x4", 100).train()
    with torch.no_grad():  # non-trivial BN running statistics
        src(torch.randn(4, 3, 32, 32))
    state = {"module." + k: v for k, v in src.state_dict().items()}
    assert "module.layer1.0.downsample.0.weight" in state and "module.fc.weight" in state
    torch.save({"model": state, "accuracy": 73.1, "epoch": 240}, tmp_path / "resnet8x4.pth")
    dst = build_model("resnet8x4", 100)
    load_weights(dst, str(tmp_path / "resnet8x4.pth"), 100)
    torch.testing.assert_close(run(dst, (2, 3, 32, 32)), run(src, (2, 3, 32, 32)))


@pytest.mark.parametrize("name", ["resnet8x4", "ResNet50", "wrn_16_1", "vgg11", "MobileNetV2",
                                  "ShuffleV1", "ShuffleV2"])
def test_cifar_in_channels(name):
    check_logits(run(build_model(name, 10, in_channels=1), (2, 1, 32, 32)), 10)


def test_zoo_resnet50_is_not_torchvision_resnet50():
    """'ResNet50' is the zoo's CIFAR ResNet50 (3x3 stem, ``linear``); 'resnet50' stays torchvision's."""
    zoo, tv = build_model("ResNet50", 100), build_model("resnet50", 100)
    assert zoo.conv1.kernel_size == (3, 3) and "linear.weight" in zoo.state_dict()
    assert tv.conv1.kernel_size == (7, 7) and "fc.weight" in tv.state_dict()


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
