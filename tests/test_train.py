"""The training script: a short CPU run lowers the loss, and an interrupted run resumes where it stopped."""

import csv

import shutil

import numpy as np
import pytest
import torch

from streamdit import StreamDiTPipeline
from streamdit.data import BACKGROUNDS, COLOURS, parse_caption, render, to_video
from streamdit.train import (LatentPool, decoded_loss, edge_loss, flow_matching_loss, latent_object_weights, main,
                             redraw, redrawn_batch)

TINY = ["--side", "32", "--preset", "tiny", "--vae-channels", "8", "8", "8", "8", "--latent-channels", "4",
        "--vae-frames", "4", "--vae-crop", "16", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "1", "--buffer-frames", "4",
        "--chunk-size", "2", "--micro-steps", "2", "--lr", "3e-3", "--vae-lr", "3e-3",
        "--pool-size", "16", "--pool-clip-frames", "8", "--pool-refresh", "2"]


def losses(path):
    return [float(row["loss"]) for row in csv.DictReader(path.open())]


def steps(path):
    return [int(row["step"]) for row in csv.DictReader(path.open())]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["--stage", "all", "--output-dir", str(out), "--vae-steps", "150", "--steps", "30", "--checkpoint-every", "20",
          *TINY])
    return out


def test_short_training_lowers_the_loss(run):
    # Seeded, so the same run every time; the autoencoder learns more slowly than the DiT in so few steps.
    for stage, factor in (("vae", 0.9), ("dit", 0.8)):
        values = losses(run / f"{stage}-loss.csv")
        assert np.mean(values[-10:]) < factor * np.mean(values[:10]), (stage, values)
    assert (run / "dit-loss.png").exists() and (run / "vae-psnr.txt").exists()


def test_training_exports_a_loadable_pipeline(run):
    pipe = StreamDiTPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    chunk = next(iter(pipe.stream("a red circle moving left")))
    assert chunk.frames.shape == (8, 32, 32, 3)
    assert pipe.vae.config.scaling_factor != 1.0  # latents were normalised after the autoencoder stage


def test_resume_continues_from_the_saved_step(run, tmp_path):
    # an interrupted run: 4 steps then stop (a checkpoint at 4); then the same command asked for 6 steps
    out = tmp_path / "resumed"
    (out / "vae").parent.mkdir(parents=True)
    import shutil

    shutil.copytree(run / "vae", out / "vae")
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "4", "--checkpoint-every", "2", *TINY])
    # the restart also widens the attention window to the whole buffer: weights do not depend on it
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "6", "--checkpoint-every", "2", *TINY,
          "--window-size", "4", "4", "4"])
    assert steps(out / "dit-loss.csv") == list(range(1, 7))  # 5, 6 after the restart, nothing repeated
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["dit-4", "dit-6"]  # older ones pruned
    assert StreamDiTPipeline.from_pretrained(out / "pipeline").transformer.config.window_size == [4, 4, 4]


def test_dit_stage_takes_its_latent_channels_from_the_saved_autoencoder(run, tmp_path):
    out = tmp_path / "dit-only"
    shutil.copytree(run / "vae", out / "vae")
    args = [a for a in TINY]
    args[args.index("--latent-channels") + 1] = "16"  # a stale flag: the saved autoencoder has 4 latent channels
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "2", "--checkpoint-every", "2", *args])
    assert StreamDiTPipeline.from_pretrained(out / "pipeline").transformer.config.in_channels == 4


def test_resume_cuts_the_log_back_and_takes_the_new_lr(run, tmp_path):
    import shutil

    out = tmp_path / "interrupted"
    shutil.copytree(run / "vae", out / "vae")
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "4", "--checkpoint-every", "2", *TINY])
    with (out / "dit-loss.csv").open("a") as f:  # rows an interrupted run wrote after its checkpoint at step 4
        f.write("5,9.0,0.003,1.0\n6,9.0,0.003,1.0\n")
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "6", "--checkpoint-every", "2", *TINY, "--lr", "1e-3"])
    rows = list(csv.DictReader((out / "dit-loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, 7))  # the stale 5 and 6 are gone, trained again
    assert [float(r["lr"]) for r in rows] == [3e-3] * 4 + [1e-3] * 2
    assert all(float(r["loss"]) != 9.0 for r in rows)


def test_export_only_writes_the_saved_ema_weights_then_evaluate(run, tmp_path):
    from safetensors.torch import load_file

    from streamdit import evaluate

    out = tmp_path / "run"
    shutil.copytree(run, out)  # the module's run stays as the other tests expect it
    shutil.rmtree(out / "pipeline")  # else the training run's own export would pass for this one
    # the newest checkpoint's EMA weights, no training; the streams' shift is a sampling default set at export
    main(["--export-only", "--output-dir", str(out), *TINY, "--stream-shift", "3", "--switch-strength", "0.5"])
    assert steps(out / "dit-loss.csv")[-1] == 30  # nothing trained
    pipe = StreamDiTPipeline.from_pretrained(out / "pipeline")
    assert pipe.scheduler.config.shift == 3.0 and pipe.config.switch_strength == 0.5
    checkpoint = out / "checkpoints" / "dit-30"
    ema = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)  # registered first: the EMA
    exported = [*pipe.transformer.parameters(), *pipe.text_encoder.parameters()]  # the order run_stage trains them
    assert ema["optimization_step"] == 30 and len(exported) == len(ema["shadow_params"])
    for param, shadow in zip(exported, ema["shadow_params"]):
        assert torch.equal(param, shadow)
    raw = load_file(checkpoint / "model.safetensors")  # the trained weights themselves: not what ships
    assert any(not torch.equal(raw[name], value) for name, value in pipe.transformer.state_dict().items())
    evaluate.main(["--model", str(out / "pipeline"), "--prompts", "2", "--seconds", "1", "--drift-prompts", "1",
                   "--drift-seconds", "2", "--switches", "1", "--shift", "2", "--switch-strength", "0.25",
                   "--out", str(tmp_path / "eval")])
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "| shift | 2.000 |" in table  # --shift overrides the exported 3
    assert "| switch_strength | 0.250 |" in table  # and --switch-strength the exported 0.5
    for measure in ("all_attributes", "adherence_colour", "identity", "drift_last10s_all_attributes", "switching"):
        assert f"| {measure} |" in table
    assert (tmp_path / "eval" / "samples.gif").stat().st_size > 0


def test_decoder_fine_tuning_keeps_the_latent_space(run, tmp_path):
    import shutil

    import torch

    from streamdit import StreamDiTAutoencoder

    out = tmp_path / "decoder"
    shutil.copytree(run / "vae", out / "vae")
    before = StreamDiTAutoencoder.from_pretrained(out / "vae")
    main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "5", "--edge-weight", "1", *TINY])
    after = StreamDiTAutoencoder.from_pretrained(out / "vae")
    for name, p in before.state_dict().items():
        changed = not torch.equal(p, after.state_dict()[name])
        assert changed == name.startswith("decoder."), name  # the encoder, so the latents, are untouched
    assert after.config.scaling_factor == before.config.scaling_factor
    with pytest.raises(ValueError, match="--edge-weight must be 0 or more, got -2"):
        main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "5", "--edge-weight", "-2", *TINY])


def test_a_wider_decoder_trains_behind_the_saved_encoder(run, tmp_path):
    import shutil

    import torch

    from streamdit import StreamDiTAutoencoder

    out = tmp_path / "wide"
    shutil.copytree(run / "vae", out / "vae")
    before = StreamDiTAutoencoder.from_pretrained(out / "vae")
    main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "3", "--decoder-channels", "8", "8", "8",
          "16", "--decoder-layers", "2", *TINY])
    after = StreamDiTAutoencoder.from_pretrained(out / "vae")
    assert after.config.decoder_block_out_channels == [8, 8, 8, 16] and after.config.decoder_layers_per_block == 2
    for name, p in before.encoder.state_dict().items():
        assert torch.equal(p, after.encoder.state_dict()[name]), name  # same latent space
    assert sum(p.numel() for p in after.decoder.parameters()) > sum(p.numel() for p in before.decoder.parameters())
    assert after.config.scaling_factor == before.config.scaling_factor
    video = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    assert after(video).shape == video.shape


def test_adversarial_losses_each_move_only_their_own_model():
    """The discriminator's hinge loss reaches its weights and not the decoder's frames; the decoder's reaches its
    frames and not the discriminator (one optimiser steps both, so each must get only its own gradient)."""
    import torch

    from streamdit.train import PatchDiscriminator, adversarial_loss

    torch.manual_seed(0)
    discriminator = PatchDiscriminator(channels=8)
    recon = (torch.rand(2, 3, 2, 16, 16) * 2 - 1).requires_grad_()
    video = torch.rand(2, 3, 2, 16, 16) * 2 - 1
    assert discriminator(video).shape == (4, 1, 2, 2)  # a logit per patch of each frame
    d_loss, g_loss = adversarial_loss(discriminator, recon, video)
    assert torch.autograd.grad(d_loss, recon, allow_unused=True)[0] is None
    weights = [p for p in discriminator.parameters() if p.ndim == 4]  # (a bias's hinge terms may cancel)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(d_loss, weights, retain_graph=True))
    assert all(g is None for g in torch.autograd.grad(g_loss, list(discriminator.parameters()), allow_unused=True,
                                                      retain_graph=True))
    (grad,) = torch.autograd.grad(g_loss, recon)
    with torch.no_grad():  # -mean D(recon), computed directly
        assert torch.allclose(g_loss, -discriminator(recon).mean())
    assert grad.abs().sum() > 0


def test_adversarial_decoder_training_resumes_and_keeps_the_latent_space(run, tmp_path, capsys):
    import shutil

    from streamdit import StreamDiTAutoencoder

    out = tmp_path / "adversarial"
    shutil.copytree(run / "vae", out / "vae")
    before = StreamDiTAutoencoder.from_pretrained(out / "vae")
    args = ["--stage", "decoder", "--output-dir", str(out), "--adversarial-weight", "0.5", "--checkpoint-every", "2",
            *TINY]
    main([*args, "--decoder-steps", "2"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["decoder-2"]
    main([*args, "--decoder-steps", "4"])  # the run given more steps continues, discriminator and all
    log = capsys.readouterr().out
    assert "resumed decoder" in log and "at step 2" in log
    assert [int(row["step"]) for row in csv.DictReader((out / "decoder-loss.csv").open())] == [1, 2, 3, 4]
    after = StreamDiTAutoencoder.from_pretrained(out / "vae")
    for name, p in before.state_dict().items():
        assert torch.equal(p, after.state_dict()[name]) != name.startswith("decoder."), name
    with pytest.raises(ValueError, match="--adversarial-weight must be 0 or more, got -1"):
        main([*args, "--decoder-steps", "5", "--adversarial-weight", "-1"])


class _PixelVae:
    """An autoencoder stand-in whose latents are the frames themselves, so a pooled clip shows which scene it is."""

    device = torch.device("cpu")
    temporal_compression = 1

    def encode(self, videos):
        return videos


def test_latent_pool_keeps_each_clip_with_its_scene():
    pool, rng = LatentPool(_PixelVae(), size=4, clip_frames=6, side=16), np.random.default_rng(0)
    pool.refresh(rng, 1)  # the first refresh fills the pool
    before = list(pool.scenes)
    pool.refresh(rng, 2)  # then two clips are replaced, latents and scenes together
    assert sum(a != b for a, b in zip(before, pool.scenes)) == 2
    for clip, scene in zip(pool.latents, pool.scenes, strict=True):
        assert torch.equal(clip, to_video(render(scene, 6, side=16)))
    latents, captions = pool.sample(rng, 12, 3)
    for window, text in zip(latents, captions, strict=True):
        owners = [scene for clip, scene in zip(pool.latents, pool.scenes)
                  if any(torch.equal(window, clip[:, start : start + 3]) for start in range(4))]
        assert len(owners) == 1
        stated = parse_caption(text)
        assert stated == {name: getattr(owners[0], name) for name in stated}


def test_latent_pool_draws_its_clips_with_the_shape_weights():
    pool, rng = LatentPool(_PixelVae(), size=6, clip_frames=2, side=16, shape_weights=(0, 1, 0)), np.random.default_rng(0)
    pool.refresh(rng, 1)
    pool.refresh(rng, 3)
    assert {s.shape for s in pool.scenes} == {"square"}


def test_autoencoder_trains_on_from_a_saved_one(run, tmp_path):
    from streamdit import StreamDiTAutoencoder

    saved = StreamDiTAutoencoder.from_pretrained(run / "vae")
    out = tmp_path / "init"
    main(["--stage", "vae", "--output-dir", str(out), "--vae-init", str(run / "vae"), "--vae-steps", "0", *TINY])
    start = StreamDiTAutoencoder.from_pretrained(out / "vae")  # no steps: the saved weights, freshly normalised
    for name, p in saved.state_dict().items():
        assert torch.equal(p, start.state_dict()[name]), name
    main(["--stage", "vae", "--output-dir", str(tmp_path / "on"), "--vae-init", str(run / "vae"), "--vae-steps", "3",
          "--latent-noise", "0.2", *TINY])
    after = StreamDiTAutoencoder.from_pretrained(tmp_path / "on" / "vae")
    assert after.config.block_out_channels == saved.config.block_out_channels
    for part in ("encoder", "decoder"):  # both halves train: the latents move
        assert any(not torch.equal(p, getattr(after, part).state_dict()[n])
                   for n, p in getattr(saved, part).state_dict().items()), part


def test_dit_stage_can_predict_the_clean_sample(run, tmp_path):
    out = tmp_path / "sample"
    shutil.copytree(run / "vae", out / "vae")
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "2", "--checkpoint-every", "2", *TINY,
          "--prediction-type", "sample"])
    pipe = StreamDiTPipeline.from_pretrained(out / "pipeline")
    assert pipe.transformer.config.prediction_type == "sample"
    pipe.set_progress_bar_config(disable=True)
    frames = next(iter(pipe.stream("a red circle moving left"))).frames
    assert frames.shape == (8, 32, 32, 3)


def test_dit_stage_starts_from_a_saved_pipeline(run, tmp_path):
    out = tmp_path / "init"
    shutil.copytree(run / "vae", out / "vae")
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "0", *TINY, "--dit-init", str(run / "pipeline"),
          "--window-size", "4", "2", "2"])
    saved, started = (StreamDiTPipeline.from_pretrained(p) for p in (run / "pipeline", out / "pipeline"))
    for part in ("transformer", "text_encoder"):
        for name, p in getattr(saved, part).state_dict().items():
            assert torch.equal(p, getattr(started, part).state_dict()[name]), (part, name)
    assert started.transformer.config.window_size == [4, 2, 2]  # architecture from the saved config, window as asked
    other = tmp_path / "other"
    main(["--stage", "vae", "--output-dir", str(other), "--vae-steps", "1", *TINY, "--latent-channels", "8"])
    with pytest.raises(ValueError, match="takes 4 latent channels"):
        main(["--stage", "dit", "--output-dir", str(other), "--steps", "1", *TINY, "--dit-init", str(run / "pipeline")])


def test_dit_init_into_a_new_latent_space_keeps_the_blocks_and_renews_the_latent_layers(run, tmp_path):
    other = tmp_path / "latent8"
    main(["--stage", "vae", "--output-dir", str(other), "--vae-steps", "1", *TINY, "--latent-channels", "8"])
    main(["--stage", "dit", "--output-dir", str(other), "--steps", "0", *TINY, "--dit-init", str(run / "pipeline"),
          "--new-latent-space"])
    saved = StreamDiTPipeline.from_pretrained(run / "pipeline")
    started = StreamDiTPipeline.from_pretrained(other / "pipeline")
    assert started.transformer.config.in_channels == 8 and started.transformer.x_embedder.in_channels == 8
    renewed = ("x_embedder.", "final_layer.linear.")
    theirs = saved.transformer.state_dict()
    for name, p in started.transformer.state_dict().items():
        if name.startswith(renewed):
            # 8 latent channels where the saved DiT took 4; the embedding's bias starts afresh at zero
            assert p.shape != theirs[name].shape or (not p.any() and theirs[name].any()), name
        else:
            assert torch.equal(p, theirs[name]), name
    assert not started.transformer.final_layer.linear.weight.any()  # a new projection starts at zero velocity
    for name, p in saved.text_encoder.state_dict().items():
        assert torch.equal(p, started.text_encoder.state_dict()[name]), name
    started.set_progress_bar_config(disable=True)
    assert next(iter(started.stream("a red circle moving left"))).frames.shape == (8, 32, 32, 3)


def test_dit_init_at_a_smaller_patch_keeps_the_blocks_and_cuts_more_tokens(run, tmp_path):
    out = tmp_path / "patch2"
    shutil.copytree(run / "vae", out / "vae")
    saved = StreamDiTPipeline.from_pretrained(run / "pipeline")
    assert saved.transformer.config.patch_size == 1
    args = ["--stage", "dit", "--output-dir", str(out), "--steps", "0", *TINY, "--dit-init", str(run / "pipeline")]
    with pytest.raises(ValueError, match="--patch-size 2 renews .* --new-latent-space"):
        main([*args, "--patch-size", "2"])
    with pytest.raises(ValueError, match=r"patch_size=3 must divide the latent frame of sample_size=\(\d+, 4, 4\)"):
        main([*args, "--new-latent-space", "--patch-size", "3"])
    main([*args, "--new-latent-space", "--patch-size", "2"])
    started = StreamDiTPipeline.from_pretrained(out / "pipeline")
    assert started.transformer.config.patch_size == 2 and started.transformer.x_embedder.kernel_size == (1, 2, 2)
    theirs = saved.transformer.state_dict()
    for name, p in started.transformer.state_dict().items():
        if not name.startswith(("x_embedder.", "final_layer.linear.")):
            assert torch.equal(p, theirs[name]), name  # blocks, timestep and text layers as saved
    assert not started.transformer.final_layer.linear.weight.any()
    fresh = tmp_path / "fresh"
    shutil.copytree(run / "vae", fresh / "vae")
    main(["--stage", "dit", "--output-dir", str(fresh), "--steps", "0", *TINY, "--patch-size", "2"])
    assert StreamDiTPipeline.from_pretrained(fresh / "pipeline").transformer.config.patch_size == 2  # not the preset's 1
    latents = torch.randn(1, 4, 4, 4, 4)  # (B, C, F, H, W): 2x2 tokens a frame instead of 4x4
    prompt = started.encode_prompt(["a red circle moving left"])
    velocity = started.transformer(latents, torch.rand(1, 4), *prompt).sample
    assert velocity.shape == latents.shape


def test_object_weights_mark_latents_that_differ_from_their_frames_background():
    x1 = torch.randn(2, 4, 3, 1, 1).expand(2, 4, 3, 8, 8).clone()  # each frame one background latent
    x1[0, 2, 1, 2:4, 5:7] += 1.0  # an object in one channel of one frame
    x1[1, :, 2, 0, 0] -= 0.7  # and one in all channels of another
    w = latent_object_weights(x1, 3.0)
    expected = torch.ones(2, 1, 3, 8, 8)
    expected[0, 0, 1, 2:4, 5:7] = 4.0
    expected[1, 0, 2, 0, 0] = 4.0
    assert torch.equal(w, expected)


def test_object_weighted_loss_against_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 4, 3, 1, 1, generator=generator).expand(2, 4, 3, 8, 8).clone()
    x1[:, :, :, 3:5, 3:6] += 2.0
    velocity, target = torch.randn(2, x1.numel() // 2, generator=generator).view(x1.shape), torch.zeros_like(x1)
    assert flow_matching_loss(velocity, target, x1, 0.0) == pytest.approx(velocity.square().mean().item())
    on, off = velocity[:, :, :, 3:5, 3:6].square().sum().item(), velocity.square().sum().item()
    off -= on
    n_on, n = 2 * 3 * 2 * 3, x1[:, 0].numel()  # object latents and all latents, per channel
    expected = (5 * on + off) / (5 * n_on + (n - n_on)) / x1.shape[1]
    assert flow_matching_loss(velocity, target, x1, 4.0).item() == pytest.approx(expected, rel=1e-5)


def test_dit_stage_trains_with_the_object_weighted_loss(run, tmp_path):
    out = tmp_path / "weighted"
    shutil.copytree(run / "vae", out / "vae")
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "2", "--checkpoint-every", "2", *TINY,
          "--object-weight", "4"])
    assert len(losses(out / "dit-loss.csv")) == 2 and all(np.isfinite(losses(out / "dit-loss.csv")))
    with pytest.raises(ValueError, match="-1"):
        main(["--stage", "dit", "--output-dir", str(out), "--steps", "2", *TINY, "--object-weight", "-1"])


class _IdentityVae:
    """A decoder stand-in that draws its latents as they are, so true frames as latents decode to a loss of 0."""

    temporal_compression = spatial_compression = 1

    def decode(self, latents):
        return latents


def test_decoded_loss_decodes_the_cleanest_window_around_the_object():
    from types import SimpleNamespace

    from streamdit.data import sample_scene

    args = SimpleNamespace(decoded_crop=8, decoded_min_tau=0.5, decoded_samples=2, edge_weight=1.0, side=32)
    scenes = [sample_scene(np.random.default_rng(i), size="large") for i in range(3)]
    starts = np.array([2, 0, 5])  # each buffer's first frame in its clip
    clean = torch.stack([to_video(render(sc, 6, 32, int(start))) for sc, start in zip(scenes, starts)])  # (3, 3, 6, 32, 32)
    clean.requires_grad_(True)
    tau = torch.tensor([[0.1, 0.2, 0.9, 0.95, 0.3, 0.0]]).expand(3, 6)  # the cleanest window: frames 2-3
    assert decoded_loss(_IdentityVae(), clean, tau, scenes, starts, args).item() == 0.0  # true frames: nothing to pay

    def loss_with(change):
        edited = clean.detach().clone()
        change(edited)
        return decoded_loss(_IdentityVae(), edited, tau, scenes, starts, args).item()

    cx, cy = (int(v) for v in scenes[0].centre(2 + 1, 32))  # the first sample's object mid-window
    assert loss_with(lambda z: z[0, :, 3, cy, cx].add_(0.5)) > 0.0  # on the object, in the window
    assert loss_with(lambda z: z[0, :, 1, cy, cx].add_(0.5)) == 0.0  # a frame outside the window
    assert loss_with(lambda z: z[0, :, 3, (cy + 16) % 32, (cx + 16) % 32].add_(0.5)) == 0.0  # outside the crop
    assert loss_with(lambda z: z[2, :, 3, cy, cx].add_(0.5)) == 0.0  # past --decoded-samples
    off = decoded_loss(_IdentityVae(), clean, torch.full((3, 6), 0.4), scenes, starts, args)  # all below min tau
    off.backward()
    assert off.item() == 0.0 and torch.equal(clean.grad, torch.zeros_like(clean))


def test_dit_stage_trains_with_the_decoded_loss(run, tmp_path):
    out = tmp_path / "decoded"
    shutil.copytree(run / "vae", out / "vae")
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "2", "--checkpoint-every", "2", *TINY,
          "--decoded-weight", "1", "--decoded-crop", "2", "--decoded-min-tau", "0"])
    assert len(losses(out / "dit-loss.csv")) == 2 and all(np.isfinite(losses(out / "dit-loss.csv")))
    with pytest.raises(ValueError, match="--decoded-crop 8"):  # the tiny run's latents are 4 x 4
        main(["--stage", "dit", "--output-dir", str(out), "--steps", "3", *TINY, "--decoded-weight", "1"])


def test_edge_loss_is_the_l1_of_pixel_differences_and_prices_a_soft_edge():
    video = torch.full((1, 3, 2, 16, 16), -1.0)
    video[..., 4:12, 4:12] = 1.0  # a square on black
    soft = torch.nn.functional.avg_pool3d(video, (1, 3, 3), stride=1, padding=(0, 1, 1), count_include_pad=False)
    assert edge_loss(video, video).item() == 0.0
    assert edge_loss(video + 0.3, video).item() == pytest.approx(0.0, abs=1e-6)  # an even shift has no edges
    assert edge_loss(soft, video).item() > 0.0
    edge = torch.tensor([-1.0, -1.0, 1.0, 1.0]).expand(1, 1, 1, 2, 4)  # a step, in two equal rows
    ramp = torch.tensor([-1.0, 0.0, 0.0, 1.0]).expand(1, 1, 1, 2, 4)  # the same step, soft
    # along W: differences (0, 2, 0) against (1, 0, 1), L1 mean 4/3; along H: both 0
    assert edge_loss(ramp, edge).item() == pytest.approx(4 / 3)


def test_redraw_is_the_dits_guided_euler_steps_from_the_noised_latents():
    from conftest import tiny_pipeline

    pipe = tiny_pipeline()  # 8-frame buffer, chunk 2, 2 micro steps: T = 8 micro steps span [0, 1]
    pipe.register_to_config(guidance_scale=2.5)
    x1 = torch.randn(2, 4, 8, 4, 4, generator=torch.Generator().manual_seed(1))
    captions = ["a red circle moving left", "a blue square"]
    redrawn = redraw(pipe, x1, captions, 0.3, torch.Generator().manual_seed(7))
    # directly: ceil(0.3 * 8) = 3 Euler steps from tau 0.7 to 1, each branch run on its own
    noise = torch.randn(x1.shape, generator=torch.Generator().manual_seed(7))
    x = 0.7 * x1 + 0.3 * noise
    text, mask = pipe.encode_prompt(captions)
    empty, empty_mask = pipe.encode_prompt(["", ""])
    taus = torch.linspace(0.7, 1.0, 4)
    for tau, next_tau in zip(taus[:-1], taus[1:]):
        t = tau.expand(2, 8)
        cond = pipe.transformer(x, t, text, mask).sample
        uncond = pipe.transformer(x, t, empty, empty_mask).sample
        x = x + (next_tau - tau) * (uncond + 2.5 * (cond - uncond))
    assert torch.allclose(redrawn, x, atol=1e-5)
    assert not torch.allclose(redrawn, x1, atol=1e-2)


def test_redrawn_batches_pair_each_latent_window_with_its_frames():
    """Pixel "latents" (the frames themselves) and almost no redraw noise: each window must come back as the frames
    it is paired with."""
    import argparse

    from streamdit.autoencoder import StreamDiTAutoencoder
    from streamdit.data import VOCABULARY
    from streamdit.scheduler import StreamDiTScheduler
    from streamdit.text import StreamDiTTextEncoder, build_tokenizer
    from streamdit.transformer import from_preset

    tokenizer = build_tokenizer(VOCABULARY, max_length=16)
    pipe = StreamDiTPipeline(from_preset("tiny", in_channels=3, sample_size=(4, 16, 16)),
                             StreamDiTScheduler(buffer_frames=4, chunk_size=2, micro_steps=2),
                             StreamDiTAutoencoder(latent_channels=4, block_out_channels=(8, 8, 8),
                                                  temporal_downsample=(True, True)),
                             StreamDiTTextEncoder(vocab_size=len(tokenizer), max_length=16, hidden_size=16,
                                                  num_layers=1, num_heads=2), tokenizer)
    pool, rng = LatentPool(_PixelVae(), size=3, clip_frames=10, side=16), np.random.default_rng(0)
    pool.refresh(rng, 1)
    args = argparse.Namespace(batch_size=6, redraw_min_noise=0.0, redraw_noise=1e-6, side=16)
    latents, video, captions = redrawn_batch(pool, pipe, rng, args)
    assert latents.shape == video.shape == (6, 3, 2, 16, 16) and len(captions) == 6
    for v, text in zip(video, captions):  # each window's caption tells its own clip's scene
        clip = next(c for c, z in enumerate(pool.latents) if any(torch.equal(v, z[:, s : s + 2]) for s in range(9)))
        stated = parse_caption(text)
        assert stated and all(getattr(pool.scenes[clip], k) == value for k, value in stated.items()), text
    assert torch.allclose(latents, video, atol=1e-4)
    found = [any(torch.equal(v, clip[:, s : s + 2]) for clip in pool.latents for s in range(9)) for v in video]
    assert all(found)


def test_decoder_trains_on_a_dits_redrawn_latents(run, tmp_path):
    from streamdit import StreamDiTAutoencoder
    from streamdit.train import new_vae, parse_args

    out = tmp_path / "redrawn"
    shutil.copytree(run / "vae", out / "vae")
    before = StreamDiTAutoencoder.from_pretrained(out / "vae")
    main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "3", "--redraw-with",
          str(run / "pipeline"), "--redraw-noise", "0.5", *TINY])
    after = StreamDiTAutoencoder.from_pretrained(out / "vae")
    for name, p in before.state_dict().items():
        assert (not torch.equal(p, after.state_dict()[name])) == name.startswith("decoder."), name
    assert len(losses(out / "decoder-loss.csv")) == 3
    with pytest.raises(ValueError, match="--redraw-noise must lie in \\(0, 1\\] .* got 0 and 0"):
        main(["--stage", "decoder", "--output-dir", str(out), "--redraw-with", str(run / "pipeline"),
              "--redraw-noise", "0", *TINY])
    with pytest.raises(ValueError, match="got 0.5 and 0.6"):
        main(["--stage", "decoder", "--output-dir", str(out), "--redraw-with", str(run / "pipeline"),
              "--redraw-min-noise", "0.6", *TINY])
    other = tmp_path / "other"
    new_vae(parse_args(TINY)).save_pretrained(other / "vae")  # another encoder: the DiT's latents are not its
    with pytest.raises(ValueError, match="its autoencoder's encoder is not the one in"):
        main(["--stage", "decoder", "--output-dir", str(other), "--redraw-with", str(run / "pipeline"), *TINY])


def test_a_decoder_that_reads_the_prompt_starts_as_the_saved_one_and_learns_to(run, tmp_path):
    from streamdit import StreamDiTAutoencoder
    from streamdit.text import pooled

    out = tmp_path / "reads-prompt"
    shutil.copytree(run / "vae", out / "vae")
    before = StreamDiTAutoencoder.from_pretrained(out / "vae")
    with pytest.raises(ValueError, match="--decoder-text needs --redraw-with"):
        main(["--stage", "decoder", "--output-dir", str(out), "--decoder-text", *TINY])
    main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "3", "--redraw-with",
          str(run / "pipeline"), "--decoder-text", *TINY])
    after = StreamDiTAutoencoder.from_pretrained(out / "vae")
    pipe = StreamDiTPipeline.from_pretrained(run / "pipeline")
    assert after.config.decoder_text_channels == pipe.text_encoder.config.hidden_size
    for name, p in before.encoder.state_dict().items():  # the latent space stays
        assert torch.equal(p, after.encoder.state_dict()[name]), name
    assert all(film.proj.weight.abs().amax() > 0 for film in after.decoder_film.values())  # it learned to read
    assert len(losses(out / "decoder-loss.csv")) == 3
    # the same latents decode differently for different prompts, and the pipeline hands its decoder the prompt
    z = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    red, blue = (pooled(*pipe.encode_prompt([p])) for p in ("a red circle", "a blue square"))
    with torch.no_grad():
        assert (after.decode(z, text=red) - after.decode(z, text=blue)).abs().amax() > 1e-4
    pipe.register_modules(vae=after.eval())
    assert pipe.decoder_reads_prompt


def test_dit_stage_trains_a_refiner_alone_on_a_saved_pipeline(run, tmp_path, capsys):
    """--refiner-channels adds a refiner to --dit-init's DiT; --train-refiner-only trains it and nothing else."""
    out = tmp_path / "refiner"
    shutil.copytree(run / "vae", out / "vae")
    refiner_only = [*TINY, "--dit-init", str(run / "pipeline"), "--refiner-channels", "8", "--train-refiner-only"]
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "2", "--checkpoint-every", "2", *refiner_only])
    capsys.readouterr()
    main(["--stage", "dit", "--output-dir", str(out), "--steps", "3", *refiner_only])
    assert "at step 2" in capsys.readouterr().out  # resumed, the frozen text encoder outside the checkpoint
    assert steps(out / "dit-loss.csv") == [1, 2, 3]
    saved, refined = (StreamDiTPipeline.from_pretrained(p) for p in (run / "pipeline", out / "pipeline"))
    assert refined.transformer.config.refiner_channels == 8
    assert refined.transformer.refiner.conv_out.weight.any()  # it learned something
    for part in ("transformer", "text_encoder"):
        trained = getattr(refined, part).state_dict()
        for name, p in getattr(saved, part).state_dict().items():
            assert torch.equal(p, trained[name]), (part, name)
    shutil.copytree(run / "vae", tmp_path / "none" / "vae")
    with pytest.raises(ValueError, match="--train-refiner-only needs a refiner"):
        main(["--stage", "dit", "--output-dir", str(tmp_path / "none"), "--steps", "1", *TINY,
              "--dit-init", str(run / "pipeline"), "--train-refiner-only"])


def test_a_grown_temporal_kernel_starts_as_the_saved_decoder():
    """load_inflated puts each saved per-frame kernel at the current frame's tap of the longer one, zeros before it:
    the grown decoder draws what the saved one drew until training teaches it the earlier frames."""
    from streamdit.autoencoder import StreamDiTAutoencoder
    from streamdit.train import load_inflated

    torch.manual_seed(0)
    config = dict(latent_channels=4, block_out_channels=(8, 8, 8), temporal_downsample=(True, True),
                  temporal_kernel_size=1)
    saved = StreamDiTAutoencoder(**config).eval()
    grown = StreamDiTAutoencoder(**config, decoder_latent_temporal_kernel_size=3).eval()
    load_inflated(grown, saved.state_dict())
    first = grown.decoder[0].conv.weight  # (C', C, 3, 3, 3)
    assert torch.equal(first[:, :, 2], saved.decoder[0].conv.weight[:, :, 0]) and not first[:, :, :2].any()
    latents = torch.randn(1, 4, 5, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(grown.decode(latents), saved.decode(latents), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="cannot grow into"):
        load_inflated(saved, grown.state_dict())  # a kernel does not shrink


def test_a_decoder_with_untied_frames_starts_as_the_saved_one_and_trains_behind_the_same_encoder(run, tmp_path):
    """--decoder-untied-frames turns the saved decoder's tied temporal upsamplings into untied ones that draw the
    same (`untie_frames`), then trains the decoder alone."""
    from streamdit import StreamDiTAutoencoder
    from streamdit.train import load_inflated, untie_frames

    saved = StreamDiTAutoencoder.from_pretrained(run / "vae").eval()
    untied = StreamDiTAutoencoder(**{**saved.config, "decoder_untied_frames": True}).eval()
    load_inflated(untied, untie_frames(untied, saved.state_dict()))
    latents = torch.randn(1, saved.config.latent_channels, 3, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(untied.decode(latents), saved.decode(latents), rtol=0, atol=1e-5)

    out = tmp_path / "untied"
    shutil.copytree(run / "vae", out / "vae")
    main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "2", "--decoder-untied-frames", *TINY])
    after = StreamDiTAutoencoder.from_pretrained(out / "vae")
    assert after.config.decoder_untied_frames
    for name, p in saved.encoder.state_dict().items():
        assert torch.equal(p, after.encoder.state_dict()[name]), name  # same latent space
    main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "3", *TINY])  # stays untied
    assert StreamDiTAutoencoder.from_pretrained(out / "vae").config.decoder_untied_frames
    whole = tmp_path / "untied-vae"  # the vae stage unties a saved autoencoder too, and trains it whole
    main(["--stage", "vae", "--output-dir", str(whole), "--vae-steps", "1", "--vae-init", str(run / "vae"),
          "--decoder-untied-frames", *TINY])
    assert StreamDiTAutoencoder.from_pretrained(whole / "vae").config.decoder_untied_frames


def test_a_decoder_with_a_longer_latent_kernel_trains_on_redrawn_windows(run, tmp_path):
    from streamdit import StreamDiTAutoencoder

    out = tmp_path / "temporal"
    shutil.copytree(run / "vae", out / "vae")
    before = StreamDiTAutoencoder.from_pretrained(out / "vae")
    main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "2", "--redraw-with",
          str(run / "pipeline"), "--decoder-latent-temporal-kernel", "3", "--decoder-latent-frames", "3", *TINY])
    after = StreamDiTAutoencoder.from_pretrained(out / "vae")
    assert after.config.decoder_latent_temporal_kernel_size == 3
    assert after.decoder_context_frames > before.decoder_context_frames
    for name, p in before.encoder.state_dict().items():
        assert torch.equal(p, after.encoder.state_dict()[name]), name  # same latent space
    with pytest.raises(ValueError, match="latent_frames=5 must be between 1 and"):
        main(["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "3", "--redraw-with",
              str(run / "pipeline"), "--decoder-latent-frames", "5", *TINY])


@pytest.mark.slow  # inductor compiles the tiny DiT's forward and backward: a minute or more on 2 cores
def test_compiled_dit_trains_as_the_eager_one_and_shares_its_checkpoints(run, tmp_path):
    # two runs of 2 eager steps, each resumed to step 4, one with --compile: the same losses and weights (up to the
    # fused kernels' rounding), so the compiled module reads the eager checkpoints and saves under the eager names
    eager, mixed = tmp_path / "eager", tmp_path / "mixed"
    common = ["--stage", "dit", "--checkpoint-every", "2", *TINY]
    for out, more in ((eager, []), (mixed, ["--compile"])):
        shutil.copytree(run / "vae", out / "vae")
        main([*common, "--output-dir", str(out), "--steps", "2"])
        main([*common, "--output-dir", str(out), "--steps", "4", *more])
    np.testing.assert_allclose(losses(mixed / "dit-loss.csv"), losses(eager / "dit-loss.csv"), rtol=1e-3)
    theirs = StreamDiTPipeline.from_pretrained(eager / "pipeline").transformer.state_dict()
    ours = StreamDiTPipeline.from_pretrained(mixed / "pipeline").transformer.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-3, atol=1e-4)


def test_fitted_scene_finds_a_generator_clips_scene_from_its_frames():
    """The detector's readings of a rendered clip give back its scene: place within a pixel, every attribute, and
    the unstated size and background from the frames; a clip of another colour or motion gives None."""
    from streamdit.data import caption, sample_scene
    from streamdit.evaluate import read_frame
    from streamdit.train import fitted_scene

    rng = np.random.default_rng(3)
    for shape in ("circle", "square", "triangle"):
        for _ in range(3):
            scene = sample_scene(rng, shape=shape)
            readings = [read_frame(f) for f in render(scene, 8, start=40)]
            for omit in (0.0, 1.0):
                fitted = fitted_scene(caption(scene, omit=omit), readings, 40)
                names = ("colour", "shape", "size", "direction", "speed", "background")
                assert [getattr(fitted, n) for n in names] == [getattr(scene, n) for n in names]
                error = (np.subtract(fitted.centre(40), scene.centre(40)) + 64) % 128 - 64
                assert np.abs(error).max() < 0.75, (shape, error)
    scene = sample_scene(rng, colour="red", direction="right", speed="quickly")
    readings = [read_frame(f) for f in render(scene, 8)]
    assert fitted_scene("a blue circle moving right quickly", readings, 0) is None  # another colour
    assert fitted_scene("a red circle moving left quickly", readings, 0) is None  # another motion


def test_stream_targets_pair_each_latent_window_with_the_prompts_object_where_it_is():
    """Pixel "latents" (the frames themselves, decoded as they are): a stream that shows its prompt exactly gets back
    its own frames as the targets, cropped around the object; a stream of another colour gives no window."""
    from streamdit.data import caption, sample_scene
    from streamdit.train import StreamTargets

    rng = np.random.default_rng(4)
    scenes = [sample_scene(rng, shape=shape) for shape in ("circle", "square", "triangle")]
    streams = [(caption(s, rng), to_video(render(s, 6))) for s in scenes]  # latents (3, 6, 128, 128)
    wrong = sample_scene(rng, colour="red")
    streams.append(("a green square moving left", to_video(render(wrong, 6))))
    targets = StreamTargets(streams, lambda z: z, temporal_compression=1, spatial_compression=1)
    assert targets.candidates == 4 * 5 and len(targets.windows) == 3 * 5
    latents, video, prompts = targets.batch(rng, 12, crop=48)
    assert latents.shape == video.shape == (12, 3, 2, 48, 48)
    for z, prompt in zip(latents, prompts):  # each window with its own stream's prompt: the colour at its centre
        assert prompt in [p for p, _ in streams[:3]]
        rgb = ((z[:, 0, 24, 24] + 1) * 127.5).round().tolist()
        assert rgb == list(COLOURS[parse_caption(prompt)["colour"]]), (prompt, rgb)
    assert (latents - video).abs().mean() < 0.01  # the same frames, to within the fitted place's sub-pixel error
    assert (latents[:, :, :, 20:28, 20:28] - latents[:, :, :, :1, :1]).abs().amax() > 0.5  # the object is mid-crop
    with pytest.raises(ValueError, match="must be 0 or more"):
        main(["--stage", "decoder", "--stream-targets", "-1", "--redraw-with", "x"])
    with pytest.raises(ValueError, match="--stream-targets 5 needs --redraw-with"):
        main(["--stage", "decoder", "--stream-targets", "5"])
    with pytest.raises(ValueError, match=r"--redrawn-share must lie in \[0, 1\), got 1"):
        main(["--stage", "decoder", "--stream-targets", "5", "--redraw-with", "x", "--redrawn-share", "1"])


def test_stream_latents_are_what_the_stream_decodes(run):
    """The latents `stream_latents` keeps, decoded at once, are the frames the same stream shows (after its
    warm-up chunks, which it never shows)."""
    from streamdit.train import stream_latents

    pipe = StreamDiTPipeline.from_pretrained(run / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    pipe.register_to_config(warmup_chunks=2)
    latents = stream_latents(pipe, "a red circle moving left", 3, seed=11)
    assert latents.shape == (4, 6, 4, 4)
    stream = pipe.stream("a red circle moving left", generator=torch.Generator().manual_seed(11), pipelined=False)
    frames = np.concatenate([next(stream).frames for _ in range(3)])  # (24, 32, 32, 3)
    decoded = ((pipe.decode_latents(latents[None])[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round()
    assert np.abs(decoded.numpy() - frames).max() <= 1


def test_decoder_stage_streams_its_targets_once_and_says_when_none_follow(run, tmp_path):
    """--stream-targets streams its prompts with --redraw-with's pipeline and keeps them; the tiny run's DiT draws
    no object yet, so no window follows its prompt, and the stage says so instead of training on nothing."""
    out = tmp_path / "streamed"
    shutil.copytree(run / "vae", out / "vae")
    command = ["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "2", "--redraw-with",
               str(run / "pipeline"), "--stream-targets", "2", "--stream-seconds", "1", *TINY]
    with pytest.raises(ValueError, match="--stream-targets 2: no window of 6 in the streams"):
        main(command)
    kept = torch.load(out / "stream-latents.pt")
    assert len(kept["prompts"]) == 2 and kept["latents"][0].shape == (4, 4, 4, 4)


def test_aligned_scene_moves_the_clip_to_where_the_frames_show_its_object():
    """Frames of the same scene moved on the torus (across an edge, at the tiny side too) give the move back, with
    masks that then agree; frames with no object give an IoU of 0."""
    from dataclasses import replace

    from streamdit.data import sample_scene
    from streamdit.train import aligned_scene

    rng = np.random.default_rng(3)
    for shape, side, tolerance in (("square", 128, 0), ("circle", 128, 0), ("triangle", 128, 0), ("square", 32, 4)):
        scene = sample_scene(rng, shape=shape)
        moved = replace(scene, x=(scene.x + 8) % 128, y=(scene.y - 60) % 128)
        found, iou = aligned_scene(scene, render(moved, 8, side, start=4), first=4)
        off = [abs((a - b + 64) % 128 - 64) for a, b in ((found.x, moved.x), (found.y, moved.y))]  # on the torus
        assert max(off) <= tolerance, (shape, side, off)
        assert found.shape == scene.shape and found.speed == scene.speed and iou > (0.99 if side == 128 else 0.85)
    empty = np.broadcast_to(np.array(BACKGROUNDS[scene.background], np.uint8), (8, 128, 128, 3))
    assert aligned_scene(scene, empty, first=0)[1] == 0.0


def test_redrawn_targets_pair_each_window_with_its_clip_where_the_redraw_put_it():
    """Pixel "latents" (the frames themselves, decoded as they are): a redraw that moved its clip gets back its own
    frames as the targets, with the clip's caption; a redraw that lost the object gives no window."""
    from dataclasses import replace

    from streamdit.data import caption, sample_scene
    from streamdit.train import RedrawnTargets

    rng = np.random.default_rng(5)
    clips = []
    for shape in ("circle", "square", "triangle"):
        scene = sample_scene(rng, shape=shape)
        redrawn = replace(scene, x=(scene.x + 5) % 128, y=(scene.y + 3) % 128)  # where the "DiT" drew it
        clips.append((caption(scene, rng), scene, to_video(render(redrawn, 6))))
    lost = sample_scene(rng)
    blank = np.broadcast_to(np.array(BACKGROUNDS[lost.background], np.uint8), (6, 128, 128, 3))
    clips.append(("a red square moving left", lost, to_video(np.ascontiguousarray(blank))))
    targets = RedrawnTargets(clips, lambda z: z, temporal_compression=1, spatial_compression=1)
    assert targets.candidates == 4 * 5 and len(targets.windows) == 3 * 5
    latents, video, prompts = targets.batch(rng, 12, crop=48)
    assert latents.shape == video.shape == (12, 3, 2, 48, 48)
    assert set(prompts) <= {c for c, _, _ in clips[:3]}
    assert (latents - video).abs().amax() < 1e-6  # the moved clip's frames exactly
    with pytest.raises(ValueError, match="--redraw-targets 5 needs --redraw-with"):
        main(["--stage", "decoder", "--redraw-targets", "5"])
    with pytest.raises(ValueError, match="--redraw-targets 5 must be 0 or more, and not given with --stream-targets 2"):
        main(["--stage", "decoder", "--redraw-targets", "5", "--stream-targets", "2", "--redraw-with", "x"])


def test_decoder_stage_redraws_its_targets_once_and_trains_on_them(run, tmp_path, capsys, monkeypatch):
    """--redraw-targets redraws its clips with --redraw-with's DiT and keeps them. The tiny run's decoder draws no
    object yet, so no window lines up and the stage says so; with the alignment taken as given (it is tested above)
    the decoder trains on the kept redraws without redrawing them, unless they were made from other noise."""
    import streamdit.train

    out = tmp_path / "redrawn-targets"
    shutil.copytree(run / "vae", out / "vae")
    command = ["--stage", "decoder", "--output-dir", str(out), "--decoder-steps", "2", "--redraw-with",
               str(run / "pipeline"), "--redraw-targets", "6", "--redraw-noise", "0.5", *TINY]
    with pytest.raises(ValueError, match="--redraw-targets 6: no window of 18 in the redraws"):
        main(command)
    kept = torch.load(out / "redrawn-latents.pt")
    assert len(kept["captions"]) == len(kept["scenes"]) == 8  # two batches of four
    assert [tuple(z.shape) for z in kept["latents"]] == [(4, 4, 4, 4, 4)] * 2
    monkeypatch.setattr(streamdit.train, "aligned_scene", lambda scene, frames, first: (scene, 1.0))
    monkeypatch.setattr(streamdit.train, "redraw", None)  # kept: nothing is redrawn again
    main(command)
    assert "redraw targets: 18 of 18 windows line up with their clips" in capsys.readouterr().out
    assert len(losses(out / "decoder-loss.csv")) == 2
    assert kept["noise"] == [0.0, 0.5] and kept["side"] == 32
    with pytest.raises(TypeError, match="not callable"):  # redraws from other noise are not reused: it redraws
        main([*command, "--redraw-noise", "0.4"])
