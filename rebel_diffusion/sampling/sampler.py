"""The trajectory sampler with per-step log-probs, and re-scoring recorded trajectories.

``sample_trajectories`` draws k images per prompt, each from its own seed, recording every latent
and the log-prob of every step (the convention: ``rebel_diffusion.sampling.steps``); ``steps_log_prob`` and
``rescore_log_probs`` re-score recorded steps under the current weights (the update and the
on-policy check). ``SamplingSettings`` says how (``settings_from_config``: a run's); ``Trajectories``
holds what was drawn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from diffusers.utils.torch_utils import randn_tensor

from ..errors import UsageError
from ..models.components import (
    TextCache,
    decode_latents,
    encode_prompts,
    encode_prompts_sdxl,
    guided_model_output,
    is_lcm_model,
    is_sdxl,
    sdxl_time_ids,
    uses_cfg,
)
from .steps import ddim_step_with_logprob, lcm_step_with_logprob

if TYPE_CHECKING:  # for the annotation only: the sampler does not depend on the training config
    from ..config import TrainConfig

# ----------------------------------------------------------------------------------------------
# Settings and schedulers


@dataclass(frozen=True)
class SamplingSettings:
    """How trajectories are drawn; re-scoring must use the very same settings.

    sampler: 'ddim' or 'lcm' ('auto' picks LCM for LCM models, else DDIM).
    num_steps: denoising steps T.  ddim_eta: DDIM's noise scale (unused by LCM); 0 is deterministic
    DDIM, fine for drawing but with no log-prob to train (training configs refuse it).
    guidance_scale: classifier-free guidance w (<= 1: no unconditional pass). LCM models with a
    guidance embedding get w as that embedding, with no unconditional pass.
    height, width: image size in pixels (None: the model's native size).
    negative_prompt: the unconditional prompt of CFG ('' as in SD).
    """

    sampler: str = "auto"
    num_steps: int = 50
    ddim_eta: float = 1.0
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""

    def resolve(self, pipe) -> SamplingSettings:
        """Fill 'auto' and None from the model, validate, and return the concrete settings."""
        sampler = self.sampler
        if sampler == "auto":
            sampler = "lcm" if is_lcm_model(pipe) else "ddim"
        if sampler not in ("ddim", "lcm"):
            raise UsageError(f"sampler must be 'auto', 'ddim' or 'lcm', got {self.sampler!r}")
        if self.num_steps < 1:
            raise UsageError(f"the number of sampling steps must be >= 1, got {self.num_steps}")
        if sampler == "ddim" and self.ddim_eta < 0:
            raise UsageError(f"DDIM eta must be >= 0 (got {self.ddim_eta}); 0 is deterministic DDIM")
        scale = pipe.vae_scale_factor
        native = pipe.unet.config.sample_size * scale
        height = native if self.height is None else self.height  # 0 is an error, not 'native'
        width = native if self.width is None else self.width
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % scale:
                raise UsageError(f"{name} must be a positive multiple of the VAE's scale factor {scale}, got {v}")
        return replace(self, sampler=sampler, height=height, width=width)


def settings_from_config(cfg: TrainConfig | None = None, **overrides) -> SamplingSettings:
    """The sampler settings of a run's config (None: ``SamplingSettings``' defaults), with the
    ``overrides`` (field names, and ``resolution`` for height and width) that are not None.
    Unresolved: ``.resolve(pipe)`` fills in 'auto' and the model's native size."""
    settings = SamplingSettings()
    if cfg is not None:
        settings = SamplingSettings(
            sampler=cfg.sampler,
            num_steps=cfg.num_steps,
            ddim_eta=cfg.ddim_eta,
            guidance_scale=cfg.guidance_scale,
            height=cfg.resolution,
            width=cfg.resolution,
            negative_prompt=cfg.negative_prompt,
        )
    given = {k: v for k, v in overrides.items() if v is not None}
    if "resolution" in given:
        given["height"] = given["width"] = given.pop("resolution")
    return replace(settings, **given)


def make_scheduler(pipe, settings: SamplingSettings, device=None):
    """A fresh DDIM or LCM scheduler from the pipeline's config, with ``num_steps`` timesteps set."""
    from diffusers import DDIMScheduler, LCMScheduler

    if settings.sampler == "ddim":
        cls = DDIMScheduler
    elif settings.sampler == "lcm":
        cls = LCMScheduler
    else:
        raise ValueError(f"no scheduler for sampler {settings.sampler!r}: resolve the settings first")
    scheduler = cls.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.num_steps, device=device)
    return scheduler


def scheduler_step(
    scheduler, settings, model_output, timestep, sample, *, prev_sample=None, generator=None, with_mean=False
):
    """One step of ``settings.sampler`` with its log-prob: ``steps.ddim`` or ``steps.lcm`` (same returns)."""
    if settings.sampler == "ddim":
        return ddim_step_with_logprob(
            scheduler, model_output, timestep, sample, eta=settings.ddim_eta, prev_sample=prev_sample,
            generator=generator, with_mean=with_mean,
        )  # fmt: skip
    elif settings.sampler == "lcm":
        return lcm_step_with_logprob(
            scheduler, model_output, timestep, sample, prev_sample=prev_sample, generator=generator,
            with_mean=with_mean,
        )  # fmt: skip
    raise ValueError(f"no step for sampler {settings.sampler!r}: resolve the settings first")


# ----------------------------------------------------------------------------------------------
# Trajectories


@dataclass
class Trajectories:
    """Images and the denoising trajectories that made them; B images, T steps.

    prompts: B prompts.  group: (B,) long, images of the same prompt entry share a group id.
    seeds: (B,) long, image i is reproducible from seeds[i] alone.
    prompt_embeds: (B, L, D); negative_embeds: (B, L, D), or None without an unconditional pass.
    latents: (B, T+1, C, h, w) float32, x_T ... x_0.  timesteps: (T,) long.
    log_probs: (B, T) float32, log pi(latents[:, j+1] | latents[:, j]) (MEAN over C, h, w);
        0 where ``stochastic`` is False.  stochastic: (T,) bool, steps that carry a log-prob.
    images: (B, 3, H, W) float32 in [0, 1].  settings: the resolved ``SamplingSettings``.
    step_std: (T,) float32, the noise std of each step's Gaussian (0 where deterministic).
    SDXL only (None otherwise): added: {'text_embeds': (B, P) pooled text, 'time_ids': (B, 6)},
    the UNet's ``added_cond_kwargs``; negative_added: the same for the unconditional pass.
    """

    prompts: list[str]
    group: torch.Tensor
    seeds: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    stochastic: torch.Tensor
    images: torch.Tensor
    settings: SamplingSettings = field(default_factory=SamplingSettings)
    step_std: torch.Tensor | None = None
    added: dict[str, torch.Tensor] | None = None
    negative_added: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def stochastic_steps(self) -> list[int]:
        """Indices of the steps that carry a log-prob (the only ones that can train), in order."""
        return [j for j, s in enumerate(self.stochastic.tolist()) if s]

    def select(self, index: torch.Tensor | list[int]) -> Trajectories:
        """A sub-batch of images (the steps stay whole)."""
        index = torch.as_tensor(index, dtype=torch.long)
        idx = index.tolist()

        def sel(t):
            if isinstance(t, dict):
                return {k: sel(v) for k, v in t.items()}
            return None if t is None else t[index.to(t.device)]

        return replace(
            self,
            prompts=[self.prompts[i] for i in idx],
            group=sel(self.group),
            seeds=sel(self.seeds),
            prompt_embeds=sel(self.prompt_embeds),
            negative_embeds=sel(self.negative_embeds),
            latents=sel(self.latents),
            log_probs=sel(self.log_probs),
            images=sel(self.images),
            added=sel(self.added),
            negative_added=sel(self.negative_added),
        )

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        """Concatenate batches sampled with the same settings (group ids are kept as they are)."""
        first = parts[0]

        def cat(name):
            values = [getattr(p, name) for p in parts]
            if isinstance(values[0], dict):
                return {k: torch.cat([v[k] for v in values]) for k in values[0]}
            return None if values[0] is None else torch.cat(values)

        return replace(
            first,
            prompts=[p for part in parts for p in part.prompts],
            **{
                n: cat(n)
                for n in (
                    "group",
                    "seeds",
                    "prompt_embeds",
                    "negative_embeds",
                    "latents",
                    "log_probs",
                    "images",
                    "added",
                    "negative_added",
                )  # fmt: skip
            },
        )


def _rows(t, index):
    """Rows ``index`` of a tensor, of each tensor of a dict, or None."""
    if isinstance(t, dict):
        return {k: v[index] for k, v in t.items()}
    return None if t is None else t[index]


def sdxl_conditioning(pipe, prompts: list[str], settings: SamplingSettings, cfg: bool, text_cache=None):
    """What SDXL's UNet sees for B images, as ``StableDiffusionXLPipeline`` builds it.

    Returns (embeds (B, 77, D1 + D2), added, negative (B, 77, D1 + D2) or None, negative_added or
    None), ``added`` = {'text_embeds': (B, P), 'time_ids': (B, 6)}. The size conditioning is the
    size actually sampled; the unconditional branch is zeros when there is no negative prompt and
    the model says ``force_zeros_for_empty_prompt`` (SDXL base does), else the negative prompt's
    encoding ('' encoded as a prompt). ``text_cache``: a ``TextCache`` to take encodings from.
    """
    encode = encode_prompts_sdxl if text_cache is None else text_cache.encode
    embeds, pooled = encode(pipe, prompts)
    time_ids = sdxl_time_ids(settings.height, settings.width).to(embeds.device).expand(len(prompts), 6)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    if not cfg:
        return embeds, added, None, None
    if not settings.negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = encode(pipe, [settings.negative_prompt])
        negative, negative_pooled = negative.expand_as(embeds), negative_pooled.expand_as(pooled)
    return embeds, added, negative, {"text_embeds": negative_pooled, "time_ids": time_ids}


def planned_step_std(scheduler, settings: SamplingSettings) -> list[float]:
    """Each step's noise std (0 where deterministic), from the scheduler alone: the ``step_std`` the
    sampler will record, known before any image is drawn. Steps ``scheduler`` (pass a fresh one:
    LCM's scheduler counts its steps)."""
    x = torch.zeros(1, 1, 1, 1)
    stds = []
    for t in scheduler.timesteps.tolist():
        generator = [torch.Generator().manual_seed(0)]
        _, logp, _, std = scheduler_step(scheduler, settings, x, int(t), x, generator=generator, with_mean=True)
        stds.append(float(std) if logp is not None else 0.0)
    return torch.tensor(stds, dtype=torch.float32).tolist()  # rounded as the sampler stores them


def image_seeds(seed: int, count: int, offset: int = 0) -> list[int]:
    """Per-image seeds seed + offset + i: image i is the same whatever else is sampled with it."""
    return [seed + offset + i for i in range(count)]


def sample_trajectories(
    pipe,
    prompts: list[str],
    *,
    images_per_prompt: int = 1,
    seeds: list[int] | None = None,
    seed: int = 0,
    settings: SamplingSettings = SamplingSettings(),
    unet=None,
    batch_size: int | None = None,
    record: bool = True,
    progress: bool = False,
    group_offset: int = 0,
    text_cache: TextCache | None = None,
) -> Trajectories:
    """Sample ``images_per_prompt`` images for each prompt, recording trajectories and log-probs.

    Images are prompt-major: image b shows prompts[b // k] with seed seeds[b]
    (default ``seed + b``). Each image has its own torch.Generator, so image b is the same
    whatever else is in the batch or how it is chunked. ``unet`` overrides ``pipe.unet`` (a wrapped
    or compiled one). ``record=False`` keeps only the images (cheaper, for eval and ``sample``).
    ``batch_size`` bounds the images denoised together (default: all). ``text_cache``: reuse each
    prompt's text conditioning across calls (training: the same prompts every epoch).
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise UsageError("the prompt list is empty")
    if images_per_prompt < 1:
        raise UsageError(f"images per prompt must be >= 1, got {images_per_prompt}")
    settings = settings.resolve(pipe)
    unet = unet if unet is not None else pipe.unet
    k = images_per_prompt
    n = len(prompts) * k
    seeds = list(seeds) if seeds is not None else image_seeds(seed, n)
    if len(seeds) != n:
        raise UsageError(f"{len(seeds)} seeds for {n} images")
    device = pipe.unet.device
    image_prompts = [p for p in prompts for _ in range(k)]
    group = torch.arange(len(prompts)).repeat_interleave(k) + group_offset

    # 1. Text embeddings, each distinct prompt once.
    cfg = uses_cfg(unet, settings.guidance_scale)
    added = negative_added = None
    if is_sdxl(pipe):
        embeds, added, negative, negative_added = sdxl_conditioning(pipe, image_prompts, settings, cfg, text_cache)
    elif text_cache is not None:
        embeds = text_cache.encode(pipe, image_prompts)[0]  # (B, L, D)
        negative = text_cache.encode(pipe, [settings.negative_prompt])[0].expand_as(embeds) if cfg else None
    else:
        embeds = encode_prompts(pipe, image_prompts)  # (B, L, D)
        negative = encode_prompts(pipe, [settings.negative_prompt]).expand_as(embeds) if cfg else None

    scheduler = make_scheduler(pipe, settings)  # timesteps stay host ints: no device syncs
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    c = pipe.unet.config.in_channels
    h, w = settings.height // pipe.vae_scale_factor, settings.width // pipe.vae_scale_factor
    bs = batch_size or n
    parts = []
    bar = tqdm(total=len(timesteps) * math.ceil(n / bs), desc="sampling", disable=not progress, leave=False)
    for start in range(0, n, bs):
        sl = slice(start, min(start + bs, n))
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds[sl]]
        # 2. x_T ~ N(0, I) per image (the same draw as diffusers' pipelines with a generator list).
        x = randn_tensor((len(generators), c, h, w), generator=generators, device=device, dtype=torch.float32)
        x = x * scheduler.init_noise_sigma
        traj, logps, stochastic, stds = [x], [], [], []
        # 3. Denoise, recording x_t and log pi(x_prev | x_t) of every step.
        with torch.no_grad():
            for t in timesteps:
                model_in = scheduler.scale_model_input(x, t)
                out = guided_model_output(
                    unet, model_in, t, embeds[sl], _rows(negative, sl), settings.guidance_scale,
                    _rows(added, sl), _rows(negative_added, sl),
                )  # fmt: skip
                x, logp, _, std = scheduler_step(scheduler, settings, out, t, x, generator=generators, with_mean=True)
                stochastic.append(logp is not None)
                stds.append(float(std) if logp is not None else 0.0)  # one timestep: a python float
                logps.append(logp if logp is not None else torch.zeros(x.shape[0], device=device))
                if record:
                    traj.append(x)
                bar.update(1)
        # 4. Decode x_0.
        images = decode_latents(pipe.vae, x, upcast=is_sdxl(pipe))
        parts.append(
            Trajectories(
                prompts=image_prompts[sl],
                group=group[sl],
                seeds=torch.tensor(seeds[sl], dtype=torch.long),
                prompt_embeds=embeds[sl],
                negative_embeds=_rows(negative, sl),
                added=_rows(added, sl),
                negative_added=_rows(negative_added, sl),
                latents=torch.stack(traj, dim=1) if record else x[:, None],
                timesteps=torch.tensor(timesteps, dtype=torch.long),
                log_probs=torch.stack(logps, dim=1),
                stochastic=torch.tensor(stochastic),
                images=images,
                settings=settings,
                step_std=torch.tensor(stds, dtype=torch.float32),
            )
        )
    bar.close()
    return parts[0] if len(parts) == 1 else Trajectories.cat(parts)


# ----------------------------------------------------------------------------------------------
# Re-scoring under the current weights


def steps_log_prob(unet, scheduler, traj: Trajectories, steps: list[int], index=None, with_mean=False):
    """log pi_theta(latents[:, j+1] | latents[:, j]) for each j in ``steps``, in ONE UNet call: (b, m) float32.

    Every (image, step) is its own sample of the batch, with its own timestep, so the result equals
    ``step_log_prob`` step by step (tested); batching m steps cuts the per-call overhead that
    dominates small models and CPUs, at m times the activation memory of one step. Differentiable
    (call it inside ``torch.no_grad()`` when no gradient is wanted). ``index`` picks images of
    ``traj`` (default all). ``scheduler`` comes from ``make_scheduler(pipe, traj.settings)``. Every
    step must be stochastic (``traj.stochastic[j]``). ``with_mean``: return (log-probs (b, m), the
    steps' Gaussian means (b*m, C, h, w), their stds (b*m, 1, 1, 1) or a float), image-major.
    """
    steps = [int(j) for j in steps]
    for j in steps:
        if not bool(traj.stochastic[j]):
            raise ValueError(f"step {j} is deterministic and carries no log-prob")
    device = traj.latents.device
    rows = torch.arange(len(traj)) if index is None else torch.as_tensor(index).reshape(-1)
    b, m = len(rows), len(steps)
    rows, cols = rows.to(device)[:, None], torch.tensor(steps, device=device)[None, :]
    x_t = traj.latents[rows, cols].flatten(0, 1)  # (b*m, C, h, w), image-major
    x_prev = traj.latents[rows, cols + 1].flatten(0, 1)  # (b*m, C, h, w)

    def per_step(t):  # (B, ...) -> (b*m, ...) image-major, for a tensor, a dict of them, or None
        if isinstance(t, dict):
            return {k: per_step(v) for k, v in t.items()}
        return None if t is None else t[rows[:, 0].to(t.device)].repeat_interleave(m, dim=0)

    embeds = per_step(traj.prompt_embeds)  # (b*m, L, D)
    negative = per_step(traj.negative_embeds)
    if m == 1:
        t = int(traj.timesteps[steps[0]])  # a host int: no host-to-device copy
    else:
        t = traj.timesteps.cpu()[steps].repeat(b)  # (b*m,) host tensor
    model_in = scheduler.scale_model_input(x_t, t)
    out = guided_model_output(
        unet, model_in, t, embeds, negative, traj.settings.guidance_scale,
        per_step(traj.added), per_step(traj.negative_added),
    )  # fmt: skip
    if with_mean:
        _, logp, mean, std = scheduler_step(scheduler, traj.settings, out, t, x_t, prev_sample=x_prev, with_mean=True)
        return logp.view(b, m), mean, std
    _, logp = scheduler_step(scheduler, traj.settings, out, t, x_t, prev_sample=x_prev)
    return logp.view(b, m)


def step_log_prob(unet, scheduler, traj: Trajectories, j: int, index=None) -> torch.Tensor:
    """log pi_theta(latents[:, j+1] | latents[:, j]) under the current weights of ``unet``: (b,) float32.

    One step of ``steps_log_prob``; same contract.
    """
    return steps_log_prob(unet, scheduler, traj, [j], index)[:, 0]


def step_groups(steps: list[int], steps_per_pass: int) -> list[list[int]]:
    """Consecutive groups of at most ``steps_per_pass`` steps: the UNet calls of one micro-batch."""
    if steps_per_pass < 1:
        raise ValueError(f"steps_per_pass must be >= 1, got {steps_per_pass}")
    return [list(steps[i : i + steps_per_pass]) for i in range(0, len(steps), steps_per_pass)]


@torch.no_grad()
def rescore_log_probs(
    unet,
    scheduler,
    traj: Trajectories,
    steps=None,
    index=None,
    batch_size: int | None = None,
    steps_per_pass: int = 1,
    with_mean: bool = False,
):
    """Recompute the recorded log-probs under the current weights, without a graph.

    Returns (b, S) float32 for the stochastic steps ``steps`` (default all of them). Before any
    update it equals ``traj.log_probs`` up to numerics: the on-policy check. UNet calls hold
    ``batch_size`` images (default all) x ``steps_per_pass`` steps. ``with_mean``: also the steps'
    Gaussian means, (b, S, C, h, w).
    """
    steps = traj.stochastic_steps() if steps is None else list(steps)
    index = torch.arange(len(traj)) if index is None else torch.as_tensor(index)
    if not steps:  # no stochastic step (a 1-step LCM trajectory): nothing to score
        empty = torch.zeros(len(index), 0, device=traj.log_probs.device)
        return (empty, traj.latents.new_zeros(len(index), 0, *traj.latents.shape[2:])) if with_mean else empty
    bs = batch_size or len(index)
    cols, means = [], []
    for group in step_groups(steps, steps_per_pass):
        parts = [steps_log_prob(unet, scheduler, traj, group, chunk, with_mean=with_mean) for chunk in index.split(bs)]
        if not with_mean:
            cols.append(torch.cat(parts))
            continue
        cols.append(torch.cat([logp for logp, _, _ in parts]))
        means.append(torch.cat([mean.view(len(logp), len(group), *mean.shape[1:]) for logp, mean, _ in parts]))
    logp = torch.cat(cols, dim=1)
    return (logp, torch.cat(means, dim=1)) if with_mean else logp


def rescore_drift(unet, scheduler, traj: Trajectories, num_images: int = 2, num_steps: int = 2) -> float:
    """Max |re-scored - recorded| log-prob over a few images and steps: a cheap on-policy check.

    fp32 gives ~1e-6; bf16/fp16 drift that breaks on-policy ratios shows up here first.
    """
    steps = traj.stochastic_steps()[:num_steps]
    index = torch.arange(min(num_images, len(traj)))
    new = rescore_log_probs(unet, scheduler, traj, steps=steps, index=index)
    old = traj.log_probs[index][:, steps].to(new.device)
    return float((new - old).abs().max()) if new.numel() else 0.0
