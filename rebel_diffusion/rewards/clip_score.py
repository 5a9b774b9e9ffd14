"""``clip``: prompt-image alignment, and the open_clip backbone it shares with ``aesthetic``.

The score is the cosine similarity of the open_clip image and text embeddings, in [-1, 1] (papers
often report it x100; the scale is left to the trainer's normalisation).

Backbone options (shared with ``aesthetic``):

- ``clip_model``: an open_clip architecture name (default ``ViT-L-14``, SD 1.x's text encoder
  family), one registered with ``open_clip.add_model_config``, or open_clip's ``hf-hub:ORG/REPO`` /
  ``local-dir:PATH`` forms (which carry their own weights);
- ``clip_pretrained``: a pretrained tag (default ``openai``), a local checkpoint file (open_clip's
  ``pretrained`` accepts a path: use it offline), or ``'random'`` for random weights (benchmarks and
  tests only: the scores mean nothing). OpenAI's weights use QuickGELU: with a tag this is set from
  the tag; with a local file of OpenAI weights name the model ``ViT-L-14-quickgelu``.

Backbones live in a module-level cache keyed by (model, pretrained, device, dtype), so ``clip`` and
``aesthetic`` used together load ViT-L/14 once.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .base import Reward, as_dtype, short_cause

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"
RANDOM = "random"  # clip_pretrained / aesthetic_head value for random weights

_BACKBONES: dict[tuple, ClipBackbone] = {}


# ----------------------------------------------------------------------------------------------
# Preprocessing


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean,
    std,
    *,
    interpolation: str = "bicubic",
    resize_mode: str = "shortest",
    dtype: torch.dtype = torch.float32,
    crop: int | None = None,
) -> torch.Tensor:
    """CLIP's image transform on a batch of tensors, on their device.  # (B, 3, H, W) -> (B, 3, C, C)

    Same steps as open_clip's and transformers' PIL pipelines (``Resize(S)``, ``CenterCrop(C)``,
    ``Normalize``; ``C = crop or S``) without the per-image PIL round trip.
    """
    crop = size if crop is None else crop
    b, _, h, w = images.shape
    # 1. Resize, in float32: the antialiased kernels have no half-precision CPU version, and the
    #    downsampling from 512 is where precision matters. Antialiasing matches PIL's bicubic.
    if resize_mode == "shortest":
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)  # torchvision's rounding
        new_hw = (size, new_long) if h <= w else (new_long, size)
    elif resize_mode == "squash":
        new_hw = (size, size)
    else:
        raise UsageError(f"open_clip resize_mode {resize_mode!r} is not supported here (use 'shortest' or 'squash')")
    x = images.float()
    if (h, w) != new_hw:
        x = F.interpolate(x, size=new_hw, mode=interpolation, antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL's uint8 output clamps too
    # 2. Centre crop to C x C (torchvision's rounding).
    top = int(round((new_hw[0] - crop) / 2.0))
    left = int(round((new_hw[1] - crop) / 2.0))
    x = x[:, :, top : top + crop, left : left + crop]
    # 3. Normalise with the model's mean/std, in the model's dtype.
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).to(dtype)


# ----------------------------------------------------------------------------------------------
# Backbone


@dataclass
class ClipBackbone:
    """An open_clip model in eval mode, its tokenizer and its image preprocessing config."""

    model: torch.nn.Module
    tokenizer: object
    preprocess_cfg: dict
    dtype: torch.dtype
    embed_dim: int

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised float32 image embeddings.  # (B, 3, H, W) in [0, 1] -> (B, D)"""
        cfg = self.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        x = clip_preprocess(
            images.to(self.device),
            size,
            cfg["mean"],
            cfg["std"],
            interpolation=cfg.get("interpolation", "bicubic"),
            resize_mode=cfg.get("resize_mode", "shortest"),
            dtype=self.dtype,
        )
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised float32 text embeddings.  # B prompts -> (B, D)

        Each distinct prompt is encoded once: RL batches repeat prompts (groups per prompt).
        """
        unique = list(dict.fromkeys(prompts))
        tokens = self.tokenizer(unique).to(self.device)  # (U, L)
        emb = F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (U, D)
        index = torch.tensor([unique.index(p) for p in prompts], device=emb.device)
        return emb[index]


def load_clip_backbone(
    clip_model: str = DEFAULT_CLIP_MODEL,
    clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
) -> ClipBackbone:
    """The open_clip backbone for these settings, built once per (model, pretrained, device, dtype)."""
    device, dtype = torch.device(device), as_dtype(dtype)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one model
        device = torch.device("cuda", torch.cuda.current_device())
    key = (clip_model, clip_pretrained, str(device), dtype)
    if key not in _BACKBONES:
        _BACKBONES[key] = _build_backbone(clip_model, clip_pretrained, device, dtype)
    return _BACKBONES[key]


def _build_backbone(clip_model: str, clip_pretrained: str, device: torch.device, dtype: torch.dtype):
    import open_clip

    # 1. Check the names before any download, so a typo gives a list rather than a hub error.
    has_schema = clip_model.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and open_clip.get_model_config(clip_model) is None:
        raise UsageError(
            f"--clip-model {clip_model}: not an open_clip model; use a name from open_clip.list_models() "
            "(e.g. ViT-L-14, ViT-H-14), one registered with open_clip.add_model_config, or hf-hub:ORG/REPO"
        )
    pretrained, tag_cfg = None, {}
    if not has_schema and clip_pretrained != RANDOM:
        tag_cfg = open_clip.get_pretrained_cfg(clip_model, clip_pretrained)
        if not tag_cfg and not os.path.isfile(clip_pretrained):
            tags = open_clip.list_pretrained_tags_by_model(clip_model)
            raise UsageError(
                f"--clip-pretrained {clip_pretrained}: neither a pretrained tag of {clip_model} "
                f"({', '.join(tags) or 'none'}) nor an existing file; pass a local checkpoint file or a tag"
            )
        pretrained = clip_pretrained
        if not tag_cfg and _openai_needs_quick_gelu(clip_model):
            warnings.warn(
                f"--clip-pretrained is a local file: if it holds OpenAI's weights, name the model "
                f"{clip_model}-quickgelu (OpenAI's CLIP uses QuickGELU; the plain name uses GELU)",
                stacklevel=3,
            )

    # 2. Build (download if needed) in float32, then cast: one code path for every dtype.
    try:
        model = open_clip.create_model(
            clip_model,
            pretrained=pretrained,
            device=device,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
        )
    except Exception as e:
        raise UsageError(_weights_error(clip_model, clip_pretrained, tag_cfg, e)) from e
    model = model.to(dtype=dtype).eval().requires_grad_(False)

    # 3. Tokenizer (open_clip ships the BPE vocabulary: no download for the built-in models).
    tokenizer = open_clip.get_tokenizer(clip_model)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    embed_dim = (
        getattr(model.visual, "output_dim", None)
        or model.encode_image(
            torch.zeros(1, 3, preprocess_cfg["size"], preprocess_cfg["size"], device=device, dtype=dtype)
        ).shape[-1]
    )
    return ClipBackbone(model, tokenizer, preprocess_cfg, dtype, int(embed_dim))


def _openai_needs_quick_gelu(clip_model: str) -> bool:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(clip_model, "openai")
    model_cfg = open_clip.get_model_config(clip_model) or {}
    return bool(cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu", False)


def _weights_error(clip_model: str, clip_pretrained: str, tag_cfg: dict, e: Exception) -> str:
    cause = short_cause(e)
    if tag_cfg:
        source = tag_cfg.get("hf_hub") or tag_cfg.get("url") or "the model hub"
        return (
            f"could not get the open_clip weights {clip_model}/{clip_pretrained} from the hub repo "
            f"{source.rstrip('/')} ({cause}); download them where the hub is reachable and pass the "
            "checkpoint file with --clip-pretrained PATH"
        )
    return f"--clip-model {clip_model} --clip-pretrained {clip_pretrained}: could not build the model ({cause})"


# ----------------------------------------------------------------------------------------------
# Reward


class ClipScoreReward(Reward):
    """Cosine similarity of the CLIP embeddings of each image and its prompt.  # -> (B,) in [-1, 1]"""

    name = "clip"
    units = "CLIP cosine similarity of image and prompt, -1 to 1"

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
    ):
        super().__init__(device, dtype)
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.backbone: ClipBackbone | None = None

    def _load(self) -> None:
        self.backbone = load_clip_backbone(self.clip_model, self.clip_pretrained, self.device, self.dtype)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.backbone.embed_images(images)  # (B, D)
        txt = self.backbone.embed_texts(prompts)  # (B, D)
        return (img * txt).sum(dim=-1)
