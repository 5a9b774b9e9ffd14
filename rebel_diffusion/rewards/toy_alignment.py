"""``toy-alignment``: does a ``toy`` sample show the colour and shape its prompt asks for?

The CPU analogue of CLIP prompt alignment. A small CNN (``ToyClassifier``), trained by
``scripts/train_toy.py`` on the same synthetic generator as the ``toy`` model
(``rebel_diffusion.toy.data``), predicts the shape, the shape's colour and the background colour of
a 32x32 image. The reward is

    reward = P(colour = prompted colour) * P(shape = prompted shape)

the classifier's probability that both prompted attributes are present (the heads are trained
independently, so their product is the probability of the joint event). A product, not a mean,
because a sample is only aligned when *both* match: a mean pays half the reward for a red blob of
the wrong shape, and an RL policy would settle there. It also makes the mean reward an estimate of
the "both match" rate reported for the base model. With ``include_background=True`` the prompted
background colour's probability is a third factor. A prompt naming only a shape or only a colour
is scored on that one; a prompt naming neither raises ``UsageError``.

    reward = ToyAlignmentReward()
    reward(images, ["a red circle on a blue background", ...])   # images (B, 3, H, W) in [0, 1] -> (B,)
    reward.details(images, prompts)   # per-attribute probabilities and matches, each (B,)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..toy.data import COLOUR_NAMES, IMAGE_SIZE, SHAPES, parse_caption
from .base import Reward, check_images

CLASSIFIER_SUBDIR = "classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class ToyClassifier(nn.Module):
    """Small CNN: a (B, 3, 32, 32) [0, 1] image -> logits of shape, colour and background.

    Four 3x3 convolutions (the last three of stride 2: 32 -> 4 px), GroupNorm + SiLU, then a
    hidden layer and three linear heads. About 0.2 M parameters.
    """

    def __init__(
        self,
        width: int = 32,
        hidden: int = 128,
        n_shapes: int = len(SHAPES),
        n_colours: int = len(COLOUR_NAMES),
        image_size: int = IMAGE_SIZE,
    ):
        super().__init__()
        self.config = dict(width=width, hidden=hidden, n_shapes=n_shapes, n_colours=n_colours, image_size=image_size)
        w = width

        def block(c_in, c_out, stride):
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.features = nn.Sequential(
            *block(3, w, 1),
            *block(w, 2 * w, 2),
            *block(2 * w, 2 * w, 2),
            *block(2 * w, 2 * w, 2),
            nn.Flatten(),
        )
        feat = 2 * w * (image_size // 8) ** 2
        self.trunk = nn.Sequential(nn.Linear(feat, hidden), nn.SiLU())
        self.shape_head = nn.Linear(hidden, n_shapes)
        self.colour_head = nn.Linear(hidden, n_colours)
        self.background_head = nn.Linear(hidden, n_colours)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, S, S) in [0, 1] -> logits {'shape': (B, 4), 'colour': (B, 8), 'background': (B, 8)}."""
        h = self.trunk(self.features(images * 2 - 1))
        return {
            "shape": self.shape_head(h),
            "colour": self.colour_head(h),
            "background": self.background_head(h),
        }


def default_classifier_path() -> Path:
    from ..models import loading  # TOY_MODEL_DIR read at call time: tests point it elsewhere

    return Path(loading.TOY_MODEL_DIR) / CLASSIFIER_SUBDIR


def save_classifier(model: ToyClassifier, folder: str | Path) -> None:
    """Write ``folder/model.safetensors`` (fp16) and ``folder/config.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(
        json.dumps({**model.config, "shapes": list(SHAPES), "colours": list(COLOUR_NAMES)}, indent=2) + "\n"
    )


def load_classifier(folder: str | Path | None = None) -> ToyClassifier:
    """The trained classifier in float32, eval mode. ``UsageError`` (one line) if missing or damaged."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else default_classifier_path()
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise UsageError(
            f"toy-alignment: the toy classifier is missing ({folder} needs {WEIGHTS_NAME} and {CONFIG_NAME}); "
            "reinstall rebel-diffusion, or train it with `python scripts/train_toy.py`"
        )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        if config.get("shapes") != list(SHAPES) or config.get("colours") != list(COLOUR_NAMES):
            raise ValueError("its shapes/colours differ from rebel_diffusion.toy.data's")
        model = ToyClassifier(**{k: config[k] for k in ("width", "hidden", "n_shapes", "n_colours", "image_size")})
        model.load_state_dict({k: v.float() for k, v in load_file(str(folder / WEIGHTS_NAME)).items()})
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UsageError(
            f"toy-alignment: the toy classifier in {folder} is damaged ({type(e).__name__}: {first}); "
            "reinstall rebel-diffusion, or retrain it with `python scripts/train_toy.py`"
        ) from e
    return model.eval().requires_grad_(False)


def parse_prompt(prompt: str) -> tuple[int | None, int | None, int | None]:
    """(shape, colour, background) ids of a toy prompt; ``UsageError`` if it names no colour and no shape."""
    shape, colour, background = parse_caption(prompt)
    if shape is None and colour is None:
        raise UsageError(
            f"toy-alignment: the prompt {prompt!r} names no toy colour ({', '.join(COLOUR_NAMES)}) and no "
            f"shape ({', '.join(SHAPES)}); use toy prompts such as 'a red circle on a blue background' "
            "(prompts/toy_shapes.txt)"
        )
    return shape, colour, background


class ToyAlignmentReward(Reward):
    """Probability, under the toy classifier, that an image shows its prompt's colour and shape.

    ``reward(images, prompts) -> (B,)`` float32 in [0, 1]; images (B, 3, H, W) in [0, 1] of any
    size (resized to the classifier's 32x32). The classifier loads lazily, once (or on ``load()``).
    Options: ``classifier_path`` (default: the ``classifier/`` folder of the shipped ``toy`` model),
    ``include_background`` (also multiply by P(prompted background colour); default False),
    ``temperature`` (the logits are divided by it before the softmax; default 1. Above 1 the
    probability of a colour keeps rising toward the palette's own instead of saturating just past
    the classifier's boundary; ``details`` reports the tempered probabilities).
    """

    name = "toy-alignment"
    units = "probability that the prompt's colour and shape are shown, 0-1"

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        classifier_path: str | Path | None = None,
        include_background: bool = False,
        temperature: float = 1.0,
    ):
        super().__init__(device, dtype)
        if not temperature > 0:
            raise ValueError(f"toy-alignment: temperature must be > 0, got {temperature}")
        self.classifier_path = classifier_path
        self.include_background = bool(include_background)
        self.temperature = float(temperature)
        if self.include_background:  # the built-in ``toy-alignment-full``
            self.name = "toy-alignment-full"
            self.units = "probability that the prompt's shape, its colour and the background are shown, 0-1"
        self.model: ToyClassifier | None = None

    def _load(self) -> None:
        self.model = load_classifier(self.classifier_path).to(device=self.device, dtype=self.dtype)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._figures(images, prompts)["reward"]

    def details(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per-image figures, each (B,) float32 on the images' device.

        ``colour``, ``shape``, ``background``: the classifier's probability of the prompted value;
        ``match_colour``, ``match_shape``, ``match_background``: 1.0 where its most likely value is
        the prompted one (their means are prompt-match rates); ``reward`` as ``__call__``. An
        attribute the prompt does not name is NaN in its two figures.
        """
        prompts = list(prompts)
        images = check_images(images, prompts)
        self.load(images.device)
        with torch.no_grad():
            out = self._figures(images.to(self.device), prompts)
        return {k: v.to(images.device) for k, v in out.items()}

    def _figures(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """The figures of ``details`` for checked images (B, 3, H, W) on ``self.device``."""
        parsed = [parse_prompt(p) for p in prompts]
        size = self.model.config["image_size"]
        x = images.to(self.dtype)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False).to(
                self.dtype
            )
        probs = {k: (v.float() / self.temperature).softmax(-1) for k, v in self.model(x).items()}  # {(B, n_k)}

        out: dict[str, torch.Tensor] = {}
        reward = torch.ones(len(prompts), device=x.device)
        nan = torch.tensor(float("nan"), device=x.device)
        for j, key in enumerate(("shape", "colour", "background")):
            ids = torch.tensor([p[j] if p[j] is not None else -1 for p in parsed], device=x.device)  # (B,)
            named = ids >= 0
            p = probs[key].gather(1, ids.clamp(min=0).unsqueeze(1)).squeeze(1)  # (B,)
            hit = (probs[key].argmax(-1) == ids).float()
            out[key] = torch.where(named, p, nan)
            out[f"match_{key}"] = torch.where(named, hit, nan)
            if key != "background" or self.include_background:
                reward = reward * torch.where(named, p, torch.ones_like(p))
        out["reward"] = reward
        return out
