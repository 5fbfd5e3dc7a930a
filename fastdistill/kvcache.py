"""KV-cache ops for streaming generation.

`kv_write` is the fused write of the rolling cache: RoPE on k and the ring-buffer store of k and v in
one pass, with the position read on the device so a cache step needs no host sync.
"""

from __future__ import annotations

import operator

import torch

from ._library import ops


def kv_write(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int | torch.Tensor,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    *,
    interleaved: bool = True,
) -> None:
    """Write n new tokens into ring buffers, in place.

    cache_k [B, H, S, D], cache_v [B, H, S, Dv]: the ring buffers (any strides, e.g. a [B, S, H, D]
        buffer transposed); k [B, H, n, D], v [B, H, n, Dv] with n <= S, same dtype as the caches.
    start: absolute position of the first new token; token i goes to slot (start + i) mod S. An int or
        a CPU scalar tensor (read on the host and passed by value: a CUDA graph captures its value), or
        an int32/int64 scalar tensor on the cache's device, which the kernel reads itself (no host sync;
        a captured write follows the tensor when it is advanced in place between replays).
    cos, sin [n, D/2] (float32/float64, optional): when given, k is rotated by them before it is stored
        (RoPE at the tokens' absolute positions, e.g. `rope_tables(spec, n, start=...)`).
    interleaved: the pair layout of the rotation.

    Not differentiable: k and v must not require grad (pass `k.detach()`).
    """
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        # The cache stores values: a write cannot carry gradients back to k and v. Rather than drop
        # them silently, ask for an explicit detach (RollingKVCache attends over the current chunk's
        # own k/v, so gradients reach them without passing through the cache).
        raise ValueError("kv_write: k and v must not require grad (the cache stores values); pass k.detach()")
    if not isinstance(start, torch.Tensor):
        if isinstance(start, bool):
            raise TypeError("kv_write: start must be an int or an integer tensor, got bool")
        try:
            start = torch.tensor(operator.index(start), dtype=torch.int64)  # CPU scalar: passed by value
        except TypeError:
            raise TypeError(f"kv_write: start must be an int or an integer tensor, got {type(start).__name__}") from None
    ops.kv_write(cache_k, cache_v, k, v, start, cos, sin, interleaved)
