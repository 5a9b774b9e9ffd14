"""Errors a user can fix. The CLI prints their message as one line and exits with status 2."""


class UsageError(Exception):
    """Bad input: a wrong flag, path, name or count. The message says what to pass instead."""
