"""What each algorithm trains on an epoch's trajectories: its units, its loss's arguments, its units
of measure. ``recipe.update`` runs the loop both share (shuffle, subsample steps, step the optimizer).

- REBEL (``rebel_plan``): all pairs of each prompt's images, regressed on their advantage gap (or a
  preference), eta converted per latent dim (``rebel.eta_per_dim``), anchored to the base by default;
- DDPO (``ddpo_plan``): PPO-clip per image and step, its clip range and KL weight converted
  (``ddpo.ddpo_clip_range``, ``ddpo.ddpo_kl_coef``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..algorithms.ddpo import ddpo_clip_range, ddpo_kl_coef
from ..algorithms.rebel import (
    eta_per_dim,
    pair_indices,
    pair_targets,
    proximal_epsilon,
    trained_steps,
)
from ..algorithms.updates import StepModel, ddpo_accumulate, rebel_accumulate
from ..config import step_weights
from ..errors import RunError, UsageError
from ..sampling import (
    Trajectories,
)
from .distributed import mean_across, sum_across
from .reference import base_log_probs, cached_reference_mean, reference_mean

if TYPE_CHECKING:
    from .recipe import Run


def latent_dims(traj: Trajectories) -> int:
    """D = C*h*w: the per-step log-probs are means over D dims; --eta is against their sum."""
    return traj.latents[0, 0].numel()


def run_trained_steps(run: Run, traj: Trajectories) -> list[int]:
    """The stochastic steps the update trains: those whose noise std is at least --min-step-std."""
    try:
        return trained_steps(traj.step_std.tolist(), run.cfg.min_step_std)
    except ValueError as e:
        raise UsageError(str(e)) from e


def backward_fn(run: Run):
    acc = run.accelerator

    def backward(loss, last: bool):
        # Gradients are all-reduced once per optimizer step, on its last backward.
        with nullcontext() if last else acc.no_sync(run.unet):
            acc.backward(loss)

    return backward


@dataclass
class UpdatePlan:
    """What one algorithm trains on this epoch; ``update`` runs the loop both algorithms share.

    ``accumulate(units, steps, step_scale, first)`` adds the gradient of one optimizer step on the
    units ``units`` (indices of prompt groups or images) and returns its statistics; a ``prediction``
    and ``target`` among them (REBEL) are kept from the last pass to measure the regression's fit.
    """

    units: int  # prompt groups (REBEL: a step takes all pairs of whole groups) or images (DDPO)
    units_per_step: int
    salt: int  # separates the algorithms' shuffling streams
    accumulate: Callable[[torch.Tensor, list[int], float, bool], dict]
    summary: dict = field(default_factory=dict)  # figures known before the loop (e.g. pairs)


def step_model(run: Run, traj: Trajectories, kl_coef: float, reference=None) -> StepModel:
    """What both algorithms' accumulators share for this epoch's trajectories (``updates.StepModel``);
    ``reference``: the KL term's ``reference_mean`` (default: a base forward when asked)."""
    cfg = run.cfg

    def weights(spec: str) -> torch.Tensor | None:
        values = step_weights(spec, len(traj.timesteps))
        return None if values is None else torch.tensor(values)

    return StepModel(
        unet=run.unet, scheduler=run.scheduler, traj=traj, steps_per_pass=run.steps_per_pass,
        autocast=run.accelerator.autocast, backward=backward_fn(run), kl_coef=kl_coef,
        reference_mean=reference or reference_mean(run, traj), policy_weights=weights(cfg.policy_step_weights),
        kl_weights=weights(cfg.kl_step_weights), kl_images=kl_images(run, traj),
    )  # fmt: skip


def kl_images(run: Run, traj: Trajectories) -> torch.Tensor | None:
    """(B,) 1.0 for the images whose prompt is in --kl-prompts, 0.0 for the others (None: no such list)."""
    if run.kl_prompts is None:
        return None
    return torch.tensor([float(p in run.kl_prompts) for p in traj.prompts])


def rebel_plan(run: Run, traj: Trajectories, advantages: torch.Tensor, finite: torch.Tensor, epoch: int):
    """REBEL: all pairs of each prompt's images, regressed on their advantage gap (or preference)."""
    cfg = run.cfg
    pairs = pair_indices(traj.group)  # (P, 2)
    valid = finite[pairs[:, 0]] & finite[pairs[:, 1]]  # (P,)
    if sum_across(run.accelerator, int(valid.sum())) == 0:
        raise RunError(
            f"epoch {epoch}: no pair of images had two finite rewards ({cfg.reward}); nothing was trained this epoch"
        )
    if run.preference is not None:
        with torch.no_grad():
            pref = torch.cat([
                run.preference(traj.images[pairs[i:i + 32, 0]], traj.images[pairs[i:i + 32, 1]],
                               [traj.prompts[j] for j in pairs[i:i + 32, 0].tolist()]).float().cpu()
                for i in range(0, len(pairs), 32)
            ])  # fmt: skip
        targets = pair_targets(advantages, pairs, torch.nan_to_num(pref, nan=0.5))
    else:
        targets = pair_targets(advantages, pairs)
    targets = torch.where(valid, targets, torch.zeros_like(targets))  # (P,)
    trained = run_trained_steps(run, traj)
    dims = latent_dims(traj)
    score_unet = run.accelerator.unwrap_model(run.unet)
    summary = {}
    base_logp, reference = None, None
    if cfg.anchor == "base" and cfg.kl_coef > 0:  # the KL term's reference is the same base: keep its means
        base_logp, means = base_log_probs(run, traj, trained, with_mean=True)  # (B, T), (B, S, C, h, w)
        reference = cached_reference_mean(means, trained, reference_mean(run, traj))
    elif cfg.anchor == "base":
        base_logp = base_log_probs(run, traj, trained)  # (B, T)
    model = step_model(run, traj, cfg.kl_coef, reference)
    if base_logp is not None:
        # ln pi_t(y) - ln pi_ref(y) over the trained steps, in nats: its mean estimates KL(pi_t || pi_ref).
        to_base = (traj.log_probs[:, trained] - base_logp[:, trained]).sum(dim=1) * dims  # (B,)
        summary["log_ratio_to_base"] = mean_across(run.accelerator, {"v": [float(to_base[finite].mean())]})["v"]

    groups = torch.unique(traj.group, sorted=True)  # (G,)
    pair_group = traj.group[pairs[:, 0]]  # (P,)

    def accumulate(units: torch.Tensor, steps: list[int], scale: float, first: bool) -> dict:
        # Whole groups: each image's log-prob is differentiated once for all k - 1 of its pairs.
        idx = torch.isin(pair_group, groups[units]).nonzero().flatten()
        stats = rebel_accumulate(
            model, pairs[idx], targets[idx], eta=eta_per_dim(cfg.eta, dims),
            train_batch_size=cfg.train_batch_size, steps=steps, step_scale=scale, on_policy=first,
            score_unet=score_unet, valid=valid[idx], ratio_steps=trained, base_log_probs=base_logp,
            epsilon=proximal_epsilon(cfg.clip_range, dims),
        )  # fmt: skip
        out = {k: stats[k] for k in ("loss", "prediction", "target")}
        out["log_ratio_diff_abs"] = stats["log_ratio_diff_abs"] * dims  # in nats, the units of --eta
        if cfg.kl_coef > 0:
            out["kl"] = stats["kl"]
        return out

    pairs_total = sum_across(run.accelerator, float(valid.sum()))
    per_step = cfg.images_per_step() // cfg.images_per_prompt  # whole prompts
    return UpdatePlan(
        units=len(groups), units_per_step=per_step, salt=1, accumulate=accumulate,
        summary={"pairs": int(pairs_total), **summary},
    )  # fmt: skip


def ddpo_plan(run: Run, traj: Trajectories, advantages: torch.Tensor, finite: torch.Tensor, epoch: int):
    """DDPO baseline: PPO-clip per image and step on the same rollouts and advantages."""
    cfg = run.cfg
    advantages = torch.where(finite, advantages, torch.zeros_like(advantages))  # no gradient from those
    dims = latent_dims(traj)

    def accumulate(idx: torch.Tensor, steps: list[int], scale: float, first: bool) -> dict:
        # DDPO's loss is a mean over steps: a subsample needs no rescaling (scale is unused).
        # Its KL term (nats, summed over dims and steps) is scaled as its per-dim mean policy term.
        model = step_model(run, traj, ddpo_kl_coef(cfg.kl_coef, dims, len(steps)))
        stats = ddpo_accumulate(
            model, idx, advantages, clip_range=ddpo_clip_range(cfg.clip_range, dims),
            adv_clip_max=cfg.adv_clip_max, train_batch_size=cfg.train_batch_size, steps=steps,
        )  # fmt: skip
        return {k: stats[k] for k in ("loss", "approx_kl", "clipfrac", *(("kl",) if cfg.kl_coef > 0 else ()))}

    return UpdatePlan(units=len(traj), units_per_step=cfg.images_per_step(), salt=2, accumulate=accumulate)
