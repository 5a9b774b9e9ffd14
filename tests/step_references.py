"""References for the step math, independent of the code under test: torch's ``Normal``, diffusers'
schedulers (SD's config), and the closed-form DDIM Gaussian in float64. Shared by the step and sampler
tests."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor
from torch.distributions import Normal

from rebel_diffusion.models import SD_SCHEDULER_CONFIG

CPU = torch.device("cpu")
N_STEPS = 10  # scheduler steps in the step-function tests


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=CPU).manual_seed(seed)


def randn(shape, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed)) * scale


def same_noise(shape, seed: int) -> torch.Tensor:
    """The draw our step makes with ``generator=gen(seed)`` (diffusers' randn_tensor)."""
    return randn_tensor(shape, generator=gen(seed), device=CPU, dtype=torch.float32)


def normal_log_prob(x, mean, std) -> torch.Tensor:
    """Reference: torch's Normal log-density, mean over the non-batch dims."""
    std = torch.as_tensor(std, dtype=mean.dtype).expand_as(mean)
    return Normal(mean, std).log_prob(x).flatten(1).mean(dim=1)


def ddim_scheduler(n: int = N_STEPS, **overrides) -> DDIMScheduler:
    sched = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, **overrides})
    sched.set_timesteps(n)
    return sched


def lcm_scheduler(n: int = 4, **overrides) -> LCMScheduler:
    sched = LCMScheduler(**{**SD_SCHEDULER_CONFIG, **overrides})
    sched.set_timesteps(n)
    return sched


def ddim_reference(sched, model_output, t: int, x, eta: float, alpha_prev=None):
    """Closed-form DDIM Gaussian (Song et al. 2021, eq. 12, as DDPO) in float64: (mean, std, x0_hat)."""
    acp = sched.alphas_cumprod.double()
    cfg = sched.config
    t_prev = t - cfg.num_train_timesteps // sched.num_inference_steps
    a_t = acp[t]
    if alpha_prev is None:
        alpha_prev = (
            acp[t_prev] if t_prev >= 0 else torch.tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
        )
    a_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    x, e = x.double(), model_output.double()
    if cfg.prediction_type == "epsilon":
        x0, eps = (x - (1 - a_t).sqrt() * e) / a_t.sqrt(), e
    else:  # v_prediction
        x0, eps = a_t.sqrt() * x - (1 - a_t).sqrt() * e, a_t.sqrt() * e + (1 - a_t).sqrt() * x
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    return mean, std, x0
