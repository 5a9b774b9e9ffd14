"""The toy testbed: synthetic shapes generator, the shipped ``toy`` model, the ``toy-alignment`` reward."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import rebel_diffusion.models as models
from rebel_diffusion.errors import UsageError
from rebel_diffusion.rewards.toy_alignment import ToyAlignmentReward, load_classifier
from rebel_diffusion.toy import data

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = models.TOY_MODEL_DIR


# ----------------------------------------------------------------------------------------------
# Generator


def test_generator_is_deterministic_for_a_seed():
    a, la, ca = data.make_batch(16, seed=3)
    b, lb, cb = data.make_batch(16, seed=3)
    c, _, _ = data.make_batch(16, seed=4)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and ca == cb and all(torch.equal(la[k], lb[k]) for k in la)
    assert not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


def test_captions_match_the_drawn_pixels():
    images, labels, captions = data.make_batch(64, seed=11)
    pal = data.palette()
    for i, cap in enumerate(captions):
        s, c, b = (int(labels[k][i]) for k in ("shape", "colour", "background"))
        assert cap == data.caption(s, c, b)
        assert f"{data.COLOUR_NAMES[c]} {data.SHAPES[s]} on" in cap and f"{data.COLOUR_NAMES[b]} background" in cap
        assert data.parse_caption(cap) == (s, c, b)
        x, y = int(labels["cx"][i]), int(labels["cy"][i])
        assert torch.allclose(images[i, :, y, x], pal[c], atol=1e-6), cap  # the shape's centre
        for cy, cx in ((0, 0), (0, -1), (-1, 0), (-1, -1)):  # every corner is background
            assert torch.allclose(images[i, :, cy, cx], pal[b], atol=1e-6), cap


def test_every_shape_is_drawn_differently():
    attrs = data.sample_attributes(4, seed=0)
    attrs["shape"] = torch.arange(4)
    for k in ("cx", "cy"):
        attrs[k] = torch.full((4,), 16.0)
    attrs["radius"] = torch.full((4,), 10.0)
    masks = (data.render(attrs) - data.palette()[attrs["background"]].view(-1, 3, 1, 1)).abs().sum(1) > 0.5
    for i in range(4):
        for j in range(i + 1, 4):
            assert (masks[i] ^ masks[j]).sum() > 20, (data.SHAPES[i], data.SHAPES[j])


def test_prompt_files_hold_the_train_and_heldout_splits():
    train = (ROOT / "prompts" / "toy_shapes.txt").read_text().splitlines()
    held = (ROOT / "prompts" / "toy_heldout.txt").read_text().splitlines()
    assert train == data.prompt_lines("train") and held == data.prompt_lines("heldout")
    assert len(train) == 192 and len(held) == 32 and not set(train) & set(held)
    # Held-out captions are new combinations of attributes all seen in training.
    seen = {w for line in train for w in line.split()}
    assert all(set(line.split()) <= seen for line in held)


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a red circle on a blue background", ("circle", "red", "blue")),
        ("A RED circle, on blue background.", ("circle", "red", "blue")),
        ("a blue background with a red circle", ("circle", "red", "blue")),
        ("an orange cross on an orange background", ("cross", "orange", "orange")),
        ("violet triangles", ("triangle", "purple", None)),
        ("a square", ("square", None, None)),
    ],
)
def test_parse_caption(prompt, expected):
    s, c, b = data.parse_caption(prompt)
    got = (
        data.SHAPES[s] if s is not None else None,
        data.COLOUR_NAMES[c] if c is not None else None,
        data.COLOUR_NAMES[b] if b is not None else None,
    )
    assert got == expected


# ----------------------------------------------------------------------------------------------
# The shipped model


def test_toy_loads_offline_and_samples_32px(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = models.load_pipeline("toy")
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.steps_offset == 1
    out = pipe(
        ["a red circle on a blue background"],
        num_inference_steps=4,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_toy_files_are_small_and_packaged():
    files = [p for p in SHIPPED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 15e6
    # Every shipped file matches a package-data glob of pyproject.toml.
    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "rebel_diffusion.toy"
    ]
    toy = SHIPPED.parent
    for p in files:
        assert any(p.relative_to(toy).match(g) for g in globs), p


def test_training_script_builds_the_shipped_architecture():
    spec = importlib.util.spec_from_file_location("train_toy", ROOT / "scripts" / "train_toy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    shipped = json.loads((SHIPPED / "unet" / "config.json").read_text())
    built = mod.build_unet().config
    for key in ("block_out_channels", "down_block_types", "cross_attention_dim", "sample_size"):
        assert json.loads(json.dumps(built[key])) == shipped[key], key


def _damaged_copy(tmp_path, damage) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(SHIPPED, folder)
    damage(folder)
    return folder


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: shutil.rmtree(f),
        lambda f: (f / "model_index.json").unlink(),
        lambda f: (f / "model_index.json").write_text("{not json"),
        lambda f: _truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
        lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
        lambda f: _truncate(f / "text_encoder" / "model.safetensors"),
        lambda f: shutil.rmtree(f / "tokenizer"),
        lambda f: (f / "tokenizer" / "merges.txt").write_text("#version: 0.2\n"),
        lambda f: (f / "scheduler" / "scheduler_config.json").unlink(),
    ],
    ids=[
        "no-folder",
        "no-index",
        "bad-index",
        "truncated-unet",
        "no-vae",
        "truncated-text-encoder",
        "no-tokenizer",
        "empty-merges",
        "no-scheduler",
    ],
)
def test_damaged_toy_gives_one_line_usage_error(tmp_path, monkeypatch, damage):
    monkeypatch.setattr(models.loading, "TOY_MODEL_DIR", _damaged_copy(tmp_path, damage))
    with pytest.raises(UsageError) as e:
        models.load_pipeline("toy")
    msg = str(e.value)
    assert "\n" not in msg and "toy" in msg and "train_toy.py" in msg


# ----------------------------------------------------------------------------------------------
# toy-alignment reward


@pytest.fixture(scope="module")
def reward():
    return ToyAlignmentReward()


def _mismatched(labels) -> list[str]:
    """Captions naming another colour (never the background's) and another shape."""
    n_col = len(data.COLOUR_NAMES)
    caps = []
    for s, c, b in zip(labels["shape"].tolist(), labels["colour"].tolist(), labels["background"].tolist()):
        wrong = next(x for x in ((c + k) % n_col for k in range(1, n_col)) if x != b)
        caps.append(data.caption((s + 1) % len(data.SHAPES), wrong, b))
    return caps


def test_reward_scores_prompted_attributes_high_and_others_low(reward):
    assert reward.name == "toy-alignment"
    images, labels, captions = data.make_batch(64, seed=123)
    r = reward(images, captions)
    assert r.shape == (64,) and r.dtype == torch.float32 and float(r.min()) >= 0 and float(r.max()) <= 1
    assert float(r.mean()) > 0.8
    assert float(reward(images, _mismatched(labels)).mean()) < 0.2
    # Any image size: resized to the classifier's 32x32.
    big = torch.nn.functional.interpolate(images, size=(64, 64), mode="nearest")
    assert float(reward(big, captions).mean()) > 0.8


def test_reward_details_and_partial_prompts(reward):
    images, labels, captions = data.make_batch(8, seed=5)
    d = reward.details(images, captions)
    assert {"colour", "shape", "background", "reward"} <= set(d)
    assert torch.allclose(d["reward"], d["colour"] * d["shape"])
    assert (d["match_shape"] == 1).all() and (d["match_colour"] == 1).all()
    only_shape = [data.SHAPES[s] for s in labels["shape"].tolist()]
    d2 = reward.details(images, only_shape)
    assert torch.isnan(d2["colour"]).all() and torch.allclose(d2["reward"], d2["shape"])


def test_reward_temperature_divides_the_logits_and_keeps_the_readings(reward):
    images, labels, captions = data.make_batch(8, seed=5)
    with torch.no_grad():
        logits = load_classifier()(images)
    tempered = ToyAlignmentReward(temperature=3.0).details(images, captions)
    for head in ("shape", "colour"):  # independent reference: softmax(logits / 3) at the drawn label
        expected = (logits[head] / 3.0).softmax(-1)[torch.arange(8), labels[head]]
        assert torch.allclose(tempered[head], expected, atol=1e-5)
    plain = reward.details(images, captions)
    assert (tempered["reward"] < plain["reward"]).all()  # confident readings are softened
    assert torch.equal(tempered["match_colour"], plain["match_colour"])  # the argmax does not move
    with pytest.raises(ValueError, match="temperature"):
        ToyAlignmentReward(temperature=0.0)


@pytest.mark.parametrize("prompt", ["a photo of a dog", "", "a grey blob"])
def test_reward_rejects_prompts_without_colour_or_shape(reward, prompt):
    images, _, _ = data.make_batch(1, seed=0)
    with pytest.raises(UsageError, match="names no toy colour"):
        reward(images, [prompt])


def test_reward_missing_or_damaged_classifier(tmp_path, monkeypatch):
    images, _, captions = data.make_batch(2, seed=0)
    with pytest.raises(UsageError, match="missing"):
        ToyAlignmentReward(classifier_path=tmp_path / "nothing")(images, captions)
    folder = tmp_path / "classifier"
    shutil.copytree(SHIPPED / "classifier", folder)
    _truncate(folder / "model.safetensors")
    with pytest.raises(UsageError, match="damaged") as e:
        load_classifier(folder)
    assert "\n" not in str(e.value)
    # The default path follows models.loading.TOY_MODEL_DIR (a moved or damaged install).
    monkeypatch.setattr(models.loading, "TOY_MODEL_DIR", tmp_path)
    with pytest.raises(UsageError, match="damaged"):
        ToyAlignmentReward()(images, captions)


def test_reward_is_in_the_table():
    from rebel_diffusion.rewards import REWARDS, load_reward

    assert REWARDS["toy-alignment"] is ToyAlignmentReward
    reward = load_reward("toy-alignment", device="cpu", dtype=torch.float32, classifier_path=None)
    images, _, captions = data.make_batch(4, seed=9)
    assert float(reward(images, captions).mean()) > 0.8
