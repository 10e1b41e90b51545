"""The examples run as documented, on a tiny pipeline folder (the shipped model's prompts are checked against it)."""

import os
import subprocess
import sys

import av
import pytest

from conftest import ROOT, tiny_pipeline
from streamdit import DEFAULT_MODEL, StreamDiTPipeline
from streamdit.data import FPS


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-pipeline")
    tiny_pipeline().save_pretrained(folder)
    return folder


def run_example(name, *args):
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # this checkout's streamdit, whichever one pip installed
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def frame_count(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_stream_to_file_writes_the_asked_seconds(tiny_folder, tmp_path):
    out = tmp_path / "stream.mp4"
    printed = run_example("stream_to_file.py", "a red circle moving right zigzag", "--seconds", 2, "--out", out,
                          "--model", tiny_folder)
    assert frame_count(out) == 2 * FPS
    assert "zigzag" in printed  # the unknown word is reported, not silently dropped


def test_switch_prompts_follows_the_schedule(tiny_folder, tmp_path):
    out = tmp_path / "switch.mp4"
    printed = run_example("switch_prompts.py", "0: a red circle moving right | 1: a blue square moving up",
                          "--seconds", 2, "--out", out, "--model", tiny_folder, "--switch-strength", 0.5)
    assert frame_count(out) == 2 * FPS
    assert "1.0 s: a blue square moving up" in printed


def test_the_offered_prompts_are_all_in_the_models_vocabulary():
    pipe = StreamDiTPipeline.from_pretrained(DEFAULT_MODEL)
    prompts = [line.strip() for line in (ROOT / "examples" / "prompts.txt").read_text().splitlines() if line.strip()]
    assert len(prompts) >= 5
    for prompt in prompts:
        pipe.check_prompt(prompt)
        assert pipe.unknown_words(prompt) == [], prompt
