"""DPM-Solver++ against the paper's formulas (Lu et al. 2022, arXiv 2211.01095, Algorithm 2),
written out here in float64 independently of diffusers."""

import math

import pytest
import torch

from duodiff.core.diffusion import GaussianDiffusion
from duodiff.core.dpm_solver import dpm_solver_sample


def toy_eps(x, t, step_index):
    """A fixed 'network': smooth in x and t, large enough that clipping matters at some steps."""
    return 0.6 * x + 0.2 * torch.sin(t.to(x.dtype) / 90.0).view(-1, 1, 1, 1)


def reference_dpm_solver_pp_2m(diffusion, eps_fn, noise, timesteps, clip=True):
    """The paper's multistep DPM-Solver++(2M), first order at the first step, and a last step to
    sigma = 0 that returns the data prediction."""
    abar = diffusion._float64["alphas_cumprod"]
    alpha = lambda t: math.sqrt(abar[t].item())  # noqa: E731
    sigma = lambda t: math.sqrt(1.0 - abar[t].item())  # noqa: E731
    lam = lambda t: math.log(alpha(t) / sigma(t))  # noqa: E731
    x = noise.double()
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        eps = eps_fn(x.float(), torch.full((x.shape[0],), t), i).double()
        x0 = (x - sigma(t) * eps) / alpha(t)
        if clip:
            x0 = x0.clamp(-1, 1)
        if i + 1 == len(timesteps):
            return x0  # sigma_next = 0, alpha_next = 1: x_next = x0 at any order
        s = timesteps[i + 1]
        h = lam(s) - lam(t)
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma(s) / sigma(t) * x - alpha(s) * (math.exp(-h) - 1) * d
        x0_prev, h_prev = x0, h


@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [5, 20])
def test_matches_the_papers_update(clip, steps):
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, "predict_noise")
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ts = diffusion.timesteps("ddim", steps)
    got = dpm_solver_sample(diffusion, toy_eps, noise, ts, order=2, clip_denoised=clip)
    want = reference_dpm_solver_pp_2m(diffusion, toy_eps, noise, ts, clip=clip)
    # diffusers works in float32 (the reference in float64): a few 1e-5 over 20 steps, where a
    # wrong order or step shows as 1e-2 or more (the first-order solver, below, differs by that).
    torch.testing.assert_close(got.double(), want, atol=3e-4, rtol=1e-4)
    first_order = dpm_solver_sample(diffusion, toy_eps, noise, ts, order=1, clip_denoised=clip)
    assert (first_order.double() - want).abs().max() > 1e-2


@pytest.mark.parametrize("clip", [True, False])
def test_first_order_is_ddim(clip):
    """DPM-Solver++ of order 1 is DDIM with eta 0 (the paper's remark after eq. 5): the project's
    own DDIM sampler, written from the DDIM paper, is a second reference."""
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, "predict_noise")
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    ts = diffusion.timesteps("ddim", 12)
    got = dpm_solver_sample(diffusion, toy_eps, noise, ts, order=1, clip_denoised=clip)
    want = diffusion.sample(toy_eps, noise, sampler="ddim", steps=12, eta=0.0, clip_denoised=clip)
    torch.testing.assert_close(got, want, atol=3e-4, rtol=1e-4)


def test_predict_original_outputs_are_data_predictions():
    """A network that predicts x0 directly: the same trajectory as its noise-predicting twin."""
    eps_model = GaussianDiffusion(1000, 1e-4, 0.02, "predict_noise")
    x0_model = GaussianDiffusion(1000, 1e-4, 0.02, "predict_original")
    abar = eps_model._float64["alphas_cumprod"].float()

    def x0_of_toy(x, t, i):
        a = abar[t].view(-1, 1, 1, 1)
        return (x - (1 - a).sqrt() * toy_eps(x, t, i)) / a.sqrt()

    noise = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    ts = eps_model.timesteps("ddim", 10)
    a = dpm_solver_sample(eps_model, toy_eps, noise, ts, order=2, clip_denoised=False)
    b = dpm_solver_sample(x0_model, x0_of_toy, noise, ts, order=2, clip_denoised=False)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_visits_ddims_timesteps_with_step_indices():
    """DuoDiff switches by step index: the solver must call the denoiser once per DDIM timestep,
    noisiest first, with step_index 0, 1, ..."""
    diffusion = GaussianDiffusion(1000, 1e-4, 0.02, "predict_noise")
    seen = []

    def recording(x, t, i):
        seen.append((int(t[0]), i))
        return toy_eps(x, t, i)

    dpm_solver_sample(diffusion, recording, torch.zeros(1, 1, 2, 2), diffusion.timesteps("ddim", 8), order=2)
    assert seen == [(t, i) for i, t in enumerate([875, 750, 625, 500, 375, 250, 125, 0])]
