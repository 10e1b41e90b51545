"""The Space end to end: app.py served on localhost, driven with gradio_client.

These tests pin the mechanics with a tiny random pipeline (any model would do): streaming, prompt switching,
independent visitors, cancelling and clean-up, errors. What the video shows is checked with the trained model.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from gradio_client import Client

from conftest import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]
FPS = 16


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """app.py in a subprocess on a free port, with its own TMPDIR so that its temporary files can be inspected."""
    folder = tmp_path_factory.mktemp("app")
    tiny_pipeline().save_pretrained(folder / "model")
    (folder / "tmp").mkdir()
    port = free_port()
    env = os.environ | {"STREAMDIT_MODEL": str(folder / "model"), "GRADIO_SERVER_PORT": str(port),
                        "TMPDIR": str(folder / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=open(folder / "app.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            Client(url, verbose=False)
            break
        except Exception:
            if time.time() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError((folder / "app.log").read_text()[-2000:])
            time.sleep(1)
    yield url, folder / "tmp"
    process.terminate()
    process.wait(timeout=30)


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
    assert "48 frames" in status and "a red circle moving left" in status


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
