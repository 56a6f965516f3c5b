"""The report's plots (PNG; each file says what it shows in its PNG text: Title and Description).

From the MLflow runs (matplotlib's Agg canvas, no global backend change): learning curves per teacher ->
student pair (each method's best configuration, mean ± std over its seeds, teacher and CE baseline dashed),
the loss terms per epoch of each method's best trial, and test accuracy per method beside the published
number.

From the Optuna studies the sweep mirrors into ``<experiment>/optuna.db`` (one per group), with Optuna's own
``optuna.visualization.matplotlib``: hyperparameter importances (fANOVA, seeded; skipped below two complete
trials), parallel coordinates and intermediate values. A method without a mirrored study gets its
importances from its MLflow runs, put into an in-memory Optuna study.

More: docs/report.md §Plots (what each figure draws).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdtune.report.table import SEED_KEYS, VOLATILE, Trial, hparam_keys, short_hparam, teacher_label
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
    for m in sorted(retry_locked(client.get_metric_history, run_id, metric), key=lambda m: (m.step, m.timestamp)):
        out[int(m.step)] = float(m.value)  # a resumed epoch logged twice: the later value wins
    return out


def _save(fig, path: Path, title: str, labels: list[str]) -> Path:
    """Save ``fig`` as PNG with its title and what it draws (``labels``) in the file's text chunks."""
    fig.savefig(path, metadata={"Title": title, "Description": "; ".join(labels)})
    return path


def stage_values(client, experiment_id: str) -> dict[str, dict[str, float]]:
    """The metrics of each stage run (``teacher``, ``ce-<student>``), by stage name."""
    from kdtune.tracking.client import TAG_STAGE, search_all_runs

    out: dict[str, dict[str, float]] = {}
    for r in search_all_runs(client, [experiment_id], "tags.`kdtune.role` = 'stage'"):
        name = r.data.tags.get(TAG_STAGE)
        if name:
            out[name] = dict(r.data.metrics)
    return out


def _pairs(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """Rows by (data, teacher, student), the teacher as the table shows it (``<name>:<architecture>`` in a
    sweep of several teachers); a CE row without a teacher joins its student's pair when there is one (it is
    that pair's baseline), else stands alone."""
    pairs: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        pairs.setdefault((r["data"], teacher_label(r), r["student"]), []).append(r)
    for key in [k for k in pairs if k[1] == "-"]:
        others = [k for k in pairs if k[1] != "-" and k[0] == key[0] and k[2] == key[2]]
        if others:
            for k in others:
                pairs[k].extend(pairs[key])
            del pairs[key]
    return pairs


def _who(data: str, teacher: str, student: str) -> str:
    return (f"{teacher} -> {student}" if teacher != "-" else student) + f" on {data}"


def _fname(kind: str, data: str, teacher: str, student: str) -> str:
    pair = f"{slug(teacher)}-{slug(student)}" if teacher != "-" else slug(student)
    return f"{kind}_{slug(data)}_{pair}.png"


def plot_curves(
    client, rows: list[dict], metric: str, out_dir: str | Path, stages: dict[str, dict[str, float]] | None = None
) -> list[Path]:
    """One PNG per (data, teacher, student): ``metric`` vs epoch of each method's best configuration, with
    the teacher's and the CE baseline's ``metric`` as dashed lines where known."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = stages or {}
    paths = []
    for (data, teacher, student), prs in sorted(_pairs(rows).items()):
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        labels: list[str] = []
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
            label = f"{r['method']} ({r['value']:.2f}" + (f", {r['n_seeds']} seeds)" if r["n_seeds"] > 1 else ")")
            (line,) = ax.plot(steps, means, marker="o", markersize=2.5, linewidth=1.4, label=label)
            if r["n_seeds"] > 1:
                ax.fill_between(steps, lows, highs, alpha=0.2, color=line.get_color(), linewidth=0)
            labels.append(label)
        if not labels:
            continue
        name = next((r["teacher_name"] for r in prs if r.get("teacher_name")), None)
        stage = stages.get(f"teacher-{name}" if name else "teacher", {})  # its stage (kdtune.tune.plan)
        if teacher != "-" and metric in stage:
            label = f"teacher {teacher} ({stage[metric]:.2f})"
            ax.axhline(stage[metric], color="black", linestyle="--", linewidth=1, label=label)
            labels.append(label)
        ce = [r for r in rows if r["method"] == "ce" and r["data"] == data and r["student"] == student]
        ce_value = ce[0]["value"] if ce else stages.get(f"ce-{student}", {}).get(metric)
        if ce_value is not None:
            label = f"CE baseline ({ce_value:.2f})"
            ax.axhline(ce_value, color="grey", linestyle=":", linewidth=1.2, label=label)
            labels.append(label)
        title = f"{_who(data, teacher, student)}: best configuration per method"
        ax.set_title(title, fontsize=10)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / _fname("curves", data, teacher, student), title, labels))
    return paths


def _loss_keys(metrics: dict[str, float]) -> list[str]:
    return sorted(k for k in metrics if k.startswith("loss_")) + (["train_loss"] if "train_loss" in metrics else [])


def plot_loss_terms(client, rows: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per pair: a panel per method, each loss term of its best trial (first seed) per epoch."""
    from kdtune.tracking.client import retry_locked

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (data, teacher, student), prs in sorted(_pairs(rows).items()):
        panels = []
        for r in prs:
            run_id = r["run_ids"][0]
            keys = _loss_keys(retry_locked(client.get_run, run_id).data.metrics)
            if keys:
                panels.append((r, {k: _history(client, run_id, k) for k in keys}))
        if not panels:
            continue
        cols = min(3, len(panels))
        rows_n = (len(panels) + cols - 1) // cols
        fig = _figure(4.0 * cols, 3.0 * rows_n + 0.6)
        labels = []
        for i, (r, curves) in enumerate(panels):
            ax = fig.add_subplot(rows_n, cols, i + 1)
            for k, h in curves.items():
                steps = sorted(h)
                ax.plot(steps, [h[s] for s in steps], linewidth=1.3, label=k,
                        linestyle="--" if k == "train_loss" else "-")  # fmt: skip
            ax.set_title(f"{r['method']} ({r['trials'][0]})", fontsize=9)
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch", fontsize=8)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            labels.append(f"{r['method']}: {', '.join(curves)}")
        title = f"{_who(data, teacher, student)}: loss terms of each method's best trial"
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / _fname("losses", data, teacher, student), title, labels))
    return paths


def plot_accuracy(rows: list[dict], out_dir: str | Path) -> list[Path]:
    """One PNG per pair: test accuracy per method (mean ± std over seeds) beside the published number."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (data, teacher, student), prs in sorted(_pairs(rows).items()):
        prs = [r for r in prs if r["test_acc"] is not None]
        if not prs:
            continue
        fig = _figure(max(6.0, 1.1 * len(prs) + 2.0), 4.0)
        ax = fig.add_subplot(1, 1, 1)
        xs = list(range(len(prs)))
        ours = [r["test_acc"] for r in prs]
        ax.bar([x - 0.2 for x in xs], ours, 0.4, yerr=[r["test_acc_std"] or 0.0 for r in prs], capsize=3,
               label="this sweep (test_acc of the best validation config)", color="tab:blue")  # fmt: skip
        pub = [(x, r) for x, r in zip(xs, prs) if r["published"] is not None]
        if pub:
            ax.bar([x + 0.2 for x, _ in pub], [r["published"] for _, r in pub], 0.4,
                   yerr=[r["published_std"] or 0.0 for _, r in pub], capsize=3, color="tab:orange",
                   hatch="//", label="published")  # fmt: skip
        labels = [f"{r['method']} {r['test_acc']:.2f}" + (f" vs published {r['published']:.2f}" if r["published"]
                  is not None else " (no published number)") for r in prs]  # fmt: skip
        for x, v in zip(xs, ours):
            ax.text(x - 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, [r["method"] for r in prs])
        lo = min(ours + [r["published"] for _, r in pub])
        ax.set_ylim(max(0.0, lo - 10.0), None)
        ax.set_ylabel("test accuracy (%)")
        title = f"{_who(data, teacher, student)}: test accuracy per method"
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths.append(_save(fig, out_dir / _fname("accuracy", data, teacher, student), title, labels))
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
        if k not in SEED_KEYS and k not in VOLATILE and len({t.params.get(k) for t in done if k in t.params}) > 1
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
        params, used = {}, {}
        for k, d in dists.items():
            if k in t.params:
                v = _parse(t.params[k])
                name = short_hparam(k, method)  # dkd.beta -> beta, as the mirrored studies name it
                params[name] = str(v) if isinstance(d, CategoricalDistribution) else v
                used[name] = d
        study.add_trial(optuna.trial.create_trial(params=params, distributions=used, value=t.metrics[metric]))
    return study


def mirror_studies(storage: str, prefix: str = "") -> list:
    """Every study of the sweep's Optuna mirror (one per group) in ``storage``, those named ``prefix...`` in
    a database shared by experiments; ``[]`` without the file of a SQLite mirror."""
    if storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        return []
    import optuna

    try:
        return [optuna.load_study(study_name=n, storage=storage) for n in optuna.get_all_study_names(storage)
                if n.startswith(prefix)]  # fmt: skip
    except Exception:  # an unreadable or foreign database: fall back to MLflow
        return []


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


def _complete(study) -> int:
    import optuna

    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


def _optuna_figure(make, path: Path, title: str, labels: list[str], size=(7.0, 4.2)) -> Path:
    """Run one of ``optuna.visualization.matplotlib``'s plots, retitle it, save it as PNG, close it."""
    import warnings

    import matplotlib

    if "matplotlib.pyplot" not in __import__("sys").modules:
        matplotlib.use("Agg")  # Optuna draws with pyplot: no display here
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        warnings.simplefilter("ignore", UserWarning)  # a parameter with one value: matplotlib widens its axis
        ax = make()
    fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
    try:
        fig.set_size_inches(*size)
        for a in fig.axes:  # Optuna titles its plots on the left: ours names the study and the trial count
            a.set_title("", loc="left")
        main = ax if hasattr(ax, "set_title") else ax.flat[0]
        main.set_title(title, fontsize=10)
        fig.tight_layout()
        return _save(fig, path, title, labels)
    finally:
        plt.close(fig)


def plot_studies(studies, metric: str, out_dir: str | Path, note: Callable[[str], None] = print,
                 importance_only: bool = False):  # fmt: skip
    """Optuna's importances, parallel coordinates and intermediate values of each study; returns (PNG paths,
    importances by study name)."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    found: dict[str, dict[str, float]] = {}
    for study in studies:
        name, n = study.study_name, _complete(study)
        trials = study.get_trials(deepcopy=False)
        imp = importances(study)
        if imp is None and not any(t.params for t in trials):
            note(f"importance {name}: skipped (nothing searched)")
        elif imp is None:
            note(f"importance {name}: skipped ({n} complete trial{'s' if n != 1 else ''}; needs 2 or more with "
                 "a hyperparameter that varies)")  # fmt: skip
        else:
            found[name] = imp
            title = f"{name}: hyperparameter importance for {metric} ({n} complete trials)"
            paths.append(_optuna_figure(
                lambda s=study: ovm.plot_param_importances(s, evaluator=FanovaImportanceEvaluator(seed=0)),
                out_dir / f"importance_{slug(name)}.png", title, [f"{k} {v:.3f}" for k, v in imp.items()]))  # fmt: skip
        if importance_only:
            continue
        if n >= 1 and any(t.params for t in trials):
            title = f"{name}: parallel coordinates of {metric} ({n} complete trials)"
            paths.append(_optuna_figure(
                lambda s=study: ovm.plot_parallel_coordinate(s, target_name=metric),
                out_dir / f"parallel_{slug(name)}.png", title, sorted({k for t in trials for k in t.params}),
                size=(8.0, 4.5)))  # fmt: skip
        curves = [t for t in trials if t.intermediate_values]
        if curves:
            pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in curves)
            title = f"{name}: {metric} per epoch of {len(curves)} trials ({pruned} pruned)"
            paths.append(_optuna_figure(
                lambda s=study: ovm.plot_intermediate_values(s),
                out_dir / f"intermediate_{slug(name)}.png", title, [f"trial {t.number}" for t in curves]))  # fmt: skip
    return paths, found


def plot_importances(
    trials: list[Trial],
    metric: str,
    mode: str,
    out_dir: str | Path,
    experiment: str,
    optuna: tuple[str, str] | None = None,
    note: Callable[[str], None] = print,
) -> tuple[list[Path], dict[str, dict[str, float]]]:
    """The Optuna plots of every mirrored study (:func:`plot_studies`; ``optuna``: the mirror's storage and
    study prefix, :func:`kdtune.tune.experiment.optuna_storage`), and for each method no study covers, its
    importances from the MLflow runs (an in-memory study named after the method)."""
    studies = mirror_studies(*optuna) if optuna else []
    paths, found = plot_studies(studies, metric, out_dir, note)
    covered = {s.user_attrs.get("method") for s in studies}
    by_method: dict[str, list[Trial]] = {}
    for t in trials:
        by_method.setdefault(t.method, []).append(t)
    import optuna

    from_mlflow = []
    for method, members in sorted(by_method.items()):
        if method in covered:
            continue
        study = study_from_trials(members, metric, mode, method)
        from_mlflow.append(optuna.create_study(study_name=method, direction=study.direction))
        from_mlflow[-1].add_trials(study.trials)
    more, imps = plot_studies(from_mlflow, metric, out_dir, note, importance_only=True)
    return paths + more, {**found, **imps}
