"""kdtune on a real two-node Ray cluster on this machine: `ray start --head` + `ray start --address`.

Both nodes run with token authentication, sharing one token file (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH),
as a cluster's nodes must; every driver and CLI call here gets the same two variables. Each node has one CPU,
so two concurrent one-CPU trials land one per node. The tests run in order on one cluster:

1. `ray job submit --working-dir <dir> -- kdtune sweep spec.yaml` to the head: both trials ran, on both nodes
   (node ids from Ray's state API, matched to the trials' pids), the job succeeded;
2. two tasks pinned to different nodes ask `kdtune.storage.build_once` for the same missing teacher at the
   same moment: it is trained (for real, by the engine) exactly once;
3. `python launch/sweep.py spec.yaml` (what `ray submit` runs on the head); the worker node is SIGKILLed
   while its trial runs: the trial resumes from its last checkpoint on the head, the sweep completes, and
   MLflow has exactly one run per trial.

The cluster lives in its own temp dir and ports; `ray stop` is never called (it would stop every Ray on the
machine). Everything the cluster started is killed by pid at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EVENTS = "events.jsonl"  # kdtune.tune.record.EVENTS_FILE

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None, reason="the ray CLI is not installed"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, pgid, cmdline) of every live process."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()
        if f[0] != "Z":
            out[int(d.name)] = (int(f[1]), int(f[2]), cmd)
    return out


class LocalCluster:
    """A Ray cluster of real nodes on this machine, each `ray start --block` in its own process group."""

    def __init__(self):
        # short: Ray's unix sockets live under the temp dir (108-byte path limit)
        self.dir = Path(tempfile.mkdtemp(prefix="kdr", dir="/tmp"))
        self.temp = self.dir / "ray"
        self.shared = self.dir / "shared"  # the "NFS mount": one filesystem, seen by both nodes
        self.shared.mkdir()
        token = self.dir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.token = token.read_text()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        env.update(
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONPATH=str(REPO),
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_USAGE_STATS_ENABLED="0",
            # notice a dead node within seconds (defaults: about half a minute)
            RAY_health_check_initial_delay_ms="1000",
            RAY_health_check_period_ms="1000",
            RAY_health_check_timeout_ms="1000",
            RAY_health_check_failure_threshold="3",
            OMP_NUM_THREADS="1",
            TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1",
            MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="false",
            PYTHONWARNINGS="ignore::DeprecationWarning",
        )
        self.env = env
        self.nodes: list[dict] = []
        self.gcs_address: str | None = None
        self.dashboard_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    # ------------------------------------------------------------------ nodes
    def _start(self, args: list[str], name: str) -> dict:
        log = open(self.dir / f"{name}.log", "w")  # noqa: SIM115 (closed in shutdown)
        proc = subprocess.Popen(
            ["ray", "start", "--block", "--num-cpus=1", "--object-store-memory=100000000",
             f"--dashboard-agent-listen-port={_free_port()}", *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        node = {"name": name, "proc": proc, "log": log, "id": None}
        self.nodes.append(node)
        return node

    def start_head(self) -> dict:
        head = self._start(
            ["--head", f"--port={_free_port()}", f"--temp-dir={self.temp}", "--include-dashboard=true",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"],
            "head",
        )  # fmt: skip
        current = self.temp / "ray_current_cluster"
        self._wait(lambda: current.is_file() and current.read_text().strip(), 120, "the head's GCS", head)
        self.gcs_address = current.read_text().strip()
        self._wait(lambda: self._alive_ids(), 120, "the head in the node table", head)
        head["id"] = self._alive_ids()[0]
        return head

    def add_worker(self) -> dict:
        before = set(self._alive_ids())
        name = f"worker{len(self.nodes)}"
        # its own temp dir, as on another machine: two nodes sharing one runtime_resources folder would
        # unpack a job's working_dir over each other
        node = self._start([f"--address={self.gcs_address}", f"--temp-dir={self.dir / name}"], name)
        self._wait(lambda: set(self._alive_ids()) - before, 120, "the worker in the node table", node)
        node["id"] = (set(self._alive_ids()) - before).pop()
        return node

    def _wait(self, cond, timeout: float, what: str, node: dict) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if cond():
                    return
            except (OSError, urllib.error.URLError, ValueError, KeyError):
                pass
            if node["proc"].poll() is not None:
                break
            time.sleep(0.5)
        raise AssertionError(
            f"{what} did not come up: {(self.dir / (node['name'] + '.log')).read_text()[-3000:]}"
        )

    def node_pids(self, node: dict) -> list[int]:
        """The node's processes: its `ray start` group, and the workers its raylet spawned (own sessions)."""
        table = _proc_table()
        pids = {p for p, (_, pgid, _) in table.items() if pgid == node["proc"].pid}
        grew = True
        while grew:
            kids = {p for p, (ppid, _, _) in table.items() if ppid in pids} - pids
            grew = bool(kids)
            pids |= kids
        return sorted(pids)

    def kill_node(self, node: dict) -> list[int]:
        """SIGKILL every process of ``node``, as a machine that dies would lose them."""
        pids = self.node_pids(node)
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node["proc"].wait(timeout=30)
        return pids

    def shutdown(self) -> None:
        for node in reversed(self.nodes):
            if node["proc"].poll() is None:
                node["proc"].send_signal(signal.SIGTERM)  # `ray start --block` stops its node on TERM
        deadline = time.time() + 8
        for node in self.nodes:
            try:
                node["proc"].wait(timeout=max(1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        mine = str(self.dir)
        groups = {n["proc"].pid for n in self.nodes}
        for pid, (_, pgid, cmd) in _proc_table().items():
            if pid != os.getpid() and (mine in cmd or pgid in groups):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for node in self.nodes:
            node["log"].close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ the state API, with the token
    def api(self, path: str, token: str | None = "default"):
        req = urllib.request.Request(self.dashboard + path)
        tok = self.token if token == "default" else token
        if tok:
            req.add_header("Authorization", f"Bearer {tok}")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def _alive_ids(self) -> list[str]:
        res = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        alive = [n for n in res if n["state"] == "ALIVE"]
        return [n["node_id"] for n in sorted(alive, key=lambda n: not n.get("is_head_node"))]

    def trial_actors(self) -> list[dict]:
        """Every Tune trial actor the cluster ran (alive or dead): pid, node id, state."""
        res = self.api("/api/v0/actors?limit=1000&detail=1")["data"]["result"]["result"]
        return [a for a in res if a.get("class_name") == "ImplicitFunc"]

    def run(self, args: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start_head()
        c.add_worker()
        yield c
    finally:
        c.shutdown()


def _spec(c: LocalCluster, name: str, epochs: int) -> dict:
    return {
        "name": name,
        "data": "digits",
        "val_fraction": 0.1,
        "students": ["resnet8"],
        "methods": {"ce": {"space": {"lr": {"low": 0.01, "high": 0.1, "log": True}}, "starts": False}},
        "budget": {"trials": 2, "epochs": epochs, "concurrency": 2, "cpus_per_trial": 1, "gpus_per_trial": 0},
        "scheduler": "none",
        "metric": "val_acc",
        "train": {"batch_size": 64, "device": "cpu"},
        "storage": str(c.shared / "experiments"),
        "failures": {"max_failures": 2},
        "seed": 0,
    }


def _events(exp: Path) -> dict[str, list[dict]]:
    """trial id -> the trial's events (<experiment>/trials/<id>/events.jsonl on the shared storage, written on any node)."""
    out: dict[str, list[dict]] = {}
    for f in exp.rglob(EVENTS):
        for line in f.read_text().splitlines():
            e = json.loads(line)
            out.setdefault(e["trial_id"], []).append(e)
    return out


def _node_of_pids(c: LocalCluster) -> dict[int, str]:
    """pid -> node id of every worker process the cluster ran (Ray's state API: workers, then actors)."""
    out = {a["pid"]: a["node_id"] for a in c.trial_actors() if a.get("pid")}
    workers = c.api("/api/v0/workers?limit=10000&detail=1")["data"]["result"]["result"]
    out.update({w["pid"]: w["node_id"] for w in workers if w.get("pid")})
    return out


# ---------------------------------------------------------------------------------------------------- tests


def test_token_auth_guards_the_cluster(cluster):
    """The head refuses a client without the cluster's token (the dashboard/job API answers 401)."""
    assert len(cluster._alive_ids()) == 2
    with pytest.raises(urllib.error.HTTPError) as err:
        cluster.api("/api/jobs/", token=None)
    assert err.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as err:
        cluster.api("/api/jobs/", token="0" * 64)
    assert err.value.code == 403  # a wrong token: forbidden
    assert isinstance(cluster.api("/api/jobs/"), list)


def test_job_submit_sweep_runs_trials_on_both_nodes(cluster, tmp_path):
    work = tmp_path / "job"
    work.mkdir()
    (work / "spec.yaml").write_text(yaml.safe_dump(_spec(cluster, "job-sweep", epochs=2)))
    res = cluster.run(
        ["ray", "job", "submit", f"--address={cluster.dashboard}", f"--working-dir={work}",
         "--", "kdtune", "sweep", "spec.yaml"],
        timeout=420,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "succeeded" in out and "sweep job-sweep finished" in out, out[-4000:]
    jobs = cluster.api("/api/jobs/")
    assert [j["status"] for j in jobs if "kdtune sweep" in j.get("entrypoint", "")] == ["SUCCEEDED"]

    exp = cluster.shared / "experiments" / "job-sweep"
    state = json.loads((exp / "state.json").read_text())
    assert state["status"] == "finished"
    events = _events(exp)
    assert len(events) == 2 and all(any(e["event"] == "done" for e in ev) for ev in events.values())
    node_of = _node_of_pids(cluster)
    pids = {e["pid"] for ev in events.values() for e in ev if e["event"] == "epoch"}
    assert pids <= set(node_of), (pids, node_of)
    nodes = {node_of[p] for p in pids}
    assert nodes == {n["id"] for n in cluster.nodes}, (nodes, node_of)


_BUILD_TWICE = """
import json, sys, time
from pathlib import Path
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

root, count, node_ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def ask(start_at):
    from kdtune.engine import train
    from kdtune.storage import build_once

    def build(d):
        with open(count, "a") as f:
            f.write(ray.get_runtime_context().get_node_id() + "\\n")
        train({"data": "digits", "model": "resnet8", "method": "ce", "epochs": 1, "batch_size": 128,
               "device": "cpu", "seed": 0, "out": str(d)})

    while time.time() < start_at:
        time.sleep(0.01)
    path = build_once(root, "teacher-resnet8-digits", build, poll_s=0.1, heartbeat_s=0.5, stale_after_s=30)
    return ray.get_runtime_context().get_node_id(), str(path)

ray.init(address=sys.argv[4], log_to_driver=False)
task = ray.remote(num_cpus=1, max_retries=0)(ask)
start_at = time.time() + 8  # both tasks are placed (one per node) before either asks
refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(start_at)
        for n in node_ids]
print(json.dumps(ray.get(refs)))
"""


def test_two_nodes_asking_for_the_same_missing_teacher_train_it_once(cluster):
    root, count = cluster.shared / "stages", cluster.dir / "teacher-builds.txt"
    ids = [n["id"] for n in cluster.nodes]
    res = cluster.run(
        [sys.executable, "-c", textwrap.dedent(_BUILD_TWICE), str(root), str(count), json.dumps(ids),
         cluster.gcs_address],
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    answers = json.loads(res.stdout.strip().splitlines()[-1])
    assert sorted(a[0] for a in answers) == sorted(ids)  # one asker per node
    assert {a[1] for a in answers} == {str(root / "teacher-resnet8-digits")}
    assert len(count.read_text().split()) == 1, count.read_text()  # trained once
    from kdtune.storage import verify_manifest

    manifest = verify_manifest(root / "teacher-resnet8-digits")
    assert {"final.pt", "result.json"} <= set(manifest["files"])


def test_worker_killed_mid_trial_resumes_on_the_survivor(cluster, tmp_path):
    epochs = 8
    spec = tmp_path / "kill.yaml"
    raw = _spec(cluster, "kill-sweep", epochs=epochs)
    raw["train"]["batch_size"] = 32  # longer epochs: time to catch the trial between two of them
    spec.write_text(yaml.safe_dump(raw))
    exp = cluster.shared / "experiments" / "kill-sweep"
    worker = next(n for n in cluster.nodes if n["name"] != "head")
    head = next(n for n in cluster.nodes if n["name"] == "head")
    driver_log = tmp_path / "driver.log"
    with open(driver_log, "w") as log:
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "launch" / "sweep.py"), str(spec), "--address", cluster.gcs_address],
            env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            # wait until the trial on the worker node has reported (and checkpointed) an epoch or two; which
            # node a trial runs on: its process descends from that node's raylet (cheap to poll, unlike the
            # state API, so a fast machine cannot outrun the poll)
            victim, deadline = None, time.time() + 300
            while victim is None:
                assert driver.poll() is None, driver_log.read_text()[-4000:]
                assert time.time() < deadline, (
                    "no trial ran on the worker node: " + driver_log.read_text()[-3000:]
                )
                time.sleep(0.2)
                on_worker = set(cluster.node_pids(worker))
                for tid, ev in _events(exp).items():
                    epochs_seen = [e["epoch"] for e in ev if e["event"] == "epoch" and e["pid"] in on_worker]
                    if epochs_seen and 2 <= max(epochs_seen) <= epochs - 3:
                        victim = tid
            killed = cluster.kill_node(worker)
            assert killed
            rc = driver.wait(timeout=420)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    out = driver_log.read_text()
    assert rc == 0, out[-4000:]
    assert "storage" in out and "is shared by all 2 nodes" in out

    events = _events(exp)
    assert len(events) == 2
    node_of = _node_of_pids(cluster)
    ev = events[victim]
    starts = [e for e in ev if e["event"] == "start"]
    assert len(starts) >= 2, ev  # started on the worker, started again after the kill
    resumed = starts[-1]
    assert resumed["epoch"] >= 1, "the trial started over instead of resuming from its checkpoint"
    assert node_of.get(resumed["pid"]) == head["id"]  # on the surviving node
    work = [e for e in ev if e["event"] not in ("open", "closed")]  # ownership events aside
    assert work[-1]["event"] == "done" and work[-1]["epoch"] == epochs
    assert ev[-1]["event"] == "closed" and ev[-1]["pid"] == resumed["pid"]  # it let go of its records last
    for tid, tev in events.items():
        assert any(e["event"] == "done" and e["epoch"] == epochs for e in tev), tid
    assert json.loads((exp / "state.json").read_text())["status"] == "finished"

    # MLflow: exactly one run per trial, the resumed one with every epoch
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{exp / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("kill-sweep").experiment_id], max_results=1000)
    per_trial: dict[str, list] = {}
    for r in runs:
        if r.data.tags.get("kdtune.role") == "trial":
            per_trial.setdefault(r.data.tags["kdtune.trial_id"], []).append(r)
    assert sorted(per_trial) == sorted(events)
    assert all(len(v) == 1 for v in per_trial.values()), {k: len(v) for k, v in per_trial.items()}
    run = per_trial[victim][0]
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "val_acc")}
    assert steps == set(range(1, epochs + 1))
