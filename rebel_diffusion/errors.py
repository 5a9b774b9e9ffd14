"""Errors a user can act on. The CLI prints their message as one line."""


class UsageError(Exception):
    """Bad input: a wrong flag, path, name or count. The message says what to pass instead. Exit 2."""


class RunError(Exception):
    """A run that had to stop (no finite reward, a fault of the disk or memory). The message says why
    and what to do next; the last checkpoint is intact. Exit 1."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for one-line errors."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
