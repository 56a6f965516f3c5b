"""Shared machinery of the fault-injection suite: real ``kdtune sweep`` / ``kdtune resume`` processes, real
signals, real files.

- :func:`write_spec`: a tiny digits sweep (resnet8 students of a 1-epoch teacher, a few trials of a few
  epochs, FIFO, tracking on), whose experiment folder is ``<tmp>/runs/<name>``.
- :class:`Driver`: one driver process in a session of its own (``start_new_session``): Ray's workers leave
  the driver's process group but not its session, so :func:`kill_session` ends everything it started.
- :func:`wait_for`: poll a condition with a generous deadline (the machine is shared and busy).
- :func:`check_sweep`: what must hold after any fault once the sweep is finished (see its docstring).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout these tests run from
DEFAULT_SEED = 20261202


def fault_seed(offset: int = 0) -> int:
    """The seed of the random fault moments: ``KDTUNE_FAULT_SEED`` (to replay a failure) or the default."""
    return int(os.environ.get("KDTUNE_FAULT_SEED", DEFAULT_SEED)) + offset


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1",
             RAY_DEDUP_LOGS="0", MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false")  # fmt: skip
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])])
    return e


def train_teacher(out: Path) -> Path:
    import kdtune

    kdtune.train({"data": "digits", "model": "resnet8", "method": "ce", "epochs": 1, "device": "cpu",
                  "out": str(out)})  # fmt: skip
    return out / "final.pt"


def write_spec(tmp: Path, name: str, teacher: Path, methods=None, trials: int = 4, epochs: int = 3,
               concurrency: int = 2, seed: int = 3) -> tuple[Path, Path]:
    """A small digits sweep; returns (spec path, experiment folder)."""
    import yaml

    spec = {
        "name": name, "data": "digits", "teacher": {"checkpoint": str(teacher)},
        "students": ["resnet8"], "methods": methods or ["kd"],
        "budget": {"trials": trials, "epochs": epochs, "concurrency": concurrency, "cpus_per_trial": 1},
        "scheduler": "none", "train": {"device": "cpu", "batch_size": 128},
        "storage": str(tmp / "runs"), "tracking": {"enabled": True}, "seed": seed,
        "failures": {"max_failures": 2},
    }  # fmt: skip
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, tmp / "runs" / name


def budgets(spec_path: Path) -> dict[str, int]:
    from kdtune.spec import load_spec

    spec = load_spec(spec_path)
    return {g.name: (spec.method(g.method).trials or spec.budget.trials) for g in spec.groups()}


# ---------------------------------------------------------------------------------------------- processes


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes of session ``sid`` (from /proc)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# Start N busy processes, then become the command (same session, same process group as the hogs).
_WITH_HOGS = (
    "import os, subprocess, sys\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class Driver:
    """``python -m kdtune <args>`` in its own session, its output in ``log``."""

    def __init__(self, args: list[str], log: Path, cwd: Path, extra_env: dict | None = None, hogs: int = 0):
        """``hogs``: that many busy processes started in the driver's own session first, so they share its
        scheduling group (Linux's autogroup gives each session an equal share, whatever the niceness inside:
        hogs in another session would never compete with niced trial processes); ``cleanup`` ends them."""
        self.log = log
        self.t0 = time.time()
        self._f = open(log, "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "kdtune", *args]
        if hogs:
            cmd = [sys.executable, "-c", _WITH_HOGS, str(hogs), *cmd]
        self.proc = subprocess.Popen(cmd, stdout=self._f,
                                     stderr=subprocess.STDOUT, env={**env(), **(extra_env or {})}, cwd=cwd,
                                     start_new_session=True)  # fmt: skip
        self.wall: float | None = None

    def poll(self):
        rc = self.proc.poll()
        if rc is not None and self.wall is None:
            self.wall = time.time() - self.t0
        return rc

    def text(self) -> str:
        if not self._f.closed:
            self._f.flush()
        return self.log.read_text()

    def wait(self, timeout: float = 400) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.log.name} did not end in {timeout} s:\n{self.text()[-4000:]}") from None
        self.poll()
        self._f.close()
        return rc

    def kill(self) -> None:
        """SIGKILL the driver, then everything of its session (Ray's processes would follow it anyway)."""
        try:
            os.kill(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)
        self.poll()
        kill_session(self.proc.pid)
        self._f.close()

    def cleanup(self) -> None:
        kill_session(self.proc.pid)
        if not self._f.closed:
            self._f.close()


def wait_for(cond, timeout: float, what: str, driver: Driver | None = None, poll_s: float = 0.2):
    """Poll ``cond()`` until it returns something true; fail naming ``what`` after ``timeout`` s, or when
    ``driver`` ended first (then None is returned: the caller decides)."""
    deadline = time.time() + timeout
    while True:
        v = cond()
        if v:
            return v
        if driver is not None and driver.poll() is not None:
            return None
        assert time.time() < deadline, f"timed out ({timeout} s) waiting for {what}" + (
            f":\n{driver.text()[-4000:]}" if driver else "")
        time.sleep(poll_s)


def wait_quiet(exp: Path, quiet_s: float = 3.0, timeout: float = 90) -> dict[str, list[dict]]:
    """After a kill: wait until no trial folder's events change for ``quiet_s`` (workers die a moment after
    their raylet); returns the events then."""
    before, since, deadline = events(exp), time.time(), time.time() + timeout
    while time.time() - since < quiet_s:
        assert time.time() < deadline, "the trials kept writing after their driver was killed"
        time.sleep(0.5)
        now = events(exp)
        if now != before:
            before, since = now, time.time()
    return before


# ---------------------------------------------------------------------------------------------- records


def events(exp: Path) -> dict[str, list[dict]]:
    from kdtune.tune.record import read_events

    d = exp / "trials"
    return {f.name: read_events(f) for f in d.glob("*") if f.is_dir()} if d.is_dir() else {}


def epochs_seen(ev: dict[str, list[dict]]) -> int:
    return sum(1 for es in ev.values() for e in es if e["event"] == "epoch")


def done_trials(ev: dict[str, list[dict]]) -> set[str]:
    return {t for t, es in ev.items() if any(e["event"] == "done" for e in es)}


def last_epoch(es: list[dict]) -> int:
    return max([e["epoch"] for e in es if e["event"] == "epoch"], default=0)


def check_sweep(exp: Path, spec_path: Path, epochs: int, done_at: dict[str, float] | None = None) -> dict:
    """What must hold once a sweep finished, whatever happened on the way:

    - state.json: finished; per group as many trials as its budget, all completed, none failed;
    - the events: every trial trained each epoch exactly once (1..epochs), and no trial trained after the
      moment it was known ``done`` (``done_at``: trial id -> time of a kill after its done event);
    - MLflow: exactly one trial run per trial (tag kdtune.trial_id), FINISHED, per-epoch metrics with no
      repeated step; runs of trials Tune forgot (a driver killed between snapshots) are closed orphans, no
      trial (role orphan), and the report counts the trials alone;
    - optuna.db: one study per group (its name, "<student>-<method>" or "<teacher>-<student>-<method>"), holding each of the group's Tune trials once.

    Returns figures to print."""
    import optuna
    from mlflow import MlflowClient

    state = json.loads((exp / "state.json").read_text())
    assert state["status"] == "finished", state.get("status")
    want = budgets(spec_path)
    ids_by_group = {}
    for g, n in want.items():
        s = state["groups"][g]
        assert s["trials"] == n and s["completed"] == n and s["errored"] == 0, (g, s["trials"], s["completed"])
        assert all(t["outcome"] == "completed" and t["epochs_run"] == epochs for t in s["all"]), g
        ids_by_group[g] = [t["trial_id"] for t in s["all"]]
    tune_ids = [t for ids in ids_by_group.values() for t in ids]
    assert len(set(tune_ids)) == len(tune_ids)

    ev = events(exp)
    for t in tune_ids:
        eps = [e["epoch"] for e in ev[t] if e["event"] == "epoch"]
        assert sorted(eps) == list(range(1, epochs + 1)), f"trial {t} trained epochs {eps}"
    # every trial process ran at the driver's priority (Ray's own default niced its workers to 15)
    nice = {e.get("nice") for es in ev.values() for e in es if e["event"] == "open" and "pid" in e}
    assert nice == {os.nice(0)}, f"trial processes ran at niceness {nice}, the driver at {os.nice(0)}"
    for t, since in (done_at or {}).items():
        again = [e for e in ev.get(t, []) if e["event"] == "epoch" and e["time"] > since]
        assert not again, f"trial {t} had finished, yet trained again: {again}"

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name(exp.name).experiment_id
    runs = client.search_runs([eid], max_results=5000)
    trial_runs = [r for r in runs if r.data.tags.get("kdtune.role") == "trial"]
    by_id: dict[str, list] = {}
    for r in trial_runs:
        by_id.setdefault(r.data.tags.get("kdtune.trial_id"), []).append(r)
    orphans = [r for r in runs if r.data.tags.get("kdtune.orphan") == "true"]
    stray = [r.data.tags.get("kdtune.trial_id") for r in trial_runs
             if r.data.tags.get("kdtune.trial_id") not in tune_ids and r.data.tags.get("kdtune.phase") != "repeat"]  # fmt: skip
    assert not stray, f"runs of trials Tune does not know are counted as trials, not closed as orphans: {stray}"
    for t in tune_ids:
        rs = by_id.get(t, [])
        assert len(rs) == 1, f"trial {t} has {len(rs)} MLflow runs"
        assert rs[0].info.status == "FINISHED", (t, rs[0].info.status)
        for key in ("val_acc", "train_loss"):
            steps = [m.step for m in client.get_metric_history(rs[0].info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs + 1)), f"trial {t}: {key} steps {sorted(steps)}"
    assert all(r.info.status != "RUNNING" for r in orphans), "an orphan run was left RUNNING"
    assert all(r.data.tags.get("kdtune.role") == "orphan" for r in orphans), "an orphan kept its trial role"
    from kdtune.report.table import collect_trials

    counted = [t for t in collect_trials(client, eid) if t.params.get("phase") != "repeat"]
    assert len(counted) == len(tune_ids), f"the report counts {len(counted)} trials, the sweep ran {len(tune_ids)}"

    # the teacher store (every sweep with a teacher reads and writes it): whatever was killed while writing,
    # every published epoch is whole, and no trial found a damaged one (it would have set it aside)
    from kdtune.engine.teacher_store import CORRUPT_INFIX, SUFFIX, check_file

    store = exp.parent / "stages" / "teacher-store"
    published = sorted(store.glob(f"*/epoch-*{SUFFIX}"))
    bad = {p.name: why for p in published if (why := check_file(p)) is not None}
    assert not bad, f"teacher store epochs that are not whole: {bad}"
    aside = sorted(p.name for p in store.glob(f"*/*{CORRUPT_INFIX}*"))
    assert not aside, f"a trial found a damaged teacher store epoch: {aside}"

    storage = f"sqlite:///{exp / 'optuna.db'}"
    studies = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    assert studies == set(want), studies
    for g, ids in ids_by_group.items():
        mirrored = [t.user_attrs.get("tune_trial_id") for t in optuna.load_study(study_name=g, storage=storage).get_trials(deepcopy=False)]
        assert sorted(mirrored) == sorted(ids), (g, mirrored, ids)
    return {"trials": len(tune_ids), "mlflow_runs": len(trial_runs), "orphan_runs": len(orphans),
            "studies": sorted(studies), "nice": sorted(nice), "store_epochs": len(published)}  # fmt: skip


def draw_moments(seed: int, n: int) -> list[tuple[str, float]]:
    """``n`` kill moments, each one of

    - ("after_s", t): t seconds after the driver started (during its start-up: preflight, Ray, the restore);
    - ("trial_s", t): t seconds after the driver's first trial started (restored, training);
    - ("epoch", 1.f): f seconds after the next epoch event (into the next epoch);
    - ("done", 0): right after the next ``done`` event (a trial finished, Tune may not know yet).
    """
    rng = random.Random(seed)
    kinds = ["after_s", "trial_s", "epoch", "done"]  # each kind at least once (n >= 4), the rest at random
    kinds = (kinds + [rng.choice(kinds + ["trial_s", "epoch"]) for _ in range(n - len(kinds))])[:n]
    rng.shuffle(kinds)
    out = []
    for kind in kinds:
        if kind == "after_s":
            out.append((kind, round(rng.uniform(1.0, 10.0), 2)))  # start-ups here take 12 s or more
        elif kind == "trial_s":
            out.append((kind, round(rng.uniform(0.2, 3.0), 2)))
        elif kind == "epoch":
            out.append((kind, 1 + round(rng.uniform(0.0, 0.9), 2)))
        else:
            out.append((kind, 0.0))
    return out


def first_event_since(exp: Path, t0: float, kind: str = "open", until: float = float("inf")) -> float | None:
    """The time of the first ``kind`` event in [t0, until] (``open``: a trial process of the driver that
    started at t0 took its trial; ``start``: a trial was restored and begins to train)."""
    ts = [e["time"] for es in events(exp).values() for e in es if e["event"] == kind and t0 <= e["time"] <= until]
    return min(ts) if ts else None
