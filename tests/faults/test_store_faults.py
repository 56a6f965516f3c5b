"""Fault injection on the teacher store, through `kdtune train` in processes of their own: a writer SIGKILLed at
random moments leaves only whole epochs (a later run reads them and ends bit for bit where the online teacher
does); two processes needing the same store publish each epoch once; a damaged epoch (a flipped bit, a
truncated file) is never read: set aside in one line and computed again. The sweeps of the fault suite write
and read the store too (every teacher sweep does): harness.check_sweep verifies every published epoch after
their kills."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdtune.engine.teacher_store import CORRUPT_INFIX, SUFFIX, check_file
from tests.faults import harness as h

pytestmark = pytest.mark.faults
EPOCHS = 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return h.train_teacher(tmp_path_factory.mktemp("store-faults") / "teacher")


@pytest.fixture(scope="module")
def online(teacher, tmp_path_factory):
    """The run with the online teacher: what every run that reads the store must end with; and its wall time."""
    out = tmp_path_factory.mktemp("online") / "run"
    _train(teacher, out, None).check_returncode()
    hist = json.loads((out / "result.json").read_text())["history"]
    return _weights(out), sum(e["train_s"] + e["eval_s"] for e in hist) / len(hist)


def _words(teacher: Path, out: Path, store: Path | None) -> list[str]:
    words = [f"teacher={teacher}", "data=digits", "model=resnet8", "method=kd", f"epochs={EPOCHS}", "device=cpu",
             "seed=2", f"out={out}", "overwrite=true"]  # fmt: skip
    return words + (["teacher_store=on", f"teacher_store_dir={store}"] if store else ["teacher_store=off"])


def _train(teacher, out, store, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdtune", "train", *_words(teacher, out, store), "--no-progress"],
                          capture_output=True, text=True, env=h.env(), timeout=300, **kw)  # fmt: skip


def _weights(out: Path) -> dict:
    return torch.load(out / "final.pt", weights_only=True)["state_dict"]


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _published(store: Path) -> list[Path]:
    return sorted(store.glob(f"*/epoch-*{SUFFIX}"))


def test_a_writer_killed_at_random_moments_leaves_only_whole_epochs(teacher, online, tmp_path):
    """Three writers, each with a store of its own, killed at a moment drawn over their epochs: once the first
    epoch is logged, within the time the others take (an epoch's time measured by the online run)."""
    weights, epoch_s = online
    rng = random.Random(h.fault_seed(25))
    kills = []
    for k in range(3):
        store = tmp_path / f"store{k}"
        proc = subprocess.Popen([sys.executable, "-m", "kdtune", "train", *_words(teacher, tmp_path / f"k{k}", store)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=h.env(),
                                start_new_session=True)  # fmt: skip
        log = tmp_path / f"k{k}" / "train.log"
        t0 = time.monotonic()
        while not log.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, (EPOCHS - 1) * epoch_s))
        h.kill_session(proc.pid)
        proc.wait(timeout=30)
        kills.append(len(_published(store)))
        for p in _published(store):
            assert check_file(p) is None, f"kill {k} left {p.name} that is not whole: {check_file(p)}"
    store = tmp_path / f"store{min(range(3), key=lambda k: kills[k])}"  # the least complete one
    done = _train(teacher, tmp_path / "final", store)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _same(_weights(tmp_path / "final"), weights)
    res = json.loads((tmp_path / "final" / "result.json").read_text())["teacher_store"]
    assert res["epochs_read"] == min(kills) and res["epochs_read"] + res["epochs_online"] == EPOCHS
    assert "is damaged" not in done.stdout and not list(store.glob(f"*/*{CORRUPT_INFIX}*"))
    print(f"\nepochs published when each kill came: {kills} of {EPOCHS}; the last run read {res['epochs_read']}")


def test_two_processes_publish_each_epoch_once(teacher, online, tmp_path):
    store = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "kdtune", "train", *_words(teacher, tmp_path / f"p{i}", store),
                               "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=h.env())  # fmt: skip
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    results = [json.loads((tmp_path / f"p{i}" / "result.json").read_text())["teacher_store"] for i in range(2)]
    assert sum(r["epochs_written"] for r in results) == EPOCHS  # each epoch published by exactly one of them
    assert len(_published(store)) == EPOCHS and all(check_file(p) is None for p in _published(store))
    assert all(_same(_weights(tmp_path / f"p{i}"), online[0]) for i in range(2))


def test_a_damaged_store_is_never_read(teacher, online, tmp_path):
    store = tmp_path / "store"
    assert _train(teacher, tmp_path / "first", store).returncode == 0
    files = _published(store)
    assert len(files) == EPOCHS
    raw = bytearray(files[1].read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of the payload
    files[1].write_bytes(bytes(raw))
    files[4].write_bytes(files[4].read_bytes()[:-7])  # truncated
    again = _train(teacher, tmp_path / "again", store)
    assert again.returncode == 0, again.stderr[-2000:]
    said = [ln for ln in again.stdout.splitlines() if "is damaged" in ln]
    assert len(said) == 2 and "checksum" in said[0] and "truncated" in said[1], again.stdout[-2000:]
    assert _same(_weights(tmp_path / "again"), online[0])
    res = json.loads((tmp_path / "again" / "result.json").read_text())["teacher_store"]
    assert res == {**res, "epochs_read": EPOCHS - 2, "epochs_written": 2, "epochs_online": 2}
    assert all(check_file(p) is None for p in _published(store)) and len(_published(store)) == EPOCHS
    assert len(list(store.glob(f"*/*{CORRUPT_INFIX}*"))) == 2
