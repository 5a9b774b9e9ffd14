"""``aesthetic``: the LAION aesthetic predictor v2 ("improved aesthetic predictor").

score = head(normalize(CLIP_image_embedding(image))), about 1-10 (SD 1.5 on simple animals: ~5.5-6).

- Backbone: open_clip ``ViT-L-14`` with the ``openai`` weights (options ``clip_model`` and
  ``clip_pretrained``, see ``clip_score``; shared with the ``clip`` reward).
- Head: ``Linear(768,1024) Dropout Linear(1024,128) Dropout Linear(128,64) Dropout Linear(64,16)
  Linear(16,1)``, no activations, so its state-dict keys are ``layers.{0,2,4,6,7}``; the weights are
  ``sac+logos+ava1-l14-linearMSE.pth`` (3.7 MB), trained with MSE on SAC, LOGOS and AVA ratings.
- Head weights: option ``aesthetic_head=PATH`` (CLI ``--aesthetic-head PATH``) for a local file;
  otherwise ``huggingface_hub.hf_hub_download(aesthetic_head_repo, aesthetic_head_file)``. The
  default is the public mirror ``camenduru/improved-aesthetic-predictor`` /
  ``sac+logos+ava1-l14-linearMSE.pth`` (the original file name, the mirror most used with
  ``hf_hub_download``); another is ``trl-lib/ddpo-aesthetic-predictor`` / ``aesthetic-model.pth``
  (the same weights under TRL's name). ``aesthetic_head='random'`` gives a seeded random head for
  benchmarks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from .base import Reward, hub_file
from .clip_score import DEFAULT_CLIP_MODEL, DEFAULT_CLIP_PRETRAINED, RANDOM, ClipBackbone, load_clip_backbone

DEFAULT_HEAD_REPO = "camenduru/improved-aesthetic-predictor"
DEFAULT_HEAD_FILE = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticHead(nn.Module):
    """The LAION v2 MLP head (an affine map in five layers).  # (B, D) -> (B,)"""

    def __init__(self, embed_dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


def resolve_head_file(aesthetic_head: str | os.PathLike | None, repo: str, filename: str) -> Path:
    """A local path to the head weights: ``aesthetic_head`` if given, else the hub download."""
    return hub_file(aesthetic_head, repo, filename, "the aesthetic head", "--aesthetic-head")


def read_head(path: Path) -> dict[str, torch.Tensor]:
    """The head's state dict from ``path``; ``UsageError`` if the file is not a LAION head."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--aesthetic-head {path}: not a torch state dict ({type(e).__name__})") from e
    shapes = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    in_dim = shapes.get("layers.0.weight", (0, 0))[-1]
    if not in_dim or shapes != {k: tuple(v.shape) for k, v in AestheticHead(in_dim).state_dict().items()}:
        raise UsageError(
            f"--aesthetic-head {path}: not a LAION aesthetic head "
            "(a state dict with layers.{0,2,4,6,7}.weight/bias, 768-1024-128-64-16-1)"
        )
    return state


def head_from_state(state: dict[str, torch.Tensor], embed_dim: int) -> AestheticHead:
    """An ``AestheticHead`` holding ``state``, checked against the backbone's embedding width."""
    in_dim = state["layers.0.weight"].shape[1]
    if in_dim != embed_dim:
        raise UsageError(
            f"the aesthetic head takes {in_dim}-d image embeddings but the CLIP model gives {embed_dim}-d "
            "(the LAION head needs --clip-model ViT-L-14 --clip-pretrained openai)"
        )
    head = AestheticHead(in_dim)
    head.load_state_dict(state)
    return head


def random_head(embed_dim: int, seed: int = 0) -> AestheticHead:
    """A head with seeded random weights (benchmarks: timing does not depend on weight values)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AestheticHead(embed_dim)


class AestheticReward(Reward):
    """LAION aesthetic score of each image (prompts unused).  # (B, 3, H, W) -> (B,)"""

    name = "aesthetic"
    units = "LAION aesthetic score, about 1-10"

    def __init__(
        self,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        clip_model: str = DEFAULT_CLIP_MODEL,
        clip_pretrained: str = DEFAULT_CLIP_PRETRAINED,
        aesthetic_head: str | os.PathLike | None = None,
        aesthetic_head_repo: str = DEFAULT_HEAD_REPO,
        aesthetic_head_file: str = DEFAULT_HEAD_FILE,
    ):
        super().__init__(device, dtype)
        self.clip_model, self.clip_pretrained = clip_model, clip_pretrained
        self.aesthetic_head = aesthetic_head
        self.head_repo, self.head_file = aesthetic_head_repo, aesthetic_head_file
        self.backbone: ClipBackbone | None = None
        self.head: AestheticHead | None = None

    def _load(self) -> None:
        # 1. Head first: 3.7 MB, and a missing or wrong one should fail before the 1.7 GB backbone.
        state = None
        if self.aesthetic_head != RANDOM:
            state = read_head(resolve_head_file(self.aesthetic_head, self.head_repo, self.head_file))
        # 2. Backbone (cached, shared with `clip`).
        self.backbone = load_clip_backbone(self.clip_model, self.clip_pretrained, self.device, self.dtype)
        # 3. Head in float32 (tiny; keeps the affine map exact) on the same device.
        dim = self.backbone.embed_dim
        head = random_head(dim) if state is None else head_from_state(state, dim)
        self.head = head.to(self.device).eval().requires_grad_(False)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self.head(self.backbone.embed_images(images))  # (B, D) -> (B,)
