"""REBEL (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards").

For a prompt x and two images y, y' drawn from the current policy pi_t, REBEL's update is

    theta_{t+1} = argmin_theta E[ ( (1/eta) * ( ln pi_theta(y|x)/pi_t(y|x) - ln pi_theta(y'|x)/pi_t(y'|x) )
                                    - ( A(x,y) - A(x,y') ) )^2 ]

with A the (normalised) reward, or, for intransitive preferences, the target P(y > y' | x) - 1/2.
For a diffusion model ln pi(y|x) is the trajectory log-likelihood: the sum over the trained steps
of the per-step Gaussian log-density, summed over the D = C*h*w latent dims. ``--eta`` is defined
against that sum, so it means the same at every resolution and latent size: the regression asks
the trajectory log-likelihood ratio of a pair to move by eta nats per unit of advantage gap. The
sampler records per-dim MEANS (see ``sampling``): ``eta_per_dim`` converts, eta_mean = eta / D.

Per-step weights (``--policy-step-weights``): D(y) = sum_t w_t (ln pi_theta - ln pi_t)(y, t), a
weighted trajectory log-ratio (all w_t = 1: the paper's); the gradient weights each step by w_t.

Pairs: with k images per prompt, every pair of the group (k(k-1)/2 of them, equally weighted).

Memory-lean exact gradient: with residual rho = (1/eta) * (D_theta(y) - D_theta(y')) - (A - A'),
dL/dtheta = mean_pairs 2 * rho / eta * d/dtheta [ln pi_theta(y) - ln pi_theta(y')]. So rho is
computed once without a graph, the pairs' weights are summed per image (``image_coefficients``),
and then each image and timestep is backpropagated once through the surrogate ``rebel_surrogate``:
peak memory does not grow with the step count, and the cost per image does not grow with k.

Anchor (``--anchor``). The paper regresses against pi_t, the policy that sampled: each epoch a
fresh trust region, and nothing bounds the distance to the base over many epochs. ``--anchor
base`` regresses against the frozen base pi_ref instead (the PRDP form, Deng et al. 2024):

    D(y) = ln pi_theta(y|x) - ln pi_ref(y|x),   loss = max( rho^2, rho_clip^2 )

with rho as above and rho_clip the same with each step's log-ratio to the SAMPLING policy,
ln pi_theta/pi_t, clipped to [-epsilon, epsilon] (a proximal step, PPO-style). Its fixed point is
pi* proportional to pi_ref exp(eta A): eta bounds the log-likelihood ratio to the base, whatever
the number of epochs. ``proximal_coefficients`` gives its exact gradient per image and step.
"""

from __future__ import annotations

import torch

from .ddpo import ddpo_clip_range


def eta_per_dim(eta: float, dims: int) -> float:
    """``--eta`` (against log-likelihoods summed over the D = C*h*w latent dims) for the per-dim mean
    log-probs the sampler records: eta / D."""
    return eta / dims


def proximal_epsilon(clip_range: float | None, dims: int) -> float:
    """The clip of ``--anchor base`` on each step's per-dim mean log-ratio to the sampling policy:
    DDPO's trust region (``ddpo.ddpo_clip_range``), the same nats per step at any resolution."""
    return ddpo_clip_range(clip_range, dims)


def pair_indices(group: torch.Tensor) -> torch.Tensor:
    """All pairs (i, j), i < j, of images that share a group id. (B,) -> (P, 2) long.

    Pairs are ordered by group, then by i, then j, so the pairing is deterministic.
    """
    group = group.cpu()
    pairs = []
    for g in torch.unique(group, sorted=True).tolist():
        members = (group == g).nonzero().flatten()
        if len(members) >= 2:
            pairs.append(torch.combinations(members, r=2))
    if not pairs:
        return torch.zeros(0, 2, dtype=torch.long)
    return torch.cat(pairs)


def rebel_residual(
    log_ratio_a: torch.Tensor, log_ratio_b: torch.Tensor, target: torch.Tensor, eta: float
) -> torch.Tensor:
    """rho = (1/eta) * (log_ratio_a - log_ratio_b) - target, per pair. All (P,) -> (P,).

    log_ratio = ln pi_theta(y) - ln pi_t(y) (trajectory sums); target = A(y) - A(y') or P(y > y') - 1/2.
    """
    return (log_ratio_a - log_ratio_b) / eta - target


def rebel_loss(log_ratio_a: torch.Tensor, log_ratio_b: torch.Tensor, target: torch.Tensor, eta: float) -> torch.Tensor:
    """REBEL's squared regression loss, averaged over pairs: mean(rho^2). (P,) x3 -> scalar."""
    return rebel_residual(log_ratio_a, log_ratio_b, target, eta).pow(2).mean()


def image_coefficients(
    pairs: torch.Tensor, residual: torch.Tensor, eta: float, num_pairs: int, num_images: int
) -> torch.Tensor:
    """Each image's weight in the REBEL loss gradient. (P, 2), (P,) -> (num_images,).

    With w_p = 2 rho_p / (eta P) (rho from ``rebel_residual``, a constant; P = num_pairs, all pairs
    the loss averages over), dL/dtheta = sum_p w_p d/dtheta [ln pi(y_a) - ln pi(y_b)]
    = sum_i c_i d/dtheta ln pi(y_i), c_i = sum_{p: a_p = i} w_p - sum_{p: b_p = i} w_p. So each
    image's log-prob is differentiated once, not once per pair it is in (k - 1 of them).
    """
    weight = 2.0 * residual.detach() / (eta * num_pairs)  # (P,)
    coef = torch.zeros(num_images, dtype=weight.dtype, device=weight.device)
    coef.index_add_(0, pairs[:, 0].to(weight.device), weight)
    coef.index_add_(0, pairs[:, 1].to(weight.device), -weight)
    return coef


def rebel_surrogate(log_prob: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    """A scalar whose gradient is the REBEL loss gradient through these log-probs: sum_i c_i ln pi(y_i).

    log_prob: (n,) differentiable log-probs of one step (or a sum of steps) of n images;
    coefficient: (n,) their ``image_coefficients`` (constants). Micro-batches and steps add up exactly.
    """
    return (coefficient.detach() * log_prob).sum()


def proximal_coefficients(
    pairs: torch.Tensor,
    step_ratio: torch.Tensor,
    base_offset: torch.Tensor,
    target: torch.Tensor,
    eta: float,
    epsilon: float,
    valid: torch.Tensor | None = None,
    step_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The base-anchored REBEL loss with proximal clipping: its per-image, per-step gradient weights.

    pairs: (P, 2) image indices; step_ratio: (B, S) ln pi_theta - ln pi_t of each image's S steps
    (constants; 0 on-policy); base_offset: (B,) sum over the same steps of ln pi_t - ln pi_ref;
    target: (P,); valid: (P,) bool (default all), the pairs the loss averages over.
    With D = step_ratio.sum + base_offset and D_clip = step_ratio.clamp(-epsilon, epsilon).sum +
    base_offset, rho = (D(y) - D(y')) / eta - target and rho_clip likewise, the loss is
    mean over valid pairs of max(rho^2, rho_clip^2). Its gradient is
    sum_{i,t} c_{i,t} d/dtheta ln pi_theta(y_i, t): a pair whose unclipped term is the larger weighs
    all steps of its images by +-2 rho / (eta P); one whose clipped term is the larger weighs only the
    steps inside the clip, by +-2 rho_clip / (eta P). ``step_weight`` (S,) weighs each step's term
    of D and D_clip (base_offset is then the weighted sum too), and so its gradient weight.
    Returns (c (B, S), per-pair loss (P,) (0 for invalid pairs), prediction (P,) = (D(y) - D(y')) / eta).
    """
    w = torch.ones(step_ratio.shape[1], dtype=step_ratio.dtype, device=step_ratio.device)
    w = w if step_weight is None else step_weight.to(step_ratio.device, step_ratio.dtype)  # (S,)
    valid = torch.ones(len(pairs), dtype=torch.bool, device=step_ratio.device) if valid is None else valid
    valid = valid.to(step_ratio.device)
    a, b = pairs[:, 0].to(step_ratio.device), pairs[:, 1].to(step_ratio.device)
    full = (step_ratio * w).sum(dim=1) + base_offset  # (B,)
    clipped = (step_ratio.clamp(-epsilon, epsilon) * w).sum(dim=1) + base_offset  # (B,)
    prediction = (full[a] - full[b]) / eta  # (P,)
    rho = prediction - target
    rho_clip = (clipped[a] - clipped[b]) / eta - target
    use_clip = rho_clip.abs() > rho.abs()  # (P,) the clipped term is the max
    num = max(int(valid.sum()), 1)
    zero = torch.zeros_like(rho)
    w_full = torch.where(valid & ~use_clip, 2 * rho / (eta * num), zero)  # (P,)
    w_clip = torch.where(valid & use_clip, 2 * rho_clip / (eta * num), zero)
    per_image = torch.zeros(len(step_ratio), 2, dtype=rho.dtype, device=rho.device)  # (B, [full, clip])
    weights = torch.stack([w_full, w_clip], dim=1)  # (P, 2)
    per_image.index_add_(0, a, weights)
    per_image.index_add_(0, b, -weights)
    # torch.clamp passes the gradient at the bounds themselves: a step at exactly +-epsilon still moves.
    inside = ((step_ratio >= -epsilon) & (step_ratio <= epsilon)).to(rho.dtype)  # (B, S)
    coef = (per_image[:, :1] + inside * per_image[:, 1:]) * w  # (B, S)
    loss = torch.where(valid, torch.maximum(rho.pow(2), rho_clip.pow(2)), zero)
    return coef, loss, prediction


def pair_targets(
    advantages: torch.Tensor, pairs: torch.Tensor, preference: torch.Tensor | None = None
) -> torch.Tensor:
    """Regression targets per pair: A(y) - A(y'), or P(y > y') - 1/2 given preferences. -> (P,).

    advantages: (B,) normalised rewards; pairs: (P, 2); preference: (P,) P(y_i > y_j) or None.
    """
    if preference is not None:
        return preference.float() - 0.5
    return advantages[pairs[:, 0]] - advantages[pairs[:, 1]]


def regression_fit(prediction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """How well (1/eta) * log-ratio difference fits the target over pairs. (P,), (P,) -> stats.

    r2 = 1 - sum (pred - target)^2 / sum (target - mean target)^2 (1: solved; 0: no better than a
    constant; on-policy, pred = 0, it is about -mean^2/var); corr: Pearson correlation (nan when
    either side is constant).
    """
    pred, tgt = prediction.double().flatten(), target.double().flatten()
    if len(tgt) < 2:
        return {"fit_r2": float("nan"), "fit_corr": float("nan")}
    ss_tot = (tgt - tgt.mean()).pow(2).sum()
    r2 = 1.0 - (pred - tgt).pow(2).sum() / ss_tot if ss_tot > 0 else torch.tensor(float("nan"))
    pc, tc = pred - pred.mean(), tgt - tgt.mean()
    denom = pc.norm() * tc.norm()
    corr = (pc @ tc) / denom if denom > 0 else torch.tensor(float("nan"))
    return {"fit_r2": float(r2), "fit_corr": float(corr)}


def trained_steps(step_std: list[float], min_std: float) -> list[int]:
    """The steps that train: stochastic ones (std > 0) whose noise std is at least ``min_std``.

    The log-prob's sensitivity to the model grows as 1/std^2, so the lowest-noise steps (on toy's
    10 DDIM steps: std 0.041 and 0.021, against 0.26-0.78 for the rest) dominate the log-ratio
    while they barely change the image. Raises ValueError when no step is left.
    """
    kept = [j for j, s in enumerate(step_std) if s > 0 and s >= min_std]
    if not kept:
        raise ValueError(
            f"no step left to train: every step's noise std is below {min_std:g} "
            f"(largest {max(step_std):.3g}); lower --min-step-std"
        )
    return kept


def subsample_steps(
    stochastic_steps: list[int], fraction: float, generator: torch.Generator
) -> tuple[list[int], float]:
    """A random subset of the trained steps and the scale that keeps the gradient unbiased.

    Picks m = max(1, round(fraction * T)) of the T stochastic steps uniformly without replacement;
    sum_t g_t = E[(T/m) * sum_{t in subset} g_t], so the returned scale is T/m.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")
    total = len(stochastic_steps)
    m = max(1, round(fraction * total))
    if m == total:
        return list(stochastic_steps), 1.0
    order = torch.randperm(total, generator=generator)[:m].sort().values.tolist()
    return [stochastic_steps[i] for i in order], total / m
