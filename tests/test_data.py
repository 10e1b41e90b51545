"""The shapes-world generator follows shared/shapes-world.md: palette, sizes, speeds, wrap-around, captions."""

import re
from collections import Counter

import numpy as np
import pytest
import torch

from streamdit.data import (
    BACKGROUNDS, COLOURS, FPS, SIZES, SPEEDS, VOCABULARY, Scene, caption, parse_caption, render, sample_batch,
    sample_scene,
)


def scene(**overrides):
    base = dict(colour="red", shape="square", size="large", direction="right", speed="normal", background="black",
                x=64.0, y=64.0)
    return Scene(**(base | overrides))


def object_mask(frame, background):
    return np.abs(frame.astype(int) - np.array(BACKGROUNDS[background])).sum(-1) > 0


def test_palette_and_spec_constants():
    assert COLOURS == {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 90, 230),
                       "yellow": (240, 210, 40), "purple": (150, 60, 200), "orange": (245, 135, 25)}
    assert BACKGROUNDS == {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
    assert SIZES == {"small": 20, "large": 36} and SPEEDS == {"slowly": 1, "normal": 2, "quickly": 3} and FPS == 16


@pytest.mark.parametrize("colour", list(COLOURS))
@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_colours(colour, background):
    frame = render(scene(colour=colour, background=background), 1)[0]
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    assert tuple(frame[64, 64]) == COLOURS[colour]  # the centre is fully covered
    assert tuple(frame[0, 0]) == BACKGROUNDS[background]


@pytest.mark.parametrize("shape, fill", [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5)])
@pytest.mark.parametrize("size", list(SIZES))
def test_shape_fill_and_size(shape, fill, size):
    frame = render(scene(shape=shape, size=size, x=64.0, y=64.0), 1)[0].astype(float)
    coverage = np.abs(frame - np.array(BACKGROUNDS["black"])).sum(-1) / sum(COLOURS["red"])  # partial at the edges
    rows, cols = np.nonzero(coverage > 0.5)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    d = SIZES[size]
    assert abs(height - d) <= 1 and abs(width - d) <= 1
    assert coverage.sum() / (d * d) == pytest.approx(fill, abs=0.03)
    if shape == "triangle":  # base at the bottom, apex at the top
        top, bottom = coverage[rows.min()].sum(), coverage[rows.max()].sum()
        assert bottom > d - 2 and top < 3


@pytest.mark.parametrize("speed", list(SPEEDS))
@pytest.mark.parametrize("direction, axis, sign", [("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)])
def test_motion(speed, direction, axis, sign):
    frames = render(scene(direction=direction, speed=speed, x=40.0, y=40.0, shape="circle"), 8)
    centroids = np.array([np.argwhere(object_mask(f, "black")).mean(0) for f in frames])  # (T, [row, col])
    steps = np.diff(centroids, axis=0)
    np.testing.assert_allclose(steps[:, axis], sign * SPEEDS[speed], atol=0.05)
    np.testing.assert_allclose(steps[:, 1 - axis], 0, atol=0.05)


def test_torus_wrap_around():
    s = scene(direction="right", speed="quickly", x=120.0, y=64.0, size="large")
    frame = render(s, 1)[0]
    mask = object_mask(frame, "black")
    assert mask[:, :8].any() and mask[:, -8:].any()  # straddling: drawn on both sides
    assert mask.sum() == object_mask(render(scene(size="large"), 1)[0], "black").sum()  # nothing lost at the edge
    later = render(s, 1, start=20)[0]  # 120 + 60 = 180 -> 52 on the torus
    np.testing.assert_array_equal(later, render(scene(size="large", x=52.0), 1)[0])
    long_run = render(s, 200)  # a stream can run forever: every frame still shows the whole object
    assert all(object_mask(f, "black").sum() == mask.sum() for f in long_run)


def test_other_sizes_scale():
    s = scene(size="small", speed="quickly", shape="square")
    frames = render(s, 2, side=256)
    assert frames.shape == (2, 256, 256, 3)
    mask = object_mask(frames[0], "black")
    rows, cols = np.nonzero(mask)
    assert abs((cols.max() - cols.min() + 1) - 40) <= 1  # d scales with side / 128
    shift = np.argwhere(object_mask(frames[1], "black")).mean(0) - np.argwhere(mask).mean(0)
    assert shift[1] == pytest.approx(6, abs=0.05)  # so does speed


def test_captions_follow_the_grammar():
    rng = np.random.default_rng(0)
    pattern = (r"^a( (small|large))? (red|green|blue|yellow|purple|orange) (circle|square|triangle) moving "
               r"(left|right|up|down)( (slowly|quickly))?( on a (black|white|gray) background)?$")
    seen_size = seen_no_size = seen_bg = seen_no_bg = 0
    for _ in range(400):
        s = sample_scene(rng)
        text = caption(s, rng)
        assert __import__("re").match(pattern, text), text
        assert set(text.split()) <= set(VOCABULARY)
        stated = parse_caption(text)
        assert stated["colour"] == s.colour and stated["shape"] == s.shape and stated["direction"] == s.direction
        assert stated["speed"] == s.speed  # the speed word is never omitted: its absence means 2 px per frame
        seen_size += "size" in stated
        seen_no_size += "size" not in stated
        seen_bg += "background" in stated
        seen_no_bg += "background" not in stated
        if "size" in stated:
            assert stated["size"] == s.size
        if "background" in stated:
            assert stated["background"] == s.background
    assert min(seen_size, seen_no_size, seen_bg, seen_no_bg) > 100  # optional parts are omitted at random
    assert caption(scene(speed="slowly"), rng, omit=0) == "a large red square moving right slowly on a black background"


def test_shape_weights_draw_shapes_unevenly_and_bad_weights_are_named():
    rng = np.random.default_rng(0)
    counts = Counter(sample_scene(rng, (1, 2, 1)).shape for _ in range(3000))
    assert abs(counts["square"] / 3000 - 0.5) < 0.04 and abs(counts["circle"] / 3000 - 0.25) < 0.04
    assert {sample_scene(rng, (0, 0, 5)).shape for _ in range(50)} == {"triangle"}
    for bad in [(1, 1), (1, -1, 1), (0, 0, 0)]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            sample_scene(rng, bad)
    videos, _, scenes = sample_batch(np.random.default_rng(2), 4, 2, side=16, shape_weights=(0, 1, 0))
    assert {s.shape for s in scenes} == {"square"}


def test_parse_caption_ignores_case_and_punctuation_and_rejects_incomplete():
    assert parse_caption("A Small, BLUE circle moving UP!") == dict(size="small", colour="blue", shape="circle",
                                                                    direction="up", speed="normal")
    with pytest.raises(ValueError, match="shape"):
        parse_caption("a red thing moving left")


def test_sample_batch():
    videos, captions, scenes = sample_batch(np.random.default_rng(0), 3, 8)
    assert videos.shape == (3, 3, 8, 128, 128) and len(captions) == 3 and len(scenes) == 3
    assert videos.min() >= -1 and videos.max() <= 1


def test_sample_batch_renders_and_captions_each_scene():
    videos, captions, scenes = sample_batch(np.random.default_rng(1), 4, 6, side=32)
    assert len(set(scenes)) == 4
    for video, text, s in zip(videos, captions, scenes, strict=True):
        frames = ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()  # back to uint8 frames
        np.testing.assert_array_equal(frames, render(s, 6, side=32))
        stated = parse_caption(text)
        assert stated == {name: getattr(s, name) for name in stated}
    full = sample_batch(np.random.default_rng(1), 4, 6, side=32, omit=0.0)[1]
    assert [caption(s, omit=0.0) for s in scenes] == full  # same seed, same scenes; every attribute stated


def test_bad_scene_raises():
    with pytest.raises(ValueError, match="colour='pink'"):
        scene(colour="pink")
