"""``kdtune bench --sweep N`` and ``--simulate N`` (:mod:`kdtune.tune.scale`): on a tiny N through the real sweep path
every figure is printed and written, with sane values; the simulation gives the searcher's ask time by buckets of
trials; the figures' arithmetic holds on planted records; TPE's windowed sampler reads a bounded study."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")

from kdtune.tune import scale  # noqa: E402

SPEC = Path(__file__).resolve().parents[1] / "sweeps" / "scale-toy.yaml"


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from kdtune.tune.rayrt import init_ray

    started = init_ray()
    yield
    if started:
        ray.shutdown()


def test_sweep_bench_prints_and_writes_every_figure(tmp_path, capsys):
    from kdtune.bench import add_arguments, main

    p = argparse.ArgumentParser()
    add_arguments(p)
    out = tmp_path / "scale.json"
    args = p.parse_args(["--sweep", "6", "--spec", str(SPEC), "--storage", str(tmp_path / "runs"), "--probes", "2",
                         "--json", str(out)])  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    f = json.loads(out.read_text())
    o = f["orchestration"]
    assert f["finished"] == 6 and o["trials"] == 6 and 1 <= o["slots"] <= 2
    assert o["orch"]["n"] == 6 - o["slots"] and 0 < o["orch"]["median"] < 60_000
    assert o["work"]["median"] > 0 and all(o[k]["median"] > 0 for k in ("start", "close", "report", "gap"))
    # the parts of a trial's slot time add up to it (less its train and eval), trial by trial
    parts = sum(o[k]["median"] for k in ("start", "epoch", "close", "report", "gap"))
    assert 0.5 * o["orch"]["median"] < parts < 2 * o["orch"]["median"]
    assert 0 < o["training"] < o["held"] <= 1 and 0 < f["slot_utilisation"] <= 1
    r = f["rss"]
    assert r["samples"] >= 1 and 100 < r["start_mb"] <= r["peak_mb"] and r["end_mb"] > 0
    assert f["report"]["rc"] == 0 and f["report"]["wall_s"] > 0 and f["report"]["peak_rss_mb"] > 50
    assert f["locked"]["count"] == 0 and f["locked"]["files"] > 6  # every trial's events.jsonl at least
    assert len(f["mlflow"]) >= 3 and all(p["create_ms"] > 0 and p["log_metrics_ms"] > 0 for p in f["mlflow"])
    assert all(p["lookup_ms"] > 0 for p in f["mlflow"])
    calls = f["driver_calls"]
    assert sum(b["n"] for b in calls["ask"]) == 6 and sum(b["n"] for b in calls["tell"]) == 6  # not the preflight's
    assert sum(b["n"] for b in calls["mirror"]) == 6 and calls["snapshot"]
    for needle in ("orchestration: slot time - train - eval", "<= 100", "driver RSS:", "target <= 50", "MLflow on the",
                   "searcher ask", "kdtune report:", '"database is locked": 0', "target 0: ok"):  # fmt: skip
        assert needle in text, needle
    assert not (tmp_path / "runs" / "scale-toy-sweep6" / "sweep.lock").exists()


def test_simulation_gives_ask_time_by_buckets(tmp_path):
    lines = []
    f = scale.simulate(60, SPEC, tmp_path, bucket=20, probes=2, log=lines.append)
    asks = f["driver_calls"]["ask"]
    assert [b["calls"] for b in asks] == ["1-20", "21-40", "41-60"] and all(b["median"] > 0 for b in asks)
    assert [b["trials"] for b in f["buckets"]] == ["1-20", "21-40", "41-60"]
    for b in f["buckets"]:
        assert all(b[k] > 0 for k in ("rec_open_run", "rec_epoch", "rec_close", "in_trial", "gap"))
        assert b["rss_mb"] > 100
    assert f["fit_s"] > 0 and f["trials_per_s"] > 0 and f["gap_ms"]["n"] >= 58
    assert set(f["driver_share_pct"]) == {"ask", "tell", "mirror", "snapshot"} and f["rss"]["start_mb"] > 100
    assert [p["trials"] for p in f["mlflow"]] == [30, 60] and any("trials finished" in ln for ln in lines)
    from kdtune.bench import format_simulation

    assert "searcher ask" in format_simulation(f) and "open_run" in format_simulation(f)
    assert len(list((tmp_path / "scale-toy-sim60" / "trials").glob("*/done.json"))) == 60  # each record closed
    # Tune's statistics of every numeric key of a finished trial are dropped (ForgetStatistics): its snapshot,
    # written from the driver's trials after the run, holds none; the last result is kept
    state = json.loads(next((tmp_path / "scale-toy-sim60" / "tune").glob("*/experiment_state-*.json")).read_text())
    metas = [json.loads(meta) for _, meta in state["trial_data"]]
    assert len(metas) == 60 and all(m["metric_analysis"] == {} and m["metric_n_steps"] == {} for m in metas)
    assert all(m["last_result"].get("t_close") for m in metas)


def test_the_figures_of_planted_records(tmp_path):
    """Two slots of three trials each, with known times: the orchestration parts; a planted lock message; a driver
    whose RSS grows 0.05 MB per trial."""
    rows = []
    for pid, t0 in ((1, 0.0), (2, 0.05)):
        for i in range(3):
            o = t0 + i * 1.0  # open; start +0.1; epoch +0.3 (train+eval 0.15); done +0.4; closed +0.45; next open +1.0
            rows.append({"trial_id": f"{pid}-{i}", "pid": pid, "open": o, "start": o + 0.1, "epoch": o + 0.3, "end": o + 0.4,
                         "closed": o + 0.45, "work": 0.15, "save_ms": 2.0})  # fmt: skip
    o = scale.orchestration(rows)
    assert o["slots"] == 2 and o["trials"] == 6 and o["orch"]["n"] == 4
    want = {"orch": 850.0, "start": 100.0, "epoch": 50.0, "close": 100.0, "report": 50.0, "gap": 550.0, "work": 150.0}
    assert {k: o[k]["median"] for k in want} == pytest.approx(want)
    assert o["held"] == pytest.approx(6 * 0.45 / (2 * 2.5)) and o["training"] == pytest.approx(6 * 0.15 / (2 * 2.5))
    (tmp_path / "trials" / "a").mkdir(parents=True)
    (tmp_path / "trials" / "a" / "events.jsonl").write_text('{"event": "unrecorded", "reason": "OperationalError: '
                                                            'Database is locked"}\n')  # fmt: skip
    (tmp_path / "mlflow.db").write_bytes(b"database is locked")  # a database's bytes are no log
    got = scale.count_locked([tmp_path], ["all good"])
    assert got["count"] == 1 and got["files"] == 1 and got["found_in"][0].endswith("events.jsonl")
    assert scale.count_locked([tmp_path], ["x database is locked"])["count"] == 2
    samples = [(float(t), 100.0 + 0.05 * t) for t in range(0, 2001, 10)]  # one trial finishes per second
    r = scale.rss_growth(samples, [float(t) for t in range(1, 2001)])
    assert r["per_1000_trials_mb"] == pytest.approx(50.0, abs=0.5) and r["start_mb"] == pytest.approx(100.5)


def test_windowed_tpe_reads_a_bounded_study():
    import optuna

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(300):
        t = study.ask()
        t.suggest_float("x", 0, 1)
        study.tell(t, float(i % 97))  # the best are spread over the whole study
    study.ask().suggest_float("x", 0, 1)  # one left running
    trials = study.get_trials(deepcopy=False)
    from kdtune.tune.search import TPE_WINDOW, WindowedTPESampler, recent

    kept = recent(trials, 100)
    best = sorted((t for t in trials if t.value is not None), key=lambda t: -t.value)[:25]
    assert {t.number for t in best} <= {t.number for t in kept} and trials[-1] in kept
    assert {t.number for t in trials[-100:]} <= {t.number for t in kept} and len(kept) < 150
    assert recent(trials[:50], 100) == trials[:50]
    w = optuna.create_study(direction="maximize", sampler=WindowedTPESampler(250, seed=0))
    w.add_trials(trials[:300])
    t = w.ask()
    assert 0 <= t.suggest_float("x", 0, 1) <= 1 and "_get_trials" not in vars(w)  # the cut was for that ask only
    # a study within kdtune's window samples exactly as Optuna's TPE does
    asked = []
    for sampler in (optuna.samplers.TPESampler(seed=3), WindowedTPESampler(TPE_WINDOW, seed=3)):
        s = optuna.create_study(direction="maximize", sampler=sampler)
        s.add_trials(trials[:300])
        asked.append([s.ask().suggest_float("x", 0, 1) for _ in range(5)])
    assert asked[0] == asked[1]
    rows = scale.tpe_scaling(lambda t: t.suggest_float("x", 0, 1), [300], window=250, reps=2)
    assert list(rows[0]) == ["trials", "default", "n_ei_candidates=8", "multivariate=False", "window=250"]
    assert all(v > 0 for v in rows[0].values())


def test_the_driver_runs_tune_with_a_short_gil_switch_interval_and_restores_it():
    """Tune's loop wakes often while the mirror's thread holds the GIL: during ``fit`` the driver's switch interval
    is SWITCH_S, and Python's own comes back after it, also when ``fit`` raises."""
    import sys
    from types import SimpleNamespace

    from kdtune.tune.tuning import SWITCH_S, Tuning

    seen = []
    before = sys.getswitchinterval()

    class Results(list):
        num_terminated, num_errors = 1, 0

    def fit():
        seen.append(sys.getswitchinterval())
        return Results([1])

    assert Tuning.tune_fit(SimpleNamespace(), SimpleNamespace(fit=fit), 1, Path("x")) == [1]
    assert seen == [pytest.approx(SWITCH_S)] and SWITCH_S < before and sys.getswitchinterval() == before

    def boom():
        raise RuntimeError("fit failed")

    with pytest.raises(RuntimeError, match="fit failed"):
        Tuning.tune_fit(SimpleNamespace(), SimpleNamespace(fit=boom), 1, Path("x"))
    assert sys.getswitchinterval() == before
