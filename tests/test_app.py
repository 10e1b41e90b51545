"""The Space end to end: app.py served on localhost, driven with gradio_client.

These tests pin the mechanics with a tiny random pipeline (any model would do): streaming, prompt switching,
independent visitors, cancelling and clean-up, errors, video-to-video. What the video shows is checked with the
built-in model (here through the API, in tests/test_browser.py in a real browser).
"""

import importlib
import inspect
import re
import sys
import threading
import time

import av
import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.utils import Status

from conftest import ROOT, running_app, shows_colour, tiny_pipeline
from streamdit.video import read_video, write_video

FPS = 16


def tiny_student():
    """A second tiny model with stream defaults of its own (as the built-in student has), for the Model menu."""
    pipe = tiny_pipeline(seed=1, micro_steps=1)
    pipe.register_to_config(guidance_scale=2.0, switch_strength=1.0, warmup_chunks=1)
    return pipe


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """app.py serving two tiny pipelines in a subprocess, "model" the default and "student"; yields its URL and its
    TMPDIR."""
    folder = tmp_path_factory.mktemp("app")
    tiny_pipeline().save_pretrained(folder / "model")
    tiny_student().save_pretrained(folder / "student")
    with running_app(f"{folder / 'model'},{folder / 'student'}", folder) as url:
        yield url, folder / "tmp"


def client(url):
    return Client(url, verbose=False, download_files=False)


def frames_of(job):
    """The decoded frames of a finished /stream job, read through its HLS playlist."""
    playlist = job.outputs()[-1][0]["url"]
    with av.open(playlist) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def wait(job, timeout=120):
    deadline = time.time() + timeout
    while not job.done():
        assert time.time() < deadline, "the stream did not finish"
        time.sleep(0.2)
    return job


def test_stream_delivers_video_and_status(server):
    url, _ = server
    job = wait(client(url).submit("a red circle moving left", 0, "", 3, api_name="/stream"))
    frames = frames_of(job)
    assert len(frames) >= 3 * FPS and frames.shape[1:] == (16, 16, 3)
    status = job.outputs()[-1][1]
    assert "48 frames" in status and "a red circle moving left" in status and "last chunk latency" in status
    assert "model: model" in status  # the first model is the default


def test_api_streams_the_chosen_model_with_its_own_defaults(server):
    """`model` picks one of the Space's models; the stream options an API caller leaves out are that model's own, not
    the default model's that the Advanced controls hold."""
    url, _ = server
    c = client(url)

    def streamed(**options):
        job = wait(c.submit("a red circle moving left", 3, "", 2, model="student", api_name="/stream", **options))
        return frames_of(job)[: 2 * FPS].astype(int), job

    ours, job = streamed()
    own, _ = streamed(micro_steps=1, guidance_scale=2.0, switch_strength=1.0, warmup_chunks=1)  # its stored ones
    default_models, _ = streamed(micro_steps=2, guidance_scale=1.0, switch_strength=0.0, warmup_chunks=0)
    near, far = np.abs(ours - own).mean(), np.abs(ours - default_models).mean()
    assert far > 2 and near < far / 2, (near, far)  # relative, as in test_prompt_schedule_changes_the_video_mid_stream
    assert "model: student" in job.outputs()[-1][1]
    with pytest.raises(Exception, match="model"):  # not one of the menu's: refused
        client(url).predict("a red circle moving left", 0, "", 1, model="other", api_name="/stream")


def test_prompt_schedule_changes_the_video_mid_stream(server):
    url, _ = server
    c = client(url)
    plain = frames_of(wait(c.submit("a red circle moving left", 3, "", 4, api_name="/stream"))).astype(int)
    switched = wait(c.submit("", 3, "0: a red circle moving left | 2: a blue square moving up", 4, api_name="/stream"))
    after = frames_of(switched).astype(int)
    before, later = np.abs(after[:24] - plain[:24]).mean(), np.abs(after[40:] - plain[40:]).mean()
    # The same stream until the switch, a different one after it. Now and then a server process makes a few frames
    # that differ from another's (cause not found: 1 fresh server in 8 here, the same frames in both its streams; once
    # in CI, 2.11 levels before the switch against about 5.9 after it), so the bound is relative to the switch's change.
    assert later > 2 and before < later / 2, (before, later)
    assert "a blue square moving up" in switched.outputs()[-1][1]


def test_two_clients_stream_their_own_prompts(server):
    url, _ = server
    prompts = ["a red circle moving left", "a blue square moving up"]
    jobs = [client(url).submit(p, 5, "", 2, api_name="/stream") for p in prompts]  # at the same time
    together = [frames_of(wait(j)).astype(int) for j in jobs]
    alone = [frames_of(wait(client(url).submit(p, 5, "", 2, api_name="/stream"))).astype(int) for p in prompts]
    for mine, reference, other in zip(together, alone, alone[::-1]):
        same, different = np.abs(mine - reference).mean(), np.abs(mine - other).mean()
        assert different > 2 and same < different / 2, (same, different)  # relative, as in the prompt-schedule test


def test_cancel_ends_the_stream_and_removes_its_files(server):
    url, tmp = server
    started = time.time()
    job = client(url).submit("a green triangle moving right", 0, "", 300, api_name="/stream")
    deadline = started + 60
    while len(job.outputs()) < 3:  # streaming, with a temporary folder of its own
        assert time.time() < deadline
        time.sleep(0.05)
    assert any(tmp.glob("streamdit-*"))
    at_cancel = len(job.outputs())
    segment_time = (time.time() - started) / at_cancel  # at least one segment's time at this machine's speed
    job.cancel()
    deadline = time.time() + 30
    while any(tmp.glob("streamdit-*")):  # the server closed the stream's generator
        assert time.time() < deadline, "the stream's temporary files were not removed"
        time.sleep(0.2)
    time.sleep(max(2.0, 3 * segment_time))  # a stream still running would send two or more segments meanwhile
    late = len(job.outputs()) - at_cancel
    assert late <= 1, f"{late} segments arrived after the cancel"  # one may have been on its way
    assert job.status().code == Status.CANCELLED


@pytest.mark.parametrize(
    "args, message",
    [
        (("", 0, "", 3), "is empty"),
        ((" ".join(["red"] * 40), 0, "", 3), "tokens"),
        (("a red circle", -1, "", 3), "seed=-1|Value -1 is less than minimum"),
        (("a red circle", 0, "", 0), "max_seconds=0|Value 0 is less than minimum"),
        (("a red circle", 0, "4: a blue square", 3), "must start at 0"),
        (("a red circle", 0, "zero: a blue square", 3), "not 'SECONDS: prompt'"),
    ],
)
def test_bad_inputs_return_the_error(server, args, message):
    """The error reaches an API client and the server goes on. Gradio's own bounds on the Seed and Length components
    can answer first; app.py's own messages are pinned by test_app_rejects_bad_input below."""
    url, _ = server
    with pytest.raises(Exception, match=message):
        client(url).predict(*args, api_name="/stream")


def test_restyle_through_the_api(server, tmp_path):
    """/restyle for a gradio_client user: an uploaded clip streams back restyled, with the stream options too."""
    from gradio_client import handle_file

    url, _ = server
    frames = np.random.default_rng(3).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    clip = write_video([frames], tmp_path / "clip.mp4")
    job = wait(client(url).submit(handle_file(str(clip)), "a blue square moving up", 0.6, 0, 10, 1, 2, 1.0, 0.0,
                                  api_name="/restyle"))
    assert len(frames_of(job)) == 40 and "40 frames" in job.outputs()[-1][1]


def test_generate_returns_a_finished_mp4(server):
    url, _ = server
    clip = Client(url, verbose=False).predict("a purple circle moving down", 2, 0, "", api_name="/generate")
    path = clip["video"] if isinstance(clip, dict) else clip
    with av.open(path) as container:
        assert sum(1 for _ in container.decode(video=0)) == 2 * FPS


@pytest.fixture(scope="module")
def app():
    """app.py imported in the test process, to call its functions without a server (each test swaps in its model)."""
    sys.path.insert(0, str(ROOT))
    try:
        return importlib.import_module("app")
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.parametrize("zero_gpu", [False, True])  # the library's stream, or one GPU call per chunk
@pytest.mark.parametrize("length", [20, 40, 70])  # inside the first buffer (32 frames), whole chunks, a part chunk
def test_restyle_equals_the_library_and_feeds_one_chunk_per_gpu_call(app, monkeypatch, length, zero_gpu):
    pipe = tiny_pipeline()
    monkeypatch.setattr(app, "MODELS", {"tiny": pipe})
    monkeypatch.setattr(app, "ZERO_GPU", zero_gpu)
    pending, gpu_call = [], app.next_chunk

    def recording(state, model=None):
        pending.append(len(state.video_pending))
        return gpu_call(state, model)

    monkeypatch.setattr(app, "next_chunk", recording)
    frames = np.random.default_rng(0).integers(0, 256, (length, 16, 16, 3), dtype=np.uint8)
    ours = np.concatenate([out for out, _ in app.restyled(app.VideoSource(frames), "a red circle moving left", 0.6, 3, 30,
                                                          None)])
    stream = pipe.stream("a red circle moving left", video=frames, strength=0.6,
                         generator=torch.Generator().manual_seed(3))
    library = np.concatenate([chunk.frames for chunk in stream])
    np.testing.assert_array_equal(ours, library)
    assert len(ours) == length
    chunk = pipe.scheduler.config.chunk_size * pipe.vae_scale_factor_temporal
    if zero_gpu:
        assert pending and max(pending) <= chunk  # the clip stays in the generator, not in the pickled state
    else:
        assert not pending  # the library's stream, no GPU calls


def test_restyle_takes_the_stream_options(app, monkeypatch):
    """Chunk size, micro steps, guidance and switch strength reach a restyle as they reach a text-to-video stream."""
    pipe = tiny_pipeline()
    monkeypatch.setattr(app, "MODELS", {"tiny": pipe})
    frames = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    options = dict(chunk_size=1, micro_steps=2, guidance_scale=1.0, switch_strength=0.0)
    ours = np.concatenate([out for out, _ in app.restyled(app.VideoSource(frames), "a red circle moving left", 0.6, 3, 30,
                                                          None, **options)])
    stream = pipe.stream("a red circle moving left", video=frames, strength=0.6,
                         generator=torch.Generator().manual_seed(3), **options)
    np.testing.assert_array_equal(ours, np.concatenate([chunk.frames for chunk in stream]))
    default = np.concatenate([out for out, _ in app.restyled(app.VideoSource(frames), "a red circle moving left", 0.6,
                                                             3, 30, None)])
    assert np.abs(ours.astype(float) - default).mean() > 1  # the options changed the stream


def test_both_tabs_share_the_model_seed_and_stream_options(app):
    """The Model, Seed, length and Advanced controls sit below the tabs and feed both streams."""
    stream, restyle = visitors_handler(app.demo, "stream"), visitors_handler(app.demo, "restyle")
    # stream: prompt, seed, schedule, seconds, chunk, micro, guidance, switch, warm-up, model, live
    # restyle: clip, prompt, strength, seed, seconds, chunk, micro, guidance, switch, model, live
    shared = [stream.inputs[1], stream.inputs[3], *stream.inputs[4:8], stream.inputs[9]]
    assert len(stream.inputs) == 11 and len(restyle.inputs) == 11
    assert all(theirs is ours for theirs, ours in zip(restyle.inputs[3:10], shared))
    for name, visitors in (("stream", stream), ("restyle", restyle)):  # the API's calls queue with the visitors'
        (api,) = [h for h in handlers(app.demo)[name] if h.api_name == name]
        assert api.concurrency_id == visitors.concurrency_id == name


def test_choosing_a_model_sets_the_stream_options_to_its_own(app, monkeypatch):
    """The Model menu's change sets the Advanced controls (the visitor's stream options) to the chosen model's
    stored defaults; a stream of that model then equals the library's with them."""
    student = tiny_student()
    monkeypatch.setattr(app, "MODELS", {"tiny": tiny_pipeline(), "student": student})
    (change,) = handlers(app.demo)["model_defaults"]
    stream = visitors_handler(app.demo, "stream")
    assert change.inputs == [stream.inputs[9]] and change.outputs == [*stream.inputs[4:9]]
    chunk, micro, guidance, switch, warmup = app.model_defaults("student")
    assert (chunk["value"], micro, guidance, switch, warmup) == (2, 1, 2.0, 1.0, 1)
    assert chunk["choices"] == [1, 2, 4, 8]
    ours = np.concatenate([out for out, _ in app.chunks(*app.start_stream(
        "a red circle moving left", 3, "", chunk["value"], micro, guidance, switch, None, warmup, "student"), 2, None,
        model="student")])
    library = student.stream("a red circle moving left", generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(ours, np.concatenate([next(library).frames for _ in range(4)]))
    assert app.start_stream("a red circle moving left", 0, "", None, None, None, None, None)[0].guidance_scale == 1.0


def test_restyle_streams_the_whole_clip_back(app, monkeypatch, tmp_path):
    monkeypatch.setattr(app, "MODELS", {"tiny": tiny_pipeline()})
    frames = np.random.default_rng(1).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    clip = write_video([frames], tmp_path / "clip.mp4")
    counts, status = [], ""
    for segment, status in app.restyle(str(clip), "a blue square moving up", 0.6, 0, 30):
        counts.append(len(read_video(segment)))  # now: a segment goes once the next one is out
    assert sum(counts) == 40 and len(counts) > 1
    assert "40 frames" in status and "last chunk latency" in status


# app.py's input checks, called directly: through the server, Gradio's own component bounds can answer first.

LONG = " ".join(["red"] * 40)


@pytest.fixture
def clip(tmp_path):
    """A readable 16-frame clip for restyle, so that only the value under test is bad."""
    frames = np.random.default_rng(2).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    return str(write_video([frames], tmp_path / "clip.mp4"))


def first_output(function, **kwargs):
    """Calls an app function; a generator (stream, restyle) checks its inputs when it is first advanced."""
    result = function(**kwargs)
    return next(result) if inspect.isgenerator(result) else result


@pytest.mark.parametrize(
    "function, bad, message",
    [
        ("stream", dict(prompt=""), "prompt '' is empty"),
        ("stream", dict(prompt=LONG), f"prompt '{LONG}' needs"),
        ("stream", dict(seed=-1), "seed=-1 "),
        ("stream", dict(seed=1.5), "seed=1.5 must be an integer"),
        ("stream", dict(seed=None), "seed=None "),  # an emptied Seed box
        ("stream", dict(max_seconds=0), "max_seconds=0 "),
        ("stream", dict(max_seconds=601), "max_seconds=601 "),
        ("stream", dict(chunk_size=0), "chunk_size=0 must divide"),
        ("stream", dict(chunk_size=2.5), "chunk_size=2.5 must divide"),
        ("stream", dict(chunk_size=1000), "chunk_size=1000 must divide"),
        ("stream", dict(micro_steps=0), "micro_steps=0 "),
        ("stream", dict(micro_steps=65), "micro_steps=65 "),
        ("stream", dict(micro_steps=2.5), "micro_steps=2.5 must be an integer"),
        ("stream", dict(guidance_scale=0.5), "guidance_scale=0.5 "),
        ("stream", dict(guidance_scale=20.5), "guidance_scale=20.5 "),
        ("stream", dict(switch_strength=-0.5), "switch_strength=-0.5 "),
        ("stream", dict(switch_strength=1.5), "switch_strength=1.5 "),
        ("stream", dict(warmup_chunks=-1), "warmup_chunks=-1 "),
        ("stream", dict(warmup_chunks=1.5), "warmup_chunks=1.5 must be an integer"),
        ("generate", dict(warmup_chunks=33), "warmup_chunks=33 "),
        ("stream", dict(schedule="4: a blue square moving up"), "not at 4 s"),
        ("stream", dict(schedule="zero: a blue square moving up"), "'zero: a blue square moving up'"),
        ("stream", dict(schedule="0: a red circle | 2: "), "entry '2:'"),
        ("generate", dict(seconds=0), "seconds=0 "),
        ("generate", dict(seconds=121), "seconds=121 "),
        ("generate", dict(seed=1.5), "seed=1.5 "),
        ("generate", dict(micro_steps=0), "micro_steps=0 "),
        ("restyle", dict(video=None), "upload a video to restyle"),
        ("restyle", dict(video=""), "upload a video to restyle"),
        ("restyle", dict(prompt=""), "prompt '' is empty"),
        ("restyle", dict(strength=0.0), "strength=0.0 "),
        ("restyle", dict(strength=1.5), "strength=1.5 "),
        ("restyle", dict(seed=1.5), "seed=1.5 "),
        ("restyle", dict(max_seconds=0), "max_seconds=0 "),
        ("restyle", dict(chunk_size=3), "chunk_size=3 must divide"),
        ("restyle", dict(micro_steps=0), "micro_steps=0 "),
        ("restyle", dict(guidance_scale=0.5), "guidance_scale=0.5 "),
        ("restyle", dict(switch_strength=1.5), "switch_strength=1.5 "),
        ("update_prompt", dict(prompt=""), "prompt '' is empty"),
        ("stream", dict(model="other"), "model='other' is not one of this Space's models: 'tiny'"),
        ("generate", dict(model="other"), "model='other' "),
        ("restyle", dict(model="other"), "model='other' "),
    ],
)
def test_app_rejects_bad_input(app, monkeypatch, clip, function, bad, message):
    monkeypatch.setattr(app, "MODELS", {"tiny": tiny_pipeline()})
    arguments = {
        "stream": dict(prompt="a red circle moving left", max_seconds=1),
        "generate": dict(prompt="a red circle moving left", seconds=1),
        "restyle": dict(video=clip, prompt="a red circle moving left", max_seconds=1),
        "update_prompt": dict(live={"prompt": "a red circle moving left"}),
    }[function] | bad
    with pytest.raises(gr.Error, match=re.escape(message)):
        first_output(getattr(app, function), **arguments)
    if function == "update_prompt":
        assert arguments["live"] == {"prompt": "a red circle moving left"}  # the stream keeps its prompt


def audio_only(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)


@pytest.mark.parametrize("name", ["notes.mp4", "empty.mp4", "sound.m4a", "missing.mp4"])
def test_restyle_names_an_unreadable_video(app, monkeypatch, tmp_path, name):
    monkeypatch.setattr(app, "MODELS", {"tiny": tiny_pipeline()})
    path = tmp_path / name
    if name == "notes.mp4":
        path.write_text("not a video")
    elif name == "empty.mp4":
        path.touch()
    elif name == "sound.m4a":
        audio_only(path)  # a container PyAV opens, with no video stream in it
    with pytest.raises(gr.Error, match=re.escape(f"could not read the uploaded video '{name}'")):
        next(app.restyle(str(path), "a red circle moving left", 0.6, 0, 1))


@pytest.mark.parametrize("zero_gpu", [False, True])
def test_update_prompt_switches_the_running_stream(app, monkeypatch, zero_gpu):
    """The UI's "Update prompt": the stream reads the visitor's `live` prompt between chunks."""
    monkeypatch.setattr(app, "MODELS", {"tiny": tiny_pipeline()})
    monkeypatch.setattr(app, "ZERO_GPU", zero_gpu)

    def run(switch):
        live = {}
        state, schedule = app.start_stream("a red circle moving left", 3, "", None, None, None, None, live)
        assert live == {"prompt": "a red circle moving left", "model": None}
        frames, statuses = [], []
        for out, status in app.chunks(state, schedule, 3, live):
            frames.append(out)
            statuses.append(status)
            if switch and len(frames) == 1:
                app.update_prompt("  a blue square moving up ", live)  # between two chunks, as a click lands
        return np.concatenate(frames).astype(int), statuses, len(frames[0])

    plain, plain_statuses, first = run(switch=False)
    switched, statuses, _ = run(switch=True)
    assert len(switched) == len(plain) == 3 * FPS and len(statuses) > 2
    np.testing.assert_array_equal(switched[:first], plain[:first])  # the same stream until the switch...
    assert np.abs(switched[-FPS:] - plain[-FPS:]).mean() > 2  # ...a different one after it
    assert "prompt: *a red circle moving left*" in statuses[0]
    assert all("prompt: *a blue square moving up*" in s for s in statuses[1:])
    assert all("prompt: *a red circle moving left*" in s for s in plain_statuses)


def visitors_handler(demo, name):
    """The handler of the visible button (the API's own endpoint calls the same function)."""
    (handler,) = [h for h in handlers(demo)[name] if h.api_name != name]
    return handler


def handlers(demo):
    """The demo's event handlers by function name: what each button or box calls, with its inputs and outputs."""
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    by_name = {}
    for fn in fns:
        by_name.setdefault(getattr(fn.fn, "__name__", None), []).append(fn)
    return by_name


def test_each_tab_updates_its_own_streams_prompt(app):
    """Text to video and video to video each have "Update prompt" (button and Enter), each writing the `live` state
    that its own stream reads, so a visitor running both can switch one without the other."""
    by_name = handlers(app.demo)
    stream, restyle = visitors_handler(app.demo, "stream"), visitors_handler(app.demo, "restyle")
    live = {"stream": stream.inputs[-1], "restyle": restyle.inputs[-1]}
    prompt = {"stream": stream.inputs[0], "restyle": restyle.inputs[1]}
    assert live["stream"] is not live["restyle"]
    updates = by_name["update_prompt"]
    for tab in ("stream", "restyle"):
        mine = [u for u in updates if u.inputs[0] is prompt[tab]]
        assert len(mine) == 2  # the button and Enter in the prompt box
        assert all(u.inputs[1] is live[tab] and u.outputs == [live[tab]] for u in mine), tab


def test_stream_options_default_to_the_models_own(app, monkeypatch):
    pipe = tiny_pipeline()
    pipe.register_to_config(guidance_scale=2.5, switch_strength=0.625)
    monkeypatch.setattr(app, "MODELS", {"tiny": pipe})
    state, _ = app.start_stream("a red circle moving left", 0, "", None, None, None, None, None)
    assert (state.guidance_scale, state.switch_strength) == (2.5, 0.625)
    state, _ = app.start_stream("a red circle moving left", 0, "", None, None, 1.0, 0.0, None)
    assert (state.guidance_scale, state.switch_strength) == (1.0, 0.0)


def test_the_warmup_defaults_to_the_models_own_and_reaches_the_stream(app, monkeypatch):
    pipe = tiny_pipeline()
    pipe.register_to_config(warmup_chunks=2)
    monkeypatch.setattr(app, "MODELS", {"tiny": pipe})
    assert app.start_stream("a red circle moving left", 0, "", None, None, None, None, None)[0].warmup_chunks == 2
    ours = np.concatenate([out for out, _ in app.chunks(*app.start_stream(
        "a red circle moving left", 3, "", None, None, None, None, None, 0), 2, None)])
    stream = pipe.stream("a red circle moving left", generator=torch.Generator().manual_seed(3), warmup_chunks=0)
    np.testing.assert_array_equal(ours, np.concatenate([next(stream).frames for _ in range(4)]))
    warmed = np.concatenate([out for out, _ in app.chunks(*app.start_stream(
        "a red circle moving left", 3, "", None, None, None, None, None), 2, None)])
    assert np.abs(warmed.astype(float) - ours).mean() > 1  # two chunks dropped: other frames


def denoiser_threads():
    return [t for t in threading.enumerate() if t.name == "streamdit-denoiser"]


def test_a_closed_stream_stops_its_denoiser_thread(app, monkeypatch):
    """Off ZeroGPU a stream is the library's, pipelined on a GPU: when Gradio closes the generator (Stop, a visitor
    who left, max_seconds), its denoiser thread must end too, not keep the device busy."""
    pipe = tiny_pipeline()
    stream = pipe.stream
    monkeypatch.setattr(pipe, "stream", lambda *args, **options: stream(*args, pipelined=True, **options))  # as on a GPU
    monkeypatch.setattr(app, "MODELS", {"tiny": pipe})
    monkeypatch.setattr(app, "ZERO_GPU", False)
    before = len(denoiser_threads())
    state, schedule = app.start_stream("a red circle moving left", 0, "", None, None, None, None, None)
    running = app.chunks(state, schedule, 60, None)
    next(running)
    assert len(denoiser_threads()) == before + 1  # decoding this chunk while the thread denoises the next
    running.close()  # what Gradio does on cancel
    assert len(denoiser_threads()) == before


def test_stream_shows_the_prompts_colour(shipped_app):
    job = wait(client(shipped_app).submit("a red square moving right on a white background", 0, "", 3,
                                          api_name="/stream"))
    frames = frames_of(job)[FPS:]  # after the first second
    red = [shows_colour(frame, "red") for frame in frames]
    assert np.mean(red) >= 0.8, f"a red object in {sum(red)} of {len(red)} frames"
