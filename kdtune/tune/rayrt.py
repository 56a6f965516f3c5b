"""The Ray runtime of a sweep: starting or joining Ray, the data shared through its object store, the one
trainable, the shared-storage check, and the only place kdtune touches Ray's private functions.

Private Ray functions used (:data:`RAY_PRIVATE`): reading Tune's experiment snapshot (its trial list, for the
searcher's rebuild on resume) and the search generator's newest checkpoint, and the snapshots' period
(:func:`bound_snapshots`). ``tests/test_layers.py`` imports
each of them, so a Ray release that moves one fails there, loudly, not in the middle of a resumed sweep.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError
from kdtune.storage import atomic_write_text

DRIVER_ENV = {
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # no CSV/JSON/TensorBoard files per trial
    "RAY_AIR_NEW_OUTPUT": "0",  # the legacy reporter, silent at verbose=0
    # Snapshot the experiment (trials, searcher) every 2 s instead of 10: a killed driver loses less (longer
    # while a snapshot costs more than 5 % of that: bound_snapshots).
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    # Ray runs its workers at nice 15; the trials are the sweep's work: they run at the driver's priority
    # (``nice kdtune sweep`` lowers them all). Measured in docs/orchestration.md.
    "RAY_worker_niceness": "0",
}
# Reach the trial processes through the job's runtime_env (variables set after ray.init do not).
WORKER_ENV = {
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "60",  # time for a stopped trial to close its MLflow run
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
# (module, name) of every private Ray function this module calls.
RAY_PRIVATE = (
    ("ray.tune.search.search_generator", "_load_newest_checkpoint"),
    ("ray.tune.experiment.trial", "_TrainingRunMetadata"),
    ("ray.tune.utils.serialization", "_loads_with_cloudpickle"),
    ("ray.tune.execution.experiment_state", "_ExperimentCheckpointManager"),
)
SNAPSHOT_SHARE = 19  # a snapshot waits at least this many times its own duration after it (Tune's "auto": 5 %)


def bound_snapshots() -> None:
    """Tune snapshots the experiment every ``TUNE_GLOBAL_CHECKPOINT_S`` (2 s here), whatever a snapshot costs,
    and a snapshot grows with every trial (about 23 KB of JSON each: 73 ms at 200 trials, seconds by 10,000).
    Its "auto" period keeps it to 5 % of the driver's time but waits 10 s at least. This keeps 2 s while a
    snapshot is cheap and grows the period to 19 times the last snapshot's duration when it is not."""
    manager = ray_private("ray.tune.execution.experiment_state", "_ExperimentCheckpointManager")
    if getattr(manager, "_kdtune_bounded", False):
        return
    original = manager._update_auto_checkpoint_time

    def update(self, time_taken: float) -> None:
        if self._auto_checkpoint_enabled:  # TUNE_GLOBAL_CHECKPOINT_S=auto, set by the user: Tune's own rule
            return original(self, time_taken)
        base = self.__dict__.setdefault("_kdtune_base_period", self._checkpoint_period)
        self._checkpoint_period = max(base, float(time_taken) * SNAPSHOT_SHARE)

    manager._update_auto_checkpoint_time = update
    manager._kdtune_bounded = True


def ray_private(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)


def ray_starting() -> str | None:
    """What :func:`init_ray` is about to do, for the person waiting; None when Ray runs in this process."""
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    return f"joining the Ray cluster at {address}" if address else "starting Ray on this machine"


def init_ray() -> bool:
    """Start (or join, with RAY_ADDRESS) Ray quietly; False when this process already had Ray running."""
    for k, v in DRIVER_ENV.items():
        os.environ.setdefault(k, v)
    bound_snapshots()
    import ray

    if ray.is_initialized():
        return False
    # Without RAY_ADDRESS: a fresh local Ray of this process ("local"), never a cluster found by chance.
    address = None if os.environ.get("RAY_ADDRESS") else "local"
    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV)})  # fmt: skip
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return True


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


@dataclass
class SharedData:
    """A DataBundle put in Ray's object store once per sweep and shared by every group's trials."""

    ref: Any

    @classmethod
    def put(cls, data) -> SharedData:
        import ray

        return cls(ray.put(data))

    def get(self):
        import ray

        return ray.get(self.ref)


def make_trainable(fn, ctxs, data, budget):
    """The one trainable of a Tune experiment: ``ctxs`` maps each group to its TrialContext."""
    from ray import tune

    resources = {"cpu": budget.cpus_per_trial, "gpu": budget.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(fn, ctxs=ctxs, data=data), resources)


def newest_generator_state(dirpath: str, pattern: str):
    return ray_private("ray.tune.search.search_generator", "_load_newest_checkpoint")(dirpath, pattern)


def snapshot_trials(tune_dir) -> list[dict] | None:
    """The trials of the newest experiment snapshot of a Tune experiment folder (the one Tune resumes from:
    the greatest name), in creation order: ``trial_id``, ``status``, ``config`` and ``last_result``. None
    when there is no snapshot; ConfigError naming the file when it is damaged."""
    metadata = ray_private("ray.tune.experiment.trial", "_TrainingRunMetadata")
    loads = ray_private("ray.tune.utils.serialization", "_loads_with_cloudpickle")
    files = sorted(Path(tune_dir).glob("experiment_state-*.json"), key=lambda f: f.name)
    if not files:
        return None
    f = files[-1]
    out = []
    try:
        for trial_json, meta_json in json.loads(f.read_text())["trial_data"]:
            t = loads(trial_json)
            meta = metadata.from_json_state(meta_json)
            out.append({"trial_id": t["trial_id"], "status": t["status"], "config": dict(t["config"] or {}),
                        "last_result": dict(meta.last_result or {})})  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{f} is damaged ({type(e).__name__}); move it away to resume from an older snapshot if there is "
            "one, or restore it from a backup"
        ) from e
    return out


def _probe_read(path: str, token: str) -> tuple[bool, str]:
    """Run on one node: does ``path`` hold ``token`` there? (hostname, for the message)."""
    try:
        return Path(path).read_text() == token, socket.gethostname()
    except OSError:
        return False, socket.gethostname()


def check_shared(root: str | os.PathLike, *, timeout_s: float = 120.0) -> int:
    """Check, from a driver connected to a Ray cluster, that every live node sees ``root`` as this one does.

    Writes a probe file under ``root`` and reads it back in a zero-CPU task pinned to each alive node. Ray no
    longer syncs experiment folders to the head, so a storage path that is not shared (a local disk, a
    relative path) would scatter checkpoints and stages across nodes: this refuses it up front with a
    :class:`ConfigError`. Returns the number of nodes checked. Object-store URIs (``s3://``) are not probed.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", str(root)):
        return 0
    root = Path(root).expanduser().absolute()
    root.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = root / f".kdtune-probe-{token[:12]}"
    atomic_write_text(probe, token)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        remote = ray.remote(num_cpus=0, max_retries=0)(_probe_read)
        refs = {
            remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe), token): n
            for n in nodes
        }
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            n = refs[pending[0]]
            raise ConfigError(
                f"node {n.get('NodeManagerAddress')} did not answer the shared-storage check of {root} in "
                f"{timeout_s:.0f} s; check that the node is healthy (ray status)"
            )
        for ref in ready:
            ok, host = ray.get(ref)
            if not ok:
                raise ConfigError(
                    f"storage {root} is not shared: node {refs[ref].get('NodeManagerAddress')} ({host}) "
                    "cannot read a file the driver wrote there; mount the same NFS path on every node (or "
                    "use an object store for storage)"
                )
        return len(nodes)
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
