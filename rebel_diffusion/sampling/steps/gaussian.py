"""Gaussian log-density and KL (the log-prob convention: ``rebel_diffusion.sampling.steps``), and the helpers
the DDIM and LCM steps share."""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
MIN_VARIANCE = 1e-12  # below this a step is deterministic (exactly 0 when alpha_prev == alpha_t)


def math_dtype(t: torch.Tensor) -> torch.Tensor:
    """The dtype of the step math: float32 for float32/16/bf16 inputs; float64 stays (exactness tests)."""
    return t if t.dtype == torch.float64 else t.float()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2), elementwise, MEAN over all non-batch dims. (B, ...) -> (B,) float32.

    ``std``: a tensor broadcastable to x, or a python float (no device copy in the sampling loop).
    """
    x, mean = math_dtype(x), math_dtype(mean)
    if isinstance(std, torch.Tensor):
        std = math_dtype(std)
        log_std = torch.log(std)
    else:
        log_std = math.log(std)
    logp = -((x - mean) ** 2) / (2 * std**2) - log_std - _LOG_SQRT_2PI
    return logp.flatten(1).mean(dim=1)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) in nats, SUMMED over all non-batch dims. -> (B,) float32.

    = sum_d (mean_d - ref_mean_d)^2 / (2 std^2): the closed form for equal covariances.
    """
    diff = math_dtype(mean) - math_dtype(ref_mean)
    std = math_dtype(std) if isinstance(std, torch.Tensor) else std
    return (diff.pow(2) / (2 * std**2)).flatten(1).sum(dim=1)


def as_timesteps(timestep, batch: int) -> list[int]:
    """int or (B,)/(1,) tensor -> list of B python ints (host values: no device sync for ints)."""
    if isinstance(timestep, torch.Tensor):
        values = [int(v) for v in timestep.reshape(-1).tolist()]
    else:
        values = [int(timestep)]
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"timestep has {len(values)} entries for a batch of {batch}")
    return values


def per_image(values: list[float], like: torch.Tensor) -> torch.Tensor | float:
    """Per-image scalars -> a python float when all are equal (the sampling loop: no host-to-device
    copy, which would wait for the GPU), else a (B, 1, 1, 1) tensor of ``like``'s dtype and device."""
    if all(v == values[0] for v in values):
        return float(values[0])
    t = torch.tensor(values, dtype=torch.float64).to(like.dtype)
    return t.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def predict_x0_eps(prediction_type: str, model_output, sample, alpha_t):
    """Model output -> (x0_hat, eps_hat) for epsilon, v_prediction or sample parameterisations.

    alpha_t: abar_t as a float or a (B, 1, 1, 1) tensor.
    """
    sqrt_a, sqrt_b = alpha_t**0.5, (1 - alpha_t) ** 0.5
    if prediction_type == "epsilon":
        x0 = (sample - sqrt_b * model_output) / sqrt_a
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_b
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def clip_x0(scheduler, x0):
    """x0_hat clamped to the scheduler's ``clip_sample_range`` where it clips; thresholding is refused."""
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("schedulers with thresholding=True are not supported (SD 1.x/2.x do not use it)")
    if getattr(scheduler.config, "clip_sample", False):
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return x0


def draw_or_score(mean, std, prev_sample, generator, noise_dtype):
    """``prev_sample`` when given (scoring), else a draw mean + std z, z ~ N(0, I) of ``mean``'s shape."""
    if prev_sample is None:
        # Same draw as diffusers' schedulers (shape, generator(s), device, dtype), so samples match.
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=noise_dtype)
        prev_sample = mean + std * math_dtype(noise)
    return prev_sample
