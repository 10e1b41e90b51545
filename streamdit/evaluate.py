"""Evaluate a StreamDiT model on shapes world, from pixels alone.

    python -m streamdit.evaluate --model runs/shapes/pipeline --prompts 100 --seconds 4 --out eval/

The detector reads only the frames (never the generator's ground truth): the background is each frame's median colour,
the object is what differs from it (found on the torus, so an object straddling an edge is one object), its colour is
the nearest palette colour, its shape follows from how much of its bounding box it fills (disk ~0.79, square ~1,
triangle ~0.5), its size from its extent, and its direction and speed from how its centroid moves.

Measures: per-attribute and all-attribute prompt adherence; identity stability (the object keeps colour, shape, size);
motion smoothness; background flicker; the same in the last 10 s of a 60 s stream against the first 10 s (drift);
and prompt switching (the new prompt's attributes within 3 s of `set_prompt`). results.md also breaks all-attribute
adherence down by the prompt's shape and speed, which is where a model's misses tend to gather.

Adherence over 100 streams is a proportion with about +-7 points of sampling error (its 95% interval is in the
results), so two models are compared stream by stream on the same prompts and seeds instead (McNemar's exact test):

    python -m streamdit.evaluate --compare eval/a/results.json eval/b/results.json
"""

import argparse
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import (BACKGROUNDS, COLOURS, FPS, SHAPES, SIDE, SIZES, SPEEDS, caption, parse_caption, render, sample_scene,
                   to_frames)

ATTRIBUTES = ("colour", "shape", "size", "direction", "speed", "background")
SETTLING_FRAMES = FPS // 2  # a stream is read from half a second in: its start-up chunk is settling
_BG = np.array(list(BACKGROUNDS.values()), np.float64)
_FG = np.array(list(COLOURS.values()), np.float64)


def nearest(value, table: dict):
    names = list(table)
    values = np.array([table[n] for n in names], np.float64)
    return names[int(np.argmin(np.abs(values - np.asarray(value, np.float64)).sum(-1)))]


def torus_window(occupied):
    """Shift that moves the largest empty circular gap of a 1-D occupancy to the end, so the object is contiguous."""
    n = len(occupied)
    if not occupied.any():
        return 0
    empty = ~occupied
    best_len, best_end, run = 0, 0, 0
    for i in range(2 * n):  # twice round, to catch a gap that wraps
        run = run + 1 if empty[i % n] else 0
        if run > best_len:
            best_len, best_end = min(run, n), i % n
    return (best_end + 1) % n  # the first occupied index after the gap


@dataclass
class FrameReading:
    background: str
    colour: str | None
    shape: str | None
    size: str | None
    centre: tuple[float, float] | None  # (x, y) on the torus


def read_frame(frame: np.ndarray) -> FrameReading:
    """What one frame shows. frame: uint8 (H, W, 3)."""
    pixels = frame.reshape(-1, 3).astype(np.float64)
    background_rgb = np.median(pixels, axis=0)
    background = nearest(background_rgb, BACKGROUNDS)
    distance = np.abs(frame.astype(np.float64) - background_rgb).sum(-1)  # (H, W)
    if distance.max() < 60:  # nothing stands out from the background
        return FrameReading(background, None, None, None, None)
    mask = distance > 0.5 * distance.max()  # at least half covered: faint halos and stray pixels do not count
    if mask.sum() < 4:
        return FrameReading(background, None, None, None, None)
    side = frame.shape[0]
    scale = side / SIDE
    dy, dx = torus_window(mask.any(1)), torus_window(mask.any(0))
    rolled = np.roll(mask, (-dy, -dx), axis=(0, 1))
    rows, cols = np.nonzero(rolled)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    core = distance > 0.8 * distance.max()  # fully covered pixels: no anti-aliasing blend
    colour = nearest(np.median(frame[core].astype(np.float64), axis=0), COLOURS)
    coverage = np.clip(np.roll(distance, (-dy, -dx), axis=(0, 1)) / max(distance.max(), 1.0), 0, 1)
    fill = coverage.sum() / (height * width)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    size = "small" if max(height, width) < 28 * scale else "large"
    centre_y = (rows.mean() + dy) % side / scale  # in pixels at side 128
    centre_x = (cols.mean() + dx) % side / scale
    return FrameReading(background, colour, shape, size, (centre_x, centre_y))


def majority(values):
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


def wrapped_steps(centres):
    """Per-frame centroid displacement (dx, dy), wrapped to the torus."""
    c = np.array(centres, np.float64)
    return (np.diff(c, axis=0) + SIDE / 2) % SIDE - SIDE / 2


def read_video(frames: np.ndarray) -> dict:
    """The attributes a clip shows, and how steadily it shows them. frames: uint8 (T, H, W, 3)."""
    readings = [read_frame(f) for f in frames]
    seen = [r for r in readings if r.centre is not None]
    result = {name: majority(getattr(r, name) for r in readings) for name in ("colour", "shape", "size", "background")}
    result["direction"] = result["speed"] = None
    result["smoothness"] = 0.0
    if len(seen) >= 2:
        steps = wrapped_steps([r.centre for r in seen])  # (T-1, 2)
        mean = steps.mean(0)
        axis = int(np.argmax(np.abs(mean)))
        result["direction"] = (("left", "right"), ("up", "down"))[axis][int(mean[axis] > 0)]
        result["speed"] = min(SPEEDS, key=lambda s: abs(SPEEDS[s] - abs(mean[axis])))
        # smooth: each frame moves within 1 px of the clip's mean velocity
        result["smoothness"] = float((np.abs(steps - mean).max(1) <= 1.0).mean())
    result["identity"] = float(np.mean([
        (r.colour, r.shape, r.size) == (result["colour"], result["shape"], result["size"]) for r in seen
    ])) if seen else 0.0
    result["object_frames"] = len(seen) / len(readings)
    result["flicker"] = float(np.mean([r.background != result["background"] for r in readings]))
    return result


def adherence(reading: dict, prompt: str) -> dict:
    """For each attribute the prompt states: does the video show it?"""
    stated = parse_caption(prompt)
    return {name: reading[name] == value for name, value in stated.items()}


def random_prompts(count, seed):
    rng = np.random.default_rng(seed)
    return [caption(sample_scene(rng), rng) for _ in range(count)]


def stream_frames(pipe, prompt, seconds, seed, switch=None, **options):
    """Streams `seconds` of video; `switch=(second, prompt)` calls set_prompt once the stream reaches that second."""
    # A switch lands at a set micro step only in a sequential stream: a denoiser thread is up to a chunk ahead of the
    # frames handed out, by an amount that depends on timing. Without a switch, both give the same frames.
    options.setdefault("pipelined", None if switch is None else False)
    stream = pipe.stream(prompt, generator=torch.Generator().manual_seed(seed), **options)
    frames, target = [], int(seconds * FPS)
    for chunk in stream:
        frames.append(chunk.frames)
        done = sum(len(f) for f in frames)
        if switch is not None and done >= switch[0] * FPS:
            stream.set_prompt(switch[1])
            switch = None
        if done >= target:
            break
    stream.close()
    return np.concatenate(frames)[:target]


def evaluate_adherence(pipe, prompts, seconds, seed, **options):
    samples = [stream_frames(pipe, prompt, seconds, seed + i, **options) for i, prompt in enumerate(prompts)]
    return score_streams(prompts, samples), samples


def score_streams(prompts, samples, seconds=None):
    """One row per stream: what its first `seconds` (all of it: None) show against its prompt."""
    rows = []
    for prompt, frames in zip(prompts, samples):
        window = frames if seconds is None else frames[: int(seconds * FPS)]
        reading = read_video(window[SETTLING_FRAMES:])
        rows.append({"prompt": prompt, "reading": reading, "adherence": adherence(reading, prompt)})
    return rows


@torch.no_grad()
def evaluate_reconstructions(vae, count, seed, seconds=2, text=None):
    """The detector on the autoencoder's reconstructions of generator videos, against their full captions: the
    ceiling of what a DiT generating in this latent space can score (a perfect DiT still goes through the decoder).
    `text`: prompt -> (1, E) pooled text states, for a decoder that reads the prompt (it reads the full caption)."""
    rng = np.random.default_rng(seed)
    frames_per_clip = int(seconds * FPS) // vae.temporal_compression * vae.temporal_compression
    rows = []
    for _ in range(count):
        scene = sample_scene(rng)
        video = torch.from_numpy(render(scene, frames_per_clip)).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
        prompt = caption(scene, omit=0.0)
        latents = vae.encode(video.to(vae.device, vae.dtype))
        recon = vae.decode(latents) if text is None else vae.decode(latents, text=text(prompt))
        recon = recon.float().clamp(-1, 1)  # (1, 3, T, H, W)
        frames = to_frames(recon[0])
        reading = read_video(frames)
        rows.append({"prompt": prompt, "reading": reading, "adherence": adherence(reading, prompt)})
    return summarise(rows)


def all_right(row) -> bool:
    """Whether a scored stream (a `score_streams` row) holds every attribute its prompt states."""
    return all(row["adherence"].values())


def wilson_interval(successes: int, count: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion `successes` / `count` (it stays inside [0, 1], unlike the normal
    approximation, at 0 or 100%)."""
    if count < 1 or not 0 <= successes <= count:
        raise ValueError(f"successes={successes} of count={count}: need 0 <= successes <= count and count >= 1")
    p, z2 = successes / count, z * z
    centre = (p + z2 / (2 * count)) / (1 + z2 / count)
    half = z / (1 + z2 / count) * math.sqrt(p * (1 - p) / count + z2 / (4 * count * count))
    return max(0.0, centre - half), min(1.0, centre + half)


def check_same_prompts(prompts: list[str], other_rows):
    """Raises ValueError, naming the first difference, unless `other_rows` are streams of `prompts` in that order."""
    if len(prompts) != len(other_rows):
        raise ValueError(f"{len(prompts)} streams against {len(other_rows)}: compare evaluations of the same prompts")
    for i, (prompt, other) in enumerate(zip(prompts, other_rows)):
        if prompt != other["prompt"]:
            raise ValueError(f"stream {i} is {prompt!r} in one and {other['prompt']!r} in the other: compare "
                             "evaluations of the same prompts and seed")


def paired_comparison(rows, other_rows) -> dict:
    """Two evaluations of the same prompts and seeds (two models, or two settings of one), stream by stream: how many
    streams both, only this one, only the other, or neither got right on every attribute, and McNemar's exact
    two-sided p-value, the chance of a split of the discordant streams at least this uneven if the two were equally
    good. Pairing removes what the prompts themselves make easy or hard, which two separate proportions keep."""
    check_same_prompts([row["prompt"] for row in rows], other_rows)
    right = [(all_right(r), all_right(o)) for r, o in zip(rows, other_rows)]
    counts = Counter(right)
    only_this, only_other = counts[(True, False)], counts[(False, True)]
    discordant = only_this + only_other
    tail = sum(math.comb(discordant, k) for k in range(min(only_this, only_other) + 1)) / 2**discordant
    return {"streams": len(rows), "both": counts[(True, True)], "only_this": only_this, "only_other": only_other,
            "neither": counts[(False, False)], "p_value": min(1.0, 2 * tail)}


def summarise(rows):
    per_attribute = {}
    for name in ATTRIBUTES:
        judged = [r["adherence"][name] for r in rows if name in r["adherence"]]
        per_attribute[name] = float(np.mean(judged)) if judged else float("nan")
    right = [all_right(r) for r in rows]
    low, high = wilson_interval(sum(right), len(right))
    return {
        "all_attributes": float(np.mean(right)),
        "all_attributes_ci95_low": low,
        "all_attributes_ci95_high": high,
        **{f"adherence_{k}": v for k, v in per_attribute.items()},
        "identity": float(np.mean([r["reading"]["identity"] for r in rows])),
        "smoothness": float(np.mean([r["reading"]["smoothness"] for r in rows])),
        "flicker": float(np.mean([r["reading"]["flicker"] for r in rows])),
    }


def evaluate_drift(pipe, prompts, seed, seconds=60, window=10, **options):
    """The same measures over the first and the last `window` seconds of `seconds`-long streams."""
    first, last = [], []
    for i, prompt in enumerate(prompts):
        frames = stream_frames(pipe, prompt, seconds, seed + i, **options)
        for rows, clip in ((first, frames[: window * FPS]), (last, frames[-window * FPS :])):
            reading = read_video(clip)
            rows.append({"prompt": prompt, "reading": reading, "adherence": adherence(reading, prompt)})
    return summarise(first), summarise(last)


def evaluate_switching(pipe, pairs, seed, before=4.0, within=3.0, **options):
    """A switch succeeds when the second after `within` - 1 .. `within` s past set_prompt shows the new prompt."""
    successes = []
    for i, (old, new) in enumerate(pairs):
        frames = stream_frames(pipe, old, before + within, seed + i, switch=(before, new), **options)
        window = frames[int((before + within - 1) * FPS) : int((before + within) * FPS)]
        successes.append(all(adherence(read_video(window), new).values()))
    return float(np.mean(successes))


def save_gif_grid(samples, path, columns=4, seconds=3):
    from PIL import Image

    clips = [s[: seconds * FPS] for s in samples[: columns * 2]]
    length = min(len(c) for c in clips)
    rows = [np.concatenate([c[:length] for c in clips[r : r + columns]], axis=2) for r in range(0, len(clips), columns)]
    rows = [r for r in rows if r.shape[2] == rows[0].shape[2]]
    grid = np.concatenate(rows, axis=1)  # (T, rows*H, columns*W, 3)
    images = [Image.fromarray(f) for f in grid]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / FPS), loop=0)


def by_shape_and_speed(rows) -> dict:
    """Where a model fails: streams that hold every stated attribute, by the prompt's shape and speed.
    -> {"square quickly": [right, streams], ...}; "normal" is the speed a prompt without a speed word asks for."""
    cells = {}
    for row in rows:
        stated = parse_caption(row["prompt"])
        cell = cells.setdefault(f"{stated['shape']} {stated['speed']}", [0, 0])
        cell[0] += all_right(row)
        cell[1] += 1
    return cells


def breakdown_markdown(cells: dict) -> str:
    """The by_shape_and_speed cells as a shapes x speeds table of right / streams."""
    lines = ["| shape | " + " | ".join(SPEEDS) + " |", "|---|" + "---:|" * len(SPEEDS)]
    for shape in SHAPES:
        counts = [cells.get(f"{shape} {speed}") for speed in SPEEDS]
        lines.append(f"| {shape} | " + " | ".join(f"{c[0]} / {c[1]}" if c else "-" for c in counts) + " |")
    return "\n".join(lines)


def comparison_markdown(rows, other_rows, name, other_name) -> str:
    """`paired_comparison` as a short table: each side's adherence and the streams only it got right."""
    c = paired_comparison(rows, other_rows)
    n = c["streams"]
    lines = [f"Paired with {other_name} on the same {n} prompts (McNemar's exact test):", "",
             "| evaluation | all-attribute | 95% interval | right only here |", "|---|---:|---:|---:|"]
    for label, right, only in ((name, c["both"] + c["only_this"], c["only_this"]),
                               (other_name, c["both"] + c["only_other"], c["only_other"])):
        low, high = wilson_interval(right, n)
        lines.append(f"| {label} | {right / n:.0%} | {low:.0%}-{high:.0%} | {only} |")
    lines += ["", f"Both right in {c['both']}, neither in {c['neither']}; p = {c['p_value']:.3f} (two-sided)."]
    return "\n".join(lines)


def load_rows(path) -> list[dict]:
    """The per-stream rows of an evaluation's results.json (what `--compare` pairs)."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"--compare {path}: not an evaluation's results.json with its rows ({error!r})") from error
    return rows


def markdown(results: dict) -> str:
    lines = ["| measure | value |", "|---|---:|"]
    for key, value in results.items():
        lines.append(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


def main(argv=None):
    from .pipeline import StreamDiTPipeline

    p = argparse.ArgumentParser(prog="python -m streamdit.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="pipeline folder or Hub id (default: streamdit.DEFAULT_MODEL)")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--windows", type=float, nargs="*", default=[],
                   help="also score the first W seconds of the same streams, for each W (shorter than --seconds): "
                        "the detector reads each attribute over a whole window, so the window's length counts")
    p.add_argument("--drift-prompts", type=int, default=5)
    p.add_argument("--drift-seconds", type=int, default=60)
    p.add_argument("--switches", type=int, default=20)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--chunk-size", type=int, default=None)
    p.add_argument("--micro-steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--switch-strength", type=float, default=None,
                   help="how far a prompt switch takes the buffer back (default: the model's stored value)")
    p.add_argument("--warmup-chunks", type=int, default=None,
                   help="chunks a stream makes and drops after its start-up (default: the model's stored value)")
    p.add_argument("--shift", type=float, default=None,
                   help="the noise-level grid's timestep shift (default: the model's scheduler config)")
    p.add_argument("--reconstructions", type=int, default=0,
                   help="also score the autoencoder's reconstructions of this many generator clips (the ceiling)")
    p.add_argument("--out", default="eval")
    p.add_argument("--compare", nargs="+", default=None, metavar="RESULTS_JSON",
                   help="another evaluation's results.json of the same prompts and seed: its streams against this "
                        "run's, pair by pair (results.md); or two of them, compared without streaming anything")
    args = p.parse_args(argv)
    if args.compare is not None and len(args.compare) > 2:
        raise ValueError(f"--compare takes one results.json (against this run) or two, got {len(args.compare)}")
    if args.compare is not None and len(args.compare) == 2:
        print(comparison_markdown(load_rows(args.compare[0]), load_rows(args.compare[1]), *args.compare))
        return
    for window in args.windows:
        if not SETTLING_FRAMES < window * FPS <= args.seconds * FPS:
            raise ValueError(f"--windows {window:g}: a window must be longer than the {SETTLING_FRAMES / FPS:g} s a "
                             f"stream settles for and at most --seconds {args.seconds:g}")
    if args.model is None:
        from . import DEFAULT_MODEL

        args.model = DEFAULT_MODEL
    pipe = StreamDiTPipeline.from_pretrained(args.model)
    if args.shift is not None:  # diffusers' way: a scheduler of the same kind with one setting changed
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=args.shift)
    options = {k: v for k, v in dict(chunk_size=args.chunk_size, micro_steps=args.micro_steps,
                                      guidance_scale=args.guidance_scale,
                                      switch_strength=args.switch_strength,
                                      warmup_chunks=args.warmup_chunks).items() if v is not None}
    prompts = random_prompts(args.prompts, args.seed)
    compared = None
    if args.compare is not None:  # checked before streaming: a mismatch found after it would waste the run
        compared = load_rows(args.compare[0])
        check_same_prompts(prompts, compared)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, samples = evaluate_adherence(pipe, prompts, args.seconds, args.seed, **options)
    results = {"model": args.model, "shift": pipe.scheduler.config.shift,
               "switch_strength": options.get("switch_strength", pipe.config.switch_strength),
               "warmup_chunks": options.get("warmup_chunks", pipe.config.warmup_chunks), "prompts": len(prompts),
               **summarise(rows)}
    for window in args.windows:
        first = summarise(score_streams(prompts, samples, window))
        results |= {f"first_{window:g}s_{k}": v for k, v in first.items() if k.startswith(("all", "adherence"))}
    if args.reconstructions:
        text = (lambda prompt: pipe.pooled_prompt([prompt])) if pipe.decoder_reads_prompt else None
        ceiling = evaluate_reconstructions(pipe.vae, args.reconstructions, args.seed, text=text)
        results |= {f"autoencoder_{k}": v for k, v in ceiling.items() if k.startswith(("all", "adherence"))}
    if args.drift_prompts:
        first, last = evaluate_drift(pipe, prompts[: args.drift_prompts], args.seed, args.drift_seconds, **options)
        results |= {"drift_first10s_all_attributes": first["all_attributes"],
                    "drift_last10s_all_attributes": last["all_attributes"],
                    "drift_last10s_identity": last["identity"], "drift_last10s_flicker": last["flicker"]}
    if args.switches:
        new = random_prompts(args.switches, args.seed + 1)
        results["switching"] = evaluate_switching(pipe, list(zip(prompts, new)), args.seed, **options)
    cells = by_shape_and_speed(rows)
    report = (f"{markdown(results)}\n\nStreams right on every stated attribute, by shape and speed:\n\n"
              f"{breakdown_markdown(cells)}\n")
    if compared is not None:
        report += f"\n{comparison_markdown(rows, compared, args.model, args.compare[0])}\n"
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(json.dumps({"results": results, "by_shape_and_speed": cells, "rows": rows},
                                                 indent=1, default=str))
    save_gif_grid(samples, out / "samples.gif")
    print(report)


if __name__ == "__main__":
    main()
