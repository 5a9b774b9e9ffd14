"""The reward interface and its shared checks.

A reward is a callable ``reward(images, prompts) -> scores``:

- ``images``: ``(B, 3, H, W)`` float in [0, 1], on any device, any float dtype;
- ``prompts``: ``list[str]`` of length B;
- ``scores``: ``(B,)`` float32 on the images' device.

Every reward object has a ``.name``. The device is given at construction (``device=``, which the
trainer passes); ``device=None`` means "the device of the first images seen". Models load lazily on
the first call, once; ``reward.load()`` loads them now (the trainer calls it before the first epoch
so that a missing weights file fails at start-up, not after the first sampling round).

Input checks, shared by every reward (built-in or plug-in):

- values outside [0, 1] are clamped (a VAE decode overshoots a little; saving the image as a file
  would clamp too);
- NaN or inf raises ``ValueError`` naming the images: they mean the sampler or the VAE diverged
  (typically fp16 overflow), and a made-up score would silently poison the update.
"""

from __future__ import annotations

import torch

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


def short_cause(e: BaseException, limit: int = 120) -> str:
    """``'Type: first sentence'`` of an exception, for one-line error messages."""
    lines = str(e).strip().splitlines()
    text = lines[0].split(". ")[0] if lines else ""
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


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


def check_scores(scores, batch_size: int, name: str, device: torch.device) -> torch.Tensor:
    """Coerce what a reward returned to float32 ``(B,)`` on ``device``, or say what is wrong."""
    scores = torch.as_tensor(scores).detach()
    if scores.shape != (batch_size,):
        raise ValueError(f"reward {name!r} returned shape {tuple(scores.shape)}, expected ({batch_size},)")
    return scores.to(device=device, dtype=torch.float32)


class Reward:
    """Base class of the rewards: subclasses implement ``score`` (and ``_load`` if they have weights).

    ``__call__`` checks the images (module docstring), moves them to the reward's device, scores them
    without gradients and returns float32 ``(B,)`` on the images' device.
    """

    name: str = "reward"

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None):
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


class CallableReward(Reward):
    """Adapts a plug-in (a plain function, or an object that is not a ``Reward``) to the interface.

    The plug-in gets the checked images on their own device and may return a tensor, an array or
    a list; ``details`` is forwarded when the plug-in has one.
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

    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        details = getattr(self.fn, "details", None)
        return details(check_images(images, list(prompts)), list(prompts)) if details else {}

    def load(self, device=None) -> Reward:
        load = getattr(self.fn, "load", None)
        if callable(load):
            load()
        return self
