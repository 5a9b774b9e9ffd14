"""Helpers over a pipeline's parts: text encoding, the guided UNet output, VAE decoding, wrappers."""

from __future__ import annotations

import math

import torch


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
