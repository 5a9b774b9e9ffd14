"""The training recipe (``rebel-diffusion train``). Read it top to bottom:

    setup            every check first (folder, prompts, reward, model, LoRA targets, checkpoint),
                     then the run folder is written (``run_folder``): a failed start leaves nothing
    train            per epoch: sample -> score -> normalise -> pair -> update -> grid -> log;
                     SIGINT/SIGTERM stop it with a checkpoint within --stop-grace seconds
    save_checkpoint  trainable weights, optimizer, LR schedule, stat tracker, RNG, epoch: atomically
    cleanup          end the experiment trackers

Every source of randomness is derived from (seed, epoch, batch, process), so a resumed run
repeats an uninterrupted one exactly. Every process runs every collective (gather, barrier,
checkpoint), in the same order: the peers hung where only the main process did.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import report, run_folder
from .advantages import PerPromptStatTracker, normalize_rewards
from .components import TextCache, is_sdxl, too_long
from .config import CLIP_NATS, TrainConfig
from .errors import RunError, UsageError
from .generation import grid_tiles, set_num_threads
from .models import add_lora, check_sd_components, load_pipeline, parse_lora_targets
from .prompts_io import load_prompts
from .rebel import pair_indices, pair_targets, regression_fit, subsample_steps, trained_steps
from .rewards import CombinedReward, Reward, load_preference, load_reward, reward_options
from .sampling import (
    SamplingSettings,
    Trajectories,
    make_scheduler,
    planned_step_std,
    rescore_drift,
    rescore_log_probs,
    sample_trajectories,
    steps_log_prob,
)
from .updates import ddpo_accumulate, rebel_accumulate

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline

TIME_KEYS = ("images_per_second", "sample_seconds", "train_seconds", "epoch_seconds")


@dataclass
class Heldout:
    """The held-out evaluation (``--heldout-every``): prompts never trained on, rewards, diversity."""

    prompts: list[str]
    rewards: dict[str, Reward]
    diversity: object | None  # an image embedder with .name (main process only), or None


@dataclass
class Run:
    """Everything a training run holds between epochs."""

    cfg: TrainConfig
    accelerator: Accelerator
    pipe: DiffusionPipeline
    unet: torch.nn.Module  # the prepared (possibly DDP-wrapped) UNet that is trained
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    reward: Reward
    preference: Callable | None  # (images_a, images_b, prompts) -> P(a > b), (P,)
    tracker: PerPromptStatTracker
    settings: SamplingSettings
    scheduler: object  # DDIM/LCM scheduler with the training timesteps set
    prompts: list[str]
    grid_prompts: list[str]
    heldout: Heldout | None
    out: Path
    params: list[torch.nn.Parameter]
    mixed_precision: str
    lora_matches: dict[str, int]  # LoRA target -> modules it matched (empty for a full fine-tune)
    ref_unet: torch.nn.Module | None = None  # frozen base UNet (full fine-tune with --kl-coef or --anchor base)
    steps_per_pass: int = 1  # denoising steps per training UNet call (resolved from the config)
    epoch: int = 0  # last completed epoch
    global_step: int = 0
    # Stopping on a signal: which one and when, and what the grace-period decision needs.
    stop_signal: int | None = None
    stop_time: float = 0.0
    epoch_started: float = 0.0
    last_epoch_seconds: float | None = None
    checkpointed_epoch: int | None = 0  # the last epoch on disk (0: the start needs no checkpoint)
    ema: dict[str, torch.Tensor] | None = None  # EMA of the trainable weights (fp32, their device)
    text_cache: TextCache = field(default_factory=TextCache)  # each training prompt encoded once
    progress: str = "lines"  # resolved --progress: bar, lines or none


# ----------------------------------------------------------------------------------------------
# setup


def setup(cfg: TrainConfig) -> Run:
    """Check everything, build the run, and only then write the run folder."""
    # 1. Cheap checks first: output folder, tracker, prompts. Nothing is written until every check
    #    (model, LoRA targets, checkpoint) has passed: a failed start leaves no trace.
    out = Path(cfg.output_dir)
    run_folder.check_output_dir(out, resume=cfg.resume, overwrite=cfg.overwrite)
    check_tracker(cfg.log_with)
    prompts = load_prompts(cfg.prompts)
    grid_prompts = load_prompts(cfg.grid_prompts or cfg.prompts)
    # 2. Processes and precision.
    accelerator, mixed_precision = make_accelerator(cfg, out)
    if accelerator.device.type == "cpu":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        set_num_threads(cfg.num_threads, local)  # the processes of this machine share its CPUs
    if cfg.resume:
        check_resumable(out, accelerator.num_processes)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    progress = resolve_progress(cfg.progress)
    if progress != "bar":  # diffusers' and transformers' loading bars are cursor codes in a log file
        _loading_bars_off()
    # 3. Rewards: their weights load now, so a missing file fails before the first epoch's sampling.
    reward, preference = load_reward_models(cfg, accelerator.device, weight_dtype)
    heldout = load_heldout(cfg, accelerator, weight_dtype) if cfg.heldout_every else None
    # 4. Model: frozen parts in the mixed-precision dtype; trainable weights in fp32.
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every process
    pipe = load_pipeline(cfg.model, dtype=weight_dtype, device=accelerator.device, vae=cfg.vae)
    check_sd_components(pipe, cfg.model)
    settings = sampling_settings(cfg, pipe)
    sets = {"--prompts": prompts, "--grid-prompts": grid_prompts, **heldout_sets(heldout)}
    warn_long_prompts(pipe, sets, accelerator.print)
    ref_unet, lora_matches = make_trainable(cfg, pipe)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    # 5. Optimizer and schedule, prepared for the processes.
    optimizer, lr_scheduler = make_optimizer(cfg, params)
    unet, optimizer, lr_scheduler = accelerator.prepare(pipe.unet, optimizer, lr_scheduler)
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        pipe=pipe,
        unet=unet,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        reward=reward,
        preference=preference,
        tracker=PerPromptStatTracker(cfg.tracker_buffer_size, cfg.tracker_min_count),
        settings=settings,
        scheduler=make_scheduler(pipe, settings),
        prompts=prompts,
        grid_prompts=grid_prompts,
        heldout=heldout,
        out=out,
        params=params,
        mixed_precision=mixed_precision,
        lora_matches=lora_matches,
        ref_unet=ref_unet,
        steps_per_pass=resolve_steps_per_pass(cfg.steps_per_pass, accelerator.device),
        progress=progress,
    )
    if cfg.ema_decay > 0:
        run.ema = {n: p.detach().float().clone() for n, p in _trainable_named(run).items()}
    if cfg.resume:
        load_checkpoint(run, run_folder.latest_checkpoint(out))
        if cfg.epochs <= run.epoch:  # nothing would run, and config.yaml would still be rewritten
            raise UsageError(
                f"--resume --epochs {cfg.epochs}: the run has done {run.epoch} epoch(s) already; "
                f"pass --epochs above {run.epoch} to continue it"
            )
    # 6. The checks that need the model and the reward: steps left to train, the reward's first answer.
    check_trained_steps(run)
    probe_reward(run)
    # 7. Every check has passed: now the run folder changes (config.yaml only as a run starts; an
    #    --overwrite'n run is deleted only now).
    write_run_folder(run)
    if cfg.log_with != "none":
        accelerator.init_trackers("rebel-diffusion", config=_flat_config(cfg))
    if progress != "none":
        accelerator.print(describe_plan(run))
    return run


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


def _loading_bars_off() -> None:
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
    from .evaluate import load_diversity_model, load_rewards, parse_reward_names

    names = parse_reward_names(cfg.heldout_rewards, cfg.reward)
    diversity = None
    if accelerator.is_main_process:
        diversity = load_diversity_model(cfg.heldout_diversity, device=accelerator.device)
    return Heldout(
        prompts=load_prompts(cfg.heldout_prompts),
        rewards=load_rewards(names, device=accelerator.device, dtype=dtype, weights=reward_weights(cfg)),
        diversity=diversity,
    )


def sampling_settings(cfg: TrainConfig, pipe) -> SamplingSettings:
    return SamplingSettings(
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        ddim_eta=cfg.ddim_eta,
        guidance_scale=cfg.guidance_scale,
        height=cfg.resolution,
        width=cfg.resolution,
        negative_prompt=cfg.negative_prompt,
    ).resolve(pipe)


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


def write_run_folder(run: Run) -> None:
    """The first write of a run: a new folder, or (resume) the config and the metrics up to the checkpoint."""
    acc, cfg, out = run.accelerator, run.cfg, run.out
    acc.wait_for_everyone()
    if acc.is_main_process:
        if cfg.resume:
            run_folder.write_config(out, cfg.to_yaml())
            report.truncate_metrics(out / run_folder.METRICS, run.epoch)
        else:
            run_folder.start(out, cfg.to_yaml(), num_processes=acc.num_processes, overwrite=cfg.overwrite)
    acc.wait_for_everyone()


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


def describe_plan(run: Run) -> str:
    """The startup lines: what is trained, toward what, with which step size, in what batches."""
    cfg, acc = run.cfg, run.accelerator
    n = acc.num_processes
    trainable = sum(p.numel() for p in run.params)
    prompts_per_step = cfg.images_per_step() // cfg.images_per_prompt
    dims = (
        run.pipe.unet.config.in_channels
        * (run.settings.height // run.pipe.vae_scale_factor)
        * (run.settings.width // run.pipe.vae_scale_factor)
    )
    if cfg.algorithm == "rebel":
        step_size = (
            f"eta {cfg.eta:g} nats of trajectory log-likelihood per unit advantage "
            f"(= {cfg.eta / dims:.3g} per latent dim, D = {dims})"
        )
    else:
        clip = ddpo_clip_range(cfg.clip_range, dims)
        step_size = (
            f"PPO clip range {clip:.3g} of the per-dim mean log-prob ratio "
            f"(= {clip * dims:.3g} nats per step, D = {dims})"
        )
    regulariser = f"KL to the base model x {cfg.kl_coef:g}" if cfg.kl_coef > 0 else "no KL term"
    if cfg.algorithm == "rebel":
        regulariser += (
            f"; anchored to the base model (each step's ratio to the sampler clipped at "
            f"{ddpo_clip_range(cfg.clip_range, dims) * dims:.3g} nats)"
            if cfg.anchor == "base"
            else "; anchored to the sampling policy"
        )
    if cfg.ema_decay > 0:
        regulariser += f"; EMA of the weights (decay {cfg.ema_decay:g}) exported and evaluated"
    lora = ", ".join(f"{t} ({m} modules)" for t, m in run.lora_matches.items())
    return (
        f"rebel-diffusion: {cfg.algorithm} on {cfg.model} ({run.settings.sampler}, {run.settings.num_steps} steps, "
        f"{run.settings.height}x{run.settings.width}), reward {cfg.reward}, {len(run.prompts)} prompts, "
        f"{n} process(es), mixed precision {run.mixed_precision}"
        f"{f', {torch.get_num_threads()} CPU thread(s)' if acc.device.type == 'cpu' else ''}\n"
        f"  {step_size}; advantages {cfg.normalization} (std floor {cfg.adv_std_floor:g} x batch std, "
        f"clip {cfg.adv_clip_max:g}); {regulariser}; steps trained: noise std >= {cfg.min_step_std:g}\n"
        f"  per epoch: {cfg.images_per_epoch(n)} images"
        f"{f', {cfg.pairs_per_epoch() * n} pairs' if cfg.algorithm == 'rebel' else ''}, "
        f"{cfg.optimizer_steps_per_epoch()} optimizer steps of {cfg.gradient_accumulation_steps} micro-batch(es) x "
        f"{cfg.train_batch_size} images"
        f"{f' ({prompts_per_step} prompts, all their pairs)' if cfg.algorithm == 'rebel' else ''}, "
        f"up to {min(run.steps_per_pass, run.settings.num_steps)} denoising step(s) "
        f"per UNet pass; {cfg.epochs} epochs "
        f"({'from epoch ' + str(run.epoch + 1) if run.epoch else 'from the start'}); "
        f"{trainable:,} trainable parameters ({cfg.finetune}"
        + (f": LoRA on {lora}" if lora else "")
        + f"); output {run.out}"
    )


# ----------------------------------------------------------------------------------------------
# train


@dataclass
class TrainResult:
    history: list[dict]  # the metrics of the epochs run
    stopped_by: int | None = None  # the signal that stopped the run early (SIGINT, SIGTERM), if any


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
ELASTIC_ECHO_SECONDS = 1.0  # torch elastic's echo of a terminal's Ctrl-C comes within this


def train(cfg: TrainConfig) -> TrainResult:
    """Run the whole recipe.

    SIGINT (Ctrl-C) and SIGTERM (what SLURM, Kubernetes and torch elastic send before they kill)
    stop the run with a checkpoint: the epoch in progress is finished if it is expected to end
    within --stop-grace seconds of the signal, otherwise it is cut short and the state it started
    from is the checkpoint. Every process decides the same way, at the same point.
    """
    run = setup(cfg)
    try:
        return _train_loop(run)
    except RunError as e:  # a stop after the run folder was written: say what continues it
        if "--resume" in str(e) or "same command" in str(e):
            raise
        raise RunError(f"{e}; {run_folder.next_step(run.out)}") from e


def _train_loop(run: Run) -> TrainResult:
    """The epochs of a set-up run, with stop signals turned into checkpoints (``train``)."""
    cfg = run.cfg
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signum, _frame: _request_stop(run, signum))
    history = []
    from tqdm.auto import tqdm

    # The whole run's bar: epochs done of --epochs, with an ETA from the epochs so far.
    overall = tqdm(
        total=cfg.epochs,
        initial=run.epoch,
        desc="training",
        unit="epoch",
        position=0,
        disable=not run.accelerator.is_local_main_process or run.progress != "bar",
    )
    try:
        if run.epoch == 0:
            report_epoch(run, epoch=0, metrics={"epoch": 0})
        for epoch in range(run.epoch + 1, cfg.epochs + 1):
            # The state this epoch starts from, kept only when it is not on disk already.
            start_state = capture_state(run) if run.checkpointed_epoch != epoch - 1 else None
            run.epoch_started = time.monotonic()
            try:
                metrics = train_epoch(run, epoch)
            except StopEpoch:
                if start_state is not None:
                    restore_state(run, start_state)
                    save_checkpoint(run, epoch - 1, start_state)
                name = signal.Signals(run.stop_signal).name
                next_step = run_folder.next_step(run.out)
                run.accelerator.print(f"{name}: epoch {epoch} cut short; {next_step}", file=sys.stderr)
                break
            report_epoch(run, epoch, metrics)
            history.append(metrics)
            run.last_epoch_seconds = time.monotonic() - run.epoch_started
            stop = _agree_on_stop(run)
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs or stop:
                save_checkpoint(run, epoch)
            run.epoch = epoch
            overall.update(1)
            if stop:
                run.accelerator.print(f"stopped after epoch {epoch}; continue with --resume", file=sys.stderr)
                break
    finally:
        overall.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        cleanup(run)
    return TrainResult(history, run.stop_signal)


class StopEpoch(Exception):
    """A stop was requested and the epoch in progress cannot finish within --stop-grace."""


def _request_stop(run: Run, signum: int) -> None:
    # First signal: stop with a checkpoint. A second Ctrl-C: stop at once. Under torch elastic
    # (accelerate's multi-process launch) the agent follows a terminal's SIGINT with its own at once:
    # there a second Ctrl-C counts from a second after the first.
    now = time.monotonic()
    if run.stop_signal is not None:
        window = ELASTIC_ECHO_SECONDS if "TORCHELASTIC_RUN_ID" in os.environ else 0.0
        if signum == signal.SIGINT == run.stop_signal and now - run.stop_time >= window:
            raise KeyboardInterrupt
        return
    run.stop_signal, run.stop_time = signum, now
    if run.accelerator.is_local_main_process:
        print(
            f"\n{signal.Signals(signum).name}: stopping with a checkpoint within --stop-grace "
            f"{run.cfg.stop_grace:g} s (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def stop_point(run: Run) -> None:
    """A point every process reaches in step (after a sampling batch, after an optimizer step).

    If any process was asked to stop and the epoch is not expected to end within the grace period
    (from the previous epoch's duration), every process raises ``StopEpoch`` here.
    """
    now = time.monotonic()
    asked = run.stop_signal is not None
    waited = now - run.stop_time if asked else 0.0
    remaining = math.inf if run.last_epoch_seconds is None else run.last_epoch_seconds - (now - run.epoch_started)
    local = torch.tensor([1.0 if asked else 0.0, waited, min(max(remaining, 0.0), 1e9)], device=run.accelerator.device)
    flag, waited, remaining = (
        run.accelerator.reduce(local, reduction="max").tolist()
        if run.accelerator.num_processes > 1
        else local.tolist()
    )
    if flag > 0 and waited + remaining + CHECKPOINT_SECONDS > run.cfg.stop_grace:
        if run.stop_signal is None:  # another process was signalled: stop with its signal's exit code
            run.stop_signal, run.stop_time = signal.SIGTERM, now
        raise StopEpoch


CHECKPOINT_SECONDS = 5.0  # kept free within the grace period for writing the checkpoint


def _agree_on_stop(run: Run) -> bool:
    """True on every process when any was signalled; each then records the same signal."""
    t = torch.tensor([float(run.stop_signal or 0)], device=run.accelerator.device)
    signum = int(run.accelerator.reduce(t, reduction="max").item()) if run.accelerator.num_processes > 1 else int(t)
    if signum:
        run.stop_signal = run.stop_signal or signum
    return bool(signum)


def restore_state(run: Run, state: dict) -> None:
    """Put a ``capture_state`` snapshot back: weights, optimizer, schedule, tracker, step count."""
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


def _all_processes_zero(run: Run, count: int) -> bool:
    t = torch.tensor([float(count)], device=run.accelerator.device)
    return bool(run.accelerator.reduce(t, reduction="sum").item() == 0)


def train_epoch(run: Run, epoch: int) -> dict:
    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    # 1. Sample k images for each of a batch of prompts, recording trajectories.
    traj = sample_epoch(run, epoch)
    t_sample = time.perf_counter()
    # 2. Score, and gather every process's rewards for the statistics.
    components = score_components(run.reward, traj)  # {name: (B,)}, several rewards only
    rewards = run.reward.combine(components) if components else score(run.reward, traj)  # (B,)
    all_rewards = acc.gather(rewards.to(acc.device)).cpu()
    all_components = {name: acc.gather(v.to(acc.device)).cpu() for name, v in components.items()}  # gathered once
    # Group ids are per process; offset them so that groups of different processes stay apart.
    groups_per_process = cfg.prompts_per_batch * cfg.batches_per_epoch
    all_groups = acc.gather((traj.group + acc.process_index * groups_per_process).to(acc.device)).cpu()
    all_prompts = _gather_prompts(run, traj.prompts)
    finite_all = torch.isfinite(all_rewards)
    finite = torch.isfinite(rewards)
    if not bool(finite_all.any()):
        raise RunError(
            f"epoch {epoch}: no image had a finite reward ({cfg.reward} returned NaN or inf for all "
            f"{len(all_rewards)}); nothing was trained this epoch"
        )
    if not bool(finite_all.all()) and acc.is_main_process:
        print(f"warning: {int((~finite_all).sum())} non-finite reward(s) dropped from their pairs", file=sys.stderr)
    # 3. Normalise into advantages (the tracker sees the same gathered data on every process).
    adv_all = torch.zeros_like(all_rewards)
    kept = finite_all.nonzero().flatten().tolist()
    kept_prompts = [all_prompts[i] for i in kept]
    if components and cfg.reward_combine == "normalized":
        # Each reward normalised on its own (per-prompt statistics kept apart by name), then weighted.
        adv_kept, used = torch.zeros(len(kept)), {}
        for name, values in all_components.items():
            adv, used = normalize_rewards(
                values[kept], [f"{name}\x00{p}" for p in kept_prompts], cfg.normalization, run.tracker,
                group=all_groups[kept], std_floor=cfg.adv_std_floor,
            )  # fmt: skip
            adv_kept += run.reward.weights[name] * adv
        adv_kept = adv_kept.clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
    else:
        adv_kept, used = normalize_rewards(
            all_rewards[kept], kept_prompts, cfg.normalization, run.tracker,
            group=all_groups[kept], std_floor=cfg.adv_std_floor, adv_clip_max=cfg.adv_clip_max,
        )  # fmt: skip
    adv_all[kept] = adv_kept
    rank_slice = slice(acc.process_index * len(traj), (acc.process_index + 1) * len(traj))
    advantages = adv_all[rank_slice]  # (B,)
    drift = rescore_check(run, traj) if cfg.rescore_check else float("nan")
    # 4. Pair and update.
    run.unet.train()
    plan = (rebel_plan if cfg.algorithm == "rebel" else ddpo_plan)(run, traj, advantages, finite, epoch)
    update_stats = update(run, traj, plan, epoch)
    t_train = time.perf_counter()
    images = cfg.images_per_epoch(acc.num_processes)
    kept_rewards = all_rewards[finite_all]
    extra = {f"normalized_by/{kind}": n for kind, n in used.items()}
    for name, values in all_components.items():  # each component's mean over this epoch's images
        extra[f"reward/{name}"] = float(values[torch.isfinite(values)].mean())
    return {
        "epoch": epoch,
        "reward_mean": float(kept_rewards.mean()) if len(kept_rewards) else float("nan"),
        "reward_std": float(kept_rewards.std(unbiased=False)) if len(kept_rewards) else float("nan"),
        "reward_nonfinite": int((~finite_all).sum()),
        "advantage_abs_max": float(adv_all.abs().max()),
        **extra,
        **update_stats,
        "rescore_drift": drift,
        "lr": float(run.lr_scheduler.get_last_lr()[0]),
        "global_step": run.global_step,
        "images": images,
        "images_per_second": images / (t_train - t0),
        "sample_seconds": t_sample - t0,
        "train_seconds": t_train - t_sample,
    }


def epoch_prompts(run: Run, epoch: int, batch: int) -> list[str]:
    """This process's prompts of one sampling batch: drawn with replacement from (seed, epoch, batch)."""
    cfg, acc = run.cfg, run.accelerator
    rng = np.random.default_rng([cfg.seed, epoch, batch])
    picks = rng.integers(0, len(run.prompts), size=cfg.prompts_per_batch * acc.num_processes)
    mine = picks[acc.process_index * cfg.prompts_per_batch : (acc.process_index + 1) * cfg.prompts_per_batch]
    return [run.prompts[i] for i in mine]


def epoch_seeds(run: Run, epoch: int, batch: int, count: int) -> list[int]:
    """Per-image seeds, distinct across epochs, batches and processes."""
    seq = np.random.SeedSequence([run.cfg.seed, epoch, batch, run.accelerator.process_index])
    return [int(s) for s in seq.generate_state(count, dtype=np.uint32)]


def sample_epoch(run: Run, epoch: int) -> Trajectories:
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    unet = acc.unwrap_model(run.unet)
    unet.eval()
    parts = []
    n = cfg.prompts_per_batch * cfg.images_per_prompt
    for b in tqdm(
        range(cfg.batches_per_epoch),
        desc=f"epoch {epoch}: sampling",
        leave=False,
        position=1,
        disable=not acc.is_local_main_process or run.progress != "bar",
    ):
        with acc.autocast():
            parts.append(
                sample_trajectories(
                    run.pipe,
                    epoch_prompts(run, epoch, b),
                    images_per_prompt=cfg.images_per_prompt,
                    seeds=epoch_seeds(run, epoch, b, n),
                    settings=run.settings,
                    unet=unet,
                    group_offset=b * cfg.prompts_per_batch,
                    text_cache=run.text_cache,
                )
            )
        stop_point(run)
    return Trajectories.cat(parts)


@torch.no_grad()
def score(reward, traj_or_images, prompts=None, batch_size: int = 32) -> torch.Tensor:
    """Rewards (B,) float32 on the CPU, computed in batches."""
    images = traj_or_images.images if prompts is None else traj_or_images
    prompts = traj_or_images.prompts if prompts is None else prompts
    out = [
        reward(images[i : i + batch_size], prompts[i : i + batch_size]).float().cpu()
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out)


@torch.no_grad()
def score_components(reward, traj: Trajectories, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """{name: (B,) float32 on the CPU} of a ``CombinedReward``'s components; {} for one reward."""
    if not isinstance(reward, CombinedReward):
        return {}
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(traj), batch_size):
        for name, value in reward.components(
            traj.images[i : i + batch_size], traj.prompts[i : i + batch_size]
        ).items():
            parts.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(values) for name, values in parts.items()}


def _gather_prompts(run: Run, prompts: list[str]) -> list[str]:
    from accelerate.utils import gather_object

    return list(gather_object(list(prompts))) if run.accelerator.num_processes > 1 else list(prompts)


def rescore_check(run: Run, traj: Trajectories) -> float:
    """Max |re-scored - recorded| log-prob on a few images and steps before the update (on-policy)."""
    with run.accelerator.autocast():
        return rescore_drift(run.accelerator.unwrap_model(run.unet), run.scheduler, traj)


def latent_dim(traj: Trajectories) -> int:
    """D = C*h*w: the per-step log-probs are means over D dims; --eta is against their sum."""
    return traj.latents[0, 0].numel()


def run_trained_steps(run: Run, traj: Trajectories) -> list[int]:
    """The stochastic steps the update trains: those whose noise std is at least --min-step-std."""
    try:
        return trained_steps(traj.step_std.tolist(), run.cfg.min_step_std)
    except ValueError as e:
        raise UsageError(str(e)) from e


@contextmanager
def base_unet(run: Run):
    """The frozen base UNet inside the block: the trained UNet with its LoRA adapters disabled (full
    fine-tune: the frozen copy made before any checkpoint was loaded)."""
    if run.ref_unet is not None:
        yield run.ref_unet
        return
    unet = run.accelerator.unwrap_model(run.unet)
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def reference_mean(run: Run, traj: Trajectories):
    """(steps, index) -> (b*m, C, h, w): the base policy's step means at the recorded x_t, no graph."""

    def mean(steps: list[int], index: torch.Tensor) -> torch.Tensor:
        with base_unet(run) as unet:
            return steps_log_prob(unet, run.scheduler, traj, steps, index=index, with_mean=True)[1]

    return mean


def base_log_probs(run: Run, traj: Trajectories, steps: list[int]) -> torch.Tensor:
    """(B, T) per-dim log-probs of the recorded trajectories under the frozen base, on ``steps``
    (0 elsewhere), no graph: what ``--anchor base`` regresses against."""
    out = torch.zeros_like(traj.log_probs)
    with base_unet(run) as unet, run.accelerator.autocast():
        scored = rescore_log_probs(unet, run.scheduler, traj, steps, steps_per_pass=run.steps_per_pass)  # (B, S)
    out[:, steps] = scored.to(out.device, out.dtype)
    return out


def _optimizer_step(run: Run) -> float:
    """Clip, step, schedule; a non-finite gradient skips the step (the loss is never NaN-poisoned)."""
    acc, cfg = run.accelerator, run.cfg
    if cfg.max_grad_norm > 0:
        norm = acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in run.params if p.grad is not None]))
    norm = float(norm)
    # fp16: the grad scaler must see every step (it skips non-finite ones and lowers its scale itself).
    if math.isfinite(norm) or acc.scaler is not None:
        run.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            run.global_step += 1
            if run.ema is not None:
                ema_update(run.ema, _trainable_named(run), cfg.ema_decay)
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm


@torch.no_grad()
def ema_update(ema: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place, per tensor."""
    for name, value in params.items():
        ema[name].mul_(decay).add_(value.detach().float(), alpha=1 - decay)


def _trainable_named(run: Run) -> dict[str, torch.nn.Parameter]:
    unet = run.accelerator.unwrap_model(run.unet)
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def _backward(run: Run):
    acc = run.accelerator

    def backward(loss, last: bool):
        # Gradients are all-reduced once per optimizer step, on its last backward.
        with nullcontext() if last else acc.no_sync(run.unet):
            acc.backward(loss)

    return backward


@dataclass
class UpdatePlan:
    """What one algorithm trains on this epoch; ``update`` runs the loop both algorithms share.

    ``accumulate(units, steps, step_scale, first)`` adds the gradient of one optimizer step on the
    units ``units`` (indices of prompt groups or images) and returns its statistics; a ``prediction``
    and ``target`` among them (REBEL) are kept from the last pass to measure the regression's fit.
    """

    units: int  # prompt groups (REBEL: a step takes all pairs of whole groups) or images (DDPO)
    units_per_step: int
    salt: int  # separates the algorithms' shuffling streams
    accumulate: Callable[[torch.Tensor, list[int], float, bool], dict]
    summary: dict = field(default_factory=dict)  # figures known before the loop (e.g. pairs)


def rebel_plan(run: Run, traj: Trajectories, advantages: torch.Tensor, finite: torch.Tensor, epoch: int):
    """REBEL: all pairs of each prompt's images, regressed on their advantage gap (or preference)."""
    cfg = run.cfg
    pairs = pair_indices(traj.group)  # (P, 2)
    valid = finite[pairs[:, 0]] & finite[pairs[:, 1]]  # (P,)
    if _all_processes_zero(run, int(valid.sum())):
        raise RunError(
            f"epoch {epoch}: no pair of images had two finite rewards ({cfg.reward}); nothing was trained this epoch"
        )
    if run.preference is not None:
        with torch.no_grad():
            pref = torch.cat([
                run.preference(traj.images[pairs[i:i + 32, 0]], traj.images[pairs[i:i + 32, 1]],
                               [traj.prompts[j] for j in pairs[i:i + 32, 0].tolist()]).float().cpu()
                for i in range(0, len(pairs), 32)
            ])  # fmt: skip
        targets = pair_targets(advantages, pairs, torch.nan_to_num(pref, nan=0.5))
    else:
        targets = pair_targets(advantages, pairs)
    targets = torch.where(valid, targets, torch.zeros_like(targets))  # (P,)
    trained = run_trained_steps(run, traj)
    dims = latent_dim(traj)
    score_unet = run.accelerator.unwrap_model(run.unet)
    reference = reference_mean(run, traj)
    summary = {}
    base_logp = None
    if cfg.anchor == "base":
        base_logp = base_log_probs(run, traj, trained)  # (B, T)
        # ln pi_t(y) - ln pi_ref(y) over the trained steps, in nats: its mean estimates KL(pi_t || pi_ref).
        to_base = (traj.log_probs[:, trained] - base_logp[:, trained]).sum(dim=1) * dims  # (B,)
        summary["log_ratio_to_base"] = float(_mean_across(run, {"v": [float(to_base[finite].mean())]})["v"])

    groups = torch.unique(traj.group, sorted=True)  # (G,)
    pair_group = traj.group[pairs[:, 0]]  # (P,)

    def accumulate(units: torch.Tensor, steps: list[int], scale: float, first: bool) -> dict:
        # Whole groups: each image's log-prob is differentiated once for all k - 1 of its pairs.
        idx = torch.isin(pair_group, groups[units]).nonzero().flatten()
        stats = rebel_accumulate(
            run.unet, run.scheduler, traj, pairs[idx], targets[idx],
            eta=cfg.eta / dims,  # --eta is against summed log-likelihoods; the log-probs are means over D
            train_batch_size=cfg.train_batch_size, steps=steps, step_scale=scale,
            steps_per_pass=run.steps_per_pass, on_policy=first, backward=_backward(run),
            autocast=run.accelerator.autocast, score_unet=score_unet, valid=valid[idx], ratio_steps=trained,
            kl_coef=cfg.kl_coef, reference_mean=reference,
            base_log_probs=base_logp, epsilon=ddpo_clip_range(cfg.clip_range, dims),
        )  # fmt: skip
        out = {k: stats[k] for k in ("loss", "prediction", "target")}
        out["log_ratio_diff_abs"] = stats["log_ratio_diff_abs"] * dims  # in nats, the units of --eta
        if cfg.kl_coef > 0:
            out["kl"] = stats["kl"]
        return out

    pairs_total = run.accelerator.reduce(
        torch.tensor([float(valid.sum())], device=run.accelerator.device), reduction="sum"
    )
    per_step = cfg.images_per_step() // cfg.images_per_prompt  # whole prompts
    return UpdatePlan(
        units=len(groups), units_per_step=per_step, salt=1, accumulate=accumulate,
        summary={"pairs": int(pairs_total.item()), **summary},
    )  # fmt: skip


def ddpo_plan(run: Run, traj: Trajectories, advantages: torch.Tensor, finite: torch.Tensor, epoch: int):
    """DDPO baseline: PPO-clip per image and step on the same rollouts and advantages."""
    cfg = run.cfg
    advantages = torch.where(finite, advantages, torch.zeros_like(advantages))  # no gradient from those
    reference = reference_mean(run, traj)
    dims = latent_dim(traj)

    def accumulate(idx: torch.Tensor, steps: list[int], scale: float, first: bool) -> dict:
        # DDPO's loss is a mean over steps: a subsample needs no rescaling (scale is unused).
        # Its KL term (nats, summed over dims and steps) is scaled as its per-dim mean policy term.
        stats = ddpo_accumulate(
            run.unet, run.scheduler, traj, idx, advantages, clip_range=ddpo_clip_range(cfg.clip_range, dims),
            adv_clip_max=cfg.adv_clip_max, train_batch_size=cfg.train_batch_size, steps=steps,
            steps_per_pass=run.steps_per_pass, backward=_backward(run), autocast=run.accelerator.autocast,
            kl_coef=ddpo_kl_coef(cfg.kl_coef, dims, len(steps)), reference_mean=reference,
        )  # fmt: skip
        return {k: stats[k] for k in ("loss", "approx_kl", "clipfrac", *(("kl",) if cfg.kl_coef > 0 else ()))}

    return UpdatePlan(units=len(traj), units_per_step=cfg.images_per_step(), salt=2, accumulate=accumulate)


def ddpo_clip_range(clip_range: float | None, dims: int) -> float:
    """DDPO's clip range on per-dim mean log-prob ratios: ``clip_range`` as given, else CLIP_NATS / D.
    REBEL's ``--anchor base`` clips each step's log-ratio to the sampling policy at the same bound.

    The per-dim mean of a log-ratio is its sum over the D = C*h*w latent dims divided by D, so a
    fixed range on it is a trust region that widens with the resolution; CLIP_NATS / D keeps it at
    the same nats per step (DDPO's 1e-4 at SD 1.5 512 px; 6.25e-3 on toy, where 1e-4 barely moved).
    """
    return clip_range if clip_range is not None else CLIP_NATS / dims


def ddpo_kl_coef(kl_coef: float, dims: int, num_steps: int) -> float:
    """The coefficient of DDPO's KL term (nats per image) in its loss: kl_coef / (D * m).

    DDPO's PPO loss is a mean over m steps of per-dim mean log-probs: at ratio 1 its gradient is
    A * grad ln pi(y) / (D * m), with ln pi(y) summed over dims and steps. Dividing the KL by the
    same D * m makes the loss a multiple of the KL-regularised objective A * ln pi(y) - kl_coef * KL:
    kl_coef is the price of one nat of KL in advantage units, as in REBEL's loss (whose on-policy
    gradient per pair at eta = 2 is (A - A') * grad (ln pi(y) - ln pi(y'))). Without it the KL
    outweighed DDPO's policy term D * m times (2,048 on toy) and DDPO did not move off the base.
    """
    return kl_coef / (dims * num_steps)


def update(run: Run, traj: Trajectories, plan: UpdatePlan, epoch: int) -> dict:
    """``inner_epochs`` shuffled passes over the plan's units, one optimizer step per
    ``units_per_step`` of them (``train_batch_size x gradient_accumulation_steps`` images); statistics
    averaged over steps and processes."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    trained = run_trained_steps(run, traj)
    per_step = plan.units_per_step
    steps_per_pass_total = plan.units // per_step
    steps_total = cfg.inner_epochs * steps_per_pass_total
    stats: dict[str, list[float]] = {"grad_norm": []}
    fit = {"prediction": [], "target": []}  # the last pass's, each measured before its own step
    bar = tqdm(
        total=steps_total,
        desc=f"epoch {epoch}: training",
        leave=False,
        position=1,
        disable=not acc.is_local_main_process or run.progress != "bar",
    )
    for inner in range(cfg.inner_epochs):
        seed = np.random.SeedSequence([cfg.seed, epoch, inner, plan.salt]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(plan.units, generator=gen)
        for s in range(steps_per_pass_total):
            idx = order[s * per_step : (s + 1) * per_step]
            steps, scale = subsample_steps(trained, cfg.timestep_fraction, gen)
            step_stats = plan.accumulate(idx, steps, scale, inner == 0 and s == 0)
            stats["grad_norm"].append(_optimizer_step(run))
            stop_point(run)
            for key, value in step_stats.items():
                if key in fit:
                    if inner == cfg.inner_epochs - 1:
                        fit[key].append(value)
                else:
                    stats.setdefault(key, []).append(value)
            bar.update(1)
    bar.close()
    out = {**_mean_across(run, stats), **plan.summary, "optimizer_steps": steps_total}
    if fit["prediction"]:
        out.update(regression_fit(_gather_cat(run, fit["prediction"]), _gather_cat(run, fit["target"])))
    return out


def _gather_cat(run: Run, parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate this process's (n_i,) tensors, then every process's (variable lengths). -> (N,)."""
    from accelerate.utils import gather_object

    local = torch.cat(parts) if parts else torch.zeros(0)
    if run.accelerator.num_processes == 1:
        return local
    return torch.tensor([v for chunk in gather_object([local.tolist()]) for v in chunk])


def _mean_across(run: Run, stats: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each statistic over optimizer steps and processes."""
    names = sorted(stats)
    local = torch.tensor([float(np.mean(stats[n])) if stats[n] else 0.0 for n in names], device=run.accelerator.device)
    mean = run.accelerator.reduce(local, reduction="mean").cpu()
    return {n: float(v) for n, v in zip(names, mean)}


# ----------------------------------------------------------------------------------------------
# the per-epoch grid, the held-out evaluation, and reporting


def grid_images(run: Run):
    """The fixed grid prompts and seeds: (N, 3, H, W) images, their N prompts and (N,) rewards."""
    cfg = run.cfg
    n = cfg.grid_num_images
    prompts = [run.grid_prompts[(i * len(run.grid_prompts)) // n % len(run.grid_prompts)] for i in range(n)]
    unet = run.accelerator.unwrap_model(run.unet)
    unet.eval()
    with run.accelerator.autocast():
        traj = sample_trajectories(
            run.pipe, prompts, seeds=[cfg.seed + i for i in range(n)], settings=run.settings, unet=unet, record=False
        )
    return traj.images, prompts, score(run.reward, traj.images, prompts)


def report_epoch(run: Run, epoch: int, metrics: dict) -> None:
    """Grid and its reward, held-out evaluation when due, then metrics.jsonl, the trackers and the
    reward curve (main process)."""
    acc = run.accelerator
    if acc.is_main_process:
        with _ema_weights(run):  # what the run exports is what its grid and held-out figures show
            images, prompts, rewards = grid_images(run)
            heldout = heldout_eval(run) if run.heldout is not None and epoch % run.cfg.heldout_every == 0 else {}
        finite = rewards[torch.isfinite(rewards)]
        metrics["grid_reward_mean"] = float(finite.mean()) if len(finite) else float("nan")
        metrics["grid_reward_std"] = float(finite.std(unbiased=False)) if len(finite) else float("nan")
        metrics.update(heldout)
        captions = [f"{p} | {r:.3f}" for p, r in zip(prompts, rewards.tolist())]
        grid = report.make_grid(grid_tiles(images), captions)  # SDXL's 1024 px tiles at 256: a readable file
        report.save_png(grid, run.out / run_folder.GRIDS / f"epoch_{epoch:04d}.png")
        metrics_file = run.out / run_folder.METRICS
        if epoch == 0:
            report.truncate_metrics(metrics_file, -1)
        report.append_metrics(metrics_file, metrics)
        report.plot_reward_curve(report.read_metrics(metrics_file), run.out / run_folder.REWARD_CURVE)
        if run.cfg.log_with != "none":
            acc.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=epoch)
            _log_grid(run, grid, epoch)
        if run.progress != "none":
            acc.print(epoch_line(epoch, metrics))
    acc.wait_for_everyone()


def epoch_line(epoch: int, metrics: dict) -> str:
    """One console line an epoch (epoch 0: the base's figures), with the held-out ones when measured."""
    if epoch == 0:
        text = f"epoch 0 (base): grid {metrics['grid_reward_mean']:.4f}"
    else:
        text = (
            f"epoch {epoch}: reward {metrics['reward_mean']:.4f} ± {metrics['reward_std']:.4f}, "
            f"grid {metrics['grid_reward_mean']:.4f}, loss {metrics['loss']:.4g}, "
            f"{metrics['images_per_second']:.2f} images/s"
        )
    heldout = [f"{k.removeprefix('heldout/')} {v:.4g}" for k, v in metrics.items() if k.startswith("heldout/")]
    return text + (f"; held-out: {', '.join(heldout)}" if heldout else "")


def heldout_eval(run: Run) -> dict:
    """heldout/<reward> and heldout/diversity of the current weights on the held-out prompts
    (reward hacking shows here: the trained reward rises while the others, or diversity, fall)."""
    from .evaluate import evaluate_pipelines, heldout_metrics

    unet = run.accelerator.unwrap_model(run.unet)
    unet.eval()
    with run.accelerator.autocast():
        result = evaluate_pipelines(
            None, run.pipe, run.heldout.prompts, run.heldout.rewards,
            [run.cfg.seed + i for i in range(run.cfg.heldout_images)], run.settings,
            diversity=run.heldout.diversity, tuned_unet=unet,
        )  # fmt: skip
    return heldout_metrics(result)


def _log_grid(run: Run, grid, epoch: int) -> None:
    array = np.asarray(grid.convert("RGB"))
    if run.cfg.log_with == "tensorboard":
        run.accelerator.get_tracker("tensorboard").log_images({"grid": array[None]}, step=epoch, dataformats="NHWC")
    elif run.cfg.log_with == "wandb":
        run.accelerator.get_tracker("wandb").log_images({"grid": [grid]}, step=epoch)


# ----------------------------------------------------------------------------------------------
# save_checkpoint / load_checkpoint (the files themselves: run_folder)


def _trainable_state(run: Run) -> dict[str, torch.Tensor]:
    unet = run.accelerator.unwrap_model(run.unet)
    return {n: p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def capture_state(run: Run) -> dict:
    """Everything a checkpoint holds, copied to the CPU now: trainable weights, optimizer, LR schedule,
    stat tracker, step count and this process's RNG state."""
    return {
        "weights": _trainable_state(run),
        "optimizer": _cpu_clone(run.optimizer.state_dict()),
        "lr_scheduler": _cpu_clone(run.lr_scheduler.state_dict()),
        "tracker": json.loads(json.dumps(run.tracker.state_dict())),
        "global_step": run.global_step,
        "rng": _rng_state(),
        "ema": None if run.ema is None else {n: v.detach().cpu().clone().contiguous() for n, v in run.ema.items()},
    }


def _cpu_clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_clone(v) for v in obj)
    return obj


def save_checkpoint(run: Run, epoch: int, state: dict | None = None) -> Path:
    """Write checkpoints/epoch_NNNN atomically (a temp folder renamed when complete), on every process.

    ``state``: from ``capture_state`` (default: now). Keeps the last ``checkpoints_keep``; refreshes
    lora/ (or unet/) for plain diffusers use. A write that fails (disk full, read-only) removes the
    temp folder and raises ``RunError``: the previous checkpoint stays intact.
    """
    acc = run.accelerator
    state = state or capture_state(run)
    _check_in_sync(run, state["weights"])
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
            with _ema_weights(run):  # the exported LoRA holds the EMA, when there is one
                run_folder.export_weights(run.out, acc.unwrap_model(run.unet), run.cfg.finetune)
            run_folder.write_model_card(
                run.out,
                dataclasses.asdict(run.cfg),
                report.read_metrics(run.out / run_folder.METRICS),
                sdxl=is_sdxl(run.unet),
                sampler=run.settings.sampler,
            )
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        run_folder.abort_checkpoint(run.out, epoch)
        raise RunError(
            f"cannot write checkpoint epoch_{epoch:04d} ({_first_line(e)}); free disk space or fix the folder's "
            f"permissions, then {run_folder.next_step(run.out)}"
        ) from e
    acc.wait_for_everyone()
    run.checkpointed_epoch = epoch
    return run_folder.checkpoint_dir(run.out, epoch)


@contextmanager
def _ema_weights(run: Run):
    """The EMA weights in place of the trained ones inside the block (nothing without --ema-decay)."""
    if run.ema is None:
        yield
        return
    named = _trainable_named(run)
    saved = {n: p.detach().clone() for n, p in named.items()}
    with torch.no_grad():
        for n, p in named.items():
            p.copy_(run.ema[n].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(saved[n])


def _check_in_sync(run: Run, state: dict[str, torch.Tensor]) -> None:
    """Every process must hold the same trainable weights (gradients all-reduced): fail loudly if not."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return
    digest = torch.stack([v.double().sum() for v in state.values()] + [torch.zeros((), dtype=torch.float64)])
    digests = acc.gather(digest[None].float().to(acc.device)).cpu()
    if not torch.equal(digests.min(dim=0).values, digests.max(dim=0).values):
        raise RuntimeError("trainable weights differ across processes: gradients were not synchronised")


def load_checkpoint(run: Run, folder: Path) -> None:
    """Restore a checkpoint written by ``save_checkpoint``; a damaged one is a one-line UsageError."""
    acc = run.accelerator
    try:
        state = run_folder.read_checkpoint(folder, acc.process_index)
        unet = acc.unwrap_model(run.unet)
        missing = {n for n, p in unet.named_parameters() if p.requires_grad} - set(state["weights"])
        if missing:
            raise ValueError(f"{len(missing)} trainable weights missing (another --finetune or LoRA layout?)")
        restore_state(run, state)
        if state["rng"] is not None:
            _set_rng_state(state["rng"])
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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# cleanup


def cleanup(run: Run) -> None:
    """End the experiment trackers (their files flushed) and wait for every process."""
    acc = run.accelerator
    if run.cfg.log_with != "none":
        acc.end_training()
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# small helpers


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: ("" if v is None else v) for k, v in dataclasses.asdict(cfg).items()}
