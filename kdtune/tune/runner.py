"""The sweep driver: spec -> plan -> stages -> one Tune experiment for all groups -> results, resumable.

The experiment folder is :class:`kdtune.tune.experiment.Experiment`; planning is
:func:`kdtune.tune.plan.plan` (pure); the searcher and the per-group scheduler are in
:mod:`kdtune.tune.search`; a trial is :func:`kdtune.tune.trainable.run_trial`.

Ownership (one writer per record at any time):

- ``spec.yaml``, ``spaces/``, ``state.json``, ``results.json`` and the parent MLflow run: the driver holding
  ``sweep.lock`` (a second driver is refused in one line).
- A stage's folder: the one process that wins :func:`kdtune.storage.build_once`'s lock for its key; readers
  verify its manifest.
- A trial's folder and its MLflow run: the trial's process, from its ``open`` event to its ``closed`` event in
  ``events.jsonl``. The driver touches a trial's run (to close what a killed process left RUNNING) only once
  that process is known to be gone (:func:`kdtune.tune.trainable.trial_gone`). Tag writes are idempotent
  (:func:`kdtune.tracking.client.retry_locked` retries a collided upsert), so even a race costs nothing.
- ``optuna.db``: the driver's :class:`~kdtune.tune.callbacks.OptunaMirror`, once per finished trial.
- ``tune/<name>/`` (Tune's snapshots and checkpoints): Tune's controller in the driver; every file lands whole
  (:mod:`kdtune.tune.tunefs`), and a resume rebuilds the searcher from the trial list it restores
  (:class:`~kdtune.tune.search.GroupedSearchGenerator`).

A tracking failure never costs a trained trial: what the driver could not record is said in one line, and
``kdtune resume`` records it.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError, DiskFullError, KdtuneError, disk_full_message, is_disk_full
from kdtune.spec import SweepSpec, load_spec
from kdtune.tune.experiment import (
    DEFAULT_STORAGE,  # noqa: F401 - re-exported
    RESULTS_FILE,  # noqa: F401 - re-exported
    SPEC_FILE,  # noqa: F401 - re-exported
    STATE_FILE,  # noqa: F401 - re-exported
    Experiment,
    find_experiment,  # noqa: F401 - re-exported
)
from kdtune.tune.plan import SweepPlan, plan, space_sources

TUNE_NAME = "sweep"
REPEATS_NAME = "repeats"
_DRIVER_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard files per trial
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter, silent at verbose=0
    # Snapshot the experiment (trials, searcher) every 2 s instead of 10: a killed driver loses less.
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    # Ray runs its workers at nice 15, so a trial beside any other work on the machine (in one scheduling
    # group) got ~4 % of a core: the demo beside two busy processes took 10 min instead of 30 s. The trials
    # are the sweep's work: they run at the driver's own priority (``nice kdtune sweep`` lowers them all).
    "RAY_worker_niceness": "0",
}
# Reach the trial processes through the job's runtime_env (variables set after ray.init do not).
_WORKER_ENV = {
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",  # time for a stopped trial to close its MLflow run
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


class SweepFailed(KdtuneError):
    """A sweep whose work produced no result (every trial failed): one line per cause; exit status 1."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    """What ``kdtune.sweep(...)`` returns: one summary per (student, method) group and the overall best."""

    name: str
    experiment_dir: str
    status: str
    metric: str
    mode: str
    groups: list = field(default_factory=list)
    best: dict | None = None
    tracking_uri: str | None = None
    stages: dict = field(default_factory=dict)
    wall_s: float | None = None
    slot_utilisation: float | None = None  # trial wall time / (concurrency x the sweep's wall after its stages)
    stages_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def group(self, method: str, student: str | None = None) -> dict:
        for g in self.groups:
            if g["method"] == method and (student is None or g["student"] == student):
                return g
        raise KeyError(method)

    def table(self) -> str:
        """Best trial per (student, method), as a fixed-width text table."""
        from kdtune.tables import table

        rows = []
        for g in self.groups:
            b = g.get("best") or {}
            rep = g.get("repeats")
            val = _num(b.get(self.metric))
            test = _num(b.get("test_acc"))
            if rep:
                val = (
                    f"{rep['val_mean']:.2f} ± {rep['val_std']:.2f}"
                    if rep.get("val_mean") is not None
                    else val
                )
                test = f"{rep['test_mean']:.2f} ± {rep['test_std']:.2f}"
            counts = f"{g.get('trials', 0)}"
            extra = []
            if g.get("stopped"):
                extra.append(f"{g['stopped']} stopped")
            if g.get("errored"):
                extra.append(f"{g['errored']} failed")
            if extra:
                counts += f" ({', '.join(extra)})"
            hp = " ".join(f"{k}={_short(v)}" for k, v in (b.get("config") or {}).items()) or "-"
            rows.append((g["student"], g["method"], counts, val, test, hp))
        return table(("student", "method", "trials", f"best {self.metric}", "test_acc", "hyperparameters"), rows)


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------- state


def read_state(exp: Path) -> dict[str, Any]:
    return Experiment(exp).state()


def write_state(exp: Path, state: dict[str, Any]) -> None:
    Experiment(exp).write_state(state)


def spec_of(exp: Path) -> SweepSpec:
    return Experiment(exp).spec()


# ---------------------------------------------------------------------------------------------- entry points


def sweep(spec_or_path: SweepSpec | str | Path | dict, *, log=print) -> SweepResult:
    """Run the sweep a spec describes; an existing unfinished experiment of that name is resumed."""
    spec = spec_or_path if isinstance(spec_or_path, SweepSpec) else load_spec(spec_or_path)
    return _Sweep(spec, log=log).run(resume_only=False)


def resume(experiment: str, storage: str | None = None, *, log=print) -> SweepResult:
    """Finish an interrupted sweep (``kdtune resume``), from its saved spec and spaces."""
    exp = find_experiment(experiment, storage)
    spec = spec_of(exp)
    if Path(spec.experiment_dir).resolve() != exp.resolve():
        # The folder was moved: follow it (storage is where it lies now).
        raw = spec.to_dict()
        raw["storage"] = str(exp.parent)
        raw["name"] = exp.name
        spec = load_spec(raw)
    return _Sweep(spec, log=log).run(resume_only=True)


def prepare(spec: SweepSpec) -> dict[str, Any]:
    """Everything a sweep checks before Ray starts (``kdtune validate``): the plan, described."""
    p = plan(spec)
    return {"groups": [{"student": g.student, "method": g.method, "parameters": p.space(g).describe(),
                        "starts": g.starts, "notes": g.notes, "trials": g.budget, "fuse": g.fuse,
                        "units": g.units} for g in p.groups],
            "stages": {n: str(st.dir) for n, st in p.stages.items()}}  # fmt: skip


# ---------------------------------------------------------------------------------------------- the driver


class _Sweep:
    def __init__(self, spec: SweepSpec, log=print):
        self.spec = spec
        self.log = log
        self.exp = Path(spec.experiment_dir)
        self.folder = Experiment(self.exp)
        self.tracker = None
        self.parent_run_id = None
        self.tracking_uri = None
        self.unrecorded: list[str] = []
        self._tracker_ready: Future | None = None
        if spec.tracking.enabled:
            from kdtune.tracking import default_tracking_uri

            self.tracking_uri = spec.tracking.uri or default_tracking_uri(self.exp)

    # ------------------------------------------------------------------ run
    def run(self, resume_only: bool) -> SweepResult:
        spec, log, folder = self.spec, self.log, self.folder
        t0 = time.time()
        state = folder.state()
        done = self._finished(state, "is already finished")
        if done is not None:
            self._record_leftovers(state)
            return done
        if folder.started:
            log(f"resuming experiment {spec.name} ({self.exp})")
        elif resume_only:
            raise ConfigError(f"nothing to resume: {self.exp} holds no sweep ({SPEC_FILE} is missing)")

        # ---- everything that can be refused is checked before Ray starts
        from kdtune.data import load_data
        from kdtune.preflight import preflight

        preflight(spec)  # what the spec points at: checkpoints, method constraints, data, damaged files

        sources = space_sources(spec)
        data = load_data(spec.data, root=spec.data_root, download=spec.download, val_fraction=spec.val_fraction,
                         seed=spec.data_seed)  # fmt: skip
        the_plan = plan(spec, sources=sources, num_classes=data.num_classes)
        if self.tracking_uri:
            from kdtune.tracking import check_tracking_uri

            check_tracking_uri(self.tracking_uri)

        from kdtune.tune.lock import SweepLock

        with SweepLock(self.exp) as lock:
            if lock.took_over:
                log(f"took over the lock of a dead sweep driver (pid {lock.took_over.get('pid')})")
            # Read again under the lock: another driver may have begun or finished this experiment while this
            # one was checking and loading (a finished sweep must not be run again).
            state = folder.state()
            done = self._finished(state, "was finished meanwhile by another driver")
            if done is not None:
                return done
            if not folder.started:
                folder.write_start(spec, sources)
                state = {"status": "running", "groups": {}, "started": time.time()}
            state["status"] = "running"
            state.pop("damaged", None)
            folder.write_state(state)
            # The tracking store is opened (SQLite schema migrations: seconds on a fresh store) in a thread while
            # Ray starts: both are mostly waiting, on files and on Ray's processes.
            self._tracker_ready = _in_thread(self._open_tracker) if self.tracking_uri else None
            starting = _ray_starting()
            if starting:
                log(f"{starting}{' (MLflow opens beside it)' if self.tracking_uri else ''} ...")
            try:
                ray_started = _init_ray()
            except BaseException:
                if self._tracker_ready is not None:  # let the store's migrations end before this process does
                    self._tracker_ready.exception()
                raise
            try:
                result = self._run_locked(the_plan, state, data, t0, ray_started)
            except KeyboardInterrupt:
                self._write_end_state(state, "interrupted")
                self._end_parent("KILLED")
                log(f"interrupted; finish it with: kdtune resume {self.exp}")
                raise
            except BaseException as e:
                self._write_end_state(state, "failed")
                self._end_parent("FAILED")
                if is_disk_full(e) and not isinstance(e, DiskFullError):
                    raise self._disk_full() from e
                raise
            finally:
                if ray_started:
                    import ray

                    if ray.is_initialized():
                        ray.shutdown()
        return result

    def _open_tracker(self):
        from kdtune.tracking import SweepTracker

        return SweepTracker(self.tracking_uri, self.spec.name)

    def _write_end_state(self, state: dict, status: str) -> None:
        """The state's status as the driver stops; never in place of the error that stopped it (a full disk
        refuses this write too, and resume does not need it: a state left "running" resumes the same)."""
        state["status"] = status
        try:
            self.folder.write_state(state)
        except OSError as e:
            self.log(f"warning: could not write the experiment's state ({e.strerror or e})")

    def _record_leftovers(self, state: dict) -> None:
        """A finished sweep whose driver could not record some trials' runs either: record them now."""
        if not self.tracking_uri:
            return
        trials = [(t["trial_id"], t.get("config") or {}) for g in state.get("groups", {}).values()
                  for t in g.get("all", []) if t.get("trial_id")]  # fmt: skip
        n = self._record("the runs of trials whose tracking failed", record_unrecorded_runs, self.tracking_uri,
                         self.spec.name, None, self.exp, trials)  # fmt: skip
        if n:
            self.log(f"recorded {n} trial run{'s' if n != 1 else ''} in MLflow that the sweep could not")

    def _finished(self, state: dict, how: str) -> SweepResult | None:
        """For an experiment begun with this very spec (another is refused): its results if it is finished."""
        if not self.folder.started:
            return None
        self.folder.check_same_spec(self.spec)
        if state.get("status") != "finished":
            return None
        self.log(f"experiment {self.spec.name} {how} ({self.exp}); its results:")
        return self._result_from_state(state)

    def _end_parent(self, status: str) -> None:
        if self.tracker is not None:
            try:
                self.tracker.end_parent(status)
            except Exception:  # noqa: BLE001 - never hide the original error
                pass

    def _record(self, what: str, fn, *args, **kwargs):
        """A tracking write that must not cost the sweep: on failure, one line, and ``kdtune resume`` redoes it."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            line = f"could not record {what} in MLflow ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
            self.unrecorded.append(line)
            self.log(f"warning: {line}; `kdtune resume {self.exp}` records it")
            return None

    def _build_stages(self, p: SweepPlan, state) -> dict:
        from kdtune.tune.stages import ensure_stage

        built = {}
        res = self._stage_resources()
        for name, sp in p.stages.items():
            st = ensure_stage(name, sp.config, self.spec.stages_dir, resources=res, log=self.log)
            built[name] = st
            if self.tracker is not None:
                result = {k: v for k, v in st.result.items() if k not in ("history", "config", "environment")}
                self._record(f"stage {name}", self.tracker.log_stage, st.name, st.config, result, st.model_path,
                             key=st.key)  # fmt: skip
        state["stages"] = {n: {"dir": str(st.dir), "key": st.key, **st.summary()} for n, st in built.items()}
        return built

    def _save_views(self, p: SweepPlan) -> int:
        """MLflow's runs table opens with the columns to compare: all trials, and one view per group with
        its chosen hyperparameters (:mod:`kdtune.tracking.views`); the same names recorded for the report."""
        from kdtune.tracking.views import sweep_views

        groups = [(g.name, chosen_hparams(self.spec, g)) for g in p.groups]
        return self.tracker.save_views(sweep_views(self.spec.metric, self.spec.mode, groups), hparams=dict(groups))

    def _run_locked(self, p: SweepPlan, state, data, t0, ray_started) -> SweepResult:
        from kdtune.tune.search import GroupSearch
        from kdtune.tune.trainable import SharedData, TrialContext

        spec, log = self.spec, self.log
        if self.tracking_uri:
            from kdtune import __version__

            self.tracker = self._tracker_ready.result() if self._tracker_ready else self._open_tracker()
            self.parent_run_id = self.tracker.start_parent(
                spec.to_dict(), spaces={m: text for m, (_, text) in p.sources.items()},
                tags={"kdtune.experiment_dir": str(self.exp), "kdtune.version": __version__},
            )  # fmt: skip
            self._record("the runs table's saved views", self._save_views, p)

        stages = self._build_stages(p, state)
        self.folder.write_state(state)
        t_stages = time.time()

        import ray

        shared = SharedData(ray.put(data))
        ctxs, searches = {}, []
        for g in p.groups:
            ce = stages.get(f"ce-{g.student}") if g.needs_ce_error else None
            fn = p.space(g, ce.result.get("train_error") if ce is not None else None)
            teacher = stages.get("teacher") if "teacher" in g.stages else None
            ctxs[g.name] = TrialContext(
                group=g.name, method=g.method, base=with_teacher_store(g.base, spec), experiment_dir=str(self.exp),
                threads=max(1, int(spec.budget.cpus_per_trial)), tracking_uri=self.tracking_uri,
                experiment_name=spec.name, parent_run_id=self.parent_run_id,
                params={"student": g.student, "teacher": p.teacher_arch or "none", "data": spec.data, "group": g.name},
                teacher_info=teacher.teacher_info() if teacher is not None else None,
                init_info=ce.init_info() if ce is not None else None,
            )  # fmt: skip
            if g.fuse > 1:
                from kdtune.tune.fused import member_early_stopping

                ctxs[g.name].fuse = member_early_stopping(spec)
            searches.append(GroupSearch(g.name, fn, g.budget, g.starts, fuse=g.fuse))
            for note in g.notes:
                log(f"  {g.name}: {note}")

        t_fit = time.time()
        results = self._fit(p, searches, ctxs, shared)
        t_fitted = time.time()
        summaries = self._summaries(p, results)
        if spec.budget.repeats > 1:
            self._repeats(p, summaries, ctxs, shared)
        fit_wall = time.time() - t_fit

        # ---- let a stopped trial's thread finish closing its own run (Tune returns without waiting for it),
        # then end the trial processes with Ray: the driver may now close what they left open
        from kdtune.tune.trainable import trial_folder, wait_trials_gone

        wait_trials_gone([trial_folder(self.exp, t["trial_id"]) for s in summaries for t in s["all"]], timeout_s=30)
        if ray_started:
            ray.shutdown()
        self._close_runs(results)

        for s in summaries:
            state["groups"][s["group"]] = s
        # a fused bundle is one scheduled unit: its own folder holds the process's open/closed events. The
        # counts here are Tune's trials: an orphan (a run Tune no longer knows, closed above) is none of them.
        ids = list(dict.fromkeys(t.get("bundle") or t["trial_id"] for s in summaries for t in s["all"]))
        util = slot_utilisation(self.exp, ids, spec.budget.concurrency, fit_wall, since=t_fit)
        state["timeline"] = timeline(self.exp, ids, t0=t0, stages_done=t_stages, tune_start=t_fit,
                                     tune_end=t_fitted, end=time.time())  # fmt: skip
        result = SweepResult(name=spec.name, experiment_dir=str(self.exp), status="finished", metric=spec.metric,
                             mode=spec.mode, groups=summaries, tracking_uri=self.tracking_uri,
                             stages=state.get("stages", {}), wall_s=None, slot_utilisation=util,
                             stages_s=t_stages - t0)  # fmt: skip
        failed = [s for s in summaries if not s.get("best")]
        if failed and len(failed) == len(summaries):
            state["status"] = "failed"
            self.folder.write_state(state)
            self._end_parent("FAILED")
            causes = sorted({t["error"] or "no result" for s in failed for t in s["all"]})
            raise SweepFailed(
                f"sweep {spec.name}: every trial failed; fix the cause and run `kdtune resume {self.exp}` "
                "(with failures.on_resume: restart to train them anew):\n" + "\n".join(f"  {c}" for c in causes)
            )
        result.best = _overall_best(summaries, spec)
        if self.tracker is not None and result.best and result.best.get("mlflow_run_id"):
            try:
                version = self.tracker.register_best(result.best["mlflow_run_id"], "model", name=spec.name,
                                                     alias="best")  # fmt: skip
                result.best["registered"] = f"models:/{spec.name}@best (version {version})"
            except KdtuneError as e:
                log(f"note: the best student was not registered: {e}")
        state["status"] = "finished"
        state["finished"] = time.time()
        state["best"] = result.best
        state["slot_utilisation"] = util
        result.wall_s = time.time() - t0
        path = self.folder.write_results(result.to_dict())
        self.folder.write_state(state)
        if self.tracker is not None:
            self._record("the results", self.tracker.log_artifact, path)
            summary = {f"best.{s['group']}.{spec.metric}": s["best"][spec.metric] for s in summaries if s.get("best")}
            if util is not None:
                summary["slot_utilisation"] = util
            self._record("the sweep's summary", self.tracker.log_parent_metrics, summary)
            self._record("the sweep's description", self.tracker.describe_parent,
                         f"kdtune sweep {spec.name}: best {spec.metric} per (student, method)\n\n```\n"
                         f"{result.table()}\n```")  # fmt: skip
            self._record("the end of the parent run", self.tracker.end_parent, "FINISHED")
        for s in summaries:
            if not s.get("best"):
                log(f"group {s['group']}: no trial produced a result ({s['errored']} failed)")
        log(f"sweep {spec.name} finished in {_dur(result.wall_s)}")
        if util is not None:
            tl = state["timeline"]
            log(f"slot utilisation: {100 * util:.1f}% (trial wall time / ({spec.budget.concurrency} slots x "
                f"{_dur(fit_wall)} after the stages); first trial {tl.get('first_trial_open', 0) - tl['tune_start']:.1f}s "
                f"after Tune started, last one ended {tl['tune_end'] - tl.get('last_trial_closed', tl['tune_end']):.1f}s "
                "before Tune returned")  # fmt: skip
        orch = orchestration_summary(summaries)
        if orch:
            log(orch)
        if self.unrecorded:
            log(f"{len(self.unrecorded)} tracking writes failed; `kdtune resume {self.exp}` records them")
        return result

    def _stage_resources(self) -> dict:
        """A stage runs as one trial does: ``cpus_per_trial`` threads (more threads slow small models down on
        a shared CPU), and a whole GPU when trials use one."""
        b = self.spec.budget
        return {"num_cpus": b.cpus_per_trial, "num_gpus": 1 if b.gpus_per_trial > 0 else 0}

    def _result_from_state(self, state) -> SweepResult:
        spec = self.spec
        groups = [state["groups"][f"{s}-{m}"] for s, m in spec.groups() if f"{s}-{m}" in state["groups"]]
        return SweepResult(name=spec.name, experiment_dir=str(self.exp), status=state.get("status"),
                           metric=spec.metric, mode=spec.mode, groups=groups, best=state.get("best"),
                           tracking_uri=self.tracking_uri, stages=state.get("stages", {}),
                           slot_utilisation=state.get("slot_utilisation"))  # fmt: skip

    # ------------------------------------------------------------------ the one Tune experiment
    def _fit(self, p: SweepPlan, searches, ctxs, shared):
        from ray import tune

        from kdtune.tune.trainable import run_trial
        from kdtune.tune.tunefs import atomic_local_fs

        spec, log = self.spec, self.log
        path = self.exp / "tune" / TUNE_NAME
        trainable = _trainable(run_trial, ctxs, shared, spec.budget)
        total = p.total_trials
        if tune.Tuner.can_restore(str(path), storage_filesystem=atomic_local_fs()):
            on = spec.failures.on_resume
            log(f"resuming its {total} trials ({len(p.groups)} groups)")
            if on == "restart":
                _clear_errored(path, self.exp)
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=on == "resume", restart_errored=on == "restart",
                                       storage_filesystem=atomic_local_fs())  # fmt: skip
        else:
            b = spec.budget
            for g in p.groups:
                pair = f"{p.teacher_arch} -> {g.student}" if g.base.get("teacher") else g.student
                what = f"{g.budget} trials" if g.parameters else "1 run (no search space)"
                starts = f", {min(len(g.starts), g.budget)} from published starting points" if g.starts else ""
                log(f"  {g.name} ({pair}): {what}{starts}")
            for g in p.groups:
                if g.fuse > 1:
                    log(f"  {g.name}: fused, {g.fuse} trials per Tune trial ({g.units} bundles of one trial's "
                        "resources each)")  # fmt: skip
            log(f"{total} trials x {b.epochs} epochs, {b.concurrency} at a time, all groups in one experiment")
            tuner = self._new_tuner(p, searches, trainable, total)
        results = self._tune_fit(tuner)
        _check_finished(results, p.total_units, path)
        return results

    def _tune_fit(self, tuner):
        """``tuner.fit()``, ended at once, with one line, by a trial that failed on a full disk."""
        from kdtune.tune.callbacks import disk_full_trials, reset_disk_full

        reset_disk_full()
        results = tuner.fit()
        if disk_full_trials():
            raise self._disk_full()
        return results

    def _disk_full(self) -> DiskFullError:
        return DiskFullError(disk_full_message(self.exp, f"kdtune resume {self.exp}"))

    def _callbacks(self, p: SweepPlan, searches, label_total: int):
        from kdtune.tune.callbacks import OptunaMirror, ProgressPrinter

        spec = self.spec
        return [
            ProgressPrinter(spec.metric, spec.budget.epochs, total=label_total, log=self.log),
            OptunaMirror(f"sqlite:///{self.exp / 'optuna.db'}", spec.metric, spec.mode, spec.budget.epochs,
                         {s.name: s.space for s in searches},
                         {g.name: {"method": g.method, "student": g.student, "experiment": spec.name}
                          for g in p.groups}),
        ]  # fmt: skip

    def _new_tuner(self, p: SweepPlan, searches, trainable, total):
        from ray import tune

        from kdtune.tune.callbacks import TrialNamer
        from kdtune.tune.search import GroupedOptunaSearch, GroupedScheduler, GroupedSearchGenerator

        spec = self.spec
        searcher = GroupedOptunaSearch(searches, spec.metric, spec.mode, spec.budget.epochs, seed=spec.seed,
                                       max_concurrent=spec.budget.concurrency)  # fmt: skip
        scheduler = GroupedScheduler(partial(make_scheduler, spec), spec.metric, spec.mode,
                                     fifo_groups=tuple(g.name for g in p.groups if g.fuse > 1))  # fmt: skip
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=GroupedSearchGenerator(searcher, on_resume=spec.failures.on_resume),
                scheduler=scheduler, metric=spec.metric, mode=spec.mode,
                num_samples=p.total_units, reuse_actors=True,
                trial_name_creator=TrialNamer(), trial_dirname_creator=TrialNamer(with_id=True),
            ),
            run_config=self._run_config(TUNE_NAME, self._callbacks(p, searches, total)),
        )  # fmt: skip

    def _run_config(self, name, callbacks):
        from ray import tune

        from kdtune.tune.callbacks import DiskFullStop, DiskFullWatch
        from kdtune.tune.tunefs import atomic_local_fs

        # Every Tune checkpoint is kept (a pointer: one small progress.json per epoch): a driver killed
        # between two snapshots restores a trial from the checkpoint its snapshot names, which must still
        # exist (num_to_keep=1 deletes it: the trial then fails on every retry).
        return tune.RunConfig(
            name=name, storage_path=str(self.exp / "tune"), storage_filesystem=atomic_local_fs(), verbose=0,
            callbacks=[*callbacks, DiskFullWatch()], stop=DiskFullStop(),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=self.spec.failures.max_failures),
        )  # fmt: skip

    def _repeats(self, p: SweepPlan, summaries, ctxs, shared) -> None:
        """Run each group's best configuration again with ``repeats - 1`` more seeds, all groups' repeats in
        one Tune experiment; each summary gets mean ± std over all of its seeds."""
        from dataclasses import replace

        from ray import tune
        from ray.tune.search import BasicVariantGenerator

        from kdtune.tune.callbacks import ProgressPrinter, TrialNamer
        from kdtune.tune.search import GROUP_KEY
        from kdtune.tune.trainable import run_trial
        from kdtune.tune.tunefs import atomic_local_fs

        spec, b = self.spec, self.spec.budget
        path = self.exp / "tune" / REPEATS_NAME
        seeds = [spec.seed + k for k in range(1, b.repeats)]
        rctxs = {f"{g}-repeats": replace(c, group=f"{g}-repeats", phase="repeat") for g, c in ctxs.items()}
        trainable = _trainable(run_trial, rctxs, shared, b)
        points = [{**s["best"]["config"], GROUP_KEY: f"{s['group']}-repeats", "train.seed": seed}
                  for s in summaries if s.get("best") for seed in seeds]  # fmt: skip
        if not points:
            return
        if tune.Tuner.can_restore(str(path), storage_filesystem=atomic_local_fs()):
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=atomic_local_fs())  # fmt: skip
        else:
            self.log(f"repeating each group's best configuration with seeds {seeds}")
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=BasicVariantGenerator(points_to_evaluate=points), num_samples=len(points),
                    max_concurrent_trials=b.concurrency, reuse_actors=True,
                    trial_name_creator=TrialNamer(), trial_dirname_creator=TrialNamer(with_id=True)),
                run_config=self._run_config(
                    REPEATS_NAME, [ProgressPrinter(spec.metric, b.epochs, total=len(points), log=self.log)]
                ),
            )  # fmt: skip
        results = self._tune_fit(tuner)
        _check_finished(results, len(points), path)
        self._repeat_results = results
        by_group: dict[str, list] = {}
        for r in results:
            g = (r.config or {}).get(GROUP_KEY, "").removesuffix("-repeats")
            m = r.metrics or {}
            if r.error is None and m.get("epoch") == b.epochs:
                by_group.setdefault(g, []).append(m)
        for s in summaries:
            if not s.get("best"):
                continue
            best = s["best"]
            ms = by_group.get(s["group"], [])
            vals = [v for v in [best.get("val_acc"), *(m.get("val_acc") for m in ms)] if isinstance(v, (int, float))]
            tests = [v for v in [best.get("test_acc"), *(m.get("test_acc") for m in ms)] if isinstance(v, (int, float))]
            s["repeats"] = {"seeds": [spec.seed, *seeds], "n": len(tests), "val_mean": _mean(vals),
                            "val_std": _std(vals), "test_mean": _mean(tests), "test_std": _std(tests),
                            "test": tests}  # fmt: skip

    def _close_runs(self, results) -> None:
        if not self.tracking_uri:
            return
        groups = [g for g in {(r.config or {}).get("kdtune.group") for r in results} if g]
        from kdtune.tune.fused import expand_members

        rep = getattr(self, "_repeat_results", None)
        all_results = expand_members(results) + (list(rep) if rep is not None else [])
        groups += [f"{g}-repeats" for g in groups] if rep is not None else []
        trials = [(_trial_id(r), {k: v for k, v in (r.config or {}).items() if k != "kdtune.group"})
                  for r in all_results]  # fmt: skip
        self._record("the runs of trials whose tracking failed", record_unrecorded_runs, self.tracking_uri,
                     self.spec.name, self.parent_run_id, self.exp, trials)  # fmt: skip
        self._record("the runs of stopped trials", close_open_runs, self.tracking_uri, self.spec.name,
                     all_results, self.spec.budget.epochs, groups=groups, experiment_dir=self.exp)  # fmt: skip

    def _summaries(self, p: SweepPlan, results) -> list[dict]:
        from kdtune.tune.fused import expand_members
        from kdtune.tune.search import GROUP_KEY

        by_group: dict[str, list] = {g.name: [] for g in p.groups}
        for r in expand_members(results):  # a fused bundle's members are trials of their own
            g = (r.config or {}).get(GROUP_KEY)
            if g in by_group:
                by_group[g].append(r)
        return [self._summarize(g.name, g.student, g.method, by_group[g.name]) for g in p.groups]

    def _summarize(self, gname, student, method, results) -> dict:
        from kdtune.tune.search import GROUP_KEY

        spec = self.spec
        epochs = spec.budget.epochs
        trials = []
        for r in results:
            m = r.metrics or {}
            tid = m.get("trial_id") or Path(r.path).name.rsplit("_", 1)[-1]
            config = {k: v for k, v in (r.config or {}).items() if k != GROUP_KEY}
            error = (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error is not None else None
            outcome = "failed" if error else ("completed" if m.get("epoch") == epochs else "pruned")
            if error and "diverged" in error.lower():
                outcome = "diverged"
            trials.append({
                "trial_id": tid, "config": config, "epochs_run": m.get("epoch"), "outcome": outcome,
                spec.metric: m.get(spec.metric), "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"),
                "best_val_acc": m.get("best_val_acc"), "orch_frac": m.get("orch_frac"), "error": error,
            })  # fmt: skip
            if m.get("bundle"):
                trials[-1]["bundle"] = m["bundle"]
        ok = [t for t in trials if t["error"] is None and _finite(t.get(spec.metric))]
        best = max(ok, key=lambda t: _rank(t, spec, epochs)) if ok else None
        if best is not None and self.tracking_uri:
            best["mlflow_run_id"] = _run_id_of(self.tracking_uri, spec.name, best["trial_id"])
        return {
            "group": gname, "student": student, "method": method, "status": "done", "trials": len(trials),
            "completed": sum(1 for t in ok if t["epochs_run"] == epochs),
            "stopped": sum(1 for t in ok if t["epochs_run"] != epochs),
            "errored": sum(1 for t in trials if t["error"] is not None), "best": best, "all": trials,
        }  # fmt: skip


# ---------------------------------------------------------------------------------------------- helpers


def with_teacher_store(base: dict, spec: SweepSpec) -> dict:
    """A group's trial config with the sweep's teacher store folder, ``<storage>/stages/teacher-store`` (shared
    by every sweep on that storage), unless the spec's ``train:`` names another; ``teacher_store`` (auto by
    default: on where the disk holds it) decides whether trials use it (kdtune.engine.teacher_store)."""
    if base.get("teacher") and not base.get("teacher_store_dir"):
        return {**base, "teacher_store_dir": str(spec.stages_dir / "teacher-store")}
    return base


def chosen_hparams(spec: SweepSpec, group) -> list[str]:
    """The hyperparameters a person chose for a group (a :class:`~kdtune.tune.plan.GroupPlan`), under the
    names its trial runs log them (``dkd.beta``, ``train.lr``): those its space searches, then those the spec
    fixes (``methods.<method>.space.<name>: <value>``). The rest (a method's other defaults, DiSK's guide
    settings, the shared ``train:`` recipe) is every trial's alike: the group's view of MLflow's runs table
    shows these as columns and ``kdtune report``'s table these in its hyperparameter cell."""
    from kdtune.tracking.trial import logged_names

    fixed = [k for k, o in spec.method(group.method).space.items() if o.kind == "fixed"]
    return logged_names(group.method, list(dict.fromkeys([*group.parameters, *fixed])))


def _trainable(fn, ctxs, data, b):
    """The one trainable of a Tune experiment: ``ctxs`` maps each group to its TrialContext."""
    from ray import tune

    resources = {"cpu": b.cpus_per_trial, "gpu": b.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(fn, ctxs=ctxs, data=data), resources)


def make_scheduler(spec: SweepSpec):
    """ASHA (default), HyperBand or none (FIFO), over epochs (``training_iteration``), for one group (see
    :class:`kdtune.tune.search.GroupedScheduler`)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    s = spec.scheduler
    if s.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", metric=spec.metric, mode=spec.mode,
                             max_t=spec.budget.epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)  # fmt: skip
    if s.name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", metric=spec.metric, mode=spec.mode,
                                  max_t=spec.budget.epochs, reduction_factor=s.reduction_factor)  # fmt: skip
    return FIFOScheduler()


def _in_thread(fn) -> Future:
    """``fn()`` running in a thread of its own; ``.result()`` waits for it and raises what it raised."""
    fut: Future = Future()

    def run() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller's .result()
            fut.set_exception(e)

    threading.Thread(target=run, name="kdtune-open-tracker", daemon=True).start()
    return fut


def _ray_starting() -> str | None:
    """What :func:`_init_ray` is about to do, for the person waiting (seconds on a small machine); ``None``
    when this process has Ray running already."""
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    return f"joining the Ray cluster at {address}" if address else "starting Ray on this machine"


def _init_ray() -> bool:
    """Start (or join, with RAY_ADDRESS) Ray quietly; False when this process already had Ray running."""
    for k, v in _DRIVER_ENV.items():
        os.environ.setdefault(k, v)
    import logging

    import ray

    if ray.is_initialized():
        return False
    # Without RAY_ADDRESS: a fresh local Ray of this process ("local"), never a cluster found by chance.
    address = None if os.environ.get("RAY_ADDRESS") else "local"
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": dict(_WORKER_ENV)})  # fmt: skip
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def _check_finished(results, expected: int, path: Path) -> None:
    """A Tune run that returned with trials still pending was interrupted (Ctrl-C): stop the sweep here."""
    ea = getattr(results, "_experiment_analysis", None)
    statuses = [t.status for t in getattr(ea, "trials", [])] if ea is not None else []
    if ea is not None and (
        len(statuses) < expected or any(s not in ("TERMINATED", "ERROR") for s in statuses)
    ):
        raise KeyboardInterrupt(f"Tune run {path.name} was interrupted")


def errored_trials(tune_dir: Path) -> list[str]:
    """Ids of the trials the newest experiment snapshot of a Tune run records as ERROR."""
    from kdtune.tune.search import snapshot_trials

    return [t["trial_id"] for t in snapshot_trials(tune_dir) or [] if t["status"] == "ERROR"]


def _clear_errored(tune_dir: Path, exp: Path) -> None:
    """``on_resume: restart``: errored trials start from scratch, so their own folders go."""
    import shutil

    from kdtune.tune.trainable import trial_folder

    for tid in errored_trials(tune_dir):
        shutil.rmtree(trial_folder(exp, tid), ignore_errors=True)
        for member in trial_folder(exp, tid).parent.glob(f"{tid}-m*"):  # a fused bundle's members
            shutil.rmtree(member, ignore_errors=True)


def orchestration_summary(summaries: list[dict]) -> str | None:
    """One line: the median and largest share of a trial's wall time spent on orchestration (checkpoint
    writes, MLflow logging, Tune reporting), over the trials of this run that reported it."""
    fracs = [t["orch_frac"] for g in summaries for t in g.get("all", []) if _finite(t.get("orch_frac"))]
    if not fracs:
        return None
    return (f"orchestration (checkpoints, MLflow, Tune reports): median {100 * statistics.median(fracs):.2f}% "
            f"of a trial's wall time, max {100 * max(fracs):.2f}%, over {len(fracs)} trials")  # fmt: skip


def slot_utilisation(exp: Path, trial_ids: list[str], concurrency: int, wall_s: float,
                     since: float = 0.0) -> float | None:
    """Σ over trials of the time a trial process held it (``open`` to ``closed`` in its events, summed over
    its restarts, from ``since`` on) ÷ (``concurrency`` × ``wall_s``, the sweep's wall time after its
    stages, in this driver)."""
    from kdtune.tune.trainable import read_events, trial_folder

    if wall_s <= 0 or concurrency <= 0 or not trial_ids:
        return None
    busy = 0.0
    for tid in trial_ids:
        opened = None
        for ev in read_events(trial_folder(exp, tid)):
            if ev.get("event") == "open":
                opened = ev.get("time")
            elif ev.get("event") == "closed" and opened is not None:
                busy += max(0.0, float(ev["time"]) - max(float(opened), since))
                opened = None
    return busy / (concurrency * wall_s)


def timeline(exp: Path, trial_ids: list[str], **marks: float) -> dict[str, float]:
    """Seconds from the sweep's start to each mark, and to the first trial's start and the last trial's end
    (from the trials' events): where the time outside the trials goes."""
    from kdtune.tune.trainable import read_events

    t0 = marks.pop("t0")
    times = [(ev["event"], float(ev["time"])) for tid in trial_ids for ev in read_events(exp / "trials" / tid)
             if ev.get("event") in ("open", "closed") and float(ev["time"]) >= marks.get("tune_start", t0)]  # fmt: skip
    out = {k: round(v - t0, 2) for k, v in marks.items()}
    if times:
        out["first_trial_open"] = round(min(t for e, t in times if e == "open") - t0, 2)
        out["last_trial_closed"] = round(max(t for e, t in times) - t0, 2)
    return out


def _rank(t: dict, spec: SweepSpec, epochs: int):
    v = t[spec.metric]
    return (t.get("epochs_run") == epochs, v if spec.mode == "max" else -v)


def _overall_best(summaries: list[dict], spec: SweepSpec) -> dict | None:
    bests = [dict(g["best"], group=g["group"], method=g["method"], student=g["student"]) for g in summaries
             if g.get("best")]  # fmt: skip
    if not bests:
        return None
    return max(bests, key=lambda t: _rank(t, spec, spec.budget.epochs))


def _trial_id(r) -> str:
    return (r.metrics or {}).get("trial_id") or Path(r.path).name.rsplit("_", 1)[-1]


def record_unrecorded_runs(uri: str | None, experiment: str, parent_run_id: str | None, experiment_dir,
                           trials: list[tuple[str, dict]]) -> int:
    """Record in MLflow what a trial's process could not (the tracking database locked beyond the retry
    window as it ended its run: its ``unrecorded`` event); returns how many runs were recorded.

    Once the trial's process is gone (one owner per run), its run is found by trial id (or made, with the
    trial's config as params), every epoch of its saved state missing from the run is logged (``backfill``),
    the outcome set, the run ended FINISHED, and a ``recorded`` event written, so a later call redoes nothing.
    A failure here is the caller's one line; the trial's folder keeps everything for the next try."""
    if not uri:
        return 0
    import torch

    from kdtune.tracking import TrialTracker
    from kdtune.tracking.client import TAG_OUTCOME
    from kdtune.tune.trainable import _event, read_events, trial_folder, wait_trials_gone

    todo = []
    for tid, config in trials:
        folder = trial_folder(experiment_dir, tid)
        ev = read_events(folder)
        last = max((i for i, e in enumerate(ev) if e.get("event") == "recorded"), default=-1)
        if any(e.get("event") == "unrecorded" for e in ev[last + 1:]) and (folder / "ckpt" / "state.pt").is_file():
            todo.append((tid, config, folder))
    held = {f.name for f in wait_trials_gone([f for _, _, f in todo])}
    n = 0
    for tid, config, folder in todo:
        if tid in held:
            continue
        history = torch.load(folder / "ckpt" / "state.pt", map_location="cpu", weights_only=True)["history"]
        tt = TrialTracker(uri, experiment, parent_run_id, tid)
        if not tt.resumed:
            tt.log_params(config)
        tt.backfill(history)
        tt.set_tags({TAG_OUTCOME: "completed" if (folder / "done.json").is_file() else "failed"})
        tt.end("FINISHED")
        _event(folder, event="recorded", trial_id=tid, epochs=len(history))
        n += 1
    return n


def close_open_runs(uri: str | None, experiment: str, results, epochs: int, groups: list[str] | None = None,
                    experiment_dir: str | Path | None = None) -> int:
    """End the MLflow runs a group's trials left RUNNING; returns how many were closed.

    A trial's process may be ended by Tune before it closes its run (ASHA stopping the last trials). And a
    driver killed between two experiment snapshots forgets the trials it started meanwhile: Tune restores
    without them and the searcher asks again, so their runs belong to no trial. Every trial run of the
    groups whose trial id Tune's results do not hold is such an orphan, whether its process had ended it or
    not: :func:`kdtune.tracking.client.mark_orphan` takes it out of the trials (role ``orphan``, tag
    ``kdtune.orphan=true``, the reason) and ends one left RUNNING as KILLED (counted in the return value).
    """
    if not uri:
        return 0
    from kdtune.tracking import TAG_FAILURE, TAG_OUTCOME, TAG_STOPPED_EPOCH, TAG_TRIAL_ID, TRIAL_FILTER
    from kdtune.tracking.client import get_client, mark_orphan, quote, retry_locked, search_all_runs, set_tags
    from kdtune.tracking.trial import experiment_id_for
    from kdtune.tune.trainable import trial_folder, wait_trials_gone

    client = get_client(uri)
    exp_id = experiment_id_for(uri, experiment)
    closed = 0
    known = set()
    ids = [_trial_id(r) for r in results]
    # One owner per run: a trial's process may still be closing its run after fit() returned (Tune ends a
    # stopped trial without waiting for it). Touch a run only once its process has let go of it.
    held = {f.name for f in wait_trials_gone([trial_folder(experiment_dir, t) for t in ids])} if experiment_dir else set()
    for r, tid in zip(results, ids):
        m = r.metrics or {}
        known.add(tid)
        if tid in held:
            continue  # still owned by a live trial process: it closes the run itself
        runs = search_all_runs(client, [exp_id], f"tags.`{TAG_TRIAL_ID}` = {quote(tid)}")
        for run in runs:
            if run.info.status != "RUNNING":
                continue
            epoch = m.get("epoch")
            tags = {}
            if r.error is not None:
                reason = (str(r.error).strip().splitlines() or ["error"])[-1][:500]
                status, tags[TAG_FAILURE] = "FAILED", reason
                tags[TAG_OUTCOME] = "diverged" if "diverged" in reason.lower() else "failed"
            elif epoch is not None and epoch < epochs:
                status, tags[TAG_OUTCOME] = "FINISHED", "pruned"
                tags["kdtune.stop_reason"] = f"stopped by the scheduler after epoch {epoch}/{epochs}"
            else:
                status, tags[TAG_OUTCOME] = "FINISHED", "completed"
            if epoch is not None and tags[TAG_OUTCOME] != "completed":
                tags[TAG_STOPPED_EPOCH] = str(epoch)
            set_tags(client, run.info.run_id, tags)
            retry_locked(client.set_terminated, run.info.run_id, status)
            closed += 1
    for group in groups or []:
        flt = f"tags.`kdtune.group` = {quote(group)} AND {TRIAL_FILTER}"
        for run in search_all_runs(client, [exp_id], flt):
            if run.data.tags.get(TAG_TRIAL_ID) in known:
                continue
            reason = "orphan: the sweep driver died before Tune recorded this trial; the searcher asked anew"
            closed += run.info.status == "RUNNING"
            mark_orphan(client, run, reason)
    return closed


def _run_id_of(uri: str, experiment: str, trial_id: str) -> str | None:
    try:
        from kdtune.tracking import TAG_TRIAL_ID
        from kdtune.tracking.client import get_client, quote, search_all_runs
        from kdtune.tracking.trial import experiment_id_for

        client = get_client(uri)
        runs = search_all_runs(client, [experiment_id_for(uri, experiment)],
                               f"tags.`{TAG_TRIAL_ID}` = {quote(trial_id)}")  # fmt: skip
        return runs[0].info.run_id if runs else None
    except Exception:  # noqa: BLE001 - a missing run id only costs the registry entry
        return None


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _dur(s: float) -> str:
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"
