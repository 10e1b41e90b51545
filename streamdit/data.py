"""Shapes world: the procedural (video, caption) pairs the built-in model is trained on.

Follows the project's specification exactly (shared/shapes-world.md): 128 x 128 RGB at 16 fps (other sizes scale
sizes and speeds by side / 128), one anti-aliased object on a solid background, moving at constant velocity on a torus,
and captions of the form

    a [small|large] {colour} {shape} moving {direction} [slowly|quickly] [on a {background} background]

where an omitted size or background means any (drawn at random) and an omitted speed means 2 px per frame.
Evaluation and outside checks rely on these colours, sizes, speeds and words: do not change them.
"""

import re
from dataclasses import dataclass

import numpy as np
import torch

FPS = 16
SIDE = 128
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 20, "large": 36}  # d in px at side 128
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy), y grows downwards
SPEEDS = {"slowly": 1, "normal": 2, "quickly": 3}  # px per frame at side 128; "normal" has no word in captions
VOCABULARY = (
    ["a", "moving", "on", "background"]
    + list(SIZES) + list(COLOURS) + list(SHAPES) + list(DIRECTIONS) + ["slowly", "quickly"] + list(BACKGROUNDS)
)


@dataclass(frozen=True)
class Scene:
    """Everything that determines one video. Position (x, y) is the object's centre at frame 0, in pixels at side 128."""

    colour: str
    shape: str
    size: str
    direction: str
    speed: str
    background: str
    x: float
    y: float

    def __post_init__(self):
        for name, allowed in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("direction", DIRECTIONS),
                              ("speed", SPEEDS), ("background", BACKGROUNDS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {sorted(allowed)}")

    def centre(self, frame, side=SIDE):
        """(x, y) of the centre at `frame` (array or int), in pixels of a `side`-pixel frame, wrapped onto the torus."""
        scale = side / SIDE
        dx, dy = DIRECTIONS[self.direction]
        step = SPEEDS[self.speed] * np.asarray(frame, dtype=np.float64)
        return (self.x + dx * step) * scale % side, (self.y + dy * step) * scale % side


def sample_scene(rng: np.random.Generator, shape_weights=None, **fixed) -> Scene:
    """A uniformly random scene; keyword arguments fix attributes (e.g. colour="red").

    `shape_weights` (one per SHAPES entry) draws shapes unevenly, for training that dwells on a weak shape; None is
    uniform and draws exactly what the evaluation's prompts were drawn with.
    """
    if shape_weights is not None:
        if len(shape_weights) != len(SHAPES) or min(shape_weights) < 0 or sum(shape_weights) <= 0:
            raise ValueError(f"shape_weights {shape_weights!r}: give {len(SHAPES)} weights >= 0 for {SHAPES}, not all 0")
        shape_weights = np.asarray(shape_weights, np.float64) / sum(shape_weights)
    attributes = dict(
        colour=rng.choice(list(COLOURS)),
        shape=rng.choice(SHAPES, p=shape_weights),
        size=rng.choice(list(SIZES)),
        direction=rng.choice(list(DIRECTIONS)),
        speed=rng.choice(list(SPEEDS)),
        background=rng.choice(list(BACKGROUNDS)),
        x=rng.uniform(0, SIDE),
        y=rng.uniform(0, SIDE),
    )
    attributes.update(fixed)
    return Scene(**{k: (str(v) if isinstance(v, np.str_) else v) for k, v in attributes.items()})


def caption(scene: Scene, rng: np.random.Generator | None = None, omit: float = 0.5) -> str:
    """The canonical caption; size and background are each left out with probability `omit` (0 = always stated).

    The speed word is never optional: its absence means 2 px per frame.
    """
    rng = rng or np.random.default_rng()
    words = ["a"]
    if rng.random() >= omit:
        words.append(scene.size)
    words += [scene.colour, scene.shape, "moving", scene.direction]
    if scene.speed != "normal":
        words.append(scene.speed)
    if rng.random() >= omit:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def parse_caption(text: str) -> dict:
    """The attributes a caption states: colour, shape, direction, speed always; size and background when given.

    Case and punctuation are ignored, as the tokenizer does. Raises ValueError when a required attribute is missing.
    """
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    stated = {}
    for name, values in (("size", SIZES), ("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS),
                         ("background", BACKGROUNDS)):
        found = [w for w in words if w in values]
        if found:
            stated[name] = found[0]
    speed = [w for w in words if w in ("slowly", "quickly")]
    stated["speed"] = speed[0] if speed else "normal"
    missing = [name for name in ("colour", "shape", "direction") if name not in stated]
    if missing:
        raise ValueError(f"caption {text!r} does not name a {', '.join(missing)}")
    return stated


def coverage(shape, dx, dy, d):
    """Fraction of each pixel the shape covers, from its signed distance (a one-pixel ramp: anti-aliased edges).

    dx, dy: offsets of pixel centres from the object's centre (torus-wrapped), d: the size in pixels.
    """
    h = d / 2
    if shape == "circle":  # a disk of diameter d
        return np.clip(h - np.hypot(dx, dy) + 0.5, 0, 1)
    if shape == "square":  # axis-aligned, side d
        return np.clip(h - np.abs(dx) + 0.5, 0, 1) * np.clip(h - np.abs(dy) + 0.5, 0, 1)
    # isosceles triangle: base d at the bottom (dy = h), apex at the top centre (dy = -h), height d
    slanted = (2 * np.abs(dx) - dy - h) / np.sqrt(5.0)
    return np.clip(0.5 - np.maximum(dy - h, slanted), 0, 1)


def render(scene: Scene, num_frames: int, side: int = SIDE, start: int = 0) -> np.ndarray:
    """Frames start .. start + num_frames - 1 of the scene: uint8 (num_frames, side, side, 3)."""
    cx, cy = scene.centre(np.arange(start, start + num_frames), side)  # (T,) each
    pixels = np.arange(side) + 0.5
    # torus: offsets wrapped into [-side/2, side/2), so an object straddling an edge is drawn on both sides
    dx = (pixels[None, None, :] - cx[:, None, None] + side / 2) % side - side / 2  # (T, 1, side)
    dy = (pixels[None, :, None] - cy[:, None, None] + side / 2) % side - side / 2  # (T, side, 1)
    cov = coverage(scene.shape, dx, dy, SIZES[scene.size] * side / SIDE)[..., None]  # (T, side, side, 1)
    background = np.array(BACKGROUNDS[scene.background], np.float64)
    colour = np.array(COLOURS[scene.colour], np.float64)
    return np.round(background * (1 - cov) + colour * cov).astype(np.uint8)


def to_video(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (3, T, H, W) in [-1, 1], the autoencoder's input."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def to_frames(video: torch.Tensor) -> np.ndarray:
    """float (3, T, H, W), nominally in [-1, 1] (a decoder's output; clamped) -> uint8 (T, H, W, 3): `to_video`'s
    inverse, what a stream shows."""
    return ((video.clamp(-1, 1).permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()


def sample_batch(rng: np.random.Generator, batch_size: int, num_frames: int, side: int = SIDE, omit: float = 0.5,
                 shape_weights=None):
    """A training batch: videos (b, 3, T, side, side) in [-1, 1], captions, scenes."""
    scenes = [sample_scene(rng, shape_weights) for _ in range(batch_size)]
    videos = torch.stack([to_video(render(s, num_frames, side)) for s in scenes])
    return videos, [caption(s, rng, omit) for s in scenes], scenes
