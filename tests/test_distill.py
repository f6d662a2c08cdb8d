"""The distillation losses against their definitions, their settings, and the one-function extension point."""
import argparse
import dataclasses
from types import SimpleNamespace

import pytest

import torch
import torch.nn.functional as F

from kcd_fast import distill
from kcd_fast.train import config, options


def cfg(**kw):
    base = dict(kd_temperature=4.0, ce_weight=0.1, kd_weight=0.9, ce_weight_dkd=1.0, dkd_alpha=1.0, dkd_beta=8.0,
                dkd_warmup=20)
    base.update(kw)
    return argparse.Namespace(**base)


def test_kd_is_ce_plus_t2_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=g)
    p_t = torch.softmax(t / 4, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(s / 4, 1))).sum(1).mean() * 16
    want = 0.1 * F.cross_entropy(s, y) + 0.9 * kl
    assert torch.allclose(distill.kd_loss(s.float(), t.float(), y, cfg(), 0).double(), want, atol=1e-5)


def test_dkd_decomposition():
    """With alpha = beta = 1 and no target-class masking effect, DKD's parts follow their definitions."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    T_ = 2.0
    p_s, p_t = torch.softmax(s / T_, 1), torch.softmax(t / T_, 1)
    gt = F.one_hot(y, 4).bool()
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum(1).mean() * T_ ** 2
    q_s = p_s.masked_fill(gt, 0) / (1 - p_s[gt])[:, None]
    q_t = p_t.masked_fill(gt, 0) / (1 - p_t[gt])[:, None]
    nckd = (q_t * (q_t.clamp_min(1e-30).log() - q_s.clamp_min(1e-30).log())).sum(1).mean() * T_ ** 2
    c = cfg(kd_temperature=T_, dkd_alpha=1.0, dkd_beta=3.0, dkd_warmup=1)
    want = F.cross_entropy(s, y) + tckd + 3.0 * nckd
    torch.testing.assert_close(distill.dkd_loss(s, t, y, c, 5), want, atol=1e-5, rtol=1e-5)
    # The warm-up scales the distillation part linearly over dkd_warmup epochs.
    c10 = cfg(kd_temperature=T_, dkd_beta=3.0, dkd_warmup=10)
    half = F.cross_entropy(s, y) + 0.5 * (tckd + 3.0 * nckd)
    torch.testing.assert_close(distill.dkd_loss(s, t, y, c10, 4), half, atol=1e-5, rtol=1e-5)


def test_a_new_loss_is_one_function():
    @distill.register_loss("test_only_ce")
    def ce(student_logits, teacher_logits, target, cfg, epoch):
        return F.cross_entropy(student_logits, target)

    try:
        cfg_run = config.resolve(options.get_args_parser().parse_args(["--distill", "test_only_ce"]))
        assert cfg_run.distill == "test_only_ce"
        assert distill.loss_settings("test_only_ce", cfg_run) is cfg_run  # no settings: the whole config
    finally:
        del distill.LOSSES["test_only_ce"]


def test_dkd_weights_and_zero_warmup():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y = torch.randint(0, 4, (6,), generator=g)
    base = distill.dkd_loss(s, t, y, cfg(dkd_alpha=0.0, dkd_beta=0.0, dkd_warmup=1), 0)
    torch.testing.assert_close(base, F.cross_entropy(s, y))
    c0 = distill.dkd_loss(s, t, y, cfg(ce_weight_dkd=0.0, dkd_alpha=1.0, dkd_beta=0.0, dkd_warmup=1), 3)
    c2 = distill.dkd_loss(s, t, y, cfg(ce_weight_dkd=0.0, dkd_alpha=2.0, dkd_beta=0.0, dkd_warmup=1), 3)
    torch.testing.assert_close(c2, 2 * c0)
    half = distill.dkd_loss(s, t, y, cfg(ce_weight_dkd=0.5, dkd_alpha=0.0, dkd_beta=0.0), 0)
    torch.testing.assert_close(half, 0.5 * F.cross_entropy(s, y))
    # --dkd-warmup 0 is accepted by the CLI: no warm-up, the full weight at epoch 0
    full = distill.dkd_loss(s, t, y, cfg(dkd_warmup=0), 0)
    torch.testing.assert_close(full, distill.dkd_loss(s, t, y, cfg(dkd_warmup=1), 0))


def test_dkd_is_finite_for_a_confident_wrong_student():
    s = torch.tensor([[-200.0, 200.0, 0.0]])
    t = torch.tensor([[5.0, 0.0, 1.0]])
    y = torch.tensor([0])
    loss = distill.dkd_loss(s, t, y, cfg(kd_temperature=1.0, dkd_warmup=1), 0)
    assert torch.isfinite(loss)
    # NCKD ignores the target logit, however large
    s2, t2 = torch.tensor([[60.0, 1.0, 2.0]]), torch.tensor([[0.0, 1.0, 2.0]])
    n1 = distill.dkd_loss(s2, t2, y, cfg(kd_temperature=1.0, ce_weight_dkd=0.0, dkd_alpha=0.0, dkd_warmup=1), 0)
    assert n1.item() == pytest.approx(0.0, abs=1e-6)


def test_loss_settings_are_built_once_from_the_config():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.randint(0, 4, (5,), generator=g)
    config = cfg(kd_temperature=2.0, ce_weight=0.3, lr=0.1)  # the trainer's config has other options too
    kd = distill.loss_settings("kd", config)
    assert kd == distill.KDSettings(kd_temperature=2.0, ce_weight=0.3, kd_weight=0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        kd.ce_weight = 1.0
    assert torch.equal(distill.kd_loss(s, t, y, kd, 0), distill.kd_loss(s, t, y, config, 0))
    dkd = distill.loss_settings("dkd", config)
    assert dkd == distill.DKDSettings(kd_temperature=2.0)
    assert torch.equal(distill.dkd_loss(s, t, y, dkd, 3), distill.dkd_loss(s, t, y, config, 3))
    assert distill.KDSettings() == distill.loss_settings("kd", SimpleNamespace(kd_temperature=4.0, ce_weight=0.1,
                                                                              kd_weight=0.9))


def test_a_loss_without_settings_gets_the_config_and_bad_settings_are_refused():
    @distill.register_loss("test_only_plain")
    def plain(student_logits, teacher_logits, target, cfg, epoch):
        return F.cross_entropy(student_logits, target) * cfg.my_weight

    try:
        config = SimpleNamespace(my_weight=2.0)
        assert distill.loss_settings("test_only_plain", config) is config
    finally:
        del distill.LOSSES["test_only_plain"], distill.LOSS_SETTINGS["test_only_plain"]
    with pytest.raises(ValueError, match="loss_settings: no loss is registered as 'nope'"):
        distill.loss_settings("nope", cfg())
    with pytest.raises(ValueError, match="the loss 'kd' reads ce_weight, kd_weight"):
        distill.loss_settings("kd", SimpleNamespace(kd_temperature=4.0))
    with pytest.raises(TypeError, match="register_loss: `settings` must be a dataclass type"):
        distill.register_loss("test_only_bad", settings=dict(kd_temperature=4.0))
    for kind, kwargs, exc, match in [
            (distill.KDSettings, dict(kd_temperature=0.0), ValueError, "KDSettings: `kd_temperature` must be"),
            (distill.KDSettings, dict(kd_temperature=1e-40), ValueError, "`kd_temperature` must be at least"),
            (distill.KDSettings, dict(ce_weight=-0.1), ValueError, "`ce_weight` must be a finite number >= 0"),
            (distill.DKDSettings, dict(dkd_warmup=2.5), TypeError, "DKDSettings: `dkd_warmup` must be an int"),
            (distill.DKDSettings, dict(dkd_beta=float("nan")), ValueError, "`dkd_beta` must be a finite number")]:
        with pytest.raises(exc, match=match):
            kind(**kwargs)
