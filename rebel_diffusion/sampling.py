"""Sampling with per-step log-probs: DDIM and LCM steps, the trajectory sampler, and re-scoring.

A denoising step x_t -> x_prev of a stochastic sampler is a Gaussian policy
pi(x_prev | x_t, c) = N(mean_theta(x_t, t, c), std_t^2 I); RL fine-tuning needs its log-density.

Log-prob convention (used by every loss in this package): the elementwise Gaussian
log-density of x_prev, MEAN over the latent dims (C*h*w), one number per image and step. A
trajectory's log-prob is the SUM of that over its stochastic steps (as the DDPO and RLCM code). The
mean keeps the per-step figures O(1) whatever the resolution; it scales every log-ratio by
1/(C*h*w), which REBEL's eta (and PPO's clip range) absorb.

Steps whose variance is zero are deterministic: they carry no log-prob. The step functions return
``None`` for them and the sampler marks them in ``Trajectories.stochastic``; they are never trained.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from diffusers.utils.torch_utils import randn_tensor

from .errors import UsageError

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_MIN_VARIANCE = 1e-12  # below this a step is deterministic (exactly 0 when alpha_prev == alpha_t)


# ----------------------------------------------------------------------------------------------
# Pure math


def _math(t: torch.Tensor) -> torch.Tensor:
    """The dtype of the step math: float32 for float32/16/bf16 inputs; float64 stays (exactness tests)."""
    return t if t.dtype == torch.float64 else t.float()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """log N(x; mean, std^2), elementwise, MEAN over all non-batch dims. (B, ...) -> (B,) float32.

    ``std``: a tensor broadcastable to x, or a python float (no device copy in the sampling loop).
    """
    x, mean = _math(x), _math(mean)
    if isinstance(std, torch.Tensor):
        std = _math(std)
        log_std = torch.log(std)
    else:
        log_std = math.log(std)
    logp = -((x - mean) ** 2) / (2 * std**2) - log_std - _LOG_SQRT_2PI
    return logp.flatten(1).mean(dim=1)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor | float) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(ref_mean, std^2 I)) in nats, SUMMED over all non-batch dims. -> (B,) float32.

    = sum_d (mean_d - ref_mean_d)^2 / (2 std^2): the closed form for equal covariances.
    """
    diff = _math(mean) - _math(ref_mean)
    std = _math(std) if isinstance(std, torch.Tensor) else std
    return (diff.pow(2) / (2 * std**2)).flatten(1).sum(dim=1)


def _as_timesteps(timestep, batch: int) -> list[int]:
    """int or (B,)/(1,) tensor -> list of B python ints (host values: no device sync for ints)."""
    if isinstance(timestep, torch.Tensor):
        values = [int(v) for v in timestep.reshape(-1).tolist()]
    else:
        values = [int(timestep)]
    if len(values) == 1:
        values = values * batch
    if len(values) != batch:
        raise ValueError(f"timestep has {len(values)} entries for a batch of {batch}")
    return values


def _per_image(values: list[float], like: torch.Tensor) -> torch.Tensor | float:
    """Per-image scalars -> a python float when all are equal (the sampling loop: no host-to-device
    copy, which would wait for the GPU), else a (B, 1, 1, 1) tensor of ``like``'s dtype and device."""
    if all(v == values[0] for v in values):
        return float(values[0])
    t = torch.tensor(values, dtype=torch.float64).to(like.dtype)
    return t.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def _predict_x0_eps(prediction_type: str, model_output, sample, alpha_t):
    """Model output -> (x0_hat, eps_hat) for epsilon, v_prediction or sample parameterisations.

    alpha_t: abar_t as a float or a (B, 1, 1, 1) tensor.
    """
    sqrt_a, sqrt_b = alpha_t**0.5, (1 - alpha_t) ** 0.5
    if prediction_type == "epsilon":
        x0 = (sample - sqrt_b * model_output) / sqrt_a
        eps = model_output
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_b
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    return x0, eps


def _clip_x0(scheduler, x0):
    if getattr(scheduler.config, "thresholding", False):
        raise ValueError("schedulers with thresholding=True are not supported (SD 1.x/2.x do not use it)")
    if getattr(scheduler.config, "clip_sample", False):
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)
    return x0


def _draw_or_score(mean, std, prev_sample, generator, noise_dtype):
    if prev_sample is None:
        # Same draw as diffusers' schedulers (shape, generator(s), device, dtype), so samples match.
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=noise_dtype)
        prev_sample = mean + std * _math(noise)
    return prev_sample


def ddim_step_with_logprob(
    scheduler, model_output, timestep, sample, *, eta: float, prev_sample=None, generator=None, with_mean=False
):
    """One DDIM step (Song et al. 2021, eq. 12) that also returns the log-prob of ``prev_sample``.

    Args:
        scheduler: a diffusers ``DDIMScheduler`` after ``set_timesteps``.
        model_output: (B, C, h, w) the (guided) UNet output at ``timestep``.
        timestep: int, or a (B,) tensor of per-image timesteps.
        sample: (B, C, h, w) x_t.
        eta: DDIM's noise scale, > 0 (1.0 is DDPM-like; the DDPO default).
        prev_sample: (B, C, h, w) x_prev to score; drawn from the step's Gaussian when None.
        generator: torch.Generator or a list of B of them, for drawing.

    Returns:
        (prev_sample (B, C, h, w) in ``sample``'s dtype, log_prob (B,) float32), where log_prob is
        the Gaussian log-density of prev_sample, MEAN over C, h, w (module docstring). log_prob is
        None for a deterministic (zero-variance) step. ``with_mean``: also the step's Gaussian mean
        (B, C, h, w) and std (a float or (B, 1, 1, 1)), for the KL to a reference policy.

    Notation -> names: abar_t = alpha_t, abar_prev = alpha_prev, sigma_t = std.
    """
    if eta <= 0:
        raise ValueError(
            f"eta must be > 0 for a policy-gradient sampler (got {eta}): with eta = 0 DDIM is deterministic "
            "and the step has no log-density"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before stepping")
    cfg = scheduler.config
    batch = sample.shape[0]
    ts = _as_timesteps(timestep, batch)
    step = cfg.num_train_timesteps // scheduler.num_inference_steps

    # 1. abar_t and abar_prev; below t = 0 the "previous" alpha is final_alpha_cumprod (no clamping).
    acp = scheduler.alphas_cumprod.double().cpu()
    final = float(scheduler.final_alpha_cumprod)
    a_t = [float(acp[t]) for t in ts]
    a_prev = [float(acp[t - step]) if t - step >= 0 else final for t in ts]

    # 2. sigma_t^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev), in float64 on the host.
    var = [(1 - ap) / (1 - at) * (1 - at / ap) for at, ap in zip(a_t, a_prev)]
    deterministic = [v <= _MIN_VARIANCE for v in var]
    if any(deterministic) and not all(deterministic):
        raise ValueError("a batch mixes deterministic (zero-variance) and stochastic DDIM steps; score them apart")
    std_f = [0.0 if d else eta * math.sqrt(v) for v, d in zip(var, deterministic)]
    dir_f = [math.sqrt(max(0.0, 1 - ap - s * s)) for ap, s in zip(a_prev, std_f)]

    # 3. x0_hat and eps_hat from the model output (float32 math whatever the model's dtype).
    x = _math(sample)
    alpha_t = _per_image(a_t, x)
    sqrt_alpha_prev = _per_image([math.sqrt(a) for a in a_prev], x)
    direction = _per_image(dir_f, x)
    std = _per_image(std_f, x)
    x0, eps = _predict_x0_eps(cfg.prediction_type, _math(model_output), x, alpha_t)
    if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
        x0 = _clip_x0(scheduler, x0)

    # 4. mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps_hat
    mean = sqrt_alpha_prev * x0 + direction * eps

    # 5. x_prev ~ N(mean, sigma_t^2), or the given one; its log-density.
    prev = _draw_or_score(mean, std, None if prev_sample is None else _math(prev_sample), generator, model_output.dtype)
    log_prob = None if all(deterministic) else gaussian_log_prob(prev, mean, std)
    if with_mean:
        return prev.to(sample.dtype), log_prob, mean, std
    return prev.to(sample.dtype), log_prob


def lcm_step_with_logprob(
    scheduler, model_output, timestep, sample, *, prev_sample=None, generator=None, with_mean=False
):
    """One multistep LCM step (Luo et al. 2023, Alg. 1) that also returns the log-prob of ``prev_sample``.

    denoised = c_out(t) x0_hat + c_skip(t) x_t; then, except at the last step,
    x_prev = sqrt(abar_prev) denoised + sqrt(1 - abar_prev) z: Gaussian with mean
    sqrt(abar_prev) denoised and std sqrt(1 - abar_prev). The last step returns ``denoised`` itself:
    deterministic, so its log_prob is None.

    ``scheduler`` is a diffusers ``LCMScheduler`` after ``set_timesteps``; ``timestep`` an int or a
    (B,) tensor taken from ``scheduler.timesteps``. Shapes and dtypes as ``ddim_step_with_logprob``.
    """
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(...) before stepping")
    cfg = scheduler.config
    batch = sample.shape[0]
    ts = _as_timesteps(timestep, batch)
    schedule = [int(t) for t in scheduler.timesteps.tolist()]
    try:
        idx = [schedule.index(t) for t in ts]
    except ValueError:
        raise ValueError(f"timestep {ts} is not in scheduler.timesteps {schedule}") from None
    last = [i == scheduler.num_inference_steps - 1 for i in idx]
    if any(last) and not all(last):
        raise ValueError("a batch mixes the final (deterministic) LCM step with stochastic ones; score them apart")

    # 1. abar_t; abar_prev at the next timestep of the schedule.
    acp = scheduler.alphas_cumprod.double().cpu()
    final = float(scheduler.final_alpha_cumprod)
    t_prev = [schedule[i + 1] if i + 1 < len(schedule) else t for i, t in zip(idx, ts)]
    a_t = [float(acp[t]) for t in ts]
    a_prev = [float(acp[t]) if t >= 0 else final for t in t_prev]

    # 2. Consistency-model boundary scalings c_skip(t), c_out(t).
    scalings = [scheduler.get_scalings_for_boundary_condition_discrete(t) for t in ts]
    x = _math(sample)
    c_skip = _per_image([float(s[0]) for s in scalings], x)
    c_out = _per_image([float(s[1]) for s in scalings], x)
    alpha_t = _per_image(a_t, x)

    # 3. x0_hat, then denoised.
    x0, _ = _predict_x0_eps(cfg.prediction_type, _math(model_output), x, alpha_t)
    if getattr(cfg, "clip_sample", False) or getattr(cfg, "thresholding", False):
        x0 = _clip_x0(scheduler, x0)
    denoised = c_out * x0 + c_skip * x
    if all(last):
        return (denoised.to(sample.dtype), None, denoised, 0.0) if with_mean else (denoised.to(sample.dtype), None)

    # 4. x_prev ~ N(sqrt(abar_prev) denoised, (1 - abar_prev) I).
    mean = _per_image([math.sqrt(a) for a in a_prev], x) * denoised
    std = _per_image([math.sqrt(1 - a) for a in a_prev], x)
    prev = _draw_or_score(mean, std, None if prev_sample is None else _math(prev_sample), generator, model_output.dtype)
    if with_mean:
        return prev.to(sample.dtype), gaussian_log_prob(prev, mean, std), mean, std
    return prev.to(sample.dtype), gaussian_log_prob(prev, mean, std)


# ----------------------------------------------------------------------------------------------
# Settings and schedulers


@dataclass(frozen=True)
class SamplingSettings:
    """How trajectories are drawn; re-scoring must use the very same settings.

    sampler: 'ddim' or 'lcm' ('auto' picks LCM for LCM models, else DDIM).
    num_steps: denoising steps T.  ddim_eta: DDIM's noise scale (> 0; unused by LCM).
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
        if sampler == "ddim" and self.ddim_eta <= 0:
            raise UsageError(
                f"DDIM eta must be > 0 (got {self.ddim_eta}): eta = 0 is deterministic and has no log-prob to train"
            )
        scale = pipe.vae_scale_factor
        native = pipe.unet.config.sample_size * scale
        height = native if self.height is None else self.height  # 0 is an error, not 'native'
        width = native if self.width is None else self.width
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % scale:
                raise UsageError(f"{name} must be a positive multiple of the VAE's scale factor {scale}, got {v}")
        return replace(self, sampler=sampler, height=height, width=width)


def is_lcm_model(pipe) -> bool:
    from diffusers import LCMScheduler

    return isinstance(pipe.scheduler, LCMScheduler)


def make_scheduler(pipe, settings: SamplingSettings, device=None):
    """A fresh DDIM or LCM scheduler from the pipeline's config, with ``num_steps`` timesteps set."""
    from diffusers import DDIMScheduler, LCMScheduler

    cls = LCMScheduler if settings.sampler == "lcm" else DDIMScheduler
    scheduler = cls.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(settings.num_steps, device=device)
    return scheduler


def scheduler_step(
    scheduler, settings, model_output, timestep, sample, *, prev_sample=None, generator=None, with_mean=False
):
    """Dispatch to the DDIM or LCM step with log-prob."""
    if settings.sampler == "lcm":
        return lcm_step_with_logprob(
            scheduler, model_output, timestep, sample, prev_sample=prev_sample, generator=generator,
            with_mean=with_mean,
        )  # fmt: skip
    return ddim_step_with_logprob(
        scheduler, model_output, timestep, sample, eta=settings.ddim_eta, prev_sample=prev_sample, generator=generator,
        with_mean=with_mean,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Text, guidance, UNet and VAE helpers


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings as SD computes them: (N, 77, D), each distinct prompt encoded once."""
    unique = list(dict.fromkeys(prompts))
    tok = pipe.tokenizer(
        unique, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = pipe.text_encoder.device
    mask = tok.attention_mask.to(device) if getattr(pipe.text_encoder.config, "use_attention_mask", False) else None
    embeds = pipe.text_encoder(tok.input_ids.to(device), attention_mask=mask)[0]
    index = torch.tensor([unique.index(p) for p in prompts], device=embeds.device)
    return embeds[index]


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding of (w - 1) (sinusoidal, scale 1000), as diffusers' LCM pipeline. (B,) -> (B, dim)."""
    w = (w.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def guided_model_output(unet, latents, timestep, prompt_embeds, negative_embeds, guidance_scale):
    """The policy's model output at ``timestep``: CFG-guided (one batched UNet call) or LCM-embedded.

    timestep: an int, or a (B,) tensor of per-sample timesteps. latents (B, C, h, w), prompt_embeds
    (B, L, D), negative_embeds (B, L, D) or None (no unconditional pass). Returns (B, C, h, w) in the
    UNet's output dtype.
    """
    config = unwrap(unet).config
    dtype = next(unwrap(unet).parameters()).dtype
    batch = latents.shape[0]
    cond = None
    if getattr(config, "time_cond_proj_dim", None):
        w = torch.full((batch,), float(guidance_scale), device=latents.device)
        cond = guidance_embedding(w, config.time_cond_proj_dim).to(dtype)
    x = latents.to(dtype)
    if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:  # (B,) per-sample timesteps
        t = timestep.to(latents.device, torch.long)
    else:
        t = torch.full((batch,), int(timestep), device=latents.device, dtype=torch.long)
    if negative_embeds is None:
        return unet(x, t, encoder_hidden_states=prompt_embeds.to(dtype), timestep_cond=cond, return_dict=False)[0]
    out = unet(
        torch.cat([x, x]),
        torch.cat([t, t]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]).to(dtype),
        timestep_cond=None if cond is None else torch.cat([cond, cond]),
        return_dict=False,
    )[0]
    uncond, text = out.chunk(2)
    return uncond + guidance_scale * (text - uncond)


def unwrap(module):
    """The bare module under DDP / torch.compile wrappers."""
    while True:
        if hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [0, 1]."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for chunk in latents.split(batch_size):
        img = vae.decode((chunk / scale + shift).to(vae.dtype), return_dict=False)[0]
        out.append((img.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def uses_cfg(unet, guidance_scale: float) -> bool:
    """CFG needs an unconditional pass unless the model takes guidance as an embedding (LCM)."""
    return guidance_scale > 1.0 and not getattr(unwrap(unet).config, "time_cond_proj_dim", None)


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
        )

    @staticmethod
    def cat(parts: list[Trajectories]) -> Trajectories:
        """Concatenate batches sampled with the same settings (group ids are kept as they are)."""
        first = parts[0]

        def cat(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return replace(
            first,
            prompts=[p for part in parts for p in part.prompts],
            **{n: cat(n) for n in ("group", "seeds", "prompt_embeds", "negative_embeds", "latents", "log_probs", "images")},
        )


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
) -> Trajectories:
    """Sample ``images_per_prompt`` images for each prompt, recording trajectories and log-probs.

    Images are prompt-major: image b shows prompts[b // k] with seed seeds[b]
    (default ``seed + b``). Each image has its own torch.Generator, so image b is the same
    whatever else is in the batch or how it is chunked. ``unet`` overrides ``pipe.unet`` (a wrapped
    or compiled one). ``record=False`` keeps only the images (cheaper, for eval and ``sample``).
    ``batch_size`` bounds the images denoised together (default: all).
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
                    unet, model_in, t, embeds[sl], None if negative is None else negative[sl], settings.guidance_scale
                )
                x, logp, _, std = scheduler_step(scheduler, settings, out, t, x, generator=generators, with_mean=True)
                stochastic.append(logp is not None)
                stds.append(float(std) if logp is not None else 0.0)  # one timestep: a python float
                logps.append(logp if logp is not None else torch.zeros(x.shape[0], device=device))
                if record:
                    traj.append(x)
                bar.update(1)
        # 4. Decode x_0.
        images = decode_latents(pipe.vae, x)
        parts.append(
            Trajectories(
                prompts=image_prompts[sl],
                group=group[sl],
                seeds=torch.tensor(seeds[sl], dtype=torch.long),
                prompt_embeds=embeds[sl],
                negative_embeds=None if negative is None else negative[sl],
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
    embeds = traj.prompt_embeds[rows[:, 0]].repeat_interleave(m, dim=0)  # (b*m, L, D)
    negative = None if traj.negative_embeds is None else traj.negative_embeds[rows[:, 0]].repeat_interleave(m, dim=0)
    if m == 1:
        t = int(traj.timesteps[steps[0]])  # a host int: no host-to-device copy
    else:
        t = traj.timesteps.cpu()[steps].repeat(b)  # (b*m,) host tensor
    model_in = scheduler.scale_model_input(x_t, t)
    out = guided_model_output(unet, model_in, t, embeds, negative, traj.settings.guidance_scale)
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
    unet, scheduler, traj: Trajectories, steps=None, index=None, batch_size: int | None = None, steps_per_pass: int = 1
):
    """Recompute the recorded log-probs under the current weights, without a graph.

    Returns (b, S) float32 for the stochastic steps ``steps`` (default all of them). Before any
    update it equals ``traj.log_probs`` up to numerics: the on-policy check. UNet calls hold
    ``batch_size`` images (default all) x ``steps_per_pass`` steps.
    """
    steps = traj.stochastic_steps() if steps is None else list(steps)
    index = torch.arange(len(traj)) if index is None else torch.as_tensor(index)
    if not steps:  # no stochastic step (a 1-step LCM trajectory): nothing to score
        return torch.zeros(len(index), 0, device=traj.log_probs.device)
    bs = batch_size or len(index)
    cols = []
    for group in step_groups(steps, steps_per_pass):
        cols.append(torch.cat([steps_log_prob(unet, scheduler, traj, group, chunk) for chunk in index.split(bs)]))
    return torch.cat(cols, dim=1)


def rescore_drift(unet, scheduler, traj: Trajectories, num_images: int = 2, num_steps: int = 2) -> float:
    """Max |re-scored - recorded| log-prob over a few images and steps: a cheap on-policy check.

    fp32 gives ~1e-6; bf16/fp16 drift that breaks on-policy ratios shows up here first.
    """
    steps = traj.stochastic_steps()[:num_steps]
    index = torch.arange(min(num_images, len(traj)))
    new = rescore_log_probs(unet, scheduler, traj, steps=steps, index=index)
    old = traj.log_probs[index][:, steps].to(new.device)
    return float((new - old).abs().max()) if new.numel() else 0.0
