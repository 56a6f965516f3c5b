"""kdtune report on a fabricated sweep of two teachers (CE- and MSE-trained resnet20) in a real MLflow store:
the table's rows per teacher, the comparison (Welch's t-test against scipy and a hand value), the Markdown in
the layout of Hamidi et al. (ECCV 2024) Table 1, the teachers' own diagnostics, the CSV, and a sweep of one
teacher without any of it."""

from __future__ import annotations

import csv
import statistics

import pytest

pytest.importorskip("mlflow")
stats = pytest.importorskip("scipy.stats")

from kdtune.report import main_report  # noqa: E402
from kdtune.report.compare import (  # noqa: E402
    NA_SEEDS,
    TeacherComparison,
    comparison,
    fmt_diff,
    teacher_info,
    teacher_order,
    welch,
)
from kdtune.report.table import Trial, best_rows  # noqa: E402
from kdtune.tracking import SweepTracker, default_tracking_uri  # noqa: E402
from tests.report_cli import report_args  # noqa: E402

EXP = "teachers"
SPEC = {
    "name": EXP,
    "data": "cifar100",
    "teachers": [
        {"name": "ce", "model": "resnet20", "method": "ce"},
        {"name": "mse", "model": "resnet20", "method": "mse"},
    ],
    "students": ["resnet8"],
    "methods": {"kd": {}, "dkd": {}},
    "budget": {"trials": 2, "epochs": 3, "repeats": 3},
    "metric": "val_acc",
    "mode": "max",
}
# Test accuracy per seed of each (teacher, method)'s best configuration (val_acc = test_acc - 1 ranks it).
BEST = {
    ("ce", "kd"): [70.0, 71.0, 72.0],  # mean 71, sd 1
    ("mse", "kd"): [72.0, 73.0, 74.0],  # mean 73, sd 1: Δ = +2, se² = 2/3, ν = 4 (the hand case)
    ("ce", "dkd"): [74.0, 74.5, 75.5],
    ("mse", "dkd"): [73.0, 73.2, 73.1],  # unequal spreads: ν from Welch–Satterthwaite
}
# The last epoch's agreement with the teacher (%) and KL(teacher‖student) per seed; DKD's runs log neither.
FIT = {"ce": ([90.0, 91.0, 92.0], [0.30, 0.31, 0.32]), "mse": ([94.0, 95.0, 96.0], [0.20, 0.21, 0.22])}
# The teachers' stage runs: the MSE teacher logs no ECE (shown "-").
STAGES = {
    "ce": {"test_acc": 70.5, "val_acc": 70.0, "test_nll": 1.1, "test_ece": 0.08, "test_entropy": 0.45},
    "mse": {"test_acc": 71.2, "val_acc": 71.0, "test_nll": 1.3, "test_entropy": 0.9},
}
HPS = {"kd": ("kd.T", "4", "2"), "dkd": ("dkd.beta", "8", "1")}  # (name, best value, a worse value)


def _trial(client, exp_id, parent, i, params, tags, history):
    """A trial run as the sweep logs one: role trial, params, per-epoch metrics (step = epoch)."""
    from mlflow.entities import Metric, Param

    run = client.create_run(exp_id, run_name=f"t_{i:05d}",
                            tags={"kdtune.role": "trial", "kdtune.trial_id": f"t_{i:05d}",
                                  "mlflow.parentRunId": parent, **tags})  # fmt: skip
    metrics = [Metric(k, v, 1000 + epoch, epoch) for epoch, m in enumerate(history) for k, v in m.items()]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED")


def _history(test: float, agree: float | None, kl: float | None) -> list[dict]:
    """Three epochs ending at ``test`` (and ``agree``/``kl``): the report reads the last."""
    out = []
    for epoch in range(3):
        d = 2 - epoch
        m = {"val_acc": test - 1 - d, "test_acc": test - d}
        if agree is not None:
            m |= {"val_agree": agree - 5 * d, "val_kl_teacher": kl + 0.1 * d}
        out.append(m)
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    storage = tmp_path_factory.mktemp("teachers") / "runs"
    uri = default_tracking_uri(storage / EXP)
    st = SweepTracker(uri, EXP)
    parent = st.start_parent(SPEC, {}, {})
    for name, metrics in STAGES.items():
        run_id = st.log_stage(f"teacher-{name}", {"model": "resnet20", "method": name}, {**metrics, "epochs": 3})
        st.client.set_tag(run_id, "kdtune.teacher_name", name)
    exp_id, i = st.experiment_id, 0
    for (name, method), tests in BEST.items():
        key, best, worse = HPS[method]
        base = {"method": method, "student": "resnet8", "teacher": "resnet20", "teacher_name": name,
                "data": "cifar100", "train.lr": 0.05}  # fmt: skip
        tags = {"kdtune.group": f"{name}-resnet8-{method}", "kdtune.teacher_name": name}
        for seed, test in enumerate(tests):  # the best configuration, rerun with other seeds (budget.repeats)
            agree, kl = (FIT[name][0][seed], FIT[name][1][seed]) if method == "kd" else (None, None)
            _trial(st.client, exp_id, parent, i, {**base, key: best, "seed": seed}, tags, _history(test, agree, kl))
            i += 1
        # a worse configuration on validation, with a test accuracy that must never be chosen
        _trial(st.client, exp_id, parent, i, {**base, key: worse, "seed": 0}, tags,
               [{"val_acc": 50.0, "test_acc": 99.0}])  # fmt: skip
        i += 1
    # the student from scratch: no teacher, no teacher name, in no comparison
    _trial(st.client, exp_id, parent, i, {"method": "ce", "student": "resnet8", "teacher": "none",
                                          "data": "cifar100", "seed": 0}, {}, [{"val_acc": 60.0, "test_acc": 61.0}])  # fmt: skip
    st.end_parent("FINISHED")
    return storage, uri




def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _expected(a, b):
    """Welch's test and CI of mean(b) - mean(a) as scipy computes them, independently of kdtune."""
    res = stats.ttest_ind(b, a, equal_var=False)
    ci = res.confidence_interval(0.95)  # scipy's own Welch interval (Welch–Satterthwaite df)
    return statistics.fmean(b) - statistics.fmean(a), res.pvalue, ci.low, ci.high


def test_welch_against_scipy_and_by_hand():
    a, b = BEST[("ce", "kd")], BEST[("mse", "kd")]
    w = welch(a, b)
    # by hand: Δ = 2, se = sqrt(1/3 + 1/3), t = 2.4495 on ν = 4; p = 2(1 - F_4(t)), t_{0.975,4} = 2.7764
    assert w.diff == pytest.approx(2.0) and w.df == pytest.approx(4.0) and w.t == pytest.approx(2.44949, abs=1e-5)
    assert w.p == pytest.approx(0.07048, abs=5e-5)
    assert (w.ci_low, w.ci_high) == (pytest.approx(-0.26695, abs=1e-4), pytest.approx(4.26695, abs=1e-4))
    for a, b in ((BEST[("ce", "dkd")], BEST[("mse", "dkd")]), ([1.0, 2.0], [1.5, 4.0, 7.0, 2.0])):
        diff, p, lo, hi = _expected(a, b)
        w = welch(a, b)
        assert (w.diff, w.p, w.ci_low, w.ci_high) == pytest.approx((diff, p, lo, hi), rel=1e-9)
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        assert w.df == pytest.approx((va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)))
        assert 1 < w.df < len(a) + len(b) - 2  # Welch's ν: below the pooled test's
    assert welch([70.0], [71.0, 72.0]).note == NA_SEEDS and welch([70.0], [71.0, 72.0]).p is None
    assert welch([70.0, 70.0], [71.0, 71.0]).note.startswith("n/a") and fmt_diff(None) == ("-", "-", "-")


def test_report_prints_rows_per_teacher_and_the_comparison(sweep, tmp_path, capsys):
    storage, _ = sweep
    args = report_args(experiment=EXP, storage=str(storage), csv=str(tmp_path / "t.csv"), markdown=str(tmp_path / "t.md"))
    assert main_report(args) == 0
    out = capsys.readouterr().out
    table, _, section = out.partition("teacher comparison (ce, mse)")
    # the table: a row per (teacher, student, method); the worse configuration's 99.0 never chosen
    for name in ("ce", "mse"):
        assert len([ln for ln in table.splitlines() if ln.startswith(f"{name}:resnet20 -> resnet8 ")]) == 2
    assert "99.00" not in out and "(none) -> resnet8" in table  # the CE baseline: a group without a teacher

    lines = section.splitlines()
    header = [ln for ln in lines if ln.startswith("teacher -> student")][0]
    for word in ("method", "ce", "mse", "Δ mse − ce", "95% CI", "p (Welch)", "val_agree (ce / mse)"):
        assert word in header
    kd = [ln for ln in lines if ln.startswith("resnet20 -> resnet8") and " kd " in ln][0]
    dkd = [ln for ln in lines if ln.startswith("resnet20 -> resnet8") and " dkd " in ln][0]
    assert "71.00 ± 1.00 (n=3)" in kd and "73.00 ± 1.00 (n=3)" in kd
    assert "+2.00" in kd and "[-0.27, +4.27]" in kd and "0.070" in kd  # the hand values
    assert "91.00 / 95.00" in kd and "0.3100 / 0.2100" in kd  # mean last val_agree, val_kl_teacher
    diff, p, lo, hi = _expected(BEST[("ce", "dkd")], BEST[("mse", "dkd")])
    assert f"{diff:+.2f}" in dkd and f"[{lo:+.2f}, {hi:+.2f}]" in dkd and f"{p:.3f}" in dkd
    assert "- / -" in dkd  # DKD's runs logged no agreement
    assert lines.index(kd) < lines.index(dkd)  # the spec's method order
    assert "Welch's t-test (two-sided, unequal variances)" in section and "Welch–Satterthwaite" in section

    teachers = lines[lines.index([ln for ln in lines if ln.startswith("teachers (")][0]) + 1 :]
    assert teachers[0].split() == ["teacher", "model", "objective", "test_acc", "test_nll", "test_ece",
                                   "test_entropy"]  # fmt: skip
    assert teachers[2].split() == ["ce", "resnet20", "ce", "70.50", "1.1000", "0.0800", "0.4500"]
    assert teachers[3].split() == ["mse", "resnet20", "mse", "71.20", "1.3000", "-", "0.9000"]

    with open(tmp_path / "t.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["teacher_name"], r["method"]) for r in rows} == {(n, m) for n, m in BEST} | {("", "ce")}


def test_markdown_has_the_papers_layout_and_the_comparison(sweep, tmp_path, capsys):
    storage, _ = sweep
    assert main_report(report_args(experiment=EXP, storage=str(storage), markdown=str(tmp_path / "t.md"))) == 0
    capsys.readouterr()
    md = (tmp_path / "t.md").read_text()
    head, _, section = md.partition("## Teacher comparison")
    assert "| ce:resnet20 -> resnet8" in head and "| mse:resnet20 -> resnet8" in head  # the table, first
    tables = [[_cells(ln) for ln in block.splitlines() if ln.startswith("|")] for block in section.split("\n\n")]
    paper, welch_table, teachers = [t for t in tables if t]
    # columns: the pair (teacher architecture -> student), under it one column per teacher (spec order)
    assert paper[0] == ["teacher -> student", "resnet20 -> resnet8", ""]
    assert paper[2] == ["teacher", "ce", "mse"] and paper[3] == ["teacher's own test_acc", "70.50", "71.20"]
    assert [r[0] for r in paper[4:]] == ["kd", "dkd"]  # a row per method
    assert paper[4][1:] == ["71.00 ± 1.00", "**73.00 ± 1.00**"]  # the better teacher of the pair in bold
    assert paper[5][1:] == ["**74.67 ± 0.76**", "73.10 ± 0.10"]
    assert welch_table[0][:7] == ["teacher -> student", "method", "ce", "mse", "Δ mse − ce", "95% CI", "p (Welch)"]
    assert welch_table[2][4:7] == ["+2.00", "[-0.27, +4.27]", "0.070"]
    assert teachers[2] == ["ce", "resnet20", "ce", "70.50", "1.1000", "0.0800", "0.4500"]
    assert "Hamidi et al. (ECCV 2024) Table 1" in section and "Welch–Satterthwaite" in section


def test_one_seed_is_no_test_and_the_spec_orders_the_teachers():
    def trial(name, method, seed, test):
        return Trial(run_id=f"{name}{method}{seed}", name="t", status="FINISHED", data="d", teacher="r20",
                     student="r8", method=method, seed=str(seed), params={"teacher_name": name, "seed": str(seed)},
                     metrics={"val_acc": test, "test_acc": test}, teacher_name=name)  # fmt: skip

    trials = [trial("ce", "kd", 0, 70.0), trial("mse", "kd", 0, 72.0), trial("mse", "kd", 1, 73.0)]
    rows = best_rows(trials)
    assert {r["teacher_name"]: r["n_seeds"] for r in rows} == {"ce": 1, "mse": 2}
    order = teacher_order({"ce", "mse"}, {"teachers": [{"name": "mse"}, {"name": "ce"}]})
    assert order == ["mse", "ce"] and teacher_order({"ce", "mse"}) == ["ce", "mse"]
    comp = TeacherComparison(order, teacher_info(order, None, {}, rows), comparison(rows, order))
    text = comp.text()
    line = [ln for ln in text.splitlines() if ln.startswith("r20 -> r8")][0]
    assert "Δ ce − mse" in text  # the spec's first teacher is the reference
    assert "72.50 ± 0.71 (n=2)" in line and "70.00 (n=1)" in line
    assert line.split()[-7:] == ["-2.50", *NA_SEEDS.split(), "n/a"]  # Δ, then no CI and no p
    assert [ln.split() for ln in text.splitlines()[-2:]] == [["mse", "r20", *"-" * 5], ["ce", "r20", *"-" * 5]]


def test_one_teacher_has_no_comparison(tmp_path, capsys):
    from kdtune.cli import main

    storage = tmp_path / "runs"
    uri = default_tracking_uri(storage / "one")
    st = SweepTracker(uri, "one")
    parent = st.start_parent({"name": "one", "teacher": {"model": "resnet20"}}, {}, {})
    for seed in range(2):
        _trial(st.client, st.experiment_id, parent, seed, {"method": "kd", "student": "resnet8",
               "teacher": "resnet20", "data": "cifar100", "seed": seed}, {}, _history(70.0 + seed, 90.0, 0.3))  # fmt: skip
    st.end_parent("FINISHED")
    assert main(["report", "one", "--storage", str(storage)]) == 0  # through the CLI
    out = capsys.readouterr().out
    assert [ln.split()[:4] for ln in out.splitlines() if ln.startswith("resnet20 ->")] == [
        ["resnet20", "->", "resnet8", "kd"]
    ]
    assert "teacher comparison" not in out and "Welch" not in out
    assert ":resnet20" not in out  # no teacher name: the table as it always was


def test_cli_prints_the_comparison(sweep, capsys):
    from kdtune.cli import main

    storage, _ = sweep
    assert main(["report", str(storage / EXP)]) == 0  # the experiment's directory
    out = capsys.readouterr().out
    assert "teacher comparison (ce, mse)" in out and "[-0.27, +4.27]" in out


def test_the_repeated_configuration_is_reported_not_a_lucky_single_seed():
    """The search picks lr 0.1 on seed 0 (92), the repeats pull its mean back to 90.33; lr 0.05 ran once (91).
    The report shows the configuration the sweep chose and repeated, with its three seeds."""
    from kdtune.report.table import Trial, best_rows

    def trial(i, lr, seed, val, test):
        return Trial(run_id=f"r{i}", name=f"t{i}", status="FINISHED", data="digits", teacher="resnet20", student="resnet8",
                     method="kd", seed=str(seed), params={"method": "kd", "train.lr": lr, "seed": str(seed)},
                     metrics={"val_acc": val, "test_acc": test})  # fmt: skip

    trials = [trial(0, "0.1", 0, 92.0, 91.0), trial(1, "0.05", 0, 91.0, 90.0), trial(2, "0.1", 1, 89.0, 89.5),
              trial(3, "0.1", 2, 90.0, 90.5)]  # fmt: skip
    (row,) = best_rows(trials, "val_acc", "max")
    assert row["run_ids"] == ["r0", "r2", "r3"] and row["n_seeds"] == 3 and row["test_accs"] == [91.0, 89.5, 90.5]
    (row,) = best_rows(trials[:2], "val_acc", "max")  # before the repeats: the best single seed
    assert row["run_ids"] == ["r0"] and row["n_seeds"] == 1
