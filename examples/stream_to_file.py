"""Stream N seconds of a prompt into an .mp4 file.

    python examples/stream_to_file.py "a red circle moving right" --seconds 10 --out red_circle.mp4
"""

import argparse
import time

import torch

import streamdit
from streamdit import StreamDiTPipeline
from streamdit.data import FPS
from streamdit.video import VideoWriter


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="stream.mp4")
    parser.add_argument("--model", default=streamdit.DEFAULT_MODEL, help="pipeline folder or Hub repo id")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pipe = StreamDiTPipeline.from_pretrained(args.model)
    unknown = pipe.unknown_words(args.prompt)
    if unknown:
        print(f"the model does not know these words and ignores them: {', '.join(unknown)}")
    start, frames = time.perf_counter(), 0
    with VideoWriter(args.out, fps=FPS) as writer, pipe.stream(args.prompt, generator=torch.Generator().manual_seed(
            args.seed)) as stream:
        for chunk in stream:
            writer.write(chunk.frames)
            frames += len(chunk.frames)
            if frames >= args.seconds * FPS:
                break
    elapsed = time.perf_counter() - start
    print(f"wrote {frames} frames ({frames / FPS:.1f} s of video) to {args.out} in {elapsed:.1f} s "
          f"({frames / elapsed:.1f} frames/s generated, playback {FPS})")


if __name__ == "__main__":
    main()
