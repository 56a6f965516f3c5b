"""The teacher store: a run that reads the teacher's stored outputs ends bit for bit where a run with the online
teacher does; epochs are written whole, once, verified on every read; damage is set aside and recomputed;
what cannot be stored is refused (on) or skipped (auto) in one line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdtune.config import TrainConfig
from kdtune.data import load_data
from kdtune.data.base import Split
from kdtune.engine import Bundle, Trainer
from kdtune.engine import teacher_store as ts
from kdtune.errors import ConfigError
from kdtune.models import create_model
from kdtune.models.checkpoint import save_model

EPOCHS = 3


@pytest.fixture(scope="module")
def data():
    d = load_data("digits", val_fraction=0.1, seed=0)
    return dataclasses.replace(d, train=Split(d.train.x[:320].clone(), d.train.y[:320].clone()))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("teacher") / "t.pt"
    torch.manual_seed(7)
    model = create_model("resnet8", 10, 1)
    with torch.no_grad():
        model.fc.weight.mul_(20.0)  # a peaked teacher, as a trained one is
    save_model(path, model, "resnet8", 10, 1, {})
    return str(path)


def cfg(method: str, teacher: str, **kw) -> TrainConfig:
    hp = {"dkd": {"warmup": 1}}.get(method, {})
    base = dict(data="digits", model="resnet8", teacher=teacher, method=method, epochs=EPOCHS, batch_size=64,
                eval_batch_size=512, device="cpu", lr=0.05, seed=3, hp=hp)  # fmt: skip
    return TrainConfig.from_dict({**base, **kw})


def train(c: TrainConfig, data, lines=None) -> Trainer:
    t = Trainer(c, data=data, log=(lines.append if lines is not None else None))
    for _ in t.run():
        pass
    return t


def same(a: Trainer, b: Trainer) -> bool:
    sa, sb = a.student.state_dict(), b.student.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa) and [h["test_acc"] for h in a.history] == [
        h["test_acc"] for h in b.history
    ]


@pytest.mark.parametrize("method", ["kd", "dkd", "dist"])
def test_reading_the_store_is_bit_for_bit_the_online_teacher(method, data, teacher, tmp_path):
    """3 epochs of 5 batches, fp32: the run that writes the store and the run that reads it both end with the
    online run's very weights."""
    online = train(cfg(method, teacher, teacher_store="off"), data)
    assert online.store is None and online.result()["teacher_store"] is None
    writer = train(cfg(method, teacher, teacher_store="on", teacher_store_dir=str(tmp_path)), data)
    reader = train(cfg(method, teacher, teacher_store="on", teacher_store_dir=str(tmp_path)), data)
    assert same(online, writer) and same(online, reader)
    assert writer.result()["teacher_store"] == {"path": str(writer.store.dir), "epochs_read": 0,
                                                "epochs_written": EPOCHS, "epochs_online": EPOCHS}  # fmt: skip
    assert reader.result()["teacher_store"]["epochs_read"] == EPOCHS
    assert reader.result()["teacher_store"]["epochs_online"] == 0
    calls = []
    probe = Trainer(cfg(method, teacher, teacher_store="on", teacher_store_dir=str(tmp_path)), data=data)
    probe.teacher.register_forward_hook(lambda *a: calls.append(1))
    probe.train_pass(0)
    assert calls == []  # the teacher does not run where the store has the epoch


def test_bundle_reads_the_store_and_its_members_stay_exact(data, teacher, tmp_path):
    c = cfg("kd", teacher, teacher_store="on", teacher_store_dir=str(tmp_path))
    lone = train(cfg("kd", teacher, teacher_store="off"), data)
    train(c, data)  # writes the store
    bundle = Bundle([c, c.replace(seed=4, lr=0.02)], data=data, mode="loop")
    calls = []
    bundle.shared.teacher.register_forward_hook(lambda *a: calls.append(1))
    list(bundle.run())
    assert calls == [] and bundle.result(0)["teacher_store"]["epochs_read"] == EPOCHS
    got = bundle.sync_member(0).student.state_dict()
    assert all(torch.equal(got[k], v) for k, v in lone.student.state_dict().items())


def test_bf16_store_keeps_the_teachers_bf16_outputs_exactly(data, teacher, tmp_path):
    """Under bf16 autocast the teacher's logits are bf16: stored as they are (half the bytes), read back to the
    bit."""
    online = train(cfg("kd", teacher, amp="bf16", teacher_store="off"), data)
    w = train(cfg("kd", teacher, amp="bf16", teacher_store="on", teacher_store_dir=str(tmp_path)), data)
    r = train(cfg("kd", teacher, amp="bf16", teacher_store="on", teacher_store_dir=str(tmp_path)), data)
    assert same(online, w) and same(online, r) and r.store_stats["read"] == EPOCHS
    rows = 5 * 64
    assert w.store.path(0).stat().st_size == ts.HEADER_BYTES + rows * 10 * 2


def test_the_key_separates_what_changes_an_output_bit(data, teacher, tmp_path):
    folders = set()
    for kw in ({}, {"data_seed": 1}, {"batch_size": 32}, {"amp": "bf16"}, {"augment": False}):
        t = Trainer(cfg("kd", teacher, teacher_store="on", teacher_store_dir=str(tmp_path), **kw), data=data)
        folders.add(t.store.dir)
    other = tmp_path / "t2.pt"
    torch.manual_seed(8)
    save_model(other, create_model("resnet8", 10, 1), "resnet8", 10, 1, {})
    folders.add(Trainer(cfg("kd", str(other), teacher_store="on", teacher_store_dir=str(tmp_path)), data=data).store.dir)
    small = dataclasses.replace(data, train=Split(data.train.x[:256].clone(), data.train.y[:256].clone()))
    folders.add(Trainer(cfg("kd", teacher, teacher_store="on", teacher_store_dir=str(tmp_path)), data=small).store.dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)  # a CPU kernel may split its sums by thread
    try:
        folders.add(Trainer(cfg("kd", teacher, teacher_store="on", teacher_store_dir=str(tmp_path)), data=data).store.dir)
    finally:
        torch.set_num_threads(threads)
    assert len(folders) == 8
    # features are stored for methods that read them (DiSK: the teacher's pooled vector), in the same file
    init = tmp_path / "init.pt"
    torch.manual_seed(9)
    save_model(init, create_model("resnet8", 10, 1), "resnet8", 10, 1, {})
    c = cfg("disk", teacher, init=str(init), epochs=1, hp={"K": 5}, teacher_store="on", teacher_store_dir=str(tmp_path))
    online = train(c.replace(teacher_store="off"), data)
    w, r = train(c, data), train(c, data)
    assert w.store.key["features"] is True and w.store.dir not in folders and r.store_stats["read"] == 1
    stored = r.store.read(0, torch.device("cpu"))
    assert stored.feats is not None and stored.feats.shape == (320, r.teacher.feat_dim)
    assert same(online, w) and same(online, r)


def test_a_damaged_epoch_is_set_aside_and_computed_again(data, teacher, tmp_path):
    c = cfg("kd", teacher, teacher_store="on", teacher_store_dir=str(tmp_path))
    first = train(c, data)
    store = first.store
    raw = bytearray(store.path(0).read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the payload
    store.path(0).write_bytes(bytes(raw))
    store.path(1).write_bytes(store.path(1).read_bytes()[:-100])  # truncated
    (store.dir / f"{ts.TMP_PREFIX}epoch-0002{ts.SUFFIX}-999-dead").write_bytes(b"half written")  # a killed writer
    lines: list[str] = []
    again = train(c, data, lines)
    assert same(first, again)
    said = [ln for ln in lines if "is damaged" in ln]
    assert len(said) == 2 and "checksum" in said[0] and "truncated" in said[1]
    assert again.store_stats == {"read": 1, "written": 2, "online": 2}
    assert sorted(store.epochs()) == [0, 1, 2] and len(list(store.dir.glob(f"*{ts.CORRUPT_INFIX}*"))) == 2
    third = train(c, data)
    assert third.store_stats["read"] == EPOCHS and same(first, third)


def test_only_whole_epochs_are_published_and_only_once(data, teacher, tmp_path):
    c = cfg("kd", teacher, teacher_store="on", teacher_store_dir=str(tmp_path))
    t = Trainer(c, data=data)
    t.train_pass(0, max_steps=2)  # a pass cut short (a benchmark's steps) writes nothing
    assert t.store.epochs() == []
    stored, writer = t.store_epoch(0, len(t.train_loader))
    assert stored is None and writer is not None
    a = torch.randn(5 * 64, 10)
    assert t.store.publish(0, a, None) and not t.store.publish(0, a + 1, None)  # the first one stays
    assert torch.equal(t.store.read(0, torch.device("cpu")).batch(0, 64)[0], a[:64])


def test_refused_or_skipped_in_one_line_when_it_cannot_serve(data, teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(ts, "free_bytes", lambda root: 10_000)
    with pytest.raises(ConfigError) as e:
        Trainer(cfg("kd", teacher, teacher_store="on", teacher_store_dir=str(tmp_path)), data=data)
    msg = str(e.value)
    assert "\n" not in msg and "teacher_store=on cannot be used" in msg and "free" in msg and "teacher_store=off" in msg
    lines: list[str] = []
    t = Trainer(cfg("kd", teacher, teacher_store="auto", teacher_store_dir=str(tmp_path)), data=data, log=lines.append)
    assert t.store is None and any(ln.startswith("teacher store off: it needs") for ln in lines)
    monkeypatch.undo()
    # auto without a folder (kdtune train's default) keeps the online teacher; with one, it stores
    assert Trainer(cfg("kd", teacher), data=data).store is None
    assert Trainer(cfg("kd", teacher, teacher_store_dir=str(tmp_path)), data=data).store is not None
    assert Trainer(cfg("ce", None, teacher_store="on", teacher_store_dir=str(tmp_path)), data=data).store is None


def test_kdtune_train_and_kdtune_store_through_the_cli(teacher, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    store = tmp_path / "store"
    words = [f"teacher={teacher}", "data=digits", "model=resnet8", "method=kd", "epochs=2", "device=cpu",
             "teacher_store=on", f"teacher_store_dir={store}"]  # fmt: skip
    for i in range(2):
        out = subprocess.run([sys.executable, "-m", "kdtune", "train", *words, f"out={tmp_path / f'r{i}'}"],
                             capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
    r0 = json.loads((tmp_path / "r0" / "result.json").read_text())
    r1 = json.loads((tmp_path / "r1" / "result.json").read_text())
    assert r0["teacher_store"]["epochs_written"] == 2 and r1["teacher_store"]["epochs_read"] == 2
    assert r0["test_acc"] == r1["test_acc"]
    a = torch.load(tmp_path / "r0" / "final.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "r1" / "final.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    listed = subprocess.run([sys.executable, "-m", "kdtune", "store", "list", "--dir", str(store)],
                            capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert listed.returncode == 0 and "resnet8" in listed.stdout and "1 stores" in listed.stdout
    name = Path(r0["teacher_store"]["path"]).name
    bad = subprocess.run([sys.executable, "-m", "kdtune", "store", "delete", "nope", "--dir", str(store)],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no teacher store 'nope'" in bad.stderr
    gone = subprocess.run([sys.executable, "-m", "kdtune", "store", "delete", name, "--dir", str(store)],
                          capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert gone.returncode == 0 and not Path(r0["teacher_store"]["path"]).exists()
    refused = subprocess.run([sys.executable, "-m", "kdtune", "train", *words[:-1], "teacher_store_dir=/proc/nope"],
                             capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "teacher_store=on" in refused.stderr


def test_bench_store_rows(tmp_path):
    """`kdtune bench --store`: a lone row reading the store beside the online one, and fused rows that read it
    with their ratio to the lone online loop; no timing asserted."""
    from kdtune.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--teacher", "resnet8", "--student", "resnet8", "--batch", "4", "--steps", "1", "--warmup", "0",
            "--repeats", "1", "--only", "kdtune", "--store", "--fuse", "2", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    row = json.loads(out.read_text())[0]
    assert row["kdtune+store"][0] > 0 and row["kdtune"][0] > 0 and row["fused_store"] is True
    assert [f["fuse"] for f in row["fused"]] == [1, 2]
