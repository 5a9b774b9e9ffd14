"""Reward plug-ins for toy sweeps: ``--reward benchmarks.toy_rewards:ATTR`` (run from the repository root).

``LogAlignmentFull``: the log of ``toy-alignment-full`` (floored at 1e-3), a reward that keeps pushing
an image the classifier calls right with probability 0.7 toward 0.99, where the probability itself
saturates. ``SoftAlignmentFull``: ``toy-alignment-full`` with the classifier's logits divided by a
temperature of 3, so that a colour just past the classifier's boundary (an amber square it calls
yellow with probability 0.98) scores less than the palette's own yellow; ``SoftAlignmentFullT2`` the
same at temperature 2. ``docs/tuning.md`` measures them on the quick start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rebel_diffusion.rewards import Reward, RewardContext
from rebel_diffusion.rewards.toy_alignment import ToyAlignmentReward
from rebel_diffusion.toy.data import IMAGE_SIZE, parse_caption

FLOOR = 1e-3  # log(1e-3) = -6.9: a wrong image's reward stays finite and bounded


class LogAlignmentFull(Reward):
    """log P(shape, colour and background as prompted) under the toy classifier. (B, 3, H, W) -> (B,)."""

    name = "toy-alignment-full-log"
    units = "log probability that the prompt's shape, its colour and the background are shown"

    def __init__(self, ctx: RewardContext):
        super().__init__(ctx)
        self.probability = ToyAlignmentReward(self.device, self.dtype, include_background=True)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.log(self.probability(images, prompts).clamp(min=FLOOR))


class SoftAlignmentFull(Reward):
    """The product of the classifier's shape, colour and background probabilities at temperature
    ``TEMPERATURE``. (B, 3, H, W) -> (B,) in [0, 1]."""

    name = "toy-alignment-full-soft"
    units = "probability (classifier at temperature 3) that the prompt's shape, colour and background are shown"
    TEMPERATURE = 3.0

    def __init__(self, ctx: RewardContext):
        super().__init__(ctx)
        self.reader = ToyAlignmentReward(self.device, self.dtype, include_background=True)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.reader.load(images.device)
        model = self.reader.model
        wanted = torch.tensor([parse_caption(p) for p in prompts], device=images.device)  # (B, 3)
        x = images.to(self.dtype)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True).to(self.dtype)
        logits = model(x)
        reward = torch.ones(len(images), device=images.device)
        for i, head in enumerate(("shape", "colour", "background")):
            probs = (logits[head].float() / self.TEMPERATURE).softmax(-1)  # (B, n)
            reward = reward * probs.gather(1, wanted[:, i : i + 1]).squeeze(1)
        return reward


class SoftAlignmentFullT2(SoftAlignmentFull):
    """``SoftAlignmentFull`` at temperature 2: between the saturated classifier and temperature 3."""

    name = "toy-alignment-full-soft-t2"
    units = "probability (classifier at temperature 2) that the prompt's shape, colour and background are shown"
    TEMPERATURE = 2.0
