"""The run folder: its layout, its checkpoints and exported weights, and the checks made before
anything in it is written or deleted. The one module that knows these file names::

    OUTPUT_DIR/
      run.json              the marker: a rebel-diffusion run (format, process count); written last at start
      config.yaml           the resolved configuration; changes only when a run (or its resume) starts
      metrics.jsonl, reward_curve.png, grids/epoch_NNNN.png (``grid_path``)
      checkpoints/epoch_NNNN/   complete checkpoints, written atomically:
          state.json            epoch and optimizer step; present only in a complete checkpoint
          trainable.safetensors the trainable weights (LoRA or whole UNet), by parameter name
          ema.safetensors       their exponential moving average (only with --ema-decay)
          optimizer.pt, lr_scheduler.pt, tracker.json, rng_<process>.pt
      lora/pytorch_lora_weights.safetensors or unet/   the exported weights, for plain diffusers
      samples/, eval/       what ``sample`` and ``eval`` write by default

``read_run_config`` reads config.yaml back as the ``TrainConfig`` that ran, whichever release wrote it.
Writing a checkpoint (``begin_checkpoint``, ``write_process_state``, ``write_shared_state``,
``commit_checkpoint``) is split into phases so that several processes can each write their own
RNG state between barriers; ``read_checkpoint`` reads one back. ``find_weights`` and
``apply_weights`` give the inference commands the fine-tune of a run, a checkpoint or a LoRA.

``--overwrite`` deletes a folder only when it carries the marker (or, for runs written before the
marker existed, config.yaml beside checkpoints/), never the current, home or root folder, and only
once every check of the new run has passed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from .. import config
from ..errors import UsageError
from ..files import atomic_write_text, readable_tree, replace_dir
from ..models import BUILTIN_MODELS, LORA_FILE, add_lora, load_lora, load_unet, parse_lora_targets, save_lora

MARKER = "run.json"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
REWARD_CURVE = "reward_curve.png"
GRIDS = "grids"
CHECKPOINTS = "checkpoints"
STATE = "state.json"  # inside a checkpoint: its epoch; present only in a complete one
TRAINABLE = "trainable.safetensors"  # inside a checkpoint: the trainable weights (LoRA or UNet)
EMA = "ema.safetensors"  # inside a checkpoint, with --ema-decay: the EMA of the trainable weights
OPTIMIZER = "optimizer.pt"
LR_SCHEDULER = "lr_scheduler.pt"
TRACKER = "tracker.json"
LORA_DIR = "lora"  # exported LoRA, diffusers' file name inside (models.LORA_FILE)
UNET_DIR = "unet"  # exported full fine-tune, a diffusers UNet folder
SAMPLES_DIR = "samples"  # sample's default output folder (samples_2, ... when used)
EVAL_DIR = "eval"  # eval's default output folder
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
    done = complete_checkpoints(out)
    return done[-1] if done else None


def complete_checkpoints(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (incomplete and temporary ones are left out)."""
    folder = Path(out) / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("epoch_*") if p.is_dir() and (p / STATE).is_file()), key=_natural_key)


def _natural_key(path: Path):
    # epoch_9999 before epoch_10000.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def grid_path(out: Path, epoch: int) -> Path:
    """``grids/epoch_NNNN.png``: the fixed-prompt grid of epoch ``epoch``."""
    return Path(out) / GRIDS / f"epoch_{epoch:04d}.png"


def epoch_grids(out: Path) -> list[tuple[int, Path]]:
    """[(epoch, grid)] of the grids a run has written, in epoch order."""
    folder = Path(out) / GRIDS
    found = (re.fullmatch(r"epoch_(\d+)\.png", p.name) for p in folder.glob("epoch_*.png")) if folder.is_dir() else ()
    return sorted((int(m.group(1)), folder / m.group(0)) for m in found if m)


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
            if is_run_folder(out):
                raise UsageError(
                    f"--resume: {out} has no checkpoint (the run stopped before its first one): nothing to "
                    "resume; run the same command without --resume to start it again"
                )
            raise UsageError(f"--resume: {out} has no checkpoint to resume from ({CHECKPOINTS}/epoch_NNNN)")
    elif out.exists() and any(out.iterdir()):
        if not overwrite and not is_restartable(out):
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


def is_restartable(out: Path) -> bool:
    """A run that stopped before its first checkpoint: nothing to resume, so the same command
    starts it again (replacing what it wrote) without --overwrite."""
    out = Path(out)
    return is_run_folder(out) and latest_checkpoint(out) is None and not _protected(out)


def next_step(out: Path) -> str:
    """What continues a run that stopped: --resume from its newest checkpoint, or, before the first
    checkpoint, the same command again (``is_restartable``)."""
    last = latest_checkpoint(out)
    if last is not None:
        return f"continue with --resume (from {last.name}, which is intact)"
    return "no checkpoint was written yet: run the same command again to start over"


def start(out: Path, config_yaml: str, *, num_processes: int, overwrite: bool) -> None:
    """Lay out a new run folder (replacing an old run when ``overwrite``, or one that stopped before
    its first checkpoint): the first write of a run, made only once every check has passed."""
    out = Path(out)
    if out.exists() and is_run_folder(out) and not _protected(out) and (overwrite or is_restartable(out)):
        shutil.rmtree(out)
    (out / GRIDS).mkdir(parents=True, exist_ok=True)
    (out / CHECKPOINTS).mkdir(exist_ok=True)
    write_config(out, config_yaml)
    atomic_write_text(out / MARKER, json.dumps({"format": FORMAT, "num_processes": num_processes}) + "\n")


def write_config(out: Path, config_yaml: str) -> None:
    atomic_write_text(Path(out) / CONFIG, config_yaml)


# ----------------------------------------------------------------------------------------------
# The run's configuration


def find_run(path: str | Path) -> Path:
    """The run folder at ``path``: the folder itself or one of its two parents (``path`` may be a
    checkpoint or ``lora/``), the first that holds a config.yaml. ``UsageError`` when none does."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{path}: no such folder")
    run_dir = _run_of(path)
    if run_dir is None:
        raise UsageError(
            f"{path}: not a training run folder (no {CONFIG}); "
            "pass a LoRA with --finetune and its base model with --model instead"
        )
    return run_dir


def _run_of(path: Path) -> Path | None:
    return next((d for d in (path, path.parent, path.parent.parent) if (d / CONFIG).is_file()), None)


def read_run_config(run_dir: str | Path) -> config.TrainConfig:
    """The ``TrainConfig`` a run trained with, read from its config.yaml as ``--resume`` reads it.

    Field names of an earlier release read as today's (``config.RENAMED``), and fields its release
    did not write take their defaults, except ``anchor``: runs from before it regressed against the
    sampling policy. Values are checked as ``TrainConfig.validate`` checks them, and nothing outside
    the file is (a prompts file may have moved since). ``output_dir`` is where the run is now.
    A file that does not read this way is a one-line ``UsageError`` that names it.
    """
    run_dir = Path(run_dir).expanduser()
    path = run_dir / CONFIG
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a training run folder (no {CONFIG})")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot be read ({e})") from e
    except yaml.YAMLError as e:
        raise UsageError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    fix = "(edit the file, or read the run with the rebel-diffusion release that wrote it)"
    try:
        cfg = config.config_from_stored({**values, "output_dir": str(run_dir)}, str(path))
    except UsageError as e:
        raise UsageError(f"{e} {fix}") from e
    return cfg


# ----------------------------------------------------------------------------------------------
# Checkpoints: write (in phases, for several processes), read, prune


def checkpoint_dir(out: Path, epoch: int) -> Path:
    return Path(out) / CHECKPOINTS / f"epoch_{epoch:04d}"


def _temp_dir(out: Path, epoch: int) -> Path:
    return Path(out) / CHECKPOINTS / f".tmp-epoch_{epoch:04d}"


def _rng_file(process_index: int) -> str:
    return f"rng_{process_index}.pt"


def begin_checkpoint(out: Path, epoch: int) -> Path:
    """Create the (empty) temporary folder of checkpoint ``epoch``; the main process calls this once."""
    tmp = _temp_dir(out, epoch)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_process_state(out: Path, epoch: int, process_index: int, rng: dict) -> None:
    """Each process's own part of the checkpoint: its RNG state."""
    torch.save(rng, _temp_dir(out, epoch) / _rng_file(process_index))


def write_shared_state(out: Path, epoch: int, state: dict) -> None:
    """What all processes share, written once: weights {name: tensor}, optimizer and LR-schedule
    state dicts, the stat tracker's JSON state, and ``global_step``. ``state.json`` goes last: it
    marks the checkpoint complete."""
    from safetensors.torch import save_file

    tmp = _temp_dir(out, epoch)
    save_file(state["weights"], str(tmp / TRAINABLE))
    if state.get("ema") is not None:
        save_file(state["ema"], str(tmp / EMA))
    torch.save(state["optimizer"], tmp / OPTIMIZER)
    torch.save(state["lr_scheduler"], tmp / LR_SCHEDULER)
    (tmp / TRACKER).write_text(json.dumps(state["tracker"]))
    (tmp / STATE).write_text(json.dumps({"epoch": epoch, "global_step": state["global_step"]}))


def commit_checkpoint(out: Path, epoch: int, *, keep: int) -> Path:
    """Rename the temporary folder into place (atomic) and delete all but the newest ``keep``."""
    tmp, final = _temp_dir(out, epoch), checkpoint_dir(out, epoch)
    readable_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(old)
    return final


def abort_checkpoint(out: Path, epoch: int) -> None:
    """Remove what a failed write left; the previous checkpoints are untouched."""
    shutil.rmtree(_temp_dir(out, epoch), ignore_errors=True)


def read_checkpoint(folder: Path, process_index: int = 0) -> dict:
    """A checkpoint back as written: the keys of ``write_shared_state`` plus ``epoch`` and ``rng``
    (None when this process has no RNG file: another process count). Raises what the readers raise."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / STATE).read_text())
    rng = folder / _rng_file(process_index)
    return {
        "epoch": int(meta["epoch"]),
        "global_step": int(meta["global_step"]),
        "weights": load_file(str(folder / TRAINABLE)),
        "ema": load_file(str(folder / EMA)) if (folder / EMA).is_file() else None,
        "optimizer": torch.load(folder / OPTIMIZER, map_location="cpu", weights_only=True),
        "lr_scheduler": torch.load(folder / LR_SCHEDULER, weights_only=True),
        "tracker": json.loads((folder / TRACKER).read_text()),
        "rng": torch.load(rng, weights_only=False) if rng.is_file() else None,
    }


def load_trainable(unet, weights: dict[str, torch.Tensor], where: Path) -> None:
    """Copy checkpoint weights {parameter name: tensor} into ``unet``; a weight the UNet lacks, or of
    another shape, is a one-line ``UsageError``."""
    named = dict(unet.named_parameters())
    unknown = [k for k in weights if k not in named]
    misfit = [k for k in weights if k in named and named[k].shape != weights[k].shape]
    if unknown or misfit:
        bad = (unknown or misfit)[0]
        raise UsageError(
            f"{where}: this checkpoint does not fit the model ({len(unknown) + len(misfit)} weights do not "
            f"match, e.g. {bad})"
        )
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value.to(device=named[name].device, dtype=named[name].dtype))


# ----------------------------------------------------------------------------------------------
# Exported weights, and the fine-tune the inference commands apply


def export_weights(out: Path, unet, finetune: str) -> Path:
    """Refresh lora/ (``finetune='lora'``) or unet/ (``'full'``) for plain diffusers; atomic."""
    if finetune == "lora":
        return save_lora(unet, Path(out) / LORA_DIR)
    tmp = Path(out) / f".{UNET_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    unet.save_pretrained(str(tmp), safe_serialization=True)
    replace_dir(tmp, Path(out) / UNET_DIR)
    return Path(out) / UNET_DIR


def is_checkpoint(folder: Path) -> bool:
    """A trainer checkpoint (``checkpoints/epoch_NNNN``): raw trainable weights, no diffusers LoRA."""
    return (Path(folder) / TRAINABLE).is_file() and not (Path(folder) / LORA_DIR).is_dir()


def _lora_file(folder: Path) -> Path | None:
    if folder.is_file():
        return folder if folder.suffix == ".safetensors" else None
    for cand in (folder / LORA_FILE, folder / LORA_DIR / LORA_FILE):
        if cand.is_file():
            return cand
    return None


def _unet_dir(folder: Path) -> Path | None:
    for cand in (folder / UNET_DIR, folder):
        if (cand / "config.json").is_file() and (cand / "diffusion_pytorch_model.safetensors").is_file():
            return cand
    return None


def find_weights(path: str | Path) -> Path:
    """The fine-tuned weights at ``path``: a LoRA file or folder, a unet/ folder, a checkpoint, or a
    run folder (its lora/ or unet/, else its newest complete checkpoint). ``UsageError`` if none."""
    path = Path(path).expanduser()
    if _lora_file(path) or _unet_dir(path) or is_checkpoint(path):
        return path
    last = latest_checkpoint(path)
    if last is not None:
        return last
    raise UsageError(
        f"{path}: no fine-tuned weights: no {LORA_DIR}/{LORA_FILE}, no {UNET_DIR}/ folder and no complete "
        f"checkpoint under {CHECKPOINTS}/ (has training saved anything yet?)"
    )


def apply_weights(pipe, path: Path) -> str:
    """Apply the fine-tune ``find_weights`` found to ``pipe``: 'lora', 'unet' or 'checkpoint'.

    A checkpoint's LoRA layout (rank, alpha, targets) comes from its run's config.yaml
    (``read_run_config``). A misfit is a one-line UsageError.
    """
    path = Path(path)
    if is_checkpoint(path):
        apply_checkpoint(pipe, path)
        return "checkpoint"
    lora = _lora_file(path)
    if lora is not None:
        load_lora(pipe, lora)
        return "lora"
    unet = _unet_dir(path)
    if unet is not None:
        load_unet(pipe, unet)
        return "unet"
    raise UsageError(
        f"{path}: holds no LoRA ({LORA_DIR}/{LORA_FILE}) and no {UNET_DIR}/ folder; "
        "pass a training run folder or its lora/ folder"
    )


def apply_checkpoint(pipe, folder: Path) -> None:
    """Load checkpoint ``folder``'s trainable weights into ``pipe.unet`` (adding the run's LoRA first,
    with the rank, alpha and targets of ``read_run_config``); their EMA where the run kept one
    (``--ema-decay``), as the exported LoRA holds."""
    from safetensors.torch import load_file

    folder = Path(folder)
    run_dir = _run_of(folder)
    if run_dir is None:
        raise UsageError(
            f"{folder}: a checkpoint's LoRA layout is in its run's {CONFIG}, found neither here nor "
            f"two folders up; pass the run folder (or its {LORA_DIR}/) instead"
        )
    cfg = read_run_config(run_dir)
    try:
        weights = load_file(str(folder / (EMA if (folder / EMA).is_file() else TRAINABLE)))
    except Exception as e:
        raise UsageError(f"{folder / TRAINABLE}: cannot be read ({type(e).__name__}: {e})") from e
    if cfg.finetune == "lora":
        add_lora(
            pipe.unet,
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            target_modules=parse_lora_targets(cfg.lora_targets),
        )
    load_trainable(pipe.unet, weights, folder)


MODEL_CARD = "README.md"  # inside lora/ (or unet/): the Hugging Face model card
CARD_GRID = "grid.png"


def write_model_card(
    out: Path, cfg: config.TrainConfig, metrics: list[dict], sdxl: bool = False, sampler: str | None = None
) -> Path:
    """``lora/README.md`` (or ``unet/``): a Hugging Face model card with the base model and its
    architecture (``sdxl``: SDXL, else Stable Diffusion), reward, algorithm, the sampler that ran
    (``sampler``, resolved; default the config's), whether the weights are an EMA, the key figures
    of epoch 0 and the last epoch, the last grid (copied beside it), and code that loads it.
    ``cfg``: the run's ``TrainConfig``."""
    out = Path(out)
    folder = out / (LORA_DIR if cfg.finetune == "lora" else UNET_DIR)
    grids = epoch_grids(out)
    if grids:
        shutil.copyfile(grids[-1][1], folder / CARD_GRID)
    epochs = [m for m in metrics if isinstance(m.get("epoch"), int)]
    first, last = (epochs[0], epochs[-1]) if epochs else ({}, {})
    keys = ["reward_mean", "grid_reward_mean"] + sorted(k for k in last if k.startswith("heldout/"))
    rows = [f"| {k} | {_fmt(first.get(k))} | {_fmt(last.get(k))} |" for k in keys if k in last]
    front = {
        "base_model": cfg.model,
        "library_name": "diffusers",
        "tags": [
            *(["stable-diffusion-xl", "stable-diffusion-xl-diffusers"] if sdxl else ["stable-diffusion"]),
            "text-to-image",
            "diffusers",
            "lora" if folder.name == LORA_DIR else "unet",
            "reinforcement-learning",
            "rebel-diffusion",
            cfg.algorithm,
        ],
        "pipeline_tag": "text-to-image",
    }
    heldout = any(k.startswith("heldout/") for k in keys if k in last)
    ema = cfg.ema_decay
    text = (
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n"
        f"# {out.name}\n\n"
        f"A {'LoRA' if folder.name == LORA_DIR else 'fine-tuned UNet'} of the "
        f"{'SDXL' if sdxl else 'Stable Diffusion'} model `{cfg.model}` trained with "
        f"rebel-diffusion ({cfg.algorithm.upper()}) toward the reward "
        f"`{cfg.reward}`: {last.get('epoch', 0)} epochs of {cfg.num_steps} "
        f"{sampler or cfg.sampler} steps at guidance {cfg.guidance_scale}."
        + (f" The weights are an exponential moving average (decay {ema:g}) of the trained ones." if ema else "")
        + "\n\n"
        + (f"![the last epoch's grid]({CARD_GRID})\n\n" if grids else "")
        + "| metric | base (epoch 0) | last epoch |\n|---|---:|---:|\n"
        + "\n".join(rows)
        + "\n\n"
        + ("Held-out figures (`heldout/...`) are on prompts never trained on.\n\n" if heldout else "")
        + _files_section(folder.name == LORA_DIR)
        + _use_section(cfg, lora=folder.name == LORA_DIR, folder=folder.name)
    )
    atomic_write_text(folder / MODEL_CARD, text)
    return folder / MODEL_CARD


def _files_section(lora: bool) -> str:
    if not lora:
        return "## Files\n\n`config.json` and the weights: a diffusers `UNet2DConditionModel` folder.\n\n"
    return (
        "## Files\n\n"
        "| file | for |\n|---|---|\n"
        "| `pytorch_lora_weights.safetensors` | diffusers: `pipe.load_lora_weights(folder)` |\n"
        "| `adapter_model.safetensors`, `adapter_config.json` | PEFT: `PeftModel.from_pretrained(unet, folder)` |\n"
        "| `lora_kohya.safetensors` | ComfyUI and AUTOMATIC1111 / Forge (kohya's format): their LoRA folder |\n\n"
    )


def _use_section(cfg: config.TrainConfig, *, lora: bool, folder: str) -> str:
    """Code that loads the base and this fine-tune, run from the run folder: diffusers for a model
    it can load by name or path, rebel-diffusion's loader for a built-in base (``toy``...)."""
    model, vae = cfg.model, cfg.vae
    builtin = model in BUILTIN_MODELS
    lines = (
        ["from rebel_diffusion.models import load_pipeline"]
        if builtin
        else ["from diffusers import DiffusionPipeline"]
    )
    if vae:
        lines += ["from diffusers import AutoencoderKL"]
    if not lora:
        lines += ["from diffusers import UNet2DConditionModel"]
    lines += ["", "# run from the run folder (the one that holds this card's folder)"]
    if builtin:
        lines += [f'pipe = load_pipeline("{model}"{f", vae={vae!r}" if vae else ""})  # a rebel-diffusion built-in']
    elif vae:
        lines += [
            f'vae = AutoencoderKL.from_pretrained("{vae}")',
            f'pipe = DiffusionPipeline.from_pretrained("{model}", vae=vae)',
        ]
    else:
        lines += [f'pipe = DiffusionPipeline.from_pretrained("{model}")']
    if lora:
        lines += [f'pipe.load_lora_weights("{folder}")']
    else:
        lines += [f'pipe.unet = UNet2DConditionModel.from_pretrained("{folder}").to(pipe.device, pipe.unet.dtype)']
    return "## Use\n\n```python\n" + "\n".join(lines) + "\n```\n"


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, int | float) else "-"
