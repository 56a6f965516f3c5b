"""Kill-and-resume, for real: ``kdtune sweep`` in a subprocess, SIGKILLed mid-sweep, then ``kdtune resume``.

Checks the promises of ``kdtune resume``: no completed trial is lost or trained again, the trials that were
running continue from their last checkpoint (not from epoch 0), the searcher's history holds every trial
once, and every Tune trial has exactly one MLflow run. CPU only, digits, a few minutes at most.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.faults  # minutes of real processes: `make test` runs it, `make test-fast` does not

TRIALS = 4
# A running trial stays killable (1..EPOCHS-2 epochs behind it) across several 2 s snapshots, even loaded. 7 was
# too few on 2026-12-04: one quiet run's four trials, two at a time, all finished within 12 s, before a snapshot
# came after the last trial's start while a trial was still killable.
EPOCHS = 12


def _events(exp: Path) -> dict[str, list[dict]]:
    """trial id -> its events (start, epoch, done...) from the trials' own folders."""
    from kdtune.tune.record import read_events

    return {d.name: read_events(d) for d in (exp / "trials").glob("*") if d.is_dir()}


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
               RAY_DEDUP_LOGS="0")  # fmt: skip
    return env


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def test_kill_mid_sweep_then_resume(tmp_path):
    import kdtune

    # A small teacher checkpoint, so the sweep itself has no stage to train.
    kdtune.train(
        {
            "data": "digits",
            "model": "resnet8",
            "method": "ce",
            "epochs": 1,
            "device": "cpu",
            "out": str(tmp_path / "teacher"),
        }
    )
    spec = {
        "name": "killme", "data": "digits", "teacher": {"checkpoint": str(tmp_path / "teacher" / "final.pt")},
        "students": ["resnet8"], "methods": ["kd"],
        "budget": {"trials": TRIALS, "epochs": EPOCHS, "concurrency": 2, "cpus_per_trial": 1},
        "scheduler": "none", "train": {"device": "cpu", "batch_size": 32},
        "storage": str(tmp_path / "runs"), "tracking": {"enabled": True}, "seed": 3,
    }  # fmt: skip
    spec_path = tmp_path / "killme.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    exp = tmp_path / "runs" / "killme"
    tune_dir = exp / "tune" / "sweep"  # the sweep's one Tune experiment
    log1 = open(tmp_path / "sweep.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdtune", "sweep", str(spec_path)], stdout=log1, stderr=subprocess.STDOUT,
        env=_env(), cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        # Wait for: one trial finished, another one running with a checkpoint (>= 1 epoch, not done), and an
        # experiment snapshot newer than the latest trial start (the driver's state of that moment is saved).
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (
                "the sweep ended before it could be killed:\n" + (tmp_path / "sweep.log").read_text()
            )
            assert time.time() < deadline, (
                "timed out waiting for the sweep:\n" + (tmp_path / "sweep.log").read_text()
            )
            ev = _events(exp)
            done = {t for t, es in ev.items() if any(e["event"] == "done" for e in es)}
            last = {
                t: max([e["epoch"] for e in es if e["event"] == "epoch"], default=0) for t, es in ev.items()
            }
            # a trial with at least one epoch behind it and two ahead (so it cannot finish before the kill)
            running = {t for t in ev if t not in done and 1 <= last[t] <= EPOCHS - 2}
            if done and running:
                last_start = max(e["time"] for es in ev.values() for e in es if e["event"] in ("open", "start"))
                snaps = [f.stat().st_mtime for f in tune_dir.glob("experiment_state-*.json")]
                if snaps and max(snaps) > last_start + 0.2:
                    break
            time.sleep(0.25)
        os.kill(proc.pid, signal.SIGKILL)
        _kill_group(proc.pid)  # and Ray's processes of the killed driver (they would follow it)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc.pid)
        log1.close()
    # Trial processes die with their raylet, a moment later: wait until nothing is written any more.
    before, quiet_since = _events(exp), time.time()
    while time.time() - quiet_since < 3.0:
        time.sleep(0.5)
        now = _events(exp)
        if now != before:
            before, quiet_since = now, time.time()
    kill_time = time.time()
    done_before = {t for t, es in before.items() if any(e["event"] == "done" for e in es)}
    epochs_before = {
        t: max([e["epoch"] for e in es if e["event"] == "epoch"], default=0) for t, es in before.items()
    }
    running_before = {t for t in before if t not in done_before and epochs_before[t] >= 1}
    assert done_before and running_before
    assert (exp / "sweep.lock").exists()  # left behind by the killed driver: stale, to be taken over

    out = subprocess.run(
        [sys.executable, "-m", "kdtune", "resume", str(exp)], capture_output=True, text=True, env=_env(),
        cwd=tmp_path, timeout=300, start_new_session=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "resuming experiment killme" in out.stdout
    assert "took over the lock" in out.stdout

    after = _events(exp)
    state = json.loads((exp / "state.json").read_text())
    assert state["status"] == "finished"
    summary = state["groups"]["resnet8-kd"]
    tune_ids = {t["trial_id"] for t in summary["all"]}
    assert len(tune_ids) == TRIALS
    assert set(before) <= tune_ids, "a trial seen before the kill was lost"
    assert all(t["epochs_run"] == EPOCHS and t["error"] is None for t in summary["all"])

    for t in done_before:  # finished before the kill: not trained again
        assert not [e for e in after[t] if e["event"] == "epoch" and e["time"] > kill_time], t
    for t in running_before:  # running at the kill: continued from a checkpoint, then finished
        starts = [e for e in after[t] if e["event"] == "start" and e["time"] > kill_time]
        assert starts and starts[0]["epoch"] == epochs_before[t], (t, starts, epochs_before[t])
        epochs_after = [e["epoch"] for e in after[t] if e["event"] == "epoch" and e["time"] > kill_time]
        assert epochs_after and epochs_after[0] == starts[0]["epoch"] + 1 and max(epochs_after) == EPOCHS
    for t in tune_ids:  # every epoch of every trial trained exactly once
        assert sorted(e["epoch"] for e in after[t] if e["event"] == "epoch") == list(range(1, EPOCHS + 1)), t

    # The searcher's history: its (restored, in-memory) study of the group holds every Tune trial once,
    # completed.
    from kdtune.tune.search import GroupedOptunaSearch

    searcher = GroupedOptunaSearch([], "val_acc", "max", EPOCHS)
    searcher.restore_from_dir(str(tune_dir))
    study_trials = searcher.studies["resnet8-kd"].get_trials(deepcopy=False)
    assert len(study_trials) == TRIALS
    assert all(t.state.name == "COMPLETE" for t in study_trials)
    configs = sorted(json.dumps(t["config"], sort_keys=True) for t in summary["all"])
    assert sorted(json.dumps(t.params, sort_keys=True) for t in study_trials) == configs

    # The Optuna database mirror: every trial once.
    import optuna

    mirror = optuna.load_study(study_name="resnet8-kd", storage=f"sqlite:///{exp / 'optuna.db'}")
    mirrored = [t.user_attrs["tune_trial_id"] for t in mirror.get_trials(deepcopy=False)]
    assert sorted(mirrored) == sorted(tune_ids)

    # MLflow: exactly one run per trial, all finished, no orphans; the parent run reused, not duplicated.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("killme").experiment_id
    runs = client.search_runs([eid], max_results=1000)
    trial_runs = [r for r in runs if r.data.tags.get("kdtune.role") == "trial"]
    ids = [r.data.tags["kdtune.trial_id"] for r in trial_runs]
    assert sorted(ids) == sorted(tune_ids)
    assert all(r.info.status == "FINISHED" for r in trial_runs)
    parents = [r for r in runs if r.data.tags.get("kdtune.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for r in trial_runs:  # per-epoch metrics of the whole run, resumed ones included
        hist = client.get_metric_history(r.info.run_id, "val_acc")
        assert sorted({m.step for m in hist}) == list(range(1, EPOCHS + 1))
    # A trial the killed driver started after its last snapshot left an orphan run (by chance, not always):
    # closed, and no trial anywhere: not in the views, the summary, results.json or the report.
    orphans = [r for r in runs if r.data.tags.get("kdtune.orphan") == "true"]
    assert all(r.info.status != "RUNNING" and r.data.tags.get("kdtune.role") == "orphan" for r in orphans)
    from kdtune.tracking.views import ALL_TRIALS, views_of

    view = views_of(client.get_experiment(eid).tags.items())[ALL_TRIALS]["state"]["searchFilter"]
    assert len(client.search_runs([eid], view, max_results=1000)) == TRIALS
    results = json.loads((exp / "results.json").read_text())
    assert [g["trials"] for g in results["groups"]] == [TRIALS]
    report = subprocess.run(
        [sys.executable, "-m", "kdtune", "report", str(exp)], capture_output=True, text=True, env=_env(),
        cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert report.returncode == 0, report.stdout[-4000:] + report.stderr[-4000:]
    assert f"kdtune report: killme ({TRIALS} trials)" in report.stdout, (len(orphans), report.stdout[:2000])
