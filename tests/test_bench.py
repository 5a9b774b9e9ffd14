"""Smoke test of ``scripts/bench.py``: the training-memory worker and the FLOP count on the
tiny model, T = 2 and 4, in-process; checks the JSON's structure. No timing assertions: speed
figures live in benchmarks/results, never in tests.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def _load_script(path: Path, name: str):
    """Import a script of scripts/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    yield _load_script(SCRIPT, "rebel_bench_script")
    sys.modules.pop("rebel_bench_script", None)


def test_training_worker_and_flops_json(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tmp_path / "bench.json"
    report = bench.main([
        "--model", "tiny", "--device", "cpu", "--sections", "flops,training", "--train-steps", "2,4",
        "--naive-steps", "2", "--steps-per-pass", "1,3", "--train-repeats", "0", "--train-isolation", "inprocess", "--threads", "1",
        "--out", str(out),
    ])
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report, default=str))

    # Environment: what a reader needs to judge the figures.
    assert data["device"]["type"] == "cpu" and data["device"]["cpu_count"] >= 1
    assert len(data["device"]["load_average_start"]) == 3
    for name in ("torch", "diffusers", "transformers", "peft"):
        assert data["versions"][name]
    assert set(data["switches"]) >= {"dtype", "channels_last", "compile", "attention"}
    assert data["peak_tflops"] is None  # no MFU on a CPU

    flops = data["flops"]
    assert flops["sampling_unet_call_flops"] > 0
    assert flops["train_lora_forward_backward_flops"] > flops["train_lora_forward_flops"] > 0

    training = data["training"]
    assert training["switches"]["dtype"] == "fp32"
    assert set(training["results"]["ours"]) == {"2", "4"} and set(training["results"]["naive"]) == {"2"}
    assert set(training["results"]["ours_spp3"]) == {"2", "4"}  # 3 steps per UNet pass
    for method, T in (("ours", 2), ("ours", 4), ("ours_spp3", 4), ("naive", 2)):
        r = training["results"][method][str(T)]
        assert r["T"] == T and r["trained_steps"] == T and r["oom"] is False
        assert r["unet_graphs_held_at_once"] == (T if method == "naive" else 1)
        assert r["steps_per_pass"] == {"ours": 1, "ours_spp3": 3, "naive": None}[method]
        assert set(r["memory"]) >= {"method", "baseline_mib", "peak_mib", "peak_growth_mib"}
        assert r["pairs_per_s"] > 0
        assert r["flops"]["executed_tflops"] > 0 and r["flops"]["executed_mfu"] is None
    assert training["results"]["ours"]["2"]["flops"]["rescore_flops"] > 0
    assert training["results"]["naive"]["2"]["flops"]["rescore_flops"] == 0
    summary = training["summary"]
    assert set(summary["ours_peak_growth_mib"]) == {"2", "4"}
    assert set(summary["naive_peak_growth_mib"]) == {"2"}
    assert set(summary["ours_spp3_speedup_over_ours"]) == {"2", "4"}
    # The naive full-graph step computes the same gradient as ours (fp32).
    assert training["gradient_check"]["relative_l2_difference"] < 1e-4


def test_arguments_are_checked(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-steps", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--train-pairs", "3", "--train-micro-batch", "2"])
    args = bench.parse_args(["--device", "cpu", "--naive-steps", "none"])
    assert args.naive_steps == [] and args.dtype == "fp32" and args.threads == 1


@pytest.fixture(scope="module")
def bench_learning():
    yield _load_script(SCRIPT.parent / "bench_learning.py", "rebel_bench_learning_script")
    sys.modules.pop("rebel_bench_learning_script", None)


def test_learning_benchmark_statistics(bench_learning):
    """95% t-interval over seeds, queries-to-reach, and the per-task summary of REBEL vs DDPO."""
    ci = bench_learning.interval([1.0, 2.0, 3.0])
    assert ci["mean"] == pytest.approx(2.0) and ci["ci95"] == pytest.approx(4.303 * 1.0 / 3**0.5)
    run = {"reward_queries": [0, 64, 128], "heldout_reward": [0.5, 0.7, 0.9]}
    assert bench_learning.queries_to_reach(run, 0.7, 1.0) == 64
    assert bench_learning.queries_to_reach(run, 1.0, 1.0) is None

    def fake(algorithm, seed, curve):
        return {"task": "toy", "reward": "r", "algorithm": algorithm, "seed": seed, "learning_rate": 1e-3,
                "reward_queries": [0, 64, 128], "heldout_reward": curve, "heldout_alignment": [0.9, 0.9, 0.8]}

    runs = [fake("rebel", s, [0.0, 0.2 + s / 10, 0.4]) for s in range(2)] + [
        fake("ddpo", s, [0.0, 0.1, 0.2 + s / 10]) for s in range(2)]
    summary = bench_learning.summarize(runs)["toy"]
    assert summary["rebel"]["heldout_reward_gain"]["mean"] == pytest.approx(0.4)
    assert summary["ddpo"]["heldout_reward_final"]["mean"] == pytest.approx(0.25)
    assert summary["rebel_queries_to_ddpo_final"] == [128, 64]  # first evaluation at or above 0.25
    assert summary["rebel"]["heldout_alignment_change"]["mean"] == pytest.approx(-0.1)
