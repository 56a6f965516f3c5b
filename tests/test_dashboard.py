"""kdtune dashboard: MLflow's UI and optuna-dashboard for one experiment, both answering, both gone after Ctrl-C;
bad ports and a missing script refused in one line; the sweep's last lines name the command."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("optuna")

from kdtune.dashboard import answering, script  # noqa: E402
from kdtune.errors import KdtuneError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    import optuna

    from kdtune.tracking import SweepTracker, default_tracking_uri

    exp = tmp_path_factory.mktemp("sweeps") / "dash"
    st = SweepTracker(default_tracking_uri(exp), "dash")
    st.start_parent({"name": "dash", "data": "digits"}, {}, {})
    st.end_parent("FINISHED")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="resnet8-kd", storage=f"sqlite:///{exp / 'optuna.db'}")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    return exp


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dashboard_serves_both_and_ctrl_c_stops_both(experiment):
    pytest.importorskip("optuna_dashboard")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "kdtune", "dashboard", str(experiment)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)  # fmt: skip
    lines: list[str] = []
    children: dict[str, tuple[str, int]] = {}
    try:
        deadline = time.monotonic() + 60
        while len(children) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            for name in ("MLflow UI:", "Optuna dashboard:"):
                if line.startswith(name) and "(pid " in line:
                    url, pid = line[len(name) :].split()[0], int(line.split("(pid ")[1].rstrip(")\n"))
                    children[name] = (url, pid)
        assert set(children) == {"MLflow UI:", "Optuna dashboard:"}, lines
        for url, _ in children.values():
            assert url.startswith("http://127.0.0.1:")
        pending = [url for url, _ in children.values()]
        deadline = time.monotonic() + 180  # a busy 2-core machine: MLflow's server takes its time
        while pending and time.monotonic() < deadline and proc.poll() is None:
            pending = [u for u in pending if not answering(u)]
            time.sleep(0.5)
        assert not pending, (pending, lines)
        # then the address to open: the experiment's runs table in Model training mode, on kdtune's view
        import threading

        more: list[str] = []
        reader = threading.Thread(target=lambda: more.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any("trials:" in ln for ln in more) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        lines += [ln.rstrip() for ln in list(more)]
        trials = [ln.split()[1] for ln in lines if ln.lstrip().startswith("trials:")]
        assert trials, lines
        assert trials[0].startswith(children["MLflow UI:"][0] + "/#/experiments/") and trials[0].endswith(
            "/runs?workflowType=machine_learning&viewStateShareKey=kdtune-trials"), trials
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        proc.wait(timeout=60)
        reader.join(timeout=30)
        rest = "".join(more)
        assert proc.returncode == 0, lines + rest.splitlines()
        assert "stopping the dashboards" in rest
        for url, pid in children.values():
            assert not _alive(pid), f"{url}'s process group {pid} is still running"
            assert not answering(url, timeout_s=1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for _, pid in children.values():
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_dashboard_refuses_a_taken_port_and_a_missing_script(experiment, capsys):
    from kdtune.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["dashboard", str(experiment), "--optuna-port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kdtune: error: --optuna-port={port}: that port is taken on 127.0.0.1; pick another, or leave it out"
    assert main(["dashboard", "nope", "--storage", str(experiment.parent)]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err
    with pytest.raises(KdtuneError, match=r"pip install 'kdtune\[dashboard\]'"):
        script("optuna-dashboard-not-here", "dashboard")


def test_the_sweeps_last_lines_name_the_dashboard_command(tmp_path, capsys):
    from types import SimpleNamespace

    from kdtune.tune.cli import _finish

    result = SimpleNamespace(tracking_uri=None, experiment_dir=str(tmp_path), best=None, table=lambda: "table")
    _finish(result)
    last = capsys.readouterr().out.strip().splitlines()
    assert last[-1] == f"dashboards: kdtune dashboard {tmp_path}"
