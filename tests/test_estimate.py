"""The GPU-hour estimate of ``kdtune validate`` (kdtune/tune/estimate.py): its arithmetic against hand
computations, the measured step-times path, the successive-halving budget, the FLOP table, and the CLI on the
264-group CIFAR-100 teacher-training sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdtune.errors import ConfigError
from kdtune.spec import load_spec
from kdtune.tune import estimate as E
from kdtune.tune.plan import plan

ROOT = Path(__file__).resolve().parents[1]
# Hand-made FLOPs per image (not counted: the arithmetic is the test) for the digits plan below.
A, B, C, D = 3.0e7, 1.0e7, 4.0e7, 4.4e7  # teacher stage (ce), CE student group, KD, DKD
TABLE = {"entries": {
    "resnet20@8/10c/1ch": {"teacher": None, "model": "resnet20", "teacher_forward": 0.0, "model_train": A,
                           "step": {"ce": A}},
    "resnet8@8/10c/1ch": {"teacher": None, "model": "resnet8", "teacher_forward": 0.0, "model_train": B,
                          "step": {"ce": B}},
    "resnet20->resnet8@8/10c/1ch": {"teacher": "resnet20", "model": "resnet8", "teacher_forward": 2.0e7,
                                    "model_train": B, "step": {"kd": C, "dkd": D}},
}}  # fmt: skip


def digits_plan(tmp_path, methods=("ce", "kd", "dkd")):
    spec = {"name": "est", "data": "digits", "val_fraction": 0.1,
            "teacher": {"model": "resnet20", "method": "ce", "train": {"epochs": 10}},
            "students": ["resnet8"], "methods": list(methods),
            "budget": {"trials": 3, "epochs": 6, "repeats": 2},
            "scheduler": {"name": "asha", "grace_period": 2, "reduction_factor": 2},
            "train": {"batch_size": 64, "device": "cpu"}, "storage": str(tmp_path / "runs")}  # fmt: skip
    return plan(load_spec(spec))


def test_successive_halving_budget_by_hand():
    assert E.asha_epochs(8, 240, 60, 2) == 8 * 60 + 4 * 60 + 2 * 120 == 960  # rungs 60, 120
    assert E.asha_epochs(5, 240, 60, 2) == 5 * 60 + 2 * 60 + 1 * 120  # floor(5/4) = 1
    assert E.asha_epochs(3, 6, 2, 2) == 3 * 2 + 1 * 2 + 1 * 2  # at least one trial to the end
    assert E.asha_epochs(9, 90, 10, 3) == 9 * 10 + 3 * 20 + 1 * 60  # rungs 10, 30
    assert E.asha_epochs(1, 240, 60, 2) == 240  # one run is never stopped
    assert E.asha_epochs(4, 6, 6, 2) == 4 * 6  # grace = epochs: no rung


def test_estimate_arithmetic_on_a_digits_plan(tmp_path):
    p = digits_plan(tmp_path)
    assert [(g.name, g.budget) for g in p.groups] == [
        ("resnet8-ce", 1),
        ("resnet8-kd", 3),
        ("resnet8-dkd", 3),
    ]
    est = E.estimate(p, peak_flops=1e12, share=0.5, flops=E.Flops(table=TABLE))
    n = round(1437 * 0.9)  # digits' training images less the validation tenth
    rate = 0.5 * 1e12
    # teacher stage 10 epochs; ce: 1 trial + 1 repeat; kd, dkd: 3 trials + 1 repeat, 6 epochs each
    upper = n / rate * (10 * A + (1 + 1) * 6 * B + (3 + 1) * 6 * (C + D))
    # ASHA, grace 2, factor 2 (rungs 2, 4): 3 trials -> 3*2 + 1*2 + 1*2 = 10 epochs; one run: 6; repeats: 6 more
    expected = n / rate * (10 * A + (6 + 6) * B + (10 + 6) * (C + D))
    assert est.upper_s == pytest.approx(upper) and est.expected_s == pytest.approx(expected)
    assert (est.groups, est.trials, est.live) == (3, 7, 0)
    head, source = est.lines()
    assert "3 groups, 7 trials" in head and "upper bound (every trial to 6 epochs)" in head
    assert "expected with ASHA (grace 2, factor 2" in head
    assert "50% of H100 bf16 dense peak (1 TFLOP/s)" in source and "assumed" in source


def test_step_times_path_uses_the_measured_images_per_second(tmp_path):
    p = digits_plan(tmp_path)
    rows = [{"teacher": "resnet20", "student": "resnet8", "batch": 64, "device": "NVIDIA H100 80GB HBM3",
             "flops_per_image": C, "kdtune": [1000.0, 1200.0, 1100.0], "method:dkd": [400.0, 500.0, 600.0],
             "peak_flops": None}]  # fmt: skip
    f = tmp_path / "bench.json"
    f.write_text(json.dumps(rows))
    measured = E.load_step_times(str(f))
    est = E.estimate(p, step_times=measured, source=str(f), flops=E.Flops(table=TABLE))
    n = round(1437 * 0.9)
    kd_rate = 1100 * C  # KD's median images/s times its FLOPs per image: FLOP/s
    # the measured pair and methods take their own images/s; the stages scale KD's throughput by their FLOPs
    upper = n * (10 * A / kd_rate + 2 * 6 * B / kd_rate + 4 * 6 / 1100 + 4 * 6 / 500)
    assert est.upper_s == pytest.approx(upper)
    assert "measured on NVIDIA H100 80GB HBM3" in est.source and str(f) in est.source
    assert est.device == "GPU" and "2 GPU-minutes upper bound" in est.lines()[0]  # 103 s


@pytest.mark.parametrize("content,what", [
    (None, "no such file"), ("{not json", "not a kdtune bench --json file"),
    (json.dumps([{"method": "kd", "epochs": 1, "max_rel": 0.0}]), "no measured images/s"),
])  # fmt: skip
def test_step_times_that_are_no_bench_output_are_refused(tmp_path, content, what):
    f = tmp_path / "s.json"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ConfigError, match=what):
        E.load_step_times(str(f))


def test_flop_table_lookup():
    table = E.load_table()
    e = table["entries"]["resnet56->resnet20@32/100c/3ch"]
    assert e["step"]["kd"] == pytest.approx(e["teacher_forward"] + e["model_train"], rel=1e-6)
    assert 1.0 < e["step"]["crd"] / e["step"]["kd"] < 1.3 and e["step"]["hsakd"] / e["step"]["kd"] > 4
    flops = E.Flops(table=table)
    assert flops.of("resnet56", "resnet20", "kd", "cifar100") == e["step"]["kd"] and not flops.live
    # a pair the table lacks: teacher forward + model forward/backward counted live, times the method's ratio
    small = E.Flops(table={"entries": {}})
    t, m = E.count_models("resnet8", "resnet8", "digits")
    assert small.of("resnet8", "resnet8", "crd", "digits") == pytest.approx(
        (t + m) * E.CPU_STEP_RATIOS["crd"]
    )
    assert small.live == {"resnet8->resnet8@8/10c/1ch crd"}
    # a fixed structural hyperparameter is a key of its own
    spec = load_spec({"name": "k", "data": "digits", "teacher": {"model": "resnet20"}, "students": ["resnet8"],
                      "methods": {"crd": {"space": {"nce_k": 256, "beta": 0.8}}}})  # fmt: skip
    assert E.method_key(spec, "crd") == ("crd[nce_k=256]", {"nce_k": 256})


def test_the_table_covers_the_cifar100_teacher_sweep():
    p = plan(load_spec(ROOT / "sweeps" / "mse-teacher-cifar100.yaml"))
    flops = E.Flops()
    for w in E.plan_work(p):
        flops.of(w.teacher, w.model, E.method_key(p.spec, w.method)[0], "cifar100")
    assert not flops.live, sorted(flops.live)
    t0 = time.perf_counter()
    est = E.estimate(p, peak_flops=989e12, flops=flops)  # from the table alone: no counting
    assert time.perf_counter() - t0 < 2 and est.live == 0 and est.expected_s < est.upper_s


def test_validate_prints_264_groups_and_an_estimate():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kdtune", "validate", "sweeps/mse-teacher-cifar100.yaml"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    took = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    est = [ln for ln in lines if "estimate:" in ln]
    assert len(est) == 1 and "264 groups, 432 trials" in est[0] and "GPU-hours upper bound" in est[0], est
    assert "expected with ASHA (grace 60, factor 2" in est[0]
    assert any("assumed: no GPU step times measured yet" in ln for ln in lines)
    assert sum(ln.startswith(("  ce_", "  mse_")) for ln in lines) == 264
    # ~38 s on a 2-core CPU, 33 of them kdtune.preflight's method checks (a model built per group); the planning
    # and the estimate about 5 s (the estimate itself 0.03 s)
    assert took < 30, took  # 9 s on a quiet 2-core machine (preflight checks each architecture pair once)
    print(f"kdtune validate sweeps/mse-teacher-cifar100.yaml: {took:.1f} s")
