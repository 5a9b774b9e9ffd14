"""The quick start's training mix: the novel combinations and the known captions the base draws instead."""

from __future__ import annotations

import collections

from rebel_diffusion.prompts_io import load_prompts
from rebel_diffusion.toy import data
from rebel_diffusion.toy.contrast import contrast_mix
from rebel_diffusion.toy.data import caption


def test_the_mix_weights_hard_captions_and_adds_known_contrasts_only():
    hard, easy = "a yellow square on a black background", "a blue circle on an orange background"
    orange_square = (1, 1, 7)  # known: the base's usual mistake for `hard`
    orange_triangle = (2, 1, 7)  # a never-seen combination (the held-out twin): never added
    red_square = (1, 0, 7)  # known, but seen once in 20: below the share
    readings = [
        [data.parse_caption(hard)] * 5 + [orange_square] * 12 + [orange_triangle] * 2 + [red_square],
        [data.parse_caption(easy)] * 19 + [(0, 4, 2)],
    ]
    known = {caption(*orange_square), caption(*red_square), caption(0, 4, 2)}
    lines = contrast_mix([hard, easy], readings, known, copies=2, hard_copies=4, hard_below=0.9, min_share=0.1)
    counts = collections.Counter(text for text, _ in lines)
    assert counts == {hard: 4, easy: 2, "an orange square on a black background": 1}
    why = dict(lines)
    assert "0.25 (hard)" in why[hard] and "12 of 20" in why["an orange square on a black background"]


def test_the_shipped_mix_trains_the_novel_set_and_holds_no_heldout_caption():
    mix = load_prompts("toy_novel_contrast")
    novel, twin, known = load_prompts("toy_novel"), load_prompts("toy_novel_heldout"), load_prompts("toy_shapes")
    counts = collections.Counter(mix)
    assert all(counts[p] >= 2 for p in novel)  # every trained combination, at least twice
    assert not set(mix) & set(twin)
    assert set(mix) <= set(novel) | set(known)
    contrasts = [p for p in mix if p not in novel]
    assert contrasts and sum(counts[p] for p in novel) > 2 * len(contrasts)  # mostly the novel set
