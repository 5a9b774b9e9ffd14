"""Prompt sets: packaged ones by name (``simple_animals``) or any text file, one prompt a line.

Blank lines and lines starting with ``#`` are skipped; surrounding whitespace is stripped.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import UsageError

PACKAGE = "rebel_diffusion.prompts"


def list_prompt_sets() -> list[str]:
    """Names of the packaged prompt sets (file names in ``prompts/`` without ``.txt``), sorted."""
    root = resources.files(PACKAGE)
    return sorted(p.name[: -len(".txt")] for p in root.iterdir() if p.name.endswith(".txt"))


def parse_prompts(text: str) -> list[str]:
    """One prompt a line; blank lines and ``#`` comments dropped."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def load_prompts(name_or_path: str | os.PathLike) -> list[str]:
    """The prompts of a packaged set (``simple_animals``, ``heldout_animals``...) or of a text file.

    An existing file wins over a packaged name. Raises ``UsageError`` (one line, listing the
    packaged sets) when neither exists, and when the file holds no prompt.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is not part of the first prompt
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"prompt file {path}: cannot be read as UTF-8 text ({e})") from e
        where = str(path)
    else:
        text, where = _packaged(str(name_or_path))
    prompts = parse_prompts(text)
    if not prompts:
        raise UsageError(f"prompt file {where} is empty: write one prompt a line")
    return prompts


def _packaged(name: str) -> tuple[str, str]:
    stem = name[: -len(".txt")] if name.endswith(".txt") else name
    is_bare = stem and os.sep not in stem and "/" not in stem
    entry = resources.files(PACKAGE) / f"{stem}.txt" if is_bare else None
    if entry is None or not entry.is_file():
        raise UsageError(
            f"prompts {name!r}: no such file and no packaged prompt set of that name "
            f"(packaged: {', '.join(list_prompt_sets())})"
        )
    return entry.read_text(encoding="utf-8"), f"{stem} (packaged)"
