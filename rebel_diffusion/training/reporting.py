"""What a run shows each epoch: the startup lines, the grid and its reward, the held-out figures,
``metrics.jsonl``, the trackers, the reward curve, and the console's one line an epoch."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ..algorithms.ddpo import ddpo_clip_range
from ..outputs import report, run_folder
from ..outputs.evaluate import score_images
from ..outputs.generation import grid_tiles
from ..sampling import (
    sample_trajectories,
)
from .checkpoint import trainable_named
from .ema import ema_swapped_in

if TYPE_CHECKING:
    from .recipe import Run


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
    if run.kl_prompts is not None:
        covered = sum(p in run.kl_prompts for p in run.prompts)
        regulariser += f" on the images of {covered} of the {len(run.prompts)} prompts (--kl-prompts {cfg.kl_prompts})"
    if cfg.algorithm == "rebel":
        regulariser += (
            f"; anchored to the base model (each step's ratio to the sampler clipped at "
            f"{ddpo_clip_range(cfg.clip_range, dims) * dims:.3g} nats)"
            if cfg.anchor == "base"
            else "; anchored to the sampling policy"
        )
    if cfg.sample_guidance_scale is not None:
        regulariser += (
            f"; images drawn at guidance {cfg.sample_guidance_scale:g}, re-scored under the policy at "
            f"guidance {cfg.guidance_scale:g} (the batch reward is the guided sampler's)"
        )
    if cfg.ema_decay > 0:
        regulariser += f"; EMA of the weights (decay {cfg.ema_decay:g}) exported and evaluated"
    steps = f"steps trained: noise std >= {cfg.min_step_std:g}"
    if cfg.policy_step_weights != "uniform":
        steps += f", policy term weighted per step {cfg.policy_step_weights}"
    if cfg.kl_step_weights != "uniform" and cfg.kl_coef > 0:
        steps += f", KL term weighted per step {cfg.kl_step_weights}"
    lora = ", ".join(f"{t} ({m} modules)" for t, m in run.lora_matches.items())
    return (
        f"rebel-diffusion: {cfg.algorithm} on {cfg.model} ({run.settings.sampler}, {run.settings.num_steps} steps, "
        f"{run.settings.height}x{run.settings.width}), reward {cfg.reward}, {len(run.prompts)} prompts, "
        f"{n} process(es), mixed precision {run.mixed_precision}"
        f"{f', {torch.get_num_threads()} CPU thread(s)' if acc.device.type == 'cpu' else ''}\n"
        f"  {step_size}; advantages {cfg.normalization} (std floor {cfg.adv_std_floor:g} x batch std, "
        f"clip {cfg.adv_clip_max:g}); {regulariser}; {steps}\n"
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
    return traj.images, prompts, score_images(run.reward, traj.images, prompts)


def report_epoch(run: Run, epoch: int, metrics: dict) -> None:
    """Grid and its reward, held-out evaluation when due, then metrics.jsonl, the trackers and the
    reward curve (main process)."""
    acc = run.accelerator
    if acc.is_main_process:
        # What the run exports (the EMA, when there is one) is what its grid and held-out figures show.
        with ema_swapped_in(trainable_named(run), run.ema):
            images, prompts, rewards = grid_images(run)
            heldout = heldout_eval(run) if run.heldout is not None and epoch % run.cfg.heldout_every == 0 else {}
        finite = rewards[torch.isfinite(rewards)]
        metrics["grid_reward_mean"] = float(finite.mean()) if len(finite) else float("nan")
        metrics["grid_reward_std"] = float(finite.std(unbiased=False)) if len(finite) else float("nan")
        metrics.update(heldout)
        captions = [f"{p} | {r:.3f}" for p, r in zip(prompts, rewards.tolist())]
        grid = report.make_grid(grid_tiles(images), captions)  # SDXL's 1024 px tiles at 256: a readable file
        report.save_png(grid, run_folder.grid_path(run.out, epoch))
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
    from ..outputs.evaluate import evaluate_pipelines, heldout_metrics

    unet = run.accelerator.unwrap_model(run.unet)
    unet.eval()
    batch = run.cfg.prompts_per_batch * run.cfg.images_per_prompt  # a sampling batch: known to fit
    with run.accelerator.autocast():
        result = evaluate_pipelines(
            None, run.pipe, run.heldout.prompts, run.heldout.rewards,
            [run.cfg.seed + i for i in range(run.cfg.heldout_images)], run.settings,
            diversity=run.heldout.diversity, tuned_unet=unet, batch_size=batch,
        )  # fmt: skip
    return heldout_metrics(result)


def _log_grid(run: Run, grid, epoch: int) -> None:
    array = np.asarray(grid.convert("RGB"))
    if run.cfg.log_with == "tensorboard":
        run.accelerator.get_tracker("tensorboard").log_images({"grid": array[None]}, step=epoch, dataformats="NHWC")
    elif run.cfg.log_with == "wandb":
        run.accelerator.get_tracker("wandb").log_images({"grid": [grid]}, step=epoch)
