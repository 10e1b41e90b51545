"""Multistep distillation (paper Sec. 4.2): a student that covers each chunk's whole noise segment in one step.

    python -m streamdit.distill --teacher runs/shapes/pipeline --output-dir runs/distill --micro-steps 8 \
        --guidance-scale 3 --steps 4000

The teacher runs s micro steps per segment with classifier-free guidance; the student (initialised from the teacher)
runs one step per segment without guidance, so a stream costs one function evaluation per released chunk instead of
2 s. Distillation happens inside each of the N segments at once: for a buffer whose chunks all sit at the start of
their segments (a partition drawn from the mixed set, a point drawn from the forward process), the target is where
the teacher's s guided Euler steps take every chunk: the end of its segment. Step and guidance distillation together.
With --teacher-buffers p, that fraction of batches are instead the buffers of the teacher's own streams
(`TeacherStreams`), as a stream meets them: a chunk at a segment start has been made by the previous segments' guided
steps, not drawn from the forward process, and guidance moves it off the forward process's marginals. With s' > 1
such a batch is one of the student's steps of the teacher's stream, its target the teacher's s / s' guided micro
steps from there (the shipped student: s' = 4, --teacher-buffers 0.75). With --student-buffers q, that fraction are
the buffers of the student's own streams (`StudentStreams`, on-policy), with the teacher's targets from there.
With --student-micro-steps s' the student takes s' steps per segment instead of one, each where s / s' guided
teacher steps go (s' = s is guidance distillation alone): fewer steps to learn for a small model, at s' function
evaluations per released chunk instead of 2 s.
With --object-weight w the segment error is weighted up near the object, as training's is; --student-init starts
the student from another pipeline's transformer (a shipped student, distilled on) instead of the teacher's, and
--student-layers deepens it with new blocks that start as the identity.
Resumable like training (same checkpoints, EMA, CSV/PNG loss); the result is a pipeline folder whose defaults are
micro_steps=s' and guidance_scale=1.
"""

import argparse
import copy
from pathlib import Path

import torch
from accelerate import Accelerator

from .data import caption, sample_scene
from .pipeline import StreamDiTPipeline, guided_velocity
from .scheduler import StreamBuffer
from .text import tokenize
from .train import LatentPool, add_loop_arguments, flow_matching_loss, run_stage
from .transformer import StreamDiTTransformer3DModel


def segment_starts(partition):
    """(F,) level at the start of each frame's segment: chunk n (0 = cleanest) starts at (N - 1 - n) * s."""
    starts = partition.caps() - partition.micro_steps
    starts[: partition.reference_frames] = partition.num_steps  # reference frames are clean and stay so
    return starts


def student_levels(partition, student_step, student_micro_steps):
    """(F,) teacher level at the start of the student's micro step j (of s') in every chunk's segment: each student
    step covers s / s' of the teacher's. Reference frames stay clean."""
    starts = segment_starts(partition)
    moving = starts < partition.num_steps
    starts[moving] += student_step * (partition.micro_steps // student_micro_steps)
    return starts


@torch.no_grad()
def teacher_targets(teacher, scheduler, x_start, partition, text, mask, uncond, uncond_mask, guidance_scale,
                    levels=None, steps=None):
    """Where the teacher's guided micro steps take a buffer: by default s steps from every chunk's segment start.

    Uses the stream's own buffer (StreamBuffer): with every chunk at its segment start, s micro steps move each one
    exactly to the top of its segment (its cap). A student with s' micro steps per segment starts at `levels`
    (`student_levels`) and learns `steps` = s / s' of them. Returns (x_end, tau_start (F,), tau_end (F,)).
    """
    taus = scheduler.taus(partition).to(x_start.device)
    buffer = StreamBuffer(x_start, partition, taus)
    buffer.to(x_start.device)
    buffer.levels = (segment_starts(partition) if levels is None else levels).to(x_start.device)
    tau_start = buffer.tau()
    for _ in range(partition.micro_steps if steps is None else steps):
        tau, next_tau = buffer.tau(), buffer.next_tau()
        velocity = guided_velocity(teacher, buffer.latents, tau, text, mask, uncond, uncond_mask, guidance_scale)
        buffer.update(scheduler.step(velocity, buffer.latents, tau, next_tau).prev_sample)
    return buffer.latents, tau_start, buffer.tau()


class TeacherStreams:
    """The teacher's own streams, `streams` batches of `batch_size` random captions each, taken in turn so that
    consecutive batches come from different streams. Each `segment` is one of the student's s' steps of a stream: the
    buffer where the teacher's stream stands at the start of a student's step (after a release: every chunk at its
    segment start) and where the teacher's s / s' guided micro steps took it, shifted by the release when that step
    ends the chunk. With s' = 1 a segment is a whole chunk; with s' = s it is one micro step, whose target is the
    teacher's guided velocity there. A stream starts afresh (new captions, pure noise, the start-up) after `chunks`
    chunks. The start-up is skipped (the student learns it from the forward process), or with `startup` its steps
    are segments too: every chunk rises from pure noise together, each stopping at its cap, until chunk 0 is clean.
    That is where a stream decides its object's size and shape, which later chunks carry on.
    Not checkpointed: a resumed run starts new streams, from the data RNG."""

    def __init__(self, pipe, batch_size, micro_steps, guidance_scale, streams=4, chunks=16, student_micro_steps=1,
                 startup=False):
        if micro_steps % student_micro_steps:
            raise ValueError(f"student_micro_steps={student_micro_steps} must divide micro_steps={micro_steps}")
        self.pipe, self.batch_size, self.micro_steps, self.guidance_scale = pipe, batch_size, micro_steps, guidance_scale
        self.steps = micro_steps // student_micro_steps  # the teacher's micro steps in one of the student's
        self.chunks, self.startup = chunks, startup
        self.states, self.turn = [None] * streams, 0
        # how the streams run: the teacher's micro steps and guidance (the student's in StudentStreams)
        self.stream_micro_steps, self.stream_guidance = micro_steps, guidance_scale

    def _start(self, rng):
        captions = [caption(sample_scene(rng), rng) for _ in range(self.batch_size)]
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        state = self.pipe.prepare_stream(captions, micro_steps=self.stream_micro_steps,
                                         guidance_scale=self.stream_guidance, generator=generator, switch_strength=0.0,
                                         warmup_chunks=0)
        released = None
        while released is None and not self.startup:  # the start-up: a uniform generation until chunk 0 is clean
            state, released = self.pipe.advance(state)
        return state

    def _stream(self, rng):
        """The next stream in turn, started afresh once it has run `chunks` chunks."""
        i, self.turn = self.turn, (self.turn + 1) % len(self.states)
        state = self.states[i]
        if state is None or (state.micro_step
                             >= (self.chunks + state.buffer.partition.num_chunks) * self.stream_micro_steps):
            state = self.states[i] = self._start(rng)
        return state

    def segment(self, rng):
        """-> x_start, tau_start (F,), x_end, tau_end (F,), text (b, L, E), mask (b, L) of one chunk of a stream."""
        state = self._stream(rng)
        buffer = state.buffer  # the same object after the micro steps; they replace its tensors, never write in them
        x_start, tau_start, levels = buffer.latents, buffer.tau(), buffer.levels
        tau_end = buffer.taus[torch.minimum(levels + self.steps, buffer.caps)]
        ends_chunk = bool((levels + self.steps >= buffer.caps).all())
        released = None
        for _ in range(self.steps):
            state, released = self.pipe.advance(state)
        if (released is not None) != ends_chunk:
            raise RuntimeError(f"the teacher's stream {'did not release' if ends_chunk else 'released'} a chunk "
                               f"after {self.steps} micro steps from levels {levels.tolist()}")
        if released is None:
            return x_start, tau_start, buffer.latents, tau_end, state.prompt_embeds, state.prompt_mask
        # The buffer just before the release: its first c frames (reference frames, then the released chunk) and
        # the rest, which the release shifted to the front.
        # Reference frames are clean and stay put, except in the start-up, whose release drops where its last
        # steps took them: there they count as still (dtau = 0), as in every later segment.
        k, c = buffer.partition.reference_frames, buffer.partition.chunk_size
        front = torch.cat([x_start[:, :, :k].to(released.device), released], dim=2)[:, :, :c]
        x_end = torch.cat([front, buffer.latents[:, :, :-c].to(released.device)], dim=2)
        tau_end = torch.cat([tau_start[:k], tau_end[k:]])
        return x_start, tau_start, x_end, tau_end, state.prompt_embeds, state.prompt_mask


class StudentStreams(TeacherStreams):
    """The student's own streams (on-policy distillation, as DAgger): each `segment` is the buffer where a stream of
    the student stands at the start of one of its micro steps, and its target is where the teacher's s / s' guided
    micro steps take that buffer. The teacher's streams show the student only buffers the teacher makes; a stream of
    the student drifts, step by step, into buffers of its own, and these teach it the way back. The stream then moves
    on by the student's own step (its current weights, no guidance), not the teacher's. The student's level l on its
    grid of N s' steps is the teacher's l s / s' on its grid of N s (both uniform in u, the same shift)."""

    def __init__(self, pipe, student, batch_size, micro_steps, guidance_scale, streams=4, chunks=16,
                 student_micro_steps=1, startup=False):
        super().__init__(pipe, batch_size, micro_steps, guidance_scale, streams, chunks, student_micro_steps, startup)
        self.teacher = pipe.transformer
        self.pipe = StreamDiTPipeline(student, pipe.scheduler, pipe.vae, pipe.text_encoder, pipe.tokenizer)
        self.pipe.set_progress_bar_config(disable=True)
        self.stream_micro_steps, self.stream_guidance = student_micro_steps, 1.0
        self.teacher_partition = pipe.scheduler.partition(None, micro_steps, None)  # the streams' buffer, s steps
        with torch.no_grad():
            self.uncond = pipe.encode_prompt([""] * batch_size)  # (b, L, E), (b, L): every segment's batch

    @torch.no_grad()
    def segment(self, rng):
        """-> x_start, tau_start (F,), x_end, tau_end (F,), text (b, L, E), mask (b, L) of one student's step."""
        state = self._stream(rng)
        x_start, levels = state.buffer.latents, state.buffer.levels
        x_end, tau_start, tau_end = teacher_targets(self.teacher, self.pipe.scheduler, x_start, self.teacher_partition,
                                                    state.prompt_embeds, state.prompt_mask, *self.uncond,
                                                    self.guidance_scale, levels * self.steps, self.steps)
        text, mask = state.prompt_embeds, state.prompt_mask
        self.pipe.advance(state)  # the student's own step: where this stream goes next
        return x_start, tau_start, x_end, tau_end, text, mask


def segment_loss(student, x_start, tau_start, x_end, tau_end, text, mask, object_weight=0.0):
    """MSE between the student's velocity and the one that covers each segment in one step: (x_end - x_start) / dtau.
    Frames that do not move (reference frames, dtau = 0) give no signal. With `object_weight`, latents near the
    object weigh 1 + object_weight (`flow_matching_loss`), found on the clean clip the target points at: x_end +
    (1 - tau_end) target, Eq. 5's X1 up to sigma_min X0 (a stream's buffer has no true clip to look at)."""
    dtau = (tau_end - tau_start).view(1, 1, -1, 1, 1)
    moving = dtau.flatten() > 0
    target = (x_end - x_start) / dtau.clamp(min=1e-8)  # (b, C, F, h, w)
    velocity = student(x_start, tau_start.expand(x_start.shape[0], -1), text, mask).sample.float()
    clean = x_end + (1.0 - tau_end).view(1, 1, -1, 1, 1) * target  # (b, C, F, h, w): where the segment points
    return flow_matching_loss(velocity[:, :, moving], target[:, :, moving], clean[:, :, moving], object_weight)


def distill_loss(student, teacher, text_encoder, tokenizer, scheduler, batch, args, state):
    """`segment_loss` on a buffer drawn from the forward process, every chunk at its segment start (or, for a
    student with s' > 1 micro steps per segment, at the start of one of its s' steps, the same one in every chunk,
    as in a stream)."""
    x1, captions = batch  # latents (b, C, F, H, W), captions
    partitions = scheduler.training_partitions()
    base = partitions[state.rng.integers(len(partitions))]
    partition = type(base)(base.reference_frames, base.num_chunks, base.chunk_size, args.micro_steps)
    generator = torch.Generator().manual_seed(int(state.rng.integers(2**62)))
    noise = torch.randn(x1.shape, generator=generator).to(x1.device)
    with torch.no_grad():
        ids, mask = tokenize(tokenizer, captions)
        text = text_encoder(ids.to(x1.device), mask.to(x1.device))
        empty_ids, empty_mask = tokenize(tokenizer, [""] * len(captions))
        uncond = text_encoder(empty_ids.to(x1.device), empty_mask.to(x1.device))
        student_steps = args.student_micro_steps
        # integers(1) draws nothing, so s' = 1 runs see the same data as before s' existed
        levels = student_levels(partition, int(state.rng.integers(student_steps)), student_steps)
        tau_start = scheduler.taus(partition).to(x1.device)[levels.to(x1.device)]
        x_start = scheduler.add_noise(x1, noise, tau_start)  # the forward process at each step's start
        x_end, tau_start, tau_end = teacher_targets(teacher, scheduler, x_start, partition, text, mask.to(x1.device),
                                                    uncond, empty_mask.to(x1.device), args.guidance_scale, levels,
                                                    args.micro_steps // student_steps)
    return segment_loss(student, x_start, tau_start, x_end, tau_end, text, mask.to(x1.device), args.object_weight)


def initial_student(path, teacher):
    """The transformer of the pipeline at `path`, which must have the teacher's architecture: the student is the
    teacher's network, and its text side and autoencoder are the teacher's."""
    student = StreamDiTTransformer3DModel.from_pretrained(path, subfolder="transformer")
    changed = sorted(k for k in {**student.config, **teacher.config}
                     if not k.startswith("_") and student.config.get(k) != teacher.config.get(k))  # not "_name_or_path"
    if changed:
        raise ValueError(f"--student-init {path}: its transformer differs from the teacher's in {changed}")
    return student.to(next(teacher.parameters()).device)


def deepened(transformer, num_layers):
    """`transformer` with blocks added to reach `num_layers`, computing what it computed: a student with more
    capacity for the guided velocity that starts as the teacher. New blocks come in pairs (the second shifted, so
    every block keeps its window shift) between the old pairs, spread evenly; each starts as the identity, its
    adaLN-Zero gates and its cross-attention's output at zero."""
    old = transformer.config.num_layers
    if num_layers < old or (num_layers - old) % 2 or old % 2:
        raise ValueError(f"--student-layers {num_layers} must add an even number of blocks to the teacher's {old} "
                         "(blocks come in pairs, the second shifted)")
    deeper = type(transformer).from_config(transformer.config, num_layers=num_layers)
    pairs, new_pairs = old // 2, (num_layers - old) // 2
    if new_pairs > pairs - 1:
        raise ValueError(f"--student-layers {num_layers}: at most {2 * old - 2}, one new pair between each two of the "
                         f"teacher's {pairs} pairs of blocks")
    between = {round((i + 1) * pairs / (new_pairs + 1)) for i in range(new_pairs)}  # old pairs before a new one
    order = []  # order[j]: the old block at position j, or None for a new one
    for pair in range(pairs):
        order += [2 * pair, 2 * pair + 1] + ([None, None] if pair + 1 in between else [])
    old_state = transformer.state_dict()
    state = {k: v for k, v in old_state.items() if not k.startswith("blocks.")}
    for j, i in enumerate(order):
        if i is None:  # a new block, made the identity
            block = deeper.blocks[j]
            torch.nn.init.zeros_(block.cross_attn.proj.weight)  # adaLN-Zero gates the rest; this is ungated
            torch.nn.init.zeros_(block.cross_attn.proj.bias)
            state |= {f"blocks.{j}.{k}": v for k, v in block.state_dict().items()}
        else:
            prefix = f"blocks.{i}."
            state |= {f"blocks.{j}." + k[len(prefix):]: v for k, v in old_state.items() if k.startswith(prefix)}
    deeper.load_state_dict(state)
    return deeper.to(next(transformer.parameters()).device)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m streamdit.distill", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="the trained pipeline folder (or Hub id)")
    add_loop_arguments(p, "runs/distill", batch_size=8, warmup_steps=50, pool_size=256, pool_refresh=2)
    p.add_argument("--micro-steps", type=int, default=8, help="the teacher's s")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="the teacher's classifier-free guidance")
    p.add_argument("--student-micro-steps", type=int, default=1,
                   help="the student's s' (divides s): 1 is the paper's one step per segment; s is guidance "
                        "distillation alone")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--teacher-buffers", type=float, default=0.0,
                   help="fraction of batches taken from the teacher's own streams instead of the forward process")
    p.add_argument("--student-buffers", type=float, default=0.0,
                   help="fraction of batches taken from the student's own streams, with the teacher's targets there "
                        "(on-policy; the rest of the batches come from the forward process)")
    p.add_argument("--teacher-streams", type=int, default=4,
                   help="streams of --batch-size captions each, in turn (and as many of the student's)")
    p.add_argument("--stream-chunks", type=int, default=16, help="chunks a stream runs before a new one")
    p.add_argument("--stream-startup", action="store_true",
                   help="the streams' start-ups are segments too (default: skipped, learnt from the forward process)")
    p.add_argument("--object-weight", type=float, default=0.0,
                   help="weight the segment error up by this much on latents near the object (0: plain MSE), as "
                        "train's --object-weight: the object is what the prompt names and what a shape is made of")
    p.add_argument("--student-init", default=None,
                   help="a pipeline folder (or Hub id) whose transformer the student starts from, e.g. a shipped "
                        "student to distil on (default: the teacher's)")
    p.add_argument("--student-layers", type=int, default=None,
                   help="a deeper student: the teacher's blocks with new ones between them, each new one starting "
                        "as the identity (default: the teacher's depth)")
    p.add_argument("--switch-strength", type=float, default=None,
                   help="the student's stored switch strength (default: the teacher's); a student with fewer micro "
                        "steps pays less for a deeper switch")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    for name, fraction in (("--teacher-buffers", args.teacher_buffers), ("--student-buffers", args.student_buffers)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{name} {fraction} must be a fraction in [0, 1]")
    if args.teacher_buffers + args.student_buffers > 1.0:
        raise ValueError(f"--teacher-buffers {args.teacher_buffers} and --student-buffers {args.student_buffers} add "
                         "up to more than 1")
    s, s_student = args.micro_steps, args.student_micro_steps
    if s < 1 or s_student < 1 or s % s_student:
        raise ValueError(f"--student-micro-steps {s_student} must be a positive divisor of --micro-steps {s}")
    if args.switch_strength is not None and not 0.0 <= args.switch_strength <= 1.0:
        raise ValueError(f"--switch-strength {args.switch_strength} must be in [0, 1]")
    if args.object_weight < 0:
        raise ValueError(f"--object-weight {args.object_weight} must be at least 0")
    if args.export_only:
        args.steps = 0
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    pipe = StreamDiTPipeline.from_pretrained(args.teacher).to(accelerator.device)
    teacher = pipe.transformer.eval().requires_grad_(False)
    text_encoder = pipe.text_encoder.eval().requires_grad_(False)  # the student keeps the teacher's text encoder
    # the teacher's copy, or a loaded transformer, which is the student's own already
    student = copy.deepcopy(teacher) if args.student_init is None else initial_student(args.student_init, teacher)
    if args.student_layers is not None:
        student = deepened(student, args.student_layers)
    student.train().requires_grad_(True)
    vae, scheduler = pipe.vae.eval().requires_grad_(False), pipe.scheduler
    pool = LatentPool(vae, args.pool_size, args.pool_clip_frames * vae.temporal_compression, args.side)
    buffer_frames = scheduler.config.buffer_frames

    def make_batch(state):
        pool.refresh(state.rng, args.pool_refresh)
        return pool.sample(state.rng, args.batch_size, buffer_frames)

    streams = TeacherStreams(pipe, args.batch_size, args.micro_steps, args.guidance_scale, args.teacher_streams,
                             args.stream_chunks, s_student, args.stream_startup)
    own_streams = StudentStreams(pipe, student, args.batch_size, args.micro_steps, args.guidance_scale,
                                 args.teacher_streams, args.stream_chunks, s_student, args.stream_startup)

    def loss(trainable, batch, state):
        if args.teacher_buffers + args.student_buffers > 0:
            draw = state.rng.random()  # one draw, as before --student-buffers existed
            if draw < args.teacher_buffers:
                return segment_loss(trainable[0], *streams.segment(state.rng), args.object_weight)
            if draw < args.teacher_buffers + args.student_buffers:
                return segment_loss(trainable[0], *own_streams.segment(state.rng), args.object_weight)
        return distill_loss(trainable[0], teacher, text_encoder, pipe.tokenizer, scheduler, batch, args, state)

    (student,) = run_stage("distill", args, accelerator, [student], loss, make_batch, args.steps, args.lr)
    if accelerator.is_main_process:
        scheduler.register_to_config(micro_steps=s_student)
        student_pipe = StreamDiTPipeline(student.eval(), scheduler, vae, text_encoder, pipe.tokenizer, guidance_scale=1.0,
                                         switch_strength=(pipe.config.switch_strength if args.switch_strength is None
                                                          else args.switch_strength),
                                         warmup_chunks=pipe.config.warmup_chunks)
        student_pipe.save_pretrained(out / "pipeline")
        accelerator.print(f"saved the student pipeline to {out / 'pipeline'}")


if __name__ == "__main__":
    main()
