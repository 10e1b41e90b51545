"""StreamDiT: real-time streaming text-to-video (Kodaira et al., arXiv 2507.03745) as a diffusers-style library."""

from pathlib import Path

from .autoencoder import StreamDiTAutoencoder
from .pipeline import StreamChunk, StreamDiTPipeline, StreamDiTPipelineOutput, StreamDiTStream, StreamState
from .scheduler import Partition, StreamBuffer, StreamDiTScheduler
from .text import StreamDiTTextEncoder, build_tokenizer
from .transformer import PRESETS, StreamDiTTransformer3DModel, from_preset

# The built-in model, trained on shapes world and shipped inside the package: works offline on a fresh clone.
DEFAULT_MODEL = str(Path(__file__).parent / "models" / "shapes-world")
# Its distilled student (python -m streamdit.distill): 4 micro steps a chunk without guidance instead of the default's
# 8 guided ones, a quarter of the transformer evaluations, a few points less adherence (README, Benchmarks).
STUDENT_MODEL = str(Path(__file__).parent / "models" / "shapes-world-student")

__all__ = [
    "DEFAULT_MODEL",
    "PRESETS",
    "Partition",
    "STUDENT_MODEL",
    "StreamBuffer",
    "StreamChunk",
    "StreamDiTAutoencoder",
    "StreamDiTPipeline",
    "StreamDiTPipelineOutput",
    "StreamDiTScheduler",
    "StreamDiTStream",
    "StreamDiTTextEncoder",
    "StreamState",
    "StreamDiTTransformer3DModel",
    "build_tokenizer",
    "from_preset",
]
