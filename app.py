"""StreamDiT Space: type a prompt and watch the video being generated while it plays; change the prompt mid-stream,
restyle an uploaded clip, stop whenever you like. Also an API for gradio_client (`/stream`, `/generate`, `/restyle`).

    python app.py                          # the built-in shapes-world model and its real-time student, offline
    python app.py --model path/or/hub-id   # or STREAMDIT_MODEL=... python app.py; --model A --model B (or
                                           # STREAMDIT_MODEL=A,B) offers both, the first the default

Each visitor picks one of the Space's models (the Model menu; `model` in the API); the stream options a visitor or an
API caller leaves out are that model's own stored defaults.

On a CPU machine or a dedicated GPU a stream is the library's `pipe.stream`: on a GPU pipelined as in the paper (a
denoiser thread takes the next chunk's micro steps while this one decodes), on a CPU in turn (the two would share the
same cores). On ZeroGPU every GPU call runs in a process of its own, so no thread lives across calls: there each chunk
is one `@spaces.GPU` call to `next_chunk` that gets and returns the picklable stream state (the library's
`pipe.stream(chunk_call=...)`), and the stream around it sets the latest prompt between calls.
"""

import argparse
import os
import shutil
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
import spaces
import torch

import streamdit
from streamdit import StreamDiTPipeline
from streamdit.data import FPS
from streamdit.pipeline import VideoSource, parse_prompt_schedule
from streamdit.video import VideoWriter, read_video

SEGMENT_SECONDS = 1.0  # length of each MPEG-TS segment sent to the player
MAX_SECONDS = 600  # the longest stream a visitor can ask for
MAX_WARMUP = 32  # warm-up chunks: 16 s of video at the built-in model's chunk size, made before the first frame
CLIP_LIFETIME = 600  # seconds a /generate file stays on disk
EXAMPLES = Path(__file__).parent / "examples" / "prompts.txt"


def model_sources() -> list[str]:
    """--model (once or more), else $STREAMDIT_MODEL (comma-separated), else the built-in model and its distilled
    student, both shipped in the package. The first is the default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", action="append", default=None)
    known, _ = parser.parse_known_args()
    if known.model:
        return known.model
    listed = [source.strip() for source in os.environ.get("STREAMDIT_MODEL", "").split(",") if source.strip()]
    return listed or [streamdit.DEFAULT_MODEL, streamdit.STUDENT_MODEL]


def model_names(sources: list[str]) -> dict[str, str]:
    """{name shown in the Model menu: source}: a local folder by its own name ("shapes-world"), a Hub id as it is;
    two sources of one name keep their whole source."""
    names = [Path(source).name if Path(source).is_dir() else source for source in sources]
    return {(name if names.count(name) == 1 else source): source for name, source in zip(names, sources)}


def load(source):
    pipe = StreamDiTPipeline.from_pretrained(source).to(DEVICE)
    pipe.set_progress_bar_config(disable=True)
    return pipe


ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))
DEVICE = "cuda" if torch.cuda.is_available() or ZERO_GPU else "cpu"
MODELS = {name: load(source) for name, source in model_names(model_sources()).items()}  # loaded once, shared


def model_name(model=None):
    """The name of the model `model` asks for (None or "": the first, the Space's default)."""
    if model is None or model == "":
        return next(iter(MODELS))
    if model not in MODELS:
        raise gr.Error(f"model={model!r} is not one of this Space's models: {', '.join(map(repr, MODELS))}")
    return model


def pipeline(model=None):
    """The pipeline of the model named `model` (None or "": the default)."""
    return MODELS[model_name(model)]


def chunk_sizes(pipe):
    """The chunk sizes that divide `pipe`'s buffer (less its reference frames) into whole chunks."""
    buffer = pipe.scheduler.config.buffer_frames - pipe.scheduler.config.reference_frames
    return [c for c in range(1, buffer + 1) if buffer % c == 0]


@spaces.GPU(duration=30)
def next_chunk(state, model=None):
    """One GPU call: micro steps until the buffer releases a chunk, then its decoded frames. State in, state out;
    `model` by name, since ZeroGPU pickles what it is given."""
    state, chunk = pipeline(model).next_chunk(state)
    return state.to("cpu"), chunk


def open_stream(state, clip=None, model=None):
    """The library's stream of `state`: made in this process, or one `next_chunk` GPU call per chunk on ZeroGPU."""
    chunk_call = partial(next_chunk, model=model) if ZERO_GPU else None
    return pipeline(model).stream(state=state, video=clip, chunk_call=chunk_call)


# Input checks: every bad value becomes a gr.Error that names it, never a stack trace.


def check_prompt(prompt, pipe=None):
    try:
        (pipeline() if pipe is None else pipe).check_prompt(prompt)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    return prompt.strip()


def check_number(name, value, low, high, integer=False):
    if value is None or not low <= value <= high or (integer and int(value) != value):
        kind = "an integer" if integer else "a number"
        raise gr.Error(f"{name}={value!r} must be {kind} from {low} to {high}")
    return int(value) if integer else float(value)


def check_schedule(prompt, schedule, pipe=None):
    """The prompt schedule, or the single prompt from 0 s."""
    if not schedule or not schedule.strip():
        return [(0.0, check_prompt(prompt, pipe))]
    try:
        entries = parse_prompt_schedule(schedule)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    return [(second, check_prompt(text, pipe)) for second, text in entries]


def stream_options(chunk_size, micro_steps, guidance_scale, switch_strength, pipe=None):
    """The checked stream options for `prepare_stream`, the model's own where the caller gave None."""
    pipe = pipeline() if pipe is None else pipe
    chunk_size, micro_steps, guidance_scale, switch_strength = defaults(chunk_size, micro_steps, guidance_scale,
                                                                        switch_strength, pipe)
    sizes = chunk_sizes(pipe)  # the last is the buffer itself
    if chunk_size not in sizes:
        raise gr.Error(f"chunk_size={chunk_size!r} must divide the buffer of {sizes[-1]} frames: one of {sizes}")
    return dict(
        chunk_size=int(chunk_size),
        micro_steps=check_number("micro_steps", micro_steps, 1, 64, integer=True),
        guidance_scale=check_number("guidance_scale", guidance_scale, 1.0, 20.0),
        switch_strength=check_number("switch_strength", switch_strength, 0.0, 1.0),
    )


def status_line(frames, started, first_frame, latency, prompt, model=None):
    elapsed = time.perf_counter() - started
    unknown = pipeline(model).unknown_words(prompt)
    parts = [
        f"**{frames} frames** ({frames / FPS:.1f} s)",
        f"generating at **{frames / elapsed:.1f} fps** (playback {FPS} fps)",
        f"first frame after {first_frame:.2f} s" if first_frame is not None else "starting",
        f"last chunk latency {latency:.2f} s",  # from asking for the chunk to its frames: what a viewer waits
        f"prompt: *{prompt}*",
    ]
    if len(MODELS) > 1:
        parts.append(f"model: {model_name(model)}")
    if unknown:
        parts.append(f"words the model does not know (ignored): **{', '.join(unknown)}**")
    return " · ".join(parts)


def chunks(state, schedule, max_seconds, live, clip=None, model=None):
    """Yields (frames, status) chunk by chunk until max_seconds, following the prompt schedule (API users)
    and the latest "Update prompt" (UI), both read between chunks. `clip`: a video-to-video stream's input; `model`:
    the name of the model whose `prepare_stream` made `state`."""
    started, first_frame, frames = time.perf_counter(), None, 0
    prompt, upcoming = schedule[0][1], list(schedule[1:])
    seen = live.get("prompt") if live is not None else None  # a live prompt takes over only when it changes
    stream = open_stream(state, clip, model)
    try:
        while frames < max_seconds * FPS:
            while upcoming and frames >= upcoming[0][0] * FPS:
                prompt = upcoming.pop(0)[1]
                stream.set_prompt(prompt)
            if live is not None and live.get("prompt") != seen:
                prompt = seen = live["prompt"]
                stream.set_prompt(prompt)
            called = time.perf_counter()
            chunk = next(stream, None)
            if chunk is None:  # a restyled clip has ended
                return
            latency = time.perf_counter() - called
            first_frame = first_frame or time.perf_counter() - started
            out = chunk.frames[: max(int(max_seconds * FPS) - frames, 0)]
            frames += len(out)
            yield out, status_line(frames, started, first_frame, latency, prompt, model)
    finally:  # the end, Stop, or a visitor who left: the denoiser thread goes too
        stream.close()


def segments(chunk_stream):
    """Groups chunks into MPEG-TS segments of about SEGMENT_SECONDS and yields (segment path, status).

    Each stream writes into its own temporary folder; a segment is deleted once the player has taken it (Gradio reads
    it when it is yielded) and the folder goes when the stream ends, stops or is cancelled: disk use stays bounded.
    """
    folder = Path(tempfile.mkdtemp(prefix="streamdit-"))
    name, written, pending, previous, status = uuid.uuid4().hex[:8], 0, [], None, ""
    try:
        for frames, status in chunk_stream:
            pending.append(frames)
            if sum(len(p) for p in pending) >= SEGMENT_SECONDS * FPS:
                path = write_segment(folder, name, written, pending)
                written += sum(len(p) for p in pending)
                pending = []
                yield str(path), status
                if previous is not None:
                    previous.unlink(missing_ok=True)
                previous = path
        if sum(len(p) for p in pending):
            yield str(write_segment(folder, name, written, pending)), status
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_segment(folder, name, start_frame, pending):
    path = folder / f"{name}-{start_frame:07d}.ts"
    with VideoWriter(path, fps=FPS, format="mpegts", start_frame=start_frame) as writer:  # continuous timestamps
        writer.write(np.concatenate(pending))
    return path


def start_stream(prompt, seed, schedule, chunk_size, micro_steps, guidance_scale, switch_strength, live,
                 warmup_chunks=None, model=None):
    """Checks the inputs and prepares the stream state of the model named `model`; returns it with the schedule."""
    pipe = pipeline(model)
    schedule = check_schedule(prompt, schedule, pipe)
    seed = check_number("seed", seed, 0, 2**31 - 1, integer=True)
    options = stream_options(chunk_size, micro_steps, guidance_scale, switch_strength, pipe)
    warmup_chunks = pipe.config.warmup_chunks if warmup_chunks is None else warmup_chunks
    options["warmup_chunks"] = check_number("warmup_chunks", warmup_chunks, 0, MAX_WARMUP, integer=True)
    if live is not None:
        live.update(prompt=schedule[0][1], model=model)
    return pipe.prepare_stream(schedule[0][1], generator=torch.Generator().manual_seed(seed), **options), schedule


def stream(prompt, seed=0, schedule="", max_seconds=30, chunk_size=None, micro_steps=None, guidance_scale=None,
           switch_strength=None, warmup_chunks=None, model=None, live=None):
    """Streams video for `prompt` (or a prompt schedule "0: ... | 4: ..."), about one MPEG-TS segment per second."""
    max_seconds = check_number("max_seconds", max_seconds, 1, MAX_SECONDS)
    state, schedule = start_stream(prompt, seed, schedule, chunk_size, micro_steps, guidance_scale, switch_strength,
                                   live, warmup_chunks, model)
    yield from segments(chunks(state, schedule, max_seconds, live, model=model))


def generate(prompt, seconds=4, seed=0, schedule="", chunk_size=None, micro_steps=None, guidance_scale=None,
             switch_strength=None, warmup_chunks=None, model=None):
    """A finished .mp4 of `seconds` seconds (a prompt schedule applies here too)."""
    seconds = check_number("seconds", seconds, 1, 120)
    state, schedule = start_stream(prompt, seed, schedule, chunk_size, micro_steps, guidance_scale, switch_strength,
                                   None, warmup_chunks, model)
    clips = Path(tempfile.gettempdir()) / "generated-clips"
    clips.mkdir(exist_ok=True)
    for old in clips.glob("*.mp4"):  # Gradio keeps its own copy of a returned file: ours can go after a while
        if time.time() - old.stat().st_mtime > CLIP_LIFETIME:
            old.unlink(missing_ok=True)
    path = clips / f"{uuid.uuid4().hex}.mp4"
    with VideoWriter(path, fps=FPS) as writer:
        for frames, _ in chunks(state, schedule, seconds, None, model=model):
            writer.write(frames)
    return str(path)


def restyle(video, prompt, strength=0.6, seed=0, max_seconds=30, chunk_size=None, micro_steps=None,
            guidance_scale=None, switch_strength=None, model=None, live=None):
    """Video-to-video: the uploaded clip restyled by `prompt` (SDEdit-style noising to `strength`), streamed back,
    with the same stream options as text to video (the model's own where None)."""
    if not video:
        raise gr.Error("upload a video to restyle")
    pipe = pipeline(model)
    prompt = check_prompt(prompt, pipe)
    strength = check_number("strength", strength, 0.05, 1.0)
    seed = check_number("seed", seed, 0, 2**31 - 1, integer=True)
    max_seconds = check_number("max_seconds", max_seconds, 1, MAX_SECONDS)
    options = stream_options(chunk_size, micro_steps, guidance_scale, switch_strength, pipe)
    try:
        frames = read_video(video)[: int(max_seconds * FPS)]
    except Exception as error:  # anything PyAV cannot decode
        raise gr.Error(f"could not read the uploaded video {Path(str(video)).name!r}: {error}") from None
    if live is not None:
        live.update(prompt=prompt, model=model)
    yield from segments(restyled(VideoSource(frames), prompt, strength, seed, max_seconds, live, model, **options))


def restyled(clip, prompt, strength, seed, max_seconds, live, model=None, **options):
    """The (frames, status) chunks of a restyle. The uploaded clip stays in this generator (a `VideoSource`), not in
    the stream state: the state starts with the first buffer's worth of it, as the library's `pipe.stream(video=...)`
    does, and is then fed one chunk ahead of each release. `options`: `prepare_stream`'s stream options."""
    pipe = pipeline(model)
    first = clip.take(pipe.scheduler.config.buffer_frames * pipe.vae_scale_factor_temporal)
    state = pipe.prepare_stream(prompt, video=first, video_complete=clip.ended, strength=strength,
                                generator=torch.Generator().manual_seed(seed), **options)
    return chunks(state, [(0.0, prompt)], max_seconds, live, clip, model)


def defaults(chunk_size, micro_steps, guidance_scale, switch_strength, pipe=None):
    """The model's own stream defaults (stored with it) where the caller gave none."""
    pipe = pipeline() if pipe is None else pipe
    config = pipe.scheduler.config
    return (
        config.chunk_size if chunk_size is None else chunk_size,
        config.micro_steps if micro_steps is None else micro_steps,
        pipe.config.guidance_scale if guidance_scale is None else guidance_scale,
        pipe.config.switch_strength if switch_strength is None else switch_strength,
    )


def model_defaults(model):
    """The Advanced stream options set to the chosen model's own (what the Model menu does on a change)."""
    pipe = pipeline(model)
    chunk_size, micro_steps, guidance_scale, switch_strength = defaults(None, None, None, None, pipe)
    return (gr.update(choices=chunk_sizes(pipe), value=chunk_size), micro_steps, guidance_scale, switch_strength,
            pipe.config.warmup_chunks)


def update_prompt(prompt, live):
    live["prompt"] = check_prompt(prompt, pipeline(live.get("model")))
    return live


def api_endpoints(models):
    """/stream, /restyle and /generate for API users, on components of their own out of sight: a stream option left
    out is None there, so it is the chosen model's own default (the Advanced controls hold the default model's)."""
    with gr.Group(visible=False):
        prompt, seed, schedule = gr.Textbox(label="prompt"), gr.Number(0, label="seed"), gr.Textbox("", label="schedule")
        seconds, clip_seconds = gr.Number(30, label="max_seconds"), gr.Number(4, label="seconds")
        options = [gr.Number(None, label=name) for name in ("chunk_size", "micro_steps", "guidance_scale",
                                                            "switch_strength")]
        warmup, model = gr.Number(None, label="warmup_chunks"), gr.Dropdown(models, value=models[0], label="model")
        source, strength = gr.Video(label="video"), gr.Number(0.6, label="strength")
        video, restyled_video, status = gr.Video(streaming=True), gr.Video(streaming=True), gr.Markdown()
        clip = gr.Video(label="clip")
        gr.Button("stream").click(stream, [prompt, seed, schedule, seconds, *options, warmup, model], [video, status],
                                  api_name="stream", concurrency_id="stream")  # shares the visitors' streams' limit
        gr.Button("restyle").click(restyle, [source, prompt, strength, seed, seconds, *options, model],
                                   [restyled_video, status], api_name="restyle", concurrency_id="restyle")
        gr.Button("generate").click(generate, [prompt, clip_seconds, seed, schedule, *options, warmup, model], clip,
                                    api_name="generate")


def build_demo():
    chunk_default, micro_default, guidance_default, switch_default = defaults(None, None, None, None)
    models = list(MODELS)
    examples = [line.strip() for line in EXAMPLES.read_text().splitlines() if line.strip()]
    with gr.Blocks(title="StreamDiT: real-time streaming text-to-video") as demo:
        gr.Markdown(
            "# StreamDiT: real-time streaming text-to-video\n"
            "An open implementation of [StreamDiT](https://arxiv.org/abs/2507.03745). The video is generated while it "
            "plays, chunk by chunk; change the prompt at any time and the stream follows without restarting. The "
            "built-in model knows a small *shapes world*: `a [small|large] {red|green|blue|yellow|purple|orange} "
            "{circle|square|triangle} moving {left|right|up|down} [slowly|quickly] [on a {black|white|gray} "
            "background]`."
        )
        live = gr.State({})  # per visitor: the prompt the running text-to-video stream should follow
        v2v_live = gr.State({})  # and the restyle's own, so that one tab's "Update prompt" leaves the other's alone
        with gr.Tab("Text to video"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value=examples[0], max_lines=2)
                    with gr.Row():
                        start = gr.Button("Start", variant="primary")
                        update = gr.Button("Update prompt")
                        stop = gr.Button("Stop", variant="stop")
                    schedule = gr.Textbox("", label="Prompt schedule (overrides the prompt)",
                                          placeholder="0: a red circle moving left | 4: a blue square moving up")
                with gr.Column():
                    video = gr.Video(label="Live stream", streaming=True, autoplay=True, elem_id="stream")
                    status = gr.Markdown()
            gr.Examples(examples, inputs=prompt)
        with gr.Tab("Video to video"):
            with gr.Row():
                with gr.Column():
                    source = gr.Video(label="Clip to restyle", sources=["upload"])
                    v2v_prompt = gr.Textbox(label="Prompt", value="a large yellow circle moving right")
                    strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="Strength (1 = ignore the clip)")
                    with gr.Row():
                        v2v_start = gr.Button("Restyle", variant="primary")
                        v2v_update = gr.Button("Update prompt")
                        v2v_stop = gr.Button("Stop", variant="stop")
                with gr.Column():
                    v2v_video = gr.Video(label="Restyled stream", streaming=True, autoplay=True)
                    v2v_status = gr.Markdown()
        with gr.Row():  # below both tabs: a restyle takes the same model, seed and stream options as text to video
            model = gr.Dropdown(models, value=models[0], label="Model", visible=len(models) > 1,
                                info="a distilled student takes fewer micro steps: faster (real time on a CPU), "
                                     "and it follows the prompt a little less well; the stream options below "
                                     "become the chosen model's own")
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0)
            seconds = gr.Slider(1, MAX_SECONDS, value=60, step=1, label="Maximum length (s)")
        with gr.Accordion("Advanced stream options (both tabs)", open=False):
            chunk = gr.Dropdown(chunk_sizes(pipeline()), value=chunk_default, label="Chunk size (latent frames)")
            micro = gr.Slider(1, 16, value=micro_default, step=1, label="Micro steps per chunk",
                              info="fewer: faster, but the video follows the prompt less well")
            guidance = gr.Slider(1.0, 10.0, value=guidance_default, step=0.5, label="Guidance scale")
            switch = gr.Slider(0.0, 1.0, value=switch_default, step=0.125, label="Prompt switch strength",
                               info="how much of the buffer a new prompt redraws: 0 is the paper's smooth switch; "
                                    "more follows it sooner, after a short pause")
            warmup = gr.Slider(0, MAX_WARMUP, value=pipeline().config.warmup_chunks, step=1,
                               label="Warm-up chunks (text to video)",
                               info="chunks made and dropped before the first frame: the first frames shown are "
                                    "then streamed ones, which follow the prompt better; 0 shows the first sooner")
        model.change(model_defaults, model, [chunk, micro, guidance, switch, warmup], api_name=False)
        started = start.click(stream, [prompt, seed, schedule, seconds, chunk, micro, guidance, switch, warmup, model,
                                       live], [video, status], api_name=False, concurrency_id="stream")
        update.click(update_prompt, [prompt, live], live, api_name=False)
        prompt.submit(update_prompt, [prompt, live], live, api_name=False)
        stop.click(None, cancels=[started])
        restyled = v2v_start.click(restyle, [source, v2v_prompt, strength, seed, seconds, chunk, micro, guidance, switch,
                                             model, v2v_live],
                                   [v2v_video, v2v_status], api_name=False, concurrency_id="restyle")
        v2v_update.click(update_prompt, [v2v_prompt, v2v_live], v2v_live, api_name=False)
        v2v_prompt.submit(update_prompt, [v2v_prompt, v2v_live], v2v_live, api_name=False)
        v2v_stop.click(None, cancels=[restyled])
        api_endpoints(models)
    return demo


demo = build_demo()
demo.queue(default_concurrency_limit=2, max_size=16)

if __name__ == "__main__":
    demo.launch()
