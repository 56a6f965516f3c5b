"""The MLflow run of one Tune trial, created once and found again by its trial id on resume.

Ray's ``MLflowLoggerCallback`` makes a second run for every trial restored after a driver restart, and
``setup_mlflow`` never ends its runs (``shared/STACK.md``). Here each trial owns one child run of the sweep's
parent run, tagged ``kdtune.trial_id``; a restored or retried trial finds that run again and continues it
(status back to RUNNING, metrics appended at their epochs). All calls use explicit run ids, so several
trials can share a process. Each ``log_metrics`` is one ``log_batch`` round trip; with ``background=True``
that round trip happens on a thread of the tracker's own, off the training loop, in order, merged with what
else came within ``BATCH_S`` (the params, the metrics of later epochs, the tags ``end`` is given: a one-epoch
trial's run is three writes, created, logged, ended), and ``flush()`` (called by ``end()``) waits for it and
raises what it could not log. ``backfill(history)`` logs the epochs a
resumed trial's checkpoint holds but its run lacks (a process killed between its checkpoint and its log).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdtune.tracking.client import (
    MAX_TAG_VALUE,
    TAG_FAILURE,
    TAG_PARENT,
    TAG_ROLE,
    TAG_TRIAL_ID,
    TAG_TRIAL_NAME,
    check_status,
    default_artifact_location,
    ensure_experiment,
    get_client,
    global_tracking_uri,
    log_entities,
    log_metric_entities,
    log_path,
    metric_entities,
    param_entities,
    quote,
    retry_locked,
    search_all_runs,
    set_tags,
    tag_entities,
)
from kdtune.tracking.uri import normalize_tracking_uri

_experiment_ids: dict[tuple[str, str], str] = {}


def experiment_id_for(tracking_uri: str, experiment_name: str) -> str:
    """The experiment's id, created if missing (cached per process)."""
    key = (tracking_uri, experiment_name)
    if key not in _experiment_ids:
        client = get_client(tracking_uri)
        _experiment_ids[key] = ensure_experiment(
            client, experiment_name, default_artifact_location(tracking_uri, experiment_name)
        )
    return _experiment_ids[key]


@contextmanager
def _no_requirement_check():
    """Skip MLflow's check that the model's pinned requirements match this environment.

    They are read from this very environment (torch's and kdtune's versions), so the check cannot fail; it
    costs 1-4 s of CPU per process (it maps every installed distribution's files to its modules), which
    would land after a trial's last epoch.
    """
    import mlflow.utils.environment as env

    original = getattr(env, "warn_dependency_requirement_mismatches", None)
    if original is None:
        yield
        return
    env.warn_dependency_requirement_mismatches = lambda *_a, **_k: None
    try:
        yield
    finally:
        env.warn_dependency_requirement_mismatches = original


# TrainConfig fields that say where or how a run is kept, not what is computed: not logged as ``train.*``.
_NOT_TRAINING = frozenset(
    {"hp", "method", "model", "data", "teacher", "teacher_model", "init", "out", "overwrite", "resume", "save_every", "device",
     "data_root", "download", "seed", "num_workers"}
)  # fmt: skip


def trial_params(
    method: str, config: Mapping[str, Any], base: Mapping[str, Any], extra: Mapping[str, Any]
) -> dict[str, Any]:
    """The params of a trial run, named by what they mean, so that a plot across methods never mixes two
    meanings under one name (DKD's ``beta`` and DIST's ``beta``):

    - ``extra`` as it is (``method``, ``student``, ``teacher``, ``data``, ``seed``, ...): what is trained;
    - the method's hyperparameters as ``<method>.<name>`` (``dkd.beta``, ``wttm.gamma``), the searched ones
      (``config``) over the group's base values (``base["hp"]``);
    - training fields as ``train.<field>`` (``train.lr``, ``train.weight_decay``), searched over base; the
      seed only as ``seed`` (the report tells seeds of one configuration apart by it).

    A config key is read as the trainable reads it (:func:`kdtune.trial_config.split_config`).
    """
    from kdtune.config import TrainConfig
    from kdtune.losses import METHODS
    from kdtune.trial_config import split_config

    fields, hp = split_config(dict(config), method)
    out: dict[str, Any] = dict(extra)
    merged = {**dict(base), **fields}
    try:  # every field, defaults included, so that runs compare on all of them
        merged = {**TrainConfig.from_dict({**merged, "hp": {}}).to_dict(), **merged}
    except Exception:  # noqa: BLE001 - the trial itself says what is wrong; log what was given
        pass
    train = {k: v for k, v in merged.items() if k not in _NOT_TRAINING}
    out.update({f"train.{k}": v for k, v in sorted(train.items())})
    declared = {k: h.default for k, h in METHODS.get(method).hparams.items()} if method in METHODS else {}
    hps = {**declared, **dict(base.get("hp") or {}), **hp}
    out.update({f"{method}.{k}": v for k, v in sorted(hps.items())})
    return out


def logged_names(method: str, names) -> list[str]:
    """The names :func:`trial_params` logs searched keys under (``beta`` of DKD: ``dkd.beta``; ``lr``:
    ``train.lr``), in the order given."""
    from kdtune.trial_config import split_config

    out = []
    for name in names:
        fields, hp = split_config({name: None}, method)
        out += [f"{method}.{k}" for k in hp] + [k if k == "seed" else f"train.{k}" for k in fields]
    return out


def model_name(trial_name: str) -> str:
    """A LoggedModel name from a trial name (MLflow allows letters, digits, ``-``, ``_`` and ``.``)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "-", str(trial_name)).strip("-") or "model"


def start_system_metrics(run_id: str, tracking_uri: str, resumed: bool):
    """MLflow's own system-metrics monitor on ``run_id`` (CPU, memory, disk, network, GPU with nvidia-ml-py
    as ``system/*``), sampled every ``$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` s (MLflow's variable;
    default here 10); ``None`` without psutil."""
    try:
        import psutil  # noqa: F401
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    import logging

    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)  # no GPU: not worth a warning per trial
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, resume_logging=resumed, tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def _merged(parts: list[tuple[list, list, list]]) -> tuple[list, list, list]:
    """The metrics, params and tags of several queued writes, each kind in order, for one ``log_entities``."""
    return tuple([e for p in parts for e in p[i]] for i in range(3))


BATCH_S = 1.0  # a trial's metrics reach MLflow at most this late, in one write
_FLUSH = object()  # flush(): write what is queued now


class TrialTracker:
    """One Tune trial's MLflow run: a child of ``parent_run_id`` named after the trial.

    >>> tt = TrialTracker(uri, "my-sweep", parent_run_id, trial_id="a1b2_00000", trial_name="kd_a1b2_00000")
    >>> tt.log_params({"T": 4.0}); tt.log_metrics({"val_acc": 71.2, "lr": 0.05}, step=0); tt.end("FINISHED")

    ``resumed`` is True when an existing run of this trial id was found and continued. ``fresh``: the caller
    knows no run of this trial id exists (no process opened the trial before), so none is searched for.
    ``tags``: set on the run as it is created (or continued).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        parent_run_id: str | None,
        trial_id: str,
        trial_name: str | None = None,
        background: bool = False,
        system_metrics: bool = False,
        fresh: bool = False,
        tags: Mapping[str, Any] | None = None,
    ):
        self.tracking_uri = normalize_tracking_uri(tracking_uri)
        self.background = background
        self._queue: queue.Queue | None = None
        self._error: BaseException | None = None
        self._lost: list[tuple[list, list, list]] = []  # what the writer could not write (end() tries it again)
        self.experiment_name = experiment_name
        self.parent_run_id = parent_run_id
        self.trial_id = str(trial_id)
        self.trial_name = trial_name or self.trial_id
        self.client = get_client(self.tracking_uri)
        self.experiment_id = experiment_id_for(self.tracking_uri, experiment_name)
        runs = [] if fresh else search_all_runs(  # a search grows with the experiment: a fresh trial skips it
            self.client,
            [self.experiment_id],
            f"tags.`{TAG_TRIAL_ID}` = {quote(self.trial_id)}",
            order_by=["attributes.start_time ASC"],
        )
        if runs:
            run = runs[0]
            self.run_id = run.info.run_id
            self.resumed = True
            self._params = dict(run.data.params)
            if run.info.status != "RUNNING":
                retry_locked(self.client.update_run, self.run_id, status="RUNNING")
            if run.data.tags.get(TAG_FAILURE):
                retry_locked(self.client.delete_tag, self.run_id, TAG_FAILURE)
            if tags:
                set_tags(self.client, self.run_id, tags)
        else:
            first = {str(k): str(v)[:MAX_TAG_VALUE] for k, v in (tags or {}).items()}
            first.update({TAG_ROLE: "trial", TAG_TRIAL_ID: self.trial_id, TAG_TRIAL_NAME: self.trial_name})
            if parent_run_id:
                first[TAG_PARENT] = parent_run_id
            run = retry_locked(  # the run and its tags in one write
                self.client.create_run, self.experiment_id, tags=first, run_name=self.trial_name
            )
            self.run_id = run.info.run_id
            self.resumed = False
            self._params = {}
        self.ended = False
        self._monitor = start_system_metrics(self.run_id, self.tracking_uri, self.resumed) if system_metrics else None

    # ------------------------------------------------------------------ logging
    def log_trial_params(
        self, method: str, config: Mapping[str, Any], base: Mapping[str, Any], extra: Mapping[str, Any]
    ) -> None:
        """A Tune trial's params, named so runs of different methods compare: see :func:`trial_params`."""
        self.log_params(trial_params(method, config, base, extra))

    @property
    def params(self) -> dict[str, str]:
        """The params the run holds (found on resume) or was given (written, or queued to be)."""
        return dict(self._params)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log hyperparameters (nested mappings flattened with dots); values already logged are skipped. In the
        background, with the first metrics (a run's params are visible at most ``BATCH_S`` after this)."""
        ps, tags = param_entities(params, self._params)
        self._write((), ps, tags)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log the numeric values of ``metrics`` at ``step`` (the epoch) in one round trip.

        ``None``, booleans and strings are skipped; NaN and infinities are logged as they are (a diverged
        loss is worth seeing).
        """
        self._write(metric_entities(metrics, step))  # stamped now, whenever they are written

    def _write(self, metrics=(), params=(), tags=()) -> None:
        """Now, or with ``background``, by the writer thread in its next write."""
        if not self.background:
            log_entities(self.client, self.run_id, metrics, params, tags)
            return
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._writer, name=f"mlflow-{self.trial_id}", daemon=True).start()
        self._queue.put((list(metrics), list(params), list(tags)))

    def _writer(self) -> None:
        # Import what log_model needs while the trial trains, not after its last epoch (over a second).
        try:
            import mlflow.pyfunc  # noqa: F401
            import mlflow.pytorch  # noqa: F401
        except Exception:  # noqa: BLE001 - log_model will say what is missing
            pass
        q = self._queue
        while True:
            # one write for what came within BATCH_S of the first item (an epoch's metrics alone cost a toy
            # trial's epoch 14 ms of SQLite; ten epochs in one write, 3 ms each); flush() and end() cut it short
            items, deadline = [q.get()], time.monotonic() + BATCH_S
            while items[-1] is not None and items[-1] is not _FLUSH:
                try:
                    items.append(q.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            parts = [it for it in items if it is not None and it is not _FLUSH]
            try:
                if not self._lost and parts:
                    log_entities(self.client, self.run_id, *_merged(parts))
                else:  # after a failed write, in order: kept for end()'s one more try
                    self._lost.extend(parts)
            except BaseException as e:  # noqa: BLE001 - kept and raised by flush()
                self._error = e
                self._lost.extend(parts)
            finally:
                for _ in items:
                    q.task_done()
            if items[-1] is None:  # end(): the run is closed, the thread goes
                return

    def flush(self) -> None:
        """Wait until every metric handed to ``log_metrics`` is written; raise the first write that failed."""
        if self._queue is not None:
            self._queue.put(_FLUSH)
            self._queue.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"MLflow could not log the metrics of run {self.run_id}: {err}") from err

    def backfill(self, history: list[Mapping[str, Any]], key: str = "train_loss") -> int:
        """Log the epochs of ``history`` (the engine's per-epoch metrics) whose ``key`` the run lacks; returns
        how many. A resumed trial calls it once: its checkpoint may be ahead of its run."""
        logged = {m.step for m in retry_locked(self.client.get_metric_history, self.run_id, key)}
        missing = [m for m in history if m.get("epoch") is not None and int(m["epoch"]) not in logged]
        entities = [e for m in missing for e in metric_entities(m, int(m["epoch"]))]
        log_metric_entities(self.client, self.run_id, entities)  # in as few batches as MLflow takes
        return len(missing)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        set_tags(self.client, self.run_id, tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under ``artifact_path`` of the run."""
        log_path(self.client, self.run_id, path, artifact_path)

    def log_student(self, student, data, step: int = 0) -> str:
        """The trained ``student`` as a LoggedModel named after the trial (:func:`log_student`)."""
        return log_student(self.client, self.tracking_uri, self.experiment_id, self.run_id, model_name(self.trial_name),
                           student, data, step)  # fmt: skip

    def log_model(self, model, name: str = "model", step: int = 0, input_example=None, signature=None) -> str:
        """Log ``model`` as a LoggedModel of this run (:func:`log_model`); returns its URI."""
        return log_model(self.client, self.tracking_uri, self.experiment_id, self.run_id, model, name, step,
                         input_example, signature)  # fmt: skip

    # ------------------------------------------------------------------ end
    def end(self, status: str = "FINISHED", reason: str | None = None, tags: Mapping[str, Any] | None = None) -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED); ``reason`` goes to tag kdtune.failure_reason;
        ``tags`` (the outcome) are written with the last metrics, in one write."""
        status = check_status(status)
        if self._monitor is not None:
            self._monitor.finish()  # its last samples, before the run is closed
            self._monitor = None
        tags = {**(tags or {})}
        if reason:
            text = " ".join(str(reason).split()) if len(str(reason)) < 300 else str(reason)
            tags[TAG_FAILURE] = text
        if tags:
            self._write(tags=tag_entities(tags))
        unlogged = None
        try:
            self.flush()
        except RuntimeError as e:  # close the run all the same, then say what was lost
            unlogged = e
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None
        if self._lost:  # a write that failed (a store locked past the retries): once more, all of it, in order
            lost, self._lost = self._lost, []
            try:
                log_entities(self.client, self.run_id, *_merged(lost))
                unlogged = None
            except Exception as e:  # noqa: BLE001 - the run is closed all the same, and the loss said
                unlogged = RuntimeError(f"MLflow could not log the metrics, params or tags of run {self.run_id}: {e}")
        if unlogged is not None and reason:  # the reason at least, however the batch failed
            retry_locked(self.client.set_tag, self.run_id, TAG_FAILURE, tags[TAG_FAILURE][:MAX_TAG_VALUE])
        retry_locked(self.client.set_terminated, self.run_id, status)
        self.ended = True
        if unlogged is not None:
            raise unlogged

    def __enter__(self) -> TrialTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.ended:
            return
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED", "interrupted")
        else:
            self.end("FAILED", f"{exc_type.__name__}: {exc}")


def log_student(client, tracking_uri: str, experiment_id: str, run_id: str, name: str, student, data,
                step: int = 0) -> str:
    """The trained ``student`` as a LoggedModel ``name`` of run ``run_id``, with a signature (from one zero input
    of ``data``'s shape: the engine normalises images before the model, so the model takes floats). ``data``
    needs ``in_channels`` and ``image_size`` (None for vectors). A run ended already may be given one."""
    import torch
    from mlflow.models import infer_signature

    d = data
    shape = (2, d.in_channels, d.image_size, d.image_size) if d.image_size else (2, d.in_channels)
    module = getattr(student, "_orig_mod", student)
    x = torch.zeros(shape)
    was_training = module.training
    try:  # on the module itself (no copy): eval mode for the one forward, then as it was
        device = next(module.parameters()).device
        module.eval()
        with torch.inference_mode():
            y = module(x.to(device)).float().cpu()
    finally:
        module.train(was_training)
    signature = infer_signature(x.numpy(), y.numpy())
    return log_model(client, tracking_uri, experiment_id, run_id, student, name, step, signature=signature)


def log_model(client, tracking_uri: str, experiment_id: str, run_id: str, model, name: str = "model",
              step: int = 0, input_example=None, signature=None) -> str:
    """Log ``model`` with ``mlflow.pytorch.log_model`` as a LoggedModel of run ``run_id``; returns its URI.

    A CPU copy of the module (unwrapped from ``torch.compile``) is pickled (MLflow's "pickle" format:
    the default "pt2" export needs an input example and a traceable model); loading it needs kdtune
    importable. Requirements are pinned here rather than inferred (inference loads the model in a
    subprocess, seconds per call). Register it with :meth:`SweepTracker.register_best`.
    """
    import mlflow.pytorch
    import torch

    from kdtune.version import __version__

    module = getattr(model, "_orig_mod", model)
    module = copy.deepcopy(module).to("cpu").eval()
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"kdtune=={__version__}"]
    logged = retry_locked(client.create_logged_model, experiment_id, name=name, source_run_id=run_id)
    with global_tracking_uri(tracking_uri), _no_requirement_check():
        info = mlflow.pytorch.log_model(
            module,
            name=name,
            run_id=run_id,
            model_id=logged.model_id,
            step=int(step),
            pip_requirements=requirements,
            serialization_format="pickle",
            input_example=input_example,
            signature=signature,
        )
    return info.model_uri
