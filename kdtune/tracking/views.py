"""Saved views of MLflow 3's runs table, so that a sweep opens in the UI with the columns a person compares.

A saved view is an experiment tag ``mlflow.sharedViewState.<id>`` holding ``{"name", "createdAt",
"updatedAt", "state"}`` (``state``: the runs page's state as JSON); the page opens one with
``#/experiments/<id>/runs?viewStateShareKey=<id>``. A sweep writes, once its plan is known (the driver owns
the experiment's tags), ``kdtune-trials`` (every trial of the sweep, best first by the sweep's metric) and
``kdtune-<group>`` per group (its trials with its chosen hyperparameters,
:func:`kdtune.tune.runner.chosen_hparams`, under their logged names), and the same names per group as tag
``kdtune.hparams.<group>`` (:func:`hparams_tags`), which ``kdtune report`` shows in its text and Markdown
tables (:func:`group_hparams`). :func:`runs_url` carries ``workflowType=machine_learning``.

More: docs/mlflow_views.md (the format and how it was read off the UI, each view's columns).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote as urlquote

VIEW_TAG_PREFIX = "mlflow.sharedViewState."
HPARAMS_TAG_PREFIX = "kdtune.hparams."  # + group: the group's chosen hyperparameters (logged names, JSON list)
_COMMON_PARAMS = ("method", "student")  # the param columns of every view, before a group's own
VIEW_URL_KEY = "viewStateShareKey"
ALL_TRIALS = "kdtune-trials"
MAX_VIEWS = 40  # the UI refuses a 41st saved view of one experiment


def _col(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"


def _state(search: str, order_key: str, ascending: bool, columns: list[str]) -> dict[str, Any]:
    """The runs page's state, every key the UI writes, with kdtune's filter, order and columns."""
    return {
        "searchFilter": search,
        "orderByKey": order_key,
        "orderByAsc": ascending,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "columnOrder": [],
        "columnWidths": {},
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
        "globalLineChartConfig": {"xAxisKey": "step", "lineSmoothness": 0, "selectedXAxisMetricKey": ""},
    }


def view_id(group: str | None = None) -> str:
    """The id of a sweep's view: ``kdtune-trials``, or ``kdtune-<group>`` (letters, digits, ``-``, ``_``)."""
    if group is None:
        return ALL_TRIALS
    import re

    return "kdtune-" + (re.sub(r"[^A-Za-z0-9_-]+", "-", group).strip("-") or "group")


def sweep_views(metric: str, mode: str, groups: Sequence[tuple[str, Sequence[str]]],
                named_teachers: bool = False) -> dict[str, dict]:  # fmt: skip
    """``{view id: view}`` for a sweep: all trials, then one per ``(group, searched param names)``; each view
    ``{"name", "state"}``. Capped at the UI's 40 (the all-trials view and the first 39 groups). A sweep of
    several teachers (``named_teachers``) shows the ``teacher_name`` param beside the common columns."""
    from kdtune.tracking.client import TAG_OUTCOME, TAG_STOPPED_EPOCH, TRIAL_FILTER

    order, asc = _col("metrics", metric), mode == "min"
    common = [_col("metrics", metric)] + ([_col("metrics", "test_acc")] if metric != "test_acc" else [])
    params = (*_COMMON_PARAMS, "teacher_name") if named_teachers else _COMMON_PARAMS
    common += [*(_col("params", n) for n in params), _col("tags", TAG_OUTCOME),
               _col("tags", TAG_STOPPED_EPOCH)]  # fmt: skip
    trials = TRIAL_FILTER  # the trials, not the parent, stages or orphans (kdtune.tracking.client.is_trial_run)
    views = {ALL_TRIALS: {"name": "kdtune: all trials", "state": _state(trials, order, asc, common)}}
    for group, names in list(groups)[: MAX_VIEWS - 1]:
        cols = common + [_col("params", n) for n in names]
        search = f"{trials} AND tags.`kdtune.group` = '{group}'"
        views[view_id(group)] = {"name": f"kdtune: {group}", "state": _state(search, order, asc, cols)}
    return views


def _hparams_key(group: str) -> str:
    from kdtune.tracking.client import clean_key

    return clean_key(HPARAMS_TAG_PREFIX + group)


def hparams_tags(groups: Iterable[tuple[str, Sequence[str]]], existing: Mapping[str, str] | None = None
                 ) -> dict[str, str]:  # fmt: skip
    """The experiment tags that record each ``(group, chosen hyperparameters' logged names)``; one already
    recorded with the same names is left out (nothing to write)."""
    existing = dict(existing or {})
    out = {}
    for group, names in groups:
        key, value = _hparams_key(group), json.dumps(list(names))
        if existing.get(key) != value:
            out[key] = value
    return out


def group_hparams(tags: Mapping[str, str], group: str) -> list[str] | None:
    """The logged names of ``group``'s chosen hyperparameters, from an experiment's ``tags``: as the sweep
    recorded them (:func:`hparams_tags`), else the param columns of the group's saved view (a sweep of an
    older kdtune: its searched ones); ``None`` when the experiment says neither."""
    try:
        names = json.loads(tags[_hparams_key(group)])
        if isinstance(names, list):
            return [str(n) for n in names]
    except (KeyError, ValueError, TypeError):
        pass
    view = views_of(tags.items()).get(view_id(group))
    if view is None:
        return None
    cols = view["state"].get("selectedColumns") or []
    common = {_col("params", n) for n in _COMMON_PARAMS}
    return [c[len("params.`") : -1] for c in cols if c.startswith("params.`") and c.endswith("`") and c not in common]


def view_tags(views: Mapping[str, Mapping[str, Any]], existing: Mapping[str, str] | None = None,
              now_ms: int | None = None) -> dict[str, str]:  # fmt: skip
    """The experiment tags that hold ``views``; a view already saved keeps its ``createdAt``. A tag whose
    view is unchanged is left out (nothing to write)."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    existing = dict(existing or {})
    out: dict[str, str] = {}
    for vid, view in views.items():
        key = VIEW_TAG_PREFIX + vid
        state = json.dumps(view["state"], separators=(",", ":"))
        created = now_ms
        try:
            old = json.loads(existing[key])
            if old.get("state") == state and old.get("name") == view["name"]:
                continue
            created = int(old.get("createdAt", now_ms))
        except (KeyError, ValueError, TypeError, AttributeError):
            pass
        out[key] = json.dumps({"name": view["name"], "createdAt": created, "updatedAt": now_ms, "state": state})
    return out


def runs_url(base: str, experiment_id: str, view: str | None = ALL_TRIALS) -> str:
    """The address of an experiment's runs table in MLflow's UI, in its Model training mode, opened on
    ``view`` (None: the UI's default)."""
    url = f"{base.rstrip('/')}/#/experiments/{urlquote(str(experiment_id))}/runs?workflowType=machine_learning"
    return url + (f"&{VIEW_URL_KEY}={urlquote(view)}" if view else "")


def views_of(tags: Iterable[tuple[str, str]]) -> dict[str, dict]:
    """``{view id: {"name", "state"}}`` of an experiment's tags (a damaged one left out)."""
    out = {}
    for key, value in tags:
        if not key.startswith(VIEW_TAG_PREFIX):
            continue
        try:
            env = json.loads(value)
            out[key[len(VIEW_TAG_PREFIX) :]] = {"name": env["name"], "state": json.loads(env["state"])}
        except (ValueError, KeyError, TypeError):
            continue
    return out
