"""Benchmark harness shared by every `benchmarks/bench_<op>.py`.

A benchmark is a set of providers (ways of computing one op: our kernel, the PyTorch way, ...) run on a
list of cases (shapes). For every case the harness

1. checks correctness first: each provider runs on fresh inputs and its output is compared with the
   bench's reference output; a wrong (or raising) provider is reported as such and not timed;
2. times the correct providers: on CUDA with CUDA events around each call (L2 flushed between calls,
   as `triton.testing.do_bench` does), after a warm-up, keeping the median and the 20th/80th
   percentiles; on CPU (smoke runs only) with `time.perf_counter`;
3. turns the median into GB/s or TFLOP/s from the bench's byte or FLOP count, into a percentage of the
   peak *measured* in the same run (device-to-device copy bandwidth, or a large bf16 matmul), and into a
   speed-up over every baseline provider of the same case;
4. prints one aligned table and, unless told not to, appends one JSON line per (case, provider) to
   `benchmarks/results/<bench name>.jsonl` with the GPU, torch/triton/CUDA versions and git commit.

A bench script is `args = parse_args(__doc__)`, a `Benchmark`, a list of `Case`s and
`sys.exit(0 if run(bench, cases, args) else 1)`.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_REPO_ROOT = RESULTS_DIR.parent.parent
_L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100: 50 MiB)
_UNIT_SCALE = {"GB/s": 1e9, "TFLOP/s": 1e12}


@dataclass(frozen=True)
class Provider:
    """One way of computing the op.

    fn(inputs) runs the op on the inputs a `Case` prepared and returns its output: a tensor or a tuple
    of tensors with the structure the reference returns (an in-place op returns the tensors it wrote).
    Speed-ups are reported against every provider marked `baseline`.
    """

    name: str
    fn: Callable[[Any], Any]
    baseline: bool = False


@dataclass(frozen=True)
class Case:
    """One shape of the benchmark.

    params:      shape parameters (JSON values, the same keys in every case of a bench), printed in
                 the table and recorded in the JSON lines.
    make_inputs: returns fresh inputs; must be deterministic (seeded) because the reference and every
                 provider each get their own copy, so an in-place provider cannot pass on the strength
                 of another provider's writes.
    atol, rtol:  an output element passes when |out - ref| <= atol + rtol * |ref|; they travel with the
                 case because they depend on its dtype.
    """

    params: dict[str, Any]
    make_inputs: Callable[[], Any]
    atol: float
    rtol: float


@dataclass(frozen=True)
class Benchmark:
    """What is measured and how it is judged.

    reference: inputs -> expected output, usually computed in a wider dtype than the providers.
    unit:      "GB/s" (work counts bytes moved) or "TFLOP/s" (work counts FLOPs).
    work:      case params -> bytes or FLOPs of one call of the op (the op's necessary traffic or math,
               not what a particular provider happens to do).
    """

    name: str
    providers: Sequence[Provider]
    reference: Callable[[Any], Any]
    unit: str
    work: Callable[[dict[str, Any]], float]

    def __post_init__(self) -> None:
        if self.unit not in _UNIT_SCALE:
            raise ValueError(f"Benchmark {self.name!r}: unit must be one of {list(_UNIT_SCALE)}, got {self.unit!r}")


def parse_args(description: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line every bench shares: --smoke, --save/--no-save, --reps.

    Adds the resolved `device` ("cuda", or "cpu" for --smoke), `warmup` and `save` to the namespace.
    Without --smoke a CUDA device is required: timings of GPU kernels on a CPU mean nothing.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU: checks correctness and the harness, not speed")
    parser.add_argument("--save", action=argparse.BooleanOptionalAction, default=None,
                        help="append JSON lines to benchmarks/results/ (default: on, off with --smoke)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed calls per provider and case (default: 100, 5 with --smoke)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.exit(2, f"{parser.prog}: needs a CUDA GPU; use --smoke for a CPU check of correctness\n")
    args.device = "cpu" if args.smoke else "cuda"
    args.reps = args.reps or (5 if args.smoke else 100)
    args.warmup = 1 if args.smoke else 10
    args.save = not args.smoke if args.save is None else args.save
    return args


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def compare(out: Any, ref: Any, atol: float, rtol: float) -> tuple[bool, float]:
    """(passes, max |out - ref|) over all output tensors; a NaN counts as an infinite error."""
    outs, refs = _as_tuple(out), _as_tuple(ref)
    if len(outs) != len(refs) or any(o.shape != r.shape for o, r in zip(outs, refs)):
        return False, float("inf")
    ok, worst = True, 0.0
    for o, r in zip(outs, refs):
        r = r.float()
        diff = torch.nan_to_num((o.float() - r).abs(), nan=float("inf"))
        ok &= bool((diff <= atol + rtol * r.abs()).all())
        worst = max(worst, diff.max().item() if diff.numel() else 0.0)
    return ok, worst


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")


def time_ms(fn: Callable[[], Any], device: str, warmup: int, reps: int) -> list[float]:
    """Milliseconds of `reps` calls of fn() after `warmup` calls.

    CUDA: an event pair around each call, L2 flushed before each call outside the timed region, one
    synchronisation at the end (so host overhead overlaps with the GPU as it would in a real loop).
    """
    for _ in range(warmup):
        fn()
    if device == "cpu":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    flush = _l2_flush_buffer()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


@functools.cache
def measured_peak(unit: str) -> float:
    """This GPU's ceiling in `unit`, measured once per process.

    GB/s: a 1 GiB device-to-device copy (read + write = 2 GiB of traffic). TFLOP/s: an 8192^3 bf16
    matmul. These are what a good kernel can reach on this machine, not the datasheet numbers.
    """
    if unit == "GB/s":
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        work, fn = 2 * src.numel(), lambda: dst.copy_(src)
    else:
        n = 8192
        a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
        work, fn = 2 * n**3, lambda: a @ b
    ms = torch.tensor(time_ms(fn, "cuda", warmup=3, reps=20)).median().item()
    return work / (ms * 1e-3) / _UNIT_SCALE[unit]


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=_REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: str) -> dict[str, Any]:
    """Where the numbers come from; recorded in every JSON line."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": None if status is None else bool(status),
    }


def _measure(bench: Benchmark, case: Case, args: argparse.Namespace, peak: float | None) -> list[dict]:
    """Check, then time, every provider on one case; one result dict per provider."""
    expected = bench.reference(case.make_inputs())
    results = []
    for provider in bench.providers:
        inputs = case.make_inputs()
        res: dict[str, Any] = {"provider": provider.name, "baseline": provider.baseline, "ms": None}
        try:
            res["correct"], res["max_abs_err"] = compare(provider.fn(inputs), expected,
                                                         case.atol, case.rtol)
        except Exception as exc:  # a provider that cannot run this case is reported, not fatal
            res.update(correct=False, max_abs_err=None, error=f"{type(exc).__name__}: {exc}")
        if res["correct"]:
            times = torch.tensor(time_ms(lambda: provider.fn(inputs), args.device, args.warmup,
                                         args.reps))
            ms_p20, ms, ms_p80 = times.quantile(torch.tensor([0.2, 0.5, 0.8])).tolist()
            rate = bench.work(case.params) / (ms * 1e-3) / _UNIT_SCALE[bench.unit]
            res.update(ms=ms, ms_min=times.min().item(), ms_p20=ms_p20, ms_p80=ms_p80, rate=rate,
                       pct_of_peak=None if peak is None else 100 * rate / peak)
        results.append(res)
    baselines = {r["provider"]: r["ms"] for r in results if r["baseline"]}
    for res in results:  # speed-up = baseline time / provider time; > 1 means faster
        res["speedup"] = {name: base / res["ms"] if base and res["ms"] else None
                          for name, base in baselines.items()}
    return results


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _table(bench: Benchmark, rows: list[tuple[dict, dict]], env: dict, peak: float | None) -> str:
    baselines = [p.name for p in bench.providers if p.baseline]
    header = [*rows[0][0], "provider", "check (max err)", "ms", "p20-p80 ms", bench.unit, "% peak",
              *(f"x vs {b}" for b in baselines)]
    lines = [header]
    for params, r in rows:
        check = "ok" if r["correct"] else "WRONG" if r.get("error") is None else "ERROR"
        lines.append([*(str(v) for v in params.values()), r["provider"],
                      f"{check} ({_fmt(r['max_abs_err'], '.1e')})", _fmt(r["ms"], ".4f"),
                      "-" if r["ms"] is None else f"{r['ms_p20']:.4f}-{r['ms_p80']:.4f}",
                      _fmt(r.get("rate"), ".1f"), _fmt(r.get("pct_of_peak"), ".1f"),
                      *(_fmt(r["speedup"][b], ".2f") for b in baselines)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    title = (f"== {bench.name} on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
             f"commit {env['git_commit'][:12]}) ==")
    if peak is None:
        title += ("\nCPU smoke run: timings of GPU code on a CPU are NOT meaningful; this run checks "
                  "correctness and the harness only.")
    else:
        title += f"\nmeasured peak: {peak:.1f} {bench.unit}"
    body = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines]
    errors = [f"{r['provider']} {params}: {r['error']}" for params, r in rows if r.get("error")]
    return "\n".join([title, *body, *errors])


def run(bench: Benchmark, cases: Sequence[Case], args: argparse.Namespace) -> bool:
    """Check, time, print and (if args.save) record every case; True when every provider was correct."""
    peak = measured_peak(bench.unit) if args.device == "cuda" else None
    env = environment(args.device)
    rows = [(case.params, res) for case in cases for res in _measure(bench, case, args, peak)]
    print(_table(bench, rows, env, peak), flush=True)
    if args.save:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(RESULTS_DIR / f"{bench.name}.jsonl", "a") as f:
            for params, res in rows:
                record = {"timestamp": timestamp, "bench": bench.name, "params": params, **res,
                          "unit": bench.unit, "peak": peak, **env, "smoke": args.smoke}
                f.write(json.dumps(record) + "\n")
    return all(res["correct"] for _, res in rows)
