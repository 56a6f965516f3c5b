"""A unit reports to Tune at the epochs its scheduler decides at, its last epoch, and every few seconds
(:data:`kdtune.tune.trainable.REPORT_EVERY_S`), not every epoch: ASHA decides as with a report per epoch,
and the epochs between reports still reach Optuna (intermediate values, from the members' epoch events) and
MLflow (metric steps)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from kdtune.spec import load_spec


def _spec(scheduler, epochs: int = 30, **over):
    return load_spec({"name": "x", "data": "digits", "teacher": {"model": "resnet8x4"}, "students": ["resnet8"],
                      "methods": ["kd"], "budget": {"epochs": epochs}, "scheduler": scheduler, **over})  # fmt: skip


def test_report_epochs_are_the_schedulers_decision_epochs():
    from kdtune.tune.search import report_epochs

    assert report_epochs(_spec({"name": "asha", "grace_period": 2, "reduction_factor": 2})) == {2, 4, 8, 16}
    # rungs of a fractional reduction factor are reached at the first whole epoch past them
    assert report_epochs(_spec({"name": "asha", "grace_period": 1, "reduction_factor": 1.5})) == {
        1, 2, 3, 4, 6, 8, 12, 18, 26}  # fmt: skip
    assert report_epochs(_spec("none")) == frozenset()
    assert report_epochs(_spec("hyperband")) is None  # its brackets pause and resume: every epoch


def _asha(spec):
    from kdtune.tune.search import GroupedScheduler, make_scheduler

    return GroupedScheduler(lambda: make_scheduler(spec), "val_acc", "max")


@pytest.mark.parametrize("rf", [2, 3, 1.5])
def test_asha_decides_alike_when_units_report_only_at_its_rungs(rf):
    """Twelve units with random curves: ASHA fed every epoch, and ASHA fed only at ``report_epochs`` (Tune's
    ``training_iteration`` then counts reports, not epochs), stop the same units at the same epochs."""
    from kdtune.tune.search import GROUP_KEY, report_epochs

    spec = _spec({"name": "asha", "grace_period": 1, "reduction_factor": rf}, epochs=20)
    at = report_epochs(spec)
    rng = random.Random(7)
    curves = {f"t{i}": [rng.uniform(0, 100) for _ in range(20)] for i in range(12)}

    def run(sparse: bool) -> dict[str, int]:
        sched, stopped = _asha(spec), {}
        trials = {t: SimpleNamespace(trial_id=t, config={GROUP_KEY: "g"}) for t in curves}
        for t in trials.values():
            sched.on_trial_add(None, t)
        reports = dict.fromkeys(curves, 0)
        for epoch in range(1, 21):  # the units advance in lockstep, in a shuffled order each epoch
            for t in rng.sample(sorted(trials), len(trials)):
                if t in stopped or (sparse and epoch not in at and epoch != 20):
                    continue
                reports[t] += 1
                r = {"val_acc": curves[t][epoch - 1], "epoch": epoch, "training_iteration": reports[t]}
                if epoch == 20:
                    sched.on_trial_complete(None, trials[t], r)
                elif sched.on_trial_result(None, trials[t], r) == "STOP":
                    stopped[t] = epoch
        return stopped

    state = rng.getstate()
    dense = run(False)
    rng.setstate(state)
    sparse = run(True)
    assert dense and dense == sparse


def test_a_unit_reports_at_its_decision_epochs_and_its_end(monkeypatch):
    """A 9-epoch unit under ASHA's rungs {1, 2, 4, 8} reports five times (the rungs and the last epoch); with
    the clock past ``REPORT_EVERY_S`` between epochs it reports each epoch; without a scheduler only its end."""
    from kdtune.tune import trainable as tr

    def epochs_reported(report_epochs, clock_step: float = 0.0):
        unit = tr.Unit.__new__(tr.Unit)
        unit.ctx = SimpleNamespace(report_epochs=report_epochs, metric="val_acc")
        unit.final, unit.records = {}, {"m": None}
        now = [0.0]
        monkeypatch.setattr(tr.time, "monotonic", lambda: now[0])
        unit.reported = 0.0
        seen = []
        for epoch in range(1, 10):
            now[0] += clock_step
            if epoch == 9:
                unit.final["m"] = {"epoch": 9}  # the member closed at its last epoch
            if unit._due(epoch):
                seen.append(epoch)
                unit.reported = now[0]
        return seen

    assert epochs_reported(frozenset({1, 2, 4, 8})) == [1, 2, 4, 8, 9]
    assert epochs_reported(frozenset()) == [9]
    assert epochs_reported(None) == list(range(1, 10))
    assert epochs_reported(frozenset(), clock_step=tr.REPORT_EVERY_S) == list(range(1, 10))


def test_a_sweep_reports_sparsely_yet_records_every_epoch(tmp_path):
    """Through ``kdtune sweep``: 12-epoch toy trials without a scheduler report to Tune a few times each, yet
    Optuna holds all 12 intermediate values of each trial and MLflow all 12 steps; the students are logged as
    models for the group's best trial only (``tracking.models: best``)."""
    import json

    import optuna
    from mlflow import MlflowClient

    import kdtune

    spec = {"name": "sparse", "data": "disk-gaussians", "teacher": {"model": "toy_mlp_teacher", "train": {"epochs": 3}},
            "students": ["toy_mlp_student"], "methods": {"kd": {"trials": 3}},
            "budget": {"trials": 3, "epochs": 12, "concurrency": 2}, "scheduler": "none",
            "train": {"device": "cpu", "batch_size": 200}, "storage": str(tmp_path / "runs"), "seed": 1}  # fmt: skip
    result = kdtune.sweep(spec, log=lambda s: None)
    exp = tmp_path / "runs" / "sparse"
    # Tune's count of a unit's reports (training_iteration), from its last experiment snapshot
    snapshot = sorted((exp / "tune" / "sweep").glob("experiment_state-*.json"))[-1]
    last = [json.loads(t[1])["last_result"] for t in json.loads(snapshot.read_text())["trial_data"]]
    reports = [r["training_iteration"] for r in last]
    assert len(reports) == 3 and all(1 <= n < 12 for n in reports) and {r["epoch"] for r in last} == {12}, reports
    study = optuna.load_study(study_name=result.groups[0]["group"], storage=f"sqlite:///{exp / 'optuna.db'}")
    assert [sorted(t.intermediate_values) for t in study.trials] == [list(range(1, 13))] * 3
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("sparse").experiment_id
    runs = client.search_runs([eid], "tags.`kdtune.role` = 'trial'")
    assert len(runs) == 3
    for r in runs:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")] == list(range(1, 13))
    logged = client.search_logged_models([eid])
    best_run = result.groups[0]["best"]["mlflow_run_id"]
    assert [m.source_run_id for m in logged] == [best_run]
    for r in runs:  # the group's best run alone has its checkpoint in MLflow; every trial's folder has its own
        assert bool(client.list_artifacts(r.info.run_id, "checkpoints")) == (r.info.run_id == best_run)
        assert (exp / "trials" / r.data.tags["kdtune.trial_id"] / "ckpt" / "best.pt").is_file()
    assert json.loads((exp / "results.json").read_text())["best"]["registered"].startswith("models:/sparse@best")


def test_tune_snapshots_keep_their_period_while_cheap_and_back_off_when_not():
    """kdtune.tune.rayrt.bound_snapshots: Tune's snapshot every 2 s, unless one took longer than 2 s / 19: then
    19 times its duration (Tune's own "auto" share, 5 %), back to 2 s once they are cheap again."""
    from kdtune.tune.rayrt import bound_snapshots, ray_private

    bound_snapshots()
    bound_snapshots()  # once is enough; twice changes nothing
    manager = ray_private("ray.tune.execution.experiment_state", "_ExperimentCheckpointManager")
    m = manager.__new__(manager)
    m._auto_checkpoint_enabled, m._checkpoint_period = False, 2.0
    periods = []
    for took in (0.01, 0.5, 3.0, 0.05):
        m._update_auto_checkpoint_time(time_taken=took)
        periods.append(round(m._checkpoint_period, 6))
    assert periods == [2.0, 9.5, 57.0, 2.0]
