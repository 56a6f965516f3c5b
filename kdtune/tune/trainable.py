"""The one Ray Tune trainable: a unit of K ≥ 1 members (:mod:`kdtune.tune.protocol`) trained by one engine
unit (:func:`kdtune.engine.units.open_unit`: the plain Trainer for K = 1, a fused Bundle for K > 1), reported
to Tune once per epoch.

Per epoch: every live member's state is committed (:func:`commit_states`), its metrics logged to its MLflow run
and its ``epoch`` event written (:class:`~kdtune.tune.record.TrialRecord`); then each member is decided
(completed at the last epoch, pruned by the group's member rule when it has one) and closed before the unit's
report, because Tune may end the process once it has a final result. A member whose loss diverged is closed
``diverged`` and leaves the unit; the unit goes on with the others. Tune stopping the unit early (its
scheduler) closes the live members ``pruned``; an error closes them ``failed`` and is raised (Tune retries).
A restarted unit (a retried worker, a resumed driver) goes on from the committed epoch; members with a
``done.json`` are not trained again. The time spent on all this is measured (:class:`OrchestrationClock`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtune.tune.protocol import (
    GROUP_KEY,
    Member,
    Outcome,
    finite,
    members_of,
    report_rows,
    shared_unit,
)
from kdtune.tune.record import TrialRecord, numeric, read_done, trial_folder, write_event, write_json

COMMIT_FILE = "commit.json"
PENDING = "state.pending.pt"
# A report to Tune is a round trip through the driver (the trainable waits until the driver takes it): about
# 7 ms, and 14 ms with the pointer checkpoint, against 5-10 ms of training in a toy epoch. Between the epochs
# its scheduler decides at, a unit reports this often, for the live progress.
REPORT_EVERY_S = 2.0


@dataclass
class TrialContext:
    """What every trial of one group shares; pickled to the trial by Ray."""

    group: str
    method: str
    base: dict  # TrainConfig dict without the searched values
    experiment_dir: str
    threads: int = 1
    tracking_uri: str | None = None
    experiment_name: str | None = None
    parent_run_id: str | None = None
    phase: str = "search"  # "search" | "repeat"
    params: dict = field(default_factory=dict)  # extra MLflow params (student, teacher, data, ...)
    tags: dict = field(default_factory=dict)  # extra MLflow tags (kdtune.teacher_name)
    teacher_info: dict | None = None  # the teacher's accuracy, measured once by its stage
    init_info: dict | None = None  # the warm start's errors, measured once by the CE stage
    metric: str = "val_acc"
    mode: str = "max"
    # The group's member rule (:func:`kdtune.tune.fused.member_early_stopping`): rungs and reduction factor,
    # when members are pruned inside their unit (a group whose units Tune's scheduler runs FIFO).
    member_rule: dict | None = None
    # The epochs at which the group's scheduler decides (:func:`kdtune.tune.search.report_epochs`); None:
    # every epoch. A unit reports to Tune at these, at its end, and otherwise every ``REPORT_EVERY_S``.
    report_epochs: frozenset[int] | None = None
    models: str = "all"  # tracking.models: "all" (each completed member logs its student) or "best" (the driver)


def trial_config(ctx: TrialContext, config: dict[str, Any]):
    from kdtune.trial_config import trial_train_config

    return trial_train_config(ctx.method, ctx.base, config)


class OrchestrationClock:
    """Seconds a unit spends on everything but training and evaluation (checkpoints, MLflow, reports).
    ``figures()``: ``orch_s`` so far and ``orch_frac`` of the wall time since the training loop began."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.total = 0.0
        self._t0: float | None = None

    def begin(self) -> None:
        self._t0 = self.clock()

    def end(self) -> None:
        if self._t0 is not None:
            self.total += self.clock() - self._t0
            self._t0 = None

    def figures(self) -> dict[str, float]:
        now = self.clock()
        spent = self.total + (now - self._t0 if self._t0 is not None else 0.0)
        return {"orch_s": spent, "orch_frac": spent / max(now - self.start, 1e-9)}


def run_trial(config: dict[str, Any], ctxs: dict[str, TrialContext] | None = None, data=None,
              ctx: TrialContext | None = None) -> None:
    """The function trainable (``rayrt.make_trainable(run_trial, ctxs, data, budget)``): the unit's group,
    under ``kdtune.group`` in its config, picks its context (or give one ``ctx``)."""
    import torch
    from ray import tune

    group = config.get(GROUP_KEY)
    if ctx is None:
        assert ctxs is not None and group in ctxs, f"run_trial has no TrialContext for group {group!r}"
        ctx = ctxs[group]
    torch.set_num_threads(max(1, int(ctx.threads)))
    tctx = tune.get_context()
    uid = tctx.get_trial_id()
    Unit(ctx, uid, tctx.get_trial_name(), members_of(uid, config), data).run()


def commit_states(folder: Path, states: dict[str, tuple[Path, dict]], epoch: int) -> None:
    """Write each member's state so that all resume at one epoch: one member replaces its ``state.pt``
    atomically; several write ``state.pending.pt`` each, then ``commit.json`` names the epoch, then each
    pending file replaces ``state.pt`` (:func:`restore_states` rolls a committed epoch forward)."""
    from kdtune.engine.trainer import atomic_torch_save

    if not states:
        return
    if len(states) == 1:
        (ck, st), = states.values()
        atomic_torch_save(st, ck / "state.pt")
        return
    for ck, st in states.values():
        atomic_torch_save(st, ck / PENDING)
    write_json(folder / COMMIT_FILE, {"epoch": epoch, "members": list(states)})
    for ck, _ in states.values():
        (ck / PENDING).replace(ck / "state.pt")


def restore_states(folder: Path, cks: dict[str, Path], device) -> dict[str, dict]:
    """The members' states as committed: pending files of the committed epoch rolled forward, others dropped."""
    from kdtune.engine.trainer import read_state
    from kdtune.errors import CheckpointError

    try:
        committed = int(json.loads((folder / COMMIT_FILE).read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        committed = -1
    states = {}
    for mid, ck in cks.items():
        pending = ck / PENDING
        if pending.is_file():
            try:
                ok = int(read_state(pending, device)["epoch"]) == committed
            except CheckpointError:
                ok = False
            pending.replace(ck / "state.pt") if ok else pending.unlink()
        if (ck / "state.pt").is_file():
            states[mid] = read_state(ck / "state.pt", device)
    epochs = {mid: int(s["epoch"]) for mid, s in states.items()}
    if states and (len(states) != len(cks) or len(set(epochs.values())) != 1):
        raise CheckpointError(
            f"unit {folder.name}: its members' states are at different epochs ({epochs}, committed {committed}); "
            "restart it with failures.on_resume: restart"
        )
    return states


class Unit:
    """One Tune trial: its members' records, the engine unit that trains them, the reports."""

    def __init__(self, ctx: TrialContext, uid: str, name: str, members: list[Member], data):
        self.ctx, self.uid, self.data = ctx, uid, data
        self.shared = shared_unit(uid, members)  # None: the unit is its one member (one folder, one record)
        self.records = {m.id: TrialRecord(ctx, m.id, m.config, unit=self.shared,
                                          name=f"{name}-m{i}" if self.shared else name)
                        for i, m in enumerate(members)}  # fmt: skip
        self.folder = trial_folder(ctx.experiment_dir, uid)
        self.final: dict[str, dict] = {}
        self.engine = None
        self.pruner = None
        self.epochs = int(ctx.base.get("epochs") or 0)
        self.reported = time.monotonic()

    # ------------------------------------------------------------------ ownership
    def run(self) -> None:
        own = [self.folder] if self.shared else []  # a shared unit's own folder: its process's open/closed
        for f in own:
            f.mkdir(parents=True, exist_ok=True)
            write_event(f, event="open", trial_id=self.uid, members=list(self.records), nice=os.nice(0))
        for rec in self.records.values():
            rec.open()
        try:
            self._run()
        finally:
            for rec in self.records.values():
                rec.closed()
            for f in own:
                write_event(f, event="closed", trial_id=self.uid)

    def _run(self) -> None:
        for mid, rec in self.records.items():
            done = read_done(rec.folder)
            if done is not None:
                self.final[mid] = done
        live = [mid for mid in self.records if mid not in self.final]
        if not live:  # finished before the driver died, but after Tune's last snapshot: report again
            for mid, rec in self.records.items():
                rec.event(event="start", epoch=self.final[mid].get("epoch"), finished=True)
            return self.report()
        from kdtune.tune.rayrt import SharedData

        data = self.data.get() if isinstance(self.data, SharedData) else self.data
        try:
            self._train(live, data)
        except SystemExit:
            # Tune ends a unit by raising SystemExit in tune.report: after its last epoch (members closed
            # already), or earlier when its scheduler (ASHA) stops it: complete at lower fidelity.
            for mid in self._open():
                last = self.records[mid].last or {}
                if int(last.get("epoch") or 0) < self.epochs:
                    ep = last.get("epoch") or 0
                    self._close(mid, last, Outcome.PRUNED, f"stopped by the scheduler after epoch {ep}/{self.epochs}")
            raise
        except BaseException as e:
            for mid in self._open():
                try:
                    self.records[mid].close(Outcome.FAILED, self.records[mid].last or {}, f"{type(e).__name__}: {e}")
                except Exception:  # noqa: BLE001 - the unit's own error is the one to report
                    pass
            raise

    def _open(self) -> list[str]:
        return [mid for mid in self.records if mid not in self.final]

    # ------------------------------------------------------------------ training
    def _train(self, live: list[str], data) -> None:
        from kdtune.engine.units import open_unit
        from kdtune.tune.fused import MemberPruner

        ctx = self.ctx
        rule = ctx.member_rule or {}
        if rule.get("rungs"):
            self.pruner = MemberPruner(Path(ctx.experiment_dir) / "fuse" / ctx.group / "rungs.jsonl", rule["rungs"],
                                       float(rule.get("reduction_factor", 2.0)), ctx.mode)  # fmt: skip
        for mid in live:
            self.records[mid].open_run(ctx.tags)
        cfgs = [trial_config(ctx, self.records[mid].config) for mid in live]
        self.epochs = cfgs[0].epochs
        unit = self.engine = open_unit(cfgs, data=data, keys=live, teacher_info=ctx.teacher_info,
                                       init_info=ctx.init_info)  # fmt: skip
        states = restore_states(self.folder, {mid: self.records[mid].ck for mid in live}, unit.device)
        for mid, st in states.items():
            unit.load_member_state(mid, st)
        start = unit.epoch
        for mid in live:
            self.records[mid].event(event="start", epoch=start, epochs=self.epochs, bundle_size=unit.size)
            self.records[mid].end_tags["kdtune.bundle_mode"] = unit.mode  # lone, or a fused bundle's mode
        if self.shared:
            write_event(self.folder, event="start", trial_id=self.uid, epoch=start, members=list(unit.keys),
                        mode=unit.mode, exact=unit.exact, mode_exact=unit.mode_exact,
                        mode_ms={m: round(1e3 * t, 2) for m, t in unit.mode_timings.items()})  # fmt: skip
        if start > 0:  # a committed epoch whose bookkeeping a kill cut short: events, metrics, decisions
            for mid in live:
                self.records[mid].restore(unit.history(mid))
            self._decide({mid: unit.history(mid)[-1] for mid in live if unit.history(mid)})
            if not unit.size or unit.epoch >= self.epochs:
                return self.report()
        orch = OrchestrationClock()
        for ms in unit.run():
            orch.begin()
            self._epoch(ms, orch)
            orch.end()
            if not unit.size:
                break

    def _epoch(self, ms: list[dict], orch: OrchestrationClock) -> None:
        unit = self.engine
        by = {m["member"]: m for m in ms}
        for mid, m in by.items():  # diverged members first: out of the unit already, and out of the commit
            if m.get("diverged"):
                self._close(mid, m, Outcome.DIVERGED, m["error"])
        live = [mid for mid in unit.keys if mid in by]
        t_save = time.perf_counter()
        commit_states(self.folder, {mid: (self.records[mid].ck, unit.member_state(mid)) for mid in live}, unit.epoch)
        for mid in live:
            if by[mid].get("is_best"):
                unit.save_model(mid, self.records[mid].ck / "best.pt", durable=False)
        save_ms = round(1000 * (time.perf_counter() - t_save), 1)
        figures = orch.figures()
        merged = {}
        for mid in live:
            merged[mid] = {**numeric(by[mid]), **figures}
            self.records[mid].epoch(merged[mid], save_ms=save_ms)
        self._decide(merged)
        if self._due(unit.epoch):
            self.report(figures)

    def _due(self, epoch: int) -> bool:
        """Whether this epoch is reported to Tune: when no member is left, at an epoch the scheduler decides
        at (every epoch when the context names none), else every ``REPORT_EVERY_S``."""
        at = self.ctx.report_epochs
        return (not self._open() or at is None or epoch in at
                or time.monotonic() - self.reported >= REPORT_EVERY_S)  # fmt: skip

    def _decide(self, by: dict[str, dict]) -> None:
        """Per live member after a committed epoch: complete (last epoch), pruned (the member rule), or go on."""
        for mid, m in by.items():
            epoch = int(m["epoch"])
            if epoch >= self.epochs:
                self._close(mid, m, Outcome.COMPLETED)
            elif self.pruner is not None and self.pruner.prune(mid, epoch, m.get(self.ctx.metric)):
                self._close(mid, m, Outcome.PRUNED, f"stopped by ASHA's rule for members after epoch {epoch}/{self.epochs}")
                self.engine.drop(mid)

    def _close(self, mid: str, m: dict, outcome: Outcome, reason: str | None = None) -> None:
        unit, rec = self.engine, self.records[mid]
        model = None
        if outcome is Outcome.COMPLETED and unit is not None:
            unit.save_model(mid, rec.ck / "final.pt")
            model = unit.student(mid) if rec.logs_models else None  # a bundle's syncs the member from its stacks
        self.final[mid] = rec.close(outcome, m, reason, model=model, data=unit.data if unit is not None else None)

    # ------------------------------------------------------------------ reports
    def report(self, figures: dict | None = None) -> None:
        """One Tune report: the best live value of the metric (what Tune's scheduler reads), the epoch, and every
        member's row; with a pointer checkpoint (the epoch) so a restored unit keeps Tune's iteration count,
        but for its last report.
        (The epochs between reports reach Optuna from the members' epoch events: :class:`OptunaMirror`.)"""
        from ray import tune

        rows = {mid: self.final.get(mid) or self.records[mid].last or {} for mid in self.records}
        vals = [r.get(self.ctx.metric) for r in rows.values() if finite(r.get(self.ctx.metric))]
        best = (max(vals) if self.ctx.mode == "max" else min(vals)) if vals else math.nan
        epoch = max([int(r.get("epoch") or 0) for r in rows.values()], default=0)
        live = len(self._open())
        result = {self.ctx.metric: best, "epoch": epoch, "trial_id": self.uid, "bundle_size": live,
                  **(figures or {}), **report_rows(rows)}  # fmt: skip
        self.reported = time.monotonic()
        if not live:  # the unit's last report: a unit restored after it finds its members done (done.json)
            return tune.report(result)  # and no pointer is worth Tune's 7 ms of persisting one
        pointer = self.folder / "tune-ckpt"
        pointer.mkdir(parents=True, exist_ok=True)
        write_json(pointer / "progress.json", {"epoch": epoch, "folder": str(self.folder)}, durable=False)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(pointer)))
