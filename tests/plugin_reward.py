"""Plug-ins for tests/test_rewards.py, loaded as ``plugin_reward:ATTR`` (pytest puts tests/ on sys.path)."""

import torch


def brightness(images, prompts):
    """A plain-function reward: mean pixel value.  # (B, 3, H, W) -> (B,)"""
    return images.mean(dim=(1, 2, 3))


class ScaledBrightness:
    """A class reward with an option of its own; takes no device/dtype (they are dropped)."""

    name = "scaled-brightness"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def __call__(self, images, prompts):
        return self.scale * images.mean(dim=(1, 2, 3))

    def details(self, images, prompts):
        return {"red": images[:, 0].mean(dim=(1, 2))}


def as_list(images, prompts):
    """Returns a plain list: the adapter makes it a float32 tensor."""
    return [float(v) for v in images.mean(dim=(1, 2, 3))]


def wrong_shape(images, prompts):
    return images.mean()


def brighter(images_a, images_b, prompts):
    """A plain-function preference: P(a brighter than b)."""
    return torch.sigmoid(10 * (images_a.mean(dim=(1, 2, 3)) - images_b.mean(dim=(1, 2, 3))))


def out_of_range(images_a, images_b, prompts):
    return torch.full((images_a.shape[0],), 2.0)


NOT_CALLABLE = 42


def nan_reward(images, prompts):
    """A broken reward: NaN for every image."""
    return torch.full((images.shape[0],), float("nan"))
