"""Benchmarks, each printed as a markdown table.

`python -m streamdit.benchmark attention` times the transformer's forward pass against buffer length, with window
attention and with full attention (a window that covers the whole buffer). Window attention costs the same per frame
however long the buffer (linear growth); full attention's cost per frame grows with the buffer (quadratic overall).

`python -m streamdit.benchmark stream --teacher PATH [--student PATH]` measures what multistep distillation buys, in
one run on one machine. Rows: the teacher at its stored defaults (its scheduler's s micro steps, its guidance scale),
the student at its own (s' micro steps, 1 in the paper, no guidance) and, for reference, the undistilled teacher
without guidance at one micro step and at the student's s'. Columns: transformer evaluations (NFEs) per released
chunk, and of the start-up; time to the first frame; generation frames per second after start-up; all-attribute
prompt adherence (streamdit.evaluate).
"""

import argparse
import platform
import time
from pathlib import Path

import torch

from .data import FPS
from .evaluate import evaluate_adherence, random_prompts, summarise
from .transformer import from_preset


def time_forward(model, frames, repeats, device):
    """Median seconds of one forward pass over a buffer of `frames` latent frames at the model's frame size."""
    cfg = model.config
    _, h, w = cfg.sample_size
    x = torch.randn(1, cfg.in_channels, frames, h, w, device=device, dtype=model.dtype)
    tau = torch.rand(1, frames, device=device)
    text = torch.randn(1, 16, cfg.text_dim, device=device, dtype=model.dtype)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):  # the first run warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(x, tau, text)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def attention(args):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # never bf16 on CPU: ~300x slower here
    window = from_preset(args.preset).to(device).eval()
    full = from_preset(args.preset, window_size=(10**6,) * 3).to(device).eval()
    full.load_state_dict(window.state_dict())
    if dtype != torch.float32:
        window, full = window.to(dtype=dtype), full.to(dtype=dtype)
    _, h, w = window.config.sample_size
    tokens_per_frame = (h // window.config.patch_size) * (w // window.config.patch_size)
    print(f"# transformer forward time, preset {args.preset!r}, window {tuple(window.config.window_size)}")
    print(f"# device: {machine(device)}\n")
    print("| buffer frames | tokens | window attention (ms) | per frame | full attention (ms) | per frame |")
    print("|---:|---:|---:|---:|---:|---:|")
    for frames in args.frames:
        t_window = time_forward(window, frames, args.repeats, device)
        t_full = time_forward(full, frames, args.repeats, device)
        print(
            f"| {frames} | {frames * tokens_per_frame} | {1e3 * t_window:.0f} | {1e3 * t_window / frames:.1f} "
            f"| {1e3 * t_full:.0f} | {1e3 * t_full / frames:.1f} |",
            flush=True,
        )


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine()


def machine(device):
    """Where the numbers were measured: the device, the GPU's name, the CPU's and torch's CPU thread count."""
    gpu = f"{torch.cuda.get_device_name(device)}, " if device.type == "cuda" else ""
    return f"{device} ({gpu}{cpu_name()}, {torch.get_num_threads()} threads)"


class NFECounter:
    """Counts transformer function evaluations (NFEs) with a forward hook, one per sample evaluation: a forward pass
    over batch rows / `prompts` samples, so classifier-free guidance's batched conditional + unconditional pass over
    one prompt counts 2. Use as a context manager; the hook goes with it."""

    def __init__(self, transformer, prompts=1):
        self.transformer, self.prompts, self.count = transformer, prompts, 0

    def _hook(self, module, args, kwargs, output):
        latents = args[0] if args else kwargs["hidden_states"]  # (rows, C, F, H, W)
        self.count += latents.shape[0] / self.prompts

    def __enter__(self):
        self._handle = self.transformer.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def count_nfes(pipe, prompt, chunks=3, seed=0, **options):
    """(NFEs of the start-up until the first chunk, NFEs per released chunk after it).

    Counted on a sequential stream: a denoiser thread runs ahead of the chunks handed out, so a pipelined stream's
    count when a chunk arrives would hold part of the next chunk's."""
    with NFECounter(pipe.transformer) as counter, pipe.stream(
        prompt, generator=torch.Generator().manual_seed(seed), pipelined=False, **options
    ) as stream:
        next(stream)
        startup = counter.count
        for _ in range(chunks):
            next(stream)
        return startup, (counter.count - startup) / chunks


def time_stream(pipe, prompt, seconds, seed=0, pipelined=None, **options):
    """(seconds from starting the stream to its first decoded chunk, frames per second generated after that chunk)
    over `seconds` of video; the rate is NaN when the first chunk already holds them all."""
    target = int(seconds * FPS)
    start = time.perf_counter()
    with pipe.stream(prompt, generator=torch.Generator().manual_seed(seed), pipelined=pipelined, **options) as stream:
        frames, first, first_frames = 0, None, 0
        for chunk in stream:  # decoded frames are on the CPU: GPU work is done when a chunk arrives
            frames += len(chunk.frames)
            now = time.perf_counter()
            if first is None:
                first, first_frames = now, frames
            if frames >= target:
                break
    rate = (frames - first_frames) / (now - first) if frames > first_frames else float("nan")
    return first - start, rate


def stream_rows(teacher, student=None):
    """(name, pipeline, stream options) per row: the teacher and the student as stored (the student's s' micro
    steps, no guidance), then the undistilled teacher without guidance at one micro step and, for a student with
    s' > 1, at s': what the student costs, without distillation."""
    rows, steps = [("teacher", teacher, {})], [1]
    if student is not None:
        rows.append(("student", student, {}))
        if student.scheduler.config.micro_steps != 1:
            steps.append(student.scheduler.config.micro_steps)
    return rows + [(f"teacher, undistilled s={s}", teacher, dict(micro_steps=s, guidance_scale=1.0)) for s in steps]


def benchmark_row(pipe, options, prompts, seconds, seed, pipelined=None):
    s = options.get("micro_steps", pipe.scheduler.config.micro_steps)
    guidance = options.get("guidance_scale", pipe.config.guidance_scale)
    startup_nfes, chunk_nfes = count_nfes(pipe, prompts[0], seed=seed, **options)  # also warms the model up
    first_frame, fps = time_stream(pipe, prompts[0], seconds, seed, pipelined, **options)
    rows, _ = evaluate_adherence(pipe, prompts, seconds, seed, pipelined=pipelined, **options)
    summary = summarise(rows)  # with its 95% interval: 20 prompts pin adherence down to about +-20 points
    return dict(s=s, guidance=guidance, chunk_nfes=chunk_nfes, startup_nfes=startup_nfes, first_frame=first_frame,
                fps=fps, adherence=summary["all_attributes"],
                adherence_ci95=(summary["all_attributes_ci95_low"], summary["all_attributes_ci95_high"]))


def stream_table(results):
    lines = [
        "| model | micro steps s | guidance | NFEs per chunk | start-up NFEs | time to first frame (s) "
        "| generation FPS after start-up | all-attribute adherence | its 95% interval |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results:
        lines.append(
            f"| {name} | {r['s']} | {r['guidance']:g} | {r['chunk_nfes']:g} | {r['startup_nfes']:g} "
            f"| {r['first_frame']:.2f} | {r['fps']:.1f} | {r['adherence']:.3f} "
            f"| {r['adherence_ci95'][0]:.2f}-{r['adherence_ci95'][1]:.2f} |"
        )
    return "\n".join(lines)


def stream(args):
    from .pipeline import StreamDiTPipeline

    if args.seconds <= 0:
        raise ValueError(f"--seconds={args.seconds} must be positive")
    if args.prompts < 1:
        raise ValueError(f"--prompts={args.prompts} must be at least 1")
    device = torch.device(args.device)
    teacher = StreamDiTPipeline.from_pretrained(args.teacher).to(device)
    student = StreamDiTPipeline.from_pretrained(args.student).to(device) if args.student else None
    prompts = random_prompts(args.prompts, args.seed)
    pipelined = {"auto": None, "pipelined": True, "sequential": False}[args.decoding]
    resolved = teacher.pipelined_by_default if pipelined is None else pipelined
    mode = ("pipelined" if resolved else "sequential") + (" (the device's default)" if pipelined is None else "")
    header = [
        f"# streams of {args.seconds:g} s of video ({FPS} fps), {mode} decoding; adherence over {len(prompts)} prompts",
        f"# device: {machine(device)}",
        f"# teacher: {args.teacher}" + (f"; student: {args.student}" if args.student else ""),
    ]
    print("\n".join(header) + "\n", flush=True)
    results = []
    for name, pipe, options in stream_rows(teacher, student):
        results.append((name, benchmark_row(pipe, options, prompts, args.seconds, args.seed, pipelined)))
    table = stream_table(results)
    print(table, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(header) + "\n\n" + table + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m streamdit.benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("attention", help="forward time against buffer length, window vs full attention")
    p.add_argument("--preset", default="small")
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p = commands.add_parser("stream", help="NFEs, time to first frame, FPS and adherence: teacher against student")
    p.add_argument("--teacher", required=True, help="the teacher's pipeline folder (or Hub id)")
    p.add_argument("--student", default=None, help="the distilled student's pipeline folder (or Hub id)")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of video per stream")
    p.add_argument("--prompts", type=int, default=20, help="prompts for the adherence column")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--decoding", choices=["auto", "pipelined", "sequential"], default="auto",
                   help="pipelined: a denoiser thread works on the next chunk while this one decodes; sequential: in "
                        "turn, on one thread; auto: the stream's default (pipelined on accelerators only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    {"attention": attention, "stream": stream}[args.command](args)


if __name__ == "__main__":
    main()
