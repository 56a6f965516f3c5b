"""The sweep driver: spec -> checks -> plan -> stages -> one Tune experiment for all groups -> results.

:meth:`Driver.run` reads as its phases. Ownership (one writer per record at any time; the full table is in
the README's "Who writes what"): ``spec.yaml``, ``spaces/``, ``state.json``, ``results.json`` and the parent
MLflow run belong to the driver holding ``sweep.lock``; a stage's folder to the process that wins its
:func:`kdtune.storage.build_once` lock; a trial's folder and MLflow run to its unit's process between its
``open`` and ``closed`` events (:mod:`kdtune.tune.record`), then to the driver's repairs
(:mod:`kdtune.tune.repairs`); ``optuna.db`` to the driver's mirror; ``tune/`` to Tune's controller. A tracking
failure never costs a trained trial: it is said in one line and ``kdtune resume`` records it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from kdtune.errors import ConfigError, DiskFullError, KdtuneError, is_disk_full
from kdtune.spec import SweepSpec
from kdtune.tune.experiment import SPEC_FILE, Experiment, check_optuna_storage
from kdtune.tune.plan import SweepPlan, plan, space_sources
from kdtune.tune.protocol import GROUP_KEY, expand_members
from kdtune.tune.repairs import log_best_students
from kdtune.tune.results import (
    SweepFailed,
    SweepResult,
    fmt_duration,
    orchestration_summary,
    overall_best,
    result_from_state,
    slot_utilisation,
    summarize,
    timeline,
)
from kdtune.tune.tuning import Tuning, disk_full_error


@dataclass
class Checked:
    """What the checks before Ray produced: the plan and the loaded data."""

    plan: SweepPlan
    data: object


class Driver:
    def __init__(self, spec: SweepSpec, log=print):
        self.spec, self.log = spec, log
        self.exp = Path(spec.experiment_dir)
        self.folder = Experiment(self.exp)
        self.tracker = self.parent_run_id = self.tracking_uri = None
        self.unrecorded: list[str] = []
        self.marks: dict[str, float] = {}
        self.ray_started = False
        self._tracker_ready: Future | None = None
        if spec.tracking.enabled:
            from kdtune.tracking import default_tracking_uri

            self.tracking_uri = spec.tracking.uri or default_tracking_uri(self.exp)

    # ------------------------------------------------------------------ the phases
    def run(self, resume_only: bool) -> SweepResult:
        self.marks["t0"] = time.time()
        done = self._finished(self.folder.state(), "is already finished")
        if done is not None:
            self._record_leftovers(self.folder.state())
            return done
        if self.folder.started:
            self.log(f"resuming experiment {self.spec.name} ({self.exp})")
        elif resume_only:
            raise ConfigError(f"nothing to resume: {self.exp} holds no sweep ({SPEC_FILE} is missing)")
        checked = self.check()  # everything that can be refused, before Ray starts
        from kdtune.tune.lock import SweepLock

        with SweepLock(self.exp) as lock:
            if lock.took_over:
                self.log(f"took over the lock of a dead sweep driver (pid {lock.took_over.get('pid')})")
            state = self.folder.state()  # again under the lock: another driver may have finished it meanwhile
            done = self._finished(state, "was finished meanwhile by another driver")
            if done is not None:
                return done
            state = self.begin(state, checked)
            try:
                self.start_services()
                return self.sweep(checked, state)
            except KeyboardInterrupt:
                self._stop(state, "interrupted", "KILLED")
                self.log(f"interrupted; finish it with: kdtune resume {self.exp}")
                raise
            except BaseException as e:
                self._stop(state, "failed", "FAILED")
                if is_disk_full(e) and not isinstance(e, DiskFullError):
                    raise self.disk_full() from e
                raise
            finally:
                self.stop_services()

    def check(self) -> Checked:
        from kdtune.data import load_data
        from kdtune.preflight import preflight

        spec = self.spec
        preflight(spec)  # what the spec points at: checkpoints, method constraints, data, damaged files
        self.sources = space_sources(spec)
        data = load_data(spec.data, root=spec.data_root, download=spec.download, val_fraction=spec.val_fraction,
                         seed=spec.data_seed)  # fmt: skip
        the_plan = plan(spec, sources=self.sources, num_classes=data.num_classes)
        if self.tracking_uri:
            from kdtune.tracking import check_tracking_uri

            check_tracking_uri(self.tracking_uri)
        check_optuna_storage(spec.tracking.optuna)  # a shared database for the Optuna mirror, when named
        return Checked(the_plan, data)

    def begin(self, state: dict, checked: Checked) -> dict:
        if not self.folder.started:
            self.folder.write_start(self.spec, self.sources)
            state = {"status": "running", "groups": {}, "started": time.time()}
        state["status"] = "running"
        state.pop("damaged", None)
        self.folder.write_state(state)
        return state

    def start_services(self) -> None:
        """MLflow's store opens (SQLite migrations: seconds on a fresh store) in a thread while Ray starts."""
        from kdtune.tune.rayrt import init_ray, ray_starting

        self._tracker_ready = _in_thread(self._open_tracker) if self.tracking_uri else None
        starting = ray_starting()
        if starting:
            self.log(f"{starting}{' (MLflow opens beside it)' if self.tracking_uri else ''} ...")
        try:
            self.ray_started = init_ray()
        except BaseException:
            if self._tracker_ready is not None:  # let the store's migrations end before this process does
                self._tracker_ready.exception()
            raise

    def stop_services(self) -> None:
        if self.ray_started:
            from kdtune.tune.rayrt import shutdown_ray

            shutdown_ray()

    def sweep(self, checked: Checked, state: dict) -> SweepResult:
        p = checked.plan
        self.open_parent(p)
        stages = self.build_stages(p, state)
        self.marks["stages_done"] = time.time()
        from kdtune.tune.rayrt import SharedData

        shared, self.data = SharedData.put(checked.data), checked.data
        ctxs = self.contexts(p, stages)
        self.marks["tune_start"] = time.time()
        tuning = Tuning(self.spec, self.exp, self.log)
        results = tuning.fit(p, ctxs, shared)
        self.marks["tune_end"] = time.time()
        summaries = self.summaries(p, results)
        repeats = tuning.repeats(summaries, ctxs, shared) if self.spec.budget.repeats > 1 else []
        self.marks["fit_wall"] = self.marks["tune_end"] - self.marks["tune_start"]  # the search's (not the repeats')
        self.release_trials(results, repeats, summaries)
        return self.conclude(state, summaries)

    # ------------------------------------------------------------------ before Tune
    def _open_tracker(self):
        from kdtune.tracking import SweepTracker

        return SweepTracker(self.tracking_uri, self.spec.name)

    def open_parent(self, p: SweepPlan) -> None:
        if not self.tracking_uri:
            return
        from kdtune.tracking.views import sweep_views
        from kdtune.version import __version__

        spec = self.spec
        self.tracker = self._tracker_ready.result() if self._tracker_ready else self._open_tracker()
        self.parent_run_id = self.tracker.start_parent(
            spec.to_dict(), spaces={m: text for m, (_, text) in p.sources.items()},
            tags={"kdtune.experiment_dir": str(self.exp), "kdtune.version": __version__},
        )  # fmt: skip
        # MLflow's runs table opens with the columns to compare: all trials, and one view per group
        groups = [(g.name, p.chosen_hparams(g)) for g in p.groups]
        views = sweep_views(spec.metric, spec.mode, groups, named_teachers=bool(spec.teachers))
        self.record("the runs table's saved views", self.tracker.save_views, views, hparams=dict(groups))

    def build_stages(self, p: SweepPlan, state: dict) -> dict:
        from kdtune.tune.stages import ensure_stage

        b = self.spec.budget  # a stage runs as one trial does: its threads, and a whole GPU when trials use one
        res = {"num_cpus": b.cpus_per_trial, "num_gpus": 1 if b.gpus_per_trial > 0 else 0}
        built = {}
        for name, sp in p.stages.items():
            st = built[name] = ensure_stage(name, sp.config, self.spec.stages_dir, resources=res, log=self.log,
                                            key=sp.key)  # fmt: skip
            if self.tracker is not None:
                result = {k: v for k, v in st.result.items() if k not in ("history", "config", "environment")}
                self.record(f"stage {name}", self.tracker.log_stage, st.name, st.config, result, st.model_path,
                            key=st.key, tags=stage_tags(p, name))  # fmt: skip
        state["stages"] = {n: {"dir": str(st.dir), "key": st.key, **st.summary()} for n, st in built.items()}
        self.folder.write_state(state)
        return built

    def contexts(self, p: SweepPlan, stages: dict) -> dict:
        """Each group's :class:`TrialContext`: its base config, the MLflow params and tags of its trials (the
        teacher's architecture and, in a sweep of several teachers, its name), the figures its stages measured."""
        from kdtune.tune.fused import member_early_stopping
        from kdtune.tune.search import report_epochs
        from kdtune.tune.trainable import TrialContext

        spec = self.spec
        ctxs = {}
        for g in p.groups:
            ce = stages.get(f"ce-{g.student}") if g.needs_ce_error else None
            tp = p.teachers.get(g.teacher) if g.teacher_arch else None
            teacher = stages.get(tp.stage.name) if tp is not None and tp.stage is not None else None
            named = {"teacher_name": g.teacher} if g.teacher else {}
            ctxs[g.name] = TrialContext(
                group=g.name, method=g.method, base=p.trial_base(g), experiment_dir=str(self.exp),
                threads=max(1, int(spec.budget.cpus_per_trial)), tracking_uri=self.tracking_uri,
                experiment_name=spec.name, parent_run_id=self.parent_run_id,
                params={"student": g.student, "teacher": teacher_param(p, g), **named, "data": spec.data,
                        "group": g.name},
                tags={f"kdtune.{k}": v for k, v in named.items()},
                teacher_info=teacher.teacher_info() if teacher is not None else None,
                init_info=ce.init_info() if ce is not None else None, metric=spec.metric, mode=spec.mode,
                member_rule=member_early_stopping(spec) if g.prunes_members else None,
                report_epochs=frozenset() if g.prunes_members else report_epochs(spec),  # a fused group: FIFO
                models=spec.tracking.models,
            )  # fmt: skip
            g.search_fn = p.space(g, ce.result.get("train_error") if ce is not None else None)
            for note in g.notes:
                self.log(f"  {g.name}: {note}")
        return ctxs

    # ------------------------------------------------------------------ after Tune
    def summaries(self, p: SweepPlan, results) -> list[dict]:
        spec = self.spec
        members = expand_members(results, spec.budget.epochs)
        out = []
        for g in p.groups:
            mine = [m for m in members if m.config.get(GROUP_KEY) == g.name]
            s = summarize(g.name, g.student, g.method, mine, spec.metric, spec.mode, spec.budget.epochs)
            if g.teacher:
                s["teacher"] = g.teacher
            if s["best"] is not None and self.tracking_uri:
                s["best"]["mlflow_run_id"] = self.run_id_of(s["best"]["trial_id"])
            out.append(s)
        return out

    def release_trials(self, results, repeats: list, summaries: list[dict]) -> None:
        """Let a stopped unit's process finish closing its own runs (Tune returns without waiting), end the
        trial processes with Ray, then repair what they left: runs left open or unrecorded, orphans."""
        from kdtune.tune.record import trial_folder, wait_trials_gone

        wait_trials_gone([trial_folder(self.exp, t["trial_id"]) for s in summaries for t in s["all"]], timeout_s=30)
        self.stop_services()
        self.ray_started = False
        if not self.tracking_uri:
            return
        from kdtune.tune.repairs import close_open_runs, record_unrecorded_runs

        epochs = self.spec.budget.epochs
        members = expand_members(results, epochs) + expand_members(repeats, epochs)
        groups = [s["group"] for s in summaries] + ([f"{s['group']}-repeats" for s in summaries] if repeats else [])
        trials = [(m.metrics["trial_id"], {k: v for k, v in m.config.items() if k != GROUP_KEY}) for m in members]
        self.record("the runs of trials whose tracking failed", record_unrecorded_runs, self.tracking_uri,
                    self.spec.name, self.parent_run_id, self.exp, trials)  # fmt: skip
        self.record("the runs of stopped trials", close_open_runs, self.tracking_uri, self.spec.name, members,
                    epochs, groups=groups, experiment_dir=self.exp)  # fmt: skip

    def conclude(self, state: dict, summaries: list[dict]) -> SweepResult:
        spec, m = self.spec, self.marks
        for s in summaries:
            state["groups"][s["group"]] = s
        # a unit's own folder holds its process's open/closed events; orphans are none of Tune's units
        ids = list(dict.fromkeys(t.get("bundle") or t["trial_id"] for s in summaries for t in s["all"]))
        util = slot_utilisation(self.exp, ids, spec.budget.concurrency, m["fit_wall"], since=m["tune_start"])
        state["timeline"] = timeline(self.exp, ids, t0=m["t0"], stages_done=m["stages_done"],
                                     tune_start=m["tune_start"], tune_end=m["tune_end"], end=time.time())  # fmt: skip
        result = SweepResult(name=spec.name, experiment_dir=str(self.exp), status="finished", metric=spec.metric,
                             mode=spec.mode, groups=summaries, tracking_uri=self.tracking_uri,
                             stages=state.get("stages", {}), slot_utilisation=util,
                             stages_s=m["stages_done"] - m["t0"])  # fmt: skip
        self._refuse_all_failed(state, summaries)
        result.best = overall_best(summaries, spec.metric, spec.mode, spec.budget.epochs)
        if spec.tracking.models == "best" and self.tracker is not None:  # the trials logged none themselves
            log_best_students(self.tracker, self.exp, summaries, self.data, self.log)
        self._register_best(result)
        state.update(status="finished", finished=time.time(), best=result.best, slot_utilisation=util)
        result.wall_s = time.time() - m["t0"]
        path = self.folder.write_results(result.to_dict())
        self.folder.write_state(state)
        self._record_parent(result, path, summaries, util)
        self._log_end(result, state, summaries, util)
        return result

    def _refuse_all_failed(self, state: dict, summaries: list[dict]) -> None:
        failed = [s for s in summaries if not s.get("best")]
        if failed and len(failed) == len(summaries):
            state["status"] = "failed"
            self.folder.write_state(state)
            self._end_parent("FAILED")
            causes = sorted({t["error"] or "no result" for s in failed for t in s["all"]})
            raise SweepFailed(
                f"sweep {self.spec.name}: every trial failed; fix the cause and run `kdtune resume {self.exp}` "
                "(with failures.on_resume: restart to train them anew):\n" + "\n".join(f"  {c}" for c in causes)
            )

    def _register_best(self, result: SweepResult) -> None:
        if self.tracker is None or not result.best or not result.best.get("mlflow_run_id"):
            return
        try:
            version = self.tracker.register_best(result.best["mlflow_run_id"], "model", name=self.spec.name,
                                                 alias="best")  # fmt: skip
            result.best["registered"] = f"models:/{self.spec.name}@best (version {version})"
        except KdtuneError as e:
            self.log(f"note: the best student was not registered: {e}")

    def _record_parent(self, result: SweepResult, path: Path, summaries: list[dict], util) -> None:
        if self.tracker is None:
            return
        metric = self.spec.metric
        self.record("the results", self.tracker.log_artifact, path)
        summary = {f"best.{s['group']}.{metric}": s["best"][metric] for s in summaries if s.get("best")}
        if util is not None:
            summary["slot_utilisation"] = util
        self.record("the sweep's summary", self.tracker.log_parent_metrics, summary)
        self.record("the sweep's description", self.tracker.describe_parent,
                    f"kdtune sweep {self.spec.name}: best {metric} per (student, method)\n\n```\n{result.table()}\n```")
        self.record("the end of the parent run", self.tracker.end_parent, "FINISHED")

    def _log_end(self, result: SweepResult, state: dict, summaries: list[dict], util) -> None:
        log, b = self.log, self.spec.budget
        for s in summaries:
            if not s.get("best"):
                log(f"group {s['group']}: no trial produced a result ({s['errored']} failed)")
        log(f"sweep {self.spec.name} finished in {fmt_duration(result.wall_s)}")
        if util is not None:
            tl = state["timeline"]
            log(f"slot utilisation: {100 * util:.1f}% (trial wall time / ({b.concurrency} slots x "
                f"{fmt_duration(self.marks['fit_wall'])} of the search); first trial "
                f"{tl.get('first_trial_open', 0) - tl['tune_start']:.1f}s after Tune started, last one ended "
                f"{tl['tune_end'] - tl.get('last_trial_closed', tl['tune_end']):.1f}s before Tune returned")  # fmt: skip
        orch = orchestration_summary(summaries)
        if orch:
            log(orch)
        if self.unrecorded:
            log(f"{len(self.unrecorded)} tracking writes failed; `kdtune resume {self.exp}` records them")

    # ------------------------------------------------------------------ small jobs
    def record(self, what: str, fn, *args, **kwargs):
        """A tracking write that must not cost the sweep: on failure, one line, and ``kdtune resume`` redoes it."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            first = str(e).splitlines()[0][:200] if str(e) else ""
            line = f"could not record {what} in MLflow ({type(e).__name__}: {first})"
            self.unrecorded.append(line)
            self.log(f"warning: {line}; `kdtune resume {self.exp}` records it")
            return None

    def run_id_of(self, trial_id: str) -> str | None:
        try:
            from kdtune.tracking import TAG_TRIAL_ID
            from kdtune.tracking.client import get_client, quote, search_all_runs
            from kdtune.tracking.trial import experiment_id_for

            client = get_client(self.tracking_uri)
            runs = search_all_runs(client, [experiment_id_for(self.tracking_uri, self.spec.name)],
                                   f"tags.`{TAG_TRIAL_ID}` = {quote(trial_id)}")  # fmt: skip
            return runs[0].info.run_id if runs else None
        except Exception:  # noqa: BLE001 - a missing run id only costs the registry entry
            return None

    def disk_full(self) -> DiskFullError:
        return disk_full_error(self.exp)

    def _stop(self, state: dict, status: str, parent_status: str) -> None:
        """The state's status as the driver stops, never in place of the error that stopped it (a full disk
        refuses this write too; a state left "running" resumes the same); the parent run ended."""
        state["status"] = status
        try:
            self.folder.write_state(state)
        except OSError as e:
            self.log(f"warning: could not write the experiment's state ({e.strerror or e})")
        self._end_parent(parent_status)

    def _end_parent(self, status: str) -> None:
        if self.tracker is not None:
            try:
                self.tracker.end_parent(status)
            except Exception:  # noqa: BLE001 - never hide the original error
                pass

    def _finished(self, state: dict, how: str) -> SweepResult | None:
        """For an experiment begun with this very spec (another is refused): its results if it is finished."""
        if not self.folder.started:
            return None
        self.folder.check_same_spec(self.spec)
        if state.get("status") != "finished":
            return None
        self.log(f"experiment {self.spec.name} {how} ({self.exp}); its results:")
        return result_from_state(self.spec, self.exp, state, self.tracking_uri)

    def _record_leftovers(self, state: dict) -> None:
        """A finished sweep whose driver could not record some trials' runs either: record them now."""
        if not self.tracking_uri:
            return
        from kdtune.tune.repairs import record_unrecorded_runs

        trials = [(t["trial_id"], t.get("config") or {}) for g in state.get("groups", {}).values()
                  for t in g.get("all", []) if t.get("trial_id")]  # fmt: skip
        n = self.record("the runs of trials whose tracking failed", record_unrecorded_runs, self.tracking_uri,
                        self.spec.name, None, self.exp, trials)  # fmt: skip
        if n:
            self.log(f"recorded {n} trial run{'s' if n != 1 else ''} in MLflow that the sweep could not")


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


def teacher_param(p: SweepPlan, g) -> str:
    """A trial's ``teacher`` param: its teacher's architecture. A group without one logs the sweep's teacher where
    the sweep has one (``teacher:``: its CE baseline stays in the pair's row of the report, as it always did), and
    ``none`` in a sweep of several teachers, where no one teacher is the pair's."""
    if g.teacher_arch:
        return g.teacher_arch
    return "none" if p.spec.teachers or p.teacher_arch is None else p.teacher_arch


def stage_tags(p: SweepPlan, stage_name: str) -> dict[str, str]:
    """The MLflow tags of a stage's run beside its role: the teacher's name for a named teacher's stages."""
    for t in p.teachers.values():
        if t.name and stage_name in ((t.stage.name if t.stage else None), (t.heads.name if t.heads else None)):
            return {"kdtune.teacher_name": t.name}
    return {}
