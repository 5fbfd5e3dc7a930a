"""rope op and RopeSpec tables against float64 references and independent per-token computations."""

import math

import pytest
import torch

from fastdistill import RopeSpec, apply_rope, rope_tables
from fastdistill.refs.rope import rope_reference
from fastdistill.testing import assert_error_within

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 1, 2), (2, 3, 77, 64), (1, 2, 33, 6), (2, 1, 5, 96), (1, 2, 19, 128)]


def make_inputs(shape, dtype, device="cpu", start=0):
    b, h, length, d = shape
    x = torch.randn(b, h, length, d, dtype=torch.float64).to(device=device, dtype=dtype)
    cos, sin = rope_tables(RopeSpec(d), length, start=start, device=device)
    return x, cos, sin


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_matches_reference(shape, dtype, interleaved):
    x, cos, sin = make_inputs(shape, dtype, start=1000)
    out = apply_rope(x, cos, sin, interleaved=interleaved)
    assert out.dtype == dtype and out.shape == x.shape
    exact = rope_reference(x.double(), cos.double(), sin.double(), interleaved)
    torch_same_dtype = rope_reference(x, cos.to(dtype), sin.to(dtype), interleaved)
    assert_error_within(out, exact, torch_same_dtype)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_reads_strided_inputs_in_place(interleaved):
    b, h, length, d = 2, 3, 41, 64
    x_bshd = torch.randn(b, length, h, d)
    x = x_bshd.transpose(1, 2)  # BHSD view of a BSHD buffer
    cos_t = torch.randn(d // 2, length)
    cos, sin = cos_t.t(), torch.randn(d // 2, length).t()  # non-contiguous tables
    out = apply_rope(x, cos, sin, interleaved=interleaved)
    expected = apply_rope(x.contiguous(), cos.contiguous(), sin.contiguous(), interleaved=interleaved)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_rope_float64_tables_with_float32_input():
    x, cos, sin = make_inputs((1, 2, 9, 8), torch.float32)
    out = apply_rope(x, cos.double(), sin.double())
    exact = rope_reference(x.double(), cos.double(), sin.double())
    assert_error_within(out, exact)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_gradcheck(interleaved):
    """Gradients to x and to both tables, in float64."""
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    cos = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    sin = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, c, s: apply_rope(a, c, s, interleaved=interleaved), (x, cos, sin))
    torch.autograd.gradgradcheck(lambda a, c, s: apply_rope(a, c, s, interleaved=interleaved), (x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_gradient_matches_reference(dtype):
    x, cos, sin = make_inputs((2, 3, 37, 64), dtype, start=50)
    grad = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    x.requires_grad_()
    (gx,) = torch.autograd.grad(apply_rope(x, cos, sin), x, grad)
    x64 = x.detach().double().requires_grad_()
    (gx64,) = torch.autograd.grad(rope_reference(x64, cos.double(), sin.double()), x64, grad.double())
    xb = x.detach().requires_grad_()
    (gxb,) = torch.autograd.grad(rope_reference(xb, cos.to(dtype), sin.to(dtype)), xb, grad)
    assert_error_within(gx, gx64, gxb, factor=3.0, name="grad x")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_jvp_matches_float64(dtype, interleaved):
    """torch.func.jvp and forward-mode AD go through the fused op (the tangent is the rotated tangent)."""
    x, cos, sin = make_inputs((2, 3, 21, 64), dtype, start=77)
    tangent = torch.randn(x.shape, dtype=torch.float64).to(dtype)
    out, t_out = torch.func.jvp(lambda a: apply_rope(a, cos, sin, interleaved=interleaved), (x,), (tangent,))
    exact_out, exact_t = torch.func.jvp(
        lambda a: rope_reference(a, cos.double(), sin.double(), interleaved), (x.double(),), (tangent.double(),)
    )
    torch_same_dtype = rope_reference(tangent, cos.to(dtype), sin.to(dtype), interleaved)
    assert_error_within(out, exact_out, rope_reference(x, cos.to(dtype), sin.to(dtype), interleaved))
    assert_error_within(t_out, exact_t, torch_same_dtype, name="tangent")
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, tangent)
        fwd_t = torch.autograd.forward_ad.unpack_dual(apply_rope(dual, cos, sin, interleaved=interleaved)).tangent
    torch.testing.assert_close(fwd_t, t_out, rtol=0, atol=0)


def test_rope_jvp_refuses_table_tangents():
    x, cos, sin = make_inputs((1, 2, 5, 8), torch.float64)
    with pytest.raises(NotImplementedError, match="with respect to cos/sin"):
        torch.func.jvp(lambda c: apply_rope(x, c, sin), (cos,), (torch.ones_like(cos),))


def test_rope_vmap_shared_and_per_sample_tables():
    xs = torch.randn(4, 2, 3, 9, 8, dtype=torch.float64)
    cos, sin = rope_tables(RopeSpec(8), 9, start=5, dtype=torch.float64)
    batched = torch.func.vmap(lambda a: apply_rope(a, cos, sin))(xs)
    torch.testing.assert_close(batched, torch.stack([rope_reference(a, cos, sin) for a in xs]), rtol=0, atol=1e-12)
    tables = [rope_tables(RopeSpec(8), 9, start=s, dtype=torch.float64) for s in range(4)]
    coss, sins = torch.stack([t[0] for t in tables]), torch.stack([t[1] for t in tables])
    per_sample = torch.func.vmap(lambda a, c, s: apply_rope(a, c, s), in_dims=(1, 0, 0))(xs.transpose(0, 1), coss, sins)
    expected = torch.stack([rope_reference(xs[i], coss[i], sins[i]) for i in range(4)])
    torch.testing.assert_close(per_sample, expected, rtol=0, atol=1e-12)
    # jvp composed with vmap (per-sample tangents through a shared-table rotation)
    tangents = torch.randn_like(xs)
    _, t_out = torch.func.vmap(lambda a, t: torch.func.jvp(lambda b: apply_rope(b, cos, sin), (a,), (t,)))(xs, tangents)
    torch.testing.assert_close(t_out, torch.stack([rope_reference(t, cos, sin) for t in tangents]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_opcheck(interleaved):
    x, cos, sin = make_inputs((2, 3, 7, 8), torch.float32)
    torch.library.opcheck(torch.ops.fastdistill.rope.default, (x, cos, sin, interleaved))
    torch.library.opcheck(
        torch.ops.fastdistill.rope.default, (x.requires_grad_(), cos.requires_grad_(), sin, interleaved)
    )


def test_rope_compiles():
    x, cos, sin = make_inputs((1, 2, 9, 8), torch.float32)
    compiled = torch.compile(lambda a: apply_rope(a, cos, sin) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(x), apply_rope(x, cos, sin) * 2)


@pytest.mark.parametrize(
    "x_shape, table_shape, x_dtype, table_dtype, error, match",
    [
        ((2, 3, 4), (4, 4), torch.float32, torch.float32, ValueError, r"x must be \[B, H, L, D\]"),
        ((1, 1, 4, 7), (4, 3), torch.float32, torch.float32, ValueError, "must be even"),
        ((1, 1, 4, 8), (5, 4), torch.float32, torch.float32, ValueError, "cos must be"),
        ((1, 1, 4, 8), (4, 3), torch.float32, torch.float32, ValueError, "cos must be"),
        ((1, 1, 4, 8), (4,), torch.float32, torch.float32, ValueError, "cos must be"),
        ((1, 1, 4, 8), (4, 4), torch.float32, torch.bfloat16, TypeError, "cos must be float32 or float64"),
        ((1, 1, 4, 8), (4, 4), torch.int32, torch.float32, TypeError, "x must be float16"),
    ],
)
def test_rope_rejects_bad_input(x_shape, table_shape, x_dtype, table_dtype, error, match):
    x = torch.ones(x_shape, dtype=x_dtype)
    cos = torch.ones(table_shape, dtype=table_dtype)
    with pytest.raises(error, match=match):
        apply_rope(x, cos, cos.clone())


def test_rope_rejects_mismatched_tables():
    x = torch.ones(1, 1, 4, 8)
    with pytest.raises(ValueError, match="sin must have the shape of cos"):
        apply_rope(x, torch.ones(4, 4), torch.ones(3, 4))
    with pytest.raises(TypeError, match="cos and sin must have the same dtype"):
        apply_rope(x, torch.ones(4, 4), torch.ones(4, 4, dtype=torch.float64))


def test_rope_rejects_tables_on_another_device():
    """Meta tensors route to the fake kernel, which must reject mixed devices as the real ones do."""
    with pytest.raises(ValueError, match="x and cos must be on the same device"):
        apply_rope(torch.ones(1, 1, 4, 8, device="meta"), torch.ones(4, 4), torch.ones(4, 4))


# --------------------------------------------------------------------------------------- RopeSpec


def test_rope_tables_1d_positions():
    d, theta, start, n = 16, 500.0, 37, 11
    cos, sin = rope_tables(RopeSpec(d, theta=theta), n, start=start, dtype=torch.float64)
    assert cos.shape == (n, d // 2) and cos.dtype == torch.float64
    for i in range(n):
        for p in range(d // 2):
            angle = (start + i) * theta ** (-2 * p / d)
            assert cos[i, p].item() == pytest.approx(math.cos(angle), abs=1e-12)
            assert sin[i, p].item() == pytest.approx(math.sin(angle), abs=1e-12)
    explicit = rope_tables(RopeSpec(d, theta=theta), positions=torch.arange(start, start + n), dtype=torch.float64)
    torch.testing.assert_close(explicit[0], cos, rtol=0, atol=0)


def test_rope_spec_default_sections_follow_wan():
    assert RopeSpec(128, grid=(21, 30, 52)).sections == (22, 21, 21)
    assert RopeSpec(64, grid=(1, 2, 2)).sections == (12, 10, 10)


@pytest.mark.parametrize("head_dim, sections", [(128, None), (24, (4, 4, 4)), (32, (6, 5, 5))])
def test_rope_tables_3d_match_per_token_computation(head_dim, sections):
    grid, start_frame, theta = (2, 3, 5), 4, 10000.0
    spec = RopeSpec(head_dim, grid=grid, sections=sections)
    cos, sin = rope_tables(spec, start=start_frame, dtype=torch.float64)
    frames, height, width = grid
    assert cos.shape == (frames * height * width, head_dim // 2)
    for t in range(frames * height * width):
        axis_pos = (start_frame + t // (height * width), (t // width) % height, t % width)
        p = 0
        for axis, n in enumerate(spec.sections):
            for k in range(n):
                angle = axis_pos[axis] * theta ** (-2 * k / (2 * n))
                assert cos[t, p].item() == pytest.approx(math.cos(angle), abs=1e-12)
                assert sin[t, p].item() == pytest.approx(math.sin(angle), abs=1e-12)
                p += 1


def test_rope_3d_apply_matches_complex_rotation():
    """Wan applies RoPE as a complex product of interleaved pairs with exp(i angle)."""
    spec = RopeSpec(128, grid=(2, 3, 4))
    start_frame = 6
    cos, sin = rope_tables(spec, start=start_frame, dtype=torch.float64)
    x = torch.randn(1, 2, cos.shape[0], 128, dtype=torch.float64)
    out = apply_rope(x, cos, sin, interleaved=spec.interleaved)
    frames, height, width = spec.grid
    expected = torch.empty_like(x)
    for t in range(cos.shape[0]):
        pos = (start_frame + t // (height * width), (t // width) % height, t % width)
        angles = torch.cat([pos[a] * 10000.0 ** (-torch.arange(n, dtype=torch.float64) / n)
                            for a, n in enumerate(spec.sections)])
        pairs = torch.view_as_complex(x[:, :, t].reshape(1, 2, 64, 2).contiguous())
        expected[:, :, t] = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_rope_tables_3d_chunk_continues_the_sequence():
    spec = RopeSpec(32, grid=(3, 2, 2))
    whole = rope_tables(spec, num_tokens=6 * 4)
    second_half = rope_tables(spec, num_tokens=3 * 4, start=3)
    torch.testing.assert_close(second_half[0], whole[0][12:], rtol=0, atol=0)


def test_rope_spec_rejects_bad_arguments():
    with pytest.raises(ValueError, match="head_dim"):
        RopeSpec(7)
    with pytest.raises(ValueError, match="layout"):
        RopeSpec(8, layout="gptj")
    with pytest.raises(ValueError, match="sections"):
        RopeSpec(128, grid=(1, 2, 2), sections=(20, 20, 20))
    with pytest.raises(ValueError, match="sections apply to 3-D"):
        RopeSpec(8, sections=(2, 1, 1))
    with pytest.raises(ValueError, match="grid"):
        RopeSpec(8, grid=(1, 2))
    with pytest.raises(ValueError, match="multiple of height"):
        rope_tables(RopeSpec(24, grid=(1, 2, 3)), num_tokens=7)
    with pytest.raises(ValueError, match="needs num_tokens"):
        rope_tables(RopeSpec(8))
    with pytest.raises(TypeError, match="dtype"):
        rope_tables(RopeSpec(8), 4, dtype=torch.bfloat16)


# -------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_cuda_matches_cpu(dtype, interleaved):
    x, cos, sin = make_inputs((2, 12, 333, 128), dtype, start=4680)
    out_cpu = apply_rope(x, cos, sin, interleaved=interleaved)
    out_gpu = apply_rope(x.cuda().transpose(1, 2).contiguous().transpose(1, 2), cos.cuda(), sin.cuda(),
                         interleaved=interleaved)
    # fp32 math on both devices; results may differ by the fused multiply-add rounding of one step.
    assert_error_within(out_gpu.cpu(), rope_reference(x.double(), cos.double(), sin.double(), interleaved),
                        out_cpu)


@pytest.mark.gpu
def test_rope_cuda_rejects_tables_on_another_device():
    x = torch.ones(1, 1, 4, 8, device="cuda")
    with pytest.raises(ValueError, match="same device"):
        apply_rope(x, torch.ones(4, 4), torch.ones(4, 4))


@pytest.mark.gpu
def test_rope_cuda_opcheck():
    x, cos, sin = make_inputs((2, 3, 7, 8), torch.float32, device="cuda")
    torch.library.opcheck(torch.ops.fastdistill.rope.default, (x.requires_grad_(), cos, sin, True))
