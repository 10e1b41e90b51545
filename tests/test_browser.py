"""The Space in a real browser: Debian's Chromium, driven by Playwright, shows the model's video.

app.py serves the built-in model and its student, as `python app.py` does; the test types a prompt (and for the
student, picks it in the Model menu), presses Start, lets the stream play past 2 s, pauses it and reads the shown
frame's pixels in the page (a canvas). Skipped where Chromium or Playwright is missing (.ci/run
installs both).

The README's screenshot is saved only when asked for, so that a test run leaves the repository as it was:

    STREAMDIT_SCREENSHOT=docs/app-streaming.png python -m pytest tests/test_browser.py

(a relative path is taken from the repository root).
"""

import os
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, colour_counts, library_frames, shows_colour
from streamdit import DEFAULT_MODEL, STUDENT_MODEL, StreamDiTScheduler

CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `playwright install` would download its own, which we never do
if not CHROMIUM.exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")

FPS = 16
MICRO_STEPS = "number input for Micro steps per chunk"  # the Advanced options' micro steps box
PROMPT = "a red square moving right on a white background"
SEED = 0  # the Seed box's default
PLAYED = 2.0  # seconds of video played before the frame is read
SCREENSHOT = os.environ.get("STREAMDIT_SCREENSHOT")  # where to save the page's screenshot; unset: nowhere

# Pauses the player and returns its time and the shown frame's RGBA pixels, drawn into a canvas.
READ_FRAME = """async () => {
    const video = document.querySelector("#stream video");
    video.pause();
    await new Promise(done => setTimeout(done, 300));  // let the paused frame reach the screen
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    const context = canvas.getContext("2d");
    context.drawImage(video, 0, 0);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    return {time: video.currentTime, width: canvas.width, height: canvas.height, pixels: Array.from(pixels)};
}"""
PLAYER_TIME = """() => { const video = document.querySelector("#stream video"); return video ? video.currentTime : 0; }"""


@pytest.fixture(scope="module")
def shown(shipped_app):
    """(player time in s, the frame the page shows then: uint8 (H, W, 3)), once the stream has played past 2 s."""
    played, frame, _ = stream_in_browser(shipped_app)
    return played, frame


@pytest.fixture(scope="module")
def student_shown(shipped_app):
    """The same with the student picked in the Model menu, and the micro steps the Advanced options then show (the
    README's screenshot: the Space as it runs in real time on a CPU)."""
    return stream_in_browser(shipped_app, model=Path(STUDENT_MODEL).name, screenshot=SCREENSHOT)


def stream_in_browser(url, model=None, screenshot=None):
    """(player time, shown frame, the micro steps the Advanced options show: None unless a `model` was picked)."""
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 960, "height": 1160})  # down to the Model menu
            page.goto(url)
            page.get_by_label("Prompt").first.fill(PROMPT)
            if model is not None:
                page.get_by_label("Model").click()
                page.get_by_role("option", name=model).click()
                page.get_by_text("Advanced stream options").click()  # open the accordion to read a slider
                default = StreamDiTScheduler.from_pretrained(DEFAULT_MODEL, subfolder="scheduler").config.micro_steps
                sync_api.expect(page.get_by_label(MICRO_STEPS)).not_to_have_value(str(default))  # the change landed
            page.get_by_role("button", name="Start").click()
            wait_for_playback(page, PLAYED, timeout=90)
            frame = page.evaluate(READ_FRAME)
            micro_steps = page.get_by_label(MICRO_STEPS).input_value() if model else None
            if screenshot:
                save_screenshot(page, ROOT / screenshot)
            page.get_by_role("button", name="Stop").click()  # the server stops generating for this visitor
        finally:
            browser.close()
    pixels = np.array(frame["pixels"], np.uint8).reshape(frame["height"], frame["width"], 4)
    return frame["time"], pixels[..., :3], micro_steps


def wait_for_playback(page, seconds, timeout):
    deadline, played = time.time() + timeout, 0.0
    while played <= seconds:
        assert time.time() < deadline, f"the player reached {played:.2f} s, not {seconds} s, in {timeout} s"
        time.sleep(0.1)
        played = page.evaluate(PLAYER_TIME)


def save_screenshot(page, path):
    """The README's picture, as a 256-colour PNG to keep the repository small."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=path)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def test_browser_shows_the_librarys_frames(shown):
    played, frame = shown
    assert_library_frame(played, frame, library_frames(PROMPT, SEED, int(round(played * FPS)) + 2))


def test_browser_streams_the_model_picked_in_the_menu(student_shown):
    """The Model menu sets the Advanced options to the student's own (4 micro steps) and Start streams the student."""
    played, frame, micro_steps = student_shown
    assert micro_steps == "4"
    reference = library_frames(PROMPT, SEED, int(round(played * FPS)) + 2, model=STUDENT_MODEL)
    assert_library_frame(played, frame, reference)


def assert_library_frame(played, frame, reference):
    index = int(round(played * FPS))
    reference = reference.astype(np.float64) / 255
    # The player's clock and the frame on screen can be a frame apart (MPEG-TS and hls.js timestamps): the nearest
    # frame or a neighbour must match, up to H.264's loss (about 5/255 on these frames) and the colour conversion.
    candidates = range(max(index - 1, 0), index + 2)
    errors = {i: np.abs(frame / 255 - reference[i]).mean() for i in candidates}
    best = min(errors, key=errors.get)
    assert errors[best] < 8 / 255, f"frame at {played:.3f} s: mean errors {errors} against library frames"


def test_browser_frame_shows_the_prompts_colour(shown):
    _, frame = shown
    assert shows_colour(frame, "red"), f"pixels per palette colour: {colour_counts(frame)}"
