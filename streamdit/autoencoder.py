"""Temporally causal video autoencoder (deterministic, no KL) for StreamDiT latents.

Every temporal operation only looks at the current and earlier frames and every
normalisation is per frame, so a video can be encoded or decoded chunk by chunk:
given enough left context (``encoder_context_frames`` / ``decoder_context_frames``)
the chunked result equals the whole-video result exactly, which is what streaming needs.
A ``CausalCache`` gives the same result without decoding that context again: it carries
each temporal layer's last input frames from one chunk to the next.

Shape legend: B batch, C channels, T video frames, F latent frames, H, W height and
width (of video frames or latents, as the line says).
"""

import math
from fractions import Fraction
from functools import partial

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class CausalCache:
    """Left context of a causal stack, carried from one chunk to the next (Wan's VAE keeps the same `feat_cache`).

    Layout: ``past[i]`` (B, C_i, p_i, H_i, W_i) is the last p_i input frames of the i-th temporal layer to run, in
    forward order, where p_i is the frames of left context it pads with. Before the first chunk there is none and each
    layer repeats its first frame instead, as a whole-video pass does. A call reads ``past`` and fills ``next``, a
    new list, so the cache it started from stays valid (a stream's state snapshot keeps its own):

        cache = CausalCache()
        for chunk in chunks:
            video = vae.decode(chunk, cache)  # = the whole video's decode, these frames
            cache = CausalCache(cache.next)
    """

    def __init__(self, past: list | None = None):
        self.past = list(past or [])
        self.next = []

    def pad(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, C, frames + T, H, W): x after its `frames` frames of left context."""
        if frames == 0:
            return x
        i = len(self.next)
        past = self.past[i] if i < len(self.past) else x[:, :, :1].expand(-1, -1, frames, -1, -1)
        x = torch.cat([past, x], dim=2)
        self.next.append(x[:, :, -frames:])
        return x


def causal(layers, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    """Runs a causal stack, handing `cache` to the layers that look at earlier frames."""
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, (CausalConv3d, ResBlock, Upsample)) else layer(x)
    return x


class CausalConv3d(nn.Module):
    """3-D conv that pads only on the left in time (replicating the first frame) and with zeros in space."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel_size
        self.time_stride = stride[0]
        # kt - stride frames of left padding keep T / stride output frames, each seeing no later frame
        # than the last one of its own stride window.
        self.time_pad = kt - self.time_stride
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.conv.kernel_size[0] == 1 and self.time_stride == 1:
            # A per-frame conv: run it as conv2d over (B*T) frames, several times faster than conv3d on CPU.
            b, t = x.shape[0], x.shape[2]
            frames = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
            conv = self.conv
            out = F.conv2d(frames, conv.weight[:, :, 0], conv.bias, conv.stride[1:], conv.padding[1:])
            return out.unflatten(0, (b, t)).transpose(1, 2)  # (B, C', T, H', W')
        x = (cache or CausalCache()).pad(x, self.time_pad)  # (B, C, pad + T, H, W)
        return self.conv(x)  # (B, C', T / stride, H', W')


class ChannelRMSNorm(nn.Module):
    """RMS norm over channels at each pixel of each frame, as Wan's VAE does.

    Per pixel and per frame, so nothing leaks across time. Unlike GroupNorm, a uniform frame keeps its colour:
    per-channel statistics over a frame would map every solid background to the same zeros.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rms = x.square().mean(1, keepdim=True).add(self.eps).rsqrt()  # (B, 1, T, H, W)
        return x * rms * self.weight[:, None, None, None]  # (B, C, T, H, W)


class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kt: int = 3):
        super().__init__()
        self.norm1 = ChannelRMSNorm(in_channels)
        self.conv1 = CausalConv3d(in_channels, out_channels, (kt, 3, 3))
        self.norm2 = ChannelRMSNorm(out_channels)
        self.conv2 = CausalConv3d(out_channels, out_channels, (kt, 3, 3))
        self.skip = nn.Identity() if in_channels == out_channels else CausalConv3d(in_channels, out_channels, (1, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)), cache)  # (B, C', T, H, W)
        h = self.conv2(F.silu(self.norm2(h)), cache)  # (B, C', T, H, W)
        return self.skip(x) + h  # (B, C', T, H, W)


def downsample(channels: int, temporal: bool) -> CausalConv3d:
    """Stride-2 conv in space, and in time too (kt=3, left pad 1) when ``temporal``."""
    if temporal:
        return CausalConv3d(channels, channels, (3, 3, 3), (2, 2, 2))
    return CausalConv3d(channels, channels, (1, 3, 3), (1, 2, 2))


class Upsample(nn.Module):
    """Nearest 2x in space, repeat each frame twice when ``temporal``, then a (causal) conv.

    Computed without making the upsampled input: a 3x3 conv over a nearest-upsampled grid gives each of the 4
    sub-pixel positions a 2x2 conv over the low-resolution grid (its taps summed where they fall on the same
    low-resolution pixel), and a causal 3-tap conv over repeated frames gives each of the 2 new frames a 2-tap conv
    over the original ones. All phases run as one conv at the low resolution: 4 (or 8) taps an output value instead of
    9 (or 27), the same weights and the same result (tested against the plain computation, `reference`).

    The one 3-tap conv ties the 2 new frames together: frame 2k gets (w0 + w1) prev + w2 this, frame 2k+1 gets
    w0 prev + (w1 + w2) this, so they differ only by w1 (this - prev), and an object that moves within one input
    frame can only be drawn at its two places through that difference. With ``untied_frames`` each new frame has a
    2-tap conv (prev, this) of its own instead, as Wan's VAE gives each new frame its own channels (`untied`).
    """

    # Rows: sub-pixel (or sub-frame) phase; columns: the 3 taps of the conv; entries: which of the 2 low-resolution
    # neighbours each tap reads. Space: phase 0 reads rows (i-1, i, i), phase 1 rows (i, i, i+1).
    # Time (causal, frames repeated): new frame 2k reads (k-1, k-1, k), frame 2k+1 reads (k-1, k, k).
    SPACE = torch.tensor([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], dtype=torch.float32)  # (phase, tap2, tap3)
    TIME = torch.tensor([[[1, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 1]]], dtype=torch.float32)

    def __init__(self, channels: int, temporal: bool, untied_frames: bool = False):
        super().__init__()
        self.time_factor = 2 if temporal else 1
        self.untied_frames = temporal and untied_frames
        if self.untied_frames:  # per new frame p: a (prev, this) kernel; starts as a tied conv's, see `untied`
            tied = CausalConv3d(channels, channels, (3, 3, 3)).conv
            weight, bias = self.untie(tied.weight, tied.bias)
            self.frame_weight = nn.Parameter(weight)  # (2, C', C, 2, 3, 3): new frame, out, in, (prev, this), y, x
            self.frame_bias = nn.Parameter(bias)  # (2, C')
        else:
            self.conv = CausalConv3d(channels, channels, (3, 3, 3) if temporal else (1, 3, 3))

    @classmethod
    def untie(cls, weight: torch.Tensor, bias: torch.Tensor):
        """A tied conv's (C', C, 3, 3, 3) kernel and (C',) bias as the per-frame (2, C', C, 2, 3, 3) and (2, C') that
        compute the same: what each new frame's taps read of (prev, this), summed."""
        frame_weight = torch.einsum("ptk,ockyx->poctyx", cls.TIME.to(weight), weight)
        return frame_weight.contiguous(), bias.expand(2, -1).clone()

    def time_kernels(self):
        """(frames, C', taps, C, 3, 3) and (frames, C'): each new frame's kernel over the (prev, this) frames, or for a
        spatial-only Upsample one frame's kernel over this frame alone."""
        if self.untied_frames:
            return self.frame_weight.transpose(2, 3), self.frame_bias
        w = self.conv.conv.weight  # (C', C, kt, 3, 3)
        if self.time_factor == 2:
            w = torch.einsum("ptk,ockyx->potcyx", self.TIME.to(w), w)  # (2, C', 2, C, 3, 3)
        else:
            w = w.transpose(1, 2).unsqueeze(0)  # (1, C', 1, C, 3, 3)
        return w, self.conv.conv.bias.expand(self.time_factor, -1)

    def phase_kernels(self):
        """(phases * C', taps * C, 2, 2) and (phases * C',): each (frame, row, column) phase's 3x3 kernel folded into
        one 2x2 kernel over the low-resolution grid, the time taps (previous frame, this frame) stacked along the input
        channels."""
        w, bias = self.time_kernels()  # (pt, C', taps, C, 3, 3), (pt, C')
        space = self.SPACE.to(w)
        w = torch.einsum("aiy,bjx,potcyx->pabotcij", space, space, w)  # (pt, 2, 2, C', taps, C, 2, 2)
        bias = bias[:, None, None].expand(-1, 2, 2, -1)  # (pt, 2, 2, C'): every spatial phase its own copy
        return w.flatten(0, 3).flatten(1, 2), bias.flatten()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.time_factor == 2:  # the previous frame beside each frame; before the first, the first (causal pad)
            previous = (cache or CausalCache()).pad(x, 1)[:, :, :-1]  # (B, C, T, H, W)
            x = torch.cat([previous, x], dim=1)  # (B, 2C, T, H, W)
        frames = x.transpose(1, 2).flatten(0, 1)  # (B*T, taps*C, H, W)
        kernels, bias = self.phase_kernels()
        out = F.conv2d(F.pad(frames, (1, 1, 1, 1)), kernels, bias)  # (B*T, phases*C', H+1, W+1)
        out = out.unflatten(1, (self.time_factor, 2, 2, -1))  # (B*T, pt, 2, 2, C', H+1, W+1)
        # phase (a, b) reads the padded grid from offset (a, b): rows a .. a+H-1 of the conv's output
        out = torch.stack([torch.stack([out[:, :, a, bb, :, a : a + h, bb : bb + w] for bb in (0, 1)], -1)
                           for a in (0, 1)], -3)  # (B*T, pt, C', H, 2, W, 2)
        out = out.unflatten(0, (b, t)).permute(0, 3, 1, 2, 4, 5, 6, 7)  # (B, C', T, pt, H, 2, W, 2)
        return out.reshape(b, -1, t * self.time_factor, 2 * h, 2 * w)  # (B, C', T * factor, 2H, 2W)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain computation: repeat frames, upsample, conv (what `forward` equals); untied, each new frame's own
        2-tap causal conv over the upsampled original frames, the new frames interleaved."""
        if self.untied_frames:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # (B, C, T, 2H, 2W)
            x = torch.cat([x[:, :, :1], x], dim=2)  # (B, C, 1 + T, 2H, 2W): the first frame as causal padding
            new = [F.conv3d(x, self.frame_weight[p], self.frame_bias[p], padding=(0, 1, 1)) for p in (0, 1)]
            return torch.stack(new, 3).flatten(2, 3)  # (B, C', 2T, 2H, 2W)
        x = x.repeat_interleave(self.time_factor, dim=2)  # (B, C, T * factor, H, W)
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")  # (B, C, T * factor, 2H, 2W)
        return self.conv(x)  # (B, C, T * factor, 2H, 2W)


def causal_lookback(module: nn.Module) -> Fraction:
    """How many input frames before its own ones the first output frame of ``module`` depends on.

    Walks the layers in registration order, which encoder and decoder keep equal to forward order.
    ``span`` is how many input frames one frame at the current depth covers.
    """
    lookback, span = Fraction(0), Fraction(1)
    for layer in module.modules():
        if isinstance(layer, Upsample):
            lookback += span if layer.untied_frames else 0  # its (prev, this) kernels: one input frame back
            span /= layer.time_factor  # a tied one's conv counts below, at the new frames' rate
        elif isinstance(layer, CausalConv3d):
            lookback += layer.time_pad * span
            span *= layer.time_stride
    return lookback


class TextFiLM(nn.Module):
    """Feature-wise modulation of decoder features by the prompt: x (1 + scale) + shift, per channel, from the pooled
    text states (`text.pooled`). A latent that the DiT left between two shapes (a square with soft corners is also
    a circle) decodes to their blend under a pixel loss; told which shape the prompt asked for, the decoder can draw
    that one. The projection starts at zero, so a decoder that gains it starts out drawing what it drew."""

    def __init__(self, channels: int, text_channels: int):
        super().__init__()
        self.proj = nn.Linear(text_channels, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        text = text.to(self.proj.weight.dtype)  # (B, E), however its text encoder ran
        scale, shift = self.proj(text).to(x.dtype)[:, :, None, None, None].chunk(2, dim=1)  # (B, C, 1, 1, 1) each
        return x * (1 + scale) + shift  # (B, C, T, H, W)


def stages(channels: list, layers_per_block: int, resample, flags: list, kt: int, first_kt: int | None = None) -> list:
    """Per stage ``layers_per_block`` ResBlocks (temporal kernel ``first_kt`` in the first stage, ``kt`` after), then
    ``resample(channels, flag)`` between stages."""
    layers = []
    for i, c in enumerate(channels):
        k = first_kt if i == 0 and first_kt is not None else kt
        layers += [ResBlock(channels[max(i - 1, 0)] if j == 0 else c, c, k) for j in range(layers_per_block)]
        if i < len(flags):
            layers.append(resample(c, flags[i]))
    return layers


def head(channels: int, out_channels: int, kt: int) -> list:
    return [ChannelRMSNorm(channels), nn.SiLU(), CausalConv3d(channels, out_channels, (kt, 3, 3))]


class StreamDiTAutoencoder(ModelMixin, ConfigMixin):
    """Causal video autoencoder: (B, 3, T, H, W) in [-1, 1] <-> normalised latents (B, C, F, H / s, W / s)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 8,
        block_out_channels: tuple = (32, 64, 128, 128),
        temporal_downsample: tuple = (True, True, False),
        layers_per_block: int = 1,
        temporal_kernel_size: int = 3,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        decoder_block_out_channels: tuple | None = None,
        decoder_layers_per_block: int | None = None,
        decoder_latent_temporal_kernel_size: int | None = None,
        decoder_untied_frames: bool = False,
        decoder_text_channels: int | None = None,
    ):
        super().__init__()
        channels, flags = list(block_out_channels), [bool(f) for f in temporal_downsample]
        # The decoder may be wider or deeper than the encoder (None: it mirrors the encoder). Only the decoder then
        # changes, so a sharper decoder can be trained for latents a DiT was already trained on.
        decoder_channels = list(decoder_block_out_channels or channels)
        decoder_layers = decoder_layers_per_block or layers_per_block
        if len(flags) != len(channels) - 1:
            raise ValueError(
                f"temporal_downsample={tuple(temporal_downsample)} needs len(block_out_channels) - 1 = "
                f"{len(channels) - 1} entries"
            )
        if len(decoder_channels) != len(channels):
            raise ValueError(
                f"decoder_block_out_channels={tuple(decoder_channels)} needs {len(channels)} entries, one per "
                f"stage of block_out_channels={tuple(channels)}"
            )
        if min(layers_per_block, decoder_layers) < 1:
            raise ValueError(
                f"layers_per_block={layers_per_block} and decoder_layers_per_block={decoder_layers_per_block} "
                "must be at least 1"
            )
        if temporal_kernel_size < 1:
            raise ValueError(f"temporal_kernel_size={temporal_kernel_size} must be at least 1")
        if decoder_latent_temporal_kernel_size is not None and decoder_latent_temporal_kernel_size < 1:
            raise ValueError(
                f"decoder_latent_temporal_kernel_size={decoder_latent_temporal_kernel_size} must be at least 1 (or None)"
            )
        # temporal_kernel_size=1 makes every conv but the temporal resampling per-frame: the decoder then needs only a
        # frame or two of left context, so streaming decodes little more than the chunk itself.
        top, bottom, kt = channels[0], channels[-1], temporal_kernel_size
        self.encoder = nn.Sequential(
            CausalConv3d(in_channels, top, (kt, 3, 3)),
            *stages(channels, layers_per_block, downsample, flags, kt),
            ResBlock(bottom, bottom, kt),  # mid block
            *head(bottom, latent_channels, kt),
        )
        # The decoder mirrors the encoder: mid block first, widest stage first, temporal upsampling reversed.
        # Its layers at the latents' resolution (input conv, mid block, first stage) may look further back in time
        # (decoder_latent_temporal_kernel_size, None: kt): there a temporal conv is cheap, and earlier latent frames
        # show the same object again, more evidence of its shape than one latent frame holds.
        # With decoder_untied_frames each frame a temporal upsampling makes has its own kernel (see Upsample): one
        # latent frame holds four video frames, and a quickly moving object is in four places across them.
        lt = decoder_latent_temporal_kernel_size or kt
        upsample = partial(Upsample, untied_frames=decoder_untied_frames)
        self.decoder = nn.Sequential(
            CausalConv3d(latent_channels, decoder_channels[-1], (lt, 3, 3)),
            ResBlock(decoder_channels[-1], decoder_channels[-1], lt),  # mid block
            *stages(decoder_channels[::-1], decoder_layers, upsample, flags[::-1], kt, first_kt=lt),
            *head(decoder_channels[0], in_channels, kt),
        )
        # With decoder_text_channels the decoder also reads the prompt (`TextFiLM`, pooled text states of that width)
        # after its input conv and after every ResBlock. Kept apart from `decoder` so its weights keep their names.
        self.decoder_film = nn.ModuleDict()
        if decoder_text_channels is not None:
            if decoder_text_channels < 1:
                raise ValueError(f"decoder_text_channels={decoder_text_channels} must be at least 1 (or None)")
            channels_out = {0: decoder_channels[-1]}
            channels_out.update({i: layer.conv2.conv.out_channels for i, layer in enumerate(self.decoder)
                                 if isinstance(layer, ResBlock)})
            self.decoder_film = nn.ModuleDict({str(i): TextFiLM(c, decoder_text_channels)
                                               for i, c in channels_out.items()})
        t_c = self.temporal_compression
        self._decoder_context = math.ceil(causal_lookback(self.decoder))
        self._encoder_context = math.ceil(causal_lookback(self.encoder) / t_c) * t_c

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(f) for f in self.config.temporal_downsample)

    @property
    def decoder_context_frames(self) -> int:
        """Latent frames of left context that make chunked decoding equal whole-video decoding."""
        return self._decoder_context

    @property
    def encoder_context_frames(self) -> int:
        """Video frames (a multiple of temporal_compression) of left context for exact chunked encoding."""
        return self._encoder_context

    def _check(self, x: torch.Tensor, name: str, channels: int, t_multiple: int, hw_multiple: int):
        ok = x.ndim == 5 and x.shape[1] == channels and x.shape[2] % t_multiple == 0
        if not ok or x.shape[3] % hw_multiple or x.shape[4] % hw_multiple:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} must be (B, {channels}, T, H, W) with T a multiple of "
                f"{t_multiple} and H, W multiples of {hw_multiple}"
            )

    def encode(self, video: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """Video -> latents. With `cache` (CausalCache) this video continues the one encoded before with it."""
        cfg = self.config
        self._check(video, "video", cfg.in_channels, self.temporal_compression, self.spatial_compression)
        z = causal(self.encoder, video, cache)  # (B, C, F, H / s, W / s)
        return (z - cfg.shift_factor) * cfg.scaling_factor  # (B, C, F, H / s, W / s)

    def decode(self, latents: torch.Tensor, cache: CausalCache | None = None,
               text: torch.Tensor | None = None) -> torch.Tensor:
        """Latents -> video. With `cache` (CausalCache) these latents continue the ones decoded before with it.
        `text` (B, E): the prompt's pooled text states, for a decoder with decoder_text_channels (None: no
        modulation, which is what such a decoder drew before it learned to read the prompt); others ignore it."""
        cfg = self.config
        self._check(latents, "latents", cfg.latent_channels, 1, 1)
        z = latents / cfg.scaling_factor + cfg.shift_factor  # (B, C, F, H, W)
        if text is None or not self.decoder_film:
            # No final tanh: a linear head keeps reconstruction gradients alive near +-1; clamp when making pixels.
            return causal(self.decoder, z, cache)  # (B, 3, F * t_c, H * s, W * s)
        if text.ndim != 2 or text.shape != (z.shape[0], cfg.decoder_text_channels):
            raise ValueError(f"text of shape {tuple(text.shape)} must be (B, {cfg.decoder_text_channels}) with B = "
                             f"{z.shape[0]}, the latents' batch")
        for i, layer in enumerate(self.decoder):
            z = causal([layer], z, cache)
            if str(i) in self.decoder_film:
                z = self.decoder_film[str(i)](z, text)
        return z  # (B, 3, F * t_c, H * s, W * s)

    def forward(self, video: torch.Tensor | None = None, latent_noise: float = 0.0, generator=None,
                latents: torch.Tensor | None = None, text: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction. ``latent_noise`` > 0 (training only) adds sigma * std(z) * eps to the latents, sigma ~
        U[0, latent_noise] per clip: a decoder trained so maps the slightly-off latents a DiT produces to clean frames
        rather than blobs. The noise is relative to the latents' own (detached) spread, so an encoder cannot shout
        over it by growing its latents. With ``latents`` (made elsewhere, e.g. redrawn by a DiT) it decodes those
        instead of encoding ``video``: training the decoder on them through forward keeps DDP's gradient sync. ``text``
        goes to `decode`."""
        if latents is not None:
            return self.decode(latents, text=text)  # (B, 3, T, H, W)
        z = self.encode(video)  # (B, C, F, H / s, W / s)
        if latent_noise > 0:
            sigma = torch.rand(z.shape[0], generator=generator).to(z.device) * latent_noise  # (B,)
            eps = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
            z = z + sigma.view(-1, 1, 1, 1, 1) * z.detach().std() * eps
        return self.decode(z, text=text)  # (B, 3, T, H, W)
