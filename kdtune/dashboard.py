"""``kdtune dashboard <experiment>``: MLflow's UI and optuna-dashboard for one experiment, until Ctrl-C.

Both are started from this environment's own scripts (``<venv>/bin/mlflow``, ``<venv>/bin/optuna-dashboard``;
the latter from ``pip install kdtune[dashboard]``) on 127.0.0.1 (free ports unless given), each in a session of
its own (``mlflow ui`` spawns workers: the whole group is stopped), and both are stopped on Ctrl-C, SIGTERM, or
when either one exits. An experiment tracked on an MLflow server (``tracking.uri: http://...``) gets no local
MLflow UI: its address is printed instead. Nothing here imports MLflow or Optuna.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from kdtune.errors import KdtuneError

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _port_free(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def script(name: str, extra: str | None = None) -> str:
    """The console script ``name`` of this Python's environment (else on PATH); one line naming the fix."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)
    if not found:
        how = f"pip install 'kdtune[{extra}]'" if extra else f"pip install {name}"
        raise KdtuneError(f"{name} is not installed in this environment ({sys.executable}); install it: {how}")
    return found


def answering(url: str, timeout_s: float = 2.0) -> bool:
    """Whether an HTTP server answers at ``url`` (any status)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


# The children's environment, under the user's own: MLflow's job runner (GenAI judges and prompt optimisation,
# which kdtune does not use) starts eight processes with ``mlflow ui`` that spent 15 CPU-seconds of a 2-core
# machine in its first 20 s: the first view of a 2,000-trial experiment opened in 16 s, 4-6 s without them
# (docs/bench.md, §Sweep scale).
CHILD_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class Child:
    def __init__(self, name: str, cmd: list[str], url: str, log_dir: Path):
        self.name, self.cmd, self.url = name, cmd, url
        self.log = log_dir / f"{name.split()[0].lower()}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env={**CHILD_ENV, **os.environ})  # fmt: skip

    def tail(self, n: int = 5) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(ln.strip() for ln in lines[-n:] if ln.strip())

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the child's whole session group, SIGKILL after ``grace_s``."""
        pgid = self.proc.pid  # start_new_session: the child leads its own group
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; its workers go with the group
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.1)
            if not _group_alive(pgid):
                break
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def experiment_id(base: str, name: str, timeout_s: float = 5.0) -> str | None:
    """The id of experiment ``name`` on the MLflow server at ``base`` (its REST API), None if it has none."""
    import json
    from urllib.parse import quote

    url = f"{base.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(name)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return str(json.loads(r.read())["experiment"]["experiment_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def runs_line(base: str, name: str) -> str | None:
    """``runs: <address>``: the sweep's runs table in MLflow's Model training mode, on kdtune's view of all
    trials (:mod:`kdtune.tracking.views`); None when the server does not know the experiment."""
    from kdtune.tracking.views import runs_url

    eid = experiment_id(base, name)
    return None if eid is None else f"{'  trials:':<18}{runs_url(base, eid)}"


def plan(exp_dir: Path, uri: str, mlflow_port: int | None, optuna_port: int | None) -> list[tuple]:
    """(name, command, url) of what to start; checks ports and scripts before anything starts."""
    out = []
    for port, what in ((mlflow_port, "--mlflow-port"), (optuna_port, "--optuna-port")):
        if port is not None and not (0 < port < 65536):
            raise KdtuneError(f"{what}={port} is not a port; give a number from 1 to 65535, or leave it out")
        if port is not None and not _port_free(port):
            raise KdtuneError(f"{what}={port}: that port is taken on {HOST}; pick another, or leave it out")
    if uri.startswith("sqlite:"):  # one worker: a local UI for one person (four start twice as slowly here)
        p = mlflow_port or free_port()
        out.append(("MLflow UI", [script("mlflow"), "ui", "--backend-store-uri", uri, "--host", HOST, "--workers", "1",
                                  "--port", str(p)], f"http://{HOST}:{p}"))  # fmt: skip
    from kdtune.tune.experiment import saved_optuna_storage

    storage, _ = saved_optuna_storage(exp_dir)  # a shared database (tracking.optuna) shows every experiment's
    if not storage.startswith("sqlite:///") or Path(storage.removeprefix("sqlite:///")).is_file():
        p = optuna_port or free_port()
        while out and str(p) == out[0][1][-1]:
            p = free_port()
        out.append(("Optuna dashboard", [script("optuna-dashboard", "dashboard"), storage,
                                         "--host", HOST, "--port", str(p)], f"http://{HOST}:{p}"))  # fmt: skip
    return out


def run_dashboard(experiment: str, storage: str | None = None, mlflow_port: int | None = None,
                  optuna_port: int | None = None, ready_timeout_s: float = 120.0, log=print) -> int:  # fmt: skip
    """Start both, print their addresses, wait for Ctrl-C (or SIGTERM, or a child's exit), stop both."""
    from kdtune.report.main import find_experiment_dir, resolve_experiment

    exp_dir = find_experiment_dir(experiment, storage)
    name, _, uri = resolve_experiment(str(exp_dir), None)
    todo = plan(exp_dir, uri, mlflow_port, optuna_port)
    if not uri.startswith("sqlite:"):
        log(f"MLflow UI: {uri} (the sweep's tracking server)")
        line = runs_line(uri, name) if uri.startswith(("http://", "https://")) else None
        if line:
            log(line)
    if not any(name == "Optuna dashboard" for name, _, _ in todo):
        log(f"Optuna dashboard: not started, {exp_dir / 'optuna.db'} does not exist yet (trials are mirrored "
            "as they finish)")  # fmt: skip
    if not todo:
        return 0
    log_dir = Path(tempfile.mkdtemp(prefix="kdtune-dashboard-"))
    children: list[Child] = []

    def _term(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _term)
    # Ctrl-C stops both, even where the shell started kdtune with SIGINT ignored (a background job of a script,
    # `nohup ... &`): Python then leaves it ignored, and the dashboards would outlive every Ctrl-C.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for what, cmd, url in todo:
            children.append(Child(what, cmd, url, log_dir))
        for c in children:
            log(f"{c.name + ':':<18}{c.url}  (pid {c.proc.pid})")
        log(f"experiment {exp_dir}; logs in {log_dir}; Ctrl-C stops both")
        pending = list(children)
        deadline = time.monotonic() + ready_timeout_s
        runs_from, runs_until = None, 0.0
        while True:
            for c in children:
                if c.proc.poll() is not None:
                    raise KdtuneError(f"{c.name} exited with status {c.proc.returncode}: {c.tail() or 'no output'} "
                                      f"(log {c.log})")  # fmt: skip
            ready = [c for c in pending if answering(c.url)]
            for c in ready:
                log(f"{c.name} is answering at {c.url}")
                pending.remove(c)
                if c.name == "MLflow UI":  # its API may answer a moment after its first page
                    runs_from, runs_until = c.url, time.monotonic() + ready_timeout_s
            if runs_from:  # the address to open: MLflow's own start page is its GenAI home
                line = runs_line(runs_from, name)
                if line or time.monotonic() > runs_until:
                    log(line or f"note: MLflow at {runs_from} does not list experiment {name!r}")
                    runs_from = None
            if pending and time.monotonic() > deadline:
                log(f"note: {', '.join(c.name for c in pending)} not answering after {ready_timeout_s:.0f}s; "
                    "still waiting (see the logs)")  # fmt: skip
                deadline = float("inf")
            time.sleep(0.5 if pending else 1.0)
    except KeyboardInterrupt:
        log("stopping the dashboards")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        for c in children:
            c.stop()
