"""Reproducible randomness for `duodiff train`.

Every random draw of a training step (its batch indices, timesteps, noise and flips) is a function
of (seed, step) alone, so a run resumed from checkpoint.pt gives bit-identical weights to an
uninterrupted one on CPU. Under torchrun each rank draws the same global batch and takes its
slice, so N processes match one process at the same global batch (up to the order of float sums).
The global RNG states (torch, CUDA, numpy, Python) are saved in the checkpoint all the same, for
anything else that draws from them.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch.utils.data import Sampler


def derive_seed(*parts) -> int:
    """A 63-bit seed from (seed, purpose, index): distinct purposes never share a stream."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def epoch_permutation(n_items, seed, epoch) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(seed, "epoch", epoch))
    return torch.randperm(n_items, generator=generator)


def step_draws(seed, step, num_timesteps, batch_size, image_shape, hflip, rows: slice, device):
    """The step's randomness -> (timesteps (b,), noise (b, *image_shape), flip mask (b,) or None)
    for this rank's `rows` of the global batch. Drawn for the whole global batch, in this order,
    from a generator seeded by (seed, step), so every rank agrees and a resumed run redraws them."""
    g = torch.Generator(device).manual_seed(derive_seed(seed, "step", step))
    t = torch.randint(0, num_timesteps, (batch_size,), generator=g, device=device)[rows]
    noise = torch.randn((batch_size, *image_shape), generator=g, device=device)[rows]
    flip = (torch.rand(batch_size, generator=g, device=device) < 0.5)[rows] if hflip else None
    return t, noise, flip


def label_dropout_mask(seed, step, batch_size, p, rows: slice, device) -> torch.Tensor:
    """Which labels of this rank's `rows` become the null class at `step` (classifier-free
    guidance's label dropout): a Bernoulli(p) draw per sample of the global batch, from a
    generator of its own seeded by (seed, step), so every rank agrees, a resumed run redraws
    them, and the other draws of the step stay what they were without dropout."""
    g = torch.Generator(device).manual_seed(derive_seed(seed, "label_dropout", step))
    return (torch.rand(batch_size, generator=g, device=device) < p)[rows]


def drop_labels(y, null: int, label_dropout: float, seed: int, step: int, batch_size: int, rows: slice):
    """Training's label dropout: each label of the step's global batch becomes the null class with
    probability label_dropout, drawn per (seed, step) so a resumed run drops the same labels
    (label_dropout_mask); `y` holds this rank's `rows` of it."""
    dropped = label_dropout_mask(seed, step, batch_size, label_dropout, rows, y.device)
    return torch.where(dropped, torch.full_like(y, null), y)


class StepBatchSampler(Sampler):
    """For step = start..n_steps-1: this rank's slice of the step's global batch indices.

    The data stream is the concatenation of per-epoch permutations (each a function of the seed
    and the epoch); step s takes positions [s * B, (s + 1) * B) of it. No state to save: a
    resumed run starts at its step and sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, n_items, batch_size, seed, start_step, n_steps, rank=0, world_size=1):
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.start_step, self.n_steps = start_step, n_steps
        local = batch_size // world_size
        self.lo, self.hi = rank * local, (rank + 1) * local
        self._perms = {}

    def global_batch(self, step) -> torch.Tensor:
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, offsets = positions // self.n_items, positions % self.n_items
        # Keep only the epochs this batch touches (steps move forward, so memory stays flat).
        self._perms = {
            e: self._perms[e] if e in self._perms else epoch_permutation(self.n_items, self.seed, e)
            for e in epochs.unique().tolist()
        }
        return torch.stack([self._perms[e][o] for e, o in zip(epochs.tolist(), offsets.tolist())])

    def __iter__(self):
        for step in range(self.start_step, self.n_steps):
            yield self.global_batch(step)[self.lo : self.hi].tolist()

    def __len__(self):
        return self.n_steps - self.start_step


def get_rng_states() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
