"""Follow a prompt schedule in one stream: switch prompts at given seconds, the video never restarts.

    python examples/switch_prompts.py "0: a red circle moving right | 4: a blue square moving up | 8: a green triangle moving left" --seconds 12
"""

import argparse

import torch

import streamdit
from streamdit import StreamDiTPipeline
from streamdit.pipeline import parse_prompt_schedule
from streamdit.data import FPS
from streamdit.video import VideoWriter


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("schedule")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--out", default="switch.mp4")
    parser.add_argument("--model", default=streamdit.DEFAULT_MODEL)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--switch-strength", type=float, default=None,
                        help="how much of the buffer a new prompt redraws (default: the model's; 0: the paper's switch)")
    args = parser.parse_args()

    schedule = parse_prompt_schedule(args.schedule)
    pipe = StreamDiTPipeline.from_pretrained(args.model)
    stream = pipe.stream(schedule[0][1], generator=torch.Generator().manual_seed(args.seed),
                         switch_strength=args.switch_strength)
    upcoming, frames = schedule[1:], 0
    with VideoWriter(args.out, fps=FPS) as writer:
        for chunk in stream:
            writer.write(chunk.frames)
            frames += len(chunk.frames)
            while upcoming and frames >= upcoming[0][0] * FPS:
                print(f"{frames / FPS:5.1f} s: {upcoming[0][1]}")
                stream.set_prompt(upcoming.pop(0)[1])
            if frames >= args.seconds * FPS:
                break
    stream.close()
    print(f"wrote {frames / FPS:.1f} s to {args.out}")


if __name__ == "__main__":
    main()
