"""An experiment written by kdtune before the sweep layer's re-cut resumes with this code, losing and repeating
nothing.

``tests/data/legacy-be29ea7.tar.gz`` holds a sweep run by main at be29ea7 (toy data, a CE trial alone and KD
fused in units of 2, 30 epochs each) and SIGKILLed mid-sweep: the lone CE trial after 1 epoch, the fused unit
of 2 after 8, the last unit (one member, carried under ``kdtune.members`` as that code wrote it) not started.
Its files name absolute paths under :data:`LEGACY`, so it is unpacked there. ``kdtune resume`` must finish it:
every trial trains each epoch exactly once (the killed ones go on from their checkpoints), one MLflow run and
one Optuna trial per trial.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("mlflow")
pytestmark = pytest.mark.faults  # a real kdtune resume in a subprocess: `make test` runs it

ARCHIVE = Path(__file__).parent / "data" / "legacy-be29ea7.tar.gz"
LEGACY = Path(tempfile.gettempdir()) / "kdtune-legacy-be29ea7"
EPOCHS = 30


def _events(exp: Path) -> dict[str, list[dict]]:
    from kdtune.tune.record import read_events

    return {d.name: read_events(d) for d in (exp / "trials").glob("*") if d.is_dir()}


def _trained(es: list[dict]) -> list[int]:
    return [e["epoch"] for e in es if e["event"] == "epoch"]


@pytest.fixture
def legacy():
    shutil.rmtree(LEGACY, ignore_errors=True)
    LEGACY.mkdir(parents=True)
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(LEGACY, filter="data")
    yield LEGACY / "runs" / "legacy"
    shutil.rmtree(LEGACY, ignore_errors=True)


def test_an_experiment_of_the_previous_layout_resumes(legacy):
    import optuna
    from mlflow import MlflowClient

    before = {t: _trained(es) for t, es in _events(legacy).items()}
    assert before["bc9ef70c"] == [1] and all(before[f"c8d620f1-m{i}"] == list(range(1, 9)) for i in (0, 1))
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    run = subprocess.run([sys.executable, "-m", "kdtune", "resume", "legacy", "--storage", str(LEGACY / "runs")],
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr

    state = json.loads((legacy / "state.json").read_text())
    assert state["status"] == "finished"
    groups = state["groups"]
    assert groups["toy_mlp_student-ce"]["trials"] == 1 and groups["toy_mlp_student-kd"]["trials"] == 3
    trials = [t for g in groups.values() for t in g["all"]]
    assert all(t["outcome"] == "completed" and t["epochs_run"] == EPOCHS and not t["error"] for t in trials)
    ids = {t["trial_id"] for t in trials}
    assert {"bc9ef70c", "c8d620f1-m0", "c8d620f1-m1"} <= ids  # the killed trials kept their ids

    after = _events(legacy)
    for tid in ids:  # each epoch trained exactly once; the killed ones went on from their checkpoints
        assert sorted(_trained(after[tid])) == list(range(1, EPOCHS + 1)), (tid, _trained(after[tid]))
    for tid, done in (("bc9ef70c", 1), ("c8d620f1-m0", 8), ("c8d620f1-m1", 8)):
        starts = [e["epoch"] for e in after[tid] if e["event"] == "start"]
        assert starts[-1] == done, (tid, starts)

    client = MlflowClient(f"sqlite:///{legacy / 'mlflow.db'}")
    eid = client.get_experiment_by_name("legacy").experiment_id
    runs = [r for r in client.search_runs([eid], max_results=1000) if r.data.tags.get("kdtune.role") == "trial"]
    assert sorted(r.data.tags["kdtune.trial_id"] for r in runs) == sorted(ids)  # one run per trial
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags["kdtune.outcome"] == "completed"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (r.data.tags["kdtune.trial_id"], steps)

    storage = f"sqlite:///{legacy / 'optuna.db'}"
    mirrored = [t.user_attrs["tune_trial_id"] for s in optuna.get_all_study_summaries(storage)
                for t in optuna.load_study(study_name=s.study_name, storage=storage).get_trials(deepcopy=False)]  # fmt: skip
    assert sorted(mirrored) == sorted(ids)
