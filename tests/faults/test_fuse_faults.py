"""Fault injection on fused bundles (``budget.fuse: 2``): the sweep driver SIGKILLed in the middle of a bundle's
epoch and again right after members finished, each time followed by ``kdtune resume``; and a bundle's worker
process killed mid-epoch (Tune retries it). After each, :func:`harness.check_sweep` holds for the members as
trials (every member trained each epoch exactly once, one MLflow run and one Optuna trial each), and a member
resumed after a kill went on from its last committed epoch."""

from __future__ import annotations

import os
import signal
import time

import pytest
import yaml

from tests.faults import harness as h

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.faults

EPOCHS = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return h.train_teacher(tmp_path_factory.mktemp("fuse-faults") / "teacher")


def _fused_spec(tmp, name, teacher, trials=4):
    spec, exp = h.write_spec(tmp, name, teacher, trials=trials, epochs=EPOCHS, concurrency=2)
    raw = yaml.safe_load(spec.read_text())
    raw["budget"]["fuse"] = 2
    spec.write_text(yaml.safe_dump(raw))
    return spec, exp


def _members(exp):
    return {t: es for t, es in h.events(exp).items() if "-m" in t}


def _starts_after(exp, t0):
    """Per member: the epoch of its first ``start`` event after ``t0``."""
    out = {}
    for t, es in _members(exp).items():
        s = [e for e in es if e["event"] == "start" and e["time"] > t0]
        if s:
            out[t] = s[0]["epoch"]
    return out


def test_driver_killed_mid_bundle_and_after_members_finished(teacher, tmp_path):
    spec, exp = _fused_spec(tmp_path, "fkill", teacher)
    drivers = [h.Driver(["sweep", str(spec)], tmp_path / "fkill-0.log", tmp_path)]
    kills = []
    try:
        # 1. into a bundle's third epoch: its members have committed epoch 2
        got = h.wait_for(lambda: any(h.last_epoch(es) >= 2 for es in _members(exp).values()), 400,
                         "a member's second epoch", drivers[-1])  # fmt: skip
        assert got, drivers[-1].text()[-4000:]
        time.sleep(0.3)
        before = {t: h.last_epoch(es) for t, es in _members(exp).items()}
        drivers[-1].kill()
        t_kill = time.time()
        ev = h.wait_quiet(exp)
        kills.append(("mid-bundle", {t: h.last_epoch(es) for t, es in ev.items() if "-m" in t}))
        # 2. resumed; killed again right after the first member is done (its bundle may not have reported it)
        drivers.append(h.Driver(["resume", str(exp)], tmp_path / "fkill-1.log", tmp_path))
        d0 = h.done_trials(h.events(exp))
        got = h.wait_for(lambda: h.done_trials(h.events(exp)) - d0, 400, "a member done", drivers[-1])
        done_at = {}
        if got and drivers[-1].poll() is None:
            drivers[-1].kill()
            h.wait_quiet(exp)
            now = time.time()
            done_at = {t: now for t in h.done_trials(h.events(exp))}
            kills.append(("after-done", sorted(got)))
            drivers.append(h.Driver(["resume", str(exp)], tmp_path / "fkill-2.log", tmp_path))
        rc = drivers[-1].wait()
        tuner_pkl = exp / "tune" / "sweep" / "tuner.pkl"
        if rc != 0 and tuner_pkl.is_file() and tuner_pkl.stat().st_size == 0 and "EOFError" in drivers[-1].text():
            pytest.xfail("driver killed during Ray's non-atomic snapshot upload (known, see test_faults.py)")
        assert rc == 0, drivers[-1].text()[-4000:]
    finally:
        for d in drivers:
            d.cleanup()
    figures = h.check_sweep(exp, spec, EPOCHS, done_at)
    # no member started over: each resumed member went on from the epoch it had reached (committed)
    resumed = _starts_after(exp, t_kill)
    for t, ep in before.items():
        if t in resumed and ep > 0:
            assert resumed[t] >= ep, f"member {t} had trained {ep} epochs, resumed at epoch {resumed[t]}"
    assert any(ep >= 2 for ep in before.values())
    print(f"\n[faults] fused kills {kills}; members' epochs at the first kill {before}, resumed at {resumed}; "
          f"checks {figures}")  # fmt: skip


def test_bundle_worker_killed_mid_epoch(teacher, tmp_path):
    spec, exp = _fused_spec(tmp_path, "fworker", teacher, trials=2)
    d = h.Driver(["sweep", str(spec)], tmp_path / "fworker.log", tmp_path)
    try:
        def mid():
            for t, es in _members(exp).items():
                if h.last_epoch(es) == 1 and not any(e["event"] == "done" for e in es):
                    return t, [e for e in es if e["event"] == "open"][-1]["pid"]
            return None

        got = h.wait_for(mid, 400, "a member after its first epoch", d)
        assert got, d.text()[-4000:]
        tid, pid = got
        time.sleep(0.3)  # into the bundle's second epoch
        os.kill(pid, signal.SIGKILL)
        kill_time = time.time()
        assert d.wait() == 0, d.text()[-4000:]
    finally:
        d.cleanup()
    figures = h.check_sweep(exp, spec, EPOCHS)
    es = h.events(exp)[tid]
    opens = [e for e in es if e["event"] == "open" and e["time"] > kill_time]
    starts = [e for e in es if e["event"] == "start" and e["time"] > kill_time]
    assert opens and opens[0]["pid"] != pid, "the bundle was not run again by another worker"
    assert starts and starts[0]["epoch"] >= 1, f"the retried bundle started over: {starts}"
    print(f"\n[faults] fused worker: killed pid {pid} (member {tid}); retried by pid {opens[0]['pid']} from epoch "
          f"{starts[0]['epoch']}; checks {figures}")  # fmt: skip
