"""What a run writes to ``--output-dir`` besides its checkpoint: ``metrics.jsonl`` (a line per
epoch), ``summary.json``, the final student and condensed set, the plots and TensorBoard scalars."""
from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

import kcd_fast
from kcd_fast.condenser import measured_cost
from kcd_fast.files import atomic_write
from kcd_fast.train import distributed


@dataclass
class RunStatus:
    """What :func:`kcd_fast.train.main.cli` needs to advise after a stop: whether the run has a
    checkpoint to ``--resume`` from, and the folders it created for ``--output-dir`` (deepest first)."""

    checkpointed: bool = False
    made_dirs: list = field(default_factory=list)

    def remove_made_dirs_if_empty(self) -> None:
        """A run that stops before writing anything leaves no empty --output-dir (or parents) behind."""
        for made in self.made_dirs:
            if not made.is_dir() or any(made.iterdir()):
                return
            made.rmdir()


def make_output_dir(cfg, status: RunStatus) -> Path:
    """Create ``--output-dir`` (rank 0; the others wait), noting the folders it makes."""
    out = Path(cfg.output_dir)
    if distributed.is_main(cfg):
        status.made_dirs = [p for p in (out, *out.parents) if not p.exists()]
        out.mkdir(parents=True, exist_ok=True)
    distributed.barrier(cfg)
    return out


def print_notes(cfg) -> None:
    """Settings the run accepts but the user may not expect: ignored options, autocast on a CPU, and
    learning-rate milestones past the last epoch."""
    if not distributed.is_main(cfg):
        return
    for line in cfg.ignored_options:
        print(f"kcd_fast: note: ignoring {line}", flush=True)
    if cfg.amp != "off" and not str(cfg.device).startswith("cuda"):
        print(f"kcd_fast: note: --amp {cfg.amp} on the CPU: autocast there is often several times slower than "
              f"float32 (it is meant for GPUs)", flush=True)
    late = [m for m in cfg.lr_milestones if m >= cfg.epochs] if cfg.lr_scheduler == "multistep" else []
    if late:  # e.g. CIFAR-100's 150 180 210 in a run shortened with --epochs
        print(f"kcd_fast: note: --lr-milestones {' '.join(map(str, late))} lie at or past --epochs {cfg.epochs}: "
              f"the learning rate drops {len(late)} time(s) fewer than the schedule says", flush=True)


def write_metrics(out: Path, history: list) -> None:
    with atomic_write(out / "metrics.jsonl", "w") as f:
        f.write("".join(json.dumps(h) + "\n" for h in history))


def tensorboard(out: Path, cfg):
    """A SummaryWriter on rank 0 when tensorboard is installed, else None."""
    if not distributed.is_main(cfg):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(out / "tb"))


def summary(cfg, identity: dict, history, best, condenser, n, wall, teacher_passes, knowledge=None) -> dict:
    """summary.json: accuracy, the measured and predicted cost C, times, the stages' records."""
    final = history[-1] if history else {"top1": float("nan"), "top5": float("nan")}
    passed = sum(h["samples"] for h in history)
    out = {
        "dataset": cfg.dataset, "teacher": cfg.teacher, "student": cfg.student, "kcd": cfg.kcd,
        "distill": cfg.distill, "epochs": cfg.epochs, "num_train": n,
        "best_top1": best["top1"], "best_top5": best["top5"], "best_epoch": best["epoch"],
        "final_top1": final["top1"], "final_top5": final["top5"],
        "C_a": passed, "C": measured_cost(passed, n, max(len(history), 1), cfg.world_size),
        "knowledge": cfg.knowledge, "teacher_passes": teacher_passes,
        "wall_time_s": wall, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "kcd_fast": kcd_fast.__version__,
        "device": torch.cuda.get_device_name() if str(cfg.device).startswith("cuda") else "cpu",
        "world_size": cfg.world_size, "ignored_options": list(cfg.ignored_options), "args": identity,
    }
    if knowledge is not None:
        out["knowledge_storage"] = dict(knowledge.header(), bytes_per_sample=knowledge.bytes_per_sample())
    if condenser is not None:
        # A fixed condensed set (--condensed) trains on it every epoch: no schedule to predict from.
        out["C_predicted"] = None if condenser.frozen else condenser.predicted_cost()
        out["bytes_per_sample"] = condenser.bytes_per_sample()
        out["stages"] = condenser.history
    return out


def _json_default(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return repr(x)


def write_final(out: Path, cfg, student, condenser, summary_dict: dict, history: list, writer) -> None:
    """The final student, condensed set, summary.json and plots (rank 0)."""
    torch.save(student.state_dict(), out / "student.pth")
    if condenser is not None:
        condenser.save_condensed(out / "condensed.pt")
    (out / "summary.json").write_text(json.dumps(summary_dict, indent=2, default=_json_default))
    if cfg.plots:
        from kcd_fast import plots

        plots.write_all(out, history, summary_dict)
    if writer is not None:
        writer.close()
