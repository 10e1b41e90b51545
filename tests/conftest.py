"""Tiny random components (CPU, milliseconds) shared by the tests."""

import pytest
import torch

from streamdit import (
    StreamDiTAutoencoder,
    StreamDiTPipeline,
    StreamDiTScheduler,
    StreamDiTTextEncoder,
    build_tokenizer,
    from_preset,
)
from streamdit.data import VOCABULARY

def randomize_zeros(model, seed=0):
    """adaLN-Zero starts every block as the identity and the output at zero velocity, which would make equivalence
    tests pass trivially; give the zero-initialised weights random values instead."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
    return model


def tiny_pipeline(seed=0, **scheduler_options):
    """16x16 video, 4x temporal and 4x spatial vae, 8-frame buffer of 4x4x4 latents, chunk 2, 2 micro steps."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(VOCABULARY, max_length=16)  # the shapes-world words
    text_encoder = StreamDiTTextEncoder(vocab_size=len(tokenizer), max_length=16, hidden_size=16, num_layers=1,
                                        num_heads=2)
    vae = StreamDiTAutoencoder(latent_channels=4, block_out_channels=(8, 8, 8), temporal_downsample=(True, True))
    transformer = randomize_zeros(from_preset("tiny"), seed)
    options = dict(buffer_frames=8, chunk_size=2, micro_steps=2) | scheduler_options
    scheduler = StreamDiTScheduler(**options)
    pipe = StreamDiTPipeline(transformer, scheduler, vae, text_encoder, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    for model in (text_encoder, vae, transformer):
        model.eval()  # as from_pretrained leaves them (torch's encoder layers take another code path in eval)
    return pipe.to("cpu")


@pytest.fixture
def pipe():
    return tiny_pipeline()
