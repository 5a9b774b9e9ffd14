"""The frozen base policy the KL term and ``--anchor base`` measure against.

LoRA's base is the trained UNet with its adapters disabled; a full fine-tune keeps a frozen copy
made before any checkpoint was loaded (``builders.make_trainable``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..sampling import (
    Trajectories,
    rescore_log_probs,
    steps_log_prob,
)

if TYPE_CHECKING:
    from .recipe import Run


@contextmanager
def base_unet(run: Run):
    """The frozen base UNet inside the block: the trained UNet with its LoRA adapters disabled (full
    fine-tune: the frozen copy made before any checkpoint was loaded)."""
    if run.ref_unet is not None:
        yield run.ref_unet
        return
    unet = run.accelerator.unwrap_model(run.unet)
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def reference_mean(run: Run, traj: Trajectories):
    """(steps, index) -> (b*m, C, h, w): the base policy's step means at the recorded x_t, no graph."""

    def mean(steps: list[int], index: torch.Tensor) -> torch.Tensor:
        with base_unet(run) as unet:
            return steps_log_prob(unet, run.scheduler, traj, steps, index=index, with_mean=True)[1]

    return mean


def base_log_probs(run: Run, traj: Trajectories, steps: list[int], with_mean: bool = False):
    """(B, T) per-dim log-probs of the recorded trajectories under the frozen base, on ``steps``
    (0 elsewhere), no graph: what ``--anchor base`` regresses against. ``with_mean``: also the base's
    step means on ``steps``, (B, S, C, h, w), which the KL term can reuse (``cached_reference_mean``)."""
    out = torch.zeros_like(traj.log_probs)
    with base_unet(run) as unet, run.accelerator.autocast():
        scored = rescore_log_probs(
            unet, run.scheduler, traj, steps, steps_per_pass=run.steps_per_pass, with_mean=with_mean
        )  # (B, S), and (B, S, C, h, w)
    logp, means = scored if with_mean else (scored, None)
    out[:, steps] = logp.to(out.device, out.dtype)
    return (out, means) if with_mean else out


def cached_reference_mean(means: torch.Tensor, steps: list[int], fallback):
    """``reference_mean`` from the base's step means already computed for ``steps`` (``means``:
    (B, S, C, h, w)); a group with a step outside ``steps`` falls back to ``fallback``'s forward.
    The same base at the same x_t, so it saves the KL term a second base pass an epoch."""
    column = {j: i for i, j in enumerate(steps)}

    def mean(group: list[int], index: torch.Tensor) -> torch.Tensor:
        if any(j not in column for j in group):
            return fallback(group, index)
        rows = torch.as_tensor(index).reshape(-1).to(means.device)
        cols = torch.tensor([column[j] for j in group], device=means.device)
        return means[rows[:, None], cols[None, :]].flatten(0, 1)  # (b*m, C, h, w), image-major

    return mean
