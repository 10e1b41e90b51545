"""The StreamDiT transformer: per-frame time, window attention, presets."""

import pytest
import torch
import torch.nn.functional as F

from streamdit.transformer import LatentRefiner, WindowSelfAttention, apply_rope, from_preset, rope_frequencies
from conftest import randomize_zeros


def tiny(**overrides):
    return randomize_zeros(from_preset("tiny", **overrides)).eval()


def inputs(b=2, f=8, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, f, h, w, generator=g), torch.rand(b, f, generator=g), torch.randn(b, 5, 16, generator=g)


def test_shapes_and_seeded_determinism():
    x, tau, text = inputs()
    torch.manual_seed(1)
    out = tiny()(x, tau, text).sample
    assert out.shape == x.shape
    torch.manual_seed(1)
    torch.testing.assert_close(tiny()(x, tau, text).sample, out, atol=0, rtol=0)


def test_untrained_model_predicts_zero_velocity():  # adaLN-Zero: the final layer starts at zero
    x, tau, text = inputs()
    assert from_preset("tiny")(x, tau, text).sample.abs().max() == 0


def test_frames_with_different_tau_get_different_modulation():
    model = tiny()
    x, _, text = inputs(b=1)
    tau = torch.tensor([[1.0, 1.0, 0.8, 0.6, 0.6, 0.4, 0.2, 0.0]])
    seen = {}
    model.blocks[0].adaLN_modulation.register_forward_hook(lambda m, i, o: seen.update(mod=o))
    model(x, tau, text)
    mod = seen["mod"][0]  # (F, 6D): one modulation per frame
    assert torch.equal(mod[0], mod[1]) and torch.equal(mod[3], mod[4])  # same tau, same modulation
    for a, b in [(1, 2), (2, 3), (4, 5), (6, 7)]:
        assert not torch.allclose(mod[a], mod[b])


def test_output_of_a_frame_depends_on_its_own_tau():
    model = tiny(window_size=(1, 4, 4))  # frames do not talk: only the frame's own tau can change its output
    x, tau, text = inputs(b=1)
    other = tau.clone()
    other[0, 3] += 0.3
    a, b = model(x, tau, text).sample, model(x, other, text).sample
    changed = (a - b).abs().amax(dim=(0, 1, 3, 4))
    assert changed[3] > 0 and changed[[0, 1, 2, 4, 5, 6, 7]].abs().max() == 0


def full_attention(module, x, grid):
    """Reference: plain attention over every token with the module's own weights, no windows."""
    q, k, v = module.qkv(x).unflatten(-1, (3, module.num_heads, -1)).unbind(2)  # (B, N, heads, d)
    rope = rope_frequencies(q.shape[-1], grid)
    q, k = apply_rope(module.q_norm(q), rope), apply_rope(module.k_norm(k), rope)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return module.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("window", [(4, 3, 6), (9, 9, 9)])  # exactly the grid, and larger than it
def test_window_attention_equals_full_attention_when_window_covers_grid(shifted, window):
    torch.manual_seed(0)
    module = WindowSelfAttention(32, 2, window, shifted)
    grid = (4, 3, 6)
    x = torch.randn(2, 4 * 3 * 6, 32)
    torch.testing.assert_close(module(x, grid, rope_frequencies(16, grid)), full_attention(module, x, grid))


def test_rope_rotates_each_pair_of_channels_by_its_angle():
    x, angles = torch.randn(2, 6, 3, 8), torch.randn(6, 4) * 3
    out = apply_rope(x, angles)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (N, 1, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], even * cos - odd * sin)
    torch.testing.assert_close(out[..., 1::2], even * sin + odd * cos)


def masked_window_attention(module, x, grid, window, shifted):
    """Reference: full attention where a token sees only the tokens of its own window, the windows laid on the grid
    moved by half a window when shifted (so they wrap around): no regrouping of tokens at all."""
    q, k, v = module.qkv(x).unflatten(-1, (3, module.num_heads, -1)).unbind(2)  # (B, N, heads, d)
    rope = rope_frequencies(q.shape[-1], grid)
    q, k = apply_rope(module.q_norm(q), rope), apply_rope(module.k_norm(k), rope)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).view(-1, 3)  # (N, 3)
    shift = torch.tensor([w // 2 if shifted else 0 for w in window])
    window_of = (coords - shift) % torch.tensor(grid) // torch.tensor(window)  # (N, 3)
    mask = (window_of[:, None] == window_of[None]).all(-1)  # (N, N)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return module.proj(out.transpose(1, 2).flatten(2))


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("window", [(4, 2, 2), (2, 4, 2), (8, 1, 4)])
def test_window_attention_equals_masked_full_attention(shifted, window):
    torch.manual_seed(0)
    module = WindowSelfAttention(32, 2, window, shifted)
    grid = (8, 4, 4)
    x = torch.randn(2, 8 * 4 * 4, 32)
    expected = masked_window_attention(module, x, grid, window, shifted)
    torch.testing.assert_close(module(x, grid, rope_frequencies(16, grid)), expected)


def perturbation_effect(shifted, source, target, grid=(8, 4, 4), window=(4, 2, 2)):
    """How much the output at token `target` (f, y, x) moves when the input at `source` is perturbed."""
    torch.manual_seed(0)
    module = WindowSelfAttention(32, 2, window, shifted)
    rope = rope_frequencies(16, grid)
    x = torch.randn(1, *grid, 32)
    y = x.clone()
    y[(0, *source)] += 1.0
    out_x, out_y = (module(t.flatten(1, 3), grid, rope).view(1, *grid, 32) for t in (x, y))
    return (out_x - out_y)[(0, *target)].abs().max().item()


def test_window_attention_is_local():
    # Plain layer, windows of (4, 2, 2): frames 0-3 / 4-7, rows 0-1 / 2-3, columns 0-1 / 2-3.
    assert perturbation_effect(False, (3, 1, 1), (0, 0, 0)) > 0  # same window
    assert perturbation_effect(False, (4, 0, 0), (0, 0, 0)) == 0  # next window in time
    assert perturbation_effect(False, (0, 2, 0), (0, 0, 0)) == 0  # next window in height
    assert perturbation_effect(False, (7, 3, 3), (0, 0, 0)) == 0  # the far end of the grid


def test_window_attention_shifted_layer_wraps_around():
    # Shifted by (2, 1, 1) with wrap-around: frame 0 now shares a window with frames 6, 7 (wrapped), not 2 .. 5;
    # row 0 with row 3 (wrapped), not rows 1, 2.
    assert perturbation_effect(True, (7, 3, 3), (0, 0, 0)) > 0  # across the wrap, in every axis
    assert perturbation_effect(True, (6, 0, 0), (0, 0, 0)) > 0
    assert perturbation_effect(True, (2, 0, 0), (0, 0, 0)) == 0  # outside the shifted window (inside the plain one)
    assert perturbation_effect(True, (0, 1, 0), (0, 0, 0)) == 0
    assert perturbation_effect(True, (3, 2, 2), (3, 1, 1)) > 0  # an interior shifted window: frames 2-5, rows 1-2
    assert perturbation_effect(True, (3, 1, 1), (4, 0, 0)) == 0


def test_gradient_checkpointing_matches():
    model = tiny()
    x, tau, text = inputs()
    model.train()
    loss = model(x, tau, text).sample.square().mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.enable_gradient_checkpointing()
    loss_ckpt = model(x, tau, text).sample.square().mean()
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()))
    torch.testing.assert_close(loss, loss_ckpt)
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b)


def test_text_mask_hides_padding():
    model = tiny()
    x, tau, text = inputs(b=1)
    mask = torch.tensor([[True, True, False, False, False]])
    noisy = text.clone()
    noisy[:, 2:] = torch.randn(1, 3, 16)
    torch.testing.assert_close(model(x, tau, text, mask).sample, model(x, tau, noisy, mask).sample)


@pytest.mark.parametrize(
    "shape, timestep, message",
    [
        ((1, 4, 8, 5, 4), (1, 8), "patch"),
        ((1, 4, 7, 4, 4), (1, 7), "7 tokens in frames"),
        ((1, 4, 8, 4, 4), (1, 7), r"timestep of shape \(1, 7\) does not match a batch of 1 x 8 frames"),
        ((2, 4, 8, 4, 4), (3,), r"timestep of shape \(3,\) does not match a batch of 2 x 8 frames"),
        ((1, 4, 8, 4, 4), (1, 1, 8), r"timestep of shape \(1, 1, 8\)"),
    ],
)
def test_bad_input_raises(shape, timestep, message):
    model = from_preset("tiny", patch_size=1 if message != "patch" else 2)
    with pytest.raises(ValueError, match=message):
        model(torch.zeros(shape), torch.zeros(timestep), torch.zeros(shape[0], 5, 16))


def test_one_timestep_per_sample_is_shared_by_its_frames():
    model = tiny()
    x, _, text = inputs()
    torch.testing.assert_close(model(x, torch.tensor([0.3, 0.8]), text).sample,
                               model(x, torch.tensor([[0.3] * 8, [0.8] * 8]), text).sample, atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_heads=3), "num_heads=3"),  # 32 does not split into 3 heads
        (dict(hidden_size=36, num_heads=4), "hidden_size=36"),  # heads 9 wide: rotary positions need pairs
        (dict(window_size=(2, 2)), r"window_size=\(2, 2\)"),
        (dict(window_size=(0, 2, 2)), r"window_size=\(0, 2, 2\)"),
        (dict(refiner_channels=8, out_channels=8), "refiner_channels=8 needs out_channels=8"),
        (dict(refiner_channels=-1), "refiner_channels=-1"),
        (dict(patch_size=3), r"patch_size=3 must divide the latent frame of sample_size=\(8, 4, 4\)"),
        (dict(patch_size=0), "patch_size=0"),
        (dict(patch_size=2, sample_size=(8, 4, 5)), r"patch_size=2 .* sample_size=\(8, 4, 5\)"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        from_preset("tiny", **overrides)


def test_presets():
    with torch.device("meta"):  # count the paper-sized model without allocating 16 GB
        large = from_preset("large")
    assert 3.5e9 < sum(p.numel() for p in large.parameters()) < 4.5e9
    assert large.config.sample_size == (16, 64, 64) and large.config.in_channels == 8
    small = from_preset("small")
    assert sum(p.numel() for p in small.parameters()) < 20e6
    with pytest.raises(ValueError, match="huge"):
        from_preset("huge")


def test_sample_prediction_returns_the_velocity_of_its_clean_estimate():
    """prediction_type="sample": the last layer's output is X1, forward gives u = (X1 - X_tau) / max(1 - tau, clip)."""
    velocity = tiny()
    sample = tiny(prediction_type="sample", min_sample_sigma=0.1)
    sample.load_state_dict(velocity.state_dict())  # same weights: the same last-layer output
    x, tau, text = inputs()
    tau[0, :3] = torch.tensor([1.0, 0.95, 0.0])  # clean, inside the clip, pure noise
    x1 = velocity(x, tau, text).sample  # what the shared weights output, read as X1
    sigma = (1 - tau).clamp(min=0.1)[:, None, :, None, None]
    torch.testing.assert_close(sample(x, tau, text).sample, (x1 - x) / sigma)
    with pytest.raises(ValueError, match="prediction_type='noise'"):
        from_preset("tiny", prediction_type="noise")


def test_a_new_refiner_leaves_the_model_as_it_was():
    """refiner_channels adds a LatentRefiner whose last convolution starts at zero: the same DiT weights give the
    same velocity, so a refiner can be added to a trained model and trained from there."""
    plain = tiny()
    refined = from_preset("tiny", refiner_channels=8).eval()
    missing, unexpected = refined.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("refiner.") for name in missing)
    x, tau, text = inputs()
    torch.testing.assert_close(refined(x, tau, text).sample, plain(x, tau, text).sample)
    randomize_zeros(refined.refiner)  # a trained refiner changes it
    assert not torch.allclose(refined(x, tau, text).sample, plain(x, tau, text).sample)


def test_refiner_is_per_frame_local_and_wraps_around():
    """Three 3x3 circular convolutions per frame: a change at column 0 of one frame reaches columns 13..3 of a
    16-wide frame (across the edge: the world is a torus) and nothing else."""
    refiner = randomize_zeros(LatentRefiner(channels=4, width=8, cond_size=6)).eval()
    g = torch.Generator().manual_seed(0)
    x, out, c = torch.randn(1, 4, 3, 16, 16, generator=g), torch.randn(1, 4, 3, 16, 16, generator=g), torch.randn(1, 3, 6)
    moved = x.clone()
    moved[0, :, 1, 8, 0] += 1.0
    change = (refiner(moved, out, c) - refiner(x, out, c)).abs().sum(dim=(0, 1, 3))  # (F, W)
    assert change[[0, 2]].eq(0).all()  # other frames: untouched
    reached = change[1].nonzero().flatten().tolist()
    assert sorted(reached) == [0, 1, 2, 3, 13, 14, 15]

