"""kv_write: fused RoPE + ring-buffer write against the rotate-then-index_copy reference."""

import pytest
import torch

from fastdistill import RopeSpec, kv_write, rope_tables
from fastdistill.refs.kvcache import kv_write_reference
from fastdistill.refs.rope import rope_reference
from fastdistill.testing import assert_error_within

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def make_cache(b, h, slots, d, dv, dtype, device="cpu", bshd=False):
    """Random (not zero) caches, so a write to the wrong slot or a missed slot shows."""
    if bshd:  # the layout public streaming code keeps: [B, S, H, D], viewed as BHSD
        k = torch.randn(b, slots, h, d, dtype=torch.float64).to(device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(b, slots, h, dv, dtype=torch.float64).to(device=device, dtype=dtype).transpose(1, 2)
        return k, v
    k = torch.randn(b, h, slots, d, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(b, h, slots, dv, dtype=torch.float64).to(device=device, dtype=dtype)
    return k, v


def make_tokens(b, h, n, d, dv, dtype, device="cpu"):
    k = torch.randn(b, h, n, d, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(b, h, n, dv, dtype=torch.float64).to(device=device, dtype=dtype)
    return k, v


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rotate", [True, False])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("start", [0, 21, 40, 123, -5])
@pytest.mark.parametrize("bshd", [False, True])
def test_kv_write_matches_reference(dtype, rotate, interleaved, start, bshd):
    b, h, slots, n, d, dv = 2, 3, 50, 17, 64, 40
    cache_k, cache_v = make_cache(b, h, slots, d, dv, dtype, bshd=bshd)
    k, v = make_tokens(b, h, n, d, dv, dtype)
    cos, sin = rope_tables(RopeSpec(d), n, start=start) if rotate else (None, None)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    kv_write_reference(expected_k, expected_v, k, v, start, cos, sin, interleaved)
    kv_write(cache_k, cache_v, k, v, start, cos, sin, interleaved=interleaved)

    slots_written = torch.remainder(torch.arange(start, start + n), slots)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[slots_written] = False
    # v is copied and k is copied when not rotated: bit-exact; other slots are never touched.
    torch.testing.assert_close(cache_v, expected_v, rtol=0, atol=0)
    torch.testing.assert_close(cache_k[:, :, untouched], expected_k[:, :, untouched], rtol=0, atol=0)
    if not rotate:
        torch.testing.assert_close(cache_k, expected_k, rtol=0, atol=0)
    else:
        exact = rope_reference(k.double(), cos.double(), sin.double(), interleaved)
        torch_same_dtype = rope_reference(k, cos.to(dtype), sin.to(dtype), interleaved)
        assert_error_within(cache_k[:, :, slots_written], exact, torch_same_dtype, name="rotated k")


def test_kv_write_ring_wraps_over_many_steps():
    """Chunks of 13 tokens into a 40-slot ring for 12 steps: the ring holds the last 40 tokens."""
    b, h, slots, n, d = 1, 2, 40, 13, 8
    spec = RopeSpec(d)
    cache_k, cache_v = make_cache(b, h, slots, d, d, torch.float32)
    all_k, all_v = [], []
    for step in range(12):
        k, v = make_tokens(b, h, n, d, d, torch.float32)
        cos, sin = rope_tables(spec, n, start=step * n)
        kv_write(cache_k, cache_v, k, v, torch.tensor(step * n), cos, sin)
        all_k.append(rope_reference(k.double(), cos.double(), sin.double()))
        all_v.append(v)
    total = 12 * n
    history_k, history_v = torch.cat(all_k, dim=2), torch.cat(all_v, dim=2)
    for pos in range(total - slots, total):
        torch.testing.assert_close(cache_k[:, :, pos % slots].double(), history_k[:, :, pos], rtol=0, atol=1e-6)
        torch.testing.assert_close(cache_v[:, :, pos % slots], history_v[:, :, pos], rtol=0, atol=0)


@pytest.mark.parametrize("start", [torch.tensor(45, dtype=torch.int32), torch.tensor([45]), 45])
def test_kv_write_start_forms(start):
    cache_k, cache_v = make_cache(1, 1, 50, 6, 6, torch.float32)
    k, v = make_tokens(1, 1, 9, 6, 6, torch.float32)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    kv_write_reference(expected_k, expected_v, k, v, 45)
    kv_write(cache_k, cache_v, k, v, start)
    torch.testing.assert_close(cache_k, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(cache_v, expected_v, rtol=0, atol=0)


def test_kv_write_odd_head_dim_without_rope():
    cache_k, cache_v = make_cache(2, 1, 11, 7, 5, torch.float16)
    k, v = make_tokens(2, 1, 4, 7, 5, torch.float16)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    kv_write_reference(expected_k, expected_v, k, v, 9)
    kv_write(cache_k, cache_v, k, v, 9)
    torch.testing.assert_close(cache_k, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(cache_v, expected_v, rtol=0, atol=0)


@pytest.mark.parametrize("rotate", [True, False])
def test_kv_write_opcheck(rotate):
    cache_k, cache_v = make_cache(1, 2, 10, 8, 4, torch.float32)
    k, v = make_tokens(1, 2, 6, 8, 4, torch.float32)
    cos, sin = rope_tables(RopeSpec(8), 6, start=7) if rotate else (None, None)
    torch.library.opcheck(
        torch.ops.fastdistill.kv_write.default, (cache_k, cache_v, k, v, torch.tensor(7), cos, sin, True)
    )


def test_kv_write_compiles_with_mutation():
    """Under torch.compile (fullgraph) the in-place write lands in the caller's buffers."""
    cache_k, cache_v = make_cache(1, 2, 10, 8, 8, torch.float32)
    k, v = make_tokens(1, 2, 4, 8, 8, torch.float32)
    cos, sin = rope_tables(RopeSpec(8), 4, start=8)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    kv_write_reference(expected_k, expected_v, k * 2, v, 8, cos, sin)

    @torch.compile(fullgraph=True)
    def step(cache_k, cache_v, k, v, start):
        kv_write(cache_k, cache_v, k * 2, v, start, cos, sin)
        return cache_k.sum()

    total = step(cache_k, cache_v, k, v, torch.tensor(8))
    torch.testing.assert_close(cache_k, expected_k, rtol=0, atol=1e-6)
    torch.testing.assert_close(cache_v, expected_v, rtol=0, atol=0)
    torch.testing.assert_close(total, expected_k.sum(), rtol=1e-6, atol=1e-5)


def _bad_call(**overrides):
    args = dict(
        cache_k=torch.zeros(1, 2, 10, 8),
        cache_v=torch.zeros(1, 2, 10, 8),
        k=torch.zeros(1, 2, 4, 8),
        v=torch.zeros(1, 2, 4, 8),
        start=0,
        cos=None,
        sin=None,
    )
    args.update(overrides)
    kv_write(**args)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(cache_k=torch.zeros(2, 10, 8)), ValueError, r"cache_k must be \[B, H, S, D\]"),
        (dict(k=torch.zeros(1, 2, 4, 6)), ValueError, "k must be"),
        (dict(k=torch.zeros(1, 3, 4, 8)), ValueError, "k must be"),
        (dict(v=torch.zeros(1, 2, 5, 8)), ValueError, "v must be"),
        (dict(cache_v=torch.zeros(1, 2, 9, 8)), ValueError, "cache_v must match cache_k"),
        (dict(k=torch.zeros(1, 2, 11, 8), v=torch.zeros(1, 2, 11, 8)), ValueError, "cannot write n = 11"),
        (dict(k=torch.zeros(1, 2, 4, 8, dtype=torch.float16)), TypeError, "cache_k and k must have the same dtype"),
        (dict(cache_v=torch.zeros(1, 2, 10, 8, dtype=torch.float64)), TypeError, "cache_k and cache_v"),
        (dict(start=1.5), TypeError, "start must be an int"),
        (dict(start=torch.tensor(1.0)), TypeError, "start must be an int32 or int64"),
        (dict(start=torch.tensor([1, 2])), ValueError, "start must hold one position"),
        (dict(cos=torch.zeros(4, 4)), ValueError, "both cos and sin"),
        (dict(cos=torch.zeros(3, 4), sin=torch.zeros(3, 4)), ValueError, "cos must be"),
        (
            dict(cache_k=torch.zeros(1, 2, 10, 7), k=torch.zeros(1, 2, 4, 7), cos=torch.zeros(4, 3),
                 sin=torch.zeros(4, 3)),
            ValueError,
            "must be even",
        ),
    ],
)
def test_kv_write_rejects_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad_call(**overrides)


def test_kv_write_rejects_mixed_devices():
    with pytest.raises(ValueError, match="cache_k and k must be on the same device"):
        _bad_call(cache_k=torch.zeros(1, 2, 10, 8, device="meta"), cache_v=torch.zeros(1, 2, 10, 8, device="meta"))
    with pytest.raises(ValueError, match="start must be on the cache's device"):
        _bad_call(start=torch.tensor(0, device="meta"))


def test_kv_write_rejects_overlapping_buffers():
    cache = torch.zeros(1, 2, 10, 8)
    with pytest.raises(ValueError, match="cache_k and cache_v overlap"):
        _bad_call(cache_k=cache, cache_v=cache)
    buffer = torch.zeros(2 * 10 * 8 + 32)
    with pytest.raises(ValueError, match="cache_k and k overlap"):  # dense views, partly the same memory
        _bad_call(cache_k=buffer[:160].view(1, 2, 10, 8), k=buffer[128:].view(1, 2, 4, 8))
    with pytest.raises(ValueError, match="share memory"):
        _bad_call(cache_v=torch.zeros(1, 2, 1, 8).expand(1, 2, 10, 8))


def test_kv_write_refuses_to_drop_gradients():
    with pytest.raises(ValueError, match="must not require grad"):
        _bad_call(k=torch.zeros(1, 2, 4, 8, requires_grad=True))
    with torch.no_grad():
        _bad_call(k=torch.zeros(1, 2, 4, 8, requires_grad=True))


def test_kv_write_accepts_integer_like_start():
    import numpy as np

    cache_k, cache_v = make_cache(1, 1, 12, 4, 4, torch.float32)
    k, v = make_tokens(1, 1, 3, 4, 4, torch.float32)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    kv_write_reference(expected_k, expected_v, k, v, 11)
    kv_write(cache_k, cache_v, k, v, np.int64(11))
    torch.testing.assert_close(cache_k, expected_k, rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start_kind", ["int", "cpu_tensor", "cuda_int32", "cuda_int64"])
@pytest.mark.parametrize("start_choice", ["wraps", "negative", "past_ring"])
def test_kv_write_cuda_matches_cpu(dtype, start_kind, start_choice):
    b, h, slots, n, d = 1, 12, 18720, 4680, 128
    start = {"wraps": slots - n // 2, "negative": -7, "past_ring": 3 * slots + 5}[start_choice]
    start_arg = {
        "int": start,
        "cpu_tensor": torch.tensor(start),
        "cuda_int32": torch.tensor(start, dtype=torch.int32, device="cuda"),
        "cuda_int64": torch.tensor(start, device="cuda"),
    }[start_kind]
    cache_k, cache_v = make_cache(b, h, slots, d, d, dtype, bshd=True)
    k, v = make_tokens(b, h, n, d, d, dtype)
    cos, sin = rope_tables(RopeSpec(d), n, start=start)
    gpu_k, gpu_v = cache_k.cuda(), cache_v.cuda()
    kv_write(cache_k, cache_v, k, v, start, cos, sin)
    kv_write(gpu_k, gpu_v, k.cuda(), v.cuda(), start_arg, cos.cuda(), sin.cuda())
    torch.testing.assert_close(gpu_v.cpu(), cache_v, rtol=0, atol=0)
    written = torch.remainder(torch.arange(start, start + n), slots)
    exact = rope_reference(k.double(), cos.double(), sin.double())
    assert_error_within(gpu_k.cpu()[:, :, written], exact, cache_k[:, :, written], name="rotated k")


@pytest.mark.gpu
def test_kv_write_cuda_graph_advances_device_start():
    """A captured write replays with a start position advanced in place on the device."""
    b, h, slots, n, d = 1, 2, 64, 16, 32
    cache_k, cache_v = make_cache(b, h, slots, d, d, torch.float16, device="cuda")
    k, v = make_tokens(b, h, n, d, d, torch.float16, device="cuda")
    start = torch.zeros((), dtype=torch.int64, device="cuda")
    kv_write(cache_k, cache_v, k, v, start)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kv_write(cache_k, cache_v, k, v, start)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    for step in range(1, 7):
        start.fill_(step * n)
        k.normal_()
        v.normal_()
        graph.replay()
        kv_write_reference(expected_k, expected_v, k, v, step * n)
    torch.cuda.synchronize()
    torch.testing.assert_close(cache_k, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(cache_v, expected_v, rtol=0, atol=0)


@pytest.mark.gpu
def test_kv_write_cuda_rejects_mixed_devices():
    with pytest.raises(ValueError, match="same device"):
        _bad_call(cache_k=torch.zeros(1, 2, 10, 8, device="cuda"))
    with pytest.raises(ValueError, match="start must be on the cache's device"):
        kv_write(torch.zeros(1, 2, 10, 8), torch.zeros(1, 2, 10, 8), torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8),
                 torch.tensor(0, device="cuda"))
