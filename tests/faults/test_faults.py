"""Fault injection, for real: SIGKILLed drivers (at random, replayable moments), a killed trial worker, a
damaged checkpoint and state file, two drivers on one experiment, a sweep beside a CPU hog, the tracking
database locked beyond the retry window, the disk filling up mid-sweep.

After each fault the sweep must finish as if nothing happened (:func:`harness.check_sweep`). Run with
``make faults`` (or ``pytest -m faults tests/faults -s`` to see the figures). The kill moments come from a
seed that is printed; ``KDTUNE_FAULT_SEED=<seed>`` replays them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.faults import harness as h

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.faults

EPOCHS = 4


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A teacher checkpoint, and the figures of one uninterrupted sweep of the kill tests' shape."""
    tmp = tmp_path_factory.mktemp("faults")
    teacher = h.train_teacher(tmp / "teacher")
    spec, exp = h.write_spec(tmp, "baseline", teacher, epochs=EPOCHS)
    d = h.Driver(["sweep", str(spec)], tmp / "baseline.log", tmp)
    try:
        first_open = h.wait_for(
            lambda: min((e["time"] for es in h.events(exp).values() for e in es if e["event"] == "open"),
                        default=None), 400, "the baseline's first trial", d)  # fmt: skip
        assert d.wait() == 0, d.text()[-4000:]
    finally:
        d.cleanup()
    figures = h.check_sweep(exp, spec, EPOCHS)
    startup = first_open - d.t0
    print(f"\n[faults] baseline: uninterrupted sweep {d.wall:.1f} s, start-up (to the first trial) {startup:.1f} s, "
          f"{figures}")  # fmt: skip
    return {"tmp": tmp, "teacher": teacher, "wall": d.wall, "startup": startup}


def _kill_and_resume(base, tmp_path, name: str, seed: int, methods, trials: int, kills: int = 5):
    spec, exp = h.write_spec(tmp_path, name, base["teacher"], methods=methods, trials=trials, epochs=EPOCHS)
    moments = h.draw_moments(seed, kills)
    print(f"\n[faults] {name}: moments from seed {seed} (KDTUNE_FAULT_SEED={h.fault_seed()} replays them): "
          f"{moments}")
    made, walls, startups, done_at, n = [], [], [], {}, 0

    def startup(d):  # a driver's own start-up: to its first trial process, or all of it if it had none
        t = h.first_event_since(exp, d.t0, "open", until=d.t0 + d.wall)
        return d.wall if t is None else t - d.t0

    drv = h.Driver(["sweep", str(spec)], tmp_path / f"{name}-0.log", tmp_path)
    try:
        for kind, x in moments:
            ev0 = h.events(exp)
            e0, d0 = h.epochs_seen(ev0), h.done_trials(ev0)
            if kind == "after_s":
                cond = lambda: time.time() - drv.t0 >= x  # noqa: B023, E731
            elif kind == "trial_s":
                def cond():
                    t = h.first_event_since(exp, drv.t0, "start")  # noqa: B023
                    return t is not None and time.time() - t >= x  # noqa: B023
            elif kind == "epoch":
                cond = lambda: h.epochs_seen(h.events(exp)) >= e0 + int(x)  # noqa: B023, E731
            else:
                cond = lambda: h.done_trials(h.events(exp)) - d0  # noqa: B023, E731
            total_trials = sum(h.budgets(spec).values())

            def due():  # an event that can no longer come (every trial done) is due now: the wrap-up is hit
                return cond() or (kind != "after_s" and len(h.done_trials(h.events(exp))) >= total_trials)  # noqa: B023

            hit = h.wait_for(due, 400, f"kill moment {kind} {x}", drv)
            if hit is None:  # the sweep finished before this moment came
                break
            if kind == "epoch":
                time.sleep(x - int(x))  # a moment into the next epoch: deliberate, not a wait for a condition
            if drv.poll() is not None:
                break
            at = time.time() - drv.t0
            drv.kill()
            walls.append(drv.wall)
            startups.append(startup(drv))
            ev = h.wait_quiet(exp)
            now = time.time()
            for t in h.done_trials(ev):
                done_at.setdefault(t, now)
            made.append((kind, x, round(at, 1), h.epochs_seen(ev), len(h.done_trials(ev))))
            n += 1
            # Killed before it wrote its spec: nothing to resume, the user runs the sweep again.
            args = ["resume", str(exp)] if (exp / "spec.yaml").is_file() else ["sweep", str(spec)]
            drv = h.Driver(args, tmp_path / f"{name}-{n}.log", tmp_path)
        rc = drv.wait()
        assert rc == 0, drv.text()[-4000:]
        walls.append(drv.wall)
        startups.append(startup(drv))
    finally:
        drv.cleanup()
    import json

    lost = [t["error"] for g in json.loads((exp / "state.json").read_text())["groups"].values() for t in g["all"]
            if "does not exist on storage anymore" in (t.get("error") or "")]  # fmt: skip
    # Every Tune checkpoint is kept (num_to_keep=None): a restored trial's one always exists.
    assert not lost, lost
    figures = h.check_sweep(exp, spec, EPOCHS, done_at)
    total = sum(walls)
    # The drivers' walls, killed ones included, summed: the whole cost of the interrupted sweep. Each driver
    # first pays its own start-up (imports, preflight, Ray, the Tune restore; a driver killed before its first
    # trial is all start-up); what is left is time with trials running, where a kill loses at most the epoch
    # each running trial was in (the trial folders keep everything else). So the total, less the drivers' own
    # start-ups, must stay within 1.5x an uninterrupted sweep of this size (whose wall includes its start-up:
    # generous on purpose, the machine is shared and busy).
    target = 1.5 * base["wall"] * (trials * len(methods) / 4) + sum(startups)
    # The figure (1.5x) is printed; the assertion allows 2x, because the baseline and the kills run at
    # different moments of a shared machine (under load a 1.5x bound failed by 3 % with nothing retrained).
    # Retraining the sweep from scratch after each kill would cost several times more.
    limit = 2.0 * base["wall"] * (trials * len(methods) / 4) + sum(startups)
    print(f"[faults] {name}: {n} kills made (kind, x, at s, epochs seen, trials done): {made}")
    print(f"[faults] {name}: drivers' walls {[round(w, 1) for w in walls]} s, their start-ups "
          f"{[round(w, 1) for w in startups]} s; total {total:.1f} s, target (1.5x) {target:.1f} s, met: "
          f"{total <= target}; checks {figures}")  # fmt: skip
    assert n == kills, f"only {n} kills made: the sweep finished too soon"
    assert total <= limit, f"the interrupted sweep took {total:.1f} s in all, over {limit:.1f} s"
    return n


def test_driver_killed_at_random_moments(base, tmp_path):
    _kill_and_resume(base, tmp_path, "kills-a", h.fault_seed(0), ["kd"], trials=4)


def test_driver_killed_at_random_moments_two_groups(base, tmp_path):
    _kill_and_resume(base, tmp_path, "kills-b", h.fault_seed(1), ["kd", "dkd"], trials=2)


def test_trial_worker_killed_mid_epoch(base, tmp_path):
    import os
    import signal

    spec, exp = h.write_spec(tmp_path, "worker", base["teacher"], trials=2, epochs=EPOCHS)
    d = h.Driver(["sweep", str(spec)], tmp_path / "worker.log", tmp_path)
    try:
        def mid():
            for t, es in h.events(exp).items():
                if h.last_epoch(es) == 1 and not any(e["event"] == "done" for e in es):
                    return t, [e for e in es if e["event"] == "open"][-1]["pid"]
            return None

        got = h.wait_for(mid, 400, "a trial after its first epoch", d)
        assert got, d.text()[-4000:]
        tid, pid = got
        time.sleep(0.3)  # into its second epoch
        os.kill(pid, signal.SIGKILL)
        kill_time = time.time()
        assert d.wait() == 0, d.text()[-4000:]
    finally:
        d.cleanup()
    figures = h.check_sweep(exp, spec, EPOCHS)
    es = h.events(exp)[tid]
    opens = [e for e in es if e["event"] == "open" and e["time"] > kill_time]
    starts = [e for e in es if e["event"] == "start" and e["time"] > kill_time]
    assert opens and opens[0]["pid"] != pid, "the trial was not run again by another worker"
    assert starts and starts[0]["epoch"] >= 1, f"the retried trial started over: {starts}"
    print(f"\n[faults] worker: killed pid {pid} of trial {tid}; retried by pid {opens[0]['pid']} from epoch "
          f"{starts[0]['epoch']}; checks {figures}")  # fmt: skip


def test_damaged_checkpoint_and_state_refused_then_recovered(base, tmp_path):
    """A damaged file of an interrupted sweep: ``kdtune resume`` refuses in one line naming it and what to do
    (a damaged state.pt would otherwise fail its trial on every retry; a damaged state.json is refused by the
    preflight), and does nothing else; doing what it says finishes the sweep as if nothing happened."""
    spec, exp = h.write_spec(tmp_path, "damaged", base["teacher"], trials=2, epochs=EPOCHS)
    d = h.Driver(["sweep", str(spec)], tmp_path / "damaged.log", tmp_path)
    try:
        def mid():
            return next((t for t, es in h.events(exp).items() if h.last_epoch(es) == 1
                         and (exp / "trials" / t / "ckpt" / "state.pt").is_file()), None)  # fmt: skip

        assert h.wait_for(mid, 400, "a trial after its first epoch", d), d.text()[-4000:]
        d.kill()
    finally:
        d.cleanup()
    before = h.wait_quiet(exp)
    # A trial its workers did not finish in their last moments (a finished one never reads its state.pt).
    tid = next((t for t in before if not (exp / "trials" / t / "done.json").exists()
                and (exp / "trials" / t / "ckpt" / "state.pt").is_file()), None)  # fmt: skip
    assert tid, f"no unfinished trial with a checkpoint after the kill: {before}"
    done_at = dict.fromkeys(h.done_trials(before), time.time())
    ckpt = exp / "trials" / tid / "ckpt" / "state.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])  # truncated

    def resume():
        return subprocess.run([sys.executable, "-m", "kdtune", "resume", str(exp)], capture_output=True,
                              text=True, env=h.env(), cwd=tmp_path, timeout=400, start_new_session=True)  # fmt: skip

    out = resume()
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stdout[-3000:] + out.stderr[-3000:]
    assert len(err) == 1 and str(ckpt) in err[0] and "restore it from a backup" in err[0], err
    assert h.events(exp) == before, "a refused resume trained"
    print(f"\n[faults] damaged: truncated {ckpt.relative_to(exp)}: {err[0]}")

    ckpt.write_bytes(good)  # restored from the backup
    state = exp / "state.json"
    saved = state.read_bytes()
    state.write_bytes(saved[: len(saved) // 3])
    out = resume()
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1 and str(state) in err[0], out.stdout[-3000:] + out.stderr[-3000:]
    assert h.events(exp) == before
    print(f"[faults] damaged: truncated state.json: {err[0]}")

    shutil.move(state, tmp_path / "state.json.damaged")  # what the line says: move it away
    out = resume()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    figures = h.check_sweep(exp, spec, EPOCHS, done_at)
    after = h.events(exp)[tid]
    starts = [e for e in after if e["event"] == "start"]
    assert starts[-1]["epoch"] >= 1, f"trial {tid} started over: {starts}"
    print(f"[faults] damaged: resumed after the fixes, trial {tid} from epoch {starts[-1]['epoch']}; "
          f"checks {figures}")  # fmt: skip


def test_second_driver_refused(base, tmp_path):
    """A second ``kdtune sweep`` and a ``kdtune resume`` of a running experiment are refused in one line each
    (exit 2); the first driver is untouched and finishes. Its sweep is long enough (2 trials of 20 epochs) to
    outlast the refused drivers' start-up, so each meets a live lock."""
    epochs = 20
    spec, exp = h.write_spec(tmp_path, "twice", base["teacher"], trials=2, epochs=epochs)
    d = h.Driver(["sweep", str(spec)], tmp_path / "twice.log", tmp_path)
    try:
        h.wait_for(lambda: any(e["event"] == "epoch" for es in h.events(exp).values() for e in es), 400,
                   "the first driver's first epoch", d)  # fmt: skip
        assert d.poll() is None, d.text()[-4000:]
        lock = (exp / "sweep.lock").read_text()
        seconds = [subprocess.Popen([sys.executable, "-m", "kdtune", *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=h.env(), cwd=tmp_path,
                                    start_new_session=True)
                   for args in (["sweep", str(spec)], ["resume", str(exp)])]  # fmt: skip
        for p in seconds:
            out, err = p.communicate(timeout=400)
            lines = err.strip().splitlines()
            assert d.poll() is None, "the first driver ended before the second met its lock: make it longer"
            assert p.returncode == 2, out[-3000:] + err[-3000:]
            assert len(lines) == 1 and f"is being swept by pid {d.proc.pid}" in lines[0], lines
            print(f"\n[faults] twice: `kdtune {p.args[3]}` beside a running driver: {lines[0]}")
        assert (exp / "sweep.lock").read_text() == lock, "a refused driver touched the lock"
        assert d.wait() == 0, d.text()[-4000:]
    finally:
        d.cleanup()
    assert not (exp / "sweep.lock").exists()
    figures = h.check_sweep(exp, spec, epochs)
    print(f"[faults] twice: the first driver finished in {d.wall:.1f} s; checks {figures}")


def test_sweep_beside_cpu_hog(base, tmp_path):
    """Two busy processes in the driver's own session (one scheduling group with the trials, where niceness
    counts): the sweep finishes, its trials at the driver's priority."""
    spec, exp = h.write_spec(tmp_path, "hogged", base["teacher"], trials=2, epochs=EPOCHS)
    d = h.Driver(["sweep", str(spec)], tmp_path / "hogged.log", tmp_path, hogs=2)
    try:
        assert d.wait(timeout=600) == 0, d.text()[-4000:]
    finally:
        d.cleanup()
    figures = h.check_sweep(exp, spec, EPOCHS)
    print(f"\n[faults] hogged: 2 trials beside 2 busy processes in {d.wall:.1f} s "
          f"(baseline, 4 trials, idle: {base['wall']:.1f} s); checks {figures}")  # fmt: skip


def test_tracking_database_locked_beyond_the_retry_window(base, tmp_path):
    """Another process holds mlflow.db's write lock for longer than the trials' retry window (2 s here, 30 s by
    default): the writes that gave up cost no trained epoch; the trials' processes fail over them, Tune
    retries them from their checkpoints and the restored trials log what was lost (backfill), so the sweep
    ends as if nothing happened, or says in one line what it could not record and ``kdtune resume`` records
    it."""
    import sqlite3

    LOCK_S = 30.0  # beyond MLflow's SQLite busy_timeout (20 s) plus the retry window
    spec, exp = h.write_spec(tmp_path, "locked", base["teacher"], trials=2, epochs=EPOCHS)
    env = {"KDTUNE_TRACKING_RETRY_S": "2"}
    d = h.Driver(["sweep", str(spec)], tmp_path / "locked.log", tmp_path, extra_env=env)
    held = 0.0
    try:
        # Both trials have their runs (a run that cannot be made fails its trial's start, before any training:
        # Tune starts it again); the lock then hits their per-epoch logging and the end of their runs.
        h.wait_for(lambda: sum(any(e["event"] == "epoch" for e in es) for es in h.events(exp).values()) >= 2,
                   400, "an epoch of both trials", d)  # fmt: skip
        con = sqlite3.connect(exp / "mlflow.db", timeout=30, isolation_level=None)
        con.execute("BEGIN EXCLUSIVE")
        t0 = time.time()
        time.sleep(LOCK_S)
        con.execute("COMMIT")
        con.close()
        held = time.time() - t0
        rc = d.wait(timeout=600)
    finally:
        d.cleanup()
    text = d.text()
    if rc != 0 or "tracking writes failed" in text:
        out = subprocess.run([sys.executable, "-m", "kdtune", "resume", str(exp)], capture_output=True, text=True,
                             env=h.env(), cwd=tmp_path, timeout=400, start_new_session=True)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in text, text[-4000:]
    figures = h.check_sweep(exp, spec, EPOCHS)
    retried = sum(1 for es in h.events(exp).values() for e in es if e["event"] == "open") - 2
    print(f"\n[faults] locked: mlflow.db held for {held:.1f} s (busy timeout 20 s, retry window 2 s); first driver rc {rc}; "
          f"trial processes started again: {retried}; checks {figures}")  # fmt: skip


def _small_fs(where) -> bool:
    """A 96 MB tmpfs at ``where``, where this machine lets a test mount one (root, CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_disk_full_mid_sweep_then_resumed(base, tmp_path):
    """The experiment's disk fills up mid-sweep (a real 96 MB file system, filled by another file): the
    sweep stops with a non-zero exit and a line naming the full disk; once space is freed, ``kdtune resume``
    finishes it with every epoch trained once and one MLflow run per trial."""
    small = tmp_path / "small"
    if not _small_fs(small):
        pytest.skip("no size-limited file system can be mounted on this machine (needs root and CAP_SYS_ADMIN)")
    try:
        spec, exp = h.write_spec(small, "full", base["teacher"], trials=2, epochs=EPOCHS)
        d = h.Driver(["sweep", str(spec)], tmp_path / "full.log", tmp_path)
        filler = small / "filler"
        try:
            h.wait_for(lambda: any(e["event"] == "epoch" for es in h.events(exp).values() for e in es), 400,
                       "the first epoch", d)  # fmt: skip
            with open(filler, "wb") as f:  # the disk is full from here on
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass
            rc = d.wait(timeout=600)
        finally:
            d.cleanup()
        text = d.text()
        assert rc != 0, text[-4000:]
        assert "No space left on device" in text or "disk is full" in text, text[-4000:]
        last = [ln for ln in text.strip().splitlines() if ln.startswith("kdtune: error")]
        assert last, text[-4000:]
        filler.unlink()
        out = subprocess.run([sys.executable, "-m", "kdtune", "resume", str(exp)], capture_output=True, text=True,
                             env=h.env(), cwd=tmp_path, timeout=400, start_new_session=True)  # fmt: skip
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        figures = h.check_sweep(exp, spec, EPOCHS)
        print(f"\n[faults] disk full: the sweep stopped with rc {rc}: {last[-1][:300]}; after freeing space the "
              f"resume finished; checks {figures}")  # fmt: skip
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)
