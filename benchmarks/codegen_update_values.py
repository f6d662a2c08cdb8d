"""What the compiler makes of the update_values kernel for a Hopper GPU, on a machine without one.

At B=256, C=1000 the kernel is latency-bound (one short program per row), so the number of
instructions a program issues and the block-wide barriers it waits at are what its launch options
change. This script compiles the kernel ahead of time for sm_90 (H100/H200) with each launch
option (num_warps, vectorised row loads or not, the one-tile or the chunked path), exactly as a
launch on a contiguous [B, C] tensor with int64 indices would specialise it, and counts from the
PTX and SASS: global loads (scalar and 16-byte), barriers, warp shuffles and instructions. No GPU
is needed, only Triton's bundled ptxas and cuobjdump.

    python -m benchmarks.codegen_update_values                  # the table
    python -m benchmarks.codegen_update_values --json out.json

Counts are static (the whole kernel, including the rarely taken duplicate path), so they predict
direction, not microseconds: the sweep (sweep_update_values.py) measures those on a GPU.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import subprocess
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    raise RuntimeError("codegen_update_values compiles for a GPU target: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kcd_fast.kernels.update_values import _update_values_kernel, launch_config, one_tile  # noqa: E402

TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_variant(dtype: torch.dtype = torch.float32, batch: int = 256, num_classes: int = 1000, *,
                    num_warps: int | None = None, tile: bool | None = None, vectorize: bool = True,
                    capability: int = 90):
    """The kernel compiled for ``sm_<capability>`` as :func:`update_values_triton` would launch it on
    contiguous [batch, num_classes] logits of ``dtype`` (its :func:`launch_config`, with the same
    overrides), specialised as Triton would: unit strides become constants, 16-byte-aligned pointers
    are marked so, B, C and N stay runtime values (``do_not_specialize``)."""
    logits = torch.empty(batch, num_classes, dtype=dtype, device="meta")
    config = launch_config(logits, num_warps=num_warps, tile=tile, vectorize=vectorize)
    num_warps = config.pop("num_warps")
    pointers = {"logits_ptr": "*" + TRITON_DTYPE[dtype], "indices_ptr": "*i64", "values_ptr": "*fp32",
                "counts_ptr": "*i32", "entropy_ptr": "*fp32", "error_ptr": "*i32"}
    constexprs = {"stride_lc": 1, "stride_i": 1, **config}
    signature, attrs = {}, {}
    for i, name in enumerate(_update_values_kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "inv_temperature":
            signature[name] = "fp32"
        else:  # stride_lb = C, B, C, N; Triton marks an int divisible by 16, except those not specialised
            signature[name] = "i32"
            if name == "stride_lb" and num_classes % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=_update_values_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def _sass_opcodes(cubin: bytes) -> list[str] | None:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    ops = []
    for line in out.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            ops.append(m.group(1))
    return ops


def stats(kernel) -> dict:
    """Static counts from one compiled kernel's PTX (and SASS where cuobjdump is bundled)."""
    ptx = kernel.asm["ptx"]
    loads = re.findall(r"ld\.global[\w.:]*", ptx)
    first_barrier = ptx.find("bar.sync")
    early = re.findall(r"ld\.global[\w.:]*", ptx[:first_barrier] if first_barrier >= 0 else ptx)
    row = {
        "ptx_global_loads": len(loads),
        "ptx_16_byte_loads": sum(1 for x in loads if ".v4.b32" in x),
        # 4-byte scalar loads before the first block reduction: where rows load in 16-byte pieces
        # (and indices in 8), these can only be the sample's state (F, V), read with the row.
        "ptx_b32_loads_before_first_barrier": sum(1 for x in early if x == "ld.global.b32"),
        "ptx_barriers": ptx.count("bar.sync"),
        "ptx_shuffles": ptx.count("shfl.sync"),
    }
    ops = _sass_opcodes(kernel.asm["cubin"])
    if ops is not None:
        count = collections.Counter(ops)
        # STL: ptxas spilled a register to the stack (it then waits for the value where it stores it).
        row.update(sass_instructions=len(ops), sass_LDG=count["LDG"], sass_BAR=count["BAR"], sass_MUFU=count["MUFU"],
                   sass_STL=count["STL"])
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    rows = []
    paths = (True, False) if one_tile(args.batch, args.classes) else (False,)
    for dtype, vectorize, tile, w in itertools.product((torch.float32, torch.bfloat16), (True, False), paths,
                                                       args.warps):
        kernel = compile_variant(dtype, args.batch, args.classes, num_warps=w, tile=tile, vectorize=vectorize)
        row = {"dtype": str(dtype)[6:], "num_warps": w, "tile": tile, "vectorize": vectorize, **stats(kernel)}
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "B": args.batch, "C": args.classes,
                       "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
