"""What ``kdtune report`` receives from its command line, made in a test: ``report_args(experiment=..., **fields)``."""

from __future__ import annotations

import argparse


def report_args(**kw) -> argparse.Namespace:
    """The report's parsed arguments for ``experiment``, with the other fields of ``kw`` set over the defaults."""
    from kdtune.report import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    ns = p.parse_args([kw.pop("experiment")])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns
