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
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from .backend import select_backend
from .masks import Mask
from .refs.attention import (
    _AttentionReference,
    attention_backward_reference,
    attention_forward_reference,
    attention_jvp_reference,
)

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


@torch.library.custom_op("fastdistill::attention_triton_jvp", mutates_args=())
def _attention_triton_jvp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    tq: torch.Tensor | None, tk: torch.Tensor | None, tv: torch.Tensor | None,
    scale: float, chunk: list[int], block_mask: torch.Tensor | None, block_size: list[int],
    tangent_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.attn_jvp import attention_jvp_triton

    mask = _rebuild_mask(chunk, block_mask, block_size)
    return attention_jvp_triton(q, k, v, tq, tk, tv, mask, scale, tangent_dtype)


@_attention_triton_jvp.register_fake
def _(q, k, v, tq, tk, tv, scale, chunk, block_mask, block_size, tangent_dtype):
    batch, heads, lq, _ = q.shape
    out = q.new_empty(batch, heads, lq, v.shape[-1])
    t_out = q.new_empty(batch, heads, lq, v.shape[-1], dtype=tangent_dtype)
    stats = q.new_empty(batch, heads, lq, dtype=torch.float32)
    return out, t_out, stats, torch.empty_like(stats)


def _triton_jvp_setup_context(ctx, inputs, output):
    q, k, v, _tq, _tk, _tv, scale, chunk, block_mask, block_size, _ = inputs
    out, t_out, lse, mu = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.params = (scale, chunk, block_mask, block_size)
    ctx.mark_non_differentiable(t_out, lse, mu)


def _triton_jvp_backward(ctx, grad_out, _grad_t_out, _grad_lse, _grad_mu):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _attention_triton_bwd(q, k, v, out, lse, grad_out, *ctx.params)
    return (dq, dk, dv) + (None,) * 8


# attention_jvp's primal output is differentiable (MeanFlow trains through it): the flash backward
# with the lse of the same pass.
_attention_triton_jvp.register_autograd(_triton_jvp_backward, setup_context=_triton_jvp_setup_context)


class _ReferenceAttentionJvp(torch.autograd.Function):
    """attention_jvp on the reference backend; out is differentiable through the reference backward."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, scale, tangent_dtype):
        return attention_jvp_reference(q, k, v, tq, tk, tv, mask, scale=scale, tangent_dtype=tangent_dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _tq, _tk, _tv, mask, scale, _ = inputs
        out, t_out, lse, mu = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.scale = mask, scale
        ctx.mark_non_differentiable(t_out, lse, mu)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_t_out, _grad_lse, _grad_mu):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward_reference(q, k, v, out, lse, grad_out, ctx.mask, scale=ctx.scale)
        return (dq, dk, dv) + (None,) * 6


def _fold_vmapped(x, dim, size):
    """[.., V at dim, ..] (or unbatched, dim None) -> [V * B, ...]: a vmapped dim folded into the batch."""
    if x is None:
        return None
    x = x.movedim(dim, 0) if dim is not None else x.expand(size, *x.shape)
    return x.reshape(size * x.shape[1], *x.shape[2:])


class _AttentionTangent(torch.autograd.Function):
    """t_out (q's dtype) of attention at (q, k, v) along (tq, tk, tv) (None = zero): the fused kernel on
    the Triton backend, the reference JVP otherwise. A Function of its own so that the JVP rule of
    `_Attention` also runs under torch.func.vmap (its vmap rule folds the vmapped dim into the batch).
    Not differentiable: the tangent output is not differentiated further."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, mask, scale, backend):
        if backend == "triton":
            return _attention_triton_jvp(q, k, v, tq, tk, tv, scale, *_mask_params(mask), q.dtype)[1]
        return attention_jvp_reference(q, k, v, tq, tk, tv, mask, scale=scale)[1]

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output)

    @staticmethod
    def backward(ctx, _grad):
        raise NotImplementedError("fastdistill.attention: the tangent output is not differentiable")

    @staticmethod
    def vmap(info, in_dims, q, k, v, tq, tk, tv, mask, scale, backend):
        size = info.batch_size
        tensors = [_fold_vmapped(x, d, size) for x, d in zip((q, k, v, tq, tk, tv), in_dims[:6])]
        folded_mask = mask.repeat_batch(size) if mask is not None else None
        t_out = _AttentionTangent.apply(*tensors, folded_mask, scale, backend)
        return t_out.unflatten(0, (size, -1)), 0


class _Attention(torch.autograd.Function):
    """Eager `attention`: out, lse with the flash backward (reverse mode), the fused JVP kernel
    (forward mode: torch.func.jvp, torch.autograd.forward_ad) and a vmap rule (torch.func.vmap).

    Under forward AD the primal comes from the plain forward and the tangent from the JVP kernel, which
    also recomputes out (8 matmul units with all three tangents against the 6 of `attention_jvp`, which
    returns both from one pass). Inputs without a tangent arrive as None (unmaterialized), so their
    matmuls are skipped, as for a frozen text context in cross-attention. The primal output stays
    differentiable (MeanFlow): its backward is the flash backward with the lse saved here. The tangent
    output is not differentiated further.
    """

    @staticmethod
    def forward(q, k, v, mask, scale, backend):
        if backend == "triton":
            return _attention_triton_fwd(q, k, v, scale, *_mask_params(mask))
        return attention_forward_reference(q, k, v, mask, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, scale, backend = inputs
        out, lse = output
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.save_for_forward(q, k, v)
        ctx.mask, ctx.scale, ctx.backend = mask, scale, backend
        ctx.mark_non_differentiable(lse)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_lse):
        if grad_out is None:
            return (None,) * 6
        q, k, v, out, lse = ctx.saved_tensors
        if ctx.backend == "triton":
            dq, dk, dv = _attention_triton_bwd(q, k, v, out, lse, grad_out, ctx.scale, *_mask_params(ctx.mask))
        else:
            dq, dk, dv = attention_backward_reference(q, k, v, out, lse, grad_out, ctx.mask, scale=ctx.scale)
        return dq, dk, dv, None, None, None

    @staticmethod
    def jvp(ctx, tq, tk, tv, *_):
        q, k, v = ctx.saved_tensors[:3]
        if tq is None and tk is None and tv is None:
            return None, None
        return _AttentionTangent.apply(q, k, v, tq, tk, tv, ctx.mask, ctx.scale, ctx.backend), None

    @staticmethod
    def vmap(info, in_dims, q, k, v, mask, scale, backend):
        # Fold the vmapped dim into the batch ([V, B, ...] -> [V * B, ...]); a per-batch mask repeats V times.
        size = info.batch_size
        q, k, v = (_fold_vmapped(x, d, size) for x, d in zip((q, k, v), in_dims[:3]))
        folded_mask = mask.repeat_batch(size) if mask is not None else None
        out, lse = _Attention.apply(q, k, v, folded_mask, scale, backend)
        return (out.unflatten(0, (size, -1)), lse.unflatten(0, (size, -1))), (0, 0)


def _forward_ad_active() -> bool:
    """Whether forward-mode AD may be propagating tangents (the condition Dynamo uses in pytorch #193277)."""
    from torch.autograd import forward_ad

    return getattr(forward_ad, "_current_level", -1) >= 0 and torch._C._is_fwd_grad_enabled()


def attention(q, k, v, mask: Mask | None = None, *, scale: float | None = None, return_lse: bool = False):
    """Scaled dot-product attention with a fastdistill mask.

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (Hq % Hkv == 0, any strides, fp16/bf16/
    fp32/fp64, one device). mask: a `fastdistill.masks` mask (None = every pair allowed); it must
    broadcast to [B, Hq]. scale: default 1 / sqrt(D).

    Returns out [B, Hq, Lq, Dv] in the input dtype, and with return_lse also lse [B, Hq, Lq] (float32;
    float64 for float64 inputs), the log-sum-exp of the scaled allowed scores of each row. A row with
    no allowed key gets out = 0 and lse = -inf. Differentiable in q, k and v (not in lse), in reverse
    mode and in forward mode (torch.func.jvp, torch.autograd.forward_ad: the tangent comes from the
    fused JVP kernel); torch.func.vmap works over it.

    Under torch.compile the call compiles into the graph (custom ops), but forward-mode AD inside a
    compiled region raises: Dynamo would drop the JVP rule and differentiate the forward instead
    (pytorch #192985). Call torch.func.jvp outside the compiled function.
    """
    _check_inputs(q, k, v, mask)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend, _ = _path(q, k, v, mask)
    if not torch.compiler.is_compiling():
        out, lse = _Attention.apply(q, k, v, mask, scale, backend)
    elif _forward_ad_active():
        raise RuntimeError(
            "fastdistill.attention: forward-mode AD (torch.func.jvp / torch.autograd.forward_ad) inside "
            "torch.compile is not supported: Dynamo drops custom JVP rules and would return wrong tangents "
            "(pytorch issue #192985). Call torch.func.jvp outside the compiled function, or use "
            "fastdistill.attention_jvp explicitly."
        )
    elif backend == "triton":
        out, lse = _attention_triton_fwd(q, k, v, scale, *_mask_params(mask))
    else:
        out, lse = _AttentionReference.apply(q, k, v, mask, scale)
    return (out, lse) if return_lse else out


def _check_tangents(q, k, v, tq, tk, tv):
    for name, t, primal, primal_name in (("tq", tq, q, "q"), ("tk", tk, k, "k"), ("tv", tv, v, "v")):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention_jvp: {name} must be a tensor or None, got {type(t).__name__}")
        if t.shape != primal.shape:
            raise ValueError(f"attention_jvp: {name} must have the shape of {primal_name} {tuple(primal.shape)}, "
                             f"got {tuple(t.shape)}")
        if t.dtype != primal.dtype:
            raise TypeError(f"attention_jvp: {name} must have the dtype of {primal_name} ({primal.dtype}), got {t.dtype}")
        if t.device != primal.device:
            raise ValueError(f"attention_jvp: {name} is on {t.device}, {primal_name} on {primal.device}")


def attention_jvp(q, k, v, tq=None, tk=None, tv=None, mask: Mask | None = None, *, scale: float | None = None,
                  tangent_dtype: torch.dtype | None = None, return_stats: bool = False):
    """Attention and its forward-mode derivative in one pass (the fused JVP kernel on CUDA).

    q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] and mask, scale as in `attention`; tq, tk,
    tv: tangents of q, k, v (same shapes and dtypes), None meaning zero: the matmuls of a None tangent
    are skipped (all three cost 3x a forward, tq and tk 2.5x, tq only 2x, tv only 1.5x).
    tangent_dtype: dtype of t_out, q's dtype (default) or torch.float32 (rounding t_out to bf16 alone
    costs ~2e-3 relative).

    Returns (out, t_out), and with return_stats also lse and mu [B, Hq, Lq] (float32; float64 for
    float64 inputs): mu = sum_j P_ij tS_ij = d lse, which with lse merges results across key shards.
    Rows with no allowed key give out = t_out = 0, lse = -inf, mu = 0. out is differentiable in q, k, v
    (flash backward with this pass's lse); t_out, lse and mu are not.

    Accuracy: t_out is exact in the inputs' precision even when keys or key tangents share a large
    component (adaLN modulation): the kernel subtracts the exact per-row constant of tS that such a
    component causes before rounding (notes/jvp_attention.md).
    """
    _check_inputs(q, k, v, mask, op="attention_jvp")
    _check_tangents(q, k, v, tq, tk, tv)
    if tangent_dtype is None:
        tangent_dtype = q.dtype
    allowed = {q.dtype, torch.float32} if q.dtype != torch.float64 else {torch.float64}
    if tangent_dtype not in allowed:
        raise TypeError(f"attention_jvp: tangent_dtype must be one of {sorted(map(str, allowed))} for {q.dtype} "
                        f"inputs, got {tangent_dtype}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend, _ = _path(q, k, v, mask)
    if backend == "triton":
        out, t_out, lse, mu = _attention_triton_jvp(q, k, v, tq, tk, tv, scale, *_mask_params(mask), tangent_dtype)
    else:
        out, t_out, lse, mu = _ReferenceAttentionJvp.apply(q, k, v, tq, tk, tv, mask, scale, tangent_dtype)
    return (out, t_out, lse, mu) if return_stats else (out, t_out)
