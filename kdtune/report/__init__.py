"""Reports of sweeps from MLflow: best trial per method and pair, published numbers beside it, plots.

``main_report(args)`` is ``kdtune report``; ``best_per_method(tracking_uri, experiment_name)`` the same
table as dicts. MLflow, Optuna and matplotlib are imported only when called, so the CLI stays fast.
"""

from __future__ import annotations

import argparse
from typing import Any


def best_per_method(
    tracking_uri: str, experiment_name: str, metric: str = "val_acc", mode: str = "max"
) -> list[dict[str, Any]]:
    """Best configuration per method and teacher-student pair (see :mod:`kdtune.report.table`)."""
    from kdtune.report.table import best_per_method as _best

    return _best(tracking_uri, experiment_name, metric=metric, mode=mode)


def main_report(args: argparse.Namespace) -> int:
    """``kdtune report``: see :func:`kdtune.report.main.main_report`."""
    from kdtune.report.main import main_report as _main

    return _main(args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``kdtune report`` (for the CLI that adds the subcommand)."""
    p.add_argument("experiment", help="experiment name (under --storage) or path to its directory")
    p.add_argument("--storage", default=None, help="where experiments live (default runs/sweeps)")
    p.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    p.add_argument("--markdown", default=None, metavar="PATH", help="also write the table as Markdown")
    p.add_argument(
        "--plots",
        action="store_true",
        help="write the plots (PNG; <experiment>/report unless --out) and log them to the parent run",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="write the plots here (implies --plots)"
    )
    p.add_argument(
        "--metric", default=None, help="rank by this validation metric (default: the sweep's, val_acc)"
    )
    p.add_argument("--mode", default=None, choices=["max", "min"], help="max or min (default: the sweep's)")


__all__ = ["add_arguments", "best_per_method", "main_report"]
