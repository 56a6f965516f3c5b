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
