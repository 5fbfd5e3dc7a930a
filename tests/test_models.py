"""fastdistill.models: shapes and errors, and the causal TinyDiT's cache rollout against its
teacher-forced chunk-causal forward."""

from __future__ import annotations

import pytest
import torch

from fastdistill.models import AdaLNMLP, TinyDiT


def test_adaln_mlp_shapes_features_and_errors():
    net = AdaLNMLP(3, width=16, depth=2)
    out, features = net(torch.randn(5, 3), torch.rand(5), return_features=True)
    assert out.shape == (5, 3) and features.shape == (5, 16)
    with pytest.raises(ValueError, match=r"x must be \[N, 3\]"):
        net(torch.randn(5, 2), torch.rand(5))
    with pytest.raises(ValueError, match=r"t must be \[N\]"):
        net(torch.randn(5, 3), torch.rand(4))


def test_tiny_dit_images_roundtrip_patches_and_errors():
    net = TinyDiT(1, 8, 8, dim=24, heads=2, depth=1)
    x = torch.randn(3, 1, 8, 8)
    assert net(x, torch.rand(3)).shape == x.shape
    # Patchify / unpatchify are inverse: the token layout is what RoPE and the masks assume.
    video = torch.randn(2, 1, 1, 8, 8)
    torch.testing.assert_close(net._pixels(net._tokens(video), 1), video)
    with pytest.raises(ValueError, match="multiples of patch"):
        TinyDiT(1, 7, 8)
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        net(torch.randn(3, 2, 8, 8), torch.rand(3))


def _causal_dit():
    torch.manual_seed(0)
    net = TinyDiT(1, 4, 4, frames=6, frames_per_chunk=2, patch=2, dim=24, heads=2, depth=2).double()
    for name, p in net.named_parameters():
        if "modulation" in name:  # adaLN-Zero starts as the identity; give the blocks something to do
            torch.nn.init.normal_(p, std=0.3)
    return net


def test_causal_rollout_with_the_cache_equals_the_teacher_forced_forward():
    net = _causal_dit()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 6, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.1  # a time per frame (diffusion forcing)
    full = net(x, t)
    cache = net.new_cache(2)
    chunks = []
    for c in range(3):
        frames = slice(2 * c, 2 * c + 2)
        noisy_pass = net.forward_chunk(torch.randn(2, 1, 2, 4, 4, dtype=torch.float64), t[:, frames], cache)
        assert noisy_pass.shape == (2, 1, 2, 4, 4)  # a denoising pass first: overwritten by the next attend
        chunks.append(net.forward_chunk(x[:, :, frames], t[:, frames], cache))
        cache.commit()
    torch.testing.assert_close(torch.cat(chunks, 2), full, rtol=0, atol=1e-12)


def test_causal_forward_does_not_look_ahead():
    net = _causal_dit()
    x = torch.randn(1, 1, 6, 4, 4, dtype=torch.float64)
    t = torch.full((1,), 0.7, dtype=torch.float64)
    changed = x.clone()
    changed[:, :, 4:] += 1.0  # the last chunk
    a, b = net(x, t), net(changed, t)
    torch.testing.assert_close(a[:, :, :4], b[:, :, :4], rtol=0, atol=0)
    assert not torch.allclose(a[:, :, 4:], b[:, :, 4:])
    with pytest.raises(ValueError, match="not causal"):
        TinyDiT(1, 4, 4).new_cache(1)


def test_per_frame_times_condition_their_own_frames():
    """Modulations are computed per frame and broadcast over the frame's tokens: a frame's time must
    reach that frame's tokens (and, causally, only later chunks), and [N] times equal [N, T] copies."""
    net = _causal_dit()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 6, 4, 4, generator=g, dtype=torch.float64)
    t = torch.rand(2, 6, generator=g, dtype=torch.float64) + 0.1
    base = net(x, t)
    later = t.clone()
    later[:, 4:] += 0.3  # the last chunk's times
    moved = net(x, later)
    torch.testing.assert_close(moved[:, :, :4], base[:, :, :4], rtol=0, atol=0)
    assert (moved[:, :, 4:] - base[:, :, 4:]).abs().amax().item() > 1e-3
    first = t.clone()
    first[:, 0] += 0.3  # frame 0 alone: its own output moves
    assert (net(x, first)[:, :, 0] - base[:, :, 0]).abs().amax().item() > 1e-3
    shared = torch.full((2,), 0.6, dtype=torch.float64)
    torch.testing.assert_close(net(x, shared), net(x, shared[:, None].expand(2, 6)), rtol=0, atol=1e-12)
