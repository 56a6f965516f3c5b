"""The cluster-launcher configs (launch/cluster.yaml, launch/cluster-onprem.yaml) and the `ray submit` target.

A cloud launch cannot run here; what can be checked is checked for real: both files pass Ray's own config
schema and preparation (what `ray up` does first), every command is valid bash, the commands that write the
node environment and the cluster's secrets are executed in a sandbox, and launch/sweep.py runs from a lone
copy (as `ray submit` places it) and refuses a storage path no node could share.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "launch" / "cluster.yaml", REPO / "launch" / "cluster-onprem.yaml"]
COMMAND_LISTS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _commands(cfg: dict, *lists: str) -> list[str]:
    return [c for name in (lists or COMMAND_LISTS) for c in cfg.get(name) or []]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_own_schema_and_preparation(path):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(path)
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    prepared = prepare_config(copy.deepcopy(raw))  # as `ray up` fills it in
    validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # Ray merges setup_commands into both node kinds: the install runs everywhere, the server on the head
    assert any("pip install" in c for c in prepared["worker_setup_commands"])
    assert not any("postgresql" in c for c in prepared["worker_setup_commands"])


def test_validation_catches_a_broken_config():
    """The schema check can fail: an unknown field and a wrong type are refused."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(CONFIGS[0])
    bad = copy.deepcopy(raw)
    bad["setup_comands"] = ["echo typo"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["ray.worker.gpu"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_nodes_install_kdtune_from_the_repository(path):
    cfg = _load(path)
    assert cfg["file_mounts"] == {"~/kdtune": "."}  # the checkout `ray up` runs in (its root)
    assert (REPO / "pyproject.toml").is_file()
    assert ".venv" in cfg["rsync_exclude"] and ".gitignore" in cfg["rsync_filter"]
    setup = " ".join(_commands(cfg, "setup_commands"))
    assert re.search(r"pip install -q -e ~/kdtune\b", setup)
    assert "mlflow[auth]" in setup and "psycopg" in setup  # the server's extras: basic auth, PostgreSQL
    assert "/mnt/kdtune" in setup  # shared storage, on every node


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_ray_starts_with_the_documented_commands_and_a_shared_token(path):
    cfg = _load(path)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert (
        "ray start --head --port=6379" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    )
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    assert "--dashboard-host=127.0.0.1" in head  # the dashboard (job API) is reached through `ray dashboard`
    env_sh = next(c for c in cfg["setup_commands"] if "env.sh" in c)
    assert "RAY_AUTH_MODE=token" in env_sh and "RAY_AUTH_TOKEN_PATH=/mnt/kdtune/" in env_sh
    for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in c:
            assert c.lstrip().startswith(". ~/.kdtune/env.sh")  # the token reaches every node's ray start


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_the_head_starts_the_mlflow_server_on_postgresql(path):
    cfg = _load(path)
    start = [c for c in cfg["head_start_ray_commands"] if "mlflow-server.sh start" in c]
    assert len(start) == 1
    cmd = start[0]
    assert "launch/mlflow-server.sh" in cmd and (REPO / "launch" / "mlflow-server.sh").is_file()
    assert "mlflow-server.sh stop" in cmd  # a restart (ray up again) replaces the old server
    assert "MLFLOW_BACKEND_STORE_URI=postgresql://kdtune@127.0.0.1:5432/mlflow" in cmd
    assert (
        "MLFLOW_ARTIFACTS_DESTINATION=/mnt/kdtune/mlflow-artifacts" in cmd and "KDTUNE_MLFLOW_AUTH=1" in cmd
    )
    assert "install -y -qq postgresql" in " ".join(cfg["head_setup_commands"])
    assert not any(
        "mlflow-server" in c for c in _commands(cfg, "setup_commands", "worker_start_ray_commands")
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_command_is_valid_bash_and_holds_no_secret(path):
    cfg = _load(path)
    for c in _commands(cfg):
        res = subprocess.run(["bash", "-n", "-c", c], capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"{c!r}: {res.stderr}"
    text = path.read_text()
    for m in re.finditer(r"(PASSWORD|SECRET_KEY|TOKEN)=(\S*)", text):
        value = m.group(2).lstrip("\"'")
        # generated at setup ($(openssl ...), $admin_pw) or a path, never a literal secret
        assert value.startswith(("$", "/")) or value == "", m.group(0)


def _sandbox(tmp_path: Path, cfg: dict) -> tuple[dict, Path, Path]:
    home, shared = tmp_path / "home", tmp_path / "mnt-kdtune"
    (home / "kdtune-venv" / "bin").mkdir(parents=True)
    (home / "kdtune-venv" / "bin" / "python").symlink_to(sys.executable)
    (home / ".bashrc").write_text("# stock\n")
    (shared / ".kdtune").mkdir(parents=True)
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return env, home, shared


def _run_in_sandbox(cmd: str, env: dict, shared: Path) -> subprocess.CompletedProcess:
    cmd = cmd.replace("/mnt/kdtune", str(shared))
    return subprocess.run(
        ["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_setup_writes_the_node_environment_and_secrets_once(path, tmp_path):
    cfg = _load(path)
    env, home, shared = _sandbox(tmp_path, cfg)
    env_cmd = next(c for c in cfg["setup_commands"] if "env.sh" in c)
    secrets_cmd = next(c for c in cfg["head_setup_commands"] if "server.env" in c and "openssl" in c)
    for _ in range(2):  # idempotent: a second `ray up` changes nothing
        for c in (env_cmd, secrets_cmd):
            res = _run_in_sandbox(c, env, shared)
            assert res.returncode == 0, res.stderr
    assert sum("kdtune/env.sh" in ln for ln in (home / ".bashrc").read_text().splitlines()) == 1
    server = (home / ".kdtune" / "server.env").read_text()
    client = (shared / ".kdtune" / "mlflow-client.env").read_text()
    token = (shared / ".kdtune" / "ray_auth_token").read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    for f in (home / ".kdtune" / "server.env", shared / ".kdtune" / "mlflow-client.env",
              shared / ".kdtune" / "ray_auth_token"):  # fmt: skip
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    kv = dict(line.split("=", 1) for line in (server + client).splitlines())
    assert len(kv["MLFLOW_AUTH_ADMIN_PASSWORD"]) >= 12
    assert kv["MLFLOW_TRACKING_PASSWORD"] == kv["MLFLOW_AUTH_ADMIN_PASSWORD"] != kv["PGPASSWORD"]
    assert re.fullmatch(r"http://\S+:5000", kv["MLFLOW_TRACKING_URI"])

    # what a node's shell (ray start, `ray submit`'s python) then has
    probe = (
        f". {home}/.bashrc; "
        'echo "$RAY_AUTH_MODE|$RAY_AUTH_TOKEN_PATH|$KDTUNE_STORAGE|$MLFLOW_TRACKING_USERNAME|$(command -v python)'
        '|$RAY_worker_niceness"'
    )
    res = _run_in_sandbox(probe, env, shared)
    mode, token_path, storage, user, python, nice = res.stdout.strip().split("|")
    assert nice == "0"  # trial processes at the node's priority, not Ray's nice 15
    assert mode == "token" and Path(token_path).read_text() == token
    assert storage == f"{shared}/experiments" and user == "admin"
    assert python == f"{home}/kdtune-venv/bin/python"


def test_sweep_py_runs_alone_and_refuses_unshared_storage(tmp_path):
    """`ray submit` copies launch/sweep.py alone to ~/sweep.py: it must not need its folder."""
    lone = tmp_path / "sweep.py"
    shutil.copy(REPO / "launch" / "sweep.py", lone)
    env = {k: v for k, v in os.environ.items() if k not in ("KDTUNE_STORAGE", "RAY_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", KDTUNE_HOME=str(REPO))
    res = subprocess.run([sys.executable, str(lone), "--help"], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert res.returncode == 0 and "--resume" in res.stdout
    # the digits demo keeps `storage: runs/sweeps` (relative): refused before any Ray connection
    res = subprocess.run([sys.executable, str(lone), "sweeps/digits.yaml"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, check=False)  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert "is not an absolute path" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, str(lone), "no-such-spec.yaml"], env=env, capture_output=True,
                         text=True, timeout=120, cwd=tmp_path, check=False)  # fmt: skip
    assert res.returncode == 2 and "not found" in res.stderr
