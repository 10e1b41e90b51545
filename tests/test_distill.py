"""Distillation: the per-segment targets are the teacher's s guided steps, and a short run lowers the loss."""

import copy
import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import randomize_zeros, tiny_pipeline
from streamdit import Partition, StreamDiTPipeline
from streamdit.distill import (StudentStreams, TeacherStreams, deepened, distill_loss, main, segment_loss,
                               segment_starts, student_levels, teacher_targets)
from streamdit.pipeline import guided_velocity
from streamdit.train import TrainState
from streamdit.transformer import from_preset


def test_segment_starts():
    assert segment_starts(Partition(2, 3, 2, 4)).tolist() == [12, 12, 8, 8, 4, 4, 0, 0]


def guided_euler_steps(pipe, x, levels, moves, steps, taus, text, mask, uncond, uncond_mask, g):
    """The reference computation: `steps` guided Euler steps from `levels`, frames with moves = 0 held, with
    separate conditional and unconditional calls."""
    with torch.no_grad():
        for k in range(steps):
            tau, tau_next = taus[levels + k * moves], taus[levels + (k + 1) * moves]
            cond = pipe.transformer(x, tau.expand(x.shape[0], -1), text, mask).sample
            empty = pipe.transformer(x, tau.expand(x.shape[0], -1), uncond, uncond_mask).sample
            x = x + (empty + g * (cond - empty)) * (tau_next - tau).view(1, 1, -1, 1, 1)
    return x


@pytest.mark.parametrize("s, student_micro_steps, student_step", [(3, 1, 0), (4, 2, 0), (4, 2, 1)])
def test_teacher_targets_are_the_students_share_of_the_guided_euler_steps(s, student_micro_steps, student_step):
    """s' = 1: s guided steps from every chunk's segment start. s' = 2: from the start of the student's step j, its
    s / 2 of them. Both against the direct computation."""
    pipe = tiny_pipeline()
    partition = Partition(0, 4, 2, s)  # N = 4 chunks of 2 frames, s micro steps per segment
    taus = pipe.scheduler.taus(partition)
    x_start = torch.randn(2, 4, 8, 4, 4, generator=torch.Generator().manual_seed(s + student_step))
    text, mask = pipe.encode_prompt(["a red circle", "a blue square"])
    uncond, uncond_mask = pipe.encode_prompt(["", ""])
    steps = s // student_micro_steps
    if student_micro_steps == 1:  # the defaults: whole segments
        x_end, tau_start, tau_end = teacher_targets(pipe.transformer, pipe.scheduler, x_start, partition, text, mask,
                                                    uncond, uncond_mask, 2.5)
    else:
        levels = student_levels(partition, student_step, student_micro_steps)
        x_end, tau_start, tau_end = teacher_targets(pipe.transformer, pipe.scheduler, x_start, partition, text, mask,
                                                    uncond, uncond_mask, 2.5, levels, steps)
    # Chunk n moves from level (N-1-n)s + j s/s' by one level per step, guided, for s/s' steps.
    start = torch.tensor([3, 3, 2, 2, 1, 1, 0, 0]) * s + steps * student_step
    x = guided_euler_steps(pipe, x_start, start, torch.ones(8, dtype=torch.long), steps, taus, text, mask, uncond,
                           uncond_mask, 2.5)
    torch.testing.assert_close(x_end, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tau_start, taus[start])
    torch.testing.assert_close(tau_end, taus[start + steps])
    last = student_step == student_micro_steps - 1
    assert torch.equal(tau_end[:2] == 1, torch.tensor([last, last]))  # the cleanest chunk ends clean, at the end


def test_student_levels_start_each_students_step_inside_every_segment():
    partition = Partition(2, 3, 2, 4)  # s = 4; a student with s' = 2 covers 2 teacher levels a step
    assert student_levels(partition, 0, 2).tolist() == segment_starts(partition).tolist()
    assert student_levels(partition, 1, 2).tolist() == [12, 12, 10, 10, 6, 6, 2, 2]  # reference frames stay clean
    assert student_levels(partition, 3, 4).tolist() == [12, 12, 11, 11, 7, 7, 3, 3]


def test_a_student_with_the_teachers_micro_steps_learns_the_guided_velocity():
    """s' = s: one teacher step per student step, so the one-step target (x_end - x_start) / dtau is the guided
    velocity itself (guidance distillation alone)."""
    pipe = tiny_pipeline()
    partition = Partition(0, 4, 2, 3)
    x_start = torch.randn(2, 4, 8, 4, 4, generator=torch.Generator().manual_seed(2))
    text, mask = pipe.encode_prompt(["a red circle", "a blue square"])
    uncond, uncond_mask = pipe.encode_prompt(["", ""])
    levels = student_levels(partition, 2, 3)
    x_end, tau_start, tau_end = teacher_targets(pipe.transformer, pipe.scheduler, x_start, partition, text, mask,
                                                uncond, uncond_mask, 2.5, levels, 1)
    with torch.no_grad():
        guided = guided_velocity(pipe.transformer, x_start, tau_start, text, mask, uncond, uncond_mask, 2.5)
    target = (x_end - x_start) / (tau_end - tau_start).view(1, 1, -1, 1, 1)
    torch.testing.assert_close(target, guided, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("g", [1.0, 2.5])
def test_guided_velocity_is_the_guidance_formula(g):
    """Against separate conditional and unconditional calls; at g = 1 the formula is the conditional velocity, which
    guided_velocity computes without the unconditional branch."""
    pipe = tiny_pipeline()
    x, tau = torch.randn(2, 4, 8, 4, 4), torch.rand(8)
    with torch.no_grad():
        text, mask = pipe.encode_prompt(["a red circle", "a blue square"])
        uncond, uncond_mask = pipe.encode_prompt(["", ""])
        cond = pipe.transformer(x, tau.expand(2, -1), text, mask).sample
        empty = pipe.transformer(x, tau.expand(2, -1), uncond, uncond_mask).sample
        guided = guided_velocity(pipe.transformer, x, tau, text, mask, uncond, uncond_mask, g)
    torch.testing.assert_close(guided, empty + g * (cond - empty), atol=1e-5, rtol=1e-5)
    assert (cond - empty).abs().max() > 0.1  # the branches differ: a wrong g would show


@pytest.mark.parametrize("student_micro_steps", [1, 2])
def test_distill_loss_is_zero_for_a_student_that_covers_each_segment_in_one_step(monkeypatch, student_micro_steps):
    """The loss's target recomputed by hand, with K = 2 reference frames: from the start of the student's step (each
    chunk's segment start for s' = 1), s / s' guided teacher steps, divided by their dtau. On the reference frames
    dtau = 0 and this student answers 0 / 0 = NaN: they give no signal and must not reach the loss."""
    pipe = tiny_pipeline()
    monkeypatch.setattr(pipe.scheduler, "training_partitions", lambda: [Partition(2, 3, 2, 1)])  # K 2, N 3, c 2
    taus, g = pipe.scheduler.taus(Partition(2, 3, 2, 2)), 2.5  # T = 6 levels
    start = torch.tensor([6, 6, 4, 4, 2, 2, 0, 0])  # reference frames clean, each chunk at its segment's start
    moves = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1])
    teacher_steps = 2 // student_micro_steps
    captions = ["a red circle moving left", "a blue square moving up"]
    with torch.no_grad():
        uncond, uncond_mask = pipe.encode_prompt(["", ""])
    seen, offsets = [], set()

    def one_step_student(x, tau, text, mask):
        seen.append(x)
        levels = (taus.view(-1, 1) == tau[0].view(1, -1)).float().argmax(0)  # where the buffer stands, from its tau
        offset = levels - start
        assert torch.equal(offset, offset[-1] * moves) and 0 <= offset[-1] < 2  # the same step in every chunk
        offsets.add(int(offset[-1]))
        torch.testing.assert_close(tau, taus[levels].expand(2, -1))
        y = guided_euler_steps(pipe, x, levels, moves, teacher_steps, taus, text, mask, uncond, uncond_mask, g)
        dtau = taus[levels + teacher_steps * moves] - taus[levels]
        return SimpleNamespace(sample=(y - x) / dtau.view(1, 1, -1, 1, 1))

    x1 = torch.randn(2, 4, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    args = SimpleNamespace(micro_steps=2, guidance_scale=g, student_micro_steps=student_micro_steps, object_weight=0.0)

    def loss(student, seed=0):
        return distill_loss(student, pipe.transformer, pipe.text_encoder, pipe.tokenizer, pipe.scheduler,
                            (x1, captions), args, TrainState(seed))

    for seed in range(6):
        assert loss(one_step_student, seed) < 1e-10
    assert offsets == set(range(student_micro_steps))  # every one of the student's steps is drawn
    torch.testing.assert_close(seen[0][:, :, :2], x1[:, :, :2])  # the reference frames are the clean latents
    untrained = loss(copy.deepcopy(pipe.transformer).train())  # a student that is not the teacher's shortcut
    assert torch.isfinite(untrained) and untrained > 1e-3


def test_distillation_lowers_its_loss_and_exports_a_one_step_student(tmp_path):
    teacher = tiny_pipeline()
    teacher.register_to_config(switch_strength=0.625)
    teacher.save_pretrained(tmp_path / "teacher")
    main(["--teacher", str(tmp_path / "teacher"), "--output-dir", str(tmp_path / "run"), "--side", "16",
          "--micro-steps", "3", "--guidance-scale", "2", "--steps", "40", "--lr", "2e-3", "--batch-size", "4",
          "--warmup-steps", "1", "--log-every", "1", "--pool-size", "8", "--pool-clip-frames", "8"])
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "run" / "distill-loss.csv").open())]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses
    student = StreamDiTPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert student.scheduler.config.micro_steps == 1 and student.config.guidance_scale == 1.0
    assert student.config.switch_strength == 0.625  # a switch works on the buffer, whoever denoises it


def test_distillation_exports_a_student_with_its_micro_steps_and_checks_them(tmp_path):
    teacher = tiny_pipeline()
    teacher.save_pretrained(tmp_path / "teacher")
    args = ["--teacher", str(tmp_path / "teacher"), "--output-dir", str(tmp_path / "run"), "--side", "16",
            "--micro-steps", "4", "--guidance-scale", "2", "--steps", "4", "--lr", "2e-3", "--batch-size", "2",
            "--warmup-steps", "1", "--log-every", "1", "--pool-size", "4", "--pool-clip-frames", "8"]
    main([*args, "--student-micro-steps", "2"])
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "run" / "distill-loss.csv").open())]
    assert len(losses) == 4 and all(np.isfinite(losses))
    student = StreamDiTPipeline.from_pretrained(tmp_path / "run" / "pipeline")
    assert student.scheduler.config.micro_steps == 2 and student.config.guidance_scale == 1.0
    with pytest.raises(ValueError, match="--student-micro-steps 3"):
        main([*args, "--student-micro-steps", "3"])
    main([*args, "--student-micro-steps", "2", "--teacher-buffers", "1", "--steps", "6", "--teacher-streams", "1",
          "--stream-chunks", "2", "--switch-strength", "1"])  # the teacher's streams in the student's steps: resumed
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "run" / "distill-loss.csv").open())]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert StreamDiTPipeline.from_pretrained(tmp_path / "run" / "pipeline").config.switch_strength == 1.0
    with pytest.raises(ValueError, match="--switch-strength 1.5"):
        main([*args, "--switch-strength", "1.5"])


@pytest.mark.parametrize("reference_frames", [0, 2])
def test_teacher_streams_give_the_teachers_own_buffers_and_its_guided_steps(reference_frames):
    """Each segment starts where the teacher's stream stands after a release (every chunk at its segment start) and
    ends where s guided micro steps take it: the same as `teacher_targets` from that buffer. Streams alternate, each
    one's next segment starts from its last one's end shifted by a chunk, and a stream restarts after `chunks`."""
    pipe = tiny_pipeline()
    pipe.scheduler.register_to_config(reference_frames=reference_frames)
    s, g = 3, 2.5
    streams = TeacherStreams(pipe, 2, s, g, streams=2, chunks=2)
    partition = pipe.scheduler.partition(None, s, None)
    taus, c = pipe.scheduler.taus(partition), partition.chunk_size
    with torch.no_grad():
        uncond, uncond_mask = pipe.encode_prompt(["", ""])
    rng = np.random.default_rng(0)
    segments = [streams.segment(rng) for _ in range(6)]
    for x_start, tau_start, x_end, tau_end, text, mask in segments:
        torch.testing.assert_close(tau_start, taus[segment_starts(partition)])
        torch.testing.assert_close(tau_end, taus[partition.caps()])
        expected, _, _ = teacher_targets(pipe.transformer, pipe.scheduler, x_start, partition, text, mask, uncond,
                                         uncond_mask, g)
        torch.testing.assert_close(x_end, expected, atol=1e-5, rtol=1e-5)
        assert (x_end - x_start).abs().max() > 0.01
    for first, second in ((0, 2), (1, 3)):  # the same stream, one chunk on
        torch.testing.assert_close(segments[second][0][:, :, :-c], segments[first][2][:, :, c:])
        assert torch.equal(segments[second][4], segments[first][4])  # its captions
    assert not torch.equal(segments[4][4], segments[0][4])  # after 2 chunks: a new stream, new captions
    assert not torch.equal(segments[1][4], segments[0][4])  # the two streams have their own


def check_teachers_steps(pipe, segments, s, g, student_micro_steps):
    """Each segment, the student's step j = i mod s' of a stream, starts at `student_levels` of that step and ends
    where s / s' of the teacher's guided micro steps take it (`teacher_targets`). Returns each one's levels."""
    partition = pipe.scheduler.partition(None, s, None)
    taus, steps = pipe.scheduler.taus(partition), s // student_micro_steps
    with torch.no_grad():
        uncond, uncond_mask = pipe.encode_prompt(["", ""])
    all_levels = []
    for i, (x_start, tau_start, x_end, tau_end, text, mask) in enumerate(segments):
        levels = student_levels(partition, i % student_micro_steps, student_micro_steps)
        torch.testing.assert_close(tau_start, taus[levels])
        expected, _, expected_tau_end = teacher_targets(pipe.transformer, pipe.scheduler, x_start, partition, text,
                                                        mask, uncond, uncond_mask, g, levels, steps)
        torch.testing.assert_close(tau_end, expected_tau_end)
        torch.testing.assert_close(x_end, expected, atol=1e-5, rtol=1e-5)
        all_levels.append(levels)
    return all_levels


@pytest.mark.parametrize("student_micro_steps", [2, 4])
def test_teacher_streams_in_the_students_steps_give_the_teachers_guided_micro_steps(student_micro_steps):
    """With s' > 1 a segment is one of the student's steps: it starts at `student_levels` of that step (the stream
    mid-chunk) and ends where s / s' guided micro steps take it, as `teacher_targets` computes; only the last of a
    chunk's s' steps releases. With s' = s the target velocity (x_end - x_start) / dtau is the teacher's guided
    velocity at the start."""
    pipe = tiny_pipeline()
    s, g = 4, 2.5
    streams = TeacherStreams(pipe, 2, s, g, streams=1, chunks=3, student_micro_steps=student_micro_steps)
    with pytest.raises(ValueError, match="student_micro_steps=3"):
        TeacherStreams(pipe, 2, s, g, student_micro_steps=3)
    c = pipe.scheduler.config.chunk_size
    rng = np.random.default_rng(0)
    segments = [streams.segment(rng) for _ in range(2 * student_micro_steps)]  # two chunks of one stream
    check_teachers_steps(pipe, segments, s, g, student_micro_steps)
    with torch.no_grad():
        uncond, uncond_mask = pipe.encode_prompt(["", ""])
    for i, (x_start, tau_start, x_end, tau_end, text, mask) in enumerate(segments):
        if student_micro_steps == s:
            velocity = guided_velocity(pipe.transformer, x_start, tau_start, text, mask, uncond, uncond_mask, g)
            dtau = (tau_end - tau_start).view(1, 1, -1, 1, 1)
            moving = dtau.flatten() > 0
            torch.testing.assert_close(((x_end - x_start) / dtau)[:, :, moving], velocity[:, :, moving],
                                       atol=1e-4, rtol=1e-4)
        if i + 1 < len(segments):  # the next step starts where this one ended, shifted by a chunk after a release
            shifted = x_end[:, :, c:] if i % student_micro_steps == student_micro_steps - 1 else x_end
            torch.testing.assert_close(segments[i + 1][0][:, :, : shifted.shape[2]], shifted)


@pytest.mark.parametrize("reference_frames,student_micro_steps", [(0, 1), (0, 2), (2, 2)])
def test_teacher_streams_with_startup_give_the_start_ups_steps_then_the_stream(reference_frames, student_micro_steps):
    """With `startup` a stream's first segments are its start-up: every frame rises from pure noise by s / s' of the
    teacher's guided micro steps at a time (`teacher_targets` from those levels), each stopping at its cap, until the
    last one releases chunk 0; then the stream's segments follow, as without it."""
    pipe = tiny_pipeline()
    pipe.scheduler.register_to_config(reference_frames=reference_frames)
    s, g = 4, 2.5
    steps = s // student_micro_steps
    partition = pipe.scheduler.partition(None, s, None)
    taus, caps = pipe.scheduler.taus(partition), partition.caps()
    startup = -(-int(caps.max()) // steps)  # the start-up's segments: until chunk 0 reaches its cap
    streams = TeacherStreams(pipe, 2, s, g, streams=1, chunks=2, student_micro_steps=student_micro_steps,
                             startup=True)
    with torch.no_grad():
        uncond, uncond_mask = pipe.encode_prompt(["", ""])
    rng = np.random.default_rng(0)
    segments = [streams.segment(rng) for _ in range(startup + student_micro_steps)]
    assert torch.equal(segments[0][1], taus[torch.zeros_like(caps)])  # pure noise everywhere
    for i, (x_start, tau_start, x_end, tau_end, text, mask) in enumerate(segments):
        levels = (torch.minimum(torch.full_like(caps, i * steps), caps) if i < startup
                  else student_levels(partition, i - startup, student_micro_steps))
        torch.testing.assert_close(tau_start, taus[levels])
        expected, _, expected_tau_end = teacher_targets(pipe.transformer, pipe.scheduler, x_start, partition, text,
                                                        mask, uncond, uncond_mask, g, levels, steps)
        k = reference_frames if i == startup - 1 else 0  # the release drops where the start-up took them
        torch.testing.assert_close(tau_end[:k], tau_start[:k])
        torch.testing.assert_close(tau_end[k:], expected_tau_end[k:])
        torch.testing.assert_close(x_end[:, :, k:], expected[:, :, k:], atol=1e-5, rtol=1e-5)
        if 0 < i < startup:  # the start-up goes on from where the last segment ended
            torch.testing.assert_close(x_start, segments[i - 1][2])
    c = partition.chunk_size
    torch.testing.assert_close(segments[startup][0][:, :, :-c], segments[startup - 1][2][:, :, c:])  # released
    plain = TeacherStreams(pipe, 2, s, g, streams=1, chunks=2, student_micro_steps=student_micro_steps)
    first = plain.segment(np.random.default_rng(0))  # without startup: the first segment is after the release
    torch.testing.assert_close(first[1], taus[student_levels(partition, 0, student_micro_steps)])


@pytest.mark.parametrize("student_micro_steps", [1, 2])
def test_student_streams_give_the_students_own_buffers_and_the_teachers_guided_steps_from_there(student_micro_steps):
    """On-policy: a segment starts where the student's own stream stands at one of its steps (the teacher's level s / s'
    times the student's), its target is the teacher's s / s' guided micro steps from there (`teacher_targets`), and
    the next segment starts where the student's own step went, not where the teacher's did."""
    pipe = tiny_pipeline()
    student = copy.deepcopy(pipe.transformer)
    with torch.no_grad():
        for param in student.parameters():  # a student that is not the teacher
            param.add_(0.05 * torch.randn_like(param))
    s, g = 4, 2.5
    streams = StudentStreams(pipe, student, 2, s, g, streams=1, chunks=3, student_micro_steps=student_micro_steps)
    student_partition = pipe.scheduler.partition(None, student_micro_steps, None)
    student_taus, c = pipe.scheduler.taus(student_partition), student_partition.chunk_size
    rng = np.random.default_rng(0)
    segments = [streams.segment(rng) for _ in range(2 * student_micro_steps)]  # two chunks of one stream
    all_levels = check_teachers_steps(pipe, segments, s, g, student_micro_steps)
    for i, ((x_start, tau_start, x_end, _, text, mask), levels) in enumerate(zip(segments[:-1], all_levels)):
        with torch.no_grad():  # the student's own Euler step from x_start, on its grid
            next_tau = student_taus[torch.minimum(levels // (s // student_micro_steps) + 1, student_partition.caps())]
            velocity = student(x_start, tau_start.expand(2, -1), text, mask).sample.float()
            went = pipe.scheduler.step(velocity, x_start, tau_start, next_tau).prev_sample
        released = i % student_micro_steps == student_micro_steps - 1
        shifted, teachers = (went[:, :, c:], x_end[:, :, c:]) if released else (went, x_end)
        following = segments[i + 1][0][:, :, : shifted.shape[2]]
        torch.testing.assert_close(following, shifted, atol=1e-5, rtol=1e-5)
        assert (following - teachers).abs().max() > 1e-3


def test_distillation_on_teacher_and_student_buffers_runs_and_checks_their_fractions(tmp_path):
    teacher = tiny_pipeline()
    teacher.save_pretrained(tmp_path / "teacher")
    args = ["--teacher", str(tmp_path / "teacher"), "--output-dir", str(tmp_path / "run"), "--side", "16",
            "--micro-steps", "2", "--guidance-scale", "2", "--steps", "6", "--lr", "2e-3", "--batch-size", "2",
            "--warmup-steps", "1", "--log-every", "1", "--pool-size", "4", "--pool-clip-frames", "8",
            "--teacher-streams", "2", "--stream-chunks", "2"]
    main([*args, "--teacher-buffers", "1"])
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "run" / "distill-loss.csv").open())]
    assert len(losses) == 6 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="1.5"):
        main([*args, "--teacher-buffers", "1.5"])
    main([*args, "--teacher-buffers", "0.5", "--student-buffers", "0.5", "--output-dir", str(tmp_path / "on-policy")])
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "on-policy" / "distill-loss.csv").open())]
    assert len(losses) == 6 and all(np.isfinite(losses))
    with pytest.raises(ValueError, match="--student-buffers 0.75 add up to more than 1"):
        main([*args, "--teacher-buffers", "0.5", "--student-buffers", "0.75"])


def test_the_object_weight_weighs_the_segment_error_where_the_target_points_at_the_object():
    """The clean clip a segment points at, x_end + (1 - tau_end) target, shows the object in a 2x2 patch of every
    moving frame; a student off by 1 there (or only on the background) has its error weighted 1 + w (or 1), over
    weights of mean 1. Reference frames (dtau = 0) stay out, weight or not."""
    b, C, F, h, w = 2, 4, 4, 4, 4
    tau_start, tau_end = torch.tensor([1.0, 1.0, 0.25, 0.5]), torch.tensor([1.0, 1.0, 0.5, 0.75])  # 2 reference frames
    x_start = torch.randn(b, C, F, h, w, generator=torch.Generator().manual_seed(0))
    clean = torch.zeros(b, C, F, h, w)
    clean[..., :2, :2] = 3.0  # the object
    dtau = (tau_end - tau_start).view(1, 1, -1, 1, 1)
    target = (clean - x_start) / (1.0 - tau_start).view(1, 1, -1, 1, 1)  # straight at the clean clip
    x_end = x_start + dtau * target
    near = torch.zeros(1, 1, 1, h, w, dtype=torch.bool)
    near[..., :2, :2] = True
    for off, share in ((near, 4 / 16), (~near, 12 / 16)):  # the error on the object or on the background
        student = lambda x, tau, text, mask: SimpleNamespace(sample=target + off.float())  # noqa: E731
        plain = segment_loss(student, x_start, tau_start, x_end, tau_end, None, None)
        weighted = segment_loss(student, x_start, tau_start, x_end, tau_end, None, None, object_weight=9.0)
        mean_weight = (4 * 10 + 12 * 1) / 16
        torch.testing.assert_close(plain, torch.tensor(share))
        torch.testing.assert_close(weighted, torch.tensor(share * (10.0 if off is near else 1.0) / mean_weight))


def test_distillation_starts_its_student_from_another_pipelines_transformer(tmp_path):
    """--student-init: a shipped student distilled on, not the teacher again; a transformer of another shape is
    refused with what differs, and so is a negative --object-weight."""
    teacher, other = tiny_pipeline(), tiny_pipeline(seed=1)
    teacher.save_pretrained(tmp_path / "teacher")
    other.save_pretrained(tmp_path / "other")
    args = ["--teacher", str(tmp_path / "teacher"), "--output-dir", str(tmp_path / "run"), "--side", "16",
            "--micro-steps", "2", "--batch-size", "2", "--pool-size", "4", "--pool-clip-frames", "8"]
    main([*args, "--student-init", str(tmp_path / "other"), "--export-only"])
    exported = StreamDiTPipeline.from_pretrained(tmp_path / "run" / "pipeline").transformer.state_dict()
    for name, weights in other.transformer.state_dict().items():
        torch.testing.assert_close(exported[name], weights, msg=name)
    main([*args, "--student-init", str(tmp_path / "other"), "--object-weight", "4", "--steps", "3",
          "--log-every", "1", "--output-dir", str(tmp_path / "weighted")])
    losses = [float(r["loss"]) for r in csv.DictReader((tmp_path / "weighted" / "distill-loss.csv").open())]
    assert len(losses) == 3 and all(np.isfinite(losses))
    config = teacher.transformer.config
    wider = type(teacher.transformer).from_config({**config, "hidden_size": 2 * config.hidden_size})
    teacher.save_pretrained(tmp_path / "wider")
    wider.save_pretrained(tmp_path / "wider" / "transformer")
    with pytest.raises(ValueError, match="hidden_size"):
        main([*args, "--student-init", str(tmp_path / "wider"), "--export-only"])
    with pytest.raises(ValueError, match="--object-weight -1"):
        main([*args, "--object-weight", "-1"])
    with pytest.raises(ValueError, match="--student-layers 4: at most 2"):  # the tiny teacher's one pair of blocks
        main([*args, "--student-layers", "4"])


def test_a_deepened_student_computes_what_the_teacher_does_and_learns_in_its_new_blocks():
    """--student-layers: 6 blocks from a teacher's 4 (one new pair between its two pairs, the second shifted), the
    same velocity as the teacher's to float precision on a random buffer, and the new blocks take gradient."""
    teacher = randomize_zeros(from_preset("tiny", num_layers=4), seed=3).eval()
    student = deepened(teacher, 6).eval()
    assert [b.attn.shifted for b in student.blocks] == [False, True, False, True, False, True]
    g = torch.Generator().manual_seed(0)
    x, tau = torch.randn(2, 4, 8, 4, 4, generator=g), torch.rand(2, 8, generator=g)
    text, mask = torch.randn(2, 5, 16, generator=g), torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        torch.testing.assert_close(student(x, tau, text, mask).sample, teacher(x, tau, text, mask).sample)
    for old, new in ((0, 0), (1, 1), (2, 4), (3, 5)):  # the teacher's blocks, in order, around the new pair
        for (name, a), b in zip(teacher.blocks[old].state_dict().items(), student.blocks[new].state_dict().values()):
            torch.testing.assert_close(a, b, msg=name)
    student.train()
    student(x, tau, text, mask).sample.square().mean().backward()
    for j in (2, 3):
        assert student.blocks[j].adaLN_modulation[-1].weight.grad.abs().sum() > 0
        assert student.blocks[j].cross_attn.proj.weight.grad.abs().sum() > 0
    for layers in (5, 8):  # an odd number more, and more than a pair between each two of the teacher's pairs
        with pytest.raises(ValueError, match=f"--student-layers {layers}"):
            deepened(teacher, layers)


def test_the_shipped_student_is_the_default_models_with_its_own_transformer():
    """The student folder holds the default model's autoencoder and text encoder, its warm-up and, its own, a deeper
    switch (switch strength 1: 16 unguided micro steps, fewer NFEs than the default's 0.625) and the distilled
    transformer at s' = 4 micro steps without guidance. On two of the evaluation's prompts (its seeds) it draws every
    stated attribute, where the default model at the same 4 unguided micro steps misses the triangle in both: what
    distillation bought (README, Benchmarks)."""
    from streamdit import DEFAULT_MODEL, STUDENT_MODEL
    from streamdit.evaluate import evaluate_adherence

    teacher, student = StreamDiTPipeline.from_pretrained(DEFAULT_MODEL), StreamDiTPipeline.from_pretrained(STUDENT_MODEL)
    assert student.scheduler.config.micro_steps == 4 and student.config.guidance_scale == 1.0
    assert teacher.scheduler.config.micro_steps == 8 and teacher.config.guidance_scale == 3.0
    assert student.config.warmup_chunks == teacher.config.warmup_chunks
    assert (student.config.switch_strength, teacher.config.switch_strength) == (1.0, 0.625)  # README: switching
    for name in ("vae", "text_encoder"):
        ours, theirs = getattr(student, name).state_dict(), getattr(teacher, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(student.transformer.config) == public(teacher.transformer.config)
    ours, theirs = student.transformer.state_dict(), teacher.transformer.state_dict()
    assert ours.keys() == theirs.keys() and not all(torch.equal(ours[k], theirs[k]) for k in ours)
    prompts = {1002: "a small red triangle moving right on a black background", 1013: "a blue triangle moving left"}
    for seed, prompt in prompts.items():
        (row,), _ = evaluate_adherence(student, [prompt], 2.0, seed)
        assert all(row["adherence"].values()), row
        (row,), _ = evaluate_adherence(teacher, [prompt], 2.0, seed, micro_steps=4, guidance_scale=1.0)
        assert not row["adherence"]["shape"], row
