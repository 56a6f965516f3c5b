"""``budget.fuse: K`` in sweeps (``kdtune.tune.fused``): the spec and plan refusals, ``auto``, ASHA's rule per
member, the searcher asking K Optuna trials for one Tune trial and telling each its own outcome, and a real
``kdtune sweep`` (CLI, subprocess) whose bundles' members are trials everywhere: one results row, one MLflow
run, one Optuna trial, one folder each; pruned members stop early and cost no more epochs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from kdtune.errors import ConfigError
from kdtune.spec import load_spec

SPEC = {
    "name": "f", "data": "digits", "teacher": {"model": "resnet8", "train": {"epochs": 1}},
    "students": ["resnet8"], "methods": {"kd": {"trials": 6}},
    "budget": {"trials": 4, "epochs": 3, "fuse": 4}, "train": {"device": "cpu"},
}  # fmt: skip


def _spec(tmp_path, **budget):
    raw = json.loads(json.dumps(SPEC))
    raw["budget"].update(budget)
    raw["storage"] = str(tmp_path / "runs")
    return raw


@pytest.mark.parametrize("fuse, needle", [(0, "budget.fuse=0 is out of range"), ("four", "budget.fuse='four' must be"),
                                          (2.5, "budget.fuse=2.5 must be"), (True, "must be an integer")])  # fmt: skip
def test_bad_fuse_is_refused_naming_it(tmp_path, fuse, needle):
    with pytest.raises(ConfigError, match=needle):
        load_spec(_spec(tmp_path, fuse=fuse))


def test_plan_carries_fuse_and_counts_bundles(tmp_path):
    from kdtune.tune.plan import plan

    p = plan(load_spec(_spec(tmp_path, fuse=4)))
    (g,) = p.groups
    assert (g.budget, g.fuse, g.units) == (6, 4, 2)  # 6 members: bundles of 4 and 2
    assert p.total_trials == 6 and p.total_units == 2
    assert p.describe()["groups"][0]["fuse"] == 4
    p1 = plan(load_spec(_spec(tmp_path, fuse=1)))
    assert p1.groups[0].fuse == 1 and p1.total_units == 6
    # fuse is capped at the group's budget: a bundle never asks for more members than the group has
    assert plan(load_spec({**_spec(tmp_path, fuse=16)})).groups[0].fuse == 6


def test_auto_on_cpu_and_gpu_and_unfusable_methods(tmp_path):
    from kdtune.tune.fused import CPU_AUTO_FUSE, resolve_fuse
    from kdtune.tune.plan import plan

    assert resolve_fuse("auto", "kd", 0.0, 100) == CPU_AUTO_FUSE == 4
    assert resolve_fuse("auto", "kd", 0.5, 100, gpu_gib=80.0) == 16  # 40 GiB / 2 GiB, capped at 16
    assert resolve_fuse("auto", "kd", 0.25, 100, gpu_gib=16.0) == 2
    assert resolve_fuse("auto", "kd", 1.0, 100, gpu_gib=1.0) == 1
    assert resolve_fuse("auto", "disk", 0.0, 100) == 1  # DiSK cannot be fused: auto trains it alone
    raw = _spec(tmp_path, fuse="auto")
    raw["methods"] = {"kd": {"trials": 6}, "disk": {"trials": 2}}
    by = {g.method: g for g in plan(load_spec(raw)).groups}
    assert (by["kd"].fuse, by["disk"].fuse) == (4, 1)


def test_validate_refuses_fuse_with_disk_and_a_searched_shared_field(tmp_path):
    from kdtune.tune.plan import plan

    raw = _spec(tmp_path, fuse=2)
    raw["methods"] = {"kd": {}, "disk": {"trials": 2}}
    with pytest.raises(ConfigError, match="budget.fuse=2 cannot fuse method disk: its guide"):
        plan(load_spec(raw))
    raw = _spec(tmp_path, fuse=2)
    raw["methods"] = {"kd": {"space": {"batch_size": [32, 64]}}}
    with pytest.raises(ConfigError, match="group resnet8-kd searches batch_size, which the members"):
        plan(load_spec(raw))
    raw["methods"] = {"kd": {"space": {"lr": [0.1, 0.01]}}}  # a fusable field: fine
    assert plan(load_spec(raw)).groups[0].fuse == 2


def test_cli_validate_one_line_and_exit_2(tmp_path):
    raw = _spec(tmp_path, fuse=3)
    raw["methods"] = {"disk": {"trials": 3}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "kdtune", "validate", str(path)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert "budget.fuse=3 cannot fuse method disk" in lines[0]
    raw["methods"] = {"kd": {"trials": 3}}
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "kdtune", "validate", str(path)], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "fused 3 per Tune trial (1 bundles)" in out.stdout


def test_rungs_and_ashas_rule_per_member(tmp_path):
    from kdtune.tune.fused import MemberPruner, rung_epochs

    assert rung_epochs(10, 1, 2) == [1, 2, 4, 8]
    assert rung_epochs(3, 1, 2) == [1, 2] and rung_epochs(6, 2, 3) == [2]
    assert rung_epochs(4, 4, 2) == []
    p = MemberPruner(tmp_path / "g" / "rungs.jsonl", [1, 2], 2.0, "max")
    assert not p.prune("a", 1, 50.0)  # the first at a rung has nothing to be compared with
    assert not p.prune("b", 1, 60.0)  # above the median of [50]
    assert p.prune("c", 1, 40.0)  # below the median of [50, 60]
    assert not p.prune("c", 3, 1.0)  # not a rung
    assert p.prune("c", 1, 40.0)  # asked again (a restarted bundle): the same decision, recorded once
    recs = [json.loads(ln) for ln in (tmp_path / "g" / "rungs.jsonl").read_text().splitlines()]
    assert [(r["member"], r["rung"]) for r in recs] == [("a", 1), ("b", 1), ("c", 1)]
    q = MemberPruner(tmp_path / "h" / "rungs.jsonl", [1], 2.0, "min")  # val_loss: lower is better
    assert not q.prune("a", 1, 1.0)
    assert q.prune("b", 1, 2.0) and not q.prune("c", 1, 0.5)


class _Space:
    def __call__(self, trial):
        trial.suggest_float("x", 0.0, 1.0)
        return {"const": 1}


def test_searcher_asks_k_members_per_bundle_and_tells_each_its_outcome(tmp_path):
    pytest.importorskip("ray")
    from ray.tune.search import Searcher

    from kdtune.tune.protocol import MEMBERS_KEY, report_rows
    from kdtune.tune.search import GROUP_KEY, GroupedOptunaSearch, GroupSearch

    s = GroupedOptunaSearch([GroupSearch("g", _Space(), 5, starts=[{"x": 0.5}], fuse=2)], "val_acc", "max",
                            epochs=3, seed=0)  # fmt: skip
    cfgs = [s.suggest(f"t{i}") for i in range(3)]
    assert s.suggest("t3") == Searcher.FINISHED  # 5 members: bundles of 2, 2 and 1
    # a unit of one member carries its config flat (its member id is the unit's own): kdtune.tune.protocol
    assert [len(c[MEMBERS_KEY]) if MEMBERS_KEY in c else 1 for c in cfgs] == [2, 2, 1]
    assert all(c[GROUP_KEY] == "g" for c in cfgs) and "x" in cfgs[2]
    m0 = cfgs[0][MEMBERS_KEY]
    assert [m["id"] for m in m0] == ["t0-m0", "t0-m1"] and m0[0]["config"] == {"x": 0.5, "const": 1}
    assert len(s.studies["g"].trials) == 5  # one Optuna trial per member

    def res(**members):
        return {"val_acc": 0.0, **report_rows({mid.replace("_", "-"): r for mid, r in members.items()})}

    # bundle t0: m1 pruned after epoch 1 (told at once), m0 completes
    s.on_trial_result("t0", res(t0_m0={"epoch": 1, "val_acc": 50.0, "outcome": "running"},
                                t0_m1={"epoch": 1, "val_acc": 20.0, "outcome": "pruned"}))  # fmt: skip
    by = {t.number: t for t in s.studies["g"].trials}
    assert by[m0[1]["number"]].state.name == "PRUNED" and by[m0[0]["number"]].state.name == "RUNNING"
    for ep in (2, 3):
        s.on_trial_result("t0", res(t0_m0={"epoch": ep, "val_acc": 50.0 + ep,
                                           "outcome": "completed" if ep == 3 else "running"},
                                    t0_m1={"epoch": 1, "val_acc": 20.0, "outcome": "pruned"}))  # fmt: skip
    s.on_trial_complete("t0", res(t0_m0={"epoch": 3, "val_acc": 53.0, "outcome": "completed"},
                                  t0_m1={"epoch": 1, "val_acc": 20.0, "outcome": "pruned"}))  # fmt: skip
    # bundle t1 errors: its members FAIL; t2's member diverged: FAIL
    s.on_trial_result("t1", res(t1_m0={"epoch": 1, "val_acc": 30.0, "outcome": "running"}))
    s.on_trial_complete("t1", None, error=True)
    s.on_trial_complete("t2", res(t2={"epoch": 2, "outcome": "diverged"}))
    by = {t.number: t for t in s.studies["g"].trials}
    done, pruned = by[m0[0]["number"]], by[m0[1]["number"]]
    assert done.state.name == "COMPLETE" and done.value == 53.0
    assert done.intermediate_values == {1: 50.0, 2: 52.0, 3: 53.0}
    assert pruned.intermediate_values == {1: 20.0}
    assert s.outcome_counts()["g"] == {"COMPLETE": 1, "PRUNED": 1, "FAIL": 3}
    assert not s.live and not s.units


# ---------------------------------------------------------------------------------------------- a real sweep


@pytest.fixture(scope="module")
def fused_sweep(tmp_path_factory):
    """``kdtune sweep`` (the CLI, a process of its own) of 4 KD trials fused 2 per Tune trial, one bundle at a
    time, ASHA per member (rungs 1, 2): the first bundle's members have lr 0.1, the second's 1e-6 (they cannot
    learn), so the second bundle's members are below the median the first recorded at rung 1, and pruned."""
    pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    from tests.faults.harness import env, train_teacher

    tmp = tmp_path_factory.mktemp("fuse")
    teacher = train_teacher(tmp / "teacher")
    spec = {
        "name": "fz", "data": "digits", "teacher": {"checkpoint": str(teacher)}, "students": ["resnet8"],
        "methods": {"kd": {"space": {"lr": [0.1, 0.000001]},
                           "starts": [{"T": 4, "lr": 0.1}, {"T": 2, "lr": 0.1}, {"T": 4, "lr": 0.000001},
                                      {"T": 2, "lr": 0.000001}]}},
        "budget": {"trials": 4, "epochs": 3, "concurrency": 1, "cpus_per_trial": 1, "fuse": 2},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "train": {"device": "cpu", "batch_size": 64}, "storage": str(tmp / "runs"),
        "tracking": {"enabled": True}, "seed": 0,
    }  # fmt: skip
    path = tmp / "fz.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "kdtune", "sweep", str(path)], capture_output=True, text=True,
                         env=env(), cwd=tmp, timeout=600)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return tmp / "runs" / "fz", out.stdout


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_fused_sweep_members_are_trials(fused_sweep):
    exp, stdout = fused_sweep
    state = json.loads((exp / "state.json").read_text())
    g = state["groups"]["resnet8-kd"]
    rows = g["all"]
    assert g["trials"] == 4 and len(rows) == 4 and g["errored"] == 0
    # the person waiting is told what the seconds before the first stage line are for
    assert stdout.splitlines()[0] == "starting Ray on this machine (MLflow opens beside it) ...", stdout[:500]
    ids = [t["trial_id"] for t in rows]
    bundles = sorted({t["bundle"] for t in rows})
    assert len(bundles) == 2 and all(t["trial_id"].startswith(t["bundle"] + "-m") for t in rows)
    # two Tune trials (scheduled units), four trial folders with their own records, two bundle folders
    snap = sorted((exp / "tune" / "sweep").glob("experiment_state-*.json"))[-1]
    assert len(json.loads(snap.read_text())["trial_data"]) == 2
    for t in ids:
        assert (exp / "trials" / t / "done.json").is_file() and (exp / "trials" / t / "ckpt" / "state.pt").is_file()
    for b in bundles:
        assert json.loads((exp / "trials" / b / "commit.json").read_text())["epoch"] >= 1
        # mode="auto" picked how the stacked student runs, the fastest of the exact candidates, and said so
        start = next(e for e in read_jsonl(exp / "trials" / b / "events.jsonl") if e["event"] == "start")
        assert set(start["mode_exact"]) == {"grouped", "loop", "loop_cl"} and start["exact"] is True
        assert start["mode_exact"][start["mode"]] is True and start["mode_exact"]["loop"] is True
        exact = {m for m, e in start["mode_exact"].items() if e}
        assert set(start["mode_ms"]) == (exact if len(exact) > 1 else set())
    # through the real path, a member that trained all its epochs ends with the weights of its lone run
    from kdtune.engine import Trainer
    from kdtune.engine.exactness import max_rel
    from kdtune.tune.plan import plan
    from kdtune.tune.trainable import TrialContext, trial_config

    done = next(t for t in rows if t["outcome"] == "completed")
    group = next(g for g in plan(load_spec(exp / "spec.yaml")).groups if g.name == "resnet8-kd")
    ctx = TrialContext(group=group.name, method="kd", base=group.base, experiment_dir=str(exp))
    lone = Trainer(trial_config(ctx, done["config"]))
    list(lone.run())
    final = torch.load(exp / "trials" / done["trial_id"] / "ckpt" / "final.pt", weights_only=True)["state_dict"]
    assert max_rel(final, lone.student.state_dict()) <= 1e-4
    assert "4 trials x 3 epochs" in stdout and "fused, 2 trials per Tune trial (2 bundles" in stdout
    assert stdout.count("resnet8-kd ") >= 4  # one progress line per member

    # one Optuna trial per member in optuna.db, PRUNED where pruned, with its own curve
    import optuna

    study = optuna.load_study(study_name="resnet8-kd", storage=f"sqlite:///{exp / 'optuna.db'}")
    by_id = {t.user_attrs["tune_trial_id"]: t for t in study.get_trials(deepcopy=False)}
    assert sorted(by_id) == sorted(ids)
    for t in rows:
        ot = by_id[t["trial_id"]]
        assert ot.state.name == {"completed": "COMPLETE", "pruned": "PRUNED"}[t["outcome"]]
        assert sorted(ot.intermediate_values) == list(range(1, t["epochs_run"] + 1))
        assert ot.user_attrs["bundle"] == t["bundle"]

    # one MLflow run per member, FINISHED, its outcome, one metric step per epoch it trained
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("fz").experiment_id
    runs = [r for r in client.search_runs([eid]) if r.data.tags.get("kdtune.role") == "trial"]
    assert sorted(r.data.tags["kdtune.trial_id"] for r in runs) == sorted(ids)
    for r in runs:
        t = next(x for x in rows if x["trial_id"] == r.data.tags["kdtune.trial_id"])
        assert r.info.status == "FINISHED" and r.data.tags["kdtune.outcome"] == t["outcome"]
        assert r.data.tags["kdtune.bundle"] == t["bundle"]
        assert r.data.tags["kdtune.bundle_mode"] in ("grouped", "loop", "loop_cl")
        # a member's params carry the names a lone trial's do (kd.T, train.lr), not the raw keys
        assert {"kd.T", "train.lr", "seed", "method"} <= set(r.data.params) and "T" not in r.data.params
        steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "val_acc"))
        assert steps == list(range(1, t["epochs_run"] + 1))


def test_pruned_members_stop_and_cost_no_more_epochs(fused_sweep):
    exp, _ = fused_sweep
    from kdtune.tune.record import read_events

    rows = json.loads((exp / "state.json").read_text())["groups"]["resnet8-kd"]["all"]
    first, second = sorted({t["bundle"] for t in rows}, key=lambda b: min(int(t["config"]["lr"] < 0.01)
                                                                          for t in rows if t["bundle"] == b))
    bad = [t for t in rows if t["bundle"] == second]
    assert all(t["config"]["lr"] < 0.01 for t in bad)
    assert all(t["outcome"] == "pruned" and t["epochs_run"] == 1 for t in bad), bad
    completed = [t for t in rows if t["outcome"] == "completed"]
    assert completed and all(t["epochs_run"] == 3 and t["bundle"] == first for t in completed)
    assert all(t["epochs_run"] < 3 for t in rows if t["outcome"] == "pruned")
    for t in rows:
        es = read_events(exp / "trials" / t["trial_id"])
        eps = [e["epoch"] for e in es if e["event"] == "epoch"]
        assert eps == list(range(1, t["epochs_run"] + 1)), (t["trial_id"], eps)  # each epoch once, none after
        assert [e["event"] for e in es][-2:] == ["stopped" if t["outcome"] == "pruned" else "done", "closed"]
    # the second bundle ended after its first epoch: both members dropped, nothing trained after
    commit = json.loads((exp / "trials" / second / "commit.json").read_text())
    assert commit["epoch"] == 1
    # ASHA's rule's record: each member once per rung it reached
    recs = [json.loads(ln) for ln in (exp / "fuse" / "resnet8-kd" / "rungs.jsonl").read_text().splitlines()]
    assert len({(r["member"], r["rung"]) for r in recs}) == len(recs)
    assert {r["member"] for r in recs if r["rung"] == 1} == {t["trial_id"] for t in rows}
