"""GaussianDiffusion against closed forms, and DDPM/DDIM sampling against an exact (oracle) denoiser.

For Gaussian data x0 ~ N(mu, s^2) (per pixel) the optimal denoiser is known in closed form:
x_t ~ N(a mu, a^2 s^2 + b^2) with a = sqrt(abar_t), b = sqrt(1 - abar_t), and
    E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2),
    E[x0  | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2).
A correct sampler driven by it must reproduce the data mean and variance.
"""

import math

import pytest
import torch

from duodiff.core.diffusion import GaussianDiffusion, x0_and_eps
from duodiff.core.errors import DuodiffError
from duodiff.models.uvit import UViT
from duodiff.sample.policies import DuoDiffDenoiser, EarlyExitDenoiser, ModelDenoiser

torch.set_num_threads(1)


def hand_schedule(T=1000, beta_start=1e-4, beta_end=0.02):
    """The DDPM schedule with plain Python floats (independent of torch.cumprod)."""
    betas = [beta_start + (beta_end - beta_start) * i / (T - 1) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    return betas, abar


class GaussianOracle:
    """Exact denoiser for x0 ~ N(mu, s^2) per pixel, in either parametrization."""

    def __init__(self, diffusion, mu, s):
        self.diffusion, self.mu, self.s = diffusion, mu, s
        self.abar = diffusion._float64["alphas_cumprod"]

    def __call__(self, x, t, step_index):
        abar = self.abar[t].to(x.dtype).view(-1, 1, 1, 1)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        var = a**2 * self.s**2 + b**2
        if self.diffusion.parametrization == "predict_noise":
            return b * (x - a * self.mu) / var
        return self.mu + a * self.s**2 * (x - a * self.mu) / var


# ---- schedule ------------------------------------------------------------------------------------


def test_alphas_cumprod_matches_hand_product():
    d = GaussianDiffusion()
    betas, abar = hand_schedule()
    assert d.betas.dtype == torch.float32 and d.alphas_cumprod.shape == (1000,)
    assert d.betas[0].item() == pytest.approx(1e-4, rel=1e-6)
    assert d.betas[-1].item() == pytest.approx(0.02, rel=1e-6)
    for t in (0, 1, 10, 500, 999):
        assert d.alphas_cumprod[t].item() == pytest.approx(abar[t], rel=1e-6)
        assert d.sqrt_one_minus_alphas_cumprod[t].item() == pytest.approx(math.sqrt(1 - abar[t]), rel=1e-5)
    # The DDPM schedule ends almost fully noised: abar_T ~ 4e-5.
    assert abar[-1] == pytest.approx(4.04e-5, rel=0.02)


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_loss_weights_are_the_closed_form(gamma):
    """Min-SNR-gamma (Hang et al. 2023) from the hand schedule: SNR_t = abar_t / (1 - abar_t); the
    noise MSE is weighed by min(SNR_t, gamma) / SNR_t, the x0 MSE by min(SNR_t, gamma); uniform is 1."""
    _, abar = hand_schedule()
    snr = [a / (1 - a) for a in abar]
    noise = GaussianDiffusion(parametrization="predict_noise").loss_weights("min_snr", gamma)
    original = GaussianDiffusion(parametrization="predict_original").loss_weights("min_snr", gamma)
    for t in (0, 1, 50, 200, 500, 999):
        assert noise[t].item() == pytest.approx(min(snr[t], gamma) / snr[t], rel=1e-5), t
        assert original[t].item() == pytest.approx(min(snr[t], gamma), rel=1e-5), t
    # Near t = 0 SNR is ~1e4: the noise MSE's weight falls to gamma / SNR, the x0 MSE's is capped at gamma.
    assert noise[0].item() == pytest.approx(gamma * (1 - abar[0]) / abar[0], rel=1e-5) and noise[0] < 1e-3
    assert original[0].item() == gamma
    # At the noisy end SNR < gamma: the noise MSE keeps weight 1, the x0 MSE its SNR.
    assert noise[999].item() == 1.0 and original[999].item() == pytest.approx(snr[999], rel=1e-5)
    for parametrization in ("predict_noise", "predict_original"):
        assert torch.equal(GaussianDiffusion(parametrization=parametrization).loss_weights("uniform", gamma), torch.ones(1000))


def test_posterior_variance_formula_and_clipped_log():
    d = GaussianDiffusion(num_timesteps=50, beta_start=1e-3, beta_end=0.05)
    betas, abar = hand_schedule(50, 1e-3, 0.05)
    for t in (1, 2, 25, 49):
        expected = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
        assert d.posterior_variance[t].item() == pytest.approx(expected, rel=1e-5)
        assert d.posterior_log_variance_clipped[t].item() == pytest.approx(math.log(expected), rel=1e-5)
    assert d.posterior_variance[0].item() == 0.0
    # t = 0: DDPM replaces log(0) by log(beta~_1).
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(d.posterior_log_variance_clipped[1].item())


def test_posterior_mean_and_variance_equal_bayes_rule():
    """q(x_{t-1}|x_t,x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1-abar_{t-1})."""
    d = GaussianDiffusion()
    betas, abar = hand_schedule()
    x0 = torch.tensor([[[[0.7, -0.2]]]]).repeat(3, 1, 1, 1)
    xt = torch.tensor([[[[1.3, 0.4]]]]).repeat(3, 1, 1, 1)
    ts = [1, 300, 999]
    # The DDPM sampler's step from t is x_{t-1} = c_x0 x0 + c_xt x_t + sigma z: its mean and variance.
    plan = {step.t: step for step in d.sampling_plan("ddpm")}
    mean = torch.stack([plan[t].c_x0 * x0[row] + plan[t].c_xt * xt[row] for row, t in enumerate(ts)])
    var = torch.tensor([plan[t].sigma ** 2 for t in ts])
    for row, t in enumerate(ts):
        alpha = 1 - betas[t]
        precision = alpha / betas[t] + 1 / (1 - abar[t - 1])
        for col in range(2):
            m = (math.sqrt(alpha) * xt[row, 0, 0, col].item() / betas[t]
                 + math.sqrt(abar[t - 1]) * x0[row, 0, 0, col].item() / (1 - abar[t - 1])) / precision
            assert mean[row, 0, 0, col].item() == pytest.approx(m, rel=1e-4, abs=1e-6)
        assert var[row].item() == pytest.approx(1 / precision, rel=1e-4)


def test_q_sample_moments():
    d = GaussianDiffusion()
    _, abar = hand_schedule()
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.8)
    for t in (0, 250, 999):
        xt = d.q_sample(x0, torch.full((n,), t), torch.randn(x0.shape, generator=g))
        assert xt.mean().item() == pytest.approx(math.sqrt(abar[t]) * 0.8, abs=4 * math.sqrt((1 - abar[t]) / n) + 1e-6)
        assert xt.var().item() == pytest.approx(1 - abar[t], rel=0.02)


def test_targets_loss_and_parametrization_inverse():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    eps_d = GaussianDiffusion(parametrization="predict_noise")
    x0_d = GaussianDiffusion(parametrization="predict_original")
    assert torch.equal(eps_d.target(x0, noise), noise) and torch.equal(x0_d.target(x0, noise), x0)
    out = torch.randn(4, 2, 3, 3, generator=g)
    # The training loss (UViT.loss) with uniform weights is DDPM's L_simple: the MSE to the target.
    ones = torch.ones(4)
    assert UViT.loss(out, eps_d.target(x0, noise), ones)[0].item() == pytest.approx(((out - noise) ** 2).mean().item(), rel=1e-6)
    assert UViT.loss(out, x0_d.target(x0, noise), ones)[0].item() == pytest.approx(((out - x0) ** 2).mean().item(), rel=1e-6)
    xt = eps_d.q_sample(x0, t, noise)
    recip = eps_d.sqrt_recip_alphas_cumprod[t].view(-1, 1, 1, 1)
    recipm1 = eps_d.sqrt_recipm1_alphas_cumprod[t].view(-1, 1, 1, 1)
    for d, output in ((eps_d, noise), (x0_d, x0)):
        x0_hat, eps_hat = x0_and_eps(d.parametrization, xt, output, recip, recipm1)
        torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)  # t=999 divides by sqrt(abar) ~ 6e-3
        torch.testing.assert_close(eps_hat, noise, atol=1e-3, rtol=1e-3)


def test_timesteps():
    d = GaussianDiffusion()
    assert d.timesteps("ddpm") == list(range(999, -1, -1))
    assert d.timesteps("ddpm", 1000) == list(range(999, -1, -1))
    assert d.timesteps("ddim", 50) == list(range(980, -1, -20))  # DDIM paper's uniform skip
    assert GaussianDiffusion(num_timesteps=10).timesteps("ddim", 3) == [6, 3, 0]
    ts = d.timesteps("ddim", 30)
    assert len(set(ts)) == 30 and ts == sorted(ts, reverse=True) and ts[-1] == 0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: GaussianDiffusion(parametrization="v"), "parametrization must be one of predict_noise, predict_original; got 'v'"),
        (lambda: GaussianDiffusion(beta_start=0.1, beta_end=0.01), "beta_start=0.1, beta_end=0.01"),
        (lambda: GaussianDiffusion(num_timesteps=1), "num_timesteps must be an integer >= 2; got 1"),
        (lambda: GaussianDiffusion(beta_start="1e-4"), "got beta_start='1e-4', beta_end=0.02 (YAML reads 1e-4 as text: write 1.0e-4)"),
        (lambda: GaussianDiffusion().timesteps("ddpm", 50), "--steps must be 1000 (num_timesteps) for the ddpm sampler, got 50"),
        (lambda: GaussianDiffusion().timesteps("ddim", 1001), "--steps must be an integer in [1, 1000] for the ddim sampler; got 1001"),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(DuodiffError) as error:
        call()
    assert message in str(error.value)


# ---- sampling with the oracle --------------------------------------------------------------------

MU = torch.linspace(-0.5, 0.5, 16).view(1, 1, 4, 4)
S = 0.15


def oracle_samples(sampler, steps, eta=0.0, parametrization="predict_noise", n=2000, seed=0, s=S, clip=True):
    d = GaussianDiffusion(parametrization=parametrization)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 4, 4, generator=g)
    with torch.inference_mode():
        return d.sample(GaussianOracle(d, MU, s), noise, sampler, steps, eta=eta, generator=g, clip_denoised=clip)


def expected_variance(ts, eta, s):
    """Variance after sampling N(mu, s^2) data with the oracle, by propagating it step by step.

    With the oracle each step is linear in x_t: x_prev - a' mu = g (x_t - a mu) + sigma z with
    g = (a' a s^2 + d b) / (a^2 s^2 + b^2), d = sqrt(1 - a'^2 - sigma^2) (DDIM eq. 12; DDPM is
    eta = 1 over all steps), so Var' = g^2 Var + sigma^2. Finite steps lose some variance because
    the oracle gives E[x0 | x_t], not a draw from p(x0 | x_t).
    """
    _, abar = hand_schedule()
    var = 1.0
    for i, t in enumerate(ts):
        A, A_prev = abar[t], (abar[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        sigma = eta * math.sqrt((1 - A_prev) / (1 - A) * (1 - A / A_prev))
        d = math.sqrt(1 - A_prev - sigma**2)
        g = (math.sqrt(A_prev * A) * s**2 + d * math.sqrt(1 - A)) / (A * s**2 + 1 - A)
        var = g**2 * var + sigma**2
    return var


def pooled_variance(x):
    return ((x - x.mean(0)) ** 2).mean().item()


@pytest.mark.parametrize(
    "sampler, steps, eta, ts",
    [
        ("ddpm", None, 0.0, list(range(999, -1, -1))),
        ("ddim", 50, 0.0, list(range(980, -1, -20))),
        ("ddim", 50, 1.0, list(range(980, -1, -20))),
    ],
)
def test_oracle_sampling_follows_the_closed_form_moments(sampler, steps, eta, ts):
    x = oracle_samples(sampler, steps, eta)
    n = x.shape[0]
    # The mean is exact for any number of steps: within 5 standard errors per pixel.
    assert (x.mean(0) - MU[0]).abs().max().item() < 5 * S / math.sqrt(n)
    # Pooled variance over 32k values: standard error ~0.8 %, tolerance 4 %.
    assert pooled_variance(x) == pytest.approx(expected_variance(ts, 1.0 if sampler == "ddpm" else eta, S), rel=0.04)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0)])
def test_oracle_sampling_over_all_steps_recovers_the_data(sampler, eta):
    # s = 0.5 so that 1000 steps lose < 2 % of the variance; no clipping, the data exceed [-1, 1].
    x = oracle_samples(sampler, 1000, eta, s=0.5, clip=False)
    assert (x.mean(0) - MU[0]).abs().max().item() < 5 * 0.5 / math.sqrt(x.shape[0])
    assert pooled_variance(x) == pytest.approx(0.25, rel=0.04)


def test_oracle_single_point_is_hit_exactly():
    d = GaussianDiffusion()
    point = torch.tensor([0.25, -0.75]).view(1, 1, 1, 2)
    oracle = GaussianOracle(d, point, 0.0)
    for sampler, steps in (("ddpm", None), ("ddim", 20)):
        g = torch.Generator().manual_seed(3)
        x = d.sample(oracle, torch.randn(5, 1, 1, 2, generator=g), sampler, steps, eta=0.0, generator=g)
        torch.testing.assert_close(x, point.expand(5, 1, 1, 2), atol=1e-5, rtol=0)


def test_ddim_eta0_is_deterministic_and_ignores_the_generator():
    d = GaussianDiffusion()
    oracle = GaussianOracle(d, MU, S)
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = d.sample(oracle, noise, "ddim", 25, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = d.sample(oracle, noise, "ddim", 25, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)


def test_stochastic_samplers_are_reproducible_with_the_generator():
    d = GaussianDiffusion()
    oracle = GaussianOracle(d, MU, S)
    noise = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    for sampler, steps, eta in (("ddpm", None, 0.0), ("ddim", 25, 0.5)):
        run = lambda seed: d.sample(oracle, noise, sampler, steps, eta=eta, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run(1), run(1))
        assert not torch.allclose(run(1), run(2))


def test_ddim_eta1_over_all_steps_equals_ddpm():
    """With sigma_t^2 = beta~_t, DDIM's update is the DDPM posterior step (DDIM paper, sec. 4.1)."""
    d = GaussianDiffusion(num_timesteps=200)
    oracle = GaussianOracle(d, MU, S)
    noise = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ddpm = d.sample(oracle, noise, "ddpm", None, generator=torch.Generator().manual_seed(5))
    ddim = d.sample(oracle, noise, "ddim", 200, eta=1.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 30, 0.0), ("ddim", 30, 0.7)])
def test_predict_original_matches_predict_noise(sampler, steps, eta):
    a = oracle_samples(sampler, steps, eta, "predict_noise", n=64, seed=4)
    b = oracle_samples(sampler, steps, eta, "predict_original", n=64, seed=4)
    assert pooled_variance(a) > 0.01  # a real sample set, not a collapsed one
    torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_x0_prediction_is_clipped():
    d = GaussianDiffusion()
    far = lambda x, t, i: torch.full_like(x, 5.0)  # predict_original-style constant far outside [-1, 1]
    d_x0 = GaussianDiffusion(parametrization="predict_original")
    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d_x0.sample(far, noise, "ddim", 10), torch.ones(2, 1, 2, 2))
    unclipped = d_x0.sample(far, noise, "ddim", 10, clip_denoised=False)
    torch.testing.assert_close(unclipped, torch.full((2, 1, 2, 2), 5.0))
    assert d.parametrization == "predict_noise"


# ---- denoisers -----------------------------------------------------------------------------------


class CountingModel(torch.nn.Module):
    """Fake U-ViT: records (timestep, batch) of each call, returns a model-specific constant."""

    def __init__(self, depth, value):
        super().__init__()
        self.depth, self.value, self.calls = depth, value, []

    def forward(self, x, t, y=None):
        self.calls.append((t[0].item(), x.shape[0], y))
        return torch.full_like(x, self.value)


def test_duodiff_switches_model_at_t_switch():
    d = GaussianDiffusion()
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    steps = 10
    ts = d.timesteps("ddim", steps)
    y = torch.tensor([1, 2, 3])
    for t_switch in (0, 4, 10):
        shallow, full = CountingModel(3, 0.1), CountingModel(13, -0.2)
        den = DuoDiffDenoiser(shallow, full, t_switch, y=y, steps=steps)
        d.sample(den, noise, "ddim", steps)
        assert [c[0] for c in shallow.calls] == ts[:t_switch]
        assert [c[0] for c in full.calls] == ts[t_switch:]
        assert all(c[2] is y for c in shallow.calls + full.calls)
        depth = den.executed_depth(steps, 3)
        assert depth.shape == (steps, 3) and depth.dtype == torch.long
        assert depth[:, 0].tolist() == [3] * t_switch + [13] * (steps - t_switch)


def test_duodiff_edge_cases_equal_single_models():
    d = GaussianDiffusion()
    noise = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    shallow, full = CountingModel(3, 0.1), CountingModel(13, -0.2)
    run = lambda den: d.sample(den, noise, "ddim", 10, eta=0.3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(run(DuoDiffDenoiser(shallow, full, 0)), run(ModelDenoiser(full)))
    assert torch.equal(run(DuoDiffDenoiser(shallow, full, 10)), run(ModelDenoiser(shallow)))
    assert not torch.equal(run(DuoDiffDenoiser(shallow, full, 5)), run(ModelDenoiser(full)))
    assert ModelDenoiser(full).executed_depth(10, 3).eq(13).all()


def test_ddim_spacing_when_the_steps_do_not_divide_the_timesteps():
    # T = 10, 4 steps: t = floor(i * T / steps) for i = 3, 2, 1, 0 = floor(7.5), floor(5.0),
    # floor(2.5), 0. Rounding the stride first, i * (T // steps) = 2i, would give [6, 4, 2, 0].
    d = GaussianDiffusion(num_timesteps=10)
    expected = [7, 5, 2, 0]
    assert d.timesteps("ddim", 4) == expected
    # The sampler calls the network at exactly these timesteps, noisiest first ...
    model = CountingModel(3, 0.0)
    d.sample(ModelDenoiser(model), torch.zeros(2, 1, 2, 2), "ddim", 4)
    assert [call[0] for call in model.calls] == expected
    # ... and each DDIM step jumps to the next of them: step 7 -> 5 with eta = 0 has
    # c_x0 = sqrt(abar_5) - sqrt(1 - abar_5) sqrt(abar_7) / sqrt(1 - abar_7), c_xt = sqrt(1 - abar_5) / sqrt(1 - abar_7).
    _, abar = hand_schedule(T=10)
    first = d.sampling_plan("ddim", 4)[0]
    assert first.t == 7
    assert first.c_x0 == pytest.approx(math.sqrt(abar[5]) - math.sqrt(1 - abar[5]) * math.sqrt(abar[7]) / math.sqrt(1 - abar[7]), rel=1e-9)
    assert first.c_xt == pytest.approx(math.sqrt(1 - abar[5]) / math.sqrt(1 - abar[7]), rel=1e-9)


class FakeEarlyExit(torch.nn.Module):
    """Exit layer = (t + sample index) mod (depth + 1), a rule the test can recompute."""

    depth = 6

    def forward_early_exit(self, x, t, threshold, y=None):
        exit_layer = (t + torch.arange(x.shape[0])) % (self.depth + 1)
        return torch.zeros_like(x), exit_layer


def test_early_exit_denoiser_records_exit_layers():
    d = GaussianDiffusion()
    den = EarlyExitDenoiser(FakeEarlyExit(), threshold=0.2)
    d.sample(den, torch.randn(4, 1, 2, 2), "ddim", 7)
    ts = d.timesteps("ddim", 7)
    expected = torch.tensor([[(t + b) % 7 for b in range(4)] for t in ts])
    assert den.exit_layers.dtype == torch.long
    assert torch.equal(den.exit_layers, expected)
    assert torch.equal(den.executed_depth(7, 4), expected)


def test_scaled_linear_is_stable_diffusions_schedule():
    """U-ViT's latent models (stable_diffusion_beta_schedule) and diffusers' "scaled_linear": betas
    evenly spaced in their square root, 0.00085 to 0.012 over 1,000 steps."""
    from diffusers import DDPMScheduler

    d = GaussianDiffusion(1000, 0.00085, 0.012, "predict_noise", beta_schedule="scaled_linear")
    uvit = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(d._float64["betas"], uvit, rtol=0, atol=1e-15)
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(d.alphas_cumprod, reference.alphas_cumprod.float(), rtol=1e-6, atol=1e-7)
    # The end points are shared with a linear schedule, the middle is not: abar_500 differs.
    linear = GaussianDiffusion(1000, 0.00085, 0.012, "predict_noise")
    assert abs(d.alphas_cumprod[500] - linear.alphas_cumprod[500]) > 0.05
    # model.pt records it; a linear schedule is left out, as in models saved before schedules existed.
    assert d.config()["beta_schedule"] == "scaled_linear" and "beta_schedule" not in linear.config()
    assert GaussianDiffusion(**d.config()).config() == d.config()
