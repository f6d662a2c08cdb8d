"""Benchmark configuration: sizes per device, and a timer that waits for the GPU.

``pytest benchmarks/ --benchmark-only`` runs small sizes on the CPU and the
ImageNet sizes on CUDA:

=========  =====================  ===================================
 name       CPU (CI)               CUDA (ImageNet sizes)
=========  =====================  ===================================
 B, C       64, 100                256, 1000
 N          50,000                 1,281,167
 pairs      2,000 x 100 fp16       74,000 x 1000 fp16
=========  =====================  ===================================
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
SIZES = (dict(B=256, C=1000, N=1_281_167, PAIRS=74_000, ROW=1000, OFFICIAL_PAIRS=2_000, EPOCHS=15)
         if ON_GPU else
         dict(B=64, C=100, N=50_000, PAIRS=2_000, ROW=100, OFFICIAL_PAIRS=2_000, EPOCHS=40))


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def capture_graph(fn, calls: int = 100) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of ``calls`` calls of fn() (after 3 warm-up calls on the capture stream): replaying
    it times the device work without the launch cost."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(calls):
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graph


@pytest.fixture
def sizes():
    return dict(SIZES)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def run(benchmark):
    """``run(fn, *args, **extra_info)``: benchmark fn(*args), synchronising the GPU inside the timed call."""

    def _run(fn, *args, **extra):
        benchmark.extra_info.update(extra)
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"

        def timed():
            out = fn(*args)
            sync()
            return out

        fn(*args)  # warm-up: Triton compilation, allocator
        sync()
        return benchmark(timed)

    return _run


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers were measured on: device, versions, date."""
    import datetime

    import kcd_fast

    machine_info["device"] = torch.cuda.get_device_name() if ON_GPU else "cpu"
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda
    try:
        import triton

        machine_info["triton"] = triton.__version__
    except ImportError:
        machine_info["triton"] = None
    machine_info["kcd_fast"] = kcd_fast.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["date"] = datetime.datetime.now().isoformat(timespec="seconds")
