"""Multistep LCM (Luo et al. 2023, Alg. 1): a Gaussian step but the last, and its log-prob."""

from __future__ import annotations

import math

from .gaussian import (
    as_timesteps,
    clip_x0,
    draw_or_score,
    gaussian_log_prob,
    math_dtype,
    per_image,
    predict_x0_eps,
)


def lcm_step_with_logprob(
    scheduler, model_output, timestep, sample, *, prev_sample=None, generator=None, with_mean=False
):
    """One multistep LCM step (Luo et al. 2023, Alg. 1) that also returns the log-prob of ``prev_sample``.

    denoised = c_out(t) x0_hat + c_skip(t) x_t; then, except at the last step,
    x_prev = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z: Gaussian with mean
    sqrt(abar_prev) denoised and std sqrt(1 - abar_prev). The last step returns ``denoised`` itself:
    deterministic, so its log_prob is None.

    Paper notation -> names here (diffusers' ``LCMScheduler.step`` names in brackets):
        the next timestep of the schedule -> t_prev [prev_timestep];  abar_t -> a_t, alpha_t [alpha_prod_t];
        abar_prev -> a_prev [alpha_prod_t_prev];  c_skip, c_out -> c_skip, c_out;
        x0_hat -> x0 [predicted_original_sample];  x_prev -> prev [prev_sample].

    ``scheduler`` is a diffusers ``LCMScheduler`` after ``set_timesteps``; ``timestep`` an int or a
    (B,) tensor taken from ``scheduler.timesteps``. Shapes and dtypes as ``ddim_step_with_logprob``.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before stepping")
    cfg = scheduler.config
    batch = sample.shape[0]
    ts = as_timesteps(timestep, batch)
    schedule = [int(t) for t in scheduler.timesteps.tolist()]
    try:
        idx = [schedule.index(t) for t in ts]
    except ValueError:
        raise ValueError(f"timestep {ts} is not in scheduler.timesteps {schedule}") from None
    last = [i == scheduler.num_inference_steps - 1 for i in idx]
    if any(last) and not all(last):
        raise ValueError("a batch mixes the final (deterministic) LCM step with stochastic ones; score them apart")

    # 1. The previous timestep: the next one of the schedule (the last step keeps t; it draws no noise).
    t_prev = [schedule[i + 1] if i + 1 < len(schedule) else t for i, t in zip(idx, ts)]

    # 2. abar_t and abar_prev (final_alpha_cumprod below t = 0).
    acp = scheduler.alphas_cumprod.double().cpu()
    final = float(scheduler.final_alpha_cumprod)
    a_t = [float(acp[t]) for t in ts]
    a_prev = [float(acp[t]) if t >= 0 else final for t in t_prev]
    x = math_dtype(sample)  # float32 math whatever the model's dtype
    alpha_t = per_image(a_t, x)

    # 3. The consistency model's boundary scalings c_skip(t), c_out(t).
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in ts]
    c_skip = per_image([float(s[0]) for s in scalings], x)
    c_out = per_image([float(s[1]) for s in scalings], x)

    # 4. x0_hat from the model output.
    x0, _ = predict_x0_eps(cfg.prediction_type, math_dtype(model_output), x, alpha_t)

    # 5. Clip x0_hat as the scheduler would (thresholding is refused).
    if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
        x0 = clip_x0(scheduler, x0)

    # 6. denoised = c_out x0_hat + c_skip x_t; at the last step it is the output (no log-prob).
    denoised = c_out * x0 + c_skip * x
    if all(last):
        return (denoised.to(sample.dtype), None, denoised, 0.0) if with_mean else (denoised.to(sample.dtype), None)

    # 7. x_prev ~ N(sqrt(abar_prev) denoised, (1 - abar_prev) I), or the given one.
    mean = per_image([math.sqrt(a) for a in a_prev], x) * denoised
    std = per_image([math.sqrt(1 - a) for a in a_prev], x)
    prev = draw_or_score(
        mean, std, None if prev_sample is None else math_dtype(prev_sample), generator, model_output.dtype
    )

    # 8. log pi(x_prev | x_t): the Gaussian log-density, mean over C, h, w.
    log_prob = gaussian_log_prob(prev, mean, std)
    if with_mean:
        return prev.to(sample.dtype), log_prob, mean, std
    return prev.to(sample.dtype), log_prob
