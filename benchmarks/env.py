"""What every benchmark JSON records about where it ran: the machine, the versions, the load, git.

``record(device)`` is the one block every benchmark writes under ``"env"``::

    {"date", "platform", "processor", "cpu_count", "cpu_affinity", "memory_total_gib", "torch_threads",
     "load_average", "versions": {python, torch, diffusers, transformers, peft, accelerate, ...},
     "cuda": {name, capability, memory_gib, ...} or None, "git": {"commit", "dirty"}}

The smaller helpers (``device_info``, ``versions``, ``git_state``, ``load_average``) build it and
the per-benchmark keys kept beside it. Print it for this machine with ``python -m benchmarks.env``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"

# Installed distributions, read from their metadata: no import (open_clip and xformers import slowly).
DISTRIBUTIONS = {
    "diffusers": "diffusers",
    "transformers": "transformers",
    "peft": "peft",
    "accelerate": "accelerate",
    "open_clip": "open_clip_torch",
    "xformers": "xformers",
    "pillow": "pillow",
    "numpy": "numpy",
}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU model."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: torch.device) -> str:
    """File-name tag of a device: ``cpu``, or the GPU's name (``nvidia-h200``)."""
    device = torch.device(device)
    return "cpu" if device.type != "cuda" else slug(device_name(device))


def memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def cpu_affinity() -> int | None:
    """CPUs this process may run on (a container or taskset may allow fewer than ``cpu_count``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None


def cuda_info(device: torch.device | None = None) -> dict | None:
    """Name, compute capability and memory of ``device`` (default: the current CUDA device), or None."""
    if device is not None and torch.device(device).type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    device = torch.device(device if device is not None else "cuda")
    props = torch.cuda.get_device_properties(device)
    return {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 2),
        "multiprocessors": props.multi_processor_count,
        "count": torch.cuda.device_count(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }


def versions(device: torch.device | None = None) -> dict:
    """python, torch and the installed libraries' versions (None: not installed); CUDA's on a GPU."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name, dist in DISTRIBUTIONS.items():
        try:
            out[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[name] = None
    cuda = device is not None and torch.device(device).type == "cuda"
    out["cuda"] = torch.version.cuda if cuda else None
    out["cudnn"] = torch.backends.cudnn.version() if cuda else None
    return out


def git_state() -> dict:
    """HEAD commit and whether tracked files have uncommitted changes; None where git is unavailable."""

    def git(*cmd):
        try:
            r = subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def device_info(device: torch.device) -> dict:
    """The device a benchmark measured on, with the CPU count and the load average as it started."""
    device = torch.device(device)
    info = {
        "type": device.type,
        "name": device_name(device),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_affinity(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "memory_total_gib": memory_total_gib(),
    }
    gpu = cuda_info(device)
    if gpu:
        info.update(
            gpu_memory_gib=gpu["memory_gib"],
            capability=gpu["capability"],
            multiprocessors=gpu["multiprocessors"],
        )
    return info


def record(device: torch.device | str | None = None) -> dict:
    """The machine, versions, load average and git state, now (``device``: the one measured on)."""
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_affinity(),
        "memory_total_gib": memory_total_gib(),
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
        "device": str(device) if device is not None else None,
        "versions": versions(device),
        "cuda": cuda_info(device),
        "git": git_state(),
    }


def default_out(prefix: str, device: torch.device, folder: str | os.PathLike | None = None) -> Path:
    """``<folder>/<prefix>_<device>_<date>.json`` (folder: benchmarks/results), never an existing file."""
    folder = Path(folder) if folder else RESULTS
    base = folder / f"{prefix}_{device_tag(device)}_{dt.date.today().isoformat()}"
    out, i = base.with_suffix(".json"), 2
    while out.exists():  # never overwrite an earlier run
        out, i = Path(f"{base}_{i}.json"), i + 1
    return out


def write_json(path: str | os.PathLike, data: dict, indent: int = 2) -> Path:
    """Write ``data`` to ``path`` through a temporary file: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    print(json.dumps(record("cuda" if torch.cuda.is_available() else "cpu"), indent=2))
