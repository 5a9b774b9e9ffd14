"""Writing files and folders so that a crash leaves the old one or the new one, never half of either,
and so that the others who share the disk can read them (some writers create files 0600)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file and a rename: a crash leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # processes writing the same file at once
    tmp.write_text(text, encoding="utf-8")
    readable_as_umask(tmp)
    os.replace(tmp, path)


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``, replacing it; ``dst`` is never half-written."""
    src, dst = Path(src), Path(dst)
    readable_tree(src)  # some writers (safetensors) create files 0600
    if dst.exists():
        old = dst.with_name(dst.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def readable_tree(folder: Path) -> None:
    """``readable_as_umask`` for a folder and everything in it."""
    folder = Path(folder)
    readable_as_umask(folder)
    for p in folder.rglob("*"):
        readable_as_umask(p)


def readable_as_umask(path: Path) -> None:
    """Give ``path`` the permissions the umask allows (some writers create files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    mode = (0o777 if Path(path).is_dir() else 0o666) & ~umask
    os.chmod(path, mode)
