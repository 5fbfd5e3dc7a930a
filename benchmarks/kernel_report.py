"""Ahead-of-time compile report of fastdistill's GPU kernels; needs no GPU.

Triton: every configuration of every kernel in `fastdistill.kernels.registered_kernels()` is compiled
with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, and the cubin is read with
Triton's bundled cuobjdump: registers, stack/local memory, static shared memory (plus the dynamic shared
memory Triton requests at launch) and, on sm_90, whether the SASS contains HGMMA (wgmma).

CUDA: every `csrc/**/*.cu` is compiled with nvcc (the flags setup.py uses, plus `-Xptxas -v`) for
sm_80 and sm_90a; ptxas's log gives each kernel's registers, spill stores/loads, stack and static
shared memory, and the sm_90a SASS says whether it uses HGMMA.

Spills: ptxas reports spill stores/loads for the CUDA kernels. For a Triton cubin only the per-thread
local memory (cuobjdump's STACK + LOCAL) is known; a Triton kernel has no local arrays, so local
memory means spilled registers (the same measure as Triton's runtime `n_spills`, which reads
CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES).

Exit status 1 when a *default* Triton configuration or any .cu kernel spills, or anything fails to
compile; non-default configurations are reported but do not fail the run.

  python benchmarks/kernel_report.py [--arch 90,80] [--skip-triton] [--skip-cuda] [--kernels attn_jvp,...]
                                     [--cu-files A.cu ...] [--jobs 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CSRC = REPO_ROOT / "csrc"
# Keep in step with the "nvcc" flags in setup.py plus the defines torch's cpp_extension adds
# (COMMON_NVCC_FLAGS, also in CMakeLists.txt): register allocation depends on them.
NVCC_FLAGS = ("-O3", "-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
              "-Xptxas", "-v")


@dataclass
class KernelRow:
    """One kernel compiled for one arch (and, for Triton, one configuration).

    default:     whether a spill or compile error fails the report: Triton configurations marked
                 default, and every CUDA kernel (each one ships).
    spill_bytes: CUDA: ptxas spill stores + spill loads; Triton: local memory per thread (see above).
    smem_bytes:  CUDA: static shared memory; Triton: static + the dynamic amount requested at launch.
    hgmma:       whether the SASS uses wgmma; None on sm_80 (no wgmma there) or when not compiled.
    """

    source: str  # "triton" or the .cu path (relative to the repository when inside it)
    kernel: str
    config: str  # Triton configuration name; "" for CUDA
    arch: str
    default: bool
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    smem_bytes: int | None = None
    hgmma: bool | None = None
    error: str | None = None


def _cuobjdump(*args: str) -> str:
    """Run Triton's bundled cuobjdump (present wherever Triton's CUDA backend is, unlike the toolkit's)."""
    from triton import knobs

    return subprocess.run([knobs.nvidia.cuobjdump.path, *args], capture_output=True, text=True,
                          check=True).stdout


def _hgmma_by_function(binary: Path) -> dict[str, bool]:
    """Function name -> whether its SASS contains an HGMMA instruction."""
    found: dict[str, bool] = {}
    name = None
    for line in _cuobjdump("--dump-sass", str(binary)).splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            name = m.group(1)
            found.setdefault(name, False)
        elif name is not None and "HGMMA" in line:
            found[name] = True
    return found


def _resource_usage(binary: Path) -> dict[str, dict[str, int]]:
    """Function name -> {"REG", "STACK", "SHARED", "LOCAL", ...} from cuobjdump --dump-resource-usage."""
    text = _cuobjdump("--dump-resource-usage", str(binary))
    return {m.group(1): {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(2))}
            for m in re.finditer(r"Function (\S+):\n(.*)", text)}


def triton_available() -> bool:
    """Whether Triton with its CUDA backend (and so its ptxas/cuobjdump) is installed."""
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


def compile_triton(entry: Any, config: Any, arch: int) -> KernelRow:
    """Compile one registered configuration for sm_<arch> and read its cubin.

    entry/config are `fastdistill.kernels.KernelEntry`/`KernelConfig`. The signature lists constexpr
    parameters as "constexpr" and their values come from config.constexprs keyed by name, the form
    `ASTSource` accepts from Triton 3.3 on.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = KernelRow("triton", entry.name, config.name, f"sm_{arch}", default=config.default)
    # Mirror the launcher's run-time specialization (KernelEntry.hints): arguments equal to 1 become
    # constants, arguments divisible by 16 get the divisibility attribute, as in triton/tools/compile.py.
    hints = getattr(entry, "hints", {})
    signature, constexprs = dict(entry.signature), dict(config.constexprs)
    attrs = {}
    for index, name in enumerate(entry.fn.arg_names):
        if hints.get(name) == 1:
            signature[name], constexprs[name] = "constexpr", 1
        elif hints.get(name) == 16:
            attrs[(index,)] = [["tt.divisibility", 16]]
    try:
        compiled = triton.compile(ASTSource(entry.fn, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    except Exception as exc:  # a config that does not compile is a report line, not a crash
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / f"{entry.name}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        (usage,) = _resource_usage(cubin).values()  # a Triton cubin holds exactly its one kernel
        hgmma = any(_hgmma_by_function(cubin).values()) if arch >= 90 else None
    row.registers = usage["REG"]
    row.spill_bytes = usage["STACK"] + usage["LOCAL"]
    row.stack_bytes = usage["STACK"]
    row.smem_bytes = usage["SHARED"] + compiled.metadata.shared
    row.hgmma = hgmma
    return row


def triton_rows(entries: Sequence[Any], archs: Sequence[int]) -> list[KernelRow]:
    """Every configuration of every entry on every arch (serially: Triton compiles in-process)."""
    return [compile_triton(e, c, a) for e in entries for c in e.configs for a in archs]


def find_nvcc() -> str | None:
    """nvcc on PATH, else under $CUDA_HOME or /usr/local/cuda."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") or shutil.which("nvcc", path=str(Path(cuda_home) / "bin"))


def _ptxas_kernels(log: str) -> dict[str, dict[str, int]]:
    """Entry function name -> registers, spills, stack, smem from `ptxas -v` output.

    Only entry functions (kernels) are kept; `Function properties` blocks of non-inlined device
    functions are skipped because no `Compiling entry function` line opened them.
    """
    kernels: dict[str, dict[str, int]] = {}
    entry = properties_of = None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            entry = m.group(1)
            kernels[entry] = {"smem": 0}
        elif m := re.search(r"Function properties for (\S+)", line):
            properties_of = m.group(1)
        elif entry is not None and properties_of == entry and (m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            kernels[entry].update(stack=int(m.group(1)), spills=int(m.group(2)) + int(m.group(3)))
        elif entry is not None and (m := re.search(r"Used (\d+) registers", line)):
            kernels[entry]["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                kernels[entry]["smem"] = int(s.group(1))
            entry = None  # the "Used" line closes the entry's block
    return kernels


def _demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable kernel names without parameter lists; unchanged when c++filt (binutils,
    which nvcc's host toolchain brings) is missing or fails."""
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return {n: n for n in names}
    proc = subprocess.run([filt, "-p"], input="\n".join(names), capture_output=True, text=True)
    readable = proc.stdout.splitlines()
    if proc.returncode != 0 or len(readable) != len(names):
        return {n: n for n in names}
    return {n: d.removeprefix("void ") for n, d in zip(names, readable)}


def compile_cu(nvcc: str, path: Path, arch: int) -> list[KernelRow]:
    """Compile one .cu file for sm_80 (arch 80) or sm_90a (arch 90: wgmma needs the "a" target)."""
    sm = f"{arch}a" if arch >= 90 else str(arch)
    source = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
    with tempfile.TemporaryDirectory() as tmp:
        obj = Path(tmp) / "kernel.o"
        proc = subprocess.run([nvcc, "-c", "-o", str(obj), *NVCC_FLAGS, "-I", str(CSRC),
                               f"-gencode=arch=compute_{sm},code=sm_{sm}", str(path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return [KernelRow(source, "(compile)", "", f"sm_{sm}", default=True,
                              error=(proc.stderr or proc.stdout).strip())]
        kernels = _ptxas_kernels(proc.stdout + proc.stderr)
        hgmma = _hgmma_by_function(obj) if arch >= 90 else {}
    names = _demangle(sorted(kernels))
    return [KernelRow(source, names[name], "", f"sm_{sm}", default=True, registers=k["registers"],
                      spill_bytes=k["spills"], stack_bytes=k["stack"], smem_bytes=k["smem"],
                      hgmma=hgmma.get(name, False) if arch >= 90 else None)
            for name, k in sorted(kernels.items())]


def cuda_rows(nvcc: str, files: Sequence[Path], archs: Sequence[int], jobs: int) -> list[KernelRow]:
    """Every kernel of every file on every arch; nvcc runs `jobs` at a time."""
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = pool.map(lambda fa: compile_cu(nvcc, *fa), [(f, a) for f in files for a in archs])
        return [row for rows in results for row in rows]


def failures(rows: Sequence[KernelRow]) -> list[KernelRow]:
    """Rows that fail the report: default configurations / CUDA kernels that do not compile or spill."""
    return [r for r in rows if r.default and (r.error is not None or (r.spill_bytes or 0) > 0)]


def format_table(rows: Sequence[KernelRow]) -> str:
    """One aligned line per row, then the full text of every compile error."""

    def cell(x: Any) -> str:
        return "-" if x is None else "yes" if x is True else "no" if x is False else str(x)

    def status(r: KernelRow) -> str:
        problem = "FAILED" if r.error else "SPILLS" if r.spill_bytes else None
        return "ok" if problem is None else problem if r.default else f"{problem.lower()} (not default)"

    lines = [("source", "kernel", "config", "arch", "regs", "spill B", "stack B", "smem B", "HGMMA",
              "default", "status")]
    lines += [(r.source, r.kernel, r.config or "-", r.arch, cell(r.registers), cell(r.spill_bytes),
               cell(r.stack_bytes), cell(r.smem_bytes), cell(r.hgmma), cell(r.default), status(r))
              for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    errors = [f"\n{r.source} {r.kernel} {r.config} {r.arch}:\n{r.error}" for r in rows if r.error]
    return "\n".join(table + errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="90,80",
                        help="comma-separated archs (90 = sm_90 for Triton, sm_90a for nvcc)")
    parser.add_argument("--skip-triton", action="store_true", help="skip the Triton kernels")
    parser.add_argument("--skip-cuda", action="store_true", help="skip the .cu files")
    parser.add_argument("--kernels", help="only the Triton kernels whose names start with one of these "
                        "comma-separated prefixes (e.g. attn_jvp)")
    parser.add_argument("--cu-files", nargs="+", type=Path,
                        help="compile these .cu files instead of csrc/**/*.cu")
    parser.add_argument("--jobs", type=int, default=2, help="nvcc processes at once (default 2)")
    parser.add_argument("--json", type=Path, help="also write the rows and failures as JSON here")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    rows: list[KernelRow] = []
    problems: list[str] = []  # missing tools: the report cannot vouch for what it did not compile

    if not args.skip_triton:
        t0 = time.perf_counter()
        if triton_available():
            import fastdistill.kernels

            entries = fastdistill.kernels.registered_kernels()
            if args.kernels:
                entries = [e for e in entries if e.name.startswith(tuple(args.kernels.split(",")))]
            rows += triton_rows(entries, archs)
            n_configs = sum(len(e.configs) for e in entries)
            print(f"{len(entries)} Triton kernels registered ({n_configs} configs x {len(archs)} archs, "
                  f"{time.perf_counter() - t0:.1f} s)")
        else:
            problems.append("Triton with its CUDA backend is not installed (use --skip-triton)")

    if not args.skip_cuda:
        t0 = time.perf_counter()
        files = args.cu_files or sorted(CSRC.rglob("*.cu"))
        nvcc = find_nvcc()
        if nvcc is None:
            problems.append("nvcc not found on PATH or in $CUDA_HOME/bin (use --skip-cuda)")
        elif not triton_available():
            problems.append("the CUDA part reads SASS with Triton's bundled cuobjdump; install triton")
        else:
            rows += cuda_rows(nvcc, [f.resolve() for f in files], archs, args.jobs)
            print(f"{len(files)} .cu files compiled with {nvcc} ({time.perf_counter() - t0:.1f} s)")

    if rows:
        print(format_table(rows))
    failed = failures(rows)
    problems += [f"{r.source} {r.kernel} {r.config} {r.arch}: "
                 f"{'does not compile' if r.error else f'spills {r.spill_bytes} bytes'}" for r in failed]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "problems": problems},
                                        indent=1) + "\n")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
