"""Every table kdtune prints or writes, through one helper on ``tabulate``.

The cells are strings the caller formatted (numbers with their own precision, ``±``, ``-`` for none), so
tabulate's number parsing is off: a cell prints exactly as given, left-aligned, and a column of numbers is
right-aligned only where the caller asks (``align``). ``fmt`` is tabulate's table format: ``simple`` for the
terminal (header, a rule of dashes, two spaces between columns), ``github`` for Markdown (``|`` in a cell
escaped). CSV goes through the standard library's ``csv`` module, not here.
"""

from __future__ import annotations

from collections.abc import Sequence


def table(header: Sequence[str], rows: Sequence[Sequence], *, fmt: str = "simple",
          align: Sequence[str] | None = None) -> str:  # fmt: skip
    """``rows`` under ``header`` as one string (no trailing newline). ``align``: per column ``left``,
    ``right`` or ``center`` (default all left)."""
    from tabulate import tabulate

    cells = [["-" if c is None else str(c) for c in r] for r in rows]
    if fmt == "github":
        cells = [[c.replace("|", "\\|") for c in r] for r in cells]
    ncol = len(header)
    colalign = tuple(align) if align is not None else ("left",) * ncol
    out = tabulate(cells, headers=list(header), tablefmt=fmt, disable_numparse=True, colalign=colalign)
    return "\n".join(line.rstrip() for line in out.splitlines())
