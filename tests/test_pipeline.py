"""StreamDiTPipeline: fixed-length generation, streams, their state, video-to-video, saving and loading."""

import ctypes
import gc
import pickle
import queue
import threading

import numpy as np
import psutil
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from conftest import shows_colour, tiny_pipeline
from streamdit import StreamDiTPipeline, from_preset
from streamdit.pipeline import VideoSource, _DenoiserThread, parse_prompt_schedule

PROMPT = "a red circle moving left"


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def take(stream, n):
    return [next(stream) for _ in range(n)]


def smooth_video(frames=40, size=16):
    t = np.arange(frames)[:, None, None, None]
    y, x = np.mgrid[0:size, 0:size][..., None].transpose(0, 1, 2, 3)
    video = 127 + 100 * np.sin(0.3 * x[None] + 0.2 * t + np.array([0, 2, 4])) * np.cos(0.2 * y[None])
    return video.astype(np.uint8)  # (f, H, W, 3)


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


@pytest.mark.parametrize("pipelined", [True, False])
def test_stream_chunks(pipe, pipelined):
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=pipelined)
    chunks = take(stream, 4)
    assert [c.index for c in chunks] == [0, 1, 2, 3]
    assert [c.start_frame for c in chunks] == [0, 8, 16, 24]
    assert all(c.frames.shape == (8, 16, 16, 3) and c.frames.dtype == np.uint8 for c in chunks)
    assert all(c.prompt == PROMPT and c.denoise_seconds > 0 and c.decode_seconds > 0 for c in chunks)
    # start-up takes T = 8 micro steps (a uniform generation), then each chunk takes s = 2; the state is the stream's
    # as of the last chunk handed out, however far a denoiser thread has gone since
    assert stream.state.micro_step == 8 + 3 * 2
    stream.close()
    with pytest.raises(StopIteration):
        next(stream)


def test_stream_equals_fixed_length_generation_with_overlapped_decoding(pipe):
    whole = pipe(PROMPT, num_frames=48, generator=seeded(), output_type="np").frames[0]
    whole = (whole * 255).round()
    streamed = np.concatenate([c.frames for c in take(pipe.stream(PROMPT, generator=seeded()), 6)]).astype(float)
    assert np.abs(streamed - whole).max() <= 1  # identical up to rounding: no seams between chunks
    seamed = take(pipe.stream(PROMPT, generator=seeded(), overlapped_decoding=False), 6)
    seamed = np.concatenate([c.frames for c in seamed]).astype(float)
    assert np.abs(seamed[:8] - whole[:8]).max() <= 1  # the first chunk has no past either way
    assert np.abs(seamed[8:] - whole[8:]).max() > 10  # without overlap, later chunks start from a blank past


@pytest.mark.parametrize("restyle", [False, True])
def test_stream_decodes_and_encodes_each_frame_once(restyle, monkeypatch):
    """The decoder (and a video-to-video input's encoder) carries its left context in a CausalCache: every call
    after the first gets only the chunk's own frames, never the frames before it again."""
    pipe = tiny_pipeline()
    decoded, encoded = [], []
    decode, encode = pipe.vae.decode, pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "decode",
                        lambda z, cache=None, text=None: decoded.append(z.shape[2]) or decode(z, cache, text))
    monkeypatch.setattr(pipe.vae, "encode", lambda x, cache=None: encoded.append(x.shape[2]) or encode(x, cache))
    options = dict(video=smooth_video(64), strength=0.6) if restyle else {}
    take(pipe.stream(PROMPT, generator=seeded(), **options), 4)
    chunk = pipe.scheduler.config.chunk_size
    assert decoded == [chunk] * 4
    if restyle:  # the first buffer, then one chunk of input frames per release
        assert encoded == [32] + [chunk * pipe.vae_scale_factor_temporal] * 4


def test_pipelined_stream_equals_the_sequential_one(pipe):
    def chunks(pipelined):
        stream = pipe.stream(PROMPT, negative_prompt="a blue square", guidance_scale=2.0, generator=seeded(),
                             pipelined=pipelined)
        with stream:
            return take(stream, 6)

    for a, b in zip(chunks(True), chunks(False), strict=True):
        assert np.array_equal(a.frames, b.frames)  # bit for bit
        assert (a.index, a.start_frame, a.prompt) == (b.index, b.start_frame, b.prompt)


def denoisers():
    """Live denoiser threads (counted by name: other libraries' helper threads come and go on their own)."""
    return sum(thread.name == "streamdit-denoiser" for thread in threading.enumerate())


@pytest.mark.parametrize("pipelined", [True, False])
def test_pipelined_stream_denoises_the_next_chunk_while_decoding(pipe, monkeypatch, pipelined):
    """Each decode is slowed until a micro step runs meanwhile; the first micro step of each chunk after start-up
    waits for a decode to be under way. Both wait in vain (and time out) when the two cannot overlap."""
    events, decoding, stepped = [], threading.Event(), threading.Event()
    advance, decode = pipe.advance, pipe.decode_latents
    patience = 5.0 if pipelined else 0.2

    def recording_advance(state):
        if state.micro_step >= 8 and state.micro_step % 2 == 0:
            decoding.wait(patience)
        events.append(("step", state.micro_step, threading.current_thread()))
        stepped.set()
        return advance(state)

    def slow_decode(latents, cache=None, text=None):
        stepped.clear()
        events.append(("decode", None, threading.current_thread()))
        decoding.set()
        stepped.wait(patience)
        events.append(("decoded", None, threading.current_thread()))
        decoding.clear()
        return decode(latents, cache, text)

    monkeypatch.setattr(pipe, "advance", recording_advance)
    monkeypatch.setattr(pipe, "decode_latents", slow_decode)
    with pipe.stream(PROMPT, generator=seeded(), pipelined=pipelined) as stream:
        take(stream, 2)
    starts = [i for i, e in enumerate(events) if e[0] == "decode"]
    ends = [i for i, e in enumerate(events) if e[0] == "decoded"]
    during = [[e for e in events[a:b] if e[0] == "step"] for a, b in zip(starts, ends, strict=True)]
    assert all(events[i][2] is threading.current_thread() for i in starts)  # decoding on the caller's thread
    if pipelined:  # while chunk k decodes, the denoiser thread takes the micro steps of chunk k + 1
        assert [{step for _, step, _ in steps} for steps in during] in ([{8}, {10}], [{8, 9}, {10, 11}],
                                                                       [{8}, {10, 11}], [{8, 9}, {10}])
        assert all(thread is not threading.current_thread() for steps in during for _, _, thread in steps)
    else:
        assert during == [[], []]


def test_pipelined_stream_runs_at_most_one_chunk_ahead(pipe, monkeypatch):
    """The denoiser thread reports the micro steps it has taken whenever it finds no free slot and has to wait for
    the caller: once it waits, it cannot step again until the caller takes a chunk, so no sleep is needed to see that
    it stopped right after the next chunk."""
    steps, waits = [], queue.Queue()
    advance = pipe.advance
    monkeypatch.setattr(pipe, "advance", lambda state: steps.append(state.micro_step) or advance(state))
    run = _DenoiserThread._run

    def watched_run(thread, state):  # on the denoiser thread, before it claims its first slot
        thread.slot = WatchedSlot(thread.slot, lambda: waits.put(len(steps)))
        run(thread, state)

    monkeypatch.setattr(_DenoiserThread, "_run", watched_run)
    with pipe.stream(PROMPT, generator=seeded(), pipelined=True) as stream:
        for held in range(3):  # the caller holds chunk `held` and asks for nothing more
            next(stream)
            ahead = 8 + 2 * (held + 1)  # micro steps up to the release of chunk held + 1
            while (waited_at := waits.get(timeout=10)) < ahead:  # it may also have waited for this chunk's slot
                pass
            assert waited_at == ahead  # the next chunk was denoised meanwhile, and nothing beyond it
            assert len(steps) == ahead


class WatchedSlot:
    """A denoiser thread's slot that calls `on_wait` each time the thread finds it taken and has to wait."""

    def __init__(self, slot, on_wait):
        self.slot, self.on_wait = slot, on_wait

    def acquire(self):
        if not self.slot.acquire(blocking=False):
            self.on_wait()
            self.slot.acquire()
        return True

    def release(self):
        self.slot.release()


@pytest.mark.parametrize("pipelined", [True, False])
def test_an_error_in_the_denoiser_is_raised_in_the_caller(pipe, monkeypatch, pipelined):
    advance = pipe.advance

    def failing_advance(state):
        if state.micro_step == 9:
            raise RuntimeError("out of memory at micro step 9")
        return advance(state)

    monkeypatch.setattr(pipe, "advance", failing_advance)
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=pipelined)
    next(stream)  # chunk 0: micro steps 0-7
    with pytest.raises(RuntimeError, match="micro step 9"):
        next(stream)
    assert denoisers() == 0
    if pipelined:  # the denoiser thread is gone, and with it the stream
        assert stream.closed
        with pytest.raises(StopIteration):
            next(stream)


def test_a_cpu_stream_runs_in_turn_by_default(pipe):
    """On the CPU a denoiser thread would share the decoder's cores (slower first frame, no faster stream): the
    default is the sequential stream there, and pipelined=True still asks for the thread."""
    assert not pipe.pipelined_by_default
    with pipe.stream(PROMPT, generator=seeded()) as stream:
        next(stream)
        assert not stream.pipelined and denoisers() == 0
    with pipe.stream(PROMPT, generator=seeded(), pipelined=True) as stream:
        next(stream)
        assert stream.pipelined and denoisers() == 1
    with pytest.raises(ValueError, match="pipelined='yes'"):
        pipe.stream(PROMPT, pipelined="yes")


def test_close_stops_the_denoiser_thread(pipe):
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=True)
    take(stream, 2)
    assert denoisers() == 1
    stream.close()
    assert denoisers() == 0
    with pipe.stream(PROMPT, generator=seeded(), pipelined=True) as stream:
        next(stream)
    assert denoisers() == 0
    # an abandoned stream: its finalizer stops the thread
    next(iter(pipe.stream(PROMPT, generator=seeded(), pipelined=True)))
    gc.collect()
    assert denoisers() == 0


def test_close_from_another_thread_ends_a_waiting_next(pipe, monkeypatch):
    """Ordered by events, not sleeps: the closer waits until the caller waits for chunk 1, and chunk 1 cannot be
    released before close() has begun (its last micro step waits for the stop that close() sets)."""
    waiting, take = threading.Event(), _DenoiserThread.take

    def watched_take(thread):
        waiting.set()  # the caller is about to wait on the denoiser's queue
        return take(thread)

    monkeypatch.setattr(_DenoiserThread, "take", watched_take)
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=True)
    stopping, advance = stream._denoiser.stop, pipe.advance
    monkeypatch.setattr(pipe, "advance", lambda state: (state.micro_step < 9 or stopping.wait(10)) and advance(state))
    next(stream)
    waiting.clear()

    def close_when_waited_on():
        waiting.wait(10)
        stream.close()

    closer = threading.Thread(target=close_when_waited_on)
    closer.start()
    with pytest.raises(StopIteration):
        next(stream)
    closer.join()
    assert waiting.is_set() and denoisers() == 0 and stream.closed


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
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=False)  # a thread's tensors in flight would blur counts
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


def test_pipelined_stream_memory_is_flat(pipe):
    fixed_mmap_threshold()

    def closed_after(chunks):  # closing joins the thread: only the stream itself holds tensors then
        stream = pipe.stream(PROMPT, generator=seeded(), pipelined=True)
        take(stream, chunks)
        stream.close()
        gc.collect()
        return stream, live_tensors(), psutil.Process().memory_info().rss

    stream, tensors, rss = closed_after(10)
    del stream
    stream, more_tensors, more_rss = closed_after(60)
    assert stream.state.micro_step == 8 + 59 * 2
    assert more_tensors == tensors and more_rss - rss < 16 * 2**20


def test_state_pickles_and_resumes(pipe):
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=False)  # stepped by hand below
    take(stream, 2)
    stream.state, released = pipe.advance(stream.state)  # stop mid-chunk, between two micro steps
    assert released is None
    saved = pickle.dumps(stream.state)
    expected = take(stream, 3)
    resumed = pipe.stream(state=pickle.loads(saved))
    for a, b in zip(expected, take(resumed, 3)):
        assert np.array_equal(a.frames, b.frames) and a.index == b.index and a.start_frame == b.start_frame


def test_pipelined_stream_state_resumes_with_the_next_chunk(pipe):
    expected = take(pipe.stream(PROMPT, generator=seeded(), pipelined=False), 6)
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=True)
    take(stream, 2)
    running = pickle.dumps(stream.state)  # while the thread works on chunk 2
    take(stream, 1)
    stream.close()  # drops the thread's work on chunk 3
    for saved, start in ((running, 2), (pickle.dumps(stream.state), 3)):
        resumed = take(pipe.stream(state=pickle.loads(saved)), 6 - start)
        for a, b in zip(expected[start:], resumed, strict=True):
            assert np.array_equal(a.frames, b.frames) and (a.index, a.start_frame) == (b.index, b.start_frame)


@pytest.mark.parametrize("pipelined", [True, False])
def test_closed_stream_state_carries_the_last_prompt(pipe, pipelined):
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=pipelined)
    next(stream)
    stream.set_prompt("a blue square moving right")
    stream.close()
    assert stream.state.prompt == ["a blue square moving right"] and stream.state.prompt_embeds is None


def record_text(pipe):
    """Records the text states every transformer call sees, and counts text encoder calls."""
    calls, encodes = [], []
    pipe.transformer.register_forward_hook(lambda m, args, out: calls.append(args[2].clone()))
    pipe.text_encoder.register_forward_hook(lambda m, args, out: encodes.append(args[0]))
    return calls, encodes


@pytest.mark.parametrize("pipelined", [True, False])
def test_set_prompt_changes_conditioning_from_the_next_step(pipe, pipelined):
    embeds = {p: pipe.encode_prompt([p])[0] for p in (PROMPT, "a blue square moving right")}
    calls, encodes = record_text(pipe)
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=pipelined)
    pipe.transformer.register_forward_hook(  # another thread changes the prompt during the 10th micro step
        lambda m, a, o: stream.set_prompt("a blue square moving right") if len(calls) == 10 else None
    )
    chunks = take(stream, 3)  # start-up (8 micro steps), then 2 each
    stream.close()
    assert len(calls) in (12, 13, 14)  # a denoiser thread may have started on the next chunk
    for i, seen in enumerate(calls):
        expected = embeds[PROMPT] if i < 10 else embeds["a blue square moving right"]
        torch.testing.assert_close(seen, expected)
    assert len(encodes) == 2  # each prompt encoded once, not once per step
    assert [c.prompt for c in chunks] == [PROMPT, PROMPT, "a blue square moving right"]  # chunk 1 left at step 10


def test_set_prompt_rejects_bad_prompt_and_keeps_streaming(pipe):
    stream = pipe.stream(PROMPT, generator=seeded())
    with pytest.raises(ValueError, match="empty"):
        stream.set_prompt("  ")
    assert next(stream).prompt == PROMPT


OTHER = "a blue square moving right"


def switched_stream(pipe, switch_strength, second_prompt=OTHER):
    """A sequential stream after its start-up chunk (8 micro steps) with `second_prompt` set for the next one."""
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=False, switch_strength=switch_strength)
    next(stream)
    stream.set_prompt(second_prompt)
    return stream


# Right after a release chunk 0 is at level 6 of T = 8 (s = 2): strength 1 takes it to 0, 6 levels, a fresh start-up.
@pytest.mark.parametrize(("strength", "extra"), [(0.0, 0), (0.25, 2), (0.5, 4), (1.0, 6)])
def test_a_prompt_switch_costs_switch_strength_of_the_trajectory_once(pipe, strength, extra):
    stream = switched_stream(pipe, strength)
    next(stream)
    assert stream.state.micro_step == 8 + 2 + extra
    next(stream)
    assert stream.state.micro_step == 8 + 2 + extra + 2  # once: the next chunk takes its s micro steps again


def test_setting_the_same_prompt_again_is_no_switch(pipe):
    stream = switched_stream(pipe, 1.0, second_prompt=PROMPT)
    next(stream)
    assert stream.state.micro_step == 8 + 2 and stream.state.switched_from is None


def test_a_prompt_set_and_set_back_before_the_next_micro_step_is_no_switch(pipe):
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=False, switch_strength=1.0)
    next(stream)
    stream.state.set_prompt(OTHER)
    stream.state.set_prompt(PROMPT)
    next(stream)
    assert stream.state.micro_step == 8 + 2


def test_prompt_switch_renoises_the_buffer_as_computed_by_hand(pipe):
    # Reference: take every frame 4 levels back (0.5 of T = 8) with noise from the stream's own generator, through
    # the forward process; the first transformer call after the switch must see exactly those latents.
    stream = switched_stream(pipe, 0.5)
    buffer = stream.state.buffer
    levels = buffer.levels.clone()
    generator = torch.Generator()
    generator.set_state(stream.state.generator_state)
    noise = torch.randn(buffer.latents.shape, generator=generator)
    back = (levels - 4).clamp(min=0)
    expected = pipe.scheduler.renoise(buffer.latents, buffer.taus[levels], buffer.taus[back], noise)
    seen = []
    pipe.transformer.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[1].clone())))
    next(stream)
    latents, tau = seen[0]
    torch.testing.assert_close(latents[:1], expected)  # the conditional half of the guided batch
    torch.testing.assert_close(tau[0], buffer.taus[back])
    assert levels.tolist() == [6, 6, 4, 4, 2, 2, 0, 0] and back.tolist() == [2, 2, 0, 0, 0, 0, 0, 0]


def test_prompt_switch_is_seeded_and_resumes_from_a_pickled_state(pipe):
    frames = [c.frames for c in take(switched_stream(pipe, 0.5), 3)]
    assert all(np.array_equal(a, b.frames) for a, b in zip(frames, take(switched_stream(pipe, 0.5), 3)))
    stream = switched_stream(pipe, 0.5)
    stream.close()  # hands the prompt asked for to the state: the switch is pending there
    assert stream.state.switched_from == [PROMPT]
    saved = pickle.dumps(stream.state)
    resumed = take(pipe.stream(state=pickle.loads(saved), pipelined=False), 3)
    assert all(np.array_equal(a, b.frames) for a, b in zip(frames, resumed))
    plain = take(switched_stream(pipe, 0.0), 3)
    assert not np.array_equal(frames[1], plain[1].frames)  # the switch redrew the chunk after it


def test_the_shipped_model_follows_a_switch_from_red_to_blue():
    # Seeds 0-9: with the stored switch strength 9 of 10 streams show the blue object in every frame 2-3 s after the
    # switch; with the paper's plain switch (0) none shows it in any (the old red square stays). Seed 0 passes.
    from streamdit import DEFAULT_MODEL
    from streamdit.evaluate import FPS, stream_frames

    pipe = StreamDiTPipeline.from_pretrained(DEFAULT_MODEL)
    old, new = "a red square moving right on a white background", "a blue circle moving left on a white background"
    for strength, expected in ((None, True), (0.0, False)):
        frames = stream_frames(pipe, old, 7.0, 0, switch=(4.0, new), switch_strength=strength)[6 * FPS : 7 * FPS]
        blue = np.mean([shows_colour(frame, "blue") for frame in frames])
        assert (blue >= 0.8) == expected, f"switch_strength={strength}: blue in {blue:.0%} of the frames"


def test_warmup_chunks_are_made_and_dropped(pipe):
    # the warm-up stream is the plain stream without its first chunks: the same latents, chunk for chunk
    plain = pipe(PROMPT, num_frames=40, generator=seeded(), output_type="latent").frames  # (1, C, 10, H, W)
    warm = pipe(PROMPT, num_frames=24, generator=seeded(), output_type="latent", warmup_chunks=2).frames
    assert warm.shape[2] == 6 and torch.equal(warm, plain[:, :, 4:])
    stream = pipe.stream(PROMPT, generator=seeded(), warmup_chunks=2, pipelined=False)
    first = next(stream)
    assert (first.index, first.start_frame) == (0, 0) and first.frames.shape == (8, 16, 16, 3)
    assert stream.state.micro_step == 8 + 2 * 2  # the start-up's chunk and the next are dropped, the third shown
    # the first chunk shown has no decoded past, as a stream's first chunk never has
    expected = pipe.decode_latents(plain[:, :, 4:6])[0].permute(1, 2, 3, 0).clamp(-1, 1)
    assert np.abs(first.frames - ((expected + 1) * 127.5).round().numpy()).max() <= 1
    stream.close()


def reading_the_prompt(pipe, seed=0):
    """`pipe` with its decoder swapped for the same one reading the prompt, its modulation random (not yet zero)."""
    from streamdit import StreamDiTAutoencoder

    vae = StreamDiTAutoencoder(**{**pipe.vae.config, "decoder_text_channels": pipe.text_encoder.config.hidden_size})
    vae.load_state_dict(pipe.vae.state_dict(), strict=False)
    torch.manual_seed(seed)
    for film in vae.decoder_film.values():
        torch.nn.init.normal_(film.proj.weight, std=0.5)
    pipe.register_modules(vae=vae.eval())
    return pipe


def test_a_decoder_that_reads_the_prompt_decodes_each_chunk_with_the_prompt_it_was_made_for(pipe):
    from streamdit.text import pooled

    pipe = reading_the_prompt(pipe)
    other = "a blue square moving up"
    stream = pipe.stream(PROMPT, generator=seeded(), pipelined=False)
    first = next(stream)
    stream.set_prompt(other)
    assert next(stream).prompt == other
    latents = pipe(PROMPT, num_frames=8, generator=seeded(), output_type="latent").frames  # the stream's first chunk
    # the stream's first chunk: its latents decoded with the prompt's pooled text states, not without them
    text = pooled(*pipe.encode_prompt([PROMPT]))
    expected = pipe.decode_latents(latents[:, :, :2], text=text)[0].permute(1, 2, 3, 0).clamp(-1, 1)
    assert np.abs(first.frames - ((expected + 1) * 127.5).round().numpy()).max() <= 1
    unread = pipe.decode_latents(latents[:, :, :2])[0].permute(1, 2, 3, 0).clamp(-1, 1)
    assert np.abs(first.frames - ((unread + 1) * 127.5).round().numpy()).max() > 5
    # a fixed-length clip decodes with its prompt too
    clip = pipe(PROMPT, num_frames=8, generator=seeded(), output_type="pt").frames  # (1, 8, 3, H, W) in [0, 1]
    assert torch.allclose(clip[0].permute(0, 2, 3, 1) * 255, torch.from_numpy(first.frames).float(), atol=1.5)
    stream.close()


def test_the_model_default_warmup_applies_to_text_to_video_only(pipe):
    pipe.register_to_config(warmup_chunks=3)
    assert pipe.prepare_stream(PROMPT).warmup_chunks == 3
    assert pipe.prepare_stream(PROMPT, warmup_chunks=0).warmup_chunks == 0
    assert pipe.prepare_stream(PROMPT, video=smooth_video(32)).warmup_chunks == 0  # every input frame is shown
    with pytest.raises(ValueError, match="warmup_chunks=1 would drop input frames"):
        pipe.prepare_stream(PROMPT, video=smooth_video(32), warmup_chunks=1)


@pytest.mark.parametrize("value", [-1, 1.5, "2", True, None])
def test_bad_warmup_chunks_raises_value_error(pipe, value):
    if value is None:  # None is the model's default, which must itself be checked
        pipe.register_to_config(warmup_chunks=-2)
    with pytest.raises(ValueError, match="warmup_chunks="):
        pipe.prepare_stream(PROMPT, warmup_chunks=value)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_switch_strength_raises_value_error(pipe, value):
    if value is None:  # None is the model's default, which must itself be checked
        pipe.register_to_config(switch_strength=2.0)
    with pytest.raises(ValueError, match="switch_strength="):
        pipe.prepare_stream(PROMPT, switch_strength=value)


def test_save_and_load_round_trip(pipe, tmp_path):
    pipe.register_to_config(guidance_scale=2.0, switch_strength=0.25, warmup_chunks=1)
    pipe.save_pretrained(tmp_path)
    loaded = StreamDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config) and loaded.config.guidance_scale == 2.0
    assert loaded.config.switch_strength == 0.25 and loaded.prepare_stream(PROMPT).switch_strength == 0.25
    assert loaded.prepare_stream(PROMPT).warmup_chunks == 1
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
        (dict(prompt=[]), r"prompt=\[\]"),
        (dict(negative_prompt=["a red circle", "a blue square"]), "2 negative prompts for 1 prompts"),
        (dict(latents=torch.zeros(1, 4, 7, 4, 4)), r"latents of shape \(1, 4, 7, 4, 4\)"),
        (dict(guidance_scale="3"), "guidance_scale='3'"),
        (dict(guidance_scale=float("nan")), "guidance_scale=nan"),
        (dict(chunk_size=2.0), r"c=2\.0"),
        (dict(micro_steps=1.5), r"micro_steps=1\.5"),
        (dict(reference_frames=1.0), r"reference_frames=1\.0"),
        (dict(num_frames=2.5), r"num_frames=2\.5"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), r"\['noise'\]"),
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
    with pytest.raises(ValueError, match="pipelined='yes'"):
        pipe.stream(PROMPT, pipelined="yes")
    with pytest.raises(ValueError, match="at least one input frame"):
        pipe.stream(PROMPT, video=[])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(overlapped_decoding=1), "overlapped_decoding=1 must be True or False"),
        (dict(prompt=[PROMPT, "a blue square"], video=smooth_video(32)),
         r"single prompt, got 2: \['a red circle moving left', 'a blue square'\]"),
        (dict(video=smooth_video(10), video_complete=False), "needs 32 input frames and has 10"),
        (dict(video=[]), "at least one input frame"),
        (dict(video=np.zeros((4, 16, 16), np.uint8)), r"video frames of shape \(4, 16, 16\)"),
        (dict(video=smooth_video(32), strength=1.5), r"strength=1\.5"),
    ],
)
def test_bad_stream_options_raise_value_error(pipe, options, message):
    options = dict(prompt=PROMPT) | options
    with pytest.raises(ValueError, match=message):
        pipe.prepare_stream(**options)


def test_video_input_to_a_text_to_video_stream_raises_value_error(pipe):
    state = pipe.prepare_stream(PROMPT, generator=seeded())
    with pytest.raises(ValueError, match="feed_video needs a video-to-video stream .* is text-to-video"):
        pipe.feed_video(state, smooth_video(8))
    with pytest.raises(ValueError, match="top_up_video needs a video-to-video stream .* is text-to-video"):
        pipe.top_up_video(state, VideoSource(smooth_video(8)))
    assert state.video_pending is None and not state.video_ended  # the stream is left as it was


@pytest.mark.parametrize(
    "text, message",
    [
        ("0 a red circle", "'0 a red circle' is not 'SECONDS: prompt'"),
        ("0: a red circle | x: a blue square", "'x: a blue square' is not"),
        ("0: a red circle | 2:", "'2:' is not"),
        ("-1: a red circle", "'-1: a red circle' is not"),
        ("inf: a red circle", "'inf: a red circle' is not"),
        ("1: a red circle", "not at 1 s"),
    ],
)
def test_bad_prompt_schedule_raises_value_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt_schedule(text)


def test_prompt_schedule_is_put_in_time_order():
    assert parse_prompt_schedule("4: a blue square | 0: a red circle ") == [(0.0, "a red circle"),
                                                                            (4.0, "a blue square")]


def test_classifier_free_guidance(pipe):
    plain = pipe(PROMPT, num_frames=8, generator=seeded()).frames
    ignored = pipe(PROMPT, negative_prompt="a blue square", num_frames=8, generator=seeded()).frames
    assert np.array_equal(plain, ignored)  # guidance 1: no unconditional branch at all
    guided = pipe(PROMPT, guidance_scale=4.0, num_frames=8, generator=seeded()).frames
    negative = pipe(PROMPT, guidance_scale=4.0, negative_prompt="a blue square", num_frames=8, generator=seeded())
    assert not np.array_equal(plain, guided) and not np.array_equal(guided, negative.frames)


@pytest.mark.parametrize("negative_prompt", [None, "a blue square"])
def test_guided_micro_step_follows_the_guidance_formula(pipe, negative_prompt):
    """One micro step after start-up (frames at four levels), recomputed from the transformer's conditional and
    unconditional velocities: x + (u_neg + g (u_cond - u_neg)) * (next_tau - tau), per frame. No negative prompt
    means the empty one."""
    g = 3.0
    state = pipe.prepare_stream(PROMPT, negative_prompt=negative_prompt, guidance_scale=g, generator=seeded())
    for _ in range(8):  # start-up: chunk 0 leaves, the other chunks sit at the tops of their segments
        state, _ = pipe.advance(state)
    x, tau, next_tau = state.buffer.latents.clone(), state.buffer.tau(), state.buffer.next_tau()
    assert len(set(tau.tolist())) == 4 and (next_tau > tau).all()
    with torch.no_grad():
        cond, cond_mask = pipe.encode_prompt([PROMPT])
        negative, negative_mask = pipe.encode_prompt([negative_prompt or ""])
        u_cond = pipe.transformer(x, tau[None], cond, cond_mask).sample
        u_neg = pipe.transformer(x, tau[None], negative, negative_mask).sample
    expected = x + (u_neg + g * (u_cond - u_neg)) * (next_tau - tau).view(1, 1, -1, 1, 1)
    state, released = pipe.advance(state)
    assert released is None
    torch.testing.assert_close(state.buffer.latents, expected, atol=1e-5, rtol=1e-5)
    assert (u_cond - u_neg).abs().max() > 0.1  # the branches differ, so a wrong g or a swapped pair would show


def test_callback_on_step_end(pipe):
    seen = []

    def callback(p, step, tau, kwargs):
        seen.append((step, tau.clone()))
        return {"latents": kwargs["latents"] * 0.5} if step == 0 else {}

    out = pipe(PROMPT, num_frames=8, generator=seeded(), callback_on_step_end=callback).frames
    assert [s for s, _ in seen] == list(range(8)) and seen[0][1].shape == (8,)
    assert torch.equal(seen[0][1], torch.zeros(8))  # start-up begins from pure noise
    assert not np.array_equal(out, pipe(PROMPT, num_frames=8, generator=seeded()).frames)


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


@pytest.mark.parametrize("strength", [0.3, 0.7])
def test_video_to_video_starts_the_trajectory_at_its_strength(strength):
    """SDEdit on a randomised model: the first transformer call sees the encoded input noised to tau_0 =
    shift(1 - strength), and the start-up micro steps walk the grid from tau_0 to 1 in T = 8 steps."""
    pipe = tiny_pipeline(shift=3.0)
    video = smooth_video(40)
    seen = []
    pipe.transformer.register_forward_hook(lambda m, args, out: seen.append((args[0].clone(), args[1].clone())))
    state = pipe.prepare_stream(PROMPT, video=video, strength=strength, generator=seeded())
    for _ in range(8):
        state, _ = pipe.advance(state)
    sigma = 1.0 - torch.linspace(1.0 - strength, 1.0, 9, dtype=torch.float64)
    grid = (1.0 - 3.0 * sigma / (1.0 + 2.0 * sigma)).float()  # SD3's shift 3, in tau = 1 - sigma
    torch.testing.assert_close(grid, pipe.scheduler.taus(pipe.scheduler.partition(), strength))
    caps = torch.tensor([8, 8, 6, 6, 4, 4, 2, 2])  # start-up stops each chunk at the top of its segment
    assert len(seen) == 8
    for step, (_, tau) in enumerate(seen):
        torch.testing.assert_close(tau, grid[caps.clamp(max=step)][None])
    with torch.no_grad():
        x1 = pipe.vae.encode(torch.from_numpy(video[:32]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0)
    noise = torch.randn(x1.shape, generator=seeded())
    torch.testing.assert_close(seen[0][0], grid[0] * x1 + (1.0 - grid[0]) * noise)
    assert (seen[1][0] - seen[0][0]).abs().max() > 0.01  # a model that moves the buffer


def test_video_to_video_pipelined_equals_sequential():
    pipe = tiny_pipeline()
    video = smooth_video(37)

    def restyle(pipelined):
        return list(pipe.stream(PROMPT, video=iter(video), strength=0.6, generator=seeded(), pipelined=pipelined))

    pipelined, sequential = restyle(True), restyle(False)
    assert denoisers() == 0  # the stream stopped its thread when the input ended
    assert sum(len(c.frames) for c in pipelined) == 37  # it ends with its input
    for a, b in zip(pipelined, sequential, strict=True):
        assert np.array_equal(a.frames, b.frames) and a.start_frame == b.start_frame


@pytest.mark.parametrize("restyle", [False, True])
def test_chunk_call_stream_equals_the_sequential_one(restyle):
    """One call per chunk, the state pickled across it as into a ZeroGPU process and back; a prompt set between
    chunks lands as in the sequential stream."""
    pipe = tiny_pipeline()
    video = smooth_video(70) if restyle else None
    calls, pending = [], []

    def gpu_call(state):
        pending.append(len(state.video_pending) if state.video_pending is not None else 0)
        state, chunk = pipe.next_chunk(pickle.loads(pickle.dumps(state)))
        calls.append(chunk.index)
        return pickle.loads(pickle.dumps(state)), chunk

    def chunks(**call):
        options = dict(video=iter(video), strength=0.6) if restyle else {}
        stream = pipe.stream(PROMPT, generator=seeded(), pipelined=None if call else False, **options, **call)
        out = []
        for chunk in stream:
            out.append(chunk)
            if len(out) == 2:
                stream.set_prompt("a blue square moving up")
            if len(out) == 5:
                break
        return out

    called, sequential = chunks(chunk_call=gpu_call), chunks()
    assert calls == [c.index for c in called] == list(range(len(called)))  # one call a chunk, nothing else
    for a, b in zip(called, sequential, strict=True):
        assert np.array_equal(a.frames, b.frames) and a.prompt == b.prompt
    assert called[1].prompt == PROMPT and called[2].prompt == "a blue square moving up"
    if restyle:
        chunk = pipe.scheduler.config.chunk_size * pipe.vae_scale_factor_temporal
        assert 0 < max(pending) <= chunk  # the clip stays with the caller, fed one chunk ahead of each call
    with pytest.raises(ValueError, match="chunk_call=3"):
        pipe.stream(PROMPT, chunk_call=3)
    with pytest.raises(ValueError, match="pipelined=True"):
        pipe.stream(PROMPT, chunk_call=gpu_call, pipelined=True)


def test_video_to_video_resizes_input():
    pipe = tiny_pipeline()
    chunks = list(pipe.stream(PROMPT, video=np.zeros((36, 24, 20, 3), np.uint8), strength=0.5, generator=seeded()))
    assert sum(len(c.frames) for c in chunks) == 36 and chunks[0].frames.shape[1:] == (16, 16, 3)
