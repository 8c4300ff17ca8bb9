"""Sampling policies: which network runs at each sampling step, how deep, and what that costs.

Every way the study spends less compute per sample is a policy. GaussianDiffusion.sample calls it
once per step, and run_sample reads its cost afterwards. A policy follows SamplingPolicy:

    policy(x, t, step_index) -> the network output at this step (what it runs)
    policy.executed_depth(steps, batch_size) -> LongTensor (steps, batch_size): the transformer
        blocks that ran per step and sample (what it costs: the layer ratio, the FLOPs look-up and
        the exit heat map are read from it)

The three of the study:

    ModelDenoiser      one network at every step: the full U-ViT (or the shallow one alone)
    DuoDiffDenoiser    DuoDiff (arXiv 2410.09633): the shallow network for the first t_switch
                       (noisiest) steps, the full one after
    EarlyExitDenoiser  DeeDiff / AdaDiff (arXiv 2309.17074): each sample leaves the network at the
                       first exit whose predicted uncertainty is at most the threshold

make_denoiser builds a set's policy from its method and settings; classifier-free guidance wraps
any of them (duodiff.core.guidance.GuidedDenoiser). Composed policies go here.
"""

from __future__ import annotations

from typing import Protocol

import torch

from duodiff.core.guidance import GuidedDenoiser, guided_labels


class SamplingPolicy(Protocol):
    def __call__(self, x: torch.Tensor, t: torch.Tensor, step_index: int) -> torch.Tensor: ...

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor: ...


class ModelDenoiser:
    """One network at every step (full U-ViT or shallow U-ViT alone)."""

    def __init__(self, model, y=None):
        self.model = model
        self.y = y

    def __call__(self, x, t, step_index):
        return self.model(x, t, self.y)

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor:
        """Transformer blocks run per step and sample: LongTensor (steps, batch_size)."""
        return torch.full((steps, batch_size), self.model.depth, dtype=torch.long)


class DuoDiffDenoiser:
    """DuoDiff (2410.09633): the shallow network for the first t_switch (noisiest) steps, then the full one."""

    def __init__(self, shallow, full, t_switch: int, y=None, steps: int | None = None):
        assert 0 <= t_switch <= (steps if steps is not None else t_switch), (t_switch, steps)  # run_sample checked it
        self.shallow = shallow
        self.full = full
        self.t_switch = t_switch
        self.y = y

    def __call__(self, x, t, step_index):
        model = self.shallow if step_index < self.t_switch else self.full
        return model(x, t, self.y)

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor:
        assert self.t_switch <= steps, (self.t_switch, steps)
        depth = torch.full((steps, batch_size), self.full.depth, dtype=torch.long)
        depth[: self.t_switch] = self.shallow.depth
        return depth


class EarlyExitDenoiser:
    """DeeDiff/AdaDiff early exit: each sample leaves at the first exit whose uncertainty <= threshold.

    The exit layer of every sample at every step is kept on the model's device (no host sync in
    the loop) and read afterwards as `exit_layers` (steps, B); exit i means i blocks ran.
    """

    def __init__(self, model, threshold: float, y=None):
        assert 0.0 <= threshold <= 1.0, threshold  # run_sample checked it
        self.model = model
        self.threshold = float(threshold)
        self.y = y
        self._exits: list[torch.Tensor] = []

    def __call__(self, x, t, step_index):
        assert step_index == len(self._exits), "an EarlyExitDenoiser records one sampling run"
        output, exit_layer = self.model.forward_early_exit(x, t, self.threshold, self.y)
        self._exits.append(exit_layer)
        return output

    @property
    def exit_layers(self) -> torch.Tensor:
        if not self._exits:
            return torch.zeros((0, 0), dtype=torch.long)
        return torch.stack(self._exits).long().cpu()

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor:
        layers = self.exit_layers
        assert tuple(layers.shape) == (steps, batch_size), (tuple(layers.shape), steps, batch_size)
        return layers


def make_denoiser(method, models, threshold, t_switch, y, guidance_scale=0.0, null=None):
    """The denoiser of a method; its threshold and t_switch were checked by duodiff.sample.sample_set.
    A guidance scale != 0 runs it on both branches, y and the null label (duodiff.core.guidance)."""
    if guidance_scale != 0:
        inner = make_denoiser(method, models, threshold, t_switch, guided_labels(y, null))
        return GuidedDenoiser(inner, guidance_scale)
    if method == "early_exit":
        return EarlyExitDenoiser(models["model"], threshold, y=y)
    if method == "duodiff":
        return DuoDiffDenoiser(models["shallow"], models["full"], t_switch, y=y)
    return ModelDenoiser(models["model"], y=y)
