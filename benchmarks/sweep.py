"""Variants x seeds of ``rebel-diffusion train`` -> one JSON: the tool behind every row of docs/tuning.md.

Each variant is a name and the ``train`` flags it adds to ``--base`` (flags the user would type;
the last one given wins). Every run trains from scratch in a temporary folder, with a held-out
evaluation before training and at the end (``--heldout-every`` defaults to the run's epochs), and
records the per-epoch metrics that matter, the held-out figures before and after, and the wall
time. ``--following`` also measures prompt following of the toy model on fresh seeds
(``benchmarks.toy_following``: the novel combinations, their held-out twin and the known captions).
The summary gives, per variant, each figure's mean and 95% interval over the seeds.

    python -m benchmarks.sweep --name quickstart --base "--preset toy" --seeds 0 1 2 --following 8 \\
        --variant "preset=" --variant "policy anchor=--anchor policy"
    python -m benchmarks.sweep --name jpeg --base "--preset toy-jpeg --heldout-rewards \\
        jpeg-compressibility,toy-alignment" --variant "kl 0.1=--kl-coef 0.1" --jobs 2

    python -m benchmarks.sweep --show benchmarks/results/sweep_quickstart_cpu_2026-12-06.json   # a table

Results go to ``benchmarks/results/sweep_<name>_cpu_<date>.json``, never over an earlier file (``--out``
to choose).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import env
from benchmarks.learning import interval, run_jobs
from rebel_diffusion.config import TrainConfig
from rebel_diffusion.outputs import run_folder
from rebel_diffusion.outputs.generation import default_num_threads

# Per-epoch metrics kept in the JSON (when the run logs them).
CURVE_KEYS = ("reward_mean", "grid_reward_mean", "loss", "kl", "log_ratio_to_base", "fit_r2")


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``'NAME=--flag value ...'`` -> (NAME, ['--flag', 'value', ...]); ``'NAME='`` adds no flag."""
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--variant {text!r}: write NAME=FLAGS, e.g. 'kl 0.1=--kl-coef 0.1'")
    return name.strip(), shlex.split(flags)


def resolve(argv: list[str]) -> TrainConfig:
    """The ``TrainConfig`` that ``rebel-diffusion train ARGV`` would run (a usage error raises)."""
    from rebel_diffusion.cli.train import add_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="train", add_help=False, exit_on_error=False)
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def run_config(base: list[str], flags: list[str], seed: int, out: Path) -> TrainConfig:
    """The variant's configuration for one seed, writing to ``out``, with held-out figures at the end."""
    cfg = resolve([*base, *flags, "--seed", str(seed), "--output-dir", str(out)])
    if not cfg.heldout_every or cfg.epochs % cfg.heldout_every:
        cfg.heldout_every = cfg.epochs  # before training and after the last epoch
    cfg.checkpoints_keep = 1
    cfg.validate()
    return cfg


def run_one(job: tuple) -> dict:
    """Train one (variant, seed); returns its record for the JSON."""
    name, base, flags, seed, following, threads = job
    from rebel_diffusion.outputs.report import read_metrics
    from rebel_diffusion.training.recipe import train

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = run_config(base, flags, seed, out)
        cfg.num_threads = threads  # train() sets torch's threads from it
        t0 = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - t0
        metrics = read_metrics(out / run_folder.METRICS)
        record = {
            "variant": name,
            "flags": flags,
            "seed": seed,
            "train_seconds": seconds,
            "reward": cfg.reward,
            "images_per_epoch": cfg.images_per_epoch(),
            "heldout": [
                {k: v for k, v in m.items() if k == "epoch" or k.startswith("heldout/")}
                for m in metrics
                if any(k.startswith("heldout/") for k in m)
            ],  # fmt: skip
            "curves": {k: [m.get(k) for m in metrics[1:]] for k in CURVE_KEYS if any(k in m for m in metrics)},
        }
        if following:
            from benchmarks.toy_following import measure

            record["following"] = measure(out, seeds=following)
    return record


def final_figures(record: dict) -> dict[str, float]:
    """The figures a row of a tuning table reports: held-out changes, prompt following, wall time."""
    out = {"train_seconds": record["train_seconds"]}
    first, last = record["heldout"][0], record["heldout"][-1]
    for key in first:
        if key.startswith("heldout/") and key in last:
            out[f"{key}/change"] = last[key] - first[key]
            out[f"{key}/final"] = last[key]
    for name, row in record.get("following", {}).items():
        for reader in row["base"]:
            out[f"following/{name}/{reader}/base"] = row["base"][reader]
            out[f"following/{name}/{reader}/tuned"] = row["tuned"][reader]
            out[f"following/{name}/{reader}/change"] = row["change"][reader]
    return out


def summarize(runs: list[dict]) -> dict:
    """{variant: {figure: mean and 95% interval over seeds}}, variants in the order they ran."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        figures = [final_figures(r) for r in runs if r["variant"] == name]
        keys = [k for k in figures[0] if all(k in f for f in figures)]
        out[name] = {"seeds": len(figures), **{k: interval([f[k] for f in figures]) for k in keys}}
    return out


def show(result: dict, figures: list[str] | None = None) -> str:
    """A markdown table of a sweep JSON's summary: one row per variant, mean +- 95% interval of each figure."""
    summary = result["summary"]
    first = next(iter(summary.values()))
    figures = figures or [k for k in first if k != "seeds"]
    lines = ["| variant | seeds | " + " | ".join(figures) + " |", "| --- | --- |" + " --- |" * len(figures)]
    for name, row in summary.items():
        cells = [f"{row[k]['mean']:+.3f} ± {row[k]['ci95']:.3f}" if k in row else "–" for k in figures]
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="what is swept (names the JSON)")
    p.add_argument("--base", default="--preset toy", help="train flags every variant starts from")
    p.add_argument("--variant", action="append", type=parse_variant, required=True, help="NAME=FLAGS (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--following", type=int, default=0, help="toy prompt following with N fresh seeds a caption")
    p.add_argument("--jobs", type=int, default=1, help="training processes at once (wall times then mean less)")
    threads_help = "torch threads per process (default: the idle CPUs shared among --jobs)"
    p.add_argument("--threads", type=int, default=None, help=threads_help)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/sweep_NAME_cpu_DATE.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--show"]:  # python -m benchmarks.sweep --show FILE.json [FIGURE ...]
        print(show(json.loads(Path(argv[1]).read_text()), argv[2:] or None))
        return
    args = parse_args(argv)
    base = shlex.split(args.base)
    for _, flags in args.variant:  # every variant must be a valid run before anything trains
        resolve([*base, *flags, "--output-dir", tempfile.gettempdir() + "/rebel-sweep-check"])
    out = Path(args.out) if args.out else env.default_out(f"sweep_{env.slug(args.name)}", torch.device("cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    threads = args.threads or default_num_threads(args.jobs)
    jobs = [(name, base, flags, seed, args.following, threads) for name, flags in args.variant for seed in args.seeds]
    t0 = time.time()

    def write(runs: list[dict], complete: bool) -> None:
        order = {name: i for i, (name, _) in enumerate(args.variant)}
        runs = sorted(runs, key=lambda r: (order[r["variant"]], r["seed"]))
        result = {
            "name": args.name,
            "command": "python -m benchmarks.sweep " + " ".join(shlex.quote(a) for a in (argv or [])),
            "machine": env.record("cpu"),
            "complete": complete,
            "wall_seconds": time.time() - t0,
            "settings": {
                **{k: v for k, v in vars(args).items() if k not in ("out", "variant")},
                "threads": threads,  # what each run used (the flag's default resolved)
                "variants": {name: flags for name, flags in args.variant},
            },  # fmt: skip
            "summary": summarize(runs),
            "runs": runs,
        }
        out.write_text(json.dumps(result, indent=1) + "\n")

    runs = run_jobs(jobs, args.jobs, on_result=lambda done: write(done, complete=False), worker=run_one)
    write(runs, complete=True)
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
