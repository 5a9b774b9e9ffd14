"""The training recipe (``rebel-diffusion train``). Read it top to bottom:

    setup            every check first (folder, prompts, reward, model, LoRA targets, checkpoint),
                     then the run folder is written (``run_folder``): a failed start leaves nothing
    train            per epoch (``train_epoch``): sample -> score -> normalise -> pair -> update, then
                     grid -> log (``reporting``); SIGINT/SIGTERM stop it with a checkpoint within
                     --stop-grace seconds (``preemption``)
    save_checkpoint  trainable weights, optimizer, LR schedule, stat tracker, EMA, RNG, epoch:
                     atomically (``checkpoint``)
    cleanup          end the experiment trackers

The parts it assembles are in ``builders``, what each algorithm trains in ``plans``, the math in
``algorithms``. Every source of randomness is derived from (seed, epoch, batch, process), so a
resumed run repeats an uninterrupted one exactly. Every process runs every collective (gather,
barrier, checkpoint), in the same order: the peers hung where only the main process did.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..algorithms.advantages import PerPromptStatTracker, epoch_advantages
from ..algorithms.rebel import (
    regression_fit,
    subsample_steps,
)
from ..config import TrainConfig
from ..errors import RunError, UsageError
from ..models import check_sd_components, load_pipeline
from ..models.components import TextCache, uses_cfg
from ..outputs import report, run_folder
from ..outputs.evaluate import score_images
from ..outputs.generation import set_num_threads
from ..prompts_io import load_prompts
from ..rewards import CombinedReward, Reward
from ..sampling import (
    SamplingSettings,
    Trajectories,
    make_scheduler,
    rescore_drift,
    rescore_log_probs,
    sample_trajectories,
    settings_from_config,
)
from .builders import (
    Heldout,
    check_kl_prompts,
    check_resumable,
    check_tracker,
    check_trained_steps,
    heldout_sets,
    load_heldout,
    load_reward_models,
    loading_bars_off,
    make_accelerator,
    make_optimizer,
    make_trainable,
    probe_reward,
    resolve_progress,
    resolve_steps_per_pass,
    warn_long_prompts,
)
from .checkpoint import capture_state, load_checkpoint, restore_state, save_checkpoint, trainable_named
from .distributed import gather_cat, gather_strings, mean_across
from .ema import ema_init, ema_update
from .plans import UpdatePlan, ddpo_plan, rebel_plan, run_trained_steps
from .preemption import Preemption, StopEpoch
from .reporting import describe_plan, report_epoch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DiffusionPipeline


TIME_KEYS = ("images_per_second", "sample_seconds", "train_seconds")


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
    settings: SamplingSettings  # the policy's: re-scoring, grids, held-out, export
    scheduler: object  # DDIM/LCM scheduler with the training timesteps set
    prompts: list[str]
    grid_prompts: list[str]
    heldout: Heldout | None
    out: Path
    params: list[torch.nn.Parameter]
    mixed_precision: str
    lora_matches: dict[str, int]  # LoRA target -> modules it matched (empty for a full fine-tune)
    kl_prompts: frozenset[str] | None = None  # --kl-prompts: the prompts whose images get the KL term
    ref_unet: torch.nn.Module | None = None  # frozen base UNet (full fine-tune with --kl-coef or --anchor base)
    steps_per_pass: int = 1  # denoising steps per training UNet call (resolved from the config)
    epoch: int = 0  # last completed epoch
    global_step: int = 0
    stop: Preemption | None = None  # stopping on a signal (``preemption``)
    checkpointed_epoch: int | None = 0  # the last epoch on disk (0: the start needs no checkpoint)
    ema: dict[str, torch.Tensor] | None = None  # EMA of the trainable weights (fp32, their device)
    text_cache: TextCache = field(default_factory=TextCache)  # each training prompt encoded once
    progress: str = "lines"  # resolved --progress: bar, lines or none
    sample_settings: SamplingSettings | None = None  # --sample-guidance-scale's sampler (None: ``settings``)


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
    kl_prompts = check_kl_prompts(cfg, prompts)
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
        loading_bars_off()
    # 3. Rewards: their weights load now, so a missing file fails before the first epoch's sampling.
    reward, preference = load_reward_models(cfg, accelerator.device, weight_dtype)
    heldout = load_heldout(cfg, accelerator, weight_dtype) if cfg.heldout_every else None
    # 4. Model: frozen parts in the mixed-precision dtype; trainable weights in fp32.
    torch.manual_seed(cfg.seed)  # identical LoRA initialisation on every process
    pipe = load_pipeline(cfg.model, dtype=weight_dtype, device=accelerator.device, vae=cfg.vae)
    check_sd_components(pipe, cfg.model)
    settings = settings_from_config(cfg).resolve(pipe)
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
        kl_prompts=kl_prompts,
        ref_unet=ref_unet,
        steps_per_pass=resolve_steps_per_pass(cfg.steps_per_pass, accelerator.device),
        stop=Preemption(cfg.stop_grace, announce=accelerator.is_local_main_process),
        progress=progress,
        sample_settings=None
        if cfg.sample_guidance_scale is None
        else dataclasses.replace(settings, guidance_scale=cfg.sample_guidance_scale),
    )
    if cfg.ema_decay > 0:
        run.ema = ema_init(trainable_named(run))
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


# ----------------------------------------------------------------------------------------------
# train


@dataclass
class TrainResult:
    history: list[dict]  # the metrics of the epochs run
    stopped_by: int | None = None  # the signal that stopped the run early (SIGINT, SIGTERM), if any


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
        with run.stop.handlers():
            if run.epoch == 0:
                report_epoch(run, epoch=0, metrics={"epoch": 0})
            for epoch in range(run.epoch + 1, cfg.epochs + 1):
                # The state this epoch starts from, kept only when it is not on disk already.
                start_state = capture_state(run) if run.checkpointed_epoch != epoch - 1 else None
                run.stop.start_epoch()
                try:
                    metrics = train_epoch(run, epoch)
                except StopEpoch:
                    if start_state is not None:
                        restore_state(run, start_state)
                        save_checkpoint(run, epoch - 1, start_state)
                    name = signal.Signals(run.stop.signal).name
                    next_step = run_folder.next_step(run.out)
                    run.accelerator.print(f"{name}: epoch {epoch} cut short; {next_step}", file=sys.stderr)
                    break
                report_epoch(run, epoch, metrics)
                history.append(metrics)
                run.stop.end_epoch()
                stop = run.stop.agree(run.accelerator)
                if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs or stop:
                    save_checkpoint(run, epoch)
                run.epoch = epoch
                overall.update(1)
                if stop:
                    run.accelerator.print(f"stopped after epoch {epoch}; continue with --resume", file=sys.stderr)
                    break
    finally:
        overall.close()
        cleanup(run)
    return TrainResult(history, run.stop.signal)


def train_epoch(run: Run, epoch: int) -> dict:
    """One epoch: sample -> score -> normalise -> pair and update. Returns the epoch's metrics.

    Every process samples its own prompts; rewards, groups and prompts are gathered so that the
    normalisation statistics (and the tracker's state) are the same on every process. A stop
    request cuts the epoch short at the next ``Preemption.point`` (``StopEpoch``).
    """
    cfg, acc = run.cfg, run.accelerator
    t0 = time.perf_counter()
    # 1. Sample k images for each of a batch of prompts, recording trajectories (drawn by a guided
    #    sampler: then re-scored, so that the update sees the policy's own log-probs).
    traj = sample_epoch(run, epoch)
    if run.sample_settings is not None:
        traj = policy_scored(run, traj)
    t_sample = time.perf_counter()
    # 2. Score; several rewards: each component, then their weighted sum.
    components = score_components(run.reward, traj)  # {name: (B,)}, several rewards only
    if components:
        rewards = run.reward.combine(components)  # (B,)
    else:
        rewards = score_images(run.reward, traj.images, traj.prompts)  # (B,)
    # 3. Gather every process's rewards, groups (kept apart by process) and prompts.
    all_rewards = acc.gather(rewards.to(acc.device)).cpu()  # (N,)
    all_components = {name: acc.gather(v.to(acc.device)).cpu() for name, v in components.items()}
    groups_per_process = cfg.prompts_per_batch * cfg.batches_per_epoch
    all_groups = acc.gather((traj.group + acc.process_index * groups_per_process).to(acc.device)).cpu()
    all_prompts = gather_strings(acc, traj.prompts)
    finite_all = torch.isfinite(all_rewards)
    if not bool(finite_all.any()):
        raise RunError(
            f"epoch {epoch}: no image had a finite reward ({cfg.reward} returned NaN or inf for all "
            f"{len(all_rewards)}); nothing was trained this epoch"
        )
    if not bool(finite_all.all()) and acc.is_main_process:
        print(f"warning: {int((~finite_all).sum())} non-finite reward(s) dropped from their pairs", file=sys.stderr)
    # 4. Normalise into advantages; this process's slice.
    separate = bool(components) and cfg.reward_combine == "normalized"
    adv_all, used = epoch_advantages(
        all_rewards, all_prompts, all_groups, cfg.normalization, run.tracker,
        components=all_components if separate else None, weights=getattr(run.reward, "weights", None),
        std_floor=cfg.adv_std_floor, adv_clip_max=cfg.adv_clip_max,
    )  # fmt: skip
    advantages = adv_all[acc.process_index * len(traj) : (acc.process_index + 1) * len(traj)]  # (B,)
    drift = rescore_check(run, traj) if cfg.rescore_check else float("nan")
    # 5. Pair (REBEL) or not (DDPO), and update.
    run.unet.train()
    plan = (rebel_plan if cfg.algorithm == "rebel" else ddpo_plan)(
        run, traj, advantages, torch.isfinite(rewards), epoch
    )
    update_stats = update(run, traj, plan, epoch)
    t_train = time.perf_counter()
    # 6. The epoch's figures.
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


def shuffled_passes(num_prompts: int, seed: int, start: int, count: int) -> np.ndarray:
    """Positions start .. start + count - 1 of an endless stream of shuffled passes over the prompt
    list: pass p is a permutation of range(num_prompts) drawn from (seed, p). (count,) int64.

    A pure function of its arguments, so a resumed run draws what the uninterrupted one would have.
    """
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        p, j = divmod(start + i, num_prompts)
        if i == 0 or j == 0:
            order = np.random.default_rng([seed, p]).permutation(num_prompts)
        out[i] = order[j]
    return out


def epoch_prompts(run: Run, epoch: int, batch: int) -> list[str]:
    """This process's prompts of one sampling batch (epochs count from 1): with replacement, from
    (seed, epoch, batch); or the batch's slice of shuffled passes over the list (``--prompt-sampling``)."""
    cfg, acc = run.cfg, run.accelerator
    per_batch = cfg.prompts_per_batch * acc.num_processes  # every process's prompts of this batch
    if cfg.prompt_sampling == "shuffle":
        start = ((epoch - 1) * cfg.batches_per_epoch + batch) * per_batch
        picks = shuffled_passes(len(run.prompts), cfg.seed, start, per_batch)
    else:
        rng = np.random.default_rng([cfg.seed, epoch, batch])
        picks = rng.integers(0, len(run.prompts), size=per_batch)
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
                    settings=run.sample_settings or run.settings,
                    unet=unet,
                    group_offset=b * cfg.prompts_per_batch,
                    text_cache=run.text_cache,
                )
            )
        run.stop.point(run.accelerator)
    return Trajectories.cat(parts)


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


@torch.no_grad()
def policy_scored(run: Run, traj: Trajectories) -> Trajectories:
    """Trajectories drawn by ``--sample-guidance-scale``'s sampler, as the policy (the current weights
    at --guidance-scale) scores them: its settings, and its log-probs (B, T) on every stochastic step
    in place of the sampler's. To the update they are then the policy's own samples, but for who
    drew them."""
    unet = run.accelerator.unwrap_model(run.unet)
    policy = dataclasses.replace(traj, settings=run.settings)
    if not uses_cfg(unet, run.settings.guidance_scale):  # the policy has no unconditional pass to pay for
        policy = dataclasses.replace(policy, negative_embeds=None, negative_added=None)
    steps = traj.stochastic_steps()
    with run.accelerator.autocast():
        scored = rescore_log_probs(unet, run.scheduler, policy, steps, steps_per_pass=run.steps_per_pass)  # (B, S)
    log_probs = torch.zeros_like(traj.log_probs)  # (B, T)
    log_probs[:, steps] = scored.to(log_probs.device, log_probs.dtype)
    return dataclasses.replace(policy, log_probs=log_probs)


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
            if run.ema is not None:
                ema_update(run.ema, trainable_named(run), cfg.ema_decay)
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return norm


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
            run.stop.point(run.accelerator)
            for key, value in step_stats.items():
                if key in fit:
                    if inner == cfg.inner_epochs - 1:
                        fit[key].append(value)
                else:
                    stats.setdefault(key, []).append(value)
            bar.update(1)
    bar.close()
    out = {**mean_across(acc, stats), **plan.summary, "optimizer_steps": steps_total}
    if fit["prediction"]:
        out.update(regression_fit(gather_cat(acc, fit["prediction"]), gather_cat(acc, fit["target"])))
    return out


# ----------------------------------------------------------------------------------------------
# the per-epoch grid, the held-out evaluation, and reporting


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


def _flat_config(cfg: TrainConfig) -> dict:
    return {k: ("" if v is None else v) for k, v in dataclasses.asdict(cfg).items()}
