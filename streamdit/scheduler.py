"""Buffered flow matching (paper Sec. 3): the partition, the noise levels of the buffer, and the Euler step.

Paper convention throughout: flow time tau = 0 is noise, tau = 1 is data (diffusers' sigma is 1 - tau).
    X_tau = tau * X1 + (1 - (1 - sigma_min) * tau) * X0            (Eq. 5, per frame)
    V     = X1 - (1 - sigma_min) * X0                               (the target velocity)
    X_{tau + dtau} = X_tau + u(X_tau, P, tau) * dtau                (Eq. 6, a per-frame Euler step)

Shape legend: b batch, C latent channels, F frames in the buffer (= B of the paper), H, W latent size.
"""

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


@dataclass(frozen=True)
class Partition:
    """How the buffer is cut (Sec. 3.2): K reference frames + N chunks of c frames, s micro steps per chunk.

    B = K + N * c frames in the buffer; every frame takes T = s * N micro steps from noise to data.
    Uniform (c = B, s = T) is ordinary clip generation; diagonal (c = 1, s = 1) is FIFO-Diffusion.
    """

    reference_frames: int  # K
    num_chunks: int  # N
    chunk_size: int  # c
    micro_steps: int  # s

    def __post_init__(self):
        values = dict(
            reference_frames=self.reference_frames,
            num_chunks=self.num_chunks,
            chunk_size=self.chunk_size,
            micro_steps=self.micro_steps,
        )
        for name, value in values.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"partition {name}={value!r} must be an integer")
        if self.reference_frames < 0 or min(self.num_chunks, self.chunk_size, self.micro_steps) < 1:
            shown = ", ".join(f"{name}={value}" for name, value in values.items())
            raise ValueError(f"impossible partition ({shown}): K >= 0 and N, c, s >= 1 are needed")

    @classmethod
    def from_buffer(cls, buffer_frames, chunk_size, micro_steps, reference_frames=0):
        """Derives N from B = K + N * c; raises ValueError naming the values when they do not fit."""
        for name, value in (("buffer_frames", buffer_frames), ("reference_frames", reference_frames)):
            if not isinstance(value, int) or isinstance(value, bool):  # else N = (B - K) / c is blamed for them
                raise ValueError(f"partition {name}={value!r} must be an integer")
        chunked = buffer_frames - reference_frames
        if not isinstance(chunk_size, int) or chunk_size < 1 or chunked < chunk_size or chunked % chunk_size:
            raise ValueError(
                f"a buffer of B={buffer_frames} frames with K={reference_frames} reference frames does not split "
                f"into chunks of c={chunk_size} frames (B = K + N * c)"
            )
        return cls(reference_frames, chunked // chunk_size, chunk_size, micro_steps)

    @property
    def buffer_frames(self):  # B
        return self.reference_frames + self.num_chunks * self.chunk_size

    @property
    def num_steps(self):  # T
        return self.micro_steps * self.num_chunks

    def caps(self):
        """(F,) the level at the top of each frame's segment; a frame never steps past it before the buffer shifts.

        Levels index the tau grid 0 .. T. Chunk n (0 = the cleanest, next to leave) covers levels
        [(N - 1 - n) * s, (N - n) * s]; reference frames sit at T (clean) and are never denoised.
        """
        n = torch.arange(self.num_chunks).repeat_interleave(self.chunk_size)
        chunks = (self.num_chunks - n) * self.micro_steps
        return torch.cat([torch.full((self.reference_frames,), self.num_steps), chunks])


class StreamBuffer:
    """The frames the model sees, and the noise level of each.

    Layout along the frame axis, oldest first (the output end is the front):
        [ K reference frames | chunk 0 (cleanest, next out) | chunk 1 | ... | chunk N-1 (noisiest, newest) ]
    latents (b, C, F, H, W) float32; levels (F,) long, frame f being at tau = taus[levels[f]].

    One rule drives start-up and streaming alike: each micro step, every frame below its cap moves one level up.
    From pure noise (all levels 0) this is the paper's start-up: the whole buffer is denoised together (a uniform
    generation) and each chunk stops at the top of its segment, so after exactly T micro steps chunk 0 is clean.
    From then on every micro step moves every chunk, and after s of them chunk 0 reaches tau = 1 and is released.
    """

    def __init__(self, latents, partition, taus):
        if latents.shape[2] != partition.buffer_frames:
            raise ValueError(f"latents of {latents.shape[2]} frames do not fill a buffer of {partition.buffer_frames}")
        self.latents = latents.float()
        self.partition = partition
        self.taus = taus  # (T + 1,) float32 grid
        self.caps = partition.caps()
        self.levels = torch.zeros_like(self.caps)

    def tau(self):
        return self.taus[self.levels]  # (F,)

    def next_tau(self):
        return self.taus[torch.minimum(self.levels + 1, self.caps)]  # (F,): capped frames stay where they are

    def update(self, latents):
        """Takes the result of one micro step (from `StreamDiTScheduler.step`)."""
        self.latents = latents
        self.levels = torch.minimum(self.levels + 1, self.caps)

    def take_back(self, levels, renoise):
        """Moves every chunk `levels` levels back towards noise (not below level 0; reference frames stay clean),
        its latents through `renoise(latents, tau (F,), new tau (F,))`. The cap rule walks the frames up again, so
        the next release comes up to `levels` micro steps later. Used at a prompt switch (`switch_strength`)."""
        k = self.partition.reference_frames
        back = torch.clamp(self.levels - levels, min=0)
        back[:k] = self.levels[:k]
        self.latents = renoise(self.latents, self.tau(), self.taus[back])
        self.levels = back

    def chunk_done(self):
        k, c = self.partition.reference_frames, self.partition.chunk_size
        return bool((self.levels[k : k + c] == self.partition.num_steps).all())

    def release(self, fresh):
        """Releases the clean chunk 0 and shifts the buffer by one chunk; `fresh` (b, C, c, H, W) enters at level 0.

        The newest K clean frames stay behind as reference frames: dropping the oldest c frames does exactly that.
        """
        k, c = self.partition.reference_frames, self.partition.chunk_size
        released = self.latents[:, :, k : k + c]  # (b, C, c, H, W)
        self.latents = torch.cat([self.latents[:, :, c:], fresh.float().to(self.latents.device)], dim=2)
        self.levels = torch.cat([self.levels[c:], self.levels.new_zeros(c)])
        return released

    def to(self, device):
        for name in ("latents", "taus", "caps", "levels"):
            setattr(self, name, getattr(self, name).to(device))
        return self


class StreamDiTScheduler(SchedulerMixin, ConfigMixin):
    """Noise levels and the Euler step of buffered flow matching, with the default partition as its config.

    Args:
        buffer_frames: B, latent frames in the buffer.
        chunk_size: c.
        micro_steps: s.
        reference_frames: K.
        shift: timestep shift as in SD3 / Wan (sigma' = shift * sigma / (1 + (shift - 1) * sigma), sigma = 1 - tau);
            1.0 leaves the grid uniform. Training draws Eq. 8's taus through its own shift; a stream may use another
            (shift > 1 spends more micro steps at high noise, where the object's presence, colour and path are
            decided), so the shipped model streams with the shift its evaluation chose.
        sigma_min: the sigma_min of Eq. 5.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        buffer_frames: int = 16,
        chunk_size: int = 2,
        micro_steps: int = 1,
        reference_frames: int = 0,
        shift: float = 1.0,
        sigma_min: float = 0.0,
    ):
        if shift <= 0:
            raise ValueError(f"shift={shift} must be positive")
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min={sigma_min} must lie in [0, 1)")
        self.partition()  # validate the default partition now, not at the first stream

    def partition(self, chunk_size=None, micro_steps=None, reference_frames=None, buffer_frames=None):
        """The default partition with any of its numbers overridden; ValueError if they do not fit."""
        cfg = self.config
        return Partition.from_buffer(
            buffer_frames=cfg.buffer_frames if buffer_frames is None else buffer_frames,
            chunk_size=cfg.chunk_size if chunk_size is None else chunk_size,
            micro_steps=cfg.micro_steps if micro_steps is None else micro_steps,
            reference_frames=cfg.reference_frames if reference_frames is None else reference_frames,
        )

    def shift_tau(self, u):
        sigma = 1.0 - u
        return 1.0 - self.config.shift * sigma / (1.0 + (self.config.shift - 1.0) * sigma)

    def taus(self, partition, strength=1.0):
        """(T + 1,) float32 tau grid from noise to data, shifted.

        strength < 1 starts the trajectory part-way (SDEdit, for video-to-video): the grid then spans
        [shift(1 - strength), 1] in the same T micro steps, so the buffer layout does not change.
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength} must lie in (0, 1]")
        u = torch.linspace(1.0 - strength, 1.0, partition.num_steps + 1, dtype=torch.float64)
        return self.shift_tau(u).float()

    def step(self, model_output, sample, tau, next_tau, return_dict=True):
        """Eq. 6 with a per-frame step: sample (b, C, F, H, W), model_output the velocity u, tau and next_tau (F,)."""
        dtau = (next_tau - tau).float().view(1, 1, -1, 1, 1)
        prev_sample = sample.float() + model_output.float() * dtau  # fp32 however the model ran
        return SchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    # Training (Sec. 3.1 and 3.2).

    def sample_tau(self, partition, batch_size, generator=None, device=None):
        """Eq. 8: chunk n (0 = cleanest) draws one u ~ U[(N - 1 - n) / N, (N - n) / N] for all its frames.

        Returns (batch_size, F) shifted tau; reference frames are clean (tau = 1).
        """
        n = partition.num_chunks
        low = torch.arange(n - 1, -1, -1, dtype=torch.float64) / n  # (N,) segment starts, cleanest chunk first
        u = low + torch.rand(batch_size, n, generator=generator, dtype=torch.float64) / n  # (batch, N)
        u = u.repeat_interleave(partition.chunk_size, dim=1)  # (batch, N * c)
        u = torch.cat([torch.ones(batch_size, partition.reference_frames, dtype=torch.float64), u], dim=1)
        return self.shift_tau(u).float().to(device)

    def add_noise(self, x1, noise, tau):
        """Eq. 5: X_tau from data x1 and noise X0 (b, C, F, H, W), tau (b, F), (F,) or one level for all."""
        t = tau.float() if tau.ndim == 0 else tau.float().view(-1, 1, tau.shape[-1], 1, 1)
        return t * x1 + (1.0 - (1.0 - self.config.sigma_min) * t) * noise

    def renoise(self, sample, tau, new_tau, noise):
        """X_tau -> X_new_tau for new_tau <= tau along the forward process, without knowing X1 (per frame, (F,) taus).

        (new_tau / tau) X_tau has Eq. 5's X1 term at new_tau and too little noise; fresh `noise` tops it up to Eq. 5's
        variance: c^2 = (1 - a new_tau)^2 - (new_tau / tau)^2 (1 - a tau)^2, a = 1 - sigma_min. Frames with
        new_tau = tau stay as they are (ratio 1, c 0; also at tau = 0, where the ratio would be 0 / 0).
        """
        a = 1.0 - self.config.sigma_min
        tau, new_tau = tau.float().view(1, 1, -1, 1, 1), new_tau.float().view(1, 1, -1, 1, 1)
        ratio = torch.where(new_tau < tau, new_tau / tau.clamp(min=1e-12), torch.ones_like(tau))
        c = ((1.0 - a * new_tau) ** 2 - (ratio * (1.0 - a * tau)) ** 2).clamp(min=0.0).sqrt()
        return ratio * sample.float() + c * noise.float()

    def clean_estimate(self, sample, model_output, tau):
        """X1 as the velocity `model_output` at X_tau = `sample` points to it, inverting Eq. 5 (tau (b, F) or (F,)):
        X1 = a X_tau + (1 - a tau) V, a = 1 - sigma_min."""
        a = 1.0 - self.config.sigma_min
        t = tau.float().view(-1, 1, tau.shape[-1], 1, 1)
        return a * sample.float() + (1.0 - a * t) * model_output.float()

    def velocity(self, x1, noise):
        """The target velocity V = X1 - (1 - sigma_min) X0."""
        return x1 - (1.0 - self.config.sigma_min) * noise

    def training_partitions(self, buffer_frames=None, reference_frames=None):
        """Mixed training (Sec. 3.2): chunk sizes 1, 2, 4, ... up to the whole buffer (the uniform case)."""
        b = self.config.buffer_frames if buffer_frames is None else buffer_frames
        k = self.config.reference_frames if reference_frames is None else reference_frames
        sizes = [2**i for i in range((b - k).bit_length()) if (b - k) % 2**i == 0] + [b - k]
        return [Partition.from_buffer(b, c, 1, k) for c in sorted(set(sizes))]
