"""Teachers as a sweep dimension (``teachers:``): the spec, the plan, the refusals, and one digits sweep with a CE
and an MSE teacher stage (both resnet20) and KD + DKD students run through ``kdtune sweep`` and ``kdtune
report``: each teacher trained once, one Optuna study and one MLflow view per (teacher, student, method), the
teacher's name on every trial and stage run, and the report's CE | MSE comparison with Welch's test over seeds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdtune.errors import ConfigError
from kdtune.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def two_teachers(tmp_path, **over) -> dict:
    d = {
        "name": "teachers", "data": "digits",
        "teachers": [{"name": "ce", "model": "resnet20", "method": "ce", "train": {"epochs": 2}},
                     {"name": "mse", "model": "resnet20", "method": "mse", "train": {"epochs": 2}}],
        "students": ["resnet8"], "methods": ["kd", "dkd"],
        "budget": {"trials": 2, "epochs": 2, "concurrency": 2, "cpus_per_trial": 1, "repeats": 2},
        "scheduler": "none", "train": {"device": "cpu", "batch_size": 128},
        "storage": str(tmp_path / "runs"), "tracking": {"enabled": True}, "seed": 0,
    }  # fmt: skip
    d.update(over)
    return d


def kdtune_cli(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
           "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return subprocess.run([sys.executable, "-m", "kdtune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)  # fmt: skip


# ---------------------------------------------------------------------------------------------- spec and plan


def test_groups_are_teacher_student_method_and_one_teacher_is_unchanged(tmp_path):
    spec = load_spec(two_teachers(tmp_path, methods=["ce", "kd", "dkd"]))
    assert [g.name for g in spec.groups()] == ["resnet8-ce", "ce-resnet8-kd", "ce-resnet8-dkd", "mse-resnet8-kd",
                                               "mse-resnet8-dkd"]  # fmt: skip
    assert load_spec(spec.to_dict()).to_dict() == spec.to_dict()  # what the experiment saves reads back
    one = two_teachers(tmp_path, methods=["ce", "kd"])
    one["teacher"] = one.pop("teachers")[0] | {}
    one["teacher"].pop("name")
    single = load_spec(one)
    assert [g.name for g in single.groups()] == ["resnet8-ce", "resnet8-kd"]
    assert "teachers" not in single.to_dict() and "name" not in single.to_dict()["teacher"]


def test_plan_has_a_stage_per_teacher_and_each_group_reads_its_own(tmp_path):
    from kdtune.tune.plan import plan

    p = plan(load_spec(two_teachers(tmp_path)))
    assert set(p.stages) == {"teacher-ce", "teacher-mse"}
    ce, mse = p.stages["teacher-ce"], p.stages["teacher-mse"]
    assert ce.key != mse.key and ce.config["method"] == "ce" and mse.config["method"] == "mse"
    by = {g.name: g for g in p.groups}
    assert by["ce-resnet8-kd"].base["teacher"] == str(ce.model_path)
    assert by["mse-resnet8-dkd"].base["teacher"] == str(mse.model_path)
    assert by["mse-resnet8-dkd"].stages == ("teacher-mse",) and by["mse-resnet8-dkd"].teacher == "mse"
    assert any("resnet20 (mse) -> resnet8" in line for line in p.log_lines())


def test_hsakd_gets_the_heads_stage_of_each_teacher(tmp_path):
    from kdtune.tune.plan import plan

    p = plan(load_spec(two_teachers(tmp_path, methods=["hsakd"])))
    heads = {n: s for n, s in p.stages.items() if n.startswith("hsakd-heads")}
    assert set(heads) == {"hsakd-heads-ce", "hsakd-heads-mse"}
    for name in ("ce", "mse"):  # each heads stage is keyed by its own teacher's stage, and read by its groups
        assert heads[f"hsakd-heads-{name}"].key.startswith(p.stages[f"teacher-{name}"].key)
        g = next(g for g in p.groups if g.teacher == name)
        assert g.base["teacher"] == str(heads[f"hsakd-heads-{name}"].model_path)


def test_teacher_students_make_pairs(tmp_path):
    spec = load_spec(two_teachers(tmp_path, students=["resnet8", "resnet14"], methods=["kd"], teachers=[
        {"name": "ce_a", "model": "resnet20", "students": ["resnet8"]},
        {"name": "mse_a", "model": "resnet20", "method": "mse", "students": ["resnet8"]},
        {"name": "ce_b", "model": "resnet32", "students": "resnet14"}]))  # fmt: skip
    assert [g.name for g in spec.groups()] == ["ce_a-resnet8-kd", "mse_a-resnet8-kd", "ce_b-resnet14-kd"]


@pytest.mark.parametrize("change,words", [
    ({"teachers": [{"name": "ce", "model": "resnet20"}, {"name": "ce", "model": "resnet20", "method": "mse"}]},
     "two teachers are named 'ce'"),
    ({"teachers": [{"model": "resnet20"}]}, "teachers[0] needs a name"),
    ({"teachers": [{"name": "c-e", "model": "resnet20"}]}, "not a valid teacher name"),
    ({"teachers": []}, "teachers must be a non-empty list"),
    ({"teacher": {"model": "resnet20"}}, "both teacher and teachers"),
    ({"teachers": [{"name": "a", "model": "resnet20", "students": ["resnet99"]}]}, "not in students"),
    ({"teachers": [{"name": "a", "model": "resnet20", "methd": "ce"}]}, "teachers.a.methd: unknown field"),
])  # fmt: skip
def test_bad_teachers_are_refused_in_one_line(tmp_path, change, words):
    with pytest.raises(ConfigError) as e:
        load_spec(two_teachers(tmp_path, **change))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_same_teacher_twice_is_refused(tmp_path):
    from kdtune.tune.plan import plan

    twins = [{"name": "a", "model": "resnet20"}, {"name": "b", "model": "resnet20", "method": "ce"}]
    with pytest.raises(ConfigError, match="teachers.b trains the same teacher as teachers.a"):
        plan(load_spec(two_teachers(tmp_path, teachers=twins)))


def _write(tmp_path, d) -> Path:
    p = tmp_path / f"{d['name']}.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _refused(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and words in lines[0], r.stderr


def test_refusals_through_the_cli_exit_2_and_start_nothing(tmp_path):
    import torch

    from kdtune.models import create_model
    from kdtune.models.checkpoint import save_model

    wrong = tmp_path / "cifar-teacher.pt"  # a CIFAR-100 teacher: 100 classes, 3 channels; digits has 10 and 1
    save_model(wrong, create_model("resnet8", num_classes=100, in_channels=3), "resnet8", 100, 3, {})
    assert torch.load(wrong, weights_only=False)
    cases = {
        "dup": ({"teachers": [{"name": "ce", "model": "resnet20"}, {"name": "ce", "model": "resnet8"}]},
                "two teachers are named 'ce'"),
        "unfit": ({"teachers": [{"name": "ce", "model": "resnet20"}, {"name": "cifar", "checkpoint": str(wrong)}]},
                  "teachers.cifar checkpoint"),
        "url": ({"methods": ["hsakd"], "teachers": [{"name": "web", "model": "resnet20",
                                                     "checkpoint": "https://example.org/t.pt"}]},
                "methods.hsakd needs the rotation heads of teachers.web"),
    }  # fmt: skip
    for name, (change, words) in cases.items():
        spec = _write(tmp_path, two_teachers(tmp_path, name=name, **change))
        for cmd in ("validate", "sweep"):
            _refused(kdtune_cli(cmd, spec, cwd=tmp_path, timeout=120), words)
        assert not (tmp_path / "runs" / name).exists()


# ---------------------------------------------------------------------------------------------- the sweep


@pytest.fixture(scope="module")
def ce_mse_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ce-mse")
    spec = _write(tmp, two_teachers(tmp))
    r = kdtune_cli("sweep", spec, cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return tmp, spec, tmp / "runs" / "teachers", r.stdout + r.stderr


def test_each_teacher_is_trained_once_and_named_everywhere(ce_mse_sweep):
    import optuna
    from mlflow import MlflowClient

    tmp, spec, exp, out = ce_mse_sweep
    trained = re.findall(r"stage (teacher-\w+): training", out)
    assert sorted(trained) == ["teacher-ce", "teacher-mse"], out[-3000:]
    groups = ["ce-resnet8-kd", "ce-resnet8-dkd", "mse-resnet8-kd", "mse-resnet8-dkd"]
    studies = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{exp / 'optuna.db'}")}
    assert studies == set(groups)

    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("teachers").experiment_id
    runs = client.search_runs([eid], max_results=1000)
    trials = [r for r in runs if r.data.tags.get("kdtune.role") == "trial"]
    assert len(trials) == 4 * 2 + 4  # 2 trials per group, then each group's best again with seed 1
    for r in trials:
        name = r.data.params["teacher_name"]
        assert r.data.tags["kdtune.teacher_name"] == name and r.data.params["teacher"] == "resnet20"
        assert r.data.tags["kdtune.group"].startswith(f"{name}-resnet8-")
        agree = client.get_metric_history(r.info.run_id, "val_agree")
        assert [m.step for m in agree] == [1, 2] and all(0 <= m.value <= 100 for m in agree)
    stages = {r.data.tags["kdtune.stage"]: r for r in runs if r.data.tags.get("kdtune.role") == "stage"}
    assert set(stages) == {"teacher-ce", "teacher-mse"}
    for name in ("ce", "mse"):
        st = stages[f"teacher-{name}"]
        assert st.data.tags["kdtune.teacher_name"] == name and st.data.params["method"] == name
        assert {"test_acc", "test_nll", "test_ece", "test_entropy"} <= set(st.data.metrics)
    views = client.get_experiment(eid).tags
    assert all(any(g in v for v in views.values()) for g in groups)  # one saved view per group
    assert sum("params.`teacher_name`" in v or '"teacher_name"' in v for v in views.values()) >= len(groups) + 1

    again = kdtune_cli("sweep", spec, cwd=tmp)  # finished: prints its results, trains nothing
    assert again.returncode == 0 and "training" not in again.stdout, again.stdout[-2000:]


def test_the_report_compares_the_teachers_with_welch(ce_mse_sweep):
    tmp, _, exp, _ = ce_mse_sweep
    md = tmp / "report.md"
    r = kdtune_cli("report", exp, "--markdown", md, cwd=tmp, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "teacher comparison" in out and "Welch" in out
    rows = [ln for ln in out.splitlines() if re.match(r"^resnet20 -> resnet8\s+(kd|dkd)\s", ln)]
    assert len(rows) == 2, out
    for row in rows:  # two seeds per teacher: a mean ± std, a difference, an interval and a p-value each
        assert row.count("(n=2)") == 2, row
        p = row.split("]", 1)[1].split()[0]  # the column after the interval: Welch's p
        assert 0.0 <= float(p) <= 1.0, row
    assert re.search(r"^ce\s+resnet20\s+ce\s+\d", out, re.M) and re.search(r"^mse\s+resnet20\s+mse\s+\d", out, re.M)
    text = md.read_text()
    assert re.search(r"\|\s*teacher\s*\|\s*ce\s*\|\s*mse\s*\|", text), text  # the seed's shape: CE | MSE per pair
    assert re.search(r"^\|\s*kd\s*\|.*\*\*", text, re.M), text  # the better of the two cells in bold


def test_a_ce_mse_sweep_plans_on_the_seeds_synthetic_data(tmp_path):
    """``mse-gauss`` (the seed's Gaussians, ``kdtune reproduce mse-teacher``) is one of kdtune's data sets: a sweep
    of its CE and MSE (mean over classes) teachers plans and passes preflight like any other."""
    from kdtune.preflight import preflight
    from kdtune.tune.plan import plan

    spec = load_spec(two_teachers(tmp_path, data="mse-gauss", students=["toy_mlp128"], methods=["kd"], teachers=[
        {"name": "ce", "model": "toy_mlp128", "method": "ce"},
        {"name": "mse", "model": "toy_mlp128", "method": "mse", "hp": {"reduction": "mean"}}]))  # fmt: skip
    preflight(spec)
    p = plan(spec)
    assert [g.name for g in p.groups] == ["ce-toy_mlp128-kd", "mse-toy_mlp128-kd"]
    assert p.stages["teacher-mse"].config["hp"] == {"reduction": "mean"}


def test_a_result_finds_a_group_by_its_teacher():
    from kdtune.tune.results import SweepResult

    gs = [{"group": "resnet8-ce", "student": "resnet8", "method": "ce"},
          {"group": "ce-resnet8-kd", "teacher": "ce", "student": "resnet8", "method": "kd"},
          {"group": "mse-resnet8-kd", "teacher": "mse", "student": "resnet8", "method": "kd"}]  # fmt: skip
    r = SweepResult(name="x", experiment_dir="x", status="finished", metric="val_acc", mode="max", groups=gs)
    assert r.group("kd", teacher="mse")["group"] == "mse-resnet8-kd" and r.group("ce")["group"] == "resnet8-ce"
    with pytest.raises(KeyError, match="one group per teacher"):
        r.group("kd")
    assert "teacher" in r.table().splitlines()[0]


def test_a_group_without_a_teacher_logs_the_sweeps_teacher_or_none(tmp_path):
    """One ``teacher:``: the CE baseline logs the sweep's teacher (its report row stays in the pair, as before);
    several teachers: ``none``."""
    from kdtune.tune.driver import teacher_param
    from kdtune.tune.plan import plan

    one = two_teachers(tmp_path, methods=["ce", "kd"])
    one["teacher"] = {k: v for k, v in one.pop("teachers")[0].items() if k != "name"}
    p = plan(load_spec(one))
    assert {g.name: teacher_param(p, g) for g in p.groups} == {"resnet8-ce": "resnet20", "resnet8-kd": "resnet20"}
    p = plan(load_spec(two_teachers(tmp_path, methods=["ce", "kd"])))
    assert {g.name: teacher_param(p, g) for g in p.groups} == {"resnet8-ce": "none", "ce-resnet8-kd": "resnet20",
                                                               "mse-resnet8-kd": "resnet20"}  # fmt: skip


def test_an_mse_teacher_keeps_its_stage_key_and_resumes():
    """``mse``'s ``reduction`` (added 2026-12-05) at its default is no part of a run's identity: an MSE teacher
    stage keeps the key it had before (pinned), and a state saved before resumes."""
    from kdtune.config import TrainConfig
    from kdtune.engine.trainer import check_resume_config
    from kdtune.spec import stage_key

    cfg = TrainConfig.from_dict({"data": "cifar100", "model": "resnet32x4", "method": "mse", "epochs": 240, "seed": 0})
    assert cfg.hp["reduction"] == "sum" and stage_key(cfg) == "f01ac08ef14af95a"  # the key at 76931e3
    assert stage_key(cfg.replace(hp={"reduction": "mean"})) != stage_key(cfg)
    from kdtune.engine.trainer import STATE_FORMAT

    old = {**cfg.to_dict(), "hp": {"weight": 1.0}}  # a state.pt's config written before reduction existed
    check_resume_config(cfg, {"kdtune_state": STATE_FORMAT, "config": old})


def test_students_no_teacher_teaches_and_unused_warm_starts(tmp_path):
    from kdtune.tune.plan import plan

    only8 = [{"name": "a", "model": "resnet20", "students": ["resnet8"]},
             {"name": "b", "model": "resnet20", "method": "mse", "students": ["resnet8"]}]  # fmt: skip
    with pytest.raises(ConfigError, match="students lists resnet14, but no teacher teaches it"):
        load_spec(two_teachers(tmp_path, students=["resnet8", "resnet14"], methods=["disk"], teachers=only8))
    # with a method of no teacher, resnet14 keeps its CE group, and only resnet8 (taught, DiSK) gets a warm start
    p = plan(load_spec(two_teachers(tmp_path, students=["resnet8", "resnet14"], methods=["ce", "disk"],
                                    teachers=only8)))  # fmt: skip
    assert [g.name for g in p.groups] == ["resnet8-ce", "a-resnet8-disk", "b-resnet8-disk", "resnet14-ce"]
    assert sorted(n for n in p.stages if n.startswith("ce-")) == ["ce-resnet8"]
    with pytest.raises(ConfigError, match=r"teachers.1: unknown field|teachers\.1\."):
        load_spec(two_teachers(tmp_path, teachers=[{"name": 1, "model": "resnet20", "bogus": 1}]))
