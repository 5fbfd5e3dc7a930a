"""Reference tile schedule: pool a dense mask over tiles and list the non-empty ones.

Independent of the C++ builders (which classify tiles analytically or from mask blocks): here a tile
is visited iff any of its in-bounds pairs is allowed and full iff all of them are, by brute force.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..schedule import TileSchedule


def _pool_tiles(dense: torch.Tensor, block_m: int, block_n: int, pad_value: bool, reduce) -> torch.Tensor:
    lq, lk = dense.shape[-2:]
    nq, nk = -(-lq // block_m), -(-lk // block_n)
    padded = F.pad(dense, (0, nk * block_n - lk, 0, nq * block_m - lq), value=pad_value)
    tiles = padded.unflatten(-1, (nk, block_n)).unflatten(-3, (nq, block_m))  # [.., nq, bm, nk, bn]
    return reduce(reduce(tiles, -1), -2)


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


def schedule_from_dense(dense: torch.Tensor, block_m: int, block_n: int) -> TileSchedule:
    """Schedule of a dense mask [lq, lk] or [Bm, Hm, lq, lk] (bool), in the TileSchedule layout."""
    if dense.dim() == 2:
        dense = dense[None, None]
    any_allowed = _pool_tiles(dense, block_m, block_n, False, lambda t, d: t.any(d))
    all_allowed = _pool_tiles(dense, block_m, block_n, True, lambda t, d: t.all(d))
    kv = _compact(any_allowed, all_allowed)
    q = _compact(any_allowed.transpose(-1, -2), all_allowed.transpose(-1, -2))
    return TileSchedule(*kv, *q, block_m=block_m, block_n=block_n)
