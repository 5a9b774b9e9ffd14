"""``imagereward``: the authors' checkpoint layout through transformers' BLIP, offline.

The checkpoints here are random, small, and written in the authors' key layout from the names in their
package's source (``ImageReward/models/BLIP/vit.py``: timm's ViT; ``med.py``: BERT with
cross-attention; ``ImageReward.py``: ``mlp.layers``), not from the key map under test. The expected
scores come from a plain-torch forward written here from the same source files, on the authors' names.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import one_line, smooth_images
from PIL import Image

from rebel_diffusion.errors import UsageError
from rebel_diffusion.rewards.imagereward import (
    DEFAULT_FILE,
    DEFAULT_REPO,
    DEFAULT_TOKENIZER,
    ImageRewardConfig,
    ImageRewardReward,
    blip_configs,
    checkpoint_to_blip,
    imagereward_preprocess,
    tokenize_prompts,
)

WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "the", "on", "grass", "sitting", "##s"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
VOCAB_SIZE = len(VOCAB) + 2  # + [DEC] and [ENC], as BLIP's init_tokenizer
# ViT: 224 px in 32 px patches (7 x 7 + [CLS] = 50 tokens); BERT: 2 layers, 2 heads.
SMALL = ImageRewardConfig(
    image_size=224,
    patch_size=32,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    vision_intermediate=64,
    text_width=24,
    text_layers=2,
    text_heads=2,
    text_intermediate=48,
    vocab_size=VOCAB_SIZE,
    max_positions=40,
)
PROMPTS = ["a red cat sitting on the grass", "a dog", "A PHOTO OF A BLUE DOG", "a cat"]  # 4 lengths of padding


# ----------------------------------------------------------------------------------------------
# The authors' layout, written from their source


def authors_shapes(cfg: ImageRewardConfig) -> dict[str, tuple]:
    """Every key of the authors' ``ImageReward`` state dict, with its shape."""
    d, t, p = cfg.vision_width, cfg.text_width, cfg.patch_size
    shapes = {}
    # vit.py VisionTransformer (qkv_bias=True; PatchEmbed.proj a Conv2d; no classifier head)
    v = "blip.visual_encoder."
    shapes[v + "cls_token"] = (1, 1, d)
    shapes[v + "pos_embed"] = (1, 1 + (cfg.image_size // p) ** 2, d)
    shapes[v + "patch_embed.proj.weight"] = (d, 3, p, p)
    shapes[v + "patch_embed.proj.bias"] = (d,)
    for i in range(cfg.vision_layers):
        b = f"{v}blocks.{i}."
        for name, shape in [
            ("norm1", (d,)),
            ("attn.qkv", (3 * d, d)),
            ("attn.proj", (d, d)),
            ("norm2", (d,)),
            ("mlp.fc1", (cfg.vision_intermediate, d)),
            ("mlp.fc2", (d, cfg.vision_intermediate)),
        ]:
            shapes[f"{b}{name}.weight"] = shape
            shapes[f"{b}{name}.bias"] = (shape[0],)
    shapes[v + "norm.weight"] = shapes[v + "norm.bias"] = (d,)
    # med.py BertModel(add_pooling_layer=False), add_cross_attention, encoder_width = vision width
    x = "blip.text_encoder."
    shapes[x + "embeddings.word_embeddings.weight"] = (cfg.vocab_size, t)
    shapes[x + "embeddings.position_embeddings.weight"] = (cfg.max_positions, t)
    shapes[x + "embeddings.LayerNorm.weight"] = shapes[x + "embeddings.LayerNorm.bias"] = (t,)
    shapes[x + "embeddings.position_ids"] = (1, cfg.max_positions)  # a persistent buffer in med.py
    for i in range(cfg.text_layers):
        b = f"{x}encoder.layer.{i}."
        layers = []
        for att, kv_width in (("attention", t), ("crossattention", d)):
            layers += [
                (f"{att}.self.query", (t, t)),
                (f"{att}.self.key", (t, kv_width)),
                (f"{att}.self.value", (t, kv_width)),
                (f"{att}.output.dense", (t, t)),
                (f"{att}.output.LayerNorm", (t,)),
            ]
        layers += [
            ("intermediate.dense", (cfg.text_intermediate, t)),
            ("output.dense", (t, cfg.text_intermediate)),
            ("output.LayerNorm", (t,)),
        ]
        for name, shape in layers:
            shapes[f"{b}{name}.weight"] = shape
            shapes[f"{b}{name}.bias"] = (shape[0],)
    # blip_pretrain.py: the contrastive projections (unused by the score)
    shapes["blip.vision_proj.weight"], shapes["blip.vision_proj.bias"] = (256, d), (256,)
    shapes["blip.text_proj.weight"], shapes["blip.text_proj.bias"] = (256, t), (256,)
    # ImageReward.py MLP(768): Linear Dropout Linear Dropout Linear Dropout Linear Linear
    for i, (n_out, n_in) in zip((0, 2, 4, 6, 7), [(1024, t), (128, 1024), (64, 128), (16, 64), (1, 16)]):
        shapes[f"mlp.layers.{i}.weight"], shapes[f"mlp.layers.{i}.bias"] = (n_out, n_in), (n_out,)
    return shapes


def random_checkpoint(cfg: ImageRewardConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a usable scale: norms near 1 (each one different), biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in authors_shapes(cfg).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).unsqueeze(0)
        elif "norm" in key.lower() and key.endswith(".weight"):
            state[key] = 1 + 0.3 * torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            state[key] = 0.2 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and "embed" not in key and "cls_token" not in key:
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:  # embeddings, cls_token, pos_embed
            state[key] = 0.5 * torch.randn(shape, generator=g)
    return state


def make_tokenizer_dir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return folder


def blip_tokenizer(folder: Path):
    """BLIP's init_tokenizer on a local vocabulary."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(str(folder))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def write_checkpoint(folder: Path, state: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "ImageReward.pt")
    return folder


# ----------------------------------------------------------------------------------------------
# The reference forward: vit.py, med.py and ImageReward.score, in float64, on the authors' names


def reference_scores(state, images, prompts, tokenizer, cfg: ImageRewardConfig) -> torch.Tensor:
    s = {k: v.double() for k, v in state.items() if v.is_floating_point()}

    def lin(x, name):
        return F.linear(x, s[name + ".weight"], s[name + ".bias"])

    def norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], s[name + ".weight"], s[name + ".bias"], eps=eps)

    # Image: the preprocessing is checked against torchvision's PIL pipeline below.
    x = imagereward_preprocess(images).double()  # (B, 3, 224, 224)
    b, d, nh = x.shape[0], cfg.vision_width, cfg.vision_heads
    v = "blip.visual_encoder."
    x = F.conv2d(x, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat([s[v + "cls_token"].expand(b, -1, -1), x], dim=1) + s[v + "pos_embed"]
    n = x.shape[1]
    for i in range(cfg.vision_layers):  # Block.forward
        p = f"{v}blocks.{i}."
        qkv = lin(norm(x, p + "norm1", 1e-6), p + "attn.qkv").reshape(b, n, 3, nh, d // nh).permute(2, 0, 3, 1, 4)
        q, k, val = qkv[0], qkv[1], qkv[2]
        att = ((q @ k.transpose(-2, -1)) * (d // nh) ** -0.5).softmax(dim=-1)
        x = x + lin((att @ val).transpose(1, 2).reshape(b, n, d), p + "attn.proj")
        x = x + lin(F.gelu(lin(norm(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    image_embeds = norm(x, v + "norm", 1e-6)  # (B, N, D)

    # Text: BertModel.forward in mode 'multimodal', not a decoder.
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    t, th = cfg.text_width, cfg.text_heads
    e = "blip.text_encoder."
    h = F.embedding(ids, s[e + "embeddings.word_embeddings.weight"])
    h = norm(h + s[e + "embeddings.position_embeddings.weight"][: ids.shape[1]], e + "embeddings.LayerNorm", 1e-12)
    extended = (1.0 - mask[:, None, None, :].double()) * -10000.0  # get_extended_attention_mask

    def attention(prefix, hidden, context, additive):  # BertAttention: BertSelfAttention + BertSelfOutput
        def heads(y):
            return y.view(b, -1, th, t // th).transpose(1, 2)

        q = heads(lin(hidden, prefix + "self.query"))
        k, val = heads(lin(context, prefix + "self.key")), heads(lin(context, prefix + "self.value"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(t // th)
        if additive is not None:
            scores = scores + additive
        out = (scores.softmax(dim=-1) @ val).transpose(1, 2).reshape(b, -1, t)
        return norm(lin(out, prefix + "output.dense") + hidden, prefix + "output.LayerNorm", 1e-12)

    for i in range(cfg.text_layers):  # BertLayer.forward
        p = f"{e}encoder.layer.{i}."
        h = attention(p + "attention.", h, h, extended)
        h = attention(p + "crossattention.", h, image_embeds, None)  # image_atts all ones: nothing masked
        h = norm(lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm", 1e-12)

    r = h[:, 0, :]  # txt_features: [CLS]
    for i in (0, 2, 4, 6, 7):  # the Dropouts are identity in eval
        r = lin(r, f"mlp.layers.{i}")
    return ((r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072).float()


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A random small checkpoint (folder) and a tokenizer folder."""
    root = tmp_path_factory.mktemp("imagereward")
    state = random_checkpoint(SMALL)
    return {
        "state": state,
        "checkpoint": write_checkpoint(root / "checkpoint", state),
        "tokenizer": make_tokenizer_dir(root / "tokenizer"),
    }


@pytest.fixture(scope="module")
def reward(files):
    return ImageRewardReward(checkpoint=files["checkpoint"], tokenizer=files["tokenizer"], config=SMALL).load()


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """Offline, an empty hub cache, and any socket connection recorded (and refused)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


# ----------------------------------------------------------------------------------------------
# Scores


def test_scores_equal_the_reference_forward_on_the_authors_names(files, reward):
    images = smooth_images(b=4, h=256, w=320)
    start = time.perf_counter()
    scores = reward(images, PROMPTS)
    assert time.perf_counter() - start < 5
    assert scores.shape == (4,) and scores.dtype == torch.float32
    expected = reference_scores(files["state"], images, PROMPTS, blip_tokenizer(files["tokenizer"]), SMALL)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-5)
    # Not a constant: the images and the prompts both move the score.
    assert scores.std() > 0.01
    swapped = reward(images[[1, 0]], PROMPTS[:2])
    assert (swapped - scores[:2]).abs().min() > 1e-4


@pytest.mark.parametrize(
    "key",
    [
        "blip.visual_encoder.blocks.1.norm2.weight",  # renamed: layer_norm2
        "blip.visual_encoder.norm.bias",  # renamed: post_layernorm
        "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight",  # the image enters here
        "mlp.layers.6.weight",
    ],
)
def test_each_checkpoint_weight_is_used(files, reward, tmp_path, key):
    images, prompts = smooth_images(2, 256, 256), PROMPTS[:2]
    state = dict(files["state"])
    state[key] = state[key] + 0.5 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(1))
    changed = ImageRewardReward(
        checkpoint=write_checkpoint(tmp_path, state), tokenizer=files["tokenizer"], config=SMALL
    )
    before, after = reward(images, prompts), changed(images, prompts)
    assert (before - after).abs().max() > 1e-3
    expected = reference_scores(state, images, prompts, blip_tokenizer(files["tokenizer"]), SMALL)
    torch.testing.assert_close(after, expected, rtol=0, atol=1e-5)


def test_batch_equals_images_scored_one_by_one(reward):
    a, b = smooth_images(2, 256, 256, seed=3)
    both = reward(torch.stack([a, b]), ["a cat", "a red dog"])
    one = torch.cat([reward(a[None], ["a cat"]), reward(b[None], ["a red dog"])])
    assert both.shape == (2,) and both.dtype == torch.float32
    torch.testing.assert_close(both, one, rtol=0, atol=1e-5)
    # A repeated prompt (tokenised once) gives the figures of the same prompt scored apart.
    same = reward(torch.stack([a, b]), ["a cat", "a cat"])
    torch.testing.assert_close(same[1], reward(b[None], ["a cat"])[0], rtol=0, atol=1e-5)


def test_bf16_runs_close_to_fp32(files, reward):
    bf16 = ImageRewardReward(
        dtype="bf16", checkpoint=files["checkpoint"], tokenizer=files["tokenizer"], config=SMALL
    ).load()
    assert next(bf16.vision.parameters()).dtype == torch.bfloat16
    assert next(bf16.text.parameters()).dtype == torch.bfloat16
    images = smooth_images(2, 256, 256)
    a, b = reward(images, PROMPTS[:2]), bf16(images, PROMPTS[:2])
    assert b.dtype == torch.float32
    torch.testing.assert_close(b, a, rtol=0, atol=0.15)  # bf16 has 8 bits of mantissa


def test_tokenizer_next_to_the_checkpoint_is_used(files, tmp_path, hub_offline):
    folder = write_checkpoint(tmp_path / "ckpt", files["state"])
    make_tokenizer_dir(folder)  # vocab.txt beside ImageReward.pt; no tokenizer= and no hub
    scores = ImageRewardReward(checkpoint=folder / "ImageReward.pt", config=SMALL)(
        smooth_images(1, 256, 256), ["a cat"]
    )
    assert torch.isfinite(scores).all() and hub_offline == []


# ----------------------------------------------------------------------------------------------
# Key map


def test_key_map_fills_the_published_architecture():
    """The authors' keys at the published sizes fill transformers' BLIP exactly, shape for shape."""
    from transformers import BlipTextModel, BlipVisionModel

    published = ImageRewardConfig()
    assert published.vocab_size == 30524 and published.max_positions == 512  # med_config.json
    state = {k: torch.empty(shape, device="meta") for k, shape in authors_shapes(published).items()}
    vision, text, mlp = checkpoint_to_blip(state)
    vision_cfg, text_cfg = blip_configs(published)
    assert vision_cfg.layer_norm_eps == 1e-6 and text_cfg.layer_norm_eps == 1e-12
    assert vision_cfg.hidden_act == text_cfg.hidden_act == "gelu"  # exact GELU, as nn.GELU()
    with torch.device("meta"):
        targets = [
            (vision, BlipVisionModel(vision_cfg)),
            (text, BlipTextModel(text_cfg, add_pooling_layer=False)),
        ]
    for got, model in targets:
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in got.items()} == want
    assert sorted(mlp) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert mlp["layers.0.weight"].shape == (1024, 768)
    # A few names spelled out: the ViT's timm names become BlipVisionModel's.
    assert vision["encoder.layers.23.self_attn.projection.weight"].shape == (1024, 1024)
    assert vision["post_layernorm.bias"].shape == (1024,)
    assert vision["embeddings.position_embedding"].shape == (1, 197, 1024)
    assert text["encoder.layer.11.crossattention.self.key.weight"].shape == (768, 1024)


@pytest.mark.parametrize(
    "change, key",
    [
        ("missing", "blip.visual_encoder.blocks.1.attn.proj.weight"),
        ("missing", "blip.text_encoder.encoder.layer.0.output.LayerNorm.bias"),
        ("missing", "mlp.layers.7.bias"),
        ("unexpected", "blip.visual_encoder.head.weight"),
        ("unexpected", "blip.text_encoder.pooler.dense.weight"),
        ("wrong shape", "blip.visual_encoder.pos_embed"),
    ],
)
def test_checkpoint_key_problems_are_named(files, tmp_path, change, key):
    state = dict(files["state"])
    if change == "missing":
        del state[key]
    elif change == "unexpected":
        state[key] = torch.zeros(3, 3)
    else:
        state[key] = torch.zeros(1, 10, 32)
    folder = write_checkpoint(tmp_path, state)
    reward = ImageRewardReward(checkpoint=folder, tokenizer=files["tokenizer"], config=SMALL)
    with pytest.raises(UsageError) as e:
        reward.load()
    msg = one_line(e)
    assert f"{change} {key}" in msg and "--imagereward-checkpoint" in msg
    if change == "wrong shape":
        assert "(1, 10, 32) (expected (1, 50, 32))" in msg


def test_a_checkpoint_of_other_sizes_is_refused(files):
    other = ImageRewardConfig(**{**SMALL.__dict__, "vision_layers": 3})
    reward = ImageRewardReward(checkpoint=files["checkpoint"], tokenizer=files["tokenizer"], config=other)
    with pytest.raises(UsageError, match=r"missing blip\.visual_encoder\.blocks\.2\."):
        reward.load()


# ----------------------------------------------------------------------------------------------
# Preprocessing and tokens


@pytest.mark.parametrize("h, w", [(512, 512), (384, 640), (700, 300)])
def test_preprocessing_matches_the_authors_pil_transform(h, w):
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    authors = Compose(
        [Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor(), Normalize(mean, std)]
    )
    x = (smooth_images(b=2, h=h, w=w) * 255).round() / 255  # exactly representable in uint8
    ours = imagereward_preprocess(x)
    ref = torch.stack([authors(Image.fromarray((xi.permute(1, 2, 0) * 255).round().byte().numpy())) for xi in x])
    assert ours.shape == ref.shape == (2, 3, 224, 224) and ours.dtype == torch.float32
    # In grey levels. PIL works in uint8: it rounds (and clamps) after each of its two 1-D passes, so
    # single pixels next to sharp grain differ by a few levels; on average they agree within half a level.
    diff = (ours - ref).abs() * torch.tensor(std).view(3, 1, 1) * 255
    assert diff.mean() < 0.5 and diff.max() < 8


def test_tokenisation_pads_and_truncates_to_35(files):
    tok = (
        ImageRewardReward(tokenizer=files["tokenizer"], checkpoint=files["checkpoint"], config=SMALL).load().tokenizer
    )
    assert len(tok) == VOCAB_SIZE
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(VOCAB), len(VOCAB) + 1]
    long_prompt = " ".join(["a red cat"] * 20)  # 60 words
    ids, mask = tokenize_prompts(tok, ["a cat", "A CAT", long_prompt])
    assert ids.shape == mask.shape == (3, 35)
    cls, sep, a, cat = (VOCAB.index(w) for w in ("[CLS]", "[SEP]", "a", "cat"))
    assert ids[0].tolist() == [cls, a, cat, sep] + [0] * 31  # [PAD] is 0
    assert mask[0].tolist() == [1] * 4 + [0] * 31
    assert ids[1].tolist() == ids[0].tolist()  # uncased
    assert ids[2, 0] == cls and ids[2, 34] == sep and mask[2].all()  # cut to 33 words + [CLS] + [SEP]
    assert ids[2, 1:34].tolist() == [VOCAB.index(w) for w in long_prompt.split()[:33]]


# ----------------------------------------------------------------------------------------------
# Files and errors


def test_missing_checkpoint_path_is_a_usage_error(files, tmp_path):
    missing = tmp_path / "nowhere" / "ImageReward.pt"
    with pytest.raises(UsageError) as e:
        ImageRewardReward(checkpoint=missing, config=SMALL).load()
    msg = one_line(e)
    assert str(missing) in msg and "--imagereward-checkpoint" in msg
    with pytest.raises(UsageError) as e:
        ImageRewardReward(checkpoint=tmp_path, config=SMALL).load()  # a folder without the file
    assert str(tmp_path) in one_line(e) and "ImageReward.pt" in str(e.value)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a torch state dict"):
        ImageRewardReward(checkpoint=bad, tokenizer=files["tokenizer"], config=SMALL).load()


def test_offline_hub_gives_one_line_naming_repo_and_file(hub_offline):
    with pytest.raises(UsageError) as e:
        ImageRewardReward(config=SMALL)(smooth_images(1, 256, 256), ["a cat"])
    msg = one_line(e)
    assert DEFAULT_REPO in msg and DEFAULT_FILE in msg and "--imagereward-checkpoint PATH" in msg
    assert "bert-base-uncased" in msg and f"hf download {DEFAULT_REPO} {DEFAULT_FILE}" in msg
    assert hub_offline == []  # offline mode stopped it before any connection


def test_offline_tokenizer_gives_one_line(files, hub_offline, tmp_path):
    reward = ImageRewardReward(checkpoint=files["checkpoint"], tokenizer="nobody/no-such-tokenizer", config=SMALL)
    with pytest.raises(UsageError) as e:
        reward.load()
    msg = one_line(e)
    assert "nobody/no-such-tokenizer" in msg and "bert-base-uncased" in msg and DEFAULT_TOKENIZER in msg
    assert hub_offline == []
    # transformers 5 gives an empty-vocabulary tokenizer, no error, for a folder without vocab.txt.
    empty = tmp_path / "no-vocab"
    empty.mkdir()
    reward = ImageRewardReward(checkpoint=files["checkpoint"], tokenizer=empty, config=SMALL)
    with pytest.raises(UsageError) as e:
        reward.load()
    assert str(empty) in one_line(e) and "vocab.txt" in str(e.value)


def test_hub_download_asks_for_the_published_file(monkeypatch, files):
    import huggingface_hub

    asked = []

    def fake_download(**kwargs):
        asked.append(kwargs)
        return str(files["checkpoint"] / "ImageReward.pt")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    reward = ImageRewardReward(tokenizer=files["tokenizer"], config=SMALL).load()
    assert asked == [{"repo_id": "THUDM/ImageReward", "filename": "ImageReward.pt"}]
    assert reward.name == "imagereward" and "higher is better" in reward.label()


# ----------------------------------------------------------------------------------------------
# The published weights, when present


def published_checkpoint() -> Path | None:
    env = os.environ.get("REBEL_IMAGEREWARD_CHECKPOINT")
    return Path(env) if env and Path(env).exists() else None


@pytest.mark.skipif(published_checkpoint() is None, reason="REBEL_IMAGEREWARD_CHECKPOINT is unset")
def test_published_checkpoint_loads_and_scores():
    reward = ImageRewardReward(checkpoint=published_checkpoint()).load()  # every key filled, or UsageError
    scores = reward(smooth_images(b=2, h=512, w=512), ["a photo of a cat", "a photo of a cat"])
    assert torch.isfinite(scores).all() and (scores.abs() < 5).all()
