"""Learning on the toy testbed, measured as a user would: on held-out captions (never trained on)
and seeds no training batch uses, with prompt following checked beside the trained reward, so that
plain drift cannot pass.

- ``--preset toy`` (the quick start): prompt following at guidance 1 on the 16 combinations the toy
  model never saw (``prompts/toy_novel.txt``, trained in the mix ``toy_novel_contrast``; shape,
  colour and background all right, read from fresh seeds' pixels by the toy classifier and by a
  reader without learned weights, ``benchmarks.toy_following``) rises from about 0.8, and neither
  the 192 known captions nor the 16 other never-seen combinations (``toy_novel_heldout``), never
  trained on, fall by more than 0.03. The target for the trained combinations is higher (0.90 by
  both readers): measured on seeds 0-2, 0.88-0.90 by the classifier, 0.88 by the pixels
  (docs/tuning.md).

Noise of a held-out figure (std of the mean over disjoint seed sets, 32 captions x 2 seeds, 64
images): toy-alignment 0.013 at guidance 3.

- ``--preset toy-alignment-saturated``: toy-alignment, already 0.95, does not fall by more than two
  noise deviations (30 epochs, 3 seeds: +0.025, +0.028, +0.001).

The JPEG preset's target (a held-out gain with prompt following kept) is judged by
``benchmarks.frontier`` and the 60-epoch sweeps (docs/tuning.md), not here: it is not met on every
seed, and a test that is expected to fail cannot fail.
"""

import pytest
from helpers import train_and_measure_quick_start

from benchmarks.learning import run_jobs
from rebel_diffusion.config import PRESETS, TrainConfig
from rebel_diffusion.outputs.report import read_metrics
from rebel_diffusion.training.recipe import train

ALIGNMENT_NOISE = 0.013


def run_preset(name: str, out) -> tuple[dict, dict]:
    """Train a preset with a held-out evaluation before and after; (base, final) metrics records."""
    cfg = TrainConfig(**PRESETS[name])
    cfg.output_dir = str(out)
    cfg.heldout_every = cfg.epochs
    cfg.heldout_rewards = "jpeg-compressibility,toy-alignment"
    cfg.heldout_images = 2
    cfg.heldout_diversity = "none"
    cfg.validate()
    train(cfg)
    metrics = read_metrics(out / "metrics.jsonl")
    assert all(m["loss"] == m["loss"] for m in metrics[1:])  # finite throughout
    evaluated = [m for m in metrics if "heldout/toy-alignment" in m]
    assert [m["epoch"] for m in evaluated] == [0, cfg.epochs]
    return evaluated[0], evaluated[-1]


@pytest.fixture(scope="module")
def quick_start_runs(tmp_path_factory) -> dict[int, dict]:
    """``--preset toy`` trained and measured on seeds 0, 1 and 2, all three at once (one thread each)."""
    root = tmp_path_factory.mktemp("quick_start")
    jobs = [(seed, str(root / f"seed{seed}")) for seed in (0, 1, 2)]
    results = run_jobs(jobs, workers=3, worker=train_and_measure_quick_start)
    return {r["seed"]: r["following"] for r in results}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_quick_start_teaches_the_novel_combinations_and_keeps_the_known_ones(quick_start_runs, seed):
    result = quick_start_runs[seed]
    novel, twin, known = result["novel"], result["novel_heldout"], result["known"]
    readers = ("classifier", "pixels")
    # Taught, by both readers: measured +0.055 to +0.109 on these seeds (+0.066 to +0.094 on seeds
    # 10,000+). A rate's change has noise about 0.02: no update reads ~0.
    assert all(novel["change"][r] >= 0.04 for r in readers), novel
    assert sum(novel["change"][r] for r in readers) / 2 >= 0.05, novel
    for r in readers:
        assert known["change"][r] >= -0.03, (r, known)  # measured -0.005 to +0.016 here
        # measured -0.004 to +0.016 here, -0.023 to +0.016 on seeds 10,000+; eta 6 without the KL
        # term on the known captions lost -0.05 to -0.20
        assert twin["change"][r] >= -0.03, (r, twin)


@pytest.mark.slow
def test_a_saturated_reward_does_not_fall(tmp_path):
    base, final = run_preset("toy-alignment-saturated", tmp_path / "run")
    assert base["heldout/toy-alignment"] > 0.9  # saturated indeed
    assert final["heldout/toy-alignment"] >= base["heldout/toy-alignment"] - 2 * ALIGNMENT_NOISE, (base, final)
