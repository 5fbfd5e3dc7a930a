"""The tile iterator shared by the attention kernels (forward, backward, and the JVP of issue 4).

Every kernel walks a list of tiles: for a query tile, its key tiles (forward, dQ); for a key tile, its
query tiles (dK/dV). With a schedule the list is read from it (`count`, then `index`/`full` per
step); without one (the full mask) every tile is visited and every tile is full. Full tiles only mask
the sequence bounds; partial tiles evaluate the mask predicate element by element.
"""

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def tile_count(count_ptr, num_tiles, USE_SCHEDULE: tl.constexpr):
    """How many tiles the list holds."""
    if USE_SCHEDULE:
        return tl.load(count_ptr)
    else:
        return num_tiles


@triton.jit
def tile_at(index_ptr, full_ptr, step, USE_SCHEDULE: tl.constexpr):
    """(tile index, is full) of list entry `step`."""
    if USE_SCHEDULE:
        return tl.load(index_ptr + step), tl.load(full_ptr + step) != 0
    else:
        return step, True


@triton.jit
def allowed_pairs(
    offs_m, offs_n, Lq, Lk,
    chunk_size, window, sink, q_offset, kv_offset,
    block_mask_ptr, stride_mask_q, stride_mask_k, mask_block_q, mask_block_k,
    HAS_CHUNK: tl.constexpr, BLOCK_MODE: tl.constexpr,
):
    """bool [BLOCK_M, BLOCK_N]: in-bounds pairs that the mask allows (DESIGN.md section 4).

    offs_m: query rows, offs_n: key columns (token indices within this call). Chunk-causal terms are
    evaluated on absolute positions pq = q_offset + i, pk = kv_offset + j; `window` < 0 means none.
    `block_mask_ptr` points at this (batch, head)'s [nQb, nKb] block mask. BLOCK_MODE: 0 no block
    term; 1 the tile's columns lie in one mask-block column (mask_block_k is a multiple of BLOCK_N),
    so one bit per row is loaded; 2 one bit per element (any block size, more registers).
    """
    in_bounds = (offs_m[:, None] < Lq) & (offs_n[None, :] < Lk)
    allowed = in_bounds
    if HAS_CHUNK:
        pq = q_offset + offs_m
        pk = kv_offset + offs_n
        end = (pq // chunk_size + 1) * chunk_size
        in_window = (pk[None, :] < end[:, None]) & ((window < 0) | (pk[None, :] >= end[:, None] - window))
        allowed = allowed & (in_window | (pk[None, :] < sink))
    if BLOCK_MODE == 1:
        column = tl.min(offs_n, 0) // mask_block_k
        bits = tl.load(block_mask_ptr + (offs_m // mask_block_q) * stride_mask_q + column * stride_mask_k,
                       mask=offs_m < Lq, other=0)
        allowed = allowed & (bits != 0)[:, None]
    elif BLOCK_MODE == 2:
        bits = tl.load(
            block_mask_ptr
            + (offs_m // mask_block_q)[:, None] * stride_mask_q
            + (offs_n // mask_block_k)[None, :] * stride_mask_k,
            mask=in_bounds,
            other=0,
        )
        allowed = allowed & (bits != 0)
    return allowed


@triton.jit
def masked_scores(q, kT, offs_m, offs_n, full, Lq, Lk, scale_log2,
                  chunk_size, window, sink, q_offset, kv_offset,
                  mask_base, stride_bmq, stride_bmk, mask_block_q, mask_block_k,
                  HAS_CHUNK: tl.constexpr, BLOCK_MODE: tl.constexpr, PRECISION: tl.constexpr):
    """scale q k^T in base 2 with disallowed pairs at -inf (q [BLOCK_M, D], kT [D, BLOCK_N]): full tiles
    mask only the sequence end, partial tiles the mask predicate (`allowed_pairs`)."""
    s = tl.dot(q, kT, input_precision=PRECISION) * scale_log2
    if full:
        s = tl.where(offs_n[None, :] < Lk, s, float("-inf"))
    else:
        allowed = allowed_pairs(
            offs_m, offs_n, Lq, Lk, chunk_size, window, sink, q_offset, kv_offset,
            mask_base, stride_bmq, stride_bmk, mask_block_q, mask_block_k, HAS_CHUNK, BLOCK_MODE,
        )
        s = tl.where(allowed, s, float("-inf"))
    return s


# ------------------------------------------------------------------------------------------ host side
def default_configs(tile_config, dtype, value_dim_name: str, precision: str):
    """KernelConfigs for every (head dim 64/128, mask kind) variant a launcher compiles for `dtype`,
    with the tiles `tile_config(head_dim, dtype, kind)` picks: what the kernel report checks."""
    from . import KernelConfig

    configs = []
    for d in (64, 128):
        for kind, (use_schedule, has_chunk, block_mode) in MASK_KINDS.items():
            cfg = tile_config(d, dtype, kind)
            configs.append(KernelConfig(
                name=f"d{d}-{kind}-m{cfg.block_m}n{cfg.block_n}w{cfg.num_warps}",
                constexprs={"D": d, value_dim_name: d, "HEAD_DIM": d, "HEAD_DIM_V": d, "BLOCK_M": cfg.block_m,
                            "BLOCK_N": cfg.block_n, "USE_SCHEDULE": use_schedule, "HAS_CHUNK": has_chunk,
                            "BLOCK_MODE": block_mode, "PRECISION": precision},
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, default=True,
            ))
    return tuple(configs)


def runtime_hints(fn, signature: dict[str, str]) -> dict[str, int]:
    """Launch-time specializations of an attention kernel for the inputs it is built for: BHSD views
    with a unit head-dim stride (stride_*d == 1), 16-byte-aligned data and 16-multiple row/head/batch
    strides. Other strides compile a variant of their own; the kernel report checks this one."""
    tensor_strides = tuple(f"stride_{t}" for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv", "tq", "tk",
                                                         "tv", "to"))
    hints = {}
    for name in fn.arg_names:
        if name.startswith(tensor_strides) and name.endswith("d"):
            hints[name] = 1
        elif name.startswith(tensor_strides) or signature.get(name, "").startswith("*"):
            hints[name] = 16
    return hints


# The mask kinds a kernel is compiled for: name -> (USE_SCHEDULE, HAS_CHUNK, BLOCK_MODE). Tile
# configurations are chosen per (head dim, dtype, kind) and never depend on the lengths.
MASK_KINDS = {
    "full": (False, False, 0),
    "chunk": (True, True, 0),
    "block": (True, False, 1),
    "chunk+block": (True, True, 1),
    "block-any-size": (True, False, 2),
    "chunk+block-any-size": (True, True, 2),
}

# The full mask walked through its tile list (every tile full) instead of counted: for kernels whose
# counted full-mask loop, which Triton pipelines more deeply, spills (the JVP kernel at D = 128).
FULL_LISTED = ("full-listed", (True, False, 0))


def launch_args(mask, batch, heads, lq, lk, head_dim, dtype, tile_config, device, *, list_full=False):
    """(tile configuration, kernel arguments describing `mask`) for one launch.

    `tile_config(head_dim, dtype, kind)` picks the tile configuration for a mask kind of MASK_KINDS (or
    FULL_LISTED's with list_full, for a mask without terms). The arguments hold the
    schedule tensors expanded to [batch, heads, ...] (stride 0 where the mask is shared, so nothing is
    copied), the chunk-causal parameters and the block mask, plus the constexprs USE_SCHEDULE /
    HAS_CHUNK / BLOCK_MODE. The Triton kernels AND at most one chunk-causal term and one block-sparse
    term; `attention` routes other masks to the reference.
    """
    from ..masks import BlockSparseMask, ChunkCausalMask  # masks imports nothing from kernels

    terms = mask.terms() if mask is not None else []
    chunks = [t for t in terms if isinstance(t, ChunkCausalMask)]
    blocks = [t for t in terms if isinstance(t, BlockSparseMask)]
    if len(chunks) > 1 or len(blocks) > 1 or len(chunks) + len(blocks) != len(terms):
        raise NotImplementedError(
            "the Triton attention kernels evaluate at most one chunk-causal and one block-sparse term per "
            f"mask; got {[type(t).__name__ for t in terms]} (use the reference backend for other masks)"
        )
    kind = "full" if not terms else "+".join(["chunk"] * bool(chunks) + ["block"] * bool(blocks))
    if not terms and list_full:
        kind = FULL_LISTED[0]
    cfg = tile_config(head_dim, dtype, kind)
    # A block term costs one bit per row when the tile's columns sit in one mask-block column;
    # otherwise it is read per element, with narrower tiles.
    if blocks and blocks[0].block_size[1] % cfg.block_n:
        kind += "-any-size"
        cfg = tile_config(head_dim, dtype, kind)
    use_schedule, has_chunk, block_mode = dict([FULL_LISTED], **MASK_KINDS)[kind]
    args = dict(USE_SCHEDULE=use_schedule, HAS_CHUNK=has_chunk, BLOCK_MODE=block_mode)
    chunk = chunks[0] if chunks else ChunkCausalMask(1)
    args.update(chunk_size=chunk.chunk_size, window=-1 if chunk.window is None else chunk.window, sink=chunk.sink,
                q_offset=chunk.q_offset, kv_offset=chunk.kv_offset)
    if blocks:
        block_mask = blocks[0].block_mask.to(device).expand(batch, heads, -1, -1)
        args.update(block_mask=block_mask, mask_block_q=blocks[0].block_size[0], mask_block_k=blocks[0].block_size[1])
    else:
        args.update(block_mask=_unused_tensors(device).q_full.expand(batch, heads, 1, 1), mask_block_q=1,
                    mask_block_k=1)
    if kind == FULL_LISTED[0]:
        schedule = _full_mask().schedule(lq, lk, cfg.block_m, cfg.block_n, device)
    elif terms:
        schedule = mask.schedule(lq, lk, cfg.block_m, cfg.block_n, device)
    else:  # never read (USE_SCHEDULE=False); tensors of the right rank keep the launch uniform
        schedule = _unused_tensors(device)
    for name in ("kv_count", "kv_index", "kv_full", "q_count", "q_index", "q_full"):
        t = getattr(schedule, name)
        args[name] = t.expand(batch, heads, *t.shape[2:])
    return cfg, args


@functools.lru_cache(maxsize=None)
def _unused_tensors(device):
    """Placeholders for the arguments a kernel variant never reads (the schedule of the full mask, the
    block mask of a mask without one), made once per device rather than on every launch."""
    from ..schedule import TileSchedule

    ints = torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
    bools = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=device)
    return TileSchedule(ints, ints[..., None], bools, ints, ints[..., None], bools, block_m=1, block_n=1)


@functools.lru_cache(maxsize=None)
def _full_mask():
    """One full mask for the FULL_LISTED walk, so its schedules are built once per shape, not per launch."""
    from ..masks import full

    return full()
