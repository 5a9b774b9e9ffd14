"""The pieces the recipe's setup assembles, and its checks before any write."""

from __future__ import annotations

import pytest

from rebel_diffusion.config import TrainConfig
from rebel_diffusion.errors import UsageError
from rebel_diffusion.prompts_io import load_prompts
from rebel_diffusion.rewards import WEIGHT_OPTIONS
from rebel_diffusion.training.builders import (
    check_kl_prompts,
    check_tracker,
    resolve_mixed_precision,
    resolve_progress,
    resolve_steps_per_pass,
    reward_weights,
)


def test_steps_per_pass_default_depends_on_the_device():
    assert resolve_steps_per_pass(None, "cpu") == 10  # CPUs: per-call overhead dominates
    assert resolve_steps_per_pass(None, "cuda:0") == 1  # GPUs: memory limits, as the peers' micro-batches
    assert resolve_steps_per_pass(4, "cuda") == resolve_steps_per_pass(4, "cpu") == 4


def test_progress_is_bars_on_a_terminal_and_lines_in_a_file(monkeypatch):
    import sys

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert resolve_progress("auto") == "bar"
    monkeypatch.setenv("TQDM_DISABLE", "1")  # tqdm's own switch: no bars, the lines instead
    assert resolve_progress("auto") == "lines"
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert resolve_progress("auto") == "lines"
    assert resolve_progress("none") == "none" and resolve_progress("bar") == "bar"


def test_mixed_precision_auto_is_off_without_a_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_mixed_precision("auto") == "no"
    assert resolve_mixed_precision("fp16") == "fp16"


def test_every_reward_weights_option_is_a_field_and_reaches_the_rewards():
    cfg = TrainConfig(**{name: f"/weights/{name}" for name in WEIGHT_OPTIONS})
    assert reward_weights(cfg) == {name: f"/weights/{name}" for name in WEIGHT_OPTIONS}


def test_a_tracker_that_is_not_installed_is_one_line(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UsageError, match="pip install wandb"):
        check_tracker("wandb")
    check_tracker("none")


def test_kl_prompts_cover_some_training_prompts_or_stop_the_run():
    prompts = load_prompts("toy_novel_contrast")
    cfg = TrainConfig(prompts="toy_novel_contrast", kl_coef=0.1, kl_prompts="toy_shapes")
    covered = check_kl_prompts(cfg, prompts)
    known = set(load_prompts("toy_shapes"))
    assert covered == known  # the set itself; the trainer asks each image's prompt
    assert 0 < sum(p in covered for p in prompts) < len(prompts)  # the contrasts, not the novel ones
    assert check_kl_prompts(TrainConfig(prompts="toy_novel_contrast", kl_coef=0.1), prompts) is None
    with pytest.raises(UsageError, match="none of its prompts is among the 33 training prompts"):
        check_kl_prompts(
            TrainConfig(prompts="toy_novel_contrast", kl_coef=0.1, kl_prompts="toy_novel_heldout"), prompts
        )
