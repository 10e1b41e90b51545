"""Train the built-in StreamDiT model on shapes world.

    python -m streamdit.train --stage all --output-dir runs/shapes       # autoencoder, then the DiT
    accelerate launch -m streamdit.train --stage dit ...                   # one or many GPUs, same script

Stage "vae": the causal video autoencoder, by pixel reconstruction (L1 + MSE, object pixels weighted up: they are a few
percent of the frame but all of the content). Its latents are then normalised to unit variance.
Stage "decoder": the decoder alone, the encoder frozen, so a DiT trained on its latents stays valid: sharper edges
(--edge-weight), clean frames from noisy latents (--latent-noise), or the true frames from latents a trained DiT
redraws (--redraw-with: SDEdit from the true latents, so the decoder meets the DiT's own errors with the right answer)
or redraws from deeper noise (--redraw-targets: the true clip moved to where the redraw put it) or streams
(--stream-targets: the prompt's object, drawn where the stream shows it, from the stream's own latents),
and a decoder that commits to a shape (--adversarial-weight: a patch discriminator's hinge loss, as image autoencoders
are trained; a pixel loss alone pays a blend of square and circle for a latent that could be either), and a decoder
that reads the prompt (--decoder-text: told the shape asked for, it need not draw the blend).
Stage "dit": buffered flow matching (paper Eq. 5) with mixed training (Sec. 3.2): each batch draws a partition with chunk
size c from {1, 2, 4, ..., B} and each chunk its own tau from Eq. 8, so one model serves uniform, diagonal and StreamDiT
partitions. The text encoder trains jointly; 10% of captions are dropped for classifier-free guidance. With
--decoded-weight it also pays for what the frozen decoder draws from its clean estimate (decoded_loss).

Every run resumes from the newest checkpoint in --output-dir (model, optimiser, EMA, data RNG, step), so an
interrupted run continues where it stopped. Loss goes to <stage>-loss.csv and <stage>-loss.png; the finished pipeline
(EMA weights) to <output-dir>/pipeline.
"""

import argparse
import csv
import math
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .autoencoder import StreamDiTAutoencoder, Upsample
from .data import (BACKGROUNDS, DIRECTIONS, FPS, SIDE, SIZES, SPEEDS, VOCABULARY, Scene, caption, parse_caption,
                   render, sample_batch, to_frames, to_video)
from .evaluate import majority, random_prompts, read_frame
from .pipeline import StreamDiTPipeline, guided_velocity
from .scheduler import StreamDiTScheduler
from .text import StreamDiTTextEncoder, build_tokenizer, tokenize
from .transformer import StreamDiTTransformer3DModel, from_preset


class TrainState:
    """Step counter and data RNG, checkpointed with the models so a resumed run sees the data it would have seen."""

    def __init__(self, seed):
        self.step, self.rng = 0, np.random.default_rng(seed)

    def state_dict(self):
        return {"step": self.step, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state):
        self.step, self.rng.bit_generator.state = state["step"], state["rng"]


def new_vae(args):
    return StreamDiTAutoencoder(
        latent_channels=args.latent_channels,
        block_out_channels=tuple(args.vae_channels),
        temporal_downsample=(False, True, True),
        temporal_kernel_size=1,
        decoder_block_out_channels=tuple(args.decoder_channels) if args.decoder_channels else None,
        decoder_layers_per_block=args.decoder_layers,
        decoder_untied_frames=args.decoder_untied_frames,
    )


def new_text_encoder(tokenizer, width):
    return StreamDiTTextEncoder(vocab_size=len(tokenizer), max_length=tokenizer.model_max_length, hidden_size=width,
                                num_layers=2)


def object_weights(video):
    """1 on background pixels, 5 on the object's: the background of a clip is its median colour."""
    background = video.flatten(2).median(dim=2).values[:, :, None, None, None]  # (b, 3, 1, 1, 1)
    on_object = (video - background).abs().sum(1, keepdim=True) > 0.02  # (b, 1, T, H, W)
    return 1.0 + 4.0 * on_object.float()


def latent_object_weights(x1, weight, threshold=0.5):
    """1 on background latents, 1 + weight near the object: a latent whose channels differ from its frame's median
    latent by more than `threshold` (latents of unit variance). The object is under a tenth of the latents but all of
    what the caption names, and an object shape is decided by a few of them (a square's corners)."""
    background = x1.flatten(3).median(dim=3).values[..., None, None]  # (b, C, F, 1, 1)
    near_object = (x1 - background).abs().amax(1, keepdim=True) > threshold  # (b, 1, F, h, w)
    return 1.0 + weight * near_object.float()


def object_crops(video, scenes, rng, size):
    """size x size crops that contain each clip's object: the autoencoder is convolutional, so crops train it as
    well as whole frames at a fraction of the cost, and crops around the object are never all background."""
    side = video.shape[-1]
    crops = []
    for clip, scene in zip(video, scenes):
        x, y = scene.centre(0, side)
        left = int(x - rng.uniform(0.25, 0.75) * size) % side
        top = int(y - rng.uniform(0.25, 0.75) * size) % side
        clip = torch.roll(clip, shifts=(-top, -left), dims=(-2, -1))  # the world is a torus: crops wrap too
        crops.append(clip[..., :size, :size])
    return torch.stack(crops)  # (b, 3, T, size, size)


def reconstruct_crops(vae, batch, args, rng):
    """The autoencoder on object crops of a batch: (reconstruction, crops), both (b, 3, T, crop, crop)."""
    video = object_crops(batch[0], batch[2], rng, args.vae_crop)  # (b, 3, T, crop, crop) in [-1, 1]
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    recon = vae(video, latent_noise=args.latent_noise, generator=generator)  # forward: DDP syncs it
    return recon, video


def reconstruction_loss(recon, video, edge_weight=0.0):
    """L1 + MSE with the object's pixels weighted up, plus `edge_weight` times the edge loss."""
    w = object_weights(video)
    loss = ((recon - video).abs() * w).mean() + ((recon - video).square() * w).mean()
    return loss + edge_weight * edge_loss(recon, video) if edge_weight else loss


def edge_loss(recon, video):
    """L1 between the frames' horizontal and vertical pixel differences. A pixel loss pays little for a soft edge or
    a slightly uneven fill, which is what turns a square's corners round and a small triangle into a blob for the
    detector; differences are zero inside an object and on the background, and large only at a sharp edge.
    Differencing is linear, so the difference of the error is the error of the differences."""
    error = recon - video  # (b, 3, T, H, W)
    return torch.diff(error, dim=-1).abs().mean() + torch.diff(error, dim=-2).abs().mean()


class PatchDiscriminator(nn.Module):
    """Per-frame patch discriminator (pix2pix's PatchGAN): a logit for each patch of about 46 x 46 pixels, more than
    a large object, saying whether that patch looks like shapes world. It sees no latents: it only knows that a
    shapes-world square has square corners and a circle is round, never a blend of the two."""

    def __init__(self, channels: int = 32):
        super().__init__()
        c = channels
        self.layers = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.GroupNorm(8, 4 * c), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 3, 1, 1),
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        frames = video.transpose(1, 2).flatten(0, 1)  # (b T, 3, H, W) in [-1, 1]
        return self.layers(frames)  # (b T, 1, H / 8, W / 8)


def adversarial_loss(discriminator, recon, video):
    """Hinge GAN losses in one scalar, for the shared loop's single optimiser: the discriminator's (real frames up,
    the decoder's down, the decoder's detached) plus the decoder's (its frames up), the latter through a copy of the
    discriminator's weights cut from the graph, so each loss moves only its own model."""
    # one call on both halves: DDP allows a module one forward per backward (GroupNorm keeps the samples apart)
    real, fake = discriminator(torch.cat([video, recon.detach()])).chunk(2)  # (b T, 1, H / 8, W / 8) each
    d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    module = getattr(discriminator, "module", discriminator)  # DDP wraps it under several processes
    frozen = {name: p.detach() for name, p in module.named_parameters()}
    g_loss = -torch.func.functional_call(module, frozen, (recon,)).mean()
    return d_loss, g_loss


@torch.no_grad()
def redraw(pipe, x1, captions, sigma, generator):
    """SDEdit by the DiT: latents x1 (b, C, F, h, w) noised to tau = 1 - sigma, then taken back to tau = 1 by the
    pipeline's guided Euler steps (every frame at one level, a uniform partition), as densely as its stored stream
    steps (that partition's T micro steps span all of [0, 1]). What comes back is the clip as this DiT draws it: the
    place, colour and motion of x1, with the DiT's own errors (a square's soft corners)."""
    scheduler, frames = pipe.scheduler, x1.shape[2]
    steps = max(1, math.ceil(sigma * scheduler.partition().num_steps))
    partition = scheduler.partition(chunk_size=frames, micro_steps=steps, reference_frames=0, buffer_frames=frames)
    taus = scheduler.taus(partition, strength=sigma).to(x1.device)  # (steps + 1,) from 1 - sigma to 1
    noise = torch.randn(x1.shape, generator=generator).to(x1.device)
    x = scheduler.add_noise(x1, noise, taus[0])  # (b, C, F, h, w)
    text, mask = pipe.encode_prompt(captions, x1.device)
    uncond, uncond_mask = pipe.encode_prompt([""] * len(captions), x1.device)
    for tau, next_tau in zip(taus[:-1], taus[1:]):
        tau, next_tau = tau.expand(frames), next_tau.expand(frames)  # (F,)
        velocity = guided_velocity(pipe.transformer, x, tau, text, mask, uncond, uncond_mask,
                                   pipe.config.guidance_scale)
        x = scheduler.step(velocity, x, tau, next_tau).prev_sample
    return x  # (b, C, F, h, w)


def redrawn_batch(pool, pipe, rng, args, latent_frames=2):
    """A decoder batch from the DiT's redrawn clips: `latent_frames`-long windows of buffer-long redrawn latents, the
    true frames they stand for (latent frame j holds video frames t_c j .. t_c j + t_c - 1) and the clips' captions."""
    buffer_frames = pipe.scheduler.config.buffer_frames
    if not 1 <= latent_frames <= buffer_frames:
        raise ValueError(f"latent_frames={latent_frames} must be between 1 and the redrawing pipeline's buffer of "
                         f"{buffer_frames} latent frames")
    clips, starts = pool.windows(rng, args.batch_size, buffer_frames)
    x1, captions = pool.take(rng, clips, starts, buffer_frames)  # (b, C, B, h, w)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    sigma = float(rng.uniform(args.redraw_min_noise, args.redraw_noise))
    redrawn = redraw(pipe, x1, captions, sigma, generator)  # (b, C, B, h, w)
    k = rng.integers(redrawn.shape[2] - latent_frames + 1, size=len(clips))  # a window of each
    latents = torch.stack([z[:, j : j + latent_frames] for z, j in zip(redrawn, k)])  # (b, C, latent_frames, h, w)
    t_c = pool.vae.temporal_compression
    video = torch.stack([true_frames(pool.scenes[c], s + j, latent_frames, t_c, args.side)
                         for c, s, j in zip(clips, starts, k)])  # (b, 3, T, H, W)
    return latents, video.to(latents.device), captions


def true_frames(scene, latent_start, latent_frames, t_c, side):
    """The video (3, latent_frames t_c, side, side) that latent frames latent_start .. of the scene's clip stand for:
    the autoencoder is causal, so latent frame j holds video frames t_c j .. t_c j + t_c - 1."""
    return to_video(render(scene, latent_frames * t_c, side, t_c * latent_start))


@torch.no_grad()
def located(targets, items, vae, device, args):
    """`targets` (StreamTargets or RedrawnTargets) of `items`, their objects located by `vae`'s decoder."""
    vae.eval()
    found = targets(items, lambda z: vae.decode(z.to(device)).float().cpu(), vae.temporal_compression,
                    vae.spatial_compression, args.decoder_latent_frames)
    vae.train()
    return found


STREAM_TARGET_SEED = 40000  # prompts and stream seeds 40000 + i, apart from the evaluation's (1000, 7000, 9000 + i)


@torch.no_grad()
def stream_latents(pipe, prompt, chunks, seed):
    """The latents (C, chunks * c, h, w) of the first `chunks` chunks a stream of `prompt` shows, at the pipeline's
    stored defaults and `seed` as `evaluate` streams it: what its decoder decodes in that stream."""
    state = pipe.prepare_stream(prompt, generator=torch.Generator().manual_seed(seed))
    released = []
    while len(released) < chunks:
        state, latents = pipe.advance(state)  # None until the buffer releases a chunk; warm-up chunks never show
        if latents is not None:
            released.append(latents.cpu())
    return torch.cat(released, 2)[0]


def fitted_scene(prompt, readings, first):
    """The scene the frames `first`, `first` + 1, ... (their detector `readings`) should show: the prompt's object,
    moving at the prompt's velocity from where the frames show it (the circular mean over the frames of each centre
    moved back to frame 0), on the prompt's background. Unstated size and background are what the frames show. None
    where the frames do not follow the prompt's colour or motion: an object missing from more than a quarter of
    them, another colour, or centres more than about 4 px off one straight track."""
    stated = parse_caption(prompt)
    seen = [(first + t, r) for t, r in enumerate(readings) if r.centre is not None]
    if len(seen) < 0.75 * len(readings) or majority(r.colour for _, r in seen) != stated["colour"]:
        return None
    dx, dy = DIRECTIONS[stated["direction"]]
    step = SPEEDS[stated["speed"]]
    x0, x_spread = circular_mean([r.centre[0] - dx * step * t for t, r in seen], SIDE)
    y0, y_spread = circular_mean([r.centre[1] - dy * step * t for t, r in seen], SIDE)
    if max(x_spread, y_spread) > 0.02:  # 1 - the mean resultant length; 0.02 is a spread of about 4 px
        return None
    size = stated.get("size") or majority(r.size for r in readings)
    if stated["shape"] == "triangle":  # the detector's centre is the mask's centroid, d / 6 below a triangle's centre
        y0 -= SIZES[size] / 6
    # the detector counts pixels from their corner, the renderer from their centre
    return Scene(stated["colour"], stated["shape"], size, stated["direction"], stated["speed"],
                 stated.get("background") or majority(r.background for r in readings),
                 (x0 + 0.5) % SIDE, (y0 + 0.5) % SIDE)


def circular_mean(values, period):
    """Mean of positions on a circle of length `period`, and their spread (1 - mean resultant length, 0 = all equal)."""
    angles = np.asarray(values, np.float64) * (2 * math.pi / period)
    s, c = np.sin(angles).mean(), np.cos(angles).mean()
    return math.atan2(s, c) / (2 * math.pi) * period % period, 1.0 - math.hypot(s, c)


class WindowTargets:
    """A DiT's own latents, in windows of `latent_frames`, each with the scene it should decode to (from frame `first`
    of that scene) and its prompt: what the decoder learns from where no true clip stands exactly behind the latents.
    `windows`: (latents (C, latent_frames, h, w), scene, first, prompt) tuples."""

    def __init__(self, temporal_compression, spatial_compression, side=SIDE):
        self.t_c, self.s, self.side, self.windows = temporal_compression, spatial_compression, side, []
        self.candidates = 0  # windows offered, kept or not

    def add(self, latents, frames, prompt, scene_at, latent_frames):
        """Each window of `latents` (C, F, h, w), whose decoded `frames` (T, H, W, 3) are given, with the scene
        `scene_at(first, last)` says its video frames first .. last - 1 should show; None leaves the window out."""
        self.side = frames.shape[1]
        for j in range(latents.shape[1] - latent_frames + 1):
            first = self.t_c * j
            scene = scene_at(first, first + self.t_c * latent_frames)
            self.candidates += 1
            if scene is not None:
                self.windows.append((latents[:, j : j + latent_frames], scene, first, prompt))

    def batch(self, rng, batch_size, crop):
        """-> latents (b, C, latent_frames, crop, crop) around the object (a latent or so off centre, at random), the
        video (b, 3, T, crop s, crop s) they should decode to (the world is a torus, so crops wrap) and the prompts."""
        latents, videos, prompts = [], [], []
        for k in rng.integers(len(self.windows), size=batch_size):
            z, scene, first, prompt = self.windows[k]
            prompts.append(prompt)
            video = to_video(render(scene, z.shape[1] * self.t_c, self.side, first))  # (3, T, H, W)
            cx, cy = scene.centre(first + z.shape[1] * self.t_c // 2, self.side)
            top = int(cy // self.s) - crop // 2 + int(rng.integers(-1, 2))
            left = int(cx // self.s) - crop // 2 + int(rng.integers(-1, 2))
            latents.append(torch.roll(z, (-top, -left), (-2, -1))[..., :crop, :crop])
            video = torch.roll(video, (-top * self.s, -left * self.s), (-2, -1))
            videos.append(video[..., : crop * self.s, : crop * self.s])
        return torch.stack(latents), torch.stack(videos), prompts


class StreamTargets(WindowTargets):
    """The DiT's own stream latents, each window's target the prompt's object where the stream shows it.

    A redraw (`redrawn_batch`) starts from a true clip's latents; a stream starts from noise and settles in its
    buffer, so its latents are the ones a decoder meets in a stream, and no true clip stands behind them. Shapes
    world stands in: the target is the prompt's object drawn by the renderer where the stream's decoded frames show
    it (`fitted_scene`), so the decoder learns to draw the shape the prompt asked for from latents the DiT made for
    it. Windows that do not follow the prompt's colour or motion are left out. `streams`: (prompt, latents (C, F, h,
    w)) pairs; `decode`: the decoder that locates the objects (the one about to be trained).
    """

    def __init__(self, streams, decode, temporal_compression, spatial_compression, latent_frames=2):
        super().__init__(temporal_compression, spatial_compression)
        for prompt, latents in streams:
            frames = to_frames(decode(latents[None])[0])  # (T, H, W, 3)
            readings = [read_frame(f) for f in frames]
            self.add(latents, frames, prompt, lambda first, last: fitted_scene(prompt, readings[first:last], first),
                     latent_frames)


def object_masks(frames, background):
    """Where frames (uint8 (T, H, W, 3)) show an object on the `background` colour: pixels at least half as far from
    it as the frame's farthest (the detector's rule); a frame with nothing 60 levels off has none. -> bool (T, H, W)."""
    distance = np.abs(frames.astype(np.float64) - np.array(BACKGROUNDS[background], np.float64)).sum(-1)
    farthest = distance.max(axis=(1, 2), keepdims=True)  # (T, 1, 1)
    return (distance > 0.5 * farthest) & (farthest >= 60)


def aligned_scene(scene, frames, first):
    """`scene` moved on the torus to where `frames` (uint8 (T, H, W, 3), its frames first, first + 1, ... as a DiT
    redrew them) show its object, and how well the two then agree (the masks' intersection over union). The shift is
    the one that best lines the true object masks up with the drawn ones: the peak of their circular
    cross-correlation, summed over the frames, so one shift for all of them."""
    side = frames.shape[1]
    drawn = object_masks(frames, scene.background)  # (T, H, W)
    true = object_masks(render(scene, len(frames), side, first), scene.background)
    correlation = np.fft.irfft2((np.fft.rfft2(drawn) * np.conj(np.fft.rfft2(true))).sum(0), s=(side, side))
    dy, dx = np.unravel_index(np.argmax(correlation), correlation.shape)  # roll the true masks by this
    moved = np.roll(true, (dy, dx), axis=(1, 2))
    iou = (moved & drawn).sum() / max((moved | drawn).sum(), 1)
    scale = SIDE / side  # Scene positions are in pixels at side 128
    return replace(scene, x=(scene.x + dx * scale) % SIDE, y=(scene.y + dy * scale) % SIDE), float(iou)


class RedrawnTargets(WindowTargets):
    """Latents a DiT redrew from deep noise, each window's target the true clip moved to where the redraw put it.

    A redraw from sigma above about 0.6 moves the object a few pixels, so the true frames stop being the answer
    (`redrawn_batch` stops there); the true clip rolled on the torus to line up with what the redraw shows
    (`aligned_scene`) is, and it keeps the true clip's exact shape, size and motion, where a stream's fitted
    target (`StreamTargets`) only estimates them. `clips`: (caption, scene, redrawn latents (C, F, h, w)) triples;
    windows whose masks agree less than `min_iou` (the redraw lost or split the object) are left out.
    """

    def __init__(self, clips, decode, temporal_compression, spatial_compression, latent_frames=2, min_iou=0.5):
        super().__init__(temporal_compression, spatial_compression)
        for prompt, scene, latents in clips:
            frames = to_frames(decode(latents[None])[0])  # (T, H, W, 3)

            def lined_up(first, last):  # this clip's scene and frames, used at once by add
                moved, iou = aligned_scene(scene, frames[first:last], first)
                return moved if iou >= min_iou else None

            self.add(latents, frames, prompt, lined_up, latent_frames)


def stream_targets(pipe, vae, args, device):
    """`StreamTargets` from --stream-targets streams of --stream-seconds each by `pipe` (kept in
    <output-dir>/stream-latents.pt, so a resumed run does not stream them again), located by `vae`'s decoder."""
    chunk_size = pipe.scheduler.config.chunk_size
    chunks = math.ceil(args.stream_seconds * FPS / (chunk_size * vae.temporal_compression))
    prompts = random_prompts(args.stream_targets, STREAM_TARGET_SEED)
    path = Path(args.output_dir) / "stream-latents.pt"
    saved = torch.load(path) if path.exists() else {"prompts": [], "latents": []}
    done = len(saved["prompts"])
    if saved["prompts"] != prompts[:done] or any(z.shape[1] < chunks * chunk_size for z in saved["latents"]):
        saved, done = {"prompts": [], "latents": []}, 0  # made for other prompts or shorter streams
    for i in tqdm(range(done, len(prompts)), desc="streams", initial=done, total=len(prompts)):
        saved["latents"].append(stream_latents(pipe, prompts[i], chunks, STREAM_TARGET_SEED + i))
        saved["prompts"].append(prompts[i])
        if (i + 1) % 10 == 0 or i + 1 == len(prompts):  # a resumed run streams at most ten again
            torch.save(saved, path)
    streams = [(p, z[:, : chunks * chunk_size]) for p, z in zip(prompts, saved["latents"])]
    targets = located(StreamTargets, streams, vae, device, args)
    if not targets.windows:
        raise ValueError(f"--stream-targets {args.stream_targets}: no window of {targets.candidates} in the streams "
                         f"of {args.redraw_with} shows its prompt's object moving as asked; a DiT must draw the "
                         f"object before its decoder can learn to draw it better")
    print(f"stream targets: {len(targets.windows)} of {targets.candidates} windows follow their prompt")
    return targets


REDRAW_TARGET_SEED = 60000  # clips of batch i drawn with rng 60000 + i


@torch.no_grad()
def redrawn_targets(pipe, vae, args, device, batch_size=4):
    """`RedrawnTargets` from --redraw-targets fresh clips, buffer-long, each batch of them redrawn by `pipe` from one
    sigma ~ U[--redraw-min-noise, --redraw-noise] (kept in <output-dir>/redrawn-latents.pt, so a resumed run does
    not redraw them again; redraws from another noise range or side are made again), located by `vae`'s decoder."""
    frames = pipe.scheduler.config.buffer_frames * vae.temporal_compression
    path = Path(args.output_dir) / "redrawn-latents.pt"
    made = {"noise": [args.redraw_min_noise, args.redraw_noise], "side": args.side}
    saved = torch.load(path) if path.exists() else {}
    if {k: saved.get(k) for k in made} != made:  # none yet, or redrawn from other noise or at another side
        saved = {**made, "captions": [], "scenes": [], "latents": []}
    batches = math.ceil(args.redraw_targets / batch_size)
    for i in tqdm(range(len(saved["latents"]), batches), desc="redraws", initial=len(saved["latents"]), total=batches):
        rng = np.random.default_rng(REDRAW_TARGET_SEED + i)
        videos, captions, scenes = sample_batch(rng, batch_size, frames, args.side)
        sigma = float(rng.uniform(args.redraw_min_noise, args.redraw_noise))
        generator = torch.Generator().manual_seed(REDRAW_TARGET_SEED + i)
        redrawn = redraw(pipe, vae.encode(videos.to(device)), captions, sigma, generator)  # (b, C, B, h, w)
        saved["latents"].append(redrawn.cpu())
        saved["captions"] += captions
        saved["scenes"] += [asdict(scene) for scene in scenes]
        if (i + 1) % 10 == 0 or i + 1 == batches:  # a resumed run redraws at most ten batches again
            torch.save(saved, path)
    latents = torch.cat(saved["latents"])[: args.redraw_targets]
    clips = [(c, Scene(**scene), z) for c, scene, z in zip(saved["captions"], saved["scenes"], latents)]
    targets = located(RedrawnTargets, clips, vae, device, args)
    if not targets.windows:
        raise ValueError(f"--redraw-targets {args.redraw_targets}: no window of {targets.candidates} in the redraws of "
                         f"{args.redraw_with} shows its clip's object; a DiT must draw the object before its decoder "
                         f"can learn to draw it better")
    print(f"redraw targets: {len(targets.windows)} of {targets.candidates} windows line up with their clips")
    return targets


def dit_loss(models, batch, args, state):
    """Eq. 5 with a mixed partition: X_tau per frame, target V = X1 - (1 - sigma_min) X0; with --decoded-weight, plus
    that times the decoded loss (decoded_loss), for which `models` ends with the autoencoder."""
    transformer, text_encoder, tokenizer, scheduler = models[:4]
    x1, captions = batch[:2]  # (b, C, F, H, W) latents of unit variance; then scenes and window starts
    captions = ["" if state.rng.random() < args.caption_dropout else c for c in captions]
    partitions = scheduler.training_partitions()
    partition = partitions[state.rng.integers(len(partitions))]
    generator = torch.Generator().manual_seed(int(state.rng.integers(2**62)))
    tau = scheduler.sample_tau(partition, x1.shape[0], generator).to(x1.device)  # (b, F)
    noise = torch.randn(x1.shape, generator=generator).to(x1.device)
    ids, mask = tokenize(tokenizer, captions)
    text = text_encoder(ids.to(x1.device), mask.to(x1.device))
    x = scheduler.add_noise(x1, noise, tau)  # (b, C, F, H, W)
    velocity = transformer(x, tau, text, mask.to(x1.device)).sample
    loss = flow_matching_loss(velocity.float(), scheduler.velocity(x1, noise), x1, args.object_weight)
    if not args.decoded_weight:
        return loss
    clean = scheduler.clean_estimate(x, velocity, tau)  # (b, C, F, H, W): where this velocity points
    return loss + args.decoded_weight * decoded_loss(models[4], clean, tau, *batch[2:], args)


def decoded_loss(vae, clean, tau, scenes, starts, args, window=2):
    """The DiT's clean estimate, decoded by the frozen decoder, against the true frames (reconstruction_loss: L1 +
    MSE, object pixels weighted up, plus --edge-weight times the edge loss), in the manner of latent perceptual losses.
    Eq. 5's latent error weighs every latent alike; this one weighs what the decoder makes of them, which is where a
    square's soft corners cost something. Only nearly clean estimates count: for each sample the `window` adjacent
    frames with the highest lower tau, if that is at least --decoded-min-tau (a noisy frame's estimate is a blurred
    average by necessity), for at most --decoded-samples samples. The decoder sees a --decoded-crop latents square
    crop around the object (it is convolutional, and trained on crops), and the true frames are rendered for it.

    clean, tau: (b, C, F, h, w), (b, F); scenes: b Scenes; starts: (b,) the latent frame each sample's buffer starts
    at in its clip (whose video starts at the scene's frame 0)."""
    t_c, s, crop = vae.temporal_compression, vae.spatial_compression, args.decoded_crop
    level, k = tau.unfold(1, window, 1).amin(-1).max(1)  # (b,) each: the best window's lower tau and its first frame
    rows = (level >= args.decoded_min_tau).nonzero().flatten()[: args.decoded_samples].tolist()
    if not rows:
        return clean.sum() * 0.0  # keeps the graph, so every process of a DDP run backpropagates alike
    latents, videos = [], []
    for i in rows:
        first = int(starts[i]) + int(k[i])  # the window's first latent frame in its clip
        cx, cy = scenes[i].centre(t_c * first + window * t_c // 2, args.side)  # the object mid-window
        top, left = int(cy // s) - crop // 2, int(cx // s) - crop // 2  # the world is a torus: crops wrap
        z = clean[i, :, int(k[i]) : int(k[i]) + window]  # (C, window, h, w)
        latents.append(torch.roll(z, (-top, -left), dims=(-2, -1))[..., :crop, :crop])
        video = true_frames(scenes[i], first, window, t_c, args.side)  # (3, window t_c, H, W)
        videos.append(torch.roll(video, (-top * s, -left * s), dims=(-2, -1))[..., : crop * s, : crop * s])
    recon = vae.decode(torch.stack(latents))  # (n, 3, window t_c, crop s, crop s)
    return reconstruction_loss(recon, torch.stack(videos).to(recon.device), args.edge_weight)


def flow_matching_loss(velocity, target, x1, object_weight=0.0):
    """Mean squared velocity error, with latents near the object weighted up by `object_weight` (0: plain Eq. 5)."""
    error = (velocity - target).square()  # (b, C, F, h, w)
    if object_weight == 0:
        return error.mean()
    w = latent_object_weights(x1, object_weight)
    return (error * w).mean() / w.mean()  # weights of mean 1: the loss keeps its scale, so the lr keeps its meaning


class LatentPool:
    """Encoded shapes-world clips kept in memory and refreshed a few per step.

    Encoding a clip costs about as much as a DiT training step on it, so each encoded clip serves several samples:
    different buffer-long windows of it, with captions that leave out different optional words. The pool is not
    checkpointed; a resumed run refills it.
    """

    def __init__(self, vae, size, clip_frames, side, shape_weights=None):
        self.vae, self.size, self.clip_frames, self.side = vae, size, clip_frames, side
        self.shape_weights = shape_weights  # None: shapes drawn uniformly, as the spec's world has them
        self.latents, self.scenes = None, []  # (size, C, F_clip, h, w) on the vae's device; one Scene per clip
        self.owed = 0.0  # fractional refresh rates add up here until a whole clip is due

    @torch.no_grad()
    def encode(self, rng, count):
        videos, _, scenes = sample_batch(rng, count, self.clip_frames, self.side, shape_weights=self.shape_weights)
        return self.vae.encode(videos.to(self.vae.device)), scenes

    def refresh(self, rng, count):
        if self.latents is None:  # fill it a few clips at a time: full-resolution activations are large
            parts = [self.encode(rng, min(4, self.size - i)) for i in range(0, self.size, 4)]
            self.latents = torch.cat([p[0] for p in parts])
            self.scenes = [s for p in parts for s in p[1]]
            return
        self.owed += count
        count, self.owed = int(self.owed), self.owed - int(self.owed)
        if count == 0:
            return
        fresh, scenes = self.encode(rng, count)
        for slot, latents, scene in zip(rng.choice(self.size, count, replace=False), fresh, scenes):
            self.latents[slot], self.scenes[slot] = latents, scene

    def windows(self, rng, batch_size, frames):
        """-> (batch_size,) random clips and (batch_size,) random starts of `frames`-long windows in them."""
        clips = rng.integers(self.size, size=batch_size)
        return clips, rng.integers(self.latents.shape[2] - frames + 1, size=batch_size)

    def take(self, rng, clips, starts, frames):
        """-> latents (b, C, frames, h, w) of the given windows, and captions of their clips."""
        latents = torch.stack([self.latents[c, :, s : s + frames] for c, s in zip(clips, starts)])
        return latents, [caption(self.scenes[c], rng) for c in clips]

    def sample(self, rng, batch_size, frames):
        """-> latents (b, C, frames, h, w) and captions, from random clips and random windows in them."""
        return self.take(rng, *self.windows(rng, batch_size, frames), frames)


def latest_checkpoint(folder: Path, stage: str):
    found = sorted(folder.glob(f"{stage}-*"), key=lambda p: int(p.name.split("-")[-1]))
    return found[-1] if found else None


def plot_loss(csv_path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(csv_path.open()))
    if not rows:
        return
    steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
    smooth = np.convolve(losses, np.ones(min(20, len(losses))) / min(20, len(losses)), mode="valid")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, alpha=0.3, label="loss")
    ax.plot(steps[len(steps) - len(smooth) :], smooth, label="moving average")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=csv_path.stem)
    ax.legend()
    fig.tight_layout()
    fig.savefig(csv_path.with_suffix(".png"), dpi=100)
    plt.close(fig)


def run_stage(stage, args, accelerator, trainable, loss_fn, make_batch, steps, lr):
    """The shared loop: AdamW with warm-up, EMA, gradient clipping, checkpoints every --checkpoint-every steps.

    Only parameters that require grad are trained (and averaged): a frozen part of a module stays as it was. A module
    frozen whole is only moved to the device, not prepared: DDP refuses to wrap a module with nothing to train.
    """
    out = Path(args.output_dir)
    params = [p for m in trainable for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps, args))
    learns = [any(p.requires_grad for p in m.parameters()) for m in trainable]
    prepared = iter(accelerator.prepare(*[m for m, yes in zip(trainable, learns) if yes], optimizer, lr_schedule))
    trainable = [next(prepared) if yes else m.to(accelerator.device) for m, yes in zip(trainable, learns)]
    optimizer, lr_schedule = prepared
    ema = EMAModel(params, decay=args.ema_decay, use_ema_warmup=True, power=3 / 4)
    state = TrainState(args.seed + accelerator.process_index)
    accelerator.register_for_checkpointing(ema, state)
    checkpoint = latest_checkpoint(out / "checkpoints", stage)
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        lr_schedule.scheduler.base_lrs = [lr] * len(optimizer.param_groups)  # the command line's lr, not the saved one
        for group in optimizer.param_groups:
            group["lr"] = lr * lr_factor(state.step, steps, args)
        accelerator.print(f"resumed {stage} from {checkpoint} at step {state.step}")
    csv_path = out / f"{stage}-loss.csv"
    if accelerator.is_main_process:
        start_log(csv_path, state.step)
    progress = tqdm(total=steps, initial=state.step, desc=stage, disable=not accelerator.is_main_process)
    start = time.time()
    while state.step < steps:
        loss = loss_fn(trainable, make_batch(state), state)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        state.step += 1
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.4f}")
        if accelerator.is_main_process and (state.step % args.log_every == 0 or state.step == steps):
            with csv_path.open("a") as f:
                f.write(f"{state.step},{loss.item():.6f},{lr_schedule.get_last_lr()[0]:.3g},{time.time() - start:.1f}\n")
        if state.step % args.checkpoint_every == 0 or state.step == steps:
            save_checkpoint(accelerator, out, stage, state.step, args.keep_checkpoints)
            if accelerator.is_main_process:
                plot_loss(csv_path)
    progress.close()
    ema.copy_to(params)  # ship the EMA weights
    return [accelerator.unwrap_model(m) for m in trainable]


def start_log(csv_path, step):
    """A fresh loss log, or the old one cut back to `step`: rows an interrupted run wrote after its last checkpoint
    would otherwise appear twice once the resumed run trains those steps again."""
    rows = list(csv.reader(csv_path.open())) if csv_path.exists() else []
    kept = [row for row in rows[1:] if int(row[0]) <= step]
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([["step", "loss", "lr", "seconds"], *kept])


def lr_factor(step, steps, args):
    """Warm-up, constant, then a linear decay to 0 over the last --decay-steps (warmup-stable-decay).

    The decay depends only on the step and --steps, so a run can go on at the constant rate and be given its decay
    later by resuming with a larger --steps and --decay-steps."""
    decay = (steps - step) / args.decay_steps if args.decay_steps else 1.0
    return max(0.0, min(1.0, (step + 1) / args.warmup_steps, decay))


def save_checkpoint(accelerator, out, stage, step, keep):
    accelerator.save_state(out / "checkpoints" / f"{stage}-{step}")
    if accelerator.is_main_process:
        found = sorted((out / "checkpoints").glob(f"{stage}-*"), key=lambda p: int(p.name.split("-")[-1]))
        for old in found[:-keep]:
            shutil.rmtree(old)


@torch.no_grad()
def normalise_latents(vae, args, device):
    """Sets shift and scaling so the latents the DiT sees have zero mean and unit variance (as diffusers' VAEs do)."""
    videos = sample_batch(np.random.default_rng(args.seed + 1), 32, 16, args.side)[0].to(device)
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)
    z = vae.encode(videos)
    vae.register_to_config(shift_factor=z.mean().item(), scaling_factor=1.0 / z.std().item())


@torch.no_grad()
def reconstruction_psnr(vae, device, side=128, clips=32, seed=12345):
    """PSNR (dB) of the autoencoder on fresh shapes-world clips, pixels in [0, 255]."""
    videos = sample_batch(np.random.default_rng(seed), clips, 16, side)[0].to(device)
    recon = vae(videos).clamp(-1, 1)
    mse = ((recon - videos) * 127.5).square().mean().item()
    return 10 * math.log10(255**2 / mse)


def fit_autoencoder(args, vae, stage, steps, normalise, redraw_pipe=None):
    """Reconstruction training of the autoencoder's trainable parameters, then <output-dir>/vae and its PSNR. With
    `redraw_pipe`, the decoder learns to draw the true frames from that DiT's redrawn latents (`redrawn_batch`), or
    with --stream-targets the prompt's object from that DiT's stream latents (`StreamTargets`)."""
    accelerator = Accelerator(mixed_precision=args.mixed_precision)  # one per stage: a checkpoint holds its models
    out = Path(args.output_dir)

    if redraw_pipe is None:
        def make_batch(state):
            videos, captions, scenes = sample_batch(state.rng, args.batch_size, args.vae_frames, args.side)
            return videos.to(accelerator.device), captions, scenes

        def reconstruct(trainable, batch, state):
            return reconstruct_crops(trainable[0], batch, args, state.rng)
    else:  # the DiT's latents, redrawn or streamed, each with the frames they should decode to
        redraw_pipe.to(accelerator.device)
        targets, crop = None, args.vae_crop // vae.spatial_compression
        if args.stream_targets:
            targets = stream_targets(redraw_pipe, vae.to(accelerator.device), args, accelerator.device)
        elif args.redraw_targets:
            targets = redrawn_targets(redraw_pipe, vae.to(accelerator.device), args, accelerator.device)
        if targets is None or args.redrawn_share:
            pool = LatentPool(vae.to(accelerator.device), args.pool_size,
                              args.pool_clip_frames * vae.temporal_compression, args.side)

        def make_batch(state):
            # with --stream-targets or --redraw-targets, a --redrawn-share of the steps still redraws as
            # `redrawn_batch` does: true frames anchor what those targets only approximate
            if targets is not None and state.rng.random() >= args.redrawn_share:
                latents, video, prompts = targets.batch(state.rng, args.batch_size, crop)
                return latents.to(accelerator.device), video.to(accelerator.device), prompts
            pool.refresh(state.rng, args.pool_refresh)
            return redrawn_batch(pool, redraw_pipe, state.rng, args, args.decoder_latent_frames)

        def reconstruct(trainable, batch, state):
            latents, video, prompts = batch
            text = None
            if vae.config.decoder_text_channels is not None:  # the decoder reads the prompt (--decoder-text)
                text = redraw_pipe.pooled_prompt(prompts, latents.device)  # (b, E)
            return trainable[0](latents=latents, text=text), video

    def loss(trainable, batch, state):
        recon, video = reconstruct(trainable, batch, state)
        total = reconstruction_loss(recon, video, args.edge_weight)
        if args.adversarial_weight:
            d_loss, g_loss = adversarial_loss(trainable[1], recon, video)
            total = total + d_loss + args.adversarial_weight * g_loss
        return total

    models = [vae, PatchDiscriminator()] if args.adversarial_weight else [vae]
    vae = run_stage(stage, args, accelerator, models, loss, make_batch, steps, args.vae_lr)[0]
    if accelerator.is_main_process:
        vae.eval()
        if normalise:
            normalise_latents(vae, args, accelerator.device)
        psnr = reconstruction_psnr(vae, accelerator.device, args.side)
        vae.save_pretrained(out / "vae")
        (out / "vae-psnr.txt").write_text(f"{psnr:.2f}\n")
        accelerator.print(f"autoencoder PSNR {psnr:.2f} dB after the {stage} stage")
    accelerator.wait_for_everyone()


def train_vae(args):
    """A new autoencoder, or with --vae-init one trained further, encoder and decoder together (its latents then
    move, so a DiT must be trained or fine-tuned on them afterwards). --decoder-untied-frames unties a saved one's."""
    vae = new_vae(args) if args.vae_init is None else StreamDiTAutoencoder.from_pretrained(args.vae_init)
    if args.decoder_untied_frames and not vae.config.decoder_untied_frames:
        untied = StreamDiTAutoencoder(**{**vae.config, "decoder_untied_frames": True})
        load_inflated(untied, untie_frames(untied, vae.state_dict()))
        vae = untied
    fit_autoencoder(args, vae, "vae", args.vae_steps, normalise=True)


def train_decoder(args):
    """Fine-tunes only the decoder: sharper frames from the same latents, so a DiT trained on them stays valid.
    The latent normalisation is kept. With --decoder-channels or --decoder-layers unlike the saved decoder's, a new
    (wider or deeper) decoder is trained from scratch behind the saved encoder; with only a longer
    --decoder-latent-temporal-kernel or --decoder-untied-frames, the saved decoder is trained on with its grown or
    untied kernels (`load_inflated`, `untie_frames`): it starts out drawing what it drew."""
    vae = StreamDiTAutoencoder.from_pretrained(Path(args.output_dir) / "vae")
    cfg = vae.config
    saved = {"decoder_block_out_channels": tuple(cfg.decoder_block_out_channels or cfg.block_out_channels),
             "decoder_layers_per_block": cfg.decoder_layers_per_block or cfg.layers_per_block,
             "decoder_latent_temporal_kernel_size": cfg.decoder_latent_temporal_kernel_size or cfg.temporal_kernel_size,
             "decoder_untied_frames": cfg.decoder_untied_frames,
             "decoder_text_channels": cfg.get("decoder_text_channels")}
    redraw_pipe = redraw_pipeline(args, vae)
    if args.decoder_text and redraw_pipe is None:
        raise ValueError("--decoder-text needs --redraw-with: the decoder learns to read that pipeline's prompts on "
                         "its own redrawn or streamed latents")
    asked = {"decoder_block_out_channels": args.decoder_channels and tuple(args.decoder_channels),
             "decoder_layers_per_block": args.decoder_layers,
             "decoder_latent_temporal_kernel_size": args.decoder_latent_temporal_kernel,
             "decoder_untied_frames": args.decoder_untied_frames or None,
             "decoder_text_channels": redraw_pipe.text_encoder.config.hidden_size if args.decoder_text else None}
    wanted = {k: saved[k] if asked[k] is None else asked[k] for k in saved}
    same_stages = all(wanted[k] == saved[k] for k in ("decoder_block_out_channels", "decoder_layers_per_block"))
    if wanted != saved:
        rebuilt = StreamDiTAutoencoder(**{**vae.config, **wanted})
        if same_stages:  # the same decoder, kernels grown or untied or reading the prompt: it starts as the saved one
            load_inflated(rebuilt, untie_frames(rebuilt, vae.state_dict()))
        else:
            rebuilt.encoder.load_state_dict(vae.encoder.state_dict())  # a new decoder, from scratch
        vae = rebuilt
    vae.encoder.requires_grad_(False)
    fit_autoencoder(args, vae, "decoder", args.decoder_steps, normalise=False, redraw_pipe=redraw_pipe)


def untie_frames(module, state):
    """`state` with each tied temporal upsampling's conv, where `module` unties the new frames' kernels, in the untied
    form that computes the same (`Upsample.untie`)."""
    state = dict(state)
    for name, layer in module.named_modules():
        tied = f"{name}.conv.conv.weight"
        if isinstance(layer, Upsample) and layer.untied_frames and tied in state:
            weight, bias = Upsample.untie(state.pop(tied), state.pop(f"{name}.conv.conv.bias"))
            state[f"{name}.frame_weight"], state[f"{name}.frame_bias"] = weight, bias
    return state


def load_inflated(module, state):
    """Loads `state` into `module` where some convs have grown a longer temporal kernel: a grown kernel gets the
    saved one at its last tap (the current frame, as the causal padding is on the left) and zeros before it, so the
    module starts out computing exactly what the saved one did and learns from there what earlier frames add."""
    own = module.state_dict()
    for name, value in state.items():
        target = own[name]
        if value.shape != target.shape:
            if value.ndim != 5 or value.shape[2] > target.shape[2] or value.shape[:2] + value.shape[3:] != \
                    target.shape[:2] + target.shape[3:]:
                raise ValueError(f"{name}: saved shape {tuple(value.shape)} cannot grow into {tuple(target.shape)}")
            grown = torch.zeros_like(target)
            grown[:, :, -value.shape[2]:] = value
            value = grown
        own[name] = value
    module.load_state_dict(own)


def redraw_pipeline(args, vae):
    """The pipeline of --redraw-with, whose DiT redraws the decoder's training latents; None without the flag. Its
    DiT must have been trained on this encoder's latents."""
    if args.redraw_with is None:
        return None
    pipe = StreamDiTPipeline.from_pretrained(args.redraw_with)
    theirs, ours = pipe.vae.encoder.state_dict(), vae.encoder.state_dict()
    if theirs.keys() != ours.keys() or not all(torch.equal(theirs[k], ours[k]) for k in ours):
        raise ValueError(f"--redraw-with {args.redraw_with}: its autoencoder's encoder is not the one in "
                         f"{args.output_dir}/vae, so its DiT draws other latents")
    return pipe  # only its DiT and text side redraw; the decoder trained is the one in --output-dir


def new_dit(args, vae):
    """The transformer and text side a DiT run starts from: the preset, or with --dit-init a saved pipeline's weights
    (its architecture too), e.g. to go on from a shipped model whose resume checkpoints are gone. A run that finds a
    checkpoint in --output-dir resumes from that instead."""
    overrides = {} if args.window_size is None else {"window_size": tuple(args.window_size)}
    if args.refiner_channels is not None:
        overrides["refiner_channels"] = args.refiner_channels
    tokenizer = build_tokenizer(VOCABULARY, max_length=32)
    if args.dit_init is not None:
        init = Path(args.dit_init)
        saved = StreamDiTTransformer3DModel.load_config(init / "transformer").get("refiner_channels", 0)
        added = args.refiner_channels is not None and args.refiner_channels != saved
        transformer = StreamDiTTransformer3DModel.from_pretrained(init / "transformer", low_cpu_mem_usage=not added,
                                                                  **overrides)
        if added and args.refiner_channels:
            transformer.refiner.reset_parameters()  # not in the saved weights: the loader left it uninitialised
        text_encoder = StreamDiTTextEncoder.from_pretrained(init / "text_encoder")
        if args.patch_size is not None and not args.new_latent_space:
            raise ValueError(f"--patch-size {args.patch_size} renews the DiT's latent layers: add --new-latent-space")
        if args.new_latent_space:
            transformer = with_new_latent_layers(transformer, vae.config.latent_channels, args.patch_size)
        elif transformer.config.in_channels != vae.config.latent_channels:
            raise ValueError(f"--dit-init {init} takes {transformer.config.in_channels} latent channels; the "
                             f"autoencoder in {args.output_dir} makes {vae.config.latent_channels} (a new latent "
                             f"space: add --new-latent-space)")
        return transformer, tokenizer, text_encoder
    # the saved autoencoder, not --latent-channels, says what the DiT sees: the flag only shapes a new autoencoder
    if args.patch_size is not None:
        overrides["patch_size"] = args.patch_size
    transformer = from_preset(args.preset, in_channels=vae.config.latent_channels,
                              prediction_type=args.prediction_type,
                              sample_size=(args.buffer_frames, args.side // vae.spatial_compression,
                                           args.side // vae.spatial_compression), **overrides)
    text_encoder = new_text_encoder(tokenizer, transformer.config.text_dim)
    return transformer, tokenizer, text_encoder


def with_new_latent_layers(transformer, latent_channels, patch_size=None):
    """The same DiT for another autoencoder's latents, or cut into other patches: its blocks, timestep and text
    layers kept (what it learned about captions, motion and the buffer), the layers that touch latents new: the patch
    embedding, the final layer's projection (zero, so it starts out predicting zero velocity, as a new DiT does) and
    any refiner. A smaller patch_size gives more tokens per frame, the DiT paper's way to more quality for the same
    weights: a 4x4-latent token draws a whole small square's corners from one vector."""
    renewed = ("x_embedder.", "final_layer.linear.", "refiner.")
    patch_size = patch_size or transformer.config.patch_size
    new = StreamDiTTransformer3DModel.from_config(transformer.config, in_channels=latent_channels, out_channels=None,
                                                  patch_size=patch_size)
    kept = {name: value for name, value in transformer.state_dict().items() if not name.startswith(renewed)}
    missing, unexpected = new.load_state_dict(kept, strict=False)
    assert not unexpected and all(n.startswith(renewed) for n in missing)
    return new


def train_dit(args):
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    out = Path(args.output_dir)
    vae = StreamDiTAutoencoder.from_pretrained(out / "vae").to(accelerator.device).eval().requires_grad_(False)
    scheduler = StreamDiTScheduler(buffer_frames=args.buffer_frames, chunk_size=args.chunk_size,
                                   micro_steps=args.micro_steps, shift=args.shift)
    transformer, tokenizer, text_encoder = new_dit(args, vae)
    latent_side = args.side // vae.spatial_compression
    if args.decoded_weight and not 0 < args.decoded_crop <= latent_side:
        raise ValueError(f"--decoded-crop {args.decoded_crop} must lie in [1, {latent_side}], the latents' side")
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if args.compile:
        transformer.compile()  # in place: its state dict, checkpoints and saved weights keep their names
    if args.train_refiner_only:
        if not transformer.config.refiner_channels:
            raise ValueError("--train-refiner-only needs a refiner: give --refiner-channels or a --dit-init with one")
        transformer.requires_grad_(False).refiner.requires_grad_(True)
        text_encoder.requires_grad_(False)

    def loss(trainable, batch, state):
        return dit_loss((trainable[0], trainable[1], tokenizer, scheduler, vae), batch, args, state)

    pool = LatentPool(vae, args.pool_size, args.pool_clip_frames * vae.temporal_compression, args.side,
                      args.shape_weights)

    def make_batch(state):
        pool.refresh(state.rng, args.pool_refresh)
        clips, starts = pool.windows(state.rng, args.batch_size, args.buffer_frames)
        x1, captions = pool.take(state.rng, clips, starts, args.buffer_frames)
        return x1, captions, [pool.scenes[c] for c in clips], starts

    transformer, text_encoder = run_stage("dit", args, accelerator, [transformer, text_encoder], loss, make_batch,
                                          args.steps, args.lr)
    if accelerator.is_main_process:
        if args.stream_shift is not None:
            scheduler = StreamDiTScheduler.from_config(scheduler.config, shift=args.stream_shift)
        pipe = StreamDiTPipeline(transformer.eval(), scheduler, vae, text_encoder.eval(), tokenizer,
                                 guidance_scale=args.guidance_scale, switch_strength=args.switch_strength,
                                 warmup_chunks=args.warmup_chunks)
        pipe.save_pretrained(out / "pipeline")
        accelerator.print(f"saved the pipeline to {out / 'pipeline'}")


def add_loop_arguments(p, output_dir="runs/shapes", batch_size=16, warmup_steps=200, pool_size=512, pool_refresh=3):
    """Options of the shared training loop (run_stage), for train and distill alike."""
    p.add_argument("--output-dir", default=output_dir)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", type=int, default=128, help="frame size; shapes world scales sizes and speeds with it")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=warmup_steps)
    p.add_argument("--decay-steps", type=int, default=0, help="linear decay of the lr to 0 over the last N steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--mixed-precision", default="no", help="bf16 on GPUs; never on CPU (bf16 is ~300x slower here)")
    p.add_argument("--pool-size", type=int, default=pool_size, help="encoded clips kept in memory")
    p.add_argument("--pool-clip-frames", type=int, default=16, help="latent frames per pooled clip")
    p.add_argument("--pool-refresh", type=float, default=pool_refresh,
                   help="pooled clips replaced by fresh ones a step (0.25: one every 4 steps)")
    p.add_argument("--export-only", action="store_true",
                   help="write the pipeline from the newest checkpoint's EMA weights without training")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m streamdit.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["vae", "decoder", "dit", "all"], default="all",
                   help="all = vae then dit; decoder = fine-tune the trained autoencoder's decoder only")
    add_loop_arguments(p)
    # autoencoder
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-frames", type=int, default=8)
    p.add_argument("--vae-crop", type=int, default=64)
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 16, 32, 64])
    p.add_argument("--latent-channels", type=int, default=8, help="of a new autoencoder (the DiT takes the saved one's)")
    p.add_argument("--vae-init", default=None, help="an autoencoder folder to train further instead of a new one")
    p.add_argument("--latent-noise", type=float, default=0.0,
                   help="decoder input noise, up to this fraction of the latents' spread (robust decoding)")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight of an L1 loss on pixel differences (sharp edges) in the autoencoder's loss")
    p.add_argument("--adversarial-weight", type=float, default=0.0,
                   help="weight of a patch discriminator's hinge loss on the decoder's frames (0: none); the "
                        "discriminator trains alongside, in the same checkpoints")
    p.add_argument("--decoder-steps", type=int, default=1000)
    p.add_argument("--redraw-with", default=None,
                   help="a pipeline whose DiT redraws the decoder's training latents (SDEdit from --redraw-noise): the "
                        "decoder learns to draw the true frames from that DiT's latents, its errors included")
    p.add_argument("--redraw-noise", type=float, default=0.5,
                   help="redrawn latents start from noise level sigma ~ U[--redraw-min-noise, this] (1 = pure noise)")
    p.add_argument("--stream-targets", type=int, default=0,
                   help="with --redraw-with: train the decoder on that pipeline's own streams of this many prompts "
                        "instead (its stored defaults), each window's target the prompt's object where the stream "
                        "shows it (StreamTargets); the streams are kept in <output-dir>/stream-latents.pt")
    p.add_argument("--stream-seconds", type=float, default=6.0, help="of each --stream-targets stream")
    p.add_argument("--redraw-targets", type=int, default=0,
                   help="with --redraw-with: train the decoder on this many clips that pipeline redraws once, from "
                        "--redraw-min-noise to --redraw-noise, each window's target the true clip moved to where the "
                        "redraw put it (RedrawnTargets); kept in <output-dir>/redrawn-latents.pt")
    p.add_argument("--redraw-min-noise", type=float, default=0.0, help="redraws start from sigma at least this")
    p.add_argument("--decoder-channels", type=int, nargs="+", default=None,
                   help="decoder stage widths, full resolution first (default: the saved decoder's; a new "
                        "autoencoder's mirror its encoder's)")
    p.add_argument("--decoder-layers", type=int, default=None,
                   help="ResBlocks per decoder stage (default: saved; a new autoencoder's: its encoder's)")
    p.add_argument("--decoder-latent-temporal-kernel", type=int, default=None,
                   help="temporal kernel of the decoder's layers at the latents' resolution (default: saved); a "
                        "longer one than saved starts from the saved decoder, its earlier taps zero")
    p.add_argument("--decoder-untied-frames", action="store_true",
                   help="give each video frame a temporal upsampling makes its own kernel (untied from its pair's); "
                        "the saved decoder's tied kernels become the untied ones that draw the same")
    p.add_argument("--redrawn-share", type=float, default=0.0,
                   help="with --stream-targets or --redraw-targets: the share of steps that train on redrawn_batch's "
                        "latents instead (0 to 1)")
    p.add_argument("--decoder-text", action="store_true",
                   help="with --redraw-with: the decoder also reads the prompt (pooled states of that pipeline's text "
                        "encoder, modulating its features), so where the DiT's latents leave the shape open it can "
                        "draw the one asked for; it starts as the saved decoder")
    p.add_argument("--decoder-latent-frames", type=int, default=2,
                   help="latent frames of each redrawn clip the decoder learns to draw (with --redraw-with)")
    # DiT
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--preset", default="small")
    p.add_argument("--window-size", type=int, nargs=3, default=None, metavar=("FRAMES", "HEIGHT", "WIDTH"),
                   help="attention window in tokens (default: the preset's); weights do not depend on it, so a run "
                        "can resume with another window")
    p.add_argument("--dit-init", default=None,
                   help="a pipeline folder whose transformer and text encoder a new run starts from (not a resume)")
    p.add_argument("--new-latent-space", action="store_true",
                   help="with --dit-init: the autoencoder here is not the one that DiT learned; keep its blocks and "
                        "text side, start its patch embedding and final projection afresh for these latents")
    p.add_argument("--patch-size", type=int, default=None,
                   help="the DiT's spatial patch in latents (default: the preset's); with --dit-init it needs "
                        "--new-latent-space: the saved DiT's blocks kept, its token layers new")
    p.add_argument("--refiner-channels", type=int, default=None,
                   help="add a LatentRefiner of this width after the DiT's final layer (default: --dit-init's, else "
                        "none); a new refiner starts as the identity")
    p.add_argument("--train-refiner-only", action="store_true",
                   help="train only the refiner, the DiT and text encoder frozen (their weights stay exactly as they are)")
    p.add_argument("--prediction-type", choices=["velocity", "sample"], default="velocity",
                   help="what the DiT's last layer predicts (its forward returns a velocity either way)")
    p.add_argument("--buffer-frames", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=2)
    p.add_argument("--micro-steps", type=int, default=4)
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift of the training taus (Eq. 8 through it)")
    p.add_argument("--stream-shift", type=float, default=None,
                   help="timestep shift of the exported pipeline's streams (default: --shift); like --guidance-scale "
                        "a sampling default, chosen by evaluation")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--switch-strength", type=float, default=0.0,
                   help="the exported pipeline's prompt switch strength (0: the paper's switch), a stream default too")
    p.add_argument("--warmup-chunks", type=int, default=0,
                   help="the exported pipeline's warm-up: chunks a stream makes and drops after its start-up")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="weight the flow-matching loss up by this much on latents near the object (0: plain Eq. 5)")
    p.add_argument("--shape-weights", type=float, nargs=3, default=None, metavar=("CIRCLE", "SQUARE", "TRIANGLE"),
                   help="draw the DiT's training shapes unevenly (default uniform), e.g. 1 2 1 to dwell on squares")
    p.add_argument("--decoded-weight", type=float, default=0.0,
                   help="add this times a pixel loss on the decoded clean estimate of nearly clean frames (0: none)")
    p.add_argument("--decoded-min-tau", type=float, default=0.5, help="the lowest tau the decoded loss counts")
    p.add_argument("--decoded-samples", type=int, default=8, help="samples a batch that the decoded loss decodes")
    p.add_argument("--decoded-crop", type=int, default=8, help="side, in latents, of the crop it decodes")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT (in place), for GPUs: a minute or two of compiling first; on a "
                        "2-core CPU the training loop measured no faster (patch-2 DiT, batch 24: 3.0-3.4 s a step "
                        "either way)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for name in ("object_weight", "edge_weight", "decoded_weight", "adversarial_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0.0 < args.redraw_noise <= 1.0 or not 0.0 <= args.redraw_min_noise <= args.redraw_noise:
        raise ValueError(f"--redraw-noise must lie in (0, 1] and --redraw-min-noise in [0, --redraw-noise], got "
                         f"{args.redraw_noise:g} and {args.redraw_min_noise:g}")
    if args.redraw_targets < 0 or (args.redraw_targets and args.stream_targets):
        raise ValueError(f"--redraw-targets {args.redraw_targets} must be 0 or more, and not given with "
                         f"--stream-targets {args.stream_targets}")
    if args.redraw_targets and args.redraw_with is None:
        raise ValueError(f"--redraw-targets {args.redraw_targets} needs --redraw-with: the pipeline that redraws")
    if args.stream_targets < 0 or args.stream_seconds <= 0:
        raise ValueError(f"--stream-targets {args.stream_targets} and --stream-seconds {args.stream_seconds:g} must "
                         f"be 0 or more and more than 0")
    if not 0.0 <= args.redrawn_share < 1.0:
        raise ValueError(f"--redrawn-share must lie in [0, 1), got {args.redrawn_share:g}")
    if args.stream_targets and args.redraw_with is None:
        raise ValueError(f"--stream-targets {args.stream_targets} needs --redraw-with: the pipeline that streams")
    if args.export_only:
        args.stage, args.steps = "dit", 0  # the loop is skipped; run_stage still loads, applies EMA and saves
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    if args.stage in ("vae", "all"):
        train_vae(args)
    if args.stage == "decoder":
        train_decoder(args)
    if args.stage in ("dit", "all"):
        train_dit(args)


if __name__ == "__main__":
    main()
