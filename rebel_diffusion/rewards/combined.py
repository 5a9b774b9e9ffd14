"""Several rewards at once: ``--reward "aesthetic=1.0,clip=0.5"`` (or a YAML mapping).

Two ways to combine them (``--reward-combine``):

- ``sum``: the reward is the weighted sum of the raw rewards, sum_i w_i r_i, normalised into
  advantages as one reward is;
- ``normalized``: each reward is normalised on its own (the run's ``--normalization``), and the
  advantage is the weighted sum of those, sum_i w_i A_i (Flow-Factory's default): rewards on
  different scales count by their weights, not by their units.

Components may be built-ins, plug-ins (``module.path:attribute``) or reward servers (URLs). Each
component's mean is logged as ``reward/<name>``.
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from .base import Reward

COMBINE = ("sum", "normalized")


def parse_reward_weights(spec: str | dict) -> dict[str, float] | None:
    """'a=1.0,b=0.5' (or {'a': 1.0, 'b': 0.5}) -> {'a': 1.0, 'b': 0.5}; None for one plain name.

    A part without '=<number>' is a name of weight 1 when there are several parts (``a,b``). A URL's
    query (``...?k=v``) is not a weight: a single part whose '=' is not followed by a number is a name.
    """
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        parts = [p.strip() for p in str(spec).split(",")]
        if len(parts) == 1 and not _weighted(parts[0]):
            return None
        items = []
        for part in parts:
            if not part:
                raise UsageError(f"--reward {spec!r}: an empty component; write name=weight,name=weight")
            name, weight = part.rsplit("=", 1) if _weighted(part) else (part, 1.0)
            items.append((name.strip(), weight))
    out = {}
    for name, weight in items:
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise UsageError(f"--reward: the weight of {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(w) or w == 0:
            raise UsageError(f"--reward: the weight of {name!r} must be a finite, non-zero number, got {w:g}")
        if name in out:
            raise UsageError(f"--reward: {name!r} is named twice")
        out[name] = w
    if not out:
        raise UsageError("--reward is empty")
    return out


def _weighted(part: str) -> bool:
    if "=" not in part:
        return False
    try:
        float(part.rsplit("=", 1)[1])
    except ValueError:
        return False
    return True


def format_reward_weights(weights: dict[str, float]) -> str:
    """The canonical text of a weighted reward, as config.yaml stores it."""
    return ",".join(f"{name}={w:g}" for name, w in weights.items())


class CombinedReward(Reward):
    """The weighted sum of component rewards; ``components(images, prompts)`` gives each one's (B,)."""

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float]):
        super().__init__()
        self.rewards, self.weights = rewards, weights
        self.name = format_reward_weights(weights)
        self.units = "weighted sum of " + ", ".join(f"{n} ({r.units or 'its units'})" for n, r in rewards.items())

    def load(self, device=None) -> Reward:
        for reward in self.rewards.values():
            reward.load(device) if device is not None else reward.load()
        return self

    def components(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """{name: (B,) float32} of every component."""
        return {name: reward(images, prompts).float() for name, reward in self.rewards.items()}

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_i w_i r_i: (B,)."""
        return sum(self.weights[name] * value for name, value in components.items())

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.combine(self.components(images, prompts))
