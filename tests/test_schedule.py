"""Tile-schedule builders against the dense mask definition, by brute force.

For every configuration the op's schedule must equal the schedule pooled from the dense mask (a tile
is listed iff it holds an allowed in-bounds pair, flagged full iff all its in-bounds pairs are
allowed, ascending, -1 padding), and the listed tiles must cover every allowed pair exactly once.
"""

import random
import sys

import pytest
import torch

from fastdistill import block_mask_schedule, chunk_causal_schedule
from fastdistill.refs.masks import block_mask_dense, chunk_causal_dense
from fastdistill.refs.schedule import schedule_from_dense

TILES = (16, 32, 64, 128)
FIELDS = ("kv_count", "kv_index", "kv_full", "q_count", "q_index", "q_full")


def assert_schedule_equal(actual, expected, context):
    for field in FIELDS:
        a, e = getattr(actual, field).cpu(), getattr(expected, field)
        assert a.shape == e.shape and a.dtype == e.dtype, f"{field}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}; {context}"
        assert torch.equal(a, e), f"{field} differs; {context}"


def assert_covers_allowed_pairs_once(schedule, dense):
    """Every allowed pair lies in exactly one listed tile; no listed tile lacks an allowed pair."""
    if dense.dim() == 2:
        dense = dense[None, None]
    bm, hm, lq, lk = dense.shape
    nq, nk = schedule.kv_count.shape[-1], schedule.q_count.shape[-1]
    visits = torch.zeros(bm, hm, nq, nk, dtype=torch.int64)
    index = schedule.kv_index.cpu().long()
    listed = index >= 0
    visits.scatter_add_(-1, index.clamp(min=0), listed.long())  # duplicates would count twice
    coverage = visits.repeat_interleave(schedule.block_m, 2)[:, :, :lq].repeat_interleave(schedule.block_n, 3)
    coverage = coverage[:, :, :, :lk]
    assert (coverage[dense] == 1).all(), "an allowed pair is not covered exactly once"
    tiles_with_pairs = torch.zeros(bm, hm, nq, nk, dtype=torch.bool)
    rows, cols = torch.arange(lq) // schedule.block_m, torch.arange(lk) // schedule.block_n
    tiles_with_pairs.index_put_(
        (torch.arange(bm)[:, None, None, None], torch.arange(hm)[None, :, None, None], rows[:, None], cols[None, :]),
        dense,
        accumulate=True,
    )
    assert not (visits.bool() & ~tiles_with_pairs).any(), "a listed tile holds no allowed pair"
    assert (schedule.kv_count == listed.sum(-1)).all()


def random_chunk_causal_config(rng):
    lq, lk = rng.randint(1, 600), rng.randint(1, 600)
    chunk = rng.choice([1, rng.randint(2, 64), rng.randint(40, 400), 1560 // rng.choice([4, 8, 12])])
    window = None if rng.random() < 0.35 else rng.randint(1, 3 * max(chunk, 8) + 200)
    sink = 0 if rng.random() < 0.4 else rng.randint(1, 150)
    q_offset = 0 if rng.random() < 0.3 else rng.randint(0, 700)
    kv_offset = 0 if rng.random() < 0.5 else rng.randint(0, q_offset + 50)
    return dict(lq=lq, lk=lk, block_m=rng.choice(TILES), block_n=rng.choice(TILES), chunk_size=chunk,
                window=window, sink=sink, q_offset=q_offset, kv_offset=kv_offset)


CHUNK_CAUSAL_CONFIGS = [random_chunk_causal_config(random.Random(seed)) for seed in range(240)] + [
    # causal top-left and bottom-right, sliding window, Self-Forcing-like chunks with sink, empty rows
    dict(lq=200, lk=200, block_m=64, block_n=64, chunk_size=1, window=None, sink=0, q_offset=0, kv_offset=0),
    dict(lq=77, lk=333, block_m=32, block_n=64, chunk_size=1, window=None, sink=0, q_offset=256, kv_offset=0),
    dict(lq=333, lk=333, block_m=128, block_n=32, chunk_size=1, window=100, sink=0, q_offset=0, kv_offset=0),
    dict(lq=585, lk=585, block_m=128, block_n=64, chunk_size=39, window=117, sink=39, q_offset=0, kv_offset=0),
    dict(lq=39, lk=156, block_m=64, block_n=128, chunk_size=39, window=117, sink=39, q_offset=195, kv_offset=78),
    dict(lq=50, lk=50, block_m=16, block_n=16, chunk_size=10, window=3, sink=0, q_offset=0, kv_offset=0),
    dict(lq=1, lk=1, block_m=128, block_n=128, chunk_size=7, window=None, sink=0, q_offset=0, kv_offset=0),
    dict(lq=64, lk=64, block_m=16, block_n=16, chunk_size=16, window=None, sink=0, q_offset=0, kv_offset=100),
]


@pytest.mark.parametrize("config", CHUNK_CAUSAL_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_chunk_causal_schedule_matches_dense_definition(config):
    c = dict(config)
    lq, lk, block_m, block_n = c.pop("lq"), c.pop("lk"), c.pop("block_m"), c.pop("block_n")
    chunk_size = c.pop("chunk_size")
    dense = chunk_causal_dense(lq, lk, chunk_size, **c)
    schedule = chunk_causal_schedule(lq, lk, block_m, block_n, chunk_size, **c)
    assert_schedule_equal(schedule, schedule_from_dense(dense, block_m, block_n), config)
    assert_covers_allowed_pairs_once(schedule, dense)


def test_chunk_causal_schedule_configs_exercise_every_feature():
    """The random configurations cover windows, sinks, offsets and ragged tails (guards the generator)."""
    configs = CHUNK_CAUSAL_CONFIGS
    assert len(configs) >= 200
    assert sum(c["window"] is not None for c in configs) >= 100
    assert sum(c["sink"] > 0 for c in configs) >= 100
    assert sum(c["q_offset"] > 0 and c["kv_offset"] > 0 for c in configs) >= 40
    assert sum(c["lq"] % c["block_m"] and c["lk"] % c["block_n"] for c in configs) >= 150
    partial_and_full = 0
    for c in configs[:40]:
        s = chunk_causal_schedule(**c)
        n_full = int(s.kv_full.sum())
        partial_and_full += n_full > 0 and int(s.kv_count.sum()) > n_full
    assert partial_and_full >= 10


def random_block_mask_config(rng):
    lq, lk = rng.randint(1, 500), rng.randint(1, 500)
    mask_block = (rng.choice([16, 32, 48, 64, 100, 128]), rng.choice([16, 32, 64, 80, 128]))
    shape = (rng.choice([1, 2]), rng.choice([1, 3]), -(-lq // mask_block[0]), -(-lk // mask_block[1]))
    return dict(lq=lq, lk=lk, block_m=rng.choice(TILES), block_n=rng.choice(TILES), mask_block=mask_block,
                shape=shape, density=rng.choice([0.1, 0.5, 0.9]), seed=rng.randint(0, 2**31))


BLOCK_MASK_CONFIGS = [random_block_mask_config(random.Random(1000 + seed)) for seed in range(80)]


@pytest.mark.parametrize("config", BLOCK_MASK_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_block_mask_schedule_matches_dense_definition(config):
    generator = torch.Generator().manual_seed(config["seed"])
    block_mask = torch.rand(config["shape"], generator=generator) < config["density"]
    lq, lk, mask_block = config["lq"], config["lk"], config["mask_block"]
    dense = block_mask_dense(block_mask, lq, lk, mask_block)
    schedule = block_mask_schedule(block_mask, lq, lk, config["block_m"], config["block_n"], mask_block)
    assert_schedule_equal(schedule, schedule_from_dense(dense, config["block_m"], config["block_n"]), config)
    assert_covers_allowed_pairs_once(schedule, dense)


def test_block_mask_schedule_reads_broadcast_and_transposed_masks():
    base = torch.rand(1, 1, 5, 7) < 0.5
    expanded = base.expand(2, 3, 5, 7)  # stride 0 in batch and heads
    transposed = (torch.rand(2, 3, 7, 5) < 0.5).transpose(2, 3)
    for block_mask in (expanded, transposed):
        schedule = block_mask_schedule(block_mask, 300, 440, 64, 32, (64, 64))
        expected = block_mask_schedule(block_mask.contiguous(), 300, 440, 64, 32, (64, 64))
        assert_schedule_equal(schedule, expected, "strided block mask")


def test_schedule_with_empty_sequence():
    schedule = chunk_causal_schedule(0, 10, 16, 16, 4)
    assert schedule.kv_index.shape == (1, 1, 0, 1) and schedule.q_index.shape == (1, 1, 1, 0)
    assert schedule.q_count.tolist() == [[[0]]]


def test_chunk_causal_schedule_with_huge_window_equals_no_window():
    """A window past position 0 restricts nothing (and must not overflow in the classifier)."""
    for window in (10**6, sys.maxsize):
        huge = chunk_causal_schedule(100, 100, 16, 16, 8, window=window, sink=3, q_offset=40)
        assert_schedule_equal(huge, chunk_causal_schedule(100, 100, 16, 16, 8, sink=3, q_offset=40), window)


def test_schedule_on_meta_device_has_the_output_shapes():
    schedule = chunk_causal_schedule(300, 500, 128, 64, 39, window=117, device="meta")
    assert schedule.kv_index.shape == (1, 1, 3, 8) and schedule.q_full.shape == (1, 1, 8, 3)
    schedule = block_mask_schedule(torch.zeros(2, 1, 3, 4, dtype=torch.bool, device="meta"), 300, 500, 64, 64,
                                   (128, 128))
    assert schedule.kv_index.shape == (2, 1, 5, 8)


def test_schedule_opcheck():
    torch.library.opcheck(
        torch.ops.fastdistill.schedule_chunk_causal.default, (300, 500, 128, 64, 39, 117, 10, 5, 0, torch.device("cpu"))
    )
    torch.library.opcheck(
        torch.ops.fastdistill.schedule_chunk_causal.default, (77, 77, 32, 32, 1, None, 0, 0, 0, torch.device("cpu"))
    )
    block_mask = torch.rand(2, 3, 3, 4) < 0.5
    torch.library.opcheck(torch.ops.fastdistill.schedule_block_mask.default, (block_mask, 300, 500, 64, 128, 128, 128))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(chunk_size=0), "chunk_size must be >= 1"),
        (dict(window=0), "window must be None or >= 1"),
        (dict(sink=-1), "sink must be >= 0"),
        (dict(q_offset=-3), "q_offset and kv_offset must be >= 0"),
        (dict(block_m=0), "block_m and block_n must be >= 1"),
        (dict(lq=-1), "lq and lk must be >= 0"),
        (dict(q_offset=2**62), "positions must stay below 2"),
        (dict(kv_offset=2**62 - 5), "positions must stay below 2"),
    ],
)
def test_chunk_causal_schedule_rejects_bad_parameters(kwargs, match):
    args = dict(lq=10, lk=10, block_m=16, block_n=16, chunk_size=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        chunk_causal_schedule(**args)


def test_block_mask_schedule_rejects_bad_input():
    with pytest.raises(TypeError, match="block_mask must be a bool tensor"):
        block_mask_schedule(torch.ones(1, 1, 2, 2), 100, 100, 64, 64, (64, 64))
    with pytest.raises(ValueError, match="rank 4"):
        block_mask_schedule(torch.ones(2, 2, dtype=torch.bool), 100, 100, 64, 64, (64, 64))
    with pytest.raises(ValueError, match=r"ceil\(lq / mask_block_q\) = 2 rows"):
        block_mask_schedule(torch.ones(1, 1, 3, 2, dtype=torch.bool), 100, 100, 64, 64, (64, 64))
    with pytest.raises(ValueError, match="mask_block_q and mask_block_k must be >= 1"):
        block_mask_schedule(torch.ones(1, 1, 3, 2, dtype=torch.bool), 100, 100, 64, 64, (0, 64))


# -------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_schedules_cuda_match_cpu():
    for config in CHUNK_CAUSAL_CONFIGS:
        gpu = chunk_causal_schedule(**config, device="cuda")
        assert_schedule_equal(gpu, chunk_causal_schedule(**config), config)
    for config in BLOCK_MASK_CONFIGS:
        generator = torch.Generator().manual_seed(config["seed"])
        block_mask = torch.rand(config["shape"], generator=generator) < config["density"]
        args = (config["lq"], config["lk"], config["block_m"], config["block_n"], config["mask_block"])
        gpu = block_mask_schedule(block_mask.cuda(), *args)
        assert gpu.kv_index.device.type == "cuda"
        assert_schedule_equal(gpu, block_mask_schedule(block_mask, *args), config)


@pytest.mark.gpu
def test_schedule_wan_training_mask_on_cuda():
    """Self-Forcing training mask at Wan scale: L = 32,760, chunk 4,680, 128 x 128 tiles."""
    length = 32760
    gpu = chunk_causal_schedule(length, length, 128, 128, 4680, device="cuda")
    cpu = chunk_causal_schedule(length, length, 128, 128, 4680)
    assert_schedule_equal(gpu, cpu, "wan chunk-causal")
    n_tiles = gpu.kv_count.shape[-1] * gpu.q_count.shape[-1]
    visited = int(cpu.kv_count.sum())
    partial = visited - int(cpu.kv_full.sum())
    assert abs(visited / n_tiles - 0.575) < 0.01  # the workload note's 57.5% of tiles visited
    assert partial / visited < 0.03  # only tiles cut by a chunk boundary are partial (1.2% here)
