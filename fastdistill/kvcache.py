"""KV cache for streaming generation: `RollingKVCache` and its fused write `kv_write`.

`kv_write` is the fused write of the rolling cache: RoPE on k and the ring-buffer store of k and v in
one pass, with the position read on the device so a cache step needs no host sync. `RollingKVCache`
keeps per-layer ring buffers that the attention kernels read in place (DESIGN.md section 5).
"""

from __future__ import annotations

import operator

import torch

from torch.autograd.function import once_differentiable

from ._library import ops
from .attention import _path as _attention_path
from .refs.attention import attention_backward_reference, attention_forward_reference
from .rope import RopeSpec, apply_rope, rope_tables


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


# --------------------------------------------------------------------------------------- RollingKVCache
class RollingKVCache:
    """KV cache of streaming autoregressive generation: chunk-causal attention with a sliding window and
    never-evicted sink tokens, over per-layer ring buffers that the attention kernel reads in place.

        cache = RollingKVCache(num_layers, batch, heads, head_dim, chunk_tokens=C, window_tokens=W,
                               sink_tokens=S0, rope=RopeSpec(...), dtype=torch.bfloat16, device="cuda")
        for chunk in range(num_chunks):
            for step in denoising_steps:            # each call overwrites the chunk's K/V
                out = cache.attend(layer, q, k, v)  # per layer: q [B, Hq, C, D], k, v [B, heads, C, D]
            ...                                     # the clean context pass: attend once more
            cache.commit()                          # the last written K/V become history

    Semantics (DESIGN.md section 5). Chunk c holds the absolute positions [c C, (c + 1) C). `attend`
    returns exactly
        attention(q, K, V, chunk_causal(C, window=W, sink=S0, q_offset=c C))
    with K, V the committed chunks 0 .. c-1 followed by this call's k, v (Lk = (c + 1) C), and with
    q and k rotated by `rope` at their absolute positions when it is given (1-D: token position; 3-D
    video RoPE: frame index = position // (height * width), so chunks must hold whole frames).

    Layout. `heads` are the key/value heads (q may have a multiple of them: GQA). Each layer owns
    ring buffers [batch, heads, S0 + W, head_dim] for k (stored rotated) and v: position p < S0 lives in
    slot p, position p >= S0 in slot S0 + (p - S0) mod W. Every query of a chunk sees the same keys -
    the sink and the W positions ending with its own chunk - and before the ring is full those are the
    slots [0, (c + 1) C), afterwards all S0 + W slots. Softmax attention does not depend on the order
    of its keys, so the kernel reads that prefix of the ring as it lies: no copy, no wrap-around
    indexing, the plain full-mask kernel. Writing a chunk only overwrites positions older than the
    window. The write rotates k in the same pass (`kv_write`) at a slot read from a device tensor.

    No host syncs: `attend`, `commit` and `reset` read no device values on the host. Once the ring is
    full (`steady`), a step has the same shapes and kernels for every chunk: a CUDA graph captured
    around the layers' `attend` calls can be replayed for later chunks, calling `commit(check=False)`
    after each replay (commit advances the device-side position and RoPE tables in place).

    Autograd: gradients flow to the current q, k, v only (the history is a constant, as in
    Self-Forcing's rollout training). The backward computes dK/dV for the C keys of the chunk, not
    for the whole window, and dQ over all visible keys. Because the ring moves on before a backward
    usually runs, a call that needs gradients saves a copy of the keys and values it attended to (the
    one copy this class makes, and only under autograd); inference copies nothing. Do not re-run
    `attend` inside activation-checkpoint recomputation: the cache is state.
    """

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, *, chunk_tokens: int,
                 window_tokens: int, sink_tokens: int = 0, rope: RopeSpec | None = None,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cuda"):
        for name, value, least in (("num_layers", num_layers, 1), ("batch", batch, 1), ("heads", heads, 1),
                                   ("head_dim", head_dim, 1), ("chunk_tokens", chunk_tokens, 1),
                                   ("window_tokens", window_tokens, 1), ("sink_tokens", sink_tokens, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"RollingKVCache: {name} must be an int >= {least}, got {value!r}")
        if window_tokens < chunk_tokens:
            raise ValueError(
                f"RollingKVCache: window_tokens ({window_tokens}) must be >= chunk_tokens ({chunk_tokens}): the "
                "window counts back from the end of a chunk and includes the chunk itself"
            )
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"RollingKVCache: dtype must be float16, bfloat16, float32 or float64, got {dtype}")
        if rope is not None:
            if not isinstance(rope, RopeSpec):
                raise TypeError(f"RollingKVCache: rope must be a fastdistill.RopeSpec or None, got {type(rope).__name__}")
            if rope.head_dim != head_dim:
                raise ValueError(f"RollingKVCache: rope.head_dim ({rope.head_dim}) != head_dim ({head_dim})")
            if chunk_tokens % rope.tokens_per_frame:
                raise ValueError(
                    f"RollingKVCache: 3-D RoPE needs whole frames per chunk: chunk_tokens ({chunk_tokens}) is not a "
                    f"multiple of height * width = {rope.tokens_per_frame}"
                )
        self.num_layers, self.batch, self.heads, self.head_dim = num_layers, batch, heads, head_dim
        self.chunk_tokens, self.window_tokens, self.sink_tokens = chunk_tokens, window_tokens, sink_tokens
        self.rope, self.dtype, self.device = rope, dtype, torch.device(device)
        self.slots = sink_tokens + window_tokens
        shape = (num_layers, batch, heads, self.slots, head_dim)
        self.k_buffer = torch.empty(shape, dtype=dtype, device=self.device)
        self.v_buffer = torch.empty(shape, dtype=dtype, device=self.device)
        # Device-side state, advanced in place (a captured graph reads it at replay): the absolute
        # position of the chunk, the ring offset of its first window token, and its RoPE tables.
        self._position = torch.zeros((), dtype=torch.int64, device=self.device)
        self._ring_start = torch.zeros((), dtype=torch.int64, device=self.device)
        if rope is not None:
            table_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            self._cos = torch.empty(chunk_tokens, head_dim // 2, dtype=table_dtype, device=self.device)
            self._sin = torch.empty_like(self._cos)
        self._chunk = 0  # host-side chunk index: decides the lengths (shapes), never read from the device
        self._written: set[int] = set()
        self._update_tables()

    # ---------------------------------------------------------------------------------------- state
    @property
    def chunk_index(self) -> int:
        """Index c of the chunk that `attend` writes (the number of committed chunks)."""
        return self._chunk

    @property
    def position(self) -> int:
        """Absolute position of the current chunk's first token (c * chunk_tokens)."""
        return self._chunk * self.chunk_tokens

    @property
    def visible_tokens(self) -> int:
        """Keys the current chunk attends to (sink + window, fewer while the ring fills)."""
        return min(self.position + self.chunk_tokens, self.slots)

    @property
    def steady(self) -> bool:
        """True once the ring is full: from here on every chunk step has the same shapes and kernels."""
        return self.visible_tokens == self.slots

    def commit(self, *, check: bool = True) -> None:
        """Make the K/V last written for the current chunk history and move on to the next chunk.

        check: raise if some layer had no `attend` for this chunk (its slots would hold stale keys).
        Pass check=False after replaying a captured CUDA graph, whose writes the host does not see.
        """
        if check and len(self._written) != self.num_layers:
            missing = sorted(set(range(self.num_layers)) - self._written)
            raise RuntimeError(
                f"RollingKVCache.commit: layers {missing} have no K/V for chunk {self._chunk}; call attend on every "
                "layer first (or commit(check=False) after replaying a CUDA graph that wrote them)"
            )
        self._chunk += 1
        self._written.clear()
        self._position.add_(self.chunk_tokens)
        torch.clamp(self._position - self.sink_tokens, min=0, out=self._ring_start)
        self._update_tables()

    def reset(self) -> None:
        """Forget all history: the next `attend` writes chunk 0."""
        self._chunk = 0
        self._written.clear()
        self._position.zero_()
        self._ring_start.zero_()
        self._update_tables()

    def _update_tables(self) -> None:
        """RoPE tables of the current chunk, from the device position (no host sync; in place)."""
        if self.rope is None:
            return
        start = self._position // self.rope.tokens_per_frame  # the frame index for 3-D RoPE
        cos, sin = rope_tables(self.rope, self.chunk_tokens, start=start, device=self.device, dtype=self._cos.dtype)
        self._cos.copy_(cos)
        self._sin.copy_(sin)

    # --------------------------------------------------------------------------------------- attend
    def _check_layer(self, layer, op: str) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"RollingKVCache.{op}: layer must be an int in [0, {self.num_layers}), got {layer!r}")

    def _check(self, layer, q, k, v):
        self._check_layer(layer, "attend")
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"RollingKVCache.attend: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype != self.dtype:
                raise TypeError(f"RollingKVCache.attend: {name} has dtype {t.dtype}, the cache {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"RollingKVCache.attend: {name} is on {t.device}, the cache on {self.device}")
        want_kv = (self.batch, self.heads, self.chunk_tokens, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want_kv:
                raise ValueError(f"RollingKVCache.attend: {name} must be [B, heads, chunk_tokens, head_dim] = "
                                 f"{list(want_kv)}, got {list(t.shape)}")
        b, hq, lq, d = q.shape if q.dim() == 4 else (None,) * 4
        if q.dim() != 4 or (b, lq, d) != (self.batch, self.chunk_tokens, self.head_dim) or hq % self.heads:
            raise ValueError(
                f"RollingKVCache.attend: q must be [B, Hq, chunk_tokens, head_dim] = [{self.batch}, Hq, "
                f"{self.chunk_tokens}, {self.head_dim}] with Hq a multiple of heads = {self.heads}, got {list(q.shape)}"
            )

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               scale: float | None = None) -> torch.Tensor:
        """Write the current chunk's k, v into `layer`'s ring (replacing an earlier write of this chunk)
        and return its attention output [B, Hq, chunk_tokens, head_dim] (see the class docstring).

        q [B, Hq, C, D], k, v [B, heads, C, D] in the cache's dtype and device, before RoPE (the cache
        rotates q and k at their absolute positions). scale defaults to 1 / sqrt(D).
        """
        self._check(layer, q, k, v)
        scale = self.head_dim**-0.5 if scale is None else float(scale)
        chunk, sink, pos = self.chunk_tokens, self.sink_tokens, self.position
        cos, sin = (self._cos, self._sin) if self.rope is not None else (None, None)
        interleaved = self.rope.interleaved if self.rope is not None else True
        k_ring, v_ring = self.k_buffer[layer], self.v_buffer[layer]
        # Tokens below the sink boundary go to their own slots (only in the first chunks); the rest to
        # the window ring, at an offset read on the device.
        in_sink = min(max(sink - pos, 0), chunk)
        if in_sink:
            kv_write(k_ring[:, :, :sink], v_ring[:, :, :sink], k[:, :, :in_sink].detach(), v[:, :, :in_sink].detach(),
                     pos, _rows(cos, 0, in_sink), _rows(sin, 0, in_sink), interleaved=interleaved)
        if in_sink < chunk:
            kv_write(k_ring[:, :, sink:], v_ring[:, :, sink:], k[:, :, in_sink:].detach(), v[:, :, in_sink:].detach(),
                     self._ring_start, _rows(cos, in_sink, chunk), _rows(sin, in_sink, chunk), interleaved=interleaved)
        self._written.add(layer)
        keys = k_ring[:, :, : self.visible_tokens]
        values = v_ring[:, :, : self.visible_tokens]
        backend, _ = _attention_path(q, keys, values, None)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            if cos is not None:  # the backward needs this chunk's tables; commit updates them in place
                cos, sin = cos.clone(), sin.clone()
                q = apply_rope(q, cos, sin, interleaved=interleaved)
            return _RingAttention.apply(q, k, v, keys, values, cos, sin, interleaved, scale, backend)
        if cos is not None:
            q = apply_rope(q, cos, sin, interleaved=interleaved)
        return _forward(q, keys, values, scale, backend)[0]

    # ----------------------------------------------------------------------------------- debugging
    def visible_positions(self, *, include_current: bool = True) -> torch.Tensor:
        """int64 [L] on the cache's device: the absolute positions the current chunk attends to, in order
        (sink, then the window up to the chunk's end; without the chunk itself if include_current=False)."""
        end = self.position + self.chunk_tokens
        stop = end if include_current else self.position
        sink = torch.arange(min(self.sink_tokens, stop), device=self.device)
        window_start = max(self.sink_tokens, end - self.window_tokens)
        window = torch.arange(window_start, max(window_start, stop), device=self.device)
        return torch.cat((sink, window))

    def kv(self, layer: int, *, include_current: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, positions): copies of `layer`'s K (rotated) and V [B, heads, L, D] that the current chunk
        attends to, in order of absolute position, and those positions [L]. For tests and debugging."""
        self._check_layer(layer, "kv")
        if include_current and layer not in self._written:
            raise RuntimeError(f"RollingKVCache.kv: layer {layer} has no K/V for chunk {self._chunk} yet; "
                               "attend first or pass include_current=False")
        positions = self.visible_positions(include_current=include_current)
        slots = torch.where(positions < self.sink_tokens, positions,
                            self.sink_tokens + (positions - self.sink_tokens) % self.window_tokens)
        return self.k_buffer[layer].index_select(2, slots), self.v_buffer[layer].index_select(2, slots), positions


def _rows(table: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if table is None else table[start:stop]


def _forward(q, keys, values, scale, backend):
    """(out, lse) of full attention of q over keys/values on `backend`."""
    if backend == "triton":
        from .kernels.attn_fwd import attention_forward_triton

        return attention_forward_triton(q, keys, values, None, scale)
    return attention_forward_reference(q, keys, values, None, scale=scale)


class _RingAttention(torch.autograd.Function):
    """Attention of the current chunk over the ring with gradients for the chunk's q, k, v only.

    Inputs: q (rotated) [B, Hq, C, D]; k (before RoPE), v [B, Hkv, C, D]: the chunk, whose rotated copy
    sits in the ring; keys/values [B, Hkv, Lk, D]: the ring slots attended to. Backward: dQ over all
    Lk keys (from the copy saved at forward time), dK/dV over the chunk's C keys only - the flash
    backward with the forward's lse and delta is exact on any subset of the keys - then dK rotated back
    (the transpose of a rotation is the rotation by -angle).
    """

    @staticmethod
    def forward(ctx, q, k, v, keys, values, cos, sin, interleaved, scale, backend):
        out, lse = _forward(q, keys, values, scale, backend)
        # The ring will be overwritten before the backward runs: keep the keys this output depends on.
        ctx.save_for_backward(q, k, v, keys.clone(), values.clone(), out, lse, cos, sin)
        ctx.interleaved, ctx.scale, ctx.backend = interleaved, scale, backend
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, keys, values, out, lse, cos, sin = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        k_rot = k if cos is None else apply_rope(k, cos, sin, interleaved=ctx.interleaved)
        grad_out = grad_out.contiguous()
        dq = dk = dv = None
        if ctx.backend == "triton":
            from .kernels.attn_bwd import backward_delta, backward_dkdv_triton, backward_dq_triton

            delta, lse = backward_delta(out, grad_out), lse.contiguous()
            if need_q:
                dq = torch.empty_like(q)
                backward_dq_triton(q, keys, values, grad_out, lse, delta, None, ctx.scale, dq)
            if need_k or need_v:
                dk, dv = torch.empty_like(k_rot), torch.empty_like(v)
                backward_dkdv_triton(q, k_rot, v, grad_out, lse, delta, None, ctx.scale, dk, dv)
        else:
            if need_q:
                dq = attention_backward_reference(q, keys, values, out, lse, grad_out, None, scale=ctx.scale)[0]
            if need_k or need_v:
                _, dk, dv = attention_backward_reference(q, k_rot, v, out, lse, grad_out, None, scale=ctx.scale)
        if dk is not None and cos is not None:
            dk = apply_rope(dk, cos, -sin, interleaved=ctx.interleaved)
        return dq, dk, dv, None, None, None, None, None, None, None
