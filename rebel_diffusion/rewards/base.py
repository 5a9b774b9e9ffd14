"""The reward interface and its shared checks.

A reward is a callable ``reward(images, prompts) -> scores``:

- ``images``: ``(B, 3, H, W)`` float in [0, 1], on any device, any float dtype;
- ``prompts``: ``list[str]`` of length B;
- ``scores``: ``(B,)`` float32 on the images' device.

Every reward object has a ``.name``. The device is given at construction (``device=``, or a
``RewardContext``, which the trainer fills in); ``device=None`` means "the device of the first images
seen". Models load lazily on the first call, once; ``reward.load()`` loads them now (the trainer calls
it before the first epoch so that a missing weights file fails at start-up, not after the first
sampling round).

``RewardContext`` is what every reward is built from (built-ins and plug-ins alike, see the package
docstring); ``reward_function`` marks a plain scoring function as a plug-in.

Input checks, shared by every reward (built-in or plug-in):

- values outside [0, 1] are clamped (a VAE decode overshoots a little; saving the image as a file
  would clamp too);
- NaN or inf raises ``ValueError`` naming the images: they mean the sampler or the VAE diverged
  (typically fp16 overflow), and a made-up score would silently poison the update.

Output checks: a reward must return one real number per image (a tensor, array or list of shape
``(B,)``); anything else is a ``UsageError`` naming the reward. NaN or inf scores pass through: the
trainer drops those images and counts them (``reward_nonfinite``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """``torch.float32`` for None; accepts a ``torch.dtype`` or a name such as ``'bf16'``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def as_device(device) -> torch.device | None:
    """``torch.device(device)``, None kept; ``UsageError`` (one line) for a name torch does not know."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UsageError(f"device {device!r} is not a torch device: use e.g. cpu, cuda or cuda:1") from e


def short_cause(e: BaseException, limit: int = 120) -> str:
    """``'Type: first sentence'`` of an exception, for one-line error messages."""
    lines = str(e).strip().splitlines()
    text = lines[0].split(". ")[0] if lines else ""
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def hub_file(local: str | os.PathLike | None, repo: str, filename: str, what: str, flag: str, also: str = "") -> Path:
    """A local path to a reward's weights file: ``local`` if given, else the hub download.

    ``local`` may be the file or a folder holding ``filename`` (what ``hf download REPO`` leaves).
    Every failure is one ``UsageError`` line naming what was looked for and how to pass a local copy
    (``also``: what else to download beside it).
    """
    if local is not None:
        path = Path(local).expanduser()
        if path.is_dir() and (path / filename).is_file():
            return path / filename
        if not path.is_file():
            raise UsageError(f"{flag} {local}: no such file (nor a folder holding {filename})")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as e:  # offline, no such repo/file, auth: one line, not the hub's stack trace
        raise UsageError(
            f"could not download {what} {filename} from the hub repo {repo} ({short_cause(e)}); "
            f"download it where the hub is reachable (hf download {repo} {filename}{also}) and pass {flag} PATH"
        ) from e


def check_images(images: torch.Tensor, prompts) -> torch.Tensor:
    """Validate a batch for scoring; returns it clamped to [0, 1].  # (B, 3, H, W)"""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"rewards take images of shape (B, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"rewards take float images in [0, 1], got dtype {images.dtype}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    bad = ~torch.isfinite(images).flatten(1).all(dim=1)  # (B,)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"images {idx[:8]} contain NaN or inf: the sampler or the VAE diverged "
            "(fp16 overflow? decode in fp32 or bf16)"
        )
    return images.clamp(0.0, 1.0)


_REAL_DTYPES = (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)  # fmt: skip


def check_scores(scores, batch_size: int, name: str, device: torch.device, kind: str = "reward") -> torch.Tensor:
    """Coerce what a reward returned to float32 ``(B,)`` on ``device``, or say what is wrong (one line)."""
    try:
        scores = torch.as_tensor(scores).detach()
    except (TypeError, ValueError, RuntimeError) as e:  # strings, ragged lists, objects
        raise UsageError(
            f"{kind} {name!r} returned {type(scores).__name__} that is not numbers ({short_cause(e)}): "
            f"return one float per image, shape ({batch_size},)"
        ) from e
    if scores.dtype not in _REAL_DTYPES:  # complex, or a dtype with no float32 meaning
        raise UsageError(f"{kind} {name!r} returned dtype {scores.dtype}: return real numbers, e.g. float32")
    if scores.shape != (batch_size,):
        raise UsageError(
            f"{kind} {name!r} returned shape {tuple(scores.shape)}, expected ({batch_size},): "
            "return one score per image"
        )
    return scores.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class RewardContext:
    """Everything a reward is built from: ``load_reward`` fills one in and hands it to the reward.

    ``device`` and ``dtype`` come from the trainer (``device=None``: the device of the first images
    scored). The other fields are per-reward options, None meaning "the reward's default"; a reward
    reads those it knows and ignores the rest.
    """

    device: torch.device | None = None
    dtype: torch.dtype = torch.float32
    # aesthetic, clip: the open_clip backbone (``clip_score``)
    clip_model: str | None = None
    clip_pretrained: str | None = None
    # aesthetic: the LAION head (``aesthetic``)
    aesthetic_head: str | os.PathLike | None = None
    aesthetic_head_repo: str | None = None
    aesthetic_head_file: str | None = None
    # toy-alignment: the toy classifier (``toy_alignment``)
    classifier_path: str | os.PathLike | None = None
    include_background: bool | None = None
    # pickscore: model and processor, hub id or folder (``pickscore``)
    pickscore_model: str | os.PathLike | None = None
    pickscore_processor: str | os.PathLike | None = None
    # hpsv2: the HPSv2.1 checkpoint, file or folder (``hpsv2``)
    hpsv2_checkpoint: str | os.PathLike | None = None
    # imagereward: the checkpoint (file or folder) and the BERT tokenizer (``imagereward``)
    imagereward_checkpoint: str | os.PathLike | None = None
    imagereward_tokenizer: str | os.PathLike | None = None
    # a reward server (``http_reward``): seconds per socket operation, retries on connection errors / 5xx
    http_timeout: float | None = None
    http_retries: int | None = None

    def __post_init__(self):
        # Normalised once here, so every reward sees a torch.device (or None) and a torch.dtype.
        object.__setattr__(self, "device", as_device(self.device))
        try:
            object.__setattr__(self, "dtype", as_dtype(self.dtype))
        except (TypeError, ValueError) as e:
            raise UsageError(f"reward {e}") from e  # "reward dtype 'x': use one of ..."

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def given(self) -> dict:
        """The per-reward options that are set (not None), device and dtype aside."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("device", "dtype") and getattr(self, f.name) is not None
        }


class Reward:
    """Base class of the rewards: subclasses implement ``score`` (and ``_load`` if they have weights).

    ``__call__`` checks the images (module docstring), moves them to the reward's device, scores them
    without gradients and returns float32 ``(B,)`` on the images' device.
    """

    name: str = "reward"
    # What one unit of the score is, for people reading it (the preview, eval); "" when unknown.
    # Every reward is maximised: higher is better.
    units: str = ""

    def __init__(
        self,
        device: RewardContext | str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        if isinstance(device, RewardContext):  # Reward(ctx): a plug-in class built by load_reward
            device, dtype = device.device, device.dtype if dtype is None else dtype
        self.device = torch.device(device) if device is not None else None
        self.dtype = as_dtype(dtype)
        self._loaded = False

    def load(self, device: str | torch.device | None = None) -> Reward:
        """Load the weights now (idempotent). ``device`` only fills in a reward built without one."""
        if self.device is None:
            self.device = torch.device(device) if device is not None else torch.device("cpu")
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    def _load(self) -> None:
        """Load heavy models onto ``self.device`` in ``self.dtype``; nothing by default."""

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores ``(B,)`` of checked images ``(B, 3, H, W)`` already on ``self.device``."""
        raise NotImplementedError

    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Extra per-image figures for logging, name -> ``(B,)``; none by default."""
        return {}

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        prompts = list(prompts)
        images = check_images(images, prompts)
        self.load(images.device)
        with torch.no_grad():  # no_grad, not inference_mode: the scores may enter autograd later
            scores = self.score(images.to(self.device), prompts)
        return check_scores(scores, len(prompts), self.name, images.device)

    def label(self) -> str:
        """The name with its units and direction: ``name (units; higher is better)``."""
        return f"{self.name} ({self.units + '; ' if self.units else ''}higher is better)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


class CallableReward(Reward):
    """Adapts a scoring function ``fn(images, prompts) -> (B,)`` to the interface.

    The function gets the checked images on their own device and may return a tensor, an array or
    a list.
    """

    def __init__(self, fn, name: str):
        super().__init__()
        self.fn = fn
        self.name = name

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        prompts = list(prompts)
        images = check_images(images, prompts)
        with torch.no_grad():
            scores = self.fn(images, prompts)
        return check_scores(scores, len(prompts), self.name, images.device)

    def load(self, device=None) -> Reward:
        return self

    def __repr__(self) -> str:
        return f"CallableReward(name={self.name!r}, fn={getattr(self.fn, '__qualname__', self.fn)!r})"


class RewardFunction:
    """A scoring function marked as a reward plug-in (``@reward_function``); still callable as itself."""

    def __init__(self, fn, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"@reward_function decorates a function, got {type(fn).__name__}")
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "reward")
        functools.update_wrapper(self, fn)

    def __call__(self, images, prompts):
        return self.fn(images, prompts)

    def __repr__(self) -> str:
        return f"RewardFunction(name={self.name!r})"


def reward_function(fn=None, *, name: str | None = None):
    """Mark ``fn(images, prompts) -> (B,)`` as a reward plug-in: ``@reward_function`` or
    ``@reward_function(name="my-reward")`` (default name: the function's)."""
    if fn is None:
        return lambda f: RewardFunction(f, name)
    return RewardFunction(fn, name)
