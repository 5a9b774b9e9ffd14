"""REBEL against DDPO on the JPEG task, judged by a frontier: reward gained against prompt following lost.

One point per method says little (DDPO tuned for reward alone "wins" by wrecking the prompts), so each
algorithm is swept over what trades reward for fidelity (REBEL: eta, the KL coefficient, the learning
rate and the anchor; DDPO: the clip range, the KL coefficient and the learning rate), every variant on
the same seeds and the same reward queries (``--preset toy-jpeg``: 10 epochs of 64 images), with
held-out JPEG size and toy-alignment (prompt following) on captions never trained on, every 2 epochs.

For each algorithm and prompt-following budget (0.02, 0.05, 0.10: the largest mean loss of held-out
toy-alignment allowed) the frontier is the best mean held-out JPEG gain among its variants within the
budget. The JSON states which algorithm gains more at each budget, and whether REBEL reaches DDPO's
best final held-out reward (within the largest budget) with fewer reward queries. The PNG plots each
variant's gain against its alignment loss with 95% intervals over seeds, and both frontiers.

    python -m benchmarks.frontier --jobs 2          # 18 variants x 3 seeds, ~50 min on 2 cores
    python -m benchmarks.frontier --extend benchmarks/results/frontier_cpu_2026-12-07.json
        # runs only the variants that file lacks, and analyses them all together
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import env, sweep

BASE = (
    "--preset toy-jpeg --heldout-every 2 --heldout-rewards jpeg-compressibility,toy-alignment --heldout-diversity none"
)
REWARD, ALIGNMENT = "heldout/jpeg-compressibility", "heldout/toy-alignment"
BUDGETS = (0.02, 0.05, 0.10)
# (algorithm, name, flags). The presets' own settings first.
VARIANTS = [
    ("rebel", "eta 4, KL 0.03 (preset)", ""),
    ("rebel", "eta 4, KL 0.1", "--kl-coef 0.1"),
    ("rebel", "eta 4, KL 0.01", "--kl-coef 0.01"),
    ("rebel", "eta 8, KL 0.03", "--eta 8"),
    ("rebel", "eta 4, KL 0.02", "--kl-coef 0.02"),
    ("rebel", "eta 6, KL 0.02", "--eta 6 --kl-coef 0.02"),
    ("rebel", "eta 4, KL 0.03, lr 2e-3", "--learning-rate 2e-3"),
    ("rebel", "eta 8, KL 0.02", "--eta 8 --kl-coef 0.02"),
    ("rebel", "eta 8, KL 0.015", "--eta 8 --kl-coef 0.015"),
    ("rebel", "eta 6, KL 0.025", "--eta 6 --kl-coef 0.025"),
    ("rebel", "base anchor, eta 4", "--anchor base --kl-coef 0"),
    ("rebel", "base anchor, eta 8", "--anchor base --kl-coef 0 --eta 8"),
    ("rebel", "base anchor, eta 16", "--anchor base --kl-coef 0 --eta 16"),
    ("rebel", "base anchor, eta 32", "--anchor base --kl-coef 0 --eta 32"),
    ("ddpo", "clip 1.6 nats, KL 0.03", "--algorithm ddpo"),
    ("ddpo", "clip 1.6 nats, KL 0", "--algorithm ddpo --kl-coef 0"),
    ("ddpo", "clip 1e-2, KL 0.03", "--algorithm ddpo --clip-range 1e-2"),
    ("ddpo", "clip 1.6 nats, KL 0.03, lr 3e-3", "--algorithm ddpo --learning-rate 3e-3"),
]


def reusable(earlier: dict, base: str, seeds: list[int], variants: list[tuple]) -> list[dict]:
    """The runs of an earlier frontier JSON this one keeps: the same ``--base`` and seeds, and a
    variant of the same name and flags (a variant whose flags changed runs again).
    ``ValueError`` (one line) where the base or seeds differ or a kept variant lacks a seed."""
    settings = earlier["settings"]
    if settings["base"] != base or sorted(settings["seeds"]) != sorted(seeds):
        raise ValueError(f"its --base {settings['base']!r} and --seeds {settings['seeds']} differ from this run's")
    flags = {name: sweep.parse_variant(f"{name}={f}")[1] for _, name, f in variants}
    keep = [r for r in earlier["runs"] if settings["variants"].get(r["variant"]) == flags.get(r["variant"])]
    for name in {r["variant"] for r in keep}:
        if sorted(r["seed"] for r in keep if r["variant"] == name) != sorted(seeds):
            raise ValueError(f"its variant {name!r} lacks some of the seeds {seeds}")
    return keep


def merge(result: dict, earlier: dict, kept: list[dict], path: str) -> dict:
    """``result`` (this run's sweep JSON) with the ``kept`` runs of ``earlier`` (read from ``path``)
    added, and where they came from: its command, machine and threads."""
    names = sorted({r["variant"] for r in kept})
    result["extends"] = {
        "path": path,
        "command": earlier.get("command"),
        "machine": earlier.get("machine"),
        "threads": earlier["settings"].get("threads"),
        "variants": names,
    }
    ran = result["settings"]["variants"]
    result["settings"]["variants"] = {**{n: earlier["settings"]["variants"][n] for n in names}, **ran}
    result["runs"] = kept + result["runs"]
    result["summary"] = sweep.summarize(result["runs"])
    return result


def mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Reward queries and the held-out ``key`` averaged over a variant's seeds, per evaluation."""
    queries = [e["epoch"] * runs[0]["images_per_epoch"] for e in runs[0]["heldout"]]
    values = np.mean([[e[key] for e in r["heldout"]] for r in runs], axis=0)
    return queries, [float(v) for v in values]


def analyse(runs: list[dict], algorithms: dict[str, str]) -> dict:
    """Per variant: gain and alignment loss (95% intervals); per budget: each algorithm's frontier."""
    summary = sweep.summarize(runs)
    points = {}
    for name, row in summary.items():
        points[name] = {
            "algorithm": algorithms[name],
            "jpeg_gain_kb": row[f"{REWARD}/change"],
            "alignment_loss": {
                **row[f"{ALIGNMENT}/change"],
                "mean": -row[f"{ALIGNMENT}/change"]["mean"],
                "values": [-v for v in row[f"{ALIGNMENT}/change"]["values"]],
            },  # fmt: skip
        }
    frontier = {}
    for budget in BUDGETS:
        best = {}
        for algo in ("rebel", "ddpo"):
            inside = [(p["jpeg_gain_kb"]["mean"], n) for n, p in points.items()
                      if p["algorithm"] == algo and p["alignment_loss"]["mean"] <= budget]  # fmt: skip
            best[algo] = {"variant": max(inside)[1], "jpeg_gain_kb": max(inside)[0]} if inside else None
        gains = {a: (b["jpeg_gain_kb"] if b else float("-inf")) for a, b in best.items()}
        best["more_gain"] = max(gains, key=gains.get) if any(np.isfinite(list(gains.values()))) else None
        frontier[f"{budget:g}"] = best
    # Queries: REBEL's first evaluation at DDPO's best final held-out reward within the largest budget.
    widest = frontier[f"{BUDGETS[-1]:g}"]
    queries = None
    if widest["ddpo"] and widest["rebel"]:
        ddpo_runs = [r for r in runs if r["variant"] == widest["ddpo"]["variant"]]
        ddpo_q, ddpo_curve = mean_curve(ddpo_runs, REWARD)
        reach = {}
        for name, p in points.items():
            if p["algorithm"] != "rebel" or p["alignment_loss"]["mean"] > BUDGETS[-1]:
                continue
            q, curve = mean_curve([r for r in runs if r["variant"] == name], REWARD)
            reach[name] = next((qi for qi, v in zip(q, curve) if v >= ddpo_curve[-1]), None)
        hits = {n: q for n, q in reach.items() if q is not None}
        queries = {
            "ddpo_variant": widest["ddpo"]["variant"],
            "ddpo_final_heldout_reward": ddpo_curve[-1],
            "ddpo_queries": ddpo_q[-1],
            "rebel_queries_to_reach": reach,
            "rebel_fewer_queries": bool(hits) and min(hits.values()) < ddpo_q[-1],
        }
    return {"points": points, "frontier": frontier, "queries": queries}


def plot(analysis: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = {"rebel": "tab:blue", "ddpo": "tab:orange"}
    for algo, colour in colours.items():
        pts = [(n, p) for n, p in analysis["points"].items() if p["algorithm"] == algo]
        x = [p["alignment_loss"]["mean"] for _, p in pts]
        y = [p["jpeg_gain_kb"]["mean"] for _, p in pts]
        ax.errorbar(x, y, xerr=[p["alignment_loss"]["ci95"] for _, p in pts],
                    yerr=[p["jpeg_gain_kb"]["ci95"] for _, p in pts], fmt="o", color=colour, alpha=0.7,
                    capsize=2, label=algo.upper())  # fmt: skip
        for (name, _), xi, yi in zip(pts, x, y):
            ax.annotate(name, (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points")
        order = sorted(zip(x, y))
        best, line = float("-inf"), []
        for xi, yi in order:  # the frontier: the best gain at or below each loss
            best = max(best, yi)
            line.append((xi, best))
        if line:
            ax.step(*zip(*line), where="post", color=colour, alpha=0.5)
    for budget in BUDGETS:
        ax.axvline(budget, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("held-out prompt-following loss (toy-alignment, base - tuned)")
    ax.set_ylabel("held-out JPEG gain (kB smaller)")
    ax.set_title("toy-jpeg: reward gained against prompt following lost (mean, 95% interval over seeds)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frontier", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--base", default=BASE, help="train flags every variant starts from")
    p.add_argument("--only", nargs="*", default=None, help="run only these variant names (a quick look)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/frontier_cpu_DATE.json)")
    extend_help = "an earlier frontier JSON: keep its runs of unchanged variants, run only the others"
    p.add_argument("--extend", default=None, help=extend_help)
    args = p.parse_args(argv)
    variants = [v for v in VARIANTS if args.only is None or v[1] in args.only]
    algorithms = {name: algo for algo, name, _ in variants}
    out = Path(args.out) if args.out else env.default_out("frontier", torch.device("cpu"))
    if args.extend and not Path(args.extend).is_file():
        p.error(f"--extend {args.extend}: no such file")
    earlier = json.loads(Path(args.extend).read_text()) if args.extend else None
    try:
        kept = reusable(earlier, args.base, args.seeds, variants) if earlier else []
    except ValueError as e:
        p.error(f"--extend {args.extend}: {e}")
    t0 = time.time()
    sweep_argv = ["--name", "frontier", "--base", args.base, "--seeds", *map(str, args.seeds), "--jobs",
                  str(args.jobs), "--out", str(out)]  # fmt: skip
    for _, name, flags in variants:
        if name not in {r["variant"] for r in kept}:
            sweep_argv += ["--variant", f"{name}={flags}"]
    if "--variant" not in sweep_argv:
        p.error(f"--extend {args.extend}: it has every variant already; nothing to run")
    sweep.main(sweep_argv)  # writes the runs; the analysis is added below
    result = json.loads(out.read_text())
    result["sweep_command"], result["command"] = (
        result["command"],
        "python -m benchmarks.frontier " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
    )
    if earlier:
        result = merge(result, earlier, kept, args.extend)
    result["frontier"] = analyse(result["runs"], algorithms)
    result["wall_seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result["frontier"], out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result["frontier"].items() if k != "points"}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
