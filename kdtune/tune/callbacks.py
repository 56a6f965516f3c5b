"""Tune callbacks of a sweep: live progress, and the mirror of finished trials into an Optuna database study
per group (SQLite beside the experiment) for ``optuna-dashboard`` and Optuna's importance tools.

The searcher's own studies live in memory and are saved with the experiment (an RDB-backed study did not
survive a hard driver kill, see shared/STACK.md); the mirror is written only from the driver, once per
trial (by its Tune trial id, so a resumed sweep never adds a trial twice), with the trial's real start and
end times, its per-epoch values, and PRUNED for a trial the scheduler stopped.
"""

from __future__ import annotations

import datetime as _dt
import math
import queue
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdtune.tune.diskfull import DiskFullStop, DiskFullWatch, error_text  # noqa: F401 - pickled Tune runs name them here
from kdtune.tune.experiment import whole_optuna_db
from kdtune.tune.protocol import (
    Outcome,
    finite,
    group_of,
    member_rows,
    members_of,
    shared_unit,
)
from kdtune.tune.search import name_metric


class ForgetStatistics(Callback):
    """Tune keeps, for every numeric key of every result of every trial (the config's values included), six
    running statistics and two deques (``Trial.metric_analysis``): 28 MB per 1,000 one-epoch trials of the
    driver's memory (tracemalloc, docs/bench.md), read only by Tune's best-trial lookups (``ResultGrid.
    get_best_result``, ``ExperimentAnalysis.best_trial``/``best_config``, any scope), which kdtune never calls
    (its results are its own records'; schedulers, stoppers and snapshots read ``last_result``). A finished
    trial's are dropped; a trial Tune retries starts them again."""

    def _drop(self, trial) -> None:
        md = trial.run_metadata
        md.metric_analysis, md.metric_n_steps = {}, {}

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._drop(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._drop(trial)


class TrialNamer:
    """``trial_name_creator``: ``<group>_<n>`` (n = Tune's trial counter), and the directory name with the id."""

    def __init__(self, group: str | None = None, with_id: bool = False):
        self.group = group
        self.with_id = with_id

    def __call__(self, trial) -> str:
        group = self.group or group_of(trial.config) or "trial"
        tag = str(getattr(trial, "experiment_tag", "") or "")
        num = tag.split("_", 1)[0]
        name = f"{group}_{int(num):03d}" if num.isdigit() else f"{group}_{trial.trial_id}"
        return f"{name}_{trial.trial_id}" if self.with_id else name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _dur(s: float) -> str:
    m, s = divmod(int(max(s, 0)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressPrinter(Callback):
    """One line per finished, stopped or failed trial; on a terminal also a compact table of the running
    trials (group, trial, epoch/total, metric, best so far in its group, ETA), redrawn every ``refresh_s``."""

    def __init__(self, metric: str, epochs: int, total: int | None = None, log=print, refresh_s: float = 5.0,
                 live: bool | None = None):  # fmt: skip
        self.metric = metric
        self.epochs = epochs
        self.total = total
        self.log = log
        self.refresh_s = refresh_s
        self.live = sys.stdout.isatty() if live is None else live
        self._running: dict[str, dict] = {}
        self._best: dict[str, float] = {}
        self._done = 0
        self._last_draw = 0.0
        self._drawn = 0

    def __getstate__(self):
        d = dict(self.__dict__)
        d["log"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.log = print

    def on_trial_start(self, iteration, trials, trial, **info):
        self._running[trial.trial_id] = {"group": group_of(trial.config) or "-", "epoch": 0, "value": None,
                                         "start": time.time()}  # fmt: skip

    def on_trial_result(self, iteration, trials, trial, result, **info):
        r = self._running.setdefault(trial.trial_id, {"group": group_of(trial.config) or "-", "start": time.time()})
        r["epoch"] = result.get("epoch", result.get("training_iteration", 0))
        r["value"] = result.get(self.metric)
        r["per_epoch"] = (time.time() - r["start"]) / max(int(r["epoch"] or 1), 1)

    def on_step_end(self, iteration, trials, **info):
        if not self.live or time.time() - self._last_draw < self.refresh_s or not self._running:
            return
        self._last_draw = time.time()
        from kdtune.tables import table

        rows = []
        for tid, r in sorted(self._running.items(), key=lambda kv: kv[1]["group"]):
            left = (self.epochs - int(r.get("epoch") or 0)) * r["per_epoch"] if r.get("per_epoch") else None
            v, b = r.get("value"), self._best.get(r["group"])
            rows.append((r["group"], tid, f"{r.get('epoch') or 0}/{self.epochs}", f"{v:.2f}" if finite(v) else "-",
                         f"{b:.2f}" if b is not None else "-", _dur(left) if left is not None else "-"))  # fmt: skip
        lines = table(("group", "trial", "epoch", self.metric, "best", "ETA"), rows).splitlines()
        head = f"{self._done}/{self.total} trials done" if self.total else f"{self._done} trials done"
        out = sys.stdout
        if self._drawn:
            out.write(f"\x1b[{self._drawn}F\x1b[J")  # back over the previous table, clear it
        out.write("\n".join([head, *lines]) + "\n")
        out.flush()
        self._drawn = len(lines) + 1

    def _line(self, text: str) -> None:
        if self._drawn:
            sys.stdout.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
        self.log(text)

    def _members_done(self, trial, failed: bool) -> None:
        """A unit ended: one line per member, each counted as a trial."""
        rows = member_rows(trial.trial_id, trial.config, trial.last_result, ended=True, error=failed,
                           epochs=self.epochs)  # fmt: skip
        group = group_of(trial.config) or "-"
        reason = ""
        if failed:
            lines = [ln for ln in error_text(trial).strip().splitlines() if ln.strip()]
            reason = lines[-1][:200] if lines else ""
        for m in members_of(trial.trial_id, trial.config):
            r = rows.get(m.id, {})
            self._done += 1
            ep, val, outcome = r.get("epoch", "?"), r.get(self.metric), Outcome(r["outcome"])
            how = {Outcome.COMPLETED: "done", Outcome.PRUNED: f"pruned at epoch {ep}/{self.epochs}"}.get(outcome, "FAILED")
            if finite(val):
                self._best[group] = max(self._best.get(group, -math.inf), float(val))
            val_s = f"{self.metric} {val:.2f}" if finite(val) else (reason or r.get("error") or "no result")
            test = r.get("test_acc")
            test_s = f" (test {test:.2f})" if finite(test) else ""
            count = f"[{self._done}/{self.total}] " if self.total else ""
            params = " ".join(f"{k}={_fmt(v)}" for k, v in m.config.items())
            self._line(f"  {count}{group:<18} {m.id}  {how:<20} {val_s}{test_s}  {params}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._running.pop(trial.trial_id, None)
        self._members_done(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._running.pop(trial.trial_id, None)
        self._members_done(trial, failed=True)


@dataclass
class _TrialCopy:
    """What the mirror reads of a Tune trial, copied in Tune's loop for the mirror's writer thread."""

    trial_id: str
    config: dict
    last_result: dict
    status: str

    @classmethod
    def of(cls, trial) -> _TrialCopy:
        return cls(trial.trial_id, dict(trial.config or {}), dict(trial.last_result or {}), trial.status)


class OptunaMirror(Callback):
    """Copy each finished Tune trial into the Optuna study of its group in ``storage_url`` (SQLite).

    One thread of its own writes, in the order units end (an Optuna trial through RDBStorage takes 45-65 ms on
    2 cores, which Tune's loop, and every report waiting on it, would lose), and alone touches the storage;
    ``on_experiment_end`` waits for it. A kill leaves queued writes to the next driver's :meth:`_reconcile`."""

    def __init__(self, storage_url: str, metric: str, mode: str, epochs: int, spaces: dict | None = None,
                 group_attrs: dict | None = None, experiment_dir: str | None = None, prefix: str = ""):  # fmt: skip
        self.storage_url = storage_url
        self.prefix = prefix  # of its studies' names in a database shared by experiments (tracking.optuna)
        self.experiment_dir = experiment_dir  # where each member's epoch events hold its whole curve
        self.metric = metric
        self.mode = mode
        self.epochs = int(epochs)
        self.spaces = dict(spaces or {})
        self.group_attrs = dict(group_attrs or {})
        self._studies: dict = {}
        self._curves: dict[str, dict[int, float]] = {}
        self._started: dict[str, float] = {}
        self._running_here: set[str] = set()  # units Tune's loop started in this process and no callback ended
        self._reconciled: set[str] = set()  # groups checked against Tune's trial list in this driver process
        self._have: dict[str, set] = {}  # per group, the member ids its study holds: read once per process
        self._queue: queue.Queue | None = None
        self._handed: set[str] = set()  # groups whose Tune trial list went to the writer (for its reconciliation)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_studies"] = {}
        d["_reconciled"] = set()
        d["_have"] = {}
        d["_queue"] = None
        d["_handed"] = set()
        d["_running_here"] = set()
        return d

    def _hand(self, trial, trials, failed: bool) -> None:
        """Queue a unit's end for the writer: a copy of the unit, and for a group's first, of Tune's trial list."""
        group = group_of(trial.config)
        if group is None:
            return
        handed = self.__dict__.setdefault("_handed", set())
        listed = None if group in handed else [_TrialCopy.of(t) for t in trials]
        handed.add(group)
        self._enqueue((group, _TrialCopy.of(trial), listed, failed))

    def _enqueue(self, job: tuple) -> None:
        if getattr(self, "_queue", None) is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._writer, args=(self._queue,), name="optuna-mirror", daemon=True).start()
        self._queue.put(job)

    def _writer(self, q: queue.Queue) -> None:
        while True:
            job = q.get()
            try:
                if job is None:
                    return
                group, current, listed, failed = job
                if listed is not None:  # the group's first unit in this process, or (no unit) the last check
                    self._reconcile(group, listed, current)
                if current is not None:
                    self._mirror(current, failed=failed)
            except Exception as e:  # noqa: BLE001 - a writer that died would leave flush() waiting for ever
                print(f"kdtune: warning: the Optuna mirror could not write to {self.storage_url}: {e}")
            finally:
                q.task_done()

    def flush(self) -> None:
        """Wait until every unit handed to the writer is in its study."""
        if getattr(self, "_queue", None) is not None:
            self._queue.join()

    def on_experiment_end(self, trials, **info):
        """Every group no unit ended in this process is checked too: a driver killed between a unit's end and
        its write, then resumed with nothing left to run in that group, would leave the study short of it. A unit
        started here that no callback ended is not finished, whatever its status: Tune ends the live units of an
        interrupted run (Ctrl-C) as TERMINATED without ``on_trial_complete``, and resumes them from its snapshot."""
        live = self.__dict__.setdefault("_running_here", set())
        listed = [replace(_TrialCopy.of(t), status="RUNNING") if t.trial_id in live else _TrialCopy.of(t)
                  for t in trials]  # fmt: skip
        for group in {group_of(t.config) for t in listed} - {None} - self.__dict__.setdefault("_handed", set()):
            self._handed.add(group)
            self._enqueue((group, None, listed, False))
        self.flush()
        if getattr(self, "_queue", None) is not None:
            self._queue.put(None)
            self._queue = None

    def _study_name(self, group: str) -> str:
        return getattr(self, "prefix", "") + group  # a mirror pickled before prefixes has none

    def study(self, group: str):
        if group not in self._studies:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            if not self._studies and self.storage_url.startswith("sqlite:///"):  # once, before its first study
                whole_optuna_db(Path(self.storage_url.removeprefix("sqlite:///")))
            study = optuna.create_study(
                storage=self.storage_url, study_name=self._study_name(group), load_if_exists=True,
                direction="maximize" if self.mode == "max" else "minimize",
            )  # fmt: skip
            name_metric(study, self.metric)
            for k, v in self.group_attrs.get(group, {}).items():
                study.set_user_attr(k, v)
            self._studies[group] = study
        return self._studies[group]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._started.setdefault(trial.trial_id, time.time())
        self.__dict__.setdefault("_running_here", set()).add(trial.trial_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for mid, r in member_rows(trial.trial_id, trial.config, result).items():
            if finite(r.get(self.metric)) and r.get("epoch") is not None:
                self._curves.setdefault(mid, {})[int(r["epoch"])] = float(r[self.metric])

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.__dict__.setdefault("_running_here", set()).discard(trial.trial_id)
        self._hand(trial, trials, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.__dict__.setdefault("_running_here", set()).discard(trial.trial_id)
        self._hand(trial, trials, failed=True)

    def _reconcile(self, group: str | None, trials, current) -> None:
        """Once per group and driver process, before its first mirror: make the group's study hold exactly the
        Tune trials. A trial mirrored by a driver killed before Tune's next snapshot named it is unknown to the
        restored Tune run (the searcher asked anew in its place: an orphan, as its MLflow run is tagged): the
        study is rebuilt without it. A finished trial the study lacks (a driver killed in the middle of such a
        rebuild) is mirrored from Tune's record of it."""
        reconciled = self.__dict__.setdefault("_reconciled", set())  # a mirror pickled before it kept them has none
        if group is None or group in reconciled:
            return
        reconciled.add(group)
        try:
            known = {t.trial_id for t in trials}
            study = self.study(group)
            mirrored = study.get_trials(deepcopy=False)
            kept = [t for t in mirrored if (t.user_attrs.get("bundle") or t.user_attrs.get("tune_trial_id")) in known]
            if len(kept) < len(mirrored):
                self._rebuild(group, study, kept)
            for t in trials:
                if (current is None or t.trial_id != current.trial_id) and group_of(t.config) == group and t.status in ("TERMINATED", "ERROR"):
                    self._mirror(t, failed=t.status == "ERROR")
        except Exception as e:  # noqa: BLE001 - the mirror must never break a sweep
            print(f"kdtune: warning: could not check study {group} in {self.storage_url} against Tune's trials: {e}")

    def _rebuild(self, group: str, study, kept: list) -> None:
        """The group's study again, holding only ``kept`` (with their values, curves and attributes)."""
        import optuna

        attrs = dict(study.user_attrs)
        optuna.delete_study(study_name=self._study_name(group), storage=self.storage_url)
        self._studies.pop(group, None)
        self.__dict__.setdefault("_have", {}).pop(group, None)
        new = self.study(group)  # created anew: direction, metric name and the group's attributes
        for k, v in attrs.items():
            new.set_user_attr(k, v)
        new.add_trials(kept)

    def _event_curve(self, mid: str) -> dict[int, float]:
        """A member's metric at each epoch, from its ``epoch`` events (Tune sees only :func:`report_epochs`)."""
        if getattr(self, "experiment_dir", None) is None:  # a mirror pickled before it had one
            return {}
        from kdtune.tune.record import read_events, trial_folder

        return {int(e["epoch"]): float(e[self.metric]) for e in read_events(trial_folder(self.experiment_dir, mid))
                if e.get("event") == "epoch" and e.get("epoch") is not None and finite(e.get(self.metric))}  # fmt: skip

    def _mirror(self, trial, failed: bool) -> None:
        """A unit ended: one Optuna trial per member (``tune_trial_id`` = the member id; ``bundle`` = the unit
        when it has several), with the member's own curve and outcome."""
        import optuna

        group = group_of(trial.config)
        if group is None:
            return
        try:
            study = self.study(group)
            held = self.__dict__.setdefault("_have", {})  # a mirror pickled before it kept them has none
            if group not in held:
                held[group] = {t.user_attrs.get("tune_trial_id") for t in study.get_trials(deepcopy=False)}
            have = held[group]
            members = members_of(trial.trial_id, trial.config)
            rows = member_rows(trial.trial_id, trial.config, trial.last_result, ended=True, error=failed,
                               epochs=self.epochs)  # fmt: skip
            end = time.time()
            start = self._started.pop(trial.trial_id, None) or end - float((trial.last_result or {}).get("time_total_s") or 0.0)
            space = self.spaces.get(group)
            for m in members:
                if m.id in have:
                    continue
                params, dists = {}, {}
                if space is not None:
                    _, dists, _ = space.record(m.config)
                    params = {k: m.config[k] for k in dists if k in m.config}
                r = rows.get(m.id, {})
                outcome, value = Outcome(r["outcome"]), r.get(self.metric)
                value = float(value) if outcome.ok and finite(value) else None
                attrs = {"tune_trial_id": m.id, "epochs_run": r.get("epoch"), "test_acc": r.get("test_acc"),
                         **{f"const.{k}": v for k, v in m.config.items() if k not in dists}}  # fmt: skip
                if shared_unit(trial.trial_id, members):
                    attrs["bundle"] = trial.trial_id
                ft = optuna.trial.create_trial(
                    params=params, distributions={k: dists[k] for k in params}, value=value,
                    state=outcome.optuna_state if value is not None or not outcome.ok else optuna.trial.TrialState.FAIL,
                    user_attrs=attrs, intermediate_values={**self._curves.pop(m.id, {}), **self._event_curve(m.id)},
                )  # fmt: skip
                ft.datetime_start = _dt.datetime.fromtimestamp(start)
                ft.datetime_complete = _dt.datetime.fromtimestamp(end)
                study.add_trial(ft)
                have.add(m.id)
        except Exception as e:  # noqa: BLE001 - the mirror must never break a sweep
            print(f"kdtune: warning: could not mirror trial {trial.trial_id} into {self.storage_url}: {e}")
