"""The README's quick start is what CI runs, the library names that the README and docs/ write exist, and
the cached-knowledge loop of docs/cached-knowledge.md runs."""
import re
from pathlib import Path

import pytest

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


DOCUMENTS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_kcd_fast_name_in_the_documents_resolves(document):
    """``kcd_fast.X.Y`` anywhere in the README or a page of docs/ (code, prose) is a module or attribute
    that exists."""
    import importlib

    names = sorted(set(re.findall(r"\bkcd_fast(?:\.[A-Za-z_]\w*)+", (ROOT / document).read_text())))
    if document == "README.md":
        assert "kcd_fast.KnowledgeBuffer" in names
    for name in names:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"{document} names {name}, but {attr!r} is not in {obj!r}"
            obj = getattr(obj, attr)


def test_documented_api_exists():
    for name in ("update_values", "rank", "condense", "vaks_mix_", "KnowledgeCondenser", "KCDDataset",
                 "KnowledgeBuffer"):
        assert hasattr(kcd_fast, name)
    c = kcd_fast.KnowledgeCondenser(4, epochs=2, stage_epochs=1)
    for name in ("observe", "end_epoch", "sampler", "mix_buffer_", "state_dict", "load_state_dict",
                 "save_condensed", "load_condensed", "measured_cost", "predicted_cost", "bytes_per_sample"):
        assert callable(getattr(c, name)), name


def test_docs_cached_knowledge_loop_runs_on_digits():
    """docs/cached-knowledge.md's "Cached knowledge in your own loop" block, run as written on the CPU (the
    .cuda() calls dropped, 4 epochs instead of 240): the teacher runs in epoch 0 only and the buffer is full."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from kcd_fast.data import build_datasets
    from kcd_fast.models import build_model

    text = (ROOT / "docs" / "cached-knowledge.md").read_text()
    section = text.split("Cached knowledge in your own loop", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    for cuda, cpu in ((".cuda(non_blocking=True)", ""), (".cuda()", ""), ('device="cuda"', 'device="cpu"'),
                      ("range(240)", "range(4)"), ("num_workers=8", "num_workers=0")):
        assert cuda in code, cuda
        code = code.replace(cuda, cpu)
    torch.manual_seed(0)
    bundle = build_datasets("digits")
    teacher, student = build_model("cnn_small", 10, 1), build_model("cnn_small", 10, 1)
    runs = []
    teacher.register_forward_hook(lambda *a: runs.append(1))
    env = dict(torch=torch, kcd_fast=kcd_fast, DataLoader=DataLoader, train_set=bundle.train, num_classes=10,
               teacher=teacher.eval(), student=student,
               opt=torch.optim.SGD(student.parameters(), lr=0.05),
               condenser=kcd_fast.KnowledgeCondenser(len(bundle.train), epochs=4, stage_epochs=2),
               kd_loss=lambda s, t, y: F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="batchmean"))
    exec(compile(code, "docs/cached-knowledge.md loop", "exec"), env)
    assert env["buf"].fully_filled() and env["buf"].storage == "topk"
    assert len(runs) == -(-len(bundle.train) // 64), "the teacher ran in the first epoch only"
