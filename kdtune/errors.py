"""User-facing errors.

Anything the user can fix (a wrong path, an unknown name, a value out of range, a malformed spec, a
checkpoint for another architecture) raises :class:`KdtuneError` with one line naming the problem and
the fix. The CLI prints it as ``kdtune: error: <message>`` and exits with status 2, no traceback.
"""

from __future__ import annotations


class KdtuneError(ValueError):
    """A problem with the user's input, stated in one line with the fix."""

    exit_code = 2


class ConfigError(KdtuneError):
    """A configuration value is missing, unknown or out of range."""


class DataError(KdtuneError):
    """A data set cannot be found or read."""


class CheckpointError(KdtuneError):
    """A checkpoint is missing, unreadable or does not fit the named architecture."""


def did_you_mean(name: str, choices) -> str:
    """Return ' (did you mean X?)' when a close match exists, else ''."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class DiskFullError(KdtuneError):
    """The disk (or quota) holding an experiment or run is full: what was written before is kept."""

    exit_code = 1


#: How a full disk reads in an error, whoever raised it: the OS (ENOSPC, EDQUOT) or SQLite (MLflow, Optuna).
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "database or disk is full", "[Errno 28]",
                   "[Errno 122]")  # fmt: skip


def is_disk_full(error: BaseException | str | None) -> bool:
    """Whether ``error`` (an exception, with its causes and context, or an error's text) is a full disk."""
    import errno

    seen: set[int] = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(t in str(error) for t in _DISK_FULL_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return isinstance(error, str) and any(t in error for t in _DISK_FULL_TEXT)


def disk_full_message(where, resume: str | None = None) -> str:
    """The one line for a full disk: where, what is kept, and the command that goes on once space is freed."""
    then = f", then run `{resume}`" if resume else ", then run the command again"
    return (f"the disk holding {where} is full (No space left on device): free space there{then}; "
            "everything written before it filled is kept")
