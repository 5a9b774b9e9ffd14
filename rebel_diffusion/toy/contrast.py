"""A training mix of the novel combinations with their contrasts, written from the base's own errors.

RL's per-prompt comparison tells the model that, for "a yellow square on a black background", a
yellow square beats the orange one the base draws. It does not tell the model whether "yellow" or
"on black" is the reason, and learning "on black, draw yellow" makes it forget "an orange triangle
on a black background". A contrast caption answers that: the known caption that names what the
base wrongly draws ("an orange square on a black background", which the base draws right) goes
into the mix, so the same update must keep orange where orange is asked for.

The mix (``prompts/toy_novel_contrast.txt``, the quick start's training prompts):

1. sample the base model at the quick start's settings, ``samples`` fresh seeds a caption (seeds
   30,000 and up: no training batch, grid or evaluation uses them) and read shape, colour and
   background with the toy classifier;
2. each training caption goes in ``copies`` times, ``hard_copies`` times where the base is right
   less than ``hard_below`` of the time (prompts are drawn with replacement, so the hard ones get
   more of the epoch's images);
3. each wrong reading seen in at least ``min_share`` of a caption's samples goes in once, as its
   caption, when it is one of the captions the toy model was trained on (``toy_shapes``); a
   never-seen combination never enters, so the held-out twin stays held out.

    python -m rebel_diffusion.toy.contrast prompts/toy_novel_contrast.txt
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch

from .data import caption, parse_caption

FIRST_SEED = 30_000


def contrast_mix(
    prompts: list[str],
    readings: list[list[tuple[int, int, int]]],
    known: set[str],
    copies: int = 2,
    hard_copies: int = 4,
    hard_below: float = 0.9,
    min_share: float = 0.045,
) -> list[tuple[str, str]]:
    """The mix's lines, each (caption, why): ``prompts[i]`` read as ``readings[i]`` (n readings a caption)."""
    lines = []
    for prompt, read in zip(prompts, readings, strict=True):
        want = parse_caption(prompt)
        right = sum(r == want for r in read) / len(read)
        hard = right < hard_below
        lines += [(prompt, f"trained, base right {right:.2f}{' (hard)' if hard else ''}")] * (
            hard_copies if hard else copies
        )
        wrong = collections.Counter(r for r in read if r != want)
        for ids, count in wrong.most_common():
            text = caption(*ids)
            if count >= min_share * len(read) and text in known:
                lines.append((text, f"contrast: the base draws it for {prompt!r} in {count} of {len(read)}"))
    return lines


def read_base(prompts: list[str], samples: int, first_seed: int = FIRST_SEED) -> list[list[tuple[int, int, int]]]:
    """The toy classifier's (shape, colour, background) of the base's samples at the quick start's settings."""
    from rebel_diffusion.config import PRESETS, TrainConfig
    from rebel_diffusion.models import load_pipeline
    from rebel_diffusion.outputs.generation import sample_images
    from rebel_diffusion.rewards.toy_alignment import load_classifier
    from rebel_diffusion.sampling import settings_from_config

    from .following import read_classifier

    settings = settings_from_config(TrainConfig(**PRESETS["toy"]))
    pipe = load_pipeline("toy")
    seeds = list(range(first_seed, first_seed + samples))
    with torch.no_grad():
        images = sample_images(pipe, prompts, seeds, settings, batch_size=256)  # (P * samples, 3, 32, 32)
    read = read_classifier(load_classifier(), images)
    ids = torch.stack([read["shape"], read["colour"], read["background"]], dim=1).view(len(prompts), samples, 3)
    return [[tuple(int(v) for v in row) for row in per_prompt] for per_prompt in ids]


def main(argv: list[str] | None = None) -> None:
    from rebel_diffusion.prompts_io import load_prompts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="the prompt file to write")
    p.add_argument("--prompts", default="toy_novel", help="the training captions")
    p.add_argument("--samples", type=int, default=64, help="base samples a caption")
    args = p.parse_args(argv)
    prompts = load_prompts(args.prompts)
    lines = contrast_mix(prompts, read_base(prompts, args.samples), set(load_prompts("toy_shapes")))
    header = [
        "# The quick start's training mix, written by `python -m rebel_diffusion.toy.contrast` from the base",
        f"# model's own errors ({args.samples} samples a caption, seeds {FIRST_SEED:,} and up): each novel",
        "# combination of toy_novel twice (four times where the base is right less than 0.9 of the time), and",
        "# the known captions the base draws instead of one (its contrasts). No held-out combination is in it.",
    ]
    body, said = [], None
    for text, why in lines:
        if why != said:  # prompt files take whole-line comments only
            body.append(f"# {why}")
            said = why
        body.append(text)
    Path(args.out).write_text("\n".join(header + body) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(lines)} prompts, {sum(why.startswith('contrast') for _, why in lines)} of them contrasts")


if __name__ == "__main__":
    main()
