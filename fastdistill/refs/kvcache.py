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


class ReferenceKVCache:
    """The rolling cache as public streaming-video code writes it: the test oracle of
    `fastdistill.RollingKVCache` and the baseline of benchmarks/bench_kvcache.py. Same constructor and
    `attend` / `commit` / `reset` / `kv` as RollingKVCache; computes the same function.

    eviction="shift" (Self-Forcing, CausVid): per layer a [B, S0 + W, H, D] buffer holding the sink and
      the most recent tokens in position order; when a new chunk does not fit, the tokens after the
      sink are shift-copied left (through a clone) to make room, then the chunk is written at the end
      and attention runs over the contiguous filled slice.
    eviction="concat" (LongLive-style): the history is kept as contiguous tensors; every `attend`
      concatenates history and chunk into new tensors and `commit` rebuilds the kept history.
    RoPE is applied in PyTorch at write time (rope_reference, float64 tables), attention is
    F.scaled_dot_product_attention (flash on CUDA when the dtype allows; enable_gqa for GQA).
    Gradients reach the current q, k, v only: the history is detached.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, *, chunk_tokens: int,
                 window_tokens: int, sink_tokens: int = 0, rope=None, dtype=torch.bfloat16, device="cuda",
                 eviction: str = "shift"):
        if eviction not in ("shift", "concat"):
            raise ValueError(f"ReferenceKVCache: eviction must be 'shift' or 'concat', got {eviction!r}")
        if window_tokens < chunk_tokens:
            raise ValueError(f"ReferenceKVCache: window_tokens ({window_tokens}) < chunk_tokens ({chunk_tokens})")
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.chunk_tokens, self.window_tokens, self.sink_tokens = chunk_tokens, window_tokens, sink_tokens
        self.rope, self.dtype, self.device, self.eviction = rope, dtype, torch.device(device), eviction
        self.slots = sink_tokens + window_tokens
        if eviction == "shift":
            shape = (batch, self.slots, heads, head_dim)  # BSHD, as the public caches
            self._k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
            self._v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.reset()

    @property
    def position(self) -> int:
        return self._chunk * self.chunk_tokens

    def reset(self) -> None:
        self._chunk = 0
        self._length = [0] * self.num_layers  # committed tokens held per layer
        self._current = [None] * self.num_layers  # (k_rot, v) last written for the current chunk
        if self.eviction == "concat":
            empty = torch.zeros(self.batch, 0, self.heads, self.head_dim, dtype=self.dtype, device=self.device)
            self._k = [empty] * self.num_layers
            self._v = [empty] * self.num_layers
            self._positions = [torch.zeros(0, dtype=torch.int64)] * self.num_layers  # host positions held

    def _tables(self, num_tokens: int, position: int):
        from ..rope import rope_tables

        start = position // self.rope.tokens_per_frame
        return rope_tables(self.rope, num_tokens, start=start, device=self.device, dtype=torch.float64)

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        if self.rope is None:
            return x
        cos, sin = self._tables(x.shape[2], self.position)
        return rope_reference(x, cos, sin, self.rope.interleaved)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale=None) -> torch.Tensor:
        """q [B, Hq, C, D], k, v [B, H, C, D] before RoPE -> out [B, Hq, C, D]."""
        q, k_rot = self._rotate(q), self._rotate(k)
        k_new, v_new = k_rot.transpose(1, 2), v.transpose(1, 2)  # [B, C, H, D]
        chunk = self.chunk_tokens
        held = self._length[layer]
        if self.eviction == "shift":
            buf_k, buf_v = self._k[layer], self._v[layer]
            if self._current[layer] is None and held + chunk > self.slots:
                # Evict the oldest window tokens: shift everything after them left, past the sink.
                evict = held + chunk - self.slots
                keep = held - evict - self.sink_tokens
                s0 = self.sink_tokens
                buf_k[:, s0 : s0 + keep] = buf_k[:, s0 + evict : s0 + evict + keep].clone()
                buf_v[:, s0 : s0 + keep] = buf_v[:, s0 + evict : s0 + evict + keep].clone()
                held = self._length[layer] = held - evict
            buf_k[:, held : held + chunk] = k_new.detach()
            buf_v[:, held : held + chunk] = v_new.detach()
            if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
                keys = torch.cat((buf_k[:, :held], k_new), 1)
                values = torch.cat((buf_v[:, :held], v_new), 1)
            else:  # attention on the contiguous slice, as the public caches do
                keys, values = buf_k[:, : held + chunk], buf_v[:, : held + chunk]
        else:
            keys = torch.cat((self._k[layer], k_new), 1)
            values = torch.cat((self._v[layer], v_new), 1)
        self._current[layer] = (k_new.detach(), v_new.detach())
        out = torch.nn.functional.scaled_dot_product_attention(
            q, keys.transpose(1, 2), values.transpose(1, 2), scale=scale, enable_gqa=q.shape[1] != self.heads
        )
        return out

    def commit(self) -> None:
        if any(current is None for current in self._current):
            raise RuntimeError("ReferenceKVCache.commit: attend on every layer first")
        chunk = self.chunk_tokens
        # What the next chunk sees of the history: the sink and the window counted back from its end.
        window_start = self.position + 2 * chunk - self.window_tokens
        current = torch.arange(self.position, self.position + chunk)
        for layer in range(self.num_layers):
            self._length[layer] += chunk
            if self.eviction == "concat":
                positions = torch.cat((self._positions[layer], current))
                keep = ((positions < self.sink_tokens) | (positions >= window_start)).nonzero()[:, 0]
                self._k[layer] = torch.cat((self._k[layer], self._current[layer][0]), 1)[:, keep.to(self.device)]
                self._v[layer] = torch.cat((self._v[layer], self._current[layer][1]), 1)[:, keep.to(self.device)]
                self._positions[layer] = positions[keep]
                self._length[layer] = keep.numel()
            self._current[layer] = None
        self._chunk += 1

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K (rotated), V [B, H, L, D] the current chunk attends to, in position order (after attend)."""
        if self._current[layer] is None:
            raise RuntimeError("ReferenceKVCache.kv: attend first")
        held = self._length[layer]
        if self.eviction == "shift":
            keys = self._k[layer][:, : held + self.chunk_tokens]
            values = self._v[layer][:, : held + self.chunk_tokens]
        else:
            keys = torch.cat((self._k[layer], self._current[layer][0]), 1)
            values = torch.cat((self._v[layer], self._current[layer][1]), 1)
        return keys.transpose(1, 2), values.transpose(1, 2)
