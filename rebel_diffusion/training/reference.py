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


def base_log_probs(run: Run, traj: Trajectories, steps: list[int]) -> torch.Tensor:
    """(B, T) per-dim log-probs of the recorded trajectories under the frozen base, on ``steps``
    (0 elsewhere), no graph: what ``--anchor base`` regresses against."""
    out = torch.zeros_like(traj.log_probs)
    with base_unet(run) as unet, run.accelerator.autocast():
        scored = rescore_log_probs(unet, run.scheduler, traj, steps, steps_per_pass=run.steps_per_pass)  # (B, S)
    out[:, steps] = scored.to(out.device, out.dtype)
    return out
