"""Shared helpers of the tests: random inputs, state snapshots and the torch twin of update_values."""
import math

import torch


def make_state(n, *, seed=0, max_count=5, device="cpu"):
    """Random (values float32 [n], counts int32 [n]) with some never-seen points."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(n, generator=g) * 4.0
    counts = torch.randint(0, max_count + 1, (n,), generator=g, dtype=torch.int32)
    values[counts == 0] = 0.0
    return values.to(device), counts.to(device)


def make_logits(b, c, *, dtype=torch.float32, seed=0, scale=3.0, strided=False, device="cpu"):
    """Random [b, c] logits; ``strided`` gives a non-contiguous view (column stride 2, padded rows)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        base = torch.randn(b, 2 * c + 3, generator=g) * scale
        x = base.to(device, dtype)[:, 1 : 2 * c + 1 : 2]  # strided on the target device itself
        assert x.numel() == 1 or not x.is_contiguous()  # torch calls any 1x1 tensor contiguous
    else:
        x = (torch.randn(b, c, generator=g) * scale).to(device, dtype)
    return x


def make_indices(b, n, *, seed=0, duplicates=True, dtype=torch.int64, device="cpu"):
    """b indices in [0, n); with ``duplicates`` some repeat (several times when possible)."""
    g = torch.Generator().manual_seed(seed)
    if duplicates or b > n:
        idx = torch.randint(0, n, (b,), generator=g)
        if b >= 4:
            idx[b // 2] = idx[0]
            idx[b - 1] = idx[0]
    else:
        idx = torch.randperm(n, generator=g)[:b]
    return idx.to(dtype).to(device)


def update_values_torch(values, counts, indices, logits, temperature):
    """Vectorised torch twin of the C++ and Triton ``update_values`` kernels, checked against them.

    Each finite visit i of sample x adds (e_i - V_old(x)) / F_new(x) to V(x),
    which sums to the exact result of k successive Eq. 12 updates.
    """
    z = logits.float() / temperature
    finite = torch.isfinite(z).all(dim=1)
    logp = torch.log_softmax(z, dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    h = torch.where(finite, h, torch.full_like(h, math.nan))
    idx = indices.long()
    counts.index_add_(0, idx, finite.to(torch.int32))
    f_new = counts.index_select(0, idx).float()
    step = torch.where(finite, (h - values.index_select(0, idx)) / f_new.clamp_min(1.0), torch.zeros_like(h))
    values.index_add_(0, idx, step)
    return h


def snapshot(*tensors):
    return [t.clone() for t in tensors]


def assert_unchanged(before, *tensors):
    for b, t in zip(before, tensors):
        assert torch.equal(b, t), "state changed by a call that raised"


# Where the Triton kernels run: natively on a GPU, else in Triton's interpreter on the CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_triton_device(x):
    """x on TRITON_DEVICE, keeping it non-contiguous (column stride 2) if it was."""
    if x.is_contiguous() or x.dim() != 2:
        return x.to(TRITON_DEVICE)
    y = torch.empty(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=TRITON_DEVICE)[:, ::2]
    y.copy_(x)
    return y


def compiled_in_subprocess(code: str):
    """Run ``code`` in a fresh Python from the repository root with Triton's compiler, not its
    interpreter (TRITON_INTERPRET removed), and return the JSON its last printed line holds."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])
