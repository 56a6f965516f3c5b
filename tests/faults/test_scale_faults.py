"""Fault injection at scale: a sweep of 500 one-epoch KD trials on the DiSK Gaussians (toy MLPs, two slots),
its driver SIGKILLed once, about halfway, then ``kdtune resume``. Nothing is lost or repeated
(:func:`harness.check_sweep`: 500 trials, each trained its one epoch once, one MLflow run and one Optuna trial
each), no trial that was done before the kill trained again, and no log says "database is locked"."""

from __future__ import annotations

import time

import pytest
import yaml

from tests.faults import harness as h

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.faults

TRIALS = 500


def test_driver_killed_once_in_a_500_trial_sweep(tmp_path):
    spec = tmp_path / "scale500.yaml"
    exp = tmp_path / "runs" / "scale500"
    spec.write_text(yaml.safe_dump({
        "name": "scale500", "data": "disk-gaussians",
        "teacher": {"model": "toy_mlp_teacher", "train": {"epochs": 5}},
        "students": ["toy_mlp_student"], "methods": ["kd"],
        "budget": {"trials": TRIALS, "epochs": 1, "concurrency": 2, "cpus_per_trial": 1},
        "scheduler": "none", "train": {"device": "cpu", "batch_size": 200, "lr": 0.1},
        "storage": str(tmp_path / "runs"), "tracking": {"enabled": True}, "seed": 5,
        "failures": {"max_failures": 2},
    }))  # fmt: skip

    first = h.Driver(["sweep", str(spec)], tmp_path / "scale-0.log", tmp_path)
    try:
        assert h.wait_for(lambda: len(h.done_trials(h.events(exp))) >= TRIALS // 2, 600, f"{TRIALS // 2} trials",
                          first), first.text()[-4000:]  # fmt: skip
        first.kill()
        ev = h.wait_quiet(exp)
        done_at = dict.fromkeys(h.done_trials(ev), time.time())
    finally:
        first.cleanup()
    assert TRIALS // 2 <= len(done_at) < TRIALS, len(done_at)
    second = h.Driver(["resume", str(exp)], tmp_path / "scale-1.log", tmp_path)
    try:
        assert second.wait(timeout=900) == 0, second.text()[-4000:]
    finally:
        second.cleanup()

    figures = h.check_sweep(exp, spec, 1, done_at)
    assert figures["trials"] == TRIALS and figures["mlflow_runs"] == TRIALS, figures
    logs = [first.text(), second.text(), *(p.read_text(errors="replace") for p in exp.rglob("*.log"))]
    assert not any("database is locked" in t for t in logs), "a log says 'database is locked'"
