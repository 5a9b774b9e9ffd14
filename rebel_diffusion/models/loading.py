"""Loading a model by name: a hub id, a local diffusers folder, a single-file checkpoint (SD 1.x/2.x,
LCM, SDXL), or a built-in (``builtins``); ``--vae``; the checks that the pieces are SD's."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

from ..errors import UsageError, first_line
from .builtins import (
    build_sd15_random_pipeline,
    build_sdxl_random_pipeline,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
)

TOY_MODEL_DIR = Path(__file__).parents[1] / "toy" / "model"  # read at call time: tests move it
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


BUILTIN_MODELS = ("tiny", "tiny-lcm", "tiny-v", "toy", "sd15-random", "tiny-sdxl", "sdxl-random")


def _not_an_empty_fp32_list(record: logging.LogRecord) -> bool:
    """False for the warning diffusers logs on every ``ModelMixin.to(dtype)`` even when the modules it
    says to keep in float32 are none ("...should be kept in float32: []."); a real list passes."""
    message = record.getMessage()
    return not (message.startswith("There are modules in") and "kept in float32: []." in message)


logging.getLogger("diffusers.models.modeling_utils").addFilter(_not_an_empty_fp32_list)


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
            f"the built-in 'toy' model in {TOY_MODEL_DIR} is damaged ({type(e).__name__}: {first_line(e)[:200]}); "
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
            f"--vae {vae}: could not load a VAE from {where} ({type(e).__name__}: {first_line(e)[:200]}); "
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
            f"--model {model}: could not load from {where} ({type(e).__name__}: {first_line(e)[:200]}); {hint}"
        ) from e


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
