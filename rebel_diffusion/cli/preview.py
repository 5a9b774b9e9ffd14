"""``rebel-diffusion preview --run OUTPUT_DIR``: serve the before/after page of a run (extra: preview)."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..outputs.generation import pick_device, pick_dtype, resolve_source, set_num_threads
from ..outputs.preview import (
    DEFAULT_NUM_SEEDS,
    DEFAULT_PROMPT,
    MAX_NUM_SEEDS,
    build_app,
    check_port,
    import_gradio,
    launch,
)
from ..rewards import weight_options
from ..sampling import settings_from_config
from .common import DeprecatedAlias, add_source_arguments, add_weight_arguments

HELP = "a Gradio page with before/after samples of a run (extra: preview)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser)
    g = parser.add_argument_group("page")
    g.add_argument("--reward", help="reward shown beside the images (default: the run's)")
    g.add_argument(
        "--prompt", help=f"prompt compared on page load (default: one of the run's prompts, else {DEFAULT_PROMPT!r})"
    )
    g.add_argument("--seed", type=int, default=0, help="first seed compared on page load (default 0)")
    g.add_argument(
        "--num-seeds",
        type=int,
        default=DEFAULT_NUM_SEEDS,
        help=f"seeds shown side by side, from --seed on (default {DEFAULT_NUM_SEEDS}, at most {MAX_NUM_SEEDS})",
    )
    g.add_argument("--num-steps", dest="steps", type=int, help="denoising steps (default: the run's)")
    g.add_argument("--steps", dest="steps", type=int, action=DeprecatedAlias, new_flag="--num-steps")
    g.add_argument("--guidance-scale", type=float, help="guidance scale (default: the run's)")
    g.add_argument("--ddim-eta", type=float, help="DDIM noise scale (default: the run's)")
    g.add_argument("--eta", dest="ddim_eta", type=float, action=DeprecatedAlias, new_flag="--ddim-eta")
    add_weight_arguments(parser.add_argument_group("reward weights (default: the run's, else the model hub)"))
    s = parser.add_argument_group("server")
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    s.add_argument("--port", type=int, default=7860, help="port (default 7860; 0 = any free port)")
    s.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")


def run(args: argparse.Namespace) -> int:
    if not (args.run or args.model or args.finetune):
        raise UsageError("preview needs a run: pass --run OUTPUT_DIR (or --model and --finetune)")
    if not 1 <= args.num_seeds <= MAX_NUM_SEEDS:
        raise UsageError(f"--num-seeds {args.num_seeds}: must be from 1 to {MAX_NUM_SEEDS}")
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: must be >= 0")
    import_gradio()  # before loading models: a missing extra is a one-line error, at once
    port = check_port(args.host, args.port)
    set_num_threads(args.num_threads)
    device = pick_device(args.device)
    source = resolve_source(run=args.run, model=args.model, finetune=args.finetune, vae=args.vae)
    settings = settings_from_config(
        source.config, num_steps=args.steps, guidance_scale=args.guidance_scale, ddim_eta=args.ddim_eta
    )
    app = build_app(
        source=source,
        reward=args.reward,
        device=device,
        dtype=pick_dtype(args.dtype, device),
        weights=weight_options(vars(args)),
        default_prompt=args.prompt,
        default_seed=args.seed,
        num_seeds=args.num_seeds,
        settings=settings,
    )
    print(f"preview on http://{args.host}:{port} (Ctrl-C to stop)", file=sys.stderr)
    try:
        launch(app, host=args.host, port=port, share=args.share)
    except OSError as e:  # the port was taken between the check and the launch
        raise UsageError(f"--port {port}: cannot start the server on {args.host} ({e})") from e
    return 0
