"""``kdtune report <experiment>``: the table, optional CSV/Markdown, and plots logged to the parent run."""

from __future__ import annotations

import os
from pathlib import Path

from kdtune.errors import KdtuneError

DEFAULT_STORAGE = "./kdtune-experiments"


def resolve_experiment(
    experiment: str, storage: str | None, tracking_uri: str | None
) -> tuple[str, Path, str]:
    """(experiment name, experiment directory, tracking URI) for ``experiment`` given as a name or a path.

    A name is looked up under ``storage``; a path to an experiment directory works too. Without
    ``tracking_uri`` the sweep's embedded ``<dir>/mlflow.db`` must exist (it is never created here).
    """
    from kdtune.tracking.uri import default_tracking_uri, normalize_tracking_uri

    storage_dir = Path(storage or DEFAULT_STORAGE).expanduser()
    as_path = Path(experiment).expanduser()
    candidates = [storage_dir / experiment]
    if as_path != candidates[0]:
        candidates.append(as_path)
    exp_dir = next((c for c in candidates if (c / "mlflow.db").is_file()), None)
    if exp_dir is None:
        exp_dir = as_path if (os.sep in experiment or "/" in experiment) else storage_dir / experiment
    name = exp_dir.name or experiment
    if tracking_uri:
        return name, exp_dir, normalize_tracking_uri(tracking_uri)
    if not (exp_dir / "mlflow.db").is_file():
        raise KdtuneError(
            f"no experiment {experiment!r}: {exp_dir / 'mlflow.db'} does not exist; run `kdtune sweep <spec>` "
            "first, or pass --storage DIR (default ./kdtune-experiments) or --tracking-uri"
        )
    return name, exp_dir, default_tracking_uri(exp_dir)


def _experiment(client, name: str):
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp
    others = [e for e in client.search_experiments() if e.name != "Default"]
    if len(others) == 1:
        return others[0]
    raise KdtuneError(
        f"no MLflow experiment {name!r} in this tracking store; experiments there: "
        f"{', '.join(e.name for e in others) or 'none'}"
    )


def main_report(args) -> int:
    """Print the best trial per method and pair; write CSV/Markdown and plots when asked.

    ``args`` fields: experiment (name or path), storage (dir), tracking_uri (optional), csv (path or None),
    markdown (path or None), plots (bool); optional: metric, mode (default: the sweep's, from the parent
    run's tags, else val_acc/max), plots_dir (default ``<experiment dir>/report``).
    """
    from kdtune.report.table import check_metric, collect_trials, format_text, write_csv, write_markdown
    from kdtune.tracking.client import TAG_METRIC, TAG_MODE, TAG_ROLE, get_client, search_all_runs

    name, exp_dir, uri = resolve_experiment(
        args.experiment, getattr(args, "storage", None), getattr(args, "tracking_uri", None)
    )
    client = get_client(uri)
    exp = _experiment(client, name)
    parents = search_all_runs(client, [exp.experiment_id], f"tags.`{TAG_ROLE}` = 'parent'")
    parent = parents[0] if parents else None
    ptags = parent.data.tags if parent else {}
    metric = getattr(args, "metric", None) or ptags.get(TAG_METRIC) or "val_acc"
    mode = getattr(args, "mode", None) or ptags.get(TAG_MODE) or "max"
    check_metric(metric, mode)

    trials = collect_trials(client, exp.experiment_id)
    from kdtune.report.table import best_rows

    rows = best_rows(trials, metric, mode)
    if not rows:
        logged = sorted({k for t in trials for k in t.metrics})
        raise KdtuneError(
            f"experiment {exp.name!r} has no finished trial with metric {metric!r} yet "
            f"({len(trials)} trial runs; metrics logged: {', '.join(logged) or 'none'})"
        )
    title = f"kdtune report: {exp.name} ({len(trials)} trials)"
    print(format_text(rows, metric, mode, title=title), flush=True)

    written: list[Path] = []
    if getattr(args, "csv", None):
        written.append(write_csv(rows, args.csv))
    if getattr(args, "markdown", None):
        written.append(write_markdown(rows, args.markdown, metric, mode, title=title))
    for p in written:
        print(f"wrote {p}")

    if getattr(args, "plots", False):
        from kdtune.report.plots import plot_curves, plot_importances

        out_dir = Path(getattr(args, "plots_dir", None) or exp_dir / "report")
        pngs = plot_curves(client, rows, metric, out_dir)
        imp_pngs, imps = plot_importances(
            trials, metric, mode, out_dir, exp.name, optuna_db=exp_dir / "optuna.db"
        )
        for method, imp in imps.items():
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(imp.items())[:5])
            print(f"importance {method}: {top}")
        pngs += imp_pngs
        if parent is not None:
            from kdtune.tracking.client import log_path

            for p in pngs + written:
                log_path(client, parent.info.run_id, p, "report")
        for p in pngs:
            print(f"wrote {p}")
        if parent is not None and pngs:
            print(f"logged {len(pngs)} plots to the parent run {parent.info.run_id} (artifacts/report)")
    print(f"MLflow UI: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
    return 0
