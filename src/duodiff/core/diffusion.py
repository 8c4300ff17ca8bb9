"""Gaussian diffusion (Ho et al. 2020, DDPM) with DDPM and DDIM sampling. The loop asks a sampling
policy (duodiff.sample.policies) what to run at each step.

Notation follows the DDPM paper: beta_t is the linear noise schedule, alpha_t = 1 - beta_t,
abar_t = prod_{s<=t} alpha_s, and

    q(x_t | x_0)         = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(coef1_t x_0 + coef2_t x_t, beta~_t I),
    beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).

Timesteps are 0-based integers in [0, T) as in the DDPM / U-ViT reference code.

Noise processes (`noise_process`) and what the network sees (`time_input`), as U-ViT's recipes:
- discrete: abar_k from the betas above (linear or scaled_linear), k = 0..T-1;
- vp_sde: the continuous VP-SDE of Song et al. 2021 (U-ViT's sde.py VPSDE, beta(t) = beta_min +
  t (beta_max - beta_min) on t in [0, 1]), abar(t) = exp(-(beta_min t + (beta_max - beta_min) t^2 / 2)).
Both live on one continuous time t in (0, 1] with the integer index k at t_k = (k + 1) / T: the grid
of DPM-Solver's discrete noise schedule (t_array = linspace(0, 1, N + 1)[1:]), on which the
integer-step samplers (DDPM, DDIM), the training draws and the per-timestep probes work; the
discrete process between grid points is DPM-Solver's piecewise-linear log alpha. The network's
time input at t:
- index: T t - 1, the 0-based step k (this project's own recipe; U-ViT's pixel checkpoints fed
  this way sit at t = k / 999 of their SDE, models/convert.py);
- index_plus_one: T t, n = k + 1 in [1, T] (U-ViT's discrete latent models, train_ldm_discrete.py
  and eval_ldm_discrete.py: n drawn from [1, N], the model sees t_continuous * N);
- t_times_999: 999 t (U-ViT's continuous models: sde.py ScoreModel.predict calls nnet(x, t * 999)).
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
NOISE_PROCESSES = ("discrete", "vp_sde")
TIME_INPUTS = ("index", "index_plus_one", "t_times_999")
# sde.py's ScoreModel.predict: the network's time input is t * 999.
UVIT_CONTINUOUS_TIME_SCALE = 999


class GaussianDiffusion:
    def __init__(
        self, num_timesteps=1000, beta_start=1e-4, beta_end=0.02, parametrization="predict_noise", beta_schedule="linear",
        noise_process="discrete", time_input="index", sde_beta_min=0.1, sde_beta_max=20.0,
    ):  # fmt: skip
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
        check_choice("noise_process", noise_process, NOISE_PROCESSES)
        check_choice("time_input", time_input, TIME_INPUTS)
        sde_numbers = all(is_number(b) for b in (sde_beta_min, sde_beta_max))
        require(
            sde_numbers and 0 < sde_beta_min < sde_beta_max,
            f"the VP-SDE needs 0 < sde_beta_min < sde_beta_max; got sde_beta_min={sde_beta_min!r}, sde_beta_max={sde_beta_max!r}",
        )
        self.noise_process = noise_process
        self.time_input = time_input
        self.sde_beta_min = float(sde_beta_min)
        self.sde_beta_max = float(sde_beta_max)
        self.num_timesteps = num_timesteps
        self.beta_schedule = beta_schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.parametrization = parametrization

        # Computed in float64: 1 - abar_t and the posterior terms lose digits in float32 near t = 0.
        # The grid t_k = (k + 1) / T of the module docstring.
        self.grid_t = torch.arange(1, num_timesteps + 1, dtype=torch.float64) / num_timesteps
        if noise_process == "vp_sde":
            # abar at the grid points from the closed form; the betas are what the integer-step
            # samplers need: beta_k = 1 - abar_k / abar_{k-1}, abar_{-1} = 1.
            alphas_cumprod = torch.exp(2.0 * self._vp_log_alpha(self.grid_t))
            betas = 1.0 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        # log alpha_t (alpha_t = sqrt(abar)) at the grid points: the discrete process between them.
        self.grid_log_alpha = 0.5 * torch.log(alphas_cumprod)
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
        """The constructor arguments (what model.pt stores under "diffusion"); the schedule, the
        noise process and the time input only when they are not the defaults, so models saved
        before they existed compare equal."""
        vp_sde = self.noise_process == "vp_sde"
        return {
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
            "parametrization": self.parametrization,
            **({"beta_schedule": self.beta_schedule} if self.beta_schedule != "linear" else {}),
            **({"noise_process": "vp_sde", "sde_beta_min": self.sde_beta_min, "sde_beta_max": self.sde_beta_max} if vp_sde else {}),
            **({"time_input": self.time_input} if self.time_input != "index" else {}),
        }

    # ---- continuous time t in (0, 1] (DPM-Solver's NoiseScheduleVP; float64) ------------------

    def _vp_log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha(t) = -(beta_min t + (beta_max - beta_min) t^2 / 2) / 2 of the VP-SDE."""
        return -0.25 * t**2 * (self.sde_beta_max - self.sde_beta_min) - 0.5 * t * self.sde_beta_min

    def log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """log alpha_t, alpha_t = sqrt(abar_t); the discrete process is piecewise linear in t
        between the grid points (linearly extended below 1 / T)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.noise_process == "vp_sde":
            return self._vp_log_alpha(t)
        return _interp(t, self.grid_t, self.grid_log_alpha)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self.log_alpha(t)))

    def lambda_(self, t: torch.Tensor) -> torch.Tensor:
        """Half the log-SNR, log(alpha_t / sigma_t) (the DPM-Solver paper's lambda_t)."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))

    def inverse_lambda(self, lam: torch.Tensor) -> torch.Tensor:
        """t of a given lambda: log alpha = -log(1 + e^{-2 lambda}) / 2, then t of log alpha (the
        VP-SDE's quadratic solved in its cancellation-free form; the discrete process by inverse
        interpolation, log alpha falling with t)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)
        if self.noise_process == "vp_sde":
            b0, b1 = self.sde_beta_min, self.sde_beta_max
            # (b1 - b0)/4 t^2 + b0/2 t + log_alpha = 0  ->  t = -2 log_alpha / (b0/2 + sqrt(b0^2/4 - (b1 - b0) log_alpha))
            return -2.0 * log_alpha / (0.5 * b0 + torch.sqrt(0.25 * b0**2 - (b1 - b0) * log_alpha))
        return _interp(log_alpha, self.grid_log_alpha.flip(0), self.grid_t.flip(0))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is fed at integer steps k (a LongTensor) or continuous times t (a
        floating tensor in (0, 1]); the module docstring's time inputs. The 0-based index of an
        integer step stays the same tensor, so this project's own recipe is unchanged."""
        T = self.num_timesteps
        if not t.is_floating_point():
            if self.time_input == "index":
                return t
            if self.time_input == "index_plus_one":
                return t + 1
            return (t + 1).to(torch.float32) * (UVIT_CONTINUOUS_TIME_SCALE / T)
        scale = {"index": T, "index_plus_one": T, "t_times_999": UVIT_CONTINUOUS_TIME_SCALE}[self.time_input]
        return (t * scale - (1.0 if self.time_input == "index" else 0.0)).to(torch.float32)

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
        so does dpm_solver, so that a number of steps means the same network evaluations
        (dpm_solver_fast and euler_maruyama: `steps` network evaluations at continuous times of
        their own, dpm_solver.py and sde.py).
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
        device). With `clip_denoised` (DDPM/ADM default; sampling passes it in pixel space only,
        never for latents) ddpm, ddim and dpm_solver clip the x0 prediction to [-1, 1] at every
        step; U-ViT's samplers dpm_solver_fast and euler_maruyama never clip, as U-ViT's do not.
        Call under torch.inference_mode(); the loop itself never waits on the device.
        """
        if sampler == "dpm_solver":  # diffusers' scheduler runs the multistep update (dpm_solver.py)
            from duodiff.core.dpm_solver import DPM_SOLVER_ORDER, dpm_solver_sample

            timesteps = self.timesteps(sampler, steps)
            return dpm_solver_sample(
                self, denoise, noise, timesteps, order=DPM_SOLVER_ORDER, clip_denoised=clip_denoised, progress=progress
            )
        if sampler == "dpm_solver_fast":  # U-ViT's DPM-Solver-fast, order 3 single-step (dpm_solver.py)
            from duodiff.core.dpm_solver import dpm_solver_fast_sample

            self.timesteps(sampler, steps)  # checks steps
            return dpm_solver_fast_sample(self, denoise, noise, steps, progress=progress)
        if sampler == "euler_maruyama":  # U-ViT's CIFAR-10 / CelebA sampler, the reverse VP-SDE (sde.py)
            from duodiff.core.sde import euler_maruyama_sample

            self.timesteps(sampler, steps)  # checks steps
            return euler_maruyama_sample(self, denoise, noise, steps, generator=generator, progress=progress)
        plan = self.sampling_plan(sampler, steps, eta)
        x = noise
        batch = x.shape[0]
        iterator = enumerate(plan)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(plan), desc=f"{sampler} steps", leave=False)
        for i, step in iterator:
            t = torch.full((batch,), step.t, device=x.device, dtype=torch.long)
            output = denoise(x, self.network_time(t), i)
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


RECIPE_KEYS = ("noise_process", "time_input", "sde_beta_min", "sde_beta_max")


def add_diffusion_recipe_flags(parser) -> None:
    """The noise process and time-input flags, shared by `duodiff train` and `duodiff convert`."""
    from duodiff.core.flags import add_flag

    add_flag(parser, "--noise-process", default="discrete", choices=NOISE_PROCESSES,
             help="discrete (the betas) | vp_sde (U-ViT's continuous VP-SDE)")  # fmt: skip
    add_flag(parser, "--time-input", default="index", choices=TIME_INPUTS,
             help="what the network sees: index (0-based step) | index_plus_one (U-ViT's discrete models) | "
             "t_times_999 (U-ViT's continuous models)")  # fmt: skip
    add_flag(parser, "--sde-beta-min", type=float, default=0.1, help="VP-SDE beta_min (U-ViT's sde.py)")
    add_flag(parser, "--sde-beta-max", type=float, default=20.0, help="VP-SDE beta_max (U-ViT's sde.py)")


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of (xp increasing, fp) at x, extended linearly past both ends."""
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (x - x0) * (f1 - f0) / (x1 - x0)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    if generator.device == x.device:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    # Draw on the generator's device (normally the CPU, so images do not depend on the GPU), into
    # pinned memory, and copy without blocking so the host never waits for the GPU queue.
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype, pin_memory=x.is_cuda)
    return z.to(x.device, non_blocking=True)

