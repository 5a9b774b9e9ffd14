"""DDPO (Black et al. 2023): PPO's clipped surrogate on per-step log-probs, the baseline REBEL is
compared with on identical rollouts, advantages and machinery.

Per image b and denoising step t, with ratio r = exp(ln pi_theta - ln pi_old) and advantage A
clipped to [-adv_clip_max, adv_clip_max]:

    L = mean_{b,t} max(-A * r, -A * clip(r, 1 - clip_range, 1 + clip_range))

DDPO's defaults: clip_range 1e-4 (on per-dim mean log-probs at SD 1.5, 512 px; the trainer's
default is the same nats per step at any resolution, ``train.ddpo_clip_range``), adv_clip_max 5.
Each step's term is independent, so each step is backpropagated on its own (peak memory flat in
the step count), as with REBEL.
"""

from __future__ import annotations

import torch


def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float = 1e-4,
    adv_clip_max: float = 5.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip loss of one step for a micro-batch. All (b,) -> (scalar loss summed over b, stats).

    Returns the SUM over the micro-batch (the caller divides by the number of terms of the
    optimizer step, so micro-batches and steps add up to the mean). Stats (no grad): approx_kl
    (0.5 * mean (log r)^2) and clipfrac (fraction of ratios outside the clip range).
    """
    adv = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob.float() - old_log_prob.float()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).sum()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * (log_ratio**2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
        }
    return loss, stats
