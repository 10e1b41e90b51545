"""Shared by the tests: tiny random components (CPU, milliseconds), app.py served on localhost, colour checks."""

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from streamdit import (
    DEFAULT_MODEL,
    STUDENT_MODEL,
    StreamDiTAutoencoder,
    StreamDiTPipeline,
    StreamDiTScheduler,
    StreamDiTTextEncoder,
    build_tokenizer,
    from_preset,
)
from streamdit.data import BACKGROUNDS, COLOURS, VOCABULARY

ROOT = Path(__file__).resolve().parents[1]


def randomize_zeros(model, seed=0):
    """adaLN-Zero starts every block as the identity and the output at zero velocity, which would make equivalence
    tests pass trivially; give the zero-initialised weights random values instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def tiny_pipeline(seed=0, **scheduler_options):
    """16x16 video, 4x temporal and 4x spatial vae, 8-frame buffer of 4x4x4 latents, chunk 2, 2 micro steps."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(VOCABULARY, max_length=16)  # the shapes-world words
    text_encoder = StreamDiTTextEncoder(vocab_size=len(tokenizer), max_length=16, hidden_size=16, num_layers=1,
                                        num_heads=2)
    vae = StreamDiTAutoencoder(latent_channels=4, block_out_channels=(8, 8, 8), temporal_downsample=(True, True))
    transformer = randomize_zeros(from_preset("tiny"), seed)
    options = dict(buffer_frames=8, chunk_size=2, micro_steps=2) | scheduler_options
    scheduler = StreamDiTScheduler(**options)
    pipe = StreamDiTPipeline(transformer, scheduler, vae, text_encoder, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    for model in (text_encoder, vae, transformer):
        model.eval()  # as from_pretrained leaves them (torch's encoder layers take another code path in eval)
    return pipe.to("cpu")


@pytest.fixture
def pipe():
    return tiny_pipeline()


# app.py served on localhost


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(model, folder: Path):
    """app.py serving `model` in a subprocess on a free localhost port; yields its URL. The app gets its own TMPDIR,
    folder / "tmp", so that its temporary files can be inspected; its log goes to folder / "app.log"."""
    from gradio_client import Client  # only the app tests need it

    (folder / "tmp").mkdir(exist_ok=True)
    port = free_port()
    env = os.environ | {"STREAMDIT_MODEL": str(model), "GRADIO_SERVER_PORT": str(port),
                        "TMPDIR": str(folder / "tmp"), "GRADIO_ANALYTICS_ENABLED": "False"}
    url = f"http://127.0.0.1:{port}"
    with open(folder / "app.log", "w") as log:
        process = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=log)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    Client(url, verbose=False)
                    break
                except Exception:
                    if time.time() > deadline or process.poll() is not None:
                        raise RuntimeError((folder / "app.log").read_text()[-2000:]) from None
                    time.sleep(1)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture(scope="session")
def shipped_app(tmp_path_factory):
    """app.py serving the built-in model and its student, as a visitor gets it (`python app.py`); one server for every
    test that looks at its video."""
    folder = tmp_path_factory.mktemp("shipped-app")
    with running_app(f"{DEFAULT_MODEL},{STUDENT_MODEL}", folder) as url:
        yield url


# What the video shows

OBJECT_PIXELS = 150  # a small square is 20 x 20 px at 128 x 128; blur and anti-aliasing eat its edges


def colour_counts(frame: np.ndarray, distance: float = 60.0) -> dict[str, int]:
    """Pixels of a uint8 frame (H, W, 3) per palette colour: within `distance` of it and nearer to it than to any
    other palette or background colour."""
    names = list(COLOURS) + [f"{name} background" for name in BACKGROUNDS]
    palette = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), np.float64)  # (n, 3)
    gaps = np.linalg.norm(frame.reshape(-1, 1, 3).astype(np.float64) - palette, axis=-1)  # (H * W, n)
    nearest = np.where(gaps.min(axis=1) < distance, gaps.argmin(axis=1), -1)
    return {name: int((nearest == i).sum()) for i, name in enumerate(names) if name in COLOURS}


def shows_colour(frame: np.ndarray, colour: str) -> bool:
    """An object of `colour` is in the frame: enough pixels of it, and more than of any other object colour (a frame
    of blobs in every colour does not count)."""
    counts = colour_counts(frame)
    return counts[colour] >= OBJECT_PIXELS and counts[colour] == max(counts.values())


def library_frames(prompt: str, seed: int, count: int, model=DEFAULT_MODEL) -> np.ndarray:
    """The first `count` frames (count, H, W, 3) uint8 the library streams for `prompt` and `seed` with the model's
    own defaults, as the Space does."""
    pipe = StreamDiTPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    frames = []
    for chunk in pipe.stream(prompt, generator=torch.Generator().manual_seed(seed)):
        frames.append(chunk.frames)
        if sum(len(f) for f in frames) >= count:
            break
    return np.concatenate(frames)[:count]
