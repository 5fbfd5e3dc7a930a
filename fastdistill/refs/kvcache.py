"""Reference ring-buffer write: rotate k with RoPE in PyTorch, then index-copy k and v into the cache.

This is how public streaming-video code writes its caches, and the baseline of
benchmarks/bench_kvcache_ops.py.
"""

from __future__ import annotations

import torch

from .rope import rope_reference


def kv_write_reference(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int | torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    interleaved: bool = True,
) -> None:
    """Write k [B, H, n, D] and v [B, H, n, Dv] into cache_k [B, H, S, D] / cache_v [B, H, S, Dv] at
    slots (start + i) mod S, rotating k by cos/sin [n, D/2] first when they are given. In place."""
    slots = cache_k.shape[2]
    start = int(start)  # the reference may read a device scalar on the host
    index = torch.remainder(torch.arange(start, start + k.shape[2], device=cache_k.device), slots)
    if cos is not None:
        k = rope_reference(k, cos, sin, interleaved)
    cache_k.index_copy_(2, index, k)
    cache_v.index_copy_(2, index, v)
