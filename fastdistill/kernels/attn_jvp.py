"""Forward-mode derivative of attention in one streaming pass: out, t_out, lse and mu.

With S = scale q k^T (masked), P = softmax(S), tS = scale (tq k^T + q tk^T):

    out = P v,   mu = rowsum(P * tS) (= d lse),   t_out = (P * (tS - mu)) v + P tv

One program per (query tile, batch * query head) walks the query tile's key tiles with the iterator
the forward and backward kernels use (`_tiles.py`), with an online softmax and two fp32 accumulators:

    acc_o = sum P~ v            acc_t = sum P~ tv + (P~ * tS) v     (two dots into one accumulator)
    l = sum P~                  r = sum P~ * tS
    out = acc_o / l,  mu = r / l,  t_out = acc_t / l - mu * out

(P~ = exp(S - running max); every sum is rescaled when the max grows.) The dots of tangents that are
None are not emitted (HAS_TQ / HAS_TK / HAS_TV): 6, 5, 4 or 3 matmul units (tangents qkv, qk, q, v)
against the forward's 2, i.e. 3x, 2.5x, 2x, 1.5x a forward.

Numerics (notes/jvp_attention.md): when the keys or their tangents share a component (adaLN time
modulation, padded text), tS carries a large per-row offset; rounding P~ * tS to fp16/bf16 for the
dot with v would then lose its token-dependent part, and t_out = acc_t / l - mu * out would amplify
the loss. t_out does not change when a per-row constant is added to tS, so the kernel subtracts
c = scale (tq . kbar + q . tkbar) in fp32 before forming P~ * tS, with kbar / tkbar the key / key
tangent means per (batch, kv head) from a cheap pre-pass; mu is returned with c added back.

Rows with no allowed key get out = t_out = 0, mu = 0 and lse = -inf (no exp(-inf - -inf) is formed).
Lengths and mask parameters are runtime arguments (no recompile per length).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import KernelEntry, poison, register_kernel
from ._tiles import FULL_LISTED, MASK_KINDS, launch_args, masked_scores, runtime_hints, tile_at, tile_count
from .attn_fwd import LOG2E, TileConfig, dot_precision, padded_head_dim


def jvp_config(head_dim: int, dtype: torch.dtype, kind: str) -> TileConfig:
    """The JVP kernel's tiles per head dim, dtype and mask kind of `_tiles.MASK_KINDS` (never per
    length), chosen from ahead-of-time compiles so that no configuration spills on sm_90 or sm_80
    (benchmarks/kernel_report.py): the kernel holds two [BLOCK_M, Dv] fp32 accumulators and q and tq,
    twice the forward's live state, so its key tiles are narrower than the forward's. At D = 128 the
    full mask walks its tile list (`list_full`, kind "full-listed"): the counted loop, which Triton
    pipelines more deeply, spilled in every configuration tried."""
    if dtype == torch.float32:
        return TileConfig(32, 32, 4, 2)
    if head_dim <= 64:
        return TileConfig(128, 16 if kind.endswith("any-size") else 32, 8, 2)
    return TileConfig(64, 16 if kind.endswith("any-size") else 32, 8, 2)


def lists_full_mask(head_dim: int, dtype: torch.dtype) -> bool:
    """Whether a launch without mask terms walks the full mask's tile list (see jvp_config)."""
    return head_dim > 64 and dtype != torch.float32


@triton.jit
def _attn_jvp_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE, MU, KBAR, TKBAR,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_tqb, stride_tqh, stride_tqm, stride_tqd,
    stride_tkb, stride_tkh, stride_tkn, stride_tkd,
    stride_tvb, stride_tvh, stride_tvn, stride_tvd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_tob, stride_toh, stride_tom, stride_tod,
    KV_COUNT, KV_INDEX, KV_FULL,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    stride_fb, stride_fh, stride_fm,
    BLOCK_MASK, stride_bmb, stride_bmh, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
    chunk_size, window, sink, q_offset, kv_offset,
    heads, kv_heads, group, Lq, Lk, num_k_tiles, scale, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_SCHEDULE: tl.constexpr, HAS_CHUNK: tl.constexpr, BLOCK_MODE: tl.constexpr, PRECISION: tl.constexpr,
    HAS_TQ: tl.constexpr, HAS_TK: tl.constexpr, HAS_TV: tl.constexpr, ROW_SHIFT: tl.constexpr,
):
    q_tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    hk = h // group

    offs_m = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_dv = tl.arange(0, HEAD_DIM_V)
    q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    # Per-row shift c (fp32) of tS; zero without tangents of the scores.
    shift = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_TQ:
        tq = tl.load(TQ + b * stride_tqb + h * stride_tqh + offs_m[:, None] * stride_tqm + offs_d[None, :] * stride_tqd,
                     mask=q_mask, other=0.0)
        if ROW_SHIFT:
            kbar = tl.load(KBAR + (b * kv_heads + hk) * D + offs_d, mask=offs_d < D, other=0.0)
            shift += tl.sum(tq.to(tl.float32) * kbar[None, :], 1)
    if HAS_TK:
        if ROW_SHIFT:
            tkbar = tl.load(TKBAR + (b * kv_heads + hk) * D + offs_d, mask=offs_d < D, other=0.0)
            shift += tl.sum(q.to(tl.float32) * tkbar[None, :], 1)
    shift = shift * scale

    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    tk_base = TK + b * stride_tkb + hk * stride_tkh
    tv_base = TV + b * stride_tvb + hk * stride_tvh
    mask_base = BLOCK_MASK + b * stride_bmb + h * stride_bmh
    count = tile_count(KV_COUNT + b * stride_cb + h * stride_ch + q_tile * stride_cm, num_k_tiles, USE_SCHEDULE)
    index_base = KV_INDEX + b * stride_ib + h * stride_ih + q_tile * stride_im
    full_base = KV_FULL + b * stride_fb + h * stride_fh + q_tile * stride_fm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    r_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    acc_t = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    for step in range(0, count):
        k_tile, full = tile_at(index_base, full_base, step, USE_SCHEDULE)
        offs_n = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_rows = offs_n[:, None] < Lk
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_rows & (offs_d[None, :] < D), other=0.0)
        s = masked_scores(q, tl.trans(k), offs_m, offs_n, full, Lq, Lk, scale_log2, chunk_size, window, sink,
                          q_offset, kv_offset, mask_base, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
                          HAS_CHUNK, BLOCK_MODE, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing allowed so far keep m = -inf; shift them by 0 so every exp2 sees -inf - 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=kv_rows & (offs_dv[None, :] < DV), other=0.0)
        # Every dot accumulates into its accumulator (acc= form): no third [BLOCK_M, Dv] fp32 temporary.
        acc_o = tl.dot(p.to(v.dtype), v, acc_o * alpha[:, None], input_precision=PRECISION)
        acc_t = acc_t * alpha[:, None]
        if HAS_TV:
            tv = tl.load(tv_base + offs_n[:, None] * stride_tvn + offs_dv[None, :] * stride_tvd,
                         mask=kv_rows & (offs_dv[None, :] < DV), other=0.0)
            acc_t = tl.dot(p.to(tv.dtype), tv, acc_t, input_precision=PRECISION)
        if HAS_TQ or HAS_TK:
            ts = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if HAS_TQ:
                ts = tl.dot(tq, tl.trans(k), ts, input_precision=PRECISION)
            if HAS_TK:
                tk = tl.load(tk_base + offs_n[:, None] * stride_tkn + offs_d[None, :] * stride_tkd,
                             mask=kv_rows & (offs_d[None, :] < D), other=0.0)
                ts = tl.dot(q, tl.trans(tk), ts, input_precision=PRECISION)
            # P~ * (tS - c) in fp32, then rounded once for the dot; p = 0 on disallowed pairs.
            hp = p * (ts * scale - shift[:, None])
            r_i = r_i * alpha + tl.sum(hp, 1)
            acc_t = tl.dot(hp.to(v.dtype), v, acc_t, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    out = acc_o * inv_l[:, None]
    mu_shifted = r_i * inv_l
    t_out = acc_t * inv_l[:, None] - mu_shifted[:, None] * out
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
    mu = tl.where(empty, 0.0, mu_shifted + shift)
    out_mask = (offs_m[:, None] < Lq) & (offs_dv[None, :] < DV)
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=out_mask)
    tl.store(TO + b * stride_tob + h * stride_toh + offs_m[:, None] * stride_tom + offs_dv[None, :] * stride_tod,
             t_out.to(TO.dtype.element_ty), mask=out_mask)
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)
    tl.store(MU + bh * Lq + offs_m, mu, mask=offs_m < Lq)


def key_means(x: torch.Tensor | None) -> torch.Tensor | None:
    """[B, Hkv, L, D] -> its mean over L, fp32 [B, Hkv, D] contiguous (the row-shift pre-pass)."""
    if x is None:
        return None
    return torch.mean(x, dim=2, dtype=torch.float32).contiguous()


def attention_jvp_triton(q, k, v, tq, tk, tv, mask, scale, tangent_dtype, *, row_shift: bool = True):
    """out [B, Hq, Lq, Dv] (q.dtype), t_out [B, Hq, Lq, Dv] (tangent_dtype), lse and mu [B, Hq, Lq]
    (float32). Tangents may be None (zero). Arguments are validated by the caller. row_shift=False
    drops the per-row shift of tS (only to demonstrate what it prevents: the common-offset test)."""
    batch, heads, lq, d = q.shape
    kv_heads, lk, dv = k.shape[1], k.shape[2], v.shape[3]
    out = poison(torch.empty(batch, heads, lq, dv, dtype=q.dtype, device=q.device))
    t_out = poison(torch.empty(batch, heads, lq, dv, dtype=tangent_dtype, device=q.device))
    lse = poison(torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device))
    mu = poison(torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device))
    if out.numel() == 0 or lk == 0:  # nothing to compute, or every row empty: no launch
        return out.zero_(), t_out.zero_(), lse.fill_(float("-inf")), mu.zero_()
    cfg, a = launch_args(mask, batch, heads, lq, lk, d, q.dtype, jvp_config, q.device,
                         list_full=lists_full_mask(max(d, dv), q.dtype))
    kbar = key_means(k) if tq is not None and row_shift else None
    tkbar = key_means(tk) if tk is not None and row_shift else None
    # Tangents that are None are never read (their HAS_* is False); q/k/v stand in for their pointers.
    tq_, tk_, tv_ = (t if t is not None else x for t, x in ((tq, q), (tk, k), (tv, v)))
    grid = (triton.cdiv(lq, cfg.block_m), batch * heads)
    _attn_jvp_kernel[grid](
        q, k, v, tq_, tk_, tv_, out, t_out, lse, mu,
        kbar if kbar is not None else lse, tkbar if tkbar is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *tq_.stride(), *tk_.stride(), *tv_.stride(),
        *out.stride(), *t_out.stride(),
        a["kv_count"], a["kv_index"], a["kv_full"],
        *a["kv_count"].stride(), *a["kv_index"].stride()[:3], *a["kv_full"].stride()[:3],
        a["block_mask"], *a["block_mask"].stride(), a["mask_block_q"], a["mask_block_k"],
        a["chunk_size"], a["window"], a["sink"], a["q_offset"], a["kv_offset"],
        heads, kv_heads, heads // kv_heads, lq, lk, triton.cdiv(lk, cfg.block_n), scale, scale * LOG2E,
        D=d, DV=dv, HEAD_DIM=padded_head_dim(d), HEAD_DIM_V=padded_head_dim(dv),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        USE_SCHEDULE=a["USE_SCHEDULE"], HAS_CHUNK=a["HAS_CHUNK"], BLOCK_MODE=a["BLOCK_MODE"],
        PRECISION=dot_precision(q.dtype),
        HAS_TQ=tq is not None, HAS_TK=tk is not None, HAS_TV=tv is not None, ROW_SHIFT=row_shift,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, t_out, lse, mu


def _signature(dtype: str) -> dict[str, str]:
    """Triton types of the kernel's parameters for ahead-of-time compilation (kernel report)."""
    ptr = f"*{dtype}"
    sig = {name: ptr for name in ("Q", "K", "V", "TQ", "TK", "TV", "O", "TO")}
    sig.update(LSE="*fp32", MU="*fp32", KBAR="*fp32", TKBAR="*fp32")
    for t in ("q", "k", "v", "tq", "tk", "tv", "o", "to"):
        for dim in ("b", "h", "m" if t in ("q", "tq", "o", "to") else "n", "d"):
            sig[f"stride_{t}{dim}"] = "i32"
    sig.update(KV_COUNT="*i32", KV_INDEX="*i32", KV_FULL="*i1")
    for name in ("cb", "ch", "cm", "ib", "ih", "im", "fb", "fh", "fm"):
        sig[f"stride_{name}"] = "i32"
    sig["BLOCK_MASK"] = "*i1"
    for name in ("stride_bmb", "stride_bmh", "stride_bmq", "stride_bmk", "mask_block_q", "mask_block_k",
                 "chunk_size", "window", "sink", "q_offset", "kv_offset", "heads", "kv_heads", "group", "Lq", "Lk",
                 "num_k_tiles"):
        sig[name] = "i32"
    sig.update(scale="fp32", scale_log2="fp32")
    for name in ("D", "DV", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N", "USE_SCHEDULE", "HAS_CHUNK", "BLOCK_MODE",
                 "PRECISION", "HAS_TQ", "HAS_TK", "HAS_TV", "ROW_SHIFT"):
        sig[name] = "constexpr"
    return sig


def _configs(dtype: torch.dtype):
    """Every (head dim, mask kind) with all three tangents (the most live state: the default configs the
    report checks for spills), plus the q-tangent-only variant (cross-attention to a frozen context)."""
    from . import KernelConfig

    configs = []
    for d in (64, 128):
        for kind, (use_schedule, has_chunk, block_mode) in MASK_KINDS.items():
            if kind == "full" and lists_full_mask(d, dtype):
                kind, (use_schedule, has_chunk, block_mode) = FULL_LISTED
            cfg = jvp_config(d, dtype, kind)
            for tangents in ("qkv", "q") if kind.startswith("full") else ("qkv",):
                configs.append(KernelConfig(
                    name=f"d{d}-{kind}-t{tangents}-m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}",
                    constexprs={"D": d, "DV": d, "HEAD_DIM": d, "HEAD_DIM_V": d, "BLOCK_M": cfg.block_m,
                                "BLOCK_N": cfg.block_n, "USE_SCHEDULE": use_schedule, "HAS_CHUNK": has_chunk,
                                "BLOCK_MODE": block_mode, "PRECISION": dot_precision(dtype),
                                "HAS_TQ": "q" in tangents, "HAS_TK": "k" in tangents, "HAS_TV": "v" in tangents,
                                "ROW_SHIFT": True},
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, default=True,
                ))
    return tuple(configs)


for _name, _dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    register_kernel(KernelEntry(f"attn_jvp_{_name}", _attn_jvp_kernel, _signature(_name), _configs(_dtype),
                                runtime_hints(_attn_jvp_kernel, _signature(_name))))
