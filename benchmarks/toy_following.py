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

from rebel_diffusion.models import load_pipeline
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


def read(pipe, settings, prompts: list[str], seed_list: list[int], classifier) -> tuple[dict, dict]:
    """({reader: rate}, {caption: {reader: rate}}) of ``pipe``'s samples of ``prompts`` x ``seed_list``."""
    flat = [p for p in prompts for _ in seed_list]  # prompt-major, as sample_images returns them
    with torch.no_grad():
        images = sample_images(pipe, prompts, seed_list, settings, batch_size=256)
    return follow_rates(images, flat, classifier), follow_rates_by_caption(images, flat, classifier)


def base_readings(
    model: str, vae: str | None, settings, seeds: int = 8, first_seed: int = FIRST_SEED, sets: dict | None = None
) -> dict:
    """{set: (rates, by_caption)} of the base ``model`` (with ``vae``) sampled with ``settings``;
    remembered for this process. Without a run folder: a test's base, measured beside its runs."""
    sets = SETS if sets is None else sets
    seed_list = list(range(first_seed, first_seed + seeds))
    out, pipe, classifier = {}, None, None
    for name, prompt_set in sets.items():
        prompts = load_prompts(prompt_set)
        key = (model, vae, repr(settings), tuple(prompts), tuple(seed_list))
        if key not in _BASE_READINGS:
            if pipe is None:
                pipe = load_pipeline(model, dtype=torch.float32, device=torch.device("cpu"), vae=vae)
                classifier = load_classifier()
            _BASE_READINGS[key] = read(pipe, settings, prompts, seed_list, classifier)
        out[name] = _BASE_READINGS[key]
    return out


def tuned_readings(run: str | Path, seeds: int = 8, first_seed: int = FIRST_SEED, sets: dict | None = None) -> dict:
    """{set: (rates, by_caption)} of a run folder's fine-tune, sampled with the run's own settings."""
    sets = SETS if sets is None else sets
    source = resolve_source(run)
    _, tuned = load_models(source, device=torch.device("cpu"), dtype=torch.float32, with_base=False)
    settings = settings_from_config(source.config)
    classifier = load_classifier()
    seed_list = list(range(first_seed, first_seed + seeds))
    return {name: read(tuned, settings, load_prompts(s), seed_list, classifier) for name, s in sets.items()}


def compare(base: dict, tuned: dict) -> dict:
    """{set: {'base': {reader: rate}, 'tuned': {...}, 'change': {...}}} from two readings of the same
    sets (``base_readings``, ``tuned_readings``); small sets also get 'per_caption'."""
    out = {}
    for name, (rates, by_caption) in tuned.items():
        base_rates, base_by_caption = base[name]
        row = {"base": base_rates, "tuned": rates}
        row["change"] = {k: rates[k] - base_rates[k] for k in base_rates}
        if len(by_caption) <= PER_CAPTION_MAX:
            row["per_caption"] = {p: {"base": base_by_caption[p], "tuned": by_caption[p]} for p in base_by_caption}
        out[name] = row
    return out


def measure(run: str | Path, seeds: int = 8, first_seed: int = FIRST_SEED, sets: dict | None = None) -> dict:
    """{set: {'base': {reader: rate}, 'tuned': {...}, 'change': {...}, 'images': n}} for a run folder.

    Sets of at most ``PER_CAPTION_MAX`` captions also get ``'per_caption'``: {caption: {'base':
    {reader: rate}, 'tuned': {...}}}, which shows which combinations were taught and which lost.
    """
    sets = SETS if sets is None else sets
    source = resolve_source(run)
    settings = settings_from_config(source.config)
    base = base_readings(source.model, source.vae, settings, seeds, first_seed, sets)
    out = compare(base, tuned_readings(run, seeds, first_seed, sets))
    for name, prompt_set in sets.items():
        out[name]["images"] = len(load_prompts(prompt_set)) * seeds
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
