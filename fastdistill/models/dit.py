"""A tiny diffusion transformer for images and videos, attention through `fastdistill.attention`.

Patches of p x p pixels (per frame) become tokens ordered frame-major, then row, then column; blocks
are adaLN-Zero transformer blocks with 3-D RoPE (frame, row, column; images are one-frame videos).
In causal mode (`frames_per_chunk` set) token i attends to the tokens of its own chunk of frames and
of every earlier chunk: `masks.chunk_causal(frames_per_chunk * tokens_per_frame)` in a full-sequence
forward (teacher-forced training), and a `RollingKVCache` in a chunk-by-chunk rollout
(`forward_chunk`), which computes the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import masks
from ..attention import attention
from ..kvcache import RollingKVCache
from ..rope import RopeSpec, apply_rope, rope_tables
from .mlp import TimeEmbedding


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP with adaLN-Zero modulation (shift, scale, gate for each half)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h, cond, attend):
        """h [N, L, dim], L = F * P tokens in frame-major order; cond [N, F, dim], one conditioning per
        frame (F = 1: one for every token); attend(q, k, v) -> [N, heads, L, hd] with q, k, v
        [N, heads, L, hd] (unrotated: the callee applies RoPE). The modulations are computed per frame
        and broadcast over the frame's P tokens (per token they were a third of the block's FLOPs)."""
        n, length, dim = h.shape
        modulation = self.modulation(nn.functional.silu(cond)).unsqueeze(2)  # [N, F, 1, 6 dim]
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        x = _modulate(self.norm1(h), shift1, scale1)
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v).transpose(1, 2).reshape(n, length, dim)
        h = _gated_residual(h, gate1, self.proj(out))
        return _gated_residual(h, gate2, self.mlp(_modulate(self.norm2(h), shift2, scale2)))


# Tokens are frame-major, so x [N, L, dim] viewed as [N, F, L / F, dim] lets per-frame modulations
# [N, F, 1, dim] broadcast over each frame's tokens.
def _frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    n, length, dim = x.shape
    return x.view(n, frames, length // frames, dim)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [N, L, dim] * (1 + scale) + shift, with shift and scale [N, F, 1, dim] per frame."""
    return (_frames(x, shift.shape[1]) * (1 + scale) + shift).view(x.shape)


def _gated_residual(h: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h + gate * y for h, y [N, L, dim] and a per-frame gate [N, F, 1, dim]."""
    return (_frames(h, gate.shape[1]) + gate * _frames(y, gate.shape[1])).view(h.shape)


class TinyDiT(nn.Module):
    """F(x, t) for images x [N, C, H, W] or videos x [N, C, T, H, W] (the scaled input x_t / sigma_d).

    t: TrigFlow time, [N] (one per sample) or [N, T] (one per frame, for causal video students).
    Returns F with x's shape. patch: p (H and W multiples of p); dim/heads/depth: transformer size
    (head_dim = dim / heads, even). frames_per_chunk: None for full attention, else causal mode.
    time_frequency: the time embedding's highest frequency (rad per unit t; lower is smoother in t).
    `forward(..., return_features=True)` also returns the final token features averaged over tokens
    [N, dim] (for a GAN head on a DMD2 critic).
    """

    def __init__(self, channels: int, height: int, width: int, *, frames: int = 1, patch: int = 2, dim: int = 128,
                 heads: int = 4, depth: int = 4, frames_per_chunk: int | None = None, time_frequency: float = 64.0):
        super().__init__()
        if height % patch or width % patch:
            raise ValueError(f"TinyDiT: height {height} and width {width} must be multiples of patch {patch}")
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"TinyDiT: dim ({dim}) / heads ({heads}) must be an even int")
        if frames_per_chunk is not None and (frames_per_chunk < 1 or frames % frames_per_chunk):
            raise ValueError(f"TinyDiT: frames ({frames}) must be a multiple of frames_per_chunk ({frames_per_chunk})")
        self.channels, self.height, self.width, self.frames, self.patch = channels, height, width, frames, patch
        self.grid = (frames, height // patch, width // patch)
        self.tokens_per_frame = self.grid[1] * self.grid[2]
        self.frames_per_chunk = frames_per_chunk
        self.dim, self.heads, self.depth = dim, heads, depth
        self.patch_in = nn.Linear(channels * patch * patch, dim)
        self.time = TimeEmbedding(dim, max_frequency=time_frequency)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.final_modulation = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.final_modulation.weight)
        nn.init.zeros_(self.final_modulation.bias)
        self.patch_out = nn.Linear(dim, channels * patch * patch)
        self.rope = RopeSpec(dim // heads, grid=self.grid, sections=_sections(dim // heads))
        self.feature_dim = dim

    # -- layout ---------------------------------------------------------------------------------------
    def _as_video(self, x):
        if x.dim() == 4:
            return x.unsqueeze(2), True
        if x.dim() == 5:
            return x, False
        raise ValueError(f"TinyDiT: x must be [N, C, H, W] or [N, C, T, H, W], got {tuple(x.shape)}")

    def _tokens(self, x):
        """[N, C, T, H, W] -> [N, T * (H/p) * (W/p), C p p]."""
        n, c, f, h, w = x.shape
        p = self.patch
        x = x.reshape(n, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
        return x.reshape(n, f * (h // p) * (w // p), c * p * p)

    def _pixels(self, tokens, frames):
        n = tokens.shape[0]
        p, hp, wp = self.patch, self.height // self.patch, self.width // self.patch
        x = tokens.reshape(n, frames, hp, wp, self.channels, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(n, self.channels, frames, self.height, self.width)

    def _check(self, x, t, frames):
        n, c, _, h, w = x.shape
        if (c, h, w) != (self.channels, self.height, self.width):
            raise ValueError(f"TinyDiT: x has (C, H, W) = {(c, h, w)}, the model was built for "
                             f"{(self.channels, self.height, self.width)}")
        if t.shape not in ((n,), (n, frames)):
            raise ValueError(f"TinyDiT: t must be [N] or [N, frames] = [{n}] or [{n}, {frames}], got {tuple(t.shape)}")

    def _conditioning(self, t, n):
        """[N, 1 or frames, dim]: the time embedding of each frame (one row when t is [N])."""
        return self.time(t.reshape(-1)).reshape(n, -1, self.dim)

    def _head(self, h, cond):
        shift, scale = self.final_modulation(nn.functional.silu(cond)).unsqueeze(2).chunk(2, dim=-1)
        return self.patch_out(_modulate(self.norm(h), shift, scale))

    # -- full-sequence forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, *, return_features: bool = False):
        x, image = self._as_video(x)
        frames = x.shape[2]
        if frames != self.frames and not (self.frames_per_chunk is None and frames <= self.frames):
            raise ValueError(f"TinyDiT: x has {frames} frames, the model was built for {self.frames}")
        self._check(x, t, frames)
        n = x.shape[0]
        length = frames * self.tokens_per_frame
        cos, sin = rope_tables(self.rope, length, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        mask = None
        if self.frames_per_chunk is not None:
            mask = masks.chunk_causal(self.frames_per_chunk * self.tokens_per_frame)

        def attend(q, k, v):
            return attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask)

        h = self.patch_in(self._tokens(x))
        cond = self._conditioning(t, n)
        for block in self.blocks:
            h = block(h, cond, attend)
        out = self._pixels(self._head(h, cond), frames)
        out = out.squeeze(2) if image else out
        return (out, self.norm(h).mean(1)) if return_features else out

    # -- streaming (causal mode) ----------------------------------------------------------------------
    def new_cache(self, batch: int, *, window_chunks: int | None = None, sink_chunks: int = 0,
                  dtype: torch.dtype | None = None, device=None) -> RollingKVCache:
        """A RollingKVCache for `forward_chunk`: one layer per block, chunk = frames_per_chunk frames.
        window_chunks None keeps every chunk of the model's `frames` (exactly the causal mask of
        `forward`); a smaller window is the sliding-window attention of long rollouts."""
        if self.frames_per_chunk is None:
            raise ValueError("TinyDiT.new_cache: the model is not causal (frames_per_chunk=None)")
        chunk = self.frames_per_chunk * self.tokens_per_frame
        chunks = self.frames // self.frames_per_chunk if window_chunks is None else window_chunks
        parameter = self.patch_in.weight
        return RollingKVCache(self.depth, batch, self.heads, self.dim // self.heads, chunk_tokens=chunk,
                              window_tokens=chunks * chunk, sink_tokens=sink_chunks * chunk, rope=self.rope,
                              dtype=dtype or parameter.dtype, device=device or parameter.device)

    def forward_chunk(self, x: torch.Tensor, t: torch.Tensor, cache: RollingKVCache) -> torch.Tensor:
        """F for the cache's current chunk: x [N, C, frames_per_chunk, H, W], t [N] or
        [N, frames_per_chunk]. Attends to the committed chunks; call `cache.commit()` after the pass
        whose K/V should become history (Self-Forcing's clean context pass)."""
        if self.frames_per_chunk is None:
            raise ValueError("TinyDiT.forward_chunk: the model is not causal (frames_per_chunk=None)")
        if x.dim() != 5 or x.shape[2] != self.frames_per_chunk:
            raise ValueError(f"TinyDiT.forward_chunk: x must be [N, C, {self.frames_per_chunk}, H, W], got {tuple(x.shape)}")
        self._check(x, t, self.frames_per_chunk)
        n = x.shape[0]
        h = self.patch_in(self._tokens(x))
        cond = self._conditioning(t, n)
        for layer, block in enumerate(self.blocks):
            h = block(h, cond, lambda q, k, v, layer=layer: cache.attend(layer, q, k, v))
        return self._pixels(self._head(h, cond), self.frames_per_chunk)


def _sections(head_dim: int) -> tuple[int, int, int]:
    """RoPE pairs for (frame, row, column): Wan's split (needs head_dim >= 6)."""
    pairs = head_dim // 2
    if pairs >= 3 and pairs - 2 * (head_dim // 6) >= 1 and head_dim // 6 >= 1:
        return (pairs - 2 * (head_dim // 6), head_dim // 6, head_dim // 6)
    raise ValueError(f"TinyDiT: head_dim {head_dim} is too small for 3-D RoPE (needs >= 6)")
