"""Attention masks: token-exact definitions on absolute positions, compiled to tile schedules.

    masks.full()
    masks.causal()                                   allowed iff kv_pos <= q_pos (top-left aligned)
    masks.chunk_causal(chunk_size, *, window=None, sink=0, q_offset=0, kv_offset=0)
    masks.block_sparse(block_mask, block_size=(bq, bk))
    masks.topk_blocks(q, k, keep, block_size)        content-aware block selection, built on the device
    mask_a & mask_b                                  intersection
    mask.to_dense(lq, lk) -> bool [Bm, Hm, lq, lk]   the definition every test checks against
    mask.density(lq, lk) -> float                    fraction of allowed (q, k) pairs

With pq = q_offset + i, pk = kv_offset + j and end(p) = (p // chunk_size + 1) * chunk_size,
chunk_causal allows (pk < end(pq) and (window is None or pk >= end(pq) - window)) or pk < sink: a
query sees its own chunk and earlier ones, the last `window` tokens counted back from the end of its
chunk (the window includes the query's own chunk), and the first `sink` tokens always. block_sparse
allows block_mask[b, h, i // bq, j // bk]; the mask may be shared ([1, 1, ...]) or per batch and head.

Kernels never read dense masks: `mask.schedule(lq, lk, block_m, block_n, device)` lists the tiles to
visit (see fastdistill.schedule), cached per (shape, tile size, device); inside a partial tile the
kernel evaluates the element predicate from `mask.terms()`. Masks are immutable: a block mask tensor
must not be modified after the mask is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .refs.masks import block_mask_dense, chunk_causal_dense
from .schedule import (
    TileSchedule,
    block_mask_schedule,
    chunk_causal_schedule,
    schedule_from_tile_kinds,
    tile_kinds,
)


@dataclass(frozen=True, eq=False)
class Mask:
    """Base class of the masks. Subclasses define `dense_rows` and `_build_schedule`."""

    _schedules: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def dense_rows(self, row_start: int, row_stop: int, lk: int, device=None) -> torch.Tensor:
        """bool [Bm, Hm, row_stop - row_start, lk]: the allowed pairs of query rows [row_start, row_stop)."""
        raise NotImplementedError

    def to_dense(self, lq: int, lk: int, device=None) -> torch.Tensor:
        """bool [Bm, Hm, lq, lk] (Bm = Hm = 1 unless the mask varies by batch or head)."""
        return self.dense_rows(0, lq, lk, device)

    def density(self, lq: int, lk: int, rows_per_step: int = 1024) -> float:
        """Fraction of allowed (q, k) pairs, averaged over the mask's batches and heads."""
        if lq == 0 or lk == 0:
            return 0.0
        allowed = 0.0
        for start in range(0, lq, rows_per_step):
            rows = self.dense_rows(start, min(lq, start + rows_per_step), lk)
            allowed += rows.sum().item() / (rows.shape[0] * rows.shape[1])
        return allowed / (lq * lk)

    @property
    def batch_heads(self) -> tuple[int, int]:
        """(Bm, Hm): the batch and head sizes the mask is defined over (1 when shared)."""
        return 1, 1

    def terms(self) -> list[Mask]:
        """The masks whose predicates the kernel ANDs on partial tiles (self, or an intersection's parts)."""
        return [self]

    def schedule(self, lq: int, lk: int, block_m: int, block_n: int, device) -> TileSchedule:
        """The tile schedule for these lengths and tile sizes, built once and cached on the mask."""
        key = (lq, lk, block_m, block_n, torch.device(device))
        cached = self._schedules.get(key)
        if cached is None:
            cached = self._schedules[key] = self._build_schedule(lq, lk, block_m, block_n, torch.device(device))
        return cached

    def _build_schedule(self, lq, lk, block_m, block_n, device) -> TileSchedule:
        raise NotImplementedError

    def check_shape(self, batch: int, heads: int, lq: int, lk: int) -> None:
        """Raise ValueError when the mask cannot apply to [batch, heads, lq, lk] scores."""
        bm, hm = self.batch_heads
        if bm not in (1, batch) or hm not in (1, heads):
            raise ValueError(
                f"mask: defined over batch {bm} and heads {hm}, which do not broadcast to batch {batch} "
                f"and heads {heads} of the attention"
            )

    def repeat_batch(self, times: int) -> Mask:
        """This mask for a batch repeated `times` times along dim 0 (index r * B + b -> b), as
        `torch.func.vmap` folds its dim into the batch. Masks shared over the batch return themselves."""
        return self

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return IntersectionMask(tuple(self.terms()) + tuple(other.terms()))


@dataclass(frozen=True, eq=False)
class FullMask(Mask):
    """Every pair allowed."""

    def dense_rows(self, row_start, row_stop, lk, device=None):
        return torch.ones(1, 1, row_stop - row_start, lk, dtype=torch.bool, device=device)

    def terms(self):
        return []  # the identity of intersection

    def _build_schedule(self, lq, lk, block_m, block_n, device):
        # chunk_size covering every position: one chunk, every tile full.
        return chunk_causal_schedule(lq, lk, block_m, block_n, max(lq, lk, 1), device=device)


@dataclass(frozen=True, eq=False)
class ChunkCausalMask(Mask):
    """Chunk-causal attention with an optional sliding window and sink tokens (module docstring)."""

    chunk_size: int = 1
    window: int | None = None
    sink: int = 0
    q_offset: int = 0
    kv_offset: int = 0

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_causal: chunk_size must be >= 1, got {self.chunk_size}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"chunk_causal: window must be None or >= 1 tokens, got {self.window}")
        if self.sink < 0 or self.q_offset < 0 or self.kv_offset < 0:
            raise ValueError(
                f"chunk_causal: sink, q_offset and kv_offset must be >= 0, got sink={self.sink}, "
                f"q_offset={self.q_offset}, kv_offset={self.kv_offset}"
            )

    def dense_rows(self, row_start, row_stop, lk, device=None):
        rows = chunk_causal_dense(
            row_stop - row_start, lk, self.chunk_size, window=self.window, sink=self.sink,
            q_offset=self.q_offset + row_start, kv_offset=self.kv_offset, device=device,
        )
        return rows[None, None]

    def _build_schedule(self, lq, lk, block_m, block_n, device):
        return chunk_causal_schedule(
            lq, lk, block_m, block_n, self.chunk_size, window=self.window, sink=self.sink,
            q_offset=self.q_offset, kv_offset=self.kv_offset, device=device,
        )


@dataclass(frozen=True, eq=False)
class BlockSparseMask(Mask):
    """allowed(i, j) = block_mask[b, h, i // bq, j // bk]; block_mask bool [B|1, H|1, nQb, nKb]."""

    block_mask: torch.Tensor = None
    block_size: tuple[int, int] = (128, 128)

    def __post_init__(self):
        if not isinstance(self.block_mask, torch.Tensor) or self.block_mask.dtype != torch.bool:
            raise TypeError(f"block_sparse: block_mask must be a bool tensor, got {type(self.block_mask).__name__}"
                            + (f" of dtype {self.block_mask.dtype}" if isinstance(self.block_mask, torch.Tensor) else ""))
        if self.block_mask.dim() != 4:
            raise ValueError(
                f"block_sparse: block_mask must be [B|1, H|1, nQ, nK] (rank 4), got shape {tuple(self.block_mask.shape)}"
            )
        bq, bk = self.block_size
        if bq < 1 or bk < 1:
            raise ValueError(f"block_sparse: block_size must be positive, got {self.block_size}")
        object.__setattr__(self, "block_size", (int(bq), int(bk)))

    @property
    def batch_heads(self):
        return self.block_mask.shape[0], self.block_mask.shape[1]

    def check_shape(self, batch, heads, lq, lk):
        super().check_shape(batch, heads, lq, lk)
        bq, bk = self.block_size
        want = (-(-lq // bq), -(-lk // bk))
        if tuple(self.block_mask.shape[2:]) != want:
            raise ValueError(
                f"block_sparse: block_mask of shape {tuple(self.block_mask.shape)} with block size {self.block_size} "
                f"does not fit lq = {lq}, lk = {lk} (needs {want[0]} x {want[1]} blocks)"
            )

    def repeat_batch(self, times):
        if self.block_mask.shape[0] == 1:
            return self
        return BlockSparseMask(self.block_mask.repeat(times, 1, 1, 1), self.block_size)

    def dense_rows(self, row_start, row_stop, lk, device=None):
        bq, _ = self.block_size
        first, last = row_start // bq, -(-row_stop // bq)
        rows = block_mask_dense(self.block_mask[:, :, first:last], (last - first) * bq, lk, self.block_size)
        rows = rows[:, :, row_start - first * bq : row_stop - first * bq]
        return rows if device is None else rows.to(device)

    def _build_schedule(self, lq, lk, block_m, block_n, device):
        return block_mask_schedule(self.block_mask.to(device), lq, lk, block_m, block_n, self.block_size)


@dataclass(frozen=True, eq=False)
class IntersectionMask(Mask):
    """Pairs allowed by every part. Its schedule combines the parts' tile kinds: a tile is full when
    full in every part, empty when empty in any, else partial (a partial-partial tile may hold no
    allowed pair; it is then visited with every element masked, which costs time, not correctness)."""

    parts: tuple[Mask, ...] = ()

    def terms(self):
        return list(self.parts)

    @property
    def batch_heads(self):
        bm = max((p.batch_heads[0] for p in self.parts), default=1)
        hm = max((p.batch_heads[1] for p in self.parts), default=1)
        return bm, hm

    def repeat_batch(self, times):
        return IntersectionMask(tuple(part.repeat_batch(times) for part in self.parts))

    def check_shape(self, batch, heads, lq, lk):
        for part in self.parts:
            part.check_shape(batch, heads, lq, lk)

    def dense_rows(self, row_start, row_stop, lk, device=None):
        dense = torch.ones(1, 1, row_stop - row_start, lk, dtype=torch.bool, device=device)
        for part in self.parts:
            dense = dense & part.dense_rows(row_start, row_stop, lk, device)
        return dense

    def _build_schedule(self, lq, lk, block_m, block_n, device):
        if not self.parts:
            return full().schedule(lq, lk, block_m, block_n, device)
        kinds = None
        for part in self.parts:
            part_kinds = tile_kinds(part.schedule(lq, lk, block_m, block_n, device))
            kinds = part_kinds if kinds is None else torch.minimum(kinds, part_kinds)
        return schedule_from_tile_kinds(kinds, block_m, block_n)


def full() -> Mask:
    return FullMask()


def causal() -> Mask:
    """kv position <= q position, top-left aligned (torch's `is_causal`); for bottom-right alignment
    of Lq < Lk use chunk_causal(1, q_offset=Lk - Lq)."""
    return ChunkCausalMask(1)


def chunk_causal(chunk_size: int, *, window: int | None = None, sink: int = 0, q_offset: int = 0,
                 kv_offset: int = 0) -> Mask:
    return ChunkCausalMask(chunk_size, window, sink, q_offset, kv_offset)


def block_sparse(block_mask: torch.Tensor, block_size: tuple[int, int] | int = 128) -> Mask:
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    return BlockSparseMask(block_mask, tuple(block_size))


def topk_blocks(q: torch.Tensor, k: torch.Tensor, keep: int, block_size: tuple[int, int] | int = 128) -> Mask:
    """Keep, for every query block, the `keep` key blocks with the highest score between block-mean
    queries and block-mean keys (BLADE/VSA-style content-aware sparsity). q [B, Hq, Lq, D],
    k [B, Hkv, Lk, D] (GQA: key heads are shared by Hq / Hkv query heads). Built on q's device with
    torch ops (no host sync); returns a per-batch, per-head block_sparse mask."""
    if isinstance(block_size, int):
        block_size = (block_size, block_size)
    bq, bk = block_size
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"topk_blocks: q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] expected, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"topk_blocks: query heads {q.shape[1]} must be a multiple of key heads {k.shape[1]}")
    if keep < 1:
        raise ValueError(f"topk_blocks: keep must be >= 1, got {keep}")

    def block_means(x, size):
        length = x.shape[2]
        blocks = -(-length // size)
        padded = torch.nn.functional.pad(x.float(), (0, 0, 0, blocks * size - length))
        counts = (length - size * torch.arange(blocks, device=x.device)).clamp(max=size)  # the tail block is short
        return padded.unflatten(2, (blocks, size)).sum(3) / counts[:, None]

    q_blocks = block_means(q, bq)  # [B, Hq, nQb, D]
    k_blocks = block_means(k, bk).repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # [B, Hq, nKb, D]
    scores = q_blocks @ k_blocks.transpose(-1, -2)
    keep = min(keep, scores.shape[-1])
    chosen = scores.topk(keep, dim=-1).indices
    block_mask = torch.zeros(scores.shape, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True)
    return BlockSparseMask(block_mask, (bq, bk))
