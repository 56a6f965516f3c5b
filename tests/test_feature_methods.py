"""The stateless feature methods of the teacher-training seed's table (AT, PKT, SP, CC, RKD, VID) and FitNet, end
to end: every one trains on the generated CIFAR-100 for the CRD pairs that exercise each connector kind, a sweep
of the seed's eleven methods (KD, DKD, those six, CRD, ReviewKD, HSAKD) and FitNet finishes through
`kdtune sweep` (one MLflow run per trial, each method's loss terms under their own names; HSAKD's heads stage
built once), and what cannot hold is refused in one line before anything trains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from kdtune.config import TrainConfig
from kdtune.data import load_data
from kdtune.engine import Trainer
from kdtune.errors import ConfigError
from kdtune.losses import METHODS
from kdtune.models import create_model
from kdtune.models.checkpoint import save_model
from tests.datagen import write_tiny_cifar100

FEATURE_METHODS = ("at", "pkt", "sp", "cc", "rkd", "vid", "fitnet")
SEED_PART2 = ("crd", "reviewkd", "hsakd")  # with KD, DKD and the seven above but FitNet: the seed's eleven
# each method's own loss terms, logged as loss_<term> beside loss_ce
OWN_TERMS = {"at": {"at"}, "sp": {"sp"}, "vid": {"vid"}, "fitnet": {"hint"}, "pkt": {"pkt"},
             "rkd": {"rkd_dist", "rkd_angle"}, "cc": {"cc"}}
# the pairs of the issue: same family, VGG, a ShuffleNet student (transposed FitNet regressor, pooled AT maps),
# a ResNet50 teacher of a MobileNetV2 student (four stages against four, every map pooled)
PAIRS = [("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8"), ("resnet32x4", "shufflev1"), ("resnet50", "mobilenetv2")]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_tiny_cifar100(root, n_train=64, n_test=32)
    return root, load_data("cifar100", root=root, val_fraction=0.0)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    out = {}
    d = tmp_path_factory.mktemp("teachers")
    for t, _ in PAIRS:
        torch.manual_seed(0)
        path = d / f"{t}.pt"
        save_model(path, create_model(t, 100, 3), t, 100, 3, {})
        out[t] = str(path)
    return out


def test_the_seven_are_registered_with_spaces_and_published_starts():
    from kdtune.tune.spaces import load_source

    for m in FEATURE_METHODS:
        cls = METHODS.get(m)
        assert cls.needs_teacher and cls.summary
        assert load_source(m)  # a space file each
    stage = {m for m in FEATURE_METHODS if METHODS.get(m).needs_student_stages}
    assert stage == {"at", "sp", "vid", "fitnet"}
    assert all(METHODS.get(m).unfusable for m in stage)  # refused by bundles, saying why
    assert not any(METHODS.get(m).unfusable for m in ("pkt", "cc", "rkd"))  # the pooled vector fuses


@pytest.mark.parametrize("teacher_arch,student", PAIRS, ids=[f"{t}-{s}" for t, s in PAIRS])
def test_each_method_trains_on_generated_cifar100(teacher_arch, student, cifar, teachers):
    _, data = cifar
    for method in FEATURE_METHODS:
        cfg = TrainConfig.from_dict(dict(data="cifar100", model=student, teacher=teachers[teacher_arch], method=method,
                                         epochs=1, batch_size=32, eval_batch_size=32, device="cpu", val_fraction=0.0,
                                         lr=0.01))  # fmt: skip
        t = Trainer(cfg, data=data, teacher_info={"arch": teacher_arch, "test_acc": 1.0})
        h = list(t.run())[-1]
        terms = {k for k in h if k.startswith("loss_")}
        assert "loss_ce" in terms and len(terms) >= 2, (method, terms)
        assert all(torch.isfinite(torch.tensor(h[k])) for k in terms), (method, h)


def test_refused_in_one_line_before_anything_trains(tmp_path, cifar, teachers):
    # a stage method with a model that has no stages (torchvision's)
    _, data = cifar
    with pytest.raises(ConfigError) as e:
        Trainer(TrainConfig.from_dict(dict(data="cifar100", model="tv_resnet18", teacher=teachers["vgg13"],
                                           method="at", epochs=1, device="cpu", val_fraction=0.0)),
                data=data, teacher_info={"arch": "vgg13", "test_acc": 1.0})  # fmt: skip
    assert "exposes no stage features" in str(e.value) and "\n" not in str(e.value)
    # `kdtune validate` refuses the same before any trial: a stage method for a student without stages
    spec = {"name": "bad", "data": "disk-intervals", "teacher": {"model": "toy_interval_teacher",
            "train": {"epochs": 1}}, "students": ["toy_interval_student"], "methods": ["at"],
            "budget": {"trials": 1, "epochs": 1}, "storage": str(tmp_path / "runs")}  # fmt: skip
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "kdtune", "validate", str(path)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "exposes no stage features" in out.stderr


@pytest.fixture(scope="module")
def feature_sweep(tmp_path_factory):
    pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    from tests.faults.harness import env

    tmp = tmp_path_factory.mktemp("feature-sweep")
    methods = ["kd", "dkd", *FEATURE_METHODS, *SEED_PART2]
    spec = {
        "name": "feat", "data": "digits", "teacher": {"model": "resnet20", "train": {"epochs": 1}},
        "students": ["resnet8"],
        # digits' 1,295 training images: fewer negatives than CRD's published 16384 (refused in one line otherwise)
        "methods": {m: {"trials": 1, **({"space": {"nce_k": 512}} if m == "crd" else {})} for m in methods},
        "budget": {"trials": 1, "epochs": 1, "concurrency": 2, "cpus_per_trial": 1},
        "scheduler": "none", "train": {"device": "cpu", "batch_size": 64},
        "storage": str(tmp / "runs"), "tracking": {"enabled": True}, "seed": 0,
    }  # fmt: skip
    path = tmp / "feat.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = subprocess.run([sys.executable, "-m", "kdtune", "sweep", str(path)], capture_output=True, text=True,
                         env=env(), cwd=tmp, timeout=900)  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return tmp / "runs" / "feat", methods


def test_a_sweep_of_the_seeds_eleven_methods_and_fitnet_through_kdtune_sweep(feature_sweep):
    from mlflow import MlflowClient

    exp, methods = feature_sweep
    state = json.loads((exp / "state.json").read_text())
    assert state["status"] == "finished"
    groups = {g: s for g, s in state["groups"].items()}
    assert set(groups) == {f"resnet8-{m}" for m in methods}
    assert all(s["completed"] == 1 and s["errored"] == 0 for s in groups.values())
    assert "hsakd-heads" in state["stages"]  # HSAKD's teacher: the teacher stage with its heads, built by the sweep
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("feat").experiment_id
    runs = [r for r in client.search_runs([eid]) if r.data.tags.get("kdtune.role") == "trial"]
    assert sorted(r.data.params["method"] for r in runs) == sorted(methods)  # one run per trial
    for r in runs:
        m = r.data.params["method"]
        terms = {k[len("loss_"):] for k in r.data.metrics if k.startswith("loss_")}
        assert "ce" in terms and any(t != "ce" for t in terms), (m, terms)
        assert OWN_TERMS.get(m, set()) <= terms, (m, terms)
