"""The report's table: best configuration per method and teacher -> student pair, read from MLflow.

Protocol (stated in every output): trials are grouped by data set, teacher (its architecture and, in a sweep
of several teachers, its name: shown ``<name>:<architecture>``), student and method; within a group, trials
that differ only in their seed are one configuration, scored by the mean of the sweep metric (a validation
metric, ``val_acc`` by default; test metrics are refused for ranking) over its seeds, among the configurations
with the most seeds (the one a sweep's repeats reran, once they ran); the best configuration's test accuracy is reported beside it (mean ± sample std over seeds), never used to choose.
Each trial's value is the last one it logged (Tune's default "last" scope). FAILED trials are left out; runs
still RUNNING (an interrupted sweep) count with what they logged.

Which runs are trials is :func:`kdtune.tracking.client.is_trial_run`'s one rule; a trial run carries
``method``, ``model``, ``teacher_model``, ``data`` and ``seed`` as MLflow params (or tags ``kdtune.<name>``),
and ``teacher_name`` where the sweep named its teachers. The hyperparameter cell shows what a person chose
(:func:`kdtune.tracking.views.group_hparams`); the CSV keeps all. More: docs/report.md §Table.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError, KdtuneError
from kdtune.report.published import published
from kdtune.tables import table
from kdtune.tracking.client import TAG_TRIAL_NAME, is_trial_run

SEED_KEYS = ("seed",)
# Per-epoch metrics of a distilled student that say how closely it follows its teacher (validation split).
TEACHER_FIT = ("val_agree", "val_kl_teacher")
# Params that change from trial to trial without changing the computation.
VOLATILE = frozenset(
    {"out", "trial_id", "trial_name", "resume", "overwrite", "device", "num_workers", "data_root", "download", "phase"}
)
# Params that say what is trained rather than how: never shown as hyperparameters.
BOOKKEEPING = frozenset(
    {
        "data",
        "dataset",
        "val_fraction",
        "data_seed",
        "model",
        "student",
        "teacher",
        "teacher_model",
        "teacher_name",
        "init",
        "method",
        "group",
        "amp",
        "channels_last",
        "compile",
        "eval_batch_size",
        "save_every",
        "preset",
    }
)


@dataclass
class Trial:
    run_id: str
    name: str
    status: str
    data: str | None
    teacher: str | None
    student: str | None
    method: str
    seed: str | None
    params: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    group: str | None = None  # the sweep's group (tag kdtune.group), where the run names one
    teacher_name: str | None = None  # the teacher's name in a sweep of several teachers (``teachers:``)

    @property
    def pair(self) -> tuple[str, str, str]:
        return (self.data or "-", self.teacher or "-", self.student or "-")

    @property
    def teacher_key(self) -> tuple[str, str, str | None, str]:
        """What tells the teacher -> student pairs apart: (data, teacher architecture, teacher name, student)."""
        return (self.data or "-", self.teacher or "-", self.teacher_name, self.student or "-")

    def config_key(self) -> tuple:
        return tuple(
            sorted(
                (k, v)
                for k, v in self.params.items()
                if k not in SEED_KEYS and k not in VOLATILE and not k.startswith("kdtune.")
            )
        )


def _get(run, *names: str) -> str | None:
    tags, params = run.data.tags, run.data.params
    for n in names:
        if f"kdtune.{n}" in tags:
            return tags[f"kdtune.{n}"]
    for n in names:
        if n in params and params[n] not in ("", "None"):
            return params[n]
    return None


def _teacher(run) -> str | None:
    """The teacher's architecture: tag kdtune.teacher, param teacher_model, or param teacher (a name or a path)."""
    tags, params = run.data.tags, run.data.params
    for value in (tags.get("kdtune.teacher"), params.get("teacher_model"), params.get("teacher")):
        if value not in (None, "", "None", "none"):  # "none": a group without a teacher (ce)
            if "/" in value or "\\" in value or Path(value).suffix:
                parts = Path(value).parts
                return "/".join(parts[-2:])
            return value
    return None


def trial_from_run(run) -> Trial | None:
    """A :class:`Trial` from an MLflow run, or ``None`` for what is no trial (the parent, stages, orphans:
    :func:`kdtune.tracking.client.is_trial_run`) and runs without a method."""
    tags = run.data.tags
    if not is_trial_run(run):
        return None
    method = _get(run, "method")
    if method is None:
        return None
    return Trial(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get(TAG_TRIAL_NAME) or run.info.run_id,
        status=run.info.status,
        data=_get(run, "data", "dataset"),
        teacher=_teacher(run),
        student=_get(run, "student", "model"),
        method=method,
        seed=_get(run, *SEED_KEYS),
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        group=tags.get("kdtune.group"),
        teacher_name=_get(run, "teacher_name"),
    )


def collect_trials(client, experiment_id: str) -> list[Trial]:
    from kdtune.tracking.client import search_all_runs

    runs = search_all_runs(client, [experiment_id], order_by=["attributes.start_time ASC"])
    return [t for t in (trial_from_run(r) for r in runs) if t is not None]


def recorded_hparams(experiment_tags: Mapping[str, str], trials: Iterable[Trial]) -> dict[str, list[str]]:
    """Per group of ``trials``: the logged names of its chosen hyperparameters (searched, or fixed by the
    spec) as its sweep recorded them in the experiment's tags (:func:`kdtune.tracking.views.group_hparams`);
    a group without a record is left out."""
    from kdtune.tracking.views import group_hparams

    out = {}
    for g in dict.fromkeys(t.group for t in trials if t.group):
        names = group_hparams(experiment_tags, g)
        if names is not None:
            out[g] = names
    return out


def check_metric(metric: str, mode: str) -> None:
    if mode not in ("max", "min"):
        raise ConfigError(f"mode={mode!r} is not valid; use max or min")
    if metric.lower().startswith("test"):
        raise ConfigError(
            f"metric={metric!r} would pick the best trial on the test set; rank by a validation metric "
            "(default val_acc): test accuracy is reported beside it"
        )


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _declared_hparams(method: str) -> set[str]:
    try:
        from kdtune.losses import METHODS

        return set(METHODS.get(method).hparams)
    except Exception:  # an unknown or unregistered method: rely on what varies
        return set()


def short_hparam(key: str, method: str) -> str:
    for prefix in ("hp.", f"{method}."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def pretty(value: str) -> str:
    """A param's string as a short number where it is one (``"0.00050000"`` -> ``"0.0005"``)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if x.is_integer() and abs(x) < 1e15 and "e" not in str(value).lower():
        return str(int(x))
    return f"{x:.4g}"


def hparam_keys(method: str, trials: list[Trial]) -> list[str]:
    """Params shown as a method's hyperparameters: its declared ones, prefixed ones, and any that vary. The
    method's declaration (which imports the losses, and torch: 2 s of a report) is read only for a plain key
    that does not vary (runs logged before params were prefixed by method)."""
    values: dict[str, set[str]] = {}
    for t in trials:
        for k, v in t.params.items():
            values.setdefault(k, set()).add(v)
    keys, declared = [], None
    for k in sorted(values):
        if k in SEED_KEYS or k in VOLATILE or k in BOOKKEEPING or k.startswith("kdtune."):
            continue
        if k != short_hparam(k, method) or len(values[k]) > 1:
            keys.append(k)
            continue
        if "." in k:  # another prefix (train.lr): no method declares it
            continue
        declared = _declared_hparams(method) if declared is None else declared
        if k in declared:
            keys.append(k)
    return keys


def best_rows(
    trials: Iterable[Trial], metric: str = "val_acc", mode: str = "max", chosen: Mapping[str, list[str]] | None = None
) -> list[dict[str, Any]]:
    """The best configuration of each (data, teacher, teacher name, student, method), as dicts (see module
    docstring). A row's ``teacher`` is the architecture, ``teacher_name`` the name (``None`` for a sweep's one
    ``teacher:``); ``test_accs`` the best configuration's test accuracies (one per seed, as ``seeds``);
    ``val_agree`` / ``val_kl_teacher`` the mean over its runs of their last value where logged, else ``None``.

    ``chosen``: group -> the logged names of its chosen hyperparameters (:func:`recorded_hparams`). A row's
    ``hparams`` holds every hyperparameter of its best configuration; ``shown_hparams`` the names (as in
    ``hparams``) of the chosen ones, which the text and Markdown tables show, or ``None`` where its trials'
    groups have no record (all are shown).
    """
    check_metric(metric, mode)
    chosen = chosen or {}
    groups: dict[tuple, list[Trial]] = {}
    for t in trials:
        groups.setdefault((*t.teacher_key, t.method), []).append(t)
    sign = 1.0 if mode == "max" else -1.0
    rows = []
    for (data, teacher, teacher_name, student, method), members in groups.items():
        ok = [
            t
            for t in members
            if t.status != "FAILED" and t.metrics.get(metric) is not None and math.isfinite(t.metrics[metric])
        ]
        if not ok:
            continue
        configs: dict[tuple, list[Trial]] = {}
        for t in ok:
            configs.setdefault(t.config_key(), []).append(t)

        def score(item):
            mean, _ = _mean_std([t.metrics[metric] for t in item[1]])
            return (sign * mean, len(item[1]))

        # A configuration the sweep repeated over seeds is the one it chose (on its first seed): it is reported,
        # never outranked by a configuration of one lucky seed whose mean no repeat has pulled back.
        most = max(len({t.seed for t in c}) for c in configs.values())
        _, best = max(((k, c) for k, c in configs.items() if len({t.seed for t in c}) == most), key=score)
        value, value_std = _mean_std([t.metrics[metric] for t in best])
        test, test_std = _mean_std([t.metrics.get("test_acc") for t in best])
        fit = {k: _mean_std([t.metrics.get(k) for t in best])[0] for k in TEACHER_FIT}
        keys = hparam_keys(method, members)
        recorded = [t.group for t in members if t.group in chosen]
        names = list(dict.fromkeys(n for g in dict.fromkeys(recorded) for n in chosen[g] if n not in SEED_KEYS))
        keys += [n for n in names if n not in keys]
        hp = {short_hparam(k, method): pretty(best[0].params[k]) for k in keys if k in best[0].params}
        shown = [short_hparam(n, method) for n in names if short_hparam(n, method) in hp] if recorded else None
        pub = published(None if data == "-" else data, None if teacher == "-" else teacher, student, method)
        rows.append(
            {
                "data": data,
                "teacher": teacher,
                "teacher_name": teacher_name,
                "student": student,
                "method": method,
                "metric": metric,
                "mode": mode,
                "value": value,
                "value_std": value_std,
                "n_seeds": len(best),
                "seeds": [t.seed for t in best],
                "test_acc": test,
                "test_acc_std": test_std,
                "test_accs": [t.metrics.get("test_acc") for t in best],
                **fit,
                "published": pub.acc if pub else None,
                "published_std": pub.std if pub else None,
                "published_source": pub.source if pub else None,
                "hparams": hp,
                "shown_hparams": shown,
                "run_ids": [t.run_id for t in best],
                "trials": [t.name for t in best],
                "n_trials": len(members),
                "n_failed": sum(t.status == "FAILED" for t in members),
                "n_configs": len(configs),
            }
        )
    rows.sort(
        key=lambda r: (r["data"], r["teacher"], r["teacher_name"] or "", r["student"], -sign * r["value"], r["method"])
    )
    return rows


def best_per_method(
    tracking_uri: str, experiment_name: str, metric: str = "val_acc", mode: str = "max"
) -> list[dict[str, Any]]:
    """Best trial configuration per method and teacher-student pair of an MLflow experiment.

    Each dict: data, teacher, teacher_name, student, method, metric, mode, value (mean over seeds), value_std,
    n_seeds, seeds, test_acc, test_acc_std, test_accs, val_agree, val_kl_teacher, published, published_std,
    published_source, hparams, run_ids, trials, n_trials, n_failed, n_configs. Sorted by pair, best method first.
    """
    from kdtune.tracking.client import get_client
    from kdtune.tracking.uri import normalize_tracking_uri, sqlite_path

    check_metric(metric, mode)
    uri = normalize_tracking_uri(tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # MLflow would create an empty store
        raise KdtuneError(f"no MLflow store at {db}; check the tracking URI (run `kdtune sweep` first)")
    client = get_client(uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        names = [e.name for e in client.search_experiments() if e.name != "Default"]
        raise KdtuneError(
            f"no MLflow experiment {experiment_name!r} at {uri}; experiments there: {', '.join(names) or 'none'}"
        )
    trials = collect_trials(client, exp.experiment_id)
    return best_rows(trials, metric, mode, recorded_hparams(exp.tags, trials))


# --------------------------------------------------------------------------- formatting
def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def teacher_label(row: Mapping[str, Any]) -> str:
    """The teacher as the table shows it: its architecture, ``<name>:<architecture>`` where it has a name."""
    name = row.get("teacher_name")
    return f"{name}:{row['teacher']}" if name else row["teacher"]


def _sources(rows: list[dict]) -> list[str]:
    out: list[str] = []
    for r in rows:
        s = r["published_source"]
        if s and s not in out:
            out.append(s)
    return out


def _cells(row: dict, sources: list[str]) -> list[str]:
    pub = "-"
    if row["published"] is not None:
        pub = _pm(row["published"], row["published_std"]) + f" [{sources.index(row['published_source']) + 1}]"
    teacher = teacher_label(row) if row["teacher"] != "-" or row.get("teacher_name") else "(none)"
    shown = row.get("shown_hparams")
    items = row["hparams"].items() if shown is None else [(k, row["hparams"][k]) for k in shown]
    hp = ", ".join(f"{k}={v}" for k, v in items) or "-"
    trials = f"{row['n_trials']}" + (f" ({row['n_failed']} failed)" if row["n_failed"] else "")
    return [
        f"{teacher} -> {row['student']}",
        row["method"],
        _pm(row["value"], row["value_std"]),
        str(row["n_seeds"]),
        _pm(row["test_acc"], row["test_acc_std"]),
        pub,
        hp,
        trials,
    ]


def _header(metric: str) -> list[str]:
    return [
        "teacher -> student",
        "method",
        metric,
        "seeds",
        "test_acc",
        "published",
        "hyperparameters",
        "trials",
    ]


def protocol_note(metric: str, mode: str) -> str:
    return (
        f"best configuration per method by the mean {metric} ({mode}) over its seeds, among those with the most seeds "
        "(the one the repeats reran), each trial's last value; test_acc of that configuration is reported, not "
        "optimised (mean ± sample std over seeds)"
    )


HPARAMS_NOTE = "hyperparameters: those searched or fixed in the spec (all of them: --csv, MLflow)"


def _notes(rows: list[dict], metric: str, mode: str) -> list[str]:
    notes = [protocol_note(metric, mode)]
    if any(r.get("shown_hparams") is not None for r in rows):
        notes.append(HPARAMS_NOTE)
    return notes


def format_text(rows: list[dict], metric: str = "val_acc", mode: str = "max", title: str | None = None) -> str:
    """A plain-text table, grouped by data set, with the published numbers' sources under it."""
    sources = _sources(rows)
    lines: list[str] = []
    if title:
        lines.append(title)
    header = _header(metric)
    for data in sorted({r["data"] for r in rows}):
        lines.append(f"data: {data}")
        lines.append(table(header, [_cells(r, sources) for r in rows if r["data"] == data]))
        lines.append("")
    lines.extend(_notes(rows, metric, mode))
    lines.extend(f"[{i}] {s}" for i, s in enumerate(sources, 1))
    return "\n".join(lines)


def format_markdown(
    rows: list[dict], metric: str = "val_acc", mode: str = "max", title: str | None = None, extra: str | None = None
) -> str:
    """The table as Markdown, a section per data set; ``extra`` (Markdown) appended (the teacher comparison)."""
    sources = _sources(rows)
    out: list[str] = []
    if title:
        out += [f"# {title}", ""]
    for data in sorted({r["data"] for r in rows}):
        out += [f"## {data}", ""]
        out.append(table(_header(metric), [_cells(r, sources) for r in rows if r["data"] == data], fmt="github"))
        out.append("")
    out.append("\n\n".join(n + "." for n in _notes(rows, metric, mode)))
    if sources:
        out += ["", "Published numbers (CIFAR-100 top-1 test accuracy, %):", ""]
        out += [f"{i}. {s}" for i, s in enumerate(sources, 1)]
    if extra:
        out += ["", extra.rstrip("\n")]
    return "\n".join(out) + "\n"


CSV_FIELDS = [
    "data",
    "teacher",
    "teacher_name",
    "student",
    "method",
    "metric",
    "value",
    "value_std",
    "n_seeds",
    "test_acc",
    "test_acc_std",
    "published",
    "published_std",
    "published_source",
    "hparams",
    "n_trials",
    "n_failed",
    "n_configs",
    "seeds",
    "run_ids",
    "trials",
]


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """One line per row; ``hparams`` as JSON, lists joined with ``;``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in rows:
            out = {k: r.get(k) for k in CSV_FIELDS}
            out["hparams"] = json.dumps(r["hparams"], sort_keys=True)
            for k in ("seeds", "run_ids", "trials"):
                out[k] = ";".join(str(x) for x in r[k])
            w.writerow({k: ("" if v is None else v) for k, v in out.items()})
    return path


def write_markdown(
    rows: list[dict], path: str | Path, metric: str = "val_acc", mode: str = "max", title=None, extra=None
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown(rows, metric, mode, title, extra))
    return path
