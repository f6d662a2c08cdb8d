"""KCD against vanilla KD on real data: the same student, teacher, seed and epochs, with and without
condensation, plus the paper's two selection ablations (Table 4: a random ranking instead of the
knowledge value, and direct selection without VAKS) and the official code's selection
(``--protocol official``). CPU-sized; writes a JSON summary and prints
a Markdown table.

    python benchmarks/accuracy_kcd_vs_kd.py --dataset digits --seeds 0 1 2 3 4 --out digits.json
    python benchmarks/accuracy_kcd_vs_kd.py --dataset fashion-mnist --seeds 0 1 2 --out fmnist.json \\
        -- --epochs 10 --stage-epochs 2 --teacher-epochs 5

Arguments after ``--`` go to every run of ``python -m kcd_fast.train``. The teacher is trained once
(by the first run, as the trainer does for digits and Fashion-MNIST) and given to every other run
as ``--teacher-weights``, so all variants distil the same teacher.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from kcd_fast.train import options
from kcd_fast.train.main import main as run_trainer

HERE = Path(__file__).resolve().parent

# variant name -> the trainer options that make it
VARIANTS = {
    "kd": ["--no-kcd"],                      # vanilla KD on the full set every epoch: the baseline
    "kcd": [],                               # KCD as the paper has it
    "kcd_random": ["--selection", "random"],  # Table 4 "OGVE w/ random": a random ranking, same schedule
    "kcd_no_vaks": ["--no-vaks"],            # Table 4 "direct selection": K^ = K1, no augmentation
    "kcd_official": ["--protocol", "official"],  # the official code's selection (docs/paper-notes.md)
}


def run(dataset: str, seed: int, variant: str, teacher, out: Path, extra: list[str]) -> dict:
    argv = ["--dataset", dataset, "--seed", str(seed), "--no-progress", "--no-plots", "--output-dir", str(out),
            *VARIANTS[variant], *extra]
    if teacher is not None:
        argv += ["--teacher-weights", str(teacher)]
    summary = run_trainer(options.get_args_parser().parse_args(argv))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {"seed": seed, "variant": variant, "final_top1": summary["final_top1"], "best_top1": summary["best_top1"],
            "C": summary["C"], "train_time_s": sum(r["train_time"] for r in rows),
            "teacher_passes": summary["teacher_passes"], "epochs": summary["epochs"]}


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


def table(rows: list[dict], variants: list[str]) -> str:
    """Markdown: per variant, final and best top-1 (mean ± sample std over seeds), the change in
    final top-1 against KD on the same seeds, C, and the training time relative to KD."""
    lines = ["| variant | seeds | final top-1 (%) | best top-1 (%) | Δ final vs KD (points) | C | train time / KD |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    kd = {r["seed"]: r for r in rows if r["variant"] == "kd"}
    for v in variants:
        sel = [r for r in rows if r["variant"] == v]
        if not sel:
            continue
        paired = [r for r in sel if r["seed"] in kd]
        delta = _mean_std([r["final_top1"] - kd[r["seed"]]["final_top1"] for r in paired]) if paired else "-"
        ratio = (f"{statistics.mean(r['train_time_s'] / kd[r['seed']]['train_time_s'] for r in paired):.3f}"
                 if paired else "-")
        lines.append(f"| {v} | {len(sel)} | {_mean_std([r['final_top1'] for r in sel])} | "
                     f"{_mean_std([r['best_top1'] for r in sel])} | {delta if v != 'kd' else '-'} | "
                     f"{statistics.mean(r['C'] for r in sel):.3f} | {ratio} |")
    return "\n".join(lines)


def source_commit():
    """The checkout's commit, "-dirty" when tracked files differ from it; None outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=HERE,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(own)
    commit = source_commit()  # the code the runs import, before anything changes the checkout
    rows = []
    teacher = None
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for variant in args.variants:
                out = Path(tmp) / f"s{seed}-{variant}"
                rows.append(run(args.dataset, seed, variant, teacher, out, extra))
                print(json.dumps(rows[-1]), flush=True)
                if teacher is None:  # the first run trained it: every later run distils the same one
                    found = sorted(out.glob("teacher-*.pth"))
                    if found:
                        teacher = Path(tmp) / "teacher.pth"
                        teacher.write_bytes(found[0].read_bytes())
        summary = {"dataset": args.dataset, "trainer_options": extra, "seeds": args.seeds,
                   "teacher_top1": torch.load(teacher, weights_only=False).get("top1") if teacher else None,
                   "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": "cpu",
                   "commit": commit,
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": rows,
                   "table": table(rows, args.variants)}
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(summary["table"])


if __name__ == "__main__":
    main()
