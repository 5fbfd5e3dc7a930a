"""Streaming cache step and rollout backward: RollingKVCache against the caches of public code.

Wan2.1-1.3B causal rollout at 480x832, bf16: 12 heads of 128, 1,560 tokens per latent frame, a cache
of 18,720 tokens = a 4,680-token sink + a 14,040-token window (the window counts the current chunk),
chunks of 3 frames (4,680 tokens) or 1 frame (1,560). Every number is taken once the ring is full.

kvcache_step (one chunk of a rollout: write the chunk's K/V with RoPE, attend, move to the next chunk)
  fastdistill RollingKVCache        kv_write (RoPE fused) into the ring, attention reads the ring in place
  fastdistill (CUDA graph)          the same step captured once and replayed (commit between replays)
  sdpa on a contiguous slice        F.scaled_dot_product_attention over K/V that already lie contiguous:
                                    the anchor (no write, no RoPE, no eviction)
  reference shift-copy + sdpa       refs.ReferenceKVCache("shift"): Self-Forcing's cache (RoPE in PyTorch,
                                    evict by shift-copying the window through a clone, SDPA on the slice)
  reference clone+concat + sdpa     refs.ReferenceKVCache("concat"): LongLive-style torch.cat per call
  TFLOP/s counts the attention's 4 B H C Lk D FLOPs. Checked against a float32 reference cache.

kvcache_backward (rollout training: gradients to the current chunk's q, k, v; history constant)
  fastdistill one-chunk backward    dQ over the 18,720 keys, dK/dV for the chunk's keys only
  fastdistill full backward         fastdistill.attention's backward over the whole slice
  sdpa full backward                torch SDPA (flash) backward over the whole slice: dK/dV for every key
  TFLOP/s counts a full backward's 10 B H C Lk D FLOPs, so the one-chunk backward shows as a higher
  effective rate. Outputs compared: dq and the chunk's dk, dv against float32 autograd.

Also printed and recorded (benchmarks/results/kvcache_extras.jsonl): bytes of cache read by copying
ops per step (CopyCounter, one step per provider) and the share of RollingKVCache's step spent in the
write + RoPE of k and q.

  python benchmarks/bench_kvcache.py [--reps N] [--no-save]    # CUDA GPU
  python benchmarks/bench_kvcache.py --smoke                   # tiny fp32 shapes on CPU
"""

from __future__ import annotations

import datetime
import json
import sys
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import RollingKVCache, RopeSpec
from fastdistill.refs.kvcache import ReferenceKVCache
from fastdistill.testing import CopyCounter
from harness import RESULTS_DIR, Benchmark, Case, Provider, environment, parse_args, run, time_ms

_TOLERANCE = {torch.float32: (2e-4, 2e-4), torch.bfloat16: (2e-2, 2e-2)}


@dataclass
class Stream:
    """A seeded stream of chunks and the caches that roll it (built on first use, per provider)."""

    B: int
    H: int
    D: int
    chunk: int
    window: int
    sink: int
    dtype: torch.dtype
    device: str
    rope: RopeSpec | None
    fill: list = field(default_factory=list)  # (q, k, v) of the chunks that fill the ring
    step: tuple = ()  # (q, k, v) of every timed step
    caches: dict = field(default_factory=dict)

    def cache(self, cls=RollingKVCache, dtype=None, **kwargs):
        """A one-layer cache of this stream's geometry, rolled through the fill chunks."""
        cache = cls(1, self.B, self.H, self.D, chunk_tokens=self.chunk, window_tokens=self.window,
                    sink_tokens=self.sink, rope=self.rope, dtype=dtype or self.dtype, device=self.device, **kwargs)
        with torch.no_grad():
            for q, k, v in self.fill:
                cache.attend(0, *(t.to(cache.dtype) for t in (q, k, v)))
                cache.commit()
        return cache


def make_stream(B, H, D, chunk, window, sink, dtype, device, rope) -> Stream:
    g = torch.Generator(device).manual_seed(0)

    def chunk_qkv():
        return tuple(torch.randn(B, H, chunk, D, generator=g, device=device, dtype=dtype) for _ in range(3))

    stream = Stream(B, H, D, chunk, window, sink, dtype, device, RopeSpec(D) if rope else None)
    stream.fill = [chunk_qkv() for _ in range(-(-(sink + window) // chunk))]  # then the ring is full
    stream.step = chunk_qkv()
    return stream


# ------------------------------------------------------------------------------------- step providers
def _lazy(x: Stream, name: str, build):
    if name not in x.caches:
        x.caches[name] = build()
    return x.caches[name]


def ours(x: Stream) -> torch.Tensor:
    cache = _lazy(x, "ours", x.cache)
    with torch.no_grad():
        out = cache.attend(0, *x.step)
    cache.commit()
    return out


def ours_graphed(x: Stream) -> torch.Tensor:
    def build():
        cache = x.cache()
        static = tuple(t.clone() for t in x.step)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            cache.attend(0, *static)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            out = cache.attend(0, *static)
        return cache, graph, out

    cache, graph, out = _lazy(x, "graph", build)
    graph.replay()
    cache.commit(check=False)
    return out


def contiguous_slice(x: Stream) -> torch.Tensor:
    def build():  # what the chunk attends to, rotated and laid out contiguously [B, H, Lk, D]
        cache = x.cache()
        with torch.no_grad():
            cache.attend(0, *x.step)
        keys, values, _ = cache.kv(0)
        q = x.step[0] if x.rope is None else fastdistill.apply_rope(x.step[0], cache._cos, cache._sin)
        return q, keys.contiguous(), values.contiguous()

    q, keys, values = _lazy(x, "slice", build)
    with torch.no_grad():
        return F.scaled_dot_product_attention(q, keys, values)


def reference_cache(eviction: str):
    def fn(x: Stream) -> torch.Tensor:
        cache = _lazy(x, eviction, partial(x.cache, ReferenceKVCache, eviction=eviction))
        with torch.no_grad():
            out = cache.attend(0, *x.step)
        cache.commit()
        return out

    return fn


def step_reference(x: Stream) -> torch.Tensor:
    cache = x.cache(ReferenceKVCache, torch.float32)
    with torch.no_grad():
        return cache.attend(0, *(t.float() for t in x.step))


# --------------------------------------------------------------------------------- backward providers
def _grad_inputs(x: Stream):
    q, k, v = (t.clone().requires_grad_() for t in x.step)
    grad = torch.randn(q.shape, generator=torch.Generator(x.device).manual_seed(1), device=x.device, dtype=x.dtype)
    return q, k, v, grad


def ours_backward(x: Stream):
    def build():
        cache = x.cache()
        q, k, v, grad = _grad_inputs(x)
        return q, k, v, grad, cache.attend(0, q, k, v)

    q, k, v, grad, out = _lazy(x, "ours_bwd", build)
    return torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)


def _slice_backward(x: Stream, attend, name: str):
    def build():  # history K/V contiguous and constant, the chunk's k, v appended with gradients
        cache = x.cache()
        with torch.no_grad():
            cache.attend(0, *x.step)
        keys, values, _ = cache.kv(0, include_current=False)
        q, k, v, grad = _grad_inputs(x)
        keys_all = torch.cat((keys, k.detach()), 2).requires_grad_()
        values_all = torch.cat((values, v.detach()), 2).requires_grad_()
        return q, keys_all, values_all, grad, attend(q, keys_all, values_all)

    q, keys_all, values_all, grad, out = _lazy(x, name, build)
    dq, dk, dv = torch.autograd.grad(out, (q, keys_all, values_all), grad, retain_graph=True)
    return dq, dk[:, :, -x.chunk:], dv[:, :, -x.chunk:]


def backward_reference(x: Stream):
    up = Stream(x.B, x.H, x.D, x.chunk, x.window, x.sink, torch.float32, x.device, None,
                [tuple(t.float() for t in c) for c in x.fill], tuple(t.float() for t in x.step))
    return _slice_backward(up, F.scaled_dot_product_attention, "ref")


def attention_flops(p: dict, factor: int) -> float:
    return factor * p["B"] * p["H"] * p["chunk"] * (p["sink"] + p["window"]) * p["D"]


# ------------------------------------------------------------------------------------------- extras
def extras(stream: Stream, reps: int, device: str) -> dict:
    """Cache bytes read by copying ops in one step per cache, and the write + RoPE share of our step."""
    copied = {}
    for name, build in (("fastdistill RollingKVCache", stream.cache),
                        ("reference shift-copy", partial(stream.cache, ReferenceKVCache, eviction="shift")),
                        ("reference clone+concat", partial(stream.cache, ReferenceKVCache, eviction="concat"))):
        cache = build()
        watch = [cache.k_buffer, cache.v_buffer] if isinstance(cache, RollingKVCache) else cache._k + cache._v
        with CopyCounter(watch) as counter, torch.no_grad():
            cache.attend(0, *stream.step)
        # commit too: the concat reference rebuilds its history there (reading the watched tensors)
        with CopyCounter(watch) as commit_counter:
            cache.commit()
        counter.copy_bytes += commit_counter.copy_bytes
        counter.host_syncs += commit_counter.host_syncs
        copied[name] = {"cache_bytes_copied": counter.copy_bytes, "host_syncs": counter.host_syncs}
    cache = stream.cache()
    k_ring, v_ring = cache.k_buffer[0], cache.v_buffer[0]
    q, k, v = stream.step
    sink = stream.sink

    def write_and_rope():  # the step's non-attention work: the fused write and q's rotation
        fastdistill.kv_write(k_ring[:, :, sink:], v_ring[:, :, sink:], k, v, cache._ring_start, cache._cos, cache._sin)
        fastdistill.apply_rope(q, cache._cos, cache._sin)

    def whole_step():
        with torch.no_grad():
            cache.attend(0, q, k, v)
        cache.commit()

    write_ms = torch.tensor(time_ms(write_and_rope, device, 3, reps)).median().item()
    step_ms = torch.tensor(time_ms(whole_step, device, 3, reps)).median().item()
    return {"copies_per_step": copied, "write_rope_ms": write_ms, "step_ms": step_ms, "write_rope_share": write_ms / step_ms}


def cases(smoke: bool, device: str, backward: bool) -> list[Case]:
    if smoke:
        B, H, D, sink, window, chunks, dtype = 1, 2, 64, 40, 120, (40,), torch.float32
    else:
        B, H, D, sink, window, chunks, dtype = 1, 12, 128, 4_680, 14_040, (4_680, 1_560), torch.bfloat16
    out = []
    for chunk in chunks:
        params = {"B": B, "H": H, "D": D, "chunk": chunk, "sink": sink, "window": window,
                  "dtype": str(dtype).removeprefix("torch.")}
        make = partial(make_stream, B, H, D, chunk, window, sink, dtype, device, not backward)
        out.append(Case(params, make, *_TOLERANCE[dtype]))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv)
    step_providers = [Provider("fastdistill RollingKVCache", ours)]
    if args.device == "cuda":
        step_providers.append(Provider("fastdistill (CUDA graph)", ours_graphed))
    step_providers += [Provider("sdpa on a contiguous slice", contiguous_slice, baseline=True),
                       Provider("reference shift-copy + sdpa", reference_cache("shift"), baseline=True),
                       Provider("reference clone+concat + sdpa", reference_cache("concat"), baseline=True)]
    step = Benchmark("kvcache_step", step_providers, step_reference, "TFLOP/s", partial(attention_flops, factor=4))
    backward = Benchmark(
        "kvcache_backward",
        [Provider("fastdistill one-chunk backward", ours_backward),
         Provider("fastdistill full backward", partial(_slice_backward, attend=fastdistill.attention, name="fd_full")),
         Provider("sdpa full backward", partial(_slice_backward, attend=F.scaled_dot_product_attention, name="sdpa"),
                  baseline=True)],
        backward_reference, "TFLOP/s", partial(attention_flops, factor=10))
    ok = run(step, cases(args.smoke, args.device, backward=False), args)
    ok &= run(backward, cases(args.smoke, args.device, backward=True), args)
    records = []
    for case in cases(args.smoke, args.device, backward=False):
        record = {"params": case.params, **extras(case.make_inputs(), args.reps, args.device)}
        records.append(record)
        print(f"== kvcache extras {case.params}: {json.dumps(record['copies_per_step'])}; write + RoPE "
              f"{record['write_rope_ms']:.4f} ms of a {record['step_ms']:.4f} ms step "
              f"({100 * record['write_rope_share']:.1f}%)")
        ok &= record["copies_per_step"]["fastdistill RollingKVCache"] == {"cache_bytes_copied": 0, "host_syncs": 0}
    if args.save:
        env = environment(args.device)
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        with open(RESULTS_DIR / "kvcache_extras.jsonl", "a") as f:
            for record in records:
                f.write(json.dumps({"timestamp": stamp, "bench": "kvcache_extras", **record, **env}) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
