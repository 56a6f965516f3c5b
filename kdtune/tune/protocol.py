"""The wire format every consumer of a sweep's trials shares: units, members, member rows and outcomes.

A Tune trial is a *unit* of K ≥ 1 *members*; each member is a trial everywhere else (its folder, MLflow run,
Optuna trial, row in ``results.json``). A unit of K > 1 carries its members under :data:`MEMBERS_KEY` in its
config (ids ``<unit id>-m<i>``); a unit of one carries its configuration flat and its member's id is the unit's
own, so folders, configs and checkpoints of lone trials keep their layout. This module is the only place that
tells the two apart: everyone else iterates :func:`members_of` and :func:`member_rows`.

A unit reports each member's figures as flat keys ``member/<id>/<key>`` (:func:`report_rows`); results written
before that format (a lone trial's own top-level keys) read the same through :func:`member_rows`. A member's
:class:`Outcome` is decided by :func:`decide` alone and mapped to Optuna's state by :attr:`Outcome.optuna_state`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

GROUP_KEY = "kdtune.group"
MEMBERS_KEY = "kdtune.members"
MEMBER_PREFIX = "member/"  # the flat keys of members' rows in the results of experiments begun before MEMBERS_JSON
# Members' rows as one JSON string under this key: Tune keeps running statistics of every numeric key of every
# trial's results in the driver (3.8 MB per 1,000 trials and key, measured by ``kdtune bench --simulate``).
MEMBERS_JSON = "kdtune.members_json"
# Per-member figures reported to Tune (read by the searcher, the mirror, the progress lines and the summaries).
MEMBER_KEYS = ("epoch", "val_acc", "best_val_acc", "val_loss", "train_loss", "test_acc", "test_loss",
               "test_acc_at_best_val", "orch_frac", "orch_s")  # fmt: skip


def finite(v: Any) -> bool:
    """A real number that is not NaN or infinite (bools are not numbers here)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def group_of(config: dict | None) -> str | None:
    return (config or {}).get(GROUP_KEY)


class Outcome(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    PRUNED = "pruned"  # stopped early by the scheduler's rule (ASHA), complete at lower fidelity
    FAILED = "failed"
    DIVERGED = "diverged"  # its loss became NaN or infinite

    @property
    def optuna_state(self):
        from optuna.trial import TrialState

        return {Outcome.COMPLETED: TrialState.COMPLETE, Outcome.PRUNED: TrialState.PRUNED,
                Outcome.RUNNING: TrialState.RUNNING}.get(self, TrialState.FAIL)  # fmt: skip

    @property
    def ok(self) -> bool:
        return self in (Outcome.COMPLETED, Outcome.PRUNED)


def decide(epochs_run: int | None, epochs: int, error_kind: str | None = None, value: Any = 0.0) -> Outcome:
    """A finished member's outcome from what it ran and how it ended: ``error_kind`` ``"diverged"`` or any other
    error; no error, a finite ``value`` and all ``epochs``: completed; fewer: pruned; no finite value: failed."""
    if error_kind == "diverged":
        return Outcome.DIVERGED
    if error_kind or not finite(value) or epochs_run is None:
        return Outcome.FAILED
    return Outcome.COMPLETED if int(epochs_run) >= epochs else Outcome.PRUNED


@dataclass(frozen=True)
class Member:
    id: str
    config: dict  # the member's hyperparameters (no group key)
    number: int | None = None  # its Optuna trial number in the group's study, when the searcher knows it


def members_of(trial_id: str, config: dict | None) -> list[Member]:
    """The members of the unit ``trial_id`` with this Tune config (a lone trial: one, with the unit's id)."""
    config = config or {}
    if MEMBERS_KEY in config:
        return [Member(m["id"], dict(m["config"]), m.get("number")) for m in config[MEMBERS_KEY]]
    return [Member(trial_id, {k: v for k, v in config.items() if k != GROUP_KEY})]


def unit_config(group: str, members: list[Member]) -> dict:
    """The Tune config of a unit of these members (a unit of one carries its config flat)."""
    if len(members) == 1:
        return {GROUP_KEY: group, **members[0].config}
    return {GROUP_KEY: group, MEMBERS_KEY: [{"id": m.id, "number": m.number, "config": m.config} for m in members]}


def shared_unit(trial_id: str, members: list[Member]) -> str | None:
    """The unit id its members share (their ``bundle``), or None when the unit is its one member (same id,
    one folder). A unit of one carried under ``MEMBERS_KEY`` (written before units of one were flat) is shared."""
    return trial_id if any(m.id != trial_id for m in members) else None


def member_id(unit_id: str, i: int, size: int) -> str:
    return unit_id if size == 1 else f"{unit_id}-m{i}"


def report_rows(rows: dict[str, dict]) -> dict[str, Any]:
    """Members' figures as a unit reports them: one JSON string (:data:`MEMBERS_JSON`)."""
    return {MEMBERS_JSON: json.dumps({mid: {k: v for k, v in r.items() if v is not None} for mid, r in rows.items()})}


def member_rows(trial_id: str, config: dict | None, result: dict | None, *, ended: bool = False,
                error: bool = False, epochs: int | None = None) -> dict[str, dict]:
    """Each member's latest figures from its unit's (flat) result, with its ``outcome``: the one the unit
    reported, else, once the unit has ``ended``, :func:`decide`'s from its epochs (a member still running when
    Tune stopped its unit without ``error`` was stopped by the scheduler: pruned), else ``running``."""
    result = result or {}
    out: dict[str, dict] = {}
    if isinstance(result.get(MEMBERS_JSON), str):
        out = {mid: dict(r) for mid, r in json.loads(result[MEMBERS_JSON]).items()}
    for k, v in result.items():  # the flat keys of results written before MEMBERS_JSON
        if isinstance(k, str) and k.startswith(MEMBER_PREFIX):
            mid, _, key = k[len(MEMBER_PREFIX):].rpartition("/")
            if mid:
                out.setdefault(mid, {})[key] = v
    members = members_of(trial_id, config)
    if not out and len(members) == 1 and result:  # a lone trial's result written before member rows
        out[members[0].id] = {k: result.get(k) for k in MEMBER_KEYS if k in result}
        out[members[0].id].setdefault("epoch", result.get("training_iteration"))
    rows = {}
    for m in members:
        r = dict(out.get(m.id, {}))
        outcome = r.get("outcome")
        if outcome in (None, Outcome.RUNNING.value) and ended:
            metric_ok = any(finite(v) for k, v in r.items() if k not in ("epoch", "orch_s", "orch_frac"))
            outcome = (Outcome.FAILED if error or not metric_ok or r.get("epoch") is None
                       else decide(r.get("epoch"), epochs if epochs is not None else int(r["epoch"]) + 1)).value
        r["outcome"] = outcome or Outcome.RUNNING.value
        rows[m.id] = r
    return rows


@dataclass
class MemberResult:
    """A member as the driver's summaries and repairs read it: ``metrics`` (its row, with ``trial_id`` = the
    member id and ``bundle`` = its unit's id when it shares one), ``config`` (group + hyperparameters),
    ``outcome``, ``error`` (one line, or None) and ``path`` (the unit's Tune folder)."""

    metrics: dict
    config: dict
    outcome: Outcome
    error: str | None
    path: str


def unit_id_of(result) -> str:
    """The Tune trial id of a Tune ``Result`` (its folder name ends with it)."""
    return str((result.metrics or {}).get("trial_id") or Path(result.path).name.rsplit("_", 1)[-1])


def expand_members(results, epochs: int) -> list[MemberResult]:
    """Tune results as member results, one per member of each unit."""
    out = []
    for r in results:
        uid = unit_id_of(r)
        config = r.config or {}
        members = members_of(uid, config)
        rows = member_rows(uid, config, r.metrics, ended=True, error=r.error is not None, epochs=epochs)
        unit_error = (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error is not None else None
        for m in members:
            row = dict(rows.get(m.id, {}))
            outcome = Outcome(row.pop("outcome"))
            error = row.pop("error", None)
            if outcome is Outcome.DIVERGED:
                error = f"DivergedError: {error or 'diverged'}"
            elif outcome is Outcome.FAILED:
                error = unit_error or error or f"the unit {uid} ended before member {m.id} did"
            else:
                error = None
            metrics = {**row, "trial_id": m.id}
            if shared_unit(uid, members):
                metrics["bundle"] = uid
            out.append(MemberResult(metrics, {GROUP_KEY: config.get(GROUP_KEY), **m.config}, outcome, error,
                                    str(r.path)))  # fmt: skip
    return out
