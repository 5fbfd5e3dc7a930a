"""Tile schedules: which (query tile, key tile) pairs an attention kernel visits.

A mask compiles to a schedule once per (mask, shape, tile size); kernels iterate it and never read a
dense mask. For every query tile the schedule lists the key tiles that hold at least one allowed pair,
ascending, each flagged full (every pair allowed: no element masking) or partial (the kernel evaluates
the mask predicate); the transposed lists (per key tile, its query tiles) drive the dK/dV backward.
Empty tiles are never listed, so kernel time scales with the mask's density.

The builders are the C++/CUDA ops `torch.ops.fastdistill.schedule_chunk_causal` and
`schedule_block_mask`; they run on the device of their inputs and never sync with the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._library import ops


@dataclass(frozen=True)
class TileSchedule:
    """A tile schedule over a mask broadcast as [Bm, Hm] (1, 1 when it does not vary by batch/head).

    kv_count [Bm, Hm, nQ] int32:     key tiles visited by each query tile.
    kv_index [Bm, Hm, nQ, nK] int32: their indices, ascending, padded with -1 after kv_count entries.
    kv_full  [Bm, Hm, nQ, nK] bool:  whether each listed key tile is full (False in the padding).
    q_count, q_index, q_full:        the transposed lists, [Bm, Hm, nK] and [Bm, Hm, nK, nQ].
    block_m, block_n:                the tile size in query rows and key columns.
    """

    kv_count: torch.Tensor
    kv_index: torch.Tensor
    kv_full: torch.Tensor
    q_count: torch.Tensor
    q_index: torch.Tensor
    q_full: torch.Tensor
    block_m: int
    block_n: int


def chunk_causal_schedule(
    lq: int,
    lk: int,
    block_m: int,
    block_n: int,
    chunk_size: int,
    *,
    window: int | None = None,
    sink: int = 0,
    q_offset: int = 0,
    kv_offset: int = 0,
    device: torch.device | str = "cpu",
) -> TileSchedule:
    """Schedule of the chunk-causal mask on absolute positions pq = q_offset + i, pk = kv_offset + j:

        allowed(pq, pk) = (pk < end(pq) and (window is None or pk >= end(pq) - window)) or pk < sink,
        end(p) = (p // chunk_size + 1) * chunk_size.

    The window counts tokens and includes the query's own chunk. chunk_size = 1 gives causal
    attention (with a window: sliding-window attention). Chunk boundaries may cut tiles anywhere.
    """
    tensors = ops.schedule_chunk_causal(
        lq, lk, block_m, block_n, chunk_size, window, sink, q_offset, kv_offset, torch.device(device)
    )
    return TileSchedule(*tensors, block_m=block_m, block_n=block_n)


def block_mask_schedule(
    block_mask: torch.Tensor, lq: int, lk: int, block_m: int, block_n: int, mask_block: tuple[int, int]
) -> TileSchedule:
    """Schedule of a block-boolean mask: allowed(i, j) = block_mask[b, h, i // bq, j // bk].

    block_mask: bool [B|1, H|1, ceil(lq / bq), ceil(lk / bk)] with (bq, bk) = mask_block, on the device
    the schedule is built on. The kernel tile (block_m, block_n) need not equal the mask block: a tile
    is visited if any mask block it overlaps is allowed and is full if all of them are.
    """
    bq, bk = mask_block
    tensors = ops.schedule_block_mask(block_mask, lq, lk, block_m, block_n, bq, bk)
    return TileSchedule(*tensors, block_m=block_m, block_n=block_n)


TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2


def _compact(visited: torch.Tensor, full: torch.Tensor):
    """Per row of `visited` [.., n_outer, n_inner]: count, ascending indices padded with -1, full flags."""
    n_inner = visited.shape[-1]
    count = visited.sum(-1, dtype=torch.int32)
    # A stable sort on "not visited" puts the visited indices first, in ascending order.
    order = torch.sort((~visited).to(torch.uint8), dim=-1, stable=True).indices
    valid = torch.arange(n_inner, device=visited.device) < count[..., None]
    index = torch.where(valid, order, -1).to(torch.int32)
    flags = torch.gather(full, -1, order) & valid
    return count, index, flags


def schedule_from_tile_kinds(kinds: torch.Tensor, block_m: int, block_n: int) -> TileSchedule:
    """The schedule of a grid of tile kinds [Bm, Hm, nQ, nK] (TILE_EMPTY / TILE_PARTIAL / TILE_FULL).

    Plain torch ops on the grid's device, no host sync: used for masks whose tiles are classified in
    Python (intersections, content-aware masks) and by the reference schedule.
    """
    visited, full = kinds != TILE_EMPTY, kinds == TILE_FULL
    kv = _compact(visited, full)
    q = _compact(visited.transpose(-1, -2), full.transpose(-1, -2))
    return TileSchedule(*kv, *q, block_m=block_m, block_n=block_n)


def tile_kinds(schedule: TileSchedule) -> torch.Tensor:
    """The grid of tile kinds [Bm, Hm, nQ, nK] int8 a schedule lists (the inverse of
    `schedule_from_tile_kinds`)."""
    index = schedule.kv_index.long()
    listed = index >= 0
    kinds = torch.zeros(index.shape, dtype=torch.int8, device=index.device)
    values = torch.where(schedule.kv_full, TILE_FULL, TILE_PARTIAL).to(torch.int8) * listed
    # Padding entries (-1) are scattered into a spare last column, which is dropped.
    spare = torch.cat([kinds, kinds[..., :1]], dim=-1)
    spare.scatter_(-1, torch.where(listed, index, index.shape[-1]), values)
    return spare[..., :-1]
