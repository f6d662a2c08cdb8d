"""The feature distillers in the trainer: ``--distill fitnet|at|pkt|crd|reviewkd|sskd`` with and without KCD
on digits and on ImageNet-shaped fake data with torchvision ResNets, resume, torchrun, bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kcd_fast import distillers
from kcd_fast.train import config, engine, options
from kcd_fast.train import main as M

ROOT = Path(__file__).resolve().parents[1]
FEATURE = options.feature_distillers()
# CRD's CIFAR-100 setting draws 16,384 negatives a sample: on these few hundred samples a smaller
# bank keeps the tests quick without changing the code path.
# SSKD's teacher head trains for 60 epochs before the student: 2 here.
SMALL = {"crd": ["--crd-nce-k", "63", "--crd-feat-dim", "16"], "sskd": ["--sskd-head-epochs", "2"]}
QUICK = ["--no-progress", "--no-plots", "--device", "cpu"]


def args_of(*argv):
    return options.get_args_parser().parse_args(list(argv))


def rows_of(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    M.main(args_of("--dataset", "digits", "--teacher-epochs", "4", "--output-dir", str(out), *QUICK,
                   "--epochs", "1", "--stage-epochs", "1", "--train-subset", "400"))
    (path,) = out.glob("teacher-*.pth")
    return path


def digits_run(out, teacher, name, *extra):
    return ["--dataset", "digits", "--teacher-weights", str(teacher), "--output-dir", str(out), *QUICK,
            "--train-subset", "300", "--distill", name, *SMALL.get(name, []), *extra]


def test_every_method_of_the_paper_is_registered():
    assert {"kd", "dkd", "fitnet", "at", "pkt", "crd", "reviewkd", "sskd"} <= set(distillers.DISTILLERS)
    assert set(FEATURE) == {"fitnet", "at", "pkt", "crd", "reviewkd", "sskd"}


@pytest.mark.parametrize("kcd", [True, False], ids=["kcd", "no-kcd"])
@pytest.mark.parametrize("name", FEATURE)
def test_each_distiller_trains_on_digits(tmp_path, digits_teacher, name, kcd):
    """Two epochs: the loss is finite and equals the sum of the distiller's logged terms; with KCD the
    second epoch trains on the condensed set."""
    out = tmp_path / "run"
    summary = M.main(args_of(*digits_run(out, digits_teacher, name, "--epochs", "2", "--stage-epochs", "1",
                                         *([] if kcd else ["--no-kcd"]))))
    rows = rows_of(out)
    for row in rows:
        assert math.isfinite(row["train_loss"])
        assert "ce" in row["distiller"] and len(row["distiller"]) >= 2
        assert sum(row["distiller"].values()) == pytest.approx(row["train_loss"], rel=1e-4), row["distiller"]
    if kcd:
        assert rows[1]["samples"] < rows[0]["samples"] == 300 and summary["C"] < 1.0
    else:
        assert [r["samples"] for r in rows] == [300, 300] and summary["C"] == 1.0
    state = torch.load(out / "checkpoint.pth", weights_only=False)["distiller"]
    if name == "crd":  # the banks hold one row per training sample, condensed away or not
        assert state["memory_s"].shape == state["memory_t"].shape == (300, 16)


@pytest.fixture(scope="module")
def fake_imagenet_teacher(tmp_path_factory):
    """A torchvision resnet34 trained for one epoch on 224 x 224 fake images."""
    out = tmp_path_factory.mktemp("fake-teacher")
    M.main(args_of(*FAKE, "--teacher-epochs", "1", "--output-dir", str(out), *QUICK, "--epochs", "1",
                   "--stage-epochs", "1"))
    (path,) = out.glob("teacher-*.pth")
    return path


FAKE = ["--dataset", "fake", "--fake-image-size", "224", "--fake-size", "12", "--fake-val-size", "4",
        "--fake-num-classes", "5", "--teacher", "resnet34", "--student", "resnet18", "--batch-size", "4",
        "--eval-batch-size", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("kcd", [True, False], ids=["kcd", "no-kcd"])
@pytest.mark.parametrize("name", FEATURE)
def test_each_distiller_trains_resnet18_from_resnet34_on_imagenet_shaped_data(tmp_path, fake_imagenet_teacher,
                                                                               name, kcd):
    out = tmp_path / "run"
    M.main(args_of(*FAKE, "--teacher-weights", str(fake_imagenet_teacher), "--output-dir", str(out), *QUICK,
                   "--distill", name, *SMALL.get(name, []), "--epochs", "1", "--stage-epochs", "1",
                   *([] if kcd else ["--no-kcd"])))
    (row,) = rows_of(out)
    assert math.isfinite(row["train_loss"]) and row["samples"] == 12
    assert row["condensed"] == kcd


class Killed(Exception):
    pass


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.slow
@pytest.mark.parametrize("name", ["crd", "reviewkd", "sskd"])
def test_kill_and_resume_ends_like_an_uninterrupted_run(tmp_path, digits_teacher, monkeypatch, name):
    """Killed after epoch 2 is trained and condensed but before it is saved, then resumed: the same
    student, distiller state (connectors, heads, banks) and condensed set as a run never stopped."""
    common = ["--epochs", "4", "--stage-epochs", "1"]
    M.main(args_of(*digits_run(tmp_path / "full", digits_teacher, name, *common)))
    real_evaluate, calls = engine.evaluate, {"n": 0}

    def evaluate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    with pytest.raises(Killed):
        M.main(args_of(*digits_run(tmp_path / "killed", digits_teacher, name, *common)))
    monkeypatch.undo()
    M.main(args_of(*digits_run(tmp_path / "killed", digits_teacher, name, *common, "--resume")))
    for file in ("student.pth", "condensed.pt"):
        a, b = torch.load(tmp_path / "full" / file), torch.load(tmp_path / "killed" / file)
        assert a.keys() == b.keys() and all(same(a[k], b[k]) for k in a), (file, [k for k in a if not same(a[k], b[k])])
    a, b = (torch.load(tmp_path / run / "checkpoint.pth", weights_only=False)["distiller"] for run in ("full", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in rows_of(tmp_path / "full")] == [r["train_loss"] for r in rows_of(tmp_path / "killed")]


@pytest.mark.slow
@pytest.mark.parametrize("name, port", [("crd", 29537), ("sskd", 29538)])
def test_under_torchrun_on_gloo(tmp_path, digits_teacher, name, port):
    """Two processes: the student and the distiller's heads in one DDP module (CRD's banks kept in step
    by CRD; SSKD's teacher head trained on both ranks' shards, its gradients averaged)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "kcd_fast.train", *digits_run(tmp_path / "ddp", digits_teacher, name, "--epochs", "2",
                                               "--stage-epochs", "1")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["C"] < 1.0
    assert all(math.isfinite(r["train_loss"]) for r in rows_of(tmp_path / "ddp"))


def test_sskd_trains_its_teacher_head_once_before_the_student(tmp_path, digits_teacher, capsys, monkeypatch):
    """The teacher phase runs over every sample, moves only the teacher head (the teacher's weights stay
    as loaded), is saved as done, and a resumed run does not run it again."""
    common = digits_run(tmp_path / "o", digits_teacher, "sskd", "--epochs", "2", "--stage-epochs", "1")
    seen = []
    real = engine.teacher_phase_epoch

    def spy(feature, teacher, loader, *args, **kwargs):
        seen.append(({k: v.clone() for k, v in feature.distiller.teacher_head.state_dict().items()},
                     {k: v.clone() for k, v in teacher.state_dict().items()}))
        return real(feature, teacher, loader, *args, **kwargs)

    real_evaluate, calls = engine.evaluate, {"n": 0}

    def evaluate(*a, **k):  # the teacher's score, epoch 1, then stops the run in epoch 2
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed
        return real_evaluate(*a, **k)

    monkeypatch.setattr(engine, "teacher_phase_epoch", spy)
    monkeypatch.setattr(engine, "evaluate", evaluate)
    with pytest.raises(Killed):
        M.main(args_of(*common))
    out = capsys.readouterr().out
    assert "--distill sskd teacher phase 2/2: head_accuracy" in out and len(seen) == 2
    state = torch.load(tmp_path / "o/checkpoint.pth", weights_only=False)["distiller"]
    assert bool(state["teacher_phase_done"])
    head0 = seen[0][0]
    assert any(not torch.equal(head0[k], state[f"teacher_head.{k}"]) for k in head0)
    teacher_file = torch.load(digits_teacher, weights_only=False)
    weights = teacher_file.get("model", teacher_file)
    assert all(torch.equal(seen[1][1][k], weights[k]) for k in seen[1][1])
    M.main(args_of(*common, "--resume"))
    out = capsys.readouterr().out
    assert "resumed from" in out and "teacher phase" not in out and len(seen) == 2


def test_cached_knowledge_refuses_a_distiller_that_reads_teacher_features(tmp_path, capsys):
    code = M.cli(["--distill", "crd", "--knowledge", "cached", "--output-dir", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "--knowledge cached: --distill crd reads the teacher's features" in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, named", [
    (["--distill", "fitnet", "--fitnet-weight", "-1"], "fitnet_weight"),
    (["--distill", "crd", "--crd-nce-t", "0"], "crd_nce_t"),
    (["--distill", "nothing_of_the_kind"], "'nothing_of_the_kind' is not a registered loss or distiller"),
])
def test_bad_distiller_settings_exit_2_before_any_work(tmp_path, capsys, argv, named):
    code = M.cli([*argv, "--output-dir", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_options_of_another_distiller_are_named_as_ignored():
    ignored = options.ignored_options(args_of("--distill", "fitnet", "--at-weight", "5", "--crd-nce-k", "7"))
    assert "--at-weight 5.0: it applies to --distill at" in ignored
    assert "--crd-nce-k 7: it applies to --distill crd" in ignored


def test_dataset_defaults_of_the_distillers():
    cifar = config.resolve(args_of("--distill", "reviewkd", *QUICK))
    assert (cifar.reviewkd_weight, cifar.reviewkd_warmup) == (5.0, 20)
    assert cifar.crd_nce_k is None  # another distiller's options stay unset


def test_a_distiller_whose_tap_the_teacher_lacks_stops_before_the_teacher_is_trained(tmp_path, capsys, monkeypatch):
    """A distiller registered by a --loss-module that reads a tap no network has: one line, exit 2,
    before any teacher is trained or file written."""
    module = tmp_path / "far_tap.py"
    module.write_text(
        "import dataclasses\n"
        "from kcd_fast.distillers import Distiller, register_distiller\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class FarSettings:\n"
        "    far_weight: float = 1.0\n"
        "@register_distiller('far_tap')\n"
        "class FarTap(Distiller):\n"
        "    teacher_taps = ('stage9',)\n"
        "    Settings = FarSettings\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    trained = []
    monkeypatch.setattr(M.teachers, "train_teacher", lambda *a, **k: trained.append(1))
    try:
        code = M.cli(["--loss-module", "far_tap", "--distill", "far_tap", "--output-dir", str(tmp_path / "o"),
                      *QUICK])
    finally:
        distillers.DISTILLERS.pop("far_tap", None)
    err = capsys.readouterr().err
    assert code == 2 and "--distill far_tap" in err and "stage9" in err and "--teacher" in err, err
    assert not trained and not (tmp_path / "o").exists()


def test_the_check_before_the_teacher_is_a_dry_build_on_the_meta_device(monkeypatch):
    """check_distiller probes shapes on meta tensors: no weights drawn, and CRD's banks at ImageNet's
    N (2 x 1,281,167 x 128 float32, 1.3 GB) take no memory."""
    built = []
    real = M.distillation.FeatureDistill
    monkeypatch.setattr(M.distillation, "FeatureDistill", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    cfg = config.resolve(args_of("--dataset", "imagenet", "--distill", "crd", "--student", "resnet18",
                                 "--teacher", "resnet34"))
    data = SimpleNamespace(resident=[(torch.zeros(3, 224, 224), 0)], num_classes=1000, in_channels=3, n=1281167)
    M.check_distiller(cfg, data)
    crd = built[0].distiller
    assert crd.memory_s.shape == (1281167, 128) and crd.memory_s.is_meta and crd.memory_t.is_meta
    assert all(p.is_meta for p in built[0].module.parameters())


def test_resume_with_other_distiller_settings_is_refused(tmp_path, digits_teacher, capsys):
    common = digits_run(tmp_path / "o", digits_teacher, "fitnet", "--epochs", "1", "--stage-epochs", "1")
    M.main(args_of(*common))
    assert M.cli([*common, "--resume", "--fitnet-weight", "50"]) == 2
    assert "--fitnet-weight 100.0 there, 50.0 here" in capsys.readouterr().err
    assert M.cli([*common, "--resume", "--distill", "pkt"]) == 2
    assert "--distill 'fitnet' there, 'pkt' here" in capsys.readouterr().err
