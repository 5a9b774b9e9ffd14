"""Model loading: hub ids, local diffusers folders, single-file checkpoints, built-ins; and LoRA.

Built-in names (no download, no internet):
- ``tiny``: an SD-1.x-shaped pipeline with seeded random weights (32x32 images). For plumbing and
  math tests: fast, but its images are noise textures whose rewards do not respond to training.
- ``tiny-lcm``: the same with an ``LCMScheduler`` and a guidance-embedding UNet (as LCM Dreamshaper).
- ``tiny-v``: the same as ``tiny`` with a v-prediction scheduler (as SD 2.x at 768px).
- ``toy``: a small text-to-image model trained by ``scripts/train_toy.py`` on synthetic shapes and
  shipped with the package; learning is visible on it on a CPU.
- ``sd15-random``: the Stable Diffusion 1.5 architecture at 512x512 with seeded random weights
  (``build_sd15_random_pipeline``): full-size timing and memory without a download; its images are noise.
- ``tiny-sdxl``: an SDXL-shaped pipeline (two text encoders, pooled text and size conditioning)
  with seeded random weights, 32x32 images, sizes as diffusers' SDXL tests: for plumbing and math.
- ``sdxl-random``: the SDXL base 1.0 architecture at 1024x1024 with seeded random weights
  (``build_sdxl_random_pipeline``), for GPU benchmarks.

All of them use the real CLIP tokenizer, rebuilt offline from open_clip's bundled BPE vocabulary.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import UsageError
from .files import replace_dir

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
BUILTIN_MODELS = ("tiny", "tiny-lcm", "tiny-v", "toy", "sd15-random", "tiny-sdxl", "sdxl-random")
TOY_MODEL_DIR = Path(__file__).parent / "toy" / "model"

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
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, found by pipe.load_lora_weights(folder)


# ----------------------------------------------------------------------------------------------
# Tokenizer


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
        _atomic_write(vocab_file, json.dumps(encoder))
        _atomic_write(merges_file, "#version: 0.2\n" + "\n".join(merges) + "\n")
    extra = {} if pad_token is None else {"pad_token": pad_token}
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77, **extra)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Built-in tiny pipeline


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


# ----------------------------------------------------------------------------------------------
# Built-in SDXL pipelines

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


# ----------------------------------------------------------------------------------------------
# Loading


def load_pipeline(
    model: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", vae: str | None = None
):
    """Load a Stable Diffusion (1.x, 2.x, LCM or SDXL) pipeline from a built-in name, a folder, a file or a hub id.

    - ``tiny``, ``tiny-lcm``, ``tiny-v``, ``toy``, ``sd15-random``, ``tiny-sdxl``, ``sdxl-random``:
      built-ins (module docstring);
    - an existing folder: a diffusers pipeline folder (``model_index.json``), SD or SDXL;
    - an existing ``.safetensors``/``.ckpt`` file: a single-file SD or SDXL checkpoint (SDXL is
      recognised by its second text encoder's keys);
    - otherwise a model-hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or
      ``stabilityai/stable-diffusion-xl-base-1.0``.

    ``vae``: a hub id or folder of an ``AutoencoderKL`` that replaces the pipeline's (for SDXL in
    fp16: ``madebyollin/sdxl-vae-fp16-fix``).

    Raises ``UsageError`` with one line that says what to pass instead when it cannot be loaded.
    The safety checker is not loaded: rewards see the raw images.
    """
    if model in ("tiny", "tiny-v"):
        pipe = build_tiny_pipeline(prediction_type="v_prediction" if model == "tiny-v" else "epsilon")
    elif model == "tiny-lcm":
        pipe = build_tiny_pipeline(scheduler="lcm")
    elif model == "toy":
        pipe = _load_toy(dtype)
    elif model == "sd15-random":
        pipe = build_sd15_random_pipeline(dtype, device)  # weights created on the device: fast on a GPU
    elif model == "tiny-sdxl":
        pipe = build_tiny_sdxl_pipeline()
    elif model == "sdxl-random":
        pipe = build_sdxl_random_pipeline(dtype, device)
    else:
        pipe = _load_external(model, dtype)
    if vae is not None:
        pipe.vae = load_vae(vae, dtype)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    return pipe.to(device)


def _load_toy(dtype):
    from diffusers import StableDiffusionPipeline

    if not (TOY_MODEL_DIR / "model_index.json").exists():
        raise UsageError(
            f"the built-in 'toy' model is missing ({TOY_MODEL_DIR} has no model_index.json): "
            "reinstall rebel-diffusion, or train it with `python scripts/train_toy.py`"
        )
    try:
        # Stored in fp16 (small); torch_dtype casts every part, transformers' text encoder included.
        with _quiet_dtype_deprecation():
            pipe = StableDiffusionPipeline.from_pretrained(
                str(TOY_MODEL_DIR), torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
    except Exception as e:  # a damaged install: truncated or missing safetensors, bad json
        raise UsageError(
            f"the built-in 'toy' model in {TOY_MODEL_DIR} is damaged ({type(e).__name__}: {_first_line(e)}); "
            "reinstall rebel-diffusion, or retrain it with `python scripts/train_toy.py`"
        ) from e
    # transformers builds an empty tokenizer (2 tokens) from a folder without vocab.json/merges.txt,
    # and a truncated merges.txt tokenizes differently: check the ids of a toy caption.
    tok = pipe.tokenizer
    ids = tok("a red circle on a blue background").input_ids if tok is not None and len(tok) == 49408 else None
    if ids != [49406, 320, 736, 7117, 525, 320, 1746, 5994, 49407]:
        raise UsageError(
            f"the built-in 'toy' model in {TOY_MODEL_DIR} is damaged (its tokenizer/ is missing or incomplete); "
            "reinstall rebel-diffusion, or retrain it with `python scripts/train_toy.py`"
        )
    return pipe


@contextlib.contextmanager
def _quiet_dtype_deprecation():
    """diffusers >= 0.36 renames ``torch_dtype`` to ``dtype`` with a warning; the old name works in all we
    support. SDXL pipelines have no safety checker to switch off: their notice about it is dropped too."""
    import logging

    def keep(record):
        return "'safety_checker'" not in record.getMessage()

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        logger.removeFilter(keep)


def single_file_family(path: str | os.PathLike) -> str:
    """'sdxl', 'sdxl-refiner', 'sd' or 'lora' for a single-file checkpoint, from its keys (SGM's names).

    SDXL base has two text encoders (``conditioner.embedders.0`` and ``.1``), the refiner only the
    second (as ``embedders.0``, an OpenCLIP model). A ``.ckpt`` is read as SD 1.x/2.x: SDXL is
    distributed as ``.safetensors``.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return "sd"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if keys and all("lora" in k or k.endswith(".alpha") for k in keys):
        return "lora"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.transformer.") for k in keys):
        return "sdxl-refiner"
    return "sd"


def _load_single_file(path: Path, dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = single_file_family(path)
    if family == "sdxl-refiner":
        raise UsageError(REFINER_REFUSAL.format(model=path))
    if family == "lora":
        raise UsageError(
            f"--model {path}: this file is a LoRA, not a base model; pass the base model with --model and "
            "the LoRA with --finetune (sample, eval, preview)"
        )
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    extra = {"add_watermarker": False} if family == "sdxl" else {"safety_checker": None}
    return cls.from_single_file(str(path), torch_dtype=dtype, **extra)


REFINER_REFUSAL = (
    "--model {model}: an SDXL refiner (image-to-image, one text encoder) cannot be trained here; "
    "pass an SDXL base model such as stabilityai/stable-diffusion-xl-base-1.0"
)


def load_vae(vae: str, dtype):
    """An ``AutoencoderKL`` from a hub id or a local folder (``--vae``); one line when it cannot load."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    try:
        with _quiet_dtype_deprecation():
            if path.is_file():
                return AutoencoderKL.from_single_file(str(path), torch_dtype=dtype)
            return AutoencoderKL.from_pretrained(str(path) if path.exists() else vae, torch_dtype=dtype)
    except Exception as e:
        where = "the local path" if path.exists() else "the model hub"
        raise UsageError(
            f"--vae {vae}: could not load a VAE from {where} ({type(e).__name__}: {_first_line(e)}); "
            "pass a diffusers AutoencoderKL folder (with config.json), a .safetensors VAE, or a hub id "
            "downloaded first with `hf download`"
        ) from e


def _load_external(model: str, dtype):
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    looks_like_path = path.suffix in (".safetensors", ".ckpt") or model.startswith((".", "/", "~"))
    try:
        with _quiet_dtype_deprecation():
            if path.is_file():
                if path.suffix not in (".safetensors", ".ckpt"):
                    raise UsageError(f"--model {model}: a single-file checkpoint must end in .safetensors or .ckpt")
                return _load_single_file(path, dtype)
            if path.is_dir():
                if not (path / "model_index.json").exists():
                    raise UsageError(
                        f"--model {model}: the folder has no model_index.json; pass a diffusers pipeline folder "
                        "(saved with save_pretrained), a .safetensors checkpoint, or a hub id"
                    )
                return DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None)
            if looks_like_path:
                raise UsageError(f"--model {model}: no such file or folder")
            if model.count("/") != 1:
                raise UsageError(
                    f"--model {model}: not a built-in ({', '.join(BUILTIN_MODELS)}), an existing path, or a hub id "
                    "of the form owner/name"
                )
            return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)
    except UsageError:
        raise
    except Exception as e:
        if path.exists():  # a local file or folder that is not a loadable SD pipeline: no download hint
            where = "the single-file checkpoint" if path.is_file() else "the folder"
            hint = (
                "pass a diffusers pipeline folder (saved with save_pretrained) "
                "or a Stable Diffusion .safetensors checkpoint"
            )
        else:
            where = "the model hub"
            hint = (
                "pass a local diffusers folder or a .safetensors file with --model, "
                f"or download it first with `hf download {model}` where the hub is reachable"
            )
        raise UsageError(
            f"--model {model}: could not load from {where} ({type(e).__name__}: {_first_line(e)}); {hint}"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def check_sd_components(pipe, model: str = "") -> None:
    """Raise ``UsageError`` unless ``pipe`` is a text-to-image pipeline this toolkit drives.

    SD 1.x/2.x and LCM (UNet, VAE, one CLIP text encoder) or SDXL base (two text encoders, pooled
    text and size conditioning). An SDXL refiner, an inpainting UNet or another conditioning is refused.
    """
    what = "rebel-diffusion trains Stable Diffusion 1.x/2.x, LCM and SDXL (base) UNet pipelines"
    if getattr(pipe.config, "requires_aesthetics_score", False) or (
        getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "text_encoder", None) is None
    ):
        raise UsageError(REFINER_REFUSAL.format(model=model or type(pipe).__name__))
    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    unet = getattr(pipe, "unet", None)
    embed = getattr(getattr(unet, "config", None), "addition_embed_type", None)
    if embed == "text_time":
        names += ["text_encoder_2", "tokenizer_2"]
    missing = [n for n in names if getattr(pipe, n, None) is None]
    if missing:
        raise UsageError(f"the model is a {type(pipe).__name__} without {', '.join(missing)}: {what}")
    if embed not in (None, "text_time") or unet.config.in_channels != 4:
        raise UsageError(
            f"the model is a {type(pipe).__name__} whose UNet takes {unet.config.in_channels} input channels "
            f"and addition_embed_type {embed!r}: {what}"
        )


# ----------------------------------------------------------------------------------------------
# LoRA


def parse_lora_targets(text: str) -> list[str]:
    """'to_q, to_k,,to_v' -> ['to_q', 'to_k', 'to_v']; an empty list is a UsageError."""
    targets = [t.strip() for t in str(text).split(",") if t.strip()]
    if not targets:
        raise UsageError(
            "--lora-targets is empty: name UNet modules separated by commas, e.g. to_q,to_k,to_v,to_out.0"
        )
    return list(dict.fromkeys(targets))


def lora_target_matches(unet, target_modules) -> dict[str, int]:
    """How many linear/conv modules of ``unet`` each target names (peft's rule: the name, or its suffix)."""
    from torch import nn

    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    return {t: sum(1 for n in names if n == t or n.endswith("." + t)) for t in target_modules}


def add_lora(unet, *, rank: int = 8, alpha: float = 8.0, target_modules=DEFAULT_LORA_TARGETS) -> dict[str, int]:
    """Freeze ``unet`` and add trainable LoRA adapters (peft) on ``target_modules``, kept in fp32.

    Paper default: rank 8, alpha 8 on the attention projections q, k, v, out. Every target must
    match at least one module (a silently empty or partial adapter trains nothing); returns
    {target: modules matched}.
    """
    from peft import LoraConfig

    target_modules = list(target_modules)
    matches = lora_target_matches(unet, target_modules)
    unmatched = [t for t, n in matches.items() if n == 0]
    if unmatched:
        raise UsageError(
            f"--lora-targets: {', '.join(unmatched)} match(es) no linear or conv module of this UNet "
            "(valid names include to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.2)"
        )
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    )
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return matches


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights of ``unet`` in diffusers' format, ready for ``save_lora_weights``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def save_lora(unet, folder: str | os.PathLike) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors``, loadable by ``pipe.load_lora_weights(folder)``,
    with the same LoRA in PEFT's format and in kohya's single file (``KOHYA_FILE``) beside it."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    # The adapter config (rank, alpha, targets) travels as safetensors metadata: without it diffusers
    # reloads with alpha = rank, a different LoRA scale whenever alpha != rank.
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(tmp),
        unet_lora_layers=lora_state_dict(unet),
        unet_lora_adapter_metadata=_sorted_targets(unet.peft_config["default"].to_dict()),
        safe_serialization=True,
        weight_name=LORA_FILE,
    )
    _save_peft_adapter(unet, tmp)
    _save_kohya(unet, tmp)
    replace_dir(tmp, folder)
    return folder / LORA_FILE


# kohya's single-file format, which ComfyUI and AUTOMATIC1111/Forge read: not named like diffusers'
# file, so ``load_lora_weights(folder)`` keeps picking that one.
KOHYA_FILE = "lora_kohya.safetensors"


def _save_kohya(unet, folder: Path) -> None:
    """The LoRA in kohya's format (``lora_unet_<module>.lora_down/lora_up.weight`` and ``.alpha``),
    converted by diffusers' ``convert_state_dict_to_kohya``. That converter writes alpha = rank; the
    run's own alpha replaces it, since the scale the tools apply is alpha / rank."""
    from diffusers.utils import convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = unet.peft_config["default"]
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    kohya = convert_state_dict_to_kohya(peft_state)
    alpha = torch.tensor(float(config.lora_alpha))
    kohya = {k: (alpha.clone() if k.endswith(".alpha") else v.detach().contiguous()) for k, v in sorted(kohya.items())}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": str(alpha.item()),
    }
    save_file(kohya, str(folder / KOHYA_FILE), metadata=metadata)


PEFT_CONFIG = "adapter_config.json"  # PEFT's names: PeftModel.from_pretrained(unet, folder) reads these
PEFT_WEIGHTS = "adapter_model.safetensors"


def _save_peft_adapter(unet, folder: Path) -> None:
    """The same LoRA in PEFT's own format beside diffusers' file, so that
    ``PeftModel.from_pretrained(unet, folder)`` loads it (diffusers picks its own file by name)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = unet.peft_config["default"]
    weights = {
        f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()
    }
    save_file(weights, str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(str(folder))
    path = (
        folder / PEFT_CONFIG
    )  # PEFT writes its target set in hash order: sorted, identical runs give identical files
    path.write_text(json.dumps(_sorted_targets(json.loads(path.read_text())), indent=2, sort_keys=True) + "\n")


def _sorted_targets(config: dict) -> dict:
    """An adapter config with ``target_modules`` as a sorted list (a set's order changes run to run)."""
    targets = config.get("target_modules")
    if isinstance(targets, (set, list, tuple)):
        config = {**config, "target_modules": sorted(targets)}
    return config


def load_lora(pipe, file: Path) -> None:
    """Apply a diffusers LoRA file to ``pipe``; a LoRA that does not fit is a one-line ``UsageError``."""
    file = Path(file)
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    except Exception as e:
        raise UsageError(f"{file}: this LoRA does not fit the model ({_first_line(e)})") from e
    _check_lora_applied(pipe, file)


def load_unet(pipe, folder: Path) -> None:
    """Replace ``pipe.unet`` by the diffusers UNet folder ``folder`` (a full fine-tune)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder))
    pipe.unet = unet.to(device=pipe.device, dtype=pipe.unet.dtype)


def _check_lora_applied(pipe, f: Path) -> None:
    # diffusers only warns when no key of the file matches the UNet: make that an error.
    n = sum(1 for name, _ in pipe.unet.named_modules() if name.endswith("lora_A"))
    if n == 0:
        raise UsageError(f"{f}: this LoRA does not fit the model (no layer of its UNet matched)")
