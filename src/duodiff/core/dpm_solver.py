"""Two DPM-Solvers on the project's noise processes and denoisers.

`dpm_solver` (DPM-Solver++ 2M, Lu et al. 2022, arXiv 2211.01095): a multistep solver of order
DPM_SOLVER_ORDER on DDIM's integer steps, run by diffusers' `DPMSolverMultistepScheduler`. It is
this project's, not U-ViT's.

`dpm_solver_fast` (below `dpm_solver_fast_sample`): U-ViT's ImageNet sampler, DPM-Solver-fast, the
single-step solver of order 3 (DPM-Solver, Lu et al. 2022, arXiv 2206.00927, Algorithms 1 and 2 and
Appendix's "fast" split), written from the paper at continuous times; see its docstring.

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

import math

import torch

ORDERS = (1, 2, 3)
# The order sampler `dpm_solver` runs at (2M); diffusion.sample passes it explicitly, and
# tests/test_dpm_solver.py checks the pipeline's sets against an order-2 reference.
DPM_SOLVER_ORDER = 2


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


def dpm_solver_sample(diffusion, denoise, noise, timesteps, order, clip_denoised=True, progress=None):
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
        output = denoise(x, diffusion.network_time(torch.full((batch,), t, device=x.device, dtype=torch.long)), i)
        x = scheduler.step(output, t, x).prev_sample
    return x


# ---- DPM-Solver-fast (U-ViT's) -------------------------------------------------------------------

# U-ViT's settings per noise process, as its evaluation scripts call the solver:
# vp_sde (eval_ldm.py, dpm_solver_pytorch.py): DPM-Solver (noise prediction), outer steps uniform in
# lambda (logSNR), from t = 1 to eps = 1e-4; discrete (eval_ldm_discrete.py, dpm_solver_pp): DPM-Solver++
# (data prediction), time-uniform steps, from t = 1 to eps = 1 / N (the grid's first point).
FAST_SETTINGS = {
    "vp_sde": {"prediction": "noise", "skip_type": "logSNR", "t_end": lambda T: 1e-4},
    "discrete": {"prediction": "data", "skip_type": "time_uniform", "t_end": lambda T: 1.0 / T},
}
SKIP_TYPES = ("logSNR", "time_uniform")
PREDICTIONS = ("noise", "data")


def fast_orders(steps: int) -> list[int]:
    """The paper's DPM-Solver-fast split of `steps` network evaluations: K = steps // 3 + 1 outer
    steps, all third order but the last one or two (steps % 3 == 0: ..., 2, 1; 1: ..., 1; 2: ..., 2)."""
    K = steps // 3 + 1
    tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
    return [3] * (K - len(tail)) + tail


def outer_times(diffusion, skip_type: str, t_start: float, t_end: float, orders: list[int]) -> list[float]:
    """The K + 1 outer times, t_start first. logSNR: uniform in lambda over the K outer steps (the
    paper's choice); time_uniform: a uniform grid of sum(orders) intervals taken at the cumulative
    orders, so that every network evaluation gets an equal share of time (dpm_solver_pp's rule)."""
    steps = sum(orders)
    if skip_type == "logSNR":
        lam = torch.linspace(float(diffusion.lambda_(t_start)), float(diffusion.lambda_(t_end)), len(orders) + 1, dtype=torch.float64)
        times = diffusion.inverse_lambda(lam)
        times[0], times[-1] = t_start, t_end  # exact ends; the inverse is exact only to round-off
        return times.tolist()
    fine = torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
    at = [0]
    for order in orders:
        at.append(at[-1] + order)
    return fine[at].tolist()


def single_step_coefficients(diffusion, s: float, t: float, order: int, prediction: str) -> list:
    """The intermediate times (lambda_s + r h, r = 1/2 for order 2; 1/3 and 2/3 for order 3) and
    the paper's coefficients of one single step from s to t, in float64 (module-level so the tests
    can write the algorithm out against them)."""
    r = {1: [], 2: [0.5], 3: [1.0 / 3.0, 2.0 / 3.0]}[order]
    lam_s, lam_t = float(diffusion.lambda_(s)), float(diffusion.lambda_(t))
    h = lam_t - lam_s
    mids = [float(diffusion.inverse_lambda(torch.tensor(lam_s + ri * h, dtype=torch.float64))) for ri in r]
    return r, h, mids


def dpm_solver_fast_sample(
    diffusion, denoise, noise, steps, progress=None, prediction=None, skip_type=None, t_end=None, order=None
):
    """U-ViT's DPM-Solver-fast from x_T = `noise` at t = 1 to t_end; returns x at t_end (the
    solver's last iterate, not denoised further, as U-ViT's sample()).

    Each outer step from s to t (h = lambda_t - lambda_s) is one single step of its order, its
    network evaluations at s and at lambda_s + r h. With noise prediction (DPM-Solver, the paper's
    Algorithms 1 and 2; phi_1 = e^h - 1, phi_2 = phi_1 / h - 1):
        order 1: x_t = (alpha_t / alpha_s) x_s - sigma_t phi_1 eps_s
        order 2: ... - sigma_t phi_1 / (2 r1) (eps_s1 - eps_s)
        order 3: u1 = (alpha_s1 / alpha_s) x_s - sigma_s1 (e^{r1 h} - 1) eps_s,
                 u2 = (alpha_s2 / alpha_s) x_s - sigma_s2 (e^{r2 h} - 1) eps_s
                      - sigma_s2 (r2 / r1) ((e^{r2 h} - 1) / (r2 h) - 1) (eps_s1 - eps_s),
                 x_t = (alpha_t / alpha_s) x_s - sigma_t phi_1 eps_s - (sigma_t / r2) phi_2 (eps_s2 - eps_s).
    With data prediction (DPM-Solver++, arXiv 2211.01095; the same expansion of
    x_t = (sigma_t / sigma_s) x_s + sigma_t int e^lambda x0 dlambda): alpha and sigma trade places,
    e^h becomes e^{-h}, and the eps differences become x0 differences with the opposite sign.
    `denoise(x, network time (B,), step_index)`: step_index counts network evaluations, so
    DuoDiff's t_switch counts the same `steps`. No x0 clipping: U-ViT's solvers have none.
    Unset settings are U-ViT's for the noise process (FAST_SETTINGS); `order` (1, 2 or 3, for
    tests) replaces the fast split with steps // order single steps of that order.
    """
    fast = FAST_SETTINGS[diffusion.noise_process]
    prediction = prediction or fast["prediction"]
    skip_type = skip_type or fast["skip_type"]
    t_end = fast["t_end"](diffusion.num_timesteps) if t_end is None else t_end
    assert prediction in PREDICTIONS and skip_type in SKIP_TYPES, (prediction, skip_type)
    orders = fast_orders(steps) if order is None else [order] * (steps // order)
    times = outer_times(diffusion, skip_type, 1.0, t_end, orders)
    x = noise
    batch = x.shape[0]
    calls = [0]

    def model(x_in, t: float):
        """The prediction the solver works with (eps or x0) at continuous time t."""
        t_vec = torch.full((batch,), t, dtype=torch.float64)
        output = denoise(x_in, diffusion.network_time(t_vec).to(x_in.device), calls[0])
        calls[0] += 1
        alpha, sigma = math.exp(float(diffusion.log_alpha(t))), float(diffusion.sigma(t))
        predicts_noise = diffusion.parametrization == "predict_noise"
        if prediction == "noise":
            return output if predicts_noise else (x_in - alpha * output) / sigma
        return (x_in - sigma * output) / alpha if predicts_noise else output

    outer = list(zip(times[:-1], times[1:], orders))
    if progress:
        from tqdm.auto import tqdm

        outer = tqdm(outer, desc="dpm_solver_fast steps", leave=False)
    for s, t, step_order in outer:
        x = _single_step(diffusion, model, x, s, t, step_order, prediction)
    assert calls[0] == sum(orders), (calls[0], orders)
    return x


def _single_step(diffusion, model, x, s: float, t: float, order: int, prediction: str):
    r, h, mids = single_step_coefficients(diffusion, s, t, order, prediction)

    def log_alpha(u):
        return float(diffusion.log_alpha(u))

    def sigma(u):
        return float(diffusion.sigma(u))

    m_s = model(x, s)
    if prediction == "noise":
        # x_u = (alpha_u / alpha_s) x - sigma_u (e^{r h} - 1) eps_s + ...
        def base(u, rh):
            return math.exp(log_alpha(u) - log_alpha(s)) * x - sigma(u) * math.expm1(rh) * m_s

        def second(u, rh):  # sigma_u ((e^{rh} - 1) / rh - 1), the phi_2 factor at u
            return -sigma(u) * (math.expm1(rh) / rh - 1.0)

        half = -sigma(t) * math.expm1(h)  # the order-2 difference's factor before 1 / (2 r1)
    else:
        # x_u = (sigma_u / sigma_s) x - alpha_u (e^{-r h} - 1) x0_s + ...
        def base(u, rh):
            return (sigma(u) / sigma(s)) * x - math.exp(log_alpha(u)) * math.expm1(-rh) * m_s

        def second(u, rh):
            return math.exp(log_alpha(u)) * (math.expm1(-rh) / rh + 1.0)

        half = -math.exp(log_alpha(t)) * math.expm1(-h)
    if order == 1:
        return base(t, h)
    if order == 2:
        s1 = mids[0]
        m_s1 = model(base(s1, r[0] * h), s1)
        return base(t, h) + (0.5 / r[0]) * half * (m_s1 - m_s)
    (r1, r2), (s1, s2) = r, mids
    m_s1 = model(base(s1, r1 * h), s1)
    u2 = base(s2, r2 * h) + (r2 / r1) * second(s2, r2 * h) * (m_s1 - m_s)
    m_s2 = model(u2, s2)
    return base(t, h) + (1.0 / r2) * second(t, h) * (m_s2 - m_s)
