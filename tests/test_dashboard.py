"""kdtune dashboard: MLflow's UI and optuna-dashboard for one experiment, both answering, both gone after Ctrl-C;
bad ports and a missing script refused in one line; the sweep's last lines name the command."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("optuna")

from kdtune.dashboard import answering, script  # noqa: E402
from kdtune.errors import KdtuneError  # noqa: E402


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


def _pgid(pid: str) -> int | None:
    try:
        return os.getpgid(int(pid))
    except (ProcessLookupError, ValueError):
        return None


def _cmdline(p) -> bytes:
    try:
        return (p / "cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_dashboard_serves_both_and_ctrl_c_stops_both(experiment):
    pytest.importorskip("optuna_dashboard")
    from tests.browser import Dashboard

    # Started with SIGINT ignored, as a background job of a script (`nohup ... &`) starts it: Ctrl-C must stop it
    # all the same (a dashboard that kept SIGINT ignored outlived this test's Ctrl-C and was killed, -9).
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        dash = Dashboard(experiment)  # waits for both addresses and for the optuna-dashboard to answer
    finally:
        signal.signal(signal.SIGINT, before)
    children: dict[str, tuple[str, int | None]] = {}
    try:
        children = {name: (dash._get(name), dash.pid(name)) for name in ("MLflow UI:", "Optuna dashboard:")}
        assert all(url and pid for url, pid in children.values()), dash.lines
        for url, _ in children.values():
            assert url.startswith("http://127.0.0.1:")
        pending = [url for url, _ in children.values()]
        deadline = time.monotonic() + 180  # a busy 2-core machine: MLflow's server takes its time
        while pending and time.monotonic() < deadline and dash.proc.poll() is None:
            pending = [u for u in pending if not answering(u)]
            time.sleep(0.5)
        assert not pending, (pending, dash.lines)
        # MLflow's job runner is off (it cost a 2,000-trial experiment's first view 10 s of CPU): one process
        # of the MLflow group has the setting, none runs a job consumer
        env = (Path("/proc") / str(children["MLflow UI:"][1]) / "environ").read_bytes().split(b"\0")
        assert b"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in env
        group = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _pgid(p.name) == children["MLflow UI:"][1]]
        assert not any(b"huey" in _cmdline(p) for p in group), [_cmdline(p) for p in group]
        # then the address to open: the experiment's runs table in Model training mode, on kdtune's view
        assert dash.trials_url.startswith(children["MLflow UI:"][0] + "/#/experiments/") and dash.trials_url.endswith(
            "/runs?workflowType=machine_learning&viewStateShareKey=kdtune-trials"), dash.trials_url
        assert dash.close() == 0, dash.lines  # Ctrl-C
        assert any("stopping the dashboards" in ln for ln in dash.lines), dash.lines
        for url, pid in children.values():
            assert not _alive(pid), f"{url}'s process group {pid} is still running"
            assert not answering(url, timeout_s=1)
    finally:
        dash.close()
        for _, pid in children.values():
            if pid and _alive(pid):
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
