"""Time a train command exactly as a user types it, and write one JSON.

    rebel-diffusion train --preset toy --output-dir DIR      (the quick start; --command changes it)

(target: under 3 minutes on a 2-core CPU). The command runs in a subprocess (startup and
imports included) into a temporary folder; the JSON records the wall time, the per-epoch
``images_per_second``, the plan and CPU threads the run used, the machine (CPU count, load
average before and after) and the versions. ``--variant "ARGS"`` adds a variant of the command
with extra arguments, run interleaved with the command as typed (so ratios come from one session).

Run from the repository root::

    python -m benchmarks.demo                                    # benchmarks/results/demo_cpu_DATE.json
    python -m benchmarks.demo --variant "--num-threads 1" --repeats 2  # the default threads vs one
    python -m benchmarks.demo --variant "--num-threads 2" --busy 1  # threads, on a machine kept busy
    python -m benchmarks.demo --command "train --model tiny --reward jpeg-compressibility --epochs 3"

``--busy N`` keeps N CPU-bound processes spinning while the commands run (a shared or busy
machine, as users' often are); their count is in the JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import env
from rebel_diffusion.outputs import run_folder

QUICK_START = "train --preset toy"


def run_demo(command: list[str], extra: list[str]) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="rebel-demo-"))
    out = folder / "demo"
    cmd = [sys.executable, "-m", "rebel_diffusion", *command, "--output-dir", str(out), *extra]
    load_before = env.load_average()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=env.REPO, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - t0
    try:
        if r.returncode != 0:
            return {"command": cmd, "returncode": r.returncode, "stderr_tail": r.stderr[-2000:]}
        metrics = [json.loads(line) for line in (out / run_folder.METRICS).read_text().splitlines() if line.strip()]
        plan = next((line.strip() for line in r.stdout.splitlines() if line.strip().startswith("per epoch:")), None)
        threads = re.search(r"(\d+) CPU thread", r.stdout)
        return {
            "command": ["rebel-diffusion", *command, "--output-dir", "DIR", *extra],
            "returncode": 0,
            "wall_seconds": round(wall, 2),
            "under_3_minutes": wall < 180,
            "plan": plan,
            "cpu_threads": int(threads.group(1)) if threads else None,
            "epochs": [
                {
                    k: m.get(k)
                    for k in (
                        "epoch",
                        "images_per_second",
                        "sample_seconds",
                        "train_seconds",
                        "loss",
                        "rescore_drift",
                    )
                }
                for m in metrics
                if m["epoch"] > 0
            ],
            "load_average": {"before": load_before, "after": env.load_average()},
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _spin() -> None:
    while True:
        pass


def busy_processes(n: int) -> list:
    """n started processes that each keep one CPU busy until terminated."""
    import multiprocessing

    procs = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    return procs


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.demo", description=__doc__.splitlines()[0])
    p.add_argument("--command", default=QUICK_START, help="the rebel-diffusion command timed, less --output-dir")
    p.add_argument("--repeats", type=int, default=1, help="rounds; each runs every variant once")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar='"ARGS"',
        help="extra arguments of a variant of the command (repeatable)",
    )
    p.add_argument("--busy", type=int, default=0, help="CPU-bound processes kept running during the timings")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/demo_cpu_DATE.json)")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    variants = [[], *[shlex.split(v) for v in args.variant]]
    environment = env.record(device)  # before the runs: the load average they started under
    device_info = env.device_info(device)
    spinners = busy_processes(args.busy)
    try:
        runs = [run_demo(shlex.split(args.command), extra) for _ in range(args.repeats) for extra in variants]
    finally:
        for proc in spinners:
            proc.terminate()
    report = {
        "what": f"wall time of rebel-diffusion {args.command} (target: < 180 s on a 2-core CPU)",
        "date": dt.date.today().isoformat(),
        "device": device_info,
        "versions": environment["versions"],
        "git": environment["git"],
        "env": environment,
        "busy_processes": args.busy,
        "runs": runs,
    }
    out = Path(args.out) if args.out else env.RESULTS / f"demo_cpu_{report['date']}.json"
    env.write_json(out, report)
    for r in runs:
        print(f"{r.get('wall_seconds')} s (exit {r['returncode']})" + (f": {r['plan']}" if r.get("plan") else ""))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
