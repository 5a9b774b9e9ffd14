"""LoRA: adding adapters to the UNet, and writing and reading them in diffusers', PEFT's and kohya's
formats (``lora/``: ``pytorch_lora_weights.safetensors``, ``adapter_*``, ``lora_kohya.safetensors``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import UsageError, first_line
from ..files import replace_dir

DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, found by pipe.load_lora_weights(folder)


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
        raise UsageError(f"{file}: this LoRA does not fit the model ({first_line(e)[:200]})") from e
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
