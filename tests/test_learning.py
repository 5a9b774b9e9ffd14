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
from helpers import read_quick_start_base, run_job, train_and_read_quick_start, train_saturated

from benchmarks import toy_following
from benchmarks.learning import run_jobs
from rebel_diffusion.config import PRESETS

ALIGNMENT_NOISE = 0.013


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The module's end-to-end runs at once, in spawned processes of one thread each (more threads
    barely speed the toy model; four processes pack a 2-core machine better than two lanes of two
    runs, which leave one core idle at the end; CI runs the other end-to-end tests beside them):
    ``--preset toy`` on seeds 0, 1 and 2 ({seed: following, as ``toy_following.measure`` gives it}),
    the base read once for the three, and ``toy-alignment-saturated`` ("saturated": its metrics
    records)."""
    root = tmp_path_factory.mktemp("learning")
    jobs = [(train_saturated, str(root / "saturated")), (read_quick_start_base, None)]
    jobs += [(train_and_read_quick_start, (seed, str(root / f"seed{seed}"))) for seed in (0, 1, 2)]
    results = run_jobs(jobs, workers=len(jobs), worker=run_job)  # in the order they finish
    out = {"saturated": next(r for r in results if isinstance(r, list))}
    base = next(r for r in results if isinstance(r, dict) and "seed" not in r)
    for result in (r for r in results if isinstance(r, dict) and "seed" in r):
        assert result["settings"] == base["settings"]  # the base read with the runs' own sampler
        out[result["seed"]] = toy_following.compare(base["readings"], result["readings"])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_quick_start_teaches_the_novel_combinations_and_keeps_the_known_ones(runs, seed):
    result = runs[seed]
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
def test_a_saturated_reward_does_not_fall(runs):
    metrics = runs["saturated"]
    assert all(m["loss"] == m["loss"] for m in metrics[1:])  # finite throughout
    evaluated = [m for m in metrics if "heldout/toy-alignment" in m]
    epochs = PRESETS["toy-alignment-saturated"]["epochs"]
    assert [m["epoch"] for m in evaluated] == [0, epochs]
    base, final = evaluated[0], evaluated[-1]
    assert base["heldout/toy-alignment"] > 0.9  # saturated indeed
    assert final["heldout/toy-alignment"] >= base["heldout/toy-alignment"] - 2 * ALIGNMENT_NOISE, (base, final)
