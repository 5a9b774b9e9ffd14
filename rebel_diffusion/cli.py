"""The ``rebel-diffusion`` command: train, sample, eval, preview.

Each subcommand lives in its own module, which offers ``add_arguments(parser)`` and ``run(args)``.
Errors a user can fix (``UsageError``) print one line and exit with status 2; a run that had to stop
(``RunError``) prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import sys

from .errors import RunError, UsageError

COMMANDS = {
    "train": ("train", "fine-tune a model toward a reward with REBEL (or DDPO)"),
    "sample": ("sample", "images from the base model or a fine-tune, for prompts and seeds"),
    "eval": ("evaluate", "score base and fine-tuned samples with several rewards on held-out prompts"),
    "preview": ("preview", "a Gradio page with before/after samples of a run (extra: preview)"),
}


def _command_module(name: str):
    # An explicit import per command: the table above is the whole list.
    if name == "train":
        from . import train as module
    elif name == "sample":
        from . import sample as module
    elif name == "eval":
        from . import evaluate as module
    elif name == "preview":
        from . import preview as module
    else:  # pragma: no cover - argparse rejects unknown commands first
        raise UsageError(f"unknown command {name!r}")
    return module


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="rebel-diffusion",
        description="Reinforcement-learning fine-tuning of Stable Diffusion with REBEL.",
    )
    parser.add_argument("--version", action="version", version=f"rebel-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _command_module(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = _command_module(args.command).run(args)
    except UsageError as e:
        print(f"rebel-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"rebel-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
