"""Orphan runs are not trials: a driver killed after a trial opened its MLflow run but before Tune's snapshot
named the trial leaves a run that belongs to no trial (the resumed Tune run asks the searcher anew). The
resumed driver closes it as an orphan (:func:`kdtune.tune.repairs.close_open_runs`); from then on the report,
the saved views of MLflow's runs table and every other count of trials leave it out.

Built without a real kill: N trial runs Tune knows, plus runs of trials it does not know (one left RUNNING
by the killed driver, one that finished between two snapshots), closed by the runner's own code."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("mlflow")

from kdtune.report import best_per_method, main_report  # noqa: E402
from kdtune.tracking import SweepTracker, TrialTracker, default_tracking_uri  # noqa: E402
from kdtune.tracking.views import ALL_TRIALS, sweep_views, view_id, views_of  # noqa: E402
from tests.report_cli import report_args  # noqa: E402

EXP = "orph"
GROUP = "resnet8-kd"
EPOCHS = 3
N = 3  # the trials Tune knows
PAIR = {"data": "digits", "teacher_model": "resnet8x4", "model": "resnet8", "student": "resnet8"}


def _trial_run(uri, parent, tid: str, val: float, end: str | None) -> str:
    """A trial's run as its process logs it (``kdtune.tune.trainable``): role trial, its group, params, epochs."""
    tt = TrialTracker(uri, EXP, parent, trial_id=tid, trial_name=f"{GROUP}_{tid}")
    tt.log_params({"method": "kd", **PAIR, "seed": 0, "group": GROUP, "kd.T": val / 20, "kd.w_kd": 0.9,
                   "train.lr": 0.05})  # fmt: skip
    tt.set_tags({"kdtune.group": GROUP, "kdtune.method": "kd", "kdtune.phase": "search",
                 "kdtune.outcome": "running"})  # fmt: skip
    for epoch in range(1, EPOCHS + 1):
        tt.log_metrics({"val_acc": val - (EPOCHS - epoch), "test_acc": val - 1}, step=epoch)
    if end is not None:
        tt.set_tags({"kdtune.outcome": "completed"})
        tt.end(end)
    return tt.run_id


def _result(tid: str, tmp_path: Path) -> SimpleNamespace:
    """A Tune result as ``ResultGrid`` yields it (what ``close_open_runs`` reads of it)."""
    return SimpleNamespace(metrics={"trial_id": tid, "epoch": EPOCHS}, config={"kdtune.group": GROUP, "T": 1.0},
                           error=None, path=str(tmp_path / f"{GROUP}_{tid}"))  # fmt: skip


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    from kdtune.tune.protocol import expand_members
    from kdtune.tune.repairs import close_open_runs

    exp_dir = tmp_path_factory.mktemp("runs") / EXP
    uri = default_tracking_uri(exp_dir)
    st = SweepTracker(uri, EXP)
    parent = st.start_parent({"name": EXP, "metric": "val_acc", "mode": "max"}, {}, {})
    st.save_views(sweep_views("val_acc", "max", [(GROUP, ["kd.T"])]))
    known = [f"known_{i:05d}" for i in range(N)]
    for i, tid in enumerate(known):
        _trial_run(uri, parent, tid, 80.0 + i, "FINISHED")
    # Runs of trials the restored Tune run does not know: one the killed driver left RUNNING, and one whose
    # trial finished between the driver's last snapshot and the kill (its process ended its run itself).
    left_running = _trial_run(uri, parent, "gone_00007", 99.0, None)
    finished = _trial_run(uri, parent, "gone_00008", 98.0, "FINISHED")
    closed = close_open_runs(uri, EXP, expand_members([_result(t, exp_dir) for t in known], EPOCHS), EPOCHS, groups=[GROUP],
                             experiment_dir=exp_dir)  # fmt: skip
    st.end_parent("FINISHED")
    return SimpleNamespace(dir=exp_dir, uri=uri, st=st, left_running=left_running, finished=finished,
                           closed=closed)  # fmt: skip




def test_orphans_are_closed_and_marked(swept):
    client = swept.st.client
    run = client.get_run(swept.left_running)
    assert run.info.status == "KILLED" and run.data.tags["kdtune.orphan"] == "true"
    assert "orphan" in run.data.tags["kdtune.failure_reason"]
    done = client.get_run(swept.finished)  # ended by its own process: its status stays, it is still no trial
    assert done.info.status == "FINISHED" and done.data.tags.get("kdtune.orphan") == "true"


def test_report_counts_the_trials_not_the_orphans(swept, capsys):
    assert main_report(report_args(experiment=str(swept.dir))) == 0
    out = capsys.readouterr().out
    assert f"kdtune report: {EXP} ({N} trials)" in out, out
    (row,) = best_per_method(swept.uri, EXP)
    assert row["n_trials"] == N and row["value"] == pytest.approx(80.0 + N - 1)  # not the orphans' 99 or 98
    assert not {swept.left_running, swept.finished} & set(row["run_ids"])


def test_saved_views_show_the_trials_not_the_orphans(swept):
    """The views' filters, run as MLflow's runs table runs them (the store's own search)."""
    client, eid = swept.st.client, swept.st.experiment_id
    views = views_of(client.get_experiment(eid).tags.items())
    for vid in (ALL_TRIALS, view_id(GROUP)):
        flt = views[vid]["state"]["searchFilter"]
        runs = client.search_runs([eid], flt, max_results=1000)
        assert len(runs) == N, (vid, flt, sorted(r.data.tags.get("kdtune.trial_id") for r in runs))


def test_an_orphan_closed_by_an_older_kdtune_is_no_trial_either(tmp_path):
    """Runs closed as orphans before the rule moved to the role tag kept ``kdtune.role=trial`` and carry only
    ``kdtune.orphan=true``: the one rule (:func:`kdtune.tracking.client.is_trial_run`) leaves them out too."""
    from kdtune.tracking.client import is_trial_run

    uri = default_tracking_uri(tmp_path / EXP)
    st = SweepTracker(uri, EXP)
    parent = st.start_parent({"name": EXP, "metric": "val_acc", "mode": "max"}, {}, {})
    _trial_run(uri, parent, "known_00000", 80.0, "FINISHED")
    old = _trial_run(uri, parent, "gone_00001", 99.0, None)
    st.client.set_tag(old, "kdtune.orphan", "true")  # as close_open_runs tagged it then: the role left as it was
    st.client.set_terminated(old, "KILLED")
    runs = {r.info.run_id: r for r in st.client.search_runs([st.experiment_id])}
    assert not is_trial_run(runs[old]) and not is_trial_run(runs[parent])
    assert sum(is_trial_run(r) for r in runs.values()) == 1
    (row,) = best_per_method(uri, EXP)
    assert row["n_trials"] == 1 and row["value"] == pytest.approx(80.0)
