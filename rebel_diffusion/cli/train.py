"""``rebel-diffusion train``: every ``TrainConfig`` field is a flag (``--field-name``), plus
``--config FILE.yaml`` and ``--preset NAME``. Exit status: 0 when done, 130/143 when stopped by
SIGINT/SIGTERM (with a checkpoint), 1 when a fault stopped it, 2 for a usage error."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import signal
import sys

import torch

from ..config import PRESETS, RENAMED, TrainConfig, field_help, field_type, resolve_config
from ..errors import RunError, first_line
from ..outputs import run_folder
from ..training.recipe import train
from .common import DeprecatedAlias

HELP = "fine-tune a model toward a reward with REBEL (or DDPO)"
OOM_HINT = (
    "lower --train-batch-size (raising --gradient-accumulation-steps keeps the optimizer step), "
    "--steps-per-pass or --grid-num-images, or add --gradient-checkpointing"
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; unset flags stay unset (so the config file and preset below them show)."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields (flags override it)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a bundle of defaults: " + ", ".join(f"{k} ({v.get('model', 'any model')})" for k, v in PRESETS.items()),
    )
    for f in dataclasses.fields(TrainConfig):
        tp = field_type(f.name)
        kwargs = dict(dest=f.name, default=argparse.SUPPRESS, help=field_help(f.name))
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(_flag(f.name), type=tp, choices=f.metadata["choices"], **kwargs)
    parser.add_argument(
        "--quiet", dest="progress", action="store_const", const="none", default=argparse.SUPPRESS,
        help="warnings and errors only: the same as --progress none",
    )  # fmt: skip
    for old, new in RENAMED.items():
        parser.add_argument(
            _flag(old),
            dest=new,
            type=field_type(new),
            default=argparse.SUPPRESS,
            action=DeprecatedAlias,
            new_flag=_flag(new),
        )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return resolve_config(
        flags,
        config_file=getattr(args, "config", None),
        preset=getattr(args, "preset", None),
        read_run=run_folder.read_run_config,
    )


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        result = train(cfg)
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this epoch, the exit status of SIGINT
        print(f"\nstopped at once (second Ctrl-C); {run_folder.next_step(cfg.output_dir)}", file=sys.stderr)
        return 128 + int(signal.SIGINT)
    except (torch.OutOfMemoryError, MemoryError, RuntimeError, OSError) as e:
        message = fault_message(e, cfg.output_dir)
        if message is None:
            raise
        raise RunError(message) from e
    if result.stopped_by is not None:
        return 128 + int(result.stopped_by)  # 130 for SIGINT, 143 for SIGTERM, as shells report it
    return 0


def fault_message(e: BaseException, out=None) -> str | None:
    """One line for a fault of memory or the OS, saying what to do (with ``out``, the run folder:
    what continues it); None for anything else (a bug)."""
    text = first_line(e)
    then = run_folder.next_step(out) if out is not None else "continue with --resume"
    if (
        isinstance(e, torch.OutOfMemoryError | MemoryError)
        or "can't allocate memory" in text
        or ("not enough memory" in text)
    ):
        return f"out of memory ({text[:120]}); {OOM_HINT}, then {then}"
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"{where}no space left on the device; free space, then {then}"
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"{where}{e.strerror}: choose a writable --output-dir (or fix its permissions), then {then}"
        return f"{where}{e.strerror or text}; fix that, then {then}"
    return None
