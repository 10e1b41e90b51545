"""StreamDiT transformer: an adaLN DiT with a per-frame time embedding and 3D window attention (paper Sec. 4.1).

Shape legend
    B  batch                     C  latent channels          F  frames in the buffer
    H, W  latent height, width   h, w  token grid (H / p, W / p), p the patch size
    S  tokens per frame (h * w)  D  model width              L  text tokens, E text width
    n  windows (B * F/Fw * h/Hw * w/Ww)    M  tokens per window (Fw * Hw * Ww)    d  head width

Reads top to bottom: embedders, rotary positions, window attention, the block, the final layer, the model,
then the named size presets.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange


def modulate(x, shift, scale):
    # x (B, F, S, D); shift, scale (B, F, D): every frame gets its own modulation (the paper's varying time embedding)
    return x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)


class TimestepEmbedder(nn.Module):
    """Embeds the flow time tau in [0, 1] of every frame (paper convention: 0 is noise, 1 is data)."""

    def __init__(self, hidden_size, frequency_size=256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def sinusoid(self, tau):
        # tau (B, F) -> (B, F, frequency_size); scaled by 1000 so neighbouring levels are far apart in phase
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=tau.device, dtype=torch.float32) / half)
        angles = 1000.0 * tau.float().unsqueeze(-1) * freqs  # (B, F, half)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, tau):
        return self.mlp(self.sinusoid(tau).to(self.mlp[0].weight.dtype))  # (B, F, D)


def rope_frequencies(head_dim, grid, theta=10000.0):
    """Rotary angles for a (F, h, w) token grid, (F * h * w, head_dim / 2).

    The head dimension is split between the three axes. Positions count from the start of the buffer, so however
    long a stream runs the model only ever sees positions 0 .. F - 1: the buffer is its whole world.
    """
    axis_dims = [head_dim // 2 - 2 * (head_dim // 6), head_dim // 6, head_dim // 6]  # rotation pairs per axis
    angles = []
    for size, pairs in zip(grid, axis_dims):
        freqs = theta ** (-torch.arange(pairs, dtype=torch.float64) / max(pairs, 1))
        angles.append(torch.outer(torch.arange(size, dtype=torch.float64), freqs))  # (size, pairs)
    f, h, w = grid
    return torch.cat(
        [
            angles[0][:, None, None].expand(f, h, w, -1),
            angles[1][None, :, None].expand(f, h, w, -1),
            angles[2][None, None, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, -1)


def apply_rope(x, angles):
    # x (B, N, heads, d), angles (N, d / 2): rotate consecutive pairs of channels, each pair read as a complex number
    # (one fused multiply instead of four and a stack: RoPE was a tenth of a CPU training step)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # (B, N, heads, d/2)
    rotation = torch.polar(torch.ones_like(angles, dtype=torch.float32), angles.float())[:, None]  # (N, 1, d/2)
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


class WindowSelfAttention(nn.Module):
    """Self-attention inside non-overlapping (Fw, Hw, Ww) windows of the token grid.

    Tokens are regrouped into windows and every window batch goes through one scaled_dot_product_attention call,
    so the cost grows linearly with the buffer length (no dense mask over the whole sequence). A shifted layer
    rolls the grid by half a window first, with wrap-around (Swin-style, https://arxiv.org/abs/2103.14030), so
    information crosses window borders; unlike Swin we do not mask the wrapped windows: the shapes world is a torus
    and the rotary positions still tell the model how far apart wrapped tokens are.
    """

    def __init__(self, dim, num_heads, window_size, shifted):
        super().__init__()
        self.num_heads, self.window_size, self.shifted = num_heads, tuple(window_size), shifted
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)  # qk-norm keeps attention logits bounded in training
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def windows(self, grid):
        # a window larger than the grid covers the whole axis: window = grid is plain full attention
        return tuple(min(wdw, size) for wdw, size in zip(self.window_size, grid))

    def forward(self, x, grid, rope):
        # x (B, N, D) with N = F * h * w tokens in (F, h, w) order; rope (N, d / 2)
        f, h, w = grid
        fw, hw, ww = self.windows(grid)
        q, k, v = rearrange(self.qkv(x), "b n (three m d) -> three b n m d", three=3, m=self.num_heads)
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)  # (B, N, heads, d)
        if (fw, hw, ww) == (f, h, w):  # one window over the whole grid: plain attention, and a roll changes nothing
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, D)
        qkv = torch.stack([q, k, v])  # (3, B, N, heads, d): rope is applied at the true positions, before any roll
        qkv = qkv.unflatten(2, (f, h, w))  # (3, B, F, h, w, heads, d)
        shifts = (fw // 2, hw // 2, ww // 2) if self.shifted else (0, 0, 0)
        qkv = torch.roll(qkv, shifts=[-s for s in shifts], dims=(2, 3, 4))
        qkv = rearrange(
            qkv,
            "three b (nf fw) (nh hw) (nw ww) m d -> three (b nf nh nw) m (fw hw ww) d",
            fw=fw,
            hw=hw,
            ww=ww,
        )  # (3, n, heads, M, d)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (n, heads, M, d)
        out = rearrange(
            out,
            "(b nf nh nw) m (fw hw ww) d -> b (nf fw) (nh hw) (nw ww) (m d)",
            nf=f // fw,
            nh=h // hw,
            nw=w // ww,
            fw=fw,
            hw=hw,
            ww=ww,
        )  # (B, F, h, w, D)
        out = torch.roll(out, shifts=shifts, dims=(1, 2, 3))
        return self.proj(out.flatten(1, 3))  # (B, N, D)


class CrossAttention(nn.Module):
    """Video tokens attend to the text tokens (paper Sec. 4.1: text enters through cross-attention)."""

    def __init__(self, dim, text_dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, text, text_mask):
        # x (B, N, D), text (B, L, E), text_mask (B, L) bool, True for real tokens
        q = self.q_norm(rearrange(self.q(x), "b n (m d) -> b m n d", m=self.num_heads))  # (B, heads, N, d)
        k, v = rearrange(self.kv(text), "b l (two m d) -> two b m l d", two=2, m=self.num_heads)  # (B, heads, L, d)
        mask = None if text_mask is None else text_mask[:, None, None, :]  # (B, 1, 1, L)
        out = F.scaled_dot_product_attention(q, self.k_norm(k), v, attn_mask=mask)  # (B, heads, N, d)
        return self.proj(rearrange(out, "b m n d -> b n (m d)"))


class StreamDiTBlock(nn.Module):
    """adaLN-Zero DiT block with per-frame modulation: window self-attention, text cross-attention, MLP."""

    def __init__(self, dim, text_dim, num_heads, mlp_ratio, window_size, shifted):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = WindowSelfAttention(dim, num_heads, window_size, shifted)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)  # cross-attention is not time-modulated (as in PixArt and Wan)
        self.cross_attn = CrossAttention(dim, text_dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, text, text_mask, grid, rope):
        # x (B, F, S, D) tokens; c (B, F, D) per-frame conditioning
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        attn = self.attn(modulate(self.norm1(x), shift_msa, scale_msa).flatten(1, 2), grid, rope)  # (B, N, D)
        x = x + gate_msa.unsqueeze(2) * attn.view_as(x)
        x = x + self.cross_attn(self.norm2(x).flatten(1, 2), text, text_mask).view_as(x)
        x = x + gate_mlp.unsqueeze(2) * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))
        return x  # (B, F, S, D)


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # (B, F, D) each
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, F, S, p * p * C)


class LatentRefiner(nn.Module):
    """A small convolutional head at the latents' own resolution, after the final layer.

    The final layer draws each p x p patch of the output from one token, and with 4x4 patches a square's corner is a
    few latents inside one token. The refiner sees the noisy latents and the DiT's output side by side, per frame,
    through 3x3 convolutions (wrapping around: the shapes world is a torus) modulated by the frame's conditioning,
    and adds a correction. Its last convolution starts at zero, so a refiner added to a trained DiT starts as the
    identity and `train --train-refiner-only` can teach it with the DiT frozen.
    """

    def __init__(self, channels, width, cond_size):
        super().__init__()
        conv = dict(kernel_size=3, padding=1, padding_mode="circular")
        self.conv_in = nn.Conv2d(2 * channels, width, **conv)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * width))
        self.conv_mid = nn.Conv2d(width, width, **conv)
        self.conv_out = nn.Conv2d(width, channels, **conv)
        self.reset_parameters()

    def reset_parameters(self):
        # also called on a refiner added to a saved model, whose loader leaves weights it did not find uninitialised
        for layer in (self.conv_in, self.conv_mid, self.modulation[1]):
            layer.reset_parameters()
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, out, c):
        # x, out (B, C, F, H, W): noisy latents and the DiT's output; c (B, F, D)
        b = x.shape[0]
        h = self.conv_in(rearrange(torch.cat([x, out], 1), "b c f h w -> (b f) c h w"))  # (B F, R, H, W)
        shift, scale = self.modulation(c).flatten(0, 1)[:, :, None, None].chunk(2, dim=1)  # (B F, R, 1, 1) each
        h = self.conv_mid(F.silu(h * (1 + scale) + shift))
        delta = self.conv_out(F.silu(h))  # (B F, C, H, W)
        return out + rearrange(delta, "(b f) c h w -> b c f h w", b=b)


class StreamDiTTransformer3DModel(ModelMixin, ConfigMixin):
    """Predicts the flow velocity u = dX/dtau of every frame in the buffer, each frame at its own tau.

    Args:
        in_channels: latent channels C.
        out_channels: defaults to in_channels.
        patch_size: spatial patch p; the temporal patch is 1 so that every frame keeps its own noise level.
        hidden_size, num_layers, num_heads, mlp_ratio: the DiT's size.
        text_dim: width E of the text encoder's hidden states.
        window_size: (Fw, Hw, Ww) attention window in tokens; every odd layer is shifted by half a window.
        sample_size: (F, H, W) latent buffer the model was trained on; the pipeline's default buffer and frame size.
        pooled_text: also add the mean text state to every frame's adaLN conditioning, beside cross-attention, so
            every block sees the prompt's global content directly (speeds up learning for small models).
        prediction_type: what the last layer predicts. "velocity": u itself. "sample": the clean latents X1, turned
            into u = (X1 - X_tau) / (1 - tau) (Eq. 5 with sigma_min = 0), so forward returns a velocity either way.
            Predicting the clean sample keeps the noise out of the network's output, which is said to help models
            whose patches are wide for their width (Li & He, "Back to Basics: Let Denoising Generative Models
            Denoise", 2025); 1 - tau is clipped at `min_sample_sigma` so the division stays bounded near data.
        refiner_channels: width of a LatentRefiner after the final layer (0: none).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["StreamDiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 8,
        out_channels: int | None = None,
        patch_size: int = 2,
        hidden_size: int = 256,
        num_layers: int = 8,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        text_dim: int = 128,
        window_size: tuple[int, int, int] = (4, 8, 8),
        sample_size: tuple[int, int, int] = (16, 16, 16),
        rope_theta: float = 10000.0,
        pooled_text: bool = False,
        prediction_type: str = "velocity",
        min_sample_sigma: float = 0.05,
        refiner_channels: int = 0,
    ):
        super().__init__()
        if prediction_type not in ("velocity", "sample"):
            raise ValueError(f"prediction_type={prediction_type!r} must be 'velocity' or 'sample'")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2:
            raise ValueError(f"hidden_size={hidden_size} must split into num_heads={num_heads} heads of even width")
        if refiner_channels < 0:
            raise ValueError(f"refiner_channels={refiner_channels} must be 0 (no refiner) or more")
        if len(window_size) != 3 or min(window_size) < 1:
            raise ValueError(f"window_size={window_size} must be three positive sizes (frames, height, width)")
        if patch_size < 1 or sample_size[1] % patch_size or sample_size[2] % patch_size:
            # checked here, not only at the first forward: a model built with a patch that cannot tile its own
            # buffer's frames would otherwise be saved, shipped or trained before anything notices
            raise ValueError(f"patch_size={patch_size} must divide the latent frame of "
                             f"sample_size={tuple(sample_size)}")
        self.out_channels = out_channels or in_channels
        self.x_embedder = nn.Conv3d(in_channels, hidden_size, (1, patch_size, patch_size), (1, patch_size, patch_size))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.text_norm = nn.LayerNorm(text_dim, eps=1e-6)
        if pooled_text:
            self.text_pool = nn.Sequential(nn.Linear(text_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList(
            StreamDiTBlock(hidden_size, text_dim, num_heads, mlp_ratio, window_size, shifted=i % 2 == 1)
            for i in range(num_layers)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if refiner_channels:
            if self.out_channels != in_channels:
                raise ValueError(f"refiner_channels={refiner_channels} needs out_channels={out_channels} to equal "
                                 f"in_channels={in_channels}")
            self.refiner = LatentRefiner(in_channels, refiner_channels, hidden_size)
        self.gradient_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        # As DiT (https://github.com/facebookresearch/DiT/blob/main/models.py): xavier linears, the patch embedding
        # as a linear layer, and adaLN-Zero: every modulation and the output layer start at zero, so each block
        # starts as the identity and the untrained model predicts zero velocity.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def token_grid(self, frames, height, width):
        """(F, h, w) token grid for a latent buffer; raises ValueError where the windows cannot tile it."""
        p = self.config.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by the patch size {p}")
        grid = (frames, height // p, width // p)
        for axis, size, window in zip(("frames", "height", "width"), grid, self.config.window_size):
            if size > window and size % window:
                raise ValueError(f"a buffer of {size} tokens in {axis} is not divisible by the window of {window}")
        return grid

    @staticmethod
    def pool(text, mask):
        # mean over the real text tokens: (B, L, E) -> (B, E)
        if mask is None:
            return text.mean(1)
        weights = mask.to(text.dtype).unsqueeze(-1)  # (B, L, 1)
        return (text * weights).sum(1) / weights.sum(1).clamp(min=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """
        Args:
            hidden_states: noisy latent buffer (B, C, F, H, W).
            timestep: flow time tau of every frame (B, F) (or (B,) for one shared level), 0 noise .. 1 data.
            encoder_hidden_states: text encoder states (B, L, E).
            encoder_attention_mask: (B, L) bool, True for real text tokens.
        Returns:
            velocity u (B, C, F, H, W) in `Transformer2DModelOutput.sample` (or a tuple).
        """
        b, _, f, height, width = hidden_states.shape
        grid = self.token_grid(f, height, width)
        if timestep.shape == (b,):  # one level for all frames of a sample; any other shape is named below
            timestep = timestep[:, None].expand(b, f)
        if timestep.shape != (b, f):
            raise ValueError(f"timestep of shape {tuple(timestep.shape)} does not match a batch of {b} x {f} frames")
        rope = rope_frequencies(self.config.hidden_size // self.config.num_heads, grid, self.config.rope_theta)
        rope = rope.to(hidden_states.device)  # (N, d / 2)

        x = self.x_embedder(hidden_states.to(self.dtype))  # (B, D, F, h, w)
        x = rearrange(x, "b d f h w -> b f (h w) d")  # (B, F, S, D)
        c = self.t_embedder(timestep)  # (B, F, D)
        text = self.text_norm(encoder_hidden_states.to(self.dtype))  # (B, L, E)
        if self.config.pooled_text:
            c = c + self.text_pool(self.pool(text, encoder_attention_mask)).unsqueeze(1)  # (B, F, D)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, c, text, encoder_attention_mask, grid, rope)
            else:
                x = block(x, c, text, encoder_attention_mask, grid, rope)  # (B, F, S, D)
        x = self.final_layer(x, c)  # (B, F, S, p * p * C)
        p = self.config.patch_size
        out = rearrange(x, "b f (h w) (p q c) -> b c f (h p) (w q)", h=grid[1], p=p, q=p)  # (B, C, F, H, W)
        if self.config.refiner_channels:
            out = self.refiner(hidden_states.to(out.dtype), out, c)
        if self.config.prediction_type == "sample":  # out is X1: u = (X1 - X_tau) / (1 - tau)
            sigma = (1.0 - timestep.float()).clamp(min=self.config.min_sample_sigma).view(b, 1, f, 1, 1)
            out = ((out.float() - hidden_states.float()) / sigma).to(out.dtype)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


# Named sizes. "tiny" builds in milliseconds for tests; "small" is the built-in shapes-world model (128x128 video,
# 16x16x8 latents in 4x4 patches, an 8-frame buffer = 128 tokens, 5.0M parameters: sized to train on a 2-core CPU and
# to stream in real time there; 2x2 patches cost four times as much a sample). Its window is the whole buffer: at 128
# tokens full attention costs next to nothing, and 4-frame windows left a visible jump in motion at the window border
# (the model up to step 17250 was trained with (4, 4, 4) windows; the weights carry over unchanged). "large" is the
# paper's real-time shape (16 latent frames at 512p: 64x64x8 latents) at about 4B parameters, for GPUs.
PRESETS = {
    "tiny": dict(
        in_channels=4, patch_size=1, hidden_size=32, num_layers=2, num_heads=2, text_dim=16,
        window_size=(2, 2, 2), sample_size=(8, 4, 4), pooled_text=True,
    ),
    "small": dict(
        in_channels=8, patch_size=4, hidden_size=192, num_layers=6, num_heads=3, text_dim=128,
        window_size=(8, 4, 4), sample_size=(8, 16, 16), pooled_text=True,
    ),
    "large": dict(
        in_channels=8, patch_size=2, hidden_size=2304, num_layers=32, num_heads=18, text_dim=4096,
        window_size=(4, 16, 16), sample_size=(16, 64, 64),
    ),
}


def from_preset(name: str, **overrides) -> StreamDiTTransformer3DModel:
    """Builds a transformer from a named size, e.g. `from_preset("small", num_layers=6)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return StreamDiTTransformer3DModel(**{**PRESETS[name], **overrides})
