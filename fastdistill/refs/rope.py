"""Reference rotary embedding (pure PyTorch)."""

from __future__ import annotations

import torch


def rope_pairs(x: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the last dim of x (size D) into the two members of its D/2 rotation pairs.

    interleaved (GPT-J, Wan): pair p = (x[..., 2p], x[..., 2p + 1]);
    half-split (GPT-NeoX):    pair p = (x[..., p],  x[..., p + D/2]).
    Returns two views of shape [..., D/2].
    """
    if interleaved:
        return x[..., 0::2], x[..., 1::2]
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotary embedding of x [B, H, L, D] by per-token tables cos, sin [L, D/2].

    Computed in the promoted dtype of x and the tables (pass float64 tensors for an exact oracle, or
    tables cast to x.dtype for the low-precision PyTorch baseline) and returned in x.dtype.
    """
    compute = torch.promote_types(x.dtype, cos.dtype)
    x1, x2 = rope_pairs(x.to(compute), interleaved)
    c, s = cos.to(compute), sin.to(compute)
    y1 = x1 * c - x2 * s
    y2 = x1 * s + x2 * c
    if interleaved:
        out = torch.stack((y1, y2), dim=-1).flatten(-2)
    else:
        out = torch.cat((y1, y2), dim=-1)
    return out.to(x.dtype)
