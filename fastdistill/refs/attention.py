"""Reference attention (pure PyTorch): the CPU backend of `fastdistill.attention` and the float64 oracle.

Layout BHSD: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], Hq % Hkv == 0 (GQA: query head h
reads key/value head h // (Hq // Hkv)). The mask is a `fastdistill.masks.Mask` (None = full).

Memory stays bounded: query rows are processed `block_rows` at a time and the mask is read through
`mask.dense_rows` for those rows only, so no [Lq, Lk] score or mask matrix is built for the whole
problem; the live working set is O(B * Hq * block_rows * Lk) plus the O(L) inputs and outputs.
The GQA query heads of one key head are folded into the rows of one batched matmul
([B, Hkv, G * rows, D] against [B, Hkv, Lk, D]), so K and V are never repeated per query head.

fp16/bf16/fp32 inputs are computed in float32 and float64 inputs in float64. A row with no allowed key
has out = 0 and lse = -inf, and contributes nothing to the gradients (never NaN).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..masks import Mask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_scores(qb, k, mask, start, stop, scale, heads_kv):
    """Scaled scores of query rows [start, stop): qb [B, Hkv, G * rows, D], k [B, Hkv, Lk, D] ->
    [B, Hkv, G * rows, Lk], with -inf at the pairs the mask disallows."""
    scores = torch.matmul(qb, k.transpose(-1, -2)).mul_(scale)
    if mask is None or not mask.terms():  # full(): no predicate to evaluate
        return scores
    allowed = mask.dense_rows(start, stop, k.shape[2], qb.device)  # [Bm|1, Hm|1, rows, Lk]
    # Split the mask's query heads like the scores' rows: [Bm, Hkv, G, rows, Lk] (or [Bm, 1, 1, ...]).
    allowed = allowed[:, :, None] if allowed.shape[1] == 1 else allowed.unflatten(1, (heads_kv, -1))
    batch, _, rows_all, lk = scores.shape
    grouped = scores.view(batch, heads_kv, rows_all // (stop - start), stop - start, lk)
    grouped.masked_fill_(~allowed, float("-inf"))
    return scores


def _exp_shifted_(scores: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """exp(scores - shift), in place; shift [.., rows, 1] is a row's max or lse. An empty row (all
    scores -inf, shift -inf) is shifted by 0 instead, so it gives exp(-inf) = 0 rather than NaN."""
    return scores.sub_(torch.where(torch.isneginf(shift), 0.0, shift)).exp_()


def _query_rows(x: torch.Tensor, heads_kv: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, stop) of x [B, Hq, L, E] as [B, Hkv, G * rows, E] in `dtype` (the GQA fold)."""
    rows = x.unflatten(1, (heads_kv, -1))[:, :, :, start:stop]
    return rows.to(dtype).flatten(2, 3)


def _unfold_rows(x: torch.Tensor, heads_q: int) -> torch.Tensor:
    """[B, Hkv, G * rows, E] -> [B, Hq, rows, E] (inverse of the GQA fold)."""
    rows = x.shape[1] * x.shape[2] // heads_q  # explicit: -1 is ambiguous for an empty batch
    return x.view(x.shape[0], heads_q, rows, x.shape[-1])


def attention_forward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask | None = None,
    *,
    scale: float | None = None,
    block_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention, `block_rows` query rows at a time.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]; mask broadcasts as [B|1, Hq|1, Lq, Lk];
    scale defaults to 1 / sqrt(D).
    Returns out [B, Hq, Lq, Dv] in q's dtype and lse [B, Hq, Lq] = logsumexp over the allowed keys of
    scale * q.k (float32, float64 for float64 inputs); an empty row has out = 0 and lse = -inf.
    """
    batch, heads_q, lq, dim = q.shape
    heads_kv, lk, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    compute = _compute_dtype(q.dtype)
    k, v = k.to(compute), v.to(compute)
    out = q.new_zeros(batch, heads_q, lq, dim_v)
    lse = torch.full((batch, heads_q, lq), float("-inf"), dtype=compute, device=q.device)
    if lk == 0:  # every row is empty (and amax below needs a key)
        return out, lse
    for start in range(0, lq, block_rows):
        stop = min(lq, start + block_rows)
        scores = _masked_scores(_query_rows(q, heads_kv, start, stop, compute), k, mask, start, stop, scale, heads_kv)
        # One max-shifted exp pass, not logsumexp then exp(scores - lse): this is the CPU backend and
        # the exp passes dominate its time.
        row_max = scores.amax(-1, keepdim=True)
        p = _exp_shifted_(scores, row_max)
        row_sum = p.sum(-1, keepdim=True)
        # A non-empty row's sum is >= 1 (its max contributes exp(0)), so the clamp only turns an empty
        # row's 0 / 0 into 0 / 1, and its lse = -inf + log(0) = -inf.
        block_out = torch.matmul(p, v).div_(row_sum.clamp_min(1.0))
        out[:, :, start:stop] = _unfold_rows(block_out, heads_q)
        lse[:, :, start:stop] = _unfold_rows(row_max + row_sum.log(), heads_q)[..., 0]
    return out, lse


def attention_backward_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    mask: Mask | None = None,
    *,
    scale: float | None = None,
    block_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of `attention_forward_reference`'s out, by the FlashAttention backward.

    q, k, v, mask, scale as in the forward; out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] its results;
    grad_out [B, Hq, Lq, Dv]. Per block of query rows, with P = exp(S - lse) recomputed from the scores:

        delta = rowsum(dO * O);  dV += P^T dO;  dS = P * (dO V^T - delta);  dQ = scale dS K;  dK += scale dS^T Q

    dK and dV accumulate in the compute dtype and sum over the query heads sharing each key head.
    Returns dq [B, Hq, Lq, D], dk [B, Hkv, Lk, D], dv [B, Hkv, Lk, Dv] in the dtypes of q, k, v.
    """
    heads_q, lq, dim = q.shape[1:]
    heads_kv = k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    compute = _compute_dtype(q.dtype)
    k_c, v_c = k.to(compute), v.to(compute)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k_c)
    dv = torch.zeros_like(v_c)
    for start in range(0, lq, block_rows):
        stop = min(lq, start + block_rows)
        qb = _query_rows(q, heads_kv, start, stop, compute)  # [B, Hkv, G * rows, D]
        dob = _query_rows(grad_out, heads_kv, start, stop, compute)  # [B, Hkv, G * rows, Dv]
        ob = _query_rows(out, heads_kv, start, stop, compute)
        lse_b = _query_rows(lse[..., None], heads_kv, start, stop, compute)  # [B, Hkv, G * rows, 1]
        p = _exp_shifted_(_masked_scores(qb, k_c, mask, start, stop, scale, heads_kv), lse_b)
        delta = (dob * ob).sum(-1, keepdim=True)
        dv += torch.matmul(p.transpose(-1, -2), dob)
        ds = torch.matmul(dob, v_c.transpose(-1, -2)).sub_(delta).mul_(p)
        dq[:, :, start:stop] = _unfold_rows(torch.matmul(ds, k_c).mul_(scale), heads_q)
        dk += torch.matmul(ds.transpose(-1, -2), qb).mul_(scale)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


class _AttentionReference(torch.autograd.Function):
    """out, lse = attention_forward_reference(...); the backward recomputes P per query block from the
    saved out and lse (memory-bounded). lse is an output only: it is not differentiable."""

    @staticmethod
    def forward(q, k, v, mask, scale):
        return attention_forward_reference(q, k, v, mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        ctx.mark_non_differentiable(lse)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward_reference(q, k, v, out, lse, grad_out, ctx.mask, scale=ctx.scale)
        return dq, dk, dv, None, None


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Mask | None = None,
    *,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Differentiable reference attention: softmax(scale * q k^T, masked) v.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq % Hkv == 0); mask a Mask or None (full);
    scale defaults to 1 / sqrt(D). Returns out [B, Hq, Lq, Dv] in q's dtype, and with return_lse also
    lse [B, Hq, Lq] (float32; float64 for float64 inputs; not differentiable). Rows with no allowed key
    give out = 0, lse = -inf and zero gradients.
    """
    out, lse = _AttentionReference.apply(q, k, v, mask, scale)
    return (out, lse) if return_lse else out


def attention_jvp_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor | None = None,
    tk: torch.Tensor | None = None,
    tv: torch.Tensor | None = None,
    mask: Mask | None = None,
    *,
    scale: float | None = None,
    tangent_dtype: torch.dtype | None = None,
    block_rows: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward-mode derivative of masked attention, `block_rows` query rows at a time.

    q, k, v, mask, scale as in `attention_forward_reference`; tq, tk, tv their tangents (same shapes;
    None = zero, and its matmul is skipped). Per block of query rows, with the whole row of keys at once
    (so no online softmax is needed):

        S = scale q k^T (masked),  P = softmax(S),  tS = scale (tq k^T + q tk^T)
        mu = rowsum(P * tS),  t_out = (P * (tS - mu)) v + P tv

    Returns out [B, Hq, Lq, Dv] (q's dtype), t_out [B, Hq, Lq, Dv] (tangent_dtype, default q's dtype), lse [B, Hq, Lq] and
    mu [B, Hq, Lq] = d lse (float32; float64 for float64 inputs). Everything is computed in float32
    (float64 for float64 inputs), where the cancellation in tS - mu is harmless. A row with no allowed key
    has out = t_out = 0, lse = -inf and mu = 0. Memory: O(B * Hq * block_rows * Lk) at a time.
    """
    batch, heads_q, lq, dim = q.shape
    heads_kv, lk, dim_v = k.shape[1], k.shape[2], v.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    compute = _compute_dtype(q.dtype)
    k_c, v_c = k.to(compute), v.to(compute)
    tk_c = tk.to(compute) if tk is not None else None
    tv_c = tv.to(compute) if tv is not None else None
    out = q.new_zeros(batch, heads_q, lq, dim_v)
    t_out = q.new_zeros(batch, heads_q, lq, dim_v, dtype=tangent_dtype or q.dtype)
    lse = torch.full((batch, heads_q, lq), float("-inf"), dtype=compute, device=q.device)
    mu = torch.zeros(batch, heads_q, lq, dtype=compute, device=q.device)
    if lk == 0:
        return out, t_out, lse, mu
    for start in range(0, lq, block_rows):
        stop = min(lq, start + block_rows)
        qb = _query_rows(q, heads_kv, start, stop, compute)  # [B, Hkv, G * rows, D]
        scores = _masked_scores(qb, k_c, mask, start, stop, scale, heads_kv)
        row_max = scores.amax(-1, keepdim=True)
        p = _exp_shifted_(scores, row_max)
        row_sum = p.sum(-1, keepdim=True)
        p.div_(row_sum.clamp_min(1.0))  # normalised; an empty row stays 0
        block_out = torch.matmul(p, v_c)
        block_t_out = torch.matmul(p, tv_c) if tv_c is not None else torch.zeros_like(block_out)
        block_mu = torch.zeros_like(row_sum)
        if tq is not None or tk is not None:
            t_scores = torch.zeros_like(p)
            if tq is not None:
                t_scores += torch.matmul(_query_rows(tq, heads_kv, start, stop, compute), k_c.transpose(-1, -2))
            if tk_c is not None:
                t_scores += torch.matmul(qb, tk_c.transpose(-1, -2))
            t_scores.mul_(scale)
            # tP = P * (tS - mu) formed before the matmul: no cancellation between (P * tS) v and mu * out.
            # Masked pairs have p = 0, so their (finite) tS never contributes.
            block_mu = (t_scores * p).sum(-1, keepdim=True)
            block_t_out += torch.matmul(t_scores.sub_(block_mu).mul_(p), v_c)
        out[:, :, start:stop] = _unfold_rows(block_out, heads_q)
        t_out[:, :, start:stop] = _unfold_rows(block_t_out, heads_q)
        lse[:, :, start:stop] = _unfold_rows(row_max + row_sum.log(), heads_q)[..., 0]
        mu[:, :, start:stop] = _unfold_rows(block_mu, heads_q)[..., 0]
    return out, t_out, lse, mu
