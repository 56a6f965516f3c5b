"""MLflow's UI and optuna-dashboard on a finished ``kdtune sweep``, read back in headless Chromium.

The sweep runs for real (a subprocess: ``kdtune sweep``), ``kdtune dashboard`` starts both servers, and the
pages a person opens are checked for what they show: the trials view of the runs table with the metric, the
method and the outcome as columns and every trial listed; a trial's metric charts; the parent run's
description and summary metrics; optuna-dashboard's studies named after the groups, the objective named after
the metric, and the pruned trials as PRUNED. Screenshots land in the test's folder (``make screenshots`` takes
the same pictures of the demo experiment into ``docs/screenshots``).

Needs Chromium (``.ci/setup-chromium.sh``) and Playwright (the dev extra); skips, saying why, without them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests import browser

pytest.importorskip("mlflow")
pytest.importorskip("optuna_dashboard")
pytestmark = pytest.mark.browser  # a sweep, two servers and a browser: a minute or two; `make test` runs it


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    exe, why = browser.chromium()
    if why:
        pytest.skip(why)
    tmp = tmp_path_factory.mktemp("browser")
    spec = {
        "name": "shown", "data": "digits", "val_fraction": 0.1,
        "teacher": {"model": "resnet8", "train": {"epochs": 2}},
        "students": ["resnet8"], "methods": {"kd": {}, "dkd": {}},
        "budget": {"trials": 4, "epochs": 4, "concurrency": 2, "cpus_per_trial": 1},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "train": {"device": "cpu", "batch_size": 128, "lr": 0.05},
        "storage": str(tmp / "runs"), "tracking": {"enabled": True}, "seed": 0,
    }  # fmt: skip
    (tmp / "shown.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(browser.ROOT), "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-m", "kdtune", "sweep", str(tmp / "shown.yaml")], capture_output=True,
                         text=True, env=env, cwd=tmp, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return {**browser.shoot(tmp / "runs" / "shown", tmp / "shots"), "exp": tmp / "runs" / "shown"}


def test_runs_table_opens_on_the_trials_view(seen):
    runs = seen["runs"]
    assert "workflowType=machine_learning" in runs["url"]
    # Model training mode: the runs table, not GenAI's empty overview of traces
    assert "Runs" in runs["text"] and "Traces" not in runs["headers"]
    for column in ("val_acc", "test_acc", "method", "student", "kdtune.outcome"):
        assert any(h.startswith(column[:12]) for h in runs["headers"]), (column, runs["headers"])
    for name in seen["trial_names"]:  # every trial, by its readable name; the parent and the stages left out
        assert name in runs["text"], name
    assert f"{len(seen['trial_names'])} matching runs" in runs["text"]
    assert "pruned" in runs["text"] and "completed" in runs["text"]


def test_a_trials_charts_and_the_parent(seen):
    trial = seen["trial"]["text"]
    assert seen["trial"]["name"] in trial
    charts = seen["trial"]["charts"]
    assert all(charts[k] for k in ("val_acc", "test_acc", "train_loss", "val_loss", "lr")), charts
    # the bookkeeping is in the System metrics tab, not among the accuracy curves; the epoch is the step
    assert not any(charts[k] for k in ("system/host_rss_mb", "system/orch_frac", "epoch", "epochs")), charts
    parent = seen["parent"]["text"]
    assert "best val_acc per (student, method)" in parent  # the description: the sweep's table
    assert "best.resnet8-kd.val_acc" in parent and "best.resnet8-dkd.val_acc" in parent


def test_optuna_dashboard_shows_one_study_per_group(seen):
    studies = seen["studies"]["text"]
    assert "resnet8-kd" in studies and "resnet8-dkd" in studies
    study = seen["study"]["text"] + seen["study_trials"]["text"]
    assert "val_acc" in study and "Objective 0" not in study  # the objective carries the metric's name
    assert "PRUNED" in study or "Pruned" in study  # ASHA stopped some: pruned, not complete
    assert "Complete" in study or "COMPLETE" in study


def test_screenshots_are_pictures(seen):
    assert len(seen["shots"]) == 6
    for path in seen["shots"]:
        with open(path, "rb") as f:
            head = f.read(24)
        assert head[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert (width, height) == (browser.VIEWPORT["width"], browser.VIEWPORT["height"]), path


def test_each_saved_view_and_study_page_opens_and_is_timed(seen):
    """``python -m tests.browser --time`` (how docs/bench.md times a 2,000-trial experiment's pages): every saved
    view and every study page, ready by its content (the runs table's rows, the History plot's points)."""
    got = browser.time_views(seen["exp"], repeats=2, timeout_s=120)
    lines = browser.timing_lines(got)
    pages = {(p["kind"], p["name"]): p for p in got["pages"]}
    for key in (("mlflow", "kdtune-trials"), ("mlflow", "kdtune-resnet8-kd"), ("optuna", "resnet8-kd"),
                ("optuna", "resnet8-dkd")):  # fmt: skip
        assert key in pages, (key, lines)
        assert all(t is not None and t > 0 for t in pages[key]["times"]), lines
    trials = pages[("mlflow", "kdtune-trials")]["loads"][-1]
    assert trials["rows"] == len(seen["trial_names"]) and str(len(seen["trial_names"])) in str(trials["matching"])
    assert pages[("optuna", "resnet8-kd")]["loads"][-1]["trials"] >= 1
    assert got["startup_s"] > 0 and len(lines) == 1 + len(got["pages"])
