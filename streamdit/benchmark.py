"""Benchmarks. `python -m streamdit.benchmark attention` times the transformer's forward pass against buffer length,
with window attention and with full attention (a window that covers the whole buffer), and prints a markdown table.

Window attention costs the same per frame however long the buffer (linear growth); full attention's cost per frame
grows with the buffer (quadratic growth overall).
"""

import argparse
import platform
import time

import torch

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
    print(f"# device: {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)\n")
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


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m streamdit.benchmark", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("attention", help="forward time against buffer length, window vs full attention")
    p.add_argument("--preset", default="small")
    p.add_argument("--frames", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    {"attention": attention}[args.command](args)


if __name__ == "__main__":
    main()
