import re

import pytest
import torch

from streamdit.autoencoder import CausalCache, CausalConv3d, StreamDiTAutoencoder

TINY = dict(block_out_channels=(8, 8, 8), temporal_downsample=(True, True))


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return StreamDiTAutoencoder(**TINY).eval()


def test_compression_and_context():
    default = StreamDiTAutoencoder()
    assert (default.spatial_compression, default.temporal_compression) == (8, 4)
    assert (default.decoder_context_frames, default.encoder_context_frames) == (19, 76)
    tiny = StreamDiTAutoencoder(**TINY)
    assert (tiny.spatial_compression, tiny.temporal_compression) == (4, 4)
    assert (tiny.decoder_context_frames, tiny.encoder_context_frames) == (15, 60)


@torch.no_grad()
def test_shapes(vae):
    video = torch.rand(2, 3, 8, 16, 24) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (2, 8, 2, 4, 6)
    assert vae.decode(latents).shape == video.shape
    assert vae(video).shape == video.shape


# extra: latent frames of context beyond decoder_context_frames (None: no context at all). The -1 case
# shows the analytic context is tight, the None case that the comparison can fail at all.
@pytest.mark.parametrize(
    "k, c, extra, exact", [(16, 2, 0, True), (17, 3, 0, True), (17, 3, 2, True), (16, 2, -1, False), (16, 2, None, False)]
)
@torch.no_grad()
def test_chunked_decoding_matches_whole(vae, k, c, extra, exact):
    torch.manual_seed(1)
    latents = torch.randn(1, 8, 20, 4, 4)
    t_c = vae.temporal_compression
    whole = vae.decode(latents)[:, :, k * t_c : (k + c) * t_c]
    ctx = 0 if extra is None else vae.decoder_context_frames + extra
    chunk = vae.decode(latents[:, :, k - ctx : k + c])[:, :, -c * t_c :]
    diff = (chunk - whole).abs().max().item()
    assert diff < 1e-5 if exact else diff > 1e-4


@pytest.mark.parametrize("kt, untied", [(3, False), (1, False), (1, True)])
@torch.no_grad()
def test_cached_chunked_decoding_matches_whole(kt, untied):
    """A CausalCache carries each temporal layer's last input frames: chunks decoded one after the other equal the
    whole decode, each frame decoded once; a cache is not changed by the call that reads it."""
    torch.manual_seed(3)
    vae = StreamDiTAutoencoder(**TINY, temporal_kernel_size=kt, decoder_untied_frames=untied).eval()
    latents = torch.randn(1, 8, 9, 4, 4)
    whole = vae.decode(latents)
    cache, caches, parts = CausalCache(), [], []
    for start, end in [(0, 2), (2, 3), (3, 5), (5, 9)]:
        parts.append(vae.decode(latents[:, :, start:end], cache))
        caches.append(cache)
        cache = CausalCache(cache.next)
    assert [p.shape[2] for p in parts] == [8, 4, 8, 16]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    again = vae.decode(latents[:, :, 3:5], CausalCache(caches[2].past))  # the third chunk again, from its cache
    torch.testing.assert_close(again, parts[2], rtol=0, atol=0)
    fresh = vae.decode(latents[:, :, 3:5])  # no cache: the chunk starts from a blank past
    assert (fresh - parts[2]).abs().max() > 1e-3


@pytest.mark.parametrize("kt", [3, 1])
@torch.no_grad()
def test_cached_chunked_encoding_matches_whole(kt):
    """The same for the encoder, whose temporal downsampling is strided: chunks of whole latent frames."""
    torch.manual_seed(4)
    vae = StreamDiTAutoencoder(**TINY, temporal_kernel_size=kt).eval()
    video = torch.rand(1, 3, 36, 8, 8) * 2 - 1
    whole = vae.encode(video)
    cache, parts = CausalCache(), []
    for start, end in [(0, 8), (8, 12), (12, 20), (20, 36)]:
        parts.append(vae.encode(video[:, :, start:end], cache))
        cache = CausalCache(cache.next)
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    assert (vae.encode(video[:, :, 12:20]) - parts[2]).abs().max() > 1e-3  # without the cache: a blank past


# extra: latent frames (temporal_compression video frames each) of context beyond encoder_context_frames.
@pytest.mark.parametrize(
    "k, c, extra, exact", [(16, 2, 0, True), (17, 1, 0, True), (16, 2, 1, True), (16, 2, -1, False), (16, 2, None, False)]
)
@torch.no_grad()
def test_chunked_encoding_matches_whole(vae, k, c, extra, exact):
    torch.manual_seed(2)
    video = torch.rand(1, 3, 72, 16, 16) * 2 - 1
    t_c = vae.temporal_compression
    whole = vae.encode(video)[:, :, k : k + c]
    ctx = 0 if extra is None else vae.encoder_context_frames + extra * t_c
    chunk = vae.encode(video[:, :, k * t_c - ctx : (k + c) * t_c])[:, :, -c:]
    diff = (chunk - whole).abs().max().item()
    assert diff < 1e-5 if exact else diff > 1e-4


@pytest.mark.parametrize(
    "method, shape",
    [
        ("encode", (1, 3, 6, 16, 16)),  # T not a multiple of 4
        ("encode", (1, 3, 8, 16, 18)),  # W not a multiple of 4
        ("encode", (1, 4, 8, 16, 16)),  # wrong channels
        ("encode", (3, 8, 16, 16)),  # no batch dimension
        ("decode", (1, 3, 2, 4, 4)),  # wrong latent channels
    ],
)
def test_bad_shapes_raise(vae, method, shape):
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        getattr(vae, method)(torch.zeros(shape))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="temporal_downsample"):
        StreamDiTAutoencoder(block_out_channels=(8, 8, 8), temporal_downsample=(True,))
    with pytest.raises(ValueError, match=re.escape("decoder_block_out_channels=(8, 8)")):
        StreamDiTAutoencoder(**TINY, decoder_block_out_channels=(8, 8))
    with pytest.raises(ValueError, match="decoder_layers_per_block=0|layers_per_block=0"):
        StreamDiTAutoencoder(**TINY, layers_per_block=0)


@torch.no_grad()
def test_wider_decoder_behind_the_same_encoder():
    """A decoder of its own widths and depth: the encoder (so the latent space) is the mirrored model's, and chunked
    decoding with the computed context stays exact."""
    torch.manual_seed(0)
    plain = StreamDiTAutoencoder(**TINY).eval()
    wide = StreamDiTAutoencoder(**TINY, decoder_block_out_channels=(4, 8, 16), decoder_layers_per_block=2).eval()
    wide.encoder.load_state_dict(plain.encoder.state_dict())
    assert [p.shape for p in wide.encoder.parameters()] == [p.shape for p in plain.encoder.parameters()]
    widths = [m.conv.out_channels for m in wide.decoder.modules() if type(m).__name__ == "CausalConv3d"]
    assert 16 in widths and 4 in widths and max(widths) == 16  # (4, 8, 16): full resolution first
    resblocks = sum(type(m).__name__ == "ResBlock" for m in wide.decoder)
    assert resblocks == 1 + 3 * 2  # mid block + two per stage
    video = torch.rand(1, 3, 16, 16, 16) * 2 - 1
    torch.testing.assert_close(wide.encode(video), plain.encode(video), rtol=0, atol=0)
    latents = torch.randn(1, 8, 6, 4, 4)
    whole = wide.decode(latents)
    assert whole.shape == (1, 3, 24, 16, 16)
    ctx, k = wide.decoder_context_frames, 3
    chunk = wide.decode(latents[:, :, k - ctx if k >= ctx else 0 :])[:, :, -(6 - k) * 4 :]
    torch.testing.assert_close(chunk, whole[:, :, k * 4 :], rtol=0, atol=1e-5)


def test_normalisation_round_trips():
    torch.manual_seed(0)
    plain = StreamDiTAutoencoder(**TINY).eval()
    scaled = StreamDiTAutoencoder(**TINY, scaling_factor=0.5, shift_factor=0.25).eval()
    scaled.load_state_dict(plain.state_dict())
    video = torch.rand(1, 3, 4, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(scaled.encode(video), (plain.encode(video) - 0.25) * 0.5)
        torch.testing.assert_close(scaled(video), plain(video))


@torch.no_grad()
def test_save_load_round_trip(vae, tmp_path):
    vae.save_pretrained(tmp_path)
    loaded = StreamDiTAutoencoder.from_pretrained(tmp_path).eval()
    assert loaded.decoder_context_frames == vae.decoder_context_frames
    video = torch.rand(1, 3, 8, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(video), vae(video), rtol=0, atol=0)


def test_per_frame_convs_keep_context_small_and_chunking_exact():
    """temporal_kernel_size=1: only the temporal resampling mixes frames, so streaming decodes need little context."""
    torch.manual_seed(0)
    vae = StreamDiTAutoencoder(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), temporal_downsample=(False, True, True),
        temporal_kernel_size=1,
    ).eval()
    assert vae.decoder_context_frames <= 2 and vae.encoder_context_frames <= 4
    z = torch.randn(1, 4, 8, 2, 2)
    with torch.no_grad():
        whole = vae.decode(z)
        k, ctx = 5, vae.decoder_context_frames
        chunk = vae.decode(z[:, :, k - ctx : k + 2])[:, :, ctx * 4 :]
    torch.testing.assert_close(chunk, whole[:, :, k * 4 : (k + 2) * 4], atol=1e-5, rtol=0)


@torch.no_grad()
def test_latent_noise_is_relative_to_the_latents_spread(vae):
    """Training-time decoder noise: none by default, seeded, and sigma * std(z) * eps with sigma ~ U[0, max]."""
    video = torch.rand(3, 3, 8, 16, 16) * 2 - 1
    torch.testing.assert_close(vae(video), vae.decode(vae.encode(video)), rtol=0, atol=0)
    a = vae(video, latent_noise=0.5, generator=torch.Generator().manual_seed(3))
    b = vae(video, latent_noise=0.5, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    z = vae.encode(video)
    g = torch.Generator().manual_seed(3)
    sigma, eps = torch.rand(3, generator=g) * 0.5, torch.randn(z.shape, generator=g)
    torch.testing.assert_close(a, vae.decode(z + sigma.view(-1, 1, 1, 1, 1) * z.std() * eps), rtol=0, atol=1e-6)
    assert not torch.allclose(a, vae(video))


@pytest.mark.parametrize("temporal", [False, True])
@torch.no_grad()
def test_upsample_at_low_resolution_equals_upsampling_then_conv(temporal):
    """The phase-folded Upsample gives what repeating frames, nearest upsampling and the causal conv give, from the
    first frame (replicated as causal padding) to the last, at every border."""
    from streamdit.autoencoder import Upsample

    torch.manual_seed(0)
    up = Upsample(6, temporal)
    torch.nn.init.normal_(up.conv.conv.bias)
    x = torch.randn(2, 6, 5, 4, 7)
    out = up(x)
    assert out.shape == (2, 6, 5 * (2 if temporal else 1), 8, 14)
    torch.testing.assert_close(out, up.reference(x), rtol=0, atol=1e-5)


@torch.no_grad()
def test_untied_frames_upsample_equals_its_plain_computation_and_starts_as_the_tied_one():
    """Untied, each new frame has its own (prev, this) kernel: the phase-folded forward equals the two causal convs
    over the upsampled frames, interleaved; `untie` of a tied conv draws exactly what it drew; and a tied Upsample
    cannot make its two frames differ except through (this - prev), which an untied one can."""
    from streamdit.autoencoder import Upsample

    torch.manual_seed(0)
    tied = Upsample(6, True)
    torch.nn.init.normal_(tied.conv.conv.bias)
    untied = Upsample(6, True, untied_frames=True)
    x = torch.randn(2, 6, 5, 4, 7)
    weight, bias = Upsample.untie(tied.conv.conv.weight, tied.conv.conv.bias)
    untied.frame_weight.copy_(weight), untied.frame_bias.copy_(bias)
    torch.testing.assert_close(untied(x), tied(x), rtol=0, atol=1e-5)
    torch.nn.init.normal_(untied.frame_weight), torch.nn.init.normal_(untied.frame_bias)
    out = untied(x)
    assert out.shape == (2, 6, 10, 8, 14)
    torch.testing.assert_close(out, untied.reference(x), rtol=0, atol=1e-4)
    still = x[:, :, :1].expand(-1, -1, 5, -1, -1)  # a frame held still: this - prev = 0
    torch.testing.assert_close(tied(still)[:, :, 2], tied(still)[:, :, 3], rtol=0, atol=1e-5)  # one frame twice
    assert (untied(still)[:, :, 2] - untied(still)[:, :, 3]).abs().max() > 0.1


def test_untied_frames_change_only_the_decoder_and_not_its_context():
    """(Cached chunked decoding with untied frames: test_cached_chunked_decoding_matches_whole.)"""
    config = dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), temporal_downsample=(False, True, True),
                  temporal_kernel_size=1)
    vae, plain = StreamDiTAutoencoder(**config, decoder_untied_frames=True), StreamDiTAutoencoder(**config)
    assert vae.decoder_context_frames == plain.decoder_context_frames
    assert [p.shape for p in vae.encoder.parameters()] == [p.shape for p in plain.encoder.parameters()]
    assert sum(p.numel() for p in vae.decoder.parameters()) > sum(p.numel() for p in plain.decoder.parameters())


@torch.no_grad()
def test_decoder_looks_further_back_at_the_latents_resolution():
    """decoder_latent_temporal_kernel_size sets the temporal kernel of the decoder's input conv, mid block and first
    stage only (the layers at the latents' resolution); the encoder and the rest keep theirs, and cached chunked
    decoding stays equal to the whole decode over the longer context."""
    torch.manual_seed(0)
    config = dict(latent_channels=4, block_out_channels=(8, 8, 8, 8), temporal_downsample=(False, True, True),
                  temporal_kernel_size=1)
    plain = StreamDiTAutoencoder(**config).eval()
    vae = StreamDiTAutoencoder(**config, decoder_latent_temporal_kernel_size=3).eval()
    kernels = [m.conv.kernel_size[0] for m in vae.decoder.modules() if isinstance(m, CausalConv3d)]
    plain_kernels = [m.conv.kernel_size[0] for m in plain.decoder.modules() if isinstance(m, CausalConv3d)]
    assert kernels[:5] == [3] * 5 and plain_kernels[:5] == [1] * 5  # input conv, mid block, first-stage ResBlock
    assert kernels[5:] == plain_kernels[5:]
    assert [p.shape for p in vae.encoder.parameters()] == [p.shape for p in plain.encoder.parameters()]
    assert vae.decoder_context_frames == plain.decoder_context_frames + 10  # 5 convs, 2 frames back each
    latents = torch.randn(1, 4, 14, 2, 2)
    whole = vae.decode(latents)
    cache, parts = CausalCache(), []
    for start, end in [(0, 2), (2, 5), (5, 14)]:
        parts.append(vae.decode(latents[:, :, start:end], cache))
        cache = CausalCache(cache.next)
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    changed = latents.clone()
    changed[:, :, 3] += 1  # a change three latent frames back reaches this one's frames only through the new taps
    assert (vae.decode(changed) - whole)[:, :, 6 * 4 :].abs().max() > 1e-4
    torch.testing.assert_close(plain.decode(changed)[:, :, 6 * 4 :], plain.decode(latents)[:, :, 6 * 4 :])
    with pytest.raises(ValueError, match="decoder_latent_temporal_kernel_size=0"):
        StreamDiTAutoencoder(**config, decoder_latent_temporal_kernel_size=0)


def test_a_decoder_that_reads_the_prompt_starts_as_the_plain_one_and_streams_chunk_by_chunk():
    """TextFiLM starts at zero, so the same weights decode the same frames; once it has learned something, decoding
    chunk by chunk with a CausalCache still equals decoding the whole, and the text changes the frames."""
    torch.manual_seed(0)
    plain = StreamDiTAutoencoder(latent_channels=4, block_out_channels=(8, 8, 8), temporal_downsample=(True, True))
    vae = StreamDiTAutoencoder(**{**plain.config, "decoder_text_channels": 6})
    missing, unexpected = vae.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("decoder_film.") for name in missing)
    latents, text = torch.randn(2, 4, 6, 4, 4), torch.randn(2, 6)
    with torch.no_grad():
        assert torch.equal(vae.decode(latents, text=text), plain.decode(latents))
        for film in vae.decoder_film.values():
            torch.nn.init.normal_(film.proj.weight)
        whole = vae.decode(latents, text=text)
        assert (whole - plain.decode(latents)).abs().amax() > 1e-3
        assert torch.equal(vae.decode(latents), plain.decode(latents))  # no text: no modulation
        cache, parts = CausalCache(), []
        for start, end in ((0, 2), (2, 3), (3, 6)):
            parts.append(vae.decode(latents[:, :, start:end], cache, text))
            cache = CausalCache(cache.next)
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"text of shape \(2, 5\) must be \(B, 6\)"):
        vae.decode(latents, text=torch.randn(2, 5))
    with pytest.raises(ValueError, match="decoder_text_channels=0 must be at least 1"):
        StreamDiTAutoencoder(decoder_text_channels=0)
