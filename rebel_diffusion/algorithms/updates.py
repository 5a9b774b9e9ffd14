"""The gradient of one optimizer step, for REBEL and for DDPO, one timestep at a time.

Both losses are sums over (trajectory, step) terms once REBEL's residual is known, so each
micro-batch and each step is backpropagated on its own: peak memory holds one UNet graph,
whatever the number of steps T. ``steps_per_pass`` steps share one UNet call (and graph): fewer,
larger calls where per-call overhead dominates (small models, CPUs), at that many times the
activation memory, still independent of T. ``backward(loss, last)`` is the caller's
(``accelerator.backward`` under ``no_sync`` until ``last``), so gradients are synchronised across
processes once per optimizer step.

``StepModel`` holds what both accumulators share (the UNet, its scheduler, the trajectories, how
to call and backpropagate it, the KL term and the per-step weights); ``StepModel.forward`` and
``StepModel.kl`` are the one forward and KL of a group of steps both use.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..sampling import Trajectories, rescore_log_probs, step_groups, steps_log_prob
from ..sampling.steps import gaussian_kl
from .ddpo import ppo_clip_loss
from .rebel import image_coefficients, proximal_coefficients, rebel_residual, rebel_surrogate


def log_ratios(
    unet,
    scheduler,
    traj: Trajectories,
    index: torch.Tensor,
    autocast=nullcontext,
    steps_per_pass: int = 1,
    steps: list[int] | None = None,
    per_step: bool = False,
) -> torch.Tensor:
    """ln pi_theta(y) - ln pi_t(y) of whole trajectories, no graph: (n,) float32 for images ``index``.

    Sums (re-scored - recorded) over ``steps`` (default: every stochastic step); ``per_step``: the
    (n, S) terms themselves.
    """
    if steps is None:
        steps = traj.stochastic_steps()
    with autocast():
        new = rescore_log_probs(unet, scheduler, traj, steps, index, steps_per_pass=steps_per_pass)  # (n, S)
    old = traj.log_probs[index.to(traj.log_probs.device)][:, steps].to(new.device)
    return new - old if per_step else (new - old).sum(dim=1)


@dataclass
class StepModel:
    """What REBEL's and DDPO's accumulators share: the model trained and how one step group is run.

    ``backward(loss, last)``: the caller's backward (default ``loss.backward()``); ``kl_coef`` and
    ``reference_mean(steps, index) -> (b*m, C, h, w)`` (the reference policy's step means, no graph):
    the KL term, off at 0; ``policy_weights`` / ``kl_weights``: (T,) per-step weights of the policy
    term and of the KL term (None: 1 for every step); ``kl_images``: (B,) 1 for the images the KL
    term covers and 0 for the others (None: every image), ``--kl-prompts``.
    """

    unet: torch.nn.Module
    scheduler: object
    traj: Trajectories
    steps_per_pass: int = 1
    autocast: Callable = nullcontext
    backward: Callable | None = None
    kl_coef: float = 0.0
    reference_mean: Callable | None = None
    policy_weights: torch.Tensor | None = None
    kl_weights: torch.Tensor | None = None
    kl_images: torch.Tensor | None = None  # (B,) 1 for the images the KL term covers, 0 else (None: all)

    def forward(self, index: torch.Tensor, group: list[int]):
        """Differentiable (log-probs (n, m), step means, stds) of images ``index`` on steps ``group``;
        the means and stds only when the KL term is on (else None)."""
        with self.autocast():
            if self.kl_coef > 0:
                return steps_log_prob(self.unet, self.scheduler, self.traj, group, index=index, with_mean=True)
            return steps_log_prob(self.unet, self.scheduler, self.traj, group, index=index), None, None

    def kl(
        self,
        mean: torch.Tensor,
        std: torch.Tensor,
        index: torch.Tensor,
        group: list[int],
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Closed-form KL(pi_theta || pi_ref) per image, summed over ``group`` with its KL weights, nats.
        -> (n,), differentiable through ``mean``; with ``keep`` ((n,) bool) only those images' (the
        reference pass runs on them alone)."""
        if keep is not None:  # mean, std: (n*m, ...) image-major
            rows = keep.to(mean.device).repeat_interleave(len(group))  # (n*m,)
            mean, index = mean[rows], index[keep.to(index.device)]
            std = std[rows] if isinstance(std, torch.Tensor) else std  # (n*m, 1, 1, 1), or one float
        with torch.no_grad(), self.autocast():
            ref = self.reference_mean(group, index)
        kl = gaussian_kl(mean, ref, std).view(len(index), len(group))  # (n, m)
        return (kl * self.step_weights("kl", group, kl)).sum(dim=1)

    def step_weights(self, term: str, group: list[int], like: torch.Tensor) -> torch.Tensor:
        """(m,) weights of ``group``'s steps for the "policy" or "kl" term, in ``like``'s dtype and device."""
        weights = self.policy_weights if term == "policy" else self.kl_weights
        if weights is None:
            return torch.ones(len(group), dtype=like.dtype, device=like.device)
        return weights[group].to(like.device, like.dtype)

    def backward_pass(self, loss: torch.Tensor, last: bool) -> None:
        (self.backward or (lambda loss, last: loss.backward()))(loss, last)


def rebel_accumulate(
    model: StepModel,
    pairs: torch.Tensor,
    targets: torch.Tensor,
    *,
    eta: float,
    train_batch_size: int,
    steps: list[int],
    step_scale: float = 1.0,
    on_policy: bool = False,
    score_unet=None,
    valid: torch.Tensor | None = None,
    ratio_steps: list[int] | None = None,
    base_log_probs: torch.Tensor | None = None,
    epsilon: float | None = None,
) -> dict:
    """Accumulate the REBEL loss gradient of one optimizer step into ``unet``'s parameters.

    pairs: (P, 2) image indices into ``model.traj``; targets: (P,) A(y) - A(y') or P(y > y') - 1/2.
    train_batch_size: images per forward/backward. Each image of the pairs is differentiated once
    (its pairs' weights summed, ``image_coefficients``): a step whose pairs are whole groups of k
    images costs k image passes, not k(k-1). steps: the stochastic steps trained (all of them, or a
    subsample whose sum is multiplied by ``step_scale`` = T/m to stay unbiased); ``steps_per_pass``
    of them share a UNet call.
    on_policy: the weights are still those that sampled ``traj``, so every log-ratio is exactly 0
    and the no-graph pass is skipped (it is also skipped when one micro-batch and one UNet call
    hold the whole step and ``steps`` is ``ratio_steps``: that call gives the log-ratios).
    ``score_unet``: the module for the no-graph pass (default ``unet``; pass the unwrapped module
    under DDP). ``valid``: (P,) bool, pairs to learn from (pairs with a non-finite reward keep their
    place, so every process runs the same backward passes, but add no gradient). ``ratio_steps``:
    the steps whose log-ratios make up D (default: every stochastic step; the trainer passes the
    trained steps, of which ``steps`` may be a subsample). eta is in the units of the log-probs
    given (per-dim means: the trainer passes its eta divided by C*h*w). Returns the loss mean(rho^2)
    over valid pairs before the step, the mean |log-ratio difference|, and (P,) tensors
    ``prediction`` = (1/eta) (D(y) - D(y')) and ``target`` for the fit statistics.

    ``model.kl_coef`` > 0 adds kl_coef * mean over the pairs' images of sum_t KL(pi_theta || pi_ref)
    at the recorded x_t (closed form, nats; ``StepModel.kl``); ``kl`` in the result is that mean
    before the step; images with ``model.kl_images`` 0 add nothing to it (the mean is still over
    all images: a covered image's price per nat is unchanged). ``model.policy_weights``: D is the
    weighted sum over steps (``rebel``).

    base_log_probs: (B, T) per-dim log-probs of the recorded trajectories under the frozen base:
    the regression is then anchored to the base (``rebel.proximal_coefficients``), D = ln pi_theta -
    ln pi_ref over ``ratio_steps``, with each step's ratio to the sampling policy clipped to
    +-``epsilon`` (the units of the log-probs given, as eta).

    1. rho = (1/eta) (D(y) - D(y')) - target from whole-trajectory log-ratios D, without a graph;
    2. c_i = sum over image i's pairs of +-2 rho_p / (eta P) (+ as y, - as y');
    3. for each micro-batch of images and group of steps, backpropagate
       sum_i c_i sum_{t in group} ln pi(y_i,t) (+ the KL term).
    """
    traj = model.traj
    num_pairs = len(pairs)
    device = traj.latents.device
    images = torch.unique(pairs.flatten())  # (n,) sorted: every image of the step's pairs, once
    chunks = list(images.split(train_batch_size))
    groups = step_groups(steps, model.steps_per_pass)
    ratio_steps = traj.stochastic_steps() if ratio_steps is None else list(ratio_steps)

    # One micro-batch and one UNet call hold the whole step, over every step of D: the pass that
    # backpropagates gives D as well, so the no-graph pass is skipped (same values, one call fewer).
    fused = not on_policy and len(chunks) == 1 and len(groups) == 1 and list(steps) == ratio_steps
    # 1. Residuals of all pairs of the step, from whole trajectories: each image's per-step log-ratios
    # to the sampling policy (n, S) over ratio_steps.
    if on_policy:
        step_images = torch.zeros(len(images), len(ratio_steps), device=device)
    elif fused:
        first = model.forward(images, groups[0])
        old = traj.log_probs[images.to(traj.log_probs.device)][:, steps].to(first[0].device)
        step_images = (first[0].detach() - old).to(device)  # (n, S)
    else:
        step_images = log_ratios(
            score_unet or model.unet, model.scheduler, traj, images, model.autocast, model.steps_per_pass,
            ratio_steps, per_step=True,
        ).to(device)  # fmt: skip
    step_ratio = torch.zeros(len(traj), len(ratio_steps), device=device, dtype=step_images.dtype)  # (B, S)
    step_ratio[images.to(device)] = step_images
    weight = model.step_weights("policy", ratio_steps, step_ratio)  # (S,)
    valid = torch.ones(num_pairs, dtype=torch.bool) if valid is None else valid.cpu()
    num_valid = max(int(valid.sum()), 1)
    targets = targets.to(device).float()
    position = {j: i for i, j in enumerate(ratio_steps)}
    if base_log_probs is None:
        ratio = (step_ratio * weight).sum(dim=1)  # (B,) D, the weighted sum over steps
        diff = ratio[pairs[:, 0].to(device)] - ratio[pairs[:, 1].to(device)]
        residual = rebel_residual(diff, torch.zeros_like(diff), targets, eta)  # (P,)
        residual = torch.where(valid.to(device), residual, torch.zeros_like(residual))
        pair_loss, prediction = residual.pow(2), diff / eta
        # 2. Per image and step: its weight in the regression gradient.
        coef = image_coefficients(pairs, residual, eta, num_valid, len(traj))[:, None] * weight  # (B, S)
    else:
        cols = torch.tensor(ratio_steps)
        recorded = traj.log_probs[:, cols].to(device)
        # (B,) the weighted sum of ln pi_t - ln pi_ref over the same steps
        base_offset = ((recorded - base_log_probs[:, cols].to(device)) * weight).sum(dim=1)
        # 2. Per image and step: its weight in the gradient of the clipped, base-anchored loss.
        coef, pair_loss, prediction = proximal_coefficients(
            pairs, step_ratio, base_offset, targets, eta, epsilon, valid.to(device), weight
        )  # (B, S), (P,), (P,)
    # (KL) each image's share of the mean over the valid pairs' members (once per valid pair it is in).
    members = torch.bincount(pairs[valid].flatten().cpu(), minlength=len(traj)).double()  # (B,)
    kl_weight = (members / (2 * num_valid)).to(device)  # (B,)
    if model.kl_images is not None:  # images outside the KL set: no term, and no reference pass
        kl_weight = kl_weight * model.kl_images.to(device, kl_weight.dtype)

    # 3. One backward per micro-batch of images and group of steps.
    kl_total = torch.zeros((), device=device, dtype=torch.float64)
    for c, index in enumerate(chunks):
        index_d = index.to(device)
        for g, group in enumerate(groups):
            logp, mean, std = first if fused else model.forward(index, group)  # logp (n_c, m)
            # float32 (float64 in exactness tests)
            step_weight = coef[index_d][:, [position[j] for j in group]].to(logp.dtype)  # (n_c, m)
            surrogate = rebel_surrogate(logp.flatten() * step_scale, step_weight.flatten())
            keep = kl_weight[index_d] > 0  # (n_c,) the images the KL term covers
            if model.kl_coef > 0 and bool(keep.any()):
                kl = model.kl(mean, std, index, group, keep) * step_scale  # (covered,)
                share = kl_weight[index_d][keep].to(kl.dtype)
                surrogate = surrogate + model.kl_coef * (share * kl).sum()
                kl_total += (share * kl).detach().sum()
            model.backward_pass(surrogate, c == len(chunks) - 1 and g == len(groups) - 1)
    return {
        "loss": float(pair_loss.sum() / num_valid),
        "kl": float(kl_total),
        "log_ratio_diff_abs": float(prediction.abs().mean()) * eta,
        "prediction": prediction.detach().cpu()[valid],
        "target": targets.detach().float().cpu()[valid],
    }


def ddpo_accumulate(
    model: StepModel,
    images: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    adv_clip_max: float,
    train_batch_size: int,
    steps: list[int],
) -> dict[str, float]:
    """Accumulate the DDPO (PPO-clip) gradient of one optimizer step: mean over images x ``steps``.

    images: (N,) indices into ``model.traj``; advantages: (len(traj),) normalised rewards. The KL
    term and the per-step weights: as ``rebel_accumulate`` (kl_coef * mean over images of sum_t KL).
    """
    traj = model.traj
    num_terms = len(images) * len(steps)
    chunks = list(images.split(train_batch_size))
    # Statistics stay on the device until the end: no host sync per backward.
    total, kl, clipfrac, kl_ref = (torch.zeros((), device=traj.latents.device, dtype=torch.float64) for _ in range(4))
    groups = step_groups(steps, model.steps_per_pass)
    for c, index in enumerate(chunks):
        adv = advantages[index].to(traj.latents.device)
        for g, group in enumerate(groups):
            logp, mean, std = model.forward(index, group)  # logp (n, m)
            old = traj.log_probs[index.to(traj.log_probs.device)][:, group].to(logp.device)  # (n, m)
            terms = logp.numel()
            weight = model.step_weights("policy", group, logp).repeat(len(index))  # (n*m,), image-major
            loss, stats = ppo_clip_loss(
                logp.flatten(),
                old.flatten(),
                adv.repeat_interleave(len(group)),
                clip_range=clip_range,
                adv_clip_max=adv_clip_max,
                weight=weight,
            )
            loss = loss / num_terms
            keep = None if model.kl_images is None else model.kl_images[index.to(model.kl_images.device)] > 0
            if model.kl_coef > 0 and (keep is None or bool(keep.any())):
                kl_img = model.kl(mean, std, index, group, keep).sum() / len(images)  # this group's share of the mean
                loss = loss + model.kl_coef * kl_img
                kl_ref += kl_img.detach()
            model.backward_pass(loss, c == len(chunks) - 1 and g == len(groups) - 1)
            total += loss.detach()
            kl += stats["approx_kl"] * terms / num_terms
            clipfrac += stats["clipfrac"] * terms / num_terms
    return {"loss": float(total), "approx_kl": float(kl), "clipfrac": float(clipfrac), "kl": float(kl_ref)}
