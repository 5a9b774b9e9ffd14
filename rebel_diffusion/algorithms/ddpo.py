"""DDPO (Black et al. 2023): PPO's clipped surrogate on per-step log-probs, the baseline REBEL is
compared with on identical rollouts, advantages and machinery.

Per image b and denoising step t, with ratio r = exp(ln pi_theta - ln pi_old) and advantage A
clipped to [-adv_clip_max, adv_clip_max]:

    L = mean_{b,t} max(-A * r, -A * clip(r, 1 - clip_range, 1 + clip_range))

DDPO's defaults: clip_range 1e-4 (on per-dim mean log-probs at SD 1.5, 512 px; the trainer's
default is the same nats per step at any resolution, ``ddpo_clip_range``), adv_clip_max 5.
Each step's term is independent, so each step is backpropagated on its own (peak memory flat in
the step count), as with REBEL.

Units. The sampler records per-dim MEAN log-probs (``sampling``); the flags are in nats of the
summed log-likelihood. ``ddpo_clip_range`` and ``ddpo_kl_coef`` convert them for this loss.
"""

from __future__ import annotations

import torch

# The default trust region of one step, in nats summed over the latent dims: DDPO's 1e-4 on per-dim
# means at SD 1.5, 512 px (D = 4 x 64 x 64 = 16,384) is 1.6 nats.
CLIP_NATS = 1.6


def ddpo_clip_range(clip_range: float | None, dims: int) -> float:
    """DDPO's clip range on per-dim mean log-prob ratios: ``clip_range`` as given, else CLIP_NATS / D.

    The per-dim mean of a log-ratio is its sum over the D = C*h*w latent dims divided by D, so a
    fixed range on it is a trust region that widens with the resolution; CLIP_NATS / D keeps it at
    the same nats per step (DDPO's 1e-4 at SD 1.5 512 px; 6.25e-3 on toy, where 1e-4 barely moved).
    REBEL's ``--anchor base`` clips each step's log-ratio to the sampling policy at the same bound.
    """
    return clip_range if clip_range is not None else CLIP_NATS / dims


def ddpo_kl_coef(kl_coef: float, dims: int, num_steps: int) -> float:
    """The coefficient of DDPO's KL term (nats per image) in its loss: kl_coef / (D * m).

    DDPO's PPO loss is a mean over m steps of per-dim mean log-probs: at ratio 1 its gradient is
    A * grad ln pi(y) / (D * m), with ln pi(y) summed over dims and steps. Dividing the KL by the
    same D * m makes the loss a multiple of the KL-regularised objective A * ln pi(y) - kl_coef * KL:
    kl_coef is the price of one nat of KL in advantage units, as in REBEL's loss (whose on-policy
    gradient per pair at eta = 2 is (A - A') * grad (ln pi(y) - ln pi(y'))). Without it the KL
    outweighed DDPO's policy term D * m times (2,048 on toy) and DDPO did not move off the base.
    """
    return kl_coef / (dims * num_steps)


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss of one step for a micro-batch. All (b,) -> (scalar loss summed over b, stats).

    Returns the SUM over the micro-batch (the caller divides by the number of terms of the
    optimizer step, so micro-batches and steps add up to the mean); ``weight`` (b,) scales each
    term (a per-step weight, ``--policy-step-weights``; default 1). Stats (no grad): approx_kl
    (0.5 * mean (log r)^2) and clipfrac (fraction of ratios outside the clip range).
    """
    adv = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    terms = torch.maximum(unclipped, clipped)
    loss = (terms if weight is None else terms * weight.to(terms.dtype)).sum()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
        }
    return loss, stats
