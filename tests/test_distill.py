"""Distillation: the per-segment targets are the teacher's s guided steps, and a short run lowers the loss."""

import csv

import numpy as np
import torch

from conftest import tiny_pipeline
from streamdit import Partition, StreamDiTPipeline
from streamdit.distill import guided_velocity, main, segment_starts, teacher_targets


def test_segment_starts():
    assert segment_starts(Partition(2, 3, 2, 4)).tolist() == [12, 12, 8, 8, 4, 4, 0, 0]


def test_teacher_targets_are_s_guided_euler_steps_per_segment():
    pipe = tiny_pipeline()
    partition = Partition(0, 4, 2, 3)  # N = 4 chunks of 2 frames, s = 3 micro steps per segment
    taus = pipe.scheduler.taus(partition)
    g = torch.Generator().manual_seed(0)
    x_start = torch.randn(2, 4, 8, 4, 4, generator=g)
    text, mask = pipe.encode_prompt(["a red circle", "a blue square"])
    uncond, uncond_mask = pipe.encode_prompt(["", ""])
    x_end, tau_start, tau_end = teacher_targets(pipe.transformer, pipe.scheduler, x_start, partition, text, mask,
                                                uncond, uncond_mask, 2.5)
    # Direct computation: chunk n moves from level (N-1-n)s by one level per step, guided, for s steps.
    start = torch.tensor([3, 3, 2, 2, 1, 1, 0, 0]) * 3
    x = x_start.clone()
    with torch.no_grad():
        for k in range(3):
            tau, tau_next = taus[start + k], taus[start + k + 1]
            cond = pipe.transformer(x, tau.expand(2, -1), text, mask).sample
            empty = pipe.transformer(x, tau.expand(2, -1), uncond, uncond_mask).sample
            x = x + (empty + 2.5 * (cond - empty)) * (tau_next - tau).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(x_end, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tau_start, taus[start])
    torch.testing.assert_close(tau_end, taus[start + 3])
    assert torch.equal(tau_end[:2], torch.ones(2))  # the cleanest chunk ends clean


def test_guidance_one_is_the_conditional_velocity():
    pipe = tiny_pipeline()
    x, tau = torch.randn(1, 4, 8, 4, 4), torch.rand(8)
    text, mask = pipe.encode_prompt(["a red circle"])
    with torch.no_grad():
        plain = pipe.transformer(x, tau[None], text, mask).sample
        torch.testing.assert_close(guided_velocity(pipe.transformer, x, tau, text, mask, None, None, 1.0), plain)


def test_distillation_lowers_its_loss_and_exports_a_one_step_student(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "teacher")
    main(["--teacher", str(tmp_path / "teacher"), "--output-dir", str(tmp_path / "run"), "--side", "16",
          "--micro-steps", "3", "--guidance-scale", "2", "--steps", "40", "--lr", "2e-3", "--batch-size", "4",
          "--warmup-steps", "1", "--log-every", "1", "--pool-size", "8", "--pool-clip-frames", "8"])
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "run" / "distill-loss.csv").open())]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses
    student = StreamDiTPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert student.scheduler.config.micro_steps == 1 and student.config.guidance_scale == 1.0
