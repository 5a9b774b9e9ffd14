"""Rewards: offline, on a tiny random open_clip model and the real LAION head when present."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import one_line, smooth_images
from PIL import Image

from rebel_diffusion.errors import UsageError
from rebel_diffusion.rewards import (
    PREFERENCES,
    REWARDS,
    BradleyTerryPreference,
    CallableReward,
    HttpReward,
    Preference,
    Reward,
    RewardContext,
    load_preference,
    load_reward,
)
from rebel_diffusion.rewards.aesthetic import head_from_state, read_head
from rebel_diffusion.rewards.clip_score import clip_preprocess, load_clip_backbone

TINY_CLIP = "rebel-test-tiny-clip"  # registered with open_clip by the fixture below
# A ViT with the LAION head's input width (768) and almost nothing else: builds in well under a second.
TINY_CLIP_CONFIG = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
HEAD_NAME = "sac+logos+ava1-l14-linearMSE.pth"


def laion_head_path() -> Path | None:
    env = os.environ.get("REBEL_AESTHETIC_HEAD")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "weights" / HEAD_NAME
    return path if path.is_file() else None


needs_head = pytest.mark.skipif(
    laion_head_path() is None,
    reason=f"the LAION head {HEAD_NAME} is not in ../shared/weights/ and REBEL_AESTHETIC_HEAD is unset",
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    import open_clip

    path = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(path)
    return TINY_CLIP


@pytest.fixture(scope="module")
def tiny_images() -> torch.Tensor:
    """Two 32x32 images from the built-in tiny pipeline.  # (2, 3, 32, 32) in [0, 1]"""
    from rebel_diffusion.models import load_pipeline

    pipe = load_pipeline("tiny")
    gen = torch.Generator().manual_seed(0)
    out = pipe(["a cat"] * 2, num_inference_steps=2, height=32, width=32, output_type="pt", generator=gen)
    return out.images


@pytest.fixture
def plugins_importable(monkeypatch):
    # pytest's rootdir-relative import puts tests/ on sys.path already; this keeps the tests
    # independent of that (e.g. if tests/ ever becomes a package).
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


# ----------------------------------------------------------------------------------------------
# Table and interface


def test_table_names_and_unknown_name():
    assert {"aesthetic", "clip", "jpeg-compressibility", "jpeg-incompressibility"} <= set(REWARDS)
    assert "bradley-terry" in PREFERENCES
    with pytest.raises(UsageError) as e:
        load_reward("aesthetics")
    msg = one_line(e)
    assert all(name in msg for name in REWARDS) and "module.path:attribute" in msg and "http://" in msg
    with pytest.raises(UsageError) as e:
        load_reward("jpeg-compressibility", clip_model="ViT-L-14")
    assert "takes no option 'clip_model' (its options: none)" in one_line(e)
    with pytest.raises(UsageError) as e:
        load_reward("clip", clip_modle="ViT-L-14")
    assert "no reward option 'clip_modle'" in one_line(e) and "clip_model" in str(e.value)
    # None means "default": a trainer may pass its whole config.
    assert load_reward("jpeg-compressibility", clip_model=None, aesthetic_head=None).name == "jpeg-compressibility"


def test_builtins_are_built_from_the_context():
    ctx = RewardContext(device="cpu", dtype="bf16", clip_model="ViT-B-32", clip_pretrained="random")
    assert ctx.device == torch.device("cpu") and ctx.dtype == torch.bfloat16
    clip = load_reward("clip", ctx)
    assert isinstance(clip, REWARDS["clip"]) and (clip.clip_model, clip.clip_pretrained) == (
        "ViT-B-32",
        "random",
    )
    assert clip.device == torch.device("cpu") and clip.dtype == torch.bfloat16
    # Options replace the context's fields; unset ones are the reward's defaults.
    aesthetic = load_reward("aesthetic", ctx, aesthetic_head="random", dtype=None)
    assert aesthetic.dtype == torch.float32 and aesthetic.aesthetic_head == "random"
    assert aesthetic.head_repo == "camenduru/improved-aesthetic-predictor"
    toy = load_reward("toy-alignment", device="cpu", include_background=True)
    assert isinstance(toy, REWARDS["toy-alignment"]) and toy.include_background
    with pytest.raises(UsageError) as e:
        load_reward("jpeg-compressibility", device="nonsense")
    assert "nonsense" in one_line(e)
    with pytest.raises(UsageError, match="dtype 'fp8'"):
        load_reward("jpeg-compressibility", dtype="fp8")


def test_images_are_clamped_and_nan_rejected():
    reward = load_reward("jpeg-incompressibility", device="cpu")
    x = smooth_images()
    wild = x * 1.6 - 0.3  # outside [0, 1]: clamped, as saving the image would
    assert torch.equal(reward(wild, ["p"] * 3), reward(wild.clamp(0, 1), ["p"] * 3))
    x[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"images \[1\] contain NaN"):
        reward(x, ["p"] * 3)
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        reward(smooth_images(), ["p"] * 2)
    with pytest.raises(ValueError, match="shape"):
        reward(torch.rand(3, 64, 64), ["p"] * 3)


# ----------------------------------------------------------------------------------------------
# JPEG


def test_jpeg_sizes_equal_independent_pil_encoding():
    x = smooth_images(b=3, h=48, w=40)
    prompts = ["a", "b", "c"]
    inc = load_reward("jpeg-incompressibility")(x, prompts)
    comp = load_reward("jpeg-compressibility")(x, prompts)

    arrays = np.clip(np.round(x.numpy() * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    expected = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=95)
        expected.append(len(buf.getvalue()) / 1000)
    expected = torch.tensor(expected, dtype=torch.float32)

    assert inc.dtype == torch.float32 and inc.shape == (3,)
    assert torch.equal(inc, expected)
    assert torch.equal(comp, -expected)


# ----------------------------------------------------------------------------------------------
# Aesthetic


@needs_head
def test_laion_head_equals_plain_affine_maps():
    state = torch.load(laion_head_path(), map_location="cpu", weights_only=True)
    head = head_from_state(read_head(laion_head_path()), 768).eval()
    emb = F.normalize(torch.randn(6, 768, generator=torch.Generator().manual_seed(0)), dim=-1)

    x = emb.double()
    for i in (0, 2, 4, 6, 7):  # the five Linear layers; the Dropouts in between are identity
        x = x @ state[f"layers.{i}.weight"].double().T + state[f"layers.{i}.bias"].double()
    expected = x.squeeze(-1).float()

    torch.testing.assert_close(head(emb), expected, rtol=0, atol=1e-5)


def test_preprocessing_matches_open_clip_pil_transform():
    from open_clip import OPENAI_DATASET_MEAN as MEAN
    from open_clip import OPENAI_DATASET_STD as STD
    from open_clip.transform import image_transform

    # down, up, non-square, and SDXL's 1024 px to CLIP's 224
    for h, w, size in [(96, 96, 64), (32, 32, 64), (48, 80, 64), (1024, 1024, 224)]:
        x = (smooth_images(b=2, h=h, w=w) * 255).round() / 255  # exactly representable in uint8
        ours = clip_preprocess(x, size, MEAN, STD)
        pil = image_transform(size, is_train=False, mean=MEAN, std=STD)
        ref = torch.stack([pil(Image.fromarray((xi.permute(1, 2, 0) * 255).round().byte().numpy())) for xi in x])
        assert ours.shape == ref.shape == (2, 3, size, size)
        # In grey levels. PIL rounds and clamps to uint8 after each of its two 1-D passes, so single
        # pixels next to clipped grain differ by a few levels; on average they agree within half a level.
        diff = (ours - ref).abs() * torch.tensor(STD).view(3, 1, 1) * 255
        assert diff.mean() < 0.5 and diff.max() < 8


def test_aesthetic_end_to_end_on_tiny_pipeline_images(tiny_clip, tiny_images):
    head = laion_head_path() or "random"
    reward = load_reward("aesthetic", clip_model=tiny_clip, clip_pretrained="random", aesthetic_head=head)
    assert reward.name == "aesthetic"
    assert tiny_images.shape == (2, 3, 32, 32)

    scores = reward(tiny_images, ["a cat", "a cat"])
    assert scores.shape == (2,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()

    # Same figures recomputed by hand: preprocess, encode, L2-normalise, head.
    model = reward.backbone.model
    x = clip_preprocess(tiny_images, 64, model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"])
    with torch.no_grad():
        expected = reward.head(F.normalize(model.encode_image(x), dim=-1))
    torch.testing.assert_close(scores, expected)

    # Loaded once: a second reward with the same backbone settings shares the model.
    clip = load_reward("clip", clip_model=tiny_clip, clip_pretrained="random")
    clip.load()
    assert clip.backbone is reward.backbone


def test_aesthetic_bf16_path_runs(tiny_clip, tiny_images):
    fp32 = load_reward("aesthetic", clip_model=tiny_clip, clip_pretrained="random", aesthetic_head="random")
    bf16 = load_reward(
        "aesthetic",
        clip_model=tiny_clip,
        clip_pretrained="random",
        aesthetic_head="random",
        dtype=torch.bfloat16,
    )
    a, b = fp32(tiny_images, ["x", "y"]), bf16(tiny_images, ["x", "y"])
    assert b.dtype == torch.float32
    assert next(bf16.backbone.model.parameters()).dtype == torch.bfloat16
    # Both backbones are random but seeded differently per build: only check the bf16 path is sane.
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    clip = load_reward("clip", clip_model=tiny_clip, clip_pretrained="random", dtype="bf16")
    scores = clip(tiny_images, ["a cat", "a dog"])  # the text tower in bf16 too
    assert scores.dtype == torch.float32 and ((scores >= -1) & (scores <= 1)).all()


# ----------------------------------------------------------------------------------------------
# CLIP


def test_clip_score_is_cosine_of_open_clip_embeddings(tiny_clip, tiny_images):
    reward = load_reward("clip", clip_model=tiny_clip, clip_pretrained="random")
    prompts = ["a cat", "a dog"]
    scores = reward(tiny_images, prompts)
    assert scores.shape == (2,) and scores.dtype == torch.float32

    bb = reward.backbone
    with torch.no_grad():
        x = clip_preprocess(tiny_images, 64, bb.preprocess_cfg["mean"], bb.preprocess_cfg["std"])
        img = F.normalize(bb.model.encode_image(x), dim=-1)
        txt = F.normalize(bb.model.encode_text(bb.tokenizer(prompts)), dim=-1)
    torch.testing.assert_close(scores, (img * txt).sum(-1))
    # Repeated prompts are encoded once and give the same figures.
    torch.testing.assert_close(reward(tiny_images[[0, 0]], ["a cat", "a cat"]), scores[[0, 0]])


def test_clip_pretrained_accepts_a_local_file(tiny_clip, tiny_images, tmp_path):
    random = load_clip_backbone(tiny_clip, "random")
    path = tmp_path / "tiny_clip.pt"
    torch.save(random.model.state_dict(), path)
    from_file = load_reward("clip", clip_model=tiny_clip, clip_pretrained=str(path))
    reference = load_reward("clip", clip_model=tiny_clip, clip_pretrained="random")
    torch.testing.assert_close(from_file(tiny_images, ["a", "b"]), reference(tiny_images, ["a", "b"]))


# ----------------------------------------------------------------------------------------------
# Weights offline


def test_missing_head_gives_one_line_usage_error(hub_offline, tiny_clip, tmp_path):
    images = smooth_images(b=1)
    reward = load_reward("aesthetic", aesthetic_head_repo="nobody/no-such-repo")
    with pytest.raises(UsageError) as e:
        reward(images, ["x"])  # the head fails before the (absent) ViT-L/14 weights are touched
    msg = one_line(e)
    assert "--aesthetic-head PATH" in msg and "nobody/no-such-repo" in msg

    with pytest.raises(UsageError) as e:
        load_reward("aesthetic", aesthetic_head=str(tmp_path / "missing.pth")).load()
    assert "--aesthetic-head" in one_line(e) and "no such file" in str(e.value)

    bad = tmp_path / "bad.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(UsageError, match="not a LAION aesthetic head"):
        load_reward("aesthetic", aesthetic_head=str(bad)).load()


def test_hub_client_failure_is_wrapped(monkeypatch, tmp_path):
    import huggingface_hub

    def unreachable(**kwargs):
        raise OSError("deep inside the hub client\nwith a long story")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(UsageError) as e:
        load_reward("aesthetic").load()
    msg = one_line(e)
    assert "camenduru/improved-aesthetic-predictor" in msg and "--aesthetic-head PATH" in msg


def test_open_clip_weights_offline_give_one_line_usage_error(hub_offline, tmp_path):
    # A tag is downloaded before the model is built, so this fails fast and builds nothing.
    with pytest.raises(UsageError) as e:
        load_reward("clip", clip_model="ViT-B-32", clip_pretrained="openai").load()
    msg = one_line(e)
    assert "--clip-pretrained PATH" in msg and "timm/vit_base_patch32_clip_224.openai" in msg
    with pytest.raises(UsageError, match="not an open_clip model"):
        load_reward("clip", clip_model="ViT-Nope").load()
    with pytest.raises(UsageError, match="neither a pretrained tag"):
        load_reward("clip", clip_model="ViT-B-32", clip_pretrained=str(tmp_path / "nope.pt")).load()


# ----------------------------------------------------------------------------------------------
# Preferences


def test_bradley_terry_is_antisymmetric_and_half_on_equal_images():
    pref = load_preference("bradley-terry", reward="jpeg-incompressibility", temperature=2.0)
    assert isinstance(pref, BradleyTerryPreference) and pref.temperature == 2.0
    a, b = smooth_images(seed=1), smooth_images(seed=2)
    b[0] = torch.rand(3, 64, 64)  # a large size gap somewhere
    prompts = ["p", "q", "r"]
    p_ab, p_ba = pref(a, b, prompts), pref(b, a, prompts)
    assert p_ab.shape == (3,) and ((p_ab >= 0) & (p_ab <= 1)).all()
    torch.testing.assert_close(p_ab, 1 - p_ba, rtol=0, atol=1e-6)
    assert torch.equal(pref(a, a, prompts), torch.full((3,), 0.5))
    # Matches the definition.
    r = load_reward("jpeg-incompressibility")
    torch.testing.assert_close(p_ab, torch.sigmoid((r(a, prompts) - r(b, prompts)) / 2.0))


def test_load_preference_errors_and_plugins(plugins_importable):
    with pytest.raises(UsageError, match="needs a pointwise reward"):
        load_preference("bradley-terry")
    with pytest.raises(UsageError, match="bradley-terry"):
        load_preference("elo")
    with pytest.raises(UsageError, match="temperature must be > 0"):
        load_preference("bradley-terry", reward="jpeg-compressibility", temperature=0)
    a, b = smooth_images(seed=1), smooth_images(seed=2)
    pref = load_preference("plugin_reward:brighter", device="cpu")
    torch.testing.assert_close(pref(a, b, ["p"] * 3), 1 - pref(b, a, ["p"] * 3))
    with pytest.raises(UsageError) as e:
        load_preference("plugin_reward:out_of_range")(a, b, ["p"] * 3)
    assert "outside [0, 1]" in one_line(e)


def test_preference_plugins_follow_the_contract(plugins_importable):
    a, b = smooth_images(seed=1), smooth_images(seed=2)
    prompts = ["p"] * 3
    r = load_reward("plugin_reward:brightness")
    gap = r(a, prompts) - r(b, prompts)

    cls = load_preference("plugin_reward:RewardGap", reward="plugin_reward:brightness", temperature=0.5)
    assert isinstance(cls, Preference) and cls.name == "reward-gap" and cls.context.temperature == 0.5
    torch.testing.assert_close(cls(a, b, prompts), torch.sigmoid(gap / 0.5))
    factory = load_preference("plugin_reward:sharp_gap", reward=r)
    torch.testing.assert_close(factory(a, b, prompts), torch.sigmoid(gap / 0.01))
    fn = load_preference("plugin_reward:brighter")
    assert fn.name == "brighter"

    for spec, expected in [
        ("plugin_reward:undecorated_pair", "@preference_function"),
        ("plugin_reward:brightness", "it is a reward, not a preference"),
        ("plugin_reward:Darkness", "it is a reward, not a preference"),
        ("plugin_reward:NotAReward", "not a rebel_diffusion.rewards.Preference subclass"),
    ]:
        with pytest.raises(UsageError) as e:
            load_preference(spec, reward=r)
        assert expected in one_line(e), spec
    with pytest.raises(UsageError) as e:
        load_preference("plugin_reward:RewardGap", reward=r, clip_model="ViT-L-14")
    assert "only applies to a reward loaded by name" in one_line(e)


# ----------------------------------------------------------------------------------------------
# Plug-ins: the contract of rebel_diffusion.rewards


def test_plugin_kinds_the_contract_accepts(plugins_importable):
    x = smooth_images()
    prompts = ["p"] * 3
    mean = x.mean(dim=(1, 2, 3))

    # 1. A function marked with @reward_function (still callable as itself).
    fn = load_reward("plugin_reward:brightness", device="cpu", dtype=torch.float32)
    assert isinstance(fn, CallableReward) and fn.name == "brightness"
    torch.testing.assert_close(fn(x, prompts), mean)
    import plugin_reward

    torch.testing.assert_close(plugin_reward.brightness(x, prompts), mean)
    listed = load_reward("plugin_reward:as_list")
    assert listed.name == "listed-brightness"
    out = listed(x, prompts)
    assert out.dtype == torch.float32 and out.shape == (3,)

    # 2. A Reward subclass, built as cls(ctx) with every option in the context.
    cls = load_reward("plugin_reward:ScaledBrightness", device="cpu", dtype="bf16", clip_model="ViT-B-32")
    assert cls.name == "scaled-brightness" and cls.device == torch.device("cpu") and cls.dtype == torch.bfloat16
    assert cls.context == RewardContext(device="cpu", dtype=torch.bfloat16, clip_model="ViT-B-32")
    torch.testing.assert_close(cls(x, prompts), 2 * mean)
    assert set(cls.details(x, prompts)) == {"red"}
    no_init = load_reward("plugin_reward:Darkness", device="cpu")
    assert no_init.device == torch.device("cpu")
    torch.testing.assert_close(no_init(x, prompts), 1 - mean)

    # 3. A Reward instance, used as it is.
    ready = load_reward("plugin_reward:READY", device="cpu")
    assert ready is plugin_reward.READY
    torch.testing.assert_close(ready(x, prompts), 3 * mean)

    # 4. A factory f(ctx) -> Reward.
    factory = load_reward("plugin_reward:half_brightness", dtype="fp16")
    assert isinstance(factory, Reward) and factory.dtype == torch.float16
    torch.testing.assert_close(factory(x, prompts), 0.5 * mean)

    pref = load_preference("bradley-terry", reward=fn)
    assert torch.equal(pref(x, x, prompts), torch.full((3,), 0.5))


def test_a_factory_may_return_a_reward_server_client(plugins_importable):
    # A factory is how a plug-in sets options of its own on HttpReward (nothing is sent until a call).
    reward = load_reward("plugin_reward:remote", device="cpu")
    assert isinstance(reward, HttpReward) and reward.timeout == 5 and reward.device == torch.device("cpu")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("plugin_reward:missing", "has no attribute 'missing'"),
        ("plugin_reward:NOT_CALLABLE", "it is of type int; name a Reward subclass"),
        ("plugin_reward:NotAReward", "the class NotAReward is not a rebel_diffusion.rewards.Reward subclass"),
        ("plugin_reward:undecorated", "needs @reward_function"),
        ("plugin_reward:TwoArguments", "TwoArguments(RewardContext) failed"),
        ("plugin_reward:returns_number", "the factory returned a float, not a Reward"),
        ("plugin_reward:brighter", "it is a preference, not a reward"),
        ("plugin_reward:RewardGap", "it is a preference, not a reward"),
        ("plugin_reward", "unknown reward"),
        ("ftp://host/score", "starts with http:// or https://"),
        ("plugin_reward:", "module.path:attribute"),
    ],
)
def test_bad_plugins_give_one_line_usage_error(plugins_importable, spec, expected):
    with pytest.raises(UsageError) as e:
        load_reward(spec)
    assert expected in one_line(e)


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("plugin_reward:wrong_shape", "returned shape (), expected (3,): return one score per image"),
        ("plugin_reward:not_numbers", "returned list that is not numbers"),
        ("plugin_reward:complex_scores", "returned dtype torch.complex64"),
    ],
)
def test_plugin_output_errors_are_one_line(plugins_importable, spec, expected):
    with pytest.raises(UsageError) as e:
        load_reward(spec)(smooth_images(), ["p"] * 3)
    assert expected in one_line(e) and spec.rpartition(":")[2] in str(e.value)


def test_nonfinite_plugin_scores_pass_through(plugins_importable):
    # The trainer drops NaN/inf rewards and counts them; the reward does not refuse them.
    assert torch.isnan(load_reward("plugin_reward:nan_reward")(smooth_images(), ["p"] * 3)).all()


# ----------------------------------------------------------------------------------------------
# several rewards at once


def test_parse_reward_weights():
    from rebel_diffusion.rewards import parse_reward_weights

    assert parse_reward_weights("aesthetic") is None
    assert parse_reward_weights("http://127.0.0.1:8000/score?model=a") is None  # a query is not a weight
    assert parse_reward_weights("aesthetic=1.0,clip=0.5") == {"aesthetic": 1.0, "clip": 0.5}
    assert parse_reward_weights("jpeg-compressibility,toy-alignment") == {
        "jpeg-compressibility": 1.0,
        "toy-alignment": 1.0,
    }
    assert parse_reward_weights({"aesthetic": 2, "clip": -1}) == {"aesthetic": 2.0, "clip": -1.0}
    for bad, match in (
        ("a=1,a=2", "named twice"),
        ("a=1,,b=2", "empty"),
        ("a=0,b=1", "non-zero"),
        ("a=nan,b=1", "finite"),
    ):
        with pytest.raises(UsageError, match=match):
            parse_reward_weights(bad)
    # one known reward with a weight that is not a number: said so, not "unknown reward"
    with pytest.raises(UsageError, match="the weight of 'jpeg-compressibility' must be a number, got 'abc'"):
        load_reward("jpeg-compressibility=abc")


def test_combined_reward_is_the_weighted_sum_of_its_components():
    from rebel_diffusion.rewards import CombinedReward, load_reward

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle on a blue background"] * 3
    combined = load_reward("jpeg-compressibility=2,jpeg-incompressibility=0.5")
    assert isinstance(combined, CombinedReward)
    small = load_reward("jpeg-compressibility")(images, prompts)
    parts = combined.components(images, prompts)
    assert torch.equal(parts["jpeg-compressibility"], small)
    assert torch.allclose(combined(images, prompts), 2 * small + 0.5 * (-small))  # incompressibility = -size
    with pytest.raises(UsageError, match="takes option 'clip_model'"):
        load_reward("jpeg-compressibility=1,jpeg-incompressibility=1", clip_model="ViT-B-32")


def test_every_reward_says_its_units_and_direction():
    for name, cls in REWARDS.items():
        assert cls.units, f"{name} has no units"
    jpeg = load_reward("jpeg-compressibility")
    assert jpeg.label() == "jpeg-compressibility (minus kB of JPEG at quality 95: smaller files; higher is better)"
    combined = load_reward("jpeg-compressibility=2,toy-alignment=1")
    assert combined.units == (
        "weighted sum of jpeg-compressibility (minus kB of JPEG at quality 95: smaller files), "
        f"toy-alignment ({REWARDS['toy-alignment'].units})"
    )
    # A plug-in without units still states the direction.
    assert CallableReward(lambda images, prompts: images.mean(dim=(1, 2, 3)), "brightness").label() == (
        "brightness (higher is better)"
    )
