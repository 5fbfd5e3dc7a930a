"""Masked attention, forward / backward / forward+backward, against torch SDPA and FlexAttention.

Workloads (Wan2.1-1.3B shapes: B=1, H=12, D=128, bf16; masks from fastdistill.masks):

  dense-8k         no mask, L = 8,192
  dense-32k        no mask, L = 32,760 (21 latent frames of 1,560 tokens)
  causal           masks.causal(), L = 32,760
  sf-chunk         masks.chunk_causal(4680): the Self-Forcing training mask, L = 32,760
  window-sink      masks.chunk_causal(1560, window=12*1560, sink=3*1560) over 24 frames, L = 37,440.
                   SUBSTITUTION: the streaming workload is 60 frames (93,600 tokens); 24 frames keep
                   the window (12 frames) and sink (3 frames) but fit a quick run.
  block-sparse-S   masks.block_sparse: a random per-head [1, 12, 256, 256] mask of 128x128 blocks at
                   S = 50/75/90 % sparsity (every query block keeps exactly round((1-S)*256) key
                   blocks), L = 32,760 (kept at full length: it fits in memory and time)
  check-*          one tiny case per mask kind (L ~1,000-1,600, H=4, bf16, chunk sizes that cut
                   128-tiles) judged against the INDEPENDENT float64 reference
                   fastdistill.refs.attention; run first, cost seconds

Directions: fwd; bwd = `torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True)` alone
(the forward runs once, untimed, on requires_grad inputs); fwd+bwd = forward then grad.

Providers ("-" in the table means not run; every skip is listed under its table with the reason):
  fastdistill                  fastdistill.attention(q, k, v, mask)
  sdpa flash / cudnn / efficient
                               F.scaled_dot_product_attention under sdpa_kernel([one backend]);
                               dense and causal (is_causal) only: they take no other mask
  sdpa efficient + bool mask   EFFICIENT_ATTENTION with the mask materialised as a bool tensor;
                               skipped when bool mask + SDPA's bf16 additive copy (3 B per element)
                               exceed --mask-budget-gib (default 4): the per-head block-sparse masks
  flex_attention (compiled)    torch.compile(flex_attention) with a BlockMask from
                               torch.compile(create_block_mask) and a mask_mod equivalent to the
                               fastdistill mask (checked element by element on every row before use)
  reference                    fastdistill.refs.attention.attention_reference (pure PyTorch): only
                               in --smoke and on the check-* cases
Baselines (speed-up columns): sdpa flash (dense, causal) and flex_attention.

Setup costs are reported apart from the steady-state timing, under each table and in the JSON
lines: `first_call_s` per provider and direction (Triton JIT / inductor compile included; for bwd it
is the untimed forward + the first backward), and `setup` (flex block mask: first build including
its compile, and a warm rebuild; the dense bool mask build).

TFLOP/s count allowed (q, k) pairs only: fwd = 4 B H D pairs, bwd = 2.5x, fwd+bwd = 3.5x; pairs are
counted exactly (closed form per query row for chunk-causal masks, per block for block-sparse ones;
cross-checked against mask.density() on small shapes).

Correctness, before any timing (benchmarks/harness.py): every provider's output (fwd), gradients
(bwd) or both (fwd+bwd) are compared with a reference computed once per workload:
  * large workloads: fastdistill.attention on float32 copies of the inputs (the Triton fp32 path:
    a different precision path of OUR kernel, so not independent of it; --reference fp64 uses the
    independent float64 refs.attention instead, slower);
  * check-* cases and --smoke: the float64 refs.attention (independent).
Errors are measured per row, relative to the RMS of the reference row (over the head dim; rows
of out and dq are queries, rows of dk and dv keys), floored at 1e-2 x the whole tensor's RMS (rows
of dk/dv that no query sees are exactly 0). A fixed atol does not work here: values of long random
attention rows are tiny (~1/sqrt(allowed keys)), so an all-zero output would pass, while causal
rows with few keys are O(1) and carry O(1e-2) bf16 rounding. An element passes when
|out - ref| <= atol * f * rowrms(ref) + rtol * |ref|, with f = 1 for outputs and 2.5 for gradients;
the table's "max err" is max |out - ref| / (f * rowrms(ref)). bf16: atol = rtol = 2e-2 (gradients:
5e-2 of the row RMS + 2e-2 relative); fp32 (smoke): 1e-3 (CPU matmuls were seen to differ by
~3e-4 of the row RMS from one call to the next under load, MKL threading). An emulation of a flash-style bf16
kernel (P and dS rounded to bf16, fp32 accumulation) against float64 at L = 16,000, causal and
dense, used at most 0.36 of this tolerance on out and 0.46 on gradients (dq of causal rows with
few keys), while zeroed, rescaled or mis-masked results fail by 10-100x (checked on CPU).

  python benchmarks/bench_attention.py [--reps N] [--no-save]   # CUDA GPU, ~3-5 min on an H100
  python benchmarks/bench_attention.py --smoke                  # tiny fp32 shapes on CPU, < 1 min
Options of this bench (besides --smoke/--save/--reps):
  --only PATTERNS      comma-separated workload names or fnmatch patterns ("causal,block-sparse-*")
  --directions LIST    subset of fwd,bwd,fwd+bwd (default all three)
  --reference KIND     ours-fp32 (default) or fp64, for the large workloads
  --mask-budget-gib X  memory budget of the materialised bool mask (default 4)
  --flex               with --smoke: also run flex_attention compiled on CPU (inductor, slow)
  --list               print the workloads and exit
Defaults on the GPU: 20 timed calls after 3 warm-up calls (the harness's 100 would take too long).
Each workload's table is printed and its JSON lines appended as soon as it is done, so a run cut
short keeps what it measured. In --smoke every workload keeps its name and mask kind at tiny sizes
(L <= 200, H=2, D=32, fp32); flash/cudnn/efficient SDPA backends do not exist on CPU and flex is
left out unless --flex (its CPU compile takes ~20 s per graph).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fnmatch
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

import fastdistill
from fastdistill import masks
from fastdistill.masks import BlockSparseMask, ChunkCausalMask, FullMask, Mask
from fastdistill.refs.attention import attention_reference
import harness  # benchmarks/harness.py, beside this script
from harness import Benchmark, Case, Provider, parse_args

DIRECTIONS = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
GRAD_TOL_FACTOR = 2.5  # gradients get 2.5x the output's atol (in units of their row RMS)
_TOLERANCE = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (1e-2, 1e-2), torch.float32: (1e-3, 1e-3)}
_SKIP_PREFIX = "Skipped: "


# ----------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One attention problem: shape, mask (fastdistill's and its flex mask_mod), and per-run state."""

    name: str
    kind: str  # dense | causal | chunk | block
    B: int
    H: int
    L: int
    D: int
    dtype: torch.dtype
    mask: Mask | None
    note: str = ""
    check: bool = False  # tiny case judged against the float64 reference
    chunk: tuple[int, int | None, int] | None = None  # (chunk_size, window, sink) for kind == chunk
    block_table: torch.Tensor | None = None  # bool [H, nQb, nKb] for kind == block
    block_size: int = 128
    seed: int = 0
    # filled by prepare()
    pairs: int = 0
    bool_mask: torch.Tensor | None = None
    bool_mask_skip: str | None = None
    block_mask: Any = None  # flex BlockMask (None = dense)
    flex_error: str | None = None
    setup: dict = field(default_factory=dict)
    reference: dict | None = None  # name -> tensor, computed once per workload

    @property
    def density(self) -> float:
        return self.pairs / (self.L * self.L)

    def params(self, direction: str) -> dict:
        return {"workload": self.name, "B": self.B, "H": self.H, "L": self.L, "D": self.D,
                "dtype": str(self.dtype).removeprefix("torch."), "density": round(self.density, 4),
                "direction": direction}


def _random_block_table(heads: int, n_q: int, n_k: int, sparsity: float, seed: int) -> torch.Tensor:
    """bool [heads, n_q, n_k]: every query block keeps exactly round((1 - sparsity) n_k) >= 1 key
    blocks, chosen at random (seeded; generated on the CPU so every device sees the same mask)."""
    keep = max(1, round((1 - sparsity) * n_k))
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(heads, n_q, n_k, generator=g).argsort(-1)[..., :keep]
    return torch.zeros(heads, n_q, n_k, dtype=torch.bool).scatter_(-1, order, True)


def _chunk(name, B, H, L, D, dtype, chunk, window=None, sink=0, **kw) -> Workload:
    return Workload(name, "chunk", B, H, L, D, dtype, masks.chunk_causal(chunk, window=window, sink=sink),
                    chunk=(chunk, window, sink), **kw)


def _block(name, B, H, L, D, dtype, sparsity, block, seed, **kw) -> Workload:
    n = -(-L // block)
    table = _random_block_table(H, n, n, sparsity, seed)
    return Workload(name, "block", B, H, L, D, dtype, masks.block_sparse(table[None].clone(), block),
                    block_table=table, block_size=block, seed=seed, **kw)


def workloads(smoke: bool) -> list[Workload]:
    if smoke:
        B, H, D, dt = 1, 2, 32, torch.float32
        short, L, bs = 128, 200, 16
        chunk, frame = 45, 20
    else:
        B, H, D, dt = 1, 12, 128, torch.bfloat16
        short, L, bs = 8192, 32_760, 128
        chunk, frame = 4680, 1560
    wl = []
    if not smoke:  # tiny cases against the float64 reference, on the GPU (smoke cases already are)
        h, c = 4, dict(check=True)
        wl += [
            Workload("check-dense", "dense", 1, h, 1000, D, dt, None, **c),
            Workload("check-causal", "causal", 1, h, 1000, D, dt, masks.causal(), **c),
            _chunk("check-sf-chunk", 1, h, 1500, D, dt, 300, **c),
            _chunk("check-window-sink", 1, h, 1600, D, dt, 100, window=600, sink=200, **c),
            _block("check-block-sparse", 1, h, 1000, D, dt, 0.75, 128, seed=7, **c),
        ]
    win_frames, sink_frames, n_frames = (6, 2, 10) if smoke else (12, 3, 24)
    wl += [
        Workload("dense-8k", "dense", B, H, short, D, dt, None),
        Workload("dense-32k", "dense", B, H, L, D, dt, None),
        Workload("causal", "causal", B, H, L, D, dt, masks.causal()),
        _chunk("sf-chunk", B, H, L, D, dt, chunk, note="Self-Forcing training mask"),
        _chunk("window-sink", B, H, n_frames * frame, D, dt, frame, window=win_frames * frame,
               sink=sink_frames * frame,
               note=f"{n_frames} frames (stands in for 60 frames = 93,600 tokens)"),
    ]
    for i, sparsity in enumerate((0.5, 0.75, 0.9)):
        wl.append(_block(f"block-sparse-{round(sparsity * 100)}", B, H, L, D, dt, sparsity, bs, seed=100 + i))
    return wl


# ----------------------------------------------------------------------------------------------
# Exact pair counts (FLOPs)
# ----------------------------------------------------------------------------------------------


def allowed_pairs(mask: Mask | None, lq: int, lk: int) -> int:
    """Allowed (q, k) pairs, averaged over the mask's batches and heads; exact, without an Lq x Lk
    tensor for the chunk-causal and block-sparse masks."""
    if mask is None or isinstance(mask, FullMask):
        return lq * lk
    if isinstance(mask, ChunkCausalMask):
        c = mask.chunk_size
        lo, hi = mask.kv_offset, mask.kv_offset + lk  # key positions present
        pq = torch.arange(lq, dtype=torch.int64) + mask.q_offset
        end = (pq // c + 1) * c
        start = end - mask.window if mask.window is not None else torch.full_like(end, lo)

        def count(a, b):  # |[a, b) ∩ [lo, hi)|
            return (torch.clamp(b, max=hi) - torch.clamp(a, min=lo)).clamp(min=0)

        sink_end = torch.full_like(end, mask.sink)
        both = count(torch.clamp(start, min=0), torch.minimum(end, sink_end))  # window ∩ sink
        return int((count(start, end) + count(torch.zeros_like(end), sink_end) - both).sum())
    if isinstance(mask, BlockSparseMask):
        bq, bk = mask.block_size
        bm = mask.block_mask.to("cpu", torch.float64)
        rows = (lq - bq * torch.arange(bm.shape[2], dtype=torch.float64)).clamp(max=bq)
        cols = (lk - bk * torch.arange(bm.shape[3], dtype=torch.float64)).clamp(max=bk)
        total = torch.einsum("bhij,i,j->", bm, rows, cols).item()
        return round(total / (bm.shape[0] * bm.shape[1]))
    return round(mask.density(lq, lk) * lq * lk)


def flops(p: dict) -> float:
    """Harness work function: FLOPs of one call, counting allowed pairs only."""
    return 4.0 * p["B"] * p["H"] * p["D"] * _PAIRS[(p["workload"], p["L"])] * FLOP_FACTOR[p["direction"]]


_PAIRS: dict[tuple[str, int], int] = {}


# ----------------------------------------------------------------------------------------------
# flex_attention mask_mods (equivalent to the fastdistill masks) and their exact check
# ----------------------------------------------------------------------------------------------


def _causal_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _chunk_mod(chunk: int, window: int | None, sink: int):
    """End-of-chunk formula on absolute positions, as CausVid/Self-Forcing build their flex masks."""

    def mask_mod(b, h, q_idx, kv_idx):
        end = (q_idx // chunk + 1) * chunk
        ok = kv_idx < end
        if window is not None:
            ok = ok & (kv_idx >= end - window)
        if sink:
            ok = ok | (kv_idx < sink)
        return ok

    return mask_mod


# One block table buffer (and one mask_mod reading it) per table shape: the block-sparse workloads
# copy their table into it, so the compiled flex kernel is reused instead of recompiled per sparsity.
_BLOCK_BUFFERS: dict[tuple, tuple[torch.Tensor, Callable]] = {}


def _block_mod(table: torch.Tensor, block: int, device) -> Callable:
    key = (tuple(table.shape), block, str(device))
    if key not in _BLOCK_BUFFERS:
        buf = torch.zeros(table.shape, dtype=torch.bool, device=device)

        def mask_mod(b, h, q_idx, kv_idx):
            return buf[h, q_idx // block, kv_idx // block]

        _BLOCK_BUFFERS[key] = (buf, mask_mod)
    buf, mask_mod = _BLOCK_BUFFERS[key]
    buf.copy_(table)
    return mask_mod


def _mask_mod(wl: Workload, device) -> Callable | None:
    if wl.kind == "dense":
        return None
    if wl.kind == "causal":
        return _causal_mod
    if wl.kind == "chunk":
        return _chunk_mod(*wl.chunk)
    return _block_mod(wl.block_table, wl.block_size, device)


def _check_mask_mod(mask_mod: Callable, wl: Workload, device) -> None:
    """Evaluate mask_mod on every (head, q, k) with broadcast index tensors and compare it with the
    fastdistill mask's definition (dense_rows); raise AssertionError on the first difference.
    Rows go 2^26 (head, q, k) elements at a time: indexing a block table broadcasts int64 indices."""
    heads = wl.mask.batch_heads[1]
    rows_per_step = max(1, 2**26 // (heads * wl.L))
    h = torch.arange(heads, device=device, dtype=torch.int32)[:, None, None]
    b = torch.zeros((), device=device, dtype=torch.int32)
    kv = torch.arange(wl.L, device=device, dtype=torch.int32)[None, None, :]
    for start in range(0, wl.L, rows_per_step):
        stop = min(wl.L, start + rows_per_step)
        q = torch.arange(start, stop, device=device, dtype=torch.int32)[None, :, None]
        got = torch.as_tensor(mask_mod(b, h, q, kv)).expand(heads, stop - start, wl.L)
        want = wl.mask.dense_rows(start, stop, wl.L, device)[0].expand(heads, stop - start, wl.L)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[0].tolist()
            raise AssertionError(f"flex mask_mod differs from the fastdistill mask at (head, q, k) = "
                                 f"({bad[0]}, {start + bad[1]}, {bad[2]})")


@contextlib.contextmanager
def _timed(setup: dict, key: str, device: str):
    _sync(device)
    t0 = time.perf_counter()
    yield
    _sync(device)
    setup[key] = round(time.perf_counter() - t0, 4)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


_FLEX: dict[str, Callable] = {}


def _flex_fns(device: str) -> tuple[Callable, Callable]:
    """(compiled flex_attention, create_block_mask (compiled on CUDA)), built once per process."""
    if not _FLEX:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        cfg = torch._dynamo.config  # one graph per (shape, mask, grad mode): more than the default 8
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, max(64, getattr(cfg, name)))
        if hasattr(cfg, "accumulated_recompile_limit"):
            cfg.accumulated_recompile_limit = max(512, cfg.accumulated_recompile_limit)
        _FLEX["attn"] = torch.compile(flex_attention, dynamic=False)
        # Uncompiled, create_block_mask materialises B x H x L x L (index tensors included): the
        # per-head block tables at 32k would need ~100 GB. The field compiles it.
        _FLEX["mask"] = torch.compile(create_block_mask) if device == "cuda" else create_block_mask
    return _FLEX["attn"], _FLEX["mask"]


# ----------------------------------------------------------------------------------------------
# Per-workload preparation and reference
# ----------------------------------------------------------------------------------------------


@dataclass
class Options:
    device: str
    smoke: bool
    flex: bool
    reference: str  # ours-fp32 | fp64
    mask_budget_gib: float
    directions: tuple[str, ...]


def prepare(wl: Workload, opt: Options) -> None:
    """Pair count, flex block mask (checked), dense bool mask (within budget); setup times."""
    dev = opt.device
    wl.pairs = allowed_pairs(wl.mask, wl.L, wl.L)
    if wl.L <= 4096 and wl.mask is not None:  # the closed form against the mask's own count
        by_rows = wl.mask.density(wl.L, wl.L) * wl.L * wl.L
        assert abs(by_rows - wl.pairs) <= 1e-6 * wl.L * wl.L, (wl.name, by_rows, wl.pairs)
    _PAIRS[(wl.name, wl.L)] = wl.pairs
    if wl.mask is not None:
        wl.mask = _on_device(wl.mask, dev)

    if _flex_skip_reason(wl, opt) is None:
        mask_mod = _mask_mod(wl, dev)
        if mask_mod is not None:
            try:
                _, create = _flex_fns(dev)
                heads = wl.H if wl.kind == "block" else None
                with _timed(wl.setup, "flex_block_mask_first_s", dev):
                    wl.block_mask = create(mask_mod, None, heads, wl.L, wl.L, device=dev, BLOCK_SIZE=128)
                with _timed(wl.setup, "flex_block_mask_warm_s", dev):
                    wl.block_mask = create(mask_mod, None, heads, wl.L, wl.L, device=dev, BLOCK_SIZE=128)
                with _timed(wl.setup, "flex_mask_mod_check_s", dev):
                    _check_mask_mod(mask_mod, wl, dev)
            except Exception as exc:  # reported by the flex provider as an ERROR row
                wl.flex_error = f"{type(exc).__name__}: {exc}"

    heads_mask = 1 if wl.mask is None else wl.mask.batch_heads[1]
    need = 3 * wl.B * heads_mask * wl.L * wl.L  # bool + SDPA's additive copy in the input dtype (2 B)
    if need > opt.mask_budget_gib * 2**30:
        wl.bool_mask_skip = (f"the materialised mask [1, {heads_mask}, {wl.L}, {wl.L}] needs {need / 2**30:.1f} "
                             f"GiB (bool + SDPA's bf16 additive copy) > budget {opt.mask_budget_gib:g} GiB")
    else:
        with _timed(wl.setup, "bool_mask_build_s", dev):
            wl.bool_mask = (torch.ones(1, 1, wl.L, wl.L, dtype=torch.bool, device=dev) if wl.mask is None
                            else wl.mask.to_dense(wl.L, wl.L, dev))


def _on_device(mask: Mask, device: str) -> Mask:
    if isinstance(mask, BlockSparseMask) and mask.block_mask.device.type != torch.device(device).type:
        return masks.block_sparse(mask.block_mask.to(device), mask.block_size)
    return mask


def release(wl: Workload) -> None:
    wl.bool_mask = wl.block_mask = wl.reference = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _independent_reference(wl: Workload, opt: Options) -> bool:
    return opt.smoke or wl.check or opt.reference == "fp64"


_REF_OURS = "fastdistill.attention on float32 copies (our fp32 path: not independent)"
_REF_FP64 = "float64 fastdistill.refs.attention (independent)"


def _compute_reference(wl: Workload, x: dict, opt: Options) -> dict:
    """out (and dq, dk, dv when a backward direction is requested), once per workload. When our
    fp32 path fails, the float64 reference is used instead (and the failure noted in the setup)."""
    if not _independent_reference(wl, opt):
        try:
            ref = _reference_run(fastdistill.attention, torch.float32, wl, x, opt)
            wl.setup["reference"] = _REF_OURS
            return ref
        except Exception as exc:
            wl.setup["reference_fallback"] = f"our fp32 path failed ({type(exc).__name__}: {exc})"
            print(f"!! {wl.name}: fastdistill fp32 reference failed, using the float64 reference: {exc}",
                  flush=True)
    wl.setup["reference"] = _REF_FP64
    return _reference_run(attention_reference, torch.float64, wl, x, opt)


def _reference_run(fn: Callable, dtype: torch.dtype, wl: Workload, x: dict, opt: Options) -> dict:
    q, k, v, go = (x[n].detach().to(dtype) for n in ("q", "k", "v", "grad_out"))
    grads = any(d != "fwd" for d in opt.directions)
    for t in (q, k, v):
        t.requires_grad_(grads)
    with torch.enable_grad():
        out = fn(q, k, v, wl.mask)
        ref = {"out": out.detach()}
        if grads:
            ref.update(zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), go)))
    return ref


def _row_scale(t: torch.Tensor) -> torch.Tensor:
    """RMS of each row (over the last dim), floored at 1e-2 x the tensor's RMS; float32 [..., 1]."""
    t = t.double()
    floor = max(t.pow(2).mean().sqrt().item(), 1e-30) * 1e-2
    return t.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(floor).float()


# ----------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------


class Skipped(Exception):
    """The provider does not apply to this case (reported with its reason, not as an error)."""


@dataclass
class CaseState:
    """Shared by the reference and the providers of one (workload, direction) case."""

    wl: Workload
    direction: str
    opt: Options
    scales: tuple[torch.Tensor, ...] = ()  # per-row [..., 1], tolerance factor included
    first_call_s: dict = field(default_factory=dict)


def make_inputs(state: CaseState) -> dict:
    wl, dev = state.wl, state.opt.device
    g = torch.Generator(dev).manual_seed(1234 + wl.seed)
    shape = (wl.B, wl.H, wl.L, wl.D)
    q, k, v, go = (torch.randn(shape, generator=g, device=dev, dtype=wl.dtype) for _ in range(4))
    grad = state.direction != "fwd"
    return {"q": q.requires_grad_(grad), "k": k.requires_grad_(grad), "v": v.requires_grad_(grad),
            "grad_out": go, "state": state}


def _outputs(ref: dict, direction: str) -> tuple[tuple[torch.Tensor, ...], tuple[float, ...]]:
    names = {"fwd": ("out",), "bwd": ("dq", "dk", "dv"), "fwd+bwd": ("out", "dq", "dk", "dv")}[direction]
    tensors = tuple(ref[n] for n in names)
    factors = tuple(1.0 if n == "out" else GRAD_TOL_FACTOR for n in names)
    return tensors, factors


def reference(x: dict) -> tuple[torch.Tensor, ...]:
    """Harness reference: the workload's reference tensors for this direction, divided by
    (tolerance factor x row RMS); the scales are kept for the providers' check call."""
    state: CaseState = x["state"]
    wl = state.wl
    if wl.reference is None:
        wl.reference = _compute_reference(wl, x, state.opt)
    tensors, factors = _outputs(wl.reference, state.direction)
    state.scales = tuple(f * _row_scale(t) for t, f in zip(tensors, factors))
    return tuple(t.float() / s for t, s in zip(tensors, state.scales))


def _run_direction(attn: Callable, x: dict):
    q, k, v, direction = x["q"], x["k"], x["v"], x["state"].direction
    if direction == "fwd":
        return (attn(q, k, v),)
    if direction == "bwd":  # the forward runs once (in the untimed check call); time the grad only
        if "_out" not in x:
            x["_out"] = attn(q, k, v)
        return torch.autograd.grad(x["_out"], (q, k, v), x["grad_out"], retain_graph=True)
    out = attn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), x["grad_out"]))


def _provider(name: str, attn: Callable, skip_reason: Callable, baseline: bool = False) -> Provider:
    """attn(q, k, v, wl) -> out; skip_reason(wl, opt, direction) -> None or why it does not apply.

    The first call with given inputs is the harness's correctness check: it raises Skip when the
    provider does not apply, records its wall time (JIT/compile included) and returns the outputs
    divided by the reference's scales. Later calls (warm-up, timed) just run the op.
    """

    def fn(x: dict):
        if x.get("_checked"):
            return _run_direction(lambda q, k, v: attn(q, k, v, x["state"].wl), x)
        state: CaseState = x["state"]
        reason = skip_reason(state.wl, state.opt, state.direction)
        if reason:
            raise Skipped(reason)
        _sync(state.opt.device)
        t0 = time.perf_counter()
        try:
            outs = _run_direction(lambda q, k, v: attn(q, k, v, state.wl), x)
        except RuntimeError as exc:  # an SDPA backend that turns the case down is a skip, not a bug
            if any(m in str(exc) for m in ("No available kernel", "No viable backend")):
                raise Skipped(f"declined by torch: {str(exc).splitlines()[0]}") from exc
            raise
        _sync(state.opt.device)
        state.first_call_s[name] = round(time.perf_counter() - t0, 4)
        x["_checked"] = True
        return tuple(o.float() / s for o, s in zip(outs, state.scales))

    return Provider(name, fn, baseline)


def _fastdistill(q, k, v, wl):
    return fastdistill.attention(q, k, v, wl.mask)


def _sdpa(backend_name: str) -> Callable:
    def attn(q, k, v, wl):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([getattr(SDPBackend, backend_name)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=wl.kind == "causal")

    return attn


def _sdpa_plain(q, k, v, wl):  # CPU smoke: no backend selection
    return F.scaled_dot_product_attention(q, k, v, is_causal=wl.kind == "causal")


def _sdpa_bool(q, k, v, wl):
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=wl.bool_mask)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=wl.bool_mask)


def _flex(q, k, v, wl):
    if wl.flex_error:
        raise RuntimeError(f"flex setup failed: {wl.flex_error}")
    attn, _ = _flex_fns(q.device.type)
    return attn(q, k, v, block_mask=wl.block_mask)


def _reference_provider(q, k, v, wl):
    return attention_reference(q, k, v, wl.mask)


def _no_skip(wl, opt, direction=None):
    return None


def _sdpa_skip(wl, opt, direction=None):
    if wl.kind not in ("dense", "causal"):
        return "takes no mask besides is_causal: a chunk-causal or block-sparse mask must be materialised"
    return None


def _bool_skip(wl, opt, direction=None):
    return wl.bool_mask_skip


def _flex_skip_reason(wl, opt, direction=None):
    if opt.smoke and not opt.flex:
        return "CPU smoke: flex compiles with inductor (~20 s per graph); --flex runs it"
    if wl.check:
        return "tiny check case: not worth a flex compile"
    if opt.device == "cpu" and direction not in (None, "fwd"):
        return "FlexAttention has no backward on CPU"
    return None


def _reference_skip(wl, opt, direction=None):
    if opt.smoke or wl.check:
        return None
    return "pure PyTorch: too slow at this size (runs in --smoke and on the check-* cases)"


def providers(smoke: bool) -> tuple[Provider, ...]:
    if smoke:
        return (
            _provider("fastdistill", _fastdistill, _no_skip),
            _provider("sdpa (cpu default)", _sdpa_plain, _sdpa_skip, baseline=True),
            _provider("sdpa + bool mask", _sdpa_bool, _bool_skip),
            _provider("flex_attention (compiled)", _flex, _flex_skip_reason, baseline=True),
            _provider("reference", _reference_provider, _reference_skip),
        )
    return (
        _provider("fastdistill", _fastdistill, _no_skip),
        _provider("sdpa flash", _sdpa("FLASH_ATTENTION"), _sdpa_skip, baseline=True),
        _provider("sdpa cudnn", _sdpa("CUDNN_ATTENTION"), _sdpa_skip),
        _provider("sdpa efficient", _sdpa("EFFICIENT_ATTENTION"), _sdpa_skip),
        _provider("sdpa efficient + bool mask", _sdpa_bool, _bool_skip),
        _provider("flex_attention (compiled)", _flex, _flex_skip_reason, baseline=True),
        _provider("reference", _reference_provider, _reference_skip),
    )


# ----------------------------------------------------------------------------------------------
# Running: harness._measure per case, one table + JSON lines per workload
# ----------------------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, Options]:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--only", default=None)
    own.add_argument("--directions", default=",".join(DIRECTIONS))
    own.add_argument("--reference", choices=("ours-fp32", "fp64"), default="ours-fp32")
    own.add_argument("--mask-budget-gib", type=float, default=4.0)
    own.add_argument("--flex", action="store_true")
    own.add_argument("--list", action="store_true")
    extra, rest = own.parse_known_args(sys.argv[1:] if argv is None else argv)
    if extra.list:
        smoke = "--smoke" in rest
        for wl in workloads(smoke):
            print(f"{wl.name:20s} L={wl.L:<6d} H={wl.H} D={wl.D} {wl.kind:6s} {wl.note}")
        sys.exit(0)
    args = parse_args(__doc__, rest)
    if not args.smoke:
        if not any(a == "--reps" or a.startswith("--reps=") for a in rest):
            args.reps = 20
        args.warmup = 3
    directions = tuple(d.strip() for d in extra.directions.split(",") if d.strip())
    if not directions or any(d not in DIRECTIONS for d in directions):
        sys.exit(f"--directions: choose from {','.join(DIRECTIONS)}, got {extra.directions!r}")
    args.only = extra.only
    return args, Options(args.device, args.smoke, extra.flex, extra.reference, extra.mask_budget_gib,
                         directions)


def _selected(wls: list[Workload], only: str | None) -> list[Workload]:
    if not only:
        return wls
    pats = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [wl for wl in wls if any(fnmatch.fnmatchcase(wl.name, p) for p in pats)]
    if not chosen:
        sys.exit(f"--only {only!r} matches no workload; --list shows them")
    return chosen


def _skip_row(provider: Provider, reason: str, baselines: list[str]) -> dict:
    return {"provider": provider.name, "baseline": provider.baseline, "ms": None, "correct": None,
            "skipped": reason, "max_abs_err": None, "speedup": {b: None for b in baselines}}


def _measure_workload(bench: Benchmark, wl: Workload, args, opt: Options, peak) -> tuple[list, list]:
    """(measured rows, skipped rows) of one workload, each row (params, result dict)."""
    baselines = [p.name for p in bench.providers if p.baseline]
    measured, skipped = [], []
    atol, rtol = _TOLERANCE[wl.dtype]
    for direction in opt.directions:
        state = CaseState(wl, direction, opt)
        case = Case(wl.params(direction), lambda s=state: make_inputs(s), atol, rtol)
        try:
            results = harness._measure(bench, case, args, peak)
        except Exception as exc:  # e.g. out of memory while timing: report and go on
            msg = f"{type(exc).__name__}: {exc}"
            print(f"!! {wl.name} {direction}: the case failed outside the correctness check: {msg}", flush=True)
            results = [{"provider": "(case)", "baseline": False, "ms": None, "correct": False,
                        "max_abs_err": None, "error": msg, "speedup": {b: None for b in baselines}}]
        by_name = {p.name: p for p in bench.providers}
        for res in results:
            err = res.get("error") or ""
            if err.startswith(_SKIP_PREFIX):
                skipped.append((case.params, _skip_row(by_name[res["provider"]], err[len(_SKIP_PREFIX):],
                                                       baselines)))
                continue
            res["first_call_s"] = state.first_call_s.get(res["provider"])
            res["allowed_pairs"] = wl.pairs
            res["reference"] = wl.setup.get("reference")
            res["tolerance"] = {"atol_row_rms_units": atol, "rtol": rtol, "grad_atol_factor": GRAD_TOL_FACTOR}
            if res["provider"].startswith("flex"):
                res["setup"] = {k: v for k, v in wl.setup.items() if k.startswith("flex")}
            elif "bool mask" in res["provider"]:
                res["setup"] = {k: v for k, v in wl.setup.items() if k.startswith("bool")}
            measured.append((case.params, res))
    return measured, skipped


def _notes(wl: Workload, measured: list, skipped: list, opt: Options) -> str:
    lines = [f"   {wl.name}: L={wl.L}, density {wl.density:.4f} ({wl.pairs} allowed pairs per head)"
             + (f"; {wl.note}" if wl.note else "") + f"; reference: {wl.setup.get('reference')}"]
    if "reference_fallback" in wl.setup:
        lines.append(f"   reference fallback: {wl.setup['reference_fallback']}")
    setup = ", ".join(f"{k} {v:g}" for k, v in wl.setup.items() if k.endswith("_s"))
    if setup:
        lines.append(f"   setup (s): {setup}")
    first: dict[str, dict[str, float]] = {}
    for params, res in measured:
        if res.get("first_call_s") is not None:
            first.setdefault(res["provider"], {})[params["direction"]] = res["first_call_s"]
    if first:
        lines.append("   first call (s, JIT/compile included; bwd = untimed forward + first backward): "
                     + "; ".join(f"{p}: " + ", ".join(f"{d} {t:g}" for d, t in ts.items())
                                 for p, ts in first.items()))
    grouped: dict[tuple[str, str], list[str]] = {}
    for params, res in skipped:
        grouped.setdefault((res["provider"], res["skipped"]), []).append(params["direction"])
    for (prov, reason), dirs in grouped.items():
        lines.append(f"   skipped {prov} ({', '.join(dirs)}): {reason}")
    return "\n".join(lines)


def _save(bench: Benchmark, rows: list, env: dict, peak, smoke: bool) -> None:
    harness.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    timestamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(harness.RESULTS_DIR / f"{bench.name}.jsonl", "a") as f:
        for params, res in rows:
            record = {"timestamp": timestamp, "bench": bench.name, "params": params, **res,
                      "unit": bench.unit, "peak": peak, **env, "smoke": smoke}
            f.write(json.dumps(record) + "\n")


def main(argv: list[str] | None = None) -> int:
    args, opt = _parse(argv)
    bench = Benchmark(name="attention", providers=providers(args.smoke), reference=reference,
                      unit="TFLOP/s", work=flops)
    wls = _selected(workloads(args.smoke), args.only)
    peak = harness.measured_peak(bench.unit) if args.device == "cuda" else None
    env = harness.environment(args.device)
    t_start, ok = time.perf_counter(), True
    if args.smoke:
        print("smoke: CUDA SDPA backends (flash/cudnn/efficient) do not exist on CPU and are not listed"
              + ("" if opt.flex else "; flex_attention is skipped (see its rows' reason)"))
    for wl in wls:
        t0 = time.perf_counter()
        prepare(wl, opt)
        measured, skipped = _measure_workload(bench, wl, args, opt, peak)
        release(wl)
        if measured:
            print(harness._table(bench, measured, env, peak))
        print(_notes(wl, measured, skipped, opt))
        print(f"   ({time.perf_counter() - t0:.1f} s)\n", flush=True)
        ok &= all(res["correct"] for _, res in measured)
        if args.save:
            _save(bench, measured + skipped, env, peak, args.smoke)
    print(f"attention bench: {'all checks passed' if ok else 'SOME CHECKS FAILED'} "
          f"in {time.perf_counter() - t_start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
