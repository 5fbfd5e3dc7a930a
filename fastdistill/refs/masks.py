"""Dense definitions of the attention masks (DESIGN.md section 4): the ground truth every schedule and
kernel test is checked against. Small sizes only: they materialise [.., Lq, Lk] booleans."""

from __future__ import annotations

import torch


def chunk_causal_dense(
    lq: int,
    lk: int,
    chunk_size: int,
    *,
    window: int | None = None,
    sink: int = 0,
    q_offset: int = 0,
    kv_offset: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """bool [lq, lk]: allowed(pq, pk) = (pk < end(pq) and (window is None or pk >= end(pq) - window))
    or pk < sink, with pq = q_offset + i, pk = kv_offset + j, end(p) = (p // chunk_size + 1) * chunk_size."""
    pq = q_offset + torch.arange(lq, device=device)[:, None]
    pk = kv_offset + torch.arange(lk, device=device)[None, :]
    end = (torch.div(pq, chunk_size, rounding_mode="floor") + 1) * chunk_size
    allowed = pk < end
    if window is not None:
        allowed &= pk >= end - window
    return allowed | (pk < sink)


def block_mask_dense(block_mask: torch.Tensor, lq: int, lk: int, mask_block: tuple[int, int]) -> torch.Tensor:
    """bool [Bm, Hm, lq, lk]: allowed(i, j) = block_mask[b, h, i // bq, j // bk]."""
    bq, bk = mask_block
    rows = torch.arange(lq, device=block_mask.device) // bq
    cols = torch.arange(lk, device=block_mask.device) // bk
    return block_mask[:, :, rows][:, :, :, cols]
