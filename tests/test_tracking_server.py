"""The shared MLflow tracking server of launch/mlflow-server.sh, for real: PostgreSQL backend, basic auth.

Needs a PostgreSQL server on loopback (CI: `.ci/setup-postgres.sh`); the tests that need one skip, saying
why, when none answers. Connection: KDTUNE_TEST_POSTGRES_URI, else the KDTUNE_TEST_PG* variables that
setup-postgres.sh reads, with its defaults. Each run uses a fresh database, dropped afterwards.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "mlflow-server.sh"
BIN = Path(sys.executable).parent
ADMIN_PASSWORD = "kdtune-test-" + uuid.uuid4().hex[:12]  # never written anywhere but the environment
N_WRITERS, N_STEPS, KEYS = 4, 15, ("val_acc", "loss_kd", "lr")


def _pg_params() -> dict:
    uri = os.environ.get("KDTUNE_TEST_POSTGRES_URI")
    if uri:
        u = urllib.parse.urlparse(uri)
        return {
            "host": u.hostname or "127.0.0.1",
            "port": u.port or 5432,
            "user": urllib.parse.unquote(u.username or ""),
            "password": urllib.parse.unquote(u.password or ""),
            "dbname": u.path.lstrip("/") or "postgres",
        }
    return {
        "host": "127.0.0.1",
        "port": int(os.environ.get("KDTUNE_TEST_PGPORT", "5432")),
        "user": os.environ.get("KDTUNE_TEST_PGUSER", "kdtune"),
        "password": os.environ.get("KDTUNE_TEST_PGPASSWORD", "kdtune-ci-only"),
        "dbname": os.environ.get("KDTUNE_TEST_PGDATABASE", "kdtune_test"),
    }


@pytest.fixture(scope="module")
def pg_database():
    """A fresh PostgreSQL database for this module: (params, dbname); dropped at the end."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed (pip install 'psycopg[binary]'): no PostgreSQL backend to test")
    params = _pg_params()
    try:
        admin = psycopg.connect(**params, connect_timeout=3, autocommit=True)
    except psycopg.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        pytest.skip(
            f"no PostgreSQL at {params['host']}:{params['port']} as {params['user']} ({first}); "
            "run .ci/setup-postgres.sh as root"
        )
    name = f"kdtune_mlflow_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield params, name
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _script_env(tmp: Path, port: int, params: dict | None = None, dbname: str = "x", **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "KDTUNE_MLFLOW_", "PG"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        KDTUNE_MLFLOW_STATE=str(tmp / "state"),
        KDTUNE_MLFLOW_PORT=str(port),
        KDTUNE_MLFLOW_WORKERS="2",
        KDTUNE_MLFLOW_START_TIMEOUT="150",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp / "shared" / "mlflow-artifacts"),
        OMP_NUM_THREADS="1",
    )
    if params is not None:
        env["MLFLOW_BACKEND_STORE_URI"] = (
            f"postgresql://{params['user']}@{params['host']}:{params['port']}/{dbname}"
        )
        env["PGPASSWORD"] = params["password"]
    env.update(extra)
    return env


def _run_script(env: dict, *args: str, timeout: float = 200) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _group_members(pgid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def server(pg_database, tmp_path_factory):
    """The real server, basic auth on, PostgreSQL backend, artifacts in a 'shared' directory."""
    pytest.importorskip("flask_wtf", reason="mlflow[auth] is not installed: no basic-auth app to test")
    params, dbname = pg_database
    tmp = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = _script_env(
        tmp, port, params, dbname, KDTUNE_MLFLOW_AUTH="1", MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN_PASSWORD
    )
    started = _run_script(env, "start")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{port}" in started.stdout and "auth on" in started.stdout
        pgid = int((tmp / "state" / "server.pgid").read_text())
        yield {"url": f"http://127.0.0.1:{port}", "env": env, "tmp": tmp, "pgid": pgid, "port": port}
    finally:
        _run_script(env, "stop")


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=20) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# ------------------------------------------------------------------------------- refused before starting


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"MLFLOW_BACKEND_STORE_URI": "postgresql://u:secret@127.0.0.1/db"}, "holds a password"),
        ({"MLFLOW_BACKEND_STORE_URI": "mongodb://127.0.0.1/db"}, "use postgresql://"),
        ({"KDTUNE_MLFLOW_AUTH": "1"}, "needs MLFLOW_AUTH_ADMIN_PASSWORD"),
        ({"KDTUNE_MLFLOW_AUTH": "1", "MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "12 or more characters"),
        ({"MLFLOW_ARTIFACTS_DESTINATION": ""}, "no artifact destination"),
    ],
)
def test_bad_settings_are_refused_before_anything_starts(tmp_path, extra, words):
    env = _script_env(tmp_path, _free_port(), **extra)
    env.setdefault("MLFLOW_BACKEND_STORE_URI", "postgresql://kdtune@127.0.0.1:5432/mlflow")
    res = _run_script(env, "start", timeout=30)
    assert res.returncode == 2 and words in res.stderr, res.stdout + res.stderr
    assert not (tmp_path / "state" / "server.pgid").exists()
    assert ":secret@" not in res.stdout + res.stderr  # a refused URI is not echoed with its password


def test_stop_and_status_when_nothing_runs(tmp_path):
    env = _script_env(tmp_path, _free_port())
    assert _run_script(env, "status", timeout=30).returncode == 3
    res = _run_script(env, "stop", timeout=30)
    assert res.returncode == 0 and "not running" in res.stdout


# ------------------------------------------------------------------------------------------ the real server


def test_basic_auth_refuses_a_client_without_credentials(server):
    api = server["url"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(server["url"] + "/health") == 200
    assert _get(api) == 401
    assert _get(api, ("admin", "wrong-password-123")) == 401
    assert _get(api, ("admin", ADMIN_PASSWORD)) == 200
    # the refused Python client: MLflow raises on the 401
    code = textwrap.dedent(
        """
        import mlflow
        try:
            mlflow.MlflowClient().search_experiments()
        except Exception as e:
            print("refused", type(e).__name__, str(e)[:200])
        else:
            print("allowed")
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_URI=server["url"], MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("refused") and "401" in out.stdout, out.stdout + out.stderr


_WRITER = """
import os, sys, time
import mlflow
k, start_at, n_steps, keys = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
client = mlflow.MlflowClient()
exp = None
while exp is None:  # all writers race to create the experiment
    try:
        exp = client.get_experiment_by_name("concurrent")
        if exp is None:
            client.create_experiment("concurrent")
    except mlflow.exceptions.MlflowException:
        time.sleep(0.1)
while time.time() < start_at:
    time.sleep(0.01)
run = client.create_run(exp.experiment_id, run_name=f"trial_{k}", tags={"kdtune.trial_id": f"t{k}"})
rid = run.info.run_id
client.log_param(rid, "seed", k)
from mlflow.entities import Metric
for step in range(n_steps):  # one request per epoch, as a trial logs
    now = int(time.time() * 1000)
    client.log_batch(rid, metrics=[Metric(key, k * 1000 + step * 10 + j, now, step) for j, key in enumerate(keys)])
path = os.path.join(os.environ["ART_TMP"], f"note_{k}.txt")
with open(path, "w") as f:
    f.write(f"writer {k}")
client.log_artifact(rid, path)
client.set_terminated(rid)
print(rid)
"""


def test_concurrent_writers_lose_no_metric(server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=server["url"],
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD,
        ART_TMP=str(tmp_path),
        OMP_NUM_THREADS="1",
    )
    start_at = time.time() + 15  # imports of mlflow take a while on a busy machine
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(k), str(start_at), str(N_STEPS), ",".join(KEYS)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(N_WRITERS)
    ]
    run_ids = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
        run_ids.append(out.strip().splitlines()[-1])

    import mlflow

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", ADMIN_PASSWORD
    try:
        client = mlflow.MlflowClient(tracking_uri=server["url"])
        exp = client.get_experiment_by_name("concurrent")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        assert sorted(r.info.run_id for r in runs) == sorted(run_ids)
        for r in runs:
            k = int(r.data.params["seed"])
            assert r.info.status == "FINISHED" and r.data.tags["kdtune.trial_id"] == f"t{k}"
            for j, key in enumerate(KEYS):
                hist = client.get_metric_history(r.info.run_id, key)
                assert sorted((m.step, m.value) for m in hist) == [
                    (s, float(k * 1000 + s * 10 + j)) for s in range(N_STEPS)
                ], (k, key)
            assert [a.path for a in client.list_artifacts(r.info.run_id)] == [f"note_{k}.txt"]
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
    # the artifacts went through the server to its destination on the shared storage
    notes = sorted(p.name for p in (server["tmp"] / "shared" / "mlflow-artifacts").rglob("note_*.txt"))
    assert notes == [f"note_{k}.txt" for k in range(N_WRITERS)]


def test_no_secret_on_command_lines_in_state_or_log(server):
    pg_password = server["env"]["PGPASSWORD"]
    members = _group_members(server["pgid"])
    assert members, "the server's process group is empty"
    for pid in members:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        assert ADMIN_PASSWORD not in cmdline and pg_password not in cmdline
        if "uvicorn" in cmdline:
            assert "--host 127.0.0.1" in cmdline  # loopback unless told otherwise
    for f in (server["tmp"] / "state").iterdir():
        text = f.read_bytes()
        assert ADMIN_PASSWORD.encode() not in text and pg_password.encode() not in text, f.name


def test_stop_kills_the_whole_process_group(server):
    """Runs last in this module: `stop` ends the server and every process it spawned."""
    pgid, env = server["pgid"], server["env"]
    assert _run_script(env, "status", timeout=30).returncode == 0
    members = _group_members(pgid)
    assert len(members) >= 2, members  # the mlflow CLI and uvicorn (plus its workers)
    res = _run_script(env, "stop", timeout=60)
    assert res.returncode == 0 and f"stopped process group {pgid}" in res.stdout
    deadline = time.time() + 10
    while _group_members(pgid) and time.time() < deadline:
        time.sleep(0.2)
    left = _group_members(pgid)
    if left:  # do not leave them behind even when the test fails
        os.killpg(pgid, signal.SIGKILL)
    assert not left, f"processes left in group {pgid}: {left}"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", server["port"]), timeout=2):
        pass
    assert _run_script(env, "status", timeout=30).returncode == 3


def test_setup_postgres_script_is_idempotent_and_never_fails():
    """The CI script exits 0 whether or not it can provide PostgreSQL (tests then skip, saying why)."""
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    res = subprocess.run(
        ["bash", str(REPO / ".ci" / "setup-postgres.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("setup-postgres:") and "Traceback" not in res.stdout + res.stderr
