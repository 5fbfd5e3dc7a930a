"""The reference attention (CPU backend and float64 oracle) against a naive computation written here.

The naive attention builds the whole [Lq, Lk] score matrix with the dense mask (`mask.to_dense`) and
takes its gradients by autograd; run in float64 it is the oracle, run in the input dtype it is the
same-dtype PyTorch baseline of the tolerance rule (fastdistill.testing: error at most 2x, 3x for
gradients, the baseline's error plus a floor).
"""

from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

from fastdistill import masks
from fastdistill.masks import Mask
from fastdistill.refs.attention import attention_backward_reference, attention_forward_reference, attention_reference
from fastdistill.testing import assert_error_within


def naive_attention(q, k, v, allowed, scale):
    """softmax(scale q k^T masked) v in q's dtype, differentiable by autograd. allowed bool
    [Bm|1, Hm|1, Lq, Lk]. An empty row keeps its finite scores through the softmax and is zeroed after
    it, so neither its output nor its gradients see the NaN of a softmax over -inf only."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    row_any = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed & row_any, float("-inf"))
    out = (torch.softmax(scores, -1) * row_any) @ v
    lse = torch.logsumexp(scores, -1).masked_fill(~row_any[..., 0], float("-inf"))
    return out, lse


def naive_with_grads(q, k, v, allowed, scale, grad_out):
    """(out, lse, dq, dk, dv) of naive_attention on copies of the inputs."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out, lse = naive_attention(q, k, v, allowed, scale)
    return out.detach(), lse.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)


def block_mask(batch, heads, lq, lk, block_size, seed):
    """A random bool block mask [batch, heads, ceil(lq / bq), ceil(lk / bk)], half its blocks allowed."""
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, heads, -(-lq // block_size[0]), -(-lk // block_size[1]))
    return torch.rand(shape, generator=generator) < 0.5


@dataclass
class Case:
    name: str
    lq: int
    lk: int
    mask: Callable[[torch.Tensor, torch.Tensor], Mask | None] = lambda q, k: None  # built from (q, k)
    heads: tuple[int, int] = (4, 2)  # (Hq, Hkv)
    batch: int = 2
    dims: tuple[int, int] = (16, 16)  # (D, Dv)
    block_rows: int = 256
    scale: float | None = None


def per_head_block_sparse(block_size, seed=0):
    """A per-batch, per-query-head block_sparse mask for the case's (q, k); one query block row of
    every head is cleared, so those rows have no allowed key."""

    def build(q, k):
        blocks = block_mask(q.shape[0], q.shape[1], q.shape[2], k.shape[2], block_size, seed=seed)
        blocks[:, :, -1] = False
        return masks.block_sparse(blocks, block_size)

    return build


CASES = [
    Case("none-77", 77, 77, heads=(4, 4)),
    Case("full-200-gqa", 200, 200, lambda q, k: masks.full()),
    Case("full-333x3", 333, 3, lambda q, k: masks.full(), heads=(4, 1)),
    Case("causal-1", 1, 1, lambda q, k: masks.causal(), batch=1),
    Case("causal-333-mqa-rows64", 333, 333, lambda q, k: masks.causal(), heads=(4, 1), block_rows=64),
    Case("causal-bottom-right-77x200", 77, 200, lambda q, k: masks.chunk_causal(1, q_offset=123)),
    Case("chunk39-window-sink-333", 333, 333, lambda q, k: masks.chunk_causal(39, window=117, sink=7)),
    Case("chunk100-offsets-200x333-dv", 200, 333,
         lambda q, k: masks.chunk_causal(100, window=150, sink=20, q_offset=133, kv_offset=0), dims=(32, 24)),
    Case("chunk50-empty-rows-200x77", 200, 77, lambda q, k: masks.chunk_causal(50, kv_offset=100), block_rows=64),
    Case("chunk-scale-rows7", 77, 200, lambda q, k: masks.chunk_causal(13, window=40, sink=3, q_offset=60),
         block_rows=7, scale=0.3),
    Case("block-shared-200x333", 200, 333,
         lambda q, k: masks.block_sparse(block_mask(1, 1, 200, 333, (64, 32), seed=1), (64, 32))),
    Case("block-per-head-333x200-empty", 333, 200, per_head_block_sparse((48, 80)), block_rows=64),
    Case("topk-333", 333, 333, lambda q, k: masks.topk_blocks(q, k, 2, 64), dims=(16, 8)),
    Case("block-and-window-200", 200, 200,
         lambda q, k: per_head_block_sparse((64, 64), seed=2)(q, k) & masks.chunk_causal(39, window=100)),
    Case("topk-and-causal-333x200", 333, 200, lambda q, k: masks.topk_blocks(q, k, 1, (128, 64)) & masks.causal(),
         heads=(4, 1)),
    Case("no-keys-77x0", 77, 0, lambda q, k: masks.causal()),
]
CASE = {case.name: case for case in CASES}


def make_inputs(case, dtype):
    (heads_q, heads_kv), (dim, dim_v) = case.heads, case.dims
    q = torch.randn(case.batch, heads_q, case.lq, dim).to(dtype)
    k = torch.randn(case.batch, heads_kv, case.lk, dim).to(dtype)
    v = torch.randn(case.batch, heads_kv, case.lk, dim_v).to(dtype)
    grad_out = torch.randn(case.batch, heads_q, case.lq, dim_v).to(dtype)
    return q, k, v, grad_out


def dense_mask(mask, lq, lk):
    return torch.ones(1, 1, lq, lk, dtype=torch.bool) if mask is None else mask.to_dense(lq, lk)


def assert_lse_within(lse, exact, baseline):
    """-inf exactly where the oracle has it; the finite entries under the tolerance rule."""
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact)), "lse: -inf pattern differs"
    finite = torch.isfinite(exact)
    assert_error_within(lse[finite], exact[finite], baseline[finite].float(), name="lse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_float64_naive(case, dtype):
    q, k, v, grad_out = make_inputs(case, dtype)
    mask = case.mask(q, k)
    allowed = dense_mask(mask, case.lq, case.lk)
    scale = case.dims[0] ** -0.5 if case.scale is None else case.scale

    out, lse = attention_forward_reference(q, k, v, mask, scale=case.scale, block_rows=case.block_rows)
    grads = attention_backward_reference(q, k, v, out, lse, grad_out, mask, scale=case.scale,
                                         block_rows=case.block_rows)
    exact = naive_with_grads(q.double(), k.double(), v.double(), allowed, scale, grad_out.double())
    same_dtype = naive_with_grads(q, k, v, allowed, scale, grad_out)

    assert out.dtype == dtype and lse.dtype == torch.float32
    assert [g.dtype for g in grads] == [dtype] * 3
    assert_error_within(out, exact[0], same_dtype[0])
    assert_lse_within(lse, exact[1], same_dtype[1])
    for name, grad, grad_exact, grad_same_dtype in zip(("dq", "dk", "dv"), grads, exact[2:], same_dtype[2:]):
        assert_error_within(grad, grad_exact, grad_same_dtype, factor=3.0, name=name)

    # Rows with no allowed key: exactly 0 out and dq, lse -inf; keys no query sees get no gradient.
    empty_rows = ~allowed.any(-1).expand(case.batch, case.heads[0], -1)
    assert (out[empty_rows] == 0).all() and torch.isneginf(lse[empty_rows]).all()
    assert (grads[0][empty_rows] == 0).all()
    groups = case.heads[0] // case.heads[1]
    seen_keys = allowed.expand(case.batch, case.heads[0], -1, -1).any(2).unflatten(1, (-1, groups)).any(2)
    assert (grads[1][~seen_keys] == 0).all() and (grads[2][~seen_keys] == 0).all()


def test_cases_exercise_every_feature():
    """Guards the case list: empty rows, ragged row blocks, GQA/MQA, Dv != D, Lq != Lk all occur."""
    def has_empty_rows(case):
        q, k, _, _ = make_inputs(case, torch.float32)
        return bool((~dense_mask(case.mask(q, k), case.lq, case.lk).any(-1)).any())

    assert sum(has_empty_rows(c) for c in CASES) >= 4
    assert any(c.lq > c.block_rows and c.lq % c.block_rows for c in CASES)
    assert {c.heads[0] // c.heads[1] for c in CASES} >= {1, 2, 4}
    assert any(c.dims[0] != c.dims[1] for c in CASES) and any(c.lq != c.lk for c in CASES)


def test_float64_inputs_compute_in_float64():
    case = CASE["chunk39-window-sink-333"]
    q, k, v, grad_out = make_inputs(case, torch.float64)
    mask = case.mask(q, k)
    out, lse = attention_forward_reference(q, k, v, mask)
    grads = attention_backward_reference(q, k, v, out, lse, grad_out, mask)
    exact = naive_with_grads(q, k, v, mask.to_dense(case.lq, case.lk), case.dims[0] ** -0.5, grad_out)
    assert lse.dtype == torch.float64
    torch.testing.assert_close(out, exact[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, exact[1], rtol=0, atol=1e-12)
    for grad, grad_exact in zip(grads, exact[2:]):
        torch.testing.assert_close(grad, grad_exact, rtol=0, atol=1e-12)


def test_autograd_wrapper_gradcheck_with_empty_rows():
    # kv_offset 4 with chunk 2: query rows 0-3 see no key.
    mask = masks.chunk_causal(2, kv_offset=4)
    q = torch.randn(1, 2, 9, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 6, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: attention_reference(q, k, v, mask), (q, k, v))


def test_autograd_wrapper_equals_forward_and_backward():
    case = CASE["topk-333"]
    q, k, v, grad_out = make_inputs(case, torch.float32)
    mask = case.mask(q, k)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention_reference(*leaves, mask, return_lse=True)
    out.backward(grad_out)

    expected_out, expected_lse = attention_forward_reference(q, k, v, mask)
    expected_grads = attention_backward_reference(q, k, v, expected_out, expected_lse, grad_out, mask)
    assert torch.equal(out, expected_out) and torch.equal(lse, expected_lse)
    for leaf, grad in zip(leaves, expected_grads):
        assert torch.equal(leaf.grad, grad)
    assert not lse.requires_grad
    assert torch.equal(attention_reference(q, k, v, mask), expected_out)


def test_reference_reads_strided_inputs():
    """BSHD tensors viewed as BHSD (the layout of most DiT code) give the contiguous result."""
    case = CASE["causal-bottom-right-77x200"]
    q, k, v, grad_out = make_inputs(case, torch.float32)
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, grad_out)]
    mask = case.mask(q, k)
    out, lse = attention_forward_reference(*strided[:3], mask)
    expected_out, expected_lse = attention_forward_reference(q, k, v, mask)
    torch.testing.assert_close(out, expected_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=1e-6)
    grads = attention_backward_reference(*strided[:3], out, lse, strided[3], mask)
    expected_grads = attention_backward_reference(q, k, v, expected_out, expected_lse, grad_out, mask)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-5)


@dataclass(frozen=True, eq=False)
class RecordingMask(Mask):
    """Another mask, recording the row ranges its dense rows are asked for."""

    inner: Mask = None
    row_ranges: list = field(default_factory=list)

    def dense_rows(self, row_start, row_stop, lk, device=None):
        self.row_ranges.append((row_start, row_stop))
        return self.inner.dense_rows(row_start, row_stop, lk, device)


def test_reference_is_memory_bounded():
    """At L = 4096 the mask is only ever materialised block_rows rows at a time, in order, each row
    once per pass (forward, then backward): no [Lq, Lk] mask or score matrix is built. The last rows
    are checked against the naive attention restricted to them."""
    length, block_rows = 4096, 256
    mask = RecordingMask(inner=masks.causal())
    q, k, v, grad_out = (torch.randn(1, 1, length, 16) for _ in range(4))
    out, lse = attention_forward_reference(q, k, v, mask, block_rows=block_rows)
    attention_backward_reference(q, k, v, out, lse, grad_out, mask, block_rows=block_rows)

    one_pass = [(start, min(length, start + block_rows)) for start in range(0, length, block_rows)]
    assert mask.row_ranges == one_pass * 2

    tail = 16
    allowed = masks.chunk_causal(1, q_offset=length - tail).to_dense(tail, length)
    exact_out, exact_lse = naive_attention(q[:, :, -tail:].double(), k.double(), v.double(), allowed, 0.25)
    torch.testing.assert_close(out[:, :, -tail:].double(), exact_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse[:, :, -tail:].double(), exact_lse, rtol=0, atol=1e-5)
