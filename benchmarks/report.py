"""Turn a pytest-benchmark JSON into a performance table (docs/performance.md).

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json > report.md

For each benchmark group (what is measured: update_values, the E-step, rank, vaks_mix_, the KD
loss, the KD step, a trainer epoch), it lists each provider's median, the ratio to kcd_fast, and
where the case carries its bytes, the effective bandwidth. The header names the device, the versions and
the date the JSON was measured on.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict


def _fmt_time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} µs"


def per_call(bench: dict) -> float:
    """Median seconds of one call of the measured operation (graph replays hold several calls)."""
    calls = bench.get("extra_info", {}).get("calls_per_round", 1)
    return bench["stats"]["median"] / calls


def per_unit(bench: dict) -> float:
    """Seconds per unit of work, so that providers timed on different sizes (e.g. the official
    mixing loop on fewer pairs) compare fairly."""
    return per_call(bench) / bench.get("extra_info", {}).get("pairs", 1)


def render(data: dict) -> str:
    info = data.get("machine_info", {})
    lines = [
        f"Measured {info.get('date', data.get('datetime', '?'))} on **{info.get('device', '?')}** "
        f"(torch {info.get('torch', '?')}, CUDA {info.get('cuda', '?')}, triton {info.get('triton', '?')}, "
        f"kcd_fast {info.get('kcd_fast', '?')}, Python {info.get('python_version', '?')}, "
        f"{info.get('threads', '?')} CPU threads). Medians of one call (or one step); ratio = provider / base per unit of work, where the "
        f"base is kcd_fast (or, for the knowledge sources, the online teacher).",
        "",
        "| case | provider | median | ratio to base | effective bandwidth |",
        "| --- | --- | --- | --- | --- |",
    ]
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    for group in sorted(groups):
        rows = groups[group]
        providers = {_provider(b): per_unit(b) for b in rows}
        base = providers.get("kcd_fast", providers.get("online"))
        for b in sorted(rows, key=per_unit):
            provider = _provider(b)
            t = per_call(b)
            ratio = f"{per_unit(b) / base:.2f}x" if base else "-"
            extra = b.get("extra_info", {})
            bw = f"{extra['bytes'] / t / 1e9:.1f} GB/s" if "bytes" in extra else ""
            lines.append(f"| {group} | {provider} | {_fmt_time(t)} | {ratio} | {bw} |")
    return "\n".join(lines) + "\n"


def _provider(b: dict) -> str:
    """The provider column: the ``provider`` parameter, else the one recorded in extra_info, else the name."""
    return (b.get("params") or {}).get("provider") or b.get("extra_info", {}).get("provider") or b["name"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a file written by pytest --benchmark-json")
    p.add_argument("--strip-data", action="store_true",
                   help="rewrite the JSON without the per-round timings (the statistics stay), before committing it")
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    if args.strip_data:
        for b in data["benchmarks"]:
            b["stats"].pop("data", None)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    sys.stdout.write(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
