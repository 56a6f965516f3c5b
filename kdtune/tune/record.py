"""One trial's record: its folder, its events and its MLflow run, opened, restored, advanced and closed here.

A member of a unit (:mod:`kdtune.tune.protocol`) owns ``<experiment>/trials/<member id>/``: ``ckpt/``
(``state.pt``, ``best.pt``, ``final.pt``), ``done.json`` (its final figures and ``outcome``, written once when it
ends) and ``events.jsonl``, an append-only audit trail (``open``, ``start``, ``epoch``, ``done``/``stopped``/
``diverged``/``failed``, ``closed``; ``recovered: true`` on an epoch event written after a kill). One owner per
record: the process between its ``open`` and ``closed`` events owns the folder and the MLflow run; anyone else
(the driver's repairs) touches them only once :func:`trial_gone` says that process let go. A member with a
``done.json`` is never trained again. Liveness is the process's, checked on this host (:func:`pid_alive`).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from kdtune.storage import atomic_write_text, pid_alive, read_jsonl
from kdtune.tune.protocol import MEMBER_KEYS, Outcome

EVENTS_FILE = "events.jsonl"
DONE_FILE = "done.json"
# the event a member's end writes, by outcome
END_EVENTS = {Outcome.COMPLETED: "done", Outcome.PRUNED: "stopped", Outcome.DIVERGED: "diverged",
              Outcome.FAILED: "failed"}  # fmt: skip


def trial_folder(experiment_dir: str | Path, trial_id: str) -> Path:
    return Path(experiment_dir) / "trials" / trial_id


def read_events(folder: Path) -> list[dict]:
    """The events of a trial folder, oldest first (a line a kill cut short is skipped)."""
    return read_jsonl(folder / EVENTS_FILE)


def write_event(folder: Path, **kw) -> None:
    """Append one event (with time, pid and host) to a folder's ``events.jsonl``."""
    kw.setdefault("time", time.time())
    kw.setdefault("pid", os.getpid())
    kw.setdefault("host", socket.gethostname())
    try:
        with open(folder / EVENTS_FILE, "a") as f:
            f.write(json.dumps(kw, default=str) + "\n")
    except OSError:
        pass


def write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, default=str), durable=durable)


def numeric(m: dict[str, Any]) -> dict[str, Any]:
    """The numbers of an epoch's metrics (what Tune, the searcher and MLflow are given)."""
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "is_best"}


def recover_epoch_events(folder: Path, history: list[dict], trial_id: str, **kw) -> None:
    """A process killed after it saved an epoch's state but before it wrote the epoch's event trained that
    epoch once: its event is written now, marked ``recovered``, so the trail matches the state resumed from."""
    seen = {e.get("epoch") for e in read_events(folder) if e.get("event") == "epoch"}
    for h in history:
        if h.get("epoch") not in seen:
            write_event(folder, event="epoch", epoch=h.get("epoch"), trial_id=trial_id, recovered=True, **kw)


def read_done(folder: Path) -> dict | None:
    """The final figures of a member that ended (``outcome`` completed when the file predates outcomes)."""
    try:
        final = json.loads((folder / DONE_FILE).read_text())
    except (OSError, ValueError):
        return None
    final.setdefault("outcome", Outcome.COMPLETED.value)
    return final


def trial_gone(folder: Path) -> bool:
    """Whether the process that last opened this folder has let go of its records: it wrote its ``closed``
    event after its last ``open``, or it is dead (checked on this host only). A folder never opened is gone."""
    last_start = None
    closed = False
    for ev in read_events(folder):
        if ev.get("event") == "open":
            last_start, closed = ev, False
        elif ev.get("event") == "closed" and last_start is not None and ev.get("pid") == last_start.get("pid"):
            closed = True
    if last_start is None or closed:
        return True
    if last_start.get("host") == socket.gethostname():
        return not pid_alive(int(last_start.get("pid", -1)))
    return False


def wait_trials_gone(folders: list[Path], timeout_s: float = 60.0, poll_s: float = 0.2) -> list[Path]:
    """Poll until every folder is :func:`trial_gone`; returns those still held after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pending = list(folders)
    while pending:
        pending = [f for f in pending if not trial_gone(f)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return pending


class TrialRecord:
    """One member's folder, events and MLflow run (``ctx``: its group's :class:`~kdtune.tune.trainable.
    TrialContext`; ``unit``: the id of the unit it shares with others, None for a unit of one)."""

    def __init__(self, ctx, member_id: str, config: dict, unit: str | None = None, name: str | None = None):
        self.ctx = ctx
        self.id = member_id
        self.config = config
        self.unit = unit
        self.name = name or member_id
        self.folder = trial_folder(ctx.experiment_dir, member_id)
        self.ck = self.folder / "ckpt"
        self.tracker = None
        self.fresh = False
        self.last: dict | None = None  # the figures of its latest epoch
        self.end_tags: dict = {}  # tags its run gets with its outcome (how its unit ran: kdtune.bundle_mode)

    @property
    def logs_models(self) -> bool:
        """Whether this member's close logs its ``best.pt`` and its student (``tracking.models: all``); else the
        driver logs them for each group's best trial after the sweep."""
        return getattr(self.ctx, "models", "all") == "all"

    # ------------------------------------------------------------------ events and files
    def event(self, **kw) -> None:
        if self.unit:
            kw.setdefault("bundle", self.unit)
        write_event(self.folder, trial_id=self.id, **kw)

    def open(self) -> None:
        """Take the record (its folder, its run): the ``open`` event says this process owns it now. ``fresh``:
        no process opened it before (so it has no MLflow run yet)."""
        self.ck.mkdir(parents=True, exist_ok=True)
        self.fresh = not any(e.get("event") == "open" for e in read_events(self.folder))
        self.event(event="open", nice=os.nice(0))

    def closed(self) -> None:
        """Let go of the record: after this event the driver may touch the run."""
        self.event(event="closed")

    def row(self, m: dict, outcome: Outcome) -> dict:
        """The member's figures as its unit reports them."""
        r = {k: m.get(k) for k in MEMBER_KEYS if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)}
        r["outcome"] = outcome.value
        return r

    # ------------------------------------------------------------------ the MLflow run
    def open_run(self, tags: dict | None = None) -> None:
        ctx = self.ctx
        if not ctx.tracking_uri:
            return
        from kdtune.tracking import TrialTracker
        from kdtune.tracking.client import TAG_OUTCOME

        t = {"kdtune.group": ctx.group, "kdtune.method": ctx.method, "kdtune.phase": ctx.phase,
             "kdtune.trial_dir": str(self.folder), TAG_OUTCOME: "running", **(tags or {})}  # fmt: skip
        if self.unit:
            t["kdtune.bundle"] = self.unit
        tr = TrialTracker(ctx.tracking_uri, ctx.experiment_name, ctx.parent_run_id, self.id, self.name,
                          background=True, system_metrics=self.unit is None, fresh=self.fresh, tags=t)  # fmt: skip
        seed = self.config.get("train.seed", self.config.get("seed", ctx.base.get("seed")))
        tr.log_trial_params(ctx.method, self.config, ctx.base,  # the names every trial logs (dkd.beta, train.lr)
                            {**ctx.params, "method": ctx.method, "phase": ctx.phase, "seed": seed})  # fmt: skip
        self.tracker = tr

    def restore(self, history: list[dict]) -> None:
        """What a kill kept from the record of the epochs its state holds: epoch events, MLflow metrics."""
        recover_epoch_events(self.folder, history, self.id, **({"bundle": self.unit} if self.unit else {}))
        if self.tracker is not None and history:
            self.tracker.backfill(history)
        if history:
            self.last = self.row(history[-1], Outcome.RUNNING)

    def epoch(self, result: dict, **kw) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(result, step=result["epoch"])
        metric = getattr(self.ctx, "metric", "val_acc")  # the curve the Optuna mirror reads (intermediate values)
        self.event(event="epoch", epoch=result["epoch"], orch_s=result.get("orch_s"), **{metric: result.get(metric)},
                   **kw)  # fmt: skip
        self.last = self.row(result, Outcome.RUNNING)

    def close(self, outcome: Outcome, m: dict, reason: str | None = None, model=None, data=None) -> dict:
        """End the member: its artifacts (with ``tracking.models: all``: ``best.pt``, and ``model`` for a completed
        one; else the driver logs them for each group's best), its run's outcome and
        status, ``done.json``, its end event. Returns its final row. A tracking failure costs no trained
        member: it is an ``unrecorded`` event the driver's repairs act on."""
        final = {**self.row(m, outcome), "epoch": m.get("epoch")}
        if reason and outcome in (Outcome.DIVERGED, Outcome.FAILED):
            final["error"] = str(reason)[:500]
        tr = self.tracker
        if tr is not None and not tr.ended:
            from kdtune.tracking.client import TAG_OUTCOME, TAG_STOPPED_EPOCH

            try:
                if self.logs_models:
                    if (self.ck / "best.pt").is_file():
                        tr.log_artifact(self.ck / "best.pt", "checkpoints")
                    if model is not None:
                        tr.log_student(model, data, step=int(m.get("epoch") or 0))
            except Exception as e:  # noqa: BLE001
                self.event(event="unrecorded", what="artifacts", reason=f"{type(e).__name__}: {e}"[:500])
            tags = {**self.end_tags, TAG_OUTCOME: outcome.value}
            if outcome is not Outcome.COMPLETED:
                tags[TAG_STOPPED_EPOCH] = m.get("epoch") or 0
            if outcome is Outcome.PRUNED and reason:
                tags["kdtune.stop_reason"] = reason
            failed = outcome in (Outcome.DIVERGED, Outcome.FAILED)
            try:
                tr.end("FAILED" if failed else "FINISHED", f"{outcome.value}: {reason}" if failed else None, tags=tags)
            except Exception as e:  # noqa: BLE001 - the member is trained: the driver records its run afterwards
                self.event(event="unrecorded", what="run", reason=f"{type(e).__name__}: {e}"[:500])
        if outcome is not Outcome.FAILED:  # a failed member is trained again by a retry or a resume
            write_json(self.folder / DONE_FILE, final)
        self.event(event=END_EVENTS[outcome], epoch=m.get("epoch"), outcome=outcome.value)
        self.last = None
        return final
