"""The Euler-Maruyama reverse SDE on the continuous VP-SDE: U-ViT's sampler of its CIFAR-10 and
CelebA 64 models (sde.py `euler_maruyama` with `ReverseSDE`, 1,000 steps), written from Song et al.
2021 ("Score-based generative modeling through stochastic differential equations", eq. 6 and the
Euler-Maruyama discretisation of its reverse-time SDE).

The forward VP-SDE dx = f(x, t) dt + g(t) dw, f = -beta(t) x / 2, g = sqrt(beta(t)), beta(t) =
beta_min + t (beta_max - beta_min), runs backwards as

    dx = [f(x, t) - g(t)^2 score(x, t)] dt + g(t) dw_bar,   score = -eps(x, t) / sigma(t),

from x ~ N(0, I) at t = 1. As U-ViT: `steps` times linspace(t_end, 1, steps) with t_end = 1e-3 and
a final step to 0, one network evaluation per step at its upper end t, each step

    x_s = x_t + (f - g^2 score)(s - t) + g(t) sqrt(t - s) z,

with no noise on the last step (to s = 0), so the result is that step's mean; no x0 clipping
(U-ViT's has none).
"""

from __future__ import annotations

import math

import torch

from duodiff.core.errors import require

# sde.py euler_maruyama(eps=1e-3, T=1): the smallest time the network is evaluated at.
EULER_MARUYAMA_T_END = 1e-3


def euler_maruyama_times(steps: int, t_end: float = EULER_MARUYAMA_T_END) -> list[float]:
    """The times the network is evaluated at, noisiest first: linspace(t_end, 1, steps) reversed
    (U-ViT's np.linspace, in float64); the step after the last one goes to 0."""
    if steps == 1:
        return [1.0]
    return torch.linspace(t_end, 1.0, steps, dtype=torch.float64).flip(0).tolist()


def euler_maruyama_sample(diffusion, denoise, noise, steps: int, generator=None, progress=None,
                          t_end: float = EULER_MARUYAMA_T_END) -> torch.Tensor:
    """The reverse SDE from x_1 = `noise` to t = 0 in `steps` Euler-Maruyama steps (module
    docstring). `denoise(x, network time (B,), step_index)`: step_index counts network evaluations
    (one per step), so DuoDiff's t_switch, early exit and caching count the same `steps`. All noise
    from `generator`, as the other samplers'."""
    from duodiff.core.diffusion import _randn_like

    require(diffusion.noise_process == "vp_sde",
            f"--sampler euler_maruyama integrates the continuous VP-SDE (U-ViT's CIFAR-10 / CelebA recipe); the "
            f"model's noise process is {diffusion.noise_process!r}: use ddpm, ddim, dpm_solver or dpm_solver_fast")
    times = euler_maruyama_times(steps, t_end)
    b0, b1 = diffusion.sde_beta_min, diffusion.sde_beta_max
    predicts_noise = diffusion.parametrization == "predict_noise"
    x = noise
    batch = x.shape[0]
    iterator = enumerate(zip(times, times[1:] + [0.0]))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, total=len(times), desc="euler_maruyama steps", leave=False)
    for i, (t, s) in iterator:
        t_vec = torch.full((batch,), t, dtype=torch.float64)
        output = denoise(x, diffusion.network_time(t_vec).to(x.device), i)
        alpha, sigma = math.exp(float(diffusion.log_alpha(t))), float(diffusion.sigma(t))
        eps = output if predicts_noise else (x - alpha * output) / sigma
        beta = b0 + t * (b1 - b0)
        # drift f - g^2 score = -beta x / 2 + beta eps / sigma, times the (negative) step s - t
        x = x + (s - t) * (-0.5 * beta * x + (beta / sigma) * eps)
        if s > 0:
            x = x + math.sqrt(beta * (t - s)) * _randn_like(x, generator)
    return x
