"""Rotary position embeddings: 1-D (LLM-style) and 3-D video (Wan-style), tables in float64.

A `RopeSpec` describes the embedding; `rope_tables` turns it plus absolute positions into cos/sin
tables [L, D/2]; `apply_rope` rotates a [B, H, L, D] tensor with them through the fused op
`torch.ops.fastdistill.rope` (differentiable in x and in the tables).

3-D video RoPE splits the D/2 rotation pairs into three sections rotated by the token's frame, row
and column index. Each section has its own frequency ladder, as if it were a 1-D RoPE of dimension
2 * section: pair k of a section with n pairs turns at theta ** (-k / n) radians per position. Tokens
are ordered frame-major, then row, then column (token t of a (F, H, W) grid is frame t // (H W),
row (t // W) % H, column t % W), and the frame index is absolute: a chunk that starts at frame f0
passes `start=f0`. Wan2.1 uses sections 22/21/21 for D = 128 (the default split D/2 - 2 (D // 6),
D // 6, D // 6) with interleaved pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._library import RopeFunction

_LAYOUTS = ("interleaved", "half")


@dataclass(frozen=True)
class RopeSpec:
    """What a rotary embedding rotates by.

    head_dim: D, even.
    theta:    frequency base (10000 for Wan and most LLMs).
    layout:   "interleaved" (GPT-J/Wan pairs (2p, 2p+1)) or "half" (GPT-NeoX pairs (p, p + D/2)).
    grid:     None for 1-D RoPE over token positions; (frames, height, width) of the latent video for
              3-D RoPE. `frames` is the default number of frames a table covers.
    sections: rotation pairs given to (time, height, width) for 3-D RoPE; they sum to D/2. Default:
              Wan's split (D/2 - 2 (D // 6), D // 6, D // 6), i.e. 22/21/21 for D = 128.
    """

    head_dim: int
    theta: float = 10000.0
    layout: str = "interleaved"
    grid: tuple[int, int, int] | None = None
    sections: tuple[int, int, int] | None = None

    def __post_init__(self):
        if not isinstance(self.head_dim, int) or self.head_dim < 2 or self.head_dim % 2:
            raise ValueError(f"RopeSpec: head_dim must be a positive even int, got {self.head_dim!r}")
        if not self.theta > 0:
            raise ValueError(f"RopeSpec: theta must be > 0, got {self.theta!r}")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"RopeSpec: layout must be one of {_LAYOUTS}, got {self.layout!r}")
        if self.grid is None:
            if self.sections is not None:
                raise ValueError("RopeSpec: sections apply to 3-D RoPE only; pass grid=(frames, height, width)")
            return
        grid = tuple(self.grid)
        if len(grid) != 3 or not all(isinstance(g, int) and g >= 1 for g in grid):
            raise ValueError(f"RopeSpec: grid must be (frames, height, width) of positive ints, got {self.grid!r}")
        object.__setattr__(self, "grid", grid)
        pairs = self.head_dim // 2
        sections = self.sections
        if sections is None:
            sections = (pairs - 2 * (self.head_dim // 6), self.head_dim // 6, self.head_dim // 6)
        sections = tuple(sections)
        if len(sections) != 3 or not all(isinstance(s, int) and s >= 1 for s in sections) or sum(sections) != pairs:
            raise ValueError(
                f"RopeSpec: sections must be three positive ints summing to head_dim / 2 = {pairs}, got {sections!r}"
            )
        object.__setattr__(self, "sections", sections)

    @property
    def interleaved(self) -> bool:
        return self.layout == "interleaved"

    @property
    def tokens_per_frame(self) -> int:
        """height * width for 3-D RoPE; 1 for 1-D."""
        return 1 if self.grid is None else self.grid[1] * self.grid[2]


def _inverse_frequencies(num_pairs: int, theta: float, device) -> torch.Tensor:
    """theta ** (-k / num_pairs) for k < num_pairs, in float64 (a 1-D RoPE of dim 2 * num_pairs)."""
    k = torch.arange(num_pairs, dtype=torch.float64, device=device)
    return torch.pow(float(theta), -k / num_pairs)  # a Python base: no host-to-device copy


def rope_tables(
    spec: RopeSpec,
    num_tokens: int | None = None,
    *,
    start: int | torch.Tensor = 0,
    positions: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [L, D/2] for the tokens of a sequence, computed in float64.

    1-D spec: positions are `start + arange(num_tokens)`, or `positions` [L] (integer or float).
    3-D spec: tokens cover whole frames of the (height, width) grid; `num_tokens` (default
      frames * height * width) must be a multiple of height * width, and `start` is the absolute
      index of the first frame. Or `positions` [L, 3] of (frame, row, column) per token.
    start may be a 0-dim integer tensor on `device`: the tables are then built from it on the device
      without a host sync (RollingKVCache advances its position this way, CUDA-graph safe).
    dtype: float32 (default) or float64; tables stay in full precision whatever the activations are.
    """
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"rope_tables: dtype must be torch.float32 or torch.float64, got {dtype}")
    if positions is not None:
        if num_tokens is not None or start != 0:
            raise ValueError("rope_tables: pass either positions or num_tokens/start, not both")
        positions = positions.to(device=device if device is not None else positions.device, dtype=torch.float64)
        device = positions.device
        want = "[L]" if spec.grid is None else "[L, 3]"
        if (spec.grid is None and positions.dim() != 1) or (
            spec.grid is not None and (positions.dim() != 2 or positions.shape[1] != 3)
        ):
            raise ValueError(f"rope_tables: positions must be {want} for this spec, got shape {tuple(positions.shape)}")
    else:
        if spec.grid is None:
            if num_tokens is None:
                raise ValueError("rope_tables: a 1-D spec needs num_tokens (or positions)")
            if num_tokens < 0:
                raise ValueError(f"rope_tables: num_tokens must be >= 0, got {num_tokens}")
            positions = start + torch.arange(num_tokens, dtype=torch.float64, device=device)
        else:
            frames, height, width = spec.grid
            per_frame = height * width
            if num_tokens is None:
                num_tokens = frames * per_frame
            if num_tokens < 0 or num_tokens % per_frame:
                raise ValueError(
                    f"rope_tables: num_tokens must be a multiple of height * width = {per_frame} for grid "
                    f"{spec.grid}, got {num_tokens}"
                )
            token = torch.arange(num_tokens, device=device)
            positions = torch.stack(
                (start + token // per_frame, (token // width) % height, token % width), dim=1
            ).to(torch.float64)
    if spec.grid is None:
        angles = positions[:, None] * _inverse_frequencies(spec.head_dim // 2, spec.theta, positions.device)
    else:
        angles = torch.cat(
            [
                positions[:, axis, None] * _inverse_frequencies(pairs, spec.theta, positions.device)
                for axis, pairs in enumerate(spec.sections)
            ],
            dim=1,
        )
    return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool = True) -> torch.Tensor:
    """Rotate x [B, H, L, D] (any strides; fp16/bf16/fp32/fp64) by tables cos, sin [L, D/2] (float32
    or float64, e.g. from `rope_tables`); `interleaved` selects the pair layout (`spec.interleaved`).

    Computed in fp32 (fp64 for fp64 inputs) in one fused pass; returns a new tensor of x's dtype.
    Differentiable in x, cos and sin (backward); forward mode (`torch.func.jvp`, forward AD) and
    `torch.func.vmap` go through the fused kernel too, with tangents for x (tables are constants).
    """
    return RopeFunction.apply(x, cos, sin, interleaved)
