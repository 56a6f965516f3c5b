"""One owner per record: a trial process and the sweep driver never write one MLflow run at the same time, and
when they still do (a stopped trial closing its run while the driver closes it too) the writes are idempotent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mlflow")

from kdtune.tracking import TAG_FAILURE, SweepTracker, TrialTracker, default_tracking_uri  # noqa: E402
from kdtune.tracking.client import get_client  # noqa: E402
from kdtune.tune.record import trial_gone, wait_trials_gone  # noqa: E402

_RACER = textwrap.dedent(
    """
    import sys, time
    from kdtune.tracking.client import get_client, retry_locked
    uri, run_id, key, go = sys.argv[1:5]
    client = get_client(uri)
    while time.time() < float(go):
        pass
    retry_locked(client.set_tag, run_id, key, "stopped by the scheduler")
    retry_locked(client.set_terminated, run_id, "FINISHED")
    """
)


def test_two_processes_setting_the_same_new_tag_never_raise(tmp_path):
    """The demo's crash: MLflow's set_tag is SELECT-then-INSERT, so two writers of one new tag collided on
    ``UNIQUE constraint failed: tags.key, tags.run_uuid``. Twelve simultaneous pairs must all succeed."""
    import time

    uri = default_tracking_uri(tmp_path / "exp")
    st = SweepTracker(uri, "race")
    parent = st.start_parent({"name": "race"}, {})
    client = get_client(uri)
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    runs = [TrialTracker(uri, "race", parent, trial_id=f"t{i}").run_id for i in range(12)]
    for i, run_id in enumerate(runs):
        go = time.time() + 4.0  # both processes have imported MLflow by then, even on a busy machine
        procs = [
            subprocess.Popen([sys.executable, str(script), uri, run_id, f"kdtune.reason_{i}", str(go)],
                             stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]  # fmt: skip
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags[f"kdtune.reason_{i}"] == "stopped by the scheduler"


def _events(folder, *events):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "events.jsonl", "a") as f:
        for ev in events:
            f.write(json.dumps(ev) + "\n")


def test_a_trial_is_gone_only_once_its_process_let_go(tmp_path):
    host = socket.gethostname()
    me = os.getpid()
    never = tmp_path / "never"
    assert trial_gone(never)  # never started here

    live = tmp_path / "live"
    _events(live, {"event": "open", "pid": me, "host": host})
    assert not trial_gone(live)  # this (live) process holds it
    _events(live, {"event": "closed", "pid": me, "host": host})
    assert trial_gone(live)
    _events(live, {"event": "open", "pid": me, "host": host})  # reopened (a resumed trial)
    assert not trial_gone(live)

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = tmp_path / "crashed"
    _events(crashed, {"event": "open", "pid": dead.pid, "host": host})
    assert trial_gone(crashed)  # the process died without closing: nobody owns the run any more

    elsewhere = tmp_path / "elsewhere"
    _events(elsewhere, {"event": "open", "pid": 1, "host": host + "-other-node"})
    assert not trial_gone(elsewhere)  # cannot tell a process on another node is dead: wait for its event
    assert wait_trials_gone([never, crashed, live, elsewhere], timeout_s=0.5) == [live, elsewhere]


def test_driver_does_not_close_a_run_its_trial_still_holds(tmp_path):
    """close_open_runs leaves a RUNNING run alone while its trial process holds it, and closes it (with the
    reason) once the process has let go."""
    from types import SimpleNamespace

    from kdtune.tune import repairs
    from kdtune.tune.protocol import expand_members
    from kdtune.tune.record import trial_folder

    uri = default_tracking_uri(tmp_path / "exp")
    st = SweepTracker(uri, "own")
    parent = st.start_parent({"name": "own"}, {})
    tt = TrialTracker(uri, "own", parent, trial_id="abc_00001")
    folder = trial_folder(tmp_path / "exp", "abc_00001")
    _events(folder, {"event": "open", "pid": os.getpid(), "host": socket.gethostname()})
    result = SimpleNamespace(metrics={"trial_id": "abc_00001", "epoch": 2, "val_acc": 40.0}, config={},
                             path=str(folder), error=None)  # fmt: skip
    members = expand_members([result], 6)
    orig = repairs.wait_trials_gone
    repairs.wait_trials_gone = lambda folders, timeout_s=60.0: orig(folders, timeout_s=0.3)
    try:
        assert repairs.close_open_runs(uri, "own", members, 6, experiment_dir=tmp_path / "exp") == 0
        assert get_client(uri).get_run(tt.run_id).info.status == "RUNNING"
        _events(folder, {"event": "closed", "pid": os.getpid(), "host": socket.gethostname()})
        assert repairs.close_open_runs(uri, "own", members, 6, experiment_dir=tmp_path / "exp") == 1
    finally:
        repairs.wait_trials_gone = orig
    run = get_client(uri).get_run(tt.run_id)
    assert run.info.status == "FINISHED" and "epoch 2/6" in run.data.tags["kdtune.stop_reason"]
    assert run.data.tags["kdtune.outcome"] == "pruned" and run.data.tags["kdtune.stopped_epoch"] == "2"
    assert TAG_FAILURE not in run.data.tags  # pruned is not a failure


def test_a_driver_that_waited_for_the_lock_does_not_rerun_a_sweep_finished_meanwhile(tmp_path, monkeypatch):
    """Found by tests/faults: a second `kdtune sweep` read state.json ("running") before it took the lock; when
    the first driver finished during the second's start-up, the second took the free lock and ran the finished
    sweep again. The state is read again under the lock."""
    import kdtune.preflight
    from kdtune.spec import load_spec
    from kdtune.tune import rayrt, runner
    from kdtune.tune.experiment import Experiment
    from kdtune.tune.plan import space_sources

    spec = load_spec({"name": "race", "data": "digits", "students": ["resnet8"], "methods": ["ce"],
                      "budget": {"trials": 1, "epochs": 1}, "train": {"device": "cpu"},
                      "storage": str(tmp_path), "tracking": {"enabled": False}})  # fmt: skip
    folder = Experiment(spec.experiment_dir)
    folder.write_start(spec, space_sources(spec))
    folder.write_state({"status": "running", "groups": {}})
    finished = {"status": "finished", "groups": {"resnet8-ce": {"group": "resnet8-ce", "trials": 1}}}

    def other_driver_finishes(spec):  # while this driver runs its checks, the other one ends the sweep
        folder.write_state(finished)

    def no_ray():
        raise AssertionError("a finished sweep was run again")

    monkeypatch.setattr(kdtune.preflight, "preflight", other_driver_finishes)
    monkeypatch.setattr(rayrt, "init_ray", no_ray)
    lines = []
    result = runner.sweep(spec, log=lines.append)
    assert result.status == "finished" and result.groups == [finished["groups"]["resnet8-ce"]]
    assert any("finished meanwhile by another driver" in ln for ln in lines), lines
    assert not (tmp_path / "race" / "sweep.lock").exists()
    assert json.loads((tmp_path / "race" / "state.json").read_text()) == finished


def test_an_epoch_saved_but_not_logged_before_a_kill_is_recorded_once(tmp_path):
    """A trial process killed after it saved epoch 4's state but before it wrote epoch 4's event trained that
    epoch once (the state the trial goes on from holds it): the restored trial writes the missing event,
    marked recovered, and nothing twice."""
    from kdtune.tune.record import read_events, recover_epoch_events, write_event

    for ep in (1, 2, 3):
        write_event(tmp_path, event="epoch", epoch=ep, trial_id="t")
    history = [{"epoch": ep, "val_acc": 50.0 + ep} for ep in (1, 2, 3, 4)]
    recover_epoch_events(tmp_path, history, "t")
    recover_epoch_events(tmp_path, history, "t")  # a second restore adds nothing
    epochs = [e for e in read_events(tmp_path) if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4]
    assert epochs[-1].get("recovered") is True and not any(e.get("recovered") for e in epochs[:3])
