"""Tests of kcd_fast.distillers: the feature taps of every architecture against the layers' own outputs,
and each distiller's loss and gradient against a float64 implementation written here from its paper
(CPU, about 10 s)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kcd_fast import distill
from kcd_fast.distillers import (
    DISTILLERS, Batch, FeatureTaps, build_distiller, default_settings, distiller_settings, probe_shapes,
    select_taps, tap_points,
)
from kcd_fast.distillers.at import AT, ATSettings
from kcd_fast.distillers.fitnet import FitNet, FitNetSettings
from kcd_fast.distillers.pkt import PKT, PKTSettings
from kcd_fast.distillers.reviewkd import ReviewKD, ReviewKDSettings
from kcd_fast.models import available_models, build_model

TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.float64: dict(rtol=1e-9, atol=1e-11)}
IMAGENET = ("resnet18", "resnet34", "resnet50")
# Stages per architecture (docs/distillers.md); the small CNNs have no stem.
STAGES = {**{n: 4 for n in IMAGENET + ("ResNet50", "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "MobileNetV2",
                                       "cnn_large")},
          **{n: 3 for n in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
                            "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
                            "ShuffleV1", "ShuffleV2", "cnn_small")}}
# Architectures whose stage output is the ReLU of its _pre (a pre-activation WRN's is not; a
# MobileNetV2 stage ends in a linear bottleneck, so its _pre is the output itself).
POST_IS_RELU_OF_PRE = [n for n in STAGES if not n.startswith(("wrn", "MobileNetV2"))]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def close(actual, expected, dtype):
    """assert_close with the dtype's tolerances, the absolute one scaled by the expected magnitude."""
    tol = TOL[dtype]
    scale = max(float(expected.detach().abs().max()), 1e-30)
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=tol["rtol"],
                               atol=tol["atol"] * scale)


def model_and_input(name, seed=0):
    torch.manual_seed(seed)
    channels = 1 if name.startswith("cnn") else 3
    size = 64 if name in IMAGENET else (8 if name.startswith("cnn") else 32)
    return build_model(name, 10, channels).eval(), torch.randn(2, channels, size, size)


# ----------------------------------------------------------------------------------------------- taps

@pytest.mark.parametrize("name", available_models())
def test_tap_table_covers_every_architecture(name):
    model, x = model_and_input(name)
    points = tap_points(model)
    k = STAGES[name]
    expected = [f"stage{i}" for i in range(1, k + 1)] + [f"stage{i}_pre" for i in range(1, k + 1)] + ["pooled"]
    expected += [] if name.startswith("cnn") else ["stem"]
    assert sorted(points) == sorted(expected)
    with FeatureTaps(model, list(points)) as taps, torch.no_grad():
        logits = model(x)
        values = taps.values
    assert sorted(values) == sorted(points)
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    torch.testing.assert_close(classifier(values["pooled"]), logits)  # pooled: the classifier's input
    assert values["pooled"].shape == (2, classifier.in_features)
    sizes = [values[f"stage{i}"].shape[-1] for i in range(1, k + 1)]
    assert sizes == sorted(sizes, reverse=True)  # stages run from fine to coarse
    for i in range(1, k + 1):
        pre, post = values[f"stage{i}_pre"], values[f"stage{i}"]
        assert pre.shape == post.shape
        if name in POST_IS_RELU_OF_PRE:
            assert (pre < 0).any(), f"stage{i}_pre has no negative value: not taken before the ReLU"
            torch.testing.assert_close(F.relu(pre), post)
        elif name == "MobileNetV2":
            assert torch.equal(pre, post)


def test_wrn_pre_taps_are_the_bn_that_the_next_relu_reads():
    model, x = model_and_input("wrn_16_2")
    with FeatureTaps(model, ["stage1", "stage2", "stage3", "stage1_pre", "stage2_pre", "stage3_pre"]) as taps:
        with torch.no_grad():
            model(x)
            v = taps.values
            bns = [model.block2.layer[0].bn1, model.block3.layer[0].bn1, model.bn1]
            for i, bn in enumerate(bns, 1):
                torch.testing.assert_close(v[f"stage{i}_pre"], bn(v[f"stage{i}"]))
                assert (v[f"stage{i}_pre"] < 0).any()
            torch.testing.assert_close(v["stage3"], model.block3(model.block2(model.block1(model.conv1(x)))))


def _basic_pre(block, x):
    """The residual sum of a post-activation block, computed from its layers (torchvision or zoo)."""
    if hasattr(block, "conv3"):  # bottleneck
        out = F.relu(block.bn1(block.conv1(x)))
        out = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(out)))))
    else:
        out = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
    short = block.downsample if hasattr(block, "downsample") else block.shortcut
    return out + (x if short is None else short(x))


def _residual_manual(model, x, stem, n_layers, pool_first=False):
    expected = {"stem": stem}
    x = model.maxpool(stem) if pool_first else stem
    for i in range(1, n_layers + 1):
        layer = getattr(model, f"layer{i}")
        for block in list(layer)[:-1]:
            x = block(x)
        expected[f"stage{i}_pre"] = _basic_pre(layer[-1], x)
        x = expected[f"stage{i}"] = F.relu(expected[f"stage{i}_pre"])
    expected["pooled"] = x.mean((2, 3))
    return expected


def _shuffle_unit_pre(unit, x):
    """The zoo's pre-activation feature of a ShuffleV1 / ShuffleV2 unit, from its layers."""
    if hasattr(unit, "groups1"):  # ShuffleV1, stride-1 unit
        b, c, h, w = (out := F.relu(unit.bn1(unit.conv1(x)))).shape
        g = unit.groups1
        out = out.view(b, g, c // g, h, w).transpose(1, 2).reshape(b, c, h, w)
        return unit.bn3(unit.conv3(F.relu(unit.bn2(unit.conv2(out))))) + x
    half = x.shape[1] // 2
    branch = unit.bn3(unit.conv3(unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(x[:, half:])))))))
    cat = torch.cat([x[:, :half], branch], 1)
    b, c, h, w = cat.shape
    return cat.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def _manual_taps(name, model, x):
    """Every tap of ``model`` for ``x``, computed layer by layer (eval mode: BN has no side effect)."""
    if name in IMAGENET:
        return _residual_manual(model, x, model.relu(model.bn1(model.conv1(x))), 4, pool_first=True)
    if name.startswith("resnet") or name == "ResNet50":
        return _residual_manual(model, x, F.relu(model.bn1(model.conv1(x))), 4 if name == "ResNet50" else 3)
    if name.startswith("Shuffle"):
        expected = {"stem": F.relu(model.bn1(model.conv1(x)))}
        x = expected["stem"]
        for i in (1, 2, 3):
            layer = getattr(model, f"layer{i}")
            for unit in list(layer)[:-1]:
                x = unit(x)
            expected[f"stage{i}_pre"] = _shuffle_unit_pre(layer[-1], x)
            x = expected[f"stage{i}"] = F.relu(expected[f"stage{i}_pre"])
        if name == "ShuffleV2":
            x = F.relu(model.bn2(model.conv2(x)))
        expected["pooled"] = x.mean((2, 3))
        return expected
    if name.startswith("vgg"):
        expected, pools = {}, [model.pool0, model.pool1, model.pool2, nn.Identity(), nn.Identity()]
        for i in range(5):
            pre = getattr(model, f"block{i}")(x)
            key = "stem" if i == 0 else f"stage{i}"
            expected[key] = F.relu(pre)
            if i:
                expected[f"stage{i}_pre"] = pre
            x = pools[i](expected[key])
        expected["pooled"] = x.mean((2, 3))
        return expected
    if name == "MobileNetV2":
        expected = {"stem": model.conv1(x)}
        x = expected["stem"]
        for j, group in enumerate(model.blocks):
            x = group(x)
            if j in (1, 2, 4, 6):
                i = (1, 2, 4, 6).index(j) + 1
                expected[f"stage{i}"] = expected[f"stage{i}_pre"] = x
        expected["pooled"] = model.conv2(x).mean((2, 3))
        return expected
    raise AssertionError(name)


MANUAL = ["resnet18", "resnet50", "resnet8", "resnet8x4", "ResNet50", "ShuffleV1", "ShuffleV2", "vgg8",
          "MobileNetV2"]


@pytest.mark.parametrize("name", MANUAL)
def test_taps_equal_the_layers_outputs(name):
    model, x = model_and_input(name)
    with torch.no_grad():
        expected = _manual_taps(name, model, x)
        with FeatureTaps(model, list(expected)) as taps:
            model(x)
    assert sorted(taps.values) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(taps.values[key], value, msg=f"{name} {key}")


def test_small_cnn_taps_equal_the_layers_outputs():
    model, x = model_and_input("cnn_large")
    expected, stage, h, pre = {}, 0, x, None
    with torch.no_grad():
        for layer in list(model.features) + [None]:
            if layer is None or isinstance(layer, nn.MaxPool2d):  # a stage ends
                stage += 1
                expected[f"stage{stage}"], expected[f"stage{stage}_pre"] = h, pre
            if layer is None:
                break
            if isinstance(layer, nn.ReLU):
                pre = h.clone()  # the ReLU works in place
            h = layer(h)
        expected["pooled"] = h.mean((2, 3))
        with FeatureTaps(model, list(tap_points(model))) as taps:
            model(x)
    assert sorted(taps.values) == sorted(expected) and stage == 4
    for key, value in expected.items():
        torch.testing.assert_close(taps.values[key], value, msg=key)


def test_torchvision_pre_relu_tap_carries_the_gradient():
    """The copy of the input of torchvision's in-place ReLU is in the graph: its gradient equals the
    one through a manual recomputation, and train mode backpropagates through it too."""
    model, x = model_and_input("resnet18")
    conv = model.layer4[1].conv2.weight
    with FeatureTaps(model, ["stage4_pre"]) as taps:
        model(x)
        taps.values["stage4_pre"].square().sum().backward()
        via_tap, conv.grad = conv.grad.clone(), None
        feats = model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))))
        _basic_pre(model.layer4[1], model.layer4[0](feats)).square().sum().backward()
        torch.testing.assert_close(via_tap, conv.grad)
        conv.grad = None
        model.train()
        model(x)
        taps.values["stage4_pre"].square().sum().backward()
    assert conv.grad.abs().sum() > 0


def test_taps_are_new_each_forward_and_removable():
    model, x = model_and_input("resnet8")
    taps = FeatureTaps(model, ["stage3", "pooled"])
    with torch.no_grad():
        model(x)
        first = taps.values
        model(x[:1])
    assert first["stage3"].shape[0] == 2 and taps.values["stage3"].shape[0] == 1  # the old dict is kept
    taps.remove()
    with torch.no_grad():
        model(x)
    assert taps.values["stage3"].shape[0] == 1  # no hook left
    taps.remove()  # idempotent


def test_probe_shapes_keeps_modes_and_bn_statistics():
    model, x = model_and_input("resnet8")
    model.train()
    before = copy.deepcopy(model.state_dict())
    shapes = probe_shapes(model, ["stage2", "pooled"], x)
    assert shapes == {"stage2": torch.Size([2, 32, 16, 16]), "pooled": torch.Size([2, 64])}
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


CIFAR = [n for n in available_models() if n not in IMAGENET and not n.startswith("cnn")]


@pytest.mark.parametrize("name", CIFAR)
def test_tap_points_leave_the_state_dict_and_logits_unchanged(name):
    """The ``tap_*`` Identity modules own nothing: the state_dict keys are those of the model without
    them, a checkpoint of either loads strictly into the other, and the logits are the same."""
    model, x = model_and_input(name)
    bare = copy.deepcopy(model)
    taps = [n for n, m in bare.named_modules() if n.split(".")[-1].startswith("tap_")]
    assert bool(taps) != name.startswith(("wrn", "MobileNetV2"))  # those two need no tap point
    assert all(isinstance(model.get_submodule(n), nn.Identity) for n in taps)
    for path in taps:
        parent, _, attr = path.rpartition(".")
        delattr(bare.get_submodule(parent) if parent else bare, attr)
    assert list(model.state_dict()) == list(bare.state_dict())
    assert not any("tap_" in key for key in model.state_dict())
    fresh = build_model(name, 10)
    fresh.load_state_dict(bare.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))


def test_missing_tap_names_architecture_tap_and_available():
    model, _ = model_and_input("cnn_small")
    with pytest.raises(ValueError) as err:
        FeatureTaps(model, ["stage2", "stage4"])
    text = str(err.value)
    assert "SmallCNN" in text and "'stage4'" in text and "stage3_pre" in text and "pooled" in text
    with pytest.raises(ValueError, match="resnet8 student.*'stem2'"):
        FeatureTaps(build_model("resnet8", 10), ["stem2"], label="resnet8 student")
    with pytest.raises(ValueError, match="Sequential.*supported: .*CifarResNet"):
        tap_points(nn.Sequential(nn.Linear(2, 2)))


def test_shufflev2_unit_gives_the_zoo_output_and_gradient():
    """A ShuffleV2 unit applies its final ReLU after the shuffle (see its docstring): for the input it
    gets in the network (a ReLU output) that is the zoo's shuffle(cat(half, relu(branch)))."""
    torch.manual_seed(0)
    unit = build_model("ShuffleV2", 10).layer1[1].double().train()
    z = torch.randn(3, 116, 5, 5, dtype=torch.float64, requires_grad=True)
    x = F.relu(z)
    half = x.shape[1] // 2
    branch = unit.bn3(unit.conv3(unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(x[:, half:])))))))
    cat = torch.cat([x[:, :half], F.relu(branch)], 1)
    zoo = cat.view(3, 2, half, 5, 5).transpose(1, 2).reshape(3, 116, 5, 5)
    weights = torch.randn_like(zoo)
    ours = unit(x)
    assert torch.equal(ours, zoo)
    (g_ours,) = torch.autograd.grad((ours * weights).sum(), z, retain_graph=True)
    (g_zoo,) = torch.autograd.grad((zoo * weights).sum(), z)
    torch.testing.assert_close(g_ours, g_zoo, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------- float64 references, written from the papers

def ref_ce(logits, target):
    """Cross-entropy: mean over the batch of log sum_j exp z_j - z_y."""
    total = 0.0
    for z, y in zip(logits, target):
        m = z.max()
        total = total + m + torch.log(torch.exp(z - m).sum()) - z[y]
    return total / len(target)


def ref_pool(x, size):
    """Adaptive average pooling: output cell i averages rows floor(i H / h) .. ceil((i + 1) H / h) - 1."""
    (oh, ow), (h, w) = size, x.shape[-2:]
    rows = []
    for i in range(oh):
        r0, r1 = i * h // oh, -(-(i + 1) * h // oh)
        rows.append(torch.stack([x[:, :, r0:r1, j * w // ow:-(-(j + 1) * w // ow)].mean((2, 3))
                                 for j in range(ow)], -1))
    return torch.stack(rows, -2)


def ref_nearest(x, size):
    """Nearest-neighbour resize: output pixel i reads input pixel floor(i H / h)."""
    (oh, ow), (h, w) = size, x.shape[-2:]
    return x[:, :, [i * h // oh for i in range(oh)]][:, :, :, [j * w // ow for j in range(ow)]]


def ref_bn(x, weight, bias, eps=1e-5):
    """Batch normalisation in training mode: batch mean and biased variance per channel."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight[None, :, None, None] + bias[None, :, None, None]


def ref_mse(a, b):
    return ((a - b) ** 2).sum() / a.numel()


def leaf(t):
    """A float64 copy of ``t`` that takes gradients."""
    return t.detach().double().clone().requires_grad_(True)


def run_ours(distiller, student, teacher, batch, dtype, wrt):
    """The distiller's loss and its gradients w.r.t. ``wrt`` (names of student tensors, then module
    parameters), with everything in ``dtype``."""
    distiller = copy.deepcopy(distiller).to(dtype).train()
    s = {k: v.detach().to(dtype).requires_grad_(True) for k, v in student.items()}
    t = {k: v.detach().to(dtype) for k, v in teacher.items()}
    loss, logs = distiller(s, t, batch)
    params = dict(distiller.named_parameters())
    inputs = [s[k] if k in s else params[k] for k in wrt]
    grads = torch.autograd.grad(loss, inputs)
    assert all(not v.requires_grad and v.dim() == 0 for v in logs.values())
    torch.testing.assert_close(sum(logs.values()), loss.detach())
    return loss, dict(zip(wrt, grads))


def check_against_reference(distiller, student, teacher, batch, reference, wrt,
                            dtypes=(torch.float32, torch.float64)):
    """Loss and gradients of ``distiller`` in ``dtypes`` (float32 and float64) against
    ``reference(student tensors, module parameters)``, a float64 function of leaf copies."""
    s_ref = {k: leaf(v) for k, v in student.items()}
    p_ref = {k: leaf(v) for k, v in distiller.named_parameters()}
    expected = reference(s_ref, {k: v.double() for k, v in teacher.items()}, p_ref)
    inputs = [s_ref[k] if k in s_ref else p_ref[k] for k in wrt]
    expected_grads = dict(zip(wrt, torch.autograd.grad(expected, inputs)))
    for dtype in dtypes:
        loss, grads = run_ours(distiller, student, teacher, batch, dtype, wrt)
        close(loss, expected, dtype)
        for k in wrt:
            close(grads[k], expected_grads[k], dtype)


def features(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*shape, generator=g, dtype=torch.float64) for k, shape in shapes.items()}


B, NUM_CLASSES = 5, 7
TARGET = torch.tensor([0, 3, 6, 3, 1])


def logits_pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, NUM_CLASSES, generator=g, dtype=torch.float64) * 2,
            torch.randn(B, NUM_CLASSES, generator=g, dtype=torch.float64) * 2)


def shapes_of(tensors):
    return {k: v.shape for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------- AT

@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_loss_and_gradient_match_the_paper(p):
    """AT (Zagoruyko & Komodakis, Eq. 2, CRD's form): maps sum_c |A_c|^p / C, l2-normalised; per stage
    the mean of their squared difference; the larger map's feature average-pooled to the smaller."""
    s_logits, _ = logits_pair()
    student = {"logits": s_logits, **features({"stage1": (B, 7, 5, 5), "stage2": (B, 7, 3, 3),
                                               "stage3": (B, 6, 4, 4)}, 1)}
    teacher = features({"stage1": (B, 6, 5, 5), "stage2": (B, 9, 5, 5), "stage3": (B, 8, 2, 2)}, 2)
    settings = ATSettings(ce_weight_at=0.7, at_weight=1000.0, at_p=p)
    distiller = AT(settings, shapes_of(student), shapes_of(teacher), num_samples=10, num_classes=NUM_CLASSES)
    assert distiller.stages == ("stage1", "stage2", "stage3")

    def attention(f):
        a = (f.abs() ** p).sum(1) / f.shape[1]
        a = a.reshape(f.shape[0], -1)
        norms = torch.sqrt((a ** 2).sum(1, keepdim=True))
        return a / torch.clamp(norms, min=1e-12)

    def reference(s, t, params):
        total = 0.0
        for name in ("stage1", "stage2", "stage3"):
            fs, ft = s[name], t[name]
            size = (min(fs.shape[2], ft.shape[2]), min(fs.shape[3], ft.shape[3]))
            fs = fs if fs.shape[2:] == size else ref_pool(fs, size)
            ft = ft if ft.shape[2:] == size else ref_pool(ft, size)
            total = total + ((attention(fs) - attention(ft)) ** 2).sum() / (B * size[0] * size[1])
        return 0.7 * ref_ce(s["logits"], TARGET) + 1000.0 * total

    check_against_reference(distiller, student, teacher, Batch(TARGET, torch.arange(B), 0), reference,
                            ["logits", "stage1", "stage2", "stage3"])


# ---------------------------------------------------------------------------------------------- PKT

def test_pkt_loss_and_gradient_match_the_paper():
    """PKT (Passalis & Tefas): cosine kernel K = (cos + 1) / 2, p_{j|i} = K_ij / sum_k K_ik, the mean
    over (i, j) of p_T log((p_T + eps) / (p_S + eps)), features normalised by norm + eps."""
    eps = 1e-7
    s_logits, _ = logits_pair()
    student = {"logits": s_logits, **features({"pooled": (B, 7)}, 3)}
    teacher = features({"pooled": (B, 11)}, 4)
    distiller = PKT(PKTSettings(ce_weight_pkt=1.0, pkt_weight=30000.0), shapes_of(student), shapes_of(teacher),
                    num_samples=10, num_classes=NUM_CLASSES)

    def probabilities(x):
        unit = [row / (torch.sqrt((row ** 2).sum()) + eps) for row in x]
        kernel = [[((u @ v) + 1) / 2 for v in unit] for u in unit]
        return [[k_ij / sum(row) for k_ij in row] for row in kernel]

    def reference(s, t, params):
        ps, pt = probabilities(s["pooled"]), probabilities(t["pooled"])
        kl = sum(pt[i][j] * torch.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(B) for j in range(B))
        return ref_ce(s["logits"], TARGET) + 30000.0 * kl / (B * B)

    check_against_reference(distiller, student, teacher, Batch(TARGET, torch.arange(B), 0), reference,
                            ["logits", "pooled"])


# ------------------------------------------------------------------------------------------- FitNet

@pytest.mark.parametrize("s_size, t_size, conv", [
    (4, 4, dict(stride=1, padding=0)),           # 1x1 conv
    (4, 2, dict(stride=2, padding=1)),           # the student's map twice the teacher's: 3x3 stride 2
    (3, 6, dict(stride=2, padding=1, transposed=True)),  # half: 4x4 stride-2 transposed conv
    (5, 3, dict(stride=1, padding=0)),           # larger: a valid conv of kernel 1 + 5 - 3
])
def test_fitnet_loss_and_gradient_match_the_paper(s_size, t_size, conv):
    """FitNets' hint loss (Romero et al., Eq. 3, as a mean): MSE(relu(BN(r(v_g))), u_h), r CRD's conv
    regressor, BN in training mode."""
    s_logits, _ = logits_pair()
    student = {"logits": s_logits, **features({"stage2": (B, 7, s_size, s_size)}, 5)}
    teacher = features({"stage2": (B, 6, t_size, t_size)}, 6)
    settings = FitNetSettings(ce_weight_fitnet=1.0, fitnet_weight=100.0)
    distiller = FitNet(settings, shapes_of(student), shapes_of(teacher), num_samples=10, num_classes=NUM_CLASSES)

    def reference(s, t, params):
        w, b = params["regressor.conv.weight"], params["regressor.conv.bias"]
        if conv.get("transposed"):
            y = F.conv_transpose2d(s["stage2"], w, b, stride=conv["stride"], padding=conv["padding"])
        else:
            y = F.conv2d(s["stage2"], w, b, stride=conv["stride"], padding=conv["padding"])
        y = torch.clamp(ref_bn(y, params["regressor.bn.weight"], params["regressor.bn.bias"]), min=0)
        assert y.shape == t["stage2"].shape
        return ref_ce(s["logits"], TARGET) + 100.0 * ref_mse(y, t["stage2"])

    check_against_reference(distiller, student, teacher, Batch(TARGET, torch.arange(B), 0), reference,
                            ["logits", "stage2", "regressor.conv.weight", "regressor.bn.weight"])


# ----------------------------------------------------------------------------------------- ReviewKD

def ref_abf(params, prefix, x, residual, out_size):
    """ABF (Chen et al., Sec. 3): 1x1 conv + BN; with a residual, fuse x and the residual resized to x
    by the two sigmoid attention maps of a 1x1 conv of their concatenation; resize to the teacher's
    size; 3x3 conv + BN. Returns (output, residual for the next level)."""
    x = ref_bn(F.conv2d(x, params[f"{prefix}.conv1.0.weight"]), params[f"{prefix}.conv1.1.weight"],
               params[f"{prefix}.conv1.1.bias"])
    if residual is not None:
        residual = ref_nearest(residual, x.shape[-2:])
        logits = F.conv2d(torch.cat([x, residual], 1), params[f"{prefix}.att_conv.0.weight"],
                          params[f"{prefix}.att_conv.0.bias"])
        z = 1 / (1 + torch.exp(-logits))
        x = x * z[:, 0:1] + residual * z[:, 1:2]
    if tuple(x.shape[-2:]) != out_size:
        x = ref_nearest(x, out_size)
    out = ref_bn(F.conv2d(x, params[f"{prefix}.conv2.0.weight"], padding=1), params[f"{prefix}.conv2.1.weight"],
                 params[f"{prefix}.conv2.1.bias"])
    return out, x


def ref_hcl(fs, ft):
    """HCL (Chen et al.): full-resolution MSE plus the 4x4, 2x2, 1x1 pools below the height, weighted
    1, 1/2, 1/4, ... and normalised by the weights' sum."""
    terms, weights = [ref_mse(fs, ft)], [1.0]
    for size in (4, 2, 1):
        if size < fs.shape[2]:
            weights.append(weights[-1] / 2)
            terms.append(weights[-1] * ref_mse(ref_pool(fs, (size, size)), ref_pool(ft, (size, size))))
    return sum(terms) / sum(weights)


def test_reviewkd_loss_and_gradient_match_the_paper():
    s_logits, _ = logits_pair()
    student = {"logits": s_logits, **features({"stage1": (B, 7, 5, 5), "stage2": (B, 6, 3, 3), "pooled": (B, 9)}, 7)}
    teacher = features({"stage1_pre": (B, 8, 5, 5), "stage2_pre": (B, 4, 6, 6), "pooled": (B, 10)}, 8)
    settings = ReviewKDSettings(ce_weight_reviewkd=1.0, reviewkd_weight=5.0, reviewkd_warmup=20)
    distiller = ReviewKD(settings, shapes_of(student), shapes_of(teacher), num_samples=10,
                         num_classes=NUM_CLASSES)
    with torch.no_grad():  # attention convs and BN affine terms away from their initial values
        for p in distiller.parameters():
            p.add_(0.1 * torch.randn_like(p))
    epoch = 3  # warm-up (3 + 1) / 20

    def reference(s, t, params):
        levels = [(s["pooled"][:, :, None, None], t["pooled"][:, :, None, None]),
                  (s["stage2"], t["stage2_pre"]), (s["stage1"], t["stage1_pre"])]  # deepest first
        total, residual = 0.0, None
        for k, (fs, ft) in zip((2, 1, 0), levels):
            out, residual = ref_abf(params, f"abfs.{k}", fs, residual, tuple(ft.shape[-2:]))
            total = total + ref_hcl(out, ft)
        return ref_ce(s["logits"], TARGET) + 5.0 * (4 / 20) * total

    check_against_reference(distiller, student, teacher, Batch(TARGET, torch.arange(B), epoch), reference,
                            ["logits", "stage1", "stage2", "pooled", "abfs.1.att_conv.0.weight",
                             "abfs.1.att_conv.0.bias", "abfs.0.conv1.0.weight", "abfs.2.conv2.1.weight"])


# -------------------------------------------------------------------------------------- KD and DKD

def ref_softmax(z):
    e = torch.exp(z - z.max())
    return e / e.sum()


def ref_kl(p, q):
    return sum(pi * torch.log(pi / qi) for pi, qi in zip(p, q))


def test_kd_distiller_matches_hinton():
    """KD (Hinton et al.): ce_weight CE + kd_weight T^2 KL(p_T || p_S) at temperature T, batch mean."""
    s_logits, t_logits = logits_pair(1)
    settings = distill.KDSettings(kd_temperature=4.0, ce_weight=0.1, kd_weight=0.9)
    distiller = DISTILLERS["kd"](settings, {}, {}, num_samples=10, num_classes=NUM_CLASSES)

    def reference(s, t, params):
        kl = sum(ref_kl(ref_softmax(zt / 4), ref_softmax(zs / 4)) for zs, zt in zip(s["logits"], t["logits"]))
        return 0.1 * ref_ce(s["logits"], TARGET) + 0.9 * 16 * kl / B

    # kcd_fast.distill computes in float32 whatever the logits' dtype
    check_against_reference(distiller, {"logits": s_logits}, {"logits": t_logits},
                            Batch(TARGET, torch.arange(B), 0), reference, ["logits"], dtypes=(torch.float32,))


def test_dkd_distiller_matches_the_paper():
    """DKD (Zhao et al.): CE + warm-up T^2 (alpha KL(b_T || b_S) + beta KL(p^_T || p^_S)), b the
    (target, rest) probabilities and p^ the distribution among the non-target classes."""
    s_logits, t_logits = logits_pair(2)
    settings = distill.DKDSettings(kd_temperature=4.0, ce_weight_dkd=1.0, dkd_alpha=1.0, dkd_beta=8.0, dkd_warmup=20)
    distiller = DISTILLERS["dkd"](settings, {}, {}, num_samples=10, num_classes=NUM_CLASSES)

    def reference(s, t, params):
        total = 0.0
        for zs, zt, y in zip(s["logits"], t["logits"], TARGET):
            ps, pt = ref_softmax(zs / 4), ref_softmax(zt / 4)
            tckd = ref_kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
            rest = [j for j in range(NUM_CLASSES) if j != y]
            nckd = ref_kl(ref_softmax(zt[rest] / 4), ref_softmax(zs[rest] / 4))
            total = total + 16 * (1.0 * tckd + 8.0 * nckd)
        return ref_ce(s["logits"], TARGET) + (5 / 20) * total / B

    check_against_reference(distiller, {"logits": s_logits}, {"logits": t_logits},
                            Batch(TARGET, torch.arange(B), 4), reference, ["logits"], dtypes=(torch.float32,))


# -------------------------------------------------------------------------------- errors, registry

@pytest.mark.parametrize("cls, student, teacher, match", [
    (FitNet, {"stage2": (2, 8, 3, 3)}, {"stage2": (2, 8, 8, 8)}, r"fitnet: .*stage2 \(3x3\).*\(8x8\)"),
    (AT, {"stage1": (2, 8, 8, 4)}, {"stage1": (2, 8, 4, 8)}, r"at: .*stage1 \(8x4 .* 4x8"),
    (ReviewKD, {"stage1": (2, 8, 3, 3), "pooled": (2, 8)}, {"stage1_pre": (2, 8, 4, 4), "pooled": (2, 8)},
     r"reviewkd: .*stage1_pre \(4x4\).*stage1 \(3x3\)"),
    (FitNet, {"stage2": (2, 8, 3, 3)}, {}, r"fitnet: `teacher_shapes` must hold the tap 'stage2'"),
    (PKT, {"pooled": (2, 8, 1, 1)}, {"pooled": (2, 8)}, r"pkt: `student_shapes\['pooled'\]` must be a \[B, C\]"),
    (AT, {"pooled": (2, 8)}, {"pooled": (2, 8)}, r"at: .* must share stage taps"),
])
def test_unbridgeable_shapes_raise_at_construction(cls, student, teacher, match):
    with pytest.raises(ValueError, match=match) as err:
        cls(cls.Settings(), {k: torch.Size(v) for k, v in student.items()},
            {k: torch.Size(v) for k, v in teacher.items()}, num_samples=10, num_classes=10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind, kwargs, error", [
    (FitNetSettings, dict(fitnet_weight=-1.0), ValueError),
    (ATSettings, dict(at_p=0.0), ValueError),
    (ReviewKDSettings, dict(reviewkd_warmup=1.5), TypeError),
    (PKTSettings, dict(pkt_weight=math.inf), ValueError),
])
def test_settings_are_checked(kind, kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        kind(**kwargs)


def test_registry_and_defaults():
    assert {"kd", "dkd", "fitnet", "at", "pkt", "reviewkd"} <= set(DISTILLERS)
    assert default_settings("at") == ATSettings(ce_weight_at=1.0, at_weight=1000.0, at_p=2.0)
    assert default_settings("fitnet").fitnet_weight == 100.0 and default_settings("pkt").pkt_weight == 30000.0
    assert default_settings("reviewkd", "cifar100") == ReviewKDSettings(1.0, 5.0, 20)
    assert default_settings("reviewkd", "imagenet") == ReviewKDSettings(1.0, 1.0, 1)
    assert default_settings("kd") == distill.KDSettings()
    config = type("Config", (), {"ce_weight_pkt": 2.0, "pkt_weight": 10.0})()
    assert distiller_settings("pkt", config) == PKTSettings(2.0, 10.0)
    with pytest.raises(ValueError, match="fitnet_weight"):
        distiller_settings("fitnet", config)
    with pytest.raises(ValueError, match="registered: .*reviewkd"):
        default_settings("no_such_method")
    assert not DISTILLERS["kd"].needs_teacher_features.fget(DISTILLERS["kd"])  # logits only


def test_tap_selection_follows_the_stages_both_networks_have():
    vgg, resnet = build_model("vgg8", 10), build_model("resnet8", 10)
    assert select_taps(AT, vgg, resnet) == (("stage1", "stage2", "stage3"),) * 2
    big, small = build_model("cnn_large", 10, 1), build_model("cnn_large", 10, 1)
    assert select_taps(ReviewKD, big, small) == (
        ("stage1", "stage2", "stage3", "stage4", "pooled"),
        ("stage1_pre", "stage2_pre", "stage3_pre", "stage4_pre", "pooled"))
    assert select_taps(FitNet, vgg, resnet) == (("stage2",), ("stage2",))


@pytest.mark.parametrize("name", ["kd", "dkd", "fitnet", "at", "pkt", "reviewkd"])
def test_a_training_step_without_host_syncs(name, monkeypatch):
    """build_distiller, then one step: the loss reaches the student's and the distiller's parameters,
    and the distiller's forward never reads a tensor's value on the host."""
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet14", 10).eval()
    x, target = torch.randn(4, 3, 16, 16), torch.tensor([1, 2, 3, 1])
    built = build_distiller(name, default_settings(name), student, teacher, x[:2], num_samples=50, num_classes=10)
    distiller = built.distiller
    assert (built.student_taps is None) == (name in ("kd", "dkd"))
    logits = student(x)
    with torch.no_grad():
        t_logits = teacher(x)
    s_vals = {"logits": logits, **(built.student_taps.values if built.student_taps else {})}
    t_vals = {"logits": t_logits, **(built.teacher_taps.values if built.teacher_taps else {})}

    def host_sync(*args, **kwargs):
        raise AssertionError("the distiller read a tensor's value on the host")

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, attr, host_sync)
        loss, logs = distiller(s_vals, t_vals, Batch(target, torch.arange(4), 2))
    loss.backward()
    assert torch.isfinite(loss) and student.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in distiller.parameters())
    assert all(not v.requires_grad for v in logs.values())
