"""Plug-ins for the reward tests, loaded as ``plugin_reward:ATTR`` (pytest puts tests/ on sys.path).

One of each kind the contract accepts (``rebel_diffusion.rewards``), and one of each mistake.
"""

import torch

from rebel_diffusion.rewards import (
    HttpReward,
    Preference,
    PreferenceContext,
    Reward,
    RewardContext,
    preference_function,
    reward_function,
)

# --- rewards the contract accepts ---------------------------------------------------------------


@reward_function
def brightness(images, prompts):
    """A scoring function: mean pixel value.  # (B, 3, H, W) -> (B,)"""
    return images.mean(dim=(1, 2, 3))


@reward_function(name="listed-brightness")
def as_list(images, prompts):
    """Returns a plain list: the adapter makes it a float32 tensor."""
    return [float(v) for v in images.mean(dim=(1, 2, 3))]


class ScaledBrightness(Reward):
    """A Reward subclass built from the context, with an option of its own for factories."""

    name = "scaled-brightness"

    def __init__(self, ctx: RewardContext, scale: float = 2.0):
        super().__init__(ctx)
        self.scale = scale
        self.context = ctx  # kept for the tests to inspect

    def score(self, images, prompts):
        return self.scale * images.mean(dim=(1, 2, 3))

    def details(self, images, prompts):
        return {"red": images[:, 0].mean(dim=(1, 2))}


class Darkness(Reward):
    """A Reward subclass without ``__init__``: ``Reward.__init__(ctx)`` takes device and dtype."""

    name = "darkness"

    def score(self, images, prompts):
        return 1 - images.mean(dim=(1, 2, 3))


def half_brightness(ctx: RewardContext) -> Reward:
    """A factory: the plug-in's own options are set here."""
    return ScaledBrightness(ctx, scale=0.5)


def remote(ctx: RewardContext) -> Reward:
    """A factory around a reward server's client, with a timeout of its own."""
    return HttpReward("http://127.0.0.1:9/score", ctx, timeout=5)


READY = ScaledBrightness(RewardContext(), scale=3.0)  # an instance, used as it is


@reward_function
def nan_reward(images, prompts):
    """A broken reward: NaN for every image."""
    return torch.full((images.shape[0],), float("nan"))


# --- rewards outside the contract ---------------------------------------------------------------


def undecorated(images, prompts):
    """A scoring function without @reward_function: taken for a factory, and refused."""
    return images.mean(dim=(1, 2, 3))


class NotAReward:
    """A class that is not a Reward subclass."""

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class TwoArguments(Reward):
    """A Reward subclass whose ``__init__`` wants more than the context."""

    def __init__(self, ctx, threshold):
        super().__init__(ctx)


def returns_number(ctx):
    """A factory that returns something other than a Reward."""
    return 1.5


NOT_CALLABLE = 42


@reward_function
def wrong_shape(images, prompts):
    return images.mean()


@reward_function
def not_numbers(images, prompts):
    return ["high"] * images.shape[0]


@reward_function
def complex_scores(images, prompts):
    return torch.zeros(images.shape[0], dtype=torch.complex64)


# --- preferences ------------------------------------------------------------------------------------


@preference_function
def brighter(images_a, images_b, prompts):
    """A pairwise function: P(a brighter than b)."""
    return torch.sigmoid(10 * (images_a.mean(dim=(1, 2, 3)) - images_b.mean(dim=(1, 2, 3))))


class RewardGap(Preference):
    """A Preference subclass built from the context: sigmoid of the reward gap, at its temperature."""

    name = "reward-gap"

    def __init__(self, ctx: PreferenceContext):
        super().__init__(ctx)
        self.reward, self.temperature = ctx.reward, ctx.temperature or 1.0

    def prefer(self, images_a, images_b, prompts):
        return torch.sigmoid((self.reward(images_a, prompts) - self.reward(images_b, prompts)) / self.temperature)


def sharp_gap(ctx: PreferenceContext) -> Preference:
    """A preference factory."""
    return RewardGap(PreferenceContext(reward=ctx.reward, temperature=0.01, device=ctx.device))


@preference_function
def out_of_range(images_a, images_b, prompts):
    return torch.full((images_a.shape[0],), 2.0)


def undecorated_pair(images_a, images_b, prompts):
    return torch.full((images_a.shape[0],), 0.5)
