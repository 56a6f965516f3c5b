"""Sweeps end to end on digits with a local Ray (one session for the module): stages trained once and cached,
OptunaSearch starting at the published points, the Optuna database mirror, one MLflow run per trial under
the sweep's parent run, the best student registered, a diverging trial failing alone, repeats over seeds,
and the refusals (finished experiment, changed spec, a running sweep's lock)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")

from kdtune.errors import ConfigError  # noqa: E402
from kdtune.spec import load_spec  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # trials of seconds: sample often
    from kdtune.tune.rayrt import init_ray

    started = init_ray()
    yield
    if started:
        ray.shutdown()


def make_spec(tmp_path, **over) -> dict:
    d = {
        "name": "mini", "data": "digits", "teacher": {"model": "resnet8", "train": {"epochs": 1}},
        "students": ["resnet8"],
        "methods": {"kd": {}, "disk": {"trials": 1}},
        "budget": {"trials": 3, "epochs": 2, "concurrency": 2, "cpus_per_trial": 1},
        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
        "train": {"device": "cpu", "batch_size": 128},
        "storage": str(tmp_path / "runs"), "tracking": {"enabled": True}, "seed": 0,
    }  # fmt: skip
    d.update(over)
    return d


BUDGET = {"trials": 3, "epochs": 2, "concurrency": 2, "cpus_per_trial": 1}


@pytest.fixture(scope="module", params=[1, "auto"], ids=["lone", "fused"])
def main_sweep(tmp_path_factory, request):
    """The same sweep run with units of one trial and with ``fuse: auto`` (on the CPU KD's trials fused in units
    of up to 4; DiSK, which cannot fuse, alone): one set of assertions checks both paths of the one trainable."""
    import kdtune

    tmp = tmp_path_factory.mktemp(f"sweep-fuse{request.param}")
    lines: list[str] = []
    # tracking.models: the lone sweep logs each group's best student (the default), the fused one every student
    models = "best" if request.param == 1 else "all"
    spec = make_spec(tmp, budget={**BUDGET, "fuse": request.param}, tracking={"enabled": True, "models": models})
    result = kdtune.sweep(spec, log=lines.append)  # the API
    return tmp, result, lines


def same_spec(tmp, **over) -> dict:
    """The fixture's spec again: its budget (fuse) and tracking read back from the experiment's saved spec."""
    saved = yaml.safe_load((tmp / "runs" / "mini" / "spec.yaml").read_text())
    tracking = {"enabled": True, "models": saved["tracking"]["models"]}
    return make_spec(tmp, **{"budget": result_budget(tmp), "tracking": tracking, **over})


def result_budget(tmp) -> dict:
    """The budget the fixture's sweep ran with (its fuse), read back from the experiment's saved spec."""
    return {**BUDGET, "fuse": yaml.safe_load((tmp / "runs" / "mini" / "spec.yaml").read_text())["budget"]["fuse"]}


def test_sweep_results_and_stages(main_sweep):
    tmp, result, lines = main_sweep
    assert result.status == "finished"
    assert [(g["student"], g["method"]) for g in result.groups] == [("resnet8", m) for m in ("kd", "disk")]
    kd, disk = result.groups
    assert kd["trials"] == 3 and disk["trials"] == 1
    assert all(g["errored"] == 0 and g["best"]["val_acc"] > 10 for g in result.groups)
    # the published starting points (CRD's KD, and the logit-standardisation paper's) are KD trials
    configs = [t["config"] for t in kd["all"]]
    assert {"T": 4.0, "w_ce": 0.1, "w_kd": 0.9, "logit_std": False} in configs
    assert {"T": 2.0, "w_ce": 0.1, "w_kd": 9.0, "logit_std": True} in configs
    # stages: teacher and DiSK's CE student, trained once, complete, cached; DiSK started at delta = CE error
    assert set(result.stages) == {"teacher", "ce-resnet8"}
    ce_stage = result.stages["ce-resnet8"]
    assert 0.0 <= ce_stage["train_error"] <= 1.0
    assert disk["best"]["config"]["delta_offset"] == 0.0
    stages_dir = tmp / "runs" / "stages"
    dirs = sorted(p.name for p in stages_dir.iterdir() if p.name != "teacher-store")
    assert len(dirs) == 2 and not any(d.startswith(".tmp") for d in dirs)
    # the distillation trials shared the teacher's outputs through the store: every epoch written once, whole
    from kdtune.engine.teacher_store import SUFFIX, check_file

    published = sorted((stages_dir / "teacher-store").glob(f"*/epoch-*{SUFFIX}"))
    assert published and all(check_file(p) is None for p in published)
    for d in dirs:
        assert (stages_dir / d / "final.pt").is_file() and (stages_dir / d / "result.json").is_file()
    assert any(ln.startswith("stage teacher: training") for ln in lines)
    assert any("finished in" in ln for ln in lines)
    # every trial reported its orchestration share; the sweep summarises it in one line, last
    assert all(0.0 < t["orch_frac"] < 1.0 for g in result.groups for t in g["all"])
    assert lines[-1].startswith("orchestration (checkpoints, MLflow, Tune reports): median ")
    assert f"over {sum(g['trials'] for g in result.groups)} trials" in lines[-1]
    assert sum(1 for ln in lines if "resnet8-kd " in ln and ("done" in ln or "pruned at epoch" in ln)) == 3
    # a later sweep with the same stage definition reuses it
    from kdtune.tune.stages import ensure_stage

    spec = load_spec(same_spec(tmp))
    again = ensure_stage("teacher", spec.teacher_stage_config(), spec.stages_dir, log=lines.append)
    assert again.cached and str(again.dir) == result.stages["teacher"]["dir"]
    # the experiment folder
    exp = tmp / "runs" / "mini"
    state = json.loads((exp / "state.json").read_text())
    assert state["status"] == "finished" and not (exp / "sweep.lock").exists()
    assert (exp / "spaces" / "kd.py").is_file() and (exp / "results.json").is_file()


def test_optuna_database_mirror(main_sweep):
    import optuna

    tmp, result, _ = main_sweep
    kd = result.group("kd")
    study = optuna.load_study(
        study_name="resnet8-kd", storage=f"sqlite:///{tmp / 'runs' / 'mini' / 'optuna.db'}"
    )
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.user_attrs["tune_trial_id"] for t in trials) == sorted(t["trial_id"] for t in kd["all"])
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert all(set(t.params) == {"T", "w_ce", "w_kd", "logit_std"} for t in trials)
    by_id = {t["trial_id"]: t for t in kd["all"]}
    for t in trials:
        assert t.params == by_id[t.user_attrs["tune_trial_id"]]["config"]
        assert t.value == pytest.approx(by_id[t.user_attrs["tune_trial_id"]]["val_acc"])


def test_mlflow_runs(main_sweep):
    from mlflow import MlflowClient

    tmp, result, _ = main_sweep
    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mini' / 'mlflow.db'}")
    eid = client.get_experiment_by_name("mini").experiment_id
    runs = client.search_runs([eid], max_results=1000)
    roles = [r.data.tags.get("kdtune.role") for r in runs]
    assert roles.count("parent") == 1 and roles.count("stage") == 2
    for r in runs:  # tags that name places name real ones
        for k in ("kdtune.trial_dir", "kdtune.stage_dir", "kdtune.experiment_dir"):
            if k in r.data.tags:
                assert Path(r.data.tags[k]).is_dir() and Path(r.data.tags[k]).is_absolute(), (k, r.data.tags[k])
    assert all("kdtune.stage_dir" in r.data.tags for r in runs if r.data.tags.get("kdtune.role") == "stage")
    parent = next(r for r in runs if r.data.tags.get("kdtune.role") == "parent")
    assert parent.info.status == "FINISHED"
    # a training experiment (the UI opens on its runs); the parent carries the sweep's summary
    assert client.get_experiment(eid).tags["mlflow.experimentKind"] == "custom_model_development"
    for g in result.groups:
        assert parent.data.metrics[f"best.{g['group']}.val_acc"] == pytest.approx(g["best"]["val_acc"])
    assert 0 < parent.data.metrics["slot_utilisation"] <= 1
    assert "resnet8" in parent.data.tags["mlflow.note.content"] and "kd" in parent.data.tags["mlflow.note.content"]
    trial_runs = [r for r in runs if r.data.tags.get("kdtune.role") == "trial"]
    tune_ids = [t["trial_id"] for g in result.groups for t in g["all"]]
    assert sorted(r.data.tags["kdtune.trial_id"] for r in trial_runs) == sorted(tune_ids)
    for r in trial_runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["kdtune.outcome"] in ("completed", "pruned")
        assert Path(r.data.tags["kdtune.trial_dir"]).is_dir()  # a real place: the trial's own folder
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.params["method"] in ("kd", "disk") and r.data.params["student"] == "resnet8"
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_acc")]
        assert steps and steps == sorted(set(steps)) and steps[0] == 1
        assert "loss_ce" in r.data.metrics or "loss_kd" in r.data.metrics
        # orchestration (checkpoints, MLflow, Tune reports) is measured and logged as a share of wall time
        assert 0.0 < r.data.metrics["system/orch_frac"] < 1.0 and r.data.metrics["system/orch_s"] > 0.0
        # the bookkeeping in MLflow's System metrics tab, apart from the accuracy, loss and lr curves
        assert r.data.metrics["system/host_rss_mb"] > 0.0 and r.data.metrics["lr"] > 0.0
        top = {k for k in r.data.metrics if "/" not in k}
        assert not top & {"epoch", "epochs", "host_rss_mb", "orch_s", "orch_frac", "eval_s", "train_s"}, top
    kd_runs = [r for r in trial_runs if r.data.params["method"] == "kd"]
    # params named by method and training field; the seed once, as `seed`
    assert all({"kd.T", "kd.w_kd", "train.lr", "train.weight_decay", "seed"} <= set(r.data.params) for r in kd_runs)
    assert not any(k in ("T", "lr", "train.seed") for r in kd_runs for k in r.data.params)
    # MLflow's runs table opens on saved views: all trials, and each group with the names it searches
    from kdtune.tracking.views import views_of

    views = views_of(client.get_experiment(parent.info.experiment_id).tags.items())
    assert "kdtune-trials" in views and "metrics.`val_acc`" in views["kdtune-trials"]["state"]["selectedColumns"]
    kd_view = [v for k, v in views.items() if k.endswith("-kd")]
    assert kd_view and all(c.startswith(("metrics.", "params.`kd.", "params.`train.", "params.`method", "params.`student",
                                         "tags.")) for c in kd_view[0]["state"]["selectedColumns"])  # fmt: skip
    # MLflow's own system metrics, on at least one trial (a trial shorter than one sample has none)
    assert any(k.startswith("system/cpu_utilization") for r in trial_runs for k in r.data.metrics)
    # a student is named after its trial, with a signature: every completed trial's (tracking.models: all), or
    # each group's best trial's, logged by the driver into that trial's run (best)
    done = [r for r in trial_runs if r.data.tags["kdtune.outcome"] == "completed"]
    models = client.search_logged_models([eid])
    names = {m.name for m in models}
    assert "model" not in names
    if yaml.safe_load((tmp / "runs" / "mini" / "spec.yaml").read_text())["tracking"]["models"] == "all":
        assert names >= {r.info.run_name for r in done}
    else:
        best_runs = {g["best"]["mlflow_run_id"] for g in result.groups}
        assert {m.source_run_id for m in models} == best_runs and len(models) == len(best_runs) < len(done)
        assert names == {r.info.run_name for r in trial_runs if r.info.run_id in best_runs}
    # the parent: the spec as one artifact, a handful of params
    assert "spec.yaml" in {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert parent.data.params["methods"] == "kd, disk" and len(parent.data.params) <= 25
    # the sweep's best student is registered with an alias, from the best trial's run
    best = result.best
    assert best["mlflow_run_id"] and "models:/mini@best" in best["registered"]
    mv = client.get_model_version_by_alias("mini", "best")
    assert mv.run_id == best["mlflow_run_id"]
    assert best["method"] in mv.description and "resnet8 student" in mv.description
    assert "best student of kdtune sweep 'mini'" in client.get_registered_model("mini").description


def test_second_call_reports_a_finished_sweep_and_a_changed_spec_is_refused(main_sweep):
    from kdtune.tune import sweep

    tmp, result, _ = main_sweep
    lines: list[str] = []
    again = sweep(same_spec(tmp), log=lines.append)
    assert "already finished" in lines[0]
    assert [g["best"]["trial_id"] for g in again.groups] == [g["best"]["trial_id"] for g in result.groups]
    changed = same_spec(tmp, budget={**result_budget(tmp), "trials": 4})
    with pytest.raises(ConfigError, match=r"budget\.trials"):
        sweep(changed)


def test_a_running_sweep_holds_the_lock(tmp_path):
    from kdtune.tune import sweep

    exp = tmp_path / "runs" / "locked"
    exp.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (exp / "sweep.lock").write_text(
            json.dumps({"pid": live.pid, "host": socket.gethostname(), "started": 0})
        )
        with pytest.raises(ConfigError, match=f"being swept by pid {live.pid}"):
            sweep(make_spec(tmp_path, name="locked", methods=["ce"]))
    finally:
        live.kill()
        live.wait()


def test_diverging_trial_fails_alone(tmp_path):
    """Two trials of one group, one with a learning rate that makes the loss NaN: it ends diverged, with the
    reason in its MLflow run and its done.json (so no retry trains it again), the other trial and the sweep go
    on."""
    from mlflow import MlflowClient

    from kdtune.tune import sweep

    points = [{"smoothing": 0.1, "lr": 1.0e5}, {"smoothing": 0.1, "lr": 0.05}]
    spec = make_spec(
        tmp_path, name="nan", teacher=None, failures={"max_failures": 1},
        methods={"ls": {"space": {"lr": [1.0e5, 0.05], "smoothing": [0.1]}, "starts": points, "trials": 2}},
        budget={"trials": 2, "epochs": 1, "concurrency": 2, "cpus_per_trial": 1},
    )  # fmt: skip
    result = sweep(spec, log=lambda s: None)
    assert result.status == "finished"
    ls = result.group("ls")
    by_lr = {t["config"]["lr"]: t for t in ls["all"]}
    err = by_lr[1.0e5]["error"] or ""
    assert ls["errored"] == 1 and "DivergedError" in err and "loss became nan" in err, err
    assert by_lr[0.05]["error"] is None and ls["best"]["config"]["lr"] == 0.05
    exp = tmp_path / "runs" / "nan"
    assert by_lr[1.0e5]["outcome"] == "diverged"
    done = json.loads((exp / "trials" / by_lr[1.0e5]["trial_id"] / "done.json").read_text())
    assert done["outcome"] == "diverged" and "loss became nan" in done["error"]
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("nan").experiment_id
    runs = [r for r in client.search_runs([eid]) if r.data.tags.get("kdtune.role") == "trial"]
    search = [r for r in runs if r.data.params.get("phase") == "search"]
    assert len(search) == 2  # one run per trial
    failed = [r for r in search if r.info.status == "FAILED"]
    assert len(failed) == 1 and "diverged" in failed[0].data.tags["kdtune.failure_reason"]
    assert "loss became nan" in failed[0].data.tags["kdtune.failure_reason"]


@pytest.mark.slow
def test_repeats_rerun_the_best_config_with_more_seeds(tmp_path):
    from mlflow import MlflowClient

    from kdtune.tune import sweep

    spec = make_spec(tmp_path, name="rep", teacher=None, methods=["ce"],
                     budget={"trials": 1, "epochs": 1, "concurrency": 2, "repeats": 3})  # fmt: skip
    result = sweep(spec, log=lambda s: None)
    rep = result.group("ce")["repeats"]
    assert rep["seeds"] == [0, 1, 2] and rep["n"] == 3
    assert len(set(rep["test"])) > 1 and rep["test_std"] > 0  # different seeds, different students
    assert "±" in result.table()
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'rep' / 'mlflow.db'}")
    eid = client.get_experiment_by_name("rep").experiment_id
    runs = [r for r in client.search_runs([eid]) if r.data.params.get("phase") == "repeat"]
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]  # the seed is logged once, as `seed`


def test_cli_validate_and_yaml_roundtrip(tmp_path, capsys):
    from kdtune.cli import main

    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(make_spec(tmp_path)))
    assert main(["validate", str(p)]) == 0
    out = capsys.readouterr().out
    assert "is valid" in out and "resnet8-kd: 3 trials; searches T, w_ce, w_kd, logit_std; 2 starting points" in out
    assert "resnet8-disk: 1 trial; searches" in out and "delta_offset" in out


def test_schedulers():
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    from kdtune.tune.search import make_scheduler

    def spec(s):
        return load_spec({"name": "s", "data": "digits", "students": ["resnet8"], "methods": ["ce"],
                          "budget": {"epochs": 12}, "scheduler": s})  # fmt: skip

    a = make_scheduler(spec({"name": "asha", "grace_period": 3, "reduction_factor": 3}))
    assert isinstance(a, ASHAScheduler) and a._max_t == 12 and a._reduction_factor == 3
    assert isinstance(make_scheduler(spec("hyperband")), HyperBandScheduler)
    assert isinstance(make_scheduler(spec("none")), FIFOScheduler)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_unit_without_a_value_is_not_handed_to_asha():
    """A unit whose members all diverged reports a NaN metric: ASHA must neither rank it nor compute a cutoff
    from it (numpy's "All-NaN slice" warning, seen in a full run when the diverged result came first)."""
    from types import SimpleNamespace

    from kdtune.tune.search import GROUP_KEY, GroupedScheduler

    sched = GroupedScheduler(lambda: __import__("ray.tune.schedulers", fromlist=["x"]).ASHAScheduler(
        time_attr="training_iteration", metric="val_acc", mode="max", max_t=4, grace_period=1, reduction_factor=2),
        "val_acc", "max")  # fmt: skip
    bad = SimpleNamespace(trial_id="a", config={GROUP_KEY: "g"})
    good = SimpleNamespace(trial_id="b", config={GROUP_KEY: "g"})
    for t in (bad, good):
        sched.on_trial_add(None, t)
    nan = {"training_iteration": 1, "val_acc": float("nan")}
    assert sched.on_trial_result(None, bad, nan) == "CONTINUE"
    sched.on_trial_complete(None, bad, nan)  # removed, not recorded: no warning, no NaN at the rung
    assert "a" not in sched.subs["g"]._trial_info
    assert sched.on_trial_result(None, good, {"training_iteration": 1, "val_acc": 50.0}) == "CONTINUE"


def test_orchestration_clock_counts_only_the_bookkeeping():
    from kdtune.tune.trainable import OrchestrationClock

    now = [0.0]
    clock = OrchestrationClock(clock=lambda: now[0])
    for _ in range(3):
        now[0] += 9.0  # an epoch of training
        clock.begin()
        now[0] += 0.5  # checkpoint writes and logging before the figures are taken
        fig = clock.figures()
        now[0] += 0.5  # the report
        clock.end()
    # two whole epochs' bookkeeping (1 s each) and this epoch's first half second, over 29.5 s of wall time
    assert fig["orch_s"] == pytest.approx(2.5)
    assert fig["orch_frac"] == pytest.approx(2.5 / 29.5)
    assert clock.figures() == {"orch_s": pytest.approx(3.0), "orch_frac": pytest.approx(3.0 / 30.0)}


def test_groups_share_one_experiment_each_gets_its_budget_and_pruned_is_pruned(tmp_path):
    """Three groups with budgets 1, 3 and 5 run interleaved in one Tune experiment; early-stopped trials are
    PRUNED in optuna.db and ``pruned`` in MLflow, with the epoch they stopped at."""
    import optuna
    from mlflow import MlflowClient

    from kdtune.tune.record import read_events
    from kdtune.tune.runner import sweep

    raw = make_spec(tmp_path, name="three", methods={"ce": {}, "kd": {"trials": 3}, "dkd": {"trials": 5}},
                    budget={"trials": 3, "epochs": 4, "concurrency": 2, "cpus_per_trial": 1},
                    scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 4})  # fmt: skip
    lines: list[str] = []
    result = sweep(raw, log=lines.append)
    exp = Path(result.experiment_dir)
    assert [(g["method"], g["trials"]) for g in result.groups] == [("ce", 1), ("kd", 3), ("dkd", 5)]
    assert list((exp / "tune").iterdir()) == [exp / "tune" / "sweep"]  # one Tune experiment

    spans = {}
    for g in result.groups:
        for t in g["all"]:
            ev = read_events(exp / "trials" / t["trial_id"])
            spans.setdefault(g["method"], []).append(
                (min(e["time"] for e in ev if e["event"] == "open"), max(e["time"] for e in ev))
            )  # fmt: skip

    def spans_overlap(a, b):
        return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)

    assert spans_overlap(spans["kd"], spans["dkd"]) and (
        spans_overlap(spans["ce"], spans["kd"]) or spans_overlap(spans["ce"], spans["dkd"])
    ), spans  # interleaved, not one group after another
    assert result.slot_utilisation is not None and 0 < result.slot_utilisation <= 1.0
    assert any(ln.startswith("slot utilisation:") for ln in lines)

    storage = f"sqlite:///{exp / 'optuna.db'}"
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name("three").experiment_id
    runs = {r.data.tags["kdtune.trial_id"]: r for r in client.search_runs([eid], max_results=1000)
            if r.data.tags.get("kdtune.role") == "trial"}  # fmt: skip
    pruned = 0
    for g in result.groups:
        study = optuna.load_study(study_name=g["group"], storage=storage)
        by_id = {t.user_attrs["tune_trial_id"]: t for t in study.get_trials(deepcopy=False)}
        assert sorted(by_id) == sorted(t["trial_id"] for t in g["all"])  # its budget, each trial once
        assert study.metric_names == ["val_acc"]
        for t in g["all"]:
            ot, run = by_id[t["trial_id"]], runs[t["trial_id"]]
            assert ot.datetime_start < ot.datetime_complete
            if t["epochs_run"] < 4:
                pruned += 1
                assert t["outcome"] == "pruned" and ot.state.name == "PRUNED", (t, ot.state)
                assert run.data.tags["kdtune.outcome"] == "pruned"
                assert run.data.tags["kdtune.stopped_epoch"] == str(t["epochs_run"])
                assert "kdtune.failure_reason" not in run.data.tags
            else:
                assert t["outcome"] == "completed" and ot.state.name == "COMPLETE"
                assert run.data.tags["kdtune.outcome"] == "completed"
            assert run.info.status == "FINISHED"
    assert pruned >= 1, "ASHA stopped no trial: the test did not exercise PRUNED"


def test_all_trials_failed_is_a_failed_sweep(tmp_path, capsys):
    """``kdtune sweep`` of a sweep whose every trial failed exits 1, with one line per cause."""
    from kdtune.cli import main

    raw = make_spec(tmp_path, name="allfail", teacher=None, methods={"ce": {}},
                    train={"device": "cpu", "batch_size": 128, "lr": 1.0e6}, tracking={"enabled": False},
                    budget={"trials": 1, "epochs": 2, "concurrency": 1, "cpus_per_trial": 1})  # fmt: skip
    path = tmp_path / "allfail.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["sweep", str(path)]) == 1
    err = capsys.readouterr().err
    assert "kdtune: error: sweep allfail: every trial failed" in err and "Traceback" not in err
    assert "diverged" in err.lower() or "nan" in err.lower()
    state = json.loads((tmp_path / "runs" / "allfail" / "state.json").read_text())
    assert state["status"] == "failed"


def test_live_progress_table_on_a_terminal_lines_in_a_pipe(capsys):
    """On a terminal the printer redraws a table of the running trials (group, trial, epoch/total, metric, best
    so far, ETA); in a pipe only the one line per finished trial."""
    from types import SimpleNamespace

    from kdtune.tune.callbacks import ProgressPrinter
    from kdtune.tune.search import GROUP_KEY

    def trial(tid, group, last=None):
        return SimpleNamespace(trial_id=tid, config={GROUP_KEY: group, "T": 4.0}, last_result=last or {})

    for live in (True, False):
        lines: list[str] = []
        p = ProgressPrinter("val_acc", 10, total=2, log=lines.append, refresh_s=0.0, live=live)
        a, b = trial("aaa", "resnet8-kd"), trial("bbb", "resnet8-dkd")
        p.on_trial_start(0, [], a)
        p.on_trial_start(0, [], b)
        p.on_trial_result(0, [], a, {"epoch": 3, "training_iteration": 3, "val_acc": 61.5})
        p.on_step_end(0, [])
        out = capsys.readouterr().out
        if live:
            assert "resnet8-kd" in out and "aaa" in out and "3/10" in out and "61.50" in out
            assert "ETA" in out and "0/2 trials done" in out
        else:
            assert out == ""
        a.last_result = {"epoch": 10, "training_iteration": 10, "val_acc": 70.0, "test_acc": 69.0}
        p.on_trial_complete(0, [], a)
        assert lines == ["  [1/2] resnet8-kd         aaa  done                 val_acc 70.00 (test 69.00)  T=4"]
        cleared = capsys.readouterr().out
        # the table (count line, header, rule, two trials) goes before the line is printed
        assert cleared == ("\x1b[5F\x1b[J" if live else "")


def _sweep_one_ce_trial(tmp_path, name: str) -> int:
    """``kdtune sweep`` (in this process) of a one-trial, one-epoch CE spec named ``name``; its exit status."""
    from kdtune.cli import main

    raw = make_spec(tmp_path, name=name, methods={"ce": {}}, teacher=None,
                    budget={"trials": 1, "epochs": 1, "concurrency": 1, "cpus_per_trial": 1})  # fmt: skip
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return main(["sweep", str(path)])


def test_tracking_store_opens_beside_ray_and_its_failure_fails_the_sweep(tmp_path, capsys, monkeypatch):
    """The driver opens the MLflow store in a thread of its own while Ray starts; an error there still stops the
    sweep in one line, before any trial, with the state ``failed``."""
    import threading

    from kdtune.errors import KdtuneError
    from kdtune.tracking import SweepTracker

    opened_on: list[str] = []

    def refuse(self, uri, name):
        opened_on.append(threading.current_thread().name)
        raise KdtuneError(f"tracking store {uri} cannot be opened (test); fix it")

    monkeypatch.setattr(SweepTracker, "__init__", refuse)
    assert _sweep_one_ce_trial(tmp_path, "notrack") != 0
    err = capsys.readouterr().err
    assert "cannot be opened (test); fix it" in err and "Traceback" not in err
    assert opened_on == ["kdtune-open-tracker"]
    exp = tmp_path / "runs" / "notrack"
    assert json.loads((exp / "state.json").read_text())["status"] == "failed"
    assert not (exp / "trials").exists() or not any((exp / "trials").iterdir())


def test_ray_failing_to_start_waits_for_the_tracking_store(tmp_path, capsys, monkeypatch):
    """Ray failing to start ends the sweep in one line, but only after the thread opening the MLflow store has
    finished (a process ending mid-migration would leave a half-built mlflow.db)."""
    import time as _time

    from kdtune.errors import KdtuneError
    from kdtune.tracking import SweepTracker
    from kdtune.tune import rayrt

    finished: list[bool] = []
    real_init = SweepTracker.__init__

    def slow_open(self, uri, name):
        _time.sleep(1.5)
        real_init(self, uri, name)
        finished.append(True)

    def no_ray():
        raise KdtuneError("Ray could not start (test); free its ports and run the command again")

    monkeypatch.setattr(SweepTracker, "__init__", slow_open)
    monkeypatch.setattr(rayrt, "init_ray", no_ray)
    assert _sweep_one_ce_trial(tmp_path, "noray") != 0
    assert finished == [True], "the sweep ended before the tracking store was open"
    err = capsys.readouterr().err
    assert "Ray could not start (test)" in err and "Traceback" not in err


def test_optuna_mirror_drops_orphans_and_catches_up_after_a_restore(tmp_path):
    """A driver killed after the mirror wrote a trial but before Tune's snapshot named it leaves an orphan in the
    group's study (the restored Tune run asks anew in its place): the next driver's mirror rebuilds the study
    without it, keeping the others' values and curves; a study lost in such a rebuild is refilled from Tune's
    finished trials."""
    import pickle
    from types import SimpleNamespace

    import optuna

    from kdtune.tune.callbacks import OptunaMirror
    from kdtune.tune.search import GROUP_KEY

    url = f"sqlite:///{tmp_path / 'optuna.db'}"

    def trial(tid, acc, status="TERMINATED"):
        return SimpleNamespace(trial_id=tid, config={GROUP_KEY: "g", "lr": 0.1}, status=status,
                               last_result={"val_acc": acc, "epoch": 2, "training_iteration": 2})  # fmt: skip

    def ids():
        study = optuna.load_study(study_name="g", storage=url)
        return sorted(t.user_attrs["tune_trial_id"] for t in study.get_trials(deepcopy=False))

    a, b, c, d = trial("a", 50.0), trial("b", 60.0), trial("c", 70.0), trial("d", 80.0)
    first = OptunaMirror(url, "val_acc", "max", epochs=2)
    for t in (a, b):
        for ep in (1, 2):
            first.on_trial_result(0, [a, b], t, {"val_acc": t.last_result["val_acc"] - 2 + ep, "training_iteration": ep})
        first.on_trial_complete(0, [a, b], t)
    first.flush()  # the writes are the mirror's writer thread's; Tune's end (on_experiment_end) waits for them
    assert ids() == ["a", "b"]
    # killed before the snapshot named b: the restored run knows a (finished) and asks c in b's place
    second = pickle.loads(pickle.dumps(first))
    second.on_trial_complete(0, [a, c], c)
    second.flush()
    assert ids() == ["a", "c"]
    kept = {t.user_attrs["tune_trial_id"]: t for t in optuna.load_study(study_name="g", storage=url).get_trials()}
    assert kept["a"].value == 50.0 and kept["a"].intermediate_values == {1: 49.0, 2: 50.0}
    # a driver killed in the middle of a rebuild: the study is gone; the next one refills it from Tune's trials
    optuna.delete_study(study_name="g", storage=url)
    third = pickle.loads(pickle.dumps(first))
    third.on_trial_complete(0, [a, c, d], d)
    third.on_experiment_end([a, c, d])
    assert ids() == ["a", "c", "d"]
    # killed between d's end and its write, then resumed with nothing left to run in the group: the study gets d
    # at the end of the Tune run that ran nothing (CI's kill test at a trial's "done" moment lost it so)
    e = trial("e", 90.0)
    study = optuna.load_study(study_name="g", storage=url)
    fourth = pickle.loads(pickle.dumps(first))
    fourth.on_experiment_end([a, c, d, e])
    assert ids() == ["a", "c", "d", "e"]
    assert [t.value for t in study.get_trials() if t.user_attrs["tune_trial_id"] == "e"] == [90.0]
    # Ctrl-C: Tune ends the live units as TERMINATED without on_trial_complete, then on_experiment_end; a unit
    # started in that process and ended by no callback is not finished (it resumes from Tune's snapshot)
    f = trial("f", 10.0)
    fifth = pickle.loads(pickle.dumps(first))
    fifth.on_trial_start(0, [a, c, d, e, f], f)
    fifth.on_experiment_end([a, c, d, e, f])
    assert ids() == ["a", "c", "d", "e"]
