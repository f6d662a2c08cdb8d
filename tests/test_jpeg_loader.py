"""--loader cpu/gpu in the trainer (kcd_fast.train.jpeg_loader): the partner-appending batch sampler, the
batches against today's PIL path and VAKS's mix, reproducible crops, a trainer run, refusals, and the
error a corrupt file gives."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_jpeg import textured

from kcd_fast import crops, jpeg
from kcd_fast.data import IMAGENET_MEAN, IMAGENET_STD, CorruptImageError, build_datasets
from kcd_fast.models import build_model
from kcd_fast.sampling import KeptSampler
from kcd_fast.train import config, jpeg_loader, options
from kcd_fast.train import main as M

ROOT = Path(__file__).resolve().parents[1]
SEED = 5
N = 18  # 3 classes x 6 images
QUICK = ["--no-progress", "--no-plots", "--batch-size", "4", "--eval-batch-size", "4"]


@pytest.fixture
def folder(tmp_path):
    """root/{train,val}/class<c>/img<i>.JPEG: 3 classes x 6 small images of sizes about 40 x 30, and a
    cnn_small teacher for them in root/t.pth."""
    root = tmp_path / "imnet"
    for split in ("train", "val"):
        for c in range(3):
            sub = root / split / f"class{c}"
            sub.mkdir(parents=True)
            for i in range(6):
                pixels = textured(26 + 3 * i, 36 + 2 * c + i, seed=10 * c + i + (split == "val"))
                Image.fromarray(pixels).save(sub / f"img{i}.JPEG", quality=90)
    torch.save({"model": build_model("cnn_small", 3, 3).state_dict()}, root / "t.pth")
    return root


class Condenser:
    """What KeptSampler and PartnerBatches read of a KnowledgeCondenser: the kept set, the seed, and
    the host pairs (``partner_of``: K1L point -> partner, ``eps_of``: its ratio)."""

    def __init__(self, n, kept, partner_of, eps_of, seed=SEED):
        self.seed, self.num_samples = seed, n
        self.kept = torch.tensor(sorted(kept), dtype=torch.int64)
        self.host_partner = torch.full((n,), -1, dtype=torch.int32)
        self.host_eps = torch.zeros(n, dtype=torch.float32)
        for i, j in partner_of.items():
            self.host_partner[i], self.host_eps[i] = j, eps_of[i]

    def kept_indices(self):
        return self.kept

    def count_yielded(self, epoch, count):
        pass

    def sampler(self, rank=0, world_size=1, shuffle=True):
        return KeptSampler(self, rank=rank, world_size=world_size, shuffle=shuffle)


# Kept: 12 of 18; K1L: 4 kept points, two of which share the dropped partner 2.
KEPT = [0, 1, 4, 5, 7, 8, 10, 11, 13, 14, 16, 17]
PARTNER_OF = {1: 2, 8: 2, 11: 9, 16: 15}
EPS_OF = {1: 0.3, 8: 0.25, 11: 0.1, 16: 0.2}


def condenser():
    return Condenser(N, KEPT, PARTNER_OF, EPS_OF)


def chunks(order, size):
    """``order`` in batches of ``size``, a last batch of one joined to the one before."""
    out = [order[s:s + size] for s in range(0, len(order), size)]
    if len(out) > 1 and len(out[-1]) == 1:
        out[-2:] = [out[-2] + out[-1]]
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_partner_batches_append_each_k1l_partner_and_nothing_else(world):
    cond = condenser()
    seen = []
    for rank in range(world):
        sampler = cond.sampler(rank=rank, world_size=world)
        sampler.set_epoch(3)
        batches = list(jpeg_loader.PartnerBatches(sampler, 5, cond.host_partner, cond.host_eps))
        expected = chunks(sampler.indices().tolist(), 5)
        assert len(batches) == len(expected)
        for items, own in zip(batches, expected):
            assert [it.index for it in items[:len(own)]] == own and all(it.own for it in items[:len(own)])
            assert not any(it.own for it in items[len(own):])
            # The partners of this shard's own K1L points, in their order: nothing else.
            assert [it.index for it in items[len(own):]] == [PARTNER_OF[i] for i in own if i in PARTNER_OF]
            for it in items[:len(own)]:
                if it.index in PARTNER_OF:
                    assert items[it.partner_row].index == PARTNER_OF[it.index] and not items[it.partner_row].own
                    assert it.eps == pytest.approx(EPS_OF[it.index], abs=1e-7)
                else:
                    assert it.partner_row == -1
            assert {it.epoch for it in items} == {3}
            seen += own
    assert sorted(seen) == KEPT  # the shards together: every kept point once
    plain = jpeg_loader.PartnerBatches(cond.sampler(), 5)  # --knowledge cached: no partners
    assert all(len(items) == len(own) for items, own in zip(plain, chunks(cond.sampler().indices().tolist(), 5)))


def loader_cfg(**changes):
    base = dict(loader="cpu", seed=SEED, batch_size=5, world_size=1, rank=0, workers=0, device="cpu", amp="off",
                eval_batch_size=4)
    return config.Config(**{**base, **changes})


def pil_item(dataset, epoch, i):
    """Item i of today's ImageNet train split, the global RNG seeded as crop_seed seeds item i."""
    with torch.random.fork_rng():
        torch.manual_seed(crops.crop_seed(SEED, epoch, i))
        return dataset[i][0]


def epoch_batches(cfg, train, cond, epoch, mix=True):
    loader, sampler, _ = jpeg_loader.train_loader(cfg, SimpleNamespace(train=train), cond, mix)
    sampler.set_epoch(epoch)
    return [(x.clone(), y, i) for x, y, i in loader]


@pytest.mark.parametrize("mode", ["cpu", "gpu"])  # gpu: the bytes path, its batched decode run on the CPU
def test_batches_equal_the_pil_path_and_mix_k1l_rows_with_their_partners(folder, mode):
    train = build_datasets("imagenet", folder).train
    cond = condenser()
    batches = epoch_batches(loader_cfg(loader=mode), train, cond, epoch=2)
    order = cond.sampler()
    order.set_epoch(2)
    assert [i.tolist() for _, _, i in batches] == chunks(order.indices().tolist(), 5)  # own rows only
    mixed = 0
    for x, y, index in batches:
        assert x.shape == (len(index), 3, 224, 224) and x.dtype == torch.float32
        assert y.tolist() == [train.targets[i] for i in index.tolist()]
        for row, i in enumerate(index.tolist()):
            mine = pil_item(train, 2, i)
            if i in PARTNER_OF:
                e = EPS_OF[i]
                expected = (1 - e) * mine + e * pil_item(train, 2, PARTNER_OF[i])
                torch.testing.assert_close(x[row], expected, rtol=0, atol=2e-5)
                assert (x[row] - mine).abs().max() > 1e-2  # the mix is visible
                mixed += 1
            else:
                torch.testing.assert_close(x[row], mine, rtol=0, atol=1e-5)
    assert mixed == len(PARTNER_OF)
    unmixed = epoch_batches(loader_cfg(loader=mode), train, cond, epoch=2, mix=False)
    for (x, _, i), (u, _, j) in zip(batches, unmixed):
        assert torch.equal(i, j)
        rows = [r for r, k in enumerate(i.tolist()) if k not in PARTNER_OF]
        assert torch.equal(x[rows], u[rows])


@pytest.mark.parametrize("mode", ["cpu", "gpu"])
def test_batches_prepared_ahead_in_a_thread_equal_the_ones_prepared_in_turn(folder, mode):
    """The thread that prepares batches ahead on CUDA (kcd_fast.train.prefetch), run here on the CPU
    against its slow twin: the same batches, mixes and order, and the epoch it reports files for."""
    train = build_datasets("imagenet", folder).train
    loader, sampler, _ = jpeg_loader.train_loader(loader_cfg(loader=mode, workers=1), SimpleNamespace(train=train),
                                                  condenser(), True)
    sampler.set_epoch(3)
    assert loader.ahead == 0  # the CPU default
    inline = [(x.clone(), y, i) for x, y, i in loader]
    loader.ahead = 2
    threaded = [(x.clone(), y, i) for x, y, i in loader]
    assert len(threaded) == len(inline) > 1 and loader.epoch == 3
    for a, b in zip(inline, threaded):
        assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_crops_do_not_depend_on_workers_and_repeat_after_a_resume(folder):
    train = build_datasets("imagenet", folder).train
    torch.manual_seed(1)
    one = epoch_batches(loader_cfg(workers=0), train, condenser(), epoch=1)
    # Persistent workers through epochs 0 and 1, the global RNG elsewhere.
    loader, sampler, _ = jpeg_loader.train_loader(loader_cfg(workers=2), SimpleNamespace(train=train), condenser(),
                                                  True)
    torch.manual_seed(2)
    runs = {}
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        runs[epoch] = [(x.clone(), y, i) for x, y, i in loader]
    torch.manual_seed(3)
    resumed = epoch_batches(loader_cfg(workers=1), train, condenser(), epoch=1)  # a fresh loader at epoch 1
    for a, b, c in zip(one, runs[1], resumed):
        for u, v, w in zip(a, b, c):
            assert torch.equal(u, v) and torch.equal(u, w)
    assert len(one) == len(runs[1]) == len(resumed)
    first = {int(k): x[r] for x, _, i in runs[0] for r, k in enumerate(i)}
    again = {int(k): x[r] for x, _, i in runs[1] for r, k in enumerate(i)}
    assert not torch.equal(first[0], again[0])  # another epoch, another crop


def test_eval_split_equals_the_pil_eval_transform(folder):
    bundle = build_datasets("imagenet", folder)
    split = jpeg_loader.JpegSplit(bundle.val, loader_cfg())
    got = list(split.batches([4, 0, 17], loader_cfg(), "cpu"))
    assert [i.tolist() for _, _, i in got] == [[4, 0, 17]]
    x, y, _ = got[0]
    for row, i in enumerate([4, 0, 17]):
        torch.testing.assert_close(x[row], bundle.val[i][0], rtol=0, atol=1e-5)
        assert int(y[row]) == bundle.val.targets[i]


def trainer_argv(folder, out, *extra):
    return ["--dataset", "imagenet", "--data-dir", str(folder), "--teacher", "cnn_small", "--student", "cnn_small",
            "--teacher-weights", str(folder / "t.pth"), "--epochs", "2", "--stage-epochs", "1", "--lr-milestones",
            "1", "--output-dir", str(out), *QUICK, *extra]


@pytest.mark.parametrize("knowledge", [["--knowledge", "online"], ["--knowledge", "cached", "--knowledge-fill",
                                                                   "pass"]])
def test_a_kcd_run_with_the_cpu_loader(folder, tmp_path, monkeypatch, knowledge):
    mixed_rows = []

    def mix(x, partner, eps):
        mixed_rows.append(len(x))
        return (1 - eps.view(-1, 1, 1, 1)) * x + eps.view(-1, 1, 1, 1) * partner

    monkeypatch.setattr(jpeg_loader, "mix_inputs", mix)
    argv = trainer_argv(folder, tmp_path / "out", "--loader", "cpu", *knowledge)
    cfg = config.resolve(options.get_args_parser().parse_args(argv))
    assert cfg.loader == "cpu" and cfg.workers == len(os.sched_getaffinity(0))  # --workers unset: the CPUs
    summary = M.main(options.get_args_parser().parse_args(argv))
    assert summary["num_train"] == N and summary["epochs"] == 2 and len(summary["stages"]) == 2
    rows = [json.loads(r) for r in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    # Each epoch passes its kept points once: no partner row reaches a step.
    assert [r["samples"] for r in rows] == [round(r["kept_fraction"] * N) for r in rows]
    assert rows[1]["samples"] < N
    if knowledge[1] == "online":  # the second epoch mixes each K1L point of the first stage once
        assert sum(mixed_rows) == summary["stages"][0]["k1l"] > 0
    else:  # cached knowledge mixes the soft labels: no partners
        assert mixed_rows == []


@pytest.mark.parametrize("mode", ["cpu", "gpu"])  # gpu: the bytes path, its batched decode run on the CPU
def test_files_only_pil_reads_are_counted_and_reported_once_an_epoch(folder, capsys, mode):
    """A PNG behind a .JPEG name (ImageNet has one) is decoded by PIL, in the workers (cpu) or in the
    main process (gpu): each epoch counts it once per batch it is in, as an own row or a partner."""
    png = folder / "train/class0/img3.JPEG"
    Image.open(png).convert("RGB").save(png, "PNG")
    train = build_datasets("imagenet", folder).train
    index = [i for i, (path, _) in enumerate(train.samples) if path == str(png)][0]
    loader, sampler, _ = jpeg_loader.train_loader(loader_cfg(loader=mode), SimpleNamespace(train=train), None, False)
    sampler.set_epoch(4)
    seen = sum(int(index in i.tolist()) for _, _, i in loader)
    assert seen == 1 and loader.fallbacks == 1
    assert "kcd_fast: epoch 5: 1 file(s) of this process's share were decoded by PIL" in capsys.readouterr().out
    png.unlink()  # without it: nothing to report
    train = build_datasets("imagenet", folder).train
    plain = jpeg_loader.train_loader(loader_cfg(loader=mode), SimpleNamespace(train=train), None, False)[0]
    list(plain)
    assert plain.fallbacks == 0 and "decoded by PIL" not in capsys.readouterr().out


def test_loader_choices_that_cannot_run_are_refused_in_one_line(folder, tmp_path, capsys):
    if not torch.cuda.is_available():
        assert M.cli(trainer_argv(folder, tmp_path / "o", "--loader", "gpu")) == 2
        err = capsys.readouterr().err
        assert "--loader gpu" in err and "expected --loader cpu or auto" in err and len(err.strip().splitlines()) == 1
    assert M.cli(["--dataset", "digits", "--loader", "cpu", "--output-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "--loader cpu" in err and "--dataset digits" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    digits = config.resolve(options.get_args_parser().parse_args(["--dataset", "digits"]))
    assert digits.loader == "auto" and digits.workers == 0  # the in-memory datasets keep their loader
    pil = config.resolve(options.get_args_parser().parse_args(trainer_argv(folder, tmp_path / "p", "--loader", "pil")))
    assert pil.workers == min(8, len(os.sched_getaffinity(0)))
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


@pytest.mark.parametrize("damage", ["truncated", "junk"])
def test_a_corrupt_file_gives_the_pil_paths_error(folder, damage):
    bad = folder / "train/class1/img2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200] if damage == "truncated" else b"not an image at all")
    train = build_datasets("imagenet", folder).train
    k = [str(p) for p, _ in train.samples].index(str(bad))
    with pytest.raises(CorruptImageError) as today:
        train[k]
    assert str(bad) in str(today.value)
    for mode in ("cpu", "gpu"):
        cfg = loader_cfg(loader=mode, batch_size=N)
        loader, sampler, _ = jpeg_loader.train_loader(cfg, SimpleNamespace(train=train), None, False)
        with pytest.raises(CorruptImageError) as got:
            list(loader)
        assert str(got.value) == str(today.value)


def test_a_corrupt_file_mid_run_reads_as_with_the_pil_loader(folder, tmp_path, capsys):
    bad = folder / "train/class1/img2.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])
    errors = {}
    for loader in ("pil", "cpu"):
        assert M.cli(trainer_argv(folder, tmp_path / loader, "--loader", loader, "--workers", "1")) == 2
        errors[loader] = capsys.readouterr().err.strip()
    assert errors["cpu"] == errors["pil"] and f"cannot decode the image {bad}" in errors["cpu"]
    assert len(errors["cpu"].splitlines()) == 1 and "Traceback" not in errors["cpu"]


def test_test_only_scores_as_the_pil_path(folder, tmp_path, monkeypatch):
    batches = []
    to_input = jpeg_loader.to_input
    monkeypatch.setattr(jpeg_loader, "to_input", lambda *a, **k: batches.append(a[2]) or to_input(*a, **k))
    model = build_model("cnn_small", 3, 3)
    torch.nn.init.normal_(next(model.parameters()), std=0.5)  # predictions that depend on the pixels
    torch.save({"model": model.state_dict()}, tmp_path / "s.pth")
    scores = {}
    for loader in ("pil", "cpu"):
        argv = ["--dataset", "imagenet", "--data-dir", str(folder), "--test-only", "--student", "cnn_small",
                "--student-weights", str(tmp_path / "s.pth"), "--loader", loader, "--workers", "0", *QUICK]
        scores[loader] = M.main(options.get_args_parser().parse_args(argv))["student"]
        assert sum(map(len, batches)) == (N if loader == "cpu" else 0)  # the JPEG path read every image once
    assert scores["cpu"]["top1"] == scores["pil"]["top1"]
    assert scores["cpu"]["loss"] == pytest.approx(scores["pil"]["loss"], rel=1e-5)


def test_torchrun_two_processes_read_their_own_shards_and_partners(folder, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29547",
           "-m", "kcd_fast.train", *trainer_argv(folder, tmp_path / "ddp", "--loader", "cpu", "--device", "cpu")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["args"]["loader"] == "cpu"
    assert summary["args"]["workers"] == max(len(os.sched_getaffinity(0)) // 2, 1)  # the CPUs, shared by 2
    rows = [json.loads(r) for r in (tmp_path / "ddp/metrics.jsonl").read_text().splitlines()]
    kept = [round(r["kept_fraction"] * N) for r in rows]
    # Both ranks together pass the kept set once an epoch (plus at most one padding sample): no partner rows.
    assert all(k <= r["samples"] <= k + 1 for k, r in zip(kept, rows)) and kept[1] < N


def test_a_resume_notes_another_loader_but_not_another_worker_count(folder, tmp_path, capsys):
    common = trainer_argv(folder, tmp_path / "o", "--epochs", "1", "--stage-epochs", "1")
    assert M.cli([*common, "--loader", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    assert M.cli([*common, "--loader", "cpu", "--workers", "1", "--resume"]) == 0
    assert "instead of" not in capsys.readouterr().out  # the crops do not depend on the workers
    assert M.cli([*common, "--loader", "pil", "--workers", "0", "--resume"]) == 0
    assert "resuming with --loader pil instead of cpu; the data order and augmentation" in capsys.readouterr().out


@pytest.mark.cuda
def test_gpu_batches_on_cuda_match_the_cpu_path(folder):
    """nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: a few levels apart on average (its
    default upsamples 4:2:0 chroma by replication, libjpeg-turbo smoothly: about 2 levels on these small
    textured images); a wrong crop, flip or order is tens of levels off."""
    train = build_datasets("imagenet", folder).train
    cpu = epoch_batches(loader_cfg(loader="cpu"), train, condenser(), epoch=2)
    gpu = epoch_batches(loader_cfg(loader="gpu", device="cuda"), train, condenser(), epoch=2)
    assert len(cpu) == len(gpu)
    level = 1 / 255 / min(IMAGENET_STD)  # one uint8 level in normalised units, at most
    for (x, y, i), (g, z, j) in zip(cpu, gpu):
        assert torch.equal(i, j) and torch.equal(y, z)
        assert g.is_cuda and g.is_contiguous(memory_format=torch.channels_last)
        diff = (g.cpu() - x).abs()
        assert diff.mean() < 4 * level and diff.max() < 32 * level


@pytest.mark.cuda
def test_auto_is_gpu_on_cuda_and_a_kcd_run_trains(folder, tmp_path):
    argv = trainer_argv(folder, tmp_path / "out", "--workers", "1")
    assert config.resolve(options.get_args_parser().parse_args(argv)).loader == "gpu"
    summary = M.main(options.get_args_parser().parse_args(argv))
    assert summary["num_train"] == N and summary["args"]["loader"] == "gpu" and len(summary["stages"]) == 2


@pytest.mark.cuda
def test_the_gpu_path_adds_no_host_sync_per_step(folder):
    """A collated batch of bytes with K1L partners becomes the step's (x, y, index) on the GPU under
    sync-debug mode "error": decode, crops, normalisation and the VAKS mix never wait for the device."""
    train = build_datasets("imagenet", folder).train
    loader, sampler, _ = jpeg_loader.train_loader(loader_cfg(loader="gpu", device="cuda"), SimpleNamespace(train=train),
                                                  condenser(), True)
    sampler.set_epoch(1)
    collated = list(loader.loader)
    assert any(batch[5].numel() for batch in collated)  # some batch mixes K1L rows
    loader.prepare(*collated[0])  # nvjpeg's and the kernels' one-off set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [loader.prepare(*batch) for batch in collated]
        assert loader.ahead == 2  # the CUDA default: a thread prepares them ahead, on a side stream
        streamed = list(loader)  # the same batches through the epoch's iterator
        loader.ahead = 0
        in_turn = list(loader)  # each on a side stream when asked for
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(x.is_cuda and torch.isfinite(x.float()).all() for x, _, _ in out)
    assert len(streamed) == len(in_turn) == len(out)
    for (x, y, i), (a, b, c), (d, e, f) in zip(out, streamed, in_turn):
        assert torch.equal(x, a) and torch.equal(y, b) and torch.equal(i, c)
        assert torch.equal(x, d) and torch.equal(y, e) and torch.equal(i, f)


def test_on_stream_without_cuda_is_the_call_itself():
    calls = []
    out = jpeg.on_stream(None, lambda *b: calls.append(b) or (b[0] + 1, b[1]), torch.tensor(1), "y")
    assert calls == [(torch.tensor(1), "y")] and out == (torch.tensor(2), "y")


def test_workers_hand_uint8_to_a_device_and_normalised_floats_to_a_cpu_run(folder):
    train = build_datasets("imagenet", folder).train
    samples, key = jpeg_loader.folder_samples(train), jpeg_loader.Item(3, 1)
    crop = jpeg_loader.JpegFolderSet(samples, False, SEED)[key][0]
    normalised = jpeg_loader.JpegFolderSet(samples, False, SEED, normalize=True)[key][0]
    assert crop.dtype == torch.uint8 and normalised.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(normalised.double(), (crop.double() / 255 - mean.double()) / std.double(), atol=1e-5)
    cpu_run = jpeg_loader.train_loader(loader_cfg(), SimpleNamespace(train=train), None, False)[0]
    assert next(iter(cpu_run.loader))[0].dtype == torch.float32  # the workers normalised
    assert jpeg_loader.JpegFolderSet(samples, True, SEED, normalize=True)[key][0][0].dtype == torch.uint8  # bytes
