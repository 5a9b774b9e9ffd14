"""The run folder: its layout, its marker, and the checks made before anything in it is written or deleted.

    OUTPUT_DIR/
      run.json              the marker: a rebel-diffusion run (format, process count); written last at start
      config.yaml           the resolved configuration; changes only when a run (or its resume) starts
      metrics.jsonl, reward_curve.png, grids/epoch_NNNN.png
      checkpoints/epoch_NNNN/   complete checkpoints (each has state.json; written atomically)
      lora/ or unet/        the exported weights, for plain diffusers

``--overwrite`` deletes a folder only when it carries the marker (or, for runs written before the
marker existed, config.yaml beside checkpoints/), never the current, home or root folder, and only
once every check of the new run has passed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UsageError

MARKER = "run.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
GRIDS = "grids"
CHECKPOINTS = "checkpoints"
STATE = "state.json"  # inside a checkpoint: its epoch; present only in a complete one
TRAINABLE = "trainable.safetensors"  # inside a checkpoint: the trainable weights (LoRA or UNet)
FORMAT = 2  # 1: eta per latent dim and per-prompt statistics by default (before run.json existed)


def is_run_folder(path: Path) -> bool:
    """A folder written by ``rebel-diffusion train`` (its marker, or the layout of a format-1 run)."""
    path = Path(path)
    return (path / MARKER).is_file() or ((path / CONFIG).is_file() and (path / CHECKPOINTS).is_dir())


def read_marker(path: Path) -> dict:
    """The marker's contents; a format-1 run (no marker) reads as ``{"format": 1}``."""
    try:
        return json.loads((Path(path) / MARKER).read_text())
    except FileNotFoundError:
        return {"format": 1}
    except (OSError, ValueError) as e:
        raise UsageError(f"{Path(path) / MARKER}: cannot be read ({e})") from e


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (``checkpoints/epoch_NNNN`` with its state.json), or None."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("epoch_*") if p.is_dir() and (p / STATE).is_file())
    return done[-1] if done else None


def _protected(path: Path) -> bool:
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    return resolved in {Path("/"), Path.home().resolve(), cwd} or resolved in cwd.parents


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Every check of --output-dir that can fail, before anything is written (nothing is changed here)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a folder: choose another --output-dir")
    if resume:
        if not latest_checkpoint(out):
            raise UsageError(f"--resume: {out} has no checkpoint to resume from ({CHECKPOINTS}/epoch_NNNN)")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(
                f"{out} already exists: pass --resume to continue that run, --overwrite to replace it, "
                "or another --output-dir"
            )
        if _protected(out):
            raise UsageError(f"--overwrite: refusing to delete {out}: it is the current, home or root folder")
        if not is_run_folder(out):
            raise UsageError(
                f"--overwrite: {out} is not a rebel-diffusion run (no {MARKER}); "
                "delete it yourself or choose another --output-dir"
            )
    check_writable(out)


def check_writable(out: Path) -> None:
    """Create and remove a probe file where the run will write: a read-only place fails now, in one line."""
    target = Path(out)
    while not target.exists():
        target = target.parent
    if not target.is_dir():
        raise UsageError(f"--output-dir {out}: {target} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".rebel-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"--output-dir {out}: cannot write in {target} ({e.strerror}); choose another folder") from e


def start(out: Path, config_yaml: str, *, num_processes: int, overwrite: bool) -> None:
    """Lay out a new run folder (replacing an old run when ``overwrite``): the first write of a run."""
    out = Path(out)
    if overwrite and out.exists() and is_run_folder(out) and not _protected(out):
        shutil.rmtree(out)
    (out / GRIDS).mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    write_config(out, config_yaml)
    atomic_write_text(out / MARKER, json.dumps({"format": FORMAT, "num_processes": num_processes}) + "\n")


def write_config(out: Path, config_yaml: str) -> None:
    atomic_write_text(Path(out) / CONFIG, config_yaml)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    readable_as_umask(tmp)
    os.replace(tmp, path)


def readable_tree(folder: Path) -> None:
    """``readable_as_umask`` for a folder and everything in it."""
    folder = Path(folder)
    readable_as_umask(folder)
    for p in folder.rglob("*"):
        readable_as_umask(p)


def readable_as_umask(path: Path) -> None:
    """Give ``path`` the permissions the umask allows (some writers create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    mode = (0o777 if Path(path).is_dir() else 0o666) & ~umask
    os.chmod(path, mode)
