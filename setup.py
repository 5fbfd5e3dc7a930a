"""Builds fastdistill._C, the C++/CUDA core, with torch's cpp_extension and ninja.

The CPU implementation of every op always builds. The CUDA implementations build when the installed
torch has CUDA and nvcc is found; override with FASTDISTILL_FORCE_CUDA=1 or FASTDISTILL_SKIP_CUDA=1.
FASTDISTILL_ARCHS picks the gencodes (default "80;90a": sm_80 and sm_90a). MAX_JOBS limits ninja's
parallel compiles. Package metadata lives in pyproject.toml.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
CUDA_GLUE = os.path.join(CSRC, "registration_cuda.cpp")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _use_cuda() -> bool:
    if _flag("FASTDISTILL_SKIP_CUDA"):
        return False
    if _flag("FASTDISTILL_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError(
                "FASTDISTILL_FORCE_CUDA=1 but the installed torch is a CPU build (it ships no c10/cuda "
                "headers); install a CUDA build of torch, or unset FASTDISTILL_FORCE_CUDA"
            )
        if cpp_extension.CUDA_HOME is None:
            raise RuntimeError("FASTDISTILL_FORCE_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("FASTDISTILL_ARCHS", "80;90a").replace(",", ";").split(";")]
    return [a for a in archs if a]


def _gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the first portable one (not an "a" arch) so GPUs newer than the
    listed archs can still JIT the kernels."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    portable = [a for a in archs if not a.endswith("a")]
    if portable:
        flags.append(f"-gencode=arch=compute_{portable[0]},code=compute_{portable[0]}")
    return flags


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    cxx_flags = ["-O3", "-std=c++17"]
    if not _use_cuda():
        sources = [os.path.relpath(s, ROOT) for s in cpp_sources if s != CUDA_GLUE]
        return cpp_extension.CppExtension(
            "fastdistill._C", sources, include_dirs=[CSRC], extra_compile_args={"cxx": cxx_flags}
        )
    archs = _archs()
    cu_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    # Comma-separated tokens (sm_80,sm_90a): no quotes or semicolons for the shell that runs ninja;
    # registration.cpp turns them into a string.
    archs_define = [f"-DFASTDISTILL_CUDA_ARCHS={','.join('sm_' + a for a in archs)}"]
    return cpp_extension.CUDAExtension(
        "fastdistill._C",
        [os.path.relpath(s, ROOT) for s in cpp_sources + cu_sources],
        include_dirs=[CSRC],
        extra_compile_args={
            "cxx": cxx_flags + archs_define,
            # No --use_fast_math: it would flush fp32 denormals and contract differently from the CPU
            # path; these kernels are memory-bound and gain nothing from it.
            "nvcc": ["-O3", "-std=c++17", *_gencode_flags(archs)],
        },
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
