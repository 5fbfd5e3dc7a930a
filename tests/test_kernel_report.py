"""benchmarks/kernel_report.py: the ahead-of-time compile report catches spills and finds HGMMA.

Runs without a GPU: Triton compiles for sm_90/sm_80 through `GPUTarget`, nvcc compiles for
sm_80/sm_90a, and the report reads the results with ptxas -v and cuobjdump.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kernel_report  # benchmarks/ is on pytest's pythonpath (pyproject.toml), as for a script there
import pytest

from fastdistill.kernels import KernelConfig, KernelEntry

# Ahead-of-time compilation cannot share a process with the Triton interpreter (TRITON_INTERPRET=1,
# set by conftest.py on machines without a GPU): triton.language's own jit helpers are then
# interpreted functions. test_triton_compiles_in_a_process_without_the_interpreter reruns these.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not kernel_report.triton_available() or INTERPRETED,
                                  reason="needs Triton's CUDA backend (ptxas, cuobjdump) in a non-interpreted process")
needs_nvcc = pytest.mark.skipif(kernel_report.find_nvcc() is None or not kernel_report.triton_available(),
                                reason="needs nvcc (and Triton's cuobjdump)")

if kernel_report.triton_available():
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    # JITFunction directly rather than @triton.jit: under TRITON_INTERPRET=1 (set for the CPU test run)
    # triton.jit returns an interpreted function, which cannot be compiled ahead of time.

    @JITFunction
    def _dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        """One BLOCK x BLOCK fp16 tile product; at 64x64 with 4 warps sm_90 runs it on wgmma (HGMMA)."""
        offs = tl.arange(0, BLOCK)
        tile = offs[:, None] * BLOCK + offs[None, :]
        c = tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile))
        tl.store(c_ptr + tile, c)

    @JITFunction
    def _wide_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
        """A BLOCK x BLOCK fp32 tile held by one warp: with BLOCK=128 that is 512 values a thread."""
        offs = tl.arange(0, BLOCK)
        tile = offs[:, None] * BLOCK + offs[None, :]
        x = tl.load(x_ptr + tile)
        tl.store(y_ptr + tile, tl.cumsum(x * x, axis=1) + tl.sum(x, axis=0)[None, :])


def _dot_entry(block: int = 64) -> KernelEntry:
    """The dot kernel registered with one default configuration of BLOCK x BLOCK tiles and 4 warps."""
    return KernelEntry(
        "dot", _dot_kernel, {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "BLOCK": "constexpr"},
        (KernelConfig(f"{block}x{block}", {"BLOCK": block}, num_warps=4, num_stages=2, default=True),))


@needs_triton
def test_triton_dot_kernel_compiles_without_spills_and_uses_hgmma_on_sm90():
    sm90, sm80 = kernel_report.triton_rows([_dot_entry()], [90, 80])
    for row in (sm90, sm80):
        assert row.error is None
        assert row.registers > 0
        assert row.spill_bytes == 0
        assert row.smem_bytes > 0  # tl.dot stages its operands through shared memory
    assert (sm90.arch, sm80.arch) == ("sm_90", "sm_80")
    assert sm90.hgmma is True
    assert sm80.hgmma is None
    assert kernel_report.failures([sm90, sm80]) == []
    assert "64x64" in kernel_report.format_table([sm90, sm80])


@needs_triton
def test_main_reports_registered_triton_kernels(monkeypatch, capsys):
    import fastdistill.kernels

    monkeypatch.setattr(fastdistill.kernels, "registered_kernels", lambda: [_dot_entry()])
    assert kernel_report.main(["--skip-cuda", "--arch", "90"]) == 0
    out = capsys.readouterr().out
    assert "1 Triton kernels registered" in out
    (row,) = [line for line in out.splitlines() if line.startswith("triton")]
    assert row.split()[-3:] == ["yes", "yes", "ok"]  # HGMMA, default, status


@needs_triton
def test_triton_spill_fails_only_a_default_config():
    entry = KernelEntry("wide", _wide_kernel, {"x_ptr": "*fp32", "y_ptr": "*fp32", "BLOCK": "constexpr"},
                        (KernelConfig("128x128 w1", {"BLOCK": 128}, num_warps=1, num_stages=1),))
    (row,) = kernel_report.triton_rows([entry], [90])  # sm_80 compiles this one ~5x slower
    assert row.spill_bytes > 0
    assert kernel_report.failures([row]) == []  # not a default config: reported, not failing
    row.default = True
    assert kernel_report.failures([row]) == [row]
    assert "SPILLS" in kernel_report.format_table([row])


@needs_triton
def test_triton_compile_error_is_a_row_not_a_crash():
    (row,) = kernel_report.triton_rows([_dot_entry(block=48)], [80])  # tl.arange needs a power of 2
    assert row.error is not None and row.registers is None
    assert kernel_report.failures([row]) == [row]


_TRIVIAL_CU = """
__global__ void add_one(float* x, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += 1.0f;
}
template <typename T> __global__ void scale(T* x, T s) { x[threadIdx.x] *= s; }
template __global__ void scale<float>(float*, float);
"""

# 1024 threads x 2 blocks per SM cap the kernel at 32 registers while 64 accumulators stay live.
_SPILLING_CU = """
__global__ void __launch_bounds__(1024, 2) pressure(const float* x, float* y) {
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = x[threadIdx.x + i * 1024];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = acc[i] * acc[(i + r + 1) % 64] + 1.0f;
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 64; ++i) s += acc[i] * acc[63 - i];
  y[threadIdx.x] = s;
}
"""


@needs_nvcc
def test_cuda_kernels_parse_registers_and_demangle(tmp_path):
    cu = tmp_path / "trivial.cu"
    cu.write_text(_TRIVIAL_CU)
    rows = kernel_report.cuda_rows(kernel_report.find_nvcc(), [cu], [80, 90], jobs=2)
    assert sorted((r.arch, r.kernel) for r in rows) == [
        ("sm_80", "add_one"), ("sm_80", "scale<float>"), ("sm_90a", "add_one"), ("sm_90a", "scale<float>")]
    for row in rows:
        assert row.error is None
        assert row.registers > 0
        assert row.spill_bytes == 0 and row.stack_bytes == 0
        assert row.hgmma is (False if row.arch == "sm_90a" else None)
    assert kernel_report.failures(rows) == []


@needs_nvcc
def test_exit_status(tmp_path, capsys):
    trivial, spilling, broken = (tmp_path / n for n in ("trivial.cu", "spilling.cu", "broken.cu"))
    trivial.write_text(_TRIVIAL_CU)
    spilling.write_text(_SPILLING_CU)
    broken.write_text("__global__ void broken(float* x) { x[0] = undeclared; }\n")
    report = tmp_path / "out" / "report.json"

    def run(*files: Path) -> int:
        return kernel_report.main(["--skip-triton", "--arch", "80", "--json", str(report),
                                   "--cu-files", *map(str, files)])

    assert run(trivial) == 0
    assert run(trivial, spilling) == 1
    assert "pressure" in capsys.readouterr().err
    assert run(broken) == 1
    assert "undeclared" in capsys.readouterr().out  # nvcc's message is in the report
    (problem,) = json.loads(report.read_text())["problems"]
    assert "broken.cu" in problem and "does not compile" in problem


@pytest.mark.skipif(not INTERPRETED or not kernel_report.triton_available(), reason="runs the Triton tests directly")
def test_triton_compiles_in_a_process_without_the_interpreter():
    """Reruns this file's Triton ahead-of-time tests in a fresh process with the interpreter off."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "triton"],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout, result.stdout[-2000:]
