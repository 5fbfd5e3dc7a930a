"""`sdpa` against torch's `F.scaled_dot_product_attention`, and `patch_sdpa()`.

Every supported argument combination runs through both functions with the same inputs: float32 must
agree to rounding (outputs and the gradients of query, key, value and an additive mask); float16 and
bfloat16 follow the FlashAttention rule of fastdistill.testing (error against a float64 torch run at
most 2x, 3x for gradients, torch's own error in that dtype plus a floor).
"""

import importlib
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastdistill import masks
from fastdistill.attention import explain
from fastdistill.sdpa import patch_sdpa, sdpa
from fastdistill.testing import assert_error_within

TORCH_SDPA = F.scaled_dot_product_attention  # bound at import: the unpatched original
# The module, for monkeypatching its internals: `import fastdistill.sdpa as m` would give the function
# once fastdistill/__init__.py exports `sdpa`, which shadows the submodule's attribute on the package.
sdpa_module = importlib.import_module("fastdistill.sdpa")


def bool_mask(shape, seed, empty_rows=()):
    """A random bool mask (True = take part) with the query rows `empty_rows` fully masked."""
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.6
    mask[..., list(empty_rows), :] = False
    return mask


def additive_mask(shape, seed, empty_rows=()):
    """A random float bias with some -inf entries and the query rows `empty_rows` all -inf."""
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(shape, generator=generator)
    bias = bias.masked_fill(torch.rand(shape, generator=generator) < 0.2, float("-inf"))
    bias[..., list(empty_rows), :] = float("-inf")
    return bias


@dataclass
class Case:
    name: str
    shapes: tuple  # (query, key, value)
    kwargs: dict = field(default_factory=dict)  # sdpa keyword arguments; attn_mask is built by `mask`
    mask: object = None  # None or a callable () -> attn_mask tensor (float32 for additive)


CASES = [
    Case("none", ((2, 3, 77, 16), (2, 3, 77, 16), (2, 3, 77, 16))),
    Case("none-L1-S200-dv8", ((2, 3, 1, 16), (2, 3, 200, 16), (2, 3, 200, 8))),
    Case("causal-L=S", ((2, 3, 77, 16), (2, 3, 77, 16), (2, 3, 77, 16)), {"is_causal": True}),
    Case("causal-L<S", ((2, 3, 77, 16), (2, 3, 200, 16), (2, 3, 200, 16)), {"is_causal": True}),
    Case("causal-L>S", ((2, 3, 200, 16), (2, 3, 77, 16), (2, 3, 77, 16)), {"is_causal": True}),
    Case("causal-1", ((1, 2, 1, 16), (1, 2, 1, 16), (1, 2, 1, 16)), {"is_causal": True}),
    Case("gqa", ((2, 4, 77, 16), (2, 2, 200, 16), (2, 2, 200, 16)), {"enable_gqa": True}),
    Case("gqa-causal-mqa", ((2, 4, 200, 16), (2, 1, 200, 16), (2, 1, 200, 16)),
         {"enable_gqa": True, "is_causal": True}),
    Case("scale", ((2, 3, 77, 16), (2, 3, 77, 16), (2, 3, 77, 16)), {"scale": 0.3}),
    Case("rank3", ((3, 77, 16), (3, 200, 16), (3, 200, 8)), {"is_causal": True}),
    Case("rank2", ((77, 16), (200, 16), (200, 16))),
    Case("rank5", ((2, 2, 3, 77, 16), (2, 2, 3, 77, 16), (2, 2, 3, 77, 16)), {"is_causal": True}),
    Case("broadcast-batch-heads", ((1, 3, 77, 16), (2, 1, 77, 16), (2, 1, 77, 16))),
    Case("bool-LS", ((2, 3, 300, 16), (2, 3, 77, 16), (2, 3, 77, 16)), mask=lambda: bool_mask((300, 77), 1, (5,))),
    Case("bool-B1LS", ((2, 3, 77, 16), (2, 3, 77, 16), (2, 3, 77, 16)),
         mask=lambda: bool_mask((2, 1, 77, 77), 2, (0,))),
    Case("bool-per-head-gqa", ((2, 4, 200, 16), (2, 2, 77, 16), (2, 2, 77, 16)), {"enable_gqa": True},
         mask=lambda: bool_mask((2, 4, 200, 77), 3, (1, 199))),
    Case("bool-key-padding", ((2, 3, 77, 16), (2, 3, 200, 16), (2, 3, 200, 16)),
         mask=lambda: bool_mask((2, 1, 1, 200), 4)),
    Case("bool-rank5", ((2, 2, 3, 77, 16), (2, 2, 3, 77, 16), (2, 2, 3, 77, 16)),
         mask=lambda: bool_mask((2, 1, 1, 77, 77), 5)),
    Case("additive-per-head", ((2, 3, 300, 16), (2, 3, 77, 16), (2, 3, 77, 8)),
         mask=lambda: additive_mask((3, 300, 77), 6, (7,))),
    Case("additive-gqa", ((2, 4, 77, 16), (2, 2, 77, 16), (2, 2, 77, 16)), {"enable_gqa": True},
         mask=lambda: additive_mask((2, 1, 77, 77), 7)),
]

CASE = {case.name: case for case in CASES}
LOW_PRECISION_CASES = ["none", "causal-L<S", "causal-L>S", "gqa-causal-mqa", "bool-per-head-gqa", "additive-per-head"]


def inputs(case, dtype):
    """(query, key, value, attn_mask) in `dtype`; an additive mask also in `dtype` (torch accepts it)."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=generator).to(dtype) for shape in case.shapes)
    mask = case.mask() if case.mask is not None else None
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    return q, k, v, mask


def run(fn, q, k, v, mask, kwargs, grad_out=None, dtype=None):
    """fn's output and the gradients of q, k, v (and of an additive mask) on copies cast to `dtype`."""
    dtype = dtype or q.dtype
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    leaves = [q, k, v]
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().to(dtype).requires_grad_()
        leaves.append(mask)
    out = fn(q, k, v, attn_mask=mask, **kwargs)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return out.detach(), grads, grad_out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_torch_float32(case):
    q, k, v, mask = inputs(case, torch.float32)
    out, grads, grad_out = run(sdpa, q, k, v, mask, case.kwargs)
    want, want_grads, _ = run(TORCH_SDPA, q, k, v, mask, case.kwargs, grad_out)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    for name, got, expected in zip(("dq", "dk", "dv", "dmask"), grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def assert_flash_attention_tolerance(case, dtype):
    """sdpa's output and gradients in `dtype` are at most 2x (3x) as far from a float64 torch run as
    torch's own run in `dtype` is, plus a floor."""
    q, k, v, mask = inputs(case, dtype)
    out, grads, grad_out = run(sdpa, q, k, v, mask, case.kwargs)
    oracle, oracle_grads, _ = run(TORCH_SDPA, q, k, v, mask, case.kwargs, grad_out, dtype=torch.float64)
    baseline, baseline_grads, _ = run(TORCH_SDPA, q, k, v, mask, case.kwargs, grad_out)
    assert_error_within(out, oracle, baseline)
    for name, got, ref, base in zip(("dq", "dk", "dv", "dmask"), grads, oracle_grads, baseline_grads):
        assert_error_within(got, ref, base, factor=3.0, name=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", LOW_PRECISION_CASES)
def test_matches_torch_low_precision(name, dtype):
    assert_flash_attention_tolerance(CASE[name], dtype)


def test_fully_masked_rows_are_zero_like_torch():
    """torch 2.13 returns 0 (not NaN) for a row with no allowed key, for bool and additive masks."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    for mask in (bool_mask((9, 9), 8, (2, 4)), additive_mask((9, 9), 9, (2, 4))):
        out, grads, grad_out = run(sdpa, q, k, v, mask, {})
        want, _, _ = run(TORCH_SDPA, q, k, v, mask, {}, grad_out)
        assert (out[:, :, [2, 4]] == 0).all() and (want[:, :, [2, 4]] == 0).all()
        assert (grads[0][:, :, [2, 4]] == 0).all()
        assert all(torch.isfinite(g).all() for g in grads)


def test_triton_backend_through_sdpa(monkeypatch):
    """The Triton kernels (interpreted on CPU, see conftest) run behind sdpa's no-mask path."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")
    shapes = ((1, 2, 77, 64), (1, 1, 77, 64), (1, 1, 77, 64))
    q, k, v = (torch.empty(shape, dtype=torch.float16) for shape in shapes)
    assert explain(q, k, v, masks.causal()).startswith("triton")
    assert_flash_attention_tolerance(Case("triton", shapes, {"is_causal": True, "enable_gqa": True}), torch.float16)


def test_mask_path_bounds_memory_by_query_blocks(monkeypatch):
    """The dense-mask path computes at most _BLOCK_ROWS query rows at a time, forward and backward."""
    rows_seen = []
    original = sdpa_module._masked_rows

    def recording(q, k, v, mask, start, stop, scale):
        rows_seen.append(stop - start)
        return original(q, k, v, mask, start, stop, scale)

    monkeypatch.setattr(sdpa_module, "_masked_rows", recording)
    monkeypatch.setattr(sdpa_module, "_BLOCK_ROWS", 64)
    q, k, v, mask = inputs(CASE["bool-LS"], torch.float32)  # 300 query rows
    out, _, grad_out = run(sdpa, q, k, v, mask, {})
    want, _, _ = run(TORCH_SDPA, q, k, v, mask, {}, grad_out)
    torch.testing.assert_close(out, want, atol=2e-6, rtol=1e-5)
    # Five blocks in the forward, the same five recomputed by the backward (in reverse order).
    assert sorted(rows_seen) == [44, 44] + [64] * 8


def qkv(*shapes):
    return [torch.randn(s) for s in shapes]


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"dropout_p": 0.1}, NotImplementedError, "dropout_p"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"dropout_p": 1.5}, ValueError, "dropout_p"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)),
         {"attn_mask": torch.ones(8, 8, dtype=torch.bool), "is_causal": True}, ValueError, "attn_mask or is_causal"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 8), (1, 2, 8, 16)), {}, ValueError, r"embedding size E.*\(1, 2, 8, 8\)"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 9, 16)), {}, ValueError, r"length S.*\(1, 2, 9, 16\)"),
        (qkv((1, 4, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {}, ValueError, "enable_gqa=True"),
        (qkv((1, 3, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"enable_gqa": True}, ValueError, "dividing"),
        (qkv((1, 4, 8, 16), (1, 2, 8, 16), (1, 1, 8, 16)), {"enable_gqa": True}, ValueError, "same number of heads"),
        (qkv((8, 16), (8, 16), (8, 16)), {"enable_gqa": True}, ValueError, "at least 3 dims"),
        (qkv((16,), (16,), (16,)), {}, ValueError, r"query must be \[..., L, E\]"),
        (qkv((2, 2, 8, 16), (3, 2, 8, 16), (3, 2, 8, 16)), {}, ValueError, "do not broadcast"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"attn_mask": torch.ones(8, 7, dtype=torch.bool)},
         ValueError, r"attn_mask of shape \(8, 7\)"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"attn_mask": torch.ones(8, dtype=torch.bool)},
         ValueError, "attn_mask"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"attn_mask": torch.ones(1, 1, 1, 8, 8, dtype=torch.bool)},
         ValueError, "attn_mask"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"attn_mask": torch.ones(8, 8, dtype=torch.int64)},
         TypeError, "attn_mask"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"attn_mask": torch.zeros(8, 8, dtype=torch.float64)},
         TypeError, "attn_mask"),
        ([torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).double(), torch.randn(1, 2, 8, 16)], {},
         TypeError, "dtype"),
        ([torch.ones(1, 2, 8, 16, dtype=torch.int32)] * 3, {}, TypeError, "query"),
        (qkv((1, 2, 8, 16), (1, 2, 8, 16), (1, 2, 8, 16)), {"is_causal": 1}, TypeError, "is_causal"),
    ],
)
def test_bad_input_raises(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        sdpa(*args, **kwargs)


class TinyBlock(nn.Module):
    """Pre-norm transformer block whose attention calls F.scaled_dot_product_attention (GQA, causal)."""

    def __init__(self, dim=64, heads=4, kv_heads=2):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, attn_mask=None):
        batch, length, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, length, -1, self.head_dim).transpose(1, 2).split(
            [self.heads, self.kv_heads, self.kv_heads], dim=1
        )
        # Looked up on the module at call time, so patch_sdpa reaches it.
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                              enable_gqa=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, -1))
        return x + self.mlp(self.norm2(x))


def block_outputs_and_grads(block, x, attn_mask=None):
    x = x.detach().requires_grad_()
    out = block(x, attn_mask)
    grads = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    return out.detach(), grads


@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "bool-mask"])
def test_patched_block_matches_unpatched(monkeypatch, with_mask):
    block = TinyBlock()
    x = torch.randn(2, 77, 64)
    attn_mask = bool_mask((2, 1, 77, 77), 10) if with_mask else None
    want, want_grads = block_outputs_and_grads(block, x, attn_mask)

    # Count the calls of what sdpa dispatches to: the kernels' entry point, or the dense-mask path.
    target = "_masked_attention" if with_mask else "attention"
    original, calls = getattr(sdpa_module, target), []

    def counting(*args, **kwargs):
        calls.append(target)
        return original(*args, **kwargs)

    monkeypatch.setattr(sdpa_module, target, counting)
    with patch_sdpa():
        assert F.scaled_dot_product_attention is sdpa
        out, grads = block_outputs_and_grads(block, x, attn_mask)
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert calls == [target]  # the block's one attention call reached fastdistill

    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_patch_sdpa_nests():
    with patch_sdpa():
        with patch_sdpa():
            assert F.scaled_dot_product_attention is sdpa
        assert F.scaled_dot_product_attention is sdpa
    assert F.scaled_dot_product_attention is TORCH_SDPA


def test_patch_sdpa_restores_after_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with patch_sdpa():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is TORCH_SDPA
