"""SSKD: the rotated views, the error-level selection, each term of the loss and its gradient against a
float64 implementation written here from the paper (row by row, with Python loops), the teacher head's
task, and SSKD in the trainer's step (what the teacher sees, what the condenser records)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kcd_fast.distillers import Batch, build_distiller, default_settings
from kcd_fast.distillers.sskd import (SSKDSettings, error_level_keep, head_loss, rotated_views, sskd_terms,
                                      target_rank, view_similarity)
from kcd_fast.models import build_model
from kcd_fast.models.small import FeatureClassifier
from kcd_fast.train import engine
from kcd_fast.train.distillation import FeatureDistill


# ---- float64 reference, from the paper's definitions --------------------------------------------

def ref_softmax(row, t):
    z = [v / t for v in row]
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def ref_kl_row(s_row, t_row, t):
    """KL(p_T || p_S) of one row at temperature t, in Python floats."""
    p_s, p_t = ref_softmax(s_row, t), ref_softmax(t_row, t)
    return sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s) if pt > 0)


def ref_cos(a, b):
    na, nb = max(math.sqrt(sum(x * x for x in a)), 1e-8), max(math.sqrt(sum(x * x for x in b)), 1e-8)
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def ref_similarity(rows, batch):
    """A[i][j] for transformed row i (image i // 3, rotation i % 3 + 1) and normal view j."""
    return [[ref_cos(rows[4 * (i // 3) + i % 3 + 1], rows[4 * j]) for j in range(batch)] for i in range(3 * batch)]


def ref_kept(scores, truth, ratio):
    """Rows kept by the error-level ranking: the rank of the true answer is the number of scores above
    it; all rows of rank 0, then floor(ratio x wrong) of the others, lowest rank first, then row order."""
    ranks = [sum(1 for v in row if v > row[c]) for row, c in zip(scores, truth)]
    wrong = sum(1 for r in ranks if r > 0)
    count = (len(ranks) - wrong) + math.floor(wrong * ratio)
    return set(sorted(range(len(ranks)), key=lambda r: (ranks[r], r))[:count])


def ref_terms(s_logits, t_logits, s_repr, t_repr, target, cfg: SSKDSettings):
    """The four weighted terms in float64 floats, from lists of rows of the 4B views."""
    b = len(target)
    nor = [4 * i for i in range(b)]
    aug = [4 * (i // 3) + i % 3 + 1 for i in range(3 * b)]
    ce = 0.0
    for i in range(b):
        p = ref_softmax(s_logits[nor[i]], 1.0)
        ce -= math.log(p[target[i]])
    ce /= b
    kd = sum(ref_kl_row(s_logits[r], t_logits[r], cfg.kd_temperature) for r in nor) / b * cfg.kd_temperature ** 2
    kept = ref_kept([t_logits[r] for r in aug], [target[i // 3] for i in range(3 * b)], cfg.sskd_tf_ratio)
    tf = (sum(ref_kl_row(s_logits[aug[i]], t_logits[aug[i]], cfg.sskd_tf_temperature) for i in kept)
          / max(len(kept), 1) * cfg.sskd_tf_temperature ** 2)
    s_sim, t_sim = ref_similarity(s_repr, b), ref_similarity(t_repr, b)
    kept = ref_kept(t_sim, [i // 3 for i in range(3 * b)], cfg.sskd_ss_ratio)
    ss = (sum(ref_kl_row(s_sim[i], t_sim[i], cfg.sskd_ss_temperature) for i in kept)
          / max(len(kept), 1) * cfg.sskd_ss_temperature ** 2)
    return {"ce": cfg.ce_weight_sskd * ce, "kd": cfg.kd_weight_sskd * kd, "tf": cfg.sskd_tf_weight * tf,
            "ss": cfg.sskd_ss_weight * ss}


def rows(t):
    return t.double().tolist()


# ---- the pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (3, 2, 4, 4), (2, 1, 7, 7)])
def test_rotated_views_are_the_four_rotations_of_each_image_in_turn(shape):
    x = torch.randn(shape)
    views = rotated_views(x)
    assert views.shape == (4 * shape[0], *shape[1:])
    for b in range(shape[0]):
        for k in range(4):
            assert np.array_equal(views[4 * b + k].numpy(), np.rot90(x[b].numpy(), k, axes=(1, 2)))


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 8, 6), torch.zeros(3, 8, 8)])
def test_views_of_inputs_that_are_not_square_images_are_refused(bad):
    with pytest.raises(ValueError, match=r"square image batches \[B, C, H, H\]"):
        rotated_views(bad)


@pytest.mark.parametrize("batch, dim", [(1, 3), (5, 9), (4, 1)])
def test_view_similarity_equals_the_cosines_of_transformed_and_normal_views(batch, dim):
    g = torch.Generator().manual_seed(batch * 10 + dim)
    reps = torch.randn(4 * batch, dim, generator=g, dtype=torch.float64)
    reps[1] = reps[0]  # a view equal to its source: cosine 1
    got = view_similarity(reps)
    assert got.shape == (3 * batch, batch)
    assert np.allclose(got.numpy(), ref_similarity(rows(reps), batch), rtol=0, atol=1e-12)
    assert got[0, 0].item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_error_level_keep_equals_the_reference_with_ties(ratio, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (37, 6), generator=g).double()  # many equal scores: ties in values and ranks
    truth = torch.randint(0, 6, (37,), generator=g)
    rank = target_rank(scores, truth)
    assert rank.tolist() == [sum(1 for v in r if v > r[c]) for r, c in zip(rows(scores), truth.tolist())]
    keep = error_level_keep(rank, ratio)
    assert set(keep.nonzero().flatten().tolist()) == ref_kept(rows(scores), truth.tolist(), ratio)


SETTINGS = [SSKDSettings(), SSKDSettings(sskd_tf_ratio=0.5, sskd_ss_ratio=0.2, sskd_ss_temperature=1.3,
                                         kd_temperature=2.0, ce_weight_sskd=0.7)]


def random_outputs(batch, classes, dim, dtype, seed, strided=False):
    g = torch.Generator().manual_seed(seed)
    make = (lambda r, c: torch.randn(c, r, generator=g).t()) if strided else (lambda r, c: torch.randn(r, c, generator=g))
    s_logits, t_logits = make(4 * batch, classes) * 3, make(4 * batch, classes) * 3
    s_repr, t_repr = make(4 * batch, dim), make(4 * batch, dim)
    t_logits[5] = t_logits[1]  # duplicate rows
    target = torch.randint(0, classes, (batch,), generator=g)
    return [t.to(dtype) for t in (s_logits, t_logits, s_repr, t_repr)], target


@pytest.mark.parametrize("cfg", SETTINGS, ids=["defaults", "other"])
@pytest.mark.parametrize("batch, classes, dim, strided", [(2, 3, 4, False), (5, 7, 9, True), (3, 11, 5, False)])
def test_sskd_terms_and_gradients_equal_the_float64_reference(cfg, batch, classes, dim, strided):
    (s_logits, t_logits, s_repr, t_repr), target = random_outputs(batch, classes, dim, torch.float64, batch + dim,
                                                                  strided)
    s_logits.requires_grad_(True)
    s_repr.requires_grad_(True)
    terms = sskd_terms(s_logits, t_logits, s_repr, t_repr, target, cfg)
    ref = ref_terms(rows(s_logits), rows(t_logits), rows(s_repr), rows(t_repr), target.tolist(), cfg)
    for key in ("ce", "kd", "tf", "ss"):
        assert terms[key].item() == pytest.approx(ref[key], rel=1e-10, abs=1e-12), key
    sum(terms.values()).backward()
    # The gradient: central differences of the float64 reference (its kept rows are fixed by the teacher).
    for tensor, which in ((s_logits, 0), (s_repr, 2)):
        base = [rows(s_logits), rows(t_logits), rows(s_repr), rows(t_repr)]
        for r, c in [(0, 0), (1, tensor.shape[1] - 1), (4 * batch - 1, 1 % tensor.shape[1]), (6 % (4 * batch), 0)]:
            h = 1e-6
            up, down = [list(map(list, t)) for t in base], [list(map(list, t)) for t in base]
            up[which][r][c] += h
            down[which][r][c] -= h
            numeric = (sum(ref_terms(*up, target.tolist(), cfg).values())
                       - sum(ref_terms(*down, target.tolist(), cfg).values())) / (2 * h)
            assert tensor.grad[r, c].item() == pytest.approx(numeric, rel=1e-5, abs=1e-7), (which, r, c)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-3)])
def test_sskd_terms_in_low_precision_equal_the_reference_on_the_same_values(dtype, tol):
    outs, target = random_outputs(6, 10, 8, dtype, 7)
    terms = sskd_terms(*outs, target, SSKDSettings())
    ref = ref_terms(*(rows(t) for t in outs), target.tolist(), SSKDSettings())
    for key in ("ce", "kd", "tf", "ss"):
        assert terms[key].dtype == torch.float32
        assert terms[key].item() == pytest.approx(ref[key], rel=tol, abs=tol), key


def test_head_loss_is_the_cross_entropy_of_the_similarities_with_the_sources():
    g = torch.Generator().manual_seed(3)
    reps = torch.randn(4 * 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    loss, right = head_loss(reps)
    sim = ref_similarity(rows(reps), 5)
    ref = sum(-math.log(ref_softmax(row, 1.0)[i // 3]) for i, row in enumerate(sim)) / len(sim)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    assert right.item() == pytest.approx(sum(max(range(5), key=row.__getitem__) == i // 3
                                             for i, row in enumerate(sim)) / 15)
    loss.backward()
    assert torch.isfinite(reps.grad).all() and reps.grad.abs().sum() > 0


# ---- the distiller -------------------------------------------------------------------------------

def build_sskd(**settings):
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet14", 10).eval()
    built = build_distiller("sskd", SSKDSettings(**settings), student, teacher, torch.zeros(2, 3, 16, 16),
                            num_samples=40, num_classes=10)
    return student, teacher, built


def test_a_step_reaches_the_student_and_its_head_only_and_reads_nothing_on_the_host(monkeypatch):
    student, teacher, built = build_sskd()
    distiller = built.distiller
    x, target = distiller.views(torch.randn(3, 3, 16, 16)), torch.tensor([1, 2, 3])
    logits = student(x)
    with torch.no_grad():
        t_logits = teacher(x)

    def host_sync(*args, **kwargs):
        raise AssertionError("the distiller read a tensor's value on the host")

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, attr, host_sync)
        loss, logs = distiller({"logits": logits, **built.student_taps.values},
                               {"logits": t_logits, **built.teacher_taps.values}, Batch(target, torch.arange(3), 0))
    loss.backward()
    assert set(logs) == {"ce", "kd", "tf", "ss"} and torch.isfinite(loss)
    assert all(p.grad is not None for p in distiller.student_head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in distiller.teacher_head.parameters())
    assert distiller.observed_rows(logits).data_ptr() == logits.data_ptr() and torch.equal(
        distiller.observed_rows(logits), logits[0::4])


def test_a_sample_that_is_not_square_is_refused_when_built():
    student, teacher = build_model("resnet8", 10), build_model("resnet14", 10)
    with pytest.raises(ValueError, match="square"):
        build_distiller("sskd", SSKDSettings(), student, teacher, torch.zeros(2, 3, 16, 12), num_samples=4,
                        num_classes=10)


@pytest.mark.parametrize("kwargs, named", [(dict(sskd_ss_ratio=1.5), "sskd_ss_ratio"),
                                           (dict(sskd_tf_temperature=0.0), "sskd_tf_temperature"),
                                           (dict(sskd_head_epochs=2.5), "sskd_head_epochs"),
                                           (dict(sskd_head_lr=0.0), "sskd_head_lr")])
def test_settings_are_checked(kwargs, named):
    with pytest.raises((ValueError, TypeError), match=named):
        SSKDSettings(**kwargs)


def test_defaults_are_the_authors():
    assert default_settings("sskd") == default_settings("sskd", "imagenet") == SSKDSettings(
        0.1, 0.9, 2.7, 10.0, 4.0, 4.0, 0.5, 1.0, 0.75, 60, 0.05)
    _, _, built = build_sskd(sskd_head_epochs=60)
    optimizer, scheduler = built.distiller.teacher_phase_optimizer(0.9, 5e-4)
    assert scheduler.milestones == {30: 1, 45: 1} and optimizer.param_groups[0]["lr"] == 0.05


class Recorder(FeatureClassifier):
    """A small CNN without batch statistics (its rows do not depend on each other) that keeps its inputs."""

    def __init__(self, classes=4):
        super().__init__([nn.Conv2d(3, 5, 3, padding=1), nn.ReLU()], 5, classes)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return super().forward(x)


class SpyCondenser:
    def __init__(self):
        self.observed = []

    def observe(self, index, logits):
        self.observed.append((index.clone(), logits.clone()))


def test_in_the_step_both_networks_see_the_rotated_batch_and_the_condenser_its_own_rows():
    """The loader's batch (VAKS already mixed in) is rotated on the device; the teacher and the student
    run on the 4B views, and the condenser records the student's logits of the B unrotated rows."""
    torch.manual_seed(1)
    student, teacher = Recorder(), Recorder().eval()
    cfg = type("Cfg", (), dict(distill="sskd", student="s", teacher="t", amp="off", device="cpu", epochs=1, rank=0,
                               world_size=1, distributed=False, progress=False, log_every=0,
                               **{f: getattr(SSKDSettings(), f) for f in SSKDSettings.__dataclass_fields__}))()
    feature = FeatureDistill(cfg, student, teacher, torch.zeros(2, 3, 6, 6), num_samples=10, num_classes=4)
    student.seen.clear()
    teacher.seen.clear()
    x, y, index = torch.randn(3, 3, 6, 6), torch.tensor([0, 3, 1]), torch.tensor([7, 2, 5])
    before = Recorder()
    before.load_state_dict(student.state_dict())
    condenser = SpyCondenser()
    optimizer = torch.optim.SGD(feature.module.parameters(), lr=0.1)
    engine.train_one_epoch(feature.module, teacher, [(x, y, index)], optimizer, None, condenser, cfg, 0, "cpu", 3,
                           loss=feature)
    expected = rotated_views(x)
    assert torch.equal(teacher.seen[0], expected) and torch.equal(student.seen[0], expected)
    ((got_index, got_logits),) = condenser.observed
    assert torch.equal(got_index, index)
    with torch.no_grad():
        assert torch.allclose(got_logits, before(x), atol=1e-6)
