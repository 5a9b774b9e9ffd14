"""A run's training state: captured, restored and saved exactly (the resume tests cover the files)."""

from __future__ import annotations

import random

import numpy as np
import torch
from test_recipe import small_config

from rebel_diffusion.training.checkpoint import capture_state, restore_state, rng_state, set_rng_state
from rebel_diffusion.training.recipe import setup, train_epoch


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_restore_puts_back_what_capture_took(tmp_path):
    run = setup(small_config(tmp_path / "run", ema_decay=0.5, normalization="per-prompt"))
    before = capture_state(run)
    train_epoch(run, 1)  # moves the weights, the optimizer, the tracker, the step count, the EMA
    after = capture_state(run)
    for key in ("weights", "optimizer", "tracker", "global_step", "ema"):
        assert not _equal(before[key], after[key]), key
    restore_state(run, before)
    again = capture_state(run)
    for key in ("weights", "optimizer", "lr_scheduler", "tracker", "global_step", "ema"):
        assert _equal(before[key], again[key]), key


def test_rng_state_round_trip():
    state = rng_state()
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
