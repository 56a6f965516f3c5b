"""Shared MLflow plumbing: a quiet client per URI, retries on SQLite's lock, and value conversion.

Every call goes through :class:`mlflow.MlflowClient` with explicit run ids; the fluent API's global active
run is never used, since several trials may share a process. Several processes writing one SQLite file
contend for its lock: :func:`retry_locked` retries such calls briefly with jittered backoff. It also retries
a tag write that collided with another process writing the same new tag: MLflow's SQLAlchemy store sets a
tag as SELECT-then-INSERT, so two writers can both INSERT and one gets ``UNIQUE constraint failed``; on the
retry the row exists and the write becomes an update, so a tag write is idempotent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

from kdtune.tracking.uri import sqlite_path

T = TypeVar("T")

# Tags that kdtune writes; the report and resume find runs by them.
TAG_ROLE = "kdtune.role"  # "parent" | "trial" | "stage" | "orphan" (see is_trial_run)
TAG_SWEEP_ID = "kdtune.sweep_id"  # on the parent run: the experiment name
TAG_TRIAL_ID = "kdtune.trial_id"
TAG_TRIAL_NAME = "kdtune.trial_name"
TAG_STAGE = "kdtune.stage"
TAG_STAGE_KEY = "kdtune.stage_key"
TAG_FAILURE = "kdtune.failure_reason"
TAG_OUTCOME = "kdtune.outcome"  # completed | pruned | failed | diverged
TAG_STOPPED_EPOCH = "kdtune.stopped_epoch"  # the last epoch of a trial that did not complete
TAG_ORPHAN = "kdtune.orphan"  # "true" on a run that belongs to no trial (see mark_orphan)
TAG_METRIC = "kdtune.metric"
TAG_MODE = "kdtune.mode"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # what MLflow 3's UI calls a training experiment
TAG_NOTE = "mlflow.note.content"  # a run's description in the UI

END_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_TAG_VALUE = 5000  # MLflow allows 8000; keep failure reasons readable
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

_LOCK_WORDS = (
    "database is locked",
    "database table is locked",
    "database is busy",
    # a tag/param upsert that lost the race to another writer of the same key (see the module docstring)
    "unique constraint failed: tags.",
    "duplicate key value violates unique constraint \"tag_pk\"",
)
_configured = False
_URI_LOCK = threading.RLock()
_config_lock = threading.Lock()


def quiet_mlflow() -> None:
    """Keep MLflow's loggers at WARNING (the pickle-format warning of ``mlflow.pytorch`` at ERROR)."""
    global _configured
    with _config_lock:
        if _configured:
            return
        for name, level in (
            ("mlflow", logging.WARNING),
            ("mlflow.pytorch", logging.ERROR),
            # it logs a whole traceback for an SQLite error it then raises anyway (a locked or full database):
            # kdtune retries that, or reports it in one line
            ("mlflow.store.db.utils", logging.CRITICAL),
            ("alembic", logging.WARNING),
        ):
            logging.getLogger(name).setLevel(level)
        _configured = True


def _is_locked(exc: BaseException) -> bool:
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 5:
        if any(w in str(e).lower() for w in _LOCK_WORDS):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


def retry_locked(fn: Callable[..., T], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> T:
    """Call ``fn``; on SQLite's "database is locked" (or a tag upsert that collided with another writer's)
    retry with jittered backoff for up to ``timeout_s`` (default: ``KDTUNE_TRACKING_RETRY_S``, else 30 s)."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("KDTUNE_TRACKING_RETRY_S", "30"))
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if not _is_locked(e) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2.0, 1.0)


def tag_entities(tags: Mapping[str, Any]) -> list:
    """``RunTag`` entities of ``tags``, each value cut to MLflow's limit."""
    from mlflow.entities import RunTag

    return [RunTag(str(k), str(v)[:MAX_TAG_VALUE]) for k, v in tags.items()]


def set_tags(client, run_id: str, tags: Mapping[str, Any]) -> None:
    """Set ``tags`` on a run in one batch; idempotent, so a retried or repeated write is harmless."""
    batch = tag_entities(tags)
    if batch:
        retry_locked(client.log_batch, run_id, tags=batch)


@lru_cache(maxsize=16)
def get_client(tracking_uri: str):
    """One :class:`mlflow.MlflowClient` per URI and process (the registry on the same URI)."""
    quiet_mlflow()
    from mlflow import MlflowClient

    path = sqlite_path(tracking_uri)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    return retry_locked(MlflowClient, tracking_uri=tracking_uri, registry_uri=tracking_uri)


_NETWORK_FS = (
    "nfs",
    "nfs4",
    "cifs",
    "smb",
    "smbfs",
    "smb3",
    "fuse.sshfs",
    "lustre",
    "gpfs",
    "ceph",
    "fuse.s3fs",
)


def _filesystem_type(path: Path) -> str | None:
    """The type of the file system holding ``path`` (from /proc/mounts; ``None`` where unknown)."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    target, best, fstype = str(path.absolute()), -1, None
    for line in mounts:
        parts = line.split()
        if len(parts) >= 3:
            mount = parts[1].replace("\\040", " ")
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) > best:
                best, fstype = len(mount), parts[2]
    return fstype


def enable_wal(tracking_uri: str) -> bool:
    """Put an embedded SQLite store in WAL mode (persistent in the file) when it lies on a local disk.

    WAL halves the cost of a commit (about 30 -> 16 ms per ``log_batch`` measured here) and lets the
    report read while trials write. It needs shared memory between the processes, so network file systems
    (NFS, CIFS, Lustre, ...) keep SQLite's default journal. Returns whether the store is in WAL mode.
    """
    import sqlite3

    path = sqlite_path(tracking_uri)
    if path is None or not path.is_file():
        return False
    fstype = _filesystem_type(path)
    if fstype is None or fstype in _NETWORK_FS:
        return False
    try:
        con = sqlite3.connect(str(path), timeout=10)
        try:
            mode = con.execute("PRAGMA journal_mode").fetchone()[0]
            if mode != "wal":
                mode = con.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return False
    return mode == "wal"


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """For the embedded SQLite store: ``<db dir>/mlartifacts/<experiment>`` as a file URI; else the server's."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return None
    return (path.parent.absolute() / "mlartifacts" / slug(experiment_name)).as_uri()


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (or restored from deletion) when needed."""
    from mlflow.exceptions import MlflowException

    exp = retry_locked(client.get_experiment_by_name, name)
    if exp is None:
        try:
            # A training experiment (MLflow's kind). The UI of 3.17 opens an experiment by its own GenAI /
            # Model training switch whatever this says; `kdtune dashboard` prints an address in training mode.
            return retry_locked(client.create_experiment, name, artifact_location=artifact_location,
                                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})  # fmt: skip
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
            exp = retry_locked(client.get_experiment_by_name, name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        retry_locked(client.restore_experiment, exp.experiment_id)
    return exp.experiment_id


def search_all_runs(client, experiment_ids: list[str], filter_string: str = "", order_by=None) -> list:
    """Every active run matching ``filter_string`` (all pages)."""
    runs: list = []
    token = None
    while True:
        page = retry_locked(
            client.search_runs,
            experiment_ids,
            filter_string=filter_string,
            max_results=1000,
            order_by=order_by,
            page_token=token,
        )
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return runs


# --------------------------------------------------------------------------- what is a trial
ROLE_TRIAL = "trial"
ROLE_ORPHAN = "orphan"
# The MLflow filter that selects a sweep's trial runs (the saved views, the driver's searches): the same runs
# as is_trial_run for every run kdtune writes. MLflow compares a tag only on runs that have it, so a filter
# such as ``tags.`kdtune.orphan` != 'true'`` would select no trial at all (none carries the tag): the rule
# lives in the role tag, which every run of kdtune carries.
TRIAL_FILTER = f"tags.`{TAG_ROLE}` = '{ROLE_TRIAL}'"


def is_trial_run(run) -> bool:
    """Whether an MLflow run is a trial of its sweep: the one rule of what kdtune counts and lists as trials
    (report, views, summaries).

    A trial run has ``kdtune.role=trial``. Not trials: the parent, the stages, and orphans, the runs of trials
    that Tune no longer knows (a driver killed after a trial opened its run but before Tune's snapshot named
    the trial), which the resumed driver re-tags ``kdtune.role=orphan`` (:func:`mark_orphan`); an orphan
    closed by an older kdtune kept role trial and carries only ``kdtune.orphan=true``. A run without the role
    tag (logged by other tools) counts when it names a trial id or a parent run and is no stage.
    """
    tags = run.data.tags
    if tags.get(TAG_ORPHAN) == "true":
        return False
    role = tags.get(TAG_ROLE)
    if role is not None:
        return role == ROLE_TRIAL
    return TAG_STAGE not in tags and (TAG_TRIAL_ID in tags or TAG_PARENT in tags)


def mark_orphan(client, run, reason: str) -> None:
    """Take ``run`` (an MLflow run) out of the sweep's trials (:func:`is_trial_run`): role ``orphan``, tag
    ``kdtune.orphan=true`` and the reason; a run still RUNNING is ended KILLED with outcome failed, one that
    its process ended keeps its status and outcome. Only the sweep driver calls this, once the run's process
    is gone."""
    tags = {TAG_ROLE: ROLE_ORPHAN, TAG_ORPHAN: "true", TAG_FAILURE: reason}
    running = run.info.status == "RUNNING"
    if running:
        tags[TAG_OUTCOME] = "failed"
    set_tags(client, run.info.run_id, tags)
    if running:
        retry_locked(client.set_terminated, run.info.run_id, "KILLED")


def quote(value: str) -> str:
    """A value for an MLflow filter string."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"cannot search MLflow for a value holding both quote characters: {value!r}")


def slug(text: str) -> str:
    """``text`` reduced to characters safe in paths and registry names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(text)).strip("-") or "x"


def stable_hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


# --------------------------------------------------------------------------- values
def flatten(d: Mapping, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """Nested mappings to one level with dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": 1}``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


def param_value(v: Any) -> str:
    """A param's string form: scalars as ``str``, lists and mappings as compact JSON; cut at MLflow's limit."""
    if isinstance(v, str):
        s = v
    elif isinstance(v, Path):
        s = str(v)
    elif isinstance(v, (list, tuple, Mapping)):
        s = json.dumps(v, default=str, separators=(",", ":"))
    else:
        s = str(v)
    return s if len(s) <= MAX_PARAM_VALUE else s[: MAX_PARAM_VALUE - 3] + "..."


_KEY_BAD = re.compile(r"[^\w\-. /:]")


def clean_key(key: str) -> str:
    """A key MLflow accepts (alphanumerics, ``_ - . / :`` and spaces)."""
    return _KEY_BAD.sub("_", str(key))[:MAX_KEY]


def as_number(v: Any) -> float | None:
    """A metric value as float, or ``None`` for what is not a number (None, bool, str, tensors of >1 item)."""
    if v is None or isinstance(v, bool) or type(v).__name__ == "bool_":
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
        item = v.item()
        return None if isinstance(item, bool) or not isinstance(item, numbers.Real) else float(item)
    return None


# The engine's bookkeeping figures (timings, throughput, orchestration share, host memory) go to MLflow as
# "system/<name>": its run page shows those in the System metrics tab beside its own system metrics, and the
# Model metrics tab keeps the accuracy, loss and learning-rate curves alone. The epoch is each value's step and
# the number of epochs the param train.epochs: neither is a metric. Only the names MLflow shows change: the
# engine, Tune and the results files keep the engine's names.
SYSTEM_METRICS = frozenset({"train_s", "eval_s", "train_images_per_s", "orch_s", "orch_frac", "host_rss_mb"})
NOT_METRICS = frozenset({"epoch", "epochs"})


def metric_name(key: str) -> str | None:
    """The name MLflow shows for the engine's metric ``key`` (``None``: not logged as a metric)."""
    if key in NOT_METRICS:
        return None
    return clean_key(f"system/{key}" if key in SYSTEM_METRICS else key)


def metric_entities(metrics: Mapping[str, Any], step: int, timestamp_ms: int | None = None) -> list:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    out = []
    for k, v in metrics.items():
        x, name = as_number(v), metric_name(k)
        if x is not None and name is not None:
            out.append(Metric(name, x, ts, int(step)))
    return out


def param_entities(params: Mapping[str, Any], existing: dict[str, str]) -> tuple[list, list]:
    """The ``Param`` entities of ``params`` not yet on the run, and a ``RunTag`` for each key already there with
    another value (MLflow refuses to change a param: on resume the same values come again and are skipped; a
    value that differs is kept as tag ``kdtune.changed_param.<key>`` rather than failing the trial).
    ``existing`` is updated in place with what is new."""
    from mlflow.entities import Param, RunTag

    new: dict[str, str] = {}
    changed: dict[str, str] = {}
    for k, v in flatten(dict(params)).items():
        key, val = clean_key(k), param_value(v)
        if key in existing:
            if existing[key] != val:
                changed[key] = val
            continue
        new[key] = val
    existing.update(new)
    tags = [RunTag(clean_key(f"kdtune.changed_param.{k}"), v[:MAX_TAG_VALUE]) for k, v in changed.items()]
    return [Param(k, v) for k, v in new.items()], tags


def log_params_once(
    client, run_id: str, params: Mapping[str, Any], existing: dict[str, str]
) -> dict[str, str]:
    """Log params not yet on the run (:func:`param_entities`); returns what was logged."""
    ps, tags = param_entities(params, existing)
    log_entities(client, run_id, params=ps, tags=tags)
    return {p.key: p.value for p in ps}


BATCH_CHARS = 700_000  # a log_batch's params and tags, in characters: an MLflow server refuses a request over 1 MB


def log_entities(client, run_id: str, metrics: Iterable = (), params: Iterable = (), tags: Iterable = ()) -> None:
    """Metrics, params and tags of one run in as few ``log_batch`` writes as MLflow's limits allow (per write:
    1,000 entities, of them at most 100 params and 100 tags, and a request under 1 MB on a server: params and
    tags up to :data:`BATCH_CHARS` characters). A tag given twice keeps its last value."""
    metrics, params = list(metrics), list(params)
    tags = list({t.key: t for t in tags}.values())

    def take(items: list, chars: int) -> tuple[list, list, int]:
        n = 0
        while n < min(len(items), PARAMS_PER_BATCH):
            size = len(items[n].key) + len(str(items[n].value))
            if n and chars + size > BATCH_CHARS:
                break
            chars, n = chars + size, n + 1
        return items[:n], items[n:], chars

    while metrics or params or tags:
        p, params, chars = take(params, 0)
        t, tags, _ = take(tags, chars) if chars < BATCH_CHARS else ([], tags, chars)
        room = METRICS_PER_BATCH - len(p) - len(t)
        m, metrics = metrics[:room], metrics[room:]
        retry_locked(client.log_batch, run_id, metrics=m, params=p, tags=t)


def log_metric_entities(client, run_id: str, metrics: Iterable) -> None:
    log_entities(client, run_id, metrics=metrics)


def log_path(client, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a directory's contents as artifacts of ``run_id``."""
    p = Path(path)
    if p.is_dir():
        retry_locked(client.log_artifacts, run_id, str(p), artifact_path)
    elif p.is_file():
        retry_locked(client.log_artifact, run_id, str(p), artifact_path)
    else:
        raise FileNotFoundError(f"cannot log artifact {p}: no such file or directory")


def check_status(status: str) -> str:
    s = str(status).upper()
    if s not in END_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(END_STATUSES)}")
    return s


@contextmanager
def global_tracking_uri(uri: str):
    """Point MLflow's global URI at ``uri`` meanwhile: ``mlflow.pytorch.log_model`` and the registry's
    ``models:/`` lookup resolve their client from it."""
    import mlflow

    with _URI_LOCK:
        try:
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri
        except ImportError:  # pragma: no cover - older/newer MLflow without the private helper
            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(uri)
            try:
                yield
            finally:
                mlflow.set_tracking_uri(previous)
            return
        with _use_tracking_uri(uri):
            yield
