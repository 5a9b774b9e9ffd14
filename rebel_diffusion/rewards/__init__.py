"""Rewards: score decoded images, ``reward(images, prompts) -> (B,)``.

Interface (``base``): images ``(B, 3, H, W)`` float in [0, 1] on any device, prompts ``list[str]``;
scores float32 ``(B,)`` on the images' device. Every reward has ``.name``, ``.details(images,
prompts) -> dict[str, (B,)]`` (extra logging figures, often empty) and ``.load()`` (load weights now
rather than on the first call). The device is given at construction (``device=``).

Built-in rewards, by name (``REWARDS``):

- ``aesthetic``: LAION aesthetic predictor v2 on OpenAI CLIP ViT-L/14 (``aesthetic``);
- ``clip``: prompt-image cosine similarity of open_clip embeddings (``clip_score``);
- ``jpeg-incompressibility`` / ``jpeg-compressibility``: JPEG size in kB, +/- (``jpeg``);
- ``toy-alignment``: P(prompted colour) x P(prompted shape) of the toy model's attribute classifier
  (``toy_alignment``), the CPU analogue of ``clip``.

Plug-ins: ``module.path:attribute`` names a class (instantiated with the options its ``__init__``
accepts) or a plain function ``f(images, prompts) -> (B,)``.

Options: ``device`` and ``dtype`` (from the trainer; dropped for plug-ins that do not take them)
and per-reward ones: ``clip_model``, ``clip_pretrained`` (``aesthetic``, ``clip``),
``aesthetic_head``, ``aesthetic_head_repo``, ``aesthetic_head_file`` (``aesthetic``). An option set
to None means "the default", so a trainer can pass its whole config; any other option the reward
does not take is a ``UsageError``.

Preferences (``preference``): ``load_preference`` with ``PREFERENCES`` (``bradley-terry``) or a
``module:attr`` plug-in.
"""

from __future__ import annotations

import importlib
import inspect

from ..errors import UsageError
from .aesthetic import AestheticReward
from .base import CallableReward, Reward, short_cause
from .clip_score import ClipScoreReward
from .jpeg import JpegCompressibility, JpegIncompressibility
from .preference import BradleyTerryPreference, CallablePreference, Preference
from .toy_alignment import ToyAlignmentReward

# The one table of reward names: new built-ins add a line here (e.g. "toy-alignment").
REWARDS: dict[str, type[Reward]] = {
    "aesthetic": AestheticReward,
    "clip": ClipScoreReward,
    "jpeg-compressibility": JpegCompressibility,
    "jpeg-incompressibility": JpegIncompressibility,
    "toy-alignment": ToyAlignmentReward,
}

PREFERENCES: dict[str, type[Preference]] = {
    "bradley-terry": BradleyTerryPreference,
}

TRAINER_OPTIONS = ("device", "dtype")  # passed to every reward; dropped where not taken

__all__ = [
    "PREFERENCES",
    "REWARDS",
    "BradleyTerryPreference",
    "Preference",
    "Reward",
    "load_plugin",
    "load_preference",
    "load_reward",
]


def load_reward(name_or_path: str, **options) -> Reward:
    """A reward by table name or ``module.path:attribute``; returns ``reward(images, prompts) -> (B,)``.

    Raises ``UsageError`` (one line) for an unknown name, a broken plug-in or an option the reward
    does not take. Weights load on the first call, or on ``reward.load()``.
    """
    if ":" in name_or_path:
        target = load_plugin(name_or_path, "reward")
        label = f"reward plug-in {name_or_path}"
        if inspect.isclass(target):
            reward = _construct(target, label, options)
            if not callable(reward):
                raise UsageError(
                    f"{label}: its instances are not callable (define __call__(images, prompts))"
                )
            return (
                reward if isinstance(reward, Reward) else CallableReward(reward, _name(reward, name_or_path))
            )
        _construct(lambda: None, label, options)  # a function takes no options: reject any
        return CallableReward(target, _name(target, name_or_path))
    if name_or_path not in REWARDS:
        raise UsageError(
            f"unknown reward {name_or_path!r}: use one of {', '.join(REWARDS)}, or module.path:attribute for your own"
        )
    reward = _construct(REWARDS[name_or_path], f"reward {name_or_path}", options)
    return reward if isinstance(reward, Reward) else CallableReward(reward, _name(reward, name_or_path))


def load_preference(name_or_path: str, reward=None, **options) -> Preference:
    """A preference by table name or ``module.path:attribute``: ``pref(a, b, prompts) -> P (B,)``.

    ``reward`` is a reward object or a reward name (loaded with ``load_reward`` and the options the
    preference does not take, e.g. ``device``, ``aesthetic_head``). A plug-in class gets ``reward``
    only if its ``__init__`` takes it.
    """
    if ":" in name_or_path:
        target, label = load_plugin(name_or_path, "preference"), f"preference plug-in {name_or_path}"
    elif name_or_path in PREFERENCES:
        target, label = PREFERENCES[name_or_path], f"preference {name_or_path}"
    else:
        raise UsageError(
            f"unknown preference {name_or_path!r}: use one of {', '.join(PREFERENCES)}, "
            "or module.path:attribute for your own"
        )
    if not inspect.isclass(target):
        _construct(lambda: None, label, options)  # a function takes no options: reject any
        return CallablePreference(target, _name(target, name_or_path))

    # Split the options: those the preference names go to it, the rest (and device/dtype) to its reward.
    params = _parameters(target)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    pref_options = {k: v for k, v in options.items() if k in params or takes_any}
    reward_options = {k: v for k, v in options.items() if k not in pref_options or k in TRAINER_OPTIONS}
    if "reward" in params or takes_any:
        if reward is None and "reward" in params and params["reward"].default is inspect.Parameter.empty:
            raise UsageError(f"{label} needs a pointwise reward: pass reward=NAME (--reward)")
        if isinstance(reward, str):
            reward = load_reward(reward, **reward_options)
        else:  # a ready reward takes no options: unknown ones are reported below
            pref_options.update({k: v for k, v in reward_options.items() if k not in TRAINER_OPTIONS})
        pref_options["reward"] = reward
    else:
        pref_options.update(reward_options)  # nothing takes them: unknown ones are reported below
    pref = _construct(target, label, pref_options)
    if not callable(pref):
        raise UsageError(
            f"{label}: its instances are not callable (define __call__(images_a, images_b, prompts))"
        )
    return pref if isinstance(pref, Preference) else CallablePreference(pref, _name(pref, name_or_path))


def load_plugin(spec: str, kind: str = "reward"):
    """The object named by ``module.path:attribute`` (dotted attributes allowed), checked callable."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise UsageError(f"{kind} plug-in {spec!r}: write it as module.path:attribute")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ModuleNotFoundError, or an error raised while importing the user's module
        raise UsageError(
            f"{kind} plug-in {spec}: cannot import module {module_name!r} ({short_cause(e)}); is it on PYTHONPATH?"
        ) from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"{kind} plug-in {spec}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(
            f"{kind} plug-in {spec}: {attr!r} is a {type(obj).__name__}, not a class or function"
        )
    return obj


def _parameters(factory) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # some builtins have no signature
        return {}


def _construct(factory, label: str, options: dict):
    """``factory(**options)`` with None values dropped, and trainer options dropped where not taken."""
    params = _parameters(factory)
    given = {k: v for k, v in options.items() if v is not None}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in given if k not in params and k not in TRAINER_OPTIONS]
        if unknown:
            valid = [k for k, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
            raise UsageError(
                f"{label} takes no option {unknown[0]!r} (its options: {', '.join(valid) or 'none'})"
            )
        given = {k: v for k, v in given.items() if k in params}
    if params:
        try:
            inspect.signature(factory).bind(**given)
        except TypeError as e:  # a required argument the options do not give
            raise UsageError(f"{label}: cannot be built with the options given ({e})") from e
    return factory(**given)


def _name(obj, spec: str) -> str:
    name = getattr(obj, "name", None)
    return name if isinstance(name, str) else spec.rpartition(":")[2]
