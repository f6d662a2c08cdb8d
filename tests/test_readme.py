"""The README's quick start is what CI runs, and its API examples name things that exist."""
import re
from pathlib import Path

import kcd_fast

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_is_two_commands_and_ci_runs_them_verbatim():
    commands = quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "python -m kcd_fast.train" in commands[0] and "--no-build-isolation" in commands[0]
    assert "pytest benchmarks/ --benchmark-only" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for c in commands:
        assert c in ci, f"CI does not run the README command: {c}"


def test_documented_api_exists():
    for name in ("update_values", "rank", "condense", "vaks_mix_", "KnowledgeCondenser", "KCDDataset"):
        assert hasattr(kcd_fast, name)
    c = kcd_fast.KnowledgeCondenser(4, epochs=2, stage_epochs=1)
    for name in ("observe", "end_epoch", "sampler", "mix_buffer_", "state_dict", "load_state_dict",
                 "save_condensed", "load_condensed", "measured_cost", "predicted_cost", "bytes_per_sample"):
        assert callable(getattr(c, name)), name
