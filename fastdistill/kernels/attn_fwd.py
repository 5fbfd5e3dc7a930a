"""Attention forward over a tile schedule: out = softmax(scale q k^T + mask) v, and lse.

One program per (query tile, batch * query head). It walks the query tile's key tiles with the shared
iterator (`_tiles.py`): full tiles mask only the sequence end, partial tiles the mask predicate, and
empty tiles are never visited. Online softmax in base 2 with fp32 statistics and accumulator; a row
with no allowed key gets out = 0 and lse = -inf (no exp(-inf - -inf) is ever formed).

Lengths, offsets and mask parameters are runtime arguments, so a new length never recompiles; the
compiled variants differ only in head dim, dtype, tile configuration and mask kind (constexprs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import KernelEntry, poison, register_kernel
from ._tiles import default_configs, launch_args, masked_scores, runtime_hints, tile_at, tile_count

LOG2E = 1.4426950408889634  # scores are kept in base 2: exp(x) = exp2(x * LOG2E)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def forward_config(head_dim: int, dtype: torch.dtype, kind: str) -> TileConfig:
    """The forward's tiles for a mask kind of `_tiles.MASK_KINDS`: a function of head dim, dtype and
    mask kind only (never of the lengths). Chosen so that no configuration spills registers on sm_90
    or sm_80 (benchmarks/kernel_report.py checks it): two warpgroups per 128-row tile for D <= 64,
    64-row tiles for larger heads, narrower key tiles where the block mask is read per element.
    """
    if dtype == torch.float32:  # true fp32 dots hold twice the registers of fp16
        return TileConfig(64, 32, 4, 2)
    if head_dim <= 64:
        if kind == "full":
            return TileConfig(128, 128, 8, 3)
        return TileConfig(128, 32 if kind.endswith("any-size") else 64, 8, 3)
    if kind.endswith("any-size"):
        return TileConfig(64, 32, 8, 3)
    return TileConfig(64, 64, 4, 3)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    KV_COUNT, KV_INDEX, KV_FULL,
    stride_cb, stride_ch, stride_cm,
    stride_ib, stride_ih, stride_im,
    stride_fb, stride_fh, stride_fm,
    BLOCK_MASK, stride_bmb, stride_bmh, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
    chunk_size, window, sink, q_offset, kv_offset,
    heads, group, Lq, Lk, num_k_tiles, scale_log2,
    D: tl.constexpr, DV: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr,
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
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D),
        other=0.0,
    )
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    mask_base = BLOCK_MASK + b * stride_bmb + h * stride_bmh
    count = tile_count(KV_COUNT + b * stride_cb + h * stride_ch + q_tile * stride_cm, num_k_tiles, USE_SCHEDULE)
    index_base = KV_INDEX + b * stride_ib + h * stride_ih + q_tile * stride_im
    full_base = KV_FULL + b * stride_fb + h * stride_fh + q_tile * stride_fm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_V], dtype=tl.float32)
    for step in range(0, count):
        k_tile, full = tile_at(index_base, full_base, step, USE_SCHEDULE)
        offs_n = k_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D),
            other=0.0,
        )
        s = masked_scores(q, tl.trans(k), offs_m, offs_n, full, Lq, Lk, scale_log2, chunk_size, window, sink,
                          q_offset, kv_offset, mask_base, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
                          HAS_CHUNK, BLOCK_MODE, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing allowed so far keep m = -inf; shift them by 0 so every exp2 sees -inf - 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_shift[:, None])
        alpha = tl.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=(offs_n[:, None] < Lk) & (offs_dv[None, :] < DV),
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln 2
    tl.store(
        O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=(offs_m[:, None] < Lq) & (offs_dv[None, :] < DV),
    )
    tl.store(LSE + bh * Lq + offs_m, lse, mask=offs_m < Lq)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs are multiplied in true fp32 ("ieee", no tf32); fp16/bf16 ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"


def padded_head_dim(d: int) -> int:
    """Head dims are padded to a power of two >= 16 inside the kernel (tl.arange and tl.dot need it)."""
    return max(16, triton.next_power_of_2(d))


def attention_forward_triton(q, k, v, mask, scale):
    """out [B, Hq, Lq, Dv] (q.dtype) and lse [B, Hq, Lq] (float32). Arguments validated by the caller."""
    batch, heads, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[3]
    out = poison(torch.empty(batch, heads, lq, dv, dtype=q.dtype, device=q.device))
    lse = poison(torch.empty(batch, heads, lq, dtype=torch.float32, device=q.device))
    if out.numel() == 0 or lk == 0:  # nothing to compute, or every row empty: no launch
        return out.zero_(), lse.fill_(float("-inf"))
    cfg, a = launch_args(mask, batch, heads, lq, lk, d, q.dtype, forward_config, q.device)
    grid = (triton.cdiv(lq, cfg.block_m), batch * heads)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        a["kv_count"], a["kv_index"], a["kv_full"],
        *a["kv_count"].stride(), *a["kv_index"].stride()[:3], *a["kv_full"].stride()[:3],
        a["block_mask"], *a["block_mask"].stride(), a["mask_block_q"], a["mask_block_k"],
        a["chunk_size"], a["window"], a["sink"], a["q_offset"], a["kv_offset"],
        heads, heads // k.shape[1], lq, lk, triton.cdiv(lk, cfg.block_n), scale * LOG2E,
        D=d, DV=dv, HEAD_DIM=padded_head_dim(d), HEAD_DIM_V=padded_head_dim(dv),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        USE_SCHEDULE=a["USE_SCHEDULE"], HAS_CHUNK=a["HAS_CHUNK"], BLOCK_MODE=a["BLOCK_MODE"],
        PRECISION=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def _signature(dtype: str) -> dict[str, str]:
    """Triton types of the kernel's parameters for ahead-of-time compilation (kernel report)."""
    ptr = f"*{dtype}"
    sig = {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32"}
    for t in "qkvo":
        for dim in ("b", "h", "m" if t in "qo" else "n", "d"):
            sig[f"stride_{t}{dim}"] = "i32"
    sig.update(KV_COUNT="*i32", KV_INDEX="*i32", KV_FULL="*i1")
    for name in ("cb", "ch", "cm", "ib", "ih", "im", "fb", "fh", "fm"):
        sig[f"stride_{name}"] = "i32"
    sig["BLOCK_MASK"] = "*i1"
    for name in ("stride_bmb", "stride_bmh", "stride_bmq", "stride_bmk", "mask_block_q", "mask_block_k",
                 "chunk_size", "window", "sink", "q_offset", "kv_offset", "heads", "group", "Lq", "Lk", "num_k_tiles"):
        sig[name] = "i32"
    sig["scale_log2"] = "fp32"
    for name in ("D", "DV", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "BLOCK_N", "USE_SCHEDULE", "HAS_CHUNK", "BLOCK_MODE",
                 "PRECISION"):
        sig[name] = "constexpr"
    return sig


def _configs(dtype: torch.dtype):
    return default_configs(forward_config, dtype, "DV", dot_precision(dtype))


for _name, _dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
    register_kernel(KernelEntry(f"attn_fwd_{_name}", _attn_fwd_kernel, _signature(_name), _configs(_dtype),
                                runtime_hints(_attn_fwd_kernel, _signature(_name))))
