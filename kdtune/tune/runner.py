"""The sweep driver: spec -> stages -> one Tune experiment per (student, method) -> results, resumable.

Layout of an experiment (``<storage>/<name>/``)::

    spec.yaml        the resolved spec the sweep began with (a changed spec is refused on resume)
    spaces/<m>.py    the search-space sources it uses (a resumed sweep runs these copies, not edited files)
    state.json       status (running | interrupted | failed | finished) and each finished group's summary
    sweep.lock       pid and host of the driver running it
    tune/<group>/    the Ray Tune experiment of one group ("<student>-<method>"), restored by Tuner.restore
    optuna.db        finished trials mirrored into one Optuna study per group
    mlflow.db, mlartifacts/   the embedded MLflow store (unless tracking.uri names another)
    diverged/        markers of trials whose loss became NaN (their retries fail at once)
    results.json     the summary of a finished sweep

Stages (teacher, CE student) are shared between experiments under ``<storage>/stages/``.
Groups run one after another; the trials of a group run ``budget.concurrency`` at a time.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdtune.errors import ConfigError, KdtuneError
from kdtune.spec import SweepSpec, diff_specs, load_spec

STATE_FILE = "state.json"
SPEC_FILE = "spec.yaml"
RESULTS_FILE = "results.json"
DEFAULT_STORAGE = "runs/sweeps"
_DRIVER_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard files per trial
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter, silent at verbose=0
    # Snapshot the experiment (trials, searcher) every 2 s instead of 10: a killed driver loses less.
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
}
# Reach the trial processes through the job's runtime_env (variables set after ray.init do not).
_WORKER_ENV = {
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",  # time for a stopped trial to close its MLflow run
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}


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

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def group(self, method: str, student: str | None = None) -> dict:
        for g in self.groups:
            if g["method"] == method and (student is None or g["student"] == student):
                return g
        raise KeyError(method)

    def table(self) -> str:
        """Best trial per (student, method), as a fixed-width text table."""
        rows = [("student", "method", "trials", f"best {self.metric}", "test_acc", "hyperparameters")]
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
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = []
        for j, r in enumerate(rows):
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + str(r[-1]))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 15)
        return "\n".join(lines)


def _num(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) and math.isfinite(v) else "-"


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---------------------------------------------------------------------------------------------- state


def read_state(exp: Path) -> dict[str, Any]:
    try:
        return json.loads((exp / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {"status": None, "groups": {}}


def write_state(exp: Path, state: dict[str, Any]) -> None:
    exp.mkdir(parents=True, exist_ok=True)
    tmp = exp / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(exp / STATE_FILE)


def find_experiment(experiment: str, storage: str | None = None) -> Path:
    """An experiment directory from a path or a name under ``storage`` (default runs/sweeps)."""
    p = Path(experiment).expanduser()
    if (p / SPEC_FILE).is_file():
        return p.absolute()
    base = Path(storage or DEFAULT_STORAGE).expanduser()
    q = base / experiment
    if (q / SPEC_FILE).is_file():
        return q.absolute()
    raise ConfigError(
        f"no sweep experiment {experiment!r}: neither {p} nor {q} holds a {SPEC_FILE}; give the experiment's "
        "directory, or its name with --storage <path>"
    )


def spec_of(exp: Path) -> SweepSpec:
    raw = yaml.safe_load((exp / SPEC_FILE).read_text())
    return load_spec(raw)


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
    """Everything a sweep checks before Ray starts (``kdtune validate``): spaces for every group, starting
    points, the teacher checkpoint's architecture. Returns a description."""
    s = _Sweep(spec, log=lambda *_: None)
    sources = s.space_sources()
    teacher_arch = s.teacher_arch()
    out = {"groups": []}
    for student, method in spec.groups():
        fn = s.space_fn(student, method, teacher_arch, None, sources)
        points, notes = _starting_points(fn, spec.method(method).starts)
        out["groups"].append({"student": student, "method": method, "parameters": fn.describe(),
                              "starts": points, "notes": notes})  # fmt: skip
    return out


def _starting_points(fn, starts) -> tuple[list[dict], list[str]]:
    if starts is False:
        return [], []
    return fn.valid_starts(None if starts is True else list(starts))


# ---------------------------------------------------------------------------------------------- the driver


class _Sweep:
    def __init__(self, spec: SweepSpec, log=print):
        self.spec = spec
        self.log = log
        self.exp = Path(spec.experiment_dir)
        self.tracker = None
        self.parent_run_id = None
        self.tracking_uri = None
        if spec.tracking.enabled:
            from kdtune.tracking import default_tracking_uri

            self.tracking_uri = spec.tracking.uri or default_tracking_uri(self.exp)

    # ------------------------------------------------------------------ preparation (before Ray)
    def space_sources(self) -> dict[str, tuple[str, str]]:
        from kdtune.tune.spaces import load_source

        out = {}
        for m in self.spec.methods:
            saved = self.exp / "spaces" / f"{m.name}.py"
            out[m.name] = (str(saved), saved.read_text()) if saved.is_file() else load_source(m.name)
        return out

    def teacher_arch(self) -> str | None:
        t = self.spec.teacher
        if t is None:
            return None
        if t.model is not None:
            return t.model
        from kdtune.models.checkpoint import read_checkpoint, unwrap

        _, header, fmt = unwrap(read_checkpoint(t.checkpoint, role="teacher checkpoint"), "teacher checkpoint",
                                t.checkpoint)  # fmt: skip
        if header is None:
            raise ConfigError(
                f"teacher.checkpoint {t.checkpoint} is a plain state_dict ({fmt}) without its architecture; add "
                "teacher.model: <architecture>"
            )
        return str(header["arch"])

    def space_fn(self, student, method, teacher_arch, ce_error, sources, num_classes=None):
        from kdtune.losses import METHODS
        from kdtune.tune.spaces import SpaceContext, build_space

        cls = METHODS.get(method)
        ctx = SpaceContext(method=method, data=self.spec.data, student=student,
                           teacher=teacher_arch if cls.needs_teacher else None, epochs=self.spec.budget.epochs,
                           num_classes=num_classes, ce_error=ce_error)  # fmt: skip
        return build_space(method, ctx, self.spec.method(method).space, sources[method])

    # ------------------------------------------------------------------ run
    def run(self, resume_only: bool) -> SweepResult:
        spec, exp, log = self.spec, self.exp, self.log
        t0 = time.time()
        state = read_state(exp)
        saved = exp / SPEC_FILE
        if saved.is_file():
            old = yaml.safe_load(saved.read_text())
            # storage is where the experiment lies now (it may have been moved): not a change of the sweep
            diff = [d for d in diff_specs(old, spec.to_dict()) if d != "storage"]
            if diff:
                shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
                raise ConfigError(
                    f"experiment {spec.name} at {exp} began with another spec ({shown} differ); restore those "
                    f"fields to resume it, or give the sweep a new name: to start a new one"
                )
            if state.get("status") == "finished":
                log(f"experiment {spec.name} is already finished ({exp}); its results:")
                return self._result_from_state(state)
            done = sum(1 for g in state.get("groups", {}).values() if g.get("status") == "done")
            log(
                f"resuming experiment {spec.name}: {done}/{len(spec.groups())} method groups finished ({exp})"
            )
        elif resume_only:
            raise ConfigError(f"nothing to resume: {exp} holds no sweep ({SPEC_FILE} is missing)")

        # ---- everything that can be refused is checked before Ray starts
        from kdtune.data import load_data

        sources = self.space_sources()
        teacher_arch = self.teacher_arch()
        data = load_data(spec.data, root=spec.data_root, download=spec.download, val_fraction=spec.val_fraction,
                         seed=spec.data_seed)  # fmt: skip
        for student, method in spec.groups():
            self.space_fn(student, method, teacher_arch, None, sources, data.num_classes)
        if self.tracking_uri:
            from kdtune.tracking import check_tracking_uri

            check_tracking_uri(self.tracking_uri)

        from kdtune.tune.lock import SweepLock

        with SweepLock(exp) as lock:
            if lock.took_over:
                log(f"took over the lock of a dead sweep driver (pid {lock.took_over.get('pid')})")
            if not saved.is_file():
                self._write_start(sources)
                state = {"status": "running", "groups": {}, "started": time.time()}
            state["status"] = "running"
            write_state(exp, state)
            ray_started = _init_ray()
            try:
                result = self._run_locked(state, sources, teacher_arch, data, t0)
            except KeyboardInterrupt:
                state["status"] = "interrupted"
                write_state(exp, state)
                self._end_parent("KILLED")
                log(f"interrupted; finish it with: kdtune resume {exp}")
                raise
            except BaseException:
                state["status"] = "failed"
                write_state(exp, state)
                self._end_parent("FAILED")
                raise
            finally:
                if ray_started:
                    import ray

                    ray.shutdown()
        return result

    def _write_start(self, sources) -> None:
        exp = self.exp
        exp.mkdir(parents=True, exist_ok=True)
        (exp / "spaces").mkdir(exist_ok=True)
        for m, (_, text) in sources.items():
            (exp / "spaces" / f"{m}.py").write_text(text)
        tmp = exp / f".{SPEC_FILE}.tmp"
        tmp.write_text(self.spec.to_yaml())
        tmp.replace(exp / SPEC_FILE)

    def _end_parent(self, status: str) -> None:
        if self.tracker is not None:
            try:
                self.tracker.end_parent(status)
            except Exception:  # noqa: BLE001 - never hide the original error
                pass

    def _run_locked(self, state, sources, teacher_arch, data, t0) -> SweepResult:
        from kdtune.losses import METHODS
        from kdtune.tune.stages import ensure_stage

        spec, exp, log = self.spec, self.exp, self.log
        if self.tracking_uri:
            from kdtune import __version__
            from kdtune.tracking import SweepTracker

            self.tracker = SweepTracker(self.tracking_uri, spec.name)
            self.parent_run_id = self.tracker.start_parent(
                spec.to_dict(), spaces={m: text for m, (_, text) in sources.items()},
                tags={"kdtune.experiment_dir": str(exp), "kdtune.version": __version__},
            )  # fmt: skip

        # ---- stages
        stage_res = self._stage_resources()
        teacher_path = spec.teacher.checkpoint if spec.teacher is not None else None
        stages: dict[str, Any] = {}
        if spec.teacher is not None and spec.teacher.is_stage and spec.needs_teacher:
            st = ensure_stage(
                "teacher", spec.teacher_stage_config(), spec.stages_dir, resources=stage_res, log=log
            )
            teacher_path = str(st.model_path)
            stages["teacher"] = {"dir": str(st.dir), "key": st.key, **st.summary()}
            self._log_stage(st)
        ce_stages = {}
        if spec.needs_ce_student:
            for student in spec.students:
                st = ensure_stage(f"ce-{student}", spec.ce_student_config(student), spec.stages_dir,
                                  resources=stage_res, log=log)  # fmt: skip
                ce_stages[student] = st
                stages[f"ce-{student}"] = {"dir": str(st.dir), "key": st.key, **st.summary()}
                self._log_stage(st)
        state["stages"] = stages

        # ---- one Tune experiment per (student, method)
        import ray

        from kdtune.tune.trainable import SharedData

        shared = SharedData(ray.put(data))
        summaries = []
        groups = spec.groups()
        for i, (student, method) in enumerate(groups):
            gname = f"{student}-{method}"
            prev = state["groups"].get(gname)
            if prev and prev.get("status") == "done":
                summaries.append(prev)
                continue
            cls = METHODS.get(method)
            ce = ce_stages.get(student)
            ce_error = ce.result.get("train_error") if (ce is not None and cls.needs_init) else None
            fn = self.space_fn(student, method, teacher_arch, ce_error, sources, data.num_classes)
            base = spec.trial_base(student, method)
            if cls.needs_teacher:
                base["teacher"] = teacher_path
                if spec.teacher is not None and spec.teacher.model and not spec.teacher.is_stage:
                    base["teacher_model"] = spec.teacher.model
            if cls.needs_init:
                base["init"] = str(ce.model_path)
            summary = self._run_group(i, len(groups), gname, student, method, fn, base, shared, teacher_arch)
            state["groups"][gname] = summary
            write_state(exp, state)
            summaries.append(summary)

        # ---- the end
        result = SweepResult(name=spec.name, experiment_dir=str(exp), status="finished", metric=spec.metric,
                             mode=spec.mode, groups=summaries, tracking_uri=self.tracking_uri, stages=stages,
                             wall_s=None)  # fmt: skip
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
        write_state(exp, state)
        result.wall_s = time.time() - t0
        (exp / RESULTS_FILE).write_text(json.dumps(result.to_dict(), indent=2, default=str))
        if self.tracker is not None:
            self.tracker.log_artifact(exp / RESULTS_FILE)
            self.tracker.end_parent("FINISHED")
        log(f"sweep {spec.name} finished in {_dur(result.wall_s)}")
        orch = orchestration_summary(summaries)
        if orch:
            log(orch)
        return result

    def _stage_resources(self) -> dict:
        """A stage runs as one trial does: ``cpus_per_trial`` threads (more threads slow small models down on
        a shared CPU), and a whole GPU when trials use one."""
        b = self.spec.budget
        return {"num_cpus": b.cpus_per_trial, "num_gpus": 1 if b.gpus_per_trial > 0 else 0}

    def _log_stage(self, st) -> None:
        if self.tracker is None:
            return
        result = {k: v for k, v in st.result.items() if k not in ("history", "config", "environment")}
        self.tracker.log_stage(st.name, st.config, result, st.model_path, key=st.key)

    def _result_from_state(self, state) -> SweepResult:
        spec = self.spec
        groups = [state["groups"][f"{s}-{m}"] for s, m in spec.groups() if f"{s}-{m}" in state["groups"]]
        return SweepResult(name=spec.name, experiment_dir=str(self.exp), status=state.get("status"),
                           metric=spec.metric, mode=spec.mode, groups=groups, best=state.get("best"),
                           tracking_uri=self.tracking_uri, stages=state.get("stages", {}))  # fmt: skip

    # ------------------------------------------------------------------ one group
    def _run_group(self, i, n, gname, student, method, fn, base, data, teacher_arch) -> dict:
        from ray import tune

        from kdtune.tune.trainable import TrialContext, run_trial

        spec, log = self.spec, self.log
        b = spec.budget
        ms = spec.method(method)
        n_params = len(fn.parameters())
        num_samples = (ms.trials or b.trials) if n_params else 1
        tctx = TrialContext(
            group=gname, method=method, base=base, experiment_dir=str(self.exp), threads=max(1, int(b.cpus_per_trial)),
            tracking_uri=self.tracking_uri, experiment_name=spec.name, parent_run_id=self.parent_run_id,
            params={"student": student, "teacher": teacher_arch or "none", "data": spec.data, "group": gname},
        )  # fmt: skip
        trainable = _trainable(run_trial, tctx, data, b)
        path = self.exp / "tune" / gname
        pair = f"{teacher_arch} -> {student}" if base.get("teacher") else student
        if tune.Tuner.can_restore(str(path)):
            on = spec.failures.on_resume
            log(f"[{i + 1}/{n}] {method} ({pair}): resuming its {num_samples} trials")
            if on == "restart":
                _clear_errored(path, self.exp)
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=on == "resume", restart_errored=on == "restart")  # fmt: skip
        else:
            points, notes = _starting_points(fn, ms.starts)
            for note in notes:
                log(f"  {gname}: {note}")
            what = (
                f"{num_samples} trials x {b.epochs} epochs"
                if n_params
                else f"1 run x {b.epochs} epochs (no search space)"
            )
            starts = f", {min(len(points), num_samples)} from published starting points" if points else ""
            log(f"[{i + 1}/{n}] {method} ({pair}): {what}{starts}")
            tuner = self._new_tuner(gname, method, fn, trainable, num_samples, points)
        results = tuner.fit()
        _check_finished(results, num_samples, path)
        close_open_runs(self.tracking_uri, spec.name, results, b.epochs, group=gname, experiment_dir=self.exp)
        summary = self._summarize(gname, student, method, results)
        if b.repeats > 1 and summary.get("best"):
            summary["repeats"] = self._run_repeats(gname, summary, tctx, data)
        return summary

    def _new_tuner(self, gname, method, fn, trainable, num_samples, points):
        import optuna
        from ray import tune
        from ray.tune.search.optuna import OptunaSearch

        from kdtune.tune.callbacks import OptunaMirror, ProgressPrinter, TrialNamer

        spec = self.spec
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearch(
            space=fn, metric=spec.metric, mode=spec.mode, points_to_evaluate=points or None,
            sampler=optuna.samplers.TPESampler(seed=spec.seed),
        )  # fmt: skip
        callbacks = [
            ProgressPrinter(gname, spec.metric, spec.budget.epochs, log=self.log),
            OptunaMirror(f"sqlite:///{self.exp / 'optuna.db'}", gname, spec.metric, spec.mode, fn,
                         {"method": method, "experiment": spec.name}),
        ]  # fmt: skip
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=make_scheduler(spec), metric=spec.metric, mode=spec.mode,
                num_samples=num_samples, max_concurrent_trials=spec.budget.concurrency, reuse_actors=True,
                trial_name_creator=TrialNamer(gname), trial_dirname_creator=TrialNamer(gname, with_id=True),
            ),
            run_config=self._run_config(gname, callbacks),
        )  # fmt: skip

    def _run_config(self, name, callbacks):
        from ray import tune

        return tune.RunConfig(
            name=name, storage_path=str(self.exp / "tune"), verbose=0, callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=self.spec.failures.max_failures),
        )  # fmt: skip

    def _run_repeats(self, gname, summary, tctx, data) -> dict:
        """Run the best configuration again with ``repeats - 1`` more seeds; mean ± std over all of them."""
        from dataclasses import replace

        from ray import tune

        from kdtune.tune.callbacks import ProgressPrinter, TrialNamer
        from kdtune.tune.trainable import run_trial

        spec, b = self.spec, self.spec.budget
        rname = f"{gname}-repeats"
        path = self.exp / "tune" / rname
        rctx = replace(tctx, group=rname, phase="repeat")
        trainable = _trainable(run_trial, rctx, data, b)
        seeds = [spec.seed + k for k in range(1, b.repeats)]
        if tune.Tuner.can_restore(str(path)):
            tuner = tune.Tuner.restore(
                str(path), trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            self.log(f"  {gname}: repeating its best configuration with seeds {seeds}")
            config = {**summary["best"]["config"], "train.seed": tune.grid_search(seeds)}
            tuner = tune.Tuner(
                trainable, param_space=config,
                tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=b.concurrency, reuse_actors=True,
                                            trial_name_creator=TrialNamer(rname),
                                            trial_dirname_creator=TrialNamer(rname, with_id=True)),
                run_config=self._run_config(
                    rname, [ProgressPrinter(rname, spec.metric, b.epochs, log=self.log)]
                ),
            )  # fmt: skip
        results = tuner.fit()
        _check_finished(results, len(seeds), path)
        close_open_runs(self.tracking_uri, spec.name, results, b.epochs, group=rname, experiment_dir=self.exp)
        best = summary["best"]
        vals, tests = [best.get("val_acc")], [best.get("test_acc")]
        for r in results:
            m = r.metrics or {}
            if r.error is None and m.get("epoch") == b.epochs:
                vals.append(m.get("val_acc"))
                tests.append(m.get("test_acc"))
        vals = [v for v in vals if isinstance(v, (int, float))]
        tests = [v for v in tests if isinstance(v, (int, float))]
        return {"seeds": [spec.seed, *seeds], "n": len(tests), "val_mean": _mean(vals), "val_std": _std(vals),
                "test_mean": _mean(tests), "test_std": _std(tests), "test": tests}  # fmt: skip

    def _summarize(self, gname, student, method, results) -> dict:
        spec = self.spec
        epochs = spec.budget.epochs
        trials = []
        for r in results:
            m = r.metrics or {}
            tid = m.get("trial_id") or Path(r.path).name.rsplit("_", 1)[-1]
            trials.append({
                "trial_id": tid, "config": dict(r.config or {}), "epochs_run": m.get("epoch"),
                spec.metric: m.get(spec.metric), "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"),
                "best_val_acc": m.get("best_val_acc"), "orch_frac": m.get("orch_frac"),
                "error": (str(r.error).strip().splitlines() or [""])[-1][:300] if r.error is not None else None,
            })  # fmt: skip
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


def _trainable(fn, tctx, data, b):
    from ray import tune

    resources = {"cpu": b.cpus_per_trial, "gpu": b.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(fn, ctx=tctx, data=data), resources)


def make_scheduler(spec: SweepSpec):
    """ASHA (default), HyperBand or none (FIFO), over epochs (``training_iteration``)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    s = spec.scheduler
    if s.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=spec.budget.epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)  # fmt: skip
    if s.name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=spec.budget.epochs,
                                  reduction_factor=s.reduction_factor)  # fmt: skip
    return FIFOScheduler()


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
    snaps = sorted(tune_dir.glob("experiment_state-*.json"), key=lambda f: f.stat().st_mtime)
    if not snaps:
        return []
    out = []
    for trial_json, _ in json.loads(snaps[-1].read_text()).get("trial_data", []):
        t = json.loads(trial_json)
        if t.get("status") == "ERROR":
            out.append(t["trial_id"])
    return out


def _clear_errored(tune_dir: Path, exp: Path) -> None:
    """``on_resume: restart``: errored trials start from scratch, so their own folders go."""
    import shutil

    from kdtune.tune.trainable import trial_folder

    for tid in errored_trials(tune_dir):
        shutil.rmtree(trial_folder(exp, tid), ignore_errors=True)


def orchestration_summary(summaries: list[dict]) -> str | None:
    """One line: the median and largest share of a trial's wall time spent on orchestration (checkpoint
    writes, MLflow logging, Tune reporting), over the trials of this run that reported it."""
    fracs = [t["orch_frac"] for g in summaries for t in g.get("all", []) if _finite(t.get("orch_frac"))]
    if not fracs:
        return None
    return (f"orchestration (checkpoints, MLflow, Tune reports): median {100 * statistics.median(fracs):.2f}% "
            f"of a trial's wall time, max {100 * max(fracs):.2f}%, over {len(fracs)} trials")  # fmt: skip


def _rank(t: dict, spec: SweepSpec, epochs: int):
    v = t[spec.metric]
    return (t.get("epochs_run") == epochs, v if spec.mode == "max" else -v)


def _overall_best(summaries: list[dict], spec: SweepSpec) -> dict | None:
    bests = [dict(g["best"], group=g["group"], method=g["method"], student=g["student"]) for g in summaries
             if g.get("best")]  # fmt: skip
    if not bests:
        return None
    return max(bests, key=lambda t: _rank(t, spec, spec.budget.epochs))


def close_open_runs(uri: str | None, experiment: str, results, epochs: int, group: str | None = None,
                    experiment_dir: str | Path | None = None) -> int:
    """End the MLflow runs a group's trials left RUNNING; returns how many were closed.

    A trial's process may be ended by Tune before it closes its run (ASHA stopping the last trials). And a
    driver killed between two experiment snapshots forgets the trials it started meanwhile: Tune restores
    without them and the searcher asks again, so their runs belong to no trial; they are ended KILLED with
    tag ``kdtune.orphan=true`` and the reason.
    """
    if not uri:
        return 0
    from kdtune.tracking import TAG_FAILURE, TAG_ROLE, TAG_TRIAL_ID
    from kdtune.tracking.client import get_client, quote, retry_locked, search_all_runs
    from kdtune.tracking.trial import experiment_id_for
    from kdtune.tune.trainable import trial_folder, wait_trials_gone

    client = get_client(uri)
    exp_id = experiment_id_for(uri, experiment)
    closed = 0
    known = set()
    ids = [(r.metrics or {}).get("trial_id") or Path(r.path).name.rsplit("_", 1)[-1] for r in results]
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
            if r.error is not None:
                status, reason = "FAILED", (str(r.error).strip().splitlines() or ["error"])[-1][:500]
            elif m.get("epoch") is not None and m.get("epoch") < epochs:
                status, reason = "FINISHED", f"stopped by the scheduler after epoch {m.get('epoch')}/{epochs}"
            else:
                status, reason = "FINISHED", None
            if reason:
                retry_locked(client.set_tag, run.info.run_id, TAG_FAILURE, reason)
            retry_locked(client.set_terminated, run.info.run_id, status)
            closed += 1
    if group is not None:
        flt = f"tags.`kdtune.group` = {quote(group)} AND tags.`{TAG_ROLE}` = 'trial'"
        for run in search_all_runs(client, [exp_id], flt):
            if run.data.tags.get(TAG_TRIAL_ID) in known or run.info.status != "RUNNING":
                continue
            reason = "orphan: the sweep driver died before Tune recorded this trial; the searcher asked anew"
            retry_locked(client.set_tag, run.info.run_id, TAG_FAILURE, reason)
            retry_locked(client.set_tag, run.info.run_id, "kdtune.orphan", "true")
            retry_locked(client.set_terminated, run.info.run_id, "KILLED")
            closed += 1
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
