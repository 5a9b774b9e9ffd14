#!/usr/bin/env python
"""REBEL vs DDPO at equal reward queries on the built-in ``toy`` model, on a CPU.

For each reward and seed, both algorithms sample and score the same number of images per epoch
for the same number of epochs (equal reward queries), with the toy preset's sampler. The figure
of merit is the eval reward: the trained reward of fixed-seed samples of held-out prompts
(``prompts/toy_heldout.txt``, never trained on), measured before training and after every epoch.

Writes one JSON (settings, machine, per-run curves, per-reward summary) and a plot::

    python scripts/bench_learning.py                       # 3 rewards x 2 algorithms x 2 seeds
    python scripts/bench_learning.py --rewards toy-alignment --seeds 0 1 --epochs 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rebel_diffusion.config import PRESETS, TrainConfig  # noqa: E402
from rebel_diffusion.report import read_metrics  # noqa: E402
from rebel_diffusion.train import train  # noqa: E402

REWARDS = ("jpeg-compressibility", "jpeg-incompressibility", "toy-alignment")
# Each algorithm with its own published step size; everything else shared.
ALGORITHMS = {
    "rebel": dict(algorithm="rebel", eta=1.0),
    "ddpo": dict(algorithm="ddpo", clip_range=1e-4, adv_clip_max=5.0),
}


def run_config(reward: str, algorithm: str, seed: int, args, out: Path) -> TrainConfig:
    cfg = TrainConfig(**{**PRESETS["toy"], **ALGORITHMS[algorithm]})
    cfg.reward = reward
    cfg.seed = seed
    cfg.epochs = args.epochs
    cfg.learning_rate = args.lr
    cfg.images_per_prompt = args.images_per_prompt
    cfg.prompts_per_batch = args.prompts_per_batch
    cfg.batches_per_epoch = args.batches_per_epoch
    cfg.eval_num_images = args.eval_images
    cfg.checkpoints_keep = 1
    cfg.output_dir = str(out)
    if algorithm == "rebel":  # pairs per micro-batch; DDPO: images per micro-batch (the same images)
        cfg.train_batch_size = args.micro_batch // 2
    else:
        cfg.train_batch_size = args.micro_batch
    cfg.gradient_accumulation_steps = args.accumulation
    cfg.validate()
    return cfg


def run_one(reward, algorithm, seed, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = run_config(reward, algorithm, seed, args, out)
        t0 = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t0
        metrics = read_metrics(out / "metrics.jsonl")
    queries = [m["epoch"] * cfg.images_per_epoch() for m in metrics]
    return {
        "reward": reward,
        "algorithm": algorithm,
        "seed": seed,
        "seconds": seconds,
        "reward_queries": queries,
        "eval_reward": [m["eval_reward_mean"] for m in metrics],
        "train_reward": [m.get("reward_mean") for m in metrics],
        "loss": [m.get("loss") for m in metrics],
    }


def summarize(runs: list[dict]) -> dict:
    """Per reward and algorithm: eval-reward gain (last - first) over seeds, mean and std."""
    out = {}
    for reward in sorted({r["reward"] for r in runs}):
        out[reward] = {}
        for algorithm in ALGORITHMS:
            gains = [r["eval_reward"][-1] - r["eval_reward"][0] for r in runs
                     if r["reward"] == reward and r["algorithm"] == algorithm]
            if gains:
                out[reward][algorithm] = {"gain_mean": float(np.mean(gains)), "gain_std": float(np.std(gains)),
                                          "gains": gains}
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = sorted({r["reward"] for r in runs})
    fig, axes = plt.subplots(1, len(rewards), figsize=(5 * len(rewards), 3.6), squeeze=False)
    for ax, reward in zip(axes[0], rewards):
        for algorithm, colour in zip(ALGORITHMS, ("tab:blue", "tab:orange")):
            group = [r for r in runs if r["reward"] == reward and r["algorithm"] == algorithm]
            if not group:
                continue
            x = np.array(group[0]["reward_queries"])
            y = np.array([r["eval_reward"] for r in group])
            ax.plot(x, y.mean(0), color=colour, marker="o", label=f"{algorithm} ({len(group)} seeds)")
            ax.fill_between(x, y.min(0), y.max(0), color=colour, alpha=0.2)
        ax.set_title(reward)
        ax.set_xlabel("reward queries (images scored)")
        ax.set_ylabel("held-out eval reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(paths: list[str], out: Path) -> None:
    """One JSON and plot from several runs of this script (say, one process per seed)."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    runs = [r for part in parts for r in part["runs"]]
    result = {"merged_from": [str(p) for p in paths], "machine": parts[0]["machine"],
              "settings": parts[0]["settings"], "summary": summarize(runs), "runs": runs}
    out.write_text(json.dumps(result, indent=1))
    plot(runs, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rewards", nargs="+", default=list(REWARDS))
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--prompts-per-batch", type=int, default=8)
    p.add_argument("--batches-per-epoch", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=16, help="images per micro-batch (REBEL: half as many pairs)")
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--eval-images", type=int, default=16)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/learning_cpu_DATE.json)")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="combine earlier results (e.g. one per seed) into --out")
    args = p.parse_args()
    if args.merge:
        merge(args.merge, Path(args.out))
        return

    out = Path(args.out or ROOT / "benchmarks" / "results" / f"learning_cpu_{date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for reward in args.rewards:
        for seed in args.seeds:
            for algorithm in args.algorithms:
                print(f"== {reward} {algorithm} seed {seed}", flush=True)
                runs.append(run_one(reward, algorithm, seed, args))
                print(f"   eval reward {runs[-1]['eval_reward'][0]:.4f} -> {runs[-1]['eval_reward'][-1]:.4f} "
                      f"({runs[-1]['seconds']:.0f} s)", flush=True)
    import torch

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
        "settings": vars(args),
        "summary": summarize(runs),
        "runs": runs,
    }
    out.write_text(json.dumps(result, indent=1))
    plot(runs, out.with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
