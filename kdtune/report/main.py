"""``kdtune report <experiment>``: the table, optional CSV/Markdown, and plots logged to the parent run.

A sweep of several teachers (trials naming 2 or more ``teacher_name``) also gets the teacher comparison
(:mod:`kdtune.report.compare`) after the table, and in the Markdown after the table's sections."""

from __future__ import annotations

from pathlib import Path

from kdtune.errors import KdtuneError

DEFAULT_STORAGE = "runs/sweeps"  # where `kdtune sweep` writes (kdtune.tune.experiment.DEFAULT_STORAGE)
SPEC_FILE = "spec.yaml"  # the spec a sweep saves in its experiment directory


def _is_experiment(d: Path) -> bool:
    return (d / "mlflow.db").is_file() or (d / SPEC_FILE).is_file()


def _spec_tracking_uri(exp_dir: Path) -> str | None:
    """The tracking URI the sweep's saved spec names (a tracking server), else None (the embedded store)."""
    import yaml

    try:
        raw = yaml.safe_load((exp_dir / SPEC_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    tracking = raw.get("tracking") if isinstance(raw, dict) else None
    if isinstance(tracking, str):
        return tracking or None
    return tracking.get("uri") if isinstance(tracking, dict) else None


def find_experiment_dir(experiment: str, storage: str | None = None) -> Path:
    """The directory ``kdtune sweep`` wrote: ``experiment`` as a path, else a name under ``storage`` (default
    runs/sweeps). One line naming where it looked, and what is there, when neither holds a sweep."""
    as_path = Path(experiment).expanduser()
    storage_dir = Path(storage or DEFAULT_STORAGE).expanduser()
    for c in (as_path, storage_dir / experiment):
        if c.is_dir() and _is_experiment(c):
            return c.absolute()
    there = (
        sorted(d.name for d in storage_dir.iterdir() if d.is_dir() and _is_experiment(d))
        if storage_dir.is_dir()
        else []
    )
    listed = f"experiments in {storage_dir}: {', '.join(there)}" if there else f"no experiment in {storage_dir}"
    raise KdtuneError(
        f"no experiment {experiment!r}: neither {as_path} nor {storage_dir / experiment} holds a sweep "
        f"(mlflow.db or {SPEC_FILE}); {listed}; run `kdtune sweep <spec>` first, or give the experiment's "
        "directory, or its name with --storage DIR"
    )


def resolve_experiment(experiment: str, storage: str | None, tracking_uri: str | None = None) -> tuple[str, Path, str]:
    """(experiment name, experiment directory, tracking URI) for ``experiment`` given as a name or a path.

    The URI is ``tracking_uri`` when given, else the one the sweep's saved spec names, else the embedded
    ``<dir>/mlflow.db``, which must exist (it is never created here).
    """
    from kdtune.tracking.uri import default_tracking_uri, normalize_tracking_uri

    exp_dir = find_experiment_dir(experiment, storage)
    name = exp_dir.name
    uri = tracking_uri or _spec_tracking_uri(exp_dir)
    if uri:
        return name, exp_dir, normalize_tracking_uri(uri)
    if not (exp_dir / "mlflow.db").is_file():
        raise KdtuneError(
            f"experiment {exp_dir} has no MLflow store ({exp_dir / 'mlflow.db'} does not exist: tracking was "
            "off, or the sweep has not started a trial yet); run `kdtune sweep <spec>` with tracking enabled"
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
    run's tags, else val_acc/max), out (plots' directory, implies plots; default ``<experiment dir>/report``).
    """
    from kdtune.report.table import (
        check_metric,
        collect_trials,
        format_text,
        recorded_hparams,
        write_csv,
        write_markdown,
    )
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

    rows = best_rows(trials, metric, mode, recorded_hparams(exp.tags, trials))
    if not rows:
        logged = sorted({k for t in trials for k in t.metrics})
        raise KdtuneError(
            f"experiment {exp.name!r} has no finished trial with metric {metric!r} yet "
            f"({len(trials)} trial runs; metrics logged: {', '.join(logged) or 'none'})"
        )
    title = f"kdtune report: {exp.name} ({len(trials)} trials)"
    print(format_text(rows, metric, mode, title=title), flush=True)
    from kdtune.report.compare import read_spec, teacher_comparison, teacher_names

    teachers = None
    if len(teacher_names(trials)) >= 2:
        spec = read_spec(exp_dir, client, parent.info.run_id if parent else None)
        teachers = teacher_comparison(client, exp.experiment_id, rows, spec)
    if teachers is not None:
        print("", teachers.text(), sep="\n", flush=True)

    written: list[Path] = []
    if getattr(args, "csv", None):
        written.append(write_csv(rows, args.csv))
    if getattr(args, "markdown", None):
        extra = teachers.markdown() if teachers is not None else None
        written.append(write_markdown(rows, args.markdown, metric, mode, title=title, extra=extra))
    for p in written:
        print(f"wrote {p}")

    if getattr(args, "plots", False) or getattr(args, "out", None):
        from kdtune.report.plots import (
            plot_accuracy,
            plot_curves,
            plot_importances,
            plot_loss_terms,
            stage_values,
        )
        from kdtune.tune.experiment import saved_optuna_storage

        out_dir = Path(getattr(args, "out", None) or getattr(args, "plots_dir", None) or exp_dir / "report")
        pngs = plot_curves(client, rows, metric, out_dir, stage_values(client, exp.experiment_id))
        pngs += plot_loss_terms(client, rows, out_dir)
        pngs += plot_accuracy(rows, out_dir)
        imp_pngs, imps = plot_importances(trials, metric, mode, out_dir, exp.name, optuna=saved_optuna_storage(exp_dir))
        for key, imp in imps.items():
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(imp.items())[:5])
            print(f"importance {key}: {top}")
        pngs += imp_pngs
        if parent is not None:
            from kdtune.tracking.client import log_path

            for p in pngs + written:
                log_path(client, parent.info.run_id, p, "report")
        for p in pngs:
            print(f"wrote {p}")
        if parent is not None and pngs:
            print(f"logged {len(pngs)} plots to the parent run {parent.info.run_id} (artifacts/report)")
    if not getattr(args, "from_sweep", False):  # the sweep's own last lines say where to look
        print(f"MLflow UI: mlflow ui --backend-store-uri {uri}  (then open http://127.0.0.1:5000)")
        print(f"dashboards (MLflow and Optuna): kdtune dashboard {exp_dir}")
    return 0
