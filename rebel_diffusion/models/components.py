"""Helpers over a pipeline's parts: text encoding, the guided UNet output, VAE decoding, wrappers."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch


def is_sdxl(pipe_or_unet) -> bool:
    """True for an SDXL UNet (or a pipeline with one): it takes pooled text and size conditioning."""
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    return getattr(unwrap(unet).config, "addition_embed_type", None) == "text_time"


def is_lcm_model(pipe) -> bool:
    """True for a pipeline whose scheduler is diffusers' LCMScheduler."""
    from diffusers import LCMScheduler

    return isinstance(pipe.scheduler, LCMScheduler)


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


@torch.no_grad()
def encode_prompts_sdxl(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's text conditioning, as ``StableDiffusionXLPipeline.encode_prompt`` computes it.

    Both encoders' penultimate hidden states, concatenated: (N, 77, D1 + D2); the second encoder's
    projected pooled embedding: (N, P). Each distinct prompt is encoded once.
    """
    unique = list(dict.fromkeys(prompts))
    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(
            unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    dtype = pipe.text_encoder_2.dtype
    embeds = torch.cat(hidden, dim=-1).to(dtype)
    index = torch.tensor([unique.index(p) for p in prompts], device=embeds.device)
    return embeds[index], pooled[index.to(pooled.device)]


def too_long(pipe, prompts: list[str]) -> list[str]:
    """The prompts that CLIP's tokenizer cuts (over ``model_max_length`` tokens, start and end included)."""
    tok = pipe.tokenizer
    unique = list(dict.fromkeys(prompts))
    lengths = [len(ids) for ids in tok(unique, truncation=False).input_ids] if unique else []
    return [p for p, n in zip(unique, lengths) if n > tok.model_max_length]


class TextCache:
    """Each distinct prompt's text conditioning, computed once and reused: the text encoders are frozen.

    ``encode(pipe, prompts)`` -> (embeds (N, L, D), pooled (N, P) or None for SD 1.x/2.x). A prompt
    not seen before is encoded on its own (batch of one), so its embedding is the same whatever it
    was first encoded with and a resumed run reuses exactly what an uninterrupted one did. Holds
    the ``max_prompts`` most recently used prompts (SDXL: about 0.3 MB each in bf16).
    """

    def __init__(self, max_prompts: int = 1024):
        self.max_prompts = max_prompts
        self.store: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()

    def encode(self, pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        sdxl = is_sdxl(pipe)
        rows = []
        for p in prompts:
            if p not in self.store:
                if sdxl:
                    embeds, pooled = encode_prompts_sdxl(pipe, [p])
                    self.store[p] = (embeds[0], pooled[0])
                else:
                    self.store[p] = (encode_prompts(pipe, [p])[0], None)
            self.store.move_to_end(p)
            rows.append(self.store[p])
        while len(self.store) > self.max_prompts:
            self.store.popitem(last=False)
        embeds = torch.stack([r[0] for r in rows])
        return embeds, (torch.stack([r[1] for r in rows]) if sdxl else None)


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's six size-conditioning numbers for a ``height`` x ``width`` sample: (6,) float32.

    (original height, width, crop top, crop left, target height, width), as diffusers' SDXL
    pipeline sets them by default: the size actually sampled, no crop.
    """
    return torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """LCM's guidance-scale embedding of (w - 1) (sinusoidal, scale 1000), as diffusers' LCM pipeline.

    (B,) -> (B, dim).
    """
    w = (w.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def guided_model_output(
    unet, latents, timestep, prompt_embeds, negative_embeds, guidance_scale, added=None, negative_added=None
):
    """The policy's model output at ``timestep``: CFG-guided (one batched UNet call) or LCM-embedded.

    timestep: an int, or a (B,) tensor of per-sample timesteps. latents (B, C, h, w), prompt_embeds
    (B, L, D), negative_embeds (B, L, D) or None (no unconditional pass). SDXL: ``added`` and
    ``negative_added`` are the UNet's ``added_cond_kwargs`` of each branch, {'text_embeds': (B, P),
    'time_ids': (B, 6)}. Returns (B, C, h, w) in the UNet's output dtype.
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

    def kwargs(parts):  # added_cond_kwargs in the UNet's dtype, branches stacked like the latents
        if parts[0] is None:
            return {}
        return {"added_cond_kwargs": {k: torch.cat([p[k] for p in parts]).to(dtype) for k in parts[0]}}

    if negative_embeds is None:
        embeds = prompt_embeds.to(dtype)
        return unet(x, t, encoder_hidden_states=embeds, timestep_cond=cond, return_dict=False, **kwargs([added]))[0]
    out = unet(
        torch.cat([x, x]),
        torch.cat([t, t]),
        encoder_hidden_states=torch.cat([negative_embeds, prompt_embeds]).to(dtype),
        timestep_cond=None if cond is None else torch.cat([cond, cond]),
        return_dict=False,
        **kwargs([negative_added, added]),
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
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 16, upcast: bool = False) -> torch.Tensor:
    """(B, C, h, w) latents -> (B, 3, H, W) float32 images in [0, 1].

    ``upcast``: an fp16 VAE whose config says ``force_upcast`` decodes in fp32, as diffusers' SDXL
    pipeline does (SDXL's VAE overflows in fp16); SD 1.x pipelines decode in the VAE's dtype.
    """
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    dtype = vae.dtype
    upcast = upcast and dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        out = []
        for chunk in latents.split(batch_size):
            img = vae.decode((chunk / scale + shift).to(vae.dtype), return_dict=False)[0]
            out.append((img.float() / 2 + 0.5).clamp(0, 1))
    finally:
        if upcast:
            vae.to(dtype)
    return torch.cat(out)


def uses_cfg(unet, guidance_scale: float) -> bool:
    """CFG needs an unconditional pass unless the model takes guidance as an embedding (LCM)."""
    return guidance_scale > 1.0 and not getattr(unwrap(unet).config, "time_cond_proj_dim", None)
