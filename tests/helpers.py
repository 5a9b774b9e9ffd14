"""Small helpers several test files share."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def smooth_images(b: int = 3, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """Photo-like test images: upsampled noise plus grain.  # (B, 3, H, W) in [0, 1]"""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(h, w), mode="bicubic", align_corners=False)
    return (x + 0.05 * torch.randn(b, 3, h, w, generator=g)).clamp(0, 1)


def one_line(e: pytest.ExceptionInfo) -> str:
    """The message of a raised error, checked to be one line without a traceback."""
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def train_quick_start(job: tuple[int, str]) -> str:
    """Train ``--preset toy`` with seed ``job[0]`` into ``job[1]`` (a module-level worker for spawned processes).

    Less its per-epoch grid and held-out evaluation: they sample with their own fixed seeds and leave
    training's random streams alone (the LoRA is bit-identical with them).
    """
    from rebel_diffusion.config import PRESETS, TrainConfig
    from rebel_diffusion.training.recipe import train

    seed, out = job
    cfg = TrainConfig(**PRESETS["toy"], seed=seed, output_dir=out)
    cfg.grid_num_images, cfg.heldout_every = 1, 0
    cfg.num_threads = 1  # two of these share a 2-core machine: the idle CPUs at start would oversubscribe it
    train(cfg)
    return out
