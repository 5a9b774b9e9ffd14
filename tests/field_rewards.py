"""Random-weight builds of the field's reward models in their published layouts, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from rebel_diffusion.rewards.pickscore import clip_bpe_tokenizer


def tiny_pickscore(folder: Path) -> Path:
    """A folder laid out like ``hf download yuvalkirstain/PickScore_v1`` plus the processor files,
    holding a random-weight CLIP of a tiny width (224 px input, as the real one)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
        logit_scale_init_value=4.6052,  # exp = 100, as in the published model
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)  # CLIP-H's processor settings are CLIP's defaults
    clip_bpe_tokenizer().save_pretrained(folder)
    return folder
