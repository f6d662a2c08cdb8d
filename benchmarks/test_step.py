"""Whole training steps: what recording and cached knowledge cost or save inside a real KD step.

On CUDA: ResNet34 -> ResNet18, batch 256, 224x224, bf16 autocast, channels_last, data resident on
the GPU (the loader cannot hide anything). On the CPU (CI): cnn_large -> cnn_small, batch 64,
28x28, fp32. Each timed round runs ``STEPS`` steps and synchronises once.

* ``kd step + recording``: the online KD step with no recording (``none``), with
  ``condenser.observe`` (``kcd_fast``), with eager PyTorch recording (``eager``) and with the
  official code's ``.cpu()`` + numpy write (``official``). Bound: kcd_fast within 0.1% of none.
* ``knowledge source``: the step with the teacher online, with targets read from a dense fp16
  buffer (the trainer's path: the ``kd`` loss reads the rows in place; ``cached_dense_logits`` is the
  generic path that any other loss takes, ``teacher_logits`` then the loss), and from top-10 storage;
  and the student alone (CE only). Bounds: cached <= 0.70x online; read-back + KD loss <= 2% over
  the student-only step.

The bounds and the latest measurements are in docs/performance.md.

The losses are the trainer's own (``kcd_fast.distill``: ``--distill kd`` with its defaults, 0.1 CE +
0.9 KL at T = 4).
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kcd_fast import KnowledgeCondenser
from kcd_fast import distill
from kcd_fast.knowledge import KnowledgeBuffer
from kcd_fast.models import build_model
from benchmarks import baselines
from benchmarks.conftest import DEVICE, ON_GPU, sync

STEPS = 10 if ON_GPU else 3
LOSS_CFG = SimpleNamespace(kd_temperature=4.0, ce_weight=0.1, kd_weight=0.9)  # the trainer's defaults
if ON_GPU:
    CFG = dict(teacher="resnet34", student="resnet18", batch=256, image=224, channels=3, classes=1000,
               n=1_281_167, amp=torch.bfloat16)
else:
    CFG = dict(teacher="cnn_large", student="cnn_small", batch=64, image=28, channels=1, classes=10, n=60_000,
               amp=None)


class Setup:
    def __init__(self):
        torch.manual_seed(0)
        c = CFG
        self.teacher = build_model(c["teacher"], c["classes"], c["channels"]).to(DEVICE).eval()
        self.student = build_model(c["student"], c["classes"], c["channels"]).to(DEVICE)
        if ON_GPU:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
            self.student = self.student.to(memory_format=torch.channels_last)
        self.opt = torch.optim.SGD(self.student.parameters(), lr=0.01, momentum=0.9)
        self.x = torch.randn(c["batch"], c["channels"], c["image"], c["image"], device=DEVICE)
        if ON_GPU:
            self.x = self.x.to(memory_format=torch.channels_last)
        self.y = torch.randint(0, c["classes"], (c["batch"],), device=DEVICE)
        self.index = torch.randperm(c["n"], device=DEVICE)[: c["batch"]]

    def autocast(self):
        return torch.autocast(DEVICE.type, dtype=CFG["amp"] or torch.float32, enabled=CFG["amp"] is not None)

    def step(self, knowledge=None, record=None, kd=True, generic=False):
        """One training step; the teacher's knowledge online, or from the buffer ``knowledge`` (through
        ``kd``'s buffer variant, or with ``generic`` through ``teacher_logits`` and the logit loss)."""
        with self.autocast():
            t = None
            if kd and knowledge is None:
                with torch.no_grad():
                    t = self.teacher(self.x)
            elif kd and generic:
                t = knowledge.teacher_logits(self.index)
            s = self.student(self.x)
            if not kd:
                loss = F.cross_entropy(s.float(), self.y)
            elif t is None:
                loss = distill.kd_loss_from_knowledge(s, knowledge, self.index, self.y, LOSS_CFG, 0)
            else:
                loss = distill.kd_loss(s, t, self.y, LOSS_CFG, 0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if record is not None:
            record(self.index, s.detach())


@pytest.fixture(scope="module")
def setup():
    return Setup()


def _bench(benchmark, fn, **extra):
    for _ in range(2):
        fn()
    sync()
    benchmark.extra_info.update(extra, device=torch.cuda.get_device_name() if ON_GPU else "cpu",
                                calls_per_round=STEPS, batch=CFG["batch"])

    def timed():
        for _ in range(STEPS):
            fn()
        sync()

    benchmark.pedantic(timed, rounds=5 if ON_GPU else 3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["none", "kcd_fast", "eager", "official"])
def test_kd_step_recording(benchmark, setup, provider):
    benchmark.group = f"KD step {CFG['teacher']}->{CFG['student']} B={CFG['batch']} + recording"
    n = CFG["n"]
    record = None
    if provider == "kcd_fast":
        cond = KnowledgeCondenser(n, epochs=1, stage_epochs=1, device=DEVICE)
        record = cond.observe
    elif provider == "eager":
        values = torch.zeros(n, device=DEVICE)
        counts = torch.zeros(n, dtype=torch.int32, device=DEVICE)
        record = lambda i, s: baselines.eager_update_values(values, counts, i, s)  # noqa: E731
    elif provider == "official":
        rec = baselines.OfficialRecorder(n)
        record = rec.observe
    _bench(benchmark, lambda: setup.step(record=record), provider=provider, op="kd_step")


@pytest.mark.parametrize("provider", ["online", "cached_dense", "cached_dense_logits", "cached_topk", "student_only"])
def test_knowledge_source(benchmark, setup, provider):
    benchmark.group = f"KD step {CFG['teacher']}->{CFG['student']} B={CFG['batch']} by knowledge source"
    n = CFG["n"]
    buf, kd = None, True
    if provider.startswith("cached"):
        storage = provider.split("_")[1]
        buf = KnowledgeBuffer(n, CFG["classes"], storage=storage, k=min(10, CFG["classes"]), device=DEVICE,
                              temperature=4.0)
        buf.filled.fill_(True)  # contents do not matter for the timing
        if storage == "dense":
            buf.probs.fill_(1.0 / CFG["classes"])
    elif provider == "student_only":
        kd = False
    _bench(benchmark, lambda: setup.step(knowledge=buf, kd=kd, generic=provider.endswith("logits")),
           provider=provider, op="knowledge_source")


@pytest.mark.skipif(not ON_GPU, reason="the sync-debug mode is a CUDA feature")
def test_observe_has_no_host_sync(setup):
    cond = KnowledgeCondenser(CFG["n"], epochs=1, stage_epochs=1, device=DEVICE)
    setup.step(record=cond.observe)
    sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            s = setup.student(setup.x)
        cond.observe(setup.index, s)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert np.isfinite(cond.values.sum().item())
