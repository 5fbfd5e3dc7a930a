"""Loads the C++ core (`fastdistill._C`) and registers the Python side of its ops.

The schemas and the CPU/CUDA kernels live in C++ (csrc/registration.cpp). Here we add what torch
needs to trace and differentiate them: fake (meta) kernels, so `torch.compile` and FakeTensor
propagate shapes without running a kernel, and autograd for the differentiable ops.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (importing registers torch.ops.fastdistill)
from .refs.rope import rope_pairs

ops = torch.ops.fastdistill


def _check_same_device(op: str, first_name: str, first: torch.Tensor, **others: torch.Tensor | None) -> None:
    """The C++ kernels check devices, but a meta tensor among the arguments routes the call to the fake
    kernel (Meta outranks CPU and CUDA in dispatch), and torch.compile traces with fakes: check here too."""
    for name, t in others.items():
        if t is not None and t.device != first.device:
            raise ValueError(
                f"{op}: {first_name} and {name} must be on the same device, got {first.device} and {t.device}"
            )


# ----------------------------------------------------------------------------------------------- rope
@torch.library.register_fake("fastdistill::rope")
def _rope_fake(x, cos, sin, interleaved):
    _check_same_device("rope", "x", x, cos=cos, sin=sin)
    return torch.empty_like(x)


def _rope_setup_context(ctx, inputs, output):
    x, cos, sin, interleaved = inputs
    ctx.interleaved = interleaved
    # x is needed only for the gradients of the tables, which are usually constants.
    needs_tables_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    ctx.save_for_backward(x if needs_tables_grad else None, cos, sin)


def _rope_backward(ctx, grad_out):
    x, cos, sin = ctx.saved_tensors
    grad_x = grad_cos = grad_sin = None
    if ctx.needs_input_grad[0]:
        # A rotation's adjoint is the rotation by the opposite angle.
        grad_x = ops.rope(grad_out, cos, sin.neg(), ctx.interleaved)
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        # y1 = x1 c - x2 s, y2 = x1 s + x2 c, summed over batch and heads (tables are per token).
        compute = torch.promote_types(x.dtype, cos.dtype)
        x1, x2 = rope_pairs(x.to(compute), ctx.interleaved)
        g1, g2 = rope_pairs(grad_out.to(compute), ctx.interleaved)
        if ctx.needs_input_grad[1]:
            grad_cos = (g1 * x1 + g2 * x2).sum(dim=(0, 1)).to(cos.dtype)
        if ctx.needs_input_grad[2]:
            grad_sin = (g2 * x1 - g1 * x2).sum(dim=(0, 1)).to(sin.dtype)
    return grad_x, grad_cos, grad_sin, None


torch.library.register_autograd("fastdistill::rope", _rope_backward, setup_context=_rope_setup_context)


@torch.library.register_vmap("fastdistill::rope")
def _rope_vmap(info, in_dims, x, cos, sin, interleaved):
    """Shared tables: fold the vmapped dim into the batch, one kernel call. Per-sample tables: one
    call per sample (tables are per token, so samples cannot share a launch)."""
    x_dim, cos_dim, sin_dim = in_dims[:3]
    if cos_dim is None and sin_dim is None:
        x = x.movedim(x_dim, 0)
        out = ops.rope(x.flatten(0, 1), cos, sin, interleaved)
        return out.unflatten(0, x.shape[:2]), 0

    def per_sample(t, dim):
        return t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)

    xs, coss, sins = per_sample(x, x_dim), per_sample(cos, cos_dim), per_sample(sin, sin_dim)
    return torch.stack([ops.rope(xs[i], coss[i], sins[i], interleaved) for i in range(info.batch_size)]), 0


class RopeFunction(torch.autograd.Function):
    """`ops.rope` with forward-mode derivatives as well: `torch.func.jvp`, `torch.autograd.forward_ad`
    and `torch.func.vmap` work through it (the custom op alone supports reverse mode only).

    The rotation is linear in x, so the tangent of the output is the rotated tangent of x, computed by
    the same fused kernel. Tangents of the tables are refused: tables are functions of positions,
    constants of every model, and supporting them would keep x alive for every call.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, cos, sin, interleaved):
        return ops.rope(x, cos, sin, interleaved)

    @staticmethod
    def setup_context(ctx, inputs, output):
        # Unmaterialized: inputs without a tangent (or outputs without a gradient) arrive as None
        # instead of zeros, which is how jvp tells constant tables from differentiated ones.
        ctx.set_materialize_grads(False)
        _rope_setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None
        return _rope_backward(ctx, grad_out)

    @staticmethod
    def jvp(ctx, x_tangent, cos_tangent, sin_tangent, _):
        if cos_tangent is not None or sin_tangent is not None:
            raise NotImplementedError(
                "apply_rope: forward-mode derivatives with respect to cos/sin are not supported; "
                "build the tables outside the function being differentiated"
            )
        cos, sin = ctx.saved_tensors
        return ops.rope(x_tangent, cos, sin, ctx.interleaved)


# ------------------------------------------------------------------------------------------- kv_write
@torch.library.register_fake("fastdistill::kv_write")
def _kv_write_fake(cache_k, cache_v, k, v, start, cos, sin, interleaved):
    _check_same_device("kv_write", "cache_k", cache_k, cache_v=cache_v, k=k, v=v, cos=cos, sin=sin)
    if start.device != cache_k.device and start.device.type != "cpu":
        raise ValueError(
            f"kv_write: start must be on the cache's device ({cache_k.device}) or a CPU scalar, got {start.device}"
        )
    return None


# ---------------------------------------------------------------------------------------- schedules
def _empty_schedule(mask_batch, mask_heads, num_q_tiles, num_k_tiles, device):
    def ints(*shape):
        return torch.empty(shape, dtype=torch.int32, device=device)

    def bools(*shape):
        return torch.empty(shape, dtype=torch.bool, device=device)

    b, h, nq, nk = mask_batch, mask_heads, num_q_tiles, num_k_tiles
    return ints(b, h, nq), ints(b, h, nq, nk), bools(b, h, nq, nk), ints(b, h, nk), ints(b, h, nk, nq), bools(b, h, nk, nq)


def _ceil_div(a, b):
    return -(-a // b)


@torch.library.register_fake("fastdistill::schedule_chunk_causal")
def _schedule_chunk_causal_fake(lq, lk, block_m, block_n, chunk_size, window, sink, q_offset, kv_offset, device):
    return _empty_schedule(1, 1, _ceil_div(lq, block_m), _ceil_div(lk, block_n), device)


@torch.library.register_fake("fastdistill::schedule_block_mask")
def _schedule_block_mask_fake(block_mask, lq, lk, block_m, block_n, mask_block_q, mask_block_k):
    b, h = block_mask.shape[0], block_mask.shape[1]
    return _empty_schedule(b, h, _ceil_div(lq, block_m), _ceil_div(lk, block_n), block_mask.device)


def op_devices(name: str) -> list[str]:
    """The dispatch keys among CPU/CUDA/Meta for which op `name` has a kernel (for `fastdistill info`)."""
    qualified = f"fastdistill::{name}"
    return [k for k in ("CPU", "CUDA", "Meta") if torch._C._dispatch_has_kernel_for_dispatch_key(qualified, k)]


OP_NAMES = ("rope", "kv_write", "schedule_chunk_causal", "schedule_block_mask")
