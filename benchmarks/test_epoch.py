"""Realized savings: a trainer epoch on the condensed set against a full epoch.

Runs the trainer's own ``train_one_epoch`` over data resident on the device (so the loader hides
nothing): ``full`` is a --no-kcd epoch over all N samples, ``condensed`` a KCD epoch after a
condensation to ρ = 0.7 (with the recording and VAKS pairs in place). The bound
(docs/performance.md) is time(condensed) / time(full) <= kept fraction + 0.02. On CUDA:
ResNet34 -> ResNet18, 224x224, bf16, N = 40 batches of 256; on the CPU: cnn_large -> cnn_small,
28x28, N = 8 batches of 64.
"""
import pytest
import torch

from kcd_fast import KnowledgeCondenser
from kcd_fast.train import config, engine, options
from kcd_fast.models import build_model
from benchmarks.conftest import DEVICE, ON_GPU, sync

if ON_GPU:
    CFG = dict(teacher="resnet34", student="resnet18", batch=256, batches=40, image=224, channels=3, classes=1000,
               amp="bf16")
else:
    CFG = dict(teacher="cnn_large", student="cnn_small", batch=64, batches=8, image=28, channels=1, classes=10,
               amp="off")
RHO = 0.7


class DeviceBatches:
    """Batches gathered from device-resident tensors in the order of a sampler's indices."""

    def __init__(self, x, y, indices_fn, batch):
        self.x, self.y, self.indices_fn, self.batch = x, y, indices_fn, batch

    def __iter__(self):
        idx = self.indices_fn().to(self.x.device)
        for s in range(0, idx.numel(), self.batch):
            i = idx[s:s + self.batch]
            yield self.x[i], self.y[i], i


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    n = CFG["batch"] * CFG["batches"]
    args = config.resolve(options.get_args_parser().parse_args(["--amp", CFG["amp"], "--no-progress", "--epochs", "1",
                                                               "--stage-epochs", "1"]))
    args = args.replace(rank=0, world_size=1, local_rank=0, distributed=False, device=str(DEVICE))
    teacher = build_model(CFG["teacher"], CFG["classes"], CFG["channels"]).to(DEVICE).eval()
    student = build_model(CFG["student"], CFG["classes"], CFG["channels"]).to(DEVICE)
    x = torch.randn(n, CFG["channels"], CFG["image"], CFG["image"], device=DEVICE)
    if ON_GPU:
        x = x.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
        student = student.to(memory_format=torch.channels_last)
    y = torch.randint(0, CFG["classes"], (n,), device=DEVICE)
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    return dict(n=n, args=args, teacher=teacher, student=student, x=x, y=y, opt=opt)


@pytest.mark.parametrize("provider", ["full", "condensed"])
def test_epoch_cost(benchmark, world, provider):
    w = world
    n = w["n"]
    benchmark.group = f"trainer epoch {CFG['teacher']}->{CFG['student']} N={n} (rho={RHO})"
    if provider == "full":
        condenser = None
        loader = DeviceBatches(w["x"], w["y"], lambda: torch.randperm(n), CFG["batch"])
        kept = 1.0
    else:
        condenser = KnowledgeCondenser(n, epochs=2, stage_epochs=2, rho=RHO, device=DEVICE)
        condenser.values.copy_(torch.rand(n, device=DEVICE))
        condenser.counts.fill_(1)
        condenser.end_epoch(0)  # one condensation: tau^0 = rho with S = 1 (epoch 1 then observes)
        sampler = condenser.sampler()
        loader = DeviceBatches(w["x"], w["y"], sampler.indices, CFG["batch"])
        kept = condenser.kept_indices().numel() / n

    def epoch():
        engine.train_one_epoch(w["student"], w["teacher"], loader, w["opt"], None, condenser, w["args"], 0, DEVICE, n)
        sync()

    epoch()  # warm-up
    benchmark.extra_info.update(provider=provider, kept_fraction=kept, N=n,
                                device=torch.cuda.get_device_name() if ON_GPU else "cpu")
    benchmark.pedantic(epoch, rounds=5, iterations=1, warmup_rounds=1)
