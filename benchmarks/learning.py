"""REBEL vs DDPO at equal reward queries on the built-in ``toy`` model, on a CPU.

Three tasks, each a preset: ``toy-jpeg`` (JPEG compressibility at guidance 3), ``toy-alignment``
(toy-alignment at guidance 1: RL in place of classifier-free guidance) and
``toy-alignment-saturated`` (the same reward at guidance 3, where the base is already near the top:
training must not lower it). Both algorithms sample and score the same images per epoch for the
same epochs (equal reward queries) with the preset's sampler; DDPO runs at the learning rate that
won a sweep on seed 0 (``--sweep-ddpo-lr``), so the comparison is fair. Every few epochs the
current weights are scored on held-out captions (``prompts/toy_heldout.txt``) with seeds that no
training batch uses: the trained reward, and toy-alignment (prompt following) beside it.

Writes one JSON (settings, machine, wall time, sweep, per-run curves, per-task summary with 95%
intervals over seeds) and a PNG of held-out reward against reward queries, by default
``benchmarks/results/learning_cpu_<date>.json`` and ``.png``. Each run is one ``train(TrainConfig)``;
``--jobs N`` runs N of them at once in spawned processes. Run from the repository root::

    python -m benchmarks.learning --jobs 2                            # 3 tasks x 2 algorithms x 3 seeds
    python -m benchmarks.learning --tasks toy-jpeg --seeds 0 --epochs 6    # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from benchmarks import env
from rebel_diffusion.config import PRESETS, TrainConfig
from rebel_diffusion.outputs import run_folder
from rebel_diffusion.outputs.report import read_metrics
from rebel_diffusion.training.recipe import train

TASKS = ("toy-jpeg", "toy-alignment", "toy-alignment-saturated")
ALIGNMENT = "toy-alignment"
# Two-sided 95% Student-t quantiles by degrees of freedom (n - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_config(task: str, algorithm: str, seed: int, lr: float | None, args, out: Path) -> TrainConfig:
    cfg = TrainConfig(**PRESETS[task])
    cfg.algorithm = algorithm
    if lr is not None:
        cfg.learning_rate = lr
    cfg.seed = seed
    cfg.epochs = args.epochs
    cfg.heldout_every = args.eval_every
    cfg.heldout_rewards = ",".join(dict.fromkeys([cfg.reward, ALIGNMENT]))
    cfg.heldout_images = args.heldout_images
    cfg.heldout_diversity = "none"
    cfg.grid_num_images = 4  # the grid is not the measurement here
    cfg.checkpoints_keep = 1
    cfg.output_dir = str(out)
    cfg.validate()
    return cfg


def run_one(job: tuple) -> dict:
    task, algorithm, seed, lr, args = job
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = run_config(task, algorithm, seed, lr, args, out)
        cfg.num_threads = args.threads  # train() sets torch's threads from it
        t0 = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t0
        metrics = read_metrics(out / run_folder.METRICS)
    evals = [m for m in metrics if f"heldout/{cfg.reward}" in m]
    return {
        "task": task,
        "reward": cfg.reward,
        "algorithm": algorithm,
        "seed": seed,
        "learning_rate": cfg.learning_rate,
        "seconds": seconds,
        "reward_queries": [m["epoch"] * cfg.images_per_epoch() for m in evals],
        "heldout_reward": [m[f"heldout/{cfg.reward}"] for m in evals],
        "heldout_alignment": [m[f"heldout/{ALIGNMENT}"] for m in evals],
        "train_reward": [m.get("reward_mean") for m in metrics],
        "kl": [m.get("kl") for m in metrics],
        "fit_r2": [m.get("fit_r2") for m in metrics],
    }


def interval(values: list[float]) -> dict:
    """Mean and 95% t-interval half-width over seeds."""
    v = np.asarray(values, dtype=float)
    half = T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": float(half), "values": [float(x) for x in v]}


def queries_to_reach(run: dict, level: float, sign: float) -> int | None:
    """The first reward-query count at which the held-out reward reaches ``level`` (None: never)."""
    for q, r in zip(run["reward_queries"], run["heldout_reward"]):
        if sign * (r - level) >= 0:
            return q
    return None


def summarize(runs: list[dict]) -> dict:
    """Per task and algorithm: base, final and gain of held-out reward and alignment (95% intervals);
    and the reward queries REBEL needs to reach DDPO's mean final reward."""
    out = {}
    for task in sorted({r["task"] for r in runs}):
        out[task] = {}
        for algorithm in ("rebel", "ddpo"):
            group = [r for r in runs if r["task"] == task and r["algorithm"] == algorithm]
            if not group:
                continue
            out[task][algorithm] = {
                "seeds": len(group),
                "learning_rate": group[0]["learning_rate"],
                "heldout_reward_base": interval([r["heldout_reward"][0] for r in group]),
                "heldout_reward_final": interval([r["heldout_reward"][-1] for r in group]),
                "heldout_reward_gain": interval([r["heldout_reward"][-1] - r["heldout_reward"][0] for r in group]),
                "heldout_alignment_final": interval([r["heldout_alignment"][-1] for r in group]),
                "heldout_alignment_change": interval(
                    [r["heldout_alignment"][-1] - r["heldout_alignment"][0] for r in group]
                ),
            }
        both = out[task]
        if "rebel" in both and "ddpo" in both:
            level = both["ddpo"]["heldout_reward_final"]["mean"]
            rebel_runs = [r for r in runs if r["task"] == task and r["algorithm"] == "rebel"]
            reach = [queries_to_reach(r, level, 1.0) for r in rebel_runs]
            both["rebel_queries_to_ddpo_final"] = reach
            both["ddpo_queries"] = rebel_runs[0]["reward_queries"][-1]
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 6.4), squeeze=False)
    for col, task in enumerate(tasks):
        for row, key in enumerate(("heldout_reward", "heldout_alignment")):
            ax = axes[row][col]
            for algorithm, colour in (("rebel", "tab:blue"), ("ddpo", "tab:orange")):
                group = [r for r in runs if r["task"] == task and r["algorithm"] == algorithm]
                if not group:
                    continue
                x = np.array(group[0]["reward_queries"])
                y = np.array([r[key] for r in group])
                mean = y.mean(0)
                half = T95.get(len(y) - 1, 1.96) * y.std(0, ddof=1) / np.sqrt(len(y)) if len(y) > 1 else 0 * mean
                label = f"{algorithm} (lr {group[0]['learning_rate']:g}, {len(group)} seeds)"
                ax.plot(x, mean, color=colour, marker="o", ms=3, label=label)
                ax.fill_between(x, mean - half, mean + half, color=colour, alpha=0.2)
            reward = next(r["reward"] for r in runs if r["task"] == task)
            ax.set_title(f"--preset {task}" if row == 0 else "prompt following")
            ax.set_ylabel(f"held-out {reward}" if row == 0 else "held-out toy-alignment")
            ax.set_xlabel("reward queries (images scored)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("REBEL vs DDPO on toy: mean and 95% interval over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run_jobs(jobs: list[tuple], workers: int, on_result=None, worker=None) -> list[dict]:
    """Run ``worker(job)`` (default ``run_one``; a module-level function) for each job, ``workers`` at a
    time in spawned processes; ``on_result(results so far)`` after each one."""
    worker = worker or run_one
    results = []
    if workers == 1:
        for j in jobs:
            results.append(worker(j))
            if on_result:
                on_result(results)
        return results
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for future in as_completed([pool.submit(worker, j) for j in jobs]):
            results.append(future.result())
            if on_result:
                on_result(results)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=3, help="held-out evaluation every N epochs")
    p.add_argument("--heldout-images", type=int, default=2, help="images per held-out caption (32 captions)")
    p.add_argument(
        "--sweep-ddpo-lr",
        nargs="*",
        type=float,
        default=[1e-4, 3e-4, 1e-3, 3e-3],
        help="DDPO learning rates tried on seed 0 per task (best final held-out reward wins)",
    )
    p.add_argument("--sweep-epochs", type=int, default=None, help="epochs of a sweep run (default: --epochs)")
    p.add_argument(
        "--algorithms", nargs="+", default=["rebel", "ddpo"], choices=["rebel", "ddpo"], help="algorithms to run"
    )
    p.add_argument(
        "--ddpo-lr", type=float, default=None, help="DDPO's learning rate, as given: no sweep (e.g. a rate that "
        "keeps prompt following where the sweep's winner, chosen on reward alone, does not)",
    )  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="training processes at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/learning_cpu_DATE.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out or env.RESULTS / f"learning_cpu_{date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sweep, ddpo_lr = {}, {}
    if args.ddpo_lr is not None:
        ddpo_lr = dict.fromkeys(args.tasks, args.ddpo_lr)
    elif args.sweep_ddpo_lr and "ddpo" in args.algorithms:
        sweep_args = argparse.Namespace(**{**vars(args), "epochs": args.sweep_epochs or args.epochs})
        jobs = [(task, "ddpo", args.seeds[0], lr, sweep_args) for task in args.tasks for lr in args.sweep_ddpo_lr]
        for r in run_jobs(jobs, args.jobs):
            sweep.setdefault(r["task"], {})[f"{r['learning_rate']:g}"] = r["heldout_reward"][-1]
        for task in args.tasks:
            best = max(sweep[task], key=sweep[task].get)
            ddpo_lr[task] = float(best)
            print(f"ddpo sweep {task}: {sweep[task]} -> lr {best}", flush=True)
    jobs = [(task, algorithm, seed, ddpo_lr.get(task) if algorithm == "ddpo" else None, args)
            for task in args.tasks for seed in args.seeds for algorithm in args.algorithms]  # fmt: skip

    def write(runs: list[dict], complete: bool) -> None:
        result = report(args, t0, sweep, ddpo_lr, runs, complete)
        out.write_text(json.dumps(result, indent=1))
        plot(runs, out.with_suffix(".png"))

    runs = run_jobs(jobs, args.jobs, on_result=lambda done: write(done, complete=False))  # partial results too
    write(runs, complete=True)
    print(json.dumps(summarize(runs), indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - t0:.0f} s")


def report(args, t0: float, sweep: dict, ddpo_lr: dict, runs: list[dict], complete: bool) -> dict:
    machine = env.record("cpu")
    return {
        "machine": {
            "platform": machine["platform"],
            "processor": platform.processor(),
            "cpus": machine["cpu_count"],
            "python": machine["versions"]["python"],
            "torch": machine["versions"]["torch"],
            "load_average": machine["load_average"],
        },
        "env": machine,
        "complete": complete,
        "wall_seconds": time.time() - t0,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "presets": {task: PRESETS[task] for task in args.tasks},
        "ddpo_sweep": {"heldout_reward_final": sweep, "chosen_lr": ddpo_lr},
        "summary": summarize(runs),
        "runs": sorted(runs, key=lambda r: (r["task"], r["algorithm"], r["seed"])),
    }


if __name__ == "__main__":
    main()
