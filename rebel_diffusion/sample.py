"""``rebel-diffusion sample``: images from a base model, a fine-tune or a training run, per prompt and seed.

Image i of prompt p is drawn from its own seed, so the same (prompt, seed) gives the same starting
noise whichever model draws it: base and fine-tuned outputs line up picture for picture.

Also home of the helpers ``eval`` and ``preview`` share: reading a run folder (``read_run``,
``find_finetune``, ``settings_from_config``), the model/sampling flags, and loading a base and a
fine-tuned pipeline that share what they can (``load_models``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import run_folder
from .errors import UsageError

LORA_FILE = "pytorch_lora_weights.safetensors"
CHECKPOINT_FILE = run_folder.TRAINABLE  # the trainer's checkpoints/epoch_NNNN/ hold this
GRID_TILE_MAX = 256  # grid tiles larger than this are downscaled: a 512px grid of 100 images is huge


# ----------------------------------------------------------------------------------------------
# Run folders


@dataclass
class Source:
    """What to sample from: a base model, an optional fine-tune, and the run they came from."""

    model: str
    finetune: Path | None = None
    run_dir: Path | None = None
    config: dict = field(default_factory=dict)


def read_run(path: str | Path) -> tuple[Path, dict]:
    """(run folder, its config.yaml as a dict) for a run folder or a folder inside it (a checkpoint).

    Raises ``UsageError`` when no ``config.yaml`` is found in the folder or its two parents.
    """
    import yaml

    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"--run {path}: no such folder")
    for folder in (path, path.parent, path.parent.parent):
        cfg_file = folder / run_folder.CONFIG
        if cfg_file.is_file():
            try:
                cfg = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as e:
                raise UsageError(f"{cfg_file}: not valid YAML ({str(e).splitlines()[0]})") from e
            if not isinstance(cfg, dict):
                raise UsageError(f"{cfg_file}: expected a mapping of settings, got {type(cfg).__name__}")
            return folder, cfg
    raise UsageError(
        f"--run {path}: not a training run folder (no config.yaml); "
        "pass a LoRA with --finetune and its base model with --model instead"
    )


def _has_weights(folder: Path) -> bool:
    """True when ``folder`` holds a LoRA or a UNet that ``models.load_finetune`` can apply."""
    if folder.is_file():
        return folder.suffix == ".safetensors"
    return any(
        (
            (folder / LORA_FILE).is_file(),
            (folder / "lora" / LORA_FILE).is_file(),
            (folder / "unet" / "config.json").is_file(),
            (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file(),
            is_checkpoint(folder),
        )
    )


def is_checkpoint(folder: Path) -> bool:
    """A trainer checkpoint (``checkpoints/epoch_NNNN``): raw trainable weights, no diffusers LoRA."""
    return (folder / CHECKPOINT_FILE).is_file() and not (folder / "lora").is_dir()


def _natural_key(path: Path):
    # checkpoint-9 before checkpoint-10; epoch_0003 before epoch_0012.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def find_finetune(path: str | Path) -> Path:
    """The fine-tuned weights of a run: the run's ``lora/`` or ``unet/``, else its newest checkpoint.

    ``path`` may be a run folder, a checkpoint folder, a ``lora/`` folder or a LoRA file.
    Raises ``UsageError`` (one line) when none holds weights.
    """
    path = Path(path).expanduser()
    if _has_weights(path):
        return path
    ckpt_root = path / "checkpoints"
    if ckpt_root.is_dir():
        for ckpt in sorted((p for p in ckpt_root.iterdir() if p.is_dir()), key=_natural_key, reverse=True):
            if _has_weights(ckpt):
                return ckpt
    raise UsageError(
        f"{path}: no fine-tuned weights: no lora/{LORA_FILE}, no unet/ folder and no checkpoint under "
        "checkpoints/ holding one (has training saved anything yet?)"
    )


def settings_from_config(cfg: dict) -> dict:
    """SamplingSettings fields from a run's config.yaml (DDIM's eta is ``ddim_eta``; ``eta`` is REBEL's)."""
    out = {}
    for key, name in (("sampler", "sampler"), ("num_steps", "num_steps"), ("ddim_eta", "eta"),
                      ("guidance_scale", "guidance_scale"), ("negative_prompt", "negative_prompt")):
        if cfg.get(key) is not None:
            out[name] = cfg[key]
    if cfg.get("resolution"):
        out["height"] = out["width"] = int(cfg["resolution"])
    return out


# ----------------------------------------------------------------------------------------------
# Shared flags


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--run, --model, --finetune, --device, --dtype."""
    g = parser.add_argument_group("model")
    g.add_argument("--run", metavar="DIR", help="a training run folder (its config.yaml gives the model and "
                   "sampling settings; its lora/, unet/ or newest checkpoint the fine-tune)")
    g.add_argument("--model", help="base model: a built-in (tiny, toy...), a diffusers folder, a .safetensors "
                   "file or a hub id (default: the run's model, else Stable Diffusion 1.5)")
    g.add_argument("--finetune", metavar="PATH", help="a LoRA folder/file, a unet/ folder, a run or a checkpoint "
                   "folder to apply on the base model (default: the run's)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda when available)")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="model precision (default: fp16 on GPU, fp32 on CPU)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--steps, --guidance-scale, --eta, --sampler, --resolution, --batch-size (None: the run's or the default)."""
    g = parser.add_argument_group("sampling (default: the run's settings, else SamplingSettings' defaults)")
    g.add_argument("--steps", type=int, help="denoising steps")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--eta", type=float, help="DDIM noise scale (> 0)")
    g.add_argument("--sampler", choices=("auto", "ddim", "lcm"), help="sampler")
    g.add_argument("--resolution", type=int, help="image height and width in pixels")
    g.add_argument("--batch-size", type=int, default=8, help="images denoised together (default 8)")


def resolve_source(args: argparse.Namespace) -> Source:
    """The model, fine-tune and run config named by --run/--model/--finetune (flags win over the run)."""
    from .models import DEFAULT_MODEL

    run_dir, cfg = read_run(args.run) if args.run else (None, {})
    model = args.model or cfg.get("model") or DEFAULT_MODEL
    finetune = None
    if args.finetune:
        p = Path(args.finetune).expanduser()
        if not p.exists():
            raise UsageError(f"--finetune {p}: no such file or folder")
        finetune = find_finetune(p)
    elif args.run:
        finetune = find_finetune(args.run)
    return Source(model=str(model), finetune=finetune, run_dir=run_dir, config=cfg)


def settings_from_args(args: argparse.Namespace, cfg: dict | None = None):
    """SamplingSettings: the run's config, overridden by the flags that were given."""
    from .sampling import SamplingSettings

    values = settings_from_config(cfg or {})
    for flag, name in (("steps", "num_steps"), ("guidance_scale", "guidance_scale"), ("eta", "eta"),
                       ("sampler", "sampler")):
        if getattr(args, flag, None) is not None:
            values[name] = getattr(args, flag)
    if getattr(args, "resolution", None):
        values["height"] = values["width"] = args.resolution
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        return SamplingSettings(**values)
    except TypeError as e:
        raise UsageError(f"bad sampling settings in the run's config.yaml: {e}") from e


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device {name}: not a device ({e})") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
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
    from .models import check_sd_components, load_finetune, load_pipeline

    pipe = load_pipeline(source.model, dtype=dtype, device=device)
    check_sd_components(pipe)
    if source.finetune is None:
        return (pipe if with_base else None), pipe
    tuned = fork_pipeline(pipe) if with_base else pipe
    if is_checkpoint(source.finetune):
        apply_checkpoint(tuned, source.finetune)
        return (pipe if with_base else None), tuned
    try:
        with _quiet_diffusers():  # its logger prints the whole state-dict error before ours
            load_finetune(tuned, source.finetune)
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
        m = re.search(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\)) "
                      r"from checkpoint, the shape in current model is (torch\.Size\(\[[\d, ]*\]\))", line)
        if m:
            return f"e.g. {m.group(1)} is {m.group(2)} in the file but {m.group(3)} in the model"
    return None


def apply_checkpoint(pipe, folder: Path) -> None:
    """Load a trainer checkpoint's ``trainable.safetensors`` into ``pipe.unet``.

    The LoRA layout (rank, alpha, targets) or full fine-tune comes from the run's config.yaml,
    found beside the checkpoint (``RUN/checkpoints/epoch_NNNN``).
    """
    from safetensors.torch import load_file

    from .models import DEFAULT_LORA_TARGETS, add_lora

    _, cfg = read_run(folder)
    try:
        weights = load_file(str(folder / CHECKPOINT_FILE))
    except Exception as e:
        raise UsageError(f"{folder / CHECKPOINT_FILE}: cannot be read ({type(e).__name__}: {e})") from e
    if cfg.get("finetune", "lora") == "lora":
        targets = cfg.get("lora_targets") or ",".join(DEFAULT_LORA_TARGETS)
        add_lora(pipe.unet, rank=int(cfg.get("lora_rank", 8)), alpha=float(cfg.get("lora_alpha", 8.0)),
                 target_modules=[t.strip() for t in str(targets).split(",")])
    named = dict(pipe.unet.named_parameters())
    unknown = [k for k in weights if k not in named]
    misfit = [k for k in weights if k in named and named[k].shape != weights[k].shape]
    if unknown or misfit:
        bad = (unknown or misfit)[0]
        raise UsageError(f"{folder}: this checkpoint does not fit the model ({len(unknown) + len(misfit)} "
                         f"weights do not match, e.g. {bad})")
    with torch.no_grad():
        for name, value in weights.items():
            named[name].copy_(value.to(device=named[name].device, dtype=named[name].dtype))


def describe(source: Source) -> str:
    """'tiny + runs/demo/lora' style label for logs and reports."""
    return source.model + (f" + {source.finetune}" if source.finetune else "")


# ----------------------------------------------------------------------------------------------
# Sampling


def flat_seeds(num_prompts: int, seeds: list[int]) -> list[int]:
    """Per-image seeds in the sampler's prompt-major order: every prompt gets every seed."""
    return [s for _ in range(num_prompts) for s in seeds]


def sample_images(pipe, prompts: list[str], seeds: list[int], settings, *, batch_size: int | None = None,
                  progress: bool = False, unet=None) -> torch.Tensor:
    """(P * K, 3, H, W) images in [0, 1], prompt-major: image p*K + k is prompts[p] with seeds[k]."""
    from .sampling import sample_trajectories

    traj = sample_trajectories(
        pipe, prompts, images_per_prompt=len(seeds), seeds=flat_seeds(len(prompts), seeds),
        settings=settings, record=False, batch_size=batch_size, progress=progress, unet=unet,
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


def prompts_from_args(args: argparse.Namespace, cfg: dict, default: str | None = None) -> tuple[list[str], str]:
    """(prompts, a label): --prompt texts, else --prompts, else the run's eval prompts, else ``default``."""
    from .prompts_io import load_prompts

    if getattr(args, "prompt", None):
        return list(args.prompt), "--prompt"
    name = getattr(args, "prompts", None) or cfg.get("eval_prompts") or default
    if isinstance(name, list):  # a run config may hold the prompt list itself
        return [str(p) for p in name], "the run's eval_prompts"
    if not name:
        raise UsageError("no prompts: pass --prompt \"text\" (repeatable) or --prompts NAME_OR_FILE")
    return load_prompts(name), str(name)


def seeds_from_args(args: argparse.Namespace) -> list[int]:
    """--seeds as given, else --num-images consecutive seeds from --seed."""
    if args.seeds:
        if len(set(args.seeds)) != len(args.seeds):
            raise UsageError(f"--seeds has repeats: {args.seeds}")
        return list(args.seeds)
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    return list(range(args.seed, args.seed + args.num_images))


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    g = parser.add_argument_group("what to draw")
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument("--prompts", metavar="NAME_OR_FILE", help="a prompt set from prompts/ (e.g. simple_animals) "
                   "or a text file, one prompt a line (default: the run's eval prompts)")
    g.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="seeds, one image each per prompt")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt when --seeds is not given")
    g.add_argument("--seed", type=int, default=0, help="first seed with --num-images (default 0)")
    add_sampling_arguments(parser)
    parser.add_argument("--output-dir", help="where to write the PNGs and grid.png (default: RUN/samples, "
                        "else ./samples)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    seeds = seeds_from_args(args)
    source = resolve_source(args)
    prompts, prompt_label = prompts_from_args(args, source.config)
    settings = settings_from_args(args, source.config)
    device = pick_device(args.device)
    out = Path(args.output_dir) if args.output_dir else (source.run_dir or Path(".")) / "samples"

    _, pipe = load_models(source, device=device, dtype=pick_dtype(args.dtype, device), with_base=False)
    settings = settings.resolve(pipe)
    n = len(prompts) * len(seeds)
    print(f"sampling {n} images ({len(prompts)} prompts x {len(seeds)} seeds, {settings.num_steps} steps) "
          f"from {describe(source)}", file=sys.stderr)
    images = sample_images(pipe, prompts, seeds, settings, batch_size=args.batch_size, progress=not args.quiet)
    write_samples(out, images, prompts, seeds, source=source, settings=settings, prompt_label=prompt_label)
    print(f"wrote {n} images and grid.png to {out}")
    return 0


def write_samples(out: Path, images: torch.Tensor, prompts: list[str], seeds: list[int], *, source: Source,
                  settings, prompt_label: str) -> None:
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
    (out / "samples.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
