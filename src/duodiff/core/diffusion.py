"""Gaussian diffusion (Ho et al. 2020, DDPM) with DDPM and DDIM sampling. The loop asks a sampling
policy (duodiff.sample.policies) what to run at each step.

Notation follows the DDPM paper: beta_t is the linear noise schedule, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s, and

    q(x_t | x_0)         = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta~_t I),
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).

Timesteps are 0-based integers in [0, T) as in the DDPM / U-ViT reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from duodiff.core.errors import check_choice, is_int, is_number, require
from duodiff.core.study import SAMPLERS

PARAMETRIZATIONS = ("predict_noise", "predict_original")
LOSS_WEIGHTINGS = ("uniform", "min_snr")
# linear: DDPM's betas, evenly spaced from beta_start to beta_end (U-ViT's pixel-space models);
# scaled_linear: evenly spaced in their square root (Stable Diffusion's, U-ViT's latent models:
# stable_diffusion_beta_schedule, 0.00085 to 0.012).
BETA_SCHEDULES = ("linear", "scaled_linear")


class GaussianDiffusion:
    def __init__(
        self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise", beta_schedule="linear"
    ):
        require(
            is_int(num_timesteps) and num_timesteps >= 2,
            f"num_timesteps must be an integer >= 2; got {num_timesteps!r}",
        )
        numbers = all(is_number(b) for b in (beta_start, beta_end))
        require(
            numbers and 0 < beta_start <= beta_end < 1,
            f"betas must satisfy 0 < beta_start <= beta_end < 1; got beta_start={beta_start!r}, beta_end={beta_end!r}"
            + ("" if numbers else " (YAML reads 1e-4 as text: write 1.0e-4)"),
        )
        check_choice("parametrization", parametrization, PARAMETRIZATIONS)
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.parametrization = parametrization

        # Computed in float64: 1 - abar_t and the posterior terms lose digits in float32 near t = 0.
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self._float64 = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
            "posterior_variance": posterior_variance,
            # beta~_0 is 0; DDPM clips the log at t = 0 to beta~_1 so it stays finite.
            "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        }
        for name, value in self._float64.items():
            setattr(self, name, value.float())
        self._device_cache = {}

    def config(self) -> dict:
        """The constructor arguments (what model.pt stores under "diffusion"); the schedule only
        when it is not linear, so models saved before schedules existed compare equal."""
        return {
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "parametrization": self.parametrization,
            **({"beta_schedule": self.beta_schedule} if self.beta_schedule != "linear" else {}),
        }

    def _extract(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Schedule values at timesteps t (B,), shaped (B, 1, ..., 1) to broadcast over images."""
        key = (name, t.device)
        if key not in self._device_cache:  # one copy per device, not one per training step
            self._device_cache[key] = getattr(self, name).to(t.device)
        return self._device_cache[key][t].view(-1, *([1] * (ndim - 1)))

    # ---- forward process and training targets -------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return (
            self._extract("sqrt_alphas_cumprod", t, x0.ndim) * x0
            + self._extract("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise
        )

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output: the noise or the clean image."""
        return noise if self.parametrization == "predict_noise" else x0

    def loss_weights(self, weighting: str, gamma: float) -> torch.Tensor:
        """Per-timestep weights (T,) of the MSE: uniform = DDPM's L_simple (1 everywhere); min_snr =
        Min-SNR-gamma (Hang et al., ICCV 2023, 2303.09556), which caps the weight that the
        parametrization implicitly gives the nearly clean timesteps. In terms of the x0 error, the
        noise MSE weighs timestep t by SNR_t = abar_t / (1 - abar_t), up to 1e4 near t = 0, so a small
        model spends its capacity on noise it cannot see; min_snr weighs the x0 error by
        min(SNR_t, gamma) instead: the noise MSE times min(SNR_t, gamma) / SNR_t, the x0 MSE times
        min(SNR_t, gamma)."""
        if weighting == "uniform":
            return torch.ones(self.num_timesteps)
        abar = self._float64["alphas_cumprod"]
        snr = abar / (1 - abar)
        capped = snr.clamp(max=gamma)
        weights = capped / snr if self.parametrization == "predict_noise" else capped
        return weights.float()

    # ---- sampling -----------------------------------------------------------------------------

    def timesteps(self, sampler: str, steps: int | None = None) -> list[int]:
        """The timesteps a sampler visits, noisiest first, ending at 0.

        ddpm visits all T timesteps. ddim visits `steps` timesteps i * T // steps (the DDIM paper's
        uniform skip, exactly `steps` distinct values even when T is not a multiple of steps), and
        so does dpm_solver, so that a number of steps means the same network evaluations.
        """
        assert sampler in SAMPLERS, sampler  # run_sample checked it; steps need T, so they are checked here
        T = self.num_timesteps
        if sampler == "ddpm":
            require(
                steps is None or steps == T,
                f"--steps must be {T} (num_timesteps) for the ddpm sampler, got {steps!r}; "
                "use --sampler ddim for fewer steps",
            )
            return list(range(T - 1, -1, -1))
        require(
            isinstance(steps, int) and 1 <= steps <= T,
            f"--steps must be an integer in [1, {T}] for the {sampler} sampler; got {steps!r}",
        )
        return [i * T // steps for i in range(steps - 1, -1, -1)]

    def sampling_plan(self, sampler: str, steps: int | None = None, eta: float = 0.0) -> list[SamplingStep]:
        """Per-step coefficients, computed once on the host in float64.

        Every step has the form x_prev = c_x0 * x0_hat + c_xt * x_t + sigma * z. For DDPM these are
        the posterior mean coefficients and sigma^2 = beta~_t. For DDIM (Song et al., eq. 12)

            x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
            sigma  = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev),

        with eps_hat = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t) substituted. Deriving eps_hat
        from the (clipped) x0_hat keeps the update consistent after clipping, as in ADM's
        ddim_sample; with eta = 1 and all T steps DDIM then equals DDPM exactly.
        """
        assert eta >= 0 and (sampler != "ddpm" or eta == 0), (sampler, eta)  # run_sample checked them
        ts = self.timesteps(sampler, steps)
        ac = self._float64["alphas_cumprod"]
        plan = []
        for i, t in enumerate(ts):
            recip = self._float64["sqrt_recip_alphas_cumprod"][t].item()
            recipm1 = self._float64["sqrt_recipm1_alphas_cumprod"][t].item()
            if sampler == "ddpm":
                c_x0 = self._float64["posterior_mean_coef1"][t].item()
                c_xt = self._float64["posterior_mean_coef2"][t].item()
                sigma = math.exp(0.5 * self._float64["posterior_log_variance_clipped"][t].item()) if t > 0 else 0.0
            else:
                a_t = ac[t].item()
                a_prev = ac[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
                sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
                direction = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0))
                c_x0 = math.sqrt(a_prev) - direction * math.sqrt(a_t) / math.sqrt(1.0 - a_t)
                c_xt = direction / math.sqrt(1.0 - a_t)
            plan.append(SamplingStep(t, recip, recipm1, c_x0, c_xt, sigma))
        return plan

    def sample(
        self,
        denoise,
        noise: torch.Tensor,
        sampler: str = "ddim",
        steps: int | None = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        progress=None,
        clip_denoised: bool = True,
    ) -> torch.Tensor:
        """Run the reverse process from x_T = `noise`; return the generated x_0.

        `denoise(x_t, t: LongTensor (B,), step_index) -> model output`, step_index 0 = noisiest.
        All randomness comes from `generator` (a CPU generator gives the same images on any
        device). The x0 prediction is clipped to [-1, 1] at every step (`clip_denoised`, DDPM/ADM
        default). Call under torch.inference_mode(); the loop itself never waits on the device.
        """
        if sampler == "dpm_solver":  # diffusers' scheduler runs the multistep update (dpm_solver.py)
            from duodiff.core.dpm_solver import dpm_solver_sample

            timesteps = self.timesteps(sampler, steps)
            return dpm_solver_sample(self, denoise, noise, timesteps, clip_denoised=clip_denoised, progress=progress)
        plan = self.sampling_plan(sampler, steps, eta)
        x = noise
        batch = x.shape[0]
        iterator = enumerate(plan)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(plan), desc=f"{sampler} steps", leave=False)
        for i, step in iterator:
            t = torch.full((batch,), step.t, device=x.device, dtype=torch.long)
            output = denoise(x, t, i)
            x0, _ = x0_and_eps(self.parametrization, x, output, step.sqrt_recip_ac, step.sqrt_recipm1_ac)
            if clip_denoised:
                x0 = x0.clamp(-1.0, 1.0)
            x = step.c_x0 * x0 + step.c_xt * x
            if step.sigma > 0:
                x = x + step.sigma * _randn_like(x, generator)
        return x


@dataclass(frozen=True)
class SamplingStep:
    t: int
    sqrt_recip_ac: float
    sqrt_recipm1_ac: float
    c_x0: float
    c_xt: float
    sigma: float


def x0_and_eps(parametrization, x_t, output, sqrt_recip_ac, sqrt_recipm1_ac):
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps  <=>  x0 = x_t / sqrt(abar) - sqrt(1/abar - 1) eps."""
    if parametrization == "predict_noise":
        eps = output
        x0 = sqrt_recip_ac * x_t - sqrt_recipm1_ac * eps
    else:
        x0 = output
        eps = (sqrt_recip_ac * x_t - x0) / sqrt_recipm1_ac
    return x0, eps


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    if generator.device == x.device:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    # Draw on the generator's device (normally the CPU, so images do not depend on the GPU), into
    # pinned memory, and copy without blocking so the host never waits for the GPU queue.
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype, pin_memory=x.is_cuda)
    return z.to(x.device, non_blocking=True)

