"""The ``rebel-diffusion`` command: train, sample, eval, preview.

Each subcommand lives in its own module of this package, which offers ``HELP``,
``add_arguments(parser)`` and ``run(args)``: argparse glue over the library's plain functions.
Warnings go to stderr, as Python's ``warnings`` do.
Errors a user can fix (``UsageError``) print one line and exit with status 2; a run that had to stop
(``RunError``) prints one line and exits with status 1.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import RunError, UsageError

COMMANDS = ("train", "sample", "eval", "preview")


def _command_module(name: str):
    # An explicit import per command: the tuple above is the whole list.
    if name == "train":
        from . import train as module
    elif name == "sample":
        from . import sample as module
    elif name == "eval":
        from . import eval as module
    elif name == "preview":
        from . import preview as module
    else:  # pragma: no cover - argparse rejects unknown commands first
        raise UsageError(f"unknown command {name!r}")
    return module


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="rebel-diffusion",
        description="Reinforcement-learning fine-tuning of Stable Diffusion with REBEL.",
    )
    parser.add_argument("--version", action="version", version=f"rebel-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = _command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = _command_module(args.command).run(args)
    except UsageError as e:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # under a launcher every worker sees the same input
            print(f"rebel-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"rebel-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
