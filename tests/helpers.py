"""Small helpers several test files share."""

from __future__ import annotations

import contextlib
import logging

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


@contextlib.contextmanager
def diffusers_log():
    """The messages diffusers logs inside the block (its logger does not propagate to pytest's)."""
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        yield messages
    finally:
        root.removeHandler(handler)


def run_job(job: tuple) -> dict:
    """``(worker, argument)`` -> ``worker(argument)``: one process pool runs several module-level workers."""
    worker, argument = job
    return worker(argument)


QUICK_START_SEEDS = {"novel": 16, "novel_heldout": 16, "known": 2}  # fresh seeds a caption, from 20,000


def train_and_read_quick_start(job: tuple[int, str]) -> dict:
    """Train ``--preset toy`` with seed ``job[0]`` into ``job[1]``, then read its prompt following on
    seeds 20,000 and up, which neither training nor the grid nor the held-out evaluation uses (a
    module-level worker for spawned processes; one thread: four runs share a 2-core machine):
    {"seed", "settings" (the sampler's, as text), "readings" (``toy_following.tuned_readings``)}.

    Less its per-epoch grid, held-out evaluation and reward-curve plot: the first two sample with
    their own fixed seeds and leave training's random streams alone (the LoRA is bit-identical with
    them), the plot only reads the metrics. 16 seeds a novel caption (256 images a set, a rate's
    noise about 0.02), 2 a known caption (384 images). The base is read once for all seeds
    (``read_quick_start_base``).
    """
    from benchmarks import toy_following
    from rebel_diffusion.config import PRESETS, TrainConfig
    from rebel_diffusion.outputs import report
    from rebel_diffusion.outputs.generation import resolve_source
    from rebel_diffusion.sampling import settings_from_config
    from rebel_diffusion.training.recipe import train

    seed, out = job
    cfg = TrainConfig(**PRESETS["toy"], seed=seed, output_dir=out)
    cfg.grid_num_images, cfg.heldout_every = 1, 0
    report.plot_reward_curve = lambda metrics, path: None  # this spawned process's own module
    cfg.num_threads = 1  # the idle CPUs at start would oversubscribe the machine the runs share
    train(cfg)
    readings = {}
    for name, seeds in QUICK_START_SEEDS.items():
        sets = {name: toy_following.SETS[name]}
        readings.update(toy_following.tuned_readings(out, seeds=seeds, first_seed=20_000, sets=sets))
    settings = repr(settings_from_config(resolve_source(out).config))
    return {"seed": seed, "settings": settings, "readings": readings}


def read_quick_start_base(_=None) -> dict:
    """The toy base model's prompt following with ``--preset toy``'s sampler on the seeds of
    ``train_and_read_quick_start``: {"settings", "readings"} (a module-level worker, one thread)."""
    import torch

    from benchmarks import toy_following
    from rebel_diffusion.config import PRESETS, TrainConfig
    from rebel_diffusion.sampling import settings_from_config

    torch.set_num_threads(1)
    cfg = TrainConfig(**PRESETS["toy"])
    settings = settings_from_config(cfg)
    readings = {}
    for name, seeds in QUICK_START_SEEDS.items():
        sets = {name: toy_following.SETS[name]}
        readings.update(toy_following.base_readings(cfg.model, cfg.vae, settings, seeds, 20_000, sets))
    return {"settings": repr(settings), "readings": readings}


def train_saturated(out: str) -> list[dict]:
    """Train ``--preset toy-alignment-saturated`` into ``out`` with a held-out evaluation (toy-alignment
    and JPEG, 2 images a caption) before and after; its metrics records (a module-level worker for
    spawned processes, one thread)."""
    from pathlib import Path

    from rebel_diffusion.config import PRESETS, TrainConfig
    from rebel_diffusion.outputs.report import read_metrics
    from rebel_diffusion.training.recipe import train

    cfg = TrainConfig(**PRESETS["toy-alignment-saturated"], output_dir=out)
    cfg.heldout_every = cfg.epochs
    cfg.heldout_rewards = "jpeg-compressibility,toy-alignment"
    cfg.heldout_images = 2
    cfg.heldout_diversity = "none"
    cfg.num_threads = 1
    cfg.validate()
    train(cfg)
    return read_metrics(Path(out) / "metrics.jsonl")
