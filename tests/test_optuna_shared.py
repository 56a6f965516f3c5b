"""``tracking.optuna``: the Optuna mirror in a database shared by experiments (on a cluster, the PostgreSQL of
the MLflow server; here a SQLite file outside both experiments): each experiment's studies are named
``<experiment>/<group>``, and ``kdtune report`` and ``kdtune dashboard`` read that database."""

from __future__ import annotations

import optuna

import kdtune
from kdtune.dashboard import plan
from kdtune.report.plots import mirror_studies
from kdtune.tune.experiment import optuna_storage, saved_optuna_storage


def test_two_sweeps_mirror_into_one_shared_database(tmp_path):
    shared = f"sqlite:///{tmp_path / 'shared-optuna.db'}"
    for name, seed in (("toy-a", 1), ("toy-b", 2)):
        kdtune.sweep({"name": name, "data": "disk-gaussians",
                      "teacher": {"model": "toy_mlp_teacher", "train": {"epochs": 2}},
                      "students": ["toy_mlp_student"], "methods": {"kd": {"trials": 2}},
                      "budget": {"trials": 2, "epochs": 2, "concurrency": 2}, "scheduler": "none",
                      "train": {"device": "cpu", "batch_size": 200}, "storage": str(tmp_path / "runs"),
                      "tracking": {"enabled": True, "optuna": shared}, "seed": seed}, log=lambda s: None)  # fmt: skip
    names = sorted(optuna.get_all_study_names(shared))
    assert names == ["toy-a/toy_mlp_student-kd", "toy-b/toy_mlp_student-kd"], names
    for exp in ("toy-a", "toy-b"):
        exp_dir = tmp_path / "runs" / exp
        assert not (exp_dir / "optuna.db").exists()
        assert saved_optuna_storage(exp_dir) == (shared, f"{exp}/")
        (study,) = mirror_studies(*saved_optuna_storage(exp_dir))  # the report's studies: its own alone
        assert study.study_name == f"{exp}/toy_mlp_student-kd" and len(study.trials) == 2
        assert [sorted(t.intermediate_values) for t in study.trials] == [[1, 2], [1, 2]]
        (dash,) = [cmd for what, cmd, _ in plan(exp_dir, f"sqlite:///{exp_dir / 'mlflow.db'}", None, None)
                   if what == "Optuna dashboard"]  # fmt: skip
        assert shared in dash
    assert optuna_storage(tmp_path / "runs" / "toy-a") == (
        f"sqlite:///{(tmp_path / 'runs' / 'toy-a').absolute() / 'optuna.db'}", "")  # fmt: skip


def test_tracking_fields_are_read_and_bad_values_refused_in_one_line():
    import pytest

    from kdtune.errors import ConfigError
    from kdtune.spec import load_spec

    base = {"name": "x", "data": "digits", "teacher": {"model": "resnet8x4"}, "students": ["resnet8"], "methods": ["kd"]}
    t = load_spec({**base, "tracking": {"models": "all", "optuna": "postgresql://kdtune@db/kdtune"}}).tracking
    assert (t.models, t.optuna) == ("all", "postgresql://kdtune@db/kdtune")
    assert (load_spec(base).tracking.models, load_spec(base).tracking.optuna) == ("best", None)
    with pytest.raises(ConfigError, match=r"tracking\.models='some': input should be 'best' or 'all'"):
        load_spec({**base, "tracking": {"models": "some"}})
    with pytest.raises(ConfigError, match=r"tracking\.optuna=3 must be a string"):
        load_spec({**base, "tracking": {"optuna": 3}})


def test_an_optuna_storage_that_cannot_be_opened_is_refused_before_ray(tmp_path):
    """A shared database Optuna cannot use (here MLflow's own store: both keep a table ``alembic_version``) is
    refused in one line by ``kdtune sweep`` before anything runs."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    mlflow_db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(mlflow_db).search_experiments()  # the store made, with its schema
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""name: refused
data: disk-gaussians
teacher: {{model: toy_mlp_teacher, train: {{epochs: 1}}}}
students: [toy_mlp_student]
methods: [kd]
budget: {{trials: 1, epochs: 1}}
tracking: {{optuna: "{mlflow_db}"}}
storage: {tmp_path / "runs"}
""")
    r = subprocess.run([sys.executable, "-m", "kdtune", "sweep", str(spec)], capture_output=True, text=True, timeout=120)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "tracking.optuna=" in err[0] and "not MLflow's" in err[0], err
    assert not (tmp_path / "runs" / "refused" / "trials").exists()
