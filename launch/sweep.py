"""Run a kdtune sweep against a running Ray cluster: the target of ``ray submit``.

    ray up launch/cluster.yaml
    ray submit launch/cluster.yaml launch/sweep.py -- sweeps/cifar100-r32x4-r8x4.yaml
    ray submit launch/cluster.yaml launch/sweep.py -- --resume cifar100-r32x4-r8x4

``ray submit`` copies this file alone to ``~/sweep.py`` on the head and runs it there with the head's
``python``, in which kdtune is installed (cluster.yaml's setup commands). A relative spec path is looked up in
the current directory, then in the kdtune checkout on the head (``$KDTUNE_HOME``, default ``~/kdtune``).

On the cluster, two settings of the spec are taken from the head's environment unless given here:
``--storage`` (default ``$KDTUNE_STORAGE``; experiments, Tune checkpoints and stages live there, so it must be
a path every node mounts) and ``--tracking-uri`` (default ``$MLFLOW_TRACKING_URI``, the MLflow server on the
head; used only when the spec leaves ``tracking.uri`` empty). Before any trial starts, every node is asked to
read a file the driver wrote under the storage path: a path that is not shared is refused.

Exit status: 0 when the sweep finished, 2 for an error the user can fix (one line), 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sweep.py",
        description="Run (or resume) a kdtune sweep on the Ray cluster this machine belongs to.",
    )
    p.add_argument("spec", nargs="?", help="the sweep spec (YAML), e.g. sweeps/cifar100-r32x4-r8x4.yaml")
    p.add_argument("--resume", metavar="EXPERIMENT", help="finish an interrupted experiment (name or path)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else auto)")
    p.add_argument("--storage", default=None, help="shared experiment storage (default: $KDTUNE_STORAGE)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--name", default=None, help="experiment name (default: the spec's name)")
    p.add_argument(
        "--no-storage-check", action="store_true", help="skip the check that every node sees storage"
    )
    return p


def find_spec(spec: str) -> Path:
    """The spec as given, else relative to the kdtune checkout on this node ($KDTUNE_HOME, ~/kdtune)."""
    from kdtune.errors import ConfigError

    p = Path(spec).expanduser()
    if p.is_file():
        return p.absolute()
    home = Path(os.environ.get("KDTUNE_HOME", "~/kdtune")).expanduser()
    q = home / spec
    if not p.is_absolute() and q.is_file():
        return q.absolute()
    raise ConfigError(f"sweep spec {spec!r} not found here nor under {home}; give its path on the head node")


def build_spec(spec_path: Path, storage: str | None, tracking_uri: str | None, name: str | None):
    """The spec with the cluster's storage and tracking server filled in; storage must be absolute."""
    from kdtune.config import load_yaml_mapping
    from kdtune.errors import ConfigError
    from kdtune.spec import load_spec

    raw = load_yaml_mapping(spec_path)
    raw.setdefault("name", spec_path.stem)
    if name:
        raw["name"] = name
    if storage:
        raw["storage"] = storage
    st = str(raw.get("storage") or "")
    if "://" not in st and not Path(st).expanduser().is_absolute():
        raise ConfigError(
            f"storage={st or '(unset)'} is not an absolute path; on a cluster give the shared mount, "
            "e.g. --storage /mnt/kdtune/experiments (or set KDTUNE_STORAGE)"
        )
    tracking = raw.get("tracking")
    if tracking_uri and (tracking is None or (isinstance(tracking, dict) and not tracking.get("uri"))):
        raw["tracking"] = {**(tracking or {}), "uri": tracking_uri}
    return load_spec(raw, base_dir=spec_path.parent)


def connect(address: str | None) -> None:
    """Join the running cluster (never start a local one) with the sweep driver's settings."""
    import ray

    from kdtune.tune.rayrt import DRIVER_ENV, WORKER_ENV

    for k, v in DRIVER_ENV.items():
        os.environ.setdefault(k, v)
    address = address or os.environ.get("RAY_ADDRESS") or "auto"
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": dict(WORKER_ENV)})  # fmt: skip
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)


def describe_cluster() -> str:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n["Resources"].get("CPU", 0) for n in nodes)
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    return f"{len(nodes)} nodes, {cpus:g} CPUs, {gpus:g} GPUs"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from kdtune.errors import KdtuneError

    if bool(args.spec) == bool(args.resume):
        _parser().error("give either a spec or --resume EXPERIMENT")
    storage = args.storage or os.environ.get("KDTUNE_STORAGE")
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    import ray

    try:
        if args.resume:
            spec = None
            root = storage
        else:
            spec = build_spec(find_spec(args.spec), storage, tracking_uri, args.name)
            root = spec.storage
        connect(args.address)
        print(f"sweep.py: connected to the Ray cluster ({describe_cluster()})", flush=True)
        if root and not args.no_storage_check:
            from kdtune.tune.rayrt import check_shared

            n = check_shared(root)
            if n:
                print(f"sweep.py: storage {root} is shared by all {n} nodes", flush=True)
        import kdtune.tune as kt

        if spec is None:
            result = kt.resume(args.resume, storage, log=lambda s: print(s, flush=True))
        else:
            result = kt.sweep(spec, log=lambda s: print(s, flush=True))
    except KdtuneError as e:
        print(f"sweep.py: error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(result.table())
    if result.best:
        b = result.best
        print(f"best: {b.get('method')} on {b.get('student')}, {result.metric} {b.get(result.metric)}")
    if result.tracking_uri:
        print(f"MLflow: {result.tracking_uri}")
    print(
        f"experiment: {result.experiment_dir}  (resume with: launch/sweep.py --resume {result.experiment_dir})"
    )
    return 0 if result.status == "finished" else 1


if __name__ == "__main__":
    sys.exit(main())
