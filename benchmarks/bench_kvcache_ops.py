"""Fused KV-cache write (+ RoPE on k) against the PyTorch way.

One step of a streaming video rollout writes the current chunk's k and v into a ring-buffer cache
`[B, H, S, D]` at slots (start + i) % S, rotating k with RoPE first when tables are given.

  fastdistill.kv_write          one fused kernel: read k, v (and cos/sin), write the cache slots
  pytorch rotate+index_copy_    fastdistill.refs.kvcache.kv_write_reference, the baseline: rotate k
                                in PyTorch, then index_copy_ k and v into the cache

Shapes follow Wan2.1-1.3B causal rollout at 480x832: 12 heads of 128, bf16, 1,560 tokens per latent
frame, a cache of 12 frames (S = 18,720) and chunks of 3 frames (4,680) or 1 frame (1,560). Each shape
runs with and without RoPE and with a chunk that starts at 0 or wraps around the end of the ring.
kv_write reads `start` from a 0-dim device tensor, as RollingKVCache will (no host sync); the
baseline gets a host int, as public caches keep it, so it pays no sync either.

Bytes per call = read k and v + read the cos/sin tables (when given) + write the k and v slots.
Correctness: the caches each provider writes are compared with a float32 run of the reference; the
bf16 tolerance allows the ~1 ulp difference between rotating in fp32 (fused) and PyTorch's rounding.

  python benchmarks/bench_kvcache_ops.py [--reps N] [--no-save]     # CUDA GPU
  python benchmarks/bench_kvcache_ops.py --smoke                    # tiny fp32 shapes on CPU
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial

import torch

import fastdistill
from fastdistill.refs.kvcache import kv_write_reference
from fastdistill.rope import RopeSpec, rope_tables
from harness import Benchmark, Case, Provider, parse_args, run  # benchmarks/harness.py, beside this script

# atol, rtol per cache dtype. bf16: 1 ulp relative, plus an absolute floor for the cancellation in
# x1 * cos - x2 * sin when an implementation rounds the products to bf16.
_TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 2**-7)}


@dataclass
class KvInputs:
    """The arguments of one kv_write call."""

    cache_k: torch.Tensor  # [B, H, S, D]
    cache_v: torch.Tensor  # [B, H, S, D]
    k: torch.Tensor  # [B, H, n, D]
    v: torch.Tensor  # [B, H, n, D]
    start: torch.Tensor  # 0-dim int64 on the device: first slot written (what kv_write reads)
    start_pos: int  # the same position as a host int, as public caches keep it (no sync in the baseline)
    cos: torch.Tensor | None  # [n, D/2] float32
    sin: torch.Tensor | None  # [n, D/2] float32


def make_inputs(B: int, H: int, S: int, n: int, D: int, start: int, rope: bool, dtype: torch.dtype,
                device: str) -> KvInputs:
    """Random caches and chunk (seeded, so every call returns the same values)."""
    g = torch.Generator(device).manual_seed(0)
    rand = partial(torch.randn, generator=g, dtype=dtype, device=device)
    # The table values do not change the work; positions start..start+n-1 stand in for the chunk's.
    cos, sin = (rope_tables(RopeSpec(D), n, start=start, device=device) if rope else (None, None))
    return KvInputs(rand(B, H, S, D), rand(B, H, S, D), rand(B, H, n, D), rand(B, H, n, D),
                    torch.tensor(start, device=device), start, cos, sin)


def fused(x: KvInputs) -> tuple[torch.Tensor, torch.Tensor]:
    fastdistill.kv_write(x.cache_k, x.cache_v, x.k, x.v, x.start, x.cos, x.sin)
    return x.cache_k, x.cache_v


def pytorch(x: KvInputs) -> tuple[torch.Tensor, torch.Tensor]:
    kv_write_reference(x.cache_k, x.cache_v, x.k, x.v, x.start_pos, x.cos, x.sin)
    return x.cache_k, x.cache_v


def reference_fp32(x: KvInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference run in float32 on float32 copies: the expected caches."""
    up = KvInputs(x.cache_k.float(), x.cache_v.float(), x.k.float(), x.v.float(), x.start, x.start_pos,
                  x.cos, x.sin)
    return pytorch(up)


def bytes_moved(p: dict) -> float:
    """The op's necessary traffic; the PyTorch way moves more (the rotated k is a temporary)."""
    chunk = p["B"] * p["H"] * p["n"] * p["D"] * getattr(torch, p["dtype"]).itemsize
    tables = 2 * p["n"] * (p["D"] // 2) * 4 if p["rope"] else 0
    return 2 * chunk + tables + 2 * chunk  # read k, v (+ tables); write the k and v slots


def cases(smoke: bool, device: str) -> list[Case]:
    """Wan2.1-1.3B shapes in bf16, or (smoke) tiny fp32 ones."""
    if smoke:
        B, H, S, D, chunks, dtype = 1, 2, 96, 64, (40,), torch.float32
    else:
        B, H, S, D, chunks, dtype = 1, 12, 18_720, 128, (4_680, 1_560), torch.bfloat16
    out = []
    for n in chunks:
        for start in (0, S - n // 2):  # from slot 0, and wrapping around the end of the ring
            for rope in (False, True):
                params = {"B": B, "H": H, "S": S, "n": n, "D": D, "start": start, "rope": rope,
                          "dtype": str(dtype).removeprefix("torch.")}
                out.append(Case(params, partial(make_inputs, B, H, S, n, D, start, rope, dtype, device),
                                *_TOLERANCE[dtype]))
    return out


BENCH = Benchmark(
    name="kvcache_ops",
    providers=(Provider("fastdistill.kv_write", fused),
               Provider("pytorch rotate+index_copy_", pytorch, baseline=True)),
    reference=reference_fp32,
    unit="GB/s",
    work=bytes_moved,
)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    return 0 if run(BENCH, cases(args.smoke, args.device), args) else 1


if __name__ == "__main__":
    sys.exit(main())
