"""StreamDiTPipeline: fixed-length generation, streams, their state, video-to-video, saving and loading."""

import ctypes
import gc
import pickle

import numpy as np
import psutil
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from conftest import tiny_pipeline
from streamdit import StreamDiTPipeline, from_preset

PROMPT = "a red circle moving left"


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def take(stream, n):
    return [next(stream) for _ in range(n)]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_uniform_partition_matches_flow_match_euler(shift):
    pipe = tiny_pipeline(shift=shift)
    steps = 6
    noise = torch.randn(1, 4, 8, 4, 4, generator=seeded())
    ours = pipe(PROMPT, chunk_size=8, micro_steps=steps, latents=noise, output_type="latent").frames

    # Reference: diffusers' Euler sampler over the same model. Its sigma is 1 - tau and its velocity dX/dsigma = -u.
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(sigmas=list(1.0 - np.linspace(0.0, 1.0, steps + 1)[:-1]))
    embeds, mask = pipe.encode_prompt([PROMPT])
    x = noise.clone()
    with torch.no_grad():
        for t in reference.timesteps:
            tau = (1.0 - t / reference.config.num_train_timesteps).expand(1, 8)
            x = reference.step(-pipe.transformer(x, tau, embeds, mask).sample, t, x).prev_sample
    assert (ours - x).abs().max() < 1e-4
    assert (x - noise).abs().max() > 0.1  # the model did move the sample


def test_output_types_and_num_frames(pipe):
    out = pipe(PROMPT, num_frames=10, generator=seeded())
    assert out.frames.shape == (1, 10, 16, 16, 3) and out.frames.dtype == np.float32
    assert 0 <= out.frames.min() and out.frames.max() <= 1
    assert pipe(PROMPT, num_frames=10, generator=seeded(), output_type="pt").frames.shape == (1, 10, 3, 16, 16)
    pil = pipe(PROMPT, num_frames=10, generator=seeded(), output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 10 and pil[0][0].size == (16, 16)
    latents = pipe(PROMPT, num_frames=10, generator=seeded(), output_type="latent").frames
    assert latents.shape == (1, 4, 3, 4, 4)  # ceil(10 / 4) latent frames
    batch = pipe([PROMPT, "a blue square"], num_frames=40, generator=seeded()).frames  # three chunks
    assert batch.shape == (2, 40, 16, 16, 3)
    assert pipe(PROMPT, generator=seeded()).frames.shape == (1, 32, 16, 16, 3)  # default: one buffer of chunks


def test_seeded_determinism(pipe):
    a = pipe(PROMPT, num_frames=12, generator=seeded(3)).frames
    assert np.array_equal(a, pipe(PROMPT, num_frames=12, generator=seeded(3)).frames)
    assert not np.array_equal(a, pipe(PROMPT, num_frames=12, generator=seeded(4)).frames)
    s1, s2 = pipe.stream(PROMPT, generator=seeded(3)), pipe.stream(PROMPT, generator=seeded(3))
    for a, b in zip(take(s1, 3), take(s2, 3)):
        assert np.array_equal(a.frames, b.frames)


def test_stream_chunks(pipe):
    stream = pipe.stream(PROMPT, generator=seeded())
    chunks = take(stream, 4)
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.start_frame for c in chunks] == [0, 8, 16, 24]
    assert all(c.frames.shape == (8, 16, 16, 3) and c.frames.dtype == np.uint8 for c in chunks)
    assert all(c.prompt == PROMPT and c.denoise_seconds > 0 and c.decode_seconds > 0 for c in chunks)
    # start-up takes T = 8 micro steps (a uniform generation), then each chunk takes s = 2
    assert stream.state.micro_step == 8 + 3 * 2
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


def test_stream_equals_fixed_length_generation_with_overlapped_decoding(pipe):
    whole = pipe(PROMPT, num_frames=48, generator=seeded(), output_type="np").frames[0]
    whole = (whole * 255).round()
    streamed = np.concatenate([c.frames for c in take(pipe.stream(PROMPT, generator=seeded()), 6)]).astype(float)
    assert np.abs(streamed - whole).max() <= 1  # identical up to rounding: no seams between chunks
    seamed = take(pipe.stream(PROMPT, generator=seeded(), decode_overlap=0), 6)
    seamed = np.concatenate([c.frames for c in seamed]).astype(float)
    assert np.abs(seamed[:8] - whole[:8]).max() <= 1  # the first chunk has no past either way
    assert np.abs(seamed[8:] - whole[8:]).max() > 10  # without overlap, later chunks start from a blank past


def live_tensors():
    """(count, bytes) of the tensors Python can reach: a growing tensor shows in the bytes."""
    tensors = [o for o in gc.get_objects() if type(o) in (torch.Tensor, torch.nn.Parameter)]
    return len(tensors), sum(t.untyped_storage().nbytes() for t in tensors)


def fixed_mmap_threshold():
    """glibc raises its mmap threshold as big blocks are freed and then keeps later ones on the heap, so RSS can
    jump by a gigabyte with no live object behind it (seen here on one run in three). A fixed threshold turns that
    off, so RSS measures what the stream holds rather than the allocator's policy."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        pytest.skip("needs glibc")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def test_stream_memory_is_flat(pipe):
    fixed_mmap_threshold()
    stream = pipe.stream(PROMPT, generator=seeded())
    take(stream, 10)  # past start-up and the first allocations
    gc.collect()
    tensors, rss = live_tensors(), psutil.Process().memory_info().rss
    for _ in range(150):  # 300 micro steps
        next(stream)
    gc.collect()
    assert stream.state.micro_step == 8 + 159 * 2
    assert live_tensors() == tensors
    assert stream.state.buffer.latents.grad_fn is None  # no autograd history piling up behind the buffer
    assert psutil.Process().memory_info().rss - rss < 16 * 2**20


def test_state_pickles_and_resumes(pipe):
    stream = pipe.stream(PROMPT, generator=seeded())
    take(stream, 2)
    stream.state, released = pipe.advance(stream.state)  # stop mid-chunk, between two micro steps
    assert released is None
    saved = pickle.dumps(stream.state)
    expected = take(stream, 3)
    resumed = pipe.stream(state=pickle.loads(saved))
    for a, b in zip(expected, take(resumed, 3)):
        assert np.array_equal(a.frames, b.frames) and a.index == b.index and a.start_frame == b.start_frame


def record_text(pipe):
    """Records the text states every transformer call sees, and counts text encoder calls."""
    calls, encodes = [], []
    pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(args[2].clone()))
    pipe.text_encoder.register_forward_hook(lambda m, args, out: encodes.append(args[0]))
    return calls, encodes


def test_set_prompt_changes_conditioning_from_the_next_step(pipe):
    embeds = {p: pipe.encode_prompt([p])[0] for p in (PROMPT, "a blue square moving right")}
    calls, encodes = record_text(pipe)
    stream = pipe.stream(PROMPT, generator=seeded())
    next(stream)  # start-up: 8 micro steps
    pipe.transformer.register_forward_hook(  # a UI thread changes the prompt during the 10th micro step
        lambda m, a, o: stream.set_prompt("a blue square moving right") if len(calls) == 10 else None
    )
    chunks = take(stream, 2)
    assert len(calls) == 12
    for i, seen in enumerate(calls):
        expected = embeds[PROMPT] if i < 10 else embeds["a blue square moving right"]
        torch.testing.assert_close(seen, expected)
    assert len(encodes) == 2  # each prompt encoded once, not once per step
    assert chunks[1].prompt == "a blue square moving right"


def test_set_prompt_rejects_bad_prompt_and_keeps_streaming(pipe):
    stream = pipe.stream(PROMPT, generator=seeded())
    with pytest.raises(ValueError, match="empty"):
        stream.set_prompt("  ")
    assert next(stream).prompt == PROMPT


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.register_to_config(guidance_scale=2.0)
    pipe.save_pretrained(tmp_path)
    loaded = StreamDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config) and loaded.config.guidance_scale == 2.0
    assert loaded.tokenizer(PROMPT).input_ids == pipe.tokenizer(PROMPT).input_ids
    a = pipe(PROMPT, negative_prompt="a blue square", num_frames=8, generator=seeded()).frames
    assert np.array_equal(a, loaded(PROMPT, negative_prompt="a blue square", num_frames=8, generator=seeded()).frames)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prompt=""), "prompt '' is empty"),
        (dict(prompt="   "), "is empty"),
        (dict(prompt=" ".join(["red"] * 20)), "needs 21 tokens"),
        (dict(chunk_size=3), "c=3"),
        (dict(micro_steps=0), "micro_steps=0"),
        (dict(height=18), "height=18"),
        (dict(width=0), "width=0"),
        (dict(num_frames=0), "num_frames=0"),
        (dict(guidance_scale=0.5), "guidance_scale=0.5"),
        (dict(output_type="gif"), "output_type='gif'"),
        (dict(reference_frames=8), "K=8"),
    ],
)
def test_bad_input_raises_value_error(pipe, options, message):
    options = dict(prompt=PROMPT) | options
    with pytest.raises(ValueError, match=message):
        pipe(**options)


def test_bad_stream_input_raises_value_error(pipe):
    with pytest.raises(ValueError, match="must be a string"):
        pipe.stream([PROMPT, PROMPT])
    with pytest.raises(ValueError, match="strength=0.5 needs an input video"):
        pipe.stream(PROMPT, strength=0.5)
    with pytest.raises(ValueError, match="not divisible by the window"):
        tiny_pipeline(buffer_frames=9, chunk_size=3).stream(PROMPT)


def test_classifier_free_guidance(pipe):
    plain = pipe(PROMPT, num_frames=8, generator=seeded()).frames
    ignored = pipe(PROMPT, negative_prompt="a blue square", num_frames=8, generator=seeded()).frames
    assert np.array_equal(plain, ignored)  # guidance 1: no unconditional branch at all
    guided = pipe(PROMPT, guidance_scale=4.0, num_frames=8, generator=seeded()).frames
    negative = pipe(PROMPT, guidance_scale=4.0, negative_prompt="a blue square", num_frames=8, generator=seeded())
    assert not np.array_equal(plain, guided) and not np.array_equal(guided, negative.frames)


def test_callback_on_step_end(pipe):
    seen = []

    def callback(p, step, tau, kwargs):
        seen.append((step, tau.clone()))
        return {"latents": kwargs["latents"] * 0.5} if step == 0 else {}

    out = pipe(PROMPT, num_frames=8, generator=seeded(), callback_on_step_end=callback).frames
    assert [s for s, _ in seen] == list(range(8)) and seen[0][1].shape == (8,)
    assert torch.equal(seen[0][1], torch.zeros(8))  # start-up begins from pure noise
    assert not np.array_equal(out, pipe(PROMPT, num_frames=8, generator=seeded()).frames)


def smooth_video(frames=40, size=16):
    t = np.arange(frames)[:, None, None, None]
    y, x = np.mgrid[0:size, 0:size][..., None].transpose(0, 1, 2, 3)
    video = 127 + 100 * np.sin(0.3 * x[None] + 0.2 * t + np.array([0, 2, 4])) * np.cos(0.2 * y[None])
    return video.astype(np.uint8)  # (f, H, W, 3)


def test_video_to_video_streams_the_restyled_input():
    pipe = tiny_pipeline()
    pipe.transformer = from_preset("tiny")  # zero velocity: the output is the noised input, decoded
    video = smooth_video(37)
    reconstruction = (pipe.vae(torch.from_numpy(np.concatenate([video, video[-1:].repeat(3, 0)])).permute(3, 0, 1, 2)
                               [None].float() / 127.5 - 1).clamp(-1, 1)[0].permute(1, 2, 3, 0) + 1) * 127.5
    reconstruction = reconstruction.detach().numpy()[:37]

    def restyle(strength, frames):
        stream = pipe.stream(PROMPT, video=frames, strength=strength, generator=seeded())
        return np.concatenate([c.frames for c in stream]).astype(float)

    light = restyle(0.01, iter(video))  # frames one at a time
    assert light.shape == (37, 16, 16, 3)  # the stream ends with its input, padding dropped
    aligned = np.abs(light - reconstruction).mean()
    assert aligned < 3  # a light touch keeps the input...
    assert np.abs(light[4:] - reconstruction[:-4]).mean() > 3 * aligned  # ...frame for frame, not a latent frame off
    heavy = restyle(1.0, [video[:20], video[20:]])  # frame arrays
    assert heavy.shape == (37, 16, 16, 3) and np.abs(heavy - reconstruction).mean() > 30


def test_video_to_video_resizes_input():
    pipe = tiny_pipeline()
    chunks = list(pipe.stream(PROMPT, video=np.zeros((36, 24, 20, 3), np.uint8), strength=0.5, generator=seeded()))
    assert sum(len(c.frames) for c in chunks) == 36 and chunks[0].frames.shape[1:] == (16, 16, 3)
