"""Fault injection on a sweep of two teachers (``teachers:`` CE and MSE stages, both resnet20; KD and DKD
students): the driver SIGKILLed once, mid-sweep (both teacher stages built, five trial epochs trained), then
``kdtune resume``. Nothing is lost or repeated: :func:`harness.check_sweep` holds for the four (teacher, student,
method) groups, each teacher stage was trained once (the resumed driver finds both cached), and every trial run
keeps its teacher's name."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from tests.faults import harness as h

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.faults

EPOCHS = 3


def test_driver_killed_once_in_a_ce_mse_teacher_sweep(tmp_path):
    spec, exp = h.write_spec(tmp_path, "ce-mse", tmp_path / "unused.pt", methods=["kd", "dkd"], trials=2,
                             epochs=EPOCHS)  # fmt: skip
    raw = yaml.safe_load(spec.read_text())
    del raw["teacher"]
    raw["teachers"] = [{"name": "ce", "model": "resnet20", "method": "ce", "train": {"epochs": 2}},
                       {"name": "mse", "model": "resnet20", "method": "mse", "train": {"epochs": 2}}]  # fmt: skip
    spec.write_text(yaml.safe_dump(raw))

    first = h.Driver(["sweep", str(spec)], tmp_path / "ce-mse-0.log", tmp_path)
    try:
        def mid_sweep():  # the stages are built before any trial starts
            return h.epochs_seen(h.events(exp)) >= 5

        assert h.wait_for(mid_sweep, 400, "five trial epochs", first), first.text()[-4000:]
        time.sleep(0.5)  # into the next epoch
        first.kill()
        ev = h.wait_quiet(exp)
        done_at = dict.fromkeys(h.done_trials(ev), time.time())
    finally:
        first.cleanup()
    second = h.Driver(["resume", str(exp)], tmp_path / "ce-mse-1.log", tmp_path)
    try:
        assert second.wait() == 0, second.text()[-4000:]
    finally:
        second.cleanup()

    figures = h.check_sweep(exp, spec, EPOCHS, done_at)
    assert set(figures["studies"]) == {"ce-resnet8-kd", "ce-resnet8-dkd", "mse-resnet8-kd", "mse-resnet8-dkd"}
    trained = re.findall(r"stage (teacher-\w+): training", first.text() + second.text())
    assert sorted(trained) == ["teacher-ce", "teacher-mse"], trained
    assert "stage teacher-ce: resnet20 (ce, 2 epochs on digits) cached" in second.text()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name(exp.name).experiment_id
    for r in client.search_runs([eid], "tags.`kdtune.role` = 'trial'", max_results=1000):
        assert r.data.tags["kdtune.group"].startswith(r.data.tags["kdtune.teacher_name"] + "-")
    print(f"\n[faults] ce-mse: killed once after five trial epochs; done before the kill {sorted(done_at)}; "
          f"checks {figures}")  # fmt: skip
