"""`sdpa`: a drop-in for `torch.nn.functional.scaled_dot_product_attention`, and `patch_sdpa()`.

`sdpa` takes torch's arguments with torch's semantics (checked against torch 2.13) and runs:

    attn_mask=None, is_causal=False   fastdistill.attention(q, k, v)                  (Triton / reference)
    attn_mask=None, is_causal=True    fastdistill.attention(q, k, v, masks.causal())  (Triton / reference)
    a bool or additive attn_mask      a PyTorch implementation over blocks of query rows (this file)

A dense `attn_mask` is data the kernels do not read (they read tile schedules), so it runs here, in
PyTorch, `_BLOCK_ROWS` query rows at a time; each block is recomputed in the backward
(`torch.utils.checkpoint`), so neither pass holds more than one block's [rows, S] scores.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import masks
from .attention import _FLOAT_DTYPES, attention
from .refs.attention import _compute_dtype, _query_rows, _unfold_rows

_BLOCK_ROWS = 256


def _broadcast(shapes, what: str) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        raise ValueError(f"sdpa: {what} do not broadcast: {', '.join(str(tuple(s)) for s in shapes)}") from None


def _check_args(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sdpa: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"sdpa: {name} must be [..., L, E] (at least 2 dims), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"sdpa: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"sdpa: query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"sdpa: query, key and value must be on one device, got {query.device}, {key.device}, "
                         f"{value.device}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"sdpa: query and key must have the same embedding size E, got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"sdpa: key and value must have the same length S, got key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")
    for name, flag in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(flag, bool):
            raise TypeError(f"sdpa: {name} must be a bool, got {type(flag).__name__}")
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"sdpa: dropout_p must be a probability in [0, 1], got {dropout_p!r}")
    if dropout_p > 0.0:
        raise NotImplementedError(
            f"sdpa: dropout_p={dropout_p} is not supported (fastdistill's attention has no dropout); pass "
            "dropout_p=0.0, e.g. `dropout_p=self.p if self.training else 0.0` with the module in eval mode"
        )
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"sdpa: attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise TypeError(f"sdpa: attn_mask must be bool, float32 or the query dtype {query.dtype}, "
                        f"got {attn_mask.dtype}")
    if attn_mask.device != query.device:
        raise ValueError(f"sdpa: attn_mask is on {attn_mask.device}, query on {query.device}")
    if is_causal:
        raise ValueError("sdpa: pass either attn_mask or is_causal=True, not both (as torch documents; AND a causal "
                         "mask into attn_mask instead)")


def _leading_dims(query, key, value, enable_gqa):
    """(lead, batch, heads_q, heads_kv): lead is the output's shape before [L, Ev] as torch broadcasts
    the inputs' leading dims; batch = lead[:-1] (flattened to B); heads_q = lead[-1] (1 if lead is ())."""
    shapes = [t.shape for t in (query, key, value)]
    if enable_gqa:
        if min(len(s) for s in shapes) < 3:
            raise ValueError(f"sdpa: enable_gqa=True needs [..., H, L, E] inputs (at least 3 dims), got "
                             f"{', '.join(str(tuple(s)) for s in shapes)}")
        batch = _broadcast([s[:-3] for s in shapes], "the batch dims of query, key and value")
        heads_q, heads_k, heads_v = (s[-3] for s in shapes)
        if heads_k != heads_v or heads_k == 0 or heads_q % heads_k:
            raise ValueError(f"sdpa: enable_gqa=True needs key and value with the same number of heads, dividing "
                             f"the query heads; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                             f"value {tuple(value.shape)}")
        return batch + (heads_q,), batch, heads_q, heads_k
    lead = _broadcast(
        [s[:-2] for s in shapes],
        "the leading dims of query, key and value (for fewer key/value heads pass enable_gqa=True)",
    )
    heads = lead[-1] if lead else 1
    return lead, lead[:-1], heads, heads


def _to_bhsd(x: torch.Tensor, batch: tuple[int, ...], heads: int) -> torch.Tensor:
    """x [..., H|1, L, E] -> [prod(batch), heads, L, E]. A view (broadcast dims get stride 0) whenever
    the batch dims merge into one stride, which is always the case for rank <= 4; else a copy."""
    x = x.expand(*batch, heads, *x.shape[-2:])
    return x.reshape(math.prod(batch), heads, *x.shape[-2:])


def _mask_bhsd(mask, lead, batch, lq, lk):
    """attn_mask (broadcastable to [*lead, lq, lk]) -> [B|1, Hq|1, lq|1, lk|1]. A view of the mask
    unless its batch dims cannot merge into one stride (rank >= 5 only; then a [B, ...] copy). Size-1
    dims stay size 1, so the query blocks read slices of the caller's tensor, never an expanded one."""
    weights = (*lead, lq, lk)
    fits = all(m in (1, w) for m, w in zip(reversed(mask.shape), reversed(weights)))
    if not 2 <= mask.dim() <= len(weights) or not fits:
        raise ValueError(f"sdpa: attn_mask of shape {tuple(mask.shape)} does not broadcast to the attention weights' "
                         f"shape {weights}")
    n_batch = len(batch)
    mask = mask[(None,) * (n_batch + 3 - mask.dim())]
    tail = mask.shape[n_batch:]
    if all(d == 1 for d in mask.shape[:n_batch]):
        return mask.reshape(1, *tail)
    return mask.expand(*batch, *tail).reshape(math.prod(batch), *tail)


def _masked_rows(q, k, v, mask, start, stop, scale):
    """Output rows [start, stop) of softmax(scale q k^T + mask) v, differentiable by autograd (also in
    an additive mask). q [B, Hq, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev], mask [B|1, Hq|1, L|1, S|1]
    bool (True = take part) or float (added to the scores). Returns [B, Hq, stop - start, Ev] in q's
    dtype. A row with no allowed key (all False or -inf) gives 0 and zero gradients, as torch does."""
    batch, heads_q = q.shape[:2]
    heads_kv, lk = k.shape[1], k.shape[2]
    compute = _compute_dtype(q.dtype)
    qb = _query_rows(q, heads_kv, start, stop, compute)  # [B, Hkv, G * rows, E]: the GQA fold of the reference
    scores = torch.matmul(qb, k.to(compute).transpose(-1, -2)) * scale
    rows = mask if mask.shape[2] == 1 else mask[:, :, start:stop]  # a size-1 row dim broadcasts to every row
    rows = rows[:, :, None] if rows.shape[1] == 1 else rows.unflatten(1, (heads_kv, -1))  # [B|1, Hkv|1, G|1, ...]
    grouped = scores.view(batch, heads_kv, heads_q // heads_kv, stop - start, lk)  # [B, Hkv, G, rows, S]
    if rows.dtype == torch.bool:
        grouped = grouped.masked_fill(~rows, float("-inf"))
    else:
        grouped = grouped + rows.to(compute)
    # A max-shifted softmax whose all -inf rows give 0 rather than NaN (shift 0, sum 0 -> divide by 1);
    # the shift only steadies exp, so it carries no gradient.
    row_max = grouped.detach().amax(-1, keepdim=True)
    p = torch.exp(grouped - torch.where(torch.isneginf(row_max), 0.0, row_max))
    row_sum = p.sum(-1, keepdim=True)
    p = p / torch.where(row_sum > 0, row_sum, 1.0)
    out = torch.matmul(p.view_as(scores), v.to(compute))  # [B, Hkv, G * rows, Ev]
    return _unfold_rows(out, heads_q).to(q.dtype)


def _masked_attention(q, k, v, mask, scale):
    """softmax(scale q k^T + mask) v for q [B, Hq, L, E], k [B, Hkv, S, E], v [B, Hkv, S, Ev] and a
    dense mask [B|1, Hq|1, L|1, S|1], `_BLOCK_ROWS` query rows at a time -> [B, Hq, L, Ev]."""
    lq = q.shape[2]
    if lq == 0 or k.shape[2] == 0:  # no (query, key) pair for the mask to select
        return attention(q, k, v, scale=scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, mask))
    blocks = []
    for start in range(0, lq, _BLOCK_ROWS):
        stop = min(lq, start + _BLOCK_ROWS)
        if needs_grad:
            # Keep only the inputs for the backward and recompute the block's scores there: saving
            # every block's probabilities would hold all B * Hq * L * S of them.
            block = checkpoint(_masked_rows, q, k, v, mask, start, stop, scale,
                               use_reentrant=False, preserve_rng_state=False)
        else:
            block = _masked_rows(q, k, v, mask, start, stop, scale)
        blocks.append(block)
    return torch.cat(blocks, dim=2)


def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """`torch.nn.functional.scaled_dot_product_attention` computed by fastdistill.

    query [N, ..., Hq, L, E], key [N, ..., H, S, E], value [N, ..., H, S, Ev] -> [N, ..., Hq, L, Ev] in
    the inputs' dtype (float16/bfloat16/float32/float64, one dtype, one device). As in torch:

    * Any rank >= 2: all dims before [L, E] are batch dims, broadcast across query, key and value
      (without enable_gqa the head dim broadcasts too). The 4-D BHSD case is the native one; other
      ranks are viewed as [B, H, L, E] (rank 2 and 3 as B = 1), copied only for rank >= 5 inputs
      whose batch dims cannot merge into one stride.
    * enable_gqa=True: dim -3 is the head dim (inputs of rank >= 3); key and value have H heads,
      H divides Hq, and query head h reads key/value head h // (Hq / H). Without it, the heads must
      broadcast (equal or 1), else ValueError.
    * scale: default 1 / sqrt(E). scale and enable_gqa are keyword-only, as in torch.
    * is_causal=True: top-left aligned, query i sees keys j <= i, also when L != S::

          L=3, S=5:  x . . . .      L=5, S=3:  x . .
                     x x . . .                 x x .
                     x x x . .                 x x x
                                               x x x
                                               x x x

    * attn_mask: bool (True = take part) or additive float (float32 or the query dtype, added to the
      scaled scores; it receives gradients), broadcastable to [N, ..., Hq, L, S] with rank >= 2.
      It runs the PyTorch path over query blocks (module docstring), not the kernels.
    * A row with no allowed key (bool mask all False, additive mask all -inf, or S = 0) gives 0 and
      zero gradients, which is what torch 2.13 returns on CPU for bool and additive masks alike
      (its math backend's safe softmax); never NaN.

    Raises: NotImplementedError for dropout_p > 0; ValueError for attn_mask together with
    is_causal=True (torch documents this as an error; its CPU fused kernel instead ANDs the two, its
    math backend raises), for shapes that do not broadcast or match, and for devices that differ;
    TypeError for non-tensor inputs, unsupported or mixed dtypes, and non-bool flags.
    """
    _check_args(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    lead, batch, heads_q, heads_kv = _leading_dims(query, key, value, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    q = _to_bhsd(query, batch, heads_q)
    k = _to_bhsd(key, batch, heads_kv)
    v = _to_bhsd(value, batch, heads_kv)
    if attn_mask is None:
        out = attention(q, k, v, masks.causal() if is_causal else None, scale=scale)
    else:
        mask = _mask_bhsd(attn_mask, lead, batch, q.shape[2], k.shape[2])
        out = _masked_attention(q, k, v, mask, scale)
    return out.reshape(*lead, *out.shape[-2:])


@contextlib.contextmanager
def patch_sdpa():
    """Route `torch.nn.functional.scaled_dot_product_attention` to `sdpa` inside the `with` block.

        with fastdistill.patch_sdpa():
            loss = model(x).sum()   # every F.scaled_dot_product_attention call runs fastdistill.sdpa
            loss.backward()

    The original is restored on exit, also when the block raises. Nesting works: each level restores
    what it replaced. The patch sets an attribute of the `torch.nn.functional` module, so:

    * it reaches calls that look the function up when they run: `F.scaled_dot_product_attention(...)`,
      and nn.MultiheadAttention in training (its eval-mode fused fast path calls no SDPA). It does not
      reach modules that bound the function earlier (`from torch.nn.functional import
      scaled_dot_product_attention`), nor graphs that torch.compile traced before the patch;
    * it is process-wide, not per thread: other threads see it while the block runs, and blocks
      entered and left on several threads in overlapping order can restore the wrong function.
    """
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
