"""Attention JVP (out and t_out from q, k, v and their tangents): time and peak memory.

Workloads (bf16, all three tangents, no mask):

  B1 H32 L8192  D64    the shape public JVP kernels quote (notes/jvp_attention.md anchors)
  B1 H12 L32760 D128   Wan2.1-1.3B, 21 latent frames of 1,560 tokens
  B1 H5  L32760 D128   Wan-14B per context-parallel rank

Providers:
  fastdistill attention_jvp     the fused kernel: out and t_out in one pass
  fastdistill attention x2      two plain forwards of ours (what a JVP costs at least if done by
                                running the forward kernel twice; a JVP is 3x a forward's FLOPs)
  torch.func.jvp sdpa math      torch.func.jvp over F.scaled_dot_product_attention under the math
                                backend: the only native route (the fused SDPA kernels refuse
                                forward AD); out of memory is recorded as such  [baseline]
  jvp_flash_attention           PyPI `jvp_flash_attention` (amorehead), when it imports

TFLOP/s: 3x forward FLOPs (12 B H L^2 D), the convention of the public JVP kernels, for every
provider (x2 included, so its column compares times). Peak memory: torch.cuda.max_memory_allocated
during one call minus what was allocated before it (inputs excluded).

Correctness first: heads 0-1 of every provider's (out, t_out) are compared with the float64 reference
JVP (fastdistill.refs.attention.attention_jvp_reference, independent of the kernels) on those heads;
attention heads are independent, so this checks the full-size run. Tolerance: 5e-2 + 5e-2 relative
of the row RMS for bf16. A wrong provider is not timed.

Memory sweep: the fused kernel and the math JVP at B1 H32 D64, L = 2k..16k: the fused kernel's
extra memory grows linearly (its outputs), math SDPA's quadratically, until it runs out.

--smoke (CPU, no GPU): the reference JVP (fastdistill.attention_jvp on CPU) against torch.func.jvp of
math SDPA in fp32, correctness against float64, and peak memory (resident-set growth of a fresh
process per size: its peak reset just before the call, glibc's mmap threshold pinned so freed
buffers leave the RSS) at L = 256..2048;
exits 1 unless the reference grows sub-quadratically (x <= 2.6 per doubling of L at the largest step)
while the math JVP grows faster.

  python benchmarks/bench_jvp.py [--smoke] [--reps N] [--no-save]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import RESULTS_DIR, environment, measured_peak, parse_args, time_ms

import fastdistill
from fastdistill.refs.attention import attention_jvp_reference

SHAPES = [(1, 32, 8192, 64), (1, 12, 32760, 128), (1, 5, 32760, 128)]
SWEEP = [(1, 32, length, 64) for length in (2048, 4096, 8192, 16384)]
SMOKE_SWEEP = [(1, 4, length, 64) for length in (256, 512, 1024, 2048)]


def flops(batch, heads, length, dim) -> float:
    return 3 * 4 * batch * heads * length * length * dim  # 3x the forward's 4 B H L^2 D


def make_inputs(batch, heads, length, dim, dtype, device, seed=0):
    generator = torch.Generator(device).manual_seed(seed)
    return [torch.randn(batch, heads, length, dim, dtype=dtype, device=device, generator=generator)
            for _ in range(6)]


def fused(q, k, v, tq, tk, tv):
    return fastdistill.attention_jvp(q, k, v, tq, tk, tv)


def two_forwards(q, k, v, tq, tk, tv):
    return fastdistill.attention(q, k, v), fastdistill.attention(q, k, v)


def math_jvp(q, k, v, tq, tk, tv):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        return torch.func.jvp(F.scaled_dot_product_attention, (q, k, v), (tq, tk, tv))


def _jvp_flash_attention():
    """The PyPI jvp_flash_attention provider, or None when it does not import."""
    try:
        from jvp_flash_attention.jvp_attention import attention as jvp_attention  # noqa: F401
    except Exception:
        return None

    def run(q, k, v, tq, tk, tv):
        return torch.func.jvp(jvp_attention, (q, k, v), (tq, tk, tv))

    return run


PROVIDERS = {"fastdistill attention_jvp": fused, "fastdistill attention x2": two_forwards,
             "torch.func.jvp sdpa math": math_jvp}
BASELINE = "torch.func.jvp sdpa math"


def _row_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max over elements of |got - want| / (5e-2 + 5e-2 * row RMS of want): <= 1 passes."""
    rms = want.pow(2).mean(-1, keepdim=True).sqrt()
    return ((got.double() - want).abs() / (5e-2 + 5e-2 * rms)).max().item()


CHECK_HEADS = 2


def check(provider, inputs, exact) -> tuple[bool, float]:
    """Run at full size; compare heads [0, CHECK_HEADS) of (out, t_out) with `exact`, the float64
    reference on those heads."""
    heads = CHECK_HEADS
    out, t_out = provider(*inputs)
    if provider is two_forwards:  # computes no tangent: judge its out only
        return _row_error(out[:, :heads], exact[0]) <= 1.0, _row_error(out[:, :heads], exact[0])
    err = max(_row_error(out[:, :heads], exact[0]), _row_error(t_out[:, :heads], exact[1]))
    return err <= 1.0, err


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    del result
    return torch.cuda.max_memory_allocated() - before


def gpu_run(args) -> bool:
    peak = measured_peak("TFLOP/s")
    env = environment("cuda")
    providers = dict(PROVIDERS)
    extra = _jvp_flash_attention()
    if extra is not None:
        providers["jvp_flash_attention"] = extra
    records, ok = [], True
    print(f"== bench_jvp on {env['device']} (torch {env['torch']}, triton {env['triton']}, commit "
          f"{env['git_commit'][:12]}) ==\nmeasured bf16 matmul peak: {peak:.1f} TFLOP/s"
          + ("" if extra else "\njvp_flash_attention: not installed (does not import); not run"))
    header = f"{'shape':>22} {'provider':>27} {'check':>13} {'ms':>9} {'TFLOP/s':>8} {'% peak':>7} {'peak MiB':>9} {'x vs math':>9}"
    print(header)
    for shape in SHAPES:
        inputs = make_inputs(*shape, torch.bfloat16, "cuda")
        exact = attention_jvp_reference(*(x[:, :CHECK_HEADS].double() for x in inputs))[:2]
        rows = {}
        for name, fn in providers.items():
            row = {"provider": name, "ms": None, "peak_bytes": None, "oom": False}
            try:
                row["correct"], row["err"] = check(fn, inputs, exact)
                if row["correct"]:
                    row["peak_bytes"] = peak_extra_bytes(lambda: fn(*inputs))
                    times = torch.tensor(time_ms(lambda: fn(*inputs), "cuda", args.warmup, args.reps))
                    row["ms"] = times.median().item()
                    row["tflops"] = flops(*shape) / (row["ms"] * 1e-3) / 1e12
            except torch.OutOfMemoryError:
                row.update(correct=None, err=None, oom=True)
            except Exception as exc:  # reported, not fatal
                row.update(correct=False, err=None, error=f"{type(exc).__name__}: {exc}")
            torch.cuda.empty_cache()
            rows[name] = row
            ok &= row["correct"] is not False
        base = rows[BASELINE]["ms"]
        for row in rows.values():
            row["speedup_vs_math"] = base / row["ms"] if base and row["ms"] else None
            check_text = "OOM" if row["oom"] else ("ok" if row["correct"] else "WRONG") + (
                f" ({row['err']:.2f})" if row["err"] is not None else "")
            fmt = lambda x, s: "-" if x is None else format(x, s)  # noqa: E731
            print(f"{str(shape):>22} {row['provider']:>27} {check_text:>13} {fmt(row['ms'], '.3f'):>9} "
                  f"{fmt(row.get('tflops'), '.1f'):>8} {fmt(row.get('tflops') and 100 * row['tflops'] / peak, '.1f'):>7} "
                  f"{fmt(row['peak_bytes'] and row['peak_bytes'] / 2**20, '.0f'):>9} {fmt(row['speedup_vs_math'], '.2f'):>9}")
            if row.get("error"):
                print(f"{'':>22} error: {row['error'][:300]}")
            records.append({"case": "time", "shape": shape, **row})
        inputs = exact = None  # free before the next shape
    print("\nmemory sweep (extra peak MiB during one call; OOM = out of memory)")
    for shape in SWEEP:
        inputs = make_inputs(*shape, torch.bfloat16, "cuda")
        line = []
        for name in ("fastdistill attention_jvp", BASELINE):
            try:
                mib = peak_extra_bytes(lambda: PROVIDERS[name](*inputs)) / 2**20
                line.append(f"{name}: {mib:.0f}")
            except torch.OutOfMemoryError:
                mib = None
                line.append(f"{name}: OOM")
            torch.cuda.empty_cache()
            records.append({"case": "memory", "shape": shape, "provider": name, "peak_mib": mib})
        print(f"{str(shape):>22}  " + "   ".join(line))
        inputs = None
    if args.save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / "bench_jvp.jsonl", "a") as f:
            for record in records:
                f.write(json.dumps({"bench": "bench_jvp", **record, "peak_tflops": peak, **env}) + "\n")
    return ok


# ---------------------------------------------------------------------------------------- CPU smoke
_MEMORY_CHILD = """
import json, re, sys, torch
sys.path.insert(0, {bench_dir!r})
import bench_jvp
def rss_kib(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
torch.manual_seed(0)
name, shape = sys.argv[1], json.loads(sys.argv[2])
inputs = bench_jvp.make_inputs(*shape, torch.float32, "cpu")
fn = {{"reference": bench_jvp.fused, "math": bench_jvp.math_jvp}}[name]
fn(*bench_jvp.make_inputs(1, 1, 8, shape[3], torch.float32, "cpu"))  # imports and first-call setup
open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = rss_kib("VmRSS")
fn(*inputs)
print((rss_kib("VmHWM") - before) / 1024)
"""


def rss_growth_mib(name: str, shape) -> float:
    """Peak resident-set growth (MiB) of one call in a fresh process (Linux: the peak is reset through
    /proc/self/clear_refs just before the call). Allocations above 64 KiB are mmapped and unmapped on
    free (MALLOC_MMAP_THRESHOLD_), so freed buffers leave the RSS and the peak is what one call holds."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    code = _MEMORY_CHILD.format(bench_dir=str(Path(__file__).resolve().parent))
    proc = subprocess.run([sys.executable, "-c", code, name, json.dumps(list(shape))], capture_output=True,
                          text=True, env=env, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def smoke_run(args) -> bool:
    print("== bench_jvp --smoke (CPU): fastdistill.attention_jvp runs the reference JVP; timings of GPU "
          "code on a CPU are NOT meaningful, this checks correctness and the memory trend ==")
    ok = True
    print(f"{'shape':>20} {'provider':>12} {'max err vs fp64':>16} {'ms':>9} {'peak MiB':>9}")
    growth = {"reference": [], "math": []}
    for shape in SMOKE_SWEEP:
        inputs = make_inputs(*shape, torch.float32, "cpu")
        exact = attention_jvp_reference(*(x.double() for x in inputs))[:2]
        for name, fn in (("reference", fused), ("math", math_jvp)):
            out, t_out = fn(*inputs)
            err = max((out.double() - exact[0]).abs().max().item(), (t_out.double() - exact[1]).abs().max().item())
            ok &= err < 1e-4
            ms = torch.tensor(time_ms(lambda: fn(*inputs), "cpu", 0, 1)).median().item()
            mib = rss_growth_mib(name, shape)
            growth[name].append(mib)
            print(f"{str(shape):>20} {name:>12} {err:>16.1e} {ms:>9.1f} {mib:>9.1f}")
    ratio = {name: values[-1] / max(values[-2], 1e-9) for name, values in growth.items()}
    print(f"memory growth at the last doubling of L: reference x{ratio['reference']:.2f}, math x{ratio['math']:.2f}")
    trend_ok = ratio["reference"] <= 2.6 and ratio["math"] > ratio["reference"]
    if not trend_ok:
        print("FAIL: the reference JVP's memory does not grow sub-quadratically (or math's does not grow faster)")
    if not ok:
        print("FAIL: a provider's result is off by more than 1e-4 against float64")
    return ok and trend_ok


def main() -> int:
    args = parse_args(__doc__)
    return 0 if (smoke_run(args) if args.smoke else gpu_run(args)) else 1


if __name__ == "__main__":
    sys.exit(main())
