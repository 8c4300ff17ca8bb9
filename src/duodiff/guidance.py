"""Classifier-free guidance (Ho & Salimans 2022) in U-ViT's form, for class-conditional models
trained with label dropout (the dropped label is the null class, the last class token):

    out = out_c + s (out_c - out_u)

out_c with the sample's label, out_u with the null label, s the guidance scale (U-ViT's ImageNet
256: 0.4; s = 0 is the conditional model alone). The form is exact for either parametrization:
for a fixed x_t the noise and the x0 predictions are affine in each other, and the weights
(1 + s, -s) sum to 1.

Both branches run as one batch of 2B through the denoiser of the method, so DuoDiff switches both
at the same step, and under early exit each branch leaves by the per-sample rule like any other
sample: the unconditional branch, which has less to say, may exit earlier than its conditional
twin. (The alternative, one exit for the pair, would make each pair wait for its slower branch.)
Compute and FLOPs count both branches: `executed_depth` gives the blocks run for every branch,
(steps, 2B).
"""

from __future__ import annotations

import torch


def guided_labels(y: torch.Tensor, null_label: int) -> torch.Tensor:
    """The 2B labels of the two branches: the samples' own, then the null class for each."""
    return torch.cat([y, torch.full_like(y, null_label)])


class GuidedDenoiser:
    """Wraps a denoiser built for the 2B labels of `guided_labels`."""

    def __init__(self, inner, scale: float):
        self.inner = inner
        self.scale = float(scale)

    def __call__(self, x, t, step_index):
        out = self.inner(torch.cat([x, x]), torch.cat([t, t]), step_index)
        cond, uncond = out.chunk(2)
        return cond + self.scale * (cond - uncond)

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor:
        """Blocks run per step for every branch: (steps, 2 * batch_size), conditional ones first."""
        return self.inner.executed_depth(steps, 2 * batch_size)

    def __getattr__(self, name):
        # exit_layers and the like: the inner denoiser's, over both branches.
        if name == "inner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)
