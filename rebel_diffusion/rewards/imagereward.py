"""``imagereward``: ImageReward (Xu et al. 2023), a human-preference score of an image for its prompt.

score = (mlp(BLIP_text_encoder(prompt, cross-attending to BLIP_ViT(image))[CLS]) - 0.1672) / 1.0333,
a standardised figure: 0 is the authors' mean over their training images, 1 one standard deviation;
higher is better. This is what the authors' ``ImageReward.score(prompt, image)`` returns:

- image: ``Resize(224, bicubic)``, ``CenterCrop(224)``, ``Normalize`` with CLIP's mean/std
  (``imagereward_preprocess``, done on the tensors by ``clip_score.clip_preprocess``);
- text: the ``bert-base-uncased`` WordPiece tokenizer with BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens
  added (vocabulary 30524), padded and truncated to 35 tokens;
- BLIP's ViT-L/16 (224 px, width 1024, 24 layers, 16 heads) embeds the image; BLIP's BERT-base text
  encoder (12 layers, with cross-attention to the 1024-wide image tokens) reads the prompt; the
  [CLS] output goes through ``Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64)
  Dropout Linear(64,16) Linear(16,1)`` (``mlp.layers.{0,2,4,6,7}``; the same head as the LAION
  aesthetic predictor's, ``aesthetic.AestheticHead``), then is standardised.

Weights: ``ImageReward.pt`` (1.7 GB) from the hub repo ``THUDM/ImageReward``
(``huggingface_hub.hf_hub_download``), or a local copy: ``checkpoint=PATH`` (CLI
``--imagereward-checkpoint PATH``), the file or a folder holding it. The tokenizer is
``google-bert/bert-base-uncased`` from the hub, or ``tokenizer=`` a local folder; a checkpoint folder
that also holds ``vocab.txt`` is used as the tokenizer folder first. Offline::

    hf download THUDM/ImageReward ImageReward.pt --local-dir DIR
    hf download google-bert/bert-base-uncased vocab.txt tokenizer_config.json --local-dir DIR
    ... --imagereward-checkpoint DIR

The checkpoint is the authors' ``state_dict`` (their ``ImageReward`` module, keys ``blip.*`` and
``mlp.*``). It is loaded into transformers' BLIP (``BlipVisionModel``, ``BlipTextModel`` without
pooler), not into the authors' package (its last release, 2023, does not run on transformers 5), with
the key map of ``checkpoint_to_blip``: the text encoder's names are the same in both (BLIP's
``med.py`` is the origin of ``BlipTextModel``); the ViT's timm names are renamed (``VISION_KEY_MAP``).
Both computations are the same operations: BLIP's ViT ends with its final LayerNorm on every token,
as ``BlipVisionModel``'s ``last_hidden_state`` does with ``post_layernorm``; both use exact (erf) GELU,
LayerNorm eps 1e-6 in the ViT and 1e-12 in BERT, and 1/sqrt(head_dim) attention scaling. The one
difference is the value added at padded text positions (BLIP -10000, transformers the dtype's minimum):
both give those positions zero attention weight.

``checkpoint='random'``: the published architecture with seeded random weights and a stand-in
tokenizer of the same vocabulary size (benchmarks only: the scores mean nothing).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .aesthetic import AestheticHead
from .base import Reward, hub_file, short_cause
from .clip_score import RANDOM, clip_preprocess

DEFAULT_REPO = "THUDM/ImageReward"
DEFAULT_FILE = "ImageReward.pt"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"

# From the authors' ImageReward.py.
IMAGE_SIZE = 224
MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's, in ImageReward's _transform
STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35  # tokenizer(prompt, padding="max_length", truncation=True, max_length=35)
REWARD_MEAN = 0.16717362830052426  # reward = (mlp(feature) - mean) / std
REWARD_STD = 1.0333394966054072

# Prefixes of the authors' state dict; everything else (blip.vision_proj, blip.text_proj) is unused.
VISION_PREFIX = "blip.visual_encoder."
TEXT_PREFIX = "blip.text_encoder."
MLP_PREFIX = "mlp."

# BLIP's ViT (timm names) -> transformers' BlipVisionModel, "{i}" a block index. A pattern ending in
# "." renames a prefix (the rest of the key, "weight" / "bias", is kept); the others are whole keys.
VISION_KEY_MAP = (
    ("cls_token", "embeddings.class_embedding"),  # (1, 1, D)
    ("pos_embed", "embeddings.position_embedding"),  # (1, 1 + N, D)
    ("patch_embed.proj.", "embeddings.patch_embedding."),  # Conv2d(3, D, P, stride=P)
    ("blocks.{i}.norm1.", "encoder.layers.{i}.layer_norm1."),
    ("blocks.{i}.attn.qkv.", "encoder.layers.{i}.self_attn.qkv."),  # (3D, D), same q/k/v/head layout
    ("blocks.{i}.attn.proj.", "encoder.layers.{i}.self_attn.projection."),
    ("blocks.{i}.norm2.", "encoder.layers.{i}.layer_norm2."),
    ("blocks.{i}.mlp.", "encoder.layers.{i}.mlp."),  # fc1, fc2 in both
    ("norm.", "post_layernorm."),  # the ViT's final norm
)
# The text encoder's keys are the same in both, but for this buffer (persistent in BLIP's med.py, an
# arange; transformers rebuilds it).
TEXT_SKIPPED = ("embeddings.position_ids",)


@dataclass(frozen=True)
class ImageRewardConfig:
    """Architecture sizes; the defaults are the published ImageReward's (med_config.json, ViT-L)."""

    image_size: int = IMAGE_SIZE
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    vision_intermediate: int = 4096  # mlp_ratio 4
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524  # bert-base-uncased's 30522 + [DEC] + [ENC]
    max_positions: int = 512


# ----------------------------------------------------------------------------------------------
# Preprocessing and tokens


def imagereward_preprocess(
    images: torch.Tensor, size: int = IMAGE_SIZE, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """ImageReward's image transform on tensors in [0, 1].  # (B, 3, H, W) -> (B, 3, 224, 224)"""
    return clip_preprocess(images, size, MEAN, STD, interpolation="bicubic", resize_mode="shortest", dtype=dtype)


def load_tokenizer(source: str | os.PathLike):
    """BLIP's tokenizer: BERT's from ``source`` (hub id or folder) plus ``[DEC]`` (bos) and ``[ENC]``."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(source))
    # As BLIP's init_tokenizer: ids 30522 and 30523 on bert-base-uncased (vocabulary 30524).
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def tokenize_prompts(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask, as ImageReward tokenises.  # U prompts -> (U, 35), (U, 35)"""
    out = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return out["input_ids"], out["attention_mask"]


# ----------------------------------------------------------------------------------------------
# Key map


def _compile(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)")
    return re.compile("^" + body + ("" if pattern.endswith(".") else "$"))


_VISION_RULES = tuple((_compile(src), src, dst) for src, dst in VISION_KEY_MAP)
_VISION_INVERSE = tuple((_compile(dst), dst, src) for src, dst in VISION_KEY_MAP)


def _rename(key: str, rules) -> str | None:
    for pattern, _, dst in rules:
        m = pattern.match(key)
        if m:
            return dst.replace("{i}", m.groupdict().get("i") or "") + key[m.end() :]
    return None


def checkpoint_to_blip(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """Split and rename the authors' state dict: ``(vision_state, text_state, mlp_state)``.

    ``vision_state``: keys of ``BlipVisionModel`` (``VISION_KEY_MAP``; a ViT key the map does not know
    is kept under its own name, so loading reports it as unexpected); ``text_state``: keys of
    ``BlipTextModel(add_pooling_layer=False)`` (the same names, ``embeddings.position_ids`` dropped);
    ``mlp_state``: keys of ``AestheticHead`` (``layers.{0,2,4,6,7}.weight/bias``). Keys outside
    ``blip.visual_encoder.``, ``blip.text_encoder.`` and ``mlp.`` are not used by the score and
    dropped.
    """
    vision, text, mlp = {}, {}, {}
    for key, value in state_dict.items():
        if key.startswith(VISION_PREFIX):
            name = key[len(VISION_PREFIX) :]
            vision[_rename(name, _VISION_RULES) or name] = value
        elif key.startswith(TEXT_PREFIX):
            name = key[len(TEXT_PREFIX) :]
            if name not in TEXT_SKIPPED:
                text[name] = value
        elif key.startswith(MLP_PREFIX):
            mlp[key[len(MLP_PREFIX) :]] = value
    return vision, text, mlp


def _checkpoint_name(part: str, key: str) -> str:
    """The authors' name of a target key, for error messages."""
    if part == "vision":
        return VISION_PREFIX + (_rename(key, _VISION_INVERSE) or key)
    return (TEXT_PREFIX if part == "text" else MLP_PREFIX) + key


def _check_keys(part: str, state: dict, expected: dict[str, torch.Size], path: Path) -> None:
    """``UsageError`` (one line) unless ``state`` fills exactly the target model's keys and shapes."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{_checkpoint_name(part, k)} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    for what, names in (
        ("missing", [_checkpoint_name(part, k) for k in missing]),
        ("unexpected", [_checkpoint_name(part, k) for k in unexpected]),
        ("wrong shape", shapes),
    ):
        if names:
            more = f" and {len(names) - 5} more" if len(names) > 5 else ""
            problems.append(f"{what} {', '.join(names[:5])}{more}")
    if problems:
        raise UsageError(
            f"--imagereward-checkpoint {path}: not an ImageReward checkpoint of the expected architecture "
            f"({'; '.join(problems)})"
        )


# ----------------------------------------------------------------------------------------------
# Files


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> Path:
    """A local path to ``ImageReward.pt``: ``checkpoint`` (file or folder), else the hub download."""
    also = f"; its tokenizer is bert-base-uncased: hf download {DEFAULT_TOKENIZER}"
    return hub_file(
        checkpoint, DEFAULT_REPO, DEFAULT_FILE, "the ImageReward checkpoint", "--imagereward-checkpoint", also
    )


def _load_tokenizer_from(source: str | os.PathLike, vocab_size: int):
    """``load_tokenizer(source)``, checked to be the text encoder's vocabulary; one-line errors."""
    local = Path(source).expanduser().is_dir()
    where = f"{'the folder' if local else 'the hub repo'} {source}"
    advice = (
        f"download it where the hub is reachable (hf download {DEFAULT_TOKENIZER} vocab.txt "
        "tokenizer_config.json --local-dir DIR) and put its files next to ImageReward.pt, in the folder "
        "given to --imagereward-checkpoint"
    )
    try:
        tokenizer = load_tokenizer(Path(source).expanduser() if local else source)
    except Exception as e:
        raise UsageError(
            f"could not load the ImageReward tokenizer (bert-base-uncased) from {where} ({short_cause(e)}); {advice}"
        ) from e
    # transformers 5 builds an empty-vocabulary BertTokenizer, without an error, from a folder or hub id
    # that has no vocab.txt (an unreachable hub included): every word would be [UNK].
    if len(tokenizer) != vocab_size:
        raise UsageError(
            f"the ImageReward tokenizer from {where} has {len(tokenizer)} tokens, the text encoder "
            f"{vocab_size}: it is not bert-base-uncased's, or its vocab.txt was not found; {advice}"
        )
    return tokenizer


def stand_in_tokenizer(vocab_size: int):
    """A BERT tokenizer of ``vocab_size`` tokens with BLIP's additions, no file needed (random weights)."""
    from transformers import BertTokenizer

    special = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    vocab = {t: i for i, t in enumerate(special)}
    vocab.update({f"token{i}": len(special) + i for i in range(vocab_size - 2 - len(special))})
    tokenizer = BertTokenizer(vocab=vocab)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The authors' state dict from ``path``; ``UsageError`` if it is not one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--imagereward-checkpoint {path}: not a torch state dict ({short_cause(e)})") from e
    if not isinstance(state, dict) or not any(str(k).startswith(VISION_PREFIX) for k in state):
        raise UsageError(
            f"--imagereward-checkpoint {path}: not an ImageReward checkpoint "
            f"(a state dict with {VISION_PREFIX}*, {TEXT_PREFIX}* and {MLP_PREFIX}layers.*)"
        )
    return state


# ----------------------------------------------------------------------------------------------
# Models


def blip_configs(config: ImageRewardConfig):
    """transformers' ``(BlipVisionConfig, BlipTextConfig)`` for these sizes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    vision = BlipVisionConfig(
        hidden_size=config.vision_width,
        intermediate_size=config.vision_intermediate,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        hidden_act="gelu",  # exact GELU, as BLIP's nn.GELU()
        layer_norm_eps=1e-6,  # BLIP's ViT: partial(nn.LayerNorm, eps=1e-6)
        attention_dropout=0.0,
    )
    text = BlipTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.text_width,
        encoder_hidden_size=config.vision_width,  # BLIP sets encoder_width = vision_width
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        max_position_embeddings=config.max_positions,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
        bos_token_id=None,  # no generation here; the defaults name ids of the full vocabulary
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward(is_decoder=False) keeps attention bidirectional
        use_cache=False,
        # BlipTextSelfAttention adds the mask to its scores: it needs eager's additive float mask.
        attn_implementation="eager",
    )
    return vision, text


def _build(model_cls, cfg, state: dict, part: str, path: Path, device, dtype, **kwargs):
    """``model_cls(cfg)`` holding ``state``, built on the meta device (no random init of 400M weights)."""
    with torch.device("meta"):
        model = model_cls(cfg, **kwargs)
    _check_keys(part, state, {k: v.shape for k, v in model.state_dict().items()}, path)
    model.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers are not in any state dict: rebuild the one BlipTextModel has.
    if hasattr(model, "embeddings") and hasattr(model.embeddings, "position_ids"):
        model.embeddings.position_ids = torch.arange(cfg.max_position_embeddings).expand((1, -1))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"ImageReward: {part} tensors left unloaded: {left[:5]}")
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Reward


class ImageRewardReward(Reward):
    """ImageReward of each image for its prompt.  # (B, 3, H, W), B prompts -> (B,)"""

    name = "imagereward"
    units = "ImageReward, standardised (0 = the authors' mean, 1 = one std)"

    def __init__(
        self,
        device=None,
        dtype: torch.dtype | str | None = None,
        checkpoint: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        config: ImageRewardConfig | None = None,
    ):
        super().__init__(device, dtype)
        self.checkpoint, self.tokenizer_source = checkpoint, tokenizer
        self.config = config or ImageRewardConfig()
        self.tokenizer = None
        self.vision = None  # BlipVisionModel
        self.text = None  # BlipTextModel(add_pooling_layer=False)
        self.head: AestheticHead | None = None

    def _load(self) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        if self.checkpoint == RANDOM:
            vision_cfg, text_cfg = blip_configs(self.config)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                models = BlipVisionModel(vision_cfg), BlipTextModel(text_cfg, add_pooling_layer=False)
                head = AestheticHead(self.config.text_width)
            self.vision, self.text = (m.to(self.device, self.dtype).eval().requires_grad_(False) for m in models)
            self.head = head.to(self.device).eval().requires_grad_(False)
            self.tokenizer = stand_in_tokenizer(self.config.vocab_size)
            return
        # 1. Files: the checkpoint first (the hub error names the tokenizer too), then the tokenizer.
        path = resolve_checkpoint(self.checkpoint)
        source = self.tokenizer_source
        if source is None:
            source = path.parent if (path.parent / "vocab.txt").is_file() else DEFAULT_TOKENIZER
        tokenizer = _load_tokenizer_from(source, self.config.vocab_size)
        # 2. Weights, renamed to transformers' BLIP and checked key for key before anything is built.
        vision_state, text_state, mlp_state = checkpoint_to_blip(read_checkpoint(path))
        vision_cfg, text_cfg = blip_configs(self.config)
        self.vision = _build(BlipVisionModel, vision_cfg, vision_state, "vision", path, self.device, self.dtype)
        self.text = _build(
            BlipTextModel, text_cfg, text_state, "text", path, self.device, self.dtype, add_pooling_layer=False
        )
        # 3. Head in float32, as the authors (.float() before the mlp); tiny.
        head = AestheticHead(self.config.text_width)
        _check_keys("mlp", mlp_state, {k: v.shape for k, v in head.state_dict().items()}, path)
        head.load_state_dict(mlp_state)
        self.head = head.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The text encoder's [CLS] output, float32.  # (B, 3, H, W), B prompts -> (B, text_width)"""
        x = imagereward_preprocess(images, self.config.image_size, self.dtype)  # (B, 3, 224, 224)
        image_embeds = self.vision(pixel_values=x).last_hidden_state  # (B, 1 + N, Dv), after the final norm
        # Each distinct prompt tokenised once (RL batches repeat prompts), then one row per image.
        unique = list(dict.fromkeys(prompts))
        ids, mask = tokenize_prompts(self.tokenizer, unique)  # (U, 35)
        index = torch.tensor([unique.index(p) for p in prompts])
        ids, mask = ids[index].to(self.device), mask[index].to(self.device)  # (B, 35)
        image_atts = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device)  # (B, 1 + N)
        out = self.text(
            input_ids=ids,
            attention_mask=mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,  # BLIP's text *encoder*: bidirectional self-attention
        )
        return out.last_hidden_state[:, 0, :].float()  # (B, Dt)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        reward = self.head(self.features(images, prompts))  # (B,)
        return (reward - REWARD_MEAN) / REWARD_STD
