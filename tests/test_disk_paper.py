"""``kdtune reproduce disk-toys --protocol paper``: DiSK's Table 1 by the paper's protocol (appendix A.1's scan,
selected on the validation split, then seeds of each method's selection), run through ``kdtune sweep``.

The sweep runs for real on tiny settings (one toy, 2 epochs, 2 seeds, a 2 x 2 KD grid, 2 DiSK trials); the
checks read the sweep's own records (state.json, MLflow), not the reproduction's."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kdtune.errors import ConfigError
from kdtune.reproduce import disk_paper
from kdtune.reproduce.disk_paper import main
from kdtune.reproduce.disk_toys import PAPER

TINY = ["--protocol", "paper", "--problems", "intervals", "--epochs", "2", "--seeds", "2", "--kd-alphas", "0.5,1",
        "--kd-temps", "1,4", "--disk-trials", "2"]  # fmt: skip


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--protocol", "paper", "--kd-T", "2"], "--kd-T is read by --protocol fixed only"),
        (["--protocol", "paper", "--quick"], "--quick is read by --protocol fixed only"),
        (["--protocol", "paper", "--problems", "intervals,squares"], "--problems 'intervals,squares'"),
        (["--protocol", "paper", "--seeds", "101"], "--seeds 101"),
        (["--protocol", "paper", "--seeds", "0"], "--seeds 0"),
        (["--protocol", "paper", "--kd-alphas", "0,1.5"], "alpha (KD's CE weight) lies in [0, 1]"),
        (["--protocol", "paper", "--disk-trials", "0"], "--disk-trials 0"),
        (["--disk-trials", "5"], "--disk-trials is an option of --protocol paper"),
        (["--storage", "x"], "--storage is an option of --protocol paper"),
    ],
)
def test_bad_options_are_refused_in_one_line(argv, says, capsys, tmp_path):
    assert main([*argv, "--json", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kdtune: error: ") and says in err[0], err
    assert not (tmp_path / "t.json").exists()


def test_the_specs_hold_the_a1_scan(tmp_path):
    """The specs as kdtune plans them: KD's trials are the grid's points (w_kd = 1 - alpha, weight 0 accepted),
    DiSK's space is A.1's sets with K up to the classes, and every configuration keeps lambda_max > lambda_min."""
    import optuna

    from kdtune.models.checkpoint import load_model
    from kdtune.reproduce.disk_toys import build_parser
    from kdtune.spec import load_spec
    from kdtune.tune.plan import plan

    argv = ["--protocol", "paper", "--epochs", "2", "--teacher-restarts", "2", "--storage", str(tmp_path)]
    cfg = disk_paper.config_from_args(build_parser().parse_args(argv), {"protocol", "epochs", "teacher_restarts",
                                                                          "storage"})  # fmt: skip
    assert (cfg.seeds, cfg.kd_points, cfg.concurrency) == (100, 15, 2)
    grid = disk_paper.kd_grid()
    assert len(grid) == 15 and {(p["w_ce"], p["w_kd"]) for p in grid} == {(0.0, 1.0), (0.1, 0.9), (0.5, 0.5),
                                                                         (0.9, 0.1), (1.0, 0.0)}  # fmt: skip
    for key, classes in (("intervals", [1, 2]), ("gaussians", [1, 2, 3])):
        teacher = disk_paper.teacher_for(key, cfg, log=lambda s: None)
        d = disk_paper.sweep_spec(key, cfg, teacher)
        assert d["budget"]["repeats"] == 100 and d["scheduler"] == {"name": "none"} and d["metric"] == "val_acc"
        assert d["train"]["schedule"] == "constant" and d["train"]["lr"] == 0.1 and d["train"]["batch_size"] == 200
        spec = load_spec(d)
        p = plan(spec)
        groups = {g.method: g for g in p.groups}
        assert groups["ce"].budget == 1
        kd = groups["kd"]
        assert kd.budget == 15 and [{**s, "logit_std": False} for s in kd.starts] == grid
        assert sorted(kd.parameters) == ["T", "w_ce", "w_kd"]  # logit_std fixed false
        disk = groups["disk"]
        assert disk.budget == 100 and len(disk.starts) == 1
        assert list(disk.parameters["K"].choices) == classes
        assert list(disk.parameters["delta"].choices) == [0.1, 0.05, 0.0]
        assert list(disk.parameters["tau_t"].choices) == [1.0, 2.0, 4.0]
        fn = p.space(disk)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
        for _ in range(200):
            t = study.ask()
            consts = fn(t) or {}  # what the trial trains: the draws, and a lambda_max raised above lambda_min
            c = {**t.params, **consts}
            study.tell(t, 0.0)
            assert c["lambda_max"] > c["lambda_min"] and c["guide_hidden"] == "2" and c["K"] in classes
        if key == "gaussians":  # the best-of-restarts teacher, a checkpoint in kdtune's format
            model, info = load_model(teacher["checkpoint"])
            assert info["arch"] == "toy_mlp_teacher" and info["meta"]["restarts"] == 2
            assert disk_paper.teacher_for(key, cfg, log=pytest.fail) == teacher  # trained once, then reused
        else:
            assert teacher == {"model": "toy_interval_teacher"}
    # a narrowing that leaves no lambda_max above lambda_min is refused by kdtune before anything runs
    d["methods"]["disk"]["space"].update(lambda_min=[10.0], lambda_max=[1.0, 5.0])
    d["methods"]["disk"]["starts"] = False
    with pytest.raises(ConfigError, match="lambda_max"):
        plan(load_spec(d))


def test_paper_protocol_runs_through_the_sweep(tmp_path, capsys):
    pytest.importorskip("ray")
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    storage, out_json = tmp_path / "runs", tmp_path / "paper.json"
    argv = [*TINY, "--storage", str(storage), "--json", str(out_json)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("estimate: per toy 1 CE + 4 KD (grid) + 2 DiSK (TPE) search trials + 3 x 1 repeats")
    table = out[out.index("DiSK toy problems"):]
    assert "1D Intervals" in table and "2D Gaussians" not in table
    for row, paper in PAPER["intervals"]["rows"].items():  # each method's row beside the paper's
        assert re.search(rf"^{row}\s+\d+\.\d%.*\|\s+{paper[0]}\s+{paper[1]}\s+{paper[2]}$", table, re.M), row
    assert "4 KD grid points, exactly the grid" in table and "+ 3 repeats" in table
    assert re.search(r"selected KD\s+alpha [\d.]+ \(w_ce [\d.]+, w_kd [\d.]+\), T \d: val_acc \d+\.\d%", table)

    exp = storage / "disk-paper-intervals"
    spec = yaml.safe_load((storage / "disk-paper-intervals.yaml").read_text())
    assert spec["methods"]["kd"]["trials"] == 4 and spec["budget"]["repeats"] == 2
    state = json.loads((exp / "state.json").read_text())
    groups = {g["method"]: g for g in state["groups"].values()}
    # the KD trials are exactly the grid's points, each once
    ran = sorted((t["config"]["w_ce"], t["config"]["T"], t["config"]["w_kd"], t["config"]["logit_std"])
                 for t in groups["kd"]["all"])  # fmt: skip
    assert ran == [(0.5, 1.0, 0.5, False), (0.5, 4.0, 0.5, False), (1.0, 1.0, 0.0, False), (1.0, 4.0, 0.0, False)]
    assert groups["ce"]["trials"] == 1 and groups["disk"]["trials"] == 2

    res = json.loads(out_json.read_text())
    assert res["settings"]["protocol"] == "paper" and res["intervals"]["protocol"]["problems"] == []
    for meth, key in (("CE", "ce"), ("KD", "kd"), ("DiSK", "disk")):
        counts = res["intervals"][key]["counts"]
        assert sum(counts.values()) == 2 and set(counts) == {"A", "B", "C", "other"}
        assert res["intervals"]["protocol"]["seeds"][meth] == [0, 1]
        # the table's runs are the sweep's: their mean test accuracy is the one its repeats recorded
        assert res["intervals"][key]["mean_acc"] == pytest.approx(groups[key]["repeats"]["test_mean"])
        assert res["intervals"]["protocol"]["selected"][meth]["trial_id"] == groups[key]["best"]["trial_id"]

    # one MLflow experiment for the toy, one run per trial; the repeats rerun the selected configuration
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    exps = [e for e in client.search_experiments() if e.name != "Default"]
    assert [e.name for e in exps] == ["disk-paper-intervals"]
    runs = [r for r in client.search_runs([exps[0].experiment_id], max_results=1000)
            if r.data.tags.get("kdtune.role") == "trial"]  # fmt: skip
    assert len(runs) == 7 + 3
    by_id = {r.data.tags.get("kdtune.trial_id"): r for r in runs}
    for key, g in groups.items():
        best = by_id[g["best"]["trial_id"]]
        reps = [r for r in runs if r.data.params.get("phase") == "repeat" and r.data.tags.get("kdtune.method") == key]
        assert len(reps) == 1
        assert sorted(int(r.data.params["seed"]) for r in [best, *reps]) == [0, 1]
        hp = {k: v for k, v in best.data.params.items() if k.startswith(f"{key}.")}
        assert hp == {k: v for k, v in reps[0].data.params.items() if k.startswith(f"{key}.")}
        assert key == "ce" or hp  # KD's and DiSK's hyperparameters are logged, and equal

    # budget.repeat_warm_start: seed: DiSK's repeat starts from a CE student of its own seed (a stage), as
    # Tune's record of the repeat's configuration says
    snapshot = sorted((exp / "tune" / "repeats").glob("experiment_state-*.json"))[-1]
    configs = [json.loads(t[0])["config"] for t in json.loads(snapshot.read_text())["trial_data"]]
    (disk_rep,) = [c for c in configs if c["kdtune.group"].endswith("-disk-repeats")]
    init = yaml.safe_load((Path(disk_rep["train.init"]).parent / "config.yaml").read_text())
    assert (init["method"], init["model"], init["seed"]) == ("ce", "toy_interval_student", 1)
    assert all("train.init" not in c for c in configs if not c["kdtune.group"].endswith("-disk-repeats"))

    # the same command again reuses the finished sweep and prints the same table
    assert main(argv) == 0
    again = capsys.readouterr().out
    assert "is already finished" in again
    strip = lambda s: re.sub(r"this call \d+ s", "", s[s.index("DiSK toy problems"):])  # noqa: E731
    assert strip(again) == strip(out)
