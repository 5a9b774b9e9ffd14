"""Preferences: REBEL's intransitive-preference extension.

A preference model scores a pair of image batches for the same prompts:

    pref(images_a, images_b, prompts) -> P  # (B,) float32 in [0, 1], on the images' device

where ``P[i]`` is the probability that ``images_a[i]`` is preferred to ``images_b[i]`` for
``prompts[i]``. The trainer regresses on ``P - 1/2`` instead of a reward gap, so a preference must
be antisymmetric, ``P(a, b) = 1 - P(b, a)`` (and 1/2 on equal images).

Shipped: ``bradley-terry`` (``BradleyTerryPreference``), which turns any pointwise reward into a
preference, ``sigmoid((r(a) - r(b)) / temperature)``.

Plugging in an external preference model (a pairwise judge, a VLM, a preference network), with
the same contract as reward plug-ins (``rebel_diffusion.rewards``): ``--preference module:attr``
names one of

- a ``Preference`` subclass, built as ``cls(ctx)`` with one ``PreferenceContext`` (the loaded
  pointwise reward or None, the temperature or None, device, dtype); implement ``prefer``;
- a factory ``f(ctx: PreferenceContext) -> Preference``;
- a pairwise function decorated with ``@preference_function`` (``f(images_a, images_b, prompts)``);
- a ``Preference`` instance, used as it is.

For example::

    from rebel_diffusion.rewards import Preference, PreferenceContext, preference_function

    class MyJudge(Preference):
        name = "my-judge"
        def __init__(self, ctx: PreferenceContext):
            super().__init__(ctx)
            ...  # keep it light; load weights lazily on the first call, on ctx.device
        def prefer(self, images_a, images_b, prompts):
            return probs  # (B,) in [0, 1]

    @preference_function(name="brighter")
    def brighter(images_a, images_b, prompts): ...

Images arrive checked (``rewards.base``: clamped to [0, 1], NaN rejected); the output is checked
for shape ``(B,)`` and range [0, 1] (a ``UsageError`` otherwise). A judge with a position bias is not
antisymmetric: average it with its swap, ``(P(a, b) + 1 - P(b, a)) / 2``, inside ``prefer``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import UsageError
from .base import Reward, as_device, as_dtype, check_images, check_scores


def check_probs(probs, batch_size: int, name: str, device: torch.device) -> torch.Tensor:
    """Coerce a preference output to float32 ``(B,)`` in [0, 1] on ``device``, or say what is wrong."""
    probs = check_scores(probs, batch_size, name, device, kind="preference")
    if not ((probs >= 0) & (probs <= 1)).all():  # also catches NaN
        raise UsageError(
            f"preference {name!r} returned values outside [0, 1] ({probs.tolist()[:4]}): "
            "return probabilities P(a preferred to b)"
        )
    return probs


@dataclass(frozen=True)
class PreferenceContext:
    """What a preference is built from: ``load_preference`` fills one in.

    ``reward``: the pointwise reward (loaded from ``--reward``), or None; ``temperature``: the
    ``--preference-temperature``, or None for the preference's default; ``device``/``dtype`` as for
    rewards (the reward's device when not given).
    """

    reward: Reward | None = None
    temperature: float | None = None
    device: torch.device | None = None
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        object.__setattr__(self, "device", as_device(self.device))
        object.__setattr__(self, "dtype", as_dtype(self.dtype))


class Preference:
    """Base class: subclasses implement ``prefer`` on checked images."""

    name: str = "preference"

    def __init__(self, context: PreferenceContext | None = None):
        self.context = context

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
            raise UsageError("the bradley-terry preference needs a pointwise reward: pass reward=NAME (--reward)")
        if not temperature > 0:
            raise UsageError(f"bradley-terry temperature must be > 0, got {temperature}")
        super().__init__()
        self.reward, self.temperature = reward, float(temperature)

    def prefer(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images_a.shape == images_b.shape:  # one batch of 2B: one model call, same kernels for a and b
            r = self.reward(torch.cat([images_a, images_b]), prompts + prompts)
            r_a, r_b = r.chunk(2)
        else:
            r_a, r_b = self.reward(images_a, prompts), self.reward(images_b, prompts)
        return torch.sigmoid((r_a - r_b) / self.temperature)

    def __repr__(self) -> str:
        name = getattr(self.reward, "name", self.reward)
        return f"BradleyTerryPreference(reward={name!r}, temperature={self.temperature})"


class CallablePreference(Preference):
    """Adapts a pairwise function ``fn(images_a, images_b, prompts) -> (B,)`` (checks in and out)."""

    def __init__(self, fn, name: str):
        super().__init__()
        self.fn, self.name = fn, name

    def prefer(self, images_a: torch.Tensor, images_b: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.fn(images_a, images_b, prompts)


class PreferenceFunction:
    """A pairwise function marked as a preference plug-in (``@preference_function``)."""

    def __init__(self, fn, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"@preference_function decorates a function, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "preference")
        functools.update_wrapper(self, fn)

    def __call__(self, images_a, images_b, prompts):
        return self.fn(images_a, images_b, prompts)

    def __repr__(self) -> str:
        return f"PreferenceFunction(name={self.name!r})"


def preference_function(fn=None, *, name: str | None = None):
    """Mark ``fn(images_a, images_b, prompts) -> P (B,)`` as a preference plug-in: ``@preference_function``
    or ``@preference_function(name="my-judge")``."""
    if fn is None:
        return lambda f: PreferenceFunction(f, name)
    return PreferenceFunction(fn, name)
