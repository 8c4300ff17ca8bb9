"""The two optimizer helpers of the training recipe: the learning-rate shape and the EMA of the weights.

AdamW itself is torch's (settings in `duodiff train`'s flags); the shape is the early-exit seed's
(diffusers' cosine schedule with warm-up), the EMA U-ViT's.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, as U-ViT's `ema()` (buffers are copied).

    Frozen parameters are skipped: they never change, and decay * w + (1 - decay) * w is not
    exactly w in floating point, so a frozen backbone's EMA stays bit-equal to the backbone."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            p_ema.mul_(decay).add_((1 - decay) * p.detach())
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def warmup_cosine(warmup_steps, n_steps):
    """LR factor for optimizer step s: linear warm-up s / warmup, then cosine decay to 0 at n_steps
    (diffusers' get_cosine_schedule_with_warmup, as in the early-exit seed)."""

    def factor(s):
        if s < warmup_steps:
            return s / warmup_steps
        progress = (s - warmup_steps) / max(1, n_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor
