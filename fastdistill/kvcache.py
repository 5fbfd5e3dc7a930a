"""KV-cache ops for streaming generation.

`kv_write` is the fused write of the rolling cache: RoPE on k and the ring-buffer store of k and v in
one pass, with the position read on the device so a cache step needs no host sync.
"""

from __future__ import annotations

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
    start: absolute position of the first new token; token i goes to slot (start + i) mod S. An int, a
        CPU scalar tensor, or an int32/int64 scalar tensor on the cache's device, which the kernel reads
        itself (no host sync, so the write can be captured in a CUDA graph and `start` advanced in place).
    cos, sin [n, D/2] (float32/float64, optional): when given, k is rotated by them before it is stored
        (RoPE at the tokens' absolute positions, e.g. `rope_tables(spec, n, start=...)`).
    interleaved: the pair layout of the rotation.
    """
    if isinstance(start, bool) or not isinstance(start, (int, torch.Tensor)):
        raise TypeError(f"kv_write: start must be an int or an integer tensor, got {type(start).__name__}")
    if isinstance(start, int):
        start = torch.tensor(start, dtype=torch.int64)  # a CPU scalar: passed by value, no device copy
    ops.kv_write(cache_k, cache_v, k, v, start, cos, sin, interleaved)
