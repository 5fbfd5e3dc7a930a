"""Forward-mode derivatives of attention: `attention_jvp`, the JVP rule of `attention`, `patch_sdpa`.

The oracle is `torch.func.jvp` of the naive float64 math attention (test_attention_reference.py) with
the dense mask; the same-dtype naive JVP is the baseline of the FlashAttention tolerance rule. The
Triton kernel runs under the interpreter in fp16 and fp32 (bf16 on a GPU only), the reference in
float64, both over the mask/shape cases of the forward tests (every mask kind, lengths 1/77/200/333,
chunks that cut tiles, window, sink, offsets, GQA, Lq != Lk, per-batch/per-head block masks, empty rows).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from test_attention_reference import CASES, dense_mask, make_inputs, naive_attention
from torch.autograd import forward_ad
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastdistill
from fastdistill import masks
from fastdistill.attention import explain
from fastdistill.kernels.attn_jvp import attention_jvp_triton
from fastdistill.refs.attention import attention_jvp_reference
from fastdistill.testing import assert_error_within

TANGENT_SETS = ["qkv", "q", "k", "v", "qk", ""]  # which of tq, tk, tv exist


def make_tangents(q, k, v, which: str):
    return tuple(torch.randn_like(x) if name in which else None for name, x in zip("qkv", (q, k, v)))


def naive_jvp(q, k, v, tangents, allowed, scale):
    """(out, t_out, lse, mu) by torch.func.jvp of the naive attention in q's dtype (None tangent = 0)."""
    tangents = tuple(torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), tangents))
    (out, lse), (t_out, mu) = torch.func.jvp(lambda a, b, c: naive_attention(a, b, c, allowed, scale), (q, k, v),
                                             tangents)
    return out, t_out, lse, torch.where(torch.isneginf(lse), 0.0, mu)


def check_jvp(got, q, k, v, tangents, mask, scale, floor=None):
    """got = (out, t_out, lse, mu) of the tested path at inputs of dtype q.dtype, against the float64
    oracle with the tolerance rule (2x for out and lse, 3x for t_out and mu)."""
    allowed = dense_mask(mask, q.shape[2], k.shape[2])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    exact = naive_jvp(q.double(), k.double(), v.double(), tuple(None if t is None else t.double() for t in tangents), allowed, scale)
    baseline = naive_jvp(q, k, v, tangents, allowed, scale)
    out, t_out, lse, mu = got
    assert_error_within(out, exact[0], baseline[0], name="out", floor=floor)
    assert_error_within(t_out, exact[1], baseline[1], factor=3.0, name="t_out", floor=floor)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(exact[2])), "lse: -inf pattern differs"
    finite = torch.isfinite(exact[2])
    assert_error_within(lse[finite], exact[2][finite], baseline[2][finite].float(), name="lse", floor=floor)
    assert_error_within(mu, exact[3], baseline[3].to(mu.dtype), factor=3.0, name="mu", floor=floor)
    assert torch.equal(mu[~finite], torch.zeros_like(mu[~finite])), "mu of an empty row must be 0"


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")


# ------------------------------------------------------------------------------ kernel and reference
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_jvp_float64(case):
    q, k, v, _ = make_inputs(case, torch.float64)
    mask = case.mask(q, k)
    tangents = make_tangents(q, k, v, "qkv")
    got = attention_jvp_reference(q, k, v, *tangents, mask, scale=case.scale, block_rows=case.block_rows)
    # torch.func.jvp of softmax @ v in float64 itself varies between runs by up to ~1e-9 on CPU (torch
    # 2.13), hence a 1e-8 floor rather than float64's 1e-12.
    check_jvp(got, q, k, v, tangents, mask, case.scale, floor=1e-8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_triton_jvp_matches_float64(case, dtype, triton_backend):
    q, k, v, _ = make_inputs(case, dtype)
    mask = case.mask(q, k)
    assert explain(q, k, v, mask).startswith("triton")
    tangents = make_tangents(q, k, v, "qkv")
    got = fastdistill.attention_jvp(q, k, v, *tangents, mask, scale=case.scale, return_stats=True)
    assert got[1].dtype == dtype and got[2].dtype == got[3].dtype == torch.float32
    check_jvp(got, q, k, v, tangents, mask, case.scale)


@pytest.mark.parametrize("dims, mask", [((96, 96), None), ((128, 64), masks.causal()), ((64, 64), None)], ids=str)
def test_triton_jvp_head_dims(dims, mask, triton_backend):
    """Head dims above 64 (96 is padded to 128); without a mask they walk the full mask's tile list
    (jvp_config), with one the schedule; 64 counts its tiles."""
    d, dv = dims
    q, k = torch.randn(1, 2, 77, d).half(), torch.randn(1, 2, 77, d).half()
    v = torch.randn(1, 2, 77, dv).half()
    tangents = make_tangents(q, k, v, "qkv")
    check_jvp(fastdistill.attention_jvp(q, k, v, *tangents, mask, return_stats=True), q, k, v, tangents, mask, None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("which", TANGENT_SETS)
def test_none_tangent_combinations(which, backend, monkeypatch):
    """Each subset of tangents (the others None: their matmuls are skipped) against zero tangents."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", backend)
    q, k, v = torch.randn(2, 4, 77, 16).half(), torch.randn(2, 2, 77, 16).half(), torch.randn(2, 2, 77, 16).half()
    tangents = make_tangents(q, k, v, which)
    mask = masks.chunk_causal(20, window=50, sink=3)
    check_jvp(fastdistill.attention_jvp(q, k, v, *tangents, mask, return_stats=True), q, k, v, tangents, mask, None)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fp32_tangent_output(backend, monkeypatch):
    """tangent_dtype=float32 returns t_out unrounded: off the fp16 grid, within the tolerance rule; the
    reference (fp32 compute) lands well inside what an fp16 rounding of the exact result would cost."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", backend)
    q, k, v = (torch.randn(1, 2, 100, 32).half() for _ in range(3))
    tangents = make_tangents(q, k, v, "qkv")
    out, t_out = fastdistill.attention_jvp(q, k, v, *tangents, masks.causal(), tangent_dtype=torch.float32)
    assert out.dtype == torch.float16 and t_out.dtype == torch.float32
    assert (t_out != t_out.half().float()).float().mean() > 0.9
    allowed = masks.causal().to_dense(100, 100)
    exact = naive_jvp(q.double(), k.double(), v.double(), tuple(t.double() for t in tangents), allowed, 32**-0.5)[1]
    baseline = naive_jvp(q, k, v, tangents, allowed, 32**-0.5)[1]
    assert_error_within(t_out, exact, baseline, factor=3.0, floor=2e-3, name="t_out")
    if backend == "reference":
        assert (t_out.double() - exact).abs().max() < 0.1 * (exact.half().double() - exact).abs().max()


def test_fully_masked_rows(triton_backend):
    blocks = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    blocks[:, :, 1] = False  # query rows 32..63 see nothing
    q, k, v = (torch.randn(1, 2, 128, 16, dtype=torch.float16) for _ in range(3))
    tangents = make_tangents(q, k, v, "qkv")
    out, t_out, lse, mu = fastdistill.attention_jvp(q, k, v, *tangents, masks.block_sparse(blocks, 32),
                                                    return_stats=True)
    for t in (out, t_out, mu):
        assert torch.isfinite(t).all() and (t[:, :, 32:64] == 0).all()
    assert torch.isneginf(lse[:, :, 32:64]).all() and torch.isfinite(lse[:, :, :32]).all()


def test_common_offset_in_keys_is_harmless(triton_backend):
    """Keys and key tangents with a large shared component (adaLN modulation of the keys, padded text)
    put a large per-row constant into tS. The kernel's error stays within 2x of the offset-free case;
    without the per-row shift (row_shift=False) it grows past that: the test fails if the shift goes."""
    torch.manual_seed(0)
    batch, heads, length, dim = 1, 2, 256, 64
    q, k, v, tq, tk, tv = (torch.randn(batch, heads, length, dim) for _ in range(6))
    direction = torch.randn(dim)
    common = 64.0 * direction / direction.norm() * math.sqrt(dim)  # 64x the norm of a key tangent
    inputs_plain = [x.half() for x in (q, k, v, tq, tk, tv)]
    inputs_offset = [x.half() for x in (q, k + common / 8, v, tq, tk + common, tv)]

    def relative_error(inputs, row_shift):
        exact = attention_jvp_reference(*(x.double() for x in inputs))[1]
        got = attention_jvp_triton(*inputs, None, dim**-0.5, torch.float32, row_shift=row_shift)[1]
        return ((got.double() - exact).abs().max() / exact.abs().max()).item()

    plain = relative_error(inputs_plain, True)
    offset = relative_error(inputs_offset, True)
    offset_without_shift = relative_error(inputs_offset, False)
    assert offset <= 2.0 * plain, (plain, offset)
    assert offset_without_shift > 2.0 * plain, (plain, offset_without_shift)


# ------------------------------------------------------------------------ the JVP rule of attention
@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTDISTILL_BACKEND", request.param)
    return request.param


def _inputs(dtype=torch.float32, batch=2, heads=(4, 2), length=60, dim=16):
    q = torch.randn(batch, heads[0], length, dim, dtype=dtype)
    k, v = (torch.randn(batch, heads[1], length, dim, dtype=dtype) for _ in range(2))
    return q, k, v, make_tangents(q, k, v, "qkv")


def test_func_jvp_and_forward_ad(backend):
    q, k, v, (tq, tk, tv) = _inputs()
    mask = masks.chunk_causal(16, window=40, sink=4)
    _, want = fastdistill.attention_jvp(q, k, v, tq, tk, tv, mask)
    out, t_out = torch.func.jvp(lambda a, b, c: fastdistill.attention(a, b, c, mask), (q, k, v), (tq, tk, tv))
    torch.testing.assert_close(out, fastdistill.attention(q, k, v, mask))
    torch.testing.assert_close(t_out, want, rtol=1e-5, atol=1e-5)
    with forward_ad.dual_level():
        dual = fastdistill.attention(*(forward_ad.make_dual(x, t) for x, t in ((q, tq), (k, tk), (v, tv))), mask)
        torch.testing.assert_close(forward_ad.unpack_dual(dual).tangent, want, rtol=1e-5, atol=1e-5)
    # a captured k/v (cross-attention to a frozen context) has no tangent: only tq's terms remain
    _, t_q_only = torch.func.jvp(lambda a: fastdistill.attention(a, k, v, mask), (q,), (tq,))
    torch.testing.assert_close(t_q_only, fastdistill.attention_jvp(q, k, v, tq, None, None, mask)[1],
                               rtol=1e-5, atol=1e-5)


def test_vmap_and_vmap_of_jvp(backend):
    """vmap folds its dim into the batch; a per-batch block mask is repeated along with it."""
    q, k, v, (tq, tk, tv) = _inputs()
    mask = masks.block_sparse(torch.rand(2, 1, 4, 4) < 0.6, 16) & masks.chunk_causal(16, window=40)
    stacked = [torch.stack([x, 0.5 * x, -x]) for x in (q, k, v, tq)]
    out = torch.func.vmap(lambda a, b, c: fastdistill.attention(a, b, c, mask))(*stacked[:3])
    t_out = torch.func.vmap(
        lambda a, b, c, ta: torch.func.jvp(lambda x: fastdistill.attention(x, b, c, mask), (a,), (ta,))[1]
    )(*stacked)
    for i in range(3):
        args = [x[i] for x in stacked]
        torch.testing.assert_close(out[i], fastdistill.attention(*args[:3], mask))
        torch.testing.assert_close(t_out[i], fastdistill.attention_jvp(*args, None, None, mask)[1], rtol=1e-5, atol=1e-5)


def test_primal_with_grad_meanflow(backend):
    """MeanFlow: the JVP's primal output is trained through; its backward is the flash backward."""
    q, k, v, (tq, tk, tv) = _inputs()
    mask = masks.causal()
    grad_out = torch.randn(2, 4, 60, 16)

    def grads(fn):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, grad_out)

    want = grads(lambda a, b, c: fastdistill.attention(a, b, c, mask))
    via_jvp = grads(lambda a, b, c: torch.func.jvp(lambda *x: fastdistill.attention(*x, mask), (a, b, c),
                                                   (tq, tk, tv))[0])
    via_attention_jvp = grads(lambda a, b, c: fastdistill.attention_jvp(a, b, c, tq, tk, tv, mask)[0])
    for got in (via_jvp, via_attention_jvp):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_torch_compile_is_correct_or_raises(backend):
    """Under torch.compile, tangents are eager's or the call raises; never silently wrong (pytorch
    #192985: Dynamo drops custom JVP rules)."""
    torch._dynamo.reset()
    q, k, v, tangents = _inputs(batch=1, length=40)
    mask = masks.chunk_causal(10, window=25)

    def tangent(a, b, c, ta, tb, tc):
        return torch.func.jvp(lambda *x: fastdistill.attention(*x, mask), (a, b, c), (ta, tb, tc))[1]

    eager = tangent(q, k, v, *tangents)
    torch.testing.assert_close(torch.compile(tangent)(q, k, v, *tangents), eager)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.func.jvp(torch.compile(lambda *x: fastdistill.attention(*x, mask)), (q, k, v),
                                              tangents)[1], eager)
    torch._dynamo.reset()
    with pytest.raises(Exception):  # fullgraph: Dynamo cannot trace the forward-AD check, and says so
        torch.compile(tangent, fullgraph=True)(q, k, v, *tangents)
    torch._dynamo.reset()
    with forward_ad.dual_level(), pytest.raises(RuntimeError, match="pytorch issue #192985"):
        torch.compile(lambda *x: fastdistill.attention(*x, mask))(
            *(forward_ad.make_dual(x, t) for x, t in zip((q, k, v), tangents)))
    torch._dynamo.reset()
    # the explicit API has no forward-AD rule to lose: it compiles in one graph
    explicit = torch.compile(lambda *x: fastdistill.attention_jvp(*x, mask), fullgraph=True)(q, k, v, *tangents)
    torch.testing.assert_close(explicit[1], eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ------------------------------------------------------------------- a DiT block under patch_sdpa
class TinyDiTBlock(torch.nn.Module):
    """A diffusers-style DiT block: adaLN-Zero time modulation, RoPE'd self-attention and
    cross-attention to a text context, both through F.scaled_dot_product_attention."""

    def __init__(self, dim=32, heads=2, context_dim=24):
        super().__init__()
        self.heads = heads
        self.time_mlp = torch.nn.Sequential(torch.nn.Linear(16, dim), torch.nn.SiLU(), torch.nn.Linear(dim, 6 * dim))
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.cross_q = torch.nn.Linear(dim, dim)
        self.cross_kv = torch.nn.Linear(context_dim, 2 * dim)
        self.cross_proj = torch.nn.Linear(dim, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def heads_first(self, x):
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, L, C] -> [B, H, L, C / H] (a view)

    def forward(self, x, t, context, cos, sin):
        half = 8
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=t.dtype) / half)
        t_embed = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.time_mlp(t_embed)[:, None].chunk(6, -1)
        h = F.layer_norm(x, x.shape[-1:]) * (1 + scale1) + shift1
        q, k, v = (self.heads_first(p) for p in self.qkv(h).chunk(3, -1))
        q, k = fastdistill.apply_rope(q, cos, sin), fastdistill.apply_rope(k, cos, sin)
        x = x + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))
        q = self.heads_first(self.cross_q(F.layer_norm(x, x.shape[-1:])))
        k, v = (self.heads_first(p) for p in self.cross_kv(context).chunk(2, -1))
        x = x + self.cross_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(-2))
        return x + gate2 * self.mlp(F.layer_norm(x, x.shape[-1:]) * (1 + scale2) + shift2)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float32), ("triton", torch.float32),
                                            ("triton", torch.float16)], ids=str)
def test_dit_block_jvp_under_patch_sdpa(backend, dtype, monkeypatch):
    """torch.func.jvp of a DiT block with respect to (x, t), with every F.scaled_dot_product_attention
    routed to fastdistill, against the float64 math-SDPA JVP of the same block."""
    monkeypatch.setenv("FASTDISTILL_BACKEND", backend)
    torch.manual_seed(0)
    block = TinyDiTBlock()
    for p in block.parameters():  # adaLN-Zero starts at zero gates; use nonzero ones so all paths count
        torch.nn.init.normal_(p, std=0.3)
    x, context = torch.randn(2, 50, 32), torch.randn(2, 7, 24)
    t, dx, dt = torch.rand(2), torch.randn(2, 50, 32), torch.ones(2)
    cos, sin = fastdistill.rope_tables(fastdistill.RopeSpec(16), 50)

    def run(module, dtype):
        module = module.to(dtype)
        args = (x.to(dtype), t.to(dtype), context.to(dtype), cos.double() if dtype == torch.float64 else cos,
                sin.double() if dtype == torch.float64 else sin)
        return torch.func.jvp(lambda a, b: module(a, b, *args[2:]), args[:2], (dx.to(dtype), dt.to(dtype)))

    import copy

    with sdpa_kernel(SDPBackend.MATH):
        exact = run(copy.deepcopy(block), torch.float64)
        baseline = run(copy.deepcopy(block), dtype)
    with fastdistill.patch_sdpa():
        got = run(copy.deepcopy(block), dtype)
    assert_error_within(got[0], exact[0], baseline[0], name="out")
    assert_error_within(got[1], exact[1], baseline[1], factor=3.0, name="tangent")


# --------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (dict(tq=torch.zeros(1, 4, 9, 16)), ValueError, r"tq must have the shape of q"),
        (dict(tk=torch.zeros(1, 2, 10, 16, dtype=torch.float64)), TypeError, "tk must have the dtype of k"),
        (dict(tv=torch.zeros(1, 2, 10, 16, device="meta")), ValueError, "tv is on meta"),
        (dict(tq="zero"), TypeError, "tq must be a tensor or None"),
        (dict(tangent_dtype=torch.float16), TypeError, "tangent_dtype must be one of"),
        (dict(q=torch.zeros(1, 4, 8, 8)), ValueError, "same head dim"),
    ],
)
def test_attention_jvp_bad_input(overrides, error, match):
    args = dict(q=torch.zeros(1, 4, 8, 16), k=torch.zeros(1, 2, 10, 16), v=torch.zeros(1, 2, 10, 16),
                tq=None, tk=None, tv=None, tangent_dtype=None)
    args.update(overrides)
    with pytest.raises(error, match=match):
        fastdistill.attention_jvp(args["q"], args["k"], args["v"], args["tq"], args["tk"], args["tv"],
                                  tangent_dtype=args["tangent_dtype"])


def test_triton_jvp_custom_op_opcheck():
    q, k, v, tq, tk = (torch.randn(1, 2, 40, 16, dtype=torch.float16, requires_grad=True) for _ in range(5))
    args = (q, k, v, tq, tk, None, 0.25, [13, 30, 4, 0, 0], None, [], torch.float32)
    torch.library.opcheck(torch.ops.fastdistill.attention_triton_jvp.default, args)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [c for c in CASES if c.lq >= 77], ids=lambda c: c.name)
def test_cuda_jvp_matches_float64(case, dtype):
    q, k, v, _ = (t.cuda() for t in make_inputs(case, dtype))
    mask = case.mask(q, k)
    tangents = make_tangents(q, k, v, "qkv")
    got = fastdistill.attention_jvp(q, k, v, *tangents, mask, scale=case.scale, return_stats=True)
    check_jvp(got, q, k, v, tangents, mask, case.scale)


@pytest.mark.gpu
def test_cuda_common_offset_bf16():
    """The bf16 trap of notes/jvp_attention.md at D=128: a 64x common component in the key tangents."""
    torch.manual_seed(0)
    q, k, v, tq, tk, tv = (torch.randn(1, 4, 1024, 128, device="cuda") for _ in range(6))
    direction = torch.randn(128, device="cuda")
    tk_offset = tk + 64.0 * direction / direction.norm() * math.sqrt(128)

    def error(tk_):
        inputs = [x.bfloat16() for x in (q, k, v, tq, tk_, tv)]
        exact = attention_jvp_reference(*(x.double() for x in inputs))[1]
        got = fastdistill.attention_jvp(*inputs, tangent_dtype=torch.float32)[1]
        return ((got.double() - exact).abs().max() / exact.abs().max()).item()

    assert error(tk_offset) <= 2.0 * error(tk)
