"""Shared-storage stage artifacts: atomic writes, sha256 manifests, the build-once protocol across processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kdtune import storage
from kdtune.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _write_payload(d: Path, text: str = "weights") -> None:
    (d / "final.pt").write_bytes(text.encode() * 1000)
    (d / "sub").mkdir()
    (d / "sub" / "result.json").write_text(json.dumps({"acc": 99.0, "text": text}))


# ---------------------------------------------------------------------------------------------- single files


def test_atomic_write_never_exposes_a_partial_file(tmp_path):
    """A reader polling the file while another process rewrites it sees only whole versions."""
    target = tmp_path / "artifact.bin"
    size, versions = 1 << 18, 60
    storage.atomic_write_bytes(target, bytes([255]) * size)
    writer = _python(
        """
        import sys
        from kdtune.storage import atomic_write
        size, versions = int(sys.argv[2]), int(sys.argv[3])
        for i in range(versions):
            with atomic_write(sys.argv[1]) as f:
                for _ in range(16):  # many small writes: a plain open() would expose each one
                    f.write(bytes([i]) * (size // 16))
        """,
        str(target),
        str(size),
        str(versions),
    )
    seen, reads = set(), 0
    while writer.poll() is None:
        data = target.read_bytes()
        reads += 1
        assert len(data) == size, f"partial file: {len(data)} of {size} bytes"
        assert data.count(data[:1]) == size, "a file mixing two versions"
        seen.add(data[0])
    assert writer.wait() == 0, writer.stderr.read()
    assert target.read_bytes() == bytes([versions - 1]) * size
    assert reads > 5 and len(seen) >= 2, (reads, seen)  # the reader really overlapped the writer
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]  # no temporary file left behind


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    storage.atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), storage.atomic_write(target, "w") as f:
        f.write("new, half written")
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ------------------------------------------------------------------------------------------------ manifests


def test_build_once_publishes_a_complete_verified_directory(tmp_path):
    root, calls = tmp_path / "stages", []

    def build(d: Path):
        calls.append(d)
        assert d.parent == root and d.name.startswith(storage.TMP_PREFIX)
        assert not (root / "teacher-abc").exists(), "the artifact is visible before it is complete"
        _write_payload(d)

    path = storage.build_once(root, "teacher-abc", build)
    assert path == root / "teacher-abc" and len(calls) == 1
    manifest = json.loads((path / storage.MANIFEST).read_text())
    assert set(manifest["files"]) == {"final.pt", "sub/result.json"}
    assert manifest["files"]["final.pt"]["sha256"] == storage.sha256_file(path / "final.pt")
    assert storage.verify_manifest(path)["files"] == manifest["files"]
    assert not (root / "teacher-abc.lock").exists() and not calls[0].exists()
    assert storage.build_once(root, "teacher-abc", build) == path and len(calls) == 1  # reused, not rebuilt
    assert storage.status(root, "teacher-abc") == "ready" and storage.status(root, "other") == "missing"


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda p: (p / "final.pt").write_bytes(b"X" + (p / "final.pt").read_bytes()[1:]),
            "checksum mismatch",
        ),
        (lambda p: (p / "final.pt").write_bytes(b"short"), "bytes, the manifest says"),
        (lambda p: (p / "sub" / "result.json").unlink(), "is missing sub/result.json"),
        (lambda p: (p / "stray.pt").write_bytes(b"?"), "not in its manifest"),
        (lambda p: (p / storage.MANIFEST).unlink(), "has no kdtune-manifest.json"),
    ],
)
def test_corrupt_artifact_is_refused_in_one_line(tmp_path, damage, words):
    path = storage.build_once(tmp_path, "t", _write_payload)
    damage(path)
    with pytest.raises(CheckpointError) as err:
        storage.build_once(
            tmp_path, "t", lambda d: pytest.fail("rebuilt although on_corrupt='raise'"), on_corrupt="raise"
        )
    msg = str(err.value)
    assert words in msg and "\n" not in msg and str(path) in msg and "remove" in msg


def test_corrupt_artifact_is_moved_aside_and_rebuilt(tmp_path):
    path = storage.build_once(tmp_path, "t", lambda d: _write_payload(d, "first"))
    (path / "final.pt").write_bytes(b"bit rot")
    builds = []

    def rebuild(d):
        builds.append(d)
        _write_payload(d, "second")

    assert storage.build_once(tmp_path, "t", rebuild) == path
    assert len(builds) == 1
    assert json.loads((path / "sub" / "result.json").read_text())["text"] == "second"
    storage.verify_manifest(path)
    aside = [p for p in tmp_path.iterdir() if storage.CORRUPT_INFIX in p.name]
    assert len(aside) == 1 and (aside[0] / "final.pt").read_bytes() == b"bit rot"


def test_failed_build_releases_the_lock_and_the_next_caller_builds(tmp_path):
    def boom(d):
        (d / "half.pt").write_bytes(b"half")
        raise RuntimeError("teacher diverged")

    with pytest.raises(RuntimeError, match="diverged"):
        storage.build_once(tmp_path, "t", boom)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no lock, no work directory, no artifact
    assert (storage.build_once(tmp_path, "t", _write_payload) / "final.pt").exists()


def test_bad_keys_and_object_store_roots_are_refused(tmp_path):
    for key in ("../up", ".hidden", "a/b", "", "x.lock"):
        with pytest.raises(ConfigError, match="not a safe file name"):
            storage.build_once(tmp_path, key, _write_payload)
    with pytest.raises(ConfigError, match="filesystem path shared by every node"):
        storage.build_once("s3://bucket/stages", "t", _write_payload)
    with pytest.raises(ConfigError, match="below stale_after_s"):
        storage.build_once(tmp_path, "t", _write_payload, heartbeat_s=10, stale_after_s=5)


# ------------------------------------------------------------------------------------ build once, many processes

_BUILDER = """
    import os, sys, time, json
    from pathlib import Path
    from kdtune.storage import build_once
    root, key, count, start_at = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    while time.time() < start_at:  # all processes ask at the same instant
        time.sleep(0.005)

    def build(d):
        with open(count, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # a slow build: the others must wait, not build too
        (d / "final.pt").write_bytes(b"teacher" * 1000)

    path = build_once(root, key, build, poll_s=0.05, heartbeat_s=0.2, stale_after_s=5.0, timeout_s=60)
    print(json.dumps({"path": str(path), "data": (path / "final.pt").read_bytes().decode()[:7]}))
"""


def test_many_processes_asking_at_once_build_exactly_once(tmp_path):
    root, count = tmp_path / "shared", tmp_path / "builds.txt"
    start_at = time.time() + 1.5
    procs = [_python(_BUILDER, str(root), "teacher-x", str(count), str(start_at)) for _ in range(4)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert len(count.read_text().split()) == 1, f"built {len(count.read_text().split())} times"
    assert {o["path"] for o in outs} == {str(root / "teacher-x")}
    assert {o["data"] for o in outs} == {"teacher"}
    assert sorted(p.name for p in root.iterdir()) == ["teacher-x"]


def _fake_lock(path: Path, **over) -> dict:
    info = storage.owner_info()
    info.update(over)
    path.write_text(json.dumps(info))
    return info


def test_stale_lock_of_a_dead_pid_is_taken_over_at_once(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _fake_lock(tmp_path / "t.lock", pid=dead.pid, start="1")
    t0 = time.monotonic()
    # stale_after_s is long: only the dead-pid check can explain a quick takeover
    path = storage.build_once(tmp_path, "t", _write_payload, poll_s=0.05, stale_after_s=600, timeout_s=20)
    assert time.monotonic() - t0 < 5
    storage.verify_manifest(path)
    assert not (tmp_path / "t.lock").exists()


def test_builder_killed_mid_build_is_taken_over(tmp_path):
    count = tmp_path / "builds.txt"
    victim = _python(
        """
        import sys, time
        from kdtune.storage import build_once
        def build(d):
            open(sys.argv[2], "a").write("victim\\n")
            (d / "half.pt").write_bytes(b"half")
            time.sleep(600)
        build_once(sys.argv[1], "t", build, heartbeat_s=0.2, stale_after_s=60)
        """,
        str(tmp_path / "shared"),
        str(count),
    )
    deadline = time.time() + 30
    while not (count.exists() and count.read_text()):
        assert time.time() < deadline and victim.poll() is None, victim.stderr.read() if victim.poll() else ""
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (tmp_path / "shared" / "t.lock").exists()

    def build(d):
        count.open("a").write("survivor\n")
        _write_payload(d)

    path = storage.build_once(tmp_path / "shared", "t", build, poll_s=0.05, stale_after_s=60, timeout_s=20)
    assert count.read_text().split() == ["victim", "survivor"]
    assert not (path / "half.pt").exists()
    storage.verify_manifest(path)


def test_lock_from_another_host_is_stale_only_when_its_heartbeat_stops(tmp_path):
    lock = tmp_path / "t.lock"
    _fake_lock(lock, host="node-elsewhere", pid=1)
    stop = threading.Event()

    def heartbeat():
        while not stop.wait(0.1):
            os.utime(lock, None)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        with pytest.raises(CheckpointError) as err:  # alive: wait, never take over
            storage.build_once(
                tmp_path, "t", _write_payload, poll_s=0.05, heartbeat_s=0.2, stale_after_s=1.0, timeout_s=2.0
            )
        assert "node-elsewhere" in str(err.value) and "\n" not in str(err.value)
        assert lock.exists() and not (tmp_path / "t").exists()
    finally:
        stop.set()
        beat.join()
    t0 = time.monotonic()  # heartbeat stopped: taken over after stale_after_s
    path = storage.build_once(
        tmp_path, "t", _write_payload, poll_s=0.05, heartbeat_s=0.2, stale_after_s=1.0, timeout_s=20
    )
    assert 0.9 <= time.monotonic() - t0 < 10
    storage.verify_manifest(path)


def test_builder_that_lost_its_lock_does_not_publish(tmp_path):
    """A builder judged stale (its lock broken and retaken) drops its work; the new holder's build wins."""
    lock, texts = tmp_path / "t.lock", []

    def build(d):
        texts.append("first" if not texts else "second")
        if len(texts) == 1:  # meanwhile another node "took over": the lock now holds a foreign token
            lock.unlink()
            _fake_lock(lock, host=socket.gethostname() + "-other", pid=1)
        _write_payload(d, texts[-1])

    path = storage.build_once(
        tmp_path, "t", build, poll_s=0.05, heartbeat_s=0.2, stale_after_s=1.0, timeout_s=20
    )
    assert texts == ["first", "second"]  # the foreign holder never finished: taken over in turn, rebuilt
    assert json.loads((path / "sub" / "result.json").read_text())["text"] == "second"


def test_tune_storage_writes_each_file_whole(tmp_path):
    """The file system Tune uploads a sweep's snapshot through: a file being written is never visible in
    part (a killed driver left half a pickle behind, and the resume read EOFError); Ray's own upload works
    through it, exclusions included, and it travels to the workers pickled."""
    import pickle

    pytest.importorskip("ray")
    from ray.train._internal.storage import _download_from_fs_path, _upload_to_fs_path

    from kdtune.tune.tunefs import atomic_local_fs

    fs = atomic_local_fs()
    target = tmp_path / "dst" / "state.pkl"
    target.parent.mkdir()
    target.write_bytes(b"old")
    out = fs.open_output_stream(str(target))
    out.write(b"new" * 1000)
    assert target.read_bytes() == b"old"  # mid-write (a kill here): the old file, whole
    out.close()
    assert target.read_bytes() == b"new" * 1000
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]

    src = tmp_path / "src"
    (src / "t1" / "checkpoint_000001").mkdir(parents=True)
    (src / "experiment_state-x.json").write_text('{"trial_data": []}')
    (src / "t1" / "result.json").write_text("{}")
    (src / "t1" / "checkpoint_000001" / "p.json").write_text("{}")
    _upload_to_fs_path(str(src), fs, str(tmp_path / "exp"))
    assert (tmp_path / "exp" / "t1" / "checkpoint_000001" / "p.json").read_text() == "{}"
    _upload_to_fs_path(str(src), fs, str(tmp_path / "exp2"), exclude=["*/checkpoint_*"])
    assert (tmp_path / "exp2" / "t1" / "result.json").is_file()
    assert not (tmp_path / "exp2" / "t1" / "checkpoint_000001").exists()
    _download_from_fs_path(pickle.loads(pickle.dumps(fs)), str(tmp_path / "exp"), str(tmp_path / "back"))
    assert (tmp_path / "back" / "experiment_state-x.json").read_text() == '{"trial_data": []}'


def test_resume_refuses_a_damaged_tune_snapshot_in_one_line(tmp_path):
    from kdtune.preflight import check_experiment

    d = tmp_path / "exp" / "tune" / "sweep"
    d.mkdir(parents=True)
    (d / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    check_experiment(tmp_path / "exp")  # a whole snapshot: fine
    bad = d / "experiment_state-2026-01-02_00-00-00.json"
    bad.write_text('{"trial_data": [["{')
    with pytest.raises(ConfigError) as e:
        check_experiment(tmp_path / "exp")
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg and "the snapshot before it is then used" in msg
    bad.unlink()
    import pickle

    (d / "tuner.pkl").write_bytes(pickle.dumps({"a": list(range(100))})[:40])  # truncated
    with pytest.raises(ConfigError, match="truncated pickle") as e:
        check_experiment(tmp_path / "exp")
    assert str(d / "tuner.pkl") in str(e.value) and "\n" not in str(e.value)


def test_a_full_disk_is_recognised_however_it_is_raised():
    import errno
    import sqlite3

    from kdtune.errors import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    try:  # a full disk as the cause of another error (MLflow wraps SQLite's)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("could not log") from e
    except RuntimeError as wrapped:
        assert is_disk_full(wrapped)
    assert is_disk_full("ray.exceptions.RayTaskError: ... OSError: [Errno 28] No space left on device")
    assert not is_disk_full(OSError(errno.ENOENT, "No such file or directory"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(None)


def test_a_write_that_fails_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save's writer reports a failed write as "unexpected pos"; on a full disk it becomes ENOSPC (and
    the old file and no temporary file are left)."""
    import errno

    import torch

    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: _Usage(0))

    def failing_save(obj, f):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError) as info:
        with storage.atomic_write(path, "wb") as f:
            torch.save({"a": 1}, f)
    assert info.value.errno == errno.ENOSPC and str(path) in str(info.value)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    # with space left, the same error is not a full disk and stays what it was
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: _Usage(1 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos"):
        with storage.atomic_write(path, "wb") as f:
            torch.save({"a": 1}, f)


class _Usage:
    def __init__(self, free):
        self.total, self.used, self.free = 1 << 30, (1 << 30) - free, free


def test_the_cli_says_a_full_disk_in_one_line(monkeypatch, capsys, tmp_path):
    import errno

    from kdtune import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "runs" / "x" / "state.pt"))

    monkeypatch.setattr(cli, "_methods", full)
    assert cli.main(["methods"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdtune: error: the disk holding ") and "free space" in err[0], err
    assert str(tmp_path / "runs" / "x" / "state.pt") in err[0]


def test_the_optuna_mirror_database_is_made_whole_before_use(tmp_path):
    """A driver killed while Optuna created optuna.db's tables could leave ``studies`` without its unique
    index (Optuna never adds it to an existing table), and then one group's name was taken by several
    studies (seen in a loaded fault run). A new database is built whole and renamed into place; an old one
    missing the index gets it."""
    import sqlite3

    import optuna

    from kdtune.tune.experiment import whole_optuna_db

    def studies(db):
        with sqlite3.connect(db) as con:
            return [r[0] for r in con.execute("SELECT study_name FROM studies")]

    def create_twice(db):
        for _ in range(2):
            optuna.create_study(storage=f"sqlite:///{db}", study_name="resnet8-kd", load_if_exists=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    fresh = tmp_path / "fresh" / "optuna.db"
    fresh.parent.mkdir()
    whole_optuna_db(fresh)
    assert [p.name for p in fresh.parent.iterdir()] == ["optuna.db"]  # no temporary file left
    create_twice(fresh)
    assert studies(fresh) == ["resnet8-kd"]

    # the half schema a kill left: without the index, the same name is taken twice (what the fix prevents)
    half = tmp_path / "half.db"
    optuna.storages.RDBStorage(f"sqlite:///{half}").engine.dispose()
    with sqlite3.connect(half) as con:
        con.execute("DROP INDEX ix_studies_study_name")
    broken = tmp_path / "broken.db"
    broken.write_bytes(half.read_bytes())
    with pytest.raises(optuna.exceptions.StorageInternalError):  # the second call inserts, then finds two
        create_twice(broken)
    assert studies(broken) == ["resnet8-kd", "resnet8-kd"]
    whole_optuna_db(half)
    create_twice(half)
    assert studies(half) == ["resnet8-kd"]
