"""KCD in Lightning (KCDCallback) and in a timm-style loop: the callback's run equals the condenser driven
directly, a resumed run equals an uninterrupted one, two DDP ranks keep one condensed set, errors name the
option and change nothing, and the examples run."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from kcd_fast import KnowledgeCondenser
from kcd_fast.integrations import lightning as kcd_lightning

ROOT = Path(__file__).resolve().parents[1]
N_EPOCHS, STAGE, BATCH = 6, 2, 64
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models: on a loaded 2-core machine torch's OpenMP threads spinning against other processes make
    these runs many times slower than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    from kcd_fast.data import build_datasets

    return build_datasets("digits", train_transform=False)  # no random crops: runs repeat exactly


def lightning_pieces():
    """The Lightning side of these tests: a student that returns its logits, and a recorder placed after
    the KCD callback (what each batch carried, and the condensed set after each epoch end)."""
    L = pytest.importorskip("lightning")
    from kcd_fast.integrations.lightning import KCDCallback
    from kcd_fast.models import build_model

    class Student(L.LightningModule):
        def __init__(self, returns="dict"):
            super().__init__()
            torch.manual_seed(0)
            self.net = build_model("cnn_small", 10, 1)
            self.returns = returns

        def training_step(self, batch, batch_idx):
            x, y = batch[0], batch[1]
            logits = self.net(x)
            loss = F.cross_entropy(logits, y)
            return {"loss": loss, "logits": logits} if self.returns == "dict" else loss

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.cross_entropy(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class Recorder(L.Callback):
        def __init__(self, kcd, crash_at=None):
            self.kcd, self.crash_at = kcd, crash_at
            self.batches, self.kept, self.pairs, self.inputs = {}, {}, {}, {}

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == self.crash_at:
                raise RuntimeError("killed")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.batches.setdefault(trainer.current_epoch, []).append((batch[2].clone(), outputs["logits"].clone()))
            self.inputs.setdefault(trainer.current_epoch, []).append(batch[0].clone())

        def on_train_epoch_end(self, trainer, pl_module):
            e = trainer.current_epoch
            self.kept[e] = self.kcd.kept_indices().clone()
            self.pairs[e] = tuple(t.clone() for t in self.kcd.condenser.pairs)

    return L, KCDCallback, Student, Recorder


def fit(digits, *, seed=3, max_epochs=N_EPOCHS, crash_at=None, ckpt=None, ckpt_dir=None, val=False,
        buffers=(), loader=None, returns="dict", **kcd_options):
    """One Lightning run with the callback; returns (trainer, module, callback, recorder)."""
    L, KCDCallback, Student, Recorder = lightning_pieces()
    from lightning.pytorch.callbacks import ModelCheckpoint

    kcd = KCDCallback(len(digits.train), stage_epochs=STAGE, epochs=N_EPOCHS, seed=seed, buffers=buffers,
                      **kcd_options)
    rec = Recorder(kcd, crash_at)
    callbacks = [kcd, rec]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_epochs=1,
                                         save_on_train_epoch_end=not val))
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    if loader is None:
        loader = DataLoader(kcd.dataset(digits.train), batch_size=BATCH, sampler=kcd.sampler())
    module = Student(returns)
    try:
        trainer.fit(module, loader, DataLoader(digits.val, batch_size=256) if val else None, ckpt_path=ckpt)
    except RuntimeError as e:
        if str(e) != "killed":
            raise
    return trainer, module, kcd, rec


# ------------------------------------------------------------------------------------------------
# The callback's run is the condenser's schedule
# ------------------------------------------------------------------------------------------------

def test_lightning_run_equals_the_condenser_driven_directly(digits):
    """Replaying the logits the Lightning run saw into a KnowledgeCondenser driven by hand gives the same batches
    (the callback's sampler is the library's), the same kept set and VAKS pairs at every epoch end, the same
    measured C (also as logged), and the same soft-label buffer mixed in place (Eq. 14)."""
    n = len(digits.train)
    soft = torch.softmax(torch.randn(n, 10, generator=torch.Generator().manual_seed(1)), 1)
    trainer, _, kcd, rec = fit(digits, buffers=[soft])

    direct = KnowledgeCondenser(n, epochs=N_EPOCHS, stage_epochs=STAGE, seed=3)
    sampler, buffer = direct.sampler(), torch.softmax(torch.randn(n, 10, generator=torch.Generator().manual_seed(1)), 1)
    for epoch in range(N_EPOCHS):
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler))
        batches = rec.batches[epoch]
        assert len(batches) == -(-order.numel() // BATCH)  # Lightning re-measured the shrinking epoch
        assert torch.equal(torch.cat([idx for idx, _ in batches]), order)
        for idx, logits in batches:
            direct.observe(idx, logits)
        if direct.end_epoch(epoch) is not None:
            direct.mix_buffer_(buffer)
        assert torch.equal(direct.kept_indices(), rec.kept[epoch]), epoch
        assert all(torch.equal(a, b) for a, b in zip(direct.pairs, rec.pairs[epoch])), epoch
    assert [len(rec.kept[e]) for e in range(0, N_EPOCHS, STAGE)] == [direct.num_kept(t) for t in range(3)]
    assert len(rec.kept[N_EPOCHS - 1]) < n and rec.pairs[N_EPOCHS - 1][0].numel() > 0  # it did condense and pair
    assert direct.measured_cost() == kcd.condenser.measured_cost()
    assert float(trainer.callback_metrics["kcd/C"]) == pytest.approx(direct.measured_cost()["C"], rel=1e-6)
    assert float(trainer.callback_metrics["kcd/kept_fraction"]) == pytest.approx(len(rec.kept[N_EPOCHS - 1]) / n)
    assert float(trainer.callback_metrics["kcd/stage"]) == 2
    assert torch.equal(buffer, soft)
    assert torch.equal(direct.values, kcd.condenser.values) and torch.equal(direct.counts, kcd.condenser.counts)


def test_the_dataset_wrapper_mixes_the_inputs_of_each_stage(digits):
    """VAKS on inputs (Eq. 14): in the last epoch, the rows of K1L points held (1 - eps) x + eps x_partner."""
    _, _, kcd, rec = fit(digits, max_epochs=STAGE + 1)  # epochs 0..2: stage 1 condensed at the end of epoch 2
    k1l, k0, eps = rec.pairs[STAGE - 1]
    assert k1l.numel() > 0
    partner = dict(zip(k1l.tolist(), zip(k0.tolist(), eps.tolist())))
    idx, x = torch.cat([i for i, _ in rec.batches[STAGE]]), torch.cat(rec.inputs[STAGE])
    mixed = 0
    for row, i in enumerate(idx.tolist()):
        plain = digits.train[i][0]
        if i in partner:
            j, e = partner[i]
            plain = (1 - e) * plain + e * digits.train[j][0]
            mixed += 1
        torch.testing.assert_close(x[row], plain)
    assert mixed == k1l.numel()


# ------------------------------------------------------------------------------------------------
# Resume
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("saved_at", ["train_epoch_end", "validation_end"])
def test_resume_from_a_lightning_checkpoint_equals_an_uninterrupted_run(digits, tmp_path, saved_at):
    """Killed at the start of epoch 3 and resumed with trainer.fit(ckpt_path=last.ckpt): the same kept sets and
    pairs at every epoch end, the same records, C and final weights as a run that was never stopped. A checkpoint
    taken at validation end holds the state before the epoch's end; Lightning then runs that epoch end again."""
    val = saved_at == "validation_end"
    _, whole, kcd_whole, rec_whole = fit(digits, val=val, ckpt_dir=tmp_path / "whole")
    _, _, _, rec_killed = fit(digits, val=val, crash_at=3, ckpt_dir=tmp_path / "killed")
    assert sorted(rec_killed.kept) == [0, 1, 2]
    _, resumed, kcd_resumed, rec_resumed = fit(digits, val=val, ckpt=tmp_path / "killed" / "last.ckpt",
                                               ckpt_dir=tmp_path / "resumed")
    assert min(rec_resumed.batches) == 3
    for epoch in range(N_EPOCHS):
        rec = rec_resumed if epoch in rec_resumed.kept else rec_killed
        assert torch.equal(rec_whole.kept[epoch], rec.kept[epoch]), epoch
        assert all(torch.equal(a, b) for a, b in zip(rec_whole.pairs[epoch], rec.pairs[epoch])), epoch
    a, b = kcd_whole.condenser, kcd_resumed.condenser
    assert torch.equal(a.values, b.values) and torch.equal(a.counts, b.counts)
    assert a.measured_cost() == b.measured_cost() and a.history == b.history
    for (name, p), q in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_fit_again_on_the_same_trainer_goes_on_with_the_same_condenser(digits):
    """Trainer(max_epochs=3), then fit again with max_epochs 6: the condenser goes on through the schedule (the
    second fit makes a new optimizer, so from epoch 3 on the records, and the sets, are not one run's)."""
    trainer, module, kcd, rec = fit(digits, max_epochs=3)
    condenser = kcd.condenser
    trainer.fit_loop.max_epochs = N_EPOCHS
    trainer.fit(module, DataLoader(kcd.dataset(digits.train), batch_size=BATCH, sampler=kcd.sampler()))
    assert kcd.condenser is condenser and condenser.next_epoch == N_EPOCHS
    _, _, _, whole = fit(digits)
    assert all(torch.equal(whole.kept[e], rec.kept[e]) for e in range(3))
    assert [len(rec.kept[e]) for e in range(N_EPOCHS)] == [len(whole.kept[e]) for e in range(N_EPOCHS)]
    assert int(condenser.counts.sum()) == sum(sum(i.numel() for i, _ in rec.batches[e]) for e in range(N_EPOCHS))


def test_callback_state_round_trips_and_refuses_foreign_states(digits):
    L, KCDCallback, _, _ = lightning_pieces()
    _, _, kcd, _ = fit(digits, max_epochs=1)
    state = kcd.state_dict()
    fresh = KCDCallback(len(digits.train), stage_epochs=STAGE, epochs=N_EPOCHS, seed=3)
    fresh.load_state_dict(state)  # before setup: kept, then applied when the Trainer sets it up
    assert fresh.state_dict()["condenser"] is state["condenser"]
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), global_rank=0, world_size=1,
                              max_epochs=N_EPOCHS, reload_dataloaders_every_n_epochs=0)
    fresh.setup(trainer, None, "fit")
    assert fresh.condenser.next_epoch == 1 and torch.equal(fresh.condenser.counts, kcd.condenser.counts)
    assert torch.equal(fresh.host_partner, kcd.host_partner) and trainer.reload_dataloaders_every_n_epochs == 1
    with pytest.raises(ValueError, match="not a KCDCallback state"):
        fresh.load_state_dict({"values": torch.zeros(3)})


# ------------------------------------------------------------------------------------------------
# DDP
# ------------------------------------------------------------------------------------------------

DDP_SCRIPT = '''
import json, sys
import torch
import torch.nn.functional as F
import lightning as L
from torch.utils.data import DataLoader
from kcd_fast.data import build_datasets
from kcd_fast.models import build_model
from kcd_fast.integrations.lightning import KCDCallback

class Student(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = build_model("cnn_small", 10, 1)
    def training_step(self, batch, batch_idx):
        logits = self.net(batch[0])
        return {"loss": F.cross_entropy(logits, batch[1]), "logits": logits}
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

class Recorder(L.Callback):
    def __init__(self, kcd):
        self.kcd, self.out = kcd, {"seen": {}, "kept": {}, "pairs": {}}
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.out["seen"].setdefault(trainer.current_epoch, []).extend(batch[2].tolist())
    def on_train_epoch_end(self, trainer, pl_module):
        e, c = trainer.current_epoch, self.kcd.condenser
        self.out["kept"][e] = c.kept_indices().tolist()
        self.out["pairs"][e] = [t.tolist() for t in c.pairs]
        self.out["sampler"] = type(trainer.train_dataloader.sampler).__name__
    def on_fit_end(self, trainer, pl_module):
        c = self.kcd.condenser
        state = self.kcd.state_dict()["condenser"]  # a collective: merges the ranks' records since the last stage end
        self.out.update(rank=c.rank, world_size=c.world_size, C=c.measured_cost()["C"], counts=state["counts"].tolist())
        with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
            json.dump(self.out, f)

if __name__ == "__main__":
    torch.set_num_threads(1)
    bundle = build_datasets("digits", train_transform=False)
    kcd = KCDCallback(len(bundle.train), stage_epochs=2, seed=5)
    loader = DataLoader(kcd.dataset(bundle.train), batch_size=64, sampler=kcd.sampler())
    trainer = L.Trainer(max_epochs=4, accelerator="cpu", devices=2, strategy="ddp", callbacks=[kcd, Recorder(kcd)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Student(), loader)
'''


@pytest.mark.slow
def test_two_process_ddp_keeps_identical_condensed_sets_on_both_ranks(tmp_path):
    """Lightning's DDP strategy on gloo, 2 CPU processes: both ranks hold the same kept sets and pairs after every
    epoch, and the same records once merged (the callback's state_dict, a collective); Lightning keeps the
    callback's sampler (use_distributed_sampler left on), which gives the ranks disjoint shares of the kept set."""
    pytest.importorskip("lightning")
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=ONE_THREAD_ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world_size"]) == (0, 1, 2)
    assert r0["sampler"] == r1["sampler"] == "KCDSampler"
    assert r0["kept"] == r1["kept"] and r0["pairs"] == r1["pairs"] and r0["counts"] == r1["counts"]
    assert r0["C"] == r1["C"]
    n = len(r0["counts"])
    assert [len(r0["kept"][str(e)]) for e in range(4)] == [len(r0["kept"]["0"])] * 2 + [len(r0["kept"]["2"])] * 2
    assert len(r0["kept"]["2"]) < len(r0["kept"]["0"]) < n
    for epoch in range(4):
        before = set(range(n)) if epoch == 0 else set(r0["kept"][str(epoch - 1)])
        s0, s1 = r0["seen"][str(epoch)], r1["seen"][str(epoch)]
        assert len(s0) == len(s1) == -(-len(before) // 2)  # equal shares, padded by at most one repeat
        assert set(s0) | set(s1) == before and len(set(s0) & set(s1)) <= 1
    assert sum(r0["counts"]) == sum(len(r0["seen"][str(e)]) + len(r1["seen"][str(e)]) for e in range(4))


# ------------------------------------------------------------------------------------------------
# Errors: they name the option and change nothing
# ------------------------------------------------------------------------------------------------

def untouched(kcd):
    c = kcd.condenser
    return int(c.counts.sum()) == 0 and not bool(c.values.any()) and c.next_epoch == 0 and c.samples_yielded == {}


def test_a_batch_without_indices_is_refused_naming_the_option(digits):
    _, KCDCallback, _, _ = lightning_pieces()
    kcd_probe = KCDCallback(len(digits.train), stage_epochs=STAGE, epochs=N_EPOCHS)
    plain = DataLoader(digits.train, batch_size=BATCH, sampler=kcd_probe.sampler())  # (x, y): no index
    with pytest.raises(ValueError, match=r"`indices` is not given and the batch is a list of 2"):
        fit_with(digits, kcd_probe, plain)
    assert untouched(kcd_probe)


def test_logits_not_found_are_refused_naming_the_option(digits):
    with pytest.raises(ValueError, match=r"`logits`='logits' is neither a key of training_step's outputs "
                                         r"\(a dict with keys \['loss'\]\) nor an attribute of Student"):
        fit(digits, returns="loss")
    _, _, kcd, _ = fit(digits, max_epochs=1, logits=lambda m, outputs, batch: m.net(batch[0]))
    assert kcd.condenser.next_epoch == 1 and int(kcd.condenser.counts.sum()) == len(digits.train)


def test_a_loader_without_the_callbacks_sampler_is_refused(digits):
    _, KCDCallback, _, _ = lightning_pieces()
    kcd = KCDCallback(len(digits.train), stage_epochs=STAGE, epochs=N_EPOCHS)
    shuffled = DataLoader(kcd.dataset(digits.train), batch_size=BATCH, shuffle=True)
    with pytest.raises(ValueError, match="does not sample with this callback's sampler"):
        fit_with(digits, kcd, shuffled)
    assert untouched(kcd)


def test_a_trainer_that_runs_past_the_schedule_is_refused(digits):
    _, KCDCallback, _, _ = lightning_pieces()
    kcd = KCDCallback(len(digits.train), stage_epochs=STAGE, epochs=N_EPOCHS)
    with pytest.raises(ValueError, match=r"max_epochs=8\) runs past the callback's schedule of `epochs`=6"):
        fit_with(digits, kcd, DataLoader(kcd.dataset(digits.train), sampler=kcd.sampler()), max_epochs=8)


def fit_with(digits, kcd, loader, max_epochs=N_EPOCHS):
    L, _, Student, _ = lightning_pieces()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", callbacks=[kcd], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Student(), loader)


@pytest.mark.parametrize("spec, batch, message", [
    (None, (torch.zeros(2, 3), torch.zeros(2)), r"`indices` is not given and the batch is a tuple of 2"),
    (None, {"x": torch.zeros(2)}, r"`indices` is not given and the batch is a dict with keys \['x'\]"),
    ("idx", (torch.zeros(2), torch.zeros(2), torch.zeros(2)), r"`indices`='idx' names a key of a dict batch"),
    (5, (torch.zeros(2), torch.zeros(2)), r"`indices`=5 names a position in a tuple batch"),
])
def test_indices_that_are_not_there_name_the_option(spec, batch, message):
    with pytest.raises(ValueError, match=message):
        kcd_lightning.batch_indices(spec, None, None, batch)


def test_indices_and_logits_are_found_where_the_options_say():
    idx, logits = torch.arange(4), torch.randn(4, 10)
    find = kcd_lightning.batch_indices
    assert find(None, None, None, (logits, idx, idx + 1)) is not idx  # batch[-1]
    assert torch.equal(find(None, None, None, (logits, idx, idx + 1)), idx + 1)
    assert find(None, None, None, {"index": idx}) is idx
    assert find("i", None, None, {"i": idx}) is idx and find(1, None, None, [logits, idx]) is idx
    assert find(lambda m, o, b: b["j"], None, None, {"j": idx}) is idx
    module = torch.nn.Module()
    module.student_logits = logits
    assert kcd_lightning.step_logits("student_logits", module, {"loss": 1}, None) is logits
    assert kcd_lightning.step_logits("out", module, {"out": idx}, None) is idx


@pytest.mark.parametrize("indices, logits, error, message", [
    (torch.arange(4).float(), torch.randn(4, 3), TypeError, r"`indices` must give an int32 or int64 tensor"),
    ([0, 1], torch.randn(2, 3), TypeError, r"`indices` must give an int32 or int64 tensor of dataset indices, got list"),
    (torch.zeros(2, 2, dtype=torch.long), torch.randn(2, 3), ValueError, r"`indices` must give a 1-D tensor"),
    (torch.arange(4), torch.randn(4, 3).double(), TypeError, r"`logits` must give a float32, float16 or bfloat16"),
    (torch.arange(4), torch.randn(3, 3), ValueError, r"`logits` must give one row per index, \[B=4, C\]"),
])
def test_step_checks_name_the_option(indices, logits, error, message):
    with pytest.raises(error, match=message):
        kcd_lightning.check_step(indices, logits)


def test_constructor_errors_name_the_argument():
    _, KCDCallback, _, _ = lightning_pieces()
    with pytest.raises(TypeError, match="`world_size` come from the Trainer"):
        KCDCallback(10, stage_epochs=1, world_size=2)
    with pytest.raises(TypeError, match="unknown option `tau`"):
        KCDCallback(10, stage_epochs=1, tau=0.5)
    with pytest.raises(ValueError, match="`rho` must be a finite number in"):
        KCDCallback(10, stage_epochs=1, rho=1.5)
    with pytest.raises(TypeError, match="`logits` must be a key or a callable"):
        KCDCallback(10, stage_epochs=1, logits=3)
    with pytest.raises(ValueError, match=r"`buffers\[0\]` must have one row per sample \(10\)"):
        KCDCallback(10, stage_epochs=1, buffers=[torch.zeros(9, 3)])
    with pytest.raises(RuntimeError, match="the condenser is made when the Trainer sets the callback up"):
        len(KCDCallback(10, stage_epochs=1).sampler())
    assert isinstance(KCDCallback(10, stage_epochs=1).sampler(), DistributedSampler)


def test_without_lightning_the_import_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lightning.pytorch.callbacks", None)  # as if it were not installed
    monkeypatch.delitem(kcd_lightning.__dict__, "KCDCallback", raising=False)
    with pytest.raises(ImportError, match=r"pip install kcd_fast\[lightning\]"):
        from kcd_fast.integrations.lightning import KCDCallback  # noqa: F401


# ------------------------------------------------------------------------------------------------
# timm, and the examples
# ------------------------------------------------------------------------------------------------

def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_timm_recipe_lines_run_with_a_timm_model():
    """examples/timm_kcd.py's loop (the recipe's lines around timm's LogitDistillationTask): each epoch trains on
    full batches of the kept set only, each stage end keeps the schedule's count, and C is the schedule's."""
    pytest.importorskip("timm")
    example = load_example("timm_kcd")
    threads = torch.get_num_threads()
    try:
        out = example.run(["--epochs", "4", "--stage-epochs", "2", "--teacher-epochs", "1", "--num-samples", "300",
                           "--batch-size", "32"])
    finally:
        torch.set_num_threads(threads)
    cond, seen, kept = out["condenser"], out["seen"], out["kept"]
    assert type(out["model"]).__module__.startswith("timm.models")
    for epoch in range(4):
        before = torch.arange(300) if epoch == 0 else kept[epoch - 1]
        assert seen[epoch].unique().numel() == seen[epoch].numel() == before.numel() // 32 * 32
        assert bool(torch.isin(seen[epoch], before).all())
    assert [kept[e].numel() for e in range(4)] == [cond.num_kept(0)] * 2 + [cond.num_kept(1)] * 2
    assert cond.num_kept(1) < cond.num_kept(0) < 300
    assert cond.measured_cost()["C"] == pytest.approx(cond.predicted_cost()["schedule"])
    assert int(cond.counts.sum()) == sum(s.numel() for s in seen.values())


@pytest.mark.slow
def test_the_examples_run():
    """Both examples, side by side, with few epochs."""
    pytest.importorskip("lightning")
    pytest.importorskip("timm")
    commands = {
        "lightning_kcd": ["--epochs", "4", "--stage-epochs", "2", "--teacher-epochs", "1"],
        "timm_kcd": ["--epochs", "2", "--stage-epochs", "1", "--teacher-epochs", "1", "--num-samples", "256"],
    }
    running = {name: subprocess.Popen([sys.executable, str(ROOT / "examples" / f"{name}.py"), *args], cwd=ROOT,
                                      env=ONE_THREAD_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, args in commands.items()}
    for name, proc in running.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}: {out[-2000:]}{err[-3000:]}"
        assert f"{name}: done in" in out and "measured C" in out, out
