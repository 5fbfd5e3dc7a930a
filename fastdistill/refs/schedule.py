"""Reference tile schedule: pool a dense mask over tiles and list the non-empty ones.

Independent of the C++ builders (which classify tiles analytically or from mask blocks): here a tile
is visited iff any of its in-bounds pairs is allowed and full iff all of them are, by brute force; the
lists are then compacted by `schedule_from_tile_kinds` (plain torch ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..schedule import TileSchedule, schedule_from_tile_kinds


def _pool_tiles(dense: torch.Tensor, block_m: int, block_n: int, pad_value: bool, reduce) -> torch.Tensor:
    lq, lk = dense.shape[-2:]
    nq, nk = -(-lq // block_m), -(-lk // block_n)
    padded = F.pad(dense, (0, nk * block_n - lk, 0, nq * block_m - lq), value=pad_value)
    tiles = padded.unflatten(-1, (nk, block_n)).unflatten(-3, (nq, block_m))  # [.., nq, bm, nk, bn]
    return reduce(reduce(tiles, -1), -2)


def schedule_from_dense(dense: torch.Tensor, block_m: int, block_n: int) -> TileSchedule:
    """Schedule of a dense mask [lq, lk] or [Bm, Hm, lq, lk] (bool), in the TileSchedule layout."""
    if dense.dim() == 2:
        dense = dense[None, None]
    any_allowed = _pool_tiles(dense, block_m, block_n, False, lambda t, d: t.any(d))
    all_allowed = _pool_tiles(dense, block_m, block_n, True, lambda t, d: t.all(d))
    kinds = any_allowed.to(torch.int8) + all_allowed.to(torch.int8)  # 0 empty, 1 partial, 2 full
    return schedule_from_tile_kinds(kinds, block_m, block_n)
