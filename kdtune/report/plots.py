"""The report's plots (PNG, matplotlib's Agg canvas, no global backend change).

- Validation curves: one figure per teacher -> student pair, the sweep metric per epoch of each method's
  best configuration (mean over its seeds, shaded ± sample std where there are several).
- Parameter importances per method (fANOVA, Hutter et al. ICML 2014, as ``optuna.importance`` computes it,
  seeded): from the Optuna study the sweep mirrors beside the experiment
  (``<storage>/<experiment>/optuna.db``, study ``<experiment>/<method>``) when it is there, otherwise from
  the trials' MLflow params and metric, put into an in-memory Optuna study. Importance needs at least two
  finished trials with a parameter that varies; methods without are skipped with a note.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdtune.report.table import SEED_KEYS, VOLATILE, Trial, hparam_keys
from kdtune.tracking.client import slug


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _history(client, run_id: str, metric: str) -> dict[int, float]:
    from kdtune.tracking.client import retry_locked

    out: dict[int, float] = {}
    for m in sorted(
        retry_locked(client.get_metric_history, run_id, metric), key=lambda m: (m.step, m.timestamp)
    ):
        out[int(m.step)] = float(m.value)  # a resumed epoch logged twice: the later value wins
    return out


def plot_curves(client, rows: list[dict], metric: str, out_dir: str | Path) -> list[Path]:
    """One PNG per (data, teacher, student): ``metric`` vs epoch of each method's best configuration."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        pairs.setdefault((r["data"], r["teacher"], r["student"]), []).append(r)
    paths = []
    for (data, teacher, student), prs in sorted(pairs.items()):
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        drawn = 0
        for r in prs:
            hists = [_history(client, rid, metric) for rid in r["run_ids"]]
            steps = sorted(set().union(*hists)) if hists else []
            if not steps:
                continue
            means, lows, highs = [], [], []
            for s in steps:
                vals = [h[s] for h in hists if s in h and math.isfinite(h[s])]
                m = statistics.fmean(vals) if vals else float("nan")
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                means.append(m)
                lows.append(m - sd)
                highs.append(m + sd)
            label = f"{r['method']} ({r['value']:.2f}" + (
                f", {r['n_seeds']} seeds)" if r["n_seeds"] > 1 else ")"
            )
            (line,) = ax.plot(steps, means, marker="o", markersize=2.5, linewidth=1.4, label=label)
            if r["n_seeds"] > 1:
                ax.fill_between(steps, lows, highs, alpha=0.2, color=line.get_color(), linewidth=0)
            drawn += 1
        if not drawn:
            continue
        who = f"{teacher} -> {student}" if teacher != "-" else student
        ax.set_title(f"{who} on {data}: best configuration per method")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        pair = f"{slug(teacher)}-{slug(student)}" if teacher != "-" else slug(student)
        path = out_dir / f"curves_{slug(data)}_{pair}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- importances
def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except (TypeError, ValueError):
            pass
    return value


def study_from_trials(trials: list[Trial], metric: str, mode: str, method: str):
    """An in-memory Optuna study of ``trials`` (their varying hyperparameters and last ``metric``)."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    done = [t for t in trials if t.status != "FAILED" and math.isfinite(t.metrics.get(metric, float("nan")))]
    keys = [
        k
        for k in hparam_keys(method, done)
        if k not in SEED_KEYS
        and k not in VOLATILE
        and len({t.params.get(k) for t in done if k in t.params}) > 1
    ]
    dists = {}
    for k in keys:
        vals = [_parse(t.params[k]) for t in done if k in t.params]
        if all(isinstance(v, int) for v in vals):
            dists[k] = IntDistribution(min(vals), max(vals))
        elif all(isinstance(v, (int, float)) for v in vals):
            lo, hi = float(min(vals)), float(max(vals))
            dists[k] = FloatDistribution(lo, hi, log=lo > 0 and hi / lo >= 100)
        else:
            dists[k] = CategoricalDistribution(sorted({str(v) for v in vals}))
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for t in done:
        params = {}
        for k, d in dists.items():
            if k in t.params:
                v = _parse(t.params[k])
                params[k] = str(v) if isinstance(d, CategoricalDistribution) else v
        used = {k: dists[k] for k in params}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=used, value=t.metrics[metric]))
    return study


def load_mirror_study(optuna_db: Path, study_name: str):
    """The sweep's Optuna mirror study, or ``None`` when the file or the study is not there."""
    if not optuna_db.is_file():
        return None
    import optuna

    storage = f"sqlite:///{optuna_db.absolute()}"
    try:
        if study_name not in optuna.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=study_name, storage=storage)
    except Exception:  # an unreadable or foreign database: fall back to MLflow
        return None


def importances(study) -> dict[str, float] | None:
    """fANOVA importances (seeded), or ``None`` with fewer than two finished trials or nothing varying."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    varying = {k for t in complete for k in t.params if len({str(u.params.get(k)) for u in complete}) > 1}
    if len(complete) < 2 or not varying:
        return None
    try:
        return get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None


def plot_importances(
    trials: list[Trial],
    metric: str,
    mode: str,
    out_dir: str | Path,
    experiment: str,
    optuna_db: str | Path | None = None,
    note: Callable[[str], None] = print,
) -> tuple[list[Path], dict[str, dict[str, float]]]:
    """One bar chart per method; returns the PNG paths and the importances per method."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_method: dict[str, list[Trial]] = {}
    for t in trials:
        by_method.setdefault(t.method, []).append(t)
    paths: list[Path] = []
    found: dict[str, dict[str, float]] = {}
    for method, members in sorted(by_method.items()):
        study_name = f"{experiment}/{method}"
        study = load_mirror_study(Path(optuna_db), study_name) if optuna_db else None
        imp = importances(study) if study is not None else None
        source = f"Optuna study {study_name}"
        if imp is None:
            imp = importances(study_from_trials(members, metric, mode, method))
            source = "MLflow params of the trials (in-memory Optuna study)"
        if not imp:
            note(
                f"importance {method}: skipped (needs two finished trials with a hyperparameter that varies)"
            )
            continue
        found[method] = imp
        names = list(imp)[::-1]
        fig = _figure(6.4, 1.2 + 0.35 * len(names))
        ax = fig.add_subplot(1, 1, 1)
        ax.barh(names, [imp[n] for n in names], color="tab:blue")
        ax.set_xlim(0, 1)
        ax.set_xlabel(f"fANOVA importance for {metric}")
        ax.set_title(f"{method}: parameter importance", fontsize=10)
        fig.text(0.01, 0.01, source, fontsize=7, alpha=0.7)
        fig.tight_layout(rect=(0, 0.04, 1, 1))
        path = out_dir / f"importance_{slug(method)}.png"
        fig.savefig(path)
        paths.append(path)
    return paths, found
