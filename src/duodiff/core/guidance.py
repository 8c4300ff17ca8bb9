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

The null class. Training with `--label-dropout P` replaces each label by the null class
num_classes - 1 with probability P (U-ViT: p_uncond 0.15 with num_classes 1001 for ImageNet 256),
so such a model has num_classes = the dataset's classes + 1, and its model.pt records
train_args.label_dropout > 0: that is how sampling knows the null class exists (`null_label`).
A converted U-ViT checkpoint records the same (`duodiff convert --label-dropout`). Early-exit
heads trained on a guided backbone see the dropped labels too (the same flag, checked by the
class count): the unconditional branch exits through them. Sample labels are drawn from the real
classes only, never the null class.

A guided sample set's exit_layers.pt is (steps, 2n): the conditional branch of sample i in column
i, its unconditional branch in column n + i (`branch_major`). Every column is one network
evaluation, so the layer ratio (the mean over columns / the full depth) is the executed compute
relative to the full model guided the same way, and the exit heat map counts both branches.
stats.json says `guidance_scale` and `branches` (network evaluations per sample and step).
"""

from __future__ import annotations

import math

import torch

from duodiff.core.errors import check_number, is_number, require


def check_label_dropout(label_dropout, num_classes: int, config_path, flag: str = "--label-dropout") -> None:
    """P in [0, 1), and P > 0 only for a class-conditional model (it needs a null class)."""
    check_number(flag, label_dropout, 0, 1, high_open=True)
    require(
        label_dropout == 0 or num_classes > 0,
        f"{flag} {label_dropout} needs a class-conditional model (a null class to drop labels to); "
        f"{config_path} has num_classes {num_classes}",
    )


def check_class_count(num_classes: int, data_classes: int, label_dropout, config_path, dataset) -> None:
    """A class-conditional model has one class token per class of the dataset, plus the null class
    (the last) when trained with label dropout."""
    if num_classes == 0:
        return
    if data_classes > 0 and label_dropout > 0:
        require(
            num_classes == data_classes + 1,
            f"{config_path} has num_classes {num_classes}, but --label-dropout {label_dropout} needs --dataset "
            f"{dataset}'s {data_classes} classes + the null class: num_classes {data_classes + 1}",
        )
        return
    require(
        not (data_classes > 0 and num_classes == data_classes + 1),
        f"{config_path} has num_classes {num_classes}, one more than --dataset {dataset}'s {data_classes} classes: "
        "a null class for guidance is trained with --label-dropout > 0 (U-ViT: 0.15); without it use "
        f"num_classes {data_classes}",
    )
    require(
        data_classes == num_classes,
        f"{config_path} has num_classes {num_classes} but --dataset {dataset} has {data_classes or 'no'} class labels",
    )


def null_label(num_classes: int, meta: dict) -> int | None:
    """The null class of a model file (its metadata `meta`): num_classes - 1 when it was trained,
    or published, with label dropout; None when it has none."""
    label_dropout = (meta.get("train_args") or {}).get("label_dropout") or 0
    return num_classes - 1 if num_classes > 0 and label_dropout > 0 else None


def label_classes(num_classes: int, null: int | None) -> int:
    """How many classes sample labels are drawn from: every class token but the null class."""
    return num_classes - 1 if null is not None else num_classes


def check_guidance_scale(scale) -> None:
    ok = is_number(scale) and math.isfinite(scale)
    require(ok, f"--guidance-scale must be a finite number (0: no guidance; U-ViT's ImageNet 256: 0.4); got {scale!r}")


def set_null_label(scale: float, models: dict, metas: dict) -> int | None:
    """The null label of a sample set's model(s) (None: they have none), refusing guidance for
    models without one. DuoDiff's two models share num_classes (checked by load_models)."""
    nulls = {role: null_label(models[role].config.num_classes, metas[role]) for role in models}
    for role, null in nulls.items():
        require(
            scale == 0 or null is not None,
            f"--guidance-scale {scale} needs a class-conditional model trained with --label-dropout > 0 (a null "
            f"class); {metas[role]['path']} has num_classes {models[role].config.num_classes} and "
            f"label_dropout {(metas[role].get('train_args') or {}).get('label_dropout') or 0}",
        )
    # Labels never take the null class of any model of the set (equal num_classes: the same label).
    return next((null for null in nulls.values() if null is not None), None)


def branch_major(part_layers: list, branches: int) -> torch.Tensor:
    """A set's exit layers from its batches' (steps, branches * b) ones -> (steps, branches * n):
    every batch's first branch (conditional) first, then every batch's second (unconditional)."""
    if branches == 1:
        return torch.cat(part_layers, dim=1)
    chunks = [layers.chunk(branches, dim=1) for layers in part_layers]
    return torch.cat([c[branch] for branch in range(branches) for c in chunks], dim=1)


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
