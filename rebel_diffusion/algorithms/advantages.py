"""Reward normalisation shared by REBEL and DDPO: rewards r (B,) -> advantages A (B,).

    A = clip((r - mean) / max(std, floor), -adv_clip_max, adv_clip_max)

Modes, by where ``mean`` and ``std`` come from:

- ``per-group`` (the default, as GRPO): the k images of one prompt in this batch. Rewards are only
  compared with images of the same prompt, which is what REBEL's pairs regress on anyway.
- ``per-prompt`` (the DDPO / RLCM code): each prompt keeps its last ``buffer_size`` rewards across
  epochs; until it has ``min_count`` of them the batch's statistics stand in. How many images used
  each kind is reported, so a silent fall-back to batch statistics shows in the metrics.
- ``batch``: the whole epoch's rewards.  ``none``: A = r (no floor, no clipping).

``floor = std_floor * batch std`` (plus 1e-6): a near-constant group (every image already right)
gets small advantages instead of exploding ones; one failure among saturated images under
``batch`` statistics would otherwise reach |A| ~ 8. The trainer's default floor is the batch std
itself (``std_floor = 1``): per-group advantages are then centred on the group and scaled by the
batch, so that k images of one prompt that differ by little (noise, on a reward that is nearly
constant for that prompt) are not stretched to +-1 and chased; with k = 4 the group's own std is
also a noisy estimate. The tracker's state is part of every checkpoint, so a resumed run
normalises exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

NORMALIZATIONS = ("per-group", "per-prompt", "batch", "none")
_EPS = 1e-6


class PerPromptStatTracker:
    """Running per-prompt reward statistics (buffer 32, min count 16 as in the paper's code)."""

    def __init__(self, buffer_size: int = 32, min_count: int = 16):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray, floor: float = 0.0) -> tuple[np.ndarray, int]:
        """Add a batch's rewards, then normalise each by its prompt's statistics. (B,) -> ((B,), n).

        n: how many of the B images fell back to the batch's statistics (their prompt had fewer
        than ``min_count`` rewards). ``floor``: the smallest std divided by.
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        batch_mean, batch_std = rewards.mean(), rewards.std()
        advantages = np.empty_like(rewards)
        fallback = 0
        for prompt in dict.fromkeys(prompts):
            idx = np.array([i for i, p in enumerate(prompts) if p == prompt])
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
                fallback += len(idx)
            else:
                mean, std = np.mean(buf), np.std(buf)
            advantages[idx] = (rewards[idx] - mean) / (max(std, floor) + _EPS)
        return advantages, fallback

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


def group_normalize(rewards: np.ndarray, group: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """(r - group mean) / max(group std, floor) within each group id. (B,), (B,) -> (B,) float64."""
    rewards = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(rewards)
    for g in np.unique(group):
        idx = group == g
        out[idx] = (rewards[idx] - rewards[idx].mean()) / (max(rewards[idx].std(), floor) + _EPS)
    return out


def normalize_rewards(
    rewards: torch.Tensor,
    prompts: list[str],
    mode: str,
    tracker: PerPromptStatTracker | None = None,
    *,
    group: torch.Tensor | None = None,
    std_floor: float = 0.0,
    adv_clip_max: float = float("inf"),
) -> tuple[torch.Tensor, dict[str, int]]:
    """Rewards (B,) -> (advantages (B,) float32, {statistics kind: images normalised by it}).

    mode: 'per-group' (needs ``group`` (B,) ids), 'per-prompt' (needs ``tracker``), 'batch', 'none'.
    std_floor: the std divided by is at least std_floor x the batch std (module docstring).
    """
    r = rewards.detach().double().cpu().numpy()
    floor = std_floor * r.std() if len(r) else 0.0
    if mode == "per-group":
        if group is None:
            raise ValueError("per-group normalisation needs the images' group ids")
        adv, used = group_normalize(r, group.cpu().numpy(), floor), {"per-group": len(r)}
    elif mode == "per-prompt":
        if tracker is None:
            raise ValueError("per-prompt normalisation needs a PerPromptStatTracker")
        adv, fallback = tracker.update(prompts, r, floor)
        used = {"per-prompt": len(r) - fallback, "batch": fallback}
    elif mode == "batch":
        adv, used = (r - r.mean()) / (max(r.std(), floor) + _EPS), {"batch": len(r)}
    elif mode == "none":
        return torch.from_numpy(r).float(), {"none": len(r)}
    else:
        raise ValueError(f"normalisation must be one of {NORMALIZATIONS}, got {mode!r}")
    adv = np.clip(adv, -adv_clip_max, adv_clip_max)
    return torch.from_numpy(np.asarray(adv)).float(), used


def epoch_advantages(
    rewards: torch.Tensor,
    prompts: list[str],
    group: torch.Tensor,
    mode: str,
    tracker: PerPromptStatTracker | None,
    *,
    components: dict[str, torch.Tensor] | None = None,
    weights: dict[str, float] | None = None,
    std_floor: float = 0.0,
    adv_clip_max: float = float("inf"),
) -> tuple[torch.Tensor, dict[str, int]]:
    """Advantages of an epoch's images, 0 where the reward is not finite. -> ((N,), {kind: images}).

    rewards: (N,) every process's rewards; prompts, group: theirs. With ``components`` ({name: (N,)})
    and ``weights``, each reward is normalised on its own (per-prompt statistics kept apart by name)
    and the advantage is their weighted sum (``--reward-combine normalized``); otherwise ``rewards``
    is normalised as one.
    """
    finite = torch.isfinite(rewards)
    kept = finite.nonzero().flatten().tolist()
    kept_prompts = [prompts[i] for i in kept]
    adv = torch.zeros(len(rewards), dtype=torch.float32)
    if components:
        adv_kept, used = torch.zeros(len(kept)), {}
        for name, values in components.items():
            part, used = normalize_rewards(
                values[kept], [f"{name}\x00{p}" for p in kept_prompts], mode, tracker,
                group=group[kept], std_floor=std_floor,
            )  # fmt: skip
            adv_kept += weights[name] * part
        adv_kept = adv_kept.clamp(-adv_clip_max, adv_clip_max)
    else:
        adv_kept, used = normalize_rewards(
            rewards[kept], kept_prompts, mode, tracker, group=group[kept], std_floor=std_floor,
            adv_clip_max=adv_clip_max,
        )  # fmt: skip
    adv[kept] = adv_kept
    return adv, used
