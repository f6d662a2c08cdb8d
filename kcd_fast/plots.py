"""PNG plots of a finished run (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path


def write_all(out: Path, history: list, summary: dict) -> list:
    """Write the run's plots under ``out/plots`` and return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(out) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    epochs = [h["epoch"] + 1 for h in history]

    # Accuracy and kept fraction against epoch.
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [h["top1"] for h in history], label="top-1")
    ax.plot(epochs, [h["top5"] for h in history], label="top-5", alpha=0.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax2 = ax.twinx()
    ax2.step(epochs, [h["kept_fraction"] for h in history], where="post", color="tab:red", label="kept fraction")
    ax2.set_ylabel("kept fraction |K^|/|K|")
    ax2.set_ylim(0, 1.05)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower right")
    ax.set_title(f"{summary['dataset']}: {summary['teacher']} -> {summary['student']}, C = {summary['C']:.3f}")
    fig.tight_layout()
    written.append(folder / "accuracy_kept.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    stages = summary.get("stages") or []
    if stages:
        # Knowledge value (V^F) of kept and dropped points at each stage.
        cols = min(len(stages), 3)
        rows = (len(stages) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
        for ax, st in zip(axes.flat, stages):
            h = st["value_hist"]
            edges = h["edges"]
            centers = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
            width = edges[1] - edges[0]
            ax.bar(centers, h["kept"], width=width, alpha=0.6, label=f"kept ({st['kept']})")
            ax.bar(centers, h["dropped"], width=width, alpha=0.6, label="dropped")
            ax.set_title(f"stage {st['stage']} (epoch {st['epoch'] + 1}), tau={st['tau']:.3f}", fontsize=9)
            ax.set_xlabel("value V^F")
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(stages):]:
            ax.axis("off")
        fig.tight_layout()
        written.append(folder / "value_distribution.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)

        # Rank likelihood p_R (Eq. 8) of a sample of points across stages, as the paper's Fig. 3(b).
        traj = [st["rank_likelihood"] for st in stages]
        fig, ax = plt.subplots(figsize=(7, 4))
        xs = [st["stage"] for st in stages]
        points = len(traj[0])
        for j in range(0, points, max(points // 40, 1)):
            ys = [t[j] for t in traj]
            rising = ys[-1] > ys[0] + 0.3
            ax.plot(xs, ys, color="tab:red" if rising else "tab:gray", alpha=0.9 if rising else 0.35, lw=1)
        ax.plot(xs, [1 - st["tau"] for st in stages], "k--", lw=1, label="1 - tau (keep threshold)")
        ax.set_xlabel("stage")
        ax.set_ylabel("rank likelihood p_R = 1 - R/N")
        ax.set_title("knowledge value across stages (red: points that became valuable)")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        written.append(folder / "rank_likelihood.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
