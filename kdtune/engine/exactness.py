"""How far a fused member ends from its lone run, per bundle mode: the measurement behind the bundle's rule
that ``mode="auto"`` uses exact modes only (``kdtune bench --exactness``; docs/exactness.md has the trace).

:func:`measure` trains, on digits with a resnet8 student (a resnet8 teacher trained one epoch where the method
needs one, as the issue's reproduction did), the lone run of a config (``lr`` 0.05, seed 7, data seed 3) and
member 0 of a two-member bundle of it (the other member: lr 0.02, seed 8) in each mode, for each number of
epochs, and returns one row each: the mode the bundle ran, its probe's verdict (``Bundle.probe_exact``) and the
largest relative difference of any tensor of member 0's state dict from the lone run's
(``max |a - b| / max |b|``). Beside them the ruler: the lone run with ``lr x (1 + 1e-7)`` (``"lr+1e-7"``), the
size of a harmless change. Free of Ray and MLflow.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from kdtune.config import as_config
from kdtune.engine.bundle import Bundle
from kdtune.engine.trainer import Trainer
from kdtune.losses import METHODS

REFERENCE = "lr+1e-7"  # the row of the lone run with lr x (1 + 1e-7)
HP = {"dkd": {"beta": 8.0}}  # the reproduction; other methods at their defaults


def max_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest relative difference of any floating tensor: ``max |a - b| / max |b|``."""
    return max(
        ((a[k].float() - b[k].float()).abs().max() / b[k].float().abs().max().clamp_min(1e-12)).item()
        for k in b
        if b[k].is_floating_point()
    )


def _final(trainer_or_bundle) -> dict[str, torch.Tensor]:
    if isinstance(trainer_or_bundle, Bundle):
        return {k: v.clone() for k, v in trainer_or_bundle.sync_member(0).student.state_dict().items()}
    return {k: v.clone() for k, v in trainer_or_bundle.student.state_dict().items()}


def measure(
    methods: Iterable[str],
    epochs: Iterable[int],
    modes: Iterable[str] = ("loop", "loop_cl", "grouped", "vmap", "auto"),
    *,
    device: str = "cpu",
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """One row per (method, epochs, mode), ``mode`` :data:`REFERENCE` first: ``{"method", "epochs", "mode",
    "ran", "exact", "max_rel"}`` (``ran``/``exact`` are None on the reference row)."""
    methods, epochs, modes = list(methods), list(epochs), list(modes)
    for m in methods:
        METHODS.get(m)  # an unknown name is refused in one line before anything trains
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdtune-exactness-") as tmp:
        teacher = None
        if any(METHODS.get(m).needs_teacher for m in methods):
            teacher = str(Path(tmp) / "teacher.pt")
            t = Trainer(as_config(dict(data="digits", model="resnet8", method="ce", epochs=1, seed=5, device=device)))
            for _ in t.run():
                pass
            t.save_model(teacher)
        for method in methods:
            for n in epochs:
                base = dict(data="digits", model="resnet8", device=device, batch_size=64, data_seed=3, seed=7,
                            method=method, epochs=n, hp=HP.get(method, {}))  # fmt: skip
                if METHODS.get(method).needs_teacher:
                    base["teacher"] = teacher
                lone = Trainer(as_config(dict(base, lr=0.05)))
                for _ in lone.run():
                    pass
                want = _final(lone)
                nudged = Trainer(as_config(dict(base, lr=0.05 * (1 + 1e-7))))
                for _ in nudged.run():
                    pass
                found = [dict(method=method, epochs=n, mode=REFERENCE, ran=None, exact=None,
                              max_rel=max_rel(_final(nudged), want))]  # fmt: skip
                for mode in modes:
                    b = Bundle([dict(base, lr=0.05), dict(base, lr=0.02, seed=8)], mode=mode, allow_inexact=True)
                    for _ in b.run():
                        pass
                    found.append(dict(method=method, epochs=n, mode=mode, ran=b.mode, exact=b.exact,
                                      max_rel=max_rel(_final(b), want)))  # fmt: skip
                for row in found:
                    rows.append(row)
                    if progress is not None:
                        progress(row)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as a text table: one line per (method, epochs), one column per mode; a cell is the relative
    difference, ``(not exact)`` where the mode's probe said so, and the mode auto ran."""
    from kdtune.tables import table as render

    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lines: dict[tuple[str, int], dict[str, str]] = {}
    for r in rows:
        cell = f"{r['max_rel']:.1e}"
        if r["exact"] is False:
            cell += " (not exact)"
        if r["mode"] == "auto":
            cell += f" ({r['ran']})"
        lines.setdefault((r["method"], r["epochs"]), {})[r["mode"]] = cell
    body = [[m, str(e)] + [cells.get(mode, "-") for mode in modes] for (m, e), cells in lines.items()]
    return render(["method", "epochs"] + modes, body)
