"""Build kcd_fast: the Python package, the Triton kernels and the C++/CUDA extension kcd_fast._C.

The C++ CPU kernels are always built. The CUDA sources (csrc/cuda/*.cu) are
added when nvcc and a CUDA build of torch are both present, or when
FORCE_CUDA=1; KCD_FAST_CPU_ONLY=1 turns CUDA off. TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured (torch.utils.cpp_extension reads them); with no GPU
visible and no TORCH_CUDA_ARCH_LIST, we build for Hopper (9.0), the GPUs this
project is measured on. Install with

    pip install --no-build-isolation -e .

(--no-build-isolation: the build needs the torch you have installed.)
"""
import glob
import os
import site
import sys

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("KCD_FAST_CPU_ONLY"):
        return False, "KCD_FAST_CPU_ONLY=1"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"nvcc at {CUDA_HOME} and torch {torch.__version__} (CUDA {torch.version.cuda})"


def _nvidia_include_dirs():
    """The nvidia/*/include folders of site-packages (pip's CUDA wheels).

    A minimal CUDA toolkit may lack headers (cusparse.h) that torch's CUDA
    headers include; the pip wheels that torch depends on carry them.
    """
    roots = list(site.getsitepackages()) + [site.getusersitepackages()]
    roots += [os.path.dirname(os.path.dirname(torch.__file__))]
    dirs = []
    for root in roots:
        for d in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if d not in dirs:
                dirs.append(d)
    return dirs


def extensions():
    use_cuda, why = _want_cuda()
    sources = ["csrc/kcd_fast.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # No contraction of a*b + c into an FMA on either side: the CPU and CUDA kernels then do the same
    # IEEE operations and agree bit for bit (the tests check it); the kernels are memory-bound.
    cxx = ["-O3", "-g0", "-fvisibility=hidden", "-ffp-contract=off"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, py_limited_api=True)
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "--extended-lambda", "--fmad=false"]
        kwargs["include_dirs"] = _nvidia_include_dirs()
        ext = CUDAExtension("kcd_fast._C", sources, **kwargs)
    else:
        ext = CppExtension("kcd_fast._C", sources, **kwargs)
    print(f"kcd_fast: building kcd_fast._C with {'CPU + CUDA' if use_cuda else 'CPU only'} kernels ({why})",
          file=sys.stderr)
    if use_cuda:
        print(f"kcd_fast: TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')}, "
              f"MAX_JOBS={os.environ.get('MAX_JOBS', '(torch default)')}", file=sys.stderr)
    print(f"kcd_fast: sources: {' '.join(sources)}", file=sys.stderr)
    return [ext]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
