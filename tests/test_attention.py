"""fastdistill.attention: the Triton kernels (under the interpreter on CPU machines) and the public API.

The Triton forward and backward run on fp16 and fp32 against a float64 naive computation with the
FlashAttention tolerance rule, over the mask/shape cases of test_attention_reference.py (every mask
kind, lengths 1/77/200/333, chunk sizes that cut tiles, window and sink, offsets, GQA, Lq != Lk,
per-batch/per-head block masks, fully masked rows). bf16 is checked on a GPU only: the interpreter's
bf16 dot is wrong (notes/kernel_dev.md).
"""

import pytest
import torch
from test_attention_reference import CASES, assert_lse_within, dense_mask, make_inputs, naive_with_grads

import fastdistill
from fastdistill import masks
from fastdistill.attention import explain
from fastdistill.testing import assert_error_within

TRITON_CASES = CASES


def run_attention(q, k, v, mask, scale, grad_out):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = fastdistill.attention(q, k, v, mask, scale=scale, return_lse=True)
    return out.detach(), lse, *torch.autograd.grad(out, (q, k, v), grad_out)


def check_against_float64(q, k, v, mask, scale, grad_out):
    """Outputs, lse and gradients of fastdistill.attention vs float64, with the same-dtype naive run as
    the baseline of the tolerance rule (2x for outputs, 3x for gradients)."""
    allowed = dense_mask(mask, q.shape[2], k.shape[2])
    scale_value = q.shape[-1] ** -0.5 if scale is None else scale
    exact = naive_with_grads(q.double(), k.double(), v.double(), allowed, scale_value, grad_out.double())
    baseline = naive_with_grads(q, k, v, allowed, scale_value, grad_out)
    ours = run_attention(q, k, v, mask, scale, grad_out)
    assert_error_within(ours[0], exact[0], baseline[0], name="out")
    assert_lse_within(ours[1], exact[1], baseline[1])
    for name, got, want, base in zip(("dq", "dk", "dv"), ours[2:], exact[2:], baseline[2:]):
        assert_error_within(got, want, base, factor=3.0, name=name)


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: c.name)
def test_triton_matches_float64(case, dtype, triton_backend):
    q, k, v, grad_out = make_inputs(case, dtype)
    mask = case.mask(q, k)
    assert explain(q, k, v, mask).startswith("triton"), explain(q, k, v, mask)
    check_against_float64(q, k, v, mask, case.scale, grad_out)


@pytest.mark.parametrize("dims", [(64, 64), (96, 96), (64, 32)], ids=str)
def test_triton_head_dims(dims, triton_backend):
    """64, 96 (padded to 128 inside the kernel) and Dv != D, with a chunk-causal mask cutting tiles."""
    d, dv = dims
    q = torch.randn(1, 2, 150, d, dtype=torch.float16)
    k = torch.randn(1, 2, 150, d, dtype=torch.float16)
    v = torch.randn(1, 2, 150, dv, dtype=torch.float16)
    check_against_float64(q, k, v, masks.chunk_causal(39, window=80, sink=5), None, torch.randn(1, 2, 150, dv).half())


def test_triton_wan_frame_chunks_with_window_and_sink(triton_backend):
    """Acceptance case: Lq = Lk = 1,560 (one Wan latent frame) with chunk boundaries that cut tiles, a
    window and sink tokens, forward and backward within the tolerance rule."""
    q = torch.randn(1, 1, 1560, 16, dtype=torch.float16)
    k = torch.randn(1, 1, 1560, 16, dtype=torch.float16)
    v = torch.randn(1, 1, 1560, 16, dtype=torch.float16)
    mask = masks.chunk_causal(390, window=780, sink=130)
    check_against_float64(q, k, v, mask, None, torch.randn(1, 1, 1560, 16).half())


def test_triton_reads_bshd_views_without_copies(triton_backend):
    q, k, v = (torch.randn(2, 77, 3, 32, dtype=torch.float16).transpose(1, 2) for _ in range(3))
    mask = masks.causal()
    out = fastdistill.attention(q, k, v, mask)
    torch.testing.assert_close(out, fastdistill.attention(q.contiguous(), k.contiguous(), v.contiguous(), mask),
                               rtol=0, atol=0)


def test_fully_masked_rows_are_zero_not_nan(triton_backend):
    blocks = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    blocks[:, :, 1] = False  # query rows 32..63 see nothing
    q, k, v = (torch.randn(1, 2, 128, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    out, lse = fastdistill.attention(q, k, v, masks.block_sparse(blocks, 32), return_lse=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and (out[:, :, 32:64] == 0).all()
    assert torch.isneginf(lse[:, :, 32:64]).all() and torch.isfinite(lse[:, :, :32]).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v)) and (q.grad[:, :, 32:64] == 0).all()


def test_dispatch_and_explain(monkeypatch):
    q = k = v = torch.randn(1, 2, 8, 16)
    monkeypatch.delenv("FASTDISTILL_BACKEND", raising=False)
    assert explain(q, k, v).startswith("reference: auto")
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")
    assert explain(q, k, v).startswith("triton")
    assert explain(q.double(), k.double(), v.double()).startswith("reference: float64")
    two_chunks = masks.causal() & masks.chunk_causal(4)
    assert explain(q, k, v, two_chunks).startswith("reference: the Triton kernels AND at most one")
    # the reference computes the same function for such a mask (here equal to causal)
    torch.testing.assert_close(fastdistill.attention(q, k, v, two_chunks),
                               fastdistill.attention(q, k, v, masks.causal()), rtol=1e-5, atol=1e-6)


def test_reference_backend_on_cpu_by_default(monkeypatch):
    monkeypatch.delenv("FASTDISTILL_BACKEND", raising=False)
    q, k, v = (torch.randn(2, 4, 33, 16, dtype=torch.float64) for _ in range(3))
    mask = masks.chunk_causal(10, window=15, sink=2)
    out = fastdistill.attention(q, k, v, mask)
    allowed = mask.to_dense(33, 33)
    exact = naive_with_grads(q, k, v, allowed, 0.25, torch.zeros_like(q))[0]
    torch.testing.assert_close(out, exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_matches_eager(backend, monkeypatch):
    """A small model calling fastdistill.attention compiles in one graph (fullgraph) and gives eager's
    outputs and gradients."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", backend)
    torch.manual_seed(0)
    proj = torch.nn.Linear(32, 96)
    mask = masks.chunk_causal(13, window=30, sink=4)

    def block(x):
        q, k, v = proj(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, D]
        return fastdistill.attention(q, k, v, mask).transpose(1, 2).flatten(-2).sum(-1)

    x = torch.randn(2, 50, 32)
    eager = block(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(proj.parameters()))
    compiled = torch.compile(block, fullgraph=True)(x)
    compiled_grads = torch.autograd.grad(compiled.square().sum(), list(proj.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _bad(**overrides):
    args = dict(q=torch.zeros(1, 4, 8, 16), k=torch.zeros(1, 2, 10, 16), v=torch.zeros(1, 2, 10, 16), mask=None)
    args.update(overrides)
    fastdistill.attention(args["q"], args["k"], args["v"], args["mask"])


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(q=torch.zeros(4, 8, 16)), ValueError, r"q must be \[B, H, L, D\]"),
        (dict(k=torch.zeros(1, 2, 10, 8)), ValueError, "same head dim"),
        (dict(v=torch.zeros(1, 2, 9, 16)), ValueError, "same heads and length"),
        (dict(k=torch.zeros(1, 3, 10, 16), v=torch.zeros(1, 3, 10, 16)), ValueError, "multiple of key/value heads"),
        (dict(q=torch.zeros(2, 4, 8, 16)), ValueError, "batch sizes differ"),
        (dict(q=torch.zeros(1, 4, 8, 16, dtype=torch.float16)), TypeError, "share a dtype"),
        (dict(q=torch.zeros(1, 4, 8, 16, dtype=torch.int32)), TypeError, "q must be float16"),
        (dict(q=torch.zeros(1, 4, 8, 16, device="meta")), ValueError, "one device"),
        (dict(mask="causal"), TypeError, "mask must be a fastdistill.masks mask"),
        (dict(mask=masks.block_sparse(torch.ones(1, 1, 2, 2, dtype=torch.bool), 8)), ValueError, "does not fit"),
        (dict(mask=masks.block_sparse(torch.ones(1, 3, 1, 1, dtype=torch.bool), 16)), ValueError, "do not broadcast"),
    ],
)
def test_bad_input_raises(overrides, error, match):
    with pytest.raises(error, match=match):
        _bad(**overrides)


# -------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [c for c in TRITON_CASES if c.lq >= 77], ids=lambda c: c.name)
def test_cuda_matches_float64(case, dtype):
    q, k, v, grad_out = (t.cuda() for t in make_inputs(case, dtype))
    mask = case.mask(q, k)
    assert explain(q, k, v, mask).startswith("triton")
    check_against_float64(q, k, v, mask, case.scale, grad_out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_wan_chunk_causal(dtype):
    """Self-Forcing-like mask at D=128 over three Wan frames: chunk 1,560, window 2 frames, 1-frame sink."""
    length = 3 * 1560
    q, k, v, grad_out = (torch.randn(1, 2, length, 128, device="cuda", dtype=dtype) for _ in range(4))
    check_against_float64(q, k, v, masks.chunk_causal(1560, window=3120, sink=1560), None, grad_out)


def test_chunk_causal_equals_flex_attention():
    """The same chunk-causal mask (window, sink, offsets) written as a FlexAttention mask_mod gives
    the same attention (FlexAttention's eager CPU path)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    chunk, window, sink, q_offset = 39, 117, 10, 78
    lq, lk = 200, 278

    def mask_mod(b, h, q_idx, kv_idx):
        end = ((q_idx + q_offset) // chunk + 1) * chunk
        return ((kv_idx < end) & (kv_idx >= end - window)) | (kv_idx < sink)

    q = torch.randn(2, 4, lq, 32)
    k, v = torch.randn(2, 4, lk, 32), torch.randn(2, 4, lk, 32)
    block_mask = create_block_mask(mask_mod, None, None, lq, lk, device="cpu")
    expected = flex_attention(q, k, v, block_mask=block_mask)
    ours = fastdistill.attention(q, k, v, masks.chunk_causal(chunk, window=window, sink=sink, q_offset=q_offset))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_block", [False, True])
def test_triton_custom_ops_opcheck(with_block):
    """The Triton path is registered as custom ops (what torch.compile sees); check their registration."""
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    block_mask = torch.rand(1, 2, 3, 3) < 0.7 if with_block else None
    args = (q, k, v, 0.25, [13, 30, 4, 0, 0], block_mask, [16, 16] if with_block else [])
    torch.library.opcheck(torch.ops.fastdistill.attention_triton_fwd.default, args)
