"""Prompt following on the toy testbed (``rebel_diffusion.toy.following``): the two readers against
the data generator's own labels, and the novel-combination prompt sets."""

from pathlib import Path

import pytest
import torch

from rebel_diffusion.prompts_io import load_prompts
from rebel_diffusion.rewards.toy_alignment import load_classifier
from rebel_diffusion.toy import data
from rebel_diffusion.toy.following import (
    all_right,
    follow_rates,
    follow_rates_by_caption,
    read_classifier,
    read_pixels,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rendered():
    """1,000 clean renders of every combination, with their labels and captions."""
    return data.make_batch(1000, seed=7)


def test_the_pixel_reader_reads_clean_renders(rendered):
    images, labels, captions = rendered
    read = read_pixels(images)
    assert torch.equal(read["background"], labels["background"])
    assert torch.equal(read["colour"], labels["colour"])
    assert (read["shape"] == labels["shape"]).float().mean() >= 0.99
    assert all_right(read, captions).mean() >= 0.99


def test_the_pixel_reader_reads_every_shape_centred():
    attrs = data.sample_attributes(4, seed=0)
    attrs["shape"] = torch.arange(4)
    for k in ("cx", "cy"):
        attrs[k] = torch.full((4,), 16.0)
    attrs["radius"] = torch.full((4,), 9.0)
    assert read_pixels(data.render(attrs))["shape"].tolist() == [0, 1, 2, 3]


def test_an_empty_image_follows_no_caption():
    blue = data.palette()[data.COLOUR_NAMES.index("blue")].view(1, 3, 1, 1).expand(2, 3, 32, 32)
    read = read_pixels(blue)
    assert read["background"].tolist() == [4, 4] and read["colour"].tolist() == [-1, -1]
    assert all_right(read, ["a red circle on a blue background"] * 2).tolist() == [0.0, 0.0]


def test_a_wrong_attribute_is_not_following(rendered):
    images, labels, captions = rendered
    classifier = load_classifier()
    assert follow_rates(images, captions, classifier) == pytest.approx({"classifier": 1.0, "pixels": 1.0}, abs=0.01)
    # The same images captioned with another background colour: neither reader calls them right.
    wrong = [
        data.caption(s, c, next(b for b in range(8) if b not in (c, bg)))
        for s, c, bg in zip(labels["shape"].tolist(), labels["colour"].tolist(), labels["background"].tolist())
    ]
    assert follow_rates(images, wrong, classifier) == pytest.approx({"classifier": 0.0, "pixels": 0.0}, abs=0.01)
    assert (read_classifier(classifier, images)["shape"] == labels["shape"]).float().mean() >= 0.99


def test_following_needs_all_three_attributes_named():
    read = {k: torch.zeros(1, dtype=torch.long) for k in ("shape", "colour", "background")}
    with pytest.raises(ValueError, match="naming a shape, its colour and a background"):
        all_right(read, ["a red circle"])


def test_the_novel_sets_split_the_never_seen_combinations_in_two():
    held = (ROOT / "prompts" / "toy_heldout.txt").read_text().splitlines()
    novel, twin = load_prompts("toy_novel"), load_prompts("toy_novel_heldout")
    assert novel == held[0::2] and twin == held[1::2]  # the odd lines (1st, 3rd, ...) and the even ones
    for half in (novel, twin):
        parsed = [data.parse_caption(p) for p in half]
        assert sorted(s for s, _, _ in parsed) == sorted(list(range(4)) * 4)  # every shape four times
        assert {c for _, c, _ in parsed} | {b for _, _, b in parsed} == set(range(8))  # every colour
    assert not set(novel) & set(load_prompts("toy_shapes"))  # never in the toy model's training data


def test_rates_by_caption_split_the_overall_rate(rendered):
    images, labels, captions = rendered
    images, captions = images[:40], list(captions[:40])
    wrong_for = captions[0]  # every image of this caption gets a caption naming another shape
    s, c, b = data.parse_caption(wrong_for)
    other = next(data.caption(t, c, b) for t in range(4) if t != s and data.caption(t, c, b) not in captions)
    prompts = [other if p == wrong_for else p for p in captions]
    classifier = load_classifier()
    by_caption = follow_rates_by_caption(images, prompts, classifier)
    assert list(by_caption) == list(dict.fromkeys(prompts)) and wrong_for not in by_caption
    assert by_caption[other] == {"classifier": 0.0, "pixels": 0.0}
    overall = follow_rates(images, prompts, classifier)
    for reader in ("classifier", "pixels"):
        weighted = sum(by_caption[p][reader] * prompts.count(p) for p in by_caption) / len(prompts)
        assert weighted == pytest.approx(overall[reader])
        assert overall[reader] > 0.8  # the rest are right


def test_the_benchmark_samples_a_base_once_a_process(tmp_path, monkeypatch):
    """benchmarks.toy_following: a second run of the same base reuses the base's readings (the same
    figures, one sampling pass fewer); other seeds sample the base again."""
    from benchmarks import toy_following
    from rebel_diffusion.cli import main

    captions = tmp_path / "two.txt"
    captions.write_text("a red circle on an orange background\na yellow square on a black background\n")
    flags = [
        "--model", "tiny", "--reward", "jpeg-compressibility", "--num-steps", "3", "--prompts", str(captions),
        "--prompts-per-batch", "2", "--batches-per-epoch", "1", "--train-batch-size", "2",
        "--gradient-accumulation-steps", "2", "--grid-num-images", "1", "--epochs", "1",
    ]  # fmt: skip
    runs = [tmp_path / "a", tmp_path / "b"]
    for seed, run in enumerate(runs):
        assert main(["train", *flags, "--seed", str(seed), "--output-dir", str(run)]) == 0
    calls = []
    sample = toy_following.sample_images
    monkeypatch.setattr(toy_following, "sample_images", lambda *a, **k: calls.append(a[2]) or sample(*a, **k))
    monkeypatch.setattr(toy_following, "_BASE_READINGS", {})
    sets = {"two": str(captions)}
    first = toy_following.measure(runs[0], seeds=2, first_seed=50, sets=sets)
    assert len(calls) == 2  # base and tuned
    again = toy_following.measure(runs[1], seeds=2, first_seed=50, sets=sets)
    assert len(calls) == 3  # the tuned model alone
    assert again["two"]["base"] == first["two"]["base"]
    assert again["two"]["per_caption"].keys() == first["two"]["per_caption"].keys()
    uncached = dict(toy_following._BASE_READINGS)
    monkeypatch.setattr(toy_following, "_BASE_READINGS", {})
    fresh = toy_following.measure(runs[1], seeds=2, first_seed=50, sets=sets)
    assert fresh == again and len(calls) == 5  # the cached base is the base sampled afresh
    toy_following.measure(runs[1], seeds=3, first_seed=50, sets=sets)
    assert len(calls) == 7 and calls[-1] == [50, 51, 52]  # other seeds: the base again
    assert len(uncached) == 1
