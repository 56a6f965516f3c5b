"""The sweep's plan, without Ray (``kdtune.tune.plan``), and the searcher that gives each group its budget and
tells early-stopped trials to Optuna as PRUNED (``kdtune.tune.search``), driven by hand."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from kdtune.spec import load_spec

SPEC = {
    "name": "p", "data": "digits", "teacher": {"model": "resnet8", "train": {"epochs": 1}},
    "students": ["resnet8"], "methods": {"ce": {}, "kd": {"trials": 3}, "disk": {"trials": 5}},
    "budget": {"trials": 4, "epochs": 3}, "train": {"device": "cpu"},
}  # fmt: skip


def test_plan_is_pure_and_complete(tmp_path):
    from kdtune.tune.plan import plan

    spec = load_spec({**SPEC, "storage": str(tmp_path / "runs")})
    p = plan(spec)
    assert set(p.stages) == {"teacher", "ce-resnet8"}
    teacher, ce = p.stages["teacher"], p.stages["ce-resnet8"]
    assert teacher.dir.parent == ce.dir.parent == spec.stages_dir and teacher.key != ce.key
    by = {g.method: g for g in p.groups}
    assert [g.name for g in p.groups] == ["resnet8-ce", "resnet8-kd", "resnet8-disk"]
    assert (by["ce"].budget, by["kd"].budget, by["disk"].budget) == (1, 3, 5) and p.total_trials == 9
    assert by["ce"].stages == () and "teacher" not in by["ce"].base
    assert by["kd"].base["teacher"] == str(teacher.model_path) and by["kd"].stages == ("teacher",)
    assert by["disk"].base["init"] == str(ce.model_path) and by["disk"].needs_ce_error
    assert set(by["disk"].stages) == {"teacher", "ce-resnet8"}
    assert by["kd"].starts and len(by["kd"].starts) <= 3 and by["kd"].parameters
    assert not (tmp_path / "runs").exists()  # planning writes nothing
    # the DiSK space is rebuilt with the CE stage's error once it is known
    assert p.space(by["disk"], ce_error=0.2).ctx.ce_error == 0.2


def test_planning_imports_neither_ray_nor_mlflow(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        from kdtune.spec import load_spec
        from kdtune.tune.plan import plan
        p = plan(load_spec({{**{SPEC!r}, "storage": {str(tmp_path)!r}}}))
        assert p.total_trials == 9
        bad = [m for m in ("ray", "mlflow") if m in sys.modules]
        assert not bad, bad
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


class _Space:
    """A define-by-run space of one float, as SpaceFn is."""

    def __init__(self, name):
        self.name = name

    def __call__(self, trial):
        trial.suggest_float(self.name, 0.0, 1.0)
        return {"const": 1}


def test_searcher_gives_each_group_its_budget_interleaved_and_prunes_early_stops(tmp_path):
    pytest.importorskip("ray")
    from ray.tune.search import Searcher

    from kdtune.tune.search import GROUP_KEY, GroupedOptunaSearch, GroupSearch

    groups = [GroupSearch("a", _Space("x"), 1), GroupSearch("b", _Space("y"), 3, starts=[{"y": 0.5}]),
              GroupSearch("c", _Space("z"), 5)]  # fmt: skip
    s = GroupedOptunaSearch(groups, "val_acc", "max", epochs=3, seed=0)
    handed = []
    for i in range(9):
        cfg = s.suggest(f"t{i}")
        assert cfg["const"] == 1
        handed.append(cfg[GROUP_KEY])
    assert s.suggest("t9") == Searcher.FINISHED
    assert sorted(handed) == ["a"] + ["b"] * 3 + ["c"] * 5
    assert handed[0] == "c" and handed.index("a") < len(handed) - 1  # big groups first, groups interleaved
    first_b = next(i for i, g in enumerate(handed) if g == "b")
    assert s.studies["b"].trials[0].params == {"y": 0.5}  # the published point comes first
    assert first_b < handed.index("c", handed.index("c") + 2)

    ids = {g: [f"t{i}" for i, h in enumerate(handed) if h == g] for g in "abc"}
    # c's first trial: stopped by the scheduler after epoch 1 -> PRUNED with its curve
    s.on_trial_result(ids["c"][0], {"val_acc": 40.0, "training_iteration": 1, "epoch": 1})
    s.on_trial_complete(ids["c"][0], {"val_acc": 40.0, "training_iteration": 1, "epoch": 1})
    # c's second: all epochs -> COMPLETE with its value; third: errored -> FAIL
    for ep in (1, 2, 3):
        s.on_trial_result(ids["c"][1], {"val_acc": 50.0 + ep, "training_iteration": ep, "epoch": ep})
    s.on_trial_complete(ids["c"][1], {"val_acc": 53.0, "training_iteration": 3, "epoch": 3})
    s.on_trial_complete(ids["c"][2], None, error=True)
    by_state = {t.number: t for t in s.studies["c"].trials}
    states = [t.state.name for t in by_state.values()]
    assert states.count("PRUNED") == 1 and states.count("COMPLETE") == 1 and states.count("FAIL") == 1
    pruned = next(t for t in by_state.values() if t.state.name == "PRUNED")
    assert pruned.intermediate_values == {1: 40.0} and pruned.value == 40.0  # as Optuna records a pruned trial
    done = next(t for t in by_state.values() if t.state.name == "COMPLETE")
    assert done.value == 53.0 and done.intermediate_values == {1: 51.0, 2: 52.0, 3: 53.0}
    assert s.outcome_counts()["c"] == {"PRUNED": 1, "COMPLETE": 1, "FAIL": 1, "RUNNING": 2}

    # saved and restored with the experiment: the same budgets, no trial handed out again
    path = tmp_path / "searcher.pkl"
    s.save(str(path))
    r = GroupedOptunaSearch([], "val_acc", "max", epochs=3)
    r.restore(str(path))
    assert r.suggest("t10") == Searcher.FINISHED and len(r.studies["c"].trials) == 5


def test_searcher_rebuilt_from_the_restored_trial_list(tmp_path):
    """On a resume the searcher is made again from the trial list Tune restored (its pickle may come from
    another snapshot than the list): each trial once with its own params and outcome, the live ones live and
    counted against the concurrency, the unused starting points still queued, each group's budget kept."""
    pytest.importorskip("ray")
    from ray.tune.search import Searcher

    from kdtune.tune.search import GROUP_KEY, GroupedOptunaSearch, GroupSearch

    def make():
        groups = [GroupSearch("a", _Space("x"), 2, starts=[{"x": 0.25}, {"x": 0.75}]),
                  GroupSearch("b", _Space("y"), 3)]  # fmt: skip
        return GroupedOptunaSearch(groups, "val_acc", "max", epochs=3, seed=0, max_concurrent=2)

    def res(v, ep):
        return {"val_acc": v, "training_iteration": ep, "epoch": ep}

    trials = [
        {"trial_id": "t0", "status": "TERMINATED", "config": {GROUP_KEY: "b", "y": 0.1, "const": 1},
         "last_result": res(60.0, 3)},
        {"trial_id": "t1", "status": "TERMINATED", "config": {GROUP_KEY: "b", "y": 0.2, "const": 1},
         "last_result": res(41.0, 1)},  # stopped by the scheduler after epoch 1
        {"trial_id": "t2", "status": "ERROR", "config": {GROUP_KEY: "a", "x": 0.25, "const": 1},
         "last_result": res(30.0, 2)},  # run again on resume (on_resume: resume)
        {"trial_id": "t3", "status": "RUNNING", "config": {GROUP_KEY: "b", "y": 0.3, "const": 1},
         "last_result": res(50.0, 2)},
    ]  # fmt: skip
    s = make()
    s.rebuild(trials, requeue_errored=True)
    assert s.asked == {"a": 1, "b": 3}
    assert set(s.live) == {"t2", "t3"}
    b = {t.params["y"]: t for t in s.studies["b"].trials}
    assert [b[0.1].state.name, b[0.2].state.name, b[0.3].state.name] == ["COMPLETE", "PRUNED", "RUNNING"]
    assert b[0.1].value == 60.0 and b[0.2].intermediate_values == {1: 41.0}
    assert b[0.3].intermediate_values == {2: 50.0}
    # two live trials fill the two slots: nothing more is handed out until one ends
    assert s.suggest("t4") is None
    s.on_trial_result("t3", res(55.0, 3))
    s.on_trial_complete("t3", res(55.0, 3))
    t3 = next(t for t in s.studies["b"].trials if t.params["y"] == 0.3)
    assert t3.state.name == "COMPLETE" and t3.intermediate_values == {2: 50.0, 3: 55.0}
    # group b has its 3 trials; a gets its one more trial: the unused starting point 0.75
    cfg = s.suggest("t4")
    assert cfg[GROUP_KEY] == "a" and cfg["x"] == 0.75
    s.on_trial_complete("t2", res(70.0, 3))
    assert s.suggest("t5") == Searcher.FINISHED
    assert [t.params["x"] for t in s.studies["a"].trials] == [0.25, 0.75]
    assert s.studies["a"].trials[0].state.name == "COMPLETE"

    # skip: the snapshot's errored trial stays failed, and its group does not get another in its place
    s = make()
    s.rebuild(trials, requeue_errored=False)
    assert set(s.live) == {"t3"} and s.studies["a"].trials[0].state.name == "FAIL" and s.asked["a"] == 1


def test_snapshot_trials_reads_the_newest_snapshot_and_names_a_damaged_one(tmp_path):
    pytest.importorskip("ray")
    from kdtune.config import ConfigError
    from kdtune.tune.search import snapshot_trials

    assert snapshot_trials(tmp_path) is None
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text('{"trial_data": []}')
    assert snapshot_trials(tmp_path) == []
    bad = tmp_path / "experiment_state-2026-01-02_00-00-00.json"
    bad.write_text('{"trial_data": [["{\\"trial_id\\": ')
    with pytest.raises(ConfigError, match="is damaged") as e:
        snapshot_trials(tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_plan_refuses_a_space_its_constraints_empty_and_notes_what_they_narrow(tmp_path):
    """The issue's spec: no lambda_max in [0.5, 5] exceeds lambda_min = 10, refused in one line naming both; a
    narrowing the constraints leave room in is planned with what they narrow said, and the published starting
    point outside it is left out. Validation plans with the data set's class count, as the sweep does."""
    from kdtune.errors import ConfigError
    from kdtune.tune.plan import plan

    def spec(space):
        return load_spec({**SPEC, "methods": {"disk": {"space": space}}, "storage": str(tmp_path / "runs")})

    with pytest.raises(ConfigError) as e:
        plan(spec({"lambda_min": 10, "lambda_max": {"low": 0.5, "high": 5}}))
    msg = str(e.value)
    assert "\n" not in msg and "lambda_max in [0.5, 5]" in msg and "lambda_min = 10" in msg
    (g,) = plan(spec({"lambda_max": {"low": 0.5, "high": 5}})).groups
    assert g.starts == [] and g.parameters["lambda_min"].choices == (0.01, 0.1, 1.0)
    assert g.notes[0].startswith("lambda_min narrowed to {0.01, 0.1, 1}") and "left out: lambda_max=50.0" in g.notes[1]
    assert g.parameters["K"].choices == (1, 3, 5, 10)  # digits' 10 classes, without reading the data


def test_searcher_leaves_out_a_starting_point_outside_the_space_it_is_given(tmp_path, capsys):
    """A starting point the plan accepted (DiSK's delta_offset range is +-0.2 before the CE stage's error is known)
    that the sweep's space excludes (an error of 0.1 leaves [-0.1, 0.2]) is not enqueued: Optuna would run it."""
    pytest.importorskip("ray")
    from kdtune.tune.plan import plan
    from kdtune.tune.search import GroupedOptunaSearch, GroupSearch

    p = plan(load_spec({**SPEC, "methods": {"disk": {"starts": [{"delta_offset": -0.15}, {"delta_offset": 0.1}]}},
                        "storage": str(tmp_path / "runs")}))  # fmt: skip
    (g,) = p.groups
    assert g.starts == [{"delta_offset": -0.15}, {"delta_offset": 0.1}]
    s = GroupedOptunaSearch([GroupSearch(g.name, p.space(g, ce_error=0.1), 2, g.starts)], "val_acc", "max", epochs=3)
    offsets = [s.suggest(f"t{i}")["delta_offset"] for i in range(2)]
    assert offsets[0] == 0.1 and -0.1 <= offsets[1] <= 0.2
    assert "delta_offset=-0.15 outside the space" in capsys.readouterr().out
