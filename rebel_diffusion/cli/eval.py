"""``rebel-diffusion eval``: base vs fine-tuned on held-out prompts, with several rewards and diversity.

By default a run is evaluated the way it was trained to be: its held-out prompts, its sampler
settings and its held-out rewards (config.yaml), each of which a flag can override.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UsageError
from ..outputs import run_folder
from ..outputs.evaluate import (
    DIVERSITY_CHOICES,
    evaluate_pipelines,
    field_report,
    load_diversity_model,
    load_field_rewards,
    load_rewards,
    markdown_report,
    parse_reward_names,
    write_field_reports,
    write_reports,
)
from ..outputs.generation import describe, load_models, pick_device, pick_dtype
from ..prompts_io import load_prompts
from ..rewards import weight_options
from .common import (
    add_sampling_arguments,
    add_source_arguments,
    add_weight_arguments,
    check_output_folder,
    settings_from_args,
    source_from_args,
)

HELP = "score base and fine-tuned samples with several rewards on held-out prompts"
DEFAULT_PROMPTS = "heldout_animals"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    g = parser.add_argument_group("what to measure")
    g.add_argument(
        "--rewards",
        help="comma-separated rewards (aesthetic, clip, pickscore, hpsv2, imagereward, jpeg-compressibility, "
        "jpeg-incompressibility, toy-alignment, module:attr); default: the run's held-out rewards, "
        "else its reward and the jpeg ones",
    )
    g.add_argument(
        "--field",
        action="store_true",
        help="the table papers report: LAION aesthetic, CLIP, PickScore, HPSv2.1 and ImageReward (those whose "
        "weights load; the others are named) and diversity, on the run's training prompts and on the held-out "
        "prompts (--rewards adds more)",
    )
    add_weight_arguments(parser.add_argument_group("reward weights (default: the run's, else the model hub)"))
    g.add_argument(
        "--prompts",
        metavar="NAME_OR_FILE",
        help="held-out prompts: a set in prompts/ or a file "
        f"(default: the run's held-out prompts, else {DEFAULT_PROMPTS})",
    )
    g.add_argument("--num-images", type=int, default=4, help="images per prompt (>= 2 for diversity; default 4)")
    g.add_argument("--seed", type=int, default=0, help="first seed; prompt p's images use seeds seed..seed+K-1")
    g.add_argument(
        "--diversity-model",
        default="auto",
        metavar="SPEC",
        help=f"image embedding for diversity: {DIVERSITY_CHOICES} (default auto: CLIP ViT-L-14/openai "
        "from the hub cache or the hub, else pixel embeddings with a warning; reports name the one used). "
        "OpenAI weights from a local file: clip:ViT-L-14-quickgelu:/path/to/open_clip_model.safetensors",
    )
    add_sampling_arguments(parser)
    parser.add_argument(
        "--output-dir", help="where eval.json, eval.md, eval_grid.png go (default: RUN/eval, else ./eval)"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # Cheap checks first: names, counts, paths, rewards; models last.
    if args.num_images < 1:
        raise UsageError(f"--num-images must be >= 1, got {args.num_images}")
    source = source_from_args(args)
    if source.finetune is None:
        raise UsageError("eval compares a fine-tune with its base model: pass --run DIR or --finetune PATH")
    cfg = source.config  # None without a run: eval's own defaults
    prompt_set = args.prompts or (cfg.heldout_prompts if cfg is not None else DEFAULT_PROMPTS)
    prompts = load_prompts(prompt_set)
    settings = settings_from_args(args, cfg)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    weights = weight_options(cfg, vars(args))
    prompt_sets = {"held-out": prompts}
    left_out = {}
    if args.field:
        rewards, left_out = load_field_rewards(device=device, dtype=dtype, weights=weights)
        extra = [n for n in parse_reward_names(args.rewards, None) if n not in rewards] if args.rewards else []
        rewards.update(load_rewards(extra, device=device, dtype=dtype, weights=weights))
        names = list(rewards)
        if not names:
            raise UsageError(
                "eval --field: no reward's weights could be loaded (" + "; ".join(left_out.values()) + ")"
            )
        if cfg is not None:
            prompt_sets = {"training": load_prompts(cfg.prompts), "held-out": prompts}
    else:
        run_rewards, trained = (cfg.heldout_rewards, cfg.reward) if cfg is not None else (None, None)
        names = parse_reward_names(args.rewards or run_rewards, trained)
        rewards = load_rewards(names, device=device, dtype=dtype, weights=weights)
    diversity = load_diversity_model(args.diversity_model, device) if args.num_images > 1 else None
    out = Path(args.output_dir) if args.output_dir else (source.run_dir or Path(".")) / run_folder.EVAL_DIR
    check_output_folder(out)  # before any image is drawn

    base, tuned = load_models(source, device=device, dtype=dtype, with_base=True)
    seeds = list(range(args.seed, args.seed + args.num_images))
    sets = ", ".join(f"{len(p)} {label} prompts" for label, p in prompt_sets.items())
    print(
        f"eval: {sets} ({prompt_set}) x {len(seeds)} seeds, base vs {describe(source)}, rewards {', '.join(names)}",
        file=sys.stderr,
    )
    for name, why in left_out.items():
        print(f"eval: {name} left out for want of weights ({why})", file=sys.stderr)
    results = {
        label: evaluate_pipelines(
            base,
            tuned,
            set_prompts,
            rewards,
            seeds,
            settings,
            diversity=diversity,
            batch_size=args.batch_size,
            progress=not args.quiet,
            keep_images=True,
        )
        for label, set_prompts in prompt_sets.items()
    }
    header = {
        "model": source.model,
        "finetune": str(source.finetune),
        "run": str(source.run_dir or ""),
        "prompt_set": str(prompt_set),
    }
    if args.field:
        if "training" in prompt_sets:
            header["training_prompt_set"] = cfg.prompts
        write_field_reports(out, results, header, left_out)
        print(field_report(results, header, left_out))
    else:
        result = results["held-out"]
        write_reports(out, result, header)
        print(markdown_report(result, header))
    print(f"wrote eval.json, eval.md and eval_grid.png to {out}")
    return 0
