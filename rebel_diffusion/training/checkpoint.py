"""A run's training state: captured, restored, saved as a checkpoint and loaded back exactly.

The state is everything an uninterrupted run would carry into the next epoch: the trainable
weights, the optimizer, the learning-rate schedule, the reward-normalisation tracker, the step
count, the EMA and each process's RNG. ``run_folder`` owns the files; this module decides what
goes in them and puts it back. ``run`` is the recipe's ``Run`` (only the attributes named here
are used).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import RunError, UsageError, first_line
from ..models.components import is_sdxl
from ..outputs import report, run_folder
from .distributed import check_in_sync
from .ema import ema_swapped_in


def trainable_named(run) -> dict[str, torch.nn.Parameter]:
    """The trained UNet's trainable parameters by name (unwrapped from DDP)."""
    unet = run.accelerator.unwrap_model(run.unet)
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def capture_state(run) -> dict:
    """Everything a checkpoint holds, copied to the CPU now."""
    return {
        # A copy, also on the CPU (where .float().cpu() would alias the live weights a cut-short epoch changes).
        "weights": {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in trainable_named(run).items()},
        "optimizer": _cpu_clone(run.optimizer.state_dict()),
        "lr_scheduler": _cpu_clone(run.lr_scheduler.state_dict()),
        "tracker": json.loads(json.dumps(run.tracker.state_dict())),
        "global_step": run.global_step,
        "rng": rng_state(),
        "ema": None if run.ema is None else {n: v.detach().cpu().clone().contiguous() for n, v in run.ema.items()},
    }


def restore_state(run, state: dict) -> None:
    """Put a ``capture_state`` snapshot back: weights, optimizer, schedule, tracker, step count, EMA."""
    named = dict(run.accelerator.unwrap_model(run.unet).named_parameters())
    with torch.no_grad():
        for name, value in state["weights"].items():
            named[name].copy_(value.to(named[name].device))
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    run.tracker.load_state_dict(state["tracker"])
    run.global_step = state["global_step"]
    if run.ema is not None:
        if state.get("ema") is None:
            raise ValueError("the checkpoint has no EMA weights (the run was trained without --ema-decay)")
        for name, value in state["ema"].items():
            run.ema[name].copy_(value.to(run.ema[name].device))


def save_checkpoint(run, epoch: int, state: dict | None = None) -> Path:
    """Write checkpoints/epoch_NNNN atomically (a temp folder renamed when complete), on every process.

    ``state``: from ``capture_state`` (default: now). Keeps the last ``checkpoints_keep``; refreshes
    lora/ (or unet/) for plain diffusers use. A write that fails (disk full, read-only) removes the
    temp folder and raises ``RunError``: the previous checkpoint stays intact.
    """
    acc = run.accelerator
    state = state or capture_state(run)
    check_in_sync(acc, state["weights"])
    try:
        if acc.is_main_process:
            run_folder.begin_checkpoint(run.out, epoch)
        acc.wait_for_everyone()
        run_folder.write_process_state(run.out, epoch, acc.process_index, state["rng"])
        if acc.is_main_process:
            run_folder.write_shared_state(run.out, epoch, state)
        acc.wait_for_everyone()
        if acc.is_main_process:
            run_folder.commit_checkpoint(run.out, epoch, keep=run.cfg.checkpoints_keep)
            with ema_swapped_in(trainable_named(run), run.ema):  # the exported LoRA holds the EMA
                run_folder.export_weights(run.out, acc.unwrap_model(run.unet), run.cfg.finetune)
            run_folder.write_model_card(
                run.out,
                run.cfg,
                report.read_metrics(run.out / run_folder.METRICS),
                sdxl=is_sdxl(run.unet),
                sampler=run.settings.sampler,
            )
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        run_folder.abort_checkpoint(run.out, epoch)
        name = run_folder.checkpoint_dir(run.out, epoch).name
        raise RunError(
            f"cannot write checkpoint {name} ({first_line(e)}); free disk space or fix the folder's "
            f"permissions, then {run_folder.next_step(run.out)}"
        ) from e
    acc.wait_for_everyone()
    run.checkpointed_epoch = epoch
    return run_folder.checkpoint_dir(run.out, epoch)


def load_checkpoint(run, folder: Path) -> None:
    """Restore a checkpoint written by ``save_checkpoint``; a damaged one is a one-line UsageError."""
    acc = run.accelerator
    try:
        state = run_folder.read_checkpoint(folder, acc.process_index)
        missing = set(trainable_named(run)) - set(state["weights"])
        if missing:
            raise ValueError(f"{len(missing)} trainable weights missing (another --finetune or LoRA layout?)")
        restore_state(run, state)
        if state["rng"] is not None:
            set_rng_state(state["rng"])
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        done = run_folder.complete_checkpoints(run.out)
        older = done[: done.index(Path(folder))] if Path(folder) in done else []
        hint = (
            f"; the one before it, {older[-1].name}, is complete: move {Path(folder).name} out of "
            f"{run_folder.CHECKPOINTS}/ and --resume continues from it"
            if older
            else ""
        )
        raise UsageError(f"--resume: checkpoint {folder} is damaged ({type(e).__name__}: {detail}){hint}") from e
    run.epoch = run.checkpointed_epoch = state["epoch"]
    acc.print(f"resumed from {folder} (epoch {run.epoch})")


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_clone(v) for v in obj)
    return obj
