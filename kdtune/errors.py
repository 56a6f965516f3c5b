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
