"""The numbers a run produces, pinned: a refactor that changes results fails here.

Two epochs of ``tiny`` with REBEL (anchored to the base, the default) and with DDPO, fp32 on the CPU.
The figures were recorded once; the tolerance (relative 1e-3) is far above the float32 rounding
that differs between CPUs over two epochs, and far below any change of the math (a wrong scale of
eta, a KL weight, a clip range or a step subset moves these by percents or more).
"""

from __future__ import annotations

import json
import math

import pytest

from rebel_diffusion.cli import main

SMALL = [
    "--model", "tiny", "--reward", "jpeg-compressibility", "--num-steps", "3", "--prompts-per-batch", "2",
    "--batches-per-epoch", "1", "--train-batch-size", "1", "--gradient-accumulation-steps", "2",
    "--grid-num-images", "2", "--guidance-scale", "2.0", "--learning-rate", "1e-3", "--epochs", "2",
    "--progress", "none",
]  # fmt: skip

PINNED = {
    "rebel": [
        {
            "reward_mean": -1.5439999103546143,
            "advantage_abs_max": 0.7005946636199951,
            "loss": 1.7125117778778076,
            "grad_norm": 54.60698699951172,
            "kl": 0.01789187639951706,
            "fit_r2": -69.65398237700074,
            "fit_corr": 1.0,
            "log_ratio_diff_abs": 0.1191864013671875,
            "log_ratio_to_base": 0.0,
        },
        {
            "reward_mean": -1.5469999313354492,
            "advantage_abs_max": 0.9051928520202637,
            "loss": 1.2928359508514404,
            "grad_norm": 60.111915588378906,
            "kl": 0.16627506911754608,
            "fit_r2": 0.1949773978301953,
            "fit_corr": 1.0,
            "log_ratio_diff_abs": 0.612579345703125,
            "log_ratio_to_base": 0.11174774169921875,
        },
    ],
    "ddpo": [
        {
            "reward_mean": -1.5439999103546143,
            "advantage_abs_max": 0.7005946636199951,
            "loss": 0.00013366341590881348,
            "grad_norm": 0.050707753747701645,
            "kl": 0.01789184659719467,
            "approx_kl": 4.808565563507727e-07,
            "clipfrac": 0.0,
        },
        {
            "reward_mean": -1.5469999313354492,
            "advantage_abs_max": 0.9998461604118347,
            "loss": -0.00030935555696487427,
            "grad_norm": 0.0702410340309143,
            "kl": 0.12458155304193497,
            "approx_kl": 1.6141456171681057e-07,
            "clipfrac": 0.0,
        },
    ],
}


@pytest.mark.parametrize("algorithm", ["rebel", "ddpo"])
def test_two_epochs_of_tiny_give_the_pinned_numbers(tmp_path, algorithm):
    out = tmp_path / algorithm
    assert main(["train", *SMALL, "--algorithm", algorithm, "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(records) == 2
    for epoch, (got, want) in enumerate(zip(records, PINNED[algorithm], strict=True), start=1):
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-3, abs_tol=1e-8), (epoch, key, got[key], value)
