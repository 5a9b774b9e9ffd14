"""Drawing images for the inference commands (sample, eval, preview): what to draw from, and drawing.

``resolve_source(run=..., model=..., finetune=...)`` names the base model, the fine-tune and the
run they came from (its ``TrainConfig``, as ``run_folder.read_run_config`` reads it); ``load_models``
builds a base and a fine-tuned pipeline that share what they can; ``sample_images`` draws image i of
prompt p from its own seed, so the same (prompt, seed) gives the same starting noise whichever model
draws it: base and fine-tuned outputs line up picture for picture. Plain arguments only: the
command-line glue lives in ``rebel_diffusion.cli``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import UsageError
from ..models import DEFAULT_MODEL, check_sd_components, load_pipeline
from . import run_folder

SAMPLES_MANIFEST = "samples.json"  # what ``write_samples`` wrote, and where (it marks a used folder)
GRID_TILE_MAX = 256  # grid tiles larger than this are downscaled: a 512px grid of 100 images is huge


@dataclass
class Source:
    """What to sample from: a base model, an optional fine-tune, and the run they came from
    (``config``: the run's ``TrainConfig``; None without a run)."""

    model: str
    finetune: Path | None = None
    run_dir: Path | None = None
    config: TrainConfig | None = None
    vae: str | None = None


def resolve_source(
    run: str | Path | None = None,
    model: str | None = None,
    finetune: str | Path | None = None,
    vae: str | None = None,
) -> Source:
    """The model, VAE, fine-tune and run config named by ``run``/``model``/``vae``/``finetune`` (the
    latter three win over the run's). The fine-tune is the run's lora/, unet/ or newest complete
    checkpoint; the VAE the run's ``--vae`` unless another is given (a new --model drops the run's)."""
    run_dir = cfg = None
    if run:
        try:
            run_dir = run_folder.find_run(run)
        except UsageError as e:
            raise UsageError(f"--run {e}") from e
        cfg = run_folder.read_run_config(run_dir)
    weights = None
    if finetune:
        p = Path(finetune).expanduser()
        if not p.exists():
            raise UsageError(f"--finetune {p}: no such file or folder")
        weights = run_folder.find_weights(p)
    elif run:
        weights = run_folder.find_weights(run)
    run_vae = cfg.vae if cfg is not None and not model else None
    return Source(
        model=model or (cfg.model if cfg is not None else DEFAULT_MODEL),
        finetune=weights,
        run_dir=run_dir,
        config=cfg,
        vae=vae or run_vae,
    )


def pick_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available, else CPU) or a torch device name; an unusable one is a UsageError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(idle, total) jiffies of ``cpus`` from Linux's /proc/stat, or None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    idle = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
            idle += ticks[3] + ticks[4]
            total += sum(ticks)
    return (idle, total) if total else None


def idle_cpus(window: float = 0.1) -> float:
    """How many of this process's CPUs sat idle over the next ``window`` seconds.

    Read from /proc/stat; where it is missing (not Linux), the CPUs less the 1-minute load average.
    """
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is not None:
        time.sleep(window)
        after = _cpu_times(cpus)
        if after is not None and after[1] > before[1]:
            return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else len(cpus) / 2
    return max(0.0, len(cpus) - load)


def default_num_threads(local_processes: int = 1) -> int:
    """The CPUs idle now shared among the local processes, at least 1.

    All of an idle machine's CPUs (an idle 2-core CPU trains the toy model 1.5x faster with 2
    threads than with 1), none that other work keeps busy: OpenMP threads that must share a CPU
    spin and wait for each other (2.3x slower on a busy 2-core machine).
    """
    return max(1, round(idle_cpus()) // max(1, local_processes))


def set_num_threads(value: int | None, local_processes: int = 1) -> int:
    """Set torch's CPU thread count (None: ``default_num_threads``); returns it."""
    if value is not None and value < 1:
        raise UsageError(f"--num-threads must be >= 1, got {value}")
    n = value or default_num_threads(local_processes)
    torch.set_num_threads(n)
    return n


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' (fp16 on a GPU, fp32 on a CPU), 'fp32', 'fp16' or 'bf16'."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


# ----------------------------------------------------------------------------------------------
# Models


def fork_pipeline(pipe):
    """A second pipeline sharing ``pipe``'s VAE, tokenizer and scheduler, with its own copy of
    the UNet and text encoder (which a fine-tune may change): half the memory of loading twice."""
    components = dict(pipe.components)
    components["unet"] = copy.deepcopy(pipe.unet)
    components["text_encoder"] = copy.deepcopy(pipe.text_encoder)
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        components["requires_safety_checker"] = False
    fork = type(pipe)(**components)
    fork.set_progress_bar_config(disable=True)
    return fork


def load_models(source: Source, *, device, dtype, with_base: bool):
    """(base pipeline or None, fine-tuned pipeline), built once.

    Without a fine-tune the two are the same object. Raises ``UsageError`` when the model cannot
    be loaded or the fine-tune does not fit it.
    """
    pipe = load_pipeline(source.model, dtype=dtype, device=device, vae=source.vae)
    check_sd_components(pipe, source.model)
    if source.finetune is None:
        return (pipe if with_base else None), pipe
    tuned = fork_pipeline(pipe) if with_base else pipe
    try:
        with _quiet_diffusers():  # its logger prints the whole state-dict error before ours
            run_folder.apply_weights(tuned, source.finetune)
    except UsageError as e:
        detail = _mismatch_detail(e.__cause__)
        if detail is None:
            raise
        raise UsageError(f"{source.finetune}: this fine-tune does not fit the model {source.model} ({detail})") from e
    return (pipe if with_base else None), tuned


class _quiet_diffusers:
    """Silence diffusers' logger (errors and warnings) inside the block; they become UsageErrors."""

    def __enter__(self):
        from diffusers.utils import logging

        self._level = logging.get_verbosity()
        logging.set_verbosity(logging.CRITICAL)

    def __exit__(self, *exc):
        from diffusers.utils import logging

        logging.set_verbosity(self._level)
        return False


def _mismatch_detail(cause: BaseException | None) -> str | None:
    """'size mismatch for X: ... shape A ... shape B' from a load_state_dict error, shortened."""
    for line in str(cause or "").splitlines():
        m = re.search(
            r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) "
            r"from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))",
            line,
        )
        if m:
            return f"e.g. {m.group(1)} is {m.group(2)} in the file but {m.group(3)} in the model"
    return None


def describe(source: Source) -> str:
    """'tiny + runs/demo/lora' style label for logs and reports."""
    return source.model + (f" + {source.finetune}" if source.finetune else "")


# ----------------------------------------------------------------------------------------------
# Drawing and writing images


def flat_seeds(num_prompts: int, seeds: list[int]) -> list[int]:
    """Per-image seeds in the sampler's prompt-major order: every prompt gets every seed."""
    return [s for _ in range(num_prompts) for s in seeds]


def sample_images(
    pipe,
    prompts: list[str],
    seeds: list[int],
    settings,
    *,
    batch_size: int | None = None,
    progress: bool = False,
    unet=None,
) -> torch.Tensor:
    """(P * K, 3, H, W) images in [0, 1], prompt-major: image p*K + k is prompts[p] with seeds[k]."""
    from ..sampling import sample_trajectories

    traj = sample_trajectories(
        pipe,
        prompts,
        images_per_prompt=len(seeds),
        seeds=flat_seeds(len(prompts), seeds),
        settings=settings,
        record=False,
        batch_size=batch_size,
        progress=progress,
        unet=unet,
    )
    return traj.images


def grid_tiles(images: torch.Tensor, max_side: int = GRID_TILE_MAX) -> torch.Tensor:
    """(N, 3, H, W) -> the same, downscaled (antialiased) so that no side exceeds ``max_side``."""
    h, w = images.shape[-2:]
    if max(h, w) <= max_side:
        return images
    scale = max_side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True).clamp(0, 1)


def image_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index:03d}_seed{seed}.png"


def write_samples(
    out: Path,
    images: torch.Tensor,
    prompts: list[str],
    seeds: list[int],
    *,
    source: Source,
    settings,
    prompt_label: str,
) -> None:
    """One PNG per image (``p{prompt index}_seed{seed}.png``), a captioned ``grid.png`` (a row per
    prompt), and ``samples.json`` saying which file is which."""
    from .report import make_grid, save_png

    entries, captions = [], []
    for i, image in enumerate(images):
        p, k = divmod(i, len(seeds))
        name = image_name(p, seeds[k])
        save_png(image, out / name)
        entries.append({"file": name, "prompt_index": p, "prompt": prompts[p], "seed": seeds[k]})
        captions.append(f"{prompts[p]} (seed {seeds[k]})")
    ncols = len(seeds) if len(seeds) > 1 else None
    save_png(make_grid(grid_tiles(images), captions, ncols=ncols), out / "grid.png")
    manifest = {
        "model": source.model,
        "finetune": str(source.finetune) if source.finetune else None,
        "run": str(source.run_dir) if source.run_dir else None,
        "prompts": prompt_label,
        "settings": asdict(settings),
        "images": entries,
    }
    (out / SAMPLES_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
