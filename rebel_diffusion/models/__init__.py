"""Model families: loading (``loading``), the built-ins (``builtins``), LoRA (``lora``) and the text
conditioning of SD 1.x/2.x and SDXL (``components``).

``load_pipeline(name)`` takes a hub id, a local diffusers folder, a single-file checkpoint or a
built-in name (``BUILTIN_MODELS``: ``tiny``, ``tiny-lcm``, ``tiny-v``, ``toy``, ``sd15-random``,
``tiny-sdxl``, ``sdxl-random``). A new model family adds its loading and conditioning here.
"""

from .builtins import (
    SD_SCHEDULER_CONFIG,
    SDXL_VAE_SCALING,
    build_clip_tokenizer,
    build_sd15_random_pipeline,
    build_sdxl_random_pipeline,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
)
from .loading import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    TOY_MODEL_DIR,
    check_sd_components,
    load_pipeline,
    load_vae,
    single_file_family,
)
from .lora import (
    DEFAULT_LORA_TARGETS,
    KOHYA_FILE,
    LORA_FILE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    add_lora,
    load_lora,
    load_unet,
    lora_state_dict,
    lora_target_matches,
    parse_lora_targets,
    save_lora,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_LORA_TARGETS",
    "DEFAULT_MODEL",
    "KOHYA_FILE",
    "LORA_FILE",
    "PEFT_CONFIG",
    "PEFT_WEIGHTS",
    "SDXL_VAE_SCALING",
    "SD_SCHEDULER_CONFIG",
    "TOY_MODEL_DIR",
    "add_lora",
    "build_clip_tokenizer",
    "build_sd15_random_pipeline",
    "build_sdxl_random_pipeline",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "check_sd_components",
    "load_lora",
    "load_pipeline",
    "load_unet",
    "load_vae",
    "lora_state_dict",
    "lora_target_matches",
    "parse_lora_targets",
    "save_lora",
    "single_file_family",
]
