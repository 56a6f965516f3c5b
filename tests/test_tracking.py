"""kdtune.tracking against a real MLflow on a SQLite file: parent/child runs, resume, stages, registry."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("mlflow")

from kdtune.errors import KdtuneError  # noqa: E402
from kdtune.tracking import (  # noqa: E402
    SweepTracker,
    TrialTracker,
    check_tracking_uri,
    default_tracking_uri,
    normalize_tracking_uri,
    sqlite_path,
)
from kdtune.tracking.client import get_client, retry_locked  # noqa: E402

EXP = "sweep-a"
SPEC = {
    "name": EXP,
    "data": "digits",
    "budget": {"trials": 4, "epochs": 3, "metric": "val_acc", "mode": "max"},
    "methods": ["kd", "dkd"],
    "students": [{"model": "resnet8"}],
}
SPACES = {"kd": "def space(trial):\n    return {'T': trial.suggest_float('T', 1, 8)}\n"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One experiment (the SQLite schema takes ~2 s to create) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("exp") / EXP
    uri = default_tracking_uri(root)
    st = SweepTracker(uri, EXP)
    parent = st.start_parent(SPEC, SPACES, tags={"kdtune.storage": str(root.parent)})
    return st, parent, uri


def _runs(client, exp_id, flt=""):
    return client.search_runs([exp_id], filter_string=flt, max_results=1000)


def test_uri_helpers(tmp_path):
    uri = default_tracking_uri(tmp_path / "e")
    assert uri == f"sqlite:///{tmp_path}/e/mlflow.db" and sqlite_path(uri) == tmp_path / "e" / "mlflow.db"
    rel = normalize_tracking_uri("sqlite:///rel/m.db?timeout=30")
    assert rel.startswith("sqlite:////") and rel.endswith("/rel/m.db?timeout=30")
    assert normalize_tracking_uri("http://host:5000") == "http://host:5000"
    assert sqlite_path("sqlite://") is None and sqlite_path("http://x") is None


def test_parent_run_has_spec_versions_and_spaces(sweep):
    st, parent, _ = sweep
    run = st.client.get_run(parent)
    tags, params = run.data.tags, run.data.params
    assert tags["kdtune.sweep_id"] == EXP and tags["kdtune.role"] == "parent"
    assert tags["kdtune.metric"] == "val_acc" and tags["kdtune.mode"] == "max"
    assert "mlflow.source.git.commit" in tags and tags["kdtune.storage"]
    # a handful of readable params; the whole spec is one artifact, spec.yaml
    assert params["trials"] == "4" and params["epochs"] == "3" and params["data"] == "digits"
    assert params["methods"] == "kd, dkd" and params["students"] == "resnet8" and params["metric"] == "val_acc"
    assert not any(k.startswith("budget.") for k in params) and len(params) <= 20
    for lib in ("torch", "ray", "optuna", "mlflow", "kdtune"):
        assert params[f"version.{lib}"] and params[f"version.{lib}"] != "not installed"
    assert params["git_commit"] == tags["mlflow.source.git.commit"]
    files = {f.path for f in st.client.list_artifacts(parent)} | {
        f.path for f in st.client.list_artifacts(parent, "search_spaces")
    }
    assert {"spec.yaml", "search_spaces/kd.py"} <= files
    local = st.client.download_artifacts(parent, "spec.yaml")
    assert "trials: 4" in open(local).read()


def test_resume_reuses_parent(sweep):
    st, parent, uri = sweep
    st2 = SweepTracker(uri, EXP)
    assert st2.start_parent(SPEC, SPACES, tags={}) == parent and st2.resumed
    parents = _runs(st.client, st.experiment_id, "tags.`kdtune.role` = 'parent'")
    assert len(parents) == 1
    st2.end_parent("KILLED")
    assert st.client.get_run(parent).info.status == "KILLED"
    assert st2.start_parent(SPEC, SPACES, tags={}) == parent  # a resumed sweep runs again
    assert st.client.get_run(parent).info.status == "RUNNING"


def test_trial_child_run_params_and_metrics(sweep):
    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="abc_00000", trial_name="kd_abc_00000")
    assert not tt.resumed
    tt.log_params({"method": "kd", "T": 4.0, "nested": {"x": 1}, "none": None})
    for epoch in range(3):
        tt.log_metrics(
            {"val_acc": 50.0 + epoch, "loss_kd": 0.5, "is_best": True, "note": "x", "skip": None, "epoch": epoch,
             "epochs": 3, "lr": 0.1, "host_rss_mb": 900.0, "orch_frac": 0.01}, step=epoch  # fmt: skip
        )
    tt.end("FINISHED")
    run = st.client.get_run(tt.run_id)
    assert run.info.run_name == "kd_abc_00000" and run.info.status == "FINISHED"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["kdtune.trial_id"] == "abc_00000" and run.data.tags["kdtune.role"] == "trial"
    assert run.data.params == {"method": "kd", "T": "4.0", "nested.x": "1", "none": "None"}
    # bool, str, None skipped; the epoch is the step, not a metric; bookkeeping under system/
    assert set(run.data.metrics) == {"val_acc", "loss_kd", "lr", "system/host_rss_mb", "system/orch_frac"}
    hist = st.client.get_metric_history(tt.run_id, "val_acc")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [
        (0, 50.0),
        (1, 51.0),
        (2, 52.0),
    ]


def test_background_logging_batches_epochs_and_flush_writes_at_once(sweep, monkeypatch):
    """Epochs logged within BATCH_S of each other go to MLflow in one write (an epoch's write alone costs a
    toy trial more than its epoch); flush() writes what is queued without waiting out the window."""
    from kdtune.tracking import trial as trial_mod

    st, parent, uri = sweep
    monkeypatch.setattr(trial_mod, "BATCH_S", 30.0)
    tt = TrialTracker(uri, EXP, parent, trial_id="batch_00000", background=True)
    calls = []
    real = tt.client.log_batch
    monkeypatch.setattr(tt.client, "log_batch", lambda run_id, **kw: (calls.append(len(kw.get("metrics") or [])),
                                                                       real(run_id, **kw))[1])  # fmt: skip
    for epoch in range(1, 11):
        tt.log_metrics({"train_loss": 1.0 / epoch, "val_acc": 10.0 * epoch}, step=epoch)
    t0 = time.monotonic()
    tt.flush()
    assert time.monotonic() - t0 < 10 and calls == [20]  # ten epochs, one write, well inside the 30 s window
    assert [m.step for m in st.client.get_metric_history(tt.run_id, "val_acc")] == list(range(1, 11))
    tt.end("FINISHED")


def test_a_short_trial_run_is_created_logged_and_ended_in_three_writes(sweep, monkeypatch):
    """In the background a trial's params, its epochs' metrics and the tags ``end`` is given (its outcome) go to
    MLflow in one ``log_batch`` (each was a write of 10-15 ms on SQLite, as long as a toy trial's epoch);
    what a resumed run holds already is not logged again, and a changed param still becomes a tag."""
    from kdtune.tracking import trial as trial_mod

    st, parent, uri = sweep
    monkeypatch.setattr(trial_mod, "BATCH_S", 30.0)
    writes = []
    for name in ("create_run", "log_batch", "set_terminated", "set_tag", "update_run"):
        real = getattr(st.client.__class__, name)
        monkeypatch.setattr(st.client.__class__, name, lambda self, *a, _r=real, _n=name, **kw: (
            writes.append((_n, {k: len(v or []) for k, v in kw.items() if k in ("metrics", "params", "tags")})),
            _r(self, *a, **kw))[1])  # fmt: skip
    tt = TrialTracker(uri, EXP, parent, trial_id="three_00000", background=True, fresh=True, tags={"a": 1})
    tt.log_params({"T": 4.0, "nested": {"x": 1}})
    for epoch in (1, 2):
        tt.log_metrics({"val_acc": 50.0 + epoch, "train_loss": 1.0}, step=epoch)
    tt.end("FINISHED", tags={"kdtune.outcome": "completed"})
    assert writes == [("create_run", {"tags": 5}), ("log_batch", {"metrics": 4, "params": 2, "tags": 1}),
                      ("set_terminated", {})], writes  # fmt: skip
    run = st.client.get_run(tt.run_id)
    assert run.data.params == {"T": "4.0", "nested.x": "1"} and run.info.status == "FINISHED"
    assert run.data.tags["kdtune.outcome"] == "completed" and run.data.tags["a"] == "1"
    assert sorted(m.step for m in st.client.get_metric_history(tt.run_id, "val_acc")) == [1, 2]
    writes.clear()
    again = TrialTracker(uri, EXP, parent, trial_id="three_00000", background=True)  # resumed: found by trial id
    again.log_params({"T": 2.0, "nested": {"x": 1}, "seed": 3})
    again.end("FAILED", "diverged: nan loss", tags={"kdtune.outcome": "diverged"})
    run = st.client.get_run(tt.run_id)
    assert run.data.params == {"T": "4.0", "nested.x": "1", "seed": "3"} and run.info.status == "FAILED"
    assert run.data.tags["kdtune.changed_param.T"] == "2.0" and run.data.tags["kdtune.outcome"] == "diverged"
    assert run.data.tags["kdtune.failure_reason"] == "diverged: nan loss"
    assert [w for w in writes if w[0] == "log_batch"] == [("log_batch", {"metrics": 0, "params": 1, "tags": 3})]


def test_a_write_that_failed_is_tried_once_more_at_the_end_with_all_that_came_after(sweep, monkeypatch):
    """The writer's first batch (the params and the first epochs) fails (a store away, or locked past the retries): what
    came after is kept, not written out of order, and end() writes all of it once more, with the outcome tags,
    before the run is closed; the run is whole and end() does not raise."""
    from kdtune.tracking import trial as trial_mod

    st, parent, uri = sweep
    monkeypatch.setattr(trial_mod, "BATCH_S", 0.0)
    tt = TrialTracker(uri, EXP, parent, trial_id="lost_00000", background=True, fresh=True)
    real, fails = tt.client.log_batch, []
    monkeypatch.setattr(tt.client, "log_batch", lambda run_id, **kw: fails.append(1) or (
        (_ for _ in ()).throw(RuntimeError("store unavailable")) if len(fails) == 1 else real(run_id, **kw)))  # fmt: skip
    tt.log_params({"T": 4.0})
    for epoch in (1, 2, 3):
        tt.log_metrics({"val_acc": 50.0 + epoch}, step=epoch)
        time.sleep(0.05)
    tt.end("FINISHED", tags={"kdtune.outcome": "completed"})
    run = st.client.get_run(tt.run_id)
    assert run.data.params == {"T": "4.0"} and run.data.tags["kdtune.outcome"] == "completed"
    assert sorted(m.step for m in st.client.get_metric_history(tt.run_id, "val_acc")) == [1, 2, 3]
    assert run.info.status == "FINISHED" and len(fails) >= 2


def test_log_entities_keeps_to_mlflows_batch_limits(sweep):
    from mlflow.entities import Metric, Param, RunTag

    from kdtune.tracking.client import log_entities

    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="limits_00000")
    sizes = []
    real = tt.client.log_batch
    tt.client.log_batch = lambda run_id, **kw: (sizes.append(tuple(len(kw[k]) for k in ("metrics", "params", "tags"))),
                                                real(run_id, **kw))[1]  # fmt: skip
    log_entities(tt.client, tt.run_id, [Metric("m", float(i), 0, i) for i in range(1500)],
                 [Param(f"p{i}", "1") for i in range(150)], [RunTag(f"t{i % 120}", str(i)) for i in range(240)])
    assert sizes == [(800, 100, 100), (700, 50, 20)], sizes
    run = st.client.get_run(tt.run_id)
    assert len(run.data.params) == 150 and run.data.tags["t0"] == "120"  # a tag given twice keeps its last
    assert len(st.client.get_metric_history(tt.run_id, "m")) == 1500
    sizes.clear()  # long values: a request stays under a server's 1 MB
    log_entities(tt.client, tt.run_id, params=[Param(f"long{i}", "x" * 5000) for i in range(100)],
                 tags=[RunTag(f"longtag{i}", "y" * 5000) for i in range(100)])  # fmt: skip
    assert sum(sizes[0][1:]) <= 141 and all(p + t for _, p, t in sizes) and sum(p for _, p, _ in sizes) == 100, sizes
    assert sum(t for _, _, t in sizes) == 100


def test_background_logging_keeps_order_and_end_waits_for_it(sweep, monkeypatch):
    """Metrics logged from a thread of the tracker's own: in order, all there once end() returns, and the
    thread gone after it; a write that fails is raised by flush(), not lost in silence."""
    import threading

    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="bg_00000", background=True)
    for epoch in range(1, 6):
        tt.log_metrics({"train_loss": 1.0 / epoch, "val_acc": 10.0 * epoch}, step=epoch)
    tt.end("FINISHED")
    hist = st.client.get_metric_history(tt.run_id, "val_acc")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.timestamp)] == [
        (e, 10.0 * e) for e in range(1, 6)
    ]
    assert st.client.get_run(tt.run_id).info.status == "FINISHED"
    time.sleep(0.2)
    assert not any(t.name == "mlflow-bg_00000" for t in threading.enumerate())

    bad = TrialTracker(uri, EXP, parent, trial_id="bg_00001", background=True)

    def refuse(*_a, **_k):
        raise ValueError("store is read-only")

    monkeypatch.setattr(bad.client, "log_batch", refuse)
    bad.log_metrics({"val_acc": 1.0}, step=1)
    with pytest.raises(RuntimeError, match="could not log the metrics.*read-only"):
        bad.end("FINISHED")
    assert st.client.get_run(bad.run_id).info.status == "FINISHED"  # closed all the same


def test_backfill_logs_only_the_epochs_the_run_lacks(sweep):
    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="fill_00000")
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "val_acc": 20.0 * e, "is_best": True} for e in (1, 2, 3, 4)
    ]
    for m in history[:2]:
        tt.log_metrics(m, step=m["epoch"])
    # killed after the checkpoint of epoch 4, before its metrics of epochs 3 and 4 reached MLflow; resumed:
    again = TrialTracker(uri, EXP, parent, trial_id="fill_00000")
    assert again.resumed and again.backfill(history) == 2
    assert again.backfill(history) == 0
    steps = sorted(m.step for m in st.client.get_metric_history(tt.run_id, "val_acc"))
    assert steps == [1, 2, 3, 4]
    again.end("FINISHED")


def test_reattach_by_trial_id_in_process_and_in_another_process(sweep):
    st, parent, uri = sweep
    first = TrialTracker(uri, EXP, parent, trial_id="res_00001", trial_name="dkd_res_00001")
    first.log_params({"beta": 8.0})
    first.log_metrics({"val_acc": 40.0}, step=0)
    # the driver dies: the run is left RUNNING; a restored trial in this process finds it again
    again = TrialTracker(uri, EXP, parent, trial_id="res_00001", trial_name="dkd_res_00001")
    assert again.resumed and again.run_id == first.run_id
    again.log_params({"beta": 8.0})  # same value again: fine
    again.log_metrics({"val_acc": 41.0}, step=1)
    again.end("FAILED", reason="worker died")
    # ...and a retried trial in another process (a Ray worker) continues the same run
    code = textwrap.dedent(
        f"""
        from kdtune.tracking import TrialTracker
        tt = TrialTracker({uri!r}, {EXP!r}, {parent!r}, trial_id="res_00001", trial_name="dkd_res_00001")
        assert tt.resumed
        tt.log_params({{"beta": 8.0, "gamma": 1.0}})
        tt.log_metrics({{"val_acc": 42.0}}, step=2)
        tt.end("FINISHED")
        print(tt.run_id)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == first.run_id
    assert "WARNING" not in out.stderr and "INFO" not in out.stderr, out.stderr[-2000:]  # MLflow kept quiet
    runs = _runs(st.client, st.experiment_id, "tags.`kdtune.trial_id` = 'res_00001'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and "kdtune.failure_reason" not in run.data.tags
    assert run.data.params == {"beta": "8.0", "gamma": "1.0"}
    steps = sorted((m.step, m.value) for m in st.client.get_metric_history(run.info.run_id, "val_acc"))
    assert steps == [(0, 40.0), (1, 41.0), (2, 42.0)]


def test_changed_param_goes_to_a_tag(sweep):
    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="chg_00002")
    tt.log_params({"lr": 0.1})
    tt.log_params({"lr": 0.2})
    run = st.client.get_run(tt.run_id)
    assert run.data.params["lr"] == "0.1" and run.data.tags["kdtune.changed_param.lr"] == "0.2"


def test_failed_trial_keeps_reason(sweep):
    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="nan_00003", trial_name="kd_nan_00003")
    tt.log_metrics({"train_loss": float("nan")}, step=0)
    tt.end("FAILED", reason="DivergedError: loss became NaN at epoch 0")
    run = st.client.get_run(tt.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["kdtune.failure_reason"] == "DivergedError: loss became NaN at epoch 0"
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        tt.end("DONE")
    with pytest.raises(RuntimeError), TrialTracker(uri, EXP, parent, trial_id="ctx_00004") as tt2:
        raise RuntimeError("boom")
    run2 = st.client.get_run(tt2.run_id)
    assert run2.info.status == "FAILED" and "RuntimeError: boom" in run2.data.tags["kdtune.failure_reason"]


def test_stage_logged_once(sweep, tmp_path):
    st, parent, _ = sweep
    ckpt = tmp_path / "final.pt"
    ckpt.write_bytes(b"weights")
    cfg = {"model": "resnet8x4", "method": "ce", "epochs": 3, "hp": {}}
    result = {"test_acc": 91.5, "val_acc": 90.0, "epochs": 3, "out": "runs/teacher"}
    rid = st.log_stage("teacher", cfg, result, ckpt)
    assert st.log_stage("teacher", cfg, result, ckpt) == rid
    other = st.log_stage("teacher", {**cfg, "epochs": 4}, result, ckpt)
    assert other != rid
    runs = _runs(st.client, st.experiment_id, "tags.`kdtune.stage` = 'teacher'")
    assert sorted(r.info.run_id for r in runs) == sorted([rid, other])
    run = st.client.get_run(rid)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert run.data.metrics["test_acc"] == 91.5 and run.data.params["model"] == "resnet8x4"
    # the names a trial run uses: what is trained as it is, training fields as train.<field>
    assert run.data.params["method"] == "ce" and run.data.params["train.epochs"] == "3"
    assert not {"epochs", "out", "overwrite", "hp"} & set(run.data.params)
    assert {f.path for f in st.client.list_artifacts(rid, "model")} == {"model/final.pt"}


def test_log_model_and_register_best_with_alias(sweep, monkeypatch):
    torch = pytest.importorskip("torch")
    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="best_00005", trial_name="kd_best_00005")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    import mlflow.utils.environment as env

    check = env.warn_dependency_requirement_mismatches
    tt.log_model(model, name="model", step=2)
    assert env.warn_dependency_requirement_mismatches is check  # skipped inside log_model only
    tt.end("FINISHED")
    version = st.register_best(tt.run_id, artifact_path="model", name="sweep-a-best", alias="best")
    assert st.register_best(tt.run_id, name="sweep-a-best") == version  # idempotent
    mv = st.client.get_model_version_by_alias("sweep-a-best", "best")
    assert str(mv.version) == version and mv.run_id == tt.run_id
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pytorch.load_model("models:/sweep-a-best@best")
    x = torch.randn(2, 4)
    assert torch.allclose(loaded(x), model(x))
    with pytest.raises(KdtuneError, match="no model logged"):
        st.register_best(parent, name="sweep-a-best")


def test_retry_locked_retries_only_lock_errors():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert retry_locked(flaky) == "ok" and len(calls) == 3
    with pytest.raises(KeyError):
        retry_locked(lambda: {}["x"])
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="locked"):
        retry_locked(lambda: (_ for _ in ()).throw(RuntimeError("database is locked")), timeout_s=0.3)
    assert time.monotonic() - t0 < 2


def test_check_tracking_uri_refuses_closed_port_fast():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    uri = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(KdtuneError) as e:
        check_tracking_uri(uri)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert uri in msg and "unreachable" in msg and "\n" not in msg


def test_check_tracking_uri_local(tmp_path, monkeypatch):
    check_tracking_uri(default_tracking_uri(tmp_path / "new" / "exp"))  # creatable: fine
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(KdtuneError, match="not a directory"):
        check_tracking_uri(f"sqlite:///{blocker}/exp/mlflow.db")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(KdtuneError, match="sqlite:///"):
        check_tracking_uri(str(tmp_path / "mlruns"))
    check_tracking_uri(None)


def test_client_is_shared_per_uri_and_store_in_wal_mode(sweep):
    st, _, uri = sweep
    assert get_client(uri) is get_client(uri)
    con = sqlite3.connect(str(sqlite_path(uri)))
    assert st.wal and con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_trial_params_are_named_by_method_and_training_field():
    from kdtune.tracking.trial import trial_params

    base = {"lr": 0.05, "weight_decay": 5e-4, "epochs": 2, "seed": 0, "out": "/x", "device": "cpu",
            "model": "resnet8", "hp": {"alpha": 1.0, "beta": 8.0}}  # fmt: skip
    extra = {"method": "dkd", "student": "resnet8", "seed": 3}
    p = trial_params("dkd", {"beta": 2.0, "lr": 0.1, "train.weight_decay": 1e-4, "seed": 3}, base, extra)
    assert {k: p[k] for k in ("method", "student", "seed", "train.epochs", "train.lr", "train.weight_decay",
                              "dkd.alpha", "dkd.beta")} == {  # fmt: skip
        "method": "dkd", "student": "resnet8", "seed": 3, "train.epochs": 2, "train.lr": 0.1,
        "train.weight_decay": 1e-4, "dkd.alpha": 1.0, "dkd.beta": 2.0}  # fmt: skip
    # every training field and every DKD hyperparameter, defaults included; nothing about where it is kept
    assert p["train.momentum"] == 0.9 and p["train.optimizer"] == "sgd" and p["dkd.T"] == 4.0
    assert not {"train.seed", "train.out", "train.device", "train.hp", "beta", "lr"} & set(p)
    # DIST's beta is another name than DKD's beta: a cross-method plot cannot mix them
    assert "dist.beta" in trial_params("dist", {"beta": 1.0}, {}, {"method": "dist"})


def test_system_metrics_are_logged_on_the_trial_run(sweep, monkeypatch):
    pytest.importorskip("psutil")
    st, parent, uri = sweep
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    tt = TrialTracker(uri, EXP, parent, trial_id="sys_00000", trial_name="kd_sys_00000", system_metrics=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if any(k.startswith("system/") for k in st.client.get_run(tt.run_id).data.metrics):
            break
    tt.end("FINISHED")
    metrics = st.client.get_run(tt.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in metrics and "system/system_memory_usage_megabytes" in metrics
    assert tt._monitor is None  # stopped with the run


class _Trainer:
    """What TrialTracker.log_student is given: a student and its data."""

    def __init__(self, torch):
        from types import SimpleNamespace

        self.data = SimpleNamespace(in_channels=1, image_size=4)
        self.student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))


def test_student_named_after_its_trial_with_a_signature_registered_with_descriptions(sweep, monkeypatch):
    torch = pytest.importorskip("torch")
    st, parent, uri = sweep
    tt = TrialTracker(uri, EXP, parent, trial_id="stu_00007", trial_name="resnet8-dkd_stu_00007")
    tt.log_params({"method": "dkd", "student": "resnet8", "teacher": "resnet8x4", "data": "digits",
                   "dkd.beta": 8.0})  # fmt: skip
    tt.log_metrics({"val_acc": 91.25}, step=2)
    t = _Trainer(torch)
    uri_model = tt.log_student(t.student, t.data, step=2)
    tt.end("FINISHED")
    (model,) = st.client.search_logged_models([st.experiment_id], filter_string=f"source_run_id = '{tt.run_id}'")
    assert model.name == "resnet8-dkd_stu_00007" and uri_model.endswith(model.model_id)
    from mlflow.models import get_model_info

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    info = get_model_info(f"models:/{model.model_id}")
    assert info.signature is not None
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 4, 4)
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3)
    version = st.register_best(tt.run_id, name="sweep-a-described")  # found by its run, whatever its name
    rm = st.client.get_registered_model("sweep-a-described")
    assert "best student of kdtune sweep 'sweep-a'" in rm.description
    mv = st.client.get_model_version("sweep-a-described", version)
    assert "dkd resnet8 student distilled from resnet8x4 on digits" in mv.description
    assert "beta=8.0" in mv.description and "val_acc 91.25" in mv.description
    ce = TrialTracker(uri, EXP, parent, trial_id="stu_00008", trial_name="resnet8-ce_stu_00008")
    ce.log_params({"method": "ce", "student": "resnet8", "teacher": "resnet8x4", "data": "digits"})
    t = _Trainer(torch)
    ce.log_student(t.student, t.data)
    ce.end("FINISHED")
    v2 = st.register_best(ce.run_id, name="sweep-a-described")
    assert "ce resnet8 student (no teacher) on digits" in st.client.get_model_version("sweep-a-described", v2).description
