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

import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

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


# ------------------------------------------------------------------ Triton path as torch custom ops
# The Triton launches are registered as custom ops, so torch.compile keeps a model calling
# `attention` in one graph and calls the kernels as they are (fake kernels give it the shapes).
# Custom ops take tensors and plain values, not mask objects: the mask travels as its chunk-causal
# parameters and its block mask, and is rebuilt here, cached, so its tile schedules are built once.

def _mask_params(mask) -> tuple[list[int], torch.Tensor | None, list[int]]:
    """(chunk params [chunk_size, window (-1 none), sink, q_offset, kv_offset] or [], block mask or None,
    [bq, bk] or []) of a mask the Triton kernels evaluate (at most one term of each kind)."""
    from .masks import BlockSparseMask, ChunkCausalMask

    chunk, block_mask, block_size = [], None, []
    for term in mask.terms() if mask is not None else []:
        if isinstance(term, ChunkCausalMask):
            window = -1 if term.window is None else term.window
            chunk = [term.chunk_size, window, term.sink, term.q_offset, term.kv_offset]
        elif isinstance(term, BlockSparseMask):
            block_mask, block_size = term.block_mask, list(term.block_size)
    return chunk, block_mask, block_size


@functools.lru_cache(maxsize=512)
def _chunk_mask(chunk: tuple[int, ...]):
    from .masks import chunk_causal

    if not chunk:
        return None
    chunk_size, window, sink, q_offset, kv_offset = chunk
    return chunk_causal(chunk_size, window=None if window < 0 else window, sink=sink, q_offset=q_offset,
                        kv_offset=kv_offset)


# block mask tensor -> {params: Mask}, keyed by identity (tensors compare elementwise) and weakly
_BLOCK_MASKS = WeakIdKeyDictionary()


def _rebuild_mask(chunk: list[int], block_mask: torch.Tensor | None, block_size: list[int]):
    chunk_mask = _chunk_mask(tuple(chunk))
    if block_mask is None:
        return chunk_mask
    from .masks import block_sparse

    per_tensor = _BLOCK_MASKS.setdefault(block_mask, {})
    key = (tuple(chunk), tuple(block_size))
    if key not in per_tensor:
        mask = block_sparse(block_mask, tuple(block_size))
        per_tensor[key] = mask if chunk_mask is None else mask & chunk_mask
    return per_tensor[key]


@torch.library.custom_op("fastdistill::attention_triton_fwd", mutates_args=())
def _attention_triton_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, chunk: list[int],
    block_mask: torch.Tensor | None, block_size: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    from .kernels.attn_fwd import attention_forward_triton

    return attention_forward_triton(q, k, v, _rebuild_mask(chunk, block_mask, block_size), scale)


@_attention_triton_fwd.register_fake
def _(q, k, v, scale, chunk, block_mask, block_size):
    batch, heads, lq, _ = q.shape
    out = q.new_empty(batch, heads, lq, v.shape[-1])
    return out, q.new_empty(batch, heads, lq, dtype=torch.float32)


@torch.library.custom_op("fastdistill::attention_triton_bwd", mutates_args=())
def _attention_triton_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    grad_out: torch.Tensor, scale: float, chunk: list[int], block_mask: torch.Tensor | None, block_size: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.attn_bwd import attention_backward_triton

    mask = _rebuild_mask(chunk, block_mask, block_size)
    return attention_backward_triton(q, k, v, out, lse, grad_out.contiguous(), mask, scale)


@_attention_triton_bwd.register_fake
def _(q, k, v, out, lse, grad_out, scale, chunk, block_mask, block_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _triton_setup_context(ctx, inputs, output):
    q, k, v, scale, chunk, block_mask, block_size = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.params = (scale, chunk, block_mask, block_size)
    ctx.mark_non_differentiable(lse)


def _triton_backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_triton_bwd(q, k, v, out, lse, grad_out, *ctx.params)
    return dq, dk, dv, None, None, None, None


_attention_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


class _ReferenceAttention(torch.autograd.Function):
    """The reference path: forward saves (q, k, v, out, lse); backward recomputes P block by block."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        out, lse = attention_forward_reference(q, k, v, mask, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None
        dq, dk, dv = attention_backward_reference(q, k, v, out, lse, grad_out, ctx.mask, scale=ctx.scale)
        return dq, dk, dv, None, None


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
    if backend == "triton":
        out, lse = _attention_triton_fwd(q, k, v, scale, *_mask_params(mask))
    else:
        out, lse = _ReferenceAttention.apply(q, k, v, mask, scale)
    return (out, lse) if return_lse else out
