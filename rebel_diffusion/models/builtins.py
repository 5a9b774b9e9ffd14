"""The built-in models (no download, no internet): ``tiny``, ``tiny-lcm``, ``tiny-v``, ``sd15-random``,
``tiny-sdxl``, ``sdxl-random`` built here with seeded random weights; ``toy`` shipped in
``toy/model`` (``loading`` loads it). All use the real CLIP tokenizer, rebuilt offline from open_clip's
bundled BPE vocabulary (``build_clip_tokenizer``).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from pathlib import Path

import torch

from ..files import atomic_write_text

# Stable Diffusion 1.x's noise schedule (its scheduler_config.json), shared by the built-ins.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def build_clip_tokenizer(cache_dir: str | os.PathLike | None = None, pad_token: str | None = None):
    """The CLIP ViT-L/14 tokenizer of Stable Diffusion 1.x, built from open_clip's bundled BPE file.

    open_clip's ``SimpleTokenizer`` holds the same vocabulary and merges as the hub tokenizer; only
    the names of the start/end tokens differ. Gives the same ids as the SD tokenizer. SDXL's second
    tokenizer is the same with ``pad_token='!'`` (it pads with id 0, not the end token).
    """
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from transformers import CLIPTokenizer

    # Keyed by open_clip's version: a cache from another vocabulary file is never reused.
    name = f"rebel_diffusion_clip_tokenizer_{open_clip.__version__}"
    folder = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / name
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.exists() and merges_file.exists()):
        folder.mkdir(parents=True, exist_ok=True)
        encoder = dict(SimpleTokenizer().encoder)
        encoder["<|startoftext|>"] = encoder.pop("<start_of_text>")
        encoder["<|endoftext|>"] = encoder.pop("<end_of_text>")
        # Same slice as open_clip: skip the version line, keep 49152 - 256 - 2 merges.
        merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
        atomic_write_text(vocab_file, json.dumps(encoder))
        atomic_write_text(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, **extra)


def tiny_vae(**config):
    """The built-ins' small VAE (scale factor 4: 32 px images, 4x8x8 latents), seeded by the caller."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **config,
    )


def build_tiny_pipeline(seed: int = 0, *, scheduler: str = "ddim", prediction_type: str = "epsilon"):
    """A small SD-shaped ``StableDiffusionPipeline`` with seeded random weights (32x32 images).

    VAE scale factor 4 (latents 4x8x8, as the toy model), UNet (32, 64) with cross-attention, CLIP text encoder
    with hidden size 32 and the real tokenizer. ``scheduler='lcm'`` adds a guidance embedding
    (``time_cond_proj_dim``) and an ``LCMScheduler``, as LCM Dreamshaper v7.
    """
    from diffusers import (
        DDIMScheduler,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    if scheduler not in ("ddim", "lcm"):
        raise ValueError(f"scheduler must be 'ddim' or 'lcm', got {scheduler!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
            time_cond_proj_dim=32 if scheduler == "lcm" else None,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(
            clip_l_text_config(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=512,
                pad_token_id=49407,
            )
        )  # fmt: skip
    sched_cls = LCMScheduler if scheduler == "lcm" else DDIMScheduler
    sched = sched_cls(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_vae(**config):
    """Stable Diffusion's published 4-block VAE (SD 1.x, 2.x and SDXL share the layout), seeded by
    the caller; ``config``: its sample size, scaling factor, ``force_upcast``."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        **config,
    )


def clip_l_text_config(**overrides):
    """The CLIP ViT-L/14 text tower of SD 1.x and of SDXL's first encoder; ``overrides`` change it
    (SDXL's second encoder is OpenCLIP's bigG: wider, deeper, gelu)."""
    from transformers import CLIPTextConfig

    config = dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=49406,
        eos_token_id=49407,
    )
    return CLIPTextConfig(**{**config, **overrides})


def build_sd15_random_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """The Stable Diffusion 1.5 architecture with seeded random weights, for benchmarks (no download).

    UNet, VAE and CLIP text encoder configs are SD 1.5's published ones (860 M + 84 M + 123 M
    parameters); the tokenizer is the real one; the scheduler is SD's DDIM. Weights are created on
    ``device`` (fast on a GPU) and cast to ``dtype``. Its images are noise: for timing and memory only.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            downsample_padding=1,
            mid_block_scale_factor=1,
            act_fn="silu",
            norm_num_groups=32,
            norm_eps=1e-5,
            cross_attention_dim=768,
            attention_head_dim=8,
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        vae = sd_vae(sample_size=512, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(clip_l_text_config(pad_token_id=49407))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe.to(device)


# SDXL base 1.0's VAE scale (its vae/config.json); it overflows in fp16 (force_upcast).
SDXL_VAE_SCALING = 0.13025


def _sdxl_pipeline(unet, vae, text_encoder, text_encoder_2):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    # SDXL base's scheduler_config.json: Euler with SD's schedule, "leading" spacing, and the DDIM
    # keys it also carries (a DDIM made from it keeps set_alpha_to_one=False: every step stochastic).
    euler = {k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("clip_sample", "set_alpha_to_one")}
    scheduler = EulerDiscreteScheduler(**euler, timestep_spacing="leading")
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl_pipeline(seed: int = 0):
    """A small SDXL-shaped ``StableDiffusionXLPipeline`` with seeded random weights (32x32 images).

    Sizes as diffusers' own SDXL tests: two CLIP text encoders of hidden size 32 (the second with a
    projection, whose pooled output is ``text_embeds``), cross-attention 64 = 32 + 32, the six size
    numbers embedded in 8 dims each (6 x 8 + 32 = 80), linear projections in the transformers; VAE
    scale factor 4 (latents 4x8x8) with SDXL's scaling factor and ``force_upcast``.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_config = clip_l_text_config(
        hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, hidden_act="gelu",
        projection_dim=32, pad_token_id=49407,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=8,
        )
        vae = tiny_vae(scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
    return _sdxl_pipeline(unet, vae, text_encoder, text_encoder_2)


def build_sdxl_random_pipeline(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """The SDXL base 1.0 architecture with seeded random weights, for benchmarks (no download).

    UNet (2.6 B parameters), VAE and the two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, with
    projection) from SDXL base 1.0's published configs, at 1024x1024. Weights are created on
    ``device`` and cast to ``dtype``. Its images are noise: for timing and memory only.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    device = torch.device(device)
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            norm_num_groups=32,
            act_fn="silu",
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        vae = sd_vae(sample_size=1024, scaling_factor=SDXL_VAE_SCALING, force_upcast=True)
        text_encoder = CLIPTextModel(clip_l_text_config(pad_token_id=1))
        # OpenCLIP ViT-bigG/14's text tower, with its projection (the pooled text_embeds)
        text_encoder_2 = CLIPTextModelWithProjection(
            clip_l_text_config(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280, pad_token_id=1,
            )
        )  # fmt: skip
    pipe = _sdxl_pipeline(unet, vae, text_encoder, text_encoder_2)
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    return pipe.to(device)
