"""Preferences: REBEL's intransitive-preference extension.

A preference model scores a pair of image batches for the same prompts:

    pref(images_a, images_b, prompts) -> P  # (B,) float32 in [0, 1], on the images' device

where ``P[i]`` is the probability that ``images_a[i]`` is preferred to ``images_b[i]`` for
``prompts[i]``. The trainer regresses on ``P - 1/2`` instead of a reward gap, so a preference must
be antisymmetric, ``P(a, b) = 1 - P(b, a)`` (and 1/2 on equal images).

Shipped: ``bradley-terry`` (``BradleyTerryPreference``), which turns any pointwise reward into a
preference, ``sigmoid((r(a) - r(b)) / temperature)``.

Plugging in an external preference model (a pairwise judge, a VLM, a preference network):

1. In your own module, write a class or a plain function::

       class MyJudge:
           name = "my-judge"
           def __init__(self, device=None, dtype=None, threshold=0.5):  # options you want
               ...  # keep it light; load weights lazily on the first call
           def __call__(self, images_a, images_b, prompts):
               return probs  # (B,) in [0, 1]

       def my_judge(images_a, images_b, prompts): ...  # a function works too

2. Load it with ``load_preference("my_pkg.judges:MyJudge", threshold=0.7, device=...)`` (CLI:
   ``--preference my_pkg.judges:MyJudge``). A class gets the options its ``__init__`` names:
   ``device`` and ``dtype`` (from the trainer) only if it accepts them, ``reward`` (the loaded
   pointwise reward) only if it accepts it, other options as given.

3. Images arrive checked (``rewards.base``: clamped to [0, 1], NaN rejected); the output is checked
   for shape ``(B,)`` and range [0, 1]. A judge with a position bias is not antisymmetric: average
   it with its swap, ``(P(a, b) + 1 - P(b, a)) / 2``, inside ``__call__``.
"""

from __future__ import annotations

import torch

from ..errors import UsageError
from .base import check_images, check_scores


def check_probs(probs, batch_size: int, name: str, device: torch.device) -> torch.Tensor:
    """Coerce a preference output to float32 ``(B,)`` in [0, 1] on ``device``, or say what is wrong."""
    probs = check_scores(probs, batch_size, name, device)
    if not ((probs >= 0) & (probs <= 1)).all():  # also catches NaN
        raise ValueError(f"preference {name!r} returned values outside [0, 1]: {probs.tolist()[:8]}")
    return probs


class Preference:
    """Base class: subclasses implement ``prefer`` on checked images."""

    name: str = "preference"

    def prefer(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """P(a preferred to b).  # (B, 3, H, W) x 2 -> (B,)"""
        raise NotImplementedError

    def __call__(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        prompts = list(prompts)
        images_a, images_b = check_images(images_a, prompts), check_images(images_b, prompts)
        with torch.no_grad():
            probs = self.prefer(images_a, images_b, prompts)
        return check_probs(probs, len(prompts), self.name, images_a.device)


class BradleyTerryPreference(Preference):
    """P(a > b) = sigmoid((r(a) - r(b)) / temperature) for a pointwise reward ``r``.

    Antisymmetric by construction (sigmoid(-x) = 1 - sigmoid(x)) and exactly 1/2 when the two
    scores are equal. ``temperature`` is in the reward's units: a gap of one temperature gives
    P = 0.73.
    """

    name = "bradley-terry"

    def __init__(self, reward, temperature: float = 1.0):
        if reward is None or not callable(reward):
            raise UsageError(
                "the bradley-terry preference needs a pointwise reward: pass reward=NAME (--reward)"
            )
        if not temperature > 0:
            raise UsageError(f"bradley-terry temperature must be > 0, got {temperature}")
        self.reward, self.temperature = reward, float(temperature)

    def prefer(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images_a.shape == images_b.shape:  # one batch of 2B: one model call, same kernels for a and b
            r = self.reward(torch.cat([images_a, images_b]), prompts + prompts)
            r_a, r_b = r.chunk(2)
        else:
            r_a, r_b = self.reward(images_a, prompts), self.reward(images_b, prompts)
        return torch.sigmoid((r_a - r_b) / self.temperature)

    def __repr__(self) -> str:
        return f"BradleyTerryPreference(reward={getattr(self.reward, 'name', self.reward)!r}, temperature={self.temperature})"


class CallablePreference(Preference):
    """Adapts a plug-in function or object to the interface (checks in and out)."""

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name

    def prefer(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.fn(images_a, images_b, prompts)
