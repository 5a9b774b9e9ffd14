"""Reward plug-ins for toy sweeps: ``--reward benchmarks.toy_rewards:ATTR`` (run from the repository root).

``LogAlignmentFull``: the log of ``toy-alignment-full`` (floored at 1e-3), a reward that keeps pushing
an image the classifier calls right with probability 0.7 toward 0.99, where the probability itself
saturates. ``SoftAlignmentFull``: ``toy-alignment-full`` with the classifier's logits divided by a
temperature of 3, so that a colour just past the classifier's boundary (an amber square it calls
yellow with probability 0.98) scores less than the palette's own yellow; ``SoftAlignmentFullT2`` the
same at temperature 2. ``PixelCheckedAlignmentFull``: the mean of ``toy-alignment-full`` and the
pixel reader's verdict, so that the reward pays for the colour the pixels show, not only for
crossing the classifier's boundary. ``docs/tuning.md`` measures them on the quick start.
"""

from __future__ import annotations

import torch

from rebel_diffusion.rewards import Reward, RewardContext
from rebel_diffusion.rewards.toy_alignment import ToyAlignmentReward

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
    """``toy-alignment-full`` with the classifier at temperature ``TEMPERATURE``: the product of its
    tempered shape, colour and background probabilities. (B, 3, H, W) -> (B,) in [0, 1]."""

    name = "toy-alignment-full-soft"
    units = "probability (classifier at temperature 3) that the prompt's shape, colour and background are shown"
    TEMPERATURE = 3.0

    def __init__(self, ctx: RewardContext):
        super().__init__(ctx)
        self.probability = ToyAlignmentReward(
            self.device, self.dtype, include_background=True, temperature=self.TEMPERATURE
        )

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.probability(images, prompts)


class SoftAlignmentFullT2(SoftAlignmentFull):
    """``SoftAlignmentFull`` at temperature 2: between the saturated classifier and temperature 3."""

    name = "toy-alignment-full-soft-t2"
    units = "probability (classifier at temperature 2) that the prompt's shape, colour and background are shown"
    TEMPERATURE = 2.0


class PixelCheckedAlignmentFull(Reward):
    """The mean of ``toy-alignment-full`` and the pixel reader's verdict (1 where the shape, its
    colour and the background read from the pixels are the prompt's: ``toy.following.read_pixels``).
    An amber square the classifier calls yellow, and the pixels orange, earns about half of what a
    yellow one does. (B, 3, H, W) -> (B,) in [0, 1]."""

    name = "toy-alignment-full-pixel-checked"
    units = "mean of the classifier's probability and the pixel reader's verdict that the prompt is shown"

    def __init__(self, ctx: RewardContext):
        super().__init__(ctx)
        self.probability = ToyAlignmentReward(self.device, self.dtype, include_background=True)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from rebel_diffusion.toy.following import all_right, read_pixels

        pixels = all_right(read_pixels(images), prompts).to(images.device)  # (B,)
        return (self.probability(images, prompts) + pixels) / 2
