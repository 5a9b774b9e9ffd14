"""``pickscore``: PickScore (Kirstain et al. 2023), how much people prefer an image for its prompt.

score = logit_scale.exp() * cos(image embedding, prompt embedding) of a CLIP ViT-H/14 fine-tuned on
Pick-a-Pic's human choices: exactly the authors' inference code (transformers ``CLIPModel``, the
logit scale is about 100). About 18-24 (SD 1.5 about 20.6, SDXL about 21.7 on Pick-a-Pic prompts).

- Model: ``yuvalkirstain/PickScore_v1`` (transformers format), or a local copy: option
  ``pickscore_model`` (CLI ``--pickscore-model DIR``, the folder ``hf download
  yuvalkirstain/PickScore_v1 --local-dir DIR`` leaves).
- Processor (tokenizer and image settings): the authors use
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s; a local model folder that also holds
  ``preprocessor_config.json`` and the tokenizer files is used for both.
- Preprocessing: the processor's ``Resize`` of the short side (bicubic), ``CenterCrop``, mean and
  std, on the batch of tensors (``clip_score.clip_preprocess``) rather than per PIL image.
- Text: padded and truncated to 77 tokens, as the authors do.
- ``pickscore_model='random'``: CLIP ViT-H/14's architecture with seeded random weights and CLIP's
  own tokenizer (built from open_clip's copy of its vocabulary): benchmarks only, the scores mean
  nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .base import Reward, short_cause
from .clip_score import RANDOM, clip_preprocess

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FLAG = "--pickscore-model"
_BICUBIC = 3  # PIL.Image.BICUBIC, the processor's ``resample``
# CLIP ViT-H/14 (laion2B-s32B-b79K, PickScore_v1) in transformers' terms, for random weights.
CLIP_H = {
    "text_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
    },
    "projection_dim": 1024,
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_bpe_tokenizer():
    """transformers' ``CLIPTokenizer`` with CLIP's vocabulary, from the copy open_clip ships (offline)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # open_clip's -> OpenAI's
    vocab = {names.get(token, token): i for token, i in bpe.encoder.items()}
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _source(name: str | os.PathLike) -> str:
    path = Path(name).expanduser()
    return str(path) if path.exists() else str(name)


def _processor_source(model: str, processor: str | None) -> str:
    if processor is not None:
        return _source(processor)
    folder = Path(model)
    if folder.is_dir() and (folder / "preprocessor_config.json").is_file():
        return str(folder)
    return DEFAULT_PROCESSOR


def _load(what: str, loader, source: str, **kwargs):
    try:
        return loader.from_pretrained(source, **kwargs)
    except Exception as e:  # offline, no such repo, not a CLIP folder: one line
        local = Path(source).exists()
        fix = (
            f"is it a transformers {what} folder?"
            if local
            else f"download it where the hub is reachable (hf download {source} --local-dir DIR) and pass "
            f"{FLAG} DIR (with the processor files of {DEFAULT_PROCESSOR} in the same folder)"
        )
        raise UsageError(f"could not load the PickScore {what} from {source} ({short_cause(e)}); {fix}") from e


class PickScoreReward(Reward):
    """PickScore of each image for its prompt.  # (B, 3, H, W), B prompts -> (B,), about 18-24"""

    name = "pickscore"
    units = "PickScore, 100 x cosine of image and prompt embeddings, about 18-24"

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        model: str | os.PathLike | None = None,
        processor: str | os.PathLike | None = None,
    ):
        super().__init__(device, dtype)
        self.model_name = DEFAULT_MODEL if model is None else RANDOM if model == RANDOM else _source(model)
        self.processor_name = None if model == RANDOM else _processor_source(self.model_name, processor)
        self.model = self.tokenizer = self.image_cfg = None

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

        if self.model_name == RANDOM:
            self.tokenizer = clip_bpe_tokenizer()
            self.image_cfg = {"size": 224, "crop": 224, "mean": OPENAI_MEAN, "std": OPENAI_STD}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = CLIPModel(CLIPConfig(**CLIP_H, logit_scale_init_value=4.6052))  # exp = 100
            self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
            return
        # 1. Processor first: small, and a missing one should fail before the 3.9 GB model.
        image_processor = _load("processor", CLIPImageProcessor, self.processor_name)
        self.tokenizer = _load("tokenizer", AutoTokenizer, self.processor_name)
        size, crop = image_processor.size, image_processor.crop_size
        if size.shortest_edge is None or image_processor.resample != _BICUBIC:
            raise UsageError(
                f"the PickScore processor {self.processor_name}: expected a bicubic resize of the short side"
            )
        self.image_cfg = {
            "size": int(size.shortest_edge),
            "crop": int(crop.height),
            "mean": tuple(image_processor.image_mean),
            "std": tuple(image_processor.image_std),
        }
        # 2. The model, in the reward's dtype.
        model = _load("model", CLIPModel, self.model_name, dtype=self.dtype)
        self.model = model.to(self.device).eval().requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cfg = self.image_cfg
        pixels = clip_preprocess(images, cfg["size"], cfg["mean"], cfg["std"], crop=cfg["crop"], dtype=self.dtype)
        img = self.model.get_image_features(pixel_values=pixels).pooler_output  # (B, D)
        unique = list(dict.fromkeys(prompts))  # groups repeat prompts: encode each once
        tokens = self.tokenizer(unique, padding=True, truncation=True, max_length=77, return_tensors="pt")
        txt = self.model.get_text_features(**tokens.to(self.device)).pooler_output  # (U, D)
        txt = txt[torch.tensor([unique.index(p) for p in prompts], device=txt.device)]  # (B, D)
        cos = (F.normalize(img.float(), dim=-1) * F.normalize(txt.float(), dim=-1)).sum(dim=-1)
        return self.model.logit_scale.float().exp() * cos
