"""DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095): the sampler of U-ViT's ImageNet results, as a
multistep solver of order 1-3, run by diffusers' `DPMSolverMultistepScheduler` on the project's
noise schedule and denoisers.

With lambda_t = log(alpha_t / sigma_t) (alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t)) and
h_i = lambda_{t_i} - lambda_{t_{i-1}}, the second-order multistep update (the paper's Algorithm 2) is

    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i,
    D_i     = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2},   r_i = h_{i-1} / h_i,

with x0_j the data prediction at step j (the network's noise prediction turned into x0, clipped to
[-1, 1] like DDIM's when `clip_denoised`); the first step is first order. The last step goes to
sigma = 0 and returns the last data prediction.

Choices, each so that DPM-Solver is compared with DDIM on equal terms:
- The timesteps are DDIM's (`GaussianDiffusion.timesteps("ddim", steps)`: i * T // steps, noisiest
  first, ending at 0), not diffusers' default linspace from T - 1, so "20 steps" visits the same
  network evaluations with either sampler and DuoDiff's t_switch means the same steps.
- The x0 clipping is diffusers' thresholding with sample_max_value 1, which is plain clipping to
  [-1, 1] (its dynamic threshold is clamped to [1, sample_max_value]).
"""

from __future__ import annotations

import torch

ORDERS = (1, 2, 3)


def make_scheduler(diffusion, timesteps: list[int], order: int, clip_denoised: bool):
    """A fresh diffusers scheduler for one sampling run over `timesteps` (noisiest first)."""
    from diffusers import DPMSolverMultistepScheduler

    assert order in ORDERS, order
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.num_timesteps,
        trained_betas=diffusion._float64["betas"].numpy(),
        solver_order=order,
        prediction_type="epsilon" if diffusion.parametrization == "predict_noise" else "sample",
        algorithm_type="dpmsolver++",
        solver_type="midpoint",
        thresholding=clip_denoised,
        sample_max_value=1.0,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(timesteps=list(timesteps))
    return scheduler


def dpm_solver_sample(diffusion, denoise, noise, timesteps, order=2, clip_denoised=True, progress=None):
    """Run DPM-Solver++ from x_T = `noise` over `timesteps`; return x_0.

    `denoise(x_t, t: LongTensor (B,), step_index) -> model output` as for DDPM/DDIM, so DuoDiff's
    switch (by step index) and early exit work unchanged. The solver is deterministic.
    """
    scheduler = make_scheduler(diffusion, timesteps, order, clip_denoised)
    x = noise
    batch = x.shape[0]
    steps = list(enumerate(scheduler.timesteps.tolist()))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="dpm_solver steps", leave=False)
    for i, t in steps:
        output = denoise(x, torch.full((batch,), t, device=x.device, dtype=torch.long), i)
        x = scheduler.step(output, t, x).prev_sample
    return x
