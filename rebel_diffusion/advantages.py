"""Reward normalisation shared by REBEL and DDPO: per-prompt running statistics, batch-wide, or none.

Per-prompt (the DDPO / RLCM default): each prompt keeps its last ``buffer_size`` rewards; until it
has ``min_count`` of them the whole batch's mean and std stand in. A = (r - mean) / (std + 1e-6).
The tracker's state is part of every checkpoint, so a resumed run normalises exactly as an
uninterrupted one.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

NORMALIZATIONS = ("per-prompt", "batch", "none")
_EPS = 1e-6


class PerPromptStatTracker:
    """Running per-prompt reward statistics (buffer 32, min count 16 as in the paper's code)."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add a batch's rewards, then normalise each with its prompt's statistics. (B,) -> (B,)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        advantages = np.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            idx = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                mean, std = np.mean(buf), np.std(buf)
            advantages[idx] = (rewards[idx] - mean) / (std + _EPS)
        return advantages

    def state_dict(self) -> dict:
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "stats": {p: list(buf) for p, buf in self.stats.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer_size = int(state["buffer_size"])
        self.min_count = int(state["min_count"])
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state["stats"].items()}


def normalize_rewards(
    rewards: torch.Tensor, prompts: list[str], mode: str, tracker: PerPromptStatTracker | None = None
) -> torch.Tensor:
    """Rewards (B,) -> advantages (B,) float32 by ``mode``: 'per-prompt' (needs ``tracker``), 'batch', 'none'."""
    r = rewards.detach().double().cpu().numpy()
    if mode == "per-prompt":
        if tracker is None:
            raise ValueError("per-prompt normalisation needs a PerPromptStatTracker")
        adv = tracker.update(prompts, r)
    elif mode == "batch":
        adv = (r - r.mean()) / (r.std() + _EPS)
    elif mode == "none":
        adv = r
    else:
        raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {mode!r}")
    return torch.from_numpy(np.asarray(adv)).float()
