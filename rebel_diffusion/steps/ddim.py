"""DDIM (Song et al. 2021, eq. 12) with eta > 0: a Gaussian step, and its log-prob."""

from __future__ import annotations

import math

from .gaussian import (
    MIN_VARIANCE,
    as_timesteps,
    clip_x0,
    draw_or_score,
    gaussian_log_prob,
    math_dtype,
    per_image,
    predict_x0_eps,
)


def ddim_step_with_logprob(
    scheduler, model_output, timestep, sample, *, eta: float, prev_sample=None, generator=None, with_mean=False
):
    """One DDIM step (Song et al. 2021, eq. 12) that also returns the log-prob of ``prev_sample``.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps``.
        model_output: (B, C, h, w) the (guided) UNet output at ``timestep``.
        timestep: int, or a (B,) tensor of per-image timesteps.
        sample: (B, C, h, w) x_t.
        eta: DDIM's noise scale, > 0 (1.0 is DDPM-like; the DDPO default).
        prev_sample: (B, C, h, w) x_prev to score; drawn from the step's Gaussian when None.
        generator: torch.Generator or a list of B of them, for drawing.

    Returns:
        (prev_sample (B, C, h, w) in ``sample``'s dtype, log_prob (B,) float32), where log_prob is
        the Gaussian log-density of prev_sample, MEAN over C, h, w (module docstring). log_prob is
        None for a deterministic (zero-variance) step. ``with_mean``: also the step's Gaussian mean
        (B, C, h, w) and std (a float or (B, 1, 1, 1)), for the KL to a reference policy.

    Notation -> names: abar_t = alpha_t, abar_prev = alpha_prev, sigma_t = std.
    """
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 for a policy-gradient sampler (got {eta}): with eta = 0 DDIM is deterministic "
            "and the step has no log-density"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before stepping")
    cfg = scheduler.config
    batch = sample.shape[0]
    ts = as_timesteps(timestep, batch)
    step = cfg.num_train_timesteps // scheduler.num_inference_steps

    # 1. abar_t and abar_prev; below t = 0 the "previous" alpha is final_alpha_cumprod (no clamping).
    acp = scheduler.alphas_cumprod.double().cpu()
    final = float(scheduler.final_alpha_cumprod)
    a_t = [float(acp[t]) for t in ts]
    a_prev = [float(acp[t - step]) if t - step >= 0 else final for t in ts]

    # 2. sigma_t^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), in float64 on the host.
    var = [(1 - ap) / (1 - at) * (1 - at / ap) for at, ap in zip(a_t, a_prev)]
    deterministic = [v <= MIN_VARIANCE for v in var]
    if any(deterministic) and not all(deterministic):
        raise ValueError("a batch mixes deterministic (zero-variance) and stochastic DDIM steps; score them apart")
    std_f = [0.0 if d else eta * math.sqrt(v) for v, d in zip(var, deterministic)]
    dir_f = [math.sqrt(max(0.0, 1 - ap - s * s)) for ap, s in zip(a_prev, std_f)]

    # 3. x0_hat and eps_hat from the model output (float32 math whatever the model's dtype).
    x = math_dtype(sample)
    alpha_t = per_image(a_t, x)
    sqrt_alpha_prev = per_image([math.sqrt(a) for a in a_prev], x)
    direction = per_image(dir_f, x)
    std = per_image(std_f, x)
    x0, eps = predict_x0_eps(cfg.prediction_type, math_dtype(model_output), x, alpha_t)
    if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
        x0 = clip_x0(scheduler, x0)

    # 4. mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat
    mean = sqrt_alpha_prev * x0 + direction * eps

    # 5. x_prev ~ N(mean, sigma_t^2), or the given one; its log-density.
    prev = draw_or_score(
        mean, std, None if prev_sample is None else math_dtype(prev_sample), generator, model_output.dtype
    )
    log_prob = None if all(deterministic) else gaussian_log_prob(prev, mean, std)
    if with_mean:
        return prev.to(sample.dtype), log_prob, mean, std
    return prev.to(sample.dtype), log_prob
