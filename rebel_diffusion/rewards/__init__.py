"""Rewards: score decoded images, ``reward(images, prompts) -> (B,)``.

Interface (``base``): images ``(B, 3, H, W)`` float in [0, 1] on any device, prompts ``list[str]``;
scores float32 ``(B,)`` on the images' device. Every reward has ``.name``, ``.details(images,
prompts) -> dict[str, (B,)]`` (extra logging figures, often empty) and ``.load()`` (load weights now
rather than on the first call).

``load_reward(name, **options)`` turns a name into a reward. The name is one of

- a built-in (``REWARDS``): ``aesthetic`` (LAION aesthetic predictor v2 on OpenAI CLIP ViT-L/14,
  ``aesthetic``), ``clip`` (prompt-image cosine similarity of open_clip embeddings, ``clip_score``),
  ``jpeg-incompressibility`` / ``jpeg-compressibility`` (JPEG size in kB, +/-, ``jpeg``),
  ``toy-alignment`` (the toy model's attribute classifier, ``toy_alignment``: the prompt's colour and
  shape), ``toy-alignment-full`` (the same, and the background colour too); the human-preference
  models the field reports, ``pickscore`` (PickScore, ``pickscore``), ``hpsv2`` (HPSv2.1,
  ``hpsv2``) and ``imagereward`` (ImageReward, ``imagereward``);
- an ``http://`` or ``https://`` URL: a reward server (``HttpReward``; the protocol is in
  ``http_reward``);
- a plug-in, ``module.path:attribute`` (dotted attributes allowed).

The options fill in one ``RewardContext``: ``device`` and ``dtype`` (from the trainer) and the
per-reward options ``clip_model``, ``clip_pretrained`` (aesthetic, clip), ``aesthetic_head``,
``aesthetic_head_repo``, ``aesthetic_head_file`` (aesthetic), ``classifier_path``,
``include_background`` (toy-alignment), ``pickscore_model``, ``pickscore_processor`` (pickscore),
``hpsv2_checkpoint`` (hpsv2), ``imagereward_checkpoint``, ``imagereward_tokenizer`` (imagereward),
``http_timeout``, ``http_retries`` (a URL). ``WEIGHT_OPTIONS`` are those that point at local copies of
weights, the ones every command offers as flags (``reward_options`` keeps those a reward reads). None means "the
default", so a caller may pass every option it has. A name that is not an option is a
``UsageError``; so is an option set for a built-in or URL reward that does not read it.

Plug-in contract. The attribute is one of, checked in this order (no signature inspection):

1. a function decorated with ``@reward_function`` (or ``@reward_function(name=...)``): a scoring
   function ``f(images, prompts) -> (B,)`` (tensor, array or list); its name is the reward's;
2. a ``Reward`` subclass: built as ``cls(ctx)`` with the one ``RewardContext``; implement
   ``score(images, prompts)`` (images checked and on ``self.device``), and ``_load`` for weights.
   ``Reward.__init__(ctx)`` takes the context's device and dtype, so a subclass without weights
   needs no ``__init__``;
3. a ``Reward`` instance: used as it is (the context is not applied; its device, if None, becomes
   the first images');
4. any other callable: a factory, called as ``f(ctx)``, that returns a ``Reward`` (or a
   ``@reward_function``), e.g. ``lambda ctx: HttpReward("http://...", ctx, timeout=300)``.

For example::

    from rebel_diffusion.rewards import Reward, RewardContext, reward_function

    @reward_function(name="brightness")
    def brightness(images, prompts):
        return images.mean(dim=(1, 2, 3))  # (B, 3, H, W) -> (B,)

    class Sharpness(Reward):
        name = "sharpness"
        def __init__(self, ctx: RewardContext, scale: float = 1.0):
            super().__init__(ctx)  # device, dtype
            self.scale = scale
        def score(self, images, prompts):
            return self.scale * images.diff(dim=-1).abs().mean(dim=(1, 2, 3))

    def sharper(ctx):  # a factory: options of the plug-in's own
        return Sharpness(ctx, scale=10.0)

A plug-in that cannot be used is a ``UsageError`` with one line saying what to change: a module that
does not import, a missing attribute, an object of the wrong kind (an undecorated scoring function
included), a factory that fails on the context or returns something else, and, when it scores, an
output that is not one real number per image. NaN or inf scores are not errors: the trainer drops
those images and counts them (``reward_nonfinite``), and stops if none is finite.

Preferences (``preference``): ``load_preference`` with ``PREFERENCES`` (``bradley-terry``) or a
``module:attr`` plug-in under the same contract (``Preference``, ``PreferenceContext``,
``@preference_function``).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from ..errors import UsageError
from .aesthetic import DEFAULT_HEAD_FILE, DEFAULT_HEAD_REPO, AestheticReward
from .base import (
    CallableReward,
    Reward,
    RewardContext,
    RewardFunction,
    reward_function,
    short_cause,
)
from .clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, ClipScoreReward
from .combined import COMBINE, CombinedReward, format_reward_weights, parse_reward_weights
from .hpsv2 import HpsV2Reward
from .http_reward import DEFAULT_RETRIES, HttpReward, is_url
from .imagereward import ImageRewardReward
from .jpeg import JpegCompressibility, JpegIncompressibility
from .pickscore import PickScoreReward
from .preference import (
    BradleyTerryPreference,
    CallablePreference,
    Preference,
    PreferenceContext,
    PreferenceFunction,
    preference_function,
)
from .toy_alignment import ToyAlignmentReward

# The one table of reward names: a new built-in adds a line here and a builder in _BUILDERS.
REWARDS: dict[str, type[Reward]] = {
    "aesthetic": AestheticReward,
    "clip": ClipScoreReward,
    "jpeg-compressibility": JpegCompressibility,
    "jpeg-incompressibility": JpegIncompressibility,
    "toy-alignment": ToyAlignmentReward,
    "toy-alignment-full": ToyAlignmentReward,
    "pickscore": PickScoreReward,
    "hpsv2": HpsV2Reward,
    "imagereward": ImageRewardReward,
}

# The options that point at local copies of weights: every command offers them as flags.
WEIGHT_OPTIONS = ("aesthetic_head", "pickscore_model", "hpsv2_checkpoint", "imagereward_checkpoint")

PREFERENCES: dict[str, type[Preference]] = {
    "bradley-terry": BradleyTerryPreference,
}

__all__ = [
    "COMBINE",
    "CombinedReward",
    "format_reward_weights",
    "parse_reward_weights",
    "PREFERENCES",
    "REWARDS",
    "BradleyTerryPreference",
    "CallablePreference",
    "CallableReward",
    "HttpReward",
    "Preference",
    "PreferenceContext",
    "PreferenceFunction",
    "Reward",
    "RewardContext",
    "RewardFunction",
    "load_plugin",
    "load_preference",
    "load_reward",
    "preference_function",
    "reward_options",
    "weight_options",
    "reward_function",
]


# ----------------------------------------------------------------------------------------------
# Built-ins, each built explicitly from the context: (the options it reads, builder)


def _aesthetic(c: RewardContext) -> Reward:
    return AestheticReward(
        c.device,
        c.dtype,
        clip_model=c.clip_model or DEFAULT_CLIP_MODEL,
        clip_pretrained=c.clip_pretrained or DEFAULT_CLIP_PRETRAINED,
        aesthetic_head=c.aesthetic_head,
        aesthetic_head_repo=c.aesthetic_head_repo or DEFAULT_HEAD_REPO,
        aesthetic_head_file=c.aesthetic_head_file or DEFAULT_HEAD_FILE,
    )


def _clip(c: RewardContext) -> Reward:
    return ClipScoreReward(
        c.device,
        c.dtype,
        clip_model=c.clip_model or DEFAULT_CLIP_MODEL,
        clip_pretrained=c.clip_pretrained or DEFAULT_CLIP_PRETRAINED,
    )


def _toy_alignment(c: RewardContext) -> Reward:
    return ToyAlignmentReward(
        c.device,
        c.dtype,
        classifier_path=c.classifier_path,
        include_background=bool(c.include_background),
    )


def _pickscore(c: RewardContext) -> Reward:
    return PickScoreReward(c.device, c.dtype, model=c.pickscore_model, processor=c.pickscore_processor)


def _imagereward(c: RewardContext) -> Reward:
    return ImageRewardReward(c.device, c.dtype, checkpoint=c.imagereward_checkpoint, tokenizer=c.imagereward_tokenizer)


_CLIP_OPTIONS = ("clip_model", "clip_pretrained")
_BUILDERS: dict[str, tuple[tuple[str, ...], Callable[[RewardContext], Reward]]] = {
    "aesthetic": (
        (*_CLIP_OPTIONS, "aesthetic_head", "aesthetic_head_repo", "aesthetic_head_file"),
        _aesthetic,
    ),
    "clip": (_CLIP_OPTIONS, _clip),
    "jpeg-compressibility": ((), lambda c: JpegCompressibility(c.device, c.dtype)),
    "jpeg-incompressibility": ((), lambda c: JpegIncompressibility(c.device, c.dtype)),
    "toy-alignment": (("classifier_path", "include_background"), _toy_alignment),
    "toy-alignment-full": (
        ("classifier_path",),
        lambda c: ToyAlignmentReward(c.device, c.dtype, classifier_path=c.classifier_path, include_background=True),
    ),
    "pickscore": (("pickscore_model", "pickscore_processor"), _pickscore),
    "hpsv2": (("hpsv2_checkpoint",), lambda c: HpsV2Reward(c.device, c.dtype, checkpoint=c.hpsv2_checkpoint)),
    "imagereward": (("imagereward_checkpoint", "imagereward_tokenizer"), _imagereward),
}
_URL_OPTIONS = ("http_timeout", "http_retries")


_PREFERENCE_BUILDERS: dict[str, Callable[[PreferenceContext], Preference]] = {
    "bradley-terry": lambda c: BradleyTerryPreference(c.reward, 1.0 if c.temperature is None else c.temperature),
}


def _http(url: str, c: RewardContext) -> Reward:
    retries = DEFAULT_RETRIES if c.http_retries is None else c.http_retries
    return HttpReward(url, c.device, c.dtype, timeout=c.http_timeout, retries=retries)


# ----------------------------------------------------------------------------------------------
# Loading


def load_reward(name_or_path: str, context: RewardContext | None = None, **options) -> Reward:
    """A reward by table name, URL or ``module.path:attribute``: ``reward(images, prompts) -> (B,)``.

    ``context``: a ready ``RewardContext``; ``options`` fill one in (or replace its fields). Raises
    ``UsageError`` (one line) for an unknown name, option or a plug-in outside the contract (package
    docstring). Weights load on the first call, or on ``reward.load()``.
    """
    weights = parse_reward_weights(name_or_path)
    if weights is not None:
        return _combined(weights, context, options)
    ctx = make_context(context, options)
    if is_url(name_or_path):
        _check_options(f"reward {name_or_path}", ctx, _URL_OPTIONS)
        return _http(name_or_path, ctx)
    if "://" in name_or_path:
        raise UsageError(f"--reward {name_or_path}: a reward server's URL starts with http:// or https://")
    if ":" in name_or_path:
        return _reward_plugin(load_plugin(name_or_path, "reward"), name_or_path, ctx)
    name, _, weight = name_or_path.rpartition("=")
    if name in _BUILDERS:  # 'jpeg-compressibility=abc': a known reward with a weight that is no number
        raise UsageError(f"--reward: the weight of {name!r} must be a number, got {weight!r}")
    if name_or_path not in _BUILDERS:
        raise UsageError(
            f"unknown reward {name_or_path!r}: use one of {', '.join(REWARDS)}, module.path:attribute for "
            "your own, or the http:// URL of a reward server"
        )
    reads, build = _BUILDERS[name_or_path]
    _check_options(f"reward {name_or_path}", ctx, reads)
    return build(ctx)


def load_preference(
    name_or_path: str, reward: Reward | str | None = None, *, temperature: float | None = None, **options
) -> Preference:
    """A preference by table name or ``module.path:attribute``: ``pref(a, b, prompts) -> P (B,)``.

    ``reward``: the pointwise reward, a reward object or a name (loaded with ``load_reward`` and
    ``options``); ``temperature``: None for the preference's default. The preference is built from
    one ``PreferenceContext`` (plug-ins: the contract of the package docstring).
    """
    if isinstance(reward, str):
        reward = load_reward(reward, **options)
    else:
        extra = [k for k, v in options.items() if v is not None and k not in ("device", "dtype")]
        if extra:
            raise UsageError(
                f"preference {name_or_path}: option {extra[0]!r} only applies to a reward loaded by name (reward=NAME)"
            )
    # Device and dtype: given, else the reward's.
    device = options.get("device") or getattr(reward, "device", None)
    dtype = options.get("dtype") or getattr(reward, "dtype", None)
    try:
        ctx = PreferenceContext(reward=reward, temperature=temperature, device=device, dtype=dtype)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"preference {name_or_path}: {short_cause(e)}") from e
    if ":" in name_or_path:
        return _preference_plugin(load_plugin(name_or_path, "preference"), name_or_path, ctx)
    if name_or_path not in _PREFERENCE_BUILDERS:
        raise UsageError(
            f"unknown preference {name_or_path!r}: use one of {', '.join(PREFERENCES)}, "
            "or module.path:attribute for your own"
        )
    return _PREFERENCE_BUILDERS[name_or_path](ctx)


_EVERY_REWARD = ("device", "dtype")  # RewardContext fields every reward takes


def weight_options(*sources) -> dict:
    """The ``WEIGHT_OPTIONS`` set in ``sources`` (dicts such as ``vars(args)``, or objects with those
    attributes such as a run's ``TrainConfig``; None is skipped), later ones winning."""
    options = {}
    for src in sources:
        values = {} if src is None else src if isinstance(src, dict) else vars(src)
        options.update({k: values[k] for k in WEIGHT_OPTIONS if values.get(k) is not None})
    return options


def reward_options(name_or_path: str, options: dict) -> dict:
    """The options in ``options`` that the reward ``name_or_path`` reads, Nones dropped.

    For commands that hold every weights option (``WEIGHT_OPTIONS``) and score with several rewards:
    each reward gets its own. A plug-in or a server reads none of them.
    """
    weights = parse_reward_weights(name_or_path)
    names = list(weights) if weights is not None else [name_or_path]
    reads = {k for name in names if name in _BUILDERS for k in _BUILDERS[name][0]}
    return {k: v for k, v in options.items() if v is not None and (k in reads or k in _EVERY_REWARD)}


def _combined(weights: dict[str, float], context: RewardContext | None, options: dict) -> CombinedReward:
    """Each component gets the options it reads (built-ins) or all of them (plug-ins, servers); an
    option no component reads is a UsageError, as for one reward."""
    rewards, read = {}, set()
    for name in weights:
        if name in _BUILDERS:
            reads = (*_BUILDERS[name][0], *_EVERY_REWARD)  # device and dtype go to every reward
            mine = {k: v for k, v in options.items() if k in reads}
        else:
            mine = dict(options)
        read |= set(mine)
        rewards[name] = load_reward(name, context, **mine)
    unread = [k for k, v in options.items() if k not in read and k not in _EVERY_REWARD and v is not None]
    if unread:
        raise UsageError(f"no component of --reward {format_reward_weights(weights)} takes option {unread[0]!r}")
    return CombinedReward(rewards, weights)


def make_context(context: RewardContext | None = None, options: dict | None = None) -> RewardContext:
    """``context`` with ``options`` set (a new one if None); ``UsageError`` for an unknown option name."""
    options = dict(options or {})
    unknown = [k for k in options if k not in RewardContext.option_names()]
    if unknown:
        raise UsageError(f"no reward option {unknown[0]!r}: the options are {', '.join(RewardContext.option_names())}")
    if context is None:
        return RewardContext(**options)
    return dataclasses.replace(context, **options) if options else context


def load_plugin(spec: str, kind: str = "reward"):
    """The object named by ``module.path:attribute`` (dotted attributes allowed), not yet checked."""
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
            raise UsageError(f"{kind} plug-in {spec}: {module_name!r} has no attribute {attr!r}; check the name")
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------------------------
# The contract, for rewards and preferences alike


@dataclasses.dataclass(frozen=True)
class _Kind:
    word: str  # "reward" / "preference"
    base: type  # Reward / Preference
    marked: type  # RewardFunction / PreferenceFunction
    wrap: Callable  # (marked, name) -> base instance
    context: str  # the context's class name, for messages
    decorator: str
    signature: str
    other: str  # the other kind's word, for a reward given as a preference and vice versa


_REWARD = _Kind(
    "reward",
    Reward,
    RewardFunction,
    lambda f: CallableReward(f.fn, f.name),
    "RewardContext",
    "@reward_function",
    "f(images, prompts)",
    "preference",
)
_PREFERENCE = _Kind(
    "preference",
    Preference,
    PreferenceFunction,
    lambda f: CallablePreference(f.fn, f.name),
    "PreferenceContext",
    "@preference_function",
    "f(images_a, images_b, prompts)",
    "reward",
)


def _reward_plugin(obj, spec: str, ctx: RewardContext) -> Reward:
    return _resolve(obj, spec, ctx, _REWARD)


def _preference_plugin(obj, spec: str, ctx: PreferenceContext) -> Preference:
    return _resolve(obj, spec, ctx, _PREFERENCE)


def _resolve(obj, spec: str, ctx, kind: _Kind):
    """The plug-in ``obj`` as a ``kind.base`` instance, by the package docstring's rule."""
    label = f"{kind.word} plug-in {spec}"
    what = (
        f"name a {kind.base.__name__} subclass, a factory f(ctx: {kind.context}) -> {kind.base.__name__}, "
        f"or a scoring function {kind.signature} decorated with {kind.decorator}"
    )
    if isinstance(obj, kind.marked):
        return kind.wrap(obj)
    other = _PREFERENCE if kind is _REWARD else _REWARD
    if isinstance(obj, other.marked | other.base) or (isinstance(obj, type) and issubclass(obj, other.base)):
        raise UsageError(f"{label}: it is a {kind.other}, not a {kind.word}; {what}")
    if isinstance(obj, type):
        if not issubclass(obj, kind.base):
            raise UsageError(
                f"{label}: the class {obj.__name__} is not a rebel_diffusion.rewards.{kind.base.__name__} "
                f"subclass; {what}"
            )
        return _call(obj, ctx, label, f"{obj.__name__}({kind.context})", kind)
    if isinstance(obj, kind.base):
        return obj
    if not callable(obj):
        raise UsageError(f"{label}: it is of type {type(obj).__name__}; {what}")
    made = _call(obj, ctx, label, f"the factory {_qualname(obj)}({kind.context})", kind)
    if isinstance(made, kind.marked):
        return kind.wrap(made)
    if not isinstance(made, kind.base):
        raise UsageError(
            f"{label}: the factory returned a {type(made).__name__}, not a {kind.base.__name__}; "
            f"return a {kind.base.__name__} (a scoring function {kind.signature} needs {kind.decorator})"
        )
    return made


def _call(factory, ctx, label: str, call: str, kind: _Kind):
    try:
        return factory(ctx)
    except TypeError as e:  # typically an undecorated scoring function, or an __init__ of other arguments
        raise UsageError(
            f"{label}: {call} failed ({short_cause(e)}); it must take one argument, the {kind.context} "
            f"(a scoring function {kind.signature} needs {kind.decorator})"
        ) from e


def _check_options(label: str, ctx: RewardContext, reads: tuple[str, ...]) -> None:
    extra = [k for k in ctx.given() if k not in reads]
    if extra:
        raise UsageError(f"{label} takes no option {extra[0]!r} (its options: {', '.join(reads) or 'none'})")


def _qualname(obj) -> str:
    return getattr(obj, "__qualname__", None) or type(obj).__name__
