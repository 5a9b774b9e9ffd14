"""The DDIM and LCM steps with log-probs (``rebel_diffusion.sampling.steps``) against diffusers' schedulers and
the closed forms; the Gaussian log-density against torch.distributions."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler
from step_references import (
    N_STEPS,
    ddim_reference,
    ddim_scheduler,
    gen,
    lcm_scheduler,
    normal_log_prob,
    randn,
    same_noise,
)
from torch.distributions import Normal
from torch.testing import assert_close

from rebel_diffusion.models import SD_SCHEDULER_CONFIG
from rebel_diffusion.sampling.steps import ddim_step_with_logprob, gaussian_log_prob, lcm_step_with_logprob

SHAPE = (2, 4, 8, 8)


# ----------------------------------------------------------------------------------------------
# gaussian_log_prob


@pytest.mark.parametrize("per_image_std", [False, True])
def test_gaussian_log_prob_matches_torch_normal(per_image_std):
    x, mean = randn((3, 4, 5, 6), 0), randn((3, 4, 5, 6), 1)
    std = randn((3, 1, 1, 1), 2).abs() + 0.1 if per_image_std else randn((3, 4, 5, 6), 2).abs() + 0.1
    got = gaussian_log_prob(x, mean, std)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert_close(got, normal_log_prob(x, mean, std.expand_as(mean)), rtol=1e-6, atol=1e-6)
    # a sum (instead of the documented mean) over the 120 latent dims would be 120x larger
    assert not torch.allclose(got, Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).sum(1))


def test_gaussian_log_prob_is_float32_for_half_inputs():
    x, mean = randn((2, 3, 4, 4), 0), randn((2, 3, 4, 4), 1)
    std = torch.full((2, 1, 1, 1), 0.5)
    got = gaussian_log_prob(x.half(), mean.half(), std.half())
    assert got.dtype == torch.float32
    assert_close(got, normal_log_prob(x.half().float(), mean.half().float(), std), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# ddim_step_with_logprob

DDIM_CONFIGS = {
    "epsilon": {},
    "v_prediction": {"prediction_type": "v_prediction"},
    "clip_sample": {"clip_sample": True, "clip_sample_range": 1.0},
}


@pytest.mark.parametrize("eta", [1.0, 0.4])
@pytest.mark.parametrize("config", list(DDIM_CONFIGS))
def test_ddim_step_equals_diffusers_and_closed_form(config, eta):
    sched = ddim_scheduler(**DDIM_CONFIGS[config])
    ts = sched.timesteps
    for i, t in enumerate((int(ts[0]), int(ts[len(ts) // 2]), int(ts[-1]))):
        out, x = randn(SHAPE, 10 + i), randn(SHAPE, 20 + i)
        prev, logp = ddim_step_with_logprob(sched, out, t, x, eta=eta, generator=gen(30 + i))
        noise = same_noise(SHAPE, 30 + i)
        expected = sched.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        assert_close(prev, expected, rtol=1e-5, atol=1e-5)

        mean, std, x0 = ddim_reference(sched, out, t, x, eta)
        assert float(std) > 0
        assert_close(prev.double(), mean + std * noise.double(), rtol=1e-5, atol=1e-5)
        assert logp.shape == (SHAPE[0],) and logp.dtype == torch.float32
        assert_close(logp.double(), normal_log_prob(prev.double(), mean, std), rtol=1e-5, atol=1e-4)

        # scoring a given transition: returns it unchanged, with the closed-form log-density
        other = expected + 0.01 * randn(SHAPE, 40 + i)
        scored, logp2 = ddim_step_with_logprob(sched, out, t, x, eta=eta, prev_sample=other)
        assert torch.equal(scored, other)
        assert_close(logp2.double(), normal_log_prob(other.double(), mean, std), rtol=1e-5, atol=1e-4)

        if config == "clip_sample":  # make sure clipping was exercised: unclipped x0_hat differs
            unclipped = ddim_reference(ddim_scheduler(), out, t, x, eta)[2]
            assert not torch.allclose(unclipped, x0)


def test_ddim_step_with_generator_list_equals_diffusers():
    sched = ddim_scheduler()
    t = int(sched.timesteps[3])
    out, x = randn(SHAPE, 1), randn(SHAPE, 2)
    prev, _ = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=[gen(5), gen(6)])
    expected = sched.step(out, t, x, eta=1.0, generator=[gen(5), gen(6)]).prev_sample
    assert_close(prev, expected, rtol=1e-5, atol=1e-5)
    # per-image generators: image 1 does not depend on image 0's generator
    prev_b, _ = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=[gen(7), gen(6)])
    assert torch.equal(prev_b[1], prev[1]) and not torch.allclose(prev_b[0], prev[0])


def test_ddim_tensor_timesteps_equal_per_image_calls():
    sched = ddim_scheduler()
    ts = sched.timesteps[[0, 4, 8]]  # three different (B,) timesteps, all stochastic
    shape = (3, *SHAPE[1:])
    out, x, given = randn(shape, 1), randn(shape, 2), randn(shape, 3, 0.5)
    drawn, _ = ddim_step_with_logprob(sched, out, ts, x, eta=1.0, generator=[gen(11), gen(12), gen(13)])
    _, scored = ddim_step_with_logprob(sched, out, ts, x, eta=1.0, prev_sample=given)
    for i in range(3):
        one = slice(i, i + 1)
        d_i, _ = ddim_step_with_logprob(sched, out[one], int(ts[i]), x[one], eta=1.0, generator=gen(11 + i))
        _, s_i = ddim_step_with_logprob(sched, out[one], int(ts[i]), x[one], eta=1.0, prev_sample=given[one])
        assert_close(drawn[one], d_i, rtol=0, atol=1e-6)
        assert_close(scored[one], s_i, rtol=1e-6, atol=1e-6)  # float64 vs float32 coefficients
    # the per-image timesteps were used: one timestep for all gives different log-probs
    _, same_t = ddim_step_with_logprob(sched, out, int(ts[0]), x, eta=1.0, prev_sample=given)
    assert not torch.allclose(same_t, scored)
    with pytest.raises(ValueError, match="timestep"):
        ddim_step_with_logprob(sched, out, ts[:2], x, eta=1.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_uses_final_alpha_cumprod_below_zero(spacing):
    # set_alpha_to_one=True: final_alpha_cumprod = 1 != alphas_cumprod[0], so clamping t_prev to 0 is wrong
    sched = ddim_scheduler(set_alpha_to_one=True, steps_offset=0, timestep_spacing=spacing)
    t = int(sched.timesteps[-1])
    assert t - 1000 // N_STEPS < 0 and float(sched.final_alpha_cumprod) == 1.0
    out, x = randn(SHAPE, 1), randn(SHAPE, 2)
    prev, logp = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=gen(3))
    noise = same_noise(SHAPE, 3)
    assert_close(prev, sched.step(out, t, x, eta=1.0, variance_noise=noise).prev_sample, rtol=1e-5, atol=1e-5)
    # abar_prev = 1: the step lands on x0_hat, deterministically
    mean, std, x0 = ddim_reference(sched, out, t, x, 1.0)
    assert float(std) == 0.0 and logp is None
    assert_close(prev.double(), x0, rtol=1e-5, atol=1e-5)
    # the peers' clamped computation (t_prev -> 0) gives another step
    mean_c, std_c, _ = ddim_reference(sched, out, t, x, 1.0, alpha_prev=sched.alphas_cumprod[0])
    clamped = mean_c + std_c * noise.double()
    assert (prev.double() - clamped).abs().max() > 1e-3


@pytest.mark.parametrize("eta", [0.0, -0.5])
def test_ddim_eta_must_be_positive_to_score(eta):
    sched = ddim_scheduler()
    x, e, t = randn(SHAPE, 2), randn(SHAPE, 1), int(sched.timesteps[0])
    with pytest.raises(ValueError, match=r"eta must be > 0.*(deterministic|log-density)"):
        ddim_step_with_logprob(sched, e, t, x, eta=eta, prev_sample=randn(SHAPE, 3))
    if eta == 0:  # drawing with deterministic DDIM: diffusers' own eta-0 step, and no log-prob
        prev, log_prob = ddim_step_with_logprob(sched, e, t, x, eta=0.0)
        assert log_prob is None
        torch.testing.assert_close(prev, sched.step(e, t, x, eta=0.0).prev_sample)


def test_ddim_needs_set_timesteps():
    sched = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step_with_logprob(sched, randn(SHAPE, 1), 1, randn(SHAPE, 2), eta=1.0)


def test_ddim_zero_variance_step_has_no_log_prob():
    # steps_offset=0 and set_alpha_to_one=False: last t = 0 and abar_prev = abar_0 = abar_t, variance 0
    sched = ddim_scheduler(steps_offset=0, set_alpha_to_one=False)
    t = int(sched.timesteps[-1])
    assert t == 0
    out, x = randn(SHAPE, 1), randn(SHAPE, 2)
    mean, std, _ = ddim_reference(sched, out, t, x, 1.0)
    assert float(std) == 0.0
    naive = gaussian_log_prob(mean.float(), mean.float(), torch.zeros(SHAPE[0], 1, 1, 1))
    assert not torch.isfinite(naive).all()  # what scoring it naively would feed the loss

    prev, logp = ddim_step_with_logprob(sched, out, t, x, eta=1.0, generator=gen(3))
    assert logp is None
    assert torch.isfinite(prev).all()
    assert_close(prev, sched.step(out, t, x, eta=1.0, variance_noise=same_noise(SHAPE, 3)).prev_sample)
    scored, logp2 = ddim_step_with_logprob(sched, out, t, x, eta=1.0, prev_sample=prev)
    assert logp2 is None and torch.equal(scored, prev)
    # a batch that mixes it with a stochastic step is refused, not silently scored
    with pytest.raises(ValueError, match="deterministic"):
        ddim_step_with_logprob(sched, out, torch.tensor([t, int(sched.timesteps[0])]), x, eta=1.0)


# ----------------------------------------------------------------------------------------------
# lcm_step_with_logprob


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_step_equals_diffusers_and_closed_form(prediction_type):
    ours, ref = lcm_scheduler(prediction_type=prediction_type), lcm_scheduler(prediction_type=prediction_type)
    ts = [int(t) for t in ref.timesteps]
    g_ours, g_ref = [gen(1), gen(2)], [gen(1), gen(2)]
    x = randn(SHAPE, 0)
    for i, t in enumerate(ts):
        out = randn(SHAPE, 50 + i)
        # the reference is stepped in order, so its step index is i
        expected = ref.step(out, ref.timesteps[i], x, generator=g_ref)
        prev, logp = lcm_step_with_logprob(ours, out, t, x, generator=g_ours)
        assert_close(prev, expected.prev_sample, rtol=1e-5, atol=1e-5)
        if i == len(ts) - 1:  # final step: deterministic, prev = denoised, no log-prob
            assert logp is None
            assert_close(prev, expected.denoised, rtol=1e-5, atol=1e-5)
        else:
            a_prev = ref.alphas_cumprod[ts[i + 1]].double()
            mean, std = a_prev.sqrt() * expected.denoised.double(), (1 - a_prev).sqrt()
            assert logp.shape == (SHAPE[0],) and logp.dtype == torch.float32
            assert_close(logp.double(), normal_log_prob(prev.double(), mean, std), rtol=1e-5, atol=1e-4)
            _, rescored = lcm_step_with_logprob(ours, out, t, x, prev_sample=prev)
            assert_close(rescored, logp, rtol=0, atol=1e-6)
        x = expected.prev_sample


def test_lcm_step_rejects_unknown_timestep():
    sched = lcm_scheduler()
    bad = int(sched.timesteps[0]) - 1
    with pytest.raises(ValueError, match="not in scheduler.timesteps"):
        lcm_step_with_logprob(sched, randn(SHAPE, 1), bad, randn(SHAPE, 2))
