"""The Space end to end: app.py served on localhost, driven with gradio_client.

These tests pin the mechanics with a tiny random pipeline (any model would do): streaming, prompt switching,
independent visitors, cancelling and clean-up, errors, video-to-video. What the video shows is checked with the
built-in model (here through the API, in tests/test_browser.py in a real browser).
"""

import importlib
import sys
import time

import av
import numpy as np
import pytest
import torch
from gradio_client import Client

from conftest import MODEL_NOT_READY, ROOT, running_app, shows_colour, tiny_pipeline
from streamdit.video import read_video, write_video

FPS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """app.py serving the tiny pipeline in a subprocess; yields its URL and its TMPDIR."""
    folder = tmp_path_factory.mktemp("app")
    tiny_pipeline().save_pretrained(folder / "model")
    with running_app(folder / "model", folder) as url:
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


def test_prompt_schedule_changes_the_video_mid_stream(server):
    url, _ = server
    c = client(url)
    plain = frames_of(wait(c.submit("a red circle moving left", 3, "", 4, api_name="/stream"))).astype(int)
    switched = wait(c.submit("", 3, "0: a red circle moving left | 2: a blue square moving up", 4, api_name="/stream"))
    after = frames_of(switched).astype(int)
    assert np.abs(after[:24] - plain[:24]).mean() < 2  # the same stream until the switch...
    assert np.abs(after[40:] - plain[40:]).mean() > 2  # ...a different one after it
    assert "a blue square moving up" in switched.outputs()[-1][1]


def test_two_clients_stream_their_own_prompts(server):
    url, _ = server
    prompts = ["a red circle moving left", "a blue square moving up"]
    jobs = [client(url).submit(p, 5, "", 2, api_name="/stream") for p in prompts]  # at the same time
    together = [frames_of(wait(j)).astype(int) for j in jobs]
    alone = [frames_of(wait(client(url).submit(p, 5, "", 2, api_name="/stream"))).astype(int) for p in prompts]
    for mine, reference, other in zip(together, alone, alone[::-1]):
        assert np.abs(mine - reference).mean() < 2 < np.abs(mine - other).mean()


def test_cancel_ends_the_stream_and_removes_its_files(server):
    url, tmp = server
    job = client(url).submit("a green triangle moving right", 0, "", 300, api_name="/stream")
    deadline = time.time() + 60
    while len(job.outputs()) < 2:  # streaming, with a temporary folder of its own
        assert time.time() < deadline
        time.sleep(0.2)
    assert any(tmp.glob("streamdit-*"))
    job.cancel()
    deadline = time.time() + 30
    while any(tmp.glob("streamdit-*")):
        assert time.time() < deadline, "the stream's temporary files were not removed"
        time.sleep(0.2)
    assert len(job.outputs()) < 300 * FPS / 16  # it stopped long before its 300 s


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
    url, _ = server
    with pytest.raises(Exception, match=message):
        client(url).predict(*args, api_name="/stream")


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


@pytest.mark.parametrize("length", [20, 40, 70])  # inside the first buffer (32 frames), whole chunks, a part chunk
def test_restyle_equals_the_library_and_feeds_one_chunk_per_gpu_call(app, monkeypatch, length):
    pipe = tiny_pipeline()
    monkeypatch.setattr(app, "PIPE", pipe)
    pending, gpu_call = [], app.next_chunk

    def recording(state):
        pending.append(len(state.video_pending))
        return gpu_call(state)

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
    assert pending and max(pending) <= chunk  # the clip stays in the generator, not in the pickled state


def test_restyle_streams_the_whole_clip_back(app, monkeypatch, tmp_path):
    monkeypatch.setattr(app, "PIPE", tiny_pipeline())
    frames = np.random.default_rng(1).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    clip = write_video([frames], tmp_path / "clip.mp4")
    counts, status = [], ""
    for segment, status in app.restyle(str(clip), "a blue square moving up", 0.6, 0, 30):
        counts.append(len(read_video(segment)))  # now: a segment goes once the next one is out
    assert sum(counts) == 40 and len(counts) > 1
    assert "40 frames" in status and "last chunk latency" in status


@MODEL_NOT_READY
def test_stream_shows_the_prompts_colour(shipped_app):
    job = wait(client(shipped_app).submit("a red square moving right on a white background", 0, "", 3,
                                          api_name="/stream"))
    frames = frames_of(job)[FPS:]  # after the first second
    red = [shows_colour(frame, "red") for frame in frames]
    assert np.mean(red) >= 0.8, f"a red object in {sum(red)} of {len(red)} frames"
