"""HPSv2.1, offline: a random-weight open_clip model saved as the authors' checkpoint is."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import smooth_images
from PIL import Image

from rebel_diffusion.errors import UsageError
from rebel_diffusion.rewards import load_reward
from rebel_diffusion.rewards.hpsv2 import DEFAULT_FILE, DEFAULT_REPO, HpsV2Reward

TINY = "rebel-test-tiny-hps"  # ViT-H-14's layout (GELU, 224 px, patch 14) at a tiny width
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_hps(tmp_path_factory):
    """(architecture name, a folder holding ``HPS_v2.1_compressed.pt``, the model it was saved from)."""
    import open_clip

    config = tmp_path_factory.mktemp("open_clip_configs") / f"{TINY}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()
    folder = tmp_path_factory.mktemp("HPSv2")
    # The authors' file: {"state_dict": ...} in float16 ("compressed").
    torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, folder / DEFAULT_FILE)
    return TINY, folder, model


def test_score_is_the_authors_formula_on_the_real_loading_path(tiny_hps):
    import open_clip
    from torchvision import transforms as T

    name, folder, model = tiny_hps
    reward = HpsV2Reward(checkpoint=folder, clip_model=name)
    images, prompts = smooth_images(3, 96, 96), ["a red circle", "a blue square", "a red circle"]
    scores = reward(images, prompts)
    assert scores.shape == (3,) and scores.dtype == torch.float32

    # Independently: the authors' evaluation transform on PIL images and their formula
    # (normalised features, image @ text.T, the diagonal), with the weights as stored (float16).
    model = model.half().float()
    transform = T.Compose(
        [
            T.ToTensor(),
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(224),
            T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    pil = [Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for x in images]
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([transform(p) for p in pil]), normalize=True)
        text_features = model.encode_text(open_clip.get_tokenizer(name)(prompts), normalize=True)
    expected = torch.diagonal(image_features @ text_features.T)
    torch.testing.assert_close(scores, expected, atol=2e-3, rtol=0)  # PIL's uint8 rounding only
    assert abs(float(scores[0] - scores[1])) > 1e-4


def test_weights_come_from_the_checkpoint(tiny_hps, tmp_path):
    name, folder, _ = tiny_hps
    images, prompts = smooth_images(2, 64, 64), ["a red circle", "a blue square"]
    first = HpsV2Reward(checkpoint=folder / DEFAULT_FILE, clip_model=name)(images, prompts)
    state = torch.load(folder / DEFAULT_FILE, weights_only=True)["state_dict"]
    state["visual.proj"] = -state["visual.proj"]
    state = {f"module.{k}": v for k, v in state.items()}  # as a DDP training run saves it
    torch.save({"state_dict": state}, tmp_path / "changed.pt")
    second = HpsV2Reward(checkpoint=tmp_path / "changed.pt", clip_model=name)(images, prompts)
    torch.testing.assert_close(second, -first, atol=1e-3, rtol=0)  # flipping the image projection flips the cosine


def test_offline_and_wrong_files_give_one_line(tiny_hps, tmp_path, hub_offline):
    with pytest.raises(UsageError) as e:
        load_reward("hpsv2").load()
    msg = str(e.value)
    assert "\n" not in msg and DEFAULT_REPO in msg and DEFAULT_FILE in msg and "--hpsv2-checkpoint PATH" in msg
    with pytest.raises(UsageError, match="no such file"):
        load_reward("hpsv2", hpsv2_checkpoint=str(tmp_path / "nope.pt")).load()
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2)}}, bad)
    with pytest.raises(UsageError) as e:
        HpsV2Reward(checkpoint=bad, clip_model=tiny_hps[0]).load()
    assert "not an HPSv2 checkpoint" in str(e.value) and "\n" not in str(e.value)


def test_train_without_the_weights_fails_before_writing(tmp_path, hub_offline, capsys):
    from rebel_diffusion.cli import main

    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--reward", "hpsv2", "--num-steps", "2", "--output-dir", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and DEFAULT_REPO in err[0] and "--hpsv2-checkpoint PATH" in err[0]
    assert not out.exists()
