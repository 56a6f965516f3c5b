"""Reproductions of published results that run on a CPU: each module has ``main(argv=None) -> int``.

- :mod:`kdtune.reproduce.disk_toys` -- DiSK's toy problems and its Table 1 (``kdtune reproduce disk-toys``), and
  :mod:`kdtune.reproduce.disk_paper` -- the same table by the paper's protocol, through ``kdtune sweep``
  (``--protocol paper``; its ``main`` is the command's, for both protocols).
- :mod:`kdtune.reproduce.mse_teacher` -- the teacher-training seed's synthetic experiment
  (``kdtune reproduce mse-teacher``).
"""

from __future__ import annotations

import sys

# the disk-toys command is disk_paper's main: the paper protocol there, the fixed one handed to disk_toys
REPRODUCTIONS = {"disk-toys": "kdtune.reproduce.disk_paper", "mse-teacher": "kdtune.reproduce.mse_teacher"}


def parse_config(build_parser, config_from_args, argv):
    """A reproduction's options read and checked: ``(args, cfg)``, or ``None`` after printing the one-line refusal
    (``kdtune: error: ...``) a bad option gets; its ``main`` then returns 2."""
    from kdtune.errors import KdtuneError

    args = build_parser().parse_args(argv)
    try:
        return args, config_from_args(args)
    except KdtuneError as e:
        print(f"kdtune: error: {e}", file=sys.stderr)
        return None
