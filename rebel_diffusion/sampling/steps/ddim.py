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

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat + sigma_t z,  z ~ N(0, I),
    sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)  (eq. 16),
    so pi(x_prev | x_t) = N(mean, sigma_t^2 I) with mean the first two terms.

    Paper notation -> names here (diffusers' ``DDIMScheduler.step`` names in brackets):
        t - 1 -> t_prev [prev_timestep];  abar_t -> a_t, alpha_t [alpha_prod_t];
        abar_prev -> a_prev, sqrt_alpha_prev [alpha_prod_t_prev];  sigma_t(1)^2 -> var [variance];
        sigma_t(eta) -> std [std_dev_t];  sqrt(1 - abar_prev - sigma_t^2) -> direction;
        x0_hat -> x0 [pred_original_sample];  eps_hat -> eps [pred_epsilon];  x_prev -> prev [prev_sample].
    The per-image scalars (a_t, a_prev, var, ...) are host float64 lists, one entry per image.

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
        the Gaussian log-density of prev_sample, MEAN over C, h, w (``rebel_diffusion.sampling.steps``).
        log_prob is None for a deterministic (zero-variance) step. ``with_mean``: also the step's
        Gaussian mean (B, C, h, w) and std (a float or (B, 1, 1, 1)), for the KL to a reference policy.
    """
    # eta = 0 is deterministic DDIM: fine for drawing (log_prob None), but there is nothing to score.
    if eta < 0 or (eta == 0 and prev_sample is not None):
        raise ValueError(
            f"eta must be > 0 for a policy-gradient sampler (got {eta}): with eta = 0 DDIM is deterministic "
            "and the step has no log-density"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before stepping")
    cfg = scheduler.config
    batch = sample.shape[0]
    ts = as_timesteps(timestep, batch)

    # 1. The previous timestep t_prev = t - num_train_timesteps / num_inference_steps.
    t_prev = [t - cfg.num_train_timesteps // scheduler.num_inference_steps for t in ts]

    # 2. abar_t and abar_prev; below t = 0 abar_prev is final_alpha_cumprod (no clamping).
    acp = scheduler.alphas_cumprod.double().cpu()
    final = float(scheduler.final_alpha_cumprod)
    a_t = [float(acp[t]) for t in ts]
    a_prev = [float(acp[tp]) if tp >= 0 else final for tp in t_prev]
    x = math_dtype(sample)  # float32 math whatever the model's dtype
    alpha_t = per_image(a_t, x)

    # 3. x0_hat and eps_hat from the model output ("predicted x_0" of eq. 12).
    x0, eps = predict_x0_eps(cfg.prediction_type, math_dtype(model_output), x, alpha_t)

    # 4. Clip x0_hat as the scheduler would (thresholding is refused).
    if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
        x0 = clip_x0(scheduler, x0)

    # 5. sigma_t(eta) = eta sqrt(var), var = (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev) (eq. 16).
    var = [(1 - ap) / (1 - at) * (1 - at / ap) for at, ap in zip(a_t, a_prev)]
    deterministic = [v <= MIN_VARIANCE or eta == 0 for v in var]
    if any(deterministic) and not all(deterministic):
        raise ValueError("a batch mixes deterministic (zero-variance) and stochastic DDIM steps; score them apart")
    std_f = [0.0 if d else eta * math.sqrt(v) for v, d in zip(var, deterministic)]
    std = per_image(std_f, x)

    # 6. The "direction pointing to x_t" of eq. 12: sqrt(1 - abar_prev - sigma_t^2) eps_hat.
    direction = per_image([math.sqrt(max(0.0, 1 - ap - s * s)) for ap, s in zip(a_prev, std_f)], x)

    # 7. mean = sqrt(abar_prev) x0_hat + direction; x_prev = mean + sigma_t z, or the given one.
    sqrt_alpha_prev = per_image([math.sqrt(a) for a in a_prev], x)
    mean = sqrt_alpha_prev * x0 + direction * eps
    prev = draw_or_score(
        mean, std, None if prev_sample is None else math_dtype(prev_sample), generator, model_output.dtype
    )

    # 8. log pi(x_prev | x_t): the Gaussian log-density, mean over C, h, w; none for a deterministic step.
    log_prob = None if all(deterministic) else gaussian_log_prob(prev, mean, std)
    if with_mean:
        return prev.to(sample.dtype), log_prob, mean, std
    return prev.to(sample.dtype), log_prob
