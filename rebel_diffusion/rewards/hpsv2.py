"""``hpsv2``: Human Preference Score v2.1 (Wu et al. 2023), how much people prefer an image for its prompt.

score = cos(image embedding, prompt embedding) of an open_clip ViT-H-14 fine-tuned on HPDv2's human
choices, exactly the authors' ``hpsv2.score`` (``image_features @ text_features.T``, both
L2-normalised, the diagonal). About 0.2-0.35; papers report it x100 (SD 1.5 about 24, SDXL about 26
on Pick-a-Pic prompts at 20 steps).

- Architecture: open_clip's ``ViT-H-14``, built with random weights and then filled from the
  checkpoint, which holds the whole model (no LAION weights are downloaded).
- Weights: ``HPS_v2.1_compressed.pt`` from the hub repo ``xswu/HPSv2`` (``{"state_dict": ...}``, 1.9
  GB), or a local copy: option ``hpsv2_checkpoint`` (CLI ``--hpsv2-checkpoint PATH``, the file or
  the folder ``hf download xswu/HPSv2 HPS_v2.1_compressed.pt --local-dir DIR`` leaves).
- Preprocessing: the authors' evaluation transform, ``Resize(224, bicubic)`` of the short side,
  ``CenterCrop(224)``, OpenAI CLIP's mean and std: ``clip_score.clip_preprocess`` on the batch.
- Text: open_clip's CLIP tokenizer, 77 tokens.
- ``hpsv2_checkpoint='random'``: ViT-H-14 with open_clip's seeded random weights: benchmarks only.
"""

from __future__ import annotations

import logging
import os

import torch

from ..errors import UsageError
from .base import Reward, hub_file, short_cause
from .clip_score import RANDOM, ClipBackbone

DEFAULT_REPO = "xswu/HPSv2"
DEFAULT_FILE = "HPS_v2.1_compressed.pt"
ARCHITECTURE = "ViT-H-14"
FLAG = "--hpsv2-checkpoint"


def load_hps_backbone(
    checkpoint: str | os.PathLike | None, clip_model: str, device: torch.device, dtype: torch.dtype
) -> ClipBackbone:
    """The open_clip ``clip_model`` holding an HPS checkpoint (None: random), in eval mode on ``device``."""
    import open_clip

    if open_clip.get_model_config(clip_model) is None:
        raise UsageError(f"hpsv2: {clip_model} is not an open_clip model")
    logging.disable(logging.WARNING)  # open_clip's "initialized randomly": the checkpoint comes next
    try:
        model = open_clip.create_model(clip_model, pretrained=None, device="cpu")
    finally:
        logging.disable(logging.NOTSET)
    try:
        # Handles {"state_dict": ...} and a "module." prefix; strict: every weight must come from the file.
        if checkpoint is not None:
            open_clip.load_checkpoint(model, str(checkpoint))
    except Exception as e:
        raise UsageError(
            f"{FLAG} {checkpoint}: not an HPSv2 checkpoint of open_clip {clip_model} ({short_cause(e)}); "
            f"use {DEFAULT_FILE} from the hub repo {DEFAULT_REPO}"
        ) from e
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    tokenizer = open_clip.get_tokenizer(clip_model)
    return ClipBackbone(model, tokenizer, preprocess_cfg, dtype, int(model.visual.output_dim))


class HpsV2Reward(Reward):
    """HPSv2.1 of each image for its prompt.  # (B, 3, H, W), B prompts -> (B,), about 0.2-0.35"""

    name = "hpsv2"
    units = "HPSv2.1, cosine of image and prompt embeddings, about 0.2-0.35 (papers: x100)"

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        checkpoint: str | os.PathLike | None = None,
        clip_model: str = ARCHITECTURE,
    ):
        super().__init__(device, dtype)
        self.checkpoint, self.clip_model = checkpoint, clip_model
        self.backbone: ClipBackbone | None = None

    def _load(self) -> None:
        if self.checkpoint == RANDOM:
            self.backbone = load_hps_backbone(None, self.clip_model, self.device, self.dtype)
            return
        path = hub_file(self.checkpoint, DEFAULT_REPO, DEFAULT_FILE, "the HPSv2.1 checkpoint", FLAG)
        self.backbone = load_hps_backbone(path, self.clip_model, self.device, self.dtype)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img = self.backbone.embed_images(images)  # (B, D), normalised
        txt = self.backbone.embed_texts(prompts)  # (B, D), normalised
        return (img * txt).sum(dim=-1)
