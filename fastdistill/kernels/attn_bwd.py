"""Attention backward over a tile schedule: dQ, dK, dV from dO, the saved out and lse.

FlashAttention-2 split: one kernel per key tile accumulates dK and dV over the query tiles that visit
it (the schedule's transposed lists; with GQA, over every query head of the key head), one kernel per
query tile accumulates dQ over its key tiles. Both recompute P = exp(scale q k^T - lse) per tile and
use delta = rowsum(dO * O). Both walk their lists with the shared iterator of `_tiles.py`, so partial
tiles evaluate the same predicate as the forward and empty tiles are never visited.

Rows without any allowed key (lse = -inf) contribute nothing: their lse is read as +inf, so every P
of the row is exp(-inf) = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelEntry, poison, register_kernel
from ._tiles import default_configs, launch_args, masked_scores, runtime_hints, tile_at, tile_count
from .attn_fwd import LOG2E, TileConfig, dot_precision, padded_head_dim


def backward_config(head_dim: int, dtype: torch.dtype, kind: str) -> TileConfig:
    """One tile shape for both backward kernels (they share a schedule), per head dim, dtype and mask
    kind of `_tiles.MASK_KINDS`, chosen so that neither kernel spills on sm_90 or sm_80
    (benchmarks/kernel_report.py): dK/dV keeps two [BLOCK_N, D] fp32 accumulators and K, V live."""
    if dtype == torch.float32:
        return TileConfig(32, 32, 4, 2)
    if head_dim <= 64:
        return TileConfig(64, 32, 4, 2)
    if kind.endswith("any-size"):
        return TileConfig(64, 16, 8, 2)
    return TileConfig(64, 64, 8, 1)


@triton.jit
def _load_row_stats(LSE, DELTA, row_base, offs_m, Lq):
    """lse in base 2 (empty and out-of-range rows as +inf so their P is 0) and delta for rows offs_m."""
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < Lq, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < Lq, other=0.0)
    return lse, delta


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Q_COUNT, Q_INDEX, Q_FULL,
    stride_cb, stride_ch, stride_cn,
    stride_ib, stride_ih, stride_in,
    stride_fb, stride_fh, stride_fn,
    BLOCK_MASK, stride_bmb, stride_bmh, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
    chunk_size, window, sink, q_offset, kv_offset,
    heads, kv_heads, group, Lq, Lk, num_q_tiles, scale, scale_log2,
    D: tl.constexpr, DV_: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_SCHEDULE: tl.constexpr, HAS_CHUNK: tl.constexpr, BLOCK_MODE: tl.constexpr, PRECISION: tl.constexpr,
):
    k_tile = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // kv_heads
    hk = bhk % kv_heads
    offs_n = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    kT = tl.load(
        K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D),
        other=0.0,
    )
    vT = tl.load(
        V + b * stride_vb + hk * stride_vh + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
        mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < DV_),
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_V], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        mask_base = BLOCK_MASK + b * stride_bmb + h * stride_bmh
        count = tile_count(Q_COUNT + b * stride_cb + h * stride_ch + k_tile * stride_cn, num_q_tiles, USE_SCHEDULE)
        index_base = Q_INDEX + b * stride_ib + h * stride_ih + k_tile * stride_in
        full_base = Q_FULL + b * stride_fb + h * stride_fh + k_tile * stride_fn
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * heads + h) * Lq
        for step in range(0, count):
            q_tile, full = tile_at(index_base, full_base, step, USE_SCHEDULE)
            offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
            q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                         mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV_), other=0.0)
            lse2, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, Lq)
            s = masked_scores(q, kT, offs_m, offs_n, full, Lq, Lk, scale_log2, chunk_size, window, sink,
                              q_offset, kv_offset, mask_base, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
                              HAS_CHUNK, BLOCK_MODE, PRECISION)
            p = tl.exp2(s - lse2[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D))
    tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV_))


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    KV_COUNT, KV_INDEX, KV_FULL,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    stride_fb, stride_fh, stride_fm,
    BLOCK_MASK, stride_bmb, stride_bmh, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
    chunk_size, window, sink, q_offset, kv_offset,
    heads, group, Lq, Lk, num_k_tiles, scale, scale_log2,
    D: tl.constexpr, DV_: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_SCHEDULE: tl.constexpr, HAS_CHUNK: tl.constexpr, BLOCK_MODE: tl.constexpr, PRECISION: tl.constexpr,
):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    hk = h // group
    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV_), other=0.0)
    lse2, delta = _load_row_stats(LSE, DELTA, bh * Lq, offs_m, Lq)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = BLOCK_MASK + b * stride_bmb + h * stride_bmh
    count = tile_count(KV_COUNT + b * stride_cb + h * stride_ch + q_tile * stride_cm, num_k_tiles, USE_SCHEDULE)
    index_base = KV_INDEX + b * stride_ib + h * stride_ih + q_tile * stride_im
    full_base = KV_FULL + b * stride_fb + h * stride_fh + q_tile * stride_fm
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for step in range(0, count):
        k_tile, full = tile_at(index_base, full_base, step, USE_SCHEDULE)
        offs_n = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        kT = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < Lk) & (offs_d[:, None] < D), other=0.0)
        vT = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=(offs_n[None, :] < Lk) & (offs_dv[:, None] < DV_), other=0.0)
        s = masked_scores(q, kT, offs_m, offs_n, full, Lq, Lk, scale_log2, chunk_size, window, sink,
                          q_offset, kv_offset, mask_base, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
                          HAS_CHUNK, BLOCK_MODE, PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))


def attention_backward_triton(q, k, v, out, lse, grad_out, mask, scale):
    """(dq, dk, dv) in the dtypes of q, k, v. lse [B, Hq, Lq] float32 from the forward."""
    dq = poison(torch.empty_like(q))
    dk = poison(torch.empty_like(k))
    dv = poison(torch.empty_like(v))
    if q.numel() == 0 or k.numel() == 0:  # no pair exists: every gradient is zero, no launch
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = backward_delta(out, grad_out)
    lse = lse.contiguous()
    backward_dkdv_triton(q, k, v, grad_out, lse, delta, mask, scale, dk, dv)
    backward_dq_triton(q, k, v, grad_out, lse, delta, mask, scale, dq)
    return dq, dk, dv


def backward_delta(out: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) [B, Hq, Lq] float32, the softmax-backward term both kernels read."""
    return (grad_out.float() * out.float()).sum(-1).contiguous()


def _launch(q, k, mask):
    """(tile config, mask arguments, constexprs, num q tiles, num k tiles) shared by both kernels."""
    batch, heads, lq, d = q.shape
    lk = k.shape[2]
    cfg, a = launch_args(mask, batch, heads, lq, lk, d, q.dtype, backward_config, q.device)
    mask_args = (a["block_mask"], *a["block_mask"].stride(), a["mask_block_q"], a["mask_block_k"],
                 a["chunk_size"], a["window"], a["sink"], a["q_offset"], a["kv_offset"])
    return cfg, a, mask_args, triton.cdiv(lq, cfg.block_m), triton.cdiv(lk, cfg.block_n)


def _constexprs(cfg, a, q, v):
    d, dv_dim = q.shape[-1], v.shape[-1]
    return dict(D=d, DV_=dv_dim, HEAD_DIM=padded_head_dim(d), HEAD_DIM_V=padded_head_dim(dv_dim),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_SCHEDULE=a["USE_SCHEDULE"],
                HAS_CHUNK=a["HAS_CHUNK"], BLOCK_MODE=a["BLOCK_MODE"], PRECISION=dot_precision(q.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def backward_dkdv_triton(q, k, v, grad_out, lse, delta, mask, scale, dk, dv):
    """dK, dV of the keys k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] into dk, dv (same shapes), in place.

    lse [B, Hq, Lq] and delta [B, Hq, Lq] (contiguous float32) are the rows' statistics over *all* the
    keys the forward attended to, so k/v may be any subset of those keys (with `mask` restricted to
    it): the one-chunk backward of RollingKVCache passes only the current chunk's keys.
    """
    batch, heads = q.shape[:2]
    kv_heads, lk = k.shape[1], k.shape[2]
    cfg, a, mask_args, num_q_tiles, num_k_tiles = _launch(q, k, mask)
    _attn_bwd_dkdv_kernel[(num_k_tiles, batch * kv_heads)](
        q, k, v, grad_out, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        a["q_count"], a["q_index"], a["q_full"],
        *a["q_count"].stride(), *a["q_index"].stride()[:3], *a["q_full"].stride()[:3],
        *mask_args,
        heads, kv_heads, heads // kv_heads, q.shape[2], lk, num_q_tiles, scale, scale * LOG2E,
        **_constexprs(cfg, a, q, v),
    )


def backward_dq_triton(q, k, v, grad_out, lse, delta, mask, scale, dq):
    """dQ [B, Hq, Lq, D] over the keys k, v into dq, in place (lse and delta as in backward_dkdv_triton)."""
    batch, heads = q.shape[:2]
    cfg, a, mask_args, num_q_tiles, num_k_tiles = _launch(q, k, mask)
    _attn_bwd_dq_kernel[(num_q_tiles, batch * heads)](
        q, k, v, grad_out, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        a["kv_count"], a["kv_index"], a["kv_full"],
        *a["kv_count"].stride(), *a["kv_index"].stride()[:3], *a["kv_full"].stride()[:3],
        *mask_args,
        heads, heads // k.shape[1], q.shape[2], k.shape[2], num_k_tiles, scale, scale * LOG2E,
        **_constexprs(cfg, a, q, v),
    )


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    """Triton parameter types of a backward kernel for ahead-of-time compilation (kernel report)."""
    ptr = f"*{dtype}"
    fn = _attn_bwd_dkdv_kernel if kernel == "dkdv" else _attn_bwd_dq_kernel
    sig = {}
    for name in fn.arg_names:
        if name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name in ("Q_COUNT", "Q_INDEX", "KV_COUNT", "KV_INDEX"):
            sig[name] = "*i32"
        elif name in ("Q_FULL", "KV_FULL", "BLOCK_MASK"):
            sig[name] = "*i1"
        elif name in ("Q", "K", "V", "DO", "DQ", "DK", "DV"):
            sig[name] = ptr
        elif name in ("scale", "scale_log2"):
            sig[name] = "fp32"
        elif name.isupper() or name in ("D", "DV_"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def _configs(dtype: torch.dtype):
    return default_configs(backward_config, dtype, "DV_", dot_precision(dtype))


for _name, _dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    for _kernel, _fn in (("dkdv", _attn_bwd_dkdv_kernel), ("dq", _attn_bwd_dq_kernel)):
        _sig = _signature(_kernel, _name)
        register_kernel(KernelEntry(f"attn_bwd_{_kernel}_{_name}", _fn, _sig, _configs(_dtype), runtime_hints(_fn, _sig)))
