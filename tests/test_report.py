"""kdtune report on a fabricated sweep in a real MLflow SQLite store: table, seeds, CSV/Markdown, plots."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("mlflow")

from kdtune.errors import ConfigError, KdtuneError  # noqa: E402
from kdtune.report import best_per_method, main_report  # noqa: E402
from kdtune.report.published import PUBLISHED, published  # noqa: E402
from kdtune.tracking import SweepTracker, TrialTracker, default_tracking_uri  # noqa: E402
from tests.report_cli import report_args  # noqa: E402

EXP = "rep"
PAIR = {"data": "cifar100", "teacher_model": "resnet32x4", "model": "resnet8x4"}
# (method, pair, hyperparameters, seed, final val_acc, final test_acc, status)
TRIALS = [
    # kd: T=4 over three seeds (mean 72 ± 1) beats T=2 over two seeds (70.5); T=8's 76 FAILED (not counted)
    ("kd", PAIR, {"T": 4.0, "w_kd": 0.9}, 0, 71.0, 73.0, "FINISHED"),
    ("kd", PAIR, {"T": 4.0, "w_kd": 0.9}, 1, 72.0, 73.5, "FINISHED"),
    ("kd", PAIR, {"T": 4.0, "w_kd": 0.9}, 2, 73.0, 74.0, "FINISHED"),
    ("kd", PAIR, {"T": 2.0, "w_kd": 0.9}, 0, 70.0, 72.0, "FINISHED"),
    ("kd", PAIR, {"T": 2.0, "w_kd": 0.9}, 1, 71.0, 72.0, "FINISHED"),
    ("kd", PAIR, {"T": 8.0, "w_kd": 0.9}, 0, 76.0, 76.0, "FAILED"),
    # dkd: beta=8 wins on validation although beta=2 has the higher test accuracy (test never ranks)
    ("dkd", PAIR, {"beta": 8.0, "T": 4.0}, 0, 74.0, 75.0, "FINISHED"),
    ("dkd", PAIR, {"beta": 2.0, "T": 4.0}, 0, 73.0, 99.0, "FINISHED"),
    ("dkd", PAIR, {"beta": 1.0, "T": 4.0}, 0, 65.0, 66.0, "FINISHED"),
    # ce: the student from scratch, no teacher
    ("ce", {"data": "cifar100", "model": "resnet8x4"}, {}, 0, 69.0, 70.0, "FINISHED"),
    # another data set: no published number
    (
        "kd",
        {"data": "digits", "teacher_model": "resnet8x4", "model": "resnet8"},
        {"T": 4.0},
        0,
        90.0,
        91.0,
        "FINISHED",
    ),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    storage = tmp_path_factory.mktemp("cwd") / "runs" / "sweeps"  # where `kdtune sweep` writes, from a cwd
    uri = default_tracking_uri(storage / EXP)
    st = SweepTracker(uri, EXP)
    parent = st.start_parent({"name": EXP, "metric": "val_acc", "mode": "max"}, {}, {})
    st.log_stage("teacher", {"model": "resnet32x4", "method": "ce"}, {"val_acc": 99.0, "test_acc": 99.0})
    for i, (method, pair, hp, seed, val, test, status) in enumerate(TRIALS):
        tt = TrialTracker(uri, EXP, parent, trial_id=f"t_{i:05d}", trial_name=f"{method}_t_{i:05d}")
        # named as a sweep's trial runs are: <method>.<hyperparameter>, train.<field>
        tt.log_params({"method": method, **pair, "seed": seed, "train.lr": 0.05, "out": f"/runs/{i}",
                       **{f"{method}.{k}": v for k, v in hp.items()}})  # fmt: skip
        for epoch in range(3):
            d = 2 - epoch
            tt.log_metrics(
                {"val_acc": val - d, "test_acc": test - d, "train_loss": 1.0 / (epoch + 1),
                 "loss_ce": 0.5 / (epoch + 1)}, step=epoch
            )
        tt.end(status, reason="DivergedError: NaN" if status == "FAILED" else None)
    st.end_parent("FINISHED")
    return storage, uri, st, parent


def _row(rows, method, student="resnet8x4", data="cifar100"):
    (row,) = [r for r in rows if r["method"] == method and r["student"] == student and r["data"] == data]
    return row


def test_published_table_holds_the_papers_numbers():
    assert published("cifar100", "resnet32x4", "resnet8x4", "kd").acc == 73.33
    assert published("cifar100", "resnet32x4", "resnet8x4", "dkd").acc == 76.32
    assert published("cifar100", "resnet32x4", "resnet8x4", "dist").acc == 76.31
    assert published("cifar100", "resnet32x4", "resnet8x4", "wttm").acc == 76.06
    assert published("cifar100", "resnet32x4", "resnet8x4", "wttm").std == 0.27
    assert published("cifar100", "vgg13", "mobilenetv2", "ipwd").acc == 69.81
    assert published("cifar100", "resnet32x4", "resnet8x4", "ce").acc == 72.50  # from scratch, any teacher
    assert published("cifar100", "resnet110", "resnet20", "dkd") is None  # n/a in the paper
    assert published("digits", "resnet32x4", "resnet8x4", "kd") is None
    assert all("Table" in p.source for p in PUBLISHED.values())


FEATURE_METHODS = ("fitnet", "at", "sp", "cc", "vid", "rkd", "pkt")


def test_published_table_holds_the_crd_benchmarks_feature_methods():
    """FitNet, AT, VID, RKD, PKT as TTM prints CRD's numbers (std from its Tables 11/12); SP and CC from
    RepDistiller's README, without std. Every one of the 13 CRD pairs has all seven."""
    r8x4 = {m: published("cifar100", "resnet32x4", "resnet8x4", m) for m in FEATURE_METHODS}
    assert {m: p.acc for m, p in r8x4.items()} == {
        "fitnet": 73.50, "at": 73.44, "sp": 72.94, "cc": 72.97, "vid": 73.09, "rkd": 71.90, "pkt": 73.64,
    }  # fmt: skip
    assert r8x4["pkt"].std == 0.18 and r8x4["rkd"].std == 0.11 and r8x4["fitnet"].std == 0.28
    assert r8x4["sp"].std is None and r8x4["cc"].std is None
    assert "Table 1" in r8x4["pkt"].source and "Table 11" in r8x4["pkt"].source
    assert "RepDistiller README" in r8x4["cc"].source and "Table 1" in r8x4["cc"].source
    # different architectures: AT's collapse on MobileNetV2, CC on ShuffleNetV2, std from Table 12
    at = published("cifar100", "resnet50", "mobilenetv2", "at")
    assert (at.acc, at.std) == (58.58, 0.54) and "Table 3" in at.source and "Table 12" in at.source
    cc = published("cifar100", "resnet32x4", "shufflev2", "cc")
    assert (cc.acc, cc.std) == (71.29, None) and "Table 2" in cc.source
    assert published("cifar100", "wrn_40_2", "shufflev1", "sp").acc == 74.52
    assert published("cifar100", "resnet110", "resnet20", "vid").acc == 70.16
    assert published("cifar100", "wrn_40_2", "wrn_40_1", "rkd").std == 0.20
    crd_pairs = {(t, s) for (t, s, m), p in PUBLISHED.items() if m == "kd" and "TTM" in p.source}
    assert len(crd_pairs) == 13
    assert {(t, s, m) for t, s, m in PUBLISHED if m in FEATURE_METHODS} == {
        (t, s, m) for t, s in crd_pairs for m in FEATURE_METHODS
    }
    assert published("digits", "resnet32x4", "resnet8x4", "pkt") is None


def test_best_per_method_rows(experiment):
    _, uri, _, _ = experiment
    rows = best_per_method(uri, EXP)
    assert {(r["data"], r["method"]) for r in rows} == {
        ("cifar100", "kd"),
        ("cifar100", "dkd"),
        ("cifar100", "ce"),
        ("digits", "kd"),
    }
    kd = _row(rows, "kd")
    assert kd["hparams"] == {"T": "4", "w_kd": "0.9"}
    assert kd["n_seeds"] == 3 and sorted(kd["seeds"]) == ["0", "1", "2"]
    assert kd["value"] == pytest.approx(72.0) and kd["value_std"] == pytest.approx(1.0)
    assert kd["test_acc"] == pytest.approx(73.5) and kd["test_acc_std"] == pytest.approx(0.5)
    assert kd["n_trials"] == 6 and kd["n_failed"] == 1 and kd["n_configs"] == 2
    assert kd["published"] == 73.33 and "Table 1" in kd["published_source"]
    dkd = _row(rows, "dkd")
    assert dkd["hparams"]["beta"] == "8" and dkd["value"] == 74.0 and dkd["test_acc"] == 75.0
    assert dkd["value_std"] is None and dkd["published"] == 76.32
    ce = _row(rows, "ce")
    assert ce["teacher"] == "-" and ce["published"] == 72.50 and ce["hparams"] == {}
    digits = _row(rows, "kd", student="resnet8", data="digits")
    assert digits["published"] is None and digits["teacher"] == "resnet8x4"
    cifar = [r["method"] for r in rows if r["data"] == "cifar100" and r["teacher"] == "resnet32x4"]
    assert cifar == ["dkd", "kd"]  # best first within a pair


def test_ranking_by_test_or_minimising(experiment):
    _, uri, _, _ = experiment
    with pytest.raises(ConfigError, match="validation"):
        best_per_method(uri, EXP, metric="test_acc")
    rows = best_per_method(uri, EXP, metric="train_loss", mode="min")
    assert all(r["value"] == pytest.approx(1 / 3) for r in rows)
    with pytest.raises(KdtuneError, match="no MLflow experiment 'nope'"):
        best_per_method(uri, "nope")




def test_main_report_writes_table_csv_markdown_and_plots(experiment, tmp_path, capsys):
    storage, uri, st, parent = experiment
    args = report_args(
        experiment=EXP,
        storage=str(storage),
        csv=str(tmp_path / "r.csv"),
        markdown=str(tmp_path / "r.md"),
        plots=True,
    )
    assert main_report(args) == 0
    out = capsys.readouterr().out
    assert "resnet32x4 -> resnet8x4" in out and "72.00 ± 1.00" in out and "73.33 ± 0.25 [" in out
    assert "mlflow ui --backend-store-uri" in out and "importance dkd: beta 1.00" in out

    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    kd = [r for r in rows if r["method"] == "kd" and r["data"] == "cifar100"][0]
    assert float(kd["value"]) == 72.0 and float(kd["published"]) == 73.33 and kd["n_seeds"] == "3"
    assert '"T": "4"' in kd["hparams"]
    md = (tmp_path / "r.md").read_text()
    md_rows = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in md.splitlines() if ln.startswith("| ")]
    dkd = [r for r in md_rows if r[:2] == ["resnet32x4 -> resnet8x4", "dkd"]][0]
    assert dkd[2:5] == ["74.00", "1", "75.00"] and dkd[5].startswith("76.32 [")
    assert "TTM/WTTM (Zheng & Yang, ICLR 2024)" in md and "## digits" in md

    report_dir = storage / EXP / "report"
    pngs = sorted(p.name for p in report_dir.glob("*.png"))
    assert (
        "curves_cifar100_resnet32x4-resnet8x4.png" in pngs and "curves_digits_resnet8x4-resnet8.png" in pngs
    )
    assert {"importance_kd.png", "importance_dkd.png"} <= set(pngs)
    for p in report_dir.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    logged = {f.path for f in st.client.list_artifacts(parent, "report")}
    assert "report/importance_kd.png" in logged and "report/r.md" in logged


def _png_text(path):
    from PIL import Image

    with Image.open(path) as im:
        return dict(im.text)


def test_plots_say_what_they_draw(experiment, tmp_path):
    storage, _, _, _ = experiment
    assert main_report(report_args(experiment=EXP, storage=str(storage), out=str(tmp_path))) == 0  # --out: plots
    curves = _png_text(tmp_path / "curves_cifar100_resnet32x4-resnet8x4.png")
    # the teacher's (its stage run) and the CE baseline's (the ce group's best) accuracy drawn in
    assert "teacher resnet32x4 (99.00)" in curves["Description"] and "CE baseline (69.00)" in curves["Description"]
    assert "kd (72.00, 3 seeds)" in curves["Description"]
    assert not (tmp_path / "curves_cifar100_resnet8x4.png").exists()  # CE is the pair's baseline, not alone
    losses = _png_text(tmp_path / "losses_cifar100_resnet32x4-resnet8x4.png")
    assert "kd: loss_ce, train_loss" in losses["Description"] and "loss terms" in losses["Title"]
    acc = _png_text(tmp_path / "accuracy_cifar100_resnet32x4-resnet8x4.png")["Description"]
    assert "kd 73.50 vs published 73.33" in acc and "dkd 75.00 vs published 76.32" in acc
    assert "kd 91.00 (no published number)" in _png_text(tmp_path / "accuracy_digits_resnet8x4-resnet8.png")[
        "Description"
    ]


def test_optuna_plots_of_the_mirrored_studies(experiment, tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    storage, _, st, parent = experiment
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    db = storage / EXP / "optuna.db"
    url = f"sqlite:///{db}"
    # as the sweep's OptunaMirror writes them: a study per group, named after it, with method/student attrs
    study = optuna.create_study(study_name="resnet8x4-kd", storage=url, direction="maximize")
    study.set_user_attr("method", "kd")
    dists = {"mirror_only": optuna.distributions.FloatDistribution(0, 10),
             "flat": optuna.distributions.FloatDistribution(0, 1)}  # fmt: skip
    for i in range(6):
        pruned = i % 3 == 2
        study.add_trial(optuna.trial.create_trial(
            params={"mirror_only": float(i), "flat": 0.5 + 0.01 * (i % 2)}, distributions=dists, value=float(i),
            state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
            intermediate_values={e: float(i) * e / 3 for e in range(1 if pruned else 3)}))  # fmt: skip
    lonely = optuna.create_study(study_name="resnet8x4-dist", storage=url, direction="maximize")
    lonely.set_user_attr("method", "dist")
    lonely.add_trial(optuna.trial.create_trial(params={"beta": 1.0}, value=1.0,
                     distributions={"beta": optuna.distributions.FloatDistribution(0, 2)}))  # fmt: skip
    try:
        assert main_report(report_args(experiment=str(storage / EXP), out=str(tmp_path))) == 0
    finally:
        db.unlink()
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("importance resnet8x4-kd:")][0]
    assert line.startswith("importance resnet8x4-kd: mirror_only")  # the mirror's parameter, ranked first
    assert "importance resnet8x4-dist: skipped (1 complete trial;" in out  # one line, no plot
    assert not (tmp_path / "importance_resnet8x4-dist.png").exists()
    assert "importance dkd: beta" in out  # no mirrored study for dkd: its MLflow runs
    imp = _png_text(tmp_path / "importance_resnet8x4-kd.png")
    assert "(4 complete trials)" in imp["Title"] and imp["Description"].startswith("mirror_only")
    par = _png_text(tmp_path / "parallel_resnet8x4-kd.png")
    assert "parallel coordinates" in par["Title"] and par["Description"] == "flat; mirror_only"
    inter = _png_text(tmp_path / "intermediate_resnet8x4-kd.png")
    assert "per epoch of 6 trials (2 pruned)" in inter["Title"]
    assert (tmp_path / "parallel_resnet8x4-dist.png").exists()  # one complete trial still draws its line
    logged = {f.path for f in st.client.list_artifacts(parent, "report")}
    assert {"report/importance_resnet8x4-kd.png", "report/intermediate_resnet8x4-kd.png"} <= logged


def test_cli_report_finds_what_sweep_wrote_from_its_cwd(experiment, monkeypatch, capsys):
    from kdtune.cli import main

    storage, _, _, _ = experiment
    monkeypatch.chdir(storage.parent.parent)  # runs/sweeps/rep, as `kdtune sweep` wrote it
    assert main(["report", EXP]) == 0
    assert "kdtune report: rep (11 trials)" in capsys.readouterr().out
    assert main(["report", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdtune: error: no experiment 'nope'") and "runs/sweeps: rep" in err
    assert "--tracking-uri" not in err and "--storage DIR" in err and len(err.splitlines()) == 1


def test_report_refuses_a_missing_experiment(tmp_path):
    with pytest.raises(KdtuneError, match="kdtune sweep"):
        main_report(report_args(experiment="ghost", storage=str(tmp_path)))
    assert not (tmp_path / "ghost").exists()  # no empty database created
    with pytest.raises(KdtuneError, match="no MLflow store"):
        best_per_method(f"sqlite:///{tmp_path}/ghost/mlflow.db", "ghost")
    assert not (tmp_path / "ghost").exists()


# --------------------------------------------------------------------------- the hyperparameter cell
HPS = "hps"
# (group's method, the searched values of two trials); DiSK's alpha and budget_relax are fixed by the spec
HP_TRIALS = [
    ("kd", {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9, "logit_std": False}, 80.0),
    ("kd", {"T": 2.0, "w_ce": 0.1, "w_kd": 9.0, "logit_std": True}, 81.0),
    ("disk", {"tau_t": 4.0, "K": 5, "lambda_min": 0.1, "lambda_max": 50.0, "delta_offset": 0.05,
              "lambda_period": 50, "budget_relax": "ce", "alpha": 0.1}, 83.0),
    ("disk", {"tau_t": 2.0, "K": 3, "lambda_min": 1.0, "lambda_max": 20.0, "delta_offset": -0.1,
              "lambda_period": 20, "budget_relax": "ce", "alpha": 0.1}, 82.0),
]  # fmt: skip


@pytest.fixture(scope="module")
def hp_sweep(tmp_path_factory):
    """A sweep as ``kdtune sweep`` records it: its plan's groups (a DiSK group with 26 hyperparameters, two of
    them fixed by the spec, and a KD group), the views and chosen names the driver saves, and trial runs
    logged with every hyperparameter (:func:`kdtune.tracking.trial.trial_params`)."""
    from kdtune.spec import load_spec
    from kdtune.tracking.views import sweep_views
    from kdtune.tune.plan import plan

    storage = tmp_path_factory.mktemp("hp") / "runs"
    spec = load_spec({"name": HPS, "data": "digits", "teacher": {"model": "resnet8x4"}, "students": ["resnet8"],
                      "methods": {"kd": {}, "disk": {"space": {"budget_relax": "ce", "alpha": 0.1}}},
                      "budget": {"trials": 2, "epochs": 3}, "storage": str(storage)})  # fmt: skip
    the_plan = plan(spec)
    groups = {g.method: g for g in the_plan.groups}
    chosen = [(g.name, the_plan.chosen_hparams(g)) for g in groups.values()]
    uri = default_tracking_uri(storage / HPS)
    st = SweepTracker(uri, HPS)
    parent = st.start_parent(spec.to_dict(), {}, {})
    st.save_views(sweep_views("val_acc", "max", chosen), hparams=dict(chosen))
    for i, (method, config, val) in enumerate(HP_TRIALS):
        g = groups[method]
        tt = TrialTracker(uri, HPS, parent, trial_id=f"h_{i:05d}", trial_name=f"{g.name}_{i:03d}")
        tt.log_trial_params(method, config, g.base, {"student": "resnet8", "teacher": "resnet8x4", "data": "digits",
                                                     "group": g.name, "method": method, "seed": 0})  # fmt: skip
        tt.set_tags({"kdtune.group": g.name, "kdtune.method": method})
        tt.log_metrics({"val_acc": val, "test_acc": val - 1}, step=3)
        tt.end("FINISHED")
    st.end_parent("FINISHED")
    return storage, uri, st, dict(chosen)


def test_chosen_hparams_are_the_searched_then_the_fixed(hp_sweep):
    from kdtune.tracking.views import group_hparams, view_id, views_of

    _, _, st, chosen = hp_sweep
    assert chosen["resnet8-kd"] == ["kd.T", "kd.w_ce", "kd.w_kd", "kd.logit_std"]
    assert chosen["resnet8-disk"] == ["disk.tau_t", "disk.K", "disk.lambda_min", "disk.lambda_max",
                                      "disk.delta_offset", "disk.lambda_period", "disk.budget_relax", "disk.alpha"]
    tags = st.client.get_experiment(st.experiment_id).tags
    view = views_of(tags.items())[view_id("resnet8-disk")]["state"]["selectedColumns"]
    assert view[-8:] == [f"params.`{n}`" for n in chosen["resnet8-disk"]]  # the view's columns: the same names
    assert group_hparams(tags, "resnet8-disk") == chosen["resnet8-disk"]
    # a sweep of an older kdtune recorded only its views: their param columns (what the group searched)
    old = {k: v for k, v in tags.items() if not k.startswith("kdtune.hparams.")}
    assert group_hparams(old, "resnet8-kd") == chosen["resnet8-kd"]
    assert group_hparams(old, "resnet8-nope") is None


def test_report_cell_shows_the_chosen_hyperparameters_csv_keeps_all(hp_sweep, tmp_path, capsys):
    from kdtune.losses import METHODS

    storage, uri, _, _ = hp_sweep
    args = report_args(experiment=HPS, storage=str(storage), csv=str(tmp_path / "h.csv"), markdown=str(tmp_path / "h.md"))
    assert main_report(args) == 0
    out = capsys.readouterr().out
    disk_cell = ("tau_t=4, K=5, lambda_min=0.1, lambda_max=50, delta_offset=0.05, lambda_period=50, "
                 "budget_relax=ce, alpha=0.1")  # fmt: skip
    kd_cell = "T=2, w_ce=0.1, w_kd=9, logit_std=True"
    for text in (out, (tmp_path / "h.md").read_text()):
        assert disk_cell in text and kd_cell in text, text
        assert "guide_momentum" not in text and "budget_norm" not in text and "train.lr" not in text
    assert "hyperparameters: those searched or fixed in the spec" in out
    assert max(len(ln) for ln in out.splitlines() if "resnet8x4 -> resnet8" in ln) < 250

    with open(tmp_path / "h.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    import json

    disk_hp = json.loads(rows["disk"]["hparams"])
    assert set(METHODS.get("disk").hparams) <= set(disk_hp)  # its 25 declared ones, the searched among them
    assert disk_hp["guide_momentum"] == "0.9" and disk_hp["budget_relax"] == "ce"
    assert set(METHODS.get("kd").hparams) <= set(json.loads(rows["kd"]["hparams"]))

    (disk,) = [r for r in best_per_method(uri, HPS) if r["method"] == "disk"]
    assert disk["shown_hparams"] == ["tau_t", "K", "lambda_min", "lambda_max", "delta_offset", "lambda_period",
                                     "budget_relax", "alpha"] and len(disk["hparams"]) >= 25  # fmt: skip


def test_report_without_a_record_shows_every_hyperparameter(experiment):
    """Runs of another tool (no group, no record in the experiment): the cell shows all, as it always did."""
    _, uri, _, _ = experiment
    kd = _row(best_per_method(uri, EXP), "kd")
    assert kd["shown_hparams"] is None and kd["hparams"] == {"T": "4", "w_kd": "0.9"}
