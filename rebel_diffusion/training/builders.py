"""The pieces ``recipe.setup`` assembles, and the checks it runs before anything is written.

Each builder takes the config (and what it needs) and returns a part of the run: the processes
and precision, the rewards, the held-out set, the trainable UNet, the optimizer. The checks
raise ``UsageError`` (one line) for a run that cannot start.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..algorithms.rebel import (
    trained_steps,
)
from ..config import TrainConfig
from ..errors import UsageError
from ..models import add_lora, parse_lora_targets
from ..models.components import too_long
from ..outputs import run_folder
from ..prompts_io import load_prompts
from ..rewards import Reward, load_preference, load_reward, reward_options
from ..sampling import (
    make_scheduler,
    planned_step_std,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .recipe import Run


@dataclass
class Heldout:
    """The held-out evaluation (``--heldout-every``): prompts never trained on, rewards, diversity."""

    prompts: list[str]
    rewards: dict[str, Reward]
    diversity: object | None  # an image embedder with .name (main process only), or None


def heldout_sets(heldout: Heldout | None) -> dict[str, list[str]]:
    return {"--heldout-prompts": heldout.prompts} if heldout is not None else {}


def warn_long_prompts(pipe, sets: dict[str, list[str]], print_fn=print) -> None:
    """One warning line for each prompt set with prompts CLIP will cut (what is past 77 tokens is lost)."""
    for flag, prompts in sets.items():
        cut = too_long(pipe, prompts)
        if cut:
            print_fn(
                f"warning: {flag}: {len(cut)} prompt(s) over {pipe.tokenizer.model_max_length} tokens are cut "
                f"by the text encoder, e.g. {cut[0][:60]!r}...",
                file=sys.stderr,
            )


def check_kl_prompts(cfg: TrainConfig, prompts: list[str]) -> frozenset[str] | None:
    """--kl-prompts as a set, None without it; a list that covers none of the training prompts would
    make the KL term a silent no-op, so it is a usage error."""
    if not cfg.kl_prompts:
        return None
    covered = frozenset(load_prompts(cfg.kl_prompts))
    if not covered.intersection(prompts):
        raise UsageError(
            f"--kl-prompts {cfg.kl_prompts}: none of its prompts is among the {len(set(prompts))} training "
            f"prompts (--prompts {cfg.prompts}), so the KL term would never apply"
        )
    return covered


def check_trained_steps(run: Run) -> None:
    """--min-step-std must leave a step to train: known from the scheduler alone, before any write."""
    stds = planned_step_std(make_scheduler(run.pipe, run.settings), run.settings)  # a fresh scheduler: LCM's steps
    try:
        trained_steps(stds, run.cfg.min_step_std)
    except ValueError as e:
        raise UsageError(str(e)) from e


def probe_reward(run: Run) -> None:
    """The reward's first answer before anything is written: one grey image of the sampled size. A
    reward server that fails, or a plug-in that cannot score, stops the run here, not after the
    run folder (or an --overwrite'n run) has changed."""
    s = run.settings
    image = torch.full((1, 3, s.height, s.width), 0.5, device=run.accelerator.device)
    run.reward(image, run.prompts[:1])


def loading_bars_off() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def resolve_progress(value: str) -> str:
    """--progress auto -> 'bar' on a terminal, else 'lines' (a log file gets lines, not cursor codes)."""
    if value != "auto":
        return value
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return "lines"
    return "bar" if sys.stderr.isatty() else "lines"


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def resolve_steps_per_pass(value: int | None, device) -> int:
    """None -> 1 on an accelerator (memory is what limits there), 10 on a CPU (call overhead is)."""
    if value is not None:
        return value
    return 10 if torch.device(device).type == "cpu" else 1


def make_accelerator(cfg: TrainConfig, out: Path) -> tuple[Accelerator, str]:
    from accelerate import Accelerator

    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(
        # Several processes on a machine without GPUs: gloo on the CPU (accelerate would run them apart).
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=mixed_precision,
        log_with=None if cfg.log_with == "none" else cfg.log_with,
        project_dir=str(out),
    )
    return accelerator, mixed_precision


def reward_weights(cfg: TrainConfig) -> dict:
    """The local copies of reward weights the run names (``rewards.WEIGHT_OPTIONS``), None for the hub's."""
    return {
        "aesthetic_head": cfg.aesthetic_head,
        "pickscore_model": cfg.pickscore_model,
        "hpsv2_checkpoint": cfg.hpsv2_checkpoint,
        "imagereward_checkpoint": cfg.imagereward_checkpoint,
    }


def load_reward_models(cfg: TrainConfig, device, dtype) -> tuple[Reward, Callable | None]:
    """The trained reward (weights loaded now) and the optional preference model on top of it."""
    # Weights go to the rewards that read them (the held-out ones may be others); the CLIP options to
    # the trained reward, which must read them.
    options = reward_options(cfg.reward, reward_weights(cfg))
    options.update(clip_model=cfg.clip_model, clip_pretrained=cfg.clip_pretrained)
    reward = load_reward(cfg.reward, device=device, dtype=dtype, **{k: v for k, v in options.items() if v is not None})
    reward.load()
    preference = None
    if cfg.preference:
        preference = load_preference(cfg.preference, reward=reward, temperature=cfg.preference_temperature)
    return reward, preference


def load_heldout(cfg: TrainConfig, accelerator: Accelerator, dtype) -> Heldout:
    from ..outputs.evaluate import load_diversity_model, load_rewards, parse_reward_names

    names = parse_reward_names(cfg.heldout_rewards, cfg.reward)
    diversity = None
    if accelerator.is_main_process:
        diversity = load_diversity_model(cfg.heldout_diversity, device=accelerator.device)
    return Heldout(
        prompts=load_prompts(cfg.heldout_prompts),
        rewards=load_rewards(names, device=accelerator.device, dtype=dtype, weights=reward_weights(cfg)),
        diversity=diversity,
    )


def make_trainable(cfg: TrainConfig, pipe) -> tuple[torch.nn.Module | None, dict[str, int]]:
    """Freeze the VAE and text encoder; add LoRA (or unfreeze the UNet). Returns (the frozen base
    UNet the KL term or the base anchor needs for a full fine-tune, else None; LoRA target -> modules
    matched). It is copied before any checkpoint is loaded: a resumed run's base is still the base."""
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet = pipe.unet
    ref_unet = None
    needs_base = cfg.kl_coef > 0 or cfg.anchor == "base"
    if needs_base and cfg.finetune == "full":  # LoRA's base is the same UNet with adapters disabled
        ref_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    lora_matches = {}
    if cfg.finetune == "lora":
        lora_matches = add_lora(
            unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=parse_lora_targets(cfg.lora_targets)
        )
    else:
        unet.to(torch.float32).requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise UsageError(f"--xformers: not available ({str(e).splitlines()[0]}); pip install xformers") from e
    return ref_unet, lora_matches


def make_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter]):
    from diffusers.optimization import get_scheduler

    optimizer = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=cfg.optimizer_steps_per_epoch() * cfg.epochs,
    )
    return optimizer, lr_scheduler


def check_tracker(log_with: str) -> None:
    """The experiment tracker's package must be importable before anything runs."""
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}.get(log_with, ())
    if packages and not any(importlib.util.find_spec(p) for p in packages):
        raise UsageError(
            f"--log-with {log_with}: the {packages[0]} package is not installed; pip install {packages[0]}"
        )


def check_resumable(out: Path, num_processes: int) -> None:
    """A run resumes only in the format and with the process count it was written with."""
    marker = run_folder.read_marker(out)
    if marker.get("format") != run_folder.FORMAT:
        raise UsageError(
            f"--resume: {out} was written by an earlier rebel-diffusion (run format {marker.get('format')}, with eta "
            "per latent dim): it cannot continue exactly; start a new run "
            "(its lora/ still loads in sample and diffusers)"
        )
    saved = int(marker.get("num_processes", 1))
    if saved != num_processes:
        raise UsageError(
            f"--resume: {out} was trained with {saved} process(es), not {num_processes}: the batch and the random "
            f"streams depend on it; launch it with --num_processes {saved}"
        )
