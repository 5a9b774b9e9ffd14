"""``rebel-diffusion sample``: images from a base model, a fine-tune or a training run, per prompt and seed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..outputs import run_folder
from ..outputs.generation import describe, load_models, pick_device, pick_dtype, sample_images, write_samples
from .common import (
    add_sampling_arguments,
    add_source_arguments,
    prompts_from_args,
    samples_folder,
    seeds_from_args,
    settings_from_args,
    source_from_args,
)

HELP = "images from the base model or a fine-tune, for prompts and seeds"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    g = parser.add_argument_group("what to draw")
    g.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    g.add_argument(
        "--prompts",
        metavar="NAME_OR_FILE",
        help="a prompt set from prompts/ (e.g. simple_animals) "
        "or a text file, one prompt a line (default: the run's grid prompts)",
    )
    g.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="seeds, one image each per prompt")
    g.add_argument("--num-images", type=int, default=1, help="images per prompt when --seeds is not given")
    g.add_argument("--seed", type=int, default=0, help="first seed with --num-images (default 0)")
    add_sampling_arguments(parser)
    parser.add_argument(
        "--output-dir", help="where to write the PNGs and grid.png (default: RUN/samples, else ./samples)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    seeds = seeds_from_args(args)
    source = source_from_args(args)
    prompts, prompt_label = prompts_from_args(args, source.config)
    settings = settings_from_args(args, source.config)
    device = pick_device(args.device)
    out = samples_folder(args.output_dir, (source.run_dir or Path(".")) / run_folder.SAMPLES_DIR)

    _, pipe = load_models(source, device=device, dtype=pick_dtype(args.dtype, device), with_base=False)
    settings = settings.resolve(pipe)
    n = len(prompts) * len(seeds)
    print(
        f"sampling {n} images ({len(prompts)} prompts x {len(seeds)} seeds, {settings.num_steps} steps) "
        f"from {describe(source)}",
        file=sys.stderr,
    )
    images = sample_images(pipe, prompts, seeds, settings, batch_size=args.batch_size, progress=not args.quiet)
    write_samples(out, images, prompts, seeds, source=source, settings=settings, prompt_label=prompt_label)
    print(f"wrote {n} images and grid.png to {out}")
    return 0
