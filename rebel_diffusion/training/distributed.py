"""Reductions across the processes of a run (an ``accelerate.Accelerator``), each a no-op on one.

Every process calls these at the same point with its own values; all get the same answer.
"""

from __future__ import annotations

import numpy as np
import torch


def reduce_max(accelerator, values: list[float]) -> list[float]:
    """Element-wise max over processes of this process's ``values``."""
    if accelerator.num_processes == 1:
        return list(values)
    t = torch.tensor(values, device=accelerator.device)
    return accelerator.reduce(t, reduction="max").tolist()


def sum_across(accelerator, value: float) -> float:
    """Sum over processes."""
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def mean_across(accelerator, stats: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each statistic over its values (optimizer steps), then over processes."""
    names = sorted(stats)
    local = [float(np.mean(stats[n])) if stats[n] else 0.0 for n in names]
    if accelerator.num_processes > 1:
        t = torch.tensor(local, device=accelerator.device)
        local = accelerator.reduce(t, reduction="mean").cpu().tolist()
    return {n: float(v) for n, v in zip(names, local)}


def gather_cat(accelerator, parts: list[torch.Tensor]) -> torch.Tensor:
    """This process's (n_i,) tensors concatenated, then every process's (lengths may differ). -> (N,)"""
    from accelerate.utils import gather_object

    local = torch.cat(parts) if parts else torch.zeros(0)
    if accelerator.num_processes == 1:
        return local
    return torch.tensor([v for chunk in gather_object([local.tolist()]) for v in chunk])


def gather_strings(accelerator, items: list[str]) -> list[str]:
    """Every process's strings, in process order."""
    from accelerate.utils import gather_object

    return list(gather_object(list(items))) if accelerator.num_processes > 1 else list(items)


def check_in_sync(accelerator, weights: dict[str, torch.Tensor]) -> None:
    """Every process must hold the same trainable weights (gradients all-reduced): fail loudly if not."""
    if accelerator.num_processes == 1:
        return
    digest = torch.stack([v.double().sum() for v in weights.values()] + [torch.zeros((), dtype=torch.float64)])
    digests = accelerator.gather(digest[None].float().to(accelerator.device)).cpu()
    if not torch.equal(digests.min(dim=0).values, digests.max(dim=0).values):
        raise RuntimeError("trainable weights differ across processes: gradients were not synchronised")
