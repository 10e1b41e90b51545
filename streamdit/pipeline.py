"""StreamDiTPipeline: text-to-video as a fixed-length clip (`pipe(...)`) or as an endless stream (`pipe.stream(...)`).

A stream is a `StreamState` (buffer latents, per-frame levels, prompt embeddings, RNG state: plain tensors and
numbers, so it pickles) advanced one micro step at a time by `pipe.advance(state)`. When the buffer releases its
clean chunk, `pipe.decode_chunk(state, latents)` turns it into video frames, decoding with the last released latents
as left context (the paper's overlapped decoding) so that chunks join without seams. `StreamDiTStream` wraps the
two in an iterator with `set_prompt` and `close`, and as in the paper runs them on two threads: the denoiser works on
the next chunk while the caller's thread decodes this one. The Space calls them directly, one GPU call per chunk.

Shape legend: b batch, C latent channels, F buffer frames, c chunk frames, H, W latent size, L text tokens, E text width,
f video frames, Hv, Wv video size.
"""

import copy
import numbers
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.video_processor import VideoProcessor

from .autoencoder import CausalCache, StreamDiTAutoencoder
from .scheduler import StreamBuffer, StreamDiTScheduler
from .text import StreamDiTTextEncoder, pooled, tokenize, unknown_words
from .transformer import StreamDiTTransformer3DModel


@dataclass
class StreamDiTPipelineOutput(BaseOutput):
    """frames: np (b, f, Hv, Wv, 3) float in [0, 1]; pt (b, f, 3, Hv, Wv); pil: b lists of f images;
    latent: (b, C, F_out, H, W) released latents."""

    frames: np.ndarray | torch.Tensor | list


@dataclass
class StreamChunk:
    """One released chunk of a stream, decoded."""

    frames: np.ndarray  # (f, Hv, Wv, 3) uint8, f = chunk_size * temporal compression (fewer at a video's end)
    index: int  # chunk number in the stream, from 0
    start_frame: int  # stream index of frames[0]
    prompt: str  # the prompt in force when the chunk was released
    denoise_seconds: float  # wall time of the micro steps since the previous release
    decode_seconds: float


@dataclass
class StreamState:
    """Everything a stream carries from one micro step to the next. Plain data: it pickles, so the step function
    can run in another process (ZeroGPU) and a stream can be saved and resumed bit for bit.

    Two sides, which a pipelined stream runs on two threads: the decoder side (`_DECODER_SIDE`: decode_cache and the
    release counters) is written only by decoding, everything else (buffer, prompts, RNG, video input, micro_step,
    denoise_seconds) only by the denoiser (`advance`, the prompt and video input). Both replace values rather than
    write into tensors or arrays in place, so a shallow copy (`_snapshot`) is a snapshot.
    """

    buffer: StreamBuffer
    prompt: list[str]  # one per batch row
    negative_prompt: list[str]
    guidance_scale: float
    generator_state: torch.Tensor  # CPU generator state: fresh noise for every chunk that enters
    overlapped_decoding: bool  # decode each chunk as the continuation of the last (no seams), or on its own
    prompt_embeds: torch.Tensor | None = None  # (b, L, E) for the current prompt; None = encode at the next step
    prompt_mask: torch.Tensor | None = None  # (b, L) bool
    negative_embeds: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None
    micro_step: int = 0  # micro steps taken
    chunks_released: int = 0
    frames_released: int = 0  # video frames handed out
    decode_cache: list[torch.Tensor] | None = None  # the decoder's left context: CausalCache.past, None at the start
    denoise_seconds: float = 0.0  # since the last release
    switch_strength: float = 0.0  # how far a prompt switch takes the buffer back (see `set_prompt`)
    switched_from: list[str] | None = None  # the last micro step's prompt, while a set_prompt waits for the next one
    warmup_chunks: int = 0  # releases still to drop after the start-up (see `prepare_stream`)
    # video-to-video (None for text-to-video)
    strength: float = 1.0
    video_pending: np.ndarray | None = None  # (f, Hv, Wv, 3) uint8 input frames not yet in the buffer
    video_last: np.ndarray | None = None  # (1, Hv, Wv, 3) uint8 the last input frame encoded: it repeats past the end
    encode_cache: list[torch.Tensor] | None = None  # the encoder's left context: CausalCache.past, None at the start
    video_ended: bool = False
    video_frames_in: int = 0  # real input frames taken into the chunks (the rest is padding)

    def set_prompt(self, prompt: str):
        """The new prompt conditions every micro step from the next one on; it is encoded once, at that step. There,
        if it differs from the old one, the buffer first goes `switch_strength` of its trajectory back towards noise
        (`StreamDiTPipeline.advance`), so the new prompt redraws what the old one had already decided."""
        if self.switched_from is None:  # prompts set again before the next micro step: the first one's old prompt
            self.switched_from = self.prompt
        self.prompt = [prompt] * len(self.prompt)
        self.prompt_embeds = self.prompt_mask = None

    @property
    def finished(self):
        """A video-to-video stream ends with its input; a text-to-video stream never does."""
        return self.video_ended and self.video_pending is not None and self.frames_released >= self.video_frames_in

    def frame_limit(self):
        """Stream frames that show real input once a video-to-video input has ended (the rest is padding); else None."""
        return self.video_frames_in if self.video_ended and self.video_pending is not None else None

    def to(self, device):
        self.buffer.to(device)
        for name in ("prompt_embeds", "prompt_mask", "negative_embeds", "negative_mask"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        for name in ("decode_cache", "encode_cache"):
            cache = getattr(self, name)
            if cache is not None:
                setattr(self, name, [frames.to(device) for frames in cache])
        return self


_DECODER_SIDE = ("decode_cache", "chunks_released", "frames_released")


def _snapshot(state: StreamState) -> StreamState:
    """A copy of `state` that later micro steps leave alone. Shallow is enough: micro steps and decoding replace the
    state's (and the buffer's) tensors and arrays, never write into them, so only the two containers are copied."""
    snapshot = copy.copy(state)
    snapshot.buffer = copy.copy(state.buffer)
    return snapshot


@dataclass
class _Released:
    """A chunk as it left the buffer, with what decoding needs to know of that moment: by the time a pipelined
    stream decodes it, the denoiser has moved on (another prompt, more input, the next chunk's timing)."""

    latents: torch.Tensor  # (b, C, c, H, W)
    prompt: str
    denoise_seconds: float
    frame_limit: int | None  # StreamState.frame_limit at the release
    text: torch.Tensor | None = None  # (b, E) the prompt's pooled text states, for a decoder that reads the prompt


def _is_number(value) -> bool:
    """A real number and not a bool; a string would fail a comparison with a bare TypeError, and `not x >= ...`
    turns away NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _draw_noise(state: StreamState, shape) -> torch.Tensor:
    """Fresh noise from the stream's own CPU generator, whose state it carries on: the same seed, the same video."""
    generator = torch.Generator()
    generator.set_state(state.generator_state)
    noise = torch.randn(shape, generator=generator)
    state.generator_state = generator.get_state()
    return noise


def _frames_to_video(frames, height, width):
    """uint8 frames (f, Hv', Wv', 3) -> (1, 3, f, height, width) float in [-1, 1]; centre-crops and resizes."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # (3, f, h, w)
    h, w = video.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        video = F.interpolate(video, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False)
        top, left = (video.shape[-2] - height) // 2, (video.shape[-1] - width) // 2
        video = video[..., top : top + height, left : left + width]
    return video.unsqueeze(0)


def _require_video_input(state, caller):
    """Input frames only fit a stream that was started from a video: a text-to-video buffer has no input to draw."""
    if state.video_pending is None:
        raise ValueError(f"{caller} needs a video-to-video stream (one started with video=...); this stream for "
                         f"{state.prompt[0]!r} is text-to-video")


def _as_frames(video):
    """An array, tensor or list of frames -> np uint8 (f, Hv, Wv, 3)."""
    frames = np.stack([np.asarray(frame) for frame in video]) if isinstance(video, list) else np.asarray(video)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"video frames of shape {frames.shape} are not (frames, height, width, 3)")
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)  # float frames in [0, 1]
    return frames


def guided_velocity(transformer, x, tau, text, mask, uncond, uncond_mask, guidance_scale):
    """u = u(empty) + g (u(prompt) - u(empty)), both branches in one batch; plain u when g = 1. x (b, C, F, H, W),
    tau (F,) or (b, F)."""
    b = x.shape[0]
    tau = tau.expand(b, -1)
    if guidance_scale == 1.0:
        return transformer(x, tau, text, mask).sample.float()
    both = transformer(torch.cat([x, x]), torch.cat([tau, tau]), torch.cat([uncond, text]),
                       torch.cat([uncond_mask, mask])).sample.float()
    empty, cond = both.chunk(2)
    return empty + guidance_scale * (cond - empty)


class StreamDiTPipeline(DiffusionPipeline):
    """Streaming text-to-video with StreamDiT (Kodaira et al., arXiv 2507.03745).

    Components: `transformer` (StreamDiTTransformer3DModel), `scheduler` (StreamDiTScheduler, holding the default
    partition), `vae` (StreamDiTAutoencoder), `text_encoder` (StreamDiTTextEncoder), `tokenizer`
    (PreTrainedTokenizerFast). `guidance_scale` is the model's default classifier-free guidance (1.0 = off),
    `switch_strength` its default for prompt switches in a stream (0.0 = the paper's; see `prepare_stream`),
    `warmup_chunks` how many chunks a text-to-video stream makes and drops after its start-up (0 = none).
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"

    def __init__(
        self,
        transformer: StreamDiTTransformer3DModel,
        scheduler: StreamDiTScheduler,
        vae: StreamDiTAutoencoder,
        text_encoder: StreamDiTTextEncoder,
        tokenizer,
        guidance_scale: float = 1.0,
        switch_strength: float = 0.0,
        warmup_chunks: int = 0,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer
        )
        self.register_to_config(
            guidance_scale=guidance_scale, switch_strength=switch_strength, warmup_chunks=warmup_chunks
        )
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)
        # A fast tokenizer raises "Already borrowed" when two threads use it at once (a pipelined stream's denoiser
        # encoding while the caller's set_prompt checks): one at a time.
        self._tokenizer_lock = threading.Lock()

    @property
    def vae_scale_factor_spatial(self):
        return self.vae.spatial_compression

    @property
    def vae_scale_factor_temporal(self):
        return self.vae.temporal_compression

    @property
    def default_size(self):
        """(height, width) of the video the transformer was trained on."""
        _, h, w = self.transformer.config.sample_size
        return h * self.vae_scale_factor_spatial, w * self.vae_scale_factor_spatial

    # 1. Inputs and text

    @property
    def pipelined_by_default(self) -> bool:
        """Whether `stream` runs a denoiser thread unless told: on an accelerator, not on the CPU, where the two
        threads share the same cores (on a 2-core machine pipelining streamed no faster and doubled the time to the
        first frame: README, Benchmarks)."""
        return self.device.type != "cpu"

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of `prompt` that the tokenizer does not know (and the model therefore ignores)."""
        return unknown_words(self.tokenizer, prompt)

    def check_prompt(self, prompt):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt={prompt!r} must be a string or a non-empty list of strings")
        for p in prompts:
            if not p.strip():
                raise ValueError(f"prompt {p!r} is empty")
            self._tokenize([p])  # raises ValueError naming a prompt longer than the tokenizer's limit
        return prompts

    def check_inputs(self, prompt, height, width, num_frames, guidance_scale, partition):
        prompts = self.check_prompt(prompt)
        factor = self.vae_scale_factor_spatial * self.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value < factor or value % factor:
                raise ValueError(f"{name}={value} must be a positive multiple of {factor} (vae factor x patch size)")
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"num_frames={num_frames} must be an integer >= 1")
        if not _is_number(guidance_scale) or not guidance_scale >= 1:
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a number >= 1 (1 turns guidance off)")
        f = self.vae_scale_factor_spatial
        self.transformer.token_grid(partition.buffer_frames, height // f, width // f)  # ValueError if windows don't tile
        return prompts

    def _tokenize(self, prompts):
        with self._tokenizer_lock:
            return tokenize(self.tokenizer, prompts)

    def encode_prompt(self, prompts: list[str], device=None):
        """-> (b, L, E) text states and their (b, L) mask; over-long prompts raise ValueError."""
        input_ids, mask = self._tokenize(prompts)
        device = device or self._execution_device
        embeds = self.text_encoder(input_ids.to(device), mask.to(device))
        return embeds, mask.to(device)

    # 2. The stream: state, one micro step, decoding

    def prepare_stream(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        chunk_size: int | None = None,
        micro_steps: int | None = None,
        reference_frames: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        video: np.ndarray | None = None,
        strength: float = 1.0,
        overlapped_decoding: bool = True,
        video_complete: bool = True,
        switch_strength: float | None = None,
        warmup_chunks: int | None = None,
    ) -> StreamState:
        """A fresh stream: the buffer full of noise at level 0 (the start-up generation happens in `advance`).

        `video` (f, Hv, Wv, 3) uint8, the first input frames of a video-to-video stream: they are encoded and noised
        to the start of the `strength` trajectory (SDEdit). `video_complete=False` says more frames will follow
        through `feed_video`. `switch_strength` in [0, 1]: at a prompt switch every frame of the buffer goes this
        fraction of its T micro steps back towards noise (SDEdit of the buffer), which costs up to that many extra
        micro steps once; 0 is the paper's switch, where the new prompt conditions only the remaining micro steps.
        `warmup_chunks`: chunks a text-to-video stream makes after its start-up and drops unshown, so that the first
        chunk shown was denoised in the buffer among streamed chunks rather than in the start-up's uniform generation
        (the start-up's frames hold direction and speed less well: README). Each costs s micro steps before the first
        frame. Video-to-video streams show every input frame, so they take none (the model's default is not applied).
        """
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        switch_strength = self.config.switch_strength if switch_strength is None else switch_strength
        partition = self.scheduler.partition(chunk_size, micro_steps, reference_frames)
        prompts = self.check_inputs(prompt, height, width, None, guidance_scale, partition)
        if not _is_number(switch_strength) or not 0.0 <= switch_strength <= 1.0:
            raise ValueError(f"switch_strength={switch_strength!r} must be a number in [0, 1] (0: the paper's switch)")
        if warmup_chunks is None:
            warmup_chunks = 0 if video is not None else self.config.warmup_chunks
        if not isinstance(warmup_chunks, numbers.Integral) or isinstance(warmup_chunks, bool) or warmup_chunks < 0:
            raise ValueError(f"warmup_chunks={warmup_chunks!r} must be an integer >= 0")
        if warmup_chunks and video is not None:
            raise ValueError(f"warmup_chunks={warmup_chunks} would drop input frames: video-to-video takes 0")
        if negative_prompt is None:
            negative_prompt = ""
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if not isinstance(overlapped_decoding, bool):
            raise ValueError(f"overlapped_decoding={overlapped_decoding!r} must be True or False")
        taus = self.scheduler.taus(partition, strength)
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        elif generator.device.type != "cpu":  # noise is always drawn on the CPU: the same seed, the same video
            generator = torch.Generator().manual_seed(generator.initial_seed())
        f = self.vae_scale_factor_spatial
        shape = (len(prompts), self.transformer.config.in_channels, partition.buffer_frames, height // f, width // f)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents of shape {tuple(latents.shape)} do not match the buffer {shape}")
        noise = torch.randn(shape, generator=generator) if latents is None else latents.detach().cpu().float()
        state = StreamState(
            buffer=StreamBuffer(noise, partition, taus),
            prompt=prompts,
            negative_prompt=negatives,
            guidance_scale=float(guidance_scale),
            generator_state=generator.get_state(),
            overlapped_decoding=overlapped_decoding,
            strength=float(strength),
            switch_strength=float(switch_strength),
            warmup_chunks=int(warmup_chunks),
        )
        if video is not None:
            if len(prompts) != 1:
                raise ValueError(f"video-to-video streams take a single prompt, got {len(prompts)}: {prompts!r}")
            state.video_pending = np.zeros((0, height, width, 3), np.uint8)
            self.feed_video(state, video, end=video_complete)
            t = self.vae_scale_factor_temporal
            x1 = self._encode_input(state, self._take_input(state, partition.buffer_frames * t))  # (1, C, F, H, W)
            state.video_frames_in -= partition.reference_frames * t  # reference slots are context, never shown
            state.buffer.latents = self.scheduler.add_noise(x1, noise, taus[0])  # X at the trajectory's start
        elif strength != 1.0:
            raise ValueError(f"strength={strength} needs an input video (video-to-video)")
        return state

    def feed_video(self, state: StreamState, frames, end: bool = False):
        """Appends input frames to a video-to-video stream; `end=True` says no more will come."""
        _require_video_input(state, "feed_video")
        if frames is not None and len(frames):
            height, width = state.video_pending.shape[1:3]
            frames = _as_frames(frames)
            if frames.shape[1:3] != (height, width):
                resized = _frames_to_video(frames, height, width)[0].permute(1, 2, 3, 0)  # (f, Hv, Wv, 3)
                frames = ((resized + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            state.video_pending = np.concatenate([state.video_pending, frames])
        state.video_ended = state.video_ended or end

    def top_up_video(self, state: StreamState, source: "VideoSource"):
        """Keeps one chunk of input frames pending in a video-to-video `state`, pulled from `source`: a release never
        waits on the input, and the state carries no more than the next release draws (on ZeroGPU it is pickled into
        every GPU call)."""
        _require_video_input(state, "top_up_video")
        if state.video_ended:
            return
        missing = state.buffer.partition.chunk_size * self.vae_scale_factor_temporal - len(state.video_pending)
        if missing > 0:
            self.feed_video(state, source.take(missing), end=False)
            state.video_ended = source.ended

    def _take_input(self, state, count):
        """The next `count` input frames; past the input's end the last frame repeats (and is trimmed on output)."""
        pending = state.video_pending
        if len(pending) < count and not state.video_ended:
            raise ValueError(f"the stream needs {count} input frames and has {len(pending)}: feed more or end it")
        if len(pending) == 0 and state.video_last is None:
            raise ValueError("video-to-video needs at least one input frame")
        taken, state.video_pending = pending[:count], pending[count:]
        state.video_frames_in += len(taken)
        if len(taken) < count:
            last = taken[-1:] if len(taken) else state.video_last
            taken = np.concatenate([taken, np.repeat(last, count - len(taken), axis=0)])
        return taken

    @torch.no_grad()
    def _encode_input(self, state, frames):
        """Encodes input frames as the continuation of those encoded before (seamless chunked encoding, each frame
        encoded once): the encoder's temporal layers carry their last input frames from chunk to chunk."""
        video = _frames_to_video(frames, *frames.shape[1:3])
        cache = CausalCache(state.encode_cache)
        latents = self.vae.encode(video.to(self._execution_device, self.vae.dtype), cache).float()  # (1, C, F, H, W)
        state.encode_cache, state.video_last = cache.next, frames[-1:]
        return latents

    def _fresh_chunk(self, state):
        """The chunk that enters the buffer at level 0: pure noise, or the noised next input chunk (video-to-video)."""
        buffer = state.buffer
        b, channels, _, h, w = buffer.latents.shape
        noise = _draw_noise(state, (b, channels, buffer.partition.chunk_size, h, w))
        if state.video_pending is None:
            return noise
        frames = self._take_input(state, buffer.partition.chunk_size * self.vae_scale_factor_temporal)
        x1 = self._encode_input(state, frames).cpu()
        return self.scheduler.add_noise(x1, noise, buffer.taus[0].cpu())

    def _switch(self, state):
        """A prompt switch: the buffer goes `switch_strength` of its T micro steps back along the forward process."""
        buffer = state.buffer
        levels = round(state.switch_strength * buffer.partition.num_steps)
        if levels == 0 or not bool((buffer.levels[buffer.partition.reference_frames :] > 0).any()):
            return  # nothing to take back (a stream still at pure noise): no noise drawn
        noise = _draw_noise(state, tuple(buffer.latents.shape)).to(buffer.latents.device)
        buffer.take_back(levels, lambda x, tau, new_tau: self.scheduler.renoise(x, tau, new_tau, noise))

    def _velocity(self, state, latents, tau):
        """u(X_tau, P, tau) for the buffer, with classifier-free guidance when guidance_scale > 1."""
        return guided_velocity(self.transformer, latents, tau, state.prompt_embeds, state.prompt_mask,
                               state.negative_embeds, state.negative_mask, state.guidance_scale)

    @torch.no_grad()
    def advance(self, state: StreamState):
        """One micro step of the buffer. Returns (state, released latents (b, C, c, H, W) or None).

        Everything it needs is in `state`, so it can run in a GPU worker process (ZeroGPU) that gets and returns the
        pickled state; a prompt changed with `state.set_prompt` is encoded here, once.
        """
        device = self._execution_device
        start = time.perf_counter()
        state.to(device)
        if state.prompt_embeds is None:
            state.prompt_embeds, state.prompt_mask = self.encode_prompt(state.prompt, device)
        if state.switched_from is not None:
            if state.switched_from != state.prompt:
                self._switch(state)
            state.switched_from = None
        if state.guidance_scale > 1.0 and state.negative_embeds is None:
            state.negative_embeds, state.negative_mask = self.encode_prompt(state.negative_prompt, device)
        buffer = state.buffer
        tau, next_tau = buffer.tau(), buffer.next_tau()  # (F,) each
        velocity = self._velocity(state, buffer.latents, tau)
        buffer.update(self.scheduler.step(velocity, buffer.latents, tau, next_tau).prev_sample)
        state.micro_step += 1
        state.denoise_seconds += time.perf_counter() - start
        if not buffer.chunk_done():
            return state, None
        released = buffer.release(self._fresh_chunk(state))
        if state.warmup_chunks > 0:  # a warm-up chunk: made, never shown
            state.warmup_chunks -= 1
            return state, None
        return state, released

    @property
    def decoder_reads_prompt(self) -> bool:
        """Whether the vae's decoder is modulated by the prompt (decoder_text_channels, `autoencoder.TextFiLM`)."""
        return self.vae.config.get("decoder_text_channels") is not None

    @torch.no_grad()
    def pooled_prompt(self, prompts: list[str], device=None) -> torch.Tensor:
        """(b, E) pooled text states of `prompts`: what a decoder that reads the prompt reads (`autoencoder.TextFiLM`)."""
        return pooled(*self.encode_prompt(prompts, device))

    def decoder_text(self, state: StreamState):
        """What the decoder reads of the state's prompt: (b, E) pooled text states, or None for a decoder that reads
        none. The prompt's states from its last micro step, or encoded here if a set_prompt has dropped them since."""
        if not self.decoder_reads_prompt:
            return None
        if state.prompt_embeds is None:
            return self.pooled_prompt(state.prompt)
        return pooled(state.prompt_embeds, state.prompt_mask)

    @torch.no_grad()
    def decode_latents(self, latents, cache: CausalCache | None = None, text: torch.Tensor | None = None):
        """Latents (b, C, c, H, W) -> video (b, 3, c * t, Hv, Wv) in [-1, 1]. With `cache` they continue the latents
        decoded before with it: the paper's overlapped decoding, which hides seams between chunks, with each frame
        decoded once (the decoder's temporal layers carry their last input frames instead of decoding them again).
        `text` (`decoder_text`) is the prompt, for a decoder that reads it."""
        text = None if text is None else text.to(latents.device)
        return self.vae.decode(latents.to(self.vae.dtype), cache, text).float()

    def decode_chunk(self, state: StreamState, latents) -> StreamChunk:
        """Decodes a released chunk of a single-prompt stream into uint8 frames and updates the decode context."""
        return self._decode_released(state, self._released(state, latents))

    def _released(self, state, latents) -> _Released:
        """Denoiser side of a release: what the decoder needs of this moment; the next chunk's timing starts."""
        released = _Released(latents, state.prompt[0], state.denoise_seconds, state.frame_limit(),
                             self.decoder_text(state))
        state.denoise_seconds = 0.0
        return released

    def _decode_released(self, state, released: _Released) -> StreamChunk:
        """Decoder side of a release: touches only the state's `_DECODER_SIDE` fields."""
        start = time.perf_counter()
        latents = released.latents
        cache = CausalCache(state.decode_cache) if state.overlapped_decoding else None
        video = self.decode_latents(latents, cache, released.text)  # (1, 3, f, Hv, Wv)
        if cache is not None:
            state.decode_cache = cache.next
        frames = ((video[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        if released.frame_limit is not None:  # drop the padding after an input video's end
            frames = frames[: max(released.frame_limit - state.frames_released, 0)]
        chunk = StreamChunk(
            frames=frames,
            index=state.chunks_released,
            start_frame=state.frames_released,
            prompt=released.prompt,
            denoise_seconds=released.denoise_seconds,
            decode_seconds=time.perf_counter() - start,
        )
        state.chunks_released += 1
        state.frames_released += len(frames)
        return chunk

    def next_chunk(self, state: StreamState) -> tuple[StreamState, StreamChunk]:
        """Micro steps until the buffer releases a chunk, then decodes it: the unit of work of one GPU call."""
        latents = None
        while latents is None:
            state, latents = self.advance(state)
        return state, self.decode_chunk(state, latents)

    def stream(self, prompt: str | None = None, video: Iterable | None = None, state: StreamState | None = None,
               pipelined: bool | None = None, chunk_call=None, **options) -> "StreamDiTStream":
        """An endless stream of `StreamChunk`s for `prompt` (options as `prepare_stream`).

        `video`: an iterable of frames (H, W, 3) or of frame arrays (f, H, W, 3) to restyle (video-to-video, with
        `strength`), or a `VideoSource` already drawn from (with `state`); the stream then ends with its input.
        `state`: resume a saved stream instead of starting one.
        `pipelined`: denoise the next chunk on a thread of its own while this one decodes (False: in turn, on the
        caller's thread); the frames are the same. Default: `pipelined_by_default`.
        `chunk_call`: a function `state -> (state, chunk)` that makes each chunk in place of this process, such as a
        `@spaces.GPU` function around `pipe.next_chunk` on ZeroGPU, where no thread outlives a GPU call. The stream
        then sets the latest prompt and feeds the input video (one chunk ahead, so the state it passes carries no
        more of the clip than the next release draws) before each call; the frames are the same. Sequential.
        """
        if chunk_call is not None and not callable(chunk_call):
            raise ValueError(f"chunk_call={chunk_call!r} must be a function state -> (state, chunk)")
        if pipelined is None:
            pipelined = self.pipelined_by_default and chunk_call is None
        if not isinstance(pipelined, bool):
            raise ValueError(f"pipelined={pipelined!r} must be True, False or None (the device's default)")
        if pipelined and chunk_call is not None:
            raise ValueError("pipelined=True does not go with a chunk_call: each chunk is one call, made in turn")
        source = video if video is None or isinstance(video, VideoSource) else VideoSource(video)
        if state is None:
            if not isinstance(prompt, str):
                raise ValueError(f"prompt={prompt!r} must be a string (streams take one prompt)")
            first = None
            if source is not None:  # the first buffer's worth of input frames
                first = source.take(self.scheduler.config.buffer_frames * self.vae_scale_factor_temporal)
            state = self.prepare_stream(prompt, video=first, video_complete=source is None or source.ended, **options)
        return StreamDiTStream(self, state, source, pipelined, chunk_call)

    # 3. Fixed-length generation

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        chunk_size: int | None = None,
        micro_steps: int | None = None,
        reference_frames: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        warmup_chunks: int | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Generates `num_frames` video frames (default: one buffer's worth) by running the stream until they are out.

        With the uniform partition (chunk_size = buffer frames, micro_steps = the number of steps) this is ordinary
        flow-matching clip generation. `callback_on_step_end(pipe, micro_step, tau (F,), {"latents": ...})` may return
        {"latents": new buffer latents}.
        """
        # 1. Check inputs, defaults
        if output_type not in ("np", "pt", "pil", "latent"):
            raise ValueError(f"output_type={output_type!r} must be one of 'np', 'pt', 'pil', 'latent'")
        bad = set(callback_on_step_end_tensor_inputs) - {"latents"}
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(bad)} are not available; only 'latents' is")
        partition = self.scheduler.partition(chunk_size, micro_steps, reference_frames)
        t = self.vae_scale_factor_temporal
        if num_frames is None:
            num_frames = partition.num_chunks * partition.chunk_size * t
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames={num_frames} must be an integer >= 1")
        # 2. The stream state: prompt checks, noise buffer
        state = self.prepare_stream(
            prompt, negative_prompt, height, width, chunk_size, micro_steps, reference_frames, guidance_scale,
            generator, latents, overlapped_decoding=False, warmup_chunks=warmup_chunks,
        )
        # 3. Micro steps until enough latent frames are released
        chunks_needed = -(-num_frames // (partition.chunk_size * t))
        total = partition.num_steps + (chunks_needed - 1 + state.warmup_chunks) * partition.micro_steps
        released = []
        with self.progress_bar(total=total) as progress:
            while len(released) < chunks_needed:
                tau = state.buffer.tau()
                state, out = self.advance(state)
                if out is not None:
                    released.append(out)
                if callback_on_step_end is not None:
                    result = callback_on_step_end(self, state.micro_step - 1, tau, {"latents": state.buffer.latents})
                    state.buffer.latents = (result or {}).get("latents", state.buffer.latents)
                progress.update()
        latents = torch.cat(released, dim=2)  # (b, C, chunks * c, H, W)
        # 4. Decode the whole clip at once (one decode, no seams to hide)
        if output_type == "latent":
            frames = latents[:, :, : -(-num_frames // t)]
        else:
            text = self.decoder_text(state)
            video = self.decode_latents(latents, text=text)[:, :, :num_frames]
            frames = self.video_processor.postprocess_video(video, output_type=output_type)
        self.maybe_free_model_hooks()
        return StreamDiTPipelineOutput(frames=frames) if return_dict else (frames,)


class VideoSource:
    """Pulls input frames from an iterable of frames (H, W, 3) or of frame arrays (f, H, W, 3)."""

    def __init__(self, video):
        self.iterator, self.ended = iter(video), False

    def take(self, count):
        frames = []
        while sum(len(f) for f in frames) < count and not self.ended:
            try:
                item = np.asarray(next(self.iterator))
            except StopIteration:
                self.ended = True
                break
            frames.append(_as_frames(item[None] if item.ndim == 3 else item))
        return np.concatenate(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)


class _PromptBox:
    """The prompt `set_prompt` asked for, handed from any thread to the denoiser's next micro step."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending = self.latest = None

    def put(self, prompt):
        with self._lock:
            self._pending = self.latest = prompt

    def take(self):
        with self._lock:
            prompt, self._pending = self._pending, None
        return prompt


class _Denoiser:
    """The denoiser side of a stream: a new prompt, input frames, micro steps until the buffer releases a chunk.
    Runs on the caller's thread (sequential stream) or on its own (pipelined, `_DenoiserThread`)."""

    def __init__(self, pipe: StreamDiTPipeline, video: VideoSource | None, prompts: _PromptBox):
        self.pipe, self.video, self.prompts = pipe, video, prompts
        self.stop = threading.Event()

    def chunk(self, state: StreamState) -> tuple[StreamState, _Released | None]:
        """Micro steps until a release; (state, None) if stopped first."""
        latents = None
        while latents is None:
            if self.stop.is_set():
                return state, None
            self.take_inputs(state)
            state, latents = self.pipe.advance(state)
        return state, self.pipe._released(state, latents)

    def take_inputs(self, state):
        """The latest prompt asked for and one chunk of input frames ahead, into `state`: before each micro step, or
        before each call of a `chunk_call` stream."""
        prompt = self.prompts.take()
        if prompt is not None:
            state.set_prompt(prompt)
        if self.video is not None:
            self.pipe.top_up_video(state, self.video)


@dataclass
class _Handoff:
    """A released chunk and the denoiser's state right after its release (a snapshot the thread no longer writes)."""

    released: _Released
    state: StreamState


class _DenoiserThread:
    """Runs a `_Denoiser` on its own thread, handing each released chunk to the caller over a queue of one.

    The denoiser takes a slot before each chunk and the caller gives it back when it takes the chunk, so the denoiser
    is at most one chunk ahead: it works on chunk k + 1 while the caller decodes chunk k, then waits. Holds no
    reference to the stream, so a stream that is dropped unclosed is collected and its finalizer stops the thread.
    """

    def __init__(self, denoiser: _Denoiser, state: StreamState):
        self.denoiser = denoiser
        self.handoffs = queue.Queue(maxsize=1)  # a _Handoff, the denoiser's exception, or None once stopped
        self.slot = threading.Semaphore(1)
        self.thread = threading.Thread(target=self._run, args=(state,), name="streamdit-denoiser", daemon=True)
        self.thread.start()

    def _run(self, state):
        try:
            with torch.no_grad():  # grad mode is per thread: the caller's no_grad does not reach here
                while self._claim_slot():
                    state, released = self.denoiser.chunk(state)
                    if released is None:  # stopped mid-chunk
                        return
                    self.handoffs.put(_Handoff(released, _snapshot(state)))  # never waits: the slot says it is empty
        except BaseException as error:  # raised again in the caller's __next__
            self.handoffs.put(error)

    def _claim_slot(self):
        self.slot.acquire()
        return not self.denoiser.stop.is_set()

    def take(self) -> _Handoff | None:
        """The next released chunk (None once stopped); an exception in the denoiser is raised here."""
        handoff = self.handoffs.get()
        if isinstance(handoff, BaseException):
            raise handoff
        if handoff is not None:
            self.slot.release()  # the denoiser may start the next chunk while the caller decodes this one
        return handoff

    def stop(self):
        """Stops the denoiser after its current micro step and waits for it."""
        self.denoiser.stop.set()
        self.slot.release()  # wakes a denoiser waiting for its slot
        if threading.current_thread() is self.thread:  # the garbage collector ran the finalizer here; it ends soon
            return
        self.thread.join()
        # Drop the chunk the caller will not take (its tensors), and leave None: it ends a __next__ waiting here.
        try:
            self.handoffs.get_nowait()
        except queue.Empty:
            pass
        self.handoffs.put_nowait(None)


class StreamDiTStream:
    """Iterating yields `StreamChunk`s forever (text-to-video) or until the input ends (video-to-video).

    Pipelined (the default, as in the paper): a denoiser thread runs the micro steps and hands each released chunk to
    the iterating thread, which decodes it while the denoiser already works on the next one, at most one chunk ahead.
    The frames are bit for bit those of the sequential stream (`pipelined=False`: micro steps and decoding in turn, on
    the iterating thread). An exception in the denoiser thread is raised by `__next__`. The denoiser thread pulls
    the `video` input, so its iterable should not need the caller's thread.

    `set_prompt` may be called from any thread (a UI callback); the new prompt takes effect at the denoiser's next
    micro step. A denoiser thread may be anywhere in the chunk after the last one handed out, so where a prompt set
    between chunks lands depends on timing; sequentially, it lands at the first micro step of the next chunk (use that
    for reproducible switches). `close()`, leaving a `with` block or dropping the stream ends it and stops the thread.

    `state` is the whole stream as of the last chunk handed out, a picklable `StreamState`, and resuming it
    (`pipe.stream(state=...)`) goes on with the next chunk; after `close()` it also carries the last prompt asked for.
    While a denoiser thread runs, `state` is a snapshot that the thread no longer writes, safe to read and pickle
    between chunks; the thread's work beyond it (up to one chunk) is dropped at `close()`, and with it, for
    video-to-video, the input frames the thread took for that work. Sequential: `state` is the live state, which
    `pipe.advance(stream.state)` may step by hand.
    """

    def __init__(self, pipe: StreamDiTPipeline, state: StreamState, video: VideoSource | None = None,
                 pipelined: bool = True, chunk_call=None):
        self.pipe, self.state, self.pipelined, self.chunk_call = pipe, state, pipelined, chunk_call
        self.closed = False
        self._prompts = _PromptBox()
        self._denoiser = _Denoiser(pipe, video, self._prompts)
        self._thread = None  # _DenoiserThread, started by the first __next__ of a pipelined stream
        self._stop_thread = None  # weakref.finalize: stops the thread when the stream is dropped unclosed
        self._lock = threading.Lock()  # `state` against a close() from another thread

    def set_prompt(self, prompt: str):
        self.pipe.check_prompt(prompt)  # a bad prompt fails here, in the caller, and the stream keeps its old one
        self._prompts.put(prompt)

    def close(self):
        """Ends the stream; a denoiser thread finishes its micro step and is joined here."""
        with self._lock:  # a __next__ on another thread either sees `closed` or has left its thread to stop here
            self.closed = True
            stop_thread = self._stop_thread
        if stop_thread is not None:
            stop_thread()  # calls _DenoiserThread.stop once, however often close() runs
        with self._lock:
            latest = self._prompts.latest
            if latest is not None and self.state.prompt != [latest] * len(self.state.prompt):
                self.state.set_prompt(latest)  # asked for but not yet in the state: a resumed stream takes it up

    def __iter__(self):
        return self

    def __next__(self) -> StreamChunk:
        if self.closed or self.state.finished:
            raise StopIteration
        if self.pipelined:
            chunk = self._next_pipelined()
        elif self.chunk_call is not None:
            chunk = self._next_called()
        else:
            self.state, released = self._denoiser.chunk(self.state)
            chunk = self.pipe._decode_released(self.state, released)
        if self.state.finished or len(chunk.frames) == 0:
            self.close()  # the input has ended: no more micro steps
        if len(chunk.frames) == 0:  # only padding after the input video's end
            raise StopIteration
        return chunk

    def _next_called(self) -> StreamChunk:
        self._denoiser.take_inputs(self.state)
        self.state, chunk = self.chunk_call(self.state)
        return chunk

    def _next_pipelined(self) -> StreamChunk:
        with self._lock:
            if self.closed:
                raise StopIteration
            if self._thread is None:
                self._thread = _DenoiserThread(self._denoiser, _snapshot(self.state))  # the thread's own state
                self._stop_thread = weakref.finalize(self, self._thread.stop)
            thread = self._thread
        try:
            handoff = thread.take()
        except BaseException:
            self.close()
            raise
        with self._lock:
            if handoff is None or self.closed:  # closed meanwhile, from another thread
                raise StopIteration
            # The denoiser's state at the release, with the decoder side carried on from ours.
            for name in _DECODER_SIDE:
                setattr(handoff.state, name, getattr(self.state, name))
            self.state = handoff.state
            return self.pipe._decode_released(self.state, handoff.released)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_prompt_schedule(text: str) -> list[tuple[float, str]]:
    """"0: a red circle moving left | 4: a blue square moving up" -> [(0.0, ...), (4.0, ...)], in time order.

    Seconds of video at which each prompt takes over; the first must be at 0. ValueError names a malformed entry.
    """
    schedule = []
    for part in text.split("|"):
        second, sep, prompt = part.partition(":")
        try:
            second = float(second)
        except ValueError:
            second = None
        if not sep or second is None or not 0 <= second < float("inf") or not prompt.strip():
            raise ValueError(f"prompt schedule entry {part.strip()!r} is not 'SECONDS: prompt'")
        schedule.append((second, prompt.strip()))
    schedule.sort(key=lambda entry: entry[0])
    if schedule[0][0] != 0:
        raise ValueError(f"a prompt schedule must start at 0 s, not at {schedule[0][0]:g} s")
    return schedule

