"""The training recipe: ``rebel-diffusion train``. Read it top to bottom:

    setup            output folder, prompts, reward, accelerate, model, LoRA, optimizer, resume
    train            per epoch: sample -> score -> normalise -> pair -> update -> eval grid -> log
    save_checkpoint  trainable weights, optimizer, LR schedule, stat tracker, RNG, epoch: atomically
    cleanup          trackers, final LoRA, the reward curve

Every source of randomness is derived from (seed, epoch, batch, process), so a resumed run
repeats an uninterrupted one exactly. Every process runs every collective (gather, barrier,
checkpoint), in the same order: the peers hung where only the main process did.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import report
from .advantages import PerPromptStatTracker, normalize_rewards
from .config import TrainConfig, add_config_arguments, config_from_args
from .errors import UsageError
from .models import add_lora, load_pipeline, save_lora
from .prompts_io import load_prompts
from .rebel import pair_indices, pair_targets, subsample_steps
from .rewards import load_preference, load_reward
from .sampling import (
    SamplingSettings,
    Trajectories,
    make_scheduler,
    rescore_drift,
    sample_trajectories,
)
from .updates import ddpo_accumulate, rebel_accumulate

TIME_KEYS = ("images_per_second", "sample_seconds", "train_seconds", "epoch_seconds")


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    cfg = config_from_args(args)
    try:
        history = train(cfg)
    except torch.OutOfMemoryError as e:
        # One line that says what to change; the last checkpoint (if any) is intact for --resume.
        print(f"rebel-diffusion train: error: out of memory ({str(e).splitlines()[0][:120]}); lower "
              "--train-batch-size (raising --gradient-accumulation-steps keeps the optimizer step), "
              "--steps-per-pass or --eval-num-images, or add --gradient-checkpointing, then --resume",
              file=sys.stderr)
        return 1
    stopped_early = bool(history) and history[-1]["epoch"] < cfg.epochs
    return 130 if stopped_early else 0  # 130: interrupted (Ctrl-C), as shells report it


@dataclass
class Run:
    """Everything a training run holds between epochs."""

    cfg: TrainConfig
    accelerator: object
    pipe: object
    unet: object  # the prepared (possibly DDP-wrapped) UNet that is trained
    optimizer: object
    lr_scheduler: object
    reward: object
    preference: object | None
    tracker: PerPromptStatTracker
    settings: SamplingSettings
    scheduler: object  # DDIM/LCM scheduler with the training timesteps set
    prompts: list[str]
    eval_prompts: list[str]
    heldout: dict | None  # held-out eval: prompts, rewards, diversity embedder (eval_every > 0)
    out: Path
    steps_per_pass: int = 1  # denoising steps per training UNet call (resolved from the config)
    epoch: int = 0  # last completed epoch
    global_step: int = 0
    stop_requested: bool = False
    params: list = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# setup


def check_output_dir(cfg: TrainConfig) -> Path:
    """Refuse to touch an existing run folder unless --resume or --overwrite says what to do with it."""
    out = Path(cfg.output_dir)
    if cfg.resume:
        if not latest_checkpoint(out):
            raise UsageError(f"--resume: {out} has no checkpoint to resume from (checkpoints/epoch_NNNN)")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UsageError(
            f"{out} already exists: pass --resume to continue that run, --overwrite to delete it, "
            "or another --output-dir"
        )
    return out


def resolve_mixed_precision(value: str) -> str:
    if value != "auto":
        return value
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def resolve_steps_per_pass(value: int | None, device) -> int:
    """None -> 1 on an accelerator (memory is what limits there), 10 on a CPU (call overhead is)."""
    if value is not None:
        return value
    return 10 if torch.device(device).type == "cpu" else 1


def setup(cfg: TrainConfig) -> Run:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    # 1. Cheap checks first: output folder, prompts, reward and preference names.
    out = check_output_dir(cfg)
    prompts = load_prompts(cfg.prompts)
    eval_prompts = load_prompts(cfg.eval_prompts or cfg.prompts)
    heldout_prompts = load_prompts(cfg.heldout_prompts) if cfg.eval_every else None
    mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    accelerator = Accelerator(
        # Several processes on a machine without GPUs: gloo on the CPU (accelerate would run them apart).
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=mixed_precision,
        log_with=None if cfg.log_with == "none" else cfg.log_with,
        project_dir=str(out),
    )
    reward_options = {
        k: v for k, v in (("aesthetic_head", cfg.aesthetic_head), ("clip_model", cfg.clip_model),
                          ("clip_pretrained", cfg.clip_pretrained)) if v is not None
    }
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    reward = load_reward(cfg.reward, device=accelerator.device, dtype=weight_dtype, **reward_options)
    reward.load()  # missing weights fail now, not after the first epoch's sampling
    preference = (
        load_preference(cfg.preference, reward=reward, temperature=cfg.preference_temperature)
        if cfg.preference
        else None
    )
    heldout = None
    if heldout_prompts is not None:
        from .evaluate import load_diversity_model, load_rewards, parse_reward_names

        names = parse_reward_names(cfg.eval_rewards, cfg.reward)
        heldout = {
            "prompts": heldout_prompts,
            "rewards": load_rewards(names, device=accelerator.device, dtype=weight_dtype,
                                    aesthetic_head=cfg.aesthetic_head),
            "diversity": load_diversity_model(cfg.eval_diversity, device=accelerator.device) if accelerator.is_main_process else None,
        }
    accelerator.wait_for_everyone()  # every rank has checked the folder before the main one changes it
    if accelerator.is_main_process:
        if out.exists() and cfg.overwrite:
            shutil.rmtree(out)
        (out / "grids").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        _atomic_write_text(out / "config.yaml", cfg.to_yaml())
    accelerator.wait_for_everyone()

    # 2. Model: frozen parts in the mixed-precision dtype; trainable weights in fp32.
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every process
    pipe = load_pipeline(cfg.model, dtype=weight_dtype, device=accelerator.device)
    settings = SamplingSettings(
        sampler=cfg.sampler,
        num_steps=cfg.num_steps,
        eta=cfg.ddim_eta,
        guidance_scale=cfg.guidance_scale,
        height=cfg.resolution,
        width=cfg.resolution,
        negative_prompt=cfg.negative_prompt,
    ).resolve(pipe)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    unet = pipe.unet
    if cfg.finetune == "lora":
        add_lora(unet, rank=cfg.lora_rank, alpha=cfg.lora_alpha, target_modules=cfg.lora_targets.split(","))
    else:
        unet.to(torch.float32).requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.xformers:
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise UsageError(f"--xformers: not available ({str(e).splitlines()[0]}); pip install xformers") from e
    params = [p for p in unet.parameters() if p.requires_grad]

    # 3. Optimizer and schedule.
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
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
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
        eval_prompts=eval_prompts,
        heldout=heldout,
        out=out,
        steps_per_pass=resolve_steps_per_pass(cfg.steps_per_pass, accelerator.device),
        params=params,
    )
    if cfg.resume:
        load_checkpoint(run, latest_checkpoint(out))
    if cfg.log_with != "none":
        accelerator.init_trackers("rebel-diffusion", config=_flat_config(cfg))
    _print_plan(run, mixed_precision)
    return run


def _print_plan(run: Run, mixed_precision: str) -> None:
    cfg, acc = run.cfg, run.accelerator
    n = acc.num_processes
    k = cfg.images_per_prompt
    pairs = cfg.prompts_per_batch * cfg.batches_per_epoch * k * (k - 1) // 2 * n
    trainable = sum(p.numel() for p in run.params)
    acc.print(
        f"rebel-diffusion: {cfg.algorithm} on {cfg.model} ({run.settings.sampler}, {run.settings.num_steps} steps, "
        f"{run.settings.height}x{run.settings.width}), reward {cfg.reward}, {len(run.prompts)} prompts, "
        f"{n} process(es), mixed precision {mixed_precision}\n"
        f"  per epoch: {cfg.images_per_epoch(n)} images, {pairs} pairs, "
        f"{cfg.optimizer_steps_per_epoch()} optimizer steps of {cfg.gradient_accumulation_steps} micro-batch(es) x "
        f"{cfg.train_batch_size} {'pairs' if cfg.algorithm == 'rebel' else 'images'}, "
        f"{run.steps_per_pass} step(s) per UNet pass; {cfg.epochs} epochs "
        f"({'from epoch ' + str(run.epoch + 1) if run.epoch else 'from the start'}); "
        f"{trainable:,} trainable parameters ({cfg.finetune}); output {run.out}"
    )


# ----------------------------------------------------------------------------------------------
# train


def train(cfg: TrainConfig) -> list[dict]:
    """Run the whole recipe; returns the metrics of the epochs run."""
    run = setup(cfg)
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda *_: _request_stop(run, previous))
    history = []
    try:
        if run.epoch == 0:
            eval_and_report(run, epoch=0, metrics={"epoch": 0})
        for epoch in range(run.epoch + 1, cfg.epochs + 1):
            metrics = train_epoch(run, epoch)
            eval_and_report(run, epoch, metrics)
            history.append(metrics)
            stop = _any_process(run, run.stop_requested)
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs or stop:
                save_checkpoint(run, epoch)
            run.epoch = epoch
            if stop:
                run.accelerator.print(f"stopped after epoch {epoch}; continue with --resume")
                break
    finally:
        signal.signal(signal.SIGINT, previous)
        cleanup(run)
    return history


def _request_stop(run: Run, previous) -> None:
    # First Ctrl-C: finish the epoch, checkpoint, stop. Second: stop now.
    if run.stop_requested:
        raise KeyboardInterrupt
    run.stop_requested = True
    signal.signal(signal.SIGINT, previous if callable(previous) else signal.default_int_handler)
    run.accelerator.print("\nCtrl-C: finishing this epoch, then writing a checkpoint (Ctrl-C again to stop now)")


def _any_process(run: Run, flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=run.accelerator.device)
    return bool(run.accelerator.reduce(t, reduction="sum").item() > 0)


def train_epoch(run: Run, epoch: int) -> dict:
    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    # 1. Sample k images for each of a batch of prompts, recording trajectories.
    traj = sample_epoch(run, epoch)
    t_sample = time.perf_counter()
    # 2. Score, and gather every process's rewards for the statistics.
    rewards = score(run.reward, traj)  # (B,)
    all_rewards = acc.gather(rewards.to(acc.device)).cpu()
    all_prompts = _gather_prompts(run, traj.prompts)
    finite_all = torch.isfinite(all_rewards)
    finite = torch.isfinite(rewards)
    if not bool(finite_all.all()):
        acc.print(f"warning: {int((~finite_all).sum())} non-finite reward(s) dropped from their pairs")
    # 3. Normalise into advantages (the tracker sees the same gathered data on every process).
    adv_all = torch.zeros_like(all_rewards)
    kept = finite_all.nonzero().flatten().tolist()
    adv_all[kept] = normalize_rewards(
        all_rewards[kept], [all_prompts[i] for i in kept], cfg.normalization, run.tracker
    )
    rank_slice = slice(acc.process_index * len(traj), (acc.process_index + 1) * len(traj))
    advantages = adv_all[rank_slice]  # (B,)
    drift = rescore_check(run, traj) if cfg.rescore_check else float("nan")
    # 4. Pair and update.
    run.unet.train()
    update = update_rebel(run, traj, advantages, finite, epoch) if cfg.algorithm == "rebel" else \
        update_ddpo(run, traj, advantages, finite, epoch)
    t_train = time.perf_counter()
    images = cfg.images_per_epoch(acc.num_processes)
    kept_rewards = all_rewards[finite_all]
    return {
        "epoch": epoch,
        "reward_mean": float(kept_rewards.mean()) if len(kept_rewards) else float("nan"),
        "reward_std": float(kept_rewards.std(unbiased=False)) if len(kept_rewards) else float("nan"),
        "reward_nonfinite": int((~finite_all).sum()),
        **update,
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
    for b in tqdm(range(cfg.batches_per_epoch), desc=f"epoch {epoch}: sampling", disable=not acc.is_local_main_process):
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
                )
            )
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


def _gather_prompts(run: Run, prompts: list[str]) -> list[str]:
    from accelerate.utils import gather_object

    return list(gather_object(list(prompts))) if run.accelerator.num_processes > 1 else list(prompts)


def rescore_check(run: Run, traj: Trajectories) -> float:
    """Max |re-scored - recorded| log-prob on a few images and steps before the update (on-policy)."""
    with run.accelerator.autocast():
        return rescore_drift(run.accelerator.unwrap_model(run.unet), run.scheduler, traj)


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
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm


def _backward(run: Run):
    acc = run.accelerator

    def backward(loss, last: bool):
        # Gradients are all-reduced once per optimizer step, on its last backward.
        with nullcontext() if last else acc.no_sync(run.unet):
            acc.backward(loss)

    return backward


def update_rebel(run: Run, traj: Trajectories, advantages, finite, epoch: int) -> dict:
    """REBEL: all pairs of each prompt's images; residual without a graph, then step-by-step backward."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    pairs = pair_indices(traj.group)  # (P, 2)
    valid = finite[pairs[:, 0]] & finite[pairs[:, 1]]
    if run.preference is not None:
        with torch.no_grad():
            pref = torch.cat([
                run.preference(traj.images[pairs[i:i + 32, 0]], traj.images[pairs[i:i + 32, 1]],
                               [traj.prompts[j] for j in pairs[i:i + 32, 0].tolist()]).float().cpu()
                for i in range(0, len(pairs), 32)
            ])
        targets = pair_targets(advantages, pairs, torch.nan_to_num(pref, nan=0.5))
    else:
        targets = pair_targets(advantages, pairs)
    targets = torch.where(valid, targets, torch.zeros_like(targets))
    stochastic = [j for j in range(len(traj.timesteps)) if traj.stochastic[j]]
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
    score_unet = acc.unwrap_model(run.unet)
    stats = {"loss": [], "log_ratio_diff_abs": [], "grad_norm": []}
    steps_total = cfg.inner_epochs * (len(pairs) // per_step)
    bar = tqdm(total=steps_total, desc=f"epoch {epoch}: training", disable=not acc.is_local_main_process)
    for inner in range(cfg.inner_epochs):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, inner, 1]).generate_state(1)[0]))
        order = torch.randperm(len(pairs), generator=gen)
        for s in range(len(pairs) // per_step):
            idx = order[s * per_step : (s + 1) * per_step]
            steps, scale = subsample_steps(stochastic, cfg.timestep_fraction, gen)
            step_stats = rebel_accumulate(
                run.unet,
                run.scheduler,
                traj,
                pairs[idx],
                targets[idx],
                eta=cfg.eta,
                train_batch_size=cfg.train_batch_size,
                steps=steps,
                step_scale=scale,
                steps_per_pass=run.steps_per_pass,
                on_policy=inner == 0 and s == 0,
                backward=_backward(run),
                autocast=acc.autocast,
                score_unet=score_unet,
                valid=valid[idx],
            )
            stats["grad_norm"].append(_optimizer_step(run))
            stats["loss"].append(step_stats["loss"])
            stats["log_ratio_diff_abs"].append(step_stats["log_ratio_diff_abs"])
            bar.update(1)
    bar.close()
    pairs_total = acc.reduce(torch.tensor([float(valid.sum())], device=acc.device), reduction="sum")
    return {**_mean_across(run, stats), "pairs": int(pairs_total.item()), "optimizer_steps": steps_total}


def update_ddpo(run: Run, traj: Trajectories, advantages, finite, epoch: int) -> dict:
    """DDPO baseline: PPO-clip per image and step on the same rollouts and advantages."""
    from tqdm.auto import tqdm

    cfg, acc = run.cfg, run.accelerator
    advantages = torch.where(finite, advantages, torch.zeros_like(advantages))  # no gradient from those
    stochastic = [j for j in range(len(traj.timesteps)) if traj.stochastic[j]]
    per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps
    stats = {"loss": [], "approx_kl": [], "clipfrac": [], "grad_norm": []}
    steps_total = cfg.inner_epochs * (len(traj) // per_step)
    bar = tqdm(total=steps_total, desc=f"epoch {epoch}: training", disable=not acc.is_local_main_process)
    for inner in range(cfg.inner_epochs):
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, epoch, inner, 2]).generate_state(1)[0]))
        order = torch.randperm(len(traj), generator=gen)
        for s in range(len(traj) // per_step):
            steps, _ = subsample_steps(stochastic, cfg.timestep_fraction, gen)  # a mean: no rescaling
            step_stats = ddpo_accumulate(
                run.unet,
                run.scheduler,
                traj,
                order[s * per_step : (s + 1) * per_step],
                advantages,
                clip_range=cfg.clip_range,
                adv_clip_max=cfg.adv_clip_max,
                train_batch_size=cfg.train_batch_size,
                steps=steps,
                steps_per_pass=run.steps_per_pass,
                backward=_backward(run),
                autocast=acc.autocast,
            )
            stats["grad_norm"].append(_optimizer_step(run))
            for key in ("loss", "approx_kl", "clipfrac"):
                stats[key].append(step_stats[key])
            bar.update(1)
    bar.close()
    return {**_mean_across(run, stats), "optimizer_steps": steps_total}


def _mean_across(run: Run, stats: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each statistic over optimizer steps and processes."""
    names = sorted(stats)
    local = torch.tensor([float(np.mean(stats[n])) if stats[n] else 0.0 for n in names], device=run.accelerator.device)
    mean = run.accelerator.reduce(local, reduction="mean").cpu()
    return {n: float(v) for n, v in zip(names, mean)}


# ----------------------------------------------------------------------------------------------
# eval grid and reporting


def eval_images(run: Run):
    """Fixed eval prompts and seeds: (N, 3, H, W) images, their prompts and rewards (main process)."""
    cfg = run.cfg
    n = cfg.eval_num_images
    prompts = [run.eval_prompts[(i * len(run.eval_prompts)) // n % len(run.eval_prompts)] for i in range(n)]
    unet = run.accelerator.unwrap_model(run.unet)
    unet.eval()
    with run.accelerator.autocast():
        traj = sample_trajectories(
            run.pipe, prompts, seeds=[cfg.seed + i for i in range(n)], settings=run.settings, unet=unet, record=False
        )
    return traj.images, prompts, score(run.reward, traj.images, prompts)


def eval_and_report(run: Run, epoch: int, metrics: dict) -> None:
    """Eval grid and reward, then metrics.jsonl, the trackers and the reward curve (main process)."""
    acc = run.accelerator
    if acc.is_main_process:
        images, prompts, rewards = eval_images(run)
        finite = rewards[torch.isfinite(rewards)]
        metrics["eval_reward_mean"] = float(finite.mean()) if len(finite) else float("nan")
        metrics["eval_reward_std"] = float(finite.std(unbiased=False)) if len(finite) else float("nan")
        if run.heldout is not None and epoch % run.cfg.eval_every == 0:
            metrics.update(heldout_eval(run))
        grid = report.make_grid(images, [f"{p} | {r:.3f}" for p, r in zip(prompts, rewards.tolist())])
        report.save_png(grid, run.out / "grids" / f"epoch_{epoch:04d}.png")
        if epoch == 0:
            report.truncate_metrics(run.out / "metrics.jsonl", -1)
        report.append_metrics(run.out / "metrics.jsonl", metrics)
        report.plot_reward_curve(report.read_metrics(run.out / "metrics.jsonl"), run.out / "reward_curve.png")
        if run.cfg.log_with != "none":
            acc.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=epoch)
            _log_grid(run, grid, epoch)
        if epoch:
            acc.print(
                f"epoch {epoch}: reward {metrics['reward_mean']:.4f} ± {metrics['reward_std']:.4f}, "
                f"eval {metrics['eval_reward_mean']:.4f}, loss {metrics['loss']:.4g}, "
                f"{metrics['images_per_second']:.2f} images/s"
            )
    acc.wait_for_everyone()


def heldout_eval(run: Run) -> dict:
    """eval/<reward> and eval/diversity of the current weights on held-out prompts (reward hacking shows here)."""
    from .evaluate import eval_metrics, evaluate_pipelines

    unet = run.accelerator.unwrap_model(run.unet)
    unet.eval()
    with run.accelerator.autocast():
        result = evaluate_pipelines(
            None, run.pipe, run.heldout["prompts"], run.heldout["rewards"],
            [run.cfg.seed + i for i in range(run.cfg.heldout_images)], run.settings,
            diversity=run.heldout["diversity"], tuned_unet=unet,
        )  # fmt: skip
    return eval_metrics(result)


def _log_grid(run: Run, grid, epoch: int) -> None:
    array = np.asarray(grid.convert("RGB"))
    if run.cfg.log_with == "tensorboard":
        run.accelerator.get_tracker("tensorboard").log_images({"eval_grid": array[None]}, step=epoch, dataformats="NHWC")
    elif run.cfg.log_with == "wandb":
        run.accelerator.get_tracker("wandb").log_images({"eval_grid": [grid]}, step=epoch)


# ----------------------------------------------------------------------------------------------
# save_checkpoint / load_checkpoint


def latest_checkpoint(out: Path) -> Path | None:
    folder = Path(out) / "checkpoints"
    done = sorted(p for p in folder.glob("epoch_*") if p.is_dir() and (p / "state.json").is_file()) if folder.is_dir() else []
    return done[-1] if done else None


def _trainable_state(run: Run) -> dict[str, torch.Tensor]:
    unet = run.accelerator.unwrap_model(run.unet)
    return {n: p.detach().float().cpu().contiguous() for n, p in unet.named_parameters() if p.requires_grad}


def save_checkpoint(run: Run, epoch: int) -> Path:
    """Write checkpoints/epoch_NNNN atomically (a temp folder renamed when complete), on every process.

    Holds the trainable weights, optimizer, LR schedule, stat tracker, epoch, and each process's RNG
    state; keeps the last ``checkpoints_keep``; refreshes lora/ (or unet/) for plain diffusers use.
    """
    from safetensors.torch import save_file

    acc, cfg = run.accelerator, run.cfg
    folder = run.out / "checkpoints"
    final = folder / f"epoch_{epoch:04d}"
    tmp = folder / f".tmp-epoch_{epoch:04d}"
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_{acc.process_index}.pt")
    state = _trainable_state(run)  # every process computes it (cheap); main writes
    _check_in_sync(run, state)
    if acc.is_main_process:
        save_file(state, str(tmp / "trainable.safetensors"))
        torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(run.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        (tmp / "tracker.json").write_text(json.dumps(run.tracker.state_dict()))
        (tmp / "state.json").write_text(json.dumps({"epoch": epoch, "global_step": run.global_step}))
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(p for p in folder.glob("epoch_*") if p.is_dir())[: -cfg.checkpoints_keep]:
            shutil.rmtree(old)
        export_weights(run)
    acc.wait_for_everyone()
    return final


def _check_in_sync(run: Run, state: dict[str, torch.Tensor]) -> None:
    """Every process must hold the same trainable weights (gradients all-reduced): fail loudly if not."""
    acc = run.accelerator
    if acc.num_processes == 1:
        return
    digest = torch.stack([v.double().sum() for v in state.values()] + [torch.zeros((), dtype=torch.float64)])
    digests = acc.gather(digest[None].float().to(acc.device)).cpu()
    if not torch.equal(digests.min(dim=0).values, digests.max(dim=0).values):
        raise RuntimeError("trainable weights differ across processes: gradients were not synchronised")


def export_weights(run: Run) -> None:
    """lora/pytorch_lora_weights.safetensors (LoRA) or unet/ (full fine-tune), for plain diffusers."""
    unet = run.accelerator.unwrap_model(run.unet)
    if run.cfg.finetune == "lora":
        save_lora(unet, run.out / "lora")
    else:
        from .models import _replace_dir

        tmp = run.out / ".unet.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        unet.save_pretrained(str(tmp), safe_serialization=True)
        _replace_dir(tmp, run.out / "unet")


def load_checkpoint(run: Run, folder: Path) -> None:
    """Restore a checkpoint written by ``save_checkpoint``; a damaged one is a one-line UsageError."""
    from safetensors.torch import load_file

    acc = run.accelerator
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "trainable.safetensors"))
        unet = acc.unwrap_model(run.unet)
        missing = set(n for n, p in unet.named_parameters() if p.requires_grad) - set(weights)
        if missing:
            raise ValueError(f"{len(missing)} trainable weights missing (another --finetune or LoRA layout?)")
        named = dict(unet.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                named[name].copy_(value.to(named[name].device))
        run.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        run.lr_scheduler.load_state_dict(torch.load(folder / "lr_scheduler.pt", weights_only=True))
        run.tracker.load_state_dict(json.loads((folder / "tracker.json").read_text()))
        rng = folder / f"rng_{acc.process_index}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
    except Exception as e:
        raise UsageError(f"--resume: checkpoint {folder} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    run.epoch = int(state["epoch"])
    run.global_step = int(state["global_step"])
    if acc.is_main_process:
        report.truncate_metrics(run.out / "metrics.jsonl", run.epoch)
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
    acc = run.accelerator
    if run.cfg.log_with != "none":
        acc.end_training()
    acc.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# small helpers


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: ("" if v is None else v) for k, v in dataclasses.asdict(cfg).items()}

