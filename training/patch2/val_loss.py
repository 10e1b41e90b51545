"""Progress measure for a DiT run: the object-weighted Eq. 5 loss on 8 fixed batches of 24.

Every model sees the same 192 clips (each encoded by its own autoencoder), captions, partitions, taus and noise, so
the numbers compare models across latent spaces and patch sizes. Much cheaper than streaming prompts (about a minute
or two a model on 2 cores), and it tracks adherence only loosely: use it to watch a run, the evaluation to judge one
(at 3600 steps the patch-2 DiT's loss was below the shipped DiT's, its adherence 6 points under).

    bash training/patch2/export.sh   # the run's newest checkpoint, to /tmp/patch2-export/pipeline
    PYTHONPATH=. python training/patch2/val_loss.py streamdit/models/shapes-world /tmp/patch2-export/pipeline
"""
import argparse

import numpy as np
import torch

from streamdit import StreamDiTPipeline
from streamdit.data import sample_batch
from streamdit.text import tokenize
from streamdit.train import flow_matching_loss

BATCHES, BATCH, OBJECT_WEIGHT = 8, 24, 8.0


@torch.no_grad()
def val_loss(folder):
    pipe = StreamDiTPipeline.from_pretrained(folder)
    sched, vae = pipe.scheduler, pipe.vae
    rng = np.random.default_rng(123)
    clips = [sample_batch(rng, 4, 32, 128) for _ in range(BATCHES * BATCH // 4)]  # 32 frames: 8 latent frames
    x1 = torch.cat([vae.encode(v) for v, _, _ in clips])  # (192, C, 8, h, w)
    captions = [c for _, cs, _ in clips for c in cs]
    partitions = sched.training_partitions()
    losses = []
    for i in range(BATCHES):
        g = torch.Generator().manual_seed(1000 + i)
        x = x1[i * BATCH : (i + 1) * BATCH]
        partition = partitions[i % len(partitions)]
        tau = sched.sample_tau(partition, BATCH, g)  # (b, F)
        noise = torch.randn(x.shape, generator=g)
        ids, mask = tokenize(pipe.tokenizer, captions[i * BATCH : (i + 1) * BATCH])
        text = pipe.text_encoder(ids, mask)
        v = pipe.transformer(sched.add_noise(x, noise, tau), tau, text, mask).sample
        losses.append(flow_matching_loss(v, sched.velocity(x, noise), x, OBJECT_WEIGHT).item())
    return float(np.mean(losses))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="pipeline folders")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (1 beside a training run)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for folder in args.models:
        print(f"{folder}: {val_loss(folder):.4f}", flush=True)
