"""Shared fixtures: the built-in tiny pipelines, each built once per test session.

They are shared by every test module: treat them as READ-ONLY. A test that changes weights,
adds a LoRA, swaps the scheduler or accumulates gradients must work on its own copy
(``rebel_diffusion.models.build_tiny_pipeline()`` or ``copy.deepcopy(pipe.unet)``); temporary
``monkeypatch`` changes are fine because they are undone after the test.

Tests run torch with one intra-op thread (``REBEL_TEST_THREADS`` overrides it); ``-n auto`` runs one
pytest-xdist worker per CPU instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from rebel_diffusion.models import load_pipeline
from rebel_diffusion.outputs import generation

# The tiny models gain nothing from intra-op threads, and on a shared, busy CPU two OpenMP threads
# per process run 10-30x slower than one (measured: a 4-image, 4-step sample 0.5 s vs 2-15 s).
TEST_THREADS = int(os.environ.get("REBEL_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)


@pytest.fixture(autouse=True)
def _test_threads(monkeypatch):
    """Commands run in tests keep the tests' thread count: their default (the CPUs idle at start)
    would take every CPU the suite leaves idle for a moment, and spin against the next test."""
    monkeypatch.setattr(generation, "default_num_threads", lambda local_processes=1: TEST_THREADS)


@pytest.fixture(scope="session")
def tiny_pipe():
    """``tiny``: SD-1.x-shaped, epsilon prediction, DDIM, 32x32 images (latents 4x8x8), fp32 CPU."""
    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def tiny_lcm_pipe():
    """``tiny-lcm``: LCMScheduler and a guidance-embedding UNet (``time_cond_proj_dim``), fp32 CPU."""
    return load_pipeline("tiny-lcm")


@pytest.fixture(scope="session")
def tiny_v_pipe():
    """``tiny-v``: as ``tiny`` with a v-prediction DDIM scheduler, fp32 CPU."""
    return load_pipeline("tiny-v")


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may run on (psutil's count, xdist's default, sees
    every core of the host, not the container's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pytest_collection_modifyitems(config, items):
    """Fast tests first, then the ones marked slow (end-to-end runs), so a failure shows early."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


@pytest.fixture(scope="session")
def tiny_sdxl_pipe():
    """``tiny-sdxl``: SDXL-shaped (two text encoders, pooled text and size conditioning), 32x32, fp32 CPU."""
    return load_pipeline("tiny-sdxl")


@pytest.fixture
def hub_offline(monkeypatch):
    """The model hub unreachable, as on a machine without internet (no request is attempted)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
