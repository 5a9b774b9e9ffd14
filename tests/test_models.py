"""Model loading, the offline tokenizer and tiny pipelines, and LoRA helpers."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from safetensors.torch import load_file
from torch.testing import assert_close

from rebel_diffusion.errors import UsageError
from rebel_diffusion.models import (
    KOHYA_FILE,
    LORA_FILE,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    add_lora,
    build_clip_tokenizer,
    build_tiny_pipeline,
    load_pipeline,
    save_lora,
)
from rebel_diffusion.sampling import SamplingSettings, sample_trajectories

SETTINGS = SamplingSettings(num_steps=2, guidance_scale=5.0)


def state_dicts_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def one_line_usage_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([500, 20]),
        torch.randn(2, 77, 32, generator=g),
    )


@torch.no_grad()
def unet_out(unet, inputs):
    x, t, emb = inputs
    return unet(x, t, encoder_hidden_states=emb).sample


# ----------------------------------------------------------------------------------------------
# tokenizer

PROMPTS = [
    "a photo of a cat",
    "A Red CIRCLE on a blue background!!",
    "hello, world: (4k) -- 'quoted' \"double\" & <tag> [x]; 50% off? e.g. café",
    "  spaced   out\tprompt  ",
    "",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Built fresh from open_clip's BPE file (not from a cache an older version may have written)."""
    return build_clip_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


def test_tokenizer_matches_open_clip(tokenizer):
    expected = open_clip.tokenize(PROMPTS)  # (N, 77), zero-padded after <end_of_text>
    got = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert got.shape == expected.shape == (len(PROMPTS), 77)
    for g, e in zip(got, expected):
        n = int((e != 0).sum())
        assert n >= 2 and torch.equal(g[:n], e[:n])
        assert (g[n:] == tokenizer.eos_token_id).all()  # SD pads with <|endoftext|>
    assert tokenizer.bos_token_id == 49406 and tokenizer.eos_token_id == 49407
    assert tokenizer.model_max_length == 77 and len(tokenizer) == 49408  # SD's vocabulary size


def test_tokenizer_matches_open_clip_on_rare_words(tokenizer):
    """Whole words among the last 4000 tokens: each needs one of the last BPE merges."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    words = [
        bytearray(simple.byte_decoder[c] for c in simple.decoder[i][: -len("</w>")]).decode("utf-8", "ignore")
        for i in range(49406 - 4000, 49406)
        if simple.decoder[i].endswith("</w>")
    ]
    prompts = [" ".join(words[i : i + 15]) for i in range(0, len(words), 15)]
    assert len(prompts) > 100
    expected = open_clip.tokenize(prompts)
    got = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    real = expected != 0
    assert torch.equal(got[real], expected[real])


def test_tokenizer_truncates_long_prompts_like_open_clip(tokenizer):
    long = "a very detailed painting of " + ", ".join(f"object number {i}" for i in range(60))
    ids = tokenizer([long], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert len(tokenizer([long]).input_ids[0]) > 77  # it really is too long
    assert ids == open_clip.tokenize([long])[0].tolist()
    assert ids[0] == 49406 and ids[-1] == 49407


def test_tokenizer_cache_is_reused(tmp_path):
    a = build_clip_tokenizer(tmp_path)
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    b = build_clip_tokenizer(tmp_path)
    assert a("a dog, running").input_ids == b("a dog, running").input_ids


# ----------------------------------------------------------------------------------------------
# built-in pipelines


def test_tiny_pipeline_is_seeded(tiny_pipe):
    rng = torch.get_rng_state()
    again = build_tiny_pipeline()
    assert torch.equal(torch.get_rng_state(), rng)  # building does not touch the global RNG
    for name in ("unet", "vae", "text_encoder"):
        assert state_dicts_equal(getattr(again, name), getattr(tiny_pipe, name)), name
    other = build_tiny_pipeline(seed=1)
    assert not state_dicts_equal(other.unet, tiny_pipe.unet)


def test_builtin_variants(tiny_pipe, tiny_lcm_pipe, tiny_v_pipe):
    assert isinstance(tiny_pipe.scheduler, DDIMScheduler) and tiny_pipe.unet.config.time_cond_proj_dim is None
    assert tiny_pipe.scheduler.config.prediction_type == "epsilon"
    assert isinstance(tiny_lcm_pipe.scheduler, LCMScheduler) and tiny_lcm_pipe.unet.config.time_cond_proj_dim
    assert isinstance(tiny_v_pipe.scheduler, DDIMScheduler)
    assert tiny_v_pipe.scheduler.config.prediction_type == "v_prediction"
    for pipe in (tiny_pipe, tiny_lcm_pipe, tiny_v_pipe):
        assert pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
        assert pipe.tokenizer.model_max_length == 77 and pipe.unet.dtype == torch.float32
    assert state_dicts_equal(tiny_v_pipe.unet, tiny_pipe.unet)  # same seed, only the scheduler differs


def test_load_pipeline_dtype():
    pipe = load_pipeline("tiny", dtype=torch.bfloat16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.bfloat16}


def test_saved_folder_reloads_and_samples_identically(tiny_pipe, tmp_path):
    folder = tmp_path / "tiny-saved"
    tiny_pipe.save_pretrained(folder)
    loaded = load_pipeline(str(folder))
    assert type(loaded.scheduler) is DDIMScheduler
    assert loaded.scheduler.config.steps_offset == tiny_pipe.scheduler.config.steps_offset
    assert state_dicts_equal(loaded.unet, tiny_pipe.unet)
    a = sample_trajectories(tiny_pipe, ["a red circle"], images_per_prompt=2, seed=3, settings=SETTINGS)
    b = sample_trajectories(loaded, ["a red circle"], images_per_prompt=2, seed=3, settings=SETTINGS)
    assert_close(b.images, a.images, rtol=0, atol=1e-6)
    assert_close(b.log_probs, a.log_probs, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# bad model names and paths: UsageError with one line


def test_unknown_model_name():
    with pytest.raises(UsageError) as info:
        load_pipeline("tiny-xl")
    message = one_line_usage_error(info)
    assert "tiny-xl" in message and "built-in" in message and "tiny" in message


@pytest.mark.parametrize("model", ["./no/such/model", "/no/such/model.safetensors", "missing.ckpt"])
def test_nonexistent_path(model):
    with pytest.raises(UsageError, match="no such file or folder") as info:
        load_pipeline(model)
    one_line_usage_error(info)


def test_not_a_hub_id():
    with pytest.raises(UsageError, match="owner/name") as info:
        load_pipeline("a/b/c")
    one_line_usage_error(info)


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(UsageError, match="no model_index.json") as info:
        load_pipeline(str(tmp_path))
    one_line_usage_error(info)


def test_damaged_pipeline_folder(tmp_path):
    (tmp_path / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    )
    with pytest.raises(UsageError, match="could not load from the folder") as info:
        load_pipeline(str(tmp_path))
    assert "hf download" not in one_line_usage_error(info)  # a local folder: no download hint


def test_single_file_with_wrong_suffix(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match=r"must end in \.safetensors or \.ckpt") as info:
        load_pipeline(str(f))
    one_line_usage_error(info)


def test_hub_unreachable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(UsageError) as info:
        load_pipeline("nobody-here/not-a-real-model")
    message = one_line_usage_error(info)
    assert "model hub" in message and "hf download nobody-here/not-a-real-model" in message
    assert "--model" in message and "folder" in message


# ----------------------------------------------------------------------------------------------
# LoRA


@pytest.fixture(scope="module")
def lora_unet(tiny_pipe):
    """A copy of tiny's UNet with LoRA adapters whose (zero-initialised) up-projections are perturbed."""
    unet = copy.deepcopy(tiny_pipe.unet)
    add_lora(unet)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return unet


@pytest.fixture(scope="module")
def lora_folder(lora_unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "lora"
    save_lora(lora_unet, folder)
    return folder


def test_add_lora_trains_only_lora(tiny_pipe, unet_inputs):
    unet = copy.deepcopy(tiny_pipe.unet)
    n_base = sum(1 for _ in unet.parameters())
    add_lora(unet, rank=4, alpha=4.0)
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(1 for n, _ in unet.named_parameters() if "lora_" not in n) == n_base
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert {p.shape[0] for n, p in trainable.items() if ".lora_A." in n} == {4}  # the rank
    # every attention projection q, k, v, out got an adapter
    targets = [
        n for n, _ in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_k", "attn2.to_v", "to_out.0"))
    ]
    assert targets
    for n in targets:
        assert hasattr(unet.get_submodule(n), "lora_A"), n
    # zero-initialised up-projections: the model is unchanged until trained
    assert_close(unet_out(unet, unet_inputs), unet_out(tiny_pipe.unet, unet_inputs), rtol=0, atol=1e-6)


def test_save_lora_loads_into_plain_diffusers_pipeline(lora_unet, lora_folder, unet_inputs):
    assert (lora_folder / LORA_FILE).is_file()
    assert not list(lora_folder.parent.glob("*.tmp")) and not list(lora_folder.parent.glob("*.old"))
    keys = load_file(str(lora_folder / LORA_FILE)).keys()
    assert keys and all(k.startswith("unet.") for k in keys)

    plain = build_tiny_pipeline()
    base = unet_out(plain.unet, unet_inputs)
    plain.load_lora_weights(str(lora_folder))
    with_lora = unet_out(plain.unet, unet_inputs)
    assert (with_lora - base).abs().max() > 1e-4  # the perturbed LoRA changes the output ...
    assert_close(with_lora, unet_out(lora_unet, unet_inputs), rtol=1e-5, atol=1e-5)  # ... to the trained one


def test_save_lora_replaces_existing_folder(lora_unet, tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "stale.txt").write_text("old")
    save_lora(lora_unet, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([LORA_FILE, PEFT_CONFIG, PEFT_WEIGHTS, KOHYA_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_a_cast_to_fp16_logs_no_empty_fp32_warning():
    """diffusers warns on every .to(dtype) that modules should be kept in float32, even when they are
    none ([]): that line alone is dropped; one naming modules still reaches the user."""
    import logging

    from helpers import diffusers_log

    with diffusers_log() as log:
        load_pipeline("tiny", dtype=torch.float16)
    assert not [m for m in log if "kept in float32" in m], log
    logger = logging.getLogger("diffusers.models.modeling_utils")
    with diffusers_log() as log:
        logger.warning("There are modules in UNet that should be kept in float32: ['norm']. Casting directly")
        logger.warning("There are modules in UNet that should be kept in float32: []. Casting directly")
    assert log == ["There are modules in UNet that should be kept in float32: ['norm']. Casting directly"]
