"""RollingKVCache: streaming chunk-causal attention over ring buffers (DESIGN.md section 5).

Oracles: an independent float64 dense attention over the concatenated sequence with the chunk-causal
predicate written out here, and the copy-and-concatenate ReferenceKVCache of refs/kvcache.py.
Backends: the PyTorch reference (float64 and fp32) and the Triton kernels under the interpreter.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
import torch

from fastdistill import RollingKVCache, RopeSpec, rope_tables
from fastdistill.refs.kvcache import ReferenceKVCache
from fastdistill.refs.rope import rope_reference
from fastdistill.testing import CopyCounter, assert_error_within


@dataclass(frozen=True)
class Setup:
    name: str
    chunk: int
    window: int
    sink: int
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 16
    batch: int = 2
    layers: int = 2
    rope: RopeSpec | None = None

    def cache(self, cls=RollingKVCache, dtype=torch.float64, **kwargs):
        return cls(self.layers, self.batch, self.heads_kv, self.head_dim, chunk_tokens=self.chunk,
                   window_tokens=self.window, sink_tokens=self.sink, rope=self.rope, dtype=dtype, device="cpu",
                   **kwargs)


SETUPS = [
    Setup("odd39-3chunks-per-window-sink39", 39, 117, 39, rope=RopeSpec(16)),
    Setup("odd39-window100-sink50-straddles", 39, 100, 50, rope=RopeSpec(16, layout="half")),
    Setup("no-sink-mha", 32, 64, 0, heads_q=2, heads_kv=2),
    Setup("window-equals-chunk-mqa", 24, 24, 8, heads_q=4, heads_kv=1, rope=RopeSpec(16)),
    Setup("video-3d-rope", 12, 36, 12, rope=RopeSpec(16, grid=(1, 2, 3), sections=(4, 2, 2))),
]


def rotate(setup: Setup, x: torch.Tensor, start: int) -> torch.Tensor:
    """x [B, H, L, D] rotated at absolute positions start.. (float64 tables), in float64."""
    x = x.double()
    if setup.rope is None:
        return x
    cos, sin = rope_tables(setup.rope, start + x.shape[2], dtype=torch.float64)
    return rope_reference(x, cos[start:], sin[start:], setup.rope.interleaved)


def allowed_pairs(setup: Setup, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The chunk-causal predicate of DESIGN.md section 4, written out: [Lq, Lk] bool."""
    end = (q_pos // setup.chunk + 1) * setup.chunk
    pk = k_pos[None, :]
    in_window = (pk < end[:, None]) & (pk >= end[:, None] - setup.window)
    return in_window | (pk < setup.sink)


def dense_attention(q, k, v, allowed):
    """float64 softmax attention; GQA by repeating key heads; allowed [Lq, Lk]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def chunk_inputs(setup: Setup, dtype, generator):
    """One (q, k, v) per layer for a chunk."""
    def rand(heads):
        return torch.randn(setup.batch, heads, setup.chunk, setup.head_dim, generator=generator, dtype=torch.float64).to(dtype)

    return [(rand(setup.heads_q), rand(setup.heads_kv), rand(setup.heads_kv)) for _ in range(setup.layers)]


def run_rollout(setup: Setup, cache, chunks: int, passes: int, dtype, seed: int = 0):
    """Roll `chunks` chunks with `passes` attends per chunk (the last one is the committed context
    pass). Returns per chunk the list of passes, each a list over layers of (q, k, v, out)."""
    generator = torch.Generator().manual_seed(seed)
    record = []
    for _ in range(chunks):
        chunk_passes = []
        for _ in range(passes):
            layer_results = []
            for layer, (q, k, v) in enumerate(chunk_inputs(setup, dtype, generator)):
                layer_results.append((q, k, v, cache.attend(layer, q, k, v)))
            chunk_passes.append(layer_results)
        cache.commit()
        record.append(chunk_passes)
    return record


def oracle_outputs(setup: Setup, record):
    """float64 outputs of every pass by the definition: attention over the committed chunks (their
    context-pass k, v) plus the pass's own k, v, with the chunk-causal mask at q_offset = chunk start."""
    outs = []
    history = [([], []) for _ in range(setup.layers)]
    for c, chunk_passes in enumerate(record):
        pos, end = c * setup.chunk, (c + 1) * setup.chunk
        mask = allowed_pairs(setup, torch.arange(pos, end), torch.arange(end))
        chunk_outs = []
        for layer_results in chunk_passes:
            row = []
            for layer, (q, k, v, _) in enumerate(layer_results):
                keys = torch.cat(history[layer][0] + [rotate(setup, k, pos)], 2)
                values = torch.cat(history[layer][1] + [v.double()], 2)
                row.append(dense_attention(rotate(setup, q, pos), keys, values, mask))
            chunk_outs.append(row)
        for layer, (_, k, v, _) in enumerate(chunk_passes[-1]):
            history[layer][0].append(rotate(setup, k, pos))
            history[layer][1].append(v.double())
        outs.append(chunk_outs)
    return outs


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")


# --------------------------------------------------------------------------------- forward semantics
@pytest.mark.parametrize("setup", SETUPS, ids=lambda s: s.name)
def test_reference_backend_matches_definition_float64(setup):
    chunks = 3 + -(-(setup.sink + setup.window) // setup.chunk)  # fill, then evict past the window
    record = run_rollout(setup, setup.cache(), chunks, passes=3, dtype=torch.float64)
    for c, (got, want) in enumerate(zip(record, oracle_outputs(setup, record))):
        for p, (layers_got, layers_want) in enumerate(zip(got, want)):
            for layer, (result, expected) in enumerate(zip(layers_got, layers_want)):
                torch.testing.assert_close(result[3], expected, atol=1e-12, rtol=1e-12,
                                           msg=f"chunk {c} pass {p} layer {layer}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_forty_chunks_with_sink_equal_full_chunk_causal_attention(backend, monkeypatch):
    """45 chunks with a one-chunk sink: the logical sequence is 15x the window. Every context-pass
    output equals the rows of chunk-causal attention over the whole concatenated sequence."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", backend)
    setup = Setup("long", chunk=24, window=72, sink=24, heads_q=2, heads_kv=1, head_dim=16, batch=1, layers=1,
                  rope=RopeSpec(16))
    dtype = torch.float64 if backend == "reference" else torch.float32
    chunks = 45
    record = run_rollout(setup, setup.cache(dtype=dtype), chunks, passes=2, dtype=dtype)
    n = chunks * setup.chunk
    assert n >= 15 * setup.window
    q = torch.cat([chunk_passes[-1][0][0] for chunk_passes in record], 2)
    k = torch.cat([chunk_passes[-1][0][1] for chunk_passes in record], 2)
    v = torch.cat([chunk_passes[-1][0][2] for chunk_passes in record], 2)
    positions = torch.arange(n)
    full = dense_attention(rotate(setup, q, 0), rotate(setup, k, 0), v.double(), allowed_pairs(setup, positions, positions))
    got = torch.cat([chunk_passes[-1][0][3] for chunk_passes in record], 2)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), full, atol=tol, rtol=tol)


@pytest.mark.parametrize("eviction", ["shift", "concat"])
@pytest.mark.parametrize("setup", SETUPS[:2] + SETUPS[4:], ids=lambda s: s.name)
def test_triton_matches_reference_cache(setup, eviction, triton_backend):
    """Triton (interpreter, fp32) against the copy-and-concatenate caches, outputs and logical K/V."""
    chunks = 2 + -(-(setup.sink + setup.window) // setup.chunk)
    ours, theirs = setup.cache(dtype=torch.float32), setup.cache(ReferenceKVCache, torch.float32, eviction=eviction)
    generator = torch.Generator().manual_seed(1)
    for c in range(chunks):
        for _ in range(2):  # a denoising pass, then the context pass that overwrites it
            for layer, (q, k, v) in enumerate(chunk_inputs(setup, torch.float32, generator)):
                torch.testing.assert_close(ours.attend(layer, q, k, v), theirs.attend(layer, q, k, v),
                                           atol=2e-5, rtol=2e-5, msg=f"chunk {c} layer {layer}")
                k_ours, v_ours, positions = ours.kv(layer)
                k_ref, v_ref = theirs.kv(layer)
                torch.testing.assert_close(k_ours, k_ref, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(v_ours, v_ref, atol=0, rtol=0)
                assert positions.tolist() == sorted(positions.tolist())
        ours.commit()
        theirs.commit()


def test_triton_fp16_within_flash_tolerance(triton_backend):
    """fp16 through the ring against float64, within 2x the error of PyTorch's fp16 reference cache."""
    setup = SETUPS[0]
    ours, baseline = setup.cache(dtype=torch.float16), setup.cache(ReferenceKVCache, torch.float16)
    exact = setup.cache(ReferenceKVCache, torch.float64)
    generator = torch.Generator().manual_seed(2)
    for c in range(6):
        for layer, (q, k, v) in enumerate(chunk_inputs(setup, torch.float16, generator)):
            want = exact.attend(layer, q.double(), k.double(), v.double())
            assert_error_within(ours.attend(layer, q, k, v), want, baseline.attend(layer, q, k, v),
                                name=f"chunk {c} layer {layer}")
        for cache in (ours, baseline, exact):
            cache.commit()


def test_reset_replays_the_same_stream():
    setup = SETUPS[1]
    cache = setup.cache()
    first = run_rollout(setup, cache, 6, passes=1, dtype=torch.float64, seed=3)
    cache.reset()
    second = run_rollout(setup, cache, 6, passes=1, dtype=torch.float64, seed=3)
    for a, b in zip(first, second):
        assert torch.equal(a[0][1][3], b[0][1][3])


def test_state_properties():
    cache = Setup("s", 39, 100, 50, layers=1).cache()
    lengths = []
    for _ in range(6):
        lengths.append((cache.position, cache.visible_tokens, cache.steady))
        cache.attend(0, *chunk_inputs(Setup("s", 39, 100, 50, layers=1), torch.float64, torch.Generator())[0])
        cache.commit()
    assert lengths == [(0, 39, False), (39, 78, False), (78, 117, False), (117, 150, True), (156, 150, True),
                       (195, 150, True)]


# ----------------------------------------------------------------------------- copies and host syncs
@pytest.mark.parametrize("setup", [SETUPS[0], SETUPS[4]], ids=lambda s: s.name)
def test_attend_copies_no_cache_bytes_and_reads_nothing_on_the_host(setup):
    """Inference steps read the ring in place: no copying op touches the buffers and no value is read
    on the host (the PyTorch path runs the same Python as the Triton path, minus the kernel launch).
    A step with gradients copies exactly the visible keys and values once, for its backward."""
    cache = setup.cache(dtype=torch.float32)
    watch = [cache.k_buffer, cache.v_buffer]
    generator = torch.Generator().manual_seed(4)
    for _ in range(8):
        for layer, (q, k, v) in enumerate(chunk_inputs(setup, torch.float32, generator)):
            with CopyCounter(watch) as counter, torch.no_grad():
                cache.attend(layer, q, k, v)
            assert (counter.copy_bytes, counter.host_syncs) == (0, 0)
            with CopyCounter(watch) as counter:
                cache.attend(layer, q.requires_grad_(), k, v)
            visible = 2 * setup.batch * setup.heads_kv * cache.visible_tokens * setup.head_dim * 4
            assert (counter.copy_bytes, counter.host_syncs) == (visible, 0)
        with CopyCounter(watch) as counter:
            cache.commit()
        assert (counter.copy_bytes, counter.host_syncs) == (0, 0)


def test_reference_shift_cache_does_copy():
    """The counter sees the baseline's shift-copy eviction (so the zero above is a measurement)."""
    setup = SETUPS[2]
    cache = setup.cache(ReferenceKVCache, torch.float32)
    generator = torch.Generator().manual_seed(5)
    copied = []
    for _ in range(5):
        with CopyCounter(cache._k + cache._v) as counter, torch.no_grad():
            for layer, (q, k, v) in enumerate(chunk_inputs(setup, torch.float32, generator)):
                cache.attend(layer, q, k, v)
        cache.commit()
        copied.append(counter.copy_bytes)
    # Full after 2 chunks of 32 (window 64, no sink): each later chunk shifts 32 tokens of k and of v
    # in 2 layers, read out of the buffer by the clone (the copy back reads the clone).
    per_shift = 2 * 2 * setup.batch * setup.heads_kv * 32 * setup.head_dim * 4
    assert copied == [0, 0, per_shift, per_shift, per_shift]


# ----------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("setup", [SETUPS[1], SETUPS[3]], ids=lambda s: s.name)
def test_rollout_gradients_reach_the_current_chunk_only(setup, backend, monkeypatch):
    """Self-Forcing rollout training: per chunk, denoising passes without grad except one random exit
    pass, then the clean context pass without grad. Gradients of a loss over the exit outputs, taken
    after the whole rollout (the ring has moved on), equal float64 autograd through the definition
    with the history held constant."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", backend)
    dtype = torch.float64 if backend == "reference" else torch.float32
    cache = setup.cache(dtype=dtype)
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(6)
    chunks, passes = 2 + -(-(setup.sink + setup.window) // setup.chunk), 3
    exits, losses = [], []
    history = [([], []) for _ in range(setup.layers)]
    expected_terms = []
    for c in range(chunks):
        pos, end = c * setup.chunk, (c + 1) * setup.chunk
        mask = allowed_pairs(setup, torch.arange(pos, end), torch.arange(end))
        exit_pass = rng.randrange(passes - 1)
        for p in range(passes):
            inputs = chunk_inputs(setup, dtype, generator)
            for layer, (q, k, v) in enumerate(inputs):
                if p == exit_pass:
                    q, k, v = (t.requires_grad_() for t in (q, k, v))
                    out = cache.attend(layer, q, k, v)
                    weight = torch.randn(out.shape, generator=generator, dtype=torch.float64)
                    losses.append((out.double() * weight).sum())
                    exits.append((q, k, v))
                    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
                    keys = torch.cat(history[layer][0] + [rotate(setup, k64, pos)], 2)
                    values = torch.cat(history[layer][1] + [v64], 2)
                    ref = dense_attention(rotate(setup, q64, pos), keys, values, mask)
                    expected_terms.append(((ref * weight).sum(), (q64, k64, v64)))
                else:
                    with torch.no_grad():
                        cache.attend(layer, q, k, v)
                if p == passes - 1:
                    history[layer][0].append(rotate(setup, k, pos))
                    history[layer][1].append(v.double())
        cache.commit()
    torch.stack(losses).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-4
    for (q, k, v), (ref_loss, ref_inputs) in zip(exits, expected_terms):
        grads = torch.autograd.grad(ref_loss, ref_inputs)
        for name, got, want in zip("qkv", (q.grad, k.grad, v.grad), grads):
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol, msg=f"d{name}")


def test_backward_computes_dkdv_for_the_chunk_keys_only(triton_backend, monkeypatch):
    """The dK/dV kernel runs over the C keys of the chunk, the dQ kernel over all visible keys."""
    from fastdistill.kernels import attn_bwd

    launched = []
    for name in ("backward_dkdv_triton", "backward_dq_triton"):
        original = getattr(attn_bwd, name)

        def record(q, k, *args, _original=original, _name=name):
            launched.append((_name, k.shape[2]))
            return _original(q, k, *args)

        monkeypatch.setattr(attn_bwd, name, record)
    setup = SETUPS[2]
    cache = setup.cache(dtype=torch.float32)
    generator = torch.Generator().manual_seed(7)
    for _ in range(3):
        for layer, (q, k, v) in enumerate(chunk_inputs(setup, torch.float32, generator)):
            cache.attend(layer, q, k, v)
        cache.commit()
    q, k, v = (t.requires_grad_() for t in chunk_inputs(setup, torch.float32, generator)[0])
    cache.attend(0, q, k, v).sum().backward()
    assert launched == [("backward_dq_triton", cache.slots), ("backward_dkdv_triton", setup.chunk)]


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input_raises():
    setup = SETUPS[0]
    cache = setup.cache()
    q, k, v = chunk_inputs(setup, torch.float64, torch.Generator())[0]
    with pytest.raises(ValueError, match=r"k must be \[B, heads, chunk_tokens, head_dim\] = \[2, 2, 39, 16\], got \[2, 2, 38, 16\]"):
        cache.attend(0, q, k[:, :, :38], v)
    with pytest.raises(ValueError, match="q must be"):
        cache.attend(0, q[:, :, :38], k, v)
    with pytest.raises(ValueError, match="multiple of heads"):
        cache.attend(0, q[:, :3], k, v)
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\), got 2"):
        cache.attend(2, q, k, v)
    with pytest.raises(TypeError, match="q has dtype torch.float32, the cache torch.float64"):
        cache.attend(0, q.float(), k, v)
    with pytest.raises(RuntimeError, match=r"layers \[1\] have no K/V for chunk 0"):
        cache.attend(0, q, k, v)
        cache.commit()
    with pytest.raises(ValueError, match="window_tokens .* must be >= chunk_tokens"):
        RollingKVCache(1, 1, 1, 16, chunk_tokens=8, window_tokens=4, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="whole frames per chunk"):
        RollingKVCache(1, 1, 1, 16, chunk_tokens=8, window_tokens=16, rope=RopeSpec(16, grid=(2, 2, 3)),
                       dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"rope.head_dim \(8\) != head_dim \(16\)"):
        RollingKVCache(1, 1, 1, 16, chunk_tokens=8, window_tokens=16, rope=RopeSpec(8), dtype=torch.float32,
                       device="cpu")
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
        RollingKVCache(1, 1, 1, 16, chunk_tokens=0, window_tokens=16, dtype=torch.float32, device="cpu")


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_matches_float64(dtype):
    setup = Setup("wan-like", chunk=390, window=780, sink=130, heads_q=4, heads_kv=2, head_dim=128, layers=2,
                  rope=RopeSpec(128, grid=(1, 13, 30)))
    ours = RollingKVCache(setup.layers, setup.batch, setup.heads_kv, 128, chunk_tokens=390, window_tokens=780,
                          sink_tokens=130, rope=setup.rope, dtype=dtype, device="cuda")
    baseline = setup.cache(ReferenceKVCache, dtype)  # PyTorch on the CPU in the same dtype
    exact = setup.cache(ReferenceKVCache, torch.float64)
    generator = torch.Generator().manual_seed(8)
    for c in range(6):
        for layer, (q, k, v) in enumerate(chunk_inputs(setup, dtype, generator)):
            want = exact.attend(layer, q.double(), k.double(), v.double())
            got = ours.attend(layer, q.cuda(), k.cuda(), v.cuda()).cpu()
            assert_error_within(got, want, baseline.attend(layer, q, k, v), name=f"chunk {c} layer {layer}")
        for cache in (ours, baseline, exact):
            cache.commit()


@pytest.mark.gpu
def test_cuda_graph_replays_steady_chunks_without_host_syncs():
    """Capture the write + attend of every layer once the ring is full, replay it for later chunks
    (commit between replays advances the device position and tables), compare with eager; the
    eager step runs under torch.cuda's sync debug mode set to error."""
    setup = Setup("graph", chunk=256, window=512, sink=256, heads_q=4, heads_kv=2, head_dim=64, layers=3,
                  rope=RopeSpec(64))
    kwargs = dict(chunk_tokens=256, window_tokens=512, sink_tokens=256, rope=setup.rope, dtype=torch.bfloat16,
                  device="cuda")
    graphed = RollingKVCache(3, 2, 2, 64, **kwargs)
    eager = RollingKVCache(3, 2, 2, 64, **kwargs)
    generator = torch.Generator().manual_seed(9)
    stream = [[tuple(t.cuda() for t in layer) for layer in chunk_inputs(setup, torch.bfloat16, generator)]
              for _ in range(10)]
    c = 0
    while not graphed.steady:
        for layer, (q, k, v) in enumerate(stream[c]):
            graphed.attend(layer, q, k, v)
            eager.attend(layer, q, k, v)
        graphed.commit()
        eager.commit()
        c += 1
    static = [tuple(torch.empty_like(t) for t in layer) for layer in stream[0]]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up kernels and caches outside the capture
        for layer, (q, k, v) in enumerate(static):
            graphed.attend(layer, q, k, v)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [graphed.attend(layer, q, k, v) for layer, (q, k, v) in enumerate(static)]
    for chunk in stream[c:]:
        for dst, src in zip(static, chunk):
            for d, s in zip(dst, src):
                d.copy_(s)
        graph.replay()
        torch.cuda.set_sync_debug_mode("error")
        try:
            want = [eager.attend(layer, q, k, v) for layer, (q, k, v) in enumerate(chunk)]
            eager.commit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for got, expected in zip(outs, want):
            torch.testing.assert_close(got, expected, atol=0, rtol=0)
        graphed.commit(check=False)
