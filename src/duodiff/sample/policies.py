"""Sampling policies: which network runs at each sampling step, how deep, and what that costs.

Every way the study spends less compute per sample is a policy. GaussianDiffusion.sample calls it
once per step, and run_sample reads its cost afterwards. A policy follows SamplingPolicy:

    policy(x, t, step_index) -> the network output at this step (what it runs)
    policy.executed_depth(steps, batch_size) -> LongTensor (steps, batch_size): the transformer
        blocks that ran per step and sample (what it costs: the layer ratio, the FLOPs look-up and
        the exit heat map are read from it)

The building blocks:

    ModelDenoiser      one network at every step: the full U-ViT (or the shallow one alone)
    EarlyExitDenoiser  DeeDiff / AdaDiff (arXiv 2309.17074): each sample leaves the network at the
                       first exit whose predicted uncertainty is at most the threshold
    CacheDenoiser      DeepCache-style caching (Ma, Fang, Wang, CVPR 2024) on U-ViT's long skips:
                       the whole network every `interval` steps; in between only the first `keep`
                       in-blocks and the last `keep` out-blocks, the rest from the last full step
    RouterDenoiser     Learning-to-Cache (Ma, Fang, Mi, Wang, NeurIPS 2024): a trained router
                       (models/router.py) says, per cache step and layer (a block's attention or
                       MLP), whether the layer runs or re-adds its residual of the step before
    PhasedPolicy       one policy for the first `switch` steps, another for the rest (fed the
                       phase-local step index)

and their compositions: DuoDiffDenoiser (arXiv 2410.09633) is a PhasedPolicy of the shallow
network's ModelDenoiser for the first t_switch (noisiest) steps and the full network's after; with
an early-exit model in the late phase (its backbone the full U-ViT), the late phase is an
EarlyExitDenoiser, DuoDiff with early exit; with a cache setting, a CacheDenoiser of the full
U-ViT, DuoDiff with caching. Fewer steps are the sampler's business, not the
policy's: every policy runs at whatever number of steps the sampler asks for.

make_denoiser builds a set's policy from its method and settings; classifier-free guidance wraps
any of them (duodiff.core.guidance.GuidedDenoiser).
"""

from __future__ import annotations

from typing import Protocol

import torch

from duodiff.core.guidance import GuidedDenoiser, guided_labels
from duodiff.models.router import load_router, routing_plan


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
        # A late phase that never ran (DuoDiff with t_switch = steps) has executed no block.
        layers = self.exit_layers if self._exits else torch.zeros((0, batch_size), dtype=torch.long)
        assert tuple(layers.shape) == (steps, batch_size), (tuple(layers.shape), steps, batch_size)
        return layers


class CacheDenoiser:
    """DeepCache on U-ViT: steps 0, N, 2N, ... (N = interval) run the whole network and keep the
    hidden state entering the last `keep` out-blocks; the steps between run only the embedding, the
    first `keep` in-blocks, the last `keep` out-blocks and the head on that cached state
    (UViT.forward_cached). interval 1 is the full model. Its executed depth is the blocks run:
    depth at full steps, 2 * keep at cached ones, the same for every sample of the batch."""

    def __init__(self, model, interval: int, keep: int, y=None):
        assert interval >= 1 and 1 <= keep <= model.depth // 2, (interval, keep)  # run_sample checked them
        self.model = model
        self.interval = int(interval)
        self.keep = int(keep)
        self.y = y
        self._cache = None
        self._blocks: list[int] = []

    def __call__(self, x, t, step_index):
        assert step_index == len(self._blocks), "a CacheDenoiser records one sampling run"
        full = step_index % self.interval == 0
        output, self._cache = self.model.forward_cached(x, t, self.y, self.keep, None if full else self._cache)
        self._blocks.append(self.model.depth if full else 2 * self.keep)
        return output

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor:
        return blocks_per_step(self._blocks, steps, batch_size)


def blocks_per_step(blocks: list[int], steps: int, batch_size: int) -> torch.Tensor:
    """The executed depth of a policy that runs the same blocks for every sample of the batch:
    `blocks` (one count per step it ran) as a LongTensor (steps, batch_size)."""
    assert len(blocks) == steps, (len(blocks), steps)
    return torch.tensor(blocks, dtype=torch.long).reshape(steps, 1).expand(steps, batch_size).clone()


class RouterDenoiser:
    """Learning-to-Cache on U-ViT (UViT.forward_routed): `plan` (models/router.routing_plan) holds,
    per step, None (the whole network runs: steps 0, 2, 4, ...) or one (attention, MLP) pair of
    booleans per block; a layer marked False re-adds its residual of the step before and is not
    computed. Its executed depth is, per step, the blocks of which the attention or the MLP ran (an
    out-block's skip_linear always runs and is not counted on its own), the same for every sample;
    the FLOPs count each layer exactly (metrics/flops.py)."""

    def __init__(self, model, plan: list, y=None):
        self.model = model
        self.plan = plan
        self.y = y
        self._cache = None
        self._blocks: list[int] = []

    def __call__(self, x, t, step_index):
        assert step_index == len(self._blocks), "a RouterDenoiser records one sampling run"
        run = self.plan[step_index]
        assert run is None or self._cache is not None, "routing_plan never caches step 0"
        output, self._cache = self.model.forward_routed(x, t, self.y, run=run, cache=None if run is None else self._cache)
        self._blocks.append(self.model.depth if run is None else sum(1 for a, m in run if a or m))
        return output

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor:
        return blocks_per_step(self._blocks, steps, batch_size)


class PhasedPolicy:
    """`early` for the first `switch` steps (the noisiest), `late` for the rest. The late policy
    sees its own step count from 0, so an EarlyExitDenoiser (which records one exit row per step
    it ran) or any other policy works unchanged in either phase."""

    def __init__(self, early, late, switch: int):
        assert switch >= 0, switch  # run_sample checked it
        self.early = early
        self.late = late
        self.switch = switch

    def __call__(self, x, t, step_index):
        if step_index < self.switch:
            return self.early(x, t, step_index)
        return self.late(x, t, step_index - self.switch)

    def executed_depth(self, steps: int, batch_size: int) -> torch.Tensor:
        assert self.switch <= steps, (self.switch, steps)
        early = self.early.executed_depth(self.switch, batch_size)
        late = self.late.executed_depth(steps - self.switch, batch_size)
        return torch.cat([early, late])


def DuoDiffDenoiser(shallow, full, t_switch: int, y=None, steps: int | None = None, threshold: float | None = None,
                    cache: tuple[int, int] | None = None):
    """DuoDiff (2410.09633): the shallow network for the first t_switch (noisiest) steps, then the
    full one; with `threshold`, `full` is an early-exit model whose exit rule runs in that phase;
    with `cache` = (interval, keep), the full model's phase is cached (CacheDenoiser: its first
    step runs the whole network, since the shallow model's state is no cache for the full one's)."""
    assert 0 <= t_switch <= (steps if steps is not None else t_switch), (t_switch, steps)  # run_sample checked it
    assert threshold is None or cache is None, "run_sample refuses early exit and caching in one phase"
    if cache is not None:
        late = CacheDenoiser(full, *cache, y=y)
    else:
        late = ModelDenoiser(full, y=y) if threshold is None else EarlyExitDenoiser(full, threshold, y=y)
    return PhasedPolicy(ModelDenoiser(shallow, y=y), late, t_switch)


def cache_settings(settings: dict):
    """(interval, keep) of a set's settings or stats.json: a cache set's, or a DuoDiff set's whose
    full-model phase is cached; (router path, threshold) of an l2c set's; None for every other set."""
    if settings["method"] == "l2c":
        return settings["router"], settings["router_threshold"]
    return (settings["cache_interval"], settings["cache_keep"]) if settings.get("cache_interval") is not None else None


def make_denoiser(method, models, threshold, t_switch, y, guidance_scale=0.0, null=None, cache=None):
    """The denoiser of a method; its threshold, t_switch and cache = (interval, keep) were checked by
    duodiff.sample.sample_set (duodiff with a threshold: the late model is an early-exit model, its
    exit rule in the late phase).
    A guidance scale != 0 runs it on both branches, y and the null label (duodiff.core.guidance)."""
    if guidance_scale != 0:
        inner = make_denoiser(method, models, threshold, t_switch, guided_labels(y, null), cache=cache)
        return GuidedDenoiser(inner, guidance_scale)
    if method == "early_exit":
        return EarlyExitDenoiser(models["model"], threshold, y=y)
    if method == "duodiff":
        return DuoDiffDenoiser(models["shallow"], models["full"], t_switch, y=y, threshold=threshold, cache=cache)
    if method == "cache":
        return CacheDenoiser(models["model"], *cache, y=y)
    if method == "l2c":  # cache = (router path, threshold), checked against the set by run_sample
        router_path, router_threshold = cache
        return RouterDenoiser(models["model"], routing_plan(load_router(router_path), router_threshold), y=y)
    return ModelDenoiser(models["model"], y=y)
