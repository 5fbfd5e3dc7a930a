"""Mask specs against their definitions (DESIGN.md section 4).

to_dense is checked element by element against a Python transcription of the formulas; density
against the dense mean; every schedule against the schedule pooled from the dense mask (exact for a
single mask, conservative for an intersection); topk_blocks on inputs whose selection is known.
"""

import random

import pytest
import torch

from fastdistill import masks
from fastdistill.refs.schedule import schedule_from_dense
from fastdistill.schedule import TILE_EMPTY, TILE_FULL, schedule_from_tile_kinds, tile_kinds
from test_schedule import assert_schedule_equal

# ------------------------------------------------------------------ per-element definitions


def chunk_causal_element(chunk_size, window=None, sink=0, q_offset=0, kv_offset=0):
    def allowed(b, h, i, j):
        pq, pk = q_offset + i, kv_offset + j
        end = (pq // chunk_size + 1) * chunk_size
        return (pk < end and (window is None or pk >= end - window)) or pk < sink

    return allowed


def block_element(block_mask, block_size):
    bq, bk = block_size
    blocks = block_mask.tolist()
    bm, hm = block_mask.shape[:2]
    # A shared (size-1) batch or head dimension broadcasts.
    return lambda b, h, i, j: blocks[b if bm > 1 else 0][h if hm > 1 else 0][i // bq][j // bk]


def all_of(*elements):
    return lambda b, h, i, j: all(element(b, h, i, j) for element in elements)


def dense_by_loops(element, batch, heads, lq, lk):
    values = [element(b, h, i, j) for b in range(batch) for h in range(heads) for i in range(lq) for j in range(lk)]
    return torch.tensor(values, dtype=torch.bool).reshape(batch, heads, lq, lk)


def random_blocks(shape, seed, density=0.5):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


# Every spec builds (mask, per-element definition) for given lengths; block masks get the block
# counts those lengths need.


def chunk_spec(chunk_size, **kwargs):
    return lambda lq, lk: (masks.chunk_causal(chunk_size, **kwargs), chunk_causal_element(chunk_size, **kwargs))


def block_spec(batch, heads, block_size, seed, density=0.5):
    def build(lq, lk):
        blocks = random_blocks((batch, heads, -(-lq // block_size[0]), -(-lk // block_size[1])), seed, density)
        return masks.block_sparse(blocks, block_size), block_element(blocks, block_size)

    return build


def topk_spec(heads_q, heads_kv, keep, block_size):
    def build(lq, lk):
        generator = torch.Generator().manual_seed(lq * 1000 + lk)
        q = torch.randn(2, heads_q, lq, 8, generator=generator)
        k = torch.randn(2, heads_kv, lk, 8, generator=generator)
        mask = masks.topk_blocks(q, k, keep, block_size)
        return mask, block_element(mask.block_mask, mask.block_size)

    return build


def intersection_spec(*specs):
    def build(lq, lk):
        built = [spec(lq, lk) for spec in specs]
        mask = built[0][0]
        for part, _ in built[1:]:
            mask = mask & part
        return mask, all_of(*(element for _, element in built))

    return build


SINGLE_SPECS = {
    "full": lambda lq, lk: (masks.full(), lambda b, h, i, j: True),
    "causal": lambda lq, lk: (masks.causal(), lambda b, h, i, j: j <= i),
    "causal-bottom-right": chunk_spec(1, q_offset=23),
    "sliding-window": chunk_spec(1, window=9),
    "chunk5": chunk_spec(5),
    "chunk7-window12-sink3": chunk_spec(7, window=12, sink=3),
    "chunk7-window3-smaller-than-chunk": chunk_spec(7, window=3),
    "chunk39-window117-sink39-offsets": chunk_spec(39, window=117, sink=39, q_offset=195, kv_offset=78),
    "chunk6-kv-ahead-of-q": chunk_spec(6, kv_offset=20, sink=2),
    "chunk100-q-offset": chunk_spec(100, window=150, sink=20, q_offset=133),
    "block-shared": block_spec(1, 1, (16, 8), seed=1),
    "block-per-batch-head": block_spec(2, 3, (8, 16), seed=2),
    "block-per-head-48x80": block_spec(1, 3, (48, 80), seed=3, density=0.3),
    "topk-gqa": topk_spec(4, 2, 2, (16, 8)),
}
INTERSECTION_SPECS = {
    "block-and-chunk": intersection_spec(block_spec(2, 3, (8, 16), seed=4), chunk_spec(7, window=12)),
    "topk-and-causal": intersection_spec(topk_spec(4, 1, 3, (16, 16)), SINGLE_SPECS["causal"]),
    "full-and-causal": intersection_spec(SINGLE_SPECS["full"], SINGLE_SPECS["causal"]),
    "window-and-chunk-and-block": intersection_spec(
        chunk_spec(1, window=40), chunk_spec(39, sink=5), block_spec(1, 1, (32, 32), seed=5)
    ),
    "full-and-full": intersection_spec(SINGLE_SPECS["full"], SINGLE_SPECS["full"]),
}
SPECS = {**SINGLE_SPECS, **INTERSECTION_SPECS}
DENSE_LENGTHS = [(1, 1), (37, 45), (45, 37), (0, 5)]


@pytest.mark.parametrize("lengths", DENSE_LENGTHS, ids=str)
@pytest.mark.parametrize("name", SPECS)
def test_to_dense_matches_element_definition(name, lengths):
    lq, lk = lengths
    mask, element = SPECS[name](lq, lk)
    dense = mask.to_dense(lq, lk)
    batch, heads = mask.batch_heads
    assert dense.dtype == torch.bool and dense.shape == (batch, heads, lq, lk)
    assert torch.equal(dense, dense_by_loops(element, batch, heads, lq, lk))


@pytest.mark.parametrize("name", SPECS)
def test_dense_rows_are_rows_of_to_dense(name):
    mask, _ = SPECS[name](45, 37)
    dense = mask.to_dense(45, 37)
    for start, stop in ((0, 45), (3, 20), (16, 32), (44, 45), (10, 10)):
        assert torch.equal(mask.dense_rows(start, stop, 37), dense[:, :, start:stop])


@pytest.mark.parametrize("name", SPECS)
def test_density_is_the_dense_mean(name):
    mask, _ = SPECS[name](45, 37)
    expected = mask.to_dense(45, 37).double().mean().item()
    assert mask.density(45, 37) == pytest.approx(expected, abs=1e-12)
    assert mask.density(45, 37, rows_per_step=7) == pytest.approx(expected, abs=1e-12)
    assert mask.density(0, 37) == 0.0


# ------------------------------------------------------------------------------ schedules

SCHEDULE_LENGTHS = [(200, 333), (333, 77), (1, 1)]
TILES = [(64, 64), (128, 32), (16, 128)]


@pytest.mark.parametrize("lengths", SCHEDULE_LENGTHS, ids=str)
@pytest.mark.parametrize("name", SINGLE_SPECS)
def test_schedule_of_single_mask_is_exact(name, lengths):
    lq, lk = lengths
    mask, _ = SINGLE_SPECS[name](lq, lk)
    dense = mask.to_dense(lq, lk)
    for block_m, block_n in TILES:
        schedule = mask.schedule(lq, lk, block_m, block_n, "cpu")
        assert_schedule_equal(schedule, schedule_from_dense(dense, block_m, block_n), (name, lengths, block_m, block_n))


@pytest.mark.parametrize("lengths", SCHEDULE_LENGTHS, ids=str)
@pytest.mark.parametrize("name", INTERSECTION_SPECS)
def test_schedule_of_intersection_is_conservative(name, lengths):
    """Visits every tile holding an allowed pair; full exactly where the tile is full; a well-formed
    schedule (its lists are those of its own tile kinds)."""
    lq, lk = lengths
    mask, _ = INTERSECTION_SPECS[name](lq, lk)
    dense = mask.to_dense(lq, lk)
    for block_m, block_n in TILES:
        schedule = mask.schedule(lq, lk, block_m, block_n, "cpu")
        kinds = tile_kinds(schedule)
        exact = tile_kinds(schedule_from_dense(dense, block_m, block_n)).expand_as(kinds)
        context = (name, lengths, block_m, block_n)
        skipped = (kinds == TILE_EMPTY) & (exact != TILE_EMPTY)
        assert not skipped.any(), f"a tile with allowed pairs is skipped; {context}"
        assert torch.equal(kinds == TILE_FULL, exact == TILE_FULL), f"full flags differ; {context}"
        assert_schedule_equal(schedule, schedule_from_tile_kinds(kinds, block_m, block_n), context)


def test_intersection_schedule_is_exact_when_parts_align_with_tiles():
    """full & causal is causal; block masks on the tile grid intersect exactly."""
    schedule = (masks.full() & masks.causal()).schedule(200, 200, 64, 64, "cpu")
    assert_schedule_equal(schedule, masks.causal().schedule(200, 200, 64, 64, "cpu"), "full & causal")
    a, b = random_blocks((2, 1, 4, 4), seed=6), random_blocks((1, 3, 4, 4), seed=7)
    both = masks.block_sparse(a, 64) & masks.block_sparse(b, 64)
    assert_schedule_equal(both.schedule(200, 200, 64, 64, "cpu"), schedule_from_dense(both.to_dense(200, 200), 64, 64),
                          "aligned block masks")


def test_intersection_flattens_and_drops_full():
    causal, window = masks.causal(), masks.chunk_causal(1, window=8)
    blocks = masks.block_sparse(random_blocks((2, 1, 2, 2), seed=8), 64)
    nested = (causal & window) & (masks.full() & blocks)
    assert nested.terms() == [causal, window, blocks]
    assert nested.batch_heads == (2, 1)
    assert (masks.full() & causal).terms() == [causal]
    assert (masks.full() & masks.full()).terms() == []
    with pytest.raises(TypeError):
        causal & 3


def test_schedule_is_cached_per_shape_and_tile():
    mask = masks.chunk_causal(39, window=117)
    schedule = mask.schedule(300, 300, 64, 64, "cpu")
    assert mask.schedule(300, 300, 64, 64, torch.device("cpu")) is schedule
    assert mask.schedule(300, 300, 128, 64, "cpu") is not schedule
    assert mask.schedule(300, 301, 64, 64, "cpu") is not schedule
    intersection = mask & masks.block_sparse(random_blocks((1, 1, 3, 3), seed=9), 128)
    assert intersection.schedule(300, 300, 64, 64, "cpu") is intersection.schedule(300, 300, 64, 64, "cpu")


# ---------------------------------------------------------------------------- topk_blocks


@pytest.mark.parametrize("seed", range(6))
def test_topk_blocks_keeps_keep_blocks_per_query_block(seed):
    rng = random.Random(seed)
    lq, lk = rng.randint(1, 300), rng.randint(1, 300)
    block_size = (rng.choice([16, 48, 64]), rng.choice([16, 32, 100]))
    heads_kv = rng.choice([1, 2])
    q = torch.randn(2, 2 * heads_kv, lq, 8)
    k = torch.randn(2, heads_kv, lk, 8)
    n_kv_blocks = -(-lk // block_size[1])
    for keep in (1, 3, n_kv_blocks + 5):
        mask = masks.topk_blocks(q, k, keep, block_size)
        assert mask.block_mask.dtype == torch.bool
        assert mask.block_mask.shape == (2, 2 * heads_kv, -(-lq // block_size[0]), n_kv_blocks)
        assert (mask.block_mask.sum(-1) == min(keep, n_kv_blocks)).all()
        mask.check_shape(2, 2 * heads_kv, lq, lk)


def test_topk_blocks_picks_the_best_scoring_key_block_per_gqa_head():
    """Query block i of query head h is aligned with one key block of key head h // 2 and orthogonal
    to the others, so keep = 1 must pick exactly that block."""
    block, n_blocks, dim = 8, 5, 8
    eye = torch.eye(dim)
    # Key head g, block j: every token is e_{(j + g) % dim}.
    k = torch.stack([eye[[(j + g) % dim for j in range(n_blocks)]].repeat_interleave(block, 0) for g in range(2)])
    target = torch.tensor([[3, 0, 4, 1, 2], [1, 1, 0, 4, 3], [2, 4, 4, 0, 1], [0, 3, 1, 2, 2]])  # [Hq, query block]
    # Query head h, block i: every token is 10 e_d with d the direction of key block target[h, i].
    q = torch.stack([
        10 * eye[[(target[h, i].item() + h // 2) % dim for i in range(n_blocks)]].repeat_interleave(block, 0)
        for h in range(4)
    ])
    mask = masks.topk_blocks(q[None], k[None], 1, block)
    assert torch.equal(mask.block_mask[0].long().argmax(-1), target)
    assert (mask.block_mask.sum(-1) == 1).all()


def test_topk_blocks_averages_a_ragged_tail_over_its_tokens():
    """The last key block holds 3 tokens of 0.9 e_0; block 0 holds 16 tokens of 0.5 e_0. Its mean
    (0.9) wins; dividing its sum by the block size (0.17) would lose."""
    k = torch.zeros(1, 1, 35, 4)
    k[0, 0, :16, 0] = 0.5
    k[0, 0, 32:, 0] = 0.9
    q = torch.zeros(1, 1, 16, 4)
    q[..., 0] = 1.0
    mask = masks.topk_blocks(q, k, 1, 16)
    assert mask.block_mask.tolist() == [[[[False, False, True]]]]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "build, error, match",
    [
        (lambda: masks.chunk_causal(0), ValueError, "chunk_size"),
        (lambda: masks.chunk_causal(4, window=0), ValueError, "window"),
        (lambda: masks.chunk_causal(4, sink=-1), ValueError, "sink"),
        (lambda: masks.chunk_causal(4, q_offset=-1), ValueError, "q_offset"),
        (lambda: masks.chunk_causal(4, kv_offset=-2), ValueError, "kv_offset"),
        (lambda: masks.block_sparse(torch.ones(1, 1, 2, 2), 64), TypeError, "block_mask must be a bool tensor"),
        (lambda: masks.block_sparse([[True]], 64), TypeError, "block_mask must be a bool tensor"),
        (lambda: masks.block_sparse(torch.ones(1, 2, 2, dtype=torch.bool), 64), ValueError, "block_mask.*rank 4"),
        (lambda: masks.block_sparse(torch.ones(1, 1, 2, 2, dtype=torch.bool), (0, 64)), ValueError, "block_size"),
        (lambda: masks.topk_blocks(torch.randn(1, 3, 8, 4), torch.randn(1, 2, 8, 4), 1, 4), ValueError, "heads"),
        (lambda: masks.topk_blocks(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 5), 1, 4), ValueError, "topk_blocks"),
        (lambda: masks.topk_blocks(torch.randn(2, 8, 4), torch.randn(2, 8, 4), 1, 4), ValueError, "topk_blocks"),
        (lambda: masks.topk_blocks(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 0, 4), ValueError, "keep"),
    ],
)
def test_mask_constructors_reject_bad_arguments(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_check_shape_rejects_masks_built_for_other_shapes():
    blocks = masks.block_sparse(torch.ones(2, 3, 4, 2, dtype=torch.bool), (64, 128))
    blocks.check_shape(2, 3, 200, 256)
    blocks.check_shape(2, 3, 256, 129)
    with pytest.raises(ValueError, match=r"block_mask.*lq = 257, lk = 256.*5 x 2"):
        blocks.check_shape(2, 3, 257, 256)
    with pytest.raises(ValueError, match=r"lk = 257"):
        blocks.check_shape(2, 3, 200, 257)
    with pytest.raises(ValueError, match="batch 2 and heads 3.*batch 4"):
        blocks.check_shape(4, 3, 200, 256)
    with pytest.raises(ValueError, match="heads 6"):
        blocks.check_shape(2, 6, 200, 256)
    shared = masks.block_sparse(torch.ones(1, 1, 4, 2, dtype=torch.bool), (64, 128))
    shared.check_shape(5, 7, 200, 256)  # a shared mask broadcasts over any batch and heads
    with pytest.raises(ValueError, match="block_mask"):
        (masks.causal() & blocks).check_shape(2, 3, 300, 256)  # an intersection checks every part
