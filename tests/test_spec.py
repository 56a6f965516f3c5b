"""Sweep specs: the shipped examples load, bad specs are refused before Ray starts naming the field, stage
keys hash what defines a stage, changed specs are diffed, and the experiment lock works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdtune.errors import ConfigError
from kdtune.spec import diff_specs, load_spec, stage_key

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))

BASE = {
    "name": "t",
    "data": "digits",
    "teacher": {"model": "resnet8x4", "train": {"epochs": 2}},
    "students": ["resnet8"],
    "methods": ["ce", "kd"],
    "budget": {"trials": 2, "epochs": 3},
}


def spec_with(tmp_path, **changes) -> dict:
    d = yaml.safe_load(yaml.safe_dump(BASE))
    d["storage"] = str(tmp_path / "runs")
    for k, v in changes.items():
        node = d
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        if v is _DROP:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = v
    return d


_DROP = object()


def test_shipped_specs_exist_and_load():
    names = {p.name for p in SPECS}
    assert "digits.yaml" in names
    assert {"cifar100-r32x4-r8x4.yaml", "cifar100-wrn40_2-wrn16_2.yaml", "cifar100-vgg13-vgg8.yaml",
            "cifar100-r56-r20.yaml"} <= names  # fmt: skip
    for p in SPECS:
        spec = load_spec(p)
        assert spec.name and spec.groups()
        # what an experiment saves reads back to the same spec
        assert load_spec(spec.to_dict()).to_dict() == spec.to_dict()


def test_digits_demo_spec_fits_the_readme_budget():
    spec = load_spec(ROOT / "sweeps" / "digits.yaml")
    assert spec.data == "digits" and len(spec.methods) >= 4
    assert spec.tracking.enabled and spec.tracking.uri is None  # the embedded SQLite default
    trials = sum(1 if m.name == "ce" else (m.trials or spec.budget.trials) for m in spec.methods)
    # ~1 s per digits epoch on a core, two at a time: the trials' epochs must fit well inside 5 minutes
    assert trials * spec.budget.epochs / spec.budget.concurrency <= 120


def test_defaults_and_resolution(tmp_path):
    spec = load_spec(spec_with(tmp_path))
    assert spec.metric == "val_acc" and spec.mode == "max"
    assert spec.scheduler.name == "asha" and spec.scheduler.grace_period >= 1
    assert Path(spec.storage).is_absolute()
    assert [g.name for g in spec.groups()] == ["resnet8-ce", "resnet8-kd"]
    assert spec.needs_teacher and not spec.needs_ce_student
    base = spec.trial_base("resnet8", "kd")
    assert base["epochs"] == 3 and base["model"] == "resnet8" and base["method"] == "kd"
    assert load_spec(spec_with(tmp_path, metric="val_loss")).mode == "min"


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"methods": ["kd", "fancykd"]}, "methods.fancykd"),
        ({"students": ["resnet9000"]}, "students[0]"),
        ({"budget.trials": 0}, "budget.trials"),
        ({"budget.trials": 2.5}, "budget.trials"),
        ({"budget.epochs": 0}, "budget.epochs"),
        ({"budget.epochs": 10**6}, "budget.epochs"),
        ({"budget.concurrency": 0}, "budget.concurrency"),
        ({"budget.gpus_per_trial": -1}, "budget.gpus_per_trial"),
        ({"budget.trails": 3}, "budget.trails"),
        ({"scheduler": "pbt"}, "scheduler.name"),
        ({"scheduler": {"name": "asha", "grace_period": 99}}, "scheduler.grace_period"),
        ({"scheduler": {"name": "asha", "reduction_factor": 1}}, "scheduler.reduction_factor"),
        ({"metric": "test_acc"}, "metric=test_acc"),
        ({"metric": "val_accuracy"}, "metric="),
        ({"mode": "up"}, "mode="),
        ({"data": "mnist"}, "data"),
        ({"teacher": _DROP}, "teacher"),
        ({"teacher": {"checkpoint": "/no/such/teacher.pt"}}, "teacher.checkpoint"),
        ({"teacher.method": "kd"}, "teacher.method"),
        ({"teacher.model": "resnet_huge"}, "teacher.model"),
        ({"train": {"lr": -1}}, "lr"),
        ({"train": {"epochs": 5}}, "train.epochs"),
        ({"train": {"learning_rate": 0.1}}, "train.learning_rate"),
        ({"methods": {"kd": {"space": {"T": {"low": 0, "high": 4}}}}}, "kd.T"),
        ({"methods": {"kd": {"space": {"tau": [1, 2]}}}}, "methods.kd.space.tau"),
        ({"methods": {"kd": {"space": {"T": {"low": 4, "high": 2}}}}}, "methods.kd.space.T"),
        ({"methods": {"kd": {"trials": 0}}}, "methods.kd.trials"),
        ({"methods": {"kd": {"starts": "yes"}}}, "methods.kd.starts"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"name": "bad/name"}, "name="),
        ({"tracking": {"uri": 5}}, "tracking.uri"),
        ({"failures": {"on_resume": "retry"}}, "failures.on_resume"),
        ({"sheduler": "asha"}, "sheduler"),
    ],
)
def test_bad_specs_name_the_field(tmp_path, changes, field):
    with pytest.raises(ConfigError) as e:
        load_spec(spec_with(tmp_path, **changes))
    msg = str(e.value)
    assert field in msg, msg
    assert "\n" not in msg


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmethods: [kd,\n  budget: {")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_spec(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_spec(p)
    p.write_text("")  # an empty file is an empty spec: the first field it lacks is named
    with pytest.raises(ConfigError, match="students must be a non-empty list"):
        load_spec(p)


def test_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'dkd'"):
        load_spec(spec_with(tmp_path, methods=["dkdd"]))
    with pytest.raises(ConfigError, match="did you mean 'budget'"):
        load_spec({**spec_with(tmp_path), "budgett": {}})


def test_space_overrides_parse(tmp_path):
    spec = load_spec(spec_with(tmp_path, methods={"kd": {"space": {
        "T": 4, "w_kd": [0.5, 1, 2], "w_ce": {"low": 0.1, "high": 0.5}, "lr": {"low": 0.01, "high": 0.1, "log": True},
    }}}))  # fmt: skip
    sp = spec.method("kd").space
    assert sp["T"].kind == "fixed" and sp["T"].value == 4.0 and isinstance(sp["T"].value, float)
    assert sp["w_kd"].kind == "choices" and sp["w_kd"].choices == (0.5, 1.0, 2.0)
    assert sp["w_ce"].kind == "range" and (sp["w_ce"].low, sp["w_ce"].high) == (0.1, 0.5)
    assert sp["lr"].log and not sp["lr"].integer


def test_checkpoint_teacher_and_relative_paths(tmp_path):
    ckpt = tmp_path / "t.pt"
    ckpt.write_bytes(b"x")
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    d = spec_with(tmp_path, teacher="../t.pt")
    p = spec_dir / "s.yaml"
    p.write_text(yaml.safe_dump(d))
    spec = load_spec(p)
    assert spec.teacher.checkpoint == str(ckpt.resolve()) and not spec.teacher.is_stage
    assert load_spec(spec.to_dict()).teacher == spec.teacher


def test_stage_key_hashes_identity_only():
    from kdtune.config import TrainConfig

    a = TrainConfig.from_dict({"data": "digits", "model": "resnet8", "epochs": 3})
    assert stage_key(a) == stage_key(a.replace(out="/elsewhere", device="cpu", eval_batch_size=7))
    assert stage_key(a) != stage_key(a.replace(epochs=4))
    assert stage_key(a) != stage_key(a.replace(seed=1))
    assert len(stage_key(a)) == 16


def test_diff_specs_names_changed_fields(tmp_path):
    a = load_spec(spec_with(tmp_path)).to_dict()
    b = load_spec(spec_with(tmp_path, **{"budget.trials": 5, "methods": ["ce", "kd", "dkd"]})).to_dict()
    diff = diff_specs(a, b)
    assert "budget.trials" in diff and "methods.dkd.starts" in diff
    assert "data" not in diff
    assert diff_specs(a, a) == []


def test_lock_refuses_live_owner_and_takes_over_dead_one(tmp_path):
    import json

    from kdtune.tune.lock import SweepLock

    lock_file = tmp_path / "sweep.lock"
    # a live process on this host holds it
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        lock_file.write_text(json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": 0}))
        with pytest.raises(ConfigError, match=f"pid {live.pid}"):
            SweepLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()
    # the same process is gone now: the lock is stale and taken over
    with SweepLock(tmp_path) as lk:
        assert lk.took_over["pid"] == live.pid
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()
    # another host's lock is never taken over
    lock_file.write_text(json.dumps({"pid": 1, "host": "some-other-host", "started": 0}))
    with pytest.raises(ConfigError, match="some-other-host"):
        SweepLock(tmp_path).acquire()


def test_cli_refuses_bad_spec_before_ray(tmp_path):
    d = spec_with(tmp_path, **{"budget.trials": 0})
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    code = (
        "import sys; from kdtune.cli import main\n"
        f"rc = main(['sweep', {str(p)!r}])\n"
        "print('RAY_IMPORTED', 'ray' in sys.modules); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 2
    assert "RAY_IMPORTED False" in out.stdout
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdtune: error: budget.trials=0")


LAMBDA_SPACE = {"lambda_min": 10, "lambda_max": {"low": 0.5, "high": 5}}


def test_cli_refuses_a_space_whose_constraint_no_value_meets(tmp_path):
    """``methods.disk.space: {lambda_min: 10, lambda_max: {low: 0.5, high: 5}}``: no lambda_max in [0.5, 5]
    exceeds lambda_min = 10. ``kdtune validate`` (the real console entry) and ``kdtune sweep`` refuse it in one
    line naming both fields, exit 2, before Ray starts and before anything is written."""
    d = spec_with(tmp_path, methods={"disk": {"space": LAMBDA_SPACE}}, teacher={"model": "resnet8"})
    p = tmp_path / "lambda.yaml"
    p.write_text(yaml.safe_dump(d))
    out = subprocess.run([sys.executable, "-m", "kdtune", "validate", str(p)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(err) == 1, out.stderr
    assert err[0].startswith(
        "kdtune: error: methods.disk (resnet8 on digits): no lambda_max in [0.5, 5] "
        "(methods.disk.space.lambda_max) exceeds lambda_min = 10 (methods.disk.space.lambda_min)"
    )
    assert "lower lambda_min below 5 or raise lambda_max above 10" in err[0]
    code = (
        "import sys; from kdtune.cli import main\n"
        f"rc = main(['sweep', {str(p)!r}])\n"
        "ray = sys.modules.get('ray'); print('RAY_STARTED', bool(ray and ray.is_initialized())); sys.exit(rc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert out.returncode == 2 and "RAY_STARTED False" in out.stdout, out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and "lambda_max in [0.5, 5]" in err[0] and "lambda_min = 10" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_fixed_values_are_not_refused_against_defaults_the_space_searches(tmp_path):
    """A fixed hyperparameter is checked with the space, not beside the method's defaults: ``lambda_min: 60``
    is a DiSK space with lambda_max in {100, 1000} (the default lambda_max, 50, is not what a trial runs);
    fixed values that contradict each other are still refused, by the space."""
    from kdtune.tune.plan import plan

    spec = load_spec(spec_with(tmp_path, methods={"disk": {"space": {"lambda_min": 60}}}))
    (g,) = plan(spec).groups
    assert g.parameters["lambda_max"].choices == (100.0, 1000.0)
    spec = load_spec(spec_with(tmp_path, methods={"disk": {"space": {"lambda_min": 60, "lambda_max": 50}}}))
    with pytest.raises(ConfigError, match=r"no lambda_max = 50 \(methods.disk.space.lambda_max\) exceeds lambda_min "
                                          r"= 60"):  # fmt: skip
        plan(spec)


@pytest.mark.parametrize(
    "space, needle",
    [({"batch_size": {"low": 2.5, "high": 8}}, "batch_size=2.5 is not an integer"),
     ({"batch_size": [16, 32.5]}, "batch_size=32.5 is not an integer"),
     ({"batch_size": {"low": 16, "high": 64, "step": 2.5}}, "step=2.5 must be an integer"),
     ({"nesterov": "false"}, "nesterov='false' is not true or false")],
)  # fmt: skip
def test_space_values_are_taken_as_written_never_rounded(tmp_path, space, needle):
    """A training field's value is refused rather than rounded (2.5 is no batch size of 2) or reinterpreted ("false"
    is no True): a trial runs no value the user did not write."""
    with pytest.raises(ConfigError, match=needle):
        load_spec(spec_with(tmp_path, methods={"kd": {"space": space}}))


def test_the_resolved_spec_is_frozen_pickles_and_keeps_its_declared_bounds(tmp_path):
    """The objects kdtune reads are the declaration's frozen pydantic dataclasses: Ray ships them pickled, nothing
    may change them, and one built by hand is held to the same bounds as one loaded."""
    import dataclasses
    import pickle

    from kdtune.spec import Budget

    spec = load_spec(spec_with(tmp_path, methods={"kd": {"space": {"T": {"low": 1, "high": 8}}}}))
    assert pickle.loads(pickle.dumps(spec)) == spec
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.budget.trials = 3  # type: ignore[misc]
    assert dataclasses.replace(spec.budget, trials=5).trials == 5
    with pytest.raises(ValueError):  # pydantic's ValidationError
        dataclasses.replace(spec.budget, trials=0)
    assert Budget().trials == 8 and not hasattr(spec.method("kd").space["T"], "contains")


def test_null_is_the_declared_default_where_a_field_may_be_null(tmp_path):
    from kdtune.spec import default_grace_period

    spec = load_spec(spec_with(tmp_path, mode=None, scheduler={"grace_period": None}, metric="val_loss",
                               methods={"kd": {"trials": None}}, storage=None))  # fmt: skip
    assert spec.mode == "min" and spec.scheduler.grace_period == default_grace_period(3) == 1
    assert spec.method("kd").trials is None and spec.storage.endswith("runs/sweeps")
    with pytest.raises(ConfigError, match=r"^budget\.trials=None must be an integer$"):
        load_spec(spec_with(tmp_path, **{"budget.trials": None}))  # no null where the field has a value
