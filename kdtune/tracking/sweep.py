"""The sweep's side of MLflow (driver): the experiment, its parent run, stage runs, the model registry.

One parent run per sweep holds the spec as one artifact (``spec.yaml``) and a handful of readable params
(:func:`parent_params`), the search spaces' source, library versions and the git commit. On resume the parent is found again by tag
``kdtune.sweep_id=<experiment name>`` and continued, never duplicated. Stages (a teacher trained for the
sweep, the CE student DiSK starts from) get child runs of their own, logged once per experiment. The best
student is registered in the model registry with an alias (MLflow 3 aliases, not stages).
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from kdtune.errors import CheckpointError
from kdtune.tracking.client import (
    MAX_TAG_VALUE,
    TAG_GIT_COMMIT,
    TAG_METRIC,
    TAG_MODE,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STAGE,
    TAG_STAGE_KEY,
    TAG_SWEEP_ID,
    check_status,
    clean_key,
    default_artifact_location,
    enable_wal,
    ensure_experiment,
    flatten,
    get_client,
    global_tracking_uri,
    log_metric_entities,
    log_params_once,
    log_path,
    metric_entities,
    quote,
    retry_locked,
    search_all_runs,
    set_tags,
    slug,
    stable_hash,
)
from kdtune.tracking.uri import normalize_tracking_uri

VERSIONED = ("torch", "torchvision", "ray", "optuna", "mlflow", "kdtune")


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a sweep's numbers depend on (from package metadata, no imports)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_state(path: str | Path | None = None) -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout holding ``path`` (default: kdtune's source); ("unknown", None) else."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if commit.returncode != 0:
            return "unknown", None
        status = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def _find_setting(flat: Mapping[str, Any], name: str) -> Any:
    """The value of the shallowest key whose last part is ``name`` (e.g. ``budget.metric``)."""
    hits = sorted((k for k in flat if k == name or k.endswith("." + name)), key=lambda k: k.count("."))
    return flat[hits[0]] if hits else None


def _names(value: Any, key: str = "model") -> list[str]:
    """Names from a spec list or mapping (``[kd, dkd]``, ``{kd: {...}}``, ``[{model: resnet8}]``)."""
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    if isinstance(value, (list, tuple)):
        return [str(v.get(key)) if isinstance(v, Mapping) else str(v) for v in value]
    return [] if value is None else [str(value)]


def stage_params(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A stage run's params under the names a trial run uses (:func:`kdtune.tracking.trial.trial_params`):
    ``model``, ``method``, ``data``, ``seed`` (and ``teacher`` where it has one) as they are, training fields
    as ``train.<field>``, the method's hyperparameters as ``<method>.<name>``; where the stage keeps its files
    is its ``kdtune.stage_dir`` tag, not a param."""
    from kdtune.tracking.trial import trial_params

    cfg = dict(cfg)
    method = str(cfg.get("method") or "ce")
    extra = {k: cfg[k] for k in ("model", "method", "data", "seed") if cfg.get(k) is not None}
    teacher = cfg.get("teacher") or cfg.get("teacher_model")
    if teacher:
        extra["teacher"] = teacher
    return trial_params(method, {}, cfg, extra)


def parent_params(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The parent run's params: what a person scanning a list of sweeps wants to read, not the whole spec.

    ``data``, ``teacher`` (architecture, or the checkpoint), ``students`` and ``methods`` (comma-separated),
    ``trials`` (per method) and ``epochs``, ``concurrency``, ``scheduler``, ``metric``, ``seed`` where the spec
    has them.
    """
    flat = flatten(dict(spec))
    out: dict[str, Any] = {}
    if spec.get("data") is not None:
        out["data"] = spec["data"]
    teacher = spec.get("teacher")
    if isinstance(teacher, Mapping):
        out["teacher"] = teacher.get("model") or teacher.get("checkpoint") or "none"
    elif teacher is not None:
        out["teacher"] = teacher
    teachers = spec.get("teachers")
    if isinstance(teachers, list) and teachers:  # several named teachers: "ce: resnet20, mse: resnet20"
        out["teachers"] = ", ".join(f"{t.get('name')}: {t.get('model') or t.get('checkpoint')}" for t in teachers
                                    if isinstance(t, Mapping))  # fmt: skip
    for key in ("students", "methods"):
        if spec.get(key) is not None:
            out[key] = ", ".join(_names(spec[key]))
    budget = spec.get("budget") if isinstance(spec.get("budget"), Mapping) else {}
    for name in ("trials", "epochs", "concurrency"):
        if budget.get(name) is not None:
            out[name] = budget[name]
    for name in ("metric", "seed"):
        value = _find_setting(flat, name)
        if value is not None:
            out[name] = value
    scheduler = spec.get("scheduler")
    if isinstance(scheduler, Mapping) and scheduler.get("name"):
        out["scheduler"] = scheduler["name"]
    return out


class SweepTracker:
    """The driver's handle on a sweep's MLflow experiment.

    >>> st = SweepTracker("sqlite:////abs/exp/mlflow.db", "exp")
    >>> parent = st.start_parent(spec, spaces={"kd": source}, tags={})
    >>> ... trials log with TrialTracker(uri, "exp", parent, trial_id, trial_name) ...
    >>> st.register_best(best_run_id, name="exp-best"); st.end_parent("FINISHED")
    """

    def __init__(self, tracking_uri: str, experiment_name: str):
        self.tracking_uri = normalize_tracking_uri(tracking_uri)
        self.experiment_name = experiment_name
        self.client = get_client(self.tracking_uri)
        self.experiment_id = ensure_experiment(
            self.client, experiment_name, default_artifact_location(self.tracking_uri, experiment_name)
        )
        self.wal = enable_wal(self.tracking_uri)
        self.parent_run_id: str | None = None
        self.resumed = False

    # ------------------------------------------------------------------ parent run
    def find_parent(self) -> str | None:
        runs = search_all_runs(
            self.client,
            [self.experiment_id],
            f"tags.`{TAG_SWEEP_ID}` = {quote(self.experiment_name)} AND tags.`{TAG_ROLE}` = 'parent'",
            order_by=["attributes.start_time ASC"],
        )
        return runs[0].info.run_id if runs else None

    def start_parent(
        self,
        spec: Mapping[str, Any],
        spaces: Mapping[str, str] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> str:
        """Create the sweep's parent run, or continue the existing one on resume; returns its run id.

        Params: a handful that say what the sweep is (:func:`parent_params`; the whole spec is the artifact
        ``spec.yaml``), ``version.<lib>`` and ``git_commit``. Tags: ``kdtune.sweep_id``,
        ``mlflow.source.git.commit``, ``kdtune.git_dirty``, ``kdtune.metric``/``kdtune.mode`` when the spec
        names them, plus ``tags``. Artifacts: ``spec.yaml`` and ``search_spaces/<method>.py``.
        """
        spec = dict(spec)
        flat = flatten(spec)
        commit, dirty = git_state()
        all_tags: dict[str, str] = {
            TAG_SWEEP_ID: self.experiment_name,
            TAG_ROLE: "parent",
            TAG_GIT_COMMIT: commit,
        }
        if dirty is not None:
            all_tags["kdtune.git_dirty"] = str(dirty).lower()
        for tag, name in ((TAG_METRIC, "metric"), (TAG_MODE, "mode")):
            value = _find_setting(flat, name)
            if value is not None:
                all_tags[tag] = str(value)
        all_tags.update({str(k): str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()})

        run_id = self.find_parent()
        if run_id is None:
            run = retry_locked(
                self.client.create_run, self.experiment_id, tags=all_tags, run_name=self.experiment_name
            )
            run_id, existing = run.info.run_id, {}
            self.resumed = False
        else:
            run = retry_locked(self.client.get_run, run_id)
            existing = dict(run.data.params)
            if run.info.status != "RUNNING":
                retry_locked(self.client.update_run, run_id, status="RUNNING")
            self._set_tags(run_id, all_tags)
            self.resumed = True
        self.parent_run_id = run_id

        params: dict[str, Any] = parent_params(spec)
        params.update({f"version.{k}": v for k, v in library_versions().items()})
        params["git_commit"] = commit
        log_params_once(self.client, run_id, params, existing)
        text = yaml.safe_dump(json.loads(json.dumps(spec, default=str)), sort_keys=False)
        retry_locked(self.client.log_text, run_id, text, "spec.yaml")
        for method, source in (spaces or {}).items():
            fname = method if Path(method).suffix else f"{method}.py"
            retry_locked(self.client.log_text, run_id, str(source), f"search_spaces/{slug(fname)}")
        return run_id

    def save_views(
        self, views: Mapping[str, Mapping[str, Any]], hparams: Mapping[str, Any] | None = None
    ) -> int:
        """Save ``views`` (:func:`kdtune.tracking.views.sweep_views`) as the experiment's saved views of
        MLflow's runs table, and ``hparams`` (group -> its chosen hyperparameters' logged names) as the tags
        ``kdtune report`` reads (:func:`kdtune.tracking.views.hparams_tags`); returns how many tags were
        written (0 when all were already there). Only the driver calls this: it owns the experiment's tags."""
        from kdtune.tracking.views import hparams_tags, view_tags

        exp = retry_locked(self.client.get_experiment, self.experiment_id)
        tags = {**view_tags(views, exp.tags), **hparams_tags((hparams or {}).items(), exp.tags)}
        for key, value in tags.items():
            retry_locked(self.client.set_experiment_tag, self.experiment_id, key, value)
        return len(tags)

    def _set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(batch), 100):
            retry_locked(self.client.log_batch, run_id, tags=batch[i : i + 100])

    def _parent(self) -> str:
        if self.parent_run_id is None:
            raise RuntimeError("start_parent() first: the sweep has no parent run yet")
        return self.parent_run_id

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or a directory's contents to the parent run."""
        log_path(self.client, self._parent(), path, artifact_path)

    def log_parent_metrics(self, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Numbers that describe the whole sweep (slot utilisation, best per group) on the parent run."""
        log_metric_entities(self.client, self._parent(), metric_entities(metrics, step))

    def describe_parent(self, text: str) -> None:
        """The parent run's description (markdown, shown on its page in the MLflow UI)."""
        from kdtune.tracking.client import TAG_NOTE

        set_tags(self.client, self._parent(), {TAG_NOTE: text})

    def end_parent(self, status: str = "FINISHED") -> None:
        retry_locked(self.client.set_terminated, self._parent(), check_status(status))

    # ------------------------------------------------------------------ registry
    def log_trial_student(self, run_id: str, student, data, step: int = 0, checkpoint: str | Path | None = None
                          ) -> str | None:  # fmt: skip
        """Log a finished trial's student into its run (named after the trial, as a trial logs it itself when
        ``tracking.models`` is ``all``), and its ``checkpoint`` (``best.pt``) under ``checkpoints/``; None when
        that run has a model already (a resumed sweep's second call)."""
        from kdtune.tracking.trial import log_student, model_name

        have = retry_locked(self.client.search_logged_models, [self.experiment_id],
                            filter_string=f"source_run_id = {quote(run_id)}")  # fmt: skip
        if have:
            return None
        name = model_name(retry_locked(self.client.get_run, run_id).info.run_name)
        if checkpoint is not None and Path(checkpoint).is_file():
            log_path(self.client, run_id, checkpoint, "checkpoints")
        return log_student(self.client, self.tracking_uri, self.experiment_id, run_id, name, student, data, step)

    def register_best(
        self, run_id: str, artifact_path: str = "model", name: str | None = None, alias: str = "best"
    ) -> str:
        """Register the model logged as ``artifact_path`` by run ``run_id``; point ``alias`` at it.

        Idempotent: a version already registered from this run is reused. Returns the version (a string).
        ``name`` defaults to the experiment name.
        """
        from mlflow.exceptions import MlflowException

        name = name or slug(self.experiment_name)
        try:
            retry_locked(self.client.create_registered_model, name)
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        versions = retry_locked(
            self.client.search_model_versions, f"name = {quote(name)} AND run_id = {quote(run_id)}"
        )
        if versions:
            version = max(versions, key=lambda v: int(v.version))
        else:
            run = retry_locked(self.client.get_run, run_id)
            models = retry_locked(
                self.client.search_logged_models,
                [run.info.experiment_id],
                filter_string=f"source_run_id = {quote(run_id)}",
            )
            # the model of that name, else the run's newest (a trial's student is named after the trial)
            models = [m for m in models if m.name == artifact_path] or models
            if models:
                model = max(models, key=lambda m: m.creation_timestamp)
                source, model_id = f"models:/{model.model_id}", model.model_id
            else:
                listed = retry_locked(self.client.list_artifacts, run_id, artifact_path)
                if not any(Path(f.path).name == "MLmodel" for f in listed):
                    raise CheckpointError(
                        f"run {run_id} has no model logged (none named {artifact_path!r}); log it with "
                        "TrialTracker.log_student() or log_model() before registering it"
                    )
                source, model_id = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}", None
            with global_tracking_uri(self.tracking_uri):  # the registry resolves models:/ through it
                version = retry_locked(
                    self.client.create_model_version,
                    name,
                    source,
                    run_id=run_id,
                    tags={TAG_SWEEP_ID: self.experiment_name},
                    model_id=model_id,
                )
        retry_locked(self.client.set_registered_model_alias, name, alias, str(version.version))
        self._describe_model(name, str(version.version), run_id, alias)
        return str(version.version)

    def _describe_model(self, name: str, version: str, run_id: str, alias: str) -> None:
        """Descriptions a person reads in the registry: the model's (what it is, from which sweep) and the
        version's (the trial, its method and hyperparameters, its accuracy)."""
        run = retry_locked(self.client.get_run, run_id)
        p, m = run.data.params, run.data.metrics
        method = p.get("method", "?")
        hps = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in sorted(p.items()) if k.startswith(f"{method}."))
        scores = ", ".join(f"{k} {m[k]:.2f}" for k in ("val_acc", "best_val_acc", "test_acc") if k in m)
        teacher = p.get("teacher")
        distilled = teacher not in (None, "none") and method not in ("ce", "ls", "mse")  # teacher objectives
        who = f"{p.get('student', '?')} student" + (f" distilled from {teacher}" if distilled else " (no teacher)")
        retry_locked(
            self.client.update_registered_model,
            name,
            description=f"The best student of kdtune sweep {self.experiment_name!r} (alias @{alias}): the "
            f"version the sweep picked on its validation metric. Load: mlflow.pytorch.load_model("
            f"'models:/{name}@{alias}') (needs kdtune importable).",
        )
        retry_locked(
            self.client.update_model_version,
            name,
            version,
            description=f"{method} {who} on {p.get('data', '?')}, trial {run.info.run_name} (run {run_id})"
            + (f"; {hps}" if hps else "") + (f"; {scores}" if scores else "") + ".",
        )

    # ------------------------------------------------------------------ stages
    def log_stage(
        self,
        name: str,
        cfg: Mapping[str, Any],
        result: Mapping[str, Any],
        model_path: str | Path | None = None,
        key: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Log a stage (a teacher, the CE student) as a child run of its own; returns its run id.

        The stage is identified by ``key`` (default: a hash of ``name`` and ``cfg``), kept in tag
        ``kdtune.stage_key``; a stage already logged and finished in this experiment is not logged again, and
        one left unfinished by an interrupted driver is completed. Params: :func:`stage_params`; metrics: the
        numeric values of ``result`` (at step ``result["epochs"]``); artifacts: ``result.json`` and the
        model file or folder under ``model/``.
        """
        key = key or stable_hash({"stage": name, "cfg": dict(cfg)})
        runs = search_all_runs(
            self.client,
            [self.experiment_id],
            f"tags.`{TAG_STAGE_KEY}` = {quote(key)}",
            order_by=["attributes.start_time ASC"],
        )
        if runs and runs[0].info.status == "FINISHED":
            return runs[0].info.run_id
        if runs:
            run_id, existing = runs[0].info.run_id, dict(runs[0].data.params)
        else:
            tags = {TAG_ROLE: "stage", TAG_STAGE: name, TAG_STAGE_KEY: key, **(tags or {})}
            if model_path is not None:  # where the stage lives: its folder, shared by every sweep that uses it
                folder = Path(model_path).resolve()
                tags["kdtune.stage_dir"] = str(folder if folder.is_dir() else folder.parent)
            if self.parent_run_id:
                tags[TAG_PARENT] = self.parent_run_id
            run = retry_locked(
                self.client.create_run, self.experiment_id, tags=tags, run_name=f"stage-{slug(name)}"
            )
            run_id, existing = run.info.run_id, {}
        log_params_once(self.client, run_id, stage_params(cfg), existing)
        step = result.get("epochs", 0)
        step = int(step) if isinstance(step, (int, float)) and not isinstance(step, bool) else 0
        flat_result = {clean_key(k): v for k, v in flatten(dict(result)).items()}
        log_metric_entities(self.client, run_id, metric_entities(flat_result, step))
        retry_locked(
            self.client.log_text, run_id, json.dumps(dict(result), indent=2, default=str), "result.json"
        )
        if model_path is not None:
            log_path(self.client, run_id, model_path, "model")
        retry_locked(self.client.set_terminated, run_id, "FINISHED")
        return run_id
