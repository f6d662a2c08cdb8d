"""KCD in a timm-style training loop, on scikit-learn's digits: about 20 s on 2 CPU cores.

The loop has the shape of timm's train.py: a timm model, a ``timm.task.LogitDistillationTask``
(what ``--kd-model-name`` builds: the task returns ``{"loss", "output", ...}``), ``train_one_epoch``,
then the end of the epoch. The lines KCD adds are marked ``# KCD``; docs/integrations.md says where
each goes in timm's own train.py. The digits are 8x8; the loop upsamples them to ``--size``.

    python examples/timm_kcd.py                               # 8 epochs in 4 stages of 2
    python examples/timm_kcd.py --epochs 4 --teacher-epochs 1 --num-samples 512
"""
import argparse
import time

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.task import LogitDistillationTask
from torch.utils.data import DataLoader, Subset

import kcd_fast
from kcd_fast.data import build_datasets

# One mean and std for both models, so that the task passes the student's input to the teacher as it is.
NORM = dict(mean=(0.5,), std=(0.5,))


def make_model(name: str) -> torch.nn.Module:
    return timm.create_model(name, num_classes=10, in_chans=1, pretrained=False, pretrained_cfg_overlay=NORM)


def train_teacher(dataset, name: str, epochs: int, size: int) -> torch.nn.Module:
    """The teacher, trained with cross-entropy (timm's train.py would load a pretrained one)."""
    teacher = make_model(name)
    opt = create_optimizer_v2(teacher, "adamw", lr=3e-3, weight_decay=0.05)
    for _ in range(epochs):
        for x, y in DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True):
            loss = F.cross_entropy(teacher(F.interpolate(x, size=size, mode="bilinear")), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return teacher.eval()


def train_one_epoch(epoch, task, loader, optimizer, condenser, size) -> torch.Tensor:
    """timm's train_one_epoch, cut to its core; returns the dataset indices it trained on."""
    task.train()
    seen = []
    for input, target, index in loader:                          # KCD: (input, target) -> (input, target, index)
        input = F.interpolate(input, size=size, mode="bilinear")
        result = task(input, target)                             # timm: loss, result = _forward()
        optimizer.zero_grad()
        result["loss"].backward()
        optimizer.step()
        condenser.observe(index, result["output"])               # KCD: Eq. 7 + 12, one kernel, no host sync
        seen.append(index)
    return torch.cat(seen)


@torch.no_grad()
def evaluate(model, dataset, size) -> float:
    model.eval()
    hits = sum(int((model(F.interpolate(x, size=size, mode="bilinear")).argmax(1) == y).sum())
               for x, y in DataLoader(dataset, batch_size=256))
    return 100.0 * hits / len(dataset)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="test_resnet", help="the timm student")
    p.add_argument("--teacher", default="resnet10t", help="the timm teacher")
    p.add_argument("--epochs", type=int, default=8, help="I, the student's epochs")
    p.add_argument("--stage-epochs", type=int, default=2, help="T, the epochs of one KCD stage")
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=None, help="train on the first N digits only")
    p.add_argument("--size", type=int, default=16, help="the input size the loop upsamples the 8x8 digits to")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads: the models are tiny, and one thread does not fight other processes")
    return p.parse_args(argv)


def run(argv=None) -> dict:
    """The whole run; returns the condenser, each epoch's trained indices and kept set, and the top-1."""
    args = parse(argv)
    start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    bundle = build_datasets("digits")
    dataset_train = bundle.train
    if args.num_samples is not None:
        dataset_train = Subset(dataset_train, range(min(args.num_samples, len(dataset_train))))
    teacher = train_teacher(dataset_train, args.teacher, args.teacher_epochs, args.size)
    model = make_model(args.model)
    task = LogitDistillationTask(model, teacher, criterion=torch.nn.CrossEntropyLoss(), task_loss_weight=0.1,
                                 temperature=4.0, verbose=False)
    optimizer = create_optimizer_v2(model, "adamw", lr=3e-3, weight_decay=0.05)

    condenser = kcd_fast.KnowledgeCondenser(len(dataset_train), epochs=args.epochs,            # KCD
                                            stage_epochs=args.stage_epochs, seed=args.seed)    # KCD
    loader_train = DataLoader(kcd_fast.KCDDataset(dataset_train, condenser),                  # KCD: in place of
                              batch_size=args.batch_size, sampler=condenser.sampler(),        # KCD: timm's
                              drop_last=True)                                                 # KCD: create_loader
    seen, kept = {}, {}
    for epoch in range(args.epochs):
        loader_train.sampler.set_epoch(epoch)                    # timm's _set_loader_epoch does this
        seen[epoch] = train_one_epoch(epoch, task, loader_train, optimizer, condenser, args.size)
        plan = condenser.end_epoch(epoch)                        # KCD: a stage end condenses (Eq. 13-15)
        kept[epoch] = condenser.kept_indices().clone()
        if plan is not None:
            print(f"epoch {epoch}: stage {condenser.stage}, kept {plan.num_kept} of {condenser.num_samples}, "
                  f"{plan.k1l.numel()} mixed with dropped points (VAKS)")
    top1 = evaluate(model, bundle.val, args.size)
    cost = condenser.measured_cost()["C"]
    print(f"timm_kcd: done in {time.time() - start:.1f}s: {args.model} top-1 {top1:.2f}%, measured C {cost:.3f} "
          f"(schedule {condenser.predicted_cost()['schedule']:.3f})")
    return {"condenser": condenser, "model": model, "seen": seen, "kept": kept, "top1": top1}


if __name__ == "__main__":
    run()
