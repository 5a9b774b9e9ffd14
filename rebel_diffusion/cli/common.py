"""Flags the inference commands share (model, sampling, prompts, seeds) and deprecated aliases."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import TrainConfig
from ..errors import UsageError
from ..outputs.generation import SAMPLES_MANIFEST, Source, resolve_source, set_num_threads
from ..outputs.run_folder import check_writable
from ..prompts_io import load_prompts
from ..sampling import SamplingSettings, settings_from_config


class DeprecatedAlias(argparse.Action):
    """An old flag kept for one release: it sets the new flag's value and says so on stderr."""

    def __init__(self, option_strings, dest, new_flag: str, **kwargs):
        self.new_flag = new_flag
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"warning: {option_string} is deprecated and will be removed in the next release; use {self.new_flag}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """--run, --model, --vae, --finetune, --device, --dtype."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--run",
        metavar="DIR",
        help="a training run folder (its config.yaml gives the model and "
        "sampling settings; its lora/, unet/ or newest checkpoint the fine-tune)",
    )
    g.add_argument(
        "--model",
        help="base model: a built-in (tiny, tiny-lcm, tiny-v, toy, sd15-random, tiny-sdxl, sdxl-random), "
        "a diffusers folder, a .safetensors file or a hub id, SD 1.x/2.x, LCM or SDXL "
        "(default: the run's model, else Stable Diffusion 1.5)",
    )
    g.add_argument(
        "--vae",
        help="a VAE in place of the model's: hub id, diffusers folder or .safetensors "
        "(default: the run's; SDXL in fp16: madebyollin/sdxl-vae-fp16-fix)",
    )
    g.add_argument(
        "--finetune",
        metavar="PATH",
        help="a LoRA folder/file, a unet/ folder, a run or a checkpoint "
        "folder to apply on the base model (default: the run's)",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1... (default: cuda when available)")
    g.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="model precision (default: fp16 on GPU, fp32 on CPU)",
    )
    g.add_argument("--num-threads", type=int, help="torch CPU threads (default: the CPUs idle at start, at least 1)")


def add_weight_arguments(group) -> None:
    """Local copies of the rewards' weights (``rewards.WEIGHT_OPTIONS``); default: the run's, else the hub."""
    group.add_argument("--aesthetic-head", metavar="FILE", help="local LAION aesthetic head (aesthetic)")
    group.add_argument(
        "--pickscore-model", metavar="DIR", help="local PickScore folder, hf download yuvalkirstain/PickScore_v1"
    )
    group.add_argument(
        "--hpsv2-checkpoint", metavar="PATH", help="local HPS_v2.1_compressed.pt or its folder, hf download xswu/HPSv2"
    )
    group.add_argument(
        "--imagereward-checkpoint",
        metavar="PATH",
        help="local ImageReward.pt or its folder, hf download THUDM/ImageReward",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, *, batch_size: bool = True) -> None:
    """--num-steps, --guidance-scale, --ddim-eta, --sampler, --resolution[, --batch-size] (unset: the run's)."""
    g = parser.add_argument_group("sampling (default: the run's settings, else SamplingSettings' defaults)")
    g.add_argument("--num-steps", dest="steps", type=int, help="denoising steps (as train's --num-steps)")
    g.add_argument("--steps", dest="steps", type=int, action=DeprecatedAlias, new_flag="--num-steps")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale")
    g.add_argument("--ddim-eta", type=float, help="DDIM noise scale (0: deterministic DDIM, fine for drawing)")
    g.add_argument("--eta", dest="ddim_eta", type=float, action=DeprecatedAlias, new_flag="--ddim-eta")
    g.add_argument("--sampler", choices=("auto", "ddim", "lcm"), help="sampler")
    g.add_argument("--resolution", type=int, help="image height and width in pixels")
    if batch_size:
        g.add_argument("--batch-size", type=int, default=8, help="images denoised together (default 8)")


def samples_folder(output_dir: str | None, default: Path) -> Path:
    """Where ``sample`` writes, checked before any image is drawn. An --output-dir that already
    holds a sample call's files is refused in one line (its PNGs would mix with the new ones); the
    default folder moves on to ``samples_2``, ``samples_3``... A file on the way is refused too."""
    if output_dir:
        out = Path(output_dir)
        if (out / SAMPLES_MANIFEST).exists() or any(out.glob("p*_seed*.png")):
            raise UsageError(
                f"--output-dir {out} already holds samples of an earlier call: choose another --output-dir "
                "(or delete that one)"
            )
    else:
        out, n = default, 1
        while (out / SAMPLES_MANIFEST).exists() or any(out.glob("p*_seed*.png")):
            n += 1
            out = default.with_name(f"{default.name}_{n}")
    check_output_folder(out)
    return out


def check_output_folder(out: Path) -> None:
    """An output folder that can be made and written: nothing on its way is a file (one line otherwise)."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise UsageError(f"--output-dir {out}: {p} is a file, not a folder; choose another --output-dir")
    check_writable(out)


def source_from_args(args: argparse.Namespace) -> Source:
    """The run/model/fine-tune named by the flags; sets the CPU thread count first (--num-threads)."""
    set_num_threads(getattr(args, "num_threads", None))
    return resolve_source(run=args.run, model=args.model, finetune=args.finetune, vae=args.vae)


def settings_from_args(args: argparse.Namespace, cfg: TrainConfig | None = None) -> SamplingSettings:
    """SamplingSettings: the run's config (None: the defaults), overridden by the sampling flags given."""
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    return settings_from_config(
        cfg,
        num_steps=getattr(args, "steps", None),
        guidance_scale=getattr(args, "guidance_scale", None),
        ddim_eta=getattr(args, "ddim_eta", None),
        sampler=getattr(args, "sampler", None),
        resolution=getattr(args, "resolution", None),
    )


def prompts_from_args(
    args: argparse.Namespace, cfg: TrainConfig | None, default: str | None = None
) -> tuple[list[str], str]:
    """(prompts, a label): --prompt texts, else --prompts, else the run's grid prompts (its training
    prompts when it set none), else ``default``."""
    if getattr(args, "prompt", None):
        return list(args.prompt), "--prompt"
    run_grid = (cfg.grid_prompts or cfg.prompts) if cfg is not None else None
    name = getattr(args, "prompts", None) or run_grid or default
    if not name:
        raise UsageError('no prompts: pass --prompt "text" (repeatable) or --prompts NAME_OR_FILE')
    return load_prompts(name), str(name)


def seeds_from_args(args: argparse.Namespace) -> list[int]:
    """--seeds as given, else --num-images consecutive seeds from --seed."""
    if getattr(args, "seeds", None):
        if len(set(args.seeds)) != len(args.seeds):
            raise UsageError(f"--seeds has repeats: {args.seeds}")
        return list(args.seeds)
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    return list(range(args.seed, args.seed + args.num_images))
