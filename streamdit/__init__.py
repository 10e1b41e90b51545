"""StreamDiT: real-time streaming text-to-video (Kodaira et al., arXiv 2507.03745) as a diffusers-style library."""

from .autoencoder import StreamDiTAutoencoder
from .pipeline import StreamChunk, StreamDiTPipeline, StreamDiTPipelineOutput, StreamDiTStream, StreamState
from .scheduler import Partition, StreamBuffer, StreamDiTScheduler
from .text import StreamDiTTextEncoder, build_tokenizer
from .transformer import PRESETS, StreamDiTTransformer3DModel, from_preset

__all__ = [
    "PRESETS",
    "Partition",
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
