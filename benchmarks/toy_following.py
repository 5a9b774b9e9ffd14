"""Prompt following of a toy run against its base, on fresh seeds, read from the pixels.

For each caption set, the fraction of samples whose shape, colour and background are all the
prompted ones (``rebel_diffusion.toy.following``: by the toy classifier and by a pixel reader
without learned weights), for the base model and for the run's fine-tune, sampled with the run's
own settings (sampler, steps, guidance) and seeds that no training batch, grid or held-out
evaluation uses (10,000 and up by default):

- ``novel``: ``prompts/toy_novel.txt``, the 16 combinations the quick start trains on, which the
  toy model never saw in its own training;
- ``novel_heldout``: ``prompts/toy_novel_heldout.txt``, the other 16 never-seen combinations
  (never trained on: they show whether RL teaches or only memorises, and whether it makes the
  model forget);
- ``known``: ``prompts/toy_shapes.txt``, the 192 captions the toy model was trained on.

    python -m benchmarks.toy_following runs/quickstart                 # 8 seeds a caption, ~1 min
    python -m benchmarks.toy_following runs/quickstart --seeds 16 --json out.json
    python -m benchmarks.toy_following runs/quickstart --per-caption   # which combinations moved
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rebel_diffusion.outputs.generation import load_models, resolve_source, sample_images
from rebel_diffusion.prompts_io import load_prompts
from rebel_diffusion.rewards.toy_alignment import load_classifier
from rebel_diffusion.sampling import settings_from_config
from rebel_diffusion.toy.following import follow_rates, follow_rates_by_caption

SETS = {"novel": "toy_novel", "novel_heldout": "toy_novel_heldout", "known": "toy_shapes"}
PER_CAPTION_MAX = 32  # the novel sets; not the 192 known captions
FIRST_SEED = 10_000  # training seeds come from SeedSequence; grids and held-out use seed + i < 10,000


# The base's readings, by (model, VAE, sampler settings, captions, seeds): runs of one base (a
# sweep's, or a test's seeds) sample it once a process.
_BASE_READINGS: dict[tuple, tuple[dict, dict]] = {}


def measure(run: str | Path, seeds: int = 8, first_seed: int = FIRST_SEED, sets: dict | None = None) -> dict:
    """{set: {'base': {reader: rate}, 'tuned': {...}, 'change': {...}, 'images': n}} for a run folder.

    Sets of at most ``PER_CAPTION_MAX`` captions also get ``'per_caption'``: {caption: {'base':
    {reader: rate}, 'tuned': {...}}}, which shows which combinations were taught and which lost.
    """
    sets = SETS if sets is None else sets
    source = resolve_source(run)
    base, tuned = load_models(source, device=torch.device("cpu"), dtype=torch.float32, with_base=True)
    settings = settings_from_config(source.config)
    classifier = load_classifier()
    seed_list = list(range(first_seed, first_seed + seeds))
    out = {}
    for name, prompt_set in sets.items():
        prompts = load_prompts(prompt_set)
        flat = [p for p in prompts for _ in seed_list]  # prompt-major, as sample_images returns them
        row, by_caption = {"images": len(flat)}, {}
        base_key = (source.model, source.vae, repr(settings), tuple(prompts), tuple(seed_list))
        for side, pipe in (("base", base), ("tuned", tuned)):
            if side == "base" and base_key in _BASE_READINGS:
                row[side], by_caption[side] = _BASE_READINGS[base_key]
                continue
            with torch.no_grad():
                images = sample_images(pipe, prompts, seed_list, settings, batch_size=256)
            row[side] = follow_rates(images, flat, classifier)
            by_caption[side] = follow_rates_by_caption(images, flat, classifier)
        _BASE_READINGS[base_key] = row["base"], by_caption["base"]
        row["change"] = {k: row["tuned"][k] - row["base"][k] for k in row["base"]}
        if len(prompts) <= PER_CAPTION_MAX:
            row["per_caption"] = {p: {side: by_caption[side][p] for side in by_caption} for p in by_caption["base"]}
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a training run folder of the toy model")
    p.add_argument("--seeds", type=int, default=8, help="fresh seeds per caption")
    p.add_argument("--first-seed", type=int, default=FIRST_SEED)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--per-caption", action="store_true", help="also print each novel caption's rates")
    args = p.parse_args(argv)
    result = measure(args.run, args.seeds, args.first_seed)
    for name, row in result.items():
        cells = ", ".join(
            f"{reader} {row['base'][reader]:.3f} -> {row['tuned'][reader]:.3f} ({row['change'][reader]:+.3f})"
            for reader in row["base"]
        )
        print(f"{name:14s} ({row['images']} images): {cells}")
        if args.per_caption:
            for text, sides in row.get("per_caption", {}).items():
                rates = "  ".join(f"{r} {sides['base'][r]:.2f} -> {sides['tuned'][r]:.2f}" for r in sides["base"])
                print(f"    {text:45s} {rates}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
