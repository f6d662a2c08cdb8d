"""The trainer, python -m kcd_fast.train, driven through main(args) and cli(argv) on real data (digits)."""
import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kcd_fast import KnowledgeCondenser
from kcd_fast import files
from kcd_fast.files import file_hash
from kcd_fast.sampling import NoSingletonBatches
from kcd_fast.train import checkpoint, config, engine, loaders, options, progress
from kcd_fast.train import main as M
from kcd_fast.train import teacher as teachers
from kcd_fast.models import build_model

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--no-progress", "--no-plots", "--epochs", "4", "--stage-epochs", "2"]


def args_of(*argv):
    return options.get_args_parser().parse_args(list(argv))



@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    """A digits teacher trained once through the trainer's own path, reused by the other tests."""
    out = tmp_path_factory.mktemp("teacher")
    args = args_of("--dataset", "digits", "--teacher-epochs", "6", "--output-dir", str(out), *QUICK,
                   "--epochs", "1", "--stage-epochs", "1")
    M.main(args)
    (path,) = out.glob("teacher-*.pth")
    return path


def test_default_digits_run_learns_and_writes_its_outputs(tmp_path, digits_teacher):
    out = tmp_path / "run"
    summary = M.main(args_of("--output-dir", str(out), "--teacher-weights", str(digits_teacher), "--no-progress",
                             "--epochs", "6", "--stage-epochs", "2"))
    assert summary["final_top1"] > 80.0, "digits has 10 classes: chance is 10%"
    assert summary["kcd"] and summary["epochs"] == 6
    for name in ("checkpoint.pth", "metrics.jsonl", "summary.json", "student.pth", "condensed.pt",
                 "plots/accuracy_kept.png", "plots/value_distribution.png", "plots/rank_likelihood.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(6))
    for key in ("train_loss", "top1", "top5", "kept_fraction", "samples", "C_so_far", "epoch_time"):
        assert all(key in r for r in rows), key
    # train_time = the training steps (mstep_time) + the rest (estep_time: the stage ends' condensation)
    assert all(abs(r["mstep_time"] + r["estep_time"] - r["train_time"]) < 1e-9 for r in rows)
    assert all(0 < r["mstep_time"] <= r["train_time"] and r["estep_time"] >= 0 for r in rows)
    on_disk = json.loads((out / "summary.json").read_text())
    for key in ("best_top1", "best_top5", "final_top1", "final_top5", "C", "C_a", "wall_time_s", "stages"):
        assert key in on_disk, key
    assert len(on_disk["stages"]) == 3 and on_disk["C"] < 1.0
    assert (out / "plots/accuracy_kept.png").read_bytes()[:4] == b"\x89PNG"
    ckpt = torch.load(out / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 5 and ckpt["args"]["dataset"] == "digits"
    # student_best.pth is the best epoch's student: evaluated again, it scores summary's best top-1.
    from kcd_fast.data import build_datasets

    args = config.resolve(args_of("--teacher-weights", str(digits_teacher))).replace(rank=0, world_size=1,
                                                                                      distributed=False)
    model = build_model(args.student, 10, 1)
    model.load_state_dict(torch.load(out / "student_best.pth", weights_only=True))
    val = engine.evaluate(model, build_datasets("digits").val, args, torch.device("cpu"))
    assert val["top1"] == pytest.approx(on_disk["best_top1"]) and 0 <= on_disk["best_epoch"] < 6


def test_trains_its_own_teacher_and_reuses_it(tmp_path, digits_teacher, capsys):
    # The fixture trained one through main(); a second run with the same settings reuses the file, and says so.
    out = digits_teacher.parent
    before = digits_teacher.stat().st_mtime_ns
    capsys.readouterr()
    M.main(args_of("--dataset", "digits", "--teacher-epochs", "6", "--output-dir", str(out), *QUICK,
                   "--epochs", "1", "--stage-epochs", "1"))
    assert digits_teacher.stat().st_mtime_ns == before
    assert f"reusing the teacher {digits_teacher}" in capsys.readouterr().out
    blob = torch.load(digits_teacher, weights_only=False)
    assert blob["top1"] > 80.0


def test_a_teacher_trained_with_other_settings_is_not_reused(tmp_path, digits_teacher):
    # Another learning rate (the teacher is trained with --lr) is another teacher, in a file of its own.
    out = tmp_path / "o"
    out.mkdir()
    (out / digits_teacher.name).write_bytes(digits_teacher.read_bytes())
    M.main(args_of("--dataset", "digits", "--teacher-epochs", "1", "--lr", "0.2", "--output-dir", str(out), *QUICK,
                   "--epochs", "1", "--stage-epochs", "1"))
    assert len(list(out.glob("teacher-*.pth"))) == 2


def test_no_kcd_passes_every_sample_kcd_follows_the_schedule(tmp_path, digits_teacher):
    common = ["--teacher-weights", str(digits_teacher), *QUICK]
    base = M.main(args_of("--output-dir", str(tmp_path / "kd"), "--no-kcd", *common))
    kcd = M.main(args_of("--output-dir", str(tmp_path / "kcd"), *common))
    n = base["num_train"]
    rows_kd = [json.loads(x) for x in (tmp_path / "kd/metrics.jsonl").read_text().splitlines()]
    rows_kcd = [json.loads(x) for x in (tmp_path / "kcd/metrics.jsonl").read_text().splitlines()]
    assert [r["samples"] for r in rows_kd] == [n] * 4 and base["C"] == 1.0
    from kcd_fast import reference as R

    expected = [n] + [R.num_kept(n, (e - 1) // 2, 0.7, 2) for e in range(1, 4)]
    assert [r["samples"] for r in rows_kcd] == expected
    assert kcd["C"] == pytest.approx(sum(expected) / (4 * n))
    assert kcd["teacher_passes"] == sum(expected) and base["teacher_passes"] == 4 * n


@pytest.mark.parametrize("where", ["between_epochs", "mid_epoch"])
def test_kill_and_resume_ends_like_an_uninterrupted_run(tmp_path, digits_teacher, monkeypatch, where):
    common = ["--teacher-weights", str(digits_teacher), *QUICK, "--epochs", "6", "--stage-epochs", "2"]
    full = M.main(args_of("--output-dir", str(tmp_path / "full"), *common))

    class Killed(Exception):
        pass

    real_observe = KnowledgeCondenser.observe
    real_evaluate = engine.evaluate
    calls = {"observe": 0, "evaluate": 0}

    def observe(self, *a, **k):
        calls["observe"] += 1
        if where == "mid_epoch" and self.next_epoch == 3 and calls["observe"] > 60:
            raise Killed
        return real_observe(self, *a, **k)

    def evaluate(*a, **k):
        calls["evaluate"] += 1
        if where == "between_epochs" and calls["evaluate"] == 3:  # epoch 2 trained and condensed, not saved
            raise Killed
        return real_evaluate(*a, **k)

    monkeypatch.setattr(KnowledgeCondenser, "observe", observe)
    monkeypatch.setattr(engine, "evaluate", evaluate)
    with pytest.raises(Killed):
        M.main(args_of("--output-dir", str(tmp_path / "killed"), *common))
    monkeypatch.undo()
    resumed = M.main(args_of("--output-dir", str(tmp_path / "killed"), *common, "--resume"))
    a = torch.load(tmp_path / "full/student.pth")
    b = torch.load(tmp_path / "killed/student.pth")
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed student differs"
    for key in ("final_top1", "best_top1", "C", "C_a"):
        assert resumed[key] == full[key], key
    rows = (tmp_path / "killed/metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == list(range(6))
    ca = torch.load(tmp_path / "full/condensed.pt")
    cb = torch.load(tmp_path / "killed/condensed.pt")
    assert torch.equal(ca["keep"], cb["keep"]) and torch.equal(ca["k1l"], cb["k1l"])


def _write_image_folder(root: Path, classes=3, per_class=4, size=40):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 80 + 60 * c).clamp(0, 255).byte().numpy()
                Image.fromarray(pixels).save(folder / f"img{i}.png")


def test_imagenet_layout_from_a_tiny_fake_tree(tmp_path):
    _write_image_folder(tmp_path / "imnet")
    teacher = build_model("resnet18", 3)
    torch.save({"model": teacher.state_dict()}, tmp_path / "t.pth")
    argv = ["--dataset", "imagenet", "--data-dir", str(tmp_path / "imnet"), "--teacher", "resnet18",
            "--student", "resnet18", "--teacher-weights", str(tmp_path / "t.pth"),
            "--epochs", "2", "--stage-epochs", "1", "--batch-size", "4", "--workers", "0",
            "--lr-milestones", "1", "--eval-batch-size", "4", "--no-progress", "--no-plots",
            "--output-dir", str(tmp_path / "out")]
    summary = M.main(args_of(*argv))
    assert summary["num_train"] == 12 and summary["epochs"] == 2
    assert len(summary["stages"]) == 2
    # Each epoch logs the rate it trained at: the milestone at 1 lowers epoch 1's, not epoch 0's.
    args = config.resolve(args_of(*argv))
    rows = [json.loads(x) for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([args.lr, args.lr * args.lr_gamma])


def test_torchrun_two_processes_on_gloo(tmp_path, digits_teacher):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "kcd_fast.train", "--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "ddp"),
           "--epochs", "2", "--stage-epochs", "1", "--no-progress", "--no-plots", "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_top1"] > 30.0
    rows = [json.loads(x) for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    n = summary["num_train"]
    # Both ranks together pass the kept set once per epoch (plus at most one padding sample).
    assert n <= rows[0]["samples"] <= n + 1
    # One rule for C: the last epoch's C_so_far is summary.json's C (both over the padded epoch, ceil(N/W) W).
    assert rows[-1]["C_so_far"] == summary["C"] < 1.0
    assert res.stdout.count("epoch 1/2:") == 1, "only rank 0 logs"


def test_torchrun_one_off_fill_counts_each_teacher_forward_once(tmp_path, digits_teacher):
    # 1437 samples on 2 ranks: shares of 719 and 718, and the KD baseline's epoch padded to 1438.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "kcd_fast.train", "--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "ddp"),
           "--epochs", "1", "--no-kcd", "--knowledge", "cached", "--knowledge-fill", "pass", "--no-progress",
           "--no-plots", "--device", "cpu", "--log-every", "3", "--eval-batch-size", "128"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["teacher_passes"] == summary["num_train"] == 1437
    assert summary["C_a"] == 1438 and summary["C"] == 1.0
    rows = [json.loads(x) for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["C_so_far"] == summary["C"] == 1.0
    assert "knowledge fill step 6: 1437/1437 images" in res.stdout  # 6 batches of 128 per rank, clamped


def test_torchrun_lazy_fill_completes_every_replica(tmp_path, digits_teacher):
    """Cached KCD under DDP, filled lazily: each rank writes its first epoch's share, one collective
    (with the owners worked out from every rank's sampler) completes both replicas, and the teacher
    runs on each sample once, in the first epoch only."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521",
           "-m", "kcd_fast.train", "--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "ddp"),
           "--epochs", "3", "--stage-epochs", "1", "--knowledge", "cached", "--no-progress", "--no-plots",
           "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    # 1437 samples on 2 ranks: the first epoch is padded to 1438 (one sample twice), all of it online.
    assert summary["num_train"] == 1437 and summary["teacher_passes"] == 1438
    assert [r["teacher_forwards"] for r in rows] == [1438, 0, 0] and summary["final_top1"] > 30.0


def test_torchrun_trains_the_teacher_on_rank_0_while_the_other_waits(tmp_path):
    """Rank 0 trains (and evaluates) the teacher alone, with no collective in its evaluation: one would
    meet the other rank's barrier, and the run would hang."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
           "-m", "kcd_fast.train", "--teacher-epochs", "1", "--train-subset", "400", "--output-dir", str(out),
           "--epochs", "2", "--stage-epochs", "1", "--no-progress", "--no-plots", "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("teacher top-1") == 1 and len(list(out.glob("teacher-*.pth"))) == 1
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2


def _download_worker(rank, port, out_dir, teacher_path):
    import time

    from kcd_fast.data import DatasetNotFoundError

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))

    def fake_build(name, data_dir=None, *, download=False, **kw):
        start = time.time()
        if download:
            time.sleep(1.0)  # rank 0 unpacks an archive
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"start": start, "end": time.time(),
                                                                 "download": download}))
        raise DatasetNotFoundError("stop here: only the order of the calls is tested")

    M.build_datasets = fake_build
    code = M.cli(["--dataset", "cifar100", "--download", "--device", "cpu", "--teacher-weights", teacher_path,
                  "--output-dir", str(Path(out_dir) / "o")])
    Path(out_dir, f"rank{rank}.code").write_text(str(code))


def test_download_under_torchrun_is_done_by_rank_0_first(tmp_path):
    """Every rank fetching and unpacking into one folder at once could corrupt it: rank 0 downloads,
    the others wait for it and only read. A failure still ends every rank with exit code 2."""
    (tmp_path / "t.pth").write_bytes(b"")
    torch.multiprocessing.spawn(_download_worker, nprocs=2, join=True,
                                args=(29531, str(tmp_path), str(tmp_path / "t.pth")))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["download"] and not r1["download"]
    assert r1["start"] >= r0["end"], "rank 1 read the data before rank 0 had downloaded it"
    assert [(tmp_path / f"rank{r}.code").read_text() for r in range(2)] == ["2", "2"]


def test_every_rank_and_epoch_gets_its_own_random_streams():
    """Augmentation (torch) and loader-worker seeds differ across ranks, epochs and streams: with one seed
    per epoch for every rank's workers, the k-th sample of each rank would get the same crop."""
    seeds = [loaders.epoch_seed(s, e, r, k) for s in (0, 1, -1) for e in range(40) for r in range(16)
             for k in ("torch", "loader")]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2 ** 63 for x in seeds)


def test_each_epoch_reseeds_its_streams_and_reshuffles(tmp_path, digits_teacher, monkeypatch):
    """What the trainer does with epoch_seed: every epoch seeds torch and the loader's generator (the
    workers' seeds) from (seed, epoch, rank), and sets the sampler's epoch, so each epoch draws a new
    order and new augmentations, and a resumed epoch draws the same ones again."""
    seen = []
    real = engine.train_one_epoch

    def spy(student, teacher, loader, *a, **k):
        epoch = a[4]  # (optimizer, scaler, condenser, args, epoch, ...)
        seen.append((epoch, torch.initial_seed(), loader.generator.initial_seed(),
                     [i for batch in loader.batch_sampler for i in batch]))
        return real(student, teacher, loader, *a, **k)

    monkeypatch.setattr(engine, "train_one_epoch", spy)
    M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "r"), "--seed", "7",
                   *QUICK, "--epochs", "3", "--stage-epochs", "3"))  # epochs 1 and 2: one condensed set
    assert [e for e, *_ in seen] == [0, 1, 2]
    for epoch, torch_seed, loader_seed, _ in seen:
        assert torch_seed == loaders.epoch_seed(7, epoch, 0, "torch")
        assert loader_seed == loaders.epoch_seed(7, epoch, 0, "loader")
    orders = [order for *_, order in seen]
    assert sorted(orders[1]) == sorted(orders[2]) and len(orders[1]) < len(orders[0])
    assert orders[1] != orders[2], "the sampler's epoch must change the shuffle"


@pytest.mark.parametrize("n", range(0, 15))
@pytest.mark.parametrize("batch_size", [1, 2, 4, 5])
def test_no_singleton_batches_pass_every_sample_once(n, batch_size):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    batches = list(NoSingletonBatches(order, batch_size))
    assert len(batches) == len(NoSingletonBatches(order, batch_size))
    assert [i for b in batches for i in b] == order
    if batch_size > 1 and n > 1:
        assert all(len(b) > 1 for b in batches)
    assert all(len(b) <= batch_size + 1 for b in batches)


def test_a_last_batch_of_one_sample_does_not_crash_batchnorm(tmp_path, digits_teacher):
    """cnn_large ends on 1x1 maps on digits, where BatchNorm cannot train on one sample: 65 = 64 + 1."""
    summary = M.main(args_of("--student", "cnn_large", "--train-subset", "65", "--batch-size", "64",
                             "--teacher-weights", str(digits_teacher), "--no-kcd", "--output-dir", str(tmp_path / "o"),
                             *QUICK, "--epochs", "1", "--stage-epochs", "1"))
    assert summary["epochs"] == 1


def test_progress_bar_counts_every_rank(monkeypatch):
    import tqdm.auto

    seen = {}

    class Bar:
        def __init__(self, total, **kw):
            seen["total"], seen["n"] = total, 0

        def update(self, k):
            seen["n"] += k

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    args = argparse.Namespace(progress=True, rank=0, world_size=2)
    batches = [(None, torch.zeros(4)), (None, torch.zeros(4)), (None, torch.zeros(2))]  # rank 0's share of 20
    assert len(list(progress.track(iter(batches), args, "epoch", 20, ranks=2))) == 3
    assert seen == {"total": 20, "n": 20}


def test_log_every_prints_a_line_every_n_steps_on_rank_0_only(monkeypatch, capsys):
    clock = iter([0.0, 2.0, 4.0, 6.0])  # read at the start and at each line: two seconds every two steps
    monkeypatch.setattr(progress.time, "time", lambda: next(clock))
    batches = [(None, torch.zeros(4))] * 5 + [(None, torch.zeros(2))]  # rank 0's share of 2 x 22 images
    args = argparse.Namespace(progress=False, log_every=2, rank=0, world_size=2)
    assert len(list(progress.track(iter(batches), args, "epoch 3/90", 44, ranks=2))) == 6
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 3/90 step 2: 16/44 images, 8 img/s, 0:00:02 elapsed, ETA 0:00:04",
                     "epoch 3/90 step 4: 32/44 images, 8 img/s, 0:00:04 elapsed, ETA 0:00:02",
                     "epoch 3/90 step 6: 44/44 images, 7 img/s, 0:00:06 elapsed, ETA 0:00:00"]
    args.rank = 1
    assert len(list(progress.track(iter(batches), args, "epoch 3/90", 44, ranks=2))) == 6
    assert capsys.readouterr().out == ""


def test_resume_with_other_workers_says_so(tmp_path, digits_teacher, capsys):
    common = ["--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK,
              "--epochs", "2", "--stage-epochs", "1"]
    assert M.cli([*common, "--workers", "0"]) == 0
    capsys.readouterr()
    assert M.cli([*common, "--workers", "1", "--resume"]) == 0
    assert "resuming with 1 loader workers instead of 0" in capsys.readouterr().out


def test_a_corrupt_image_mid_epoch_is_named_in_one_line(tmp_path, capsys):
    _write_image_folder(tmp_path / "imnet")
    bad = tmp_path / "imnet/train/class1/img2.png"
    bad.write_bytes(bad.read_bytes()[:100])
    torch.save({"model": build_model("cnn_small", 3, 3).state_dict()}, tmp_path / "t.pth")
    code = M.cli(["--dataset", "imagenet", "--data-dir", str(tmp_path / "imnet"), "--teacher", "cnn_small",
                  "--student", "cnn_small", "--teacher-weights", str(tmp_path / "t.pth"), "--batch-size", "4",
                  "--eval-batch-size", "4", "--workers", "1", "--output-dir", str(tmp_path / "o"), *QUICK,
                  "--epochs", "1", "--stage-epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2 and f"cannot decode the image {bad}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert err.strip().endswith("replace or remove the file, then start the run again (it has no checkpoint yet)")


def test_a_resume_names_a_broken_image_a_removed_one_and_a_broken_checkpoint(tmp_path, monkeypatch, capsys):
    _write_image_folder(tmp_path / "imnet")
    torch.save({"model": build_model("cnn_small", 3, 3).state_dict()}, tmp_path / "t.pth")
    common = ["--dataset", "imagenet", "--data-dir", str(tmp_path / "imnet"), "--teacher", "cnn_small", "--student",
              "cnn_small", "--teacher-weights", str(tmp_path / "t.pth"), "--batch-size", "4", "--eval-batch-size", "4",
              "--workers", "0", "--output-dir", str(tmp_path / "o"), *QUICK, "--epochs", "3", "--stage-epochs", "1"]
    killed = _killed_at_evaluate(monkeypatch, 2)  # epoch 1 checkpointed, epoch 2 not
    with pytest.raises(killed):
        M.main(args_of(*common))
    monkeypatch.undo()
    bad = tmp_path / "imnet/train/class1/img2.png"
    good = bad.read_bytes()
    bad.write_bytes(good[:100])
    assert M.cli([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"cannot decode the image {bad}" in err and err.strip().endswith(
        "replace the file, then continue with --resume (removing it renumbers the samples, which a resume refuses: "
        "start a new run then)"), err
    bad.unlink()  # removed instead: every later index names another image
    assert M.cli([*common, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was trained on other samples (imagenet, 12 samples, " in err and "than this run has (imagenet, 11 " \
        "samples, " in err and "Traceback" not in err, err
    bad.write_bytes(good)
    ckpt = tmp_path / "o/checkpoint.pth"
    intact = ckpt.read_bytes()
    for broken in (intact[:len(intact) // 2], b"junk"):
        ckpt.write_bytes(broken)
        assert M.cli([*common, "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"--resume: {ckpt} cannot be read (" in err and "Traceback" not in err and \
            err.strip().endswith("restore it, or delete it and start again without --resume"), err
    ckpt.write_bytes(intact)
    assert M.cli([*common, "--resume"]) == 0  # restored: it finishes
    # The same N, other images: a knowledge file or a checkpoint made for the first folder is refused.
    first = checkpoint.samples_id(args_of(*common), M.build_datasets("imagenet", tmp_path / "imnet").train)
    (tmp_path / "imnet/train/class1/img2.png").rename(tmp_path / "imnet/train/class1/img9.png")
    again = checkpoint.samples_id(args_of(*common), M.build_datasets("imagenet", tmp_path / "imnet").train)
    assert first.split(", ")[:2] == again.split(", ")[:2] and first != again


# --------------------------------------------------------------------------- user errors: message, exit 2, no traceback


def test_help_describes_every_option_and_its_real_default():
    parser = options.get_args_parser()
    undocumented = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert undocumented == []
    text = " ".join(parser.format_help().split())
    assert "default: None" not in text
    assert "--epochs EPOCHS I, training epochs (default per dataset: digits 30, fashion-mnist 3, cifar100 240," in text
    assert "(default per dataset: digits cnn_large, fashion-mnist cnn_large, cifar100 resnet32x4" in text


def test_unknown_dataset_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        M.cli(["--dataset", "mnist"])
    assert exc.value.code == 2
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_missing_folder_names_the_path(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code = M.cli(["--dataset", "fashion-mnist", "--data-dir", str(missing), "--output-dir", str(tmp_path / "o"),
                  "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(missing) in err and "dataset-fashion-mnist" in err and "Traceback" not in err


def test_teacher_with_other_class_count_is_refused(tmp_path, capsys):
    wrong = build_model("cnn_large", 5, 1)
    torch.save(wrong.state_dict(), tmp_path / "t5.pth")
    code = M.cli(["--teacher-weights", str(tmp_path / "t5.pth"), "--output-dir", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "5 classes" in err and "10" in err and "Traceback" not in err


def test_cli_subprocess_has_no_traceback(tmp_path):
    (tmp_path / "t.pth").write_bytes(b"")  # present: the run gets as far as the data, and stops there
    res = subprocess.run([sys.executable, "-m", "kcd_fast.train", "--dataset", "imagenet", "--data-dir",
                          str(tmp_path / "none"), "--teacher-weights", str(tmp_path / "t.pth"), "--output-dir",
                          str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and str(tmp_path / "none") in res.stderr
    assert not (tmp_path / "o").exists(), "nothing is written before the input is known to be good"


@pytest.mark.parametrize("argv, named", [
    (["--teacher-epochs", "0"], "--teacher-epochs"),
    (["--kd-temperature", "0"], "--kd-temperature"),
    (["--train-subset", "-5"], "--train-subset"),
    (["--rho", "1.5"], "--rho"),
    (["--alpha", "-1"], "--alpha"),
    (["--eps-max", "2"], "--eps-max"),
    (["--batch-size", "0"], "--batch-size"),
    (["--workers", "-1"], "--workers"),
    (["--lr", "-1"], "--lr"),
    (["--knowledge", "cached", "--storage", "topk", "--topk", "0"], "--topk"),
    (["--condensed", "/nonexistent/c.pt"], "--condensed"),
    (["--knowledge-file", "k.kcdk"], "--knowledge cached"),
    (["--knowledge", "cached", "--knowledge-file", "/nonexistent_dir/x.kcdk"], "/nonexistent_dir"),
    (["--dataset", "cifar100", "--data-dir", "/nonexistent"], "--dataset cifar100 needs --teacher-weights"),
    (["--dataset", "imagenet", "--teacher", "resnet32x4"], "--dataset imagenet needs --teacher-weights"),
    (["--teacher", "resnet32x4", "--teacher-weights", "torchvision"], "not of --teacher resnet32x4"),
    (["--distill", "my_kd"], "my_kd"),
    (["--loss-module", "no_such_module_here"], "no_such_module_here"),
    (["--fake-on-device"], "--fake-on-device"),
    (["--seed", "-1"], "--seed must be an int >= 0"),
    (["--seed", "-1", "--no-kcd"], "--seed must be an int >= 0"),
    (["--stage-epochs", "-5", "--epochs", "10"], "--stage-epochs must be >= 1, got -5"),
    (["--no-kcd", "--condensed", "c.pt"], "--condensed trains on a condensed set, which --no-kcd would ignore"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "meta"], "--device 'meta': the trainer runs on cpu or cuda"),
    (["--device", "cuda:99"], "--device cuda:99"),
])
def test_bad_settings_exit_2_before_any_work(tmp_path, capsys, argv, named):
    """Checked before any data is read, any teacher trained or any file written: one line, exit 2."""
    code = M.cli([*argv, "--output-dir", str(tmp_path / "o"), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_resume_with_other_settings_is_refused(tmp_path, digits_teacher, capsys):
    common = ["--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK,
              "--epochs", "2", "--stage-epochs", "1"]
    M.main(args_of(*common))
    assert M.cli([*common, "--resume", "--lr", "0.2", "--no-kcd"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.05 there, 0.2 here" in err and "--kcd True there, False here" in err


def test_unreadable_inputs_and_an_output_file_exit_2_without_a_traceback(tmp_path, digits_teacher, capsys):
    """A --teacher-weights or --condensed file that torch cannot load, and an --output-dir that is a
    file, are one-line errors naming the flag, not tracebacks."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xff\xd8\xff\xe0 not a checkpoint" * 10)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for argv, named in [
        (["--teacher-weights", str(junk)], f"--teacher-weights {junk} is not a torch checkpoint"),
        (["--teacher-weights", str(digits_teacher), "--condensed", str(junk)],
         f"--condensed {junk}: load_condensed: {junk} is not a file written by save_condensed"),
        (["--teacher-weights", str(digits_teacher), "--condensed", str(digits_teacher)],
         "is not a file written by save_condensed"),
        (["--teacher-weights", str(digits_teacher), "--output-dir", str(afile)],
         f"--output-dir {afile} is a file, not a folder"),
    ]:
        code = M.cli([*QUICK, "--output-dir", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err
        assert code == 2 and named in err and "Traceback" not in err, err


def test_resume_without_checkpoint_and_bad_stage(tmp_path, capsys):
    assert M.cli(["--resume", "--output-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert M.cli(["--epochs", "5", "--stage-epochs", "2", "--output-dir", str(tmp_path / "o")]) == 2
    assert "must divide" in capsys.readouterr().err


# --------------------------------------------------------------------------- cached knowledge


class CountingTeacher(torch.nn.Module):
    """Wraps the teacher to count the samples it is run on."""

    def __init__(self, model, counter):
        super().__init__()
        self.model = model
        self.counter = counter

    def forward(self, x):
        self.counter["samples"] += x.shape[0]
        return self.model(x)

    def load_state_dict(self, state, strict=True):
        return self.model.load_state_dict(state, strict)

    def state_dict(self, *a, **k):
        return self.model.state_dict(*a, **k)


def _count_teacher(monkeypatch, teacher_name="cnn_large"):
    counter = {"samples": 0}
    real = teachers.build_model

    def build(name, *a, **k):
        model = real(name, *a, **k)
        return CountingTeacher(model, counter) if name == teacher_name else model

    monkeypatch.setattr(teachers, "build_model", build)
    return counter


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_cached_mode_runs_the_teacher_exactly_one_epoch(tmp_path, digits_teacher, monkeypatch, storage):
    counter = _count_teacher(monkeypatch)
    summary = M.main(args_of("--knowledge", "cached", "--storage", storage, "--teacher-weights", str(digits_teacher),
                             "--output-dir", str(tmp_path / "c"), *QUICK))
    n = summary["num_train"]
    assert counter["samples"] == n, "the teacher must see each sample once, in the first epoch only"
    assert summary["teacher_passes"] == n and summary["knowledge"] == "cached"
    assert summary["knowledge_storage"]["storage"] == storage
    assert summary["final_top1"] > 80.0


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_cached_steps_read_the_buffer_through_the_losss_own_variant(tmp_path, digits_teacher, monkeypatch, storage):
    """With --knowledge cached, every step after the fill takes ``kd``'s buffer variant (on CUDA one
    kernel reads the rows in place), the fill's steps the teacher's logits. Without that variant (a
    --loss-module loss) the steps read ``teacher_logits`` instead, and the run is the same: on the CPU
    the variant is exactly the generic path."""
    from kcd_fast import distill as D

    calls = {"buffer": 0, "logits": 0}
    buffer_loss, logits_loss = D.KNOWLEDGE_LOSSES["kd"], D.LOSSES["kd"]

    def counted(key, fn):
        def wrapped(*a):
            calls[key] += 1
            return fn(*a)
        return wrapped

    monkeypatch.setitem(D.KNOWLEDGE_LOSSES, "kd", counted("buffer", buffer_loss))
    monkeypatch.setitem(D.LOSSES, "kd", counted("logits", logits_loss))
    common = ["--knowledge", "cached", "--storage", storage, "--teacher-weights", str(digits_teacher),
              "--batch-size", "64", *QUICK]
    M.main(args_of(*common, "--output-dir", str(tmp_path / "variant")))
    history = [json.loads(x) for x in (tmp_path / "variant" / "metrics.jsonl").read_text().splitlines()]
    steps = [-(-r["samples"] // 64) for r in history]
    assert calls == {"logits": steps[0], "buffer": sum(steps[1:])}
    monkeypatch.delitem(D.KNOWLEDGE_LOSSES, "kd")
    M.main(args_of(*common, "--output-dir", str(tmp_path / "generic")))
    generic = [json.loads(x) for x in (tmp_path / "generic" / "metrics.jsonl").read_text().splitlines()]
    assert calls["logits"] == steps[0] + sum(steps)
    assert [r["train_loss"] for r in generic] == [r["train_loss"] for r in history]


@pytest.mark.parametrize("fill", ["lazy", "pass"])
def test_cached_mode_lets_the_teacher_go_once_the_buffer_is_filled(tmp_path, digits_teacher, monkeypatch, fill):
    """After the fill the teacher is not run again: the trainer keeps no reference to it, so its
    (GPU) memory is freed at once, and no time is spent copying its weights anywhere."""
    import gc
    import weakref

    built, alive = [], []
    real_build, real_epoch = teachers.build_model, engine.train_one_epoch

    def build(name, *a, **k):
        model = real_build(name, *a, **k)
        if name == "cnn_large":
            built.append(weakref.ref(model))
        return model

    def epoch(student, teacher, *a, **k):
        gc.collect()
        alive.append(teacher is not None or any(t() is not None for t in built))
        return real_epoch(student, teacher, *a, **k)

    monkeypatch.setattr(teachers, "build_model", build)
    monkeypatch.setattr(engine, "train_one_epoch", epoch)
    M.main(args_of("--knowledge", "cached", "--knowledge-fill", fill, "--teacher-weights", str(digits_teacher),
                   "--output-dir", str(tmp_path / fill), *QUICK))
    assert len(built) == 1
    assert alive == ([True, False, False, False] if fill == "lazy" else [False] * 4)


def test_knowledge_file_is_computed_once_and_reused(tmp_path, digits_teacher, monkeypatch):
    kfile = tmp_path / "digits.kcdk"
    common = ["--knowledge", "cached", "--knowledge-file", str(kfile), *QUICK]
    M.main(args_of(*common, "--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "a")))
    assert kfile.is_file()
    counter = _count_teacher(monkeypatch)
    again = M.main(args_of(*common, "--output-dir", str(tmp_path / "b")))  # no --teacher-weights
    assert counter["samples"] == 0 and again["teacher_passes"] == 0, "a knowledge file needs no teacher"
    assert again["final_top1"] > 50.0


def test_knowledge_file_of_another_dataset_is_refused(tmp_path, capsys):
    from kcd_fast.knowledge import KnowledgeBuffer

    KnowledgeBuffer(100, 10, temperature=4.0).save(tmp_path / "other.kcdk")
    code = M.cli(["--knowledge", "cached", "--knowledge-file", str(tmp_path / "other.kcdk"),
                  "--output-dir", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "100 samples" in err and "1437" in err and "Traceback" not in err


def test_knowledge_file_of_another_teacher_is_refused(tmp_path, digits_teacher, capsys):
    """A file records its teacher's name (and weights hash): another --teacher is refused, and so is a
    --teacher-weights when the file was filled by a teacher trained here (it records no hash)."""
    from kcd_fast.knowledge import KnowledgeBuffer

    teacher = config.resolve(args_of()).teacher
    KnowledgeBuffer(1437, 10, temperature=4.0, teacher="resnet8x4").save(tmp_path / "other.kcdk")
    code = M.cli(["--knowledge", "cached", "--knowledge-file", str(tmp_path / "other.kcdk"),
                  "--output-dir", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and f"teacher 'resnet8x4', but this run has '{teacher}'" in err and "Traceback" not in err
    KnowledgeBuffer(1437, 10, temperature=4.0, teacher=teacher).save(tmp_path / "here.kcdk")
    code = M.cli(["--knowledge", "cached", "--knowledge-file", str(tmp_path / "here.kcdk"), "--teacher-weights",
                  str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK])
    err = capsys.readouterr().err
    assert code == 2 and "made by a teacher trained here" in err and "Traceback" not in err


def test_cached_mode_one_off_pass(tmp_path, digits_teacher, monkeypatch, capsys):
    counter = _count_teacher(monkeypatch)
    summary = M.main(args_of("--knowledge", "cached", "--knowledge-fill", "pass", "--teacher-weights",
                             str(digits_teacher), "--output-dir", str(tmp_path / "p"), *QUICK, "--log-every", "3"))
    assert counter["samples"] == summary["num_train"] == summary["teacher_passes"]
    # The pass logs its progress like an epoch: 1437 images at --eval-batch-size 256 are 6 batches.
    fill_lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("knowledge fill step")]
    assert [ln.split(" images")[0] for ln in fill_lines] == ["knowledge fill step 3: 768/1437",
                                                               "knowledge fill step 6: 1437/1437"]


def _killed_at_evaluate(monkeypatch, call: int) -> type:
    """Make the trainer's ``call``-th evaluation of its student raise, as a kill would stop the run there
    (after that epoch's training, before its checkpoint); returns the exception class.
    ``monkeypatch.undo()`` ends it. The start-of-run score of a --teacher-weights teacher (frozen
    weights) is not counted."""

    class Killed(Exception):
        pass

    real_evaluate, calls = engine.evaluate, {"n": 0}

    def evaluate(model, *a, **k):
        if any(p.requires_grad for p in model.parameters()):
            calls["n"] += 1
            if calls["n"] == call:
                raise Killed
        return real_evaluate(model, *a, **k)

    monkeypatch.setattr(engine, "evaluate", evaluate)
    return Killed


@pytest.mark.parametrize("fill", ["lazy", "pass"])
def test_resume_in_cached_mode(tmp_path, digits_teacher, monkeypatch, fill):
    common = ["--knowledge", "cached", "--storage", "topk", "--topk", "3", "--teacher-weights",
              str(digits_teacher), *QUICK, "--epochs", "6", "--stage-epochs", "2", "--knowledge-fill", fill]
    M.main(args_of("--output-dir", str(tmp_path / "full"), *common))
    killed = _killed_at_evaluate(monkeypatch, 4)  # epoch 3 done; the buffer was mixed at the end of epoch 2
    with pytest.raises(killed):
        M.main(args_of("--output-dir", str(tmp_path / "killed"), *common))
    monkeypatch.undo()
    counter = _count_teacher(monkeypatch)
    resumed = M.main(args_of("--output-dir", str(tmp_path / "killed"), *common, "--resume"))
    assert counter["samples"] == 0, "the resumed run reads the buffer's saved state"
    a = torch.load(tmp_path / "full/student.pth")
    b = torch.load(tmp_path / "killed/student.pth")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "killed").glob("knowledge-state-e*.kcdk"))) == 1
    assert resumed["teacher_passes"] == resumed["num_train"]


@pytest.mark.parametrize("storage", ["dense", "topk"])
def test_cached_mode_mixes_the_buffer_with_each_plans_pairs(tmp_path, digits_teacher, monkeypatch, storage):
    """At each stage end the buffer's soft labels are mixed with that plan's (K1L, K0, eps), Eq. 14,
    against the float64 reference mix (dense) or the top-k reference mix."""
    from kcd_fast import reference as R
    from kcd_fast.knowledge import KnowledgeBuffer

    plans, mixes = [], []
    real_end, real_mix = KnowledgeCondenser.end_epoch, KnowledgeBuffer.mix_

    def end_epoch(self, epoch):
        plan = real_end(self, epoch)
        if plan is not None:
            plans.append(plan)
        return plan

    def mix_(self, k1l, k0, eps):
        before = self.state_dict()["arrays"]  # copies: (probs,) or (values, classes), then filled
        real_mix(self, k1l, k0, eps)
        after = self.state_dict()["arrays"]
        mixes.append((k1l.clone(), k0.clone(), eps.clone(), before, after, self.num_classes))

    monkeypatch.setattr(KnowledgeCondenser, "end_epoch", end_epoch)
    monkeypatch.setattr(KnowledgeBuffer, "mix_", mix_)
    M.main(args_of("--knowledge", "cached", "--storage", storage, "--topk", "3", "--teacher-weights",
                   str(digits_teacher), "--output-dir", str(tmp_path / "m"), *QUICK))
    assert len(plans) == len(mixes) == 2
    for plan, (k1l, k0, eps, before, after, c) in zip(plans, mixes):
        assert k1l.numel() > 0
        assert torch.equal(k1l, plan.k1l) and torch.equal(k0, plan.k0) and torch.equal(eps, plan.eps)
        if storage == "dense":
            expected = R.vaks_mix(before[0].double(), k1l, k0, eps.double())
            torch.testing.assert_close(after[0].double(), expected, atol=1e-3, rtol=1e-3)
        else:
            ref_v, ref_c = R.vaks_mix_topk(before[0].double(), before[1], k1l, k0, eps.double(), c)
            torch.testing.assert_close(R.topk_decode(after[0].double(), after[1], c), R.topk_decode(ref_v, ref_c, c),
                                       atol=2e-3, rtol=2e-3)


def test_fake_on_device_one_off_pass_reads_the_images_the_student_trains_on(tmp_path):
    from kcd_fast.data import build_datasets
    from kcd_fast.knowledge import KnowledgeBuffer

    kfile, out = tmp_path / "f.kcdk", tmp_path / "o"
    M.main(args_of("--dataset", "fake", "--fake-on-device", "--fake-size", "96", "--fake-val-size", "32",
                   "--fake-image-size", "8", "--teacher", "cnn_small", "--student", "cnn_small", "--teacher-epochs",
                   "1", "--knowledge", "cached", "--knowledge-fill", "pass", "--knowledge-file", str(kfile),
                   "--output-dir", str(out), *QUICK, "--epochs", "1", "--stage-epochs", "1"))
    (tpath,) = out.glob("teacher-*.pth")
    teacher = build_model("cnn_small", 10, 3)
    teachers.load_weights(teacher, str(tpath), 10)
    x, _ = build_datasets("fake", fake_size=96, fake_val_size=32, fake_image_size=8, fake_num_classes=10,
                          seed=0).train.materialize("cpu")
    expected = KnowledgeBuffer(96, 10, temperature=4.0)
    expected.write(torch.arange(96), teacher.eval()(x))
    torch.testing.assert_close(KnowledgeBuffer.load(kfile).probs.float(), expected.probs.float(), atol=1e-3,
                               rtol=1e-3)


def test_fake_on_device_runs_and_mixes_on_the_device(tmp_path):
    summary = M.main(args_of("--dataset", "fake", "--fake-on-device", "--fake-size", "512", "--fake-image-size", "8",
                             "--teacher", "cnn_small", "--student", "cnn_small", "--teacher-epochs", "1",
                             "--output-dir", str(tmp_path / "f"), *QUICK))
    assert summary["num_train"] == 512 and summary["C"] < 1.0
    # The condenser's own measured cost counts the device loader's batches too.
    assert summary["stages"] and all(st["C_so_far"] > 0.5 for st in summary["stages"])
    # The device loader mixes K1L inputs with their partners like KCDDataset does.
    from kcd_fast import KnowledgeCondenser, vaks_mix_

    cond = KnowledgeCondenser(20, epochs=1, stage_epochs=1, rho=0.5)
    cond.values.copy_(torch.rand(20))
    cond.counts.fill_(1)
    cond.end_epoch(0)
    x = torch.rand(20, 1, 2, 2)
    batches = loaders.DeviceBatches(x, torch.zeros(20, dtype=torch.long), cond.sampler(shuffle=False), 7, cond)
    mixed = x.clone()
    vaks_mix_(mixed.view(20, -1), *cond.pairs)
    for xb, _, i in batches:
        torch.testing.assert_close(xb, mixed[i])
    # Resident channels_last (as the trainer stores it on CUDA): the batches come out channels_last, so the
    # step's conversion copies nothing, and hold the same values, mixed alike.
    x_cl = torch.rand(20, 3, 2, 2)
    mixed = x_cl.clone()
    vaks_mix_(mixed.view(20, -1), *cond.pairs)
    batches = loaders.DeviceBatches(x_cl.contiguous(memory_format=torch.channels_last), torch.zeros(20, dtype=torch.long),
                              cond.sampler(shuffle=False), 7, cond)
    for xb, _, i in batches:
        assert xb.is_contiguous(memory_format=torch.channels_last) and not xb.is_contiguous()
        assert xb.to(memory_format=torch.channels_last).data_ptr() == xb.data_ptr()
        torch.testing.assert_close(xb, mixed[i])


def test_one_off_pass_uses_the_evaluation_view_of_the_training_subset(tmp_path, digits_teacher, capsys):
    from kcd_fast.data import build_datasets, eval_view
    from kcd_fast.knowledge import KnowledgeBuffer

    kfile = tmp_path / "sub.kcdk"
    M.main(args_of("--knowledge", "cached", "--knowledge-fill", "pass", "--knowledge-file", str(kfile),
                   "--train-subset", "300", "--teacher-weights", str(digits_teacher),
                   "--output-dir", str(tmp_path / "o"), *QUICK))
    teacher = build_model("cnn_large", 10, 1)
    teachers.load_weights(teacher, str(digits_teacher), 10)
    expected = KnowledgeBuffer(300, 10, temperature=4.0)
    expected.fill(teacher.eval(), loaders.subset(eval_view(build_datasets("digits")), 300, 0), batch_size=64)
    got = KnowledgeBuffer.load(kfile)
    torch.testing.assert_close(got.probs.float(), expected.probs.float(), atol=1e-3, rtol=1e-3)
    # The subset drawn with another --seed is other samples: the file is refused for it, not reused.
    assert got.samples.startswith("digits, 300 samples, ")
    reuse = ["--knowledge", "cached", "--knowledge-file", str(kfile), "--train-subset", "300",
             "--output-dir", str(tmp_path / "r"), *QUICK]
    assert M.cli([*reuse, "--seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "another dataset, subset or seed" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "summary.json").exists()


# --------------------------------------------------------------------------- options that do not apply


@pytest.mark.parametrize("argv, expected", [
    ([], []),
    (["--no-kcd", "--rho", "0.5", "--no-vaks", "--stage-epochs", "3"],
     ["--stage-epochs 3: it applies to KCD, which --no-kcd turns off",
      "--rho 0.5: it applies to KCD, which --no-kcd turns off",
      "--no-vaks: it applies to KCD, which --no-kcd turns off"]),
    (["--no-vaks", "--eps-max", "0.2", "--k0", "all", "--rho", "0.5"],
     ["--eps-max 0.2: it applies to VAKS, which --no-vaks turns off",
      "--k0 all: it applies to VAKS, which --no-vaks turns off"]),
    (["--selection", "random", "--alpha", "0.1", "--no-online-recording", "--eps-max", "0.2"],
     ["--alpha 0.1: it applies to --selection kcd (random ranks at random)",
      "--no-online-recording: it applies to --selection kcd (random ranks at random)"]),
    (["--condensed", "c.pt", "--rho", "0.5", "--no-vaks"],
     ["--rho 0.5: it applies to condensing, which --condensed replaces by the file's fixed set and pairs",
      "--no-vaks: it applies to condensing, which --condensed replaces by the file's fixed set and pairs"]),
    (["--storage", "topk", "--knowledge-fill", "pass"],
     ["--storage topk: it applies to --knowledge cached", "--knowledge-fill pass: it applies to --knowledge cached"]),
    (["--knowledge", "cached", "--topk", "5"], ["--topk 5: it applies to --storage topk"]),
    (["--protocol", "official", "--schedule", "linear", "--k0", "all", "--rho", "0.5"],
     ["--schedule linear: it applies to --protocol paper (the official protocol makes its own schedule, record, "
      "pairs and eps)",
      "--k0 all: it applies to --protocol paper (the official protocol makes its own schedule, record, pairs and "
      "eps)"]),
    (["--no-kcd", "--protocol", "official"], ["--protocol official: it applies to KCD, which --no-kcd turns off"]),
    (["--knowledge", "cached", "--storage", "topk", "--topk", "5"], []),
    (["--dkd-beta", "4", "--kd-weight", "0.5"], ["--dkd-beta 4.0: it applies to --distill dkd"]),
    (["--distill", "dkd", "--dkd-beta", "4", "--kd-weight", "0.5"], ["--kd-weight 0.5: it applies to --distill kd"]),
    (["--fake-size", "10", "--download", "--data-dir", "d"],
     ["--data-dir d: it applies to the datasets read from a folder (fashion-mnist, cifar100, imagenet)",
      "--download: it applies to --dataset cifar100", "--fake-size 10: it applies to --dataset fake"]),
    (["--teacher-weights", "t.pth", "--teacher-epochs", "3"],
     ["--teacher-epochs 3: it applies to a teacher trained here (digits, fashion-mnist, fake without "
      "--teacher-weights or a filled --knowledge-file)"]),
    (["--teacher-epochs", "3"], []),
    (["--lr-scheduler", "cosine", "--lr-milestones", "10", "20"],
     ["--lr-milestones 10 20: it applies to --lr-scheduler multistep"]),
    (["--lr-milestones", "--lr-gamma", "0.5"], ["--lr-gamma 0.5: it applies to --lr-milestones, of which none are given"]),
    (["--dataset", "fake", "--fake-on-device", "--teacher-weights", "t.pth", "--workers", "2"],
     ["--workers 2: it applies to data loaders, which --fake-on-device does without"]),
    (["--dataset", "fake", "--fake-on-device", "--workers", "2"], []),  # the teacher trained here uses a loader
    (["--test-only", "--student-weights", "s.pth", "--epochs", "7", "--no-kcd", "--amp", "bf16", "--workers", "1"],
     ["--epochs 7: it applies to training, which --test-only skips",
      "--no-kcd: it applies to training, which --test-only skips"]),
])
def test_options_that_do_not_apply_are_named(argv, expected):
    assert options.ignored_options(args_of(*argv)) == expected


def test_a_run_says_which_options_it_ignores_and_lists_them(tmp_path, digits_teacher, capsys):
    summary = M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK,
                             "--no-kcd", "--rho", "0.5", "--storage", "topk"))
    out = capsys.readouterr().out
    assert "kcd_fast: note: ignoring --rho 0.5: it applies to KCD, which --no-kcd turns off" in out
    assert "kcd_fast: note: ignoring --storage topk: it applies to --knowledge cached" in out
    on_disk = json.loads((tmp_path / "o/summary.json").read_text())
    assert on_disk["ignored_options"] == summary["ignored_options"] and len(summary["ignored_options"]) == 3
    # What the defaults fill in (--stage-epochs here) is not the user's setting: nothing to say.
    assert M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "p"),
                          "--no-progress", "--no-plots", "--epochs", "1", "--no-kcd"))["ignored_options"] == []


# --------------------------------------------------------------------------- --test-only


def test_test_only_evaluates_the_given_models_and_writes_nothing(tmp_path, digits_teacher, capsys):
    from kcd_fast.data import build_datasets

    student = build_model("cnn_small", 10, 1)
    # A checkpoint as DDP saves it (a "model" dict whose keys carry "module."), as checkpoint.pth holds it.
    torch.save({"model": {f"module.{k}": v for k, v in student.state_dict().items()}, "epoch": 3},
               tmp_path / "s.pth")
    capsys.readouterr()
    res = M.main(args_of("--test-only", "--student-weights", str(tmp_path / "s.pth"), "--teacher-weights",
                         str(digits_teacher), "--output-dir", str(tmp_path / "o")))
    out = capsys.readouterr().out
    assert not (tmp_path / "o").exists()
    val = build_datasets("digits").val
    cfg = argparse.Namespace(eval_batch_size=100, workers=0, amp="off", device="cpu")  # another batching, same numbers
    expected = engine.evaluate(student, val, cfg, torch.device("cpu"), local=True)
    assert res["student"]["top1"] == pytest.approx(expected["top1"])
    assert res["student"]["loss"] == pytest.approx(expected["loss"])
    # The teacher's top-1 is the one recorded when it was trained (same data, same transform).
    assert res["teacher"]["top1"] == pytest.approx(torch.load(digits_teacher, weights_only=False)["top1"])
    assert res["num_val"] == len(val) == 360
    assert f"kcd_fast: teacher cnn_large ({digits_teacher}) on the digits validation set (360 samples): top-1 " in out
    assert f"kcd_fast: student cnn_small ({tmp_path / 's.pth'}) on the digits validation set" in out


@pytest.mark.parametrize("argv, named", [
    (["--test-only"], "--test-only needs a model to evaluate"),
    (["--test-only", "--student-weights", "/nonexistent/s.pth"], "--student-weights /nonexistent/s.pth: no such file"),
    (["--test-only", "--resume", "--student-weights", "s.pth"], "pass --student-weights OUTPUT_DIR/checkpoint.pth"),
    (["--student-weights", "s.pth"], "--student-weights applies to --test-only"),
])
def test_test_only_bad_input_exits_2(tmp_path, capsys, argv, named):
    code = M.cli([*argv, "--output-dir", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_test_only_refuses_weights_of_another_architecture(tmp_path, capsys):
    torch.save(build_model("cnn_large", 10, 1).state_dict(), tmp_path / "big.pth")
    code = M.cli(["--test-only", "--student-weights", str(tmp_path / "big.pth"), "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and f"--student-weights {tmp_path / 'big.pth'} does not fit --student cnn_small" in err
    assert "missing features.9.weight, features.9.bias, features.9.running_mean and 2 more" in err
    assert len(err) < 600, "a few keys and counts, not the whole state_dict"


def test_test_only_names_the_architecture_a_trained_teacher_file_holds(tmp_path, digits_teacher, capsys):
    # A teacher the trainer trained records its architecture: a wrong --student is told which one it holds.
    code = M.cli(["--test-only", "--student-weights", str(digits_teacher), "--epochs", "7"])
    err = capsys.readouterr().err
    assert code == 2 and "(the file says it holds a cnn_large: pass --student cnn_large)" in err
    assert M.cli(["--test-only", "--student-weights", str(digits_teacher), "--student", "cnn_large", "--epochs",
                  "7"]) == 0, "--epochs 7 (with T = 5) is a training setting: not checked by --test-only"


# --------------------------------------------------------------------------- a new run in an old --output-dir


def test_a_new_run_refuses_a_folder_holding_an_unfinished_run(tmp_path, digits_teacher, monkeypatch, capsys):
    common = ["--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK]
    killed = _killed_at_evaluate(monkeypatch, 3)  # epochs 1 and 2 checkpointed, epoch 3 trained and not
    with pytest.raises(killed):
        M.main(args_of(*common))
    monkeypatch.undo()
    ckpt = tmp_path / "o/checkpoint.pth"
    before = ckpt.read_bytes()
    capsys.readouterr()
    assert M.cli(common) == 2  # forgot --resume: two epochs of work would be overwritten
    err = capsys.readouterr().err
    assert f"--output-dir {tmp_path / 'o'} holds an unfinished run (checkpoint.pth after epoch 2 of 4): continue it " \
           f"with --resume" in err
    assert ckpt.read_bytes() == before
    assert M.cli([*common, "--resume"]) == 0


def test_a_new_run_replaces_a_finished_runs_outputs_and_keeps_its_inputs(tmp_path, digits_teacher, capsys):
    out = tmp_path / "o"
    common = ["--teacher-weights", str(digits_teacher), "--output-dir", str(out), "--no-progress", "--epochs", "4",
              "--stage-epochs", "2"]
    M.main(args_of(*common))
    assert (out / "plots/accuracy_kept.png").is_file() and (out / "condensed.pt").is_file()
    (out / "teacher-0123456789.pth").write_bytes(b"a cached teacher")
    (out / "notes.txt").write_text("the user's own file")
    (out / "plots/figure1.png").write_bytes(b"the user's own plot")
    finished = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    capsys.readouterr()
    # A new run that fails its checks (a teacher file that does not fit) leaves the folder as it was.
    assert M.cli([*common, "--teacher-weights", str(out / "student.pth")]) == 2
    assert {f: f.read_bytes() for f in out.rglob("*") if f.is_file()} == finished
    capsys.readouterr()
    # Fig. 4 in the same folder: train on the condensed set the first run left there, without plots.
    before = torch.load(out / "condensed.pt")
    M.main(args_of(*common, "--condensed", str(out / "condensed.pt"), "--no-plots"))
    assert re.search(r"held a finished run; its \d+ output file\(s\) are replaced by this run's \(the teacher "
                     r"trained there is kept\)", capsys.readouterr().out)
    assert not (out / "plots/accuracy_kept.png").exists(), "the old run's plot would sit beside the new run"
    assert (out / "condensed.pt").is_file() and (out / "teacher-0123456789.pth").is_file()
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "plots/figure1.png").read_bytes() == b"the user's own plot"
    after = torch.load(out / "condensed.pt")  # rewritten by the run: the same set, described as its file was
    assert (after["stage"], after["tau"]) == (before["stage"], before["tau"]) == (1, 0.7)
    assert torch.equal(after["keep"], before["keep"]) and torch.equal(after["k1l"], before["k1l"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["args"]["condensed"] == str(out / "condensed.pt")
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4


# --------------------------------------------------------------------------- learning-rate schedules


def _lrs(args, epochs, state=None, start=0):
    """The learning rate each epoch trains at, from build_scheduler, optionally resumed at ``start``."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.lr)
    sched = engine.build_scheduler(opt, args)
    if state is not None:
        opt.load_state_dict(state[0])
        sched.load_state_dict(state[1])
    seen, saved = [], None
    for epoch in range(start, epochs):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        if epoch == 3:  # the checkpoint after epoch 3
            saved = (opt.state_dict(), sched.state_dict())
    return seen, saved


@pytest.mark.parametrize("argv", [
    [],
    ["--lr-warmup-epochs", "2"],
    ["--lr-warmup-epochs", "3", "--lr-warmup-decay", "0.1", "--lr-milestones", "5", "8"],
    ["--lr-scheduler", "cosine"],
    ["--lr-scheduler", "cosine", "--lr-min", "0.001", "--lr-warmup-epochs", "2"],
])
def test_lr_schedules_follow_their_closed_form_and_resume(argv):
    import math

    args = config.resolve(args_of("--epochs", "10", "--stage-epochs", "5", "--lr", "0.1", "--lr-milestones", "4", "7",
                                   *argv))
    warm, decay, lr = args.lr_warmup_epochs, args.lr_warmup_decay, args.lr

    def expected(e):
        if e < warm:  # linear from lr * decay, reaching lr at epoch `warm`
            return lr * (decay + (1 - decay) * e / warm)
        if args.lr_scheduler == "cosine":
            return args.lr_min + (lr - args.lr_min) * (1 + math.cos(math.pi * (e - warm) / (10 - warm))) / 2
        return lr * args.lr_gamma ** sum(e >= m for m in args.lr_milestones)

    seen, state = _lrs(args, 10)
    assert seen == pytest.approx([expected(e) for e in range(10)], rel=1e-9, abs=1e-12)
    resumed, _ = _lrs(args, 10, state=state, start=4)  # a run resumed after epoch 3
    assert resumed == pytest.approx(seen[4:], rel=1e-12)


@pytest.mark.parametrize("argv, named", [
    (["--lr-warmup-epochs", "4"], "--lr-warmup-epochs must be an int in [0, --epochs) = [0, 4)"),
    (["--lr-warmup-epochs", "-1"], "--lr-warmup-epochs must be"),
    (["--lr-warmup-epochs", "1", "--lr-warmup-decay", "0"], "--lr-warmup-decay must be in (0, 1]"),
    (["--lr-scheduler", "cosine", "--lr-min", "1"], "--lr-min must be in [0, --lr] = [0, 0.05]"),
    (["--lr-warmup-epochs", "3", "--lr-milestones", "2", "3"], "--lr-milestones must be after the warm-up"),
])
def test_bad_lr_schedules_exit_2_before_any_work(tmp_path, capsys, argv, named):
    code = M.cli([*QUICK, *argv, "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_a_cosine_run_logs_the_rates_it_trained_at(tmp_path, digits_teacher):
    M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK,
                   "--lr-scheduler", "cosine", "--lr-warmup-epochs", "1", "--lr", "0.1"))
    rows = [json.loads(x) for x in (tmp_path / "o/metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([0.001, 0.1, 0.075, 0.025])


# --------------------------------------------------------------------------- torchvision's teachers


def _fake_weights() -> tuple[bytes, str]:
    """The file a fake download serves (a random torchvision resnet18's state_dict) and its sha256 prefix,
    which stands for the one in the real file's name."""
    import io

    import torchvision

    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), buf)
    return buf.getvalue(), hashlib.sha256(buf.getvalue()).hexdigest()[:8]


def _fake_hub(monkeypatch, tmp_path, fail=None):
    """torch.hub with its cache in tmp_path and a download that serves _fake_weights (or raises
    ``fail``): no network in tests. Returns the list of downloads asked for."""
    data, digest = _fake_weights()
    calls = []
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(teachers, "expected_sha256_prefix", lambda path: digest)

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        if fail is not None:
            raise fail
        Path(dst).write_bytes(data)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    return calls


def test_the_expected_hash_is_read_from_torch_hubs_file_name():
    assert teachers.expected_sha256_prefix("/x/checkpoints/resnet18-f37072fd.pth") == "f37072fd"
    assert teachers.expected_sha256_prefix("/x/mine.pth") is None


def test_imagenet_teachers_default_to_torchvisions_weights(tmp_path, monkeypatch):
    _fake_hub(monkeypatch, tmp_path)
    args = config.resolve(args_of("--dataset", "imagenet"))
    assert args.teacher == "resnet34" and args.teacher_weights == str(tmp_path / "hub/checkpoints/resnet34-b627a593.pth")
    assert args.torchvision_weights == {"name": "ResNet34_Weights.IMAGENET1K_V1",
                                        "url": "https://download.pytorch.org/models/resnet34-b627a593.pth",
                                        "path": args.teacher_weights, "top1": 73.314}
    assert config.resolve(args_of("--dataset", "imagenet", "--teacher-weights", "torchvision", "--teacher",
                                   "resnet50")).teacher_weights.endswith("resnet50-0676ba61.pth")
    # Only ImageNet defaults to them, and a file given is used as it is.
    assert config.resolve(args_of("--dataset", "fake")).teacher_weights is None
    t = tmp_path / "t.pth"
    t.write_bytes(b"")
    assert config.resolve(args_of("--dataset", "imagenet", "--teacher-weights", str(t))).teacher_weights == str(t)
    # A file that is not there is named, whatever its name.
    with pytest.raises(config.UserError, match="typo.pth: no such file"):
        config.resolve(args_of("--dataset", "imagenet", "--teacher-weights", str(tmp_path / "typo.pth")))
    # The config is read-only: a changed setting is a new config.
    with pytest.raises(AttributeError, match="read-only"):
        args.teacher_weights = str(t)
    assert args.replace(teacher_weights=str(t)).teacher_weights == str(t) != args.teacher_weights


def test_torchvision_weights_are_downloaded_once_and_scored(tmp_path, monkeypatch, capsys):
    calls = _fake_hub(monkeypatch, tmp_path)
    argv = ["--dataset", "fake", "--fake-num-classes", "1000", "--fake-size", "8", "--fake-val-size", "12",
            "--fake-image-size", "32", "--teacher", "resnet18", "--teacher-weights", "torchvision", "--test-only",
            "--no-progress", "--output-dir", str(tmp_path / "o")]
    first = M.main(args_of(*argv))
    path = tmp_path / "hub/checkpoints/resnet18-f37072fd.pth"
    # torch.hub.load_state_dict_from_url(check_hash=True) passes the prefix of the file's name to the download.
    assert calls == [("https://download.pytorch.org/models/resnet18-f37072fd.pth", str(path), "f37072fd")]
    assert "downloading torchvision's ResNet18_Weights.IMAGENET1K_V1 (69.758% top-1)" in capsys.readouterr().out
    assert M.main(args_of(*argv)) == first and len(calls) == 1, "the cached file is used"
    assert first["teacher"]["weights"] == str(path)
    model = build_model("resnet18", 1000, 3)
    model.load_state_dict(torch.load(path))
    from kcd_fast.data import build_datasets

    val = build_datasets("fake", fake_size=8, fake_val_size=12, fake_image_size=32, fake_num_classes=1000).val
    cfg = argparse.Namespace(eval_batch_size=5, workers=0, amp="off", device="cpu")
    assert first["teacher"]["loss"] == pytest.approx(engine.evaluate(model, val, cfg, torch.device("cpu"),
                                                                 local=True)["loss"])


def test_a_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch, capsys):
    import urllib.error

    _fake_hub(monkeypatch, tmp_path, fail=urllib.error.URLError("no network"))
    code = M.cli(["--dataset", "fake", "--fake-num-classes", "1000", "--teacher", "resnet18", "--teacher-weights",
                  "torchvision", "--test-only", "--no-progress"])
    err = capsys.readouterr().err
    path = tmp_path / "hub/checkpoints/resnet18-f37072fd.pth"
    assert code == 2 and "could not download https://download.pytorch.org/models/resnet18-f37072fd.pth" in err
    assert f"to {path} (URLError: <urlopen error no network>); put that file there, or pass --teacher-weights PATH" \
        in err and "Traceback" not in err
    assert not path.exists()


def test_a_new_run_in_a_folder_without_a_checkpoint_deletes_nothing(tmp_path, digits_teacher, capsys):
    out = tmp_path / "u"
    (out / "plots").mkdir(parents=True)
    mine = {out / "summary.json": b"{}", out / "student.pth": b"mine", out / "plots/accuracy_kept.png": b"mine"}
    for f, data in mine.items():
        f.write_bytes(data)
    M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(out), *QUICK, "--epochs", "1",
                   "--stage-epochs", "1", "--no-kcd"))
    assert "held a finished run" not in capsys.readouterr().out
    assert (out / "plots/accuracy_kept.png").read_bytes() == b"mine"  # --no-plots: not replaced either


def test_condensed_needs_no_stage_length(tmp_path, digits_teacher, capsys):
    out = tmp_path / "a"
    M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(out), *QUICK))
    # digits' T = 5 does not divide 4 epochs; a fixed condensed set has no stages, so that is fine.
    summary = M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "b"),
                             "--no-progress", "--no-plots", "--epochs", "4", "--condensed", str(out / "condensed.pt")))
    assert summary["ignored_options"] == [] and summary["C_predicted"] is None
    assert "ignoring" not in capsys.readouterr().out


def test_a_checkpoint_another_version_wrote_is_refused_in_one_line(tmp_path, digits_teacher, monkeypatch, capsys):
    common = ["--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK,
              "--epochs", "4", "--stage-epochs", "2"]
    killed = _killed_at_evaluate(monkeypatch, 3)
    with pytest.raises(killed):
        M.main(args_of(*common))
    monkeypatch.undo()
    intact = (tmp_path / "o/checkpoint.pth").read_bytes()
    ckpt = torch.load(tmp_path / "o/checkpoint.pth", weights_only=False)
    del ckpt["args"]["lr_scheduler"], ckpt["samples"]  # as a checkpoint of a version without these options
    torch.save(ckpt, tmp_path / "o/checkpoint.pth")
    capsys.readouterr()
    assert M.cli([*common, "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("lacks samples, args.lr_scheduler: it was written by another version of kcd_fast; start a "
                        "new run without --resume") and len(err.splitlines()) == 1, err
    (tmp_path / "o/checkpoint.pth").write_bytes(intact)
    assert M.cli([*common, "--resume"]) == 0


def test_an_unfinished_run_of_kcd_fast_0_1_0_resumes(tmp_path):
    """tests/data/unfinished-run holds a digits run of kcd_fast 0.1.0 stopped after its first epoch
    (checkpoint.pth, the teacher it trained, metrics.jsonl), written by the single-file trainer this
    package replaced: it resumes, keeps that epoch's record, and finishes the schedule."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(Path(__file__).parent / "data/unfinished-run", out)
    before = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = M.main(args_of("--teacher", "cnn_small", "--teacher-epochs", "1", "--epochs", "4", "--stage-epochs",
                             "2", "--no-progress", "--no-plots", "--output-dir", str(out), "--resume"))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and rows[0] == before[0]
    assert summary["epochs"] == 4 and len(summary["stages"]) == 2 and summary["C"] < 1.0


def _torchvision_worker(rank, port, out_dir, fail):
    """One torchrun rank of --test-only with --teacher-weights torchvision, sharing one hub cache; the
    download (faked: no network) takes a second, and fails if ``fail``."""
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.hub.get_dir = lambda: str(Path(out_dir) / "hub")
    data, digest = _fake_weights()
    teachers.expected_sha256_prefix = lambda path: digest

    def download(url, dst, hash_prefix=None, progress=True):
        time.sleep(1.0)
        if fail:
            raise OSError("no network")
        Path(dst).write_bytes(data)
        Path(out_dir, "downloaded").write_text(f"{rank} {time.time()}")

    torch.hub.download_url_to_file = download
    real_load = teachers.load_weights

    def load(*a, **k):  # when each rank reads the file
        Path(out_dir, f"load{rank}").write_text(str(time.time()))
        return real_load(*a, **k)

    teachers.load_weights = load
    code = M.cli(["--dataset", "fake", "--fake-num-classes", "1000", "--fake-size", "8", "--fake-val-size", "10",
                  "--teacher", "resnet18", "--teacher-weights", "torchvision", "--test-only", "--device", "cpu",
                  "--no-progress"])
    Path(out_dir, f"rank{rank}.code").write_text(str(code))


@pytest.mark.parametrize("fail", [False, True])
def test_torchrun_downloads_torchvisions_teacher_once_per_node(tmp_path, fail):
    torch.multiprocessing.spawn(_torchvision_worker, nprocs=2, join=True,
                                args=(29537 + fail, str(tmp_path), fail))
    codes = [(tmp_path / f"rank{r}.code").read_text() for r in range(2)]
    if fail:  # every rank ends, with exit code 2: none waits for the others forever
        assert codes == ["2", "2"] and not (tmp_path / "hub/checkpoints/resnet18-f37072fd.pth").exists()
        return
    assert codes == ["0", "0"]
    who, done = (tmp_path / "downloaded").read_text().split()
    assert who == "0" and float((tmp_path / "load1").read_text()) >= float(done), "rank 1 read before the download"


def test_a_cached_file_that_is_not_torchvisions_is_named(tmp_path, monkeypatch, capsys):
    calls = _fake_hub(monkeypatch, tmp_path)
    path = tmp_path / "hub/checkpoints/resnet18-f37072fd.pth"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    code = M.cli(["--dataset", "fake", "--fake-num-classes", "1000", "--teacher", "resnet18", "--teacher-weights",
                  "torchvision", "--test-only", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and calls == [] and f"{path} is not torchvision's file (its sha256 does not start with " \
                                          f"{_fake_weights()[1]}); delete it to download it again" in err


IMAGENET1K_WNIDS = (Path(__file__).parent / "data/imagenet1k_wnids.txt").read_text().split()


@pytest.mark.parametrize("classes, named", [
    ([f"class{i}" for i in range(10)], "the dataset has 10"),
    ([f"class{i}" for i in range(1000)], "must be ImageNet's wnids"),
    # What a converter that invents the wnids it lacks makes: the right pattern, the wrong classes.
    (IMAGENET1K_WNIDS[:50] + [f"n{1440764 + i:08d}" for i in range(50, 1000)], "are wnids, but not ImageNet-1k's"),
    (IMAGENET1K_WNIDS[:-1] + ["n15075142"], "are wnids, but not ImageNet-1k's"),
])
def test_torchvisions_teacher_needs_imagenets_classes(tmp_path, monkeypatch, capsys, classes, named):
    from kcd_fast.data import DataBundle

    calls = _fake_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(M, "build_datasets", lambda *a, **k: DataBundle(
        train=None, val=type("Folder", (), {"classes": classes, "__len__": lambda self: 1})(),
        num_classes=len(classes), in_channels=3, image_size=224, name="imagenet"))
    code = M.cli(["--dataset", "imagenet", "--test-only", "--teacher-weights", "torchvision", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and named in err and calls == [], "refused before any download"


def test_imagenet1ks_own_wnids_pass_the_class_check(tmp_path, monkeypatch):
    assert len(set(IMAGENET1K_WNIDS)) == 1000 and IMAGENET1K_WNIDS[0] == "n01440764"
    calls = _fake_hub(monkeypatch, tmp_path)
    cfg = config.resolve(args_of("--dataset", "imagenet", "--teacher", "resnet18", "--teacher-weights", "torchvision",
                                 "--no-progress")).replace(local_rank=0, rank=0, world_size=1, distributed=False)
    teachers.fetch_torchvision_weights(cfg, IMAGENET1K_WNIDS[::-1])  # any order: ImageFolder sorts them
    assert len(calls) == 1 and os.path.isfile(cfg.teacher_weights)


def test_resuming_with_another_teacher_is_refused(tmp_path, digits_teacher, monkeypatch, capsys):
    common = ["--output-dir", str(tmp_path / "o"), *QUICK]
    killed = _killed_at_evaluate(monkeypatch, 3)
    with pytest.raises(killed):
        M.main(args_of("--teacher-weights", str(digits_teacher), *common))
    monkeypatch.undo()
    other = tmp_path / "other.pth"
    blob = torch.load(digits_teacher, weights_only=False)
    blob["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in blob["model"].items()}
    torch.save(blob, other)
    capsys.readouterr()
    assert M.cli([*common, "--resume", "--teacher-weights", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"distilled {digits_teacher} (sha256 " in err and "resume with the same teacher" in err
    same = tmp_path / "same.pth"  # the same teacher under another path (another TORCH_HOME, say): fine
    same.write_bytes(digits_teacher.read_bytes())
    assert M.cli([*common, "--resume", "--teacher-weights", str(same)]) == 0


def test_a_teacher_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    path = tmp_path / "teacher.pth"
    path.write_bytes(b"a" * 1000)
    opened = []
    monkeypatch.setattr(files, "open", lambda *a, **k: opened.append(a[0]) or open(*a, **k), raising=False)
    full = hashlib.sha256(b"a" * 1000).hexdigest()
    assert file_hash(path, length=None) == full and file_hash(path) == full[:16] and len(opened) == 1
    path.write_bytes(b"b" * 1000)  # the same size: its modification time tells it apart
    os.utime(path, ns=(1, 1))
    assert file_hash(path) == hashlib.sha256(b"b" * 1000).hexdigest()[:16] and len(opened) == 2
    assert file_hash(tmp_path / "missing.pth") == "" and file_hash(None) == ""


def test_a_run_that_stops_before_writing_leaves_no_new_output_dir(tmp_path, capsys):
    torch.save({"model": build_model("cnn_large", 7, 1).state_dict()}, tmp_path / "seven.pth")  # 7 classes, not 10
    for existed in (False, True):
        out = tmp_path / f"new{existed}" / "run"
        if existed:
            out.mkdir(parents=True)  # the user's own empty folder stays
        code = M.cli(["--teacher-weights", str(tmp_path / "seven.pth"), "--output-dir", str(out), *QUICK])
        err = capsys.readouterr().err
        assert code == 2 and "--teacher-weights" in err and "Traceback" not in err, err
        assert out.is_dir() == existed and out.parent.is_dir() == existed


def test_evaluation_shows_progress_like_an_epoch(capsys):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = torch.utils.data.TensorDataset(torch.randn(10, 4), torch.arange(10) % 3)
    args = argparse.Namespace(eval_batch_size=3, workers=0, rank=0, world_size=1, amp="off", progress=False,
                              log_every=2, distributed=False, device="cpu")
    engine.evaluate(model, data, args, torch.device("cpu"))
    lines = [ln.split(" images")[0] for ln in capsys.readouterr().out.splitlines()]
    assert lines == ["eval step 2: 6/10", "eval step 4: 10/10"]


def test_a_knowledge_file_may_go_in_the_output_dir_the_run_creates(tmp_path, digits_teacher):
    out = tmp_path / "new"
    summary = M.main(args_of("--knowledge", "cached", "--knowledge-file", str(out / "teacher.kcdk"),
                             "--teacher-weights", str(digits_teacher), "--output-dir", str(out), *QUICK))
    assert (out / "teacher.kcdk").is_file() and summary["teacher_passes"] == summary["num_train"]
    assert summary["teacher_score"] is None and summary["knowledge_fill_time_s"] == 0.0  # cached: no teacher scoring


def test_shortened_runs_and_options_get_a_note_or_an_error_naming_the_option(tmp_path, digits_teacher, capsys):
    common = ["--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"), *QUICK]
    assert M.cli([*common, "--train-subset", "5000"]) == 2
    assert "--train-subset 5000: the digits training set has only 1437 samples (0: all of them)" in \
        capsys.readouterr().err
    assert M.cli([*common, "--student", "resnet9"]) == 2
    assert "--student resnet9: unknown model; choose one of" in capsys.readouterr().err
    assert M.cli([*common, "--train-subset", "1", "--epochs", "2", "--stage-epochs", "1"]) == 2
    assert "KCD with --rho 0.7, --epochs 2, --stage-epochs 1 on 1 training samples (--train-subset): " \
           "KnowledgeCondenser: `num_samples`=1" in capsys.readouterr().err
    assert M.cli([*common, "--lr-milestones", "3", "9", "--amp", "bf16", "--device", "cpu", "--epochs", "2",
                  "--stage-epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "note: --lr-milestones 3 9 lie at or past --epochs 2: the learning rate drops 2 time(s) fewer" in out
    assert "note: --amp bf16 on the CPU" in out
    # A --teacher-weights teacher is scored at the start in online mode, and the score is kept.
    summary = json.loads((tmp_path / "o/summary.json").read_text())
    assert 0.0 < summary["teacher_score"]["top1"] <= 100.0
    assert f"kcd_fast: teacher cnn_large ({digits_teacher}): top-1 {summary['teacher_score']['top1']:.2f}%" in out


def test_resume_accepts_the_same_condensed_file_by_another_path(tmp_path, digits_teacher, monkeypatch, capsys):
    M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "a"), *QUICK))
    M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "b"), *QUICK,
                   "--rho", "0.5"))
    (tmp_path / "sets").mkdir()
    given = tmp_path / "sets/c.pt"
    given.write_bytes((tmp_path / "a/condensed.pt").read_bytes())
    for out in ("o", "o2"):
        killed = _killed_at_evaluate(monkeypatch, 2)  # epoch 1 checkpointed
        with pytest.raises(killed):
            M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / out), *QUICK,
                           "--condensed", str(given)))
        monkeypatch.undo()
    monkeypatch.chdir(tmp_path / "sets")
    common = ["--teacher-weights", str(digits_teacher), *QUICK, "--resume"]
    assert M.cli([*common, "--output-dir", str(tmp_path / "o"), "--condensed", "c.pt"]) == 0, capsys.readouterr().err
    given.write_bytes((tmp_path / "b/condensed.pt").read_bytes())  # another set under the same name
    assert M.cli([*common, "--output-dir", str(tmp_path / "o2"), "--condensed", str(given)]) == 2
    assert "was made with other settings (--condensed" in capsys.readouterr().err


# --------------------------------------------------------------------------- --protocol official


def test_official_protocol_condenses_after_each_stage_and_mixes_the_pixels(tmp_path, digits_teacher, monkeypatch,
                                                                           capsys):
    """--protocol official: condensations after the 1-based epochs T, 2T, ..., I (the last one's set is
    never trained on), the official drop size, and the plan's pairs mixed into the in-memory pixels
    (not by the loader), persistently."""
    from kcd_fast import official
    from kcd_fast.sampling import KCDDataset

    mixes, datasets = [], []
    real_mix, real_init = official.mix_pixels_, KCDDataset.__init__
    monkeypatch.setattr(official, "mix_pixels_", lambda *a: mixes.append([t.clone() for t in a[1:]]) or real_mix(*a))

    def init(self, dataset, condenser, mix=True):
        datasets.append(mix)
        real_init(self, dataset, condenser, mix)

    monkeypatch.setattr(KCDDataset, "__init__", init)
    summary = M.main(args_of("--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "o"),
                             "--protocol", "official", "--k0", "all", *QUICK, "--epochs", "6", "--stage-epochs", "2"))
    assert "ignoring --k0 all: it applies to --protocol paper" in capsys.readouterr().out
    n, drop = 1437, int(1437 * 0.3 / 6)
    rows = [json.loads(x) for x in (tmp_path / "o/metrics.jsonl").read_text().splitlines()]
    assert [r["condensed"] for r in rows] == [False, True] * 3
    assert [r["samples"] for r in rows] == [n, n, n - drop, n - drop, n - 2 * drop, n - 2 * drop]
    assert [st["kept"] for st in summary["stages"]] == [n - drop, n - 2 * drop, n - 3 * drop]
    assert summary["C"] == pytest.approx(sum(r["samples"] for r in rows) / (6 * n))
    assert datasets == [False], "the loader must not mix again what the pixels hold"
    assert len(mixes) == 3 and all(len(dst) == drop for dst, _, _ in mixes)
    assert all(torch.equal(eps, official.pair_eps(drop)) for _, _, eps in mixes)
    assert len(list((tmp_path / "o").glob("pixels-state-e*.pt"))) == 1


def test_official_protocol_resumes_like_an_uninterrupted_run(tmp_path, digits_teacher, monkeypatch):
    """The official record (one entropy per epoch, float64 sums) and the mixed pixels are part of the
    checkpoint: a run killed after a condensation ends as the uninterrupted one."""
    common = ["--teacher-weights", str(digits_teacher), "--protocol", "official", *QUICK, "--epochs", "6",
              "--stage-epochs", "2"]
    M.main(args_of("--output-dir", str(tmp_path / "full"), *common))
    killed = _killed_at_evaluate(monkeypatch, 4)  # epochs 0-2 checkpointed: after the first condensation
    with pytest.raises(killed):
        M.main(args_of("--output-dir", str(tmp_path / "killed"), *common))
    monkeypatch.undo()
    M.main(args_of("--output-dir", str(tmp_path / "killed"), *common, "--resume"))
    a, b = (torch.load(tmp_path / f"{d}/student.pth") for d in ("full", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(*(torch.load(next((tmp_path / d).glob("pixels-state-e*.pt"))) for d in ("full", "killed")))


def test_official_protocol_runs_in_one_process(tmp_path, digits_teacher):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
           "-m", "kcd_fast.train", "--teacher-weights", str(digits_teacher), "--output-dir", str(tmp_path / "ddp"),
           "--epochs", "2", "--stage-epochs", "1", "--no-progress", "--no-plots", "--device", "cpu",
           "--protocol", "official"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "protocol='official' runs in one process" in res.stderr, res.stderr[-2000:]
