"""PickScore, offline: a random-weight CLIP in transformers' format, loaded as a user's local copy is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from field_rewards import tiny_pickscore
from helpers import smooth_images
from PIL import Image

from rebel_diffusion.errors import UsageError
from rebel_diffusion.rewards import load_reward
from rebel_diffusion.rewards.pickscore import DEFAULT_MODEL, DEFAULT_PROCESSOR, PickScoreReward, clip_bpe_tokenizer


@pytest.fixture(scope="module")
def pickscore_folder(tmp_path_factory):
    return tiny_pickscore(tmp_path_factory.mktemp("models") / "PickScore_v1")


def test_score_is_the_authors_formula_on_the_real_loading_path(pickscore_folder):
    from transformers import CLIPModel

    reward = load_reward("pickscore", pickscore_model=str(pickscore_folder))
    images, prompts = smooth_images(3, 64, 64), ["a red circle", "a blue square", "a red circle"]
    images[2] = images[0]
    scores = reward(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert reward.processor_name == str(pickscore_folder)  # the folder's processor, not the hub's

    # Independently: transformers' own CLIP forward (logits_per_image = exp(logit_scale) * cos) on the
    # processor's PIL pipeline, as the authors' inference code runs it.
    from transformers import AutoProcessor

    model = CLIPModel.from_pretrained(pickscore_folder).eval()
    processor = AutoProcessor.from_pretrained(pickscore_folder)
    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    inputs = processor(text=prompts, images=pil, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diag()
    # PIL's uint8 rounding of the resized image is the only difference: well under a point.
    torch.testing.assert_close(scores, expected, atol=0.05, rtol=0)
    assert scores[0] == scores[2]  # same image and prompt
    assert abs(float(scores[0] - scores[1])) > 1e-3  # the scores depend on the input


def test_preprocessing_matches_the_processor(pickscore_folder):
    from transformers import CLIPImageProcessor

    reward = PickScoreReward(model=str(pickscore_folder)).load("cpu")
    processor = CLIPImageProcessor.from_pretrained(pickscore_folder)
    cfg = reward.image_cfg
    assert (cfg["size"], cfg["crop"]) == (224, 224)
    from rebel_diffusion.rewards.clip_score import clip_preprocess

    for h, w in ((512, 512), (96, 160)):
        images = smooth_images(2, h, w, seed=h)
        ours = clip_preprocess(images, cfg["size"], cfg["mean"], cfg["std"], crop=cfg["crop"])
        pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
        theirs = processor(images=pil, return_tensors="pt").pixel_values
        assert ours.shape == theirs.shape == (2, 3, 224, 224)
        # uint8 rounding before and after the resize (1/255 / std ~ 0.015) bounds the difference.
        assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.1


def test_prompts_are_tokenized_like_open_clip_and_truncated(pickscore_folder):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer, bpe = clip_bpe_tokenizer(), SimpleTokenizer()
    text = "a small red circle on a blue background"
    ids = tokenizer(text).input_ids
    assert ids == [bpe.encoder["<start_of_text>"], *bpe.encode(text), bpe.encoder["<end_of_text>"]]
    reward = PickScoreReward(model=str(pickscore_folder)).load("cpu")
    long = " ".join(["circle"] * 200)
    assert reward(smooth_images(1, 32, 32), [long]).isfinite().all()  # cut at 77 tokens, not an error


def test_offline_and_wrong_sources_give_one_line(monkeypatch, tmp_path, hub_offline):
    with pytest.raises(UsageError) as e:
        load_reward("pickscore").load()
    msg = str(e.value)
    assert "\n" not in msg and DEFAULT_PROCESSOR in msg and "--pickscore-model DIR" in msg
    with pytest.raises(UsageError) as e:  # a processor is present, the model is not
        PickScoreReward(model=DEFAULT_MODEL, processor=str(tmp_path)).load()
    assert str(tmp_path) in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="transformers .* folder"):
        PickScoreReward(model=str(empty), processor=str(empty)).load()


def test_in_a_several_reward_spec_the_server_and_the_preview(pickscore_folder):
    from test_reward_server import reference_server, reward_server

    from rebel_diffusion.config import TrainConfig
    from rebel_diffusion.outputs.preview import _resolve_reward
    from rebel_diffusion.rewards import HttpReward

    images, prompts = smooth_images(2, 64, 64), ["a red circle", "a blue square"]
    alone = load_reward("pickscore", pickscore_model=str(pickscore_folder))(images, prompts)
    jpeg = load_reward("jpeg-compressibility")(images, prompts)
    # Each component gets its own option; the weighted sum is the reward.
    both = load_reward("pickscore=1,jpeg-compressibility=0.5", pickscore_model=str(pickscore_folder))
    torch.testing.assert_close(both(images, prompts), alone + 0.5 * jpeg)

    # The reference server loads it from its flag and serves the same scores (up to the PNG's uint8).
    served = reward_server.load("pickscore", device="cpu", dtype="fp32", pickscore_model=str(pickscore_folder))
    with reference_server(served) as url:
        remote = load_reward(url, device="cpu")
        assert isinstance(remote, HttpReward)
        torch.testing.assert_close(remote(images, prompts), alone, atol=0.05, rtol=0)

    # The preview: from its flag, else from the run's config.
    shown = _resolve_reward("pickscore", None, "cpu", {"pickscore_model": str(pickscore_folder)})
    assert isinstance(shown, PickScoreReward) and shown.model_name == str(pickscore_folder)
    run_cfg = TrainConfig(reward="pickscore", pickscore_model=str(pickscore_folder))
    assert _resolve_reward(None, run_cfg, "cpu", None).model_name == str(pickscore_folder)
