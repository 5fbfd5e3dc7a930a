"""Attention with masks: `attention()`, `explain()`, and backend dispatch.

Layout BHSD: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]; GQA when Hq % Hkv == 0 (query
head h reads key head h // (Hq / Hkv)). Any strides: a [B, S, H, D] tensor viewed with
`.transpose(1, 2)` is read in place.

Backends (fastdistill.backend): Triton kernels for CUDA tensors (and for CPU tensors under
TRITON_INTERPRET=1 with FASTDISTILL_BACKEND=triton), the pure-PyTorch reference otherwise. The
Triton kernels compute fp16/bf16 (fp32 accumulation) and true fp32; float64 inputs, head dims above
256 and masks with more than one chunk-causal or block-sparse term run the reference, which computes
the same function (`explain()` says which path runs and why).
"""

from __future__ import annotations

import torch

from .backend import select_backend
from .masks import Mask
from .refs.attention import attention_backward_reference, attention_forward_reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TRITON_MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, mask, op="attention"):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be [B, H, L, D] (rank 4), got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and v must be on one device, got {q.device}, {k.device} and {v.device}")
    b, hq, lq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"{op}: batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"{op}: k and v must have the same heads and length, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != d:
        raise ValueError(f"{op}: q and k must have the same head dim, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if k.shape[1] == 0 or hq % k.shape[1]:
        raise ValueError(f"{op}: query heads ({hq}) must be a multiple of key/value heads ({k.shape[1]}) for GQA")
    if mask is not None:
        if not isinstance(mask, Mask):
            raise TypeError(f"{op}: mask must be a fastdistill.masks mask or None, got {type(mask).__name__}")
        mask.check_shape(b, hq, lq, k.shape[2])


def _path(q, k, v, mask) -> tuple[str, str]:
    backend, reason = select_backend(q.device)
    if backend != "triton":
        return backend, reason
    if q.dtype == torch.float64:
        return "reference", "float64 inputs run the reference (the Triton kernels compute in fp16/bf16/fp32)"
    if max(q.shape[-1], v.shape[-1]) > _TRITON_MAX_HEAD_DIM:
        return "reference", f"head dims above {_TRITON_MAX_HEAD_DIM} run the reference"
    from .masks import BlockSparseMask, ChunkCausalMask

    terms = mask.terms() if mask is not None else []
    n_chunk = sum(isinstance(t, ChunkCausalMask) for t in terms)
    n_block = sum(isinstance(t, BlockSparseMask) for t in terms)
    if n_chunk > 1 or n_block > 1 or n_chunk + n_block != len(terms):
        return "reference", "the Triton kernels AND at most one chunk-causal and one block-sparse mask term"
    return "triton", reason


def explain(q, k, v, mask=None) -> str:
    """Which implementation `attention(q, k, v, mask)` runs and why (one line)."""
    _check_inputs(q, k, v, mask, op="explain")
    backend, reason = _path(q, k, v, mask)
    return f"{backend}: {reason}"


# torch.compile does not trace the Triton launches (schedule lookup, mask objects, kernel launch): it
# calls them as opaque functions, so a compiled model gets the same kernels and results as eager at
# the cost of a graph break around each call. The reference path is plain torch and traces fully.
@torch.compiler.disable
def _triton_forward(q, k, v, mask, scale):
    from .kernels.attn_fwd import attention_forward_triton

    return attention_forward_triton(q, k, v, mask, scale)


@torch.compiler.disable
def _triton_backward(q, k, v, out, lse, grad_out, mask, scale):
    from .kernels.attn_bwd import attention_backward_triton

    return attention_backward_triton(q, k, v, out, lse, grad_out, mask, scale)


def _forward(q, k, v, mask, scale, backend):
    if backend == "triton":
        return _triton_forward(q, k, v, mask, scale)
    return attention_forward_reference(q, k, v, mask, scale=scale)


def _backward(q, k, v, out, lse, grad_out, mask, scale, backend):
    if backend == "triton":
        return _triton_backward(q, k, v, out, lse, grad_out, mask, scale)
    return attention_backward_reference(q, k, v, out, lse, grad_out, mask, scale=scale)


class _Attention(torch.autograd.Function):
    """Forward saves (q, k, v, out, lse); backward recomputes P tile by tile (no Lq x Lk storage)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, backend):
        out, lse = _forward(q, k, v, mask, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale, ctx.backend = mask, scale, backend
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        dq, dk, dv = _backward(q, k, v, out, lse, grad_out.contiguous(), ctx.mask, ctx.scale, ctx.backend)
        return dq, dk, dv, None, None, None


def attention(q, k, v, mask: Mask | None = None, *, scale: float | None = None, return_lse: bool = False):
    """Scaled dot-product attention with a fastdistill mask.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq % Hkv == 0, any strides, fp16/bf16/
    fp32/fp64, one device). mask: a `fastdistill.masks` mask (None = every pair allowed); it must
    broadcast to [B, Hq]. scale: default 1 / sqrt(D).

    Returns out [B, Hq, Lq, Dv] in the input dtype, and with return_lse also lse [B, Hq, Lq] (float32;
    float64 for float64 inputs), the log-sum-exp of the scaled allowed scores of each row. A row with
    no allowed key gets out = 0 and lse = -inf. Differentiable in q, k and v (not in lse).
    """
    _check_inputs(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend, _ = _path(q, k, v, mask)
    out, lse = _Attention.apply(q, k, v, mask, scale, backend)
    return (out, lse) if return_lse else out
