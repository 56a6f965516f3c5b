"""The sweep path at thousands of short trials, measured: ``kdtune bench --sweep N`` and ``--simulate N``.

:func:`sweep_bench`: a real sweep (:func:`kdtune.tune.runner.sweep`, what ``kdtune sweep`` runs) of N 1-epoch trials,
figures from its records (events, MLflow runs, logs, ``kdtune report``) and from its driver, this process
(:class:`Watch`). :func:`simulate`: the driver's own pieces over trials that report at once (:func:`sim_trial`);
:func:`tpe_scaling`: TPE's ask against a study's size. More: docs/bench.md, "Sweep scale".
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kdtune.errors import ConfigError
from kdtune.tune.protocol import GROUP_KEY

TARGETS = {"orch_ms": 100.0, "rss_mb_per_1000": 50.0, "report_s": 10.0, "report_trials": 2000, "locked": 0}
LOCKED = "database is locked"
PROGRESS = re.compile(r"^\s*\[(\d+)/\d+\]")  # ProgressPrinter's line per finished trial
EPOCH = dict.fromkeys("val_acc best_val_acc test_acc best_test_acc val_loss test_loss train_loss loss_ce loss_kd lr val_agree "
                      "val_kl_teacher train_s eval_s orch_s orch_frac train_images_per_s host_rss_mb bundle_size".split(), 1.0)


def clock(sink: dict, key: str, fn, *a, **kw):  # fn(*a, **kw), its ms appended to sink[key]
    t = time.perf_counter()
    out = fn(*a, **kw)
    sink.setdefault(key, []).append(1e3 * (time.perf_counter() - t))
    return out


def quant(xs, scale: float = 1.0) -> dict:
    """n, median and p90 (nearest rank) of ``xs`` times ``scale`` (None left out)."""
    xs = sorted(x * scale for x in xs if x is not None)
    if not xs:
        return {"n": 0, "median": None, "p90": None}
    return {"n": len(xs), "median": round(statistics.median(xs), 2), "p90": round(xs[round(0.9 * (len(xs) - 1))], 2)}


def buckets(calls: dict[str, list], size: int) -> dict[str, list[dict]]:
    """Each kind of :func:`timed` call by buckets of ``size`` calls (snapshots: five buckets): n, median, p90."""
    out = {}
    for key, v in calls.items():
        n, groups = size if key != "snapshot" else max(1, -(-len(v) // 5)), {}
        for k, ms, _ in v:
            groups.setdefault((k - 1) // n, []).append(ms)
        out[key] = [{"calls": f"{b * n + 1}-{b * n + len(g)}", **quant(g)} for b, g in sorted(groups.items())]
    return out


class Watch:
    """The driver, this process, while a sweep runs: its RSS every ``every_s`` s; the finished trials counted from its
    log's progress lines (one in ``show`` shown); :data:`LOCKED` counted in its stdout (this, meanwhile) and in lines
    not shown; ``probe(size)`` run in a thread each ``probe_every`` trials; :func:`timed`'s ``calls``."""

    _std = None

    def __init__(self, probe=None, probe_every: int = 0, every_s: float = 0.5, show: int = 1, log=print):
        import psutil

        self.proc, self.every_s, self.show, self.out = psutil.Process(), every_s, max(1, show), log
        self.samples, self.calls, self.probes, self.finished, self.locked = [], {}, [], 0, 0
        self.probe, self.probe_every = probe, probe_every
        self._stop, self._sizes = threading.Event(), queue.Queue()

    def log(self, line: str) -> None:
        m = PROGRESS.match(line)
        if m is None:
            return self.out(line)
        self.finished = int(m.group(1))
        if self.finished % self.show == 0:
            self.out(f"  {self.finished} trials finished ({time.strftime('%H:%M:%S')})")
        else:
            self.locked += line.lower().count(LOCKED)
        if self.probe and self.probe_every and self.finished % self.probe_every == 0:
            self._sizes.put(self.finished)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self.proc.memory_info().rss / 2**20))
            self._stop.wait(self.every_s)

    def _probes(self) -> None:
        while (size := self._sizes.get()) is not None:
            try:
                self.probes.append(self.probe(size))
            except Exception as e:  # noqa: BLE001 - a probe that fails is said, never the sweep's end
                self.out(f"  (MLflow probe at {size} trials failed: {type(e).__name__}: {e})")

    def write(self, s: str):
        self.locked += s.lower().count(LOCKED)
        return self._std.write(s)

    def __getattr__(self, name):  # the rest of a stream: sys.stdout's
        return getattr(self._std, name)

    def fit_calls(self) -> dict[str, list]:
        """The timed calls from the fit's first ask on (the preflight samples each space through Optuna too)."""
        t0 = min((t for _, _, t in self.calls.get("ask", [])), default=0.0)
        return {k: [(i, ms, t) for i, (_, ms, t) in enumerate((c for c in v if c[2] >= t0), 1)] for k, v in self.calls.items()}

    def __enter__(self) -> Watch:
        self._threads = [threading.Thread(target=f, daemon=True) for f in (self._sample, self._probes)]
        for t in self._threads:
            t.start()
        self._std, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, _ = self._std, self._stop.set()
        self._sizes.put(None)
        for t in self._threads:
            t.join()


def timed(calls: dict, targets: list[tuple] | None = None) -> contextlib.ExitStack:
    """Time the real calls ``(owner, name, key)`` made in this process meanwhile: ``calls[key]`` gets ``(k, ms,
    time)`` of the k-th (an ask only when it gave a trial: Tune asks again and again while the slots are full). By
    default the driver's: the searcher's ask (Optuna's ask and the space), Optuna's tell, the mirror's write of a
    finished trial into ``optuna.db`` (``Study.add_trial``, the driver's only), a Tune experiment snapshot."""
    if targets is None:
        import optuna
        from ray.tune.execution.tune_controller import TuneController

        from kdtune.tune.search import GroupedOptunaSearch

        targets = [(GroupedOptunaSearch, "suggest", "ask"), (optuna.study.Study, "tell", "tell"),
                   (optuna.study.Study, "add_trial", "mirror"), (TuneController, "save_to_dir", "snapshot")]  # fmt: skip
    stack = contextlib.ExitStack()  # puts each back as it was
    for owner, name, key in targets:
        stack.callback(setattr, owner, name, orig := owner.__dict__[name])
        setattr(owner, name, _timer(calls.setdefault(key, []), key == "ask", orig))
    return stack


def _timer(sink: list, ask: bool, orig):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = orig(*a, **kw)
        if not ask or isinstance(out, dict):
            sink.append((len(sink) + 1, 1e3 * (time.perf_counter() - t), time.time()))
        return out

    return wrapper


def probe_store(uri: str, name: str, size: int, repeats: int = 3) -> dict:
    """MLflow writes timed on experiment ``name``'s store at ``size`` trials: the lookup each new trial's run begins
    with (its trial id among the experiment's runs: :class:`~kdtune.tracking.TrialTracker`), then create_run,
    log_metrics (one epoch's), set_tags and end of a run in ``<name>.probe``, a sibling experiment the report never
    reads. The median of ``repeats`` of each."""
    from kdtune.tracking import client as tc

    client, ms = tc.get_client(uri), {}
    exp, probe_exp = tc.retry_locked(client.get_experiment_by_name, name), tc.ensure_experiment(client, f"{name}.probe")
    for i in range(repeats):
        if exp is not None:
            clock(ms, "lookup", tc.search_all_runs, client, [exp.experiment_id], f"tags.`{tc.TAG_TRIAL_ID}` = 'probe-{size}-{i}'")
        rid = clock(ms, "create", tc.retry_locked, client.create_run, probe_exp, tags={"kdtune.role": "probe"}).info.run_id
        clock(ms, "log_metrics", tc.log_metric_entities, client, rid, tc.metric_entities(EPOCH, step=1))
        clock(ms, "set_tags", tc.set_tags, client, rid, {"kdtune.outcome": "completed", "kdtune.phase": "search"})
        clock(ms, "end", tc.retry_locked, client.set_terminated, rid, "FINISHED")
    return {"trials": size, **{f"{k}_ms": round(statistics.median(v), 2) for k, v in ms.items()}}


def timelines(exp: Path, uri: str, name: str) -> list[dict]:
    """Per trial folder: the pid of its last ``open``, the time of its (last) open, start, epoch, end (done, stopped,
    ...) and closed events, ``save_ms``, and ``work``: its MLflow run's ``system/train_s`` + ``system/eval_s``."""
    from kdtune.tracking.client import TAG_TRIAL_ID, TRIAL_FILTER, get_client, search_all_runs
    from kdtune.tune.record import END_EVENTS, read_events

    client = get_client(uri)
    runs = search_all_runs(client, [e.experiment_id], TRIAL_FILTER) if (e := client.get_experiment_by_name(name)) else []
    work = {r.data.tags.get(TAG_TRIAL_ID): r.data.metrics for r in runs}
    ends, out = set(END_EVENTS.values()), []
    for d in sorted(p for p in (exp / "trials").iterdir() if p.is_dir()):
        m = work.get(d.name, {})
        row: dict = {"trial_id": d.name, **({"work": m["system/train_s"] + m["system/eval_s"]} if {"system/train_s", "system/eval_s"} <= m.keys() else {})}
        for ev in read_events(d):
            key = "end" if ev.get("event") in ends else ev.get("event")
            if key in ("open", "start", "epoch", "end", "closed"):
                row[key] = float(ev["time"])
                row.update({"pid": ev.get("pid")} if key == "open" else {"save_ms": ev.get("save_ms")} if key == "epoch" else {})
        out.append(row)
    return out


def orchestration(rows: list[dict]) -> dict:
    """Per trial after the first of its slot (a slot: one trial process, reused by Tune), in ms: ``orch`` = its slot
    time (previous trial's closed -> its closed) - its train and eval, made of ``start`` (open -> start: run, model,
    data), ``epoch`` (start -> epoch - train - eval: the epoch's bookkeeping), ``close`` (epoch -> end: final model,
    run closed), ``report`` (end -> closed: Tune's report) and ``gap`` (previous closed -> open: Tune and the driver).
    ``held``: the trials' open -> closed over slots x span; ``training``: their train + eval over the same."""
    slots: dict = {}
    for r in rows:
        if all(k in r for k in ("open", "start", "epoch", "end", "closed", "work")):
            slots.setdefault(r["pid"], []).append(r)
    parts: dict[str, list[float]] = {k: [] for k in ("orch", "start", "epoch", "close", "report", "gap", "work")}
    for trials in slots.values():
        trials.sort(key=lambda r: r["open"])
        for prev, r in zip(trials, trials[1:]):
            w = r["work"]
            for key, v in (("start", r["start"] - r["open"]), ("epoch", r["epoch"] - r["start"] - w), ("work", w),
                           ("close", r["end"] - r["epoch"]), ("report", r["closed"] - r["end"]),
                           ("gap", r["open"] - prev["closed"]), ("orch", r["closed"] - prev["closed"] - w)):  # fmt: skip
                parts[key].append(v)
    done = [r for ts in slots.values() for r in ts]
    span = max((r["closed"] for r in done), default=0) - min((r["open"] for r in done), default=0)
    denom = len(slots) * span if span > 0 else None
    return {"slots": len(slots), "trials": len(done), **{k: quant(v, 1e3) for k, v in parts.items()},
            "save_ms": quant([r.get("save_ms") for ts in slots.values() for r in ts[1:]]),
            "held": sum(r["closed"] - r["open"] for r in done) / denom if denom else None,
            "training": sum(r["work"] for r in done) / denom if denom else None}  # fmt: skip


def rss_growth(samples: list[tuple[float, float]], finish_times: list[float]) -> dict:
    """The driver's RSS (MB) from the first finished trial to the last: start, end, peak, and its least-squares slope
    against the number of trials finished at each sample, per 1,000 trials."""
    ends = sorted(finish_times)
    pts = [(bisect.bisect_right(ends, t), mb) for t, mb in samples if ends and ends[0] <= t <= ends[-1]]
    if not pts:
        return {"samples": 0, "start_mb": None, "end_mb": None, "peak_mb": None, "per_1000_trials_mb": None}
    (mx, my), ys = (statistics.fmean(c) for c in zip(*pts)), [y for _, y in pts]
    var = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / var if var else None
    return {"samples": len(pts), "start_mb": round(ys[0], 1), "end_mb": round(ys[-1], 1), "peak_mb": round(max(ys), 1),
            "per_1000_trials_mb": round(1000 * slope, 2) if slope is not None else None,
            "series": [[x, round(y, 1)] for x, y in pts[:: max(1, len(pts) // 100)]]}  # fmt: skip


_WRAP = ("import json,resource,subprocess,sys,time\nt=time.perf_counter()\np=subprocess.run(sys.argv[1:],"
         "capture_output=True,text=True)\nprint(json.dumps({'rc':p.returncode,'wall_s':time.perf_counter()-t,'kb':"
         "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,'out':p.stdout+p.stderr}))")  # fmt: skip


def time_report(exp: Path) -> dict:
    """``kdtune report <exp>`` in a process of its own: wall s, peak RSS (ru_maxrss of its parent's only child), output."""
    p = subprocess.run([sys.executable, "-c", _WRAP, sys.executable, "-m", "kdtune", "report", str(exp)],
                       capture_output=True, text=True, check=True)  # fmt: skip
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"wall_s": round(r["wall_s"], 2), "peak_rss_mb": round(r["kb"] / 1024, 1), "rc": r["rc"], "output": r["out"]}


def count_locked(paths: list[Path], texts=()) -> dict:
    """:data:`LOCKED` in every file under ``paths`` (databases, checkpoints, pickles, images, MLflow's artifacts and
    files over 64 MiB left out) and in ``texts``: the count, the files read, and where it was found."""
    needle, n, files, found = LOCKED.encode(), 0, 0, []
    for root in paths:
        for f in root.rglob("*") if root.is_dir() else [root]:
            if (not f.is_file() or f.suffix in (".db", ".db-wal", ".db-shm", ".pt", ".pkl", ".png")
                    or "mlartifacts" in f.parts or f.stat().st_size > 2**26):  # fmt: skip
                continue
            files, k = files + 1, f.read_bytes().lower().count(needle)
            n, found = n + k, found + ([str(f)] if k else [])
    k = sum(t.lower().count(LOCKED) for t in texts)
    return {"count": n + k, "files": files, "found_in": found + (["output"] if k else [])}


def scale_spec(spec_path: str | Path, n: int, storage: str | Path, concurrency: int | None, kind: str):
    """``spec_path``'s spec with ``n`` trials (and ``concurrency``) under ``storage``, named ``<name>-<kind><n>``: new."""
    from kdtune.config import load_yaml_mapping
    from kdtune.spec import load_spec

    raw = load_yaml_mapping(spec_path, "sweep spec", "pass --spec FILE (sweeps/scale-toy.yaml)")
    raw["name"] = f"{raw.get('name') or Path(spec_path).stem}-{kind}{n}"
    raw["budget"] = {**(raw.get("budget") or {}), "trials": n, **({"concurrency": concurrency} if concurrency else {})}
    spec = load_spec({**raw, "storage": str(storage)}, base_dir=Path(spec_path).resolve().parent)
    if spec.experiment_dir.exists() or not spec.tracking.enabled:
        raise ConfigError(f"the bench measures a new experiment with MLflow: {spec.experiment_dir} exists (give another "
                          "--storage)" if spec.experiment_dir.exists() else f"{spec_path}: tracking is off; turn it on")
    return spec


def sweep_bench(n: int, spec_path: str | Path, storage: str | Path, concurrency: int | None = None,
                probes: int = 10, log=print) -> dict:  # fmt: skip
    """A real sweep of ``n`` trials (:func:`kdtune.tune.runner.sweep`) and its figures (the module docstring)."""
    from kdtune.tracking import default_tracking_uri
    from kdtune.tune.runner import sweep

    spec = scale_spec(spec_path, n, storage, concurrency, "sweep")
    exp, t0 = spec.experiment_dir, time.time()
    uri = spec.tracking.uri or default_tracking_uri(exp)
    watch = Watch(lambda size: probe_store(uri, spec.name, size), max(1, n // max(1, probes)), show=max(1, n // 20), log=log)
    with watch, timed(watch.calls):
        result = sweep(spec, log=watch.log)
    wall = time.time() - t0
    watch.probes.append(probe_store(uri, spec.name, n))  # once more, the store quiet
    rows, report = timelines(exp, uri, spec.name), time_report(exp)
    closed = [r["closed"] for r in rows if "closed" in r]
    ray = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"  # the Ray sessions of this process
    logs = [d / "logs" for d in ray.glob(f"session_*_{os.getpid()}") if (d / "logs").is_dir() and (d / "logs").stat().st_mtime >= t0]
    locked = count_locked([exp, *logs], [report["output"]])
    locked["count"] += watch.locked
    return {"kind": "sweep", "trials": n, "spec": str(spec_path), "experiment": str(exp), "tracking_uri": uri,
            "concurrency": spec.budget.concurrency, "wall_s": round(wall, 1), "stages_s": result.stages_s,
            "finished": len(closed), "orchestration": orchestration(rows),
            "slot_utilisation": result.slot_utilisation, "rss": rss_growth(watch.samples, closed),
            "driver_calls": buckets(watch.fit_calls(), max(1, -(-n // 5))),
            "mlflow": watch.probes, "report": {k: v for k, v in report.items() if k != "output"},
            "report_tail": report["output"][-2000:], "locked": locked, "targets": TARGETS}  # fmt: skip


def sim_trial(config: dict, ctxs: dict | None = None, data=None) -> None:
    """A trial that reports at once: its record kept as a sweep's (:class:`~kdtune.tune.record.TrialRecord`: events,
    MLflow run, one epoch, completed; each timed) and a value from its hyperparameters."""
    from ray import tune

    from kdtune.tune.protocol import Outcome
    from kdtune.tune.record import TrialRecord

    t_open, ms = time.time(), {}
    ctx, uid = ctxs[config[GROUP_KEY]], tune.get_context().get_trial_id()
    hp = {k: v for k, v in config.items() if k != GROUP_KEY}
    m = {**EPOCH, "epoch": 1, ctx.metric: 90.0 - sum((float(v) - 1.0) ** 2 for v in hp.values() if isinstance(v, (int, float)))}
    (rec := TrialRecord(ctx, uid, hp)).open()
    clock(ms, "open_run", rec.open_run, ctx.tags)  # its MLflow run: created, params, tags
    clock(ms, "epoch", rec.epoch, m)  # its metrics handed to the run's writer, its epoch event
    clock(ms, "close", rec.close, Outcome.COMPLETED, m)  # metrics written, outcome, run ended, done.json
    rec.closed()  # its one report is its last: no pointer checkpoint, as a sweep's unit's last report has none
    tune.report({ctx.metric: m[ctx.metric], "epoch": 1, "trial_id": uid, "pid": os.getpid(), "t_open": t_open,
                 "t_close": time.time(), **{f"rec_{k}_ms": v[0] for k, v in ms.items()}})  # fmt: skip


def simulate(n: int, spec_path: str | Path, storage: str | Path, concurrency: int | None = None, bucket: int = 500,
             window: int | None = None, probes: int = 10, tpe_sizes=(), log=print) -> dict:  # fmt: skip
    """``n`` trials of :func:`sim_trial` through the sweep's Tuner (:meth:`Tuning.new_tuner`: searcher, scheduler, Optuna
    mirror, progress; ``window``: its TPE reads that many recent trials, 0: all, None: kdtune's
    :data:`~kdtune.tune.search.TPE_WINDOW`), and their figures by buckets of ``bucket`` trials."""
    from optuna.samplers import TPESampler

    from kdtune.tracking import SweepTracker, default_tracking_uri
    from kdtune.tune.plan import plan
    from kdtune.tune.rayrt import init_ray, make_trainable, shutdown_ray
    from kdtune.tune.search import GroupedOptunaSearch, WindowedTPESampler
    from kdtune.tune.trainable import TrialContext
    from kdtune.tune.tuning import TUNE_NAME, Tuning

    spec = scale_spec(spec_path, n, storage, concurrency, "sim")
    exp, p = spec.experiment_dir, plan(spec)
    exp.mkdir(parents=True)
    uri = spec.tracking.uri or default_tracking_uri(exp)
    parent = SweepTracker(uri, spec.name).start_parent(spec.to_dict(), tags={"kdtune.experiment_dir": str(exp)})
    ctxs = {g.name: TrialContext(group=g.name, method=g.method, base=p.trial_base(g), experiment_dir=str(exp),
                                 tracking_uri=uri, experiment_name=spec.name, parent_run_id=parent, metric=spec.metric,
                                 params={"student": g.student, "data": spec.data, "group": g.name}) for g in p.groups}  # fmt: skip
    watch = Watch(lambda size: probe_store(uri, spec.name, size), max(1, n // max(1, probes)), show=max(1, n // 20), log=log)
    started = init_ray()
    try:
        with watch, timed(watch.calls) as undo:
            if window is not None:  # the searcher's TPE another window (0: Optuna's, unbounded), not kdtune's
                undo.callback(setattr, GroupedOptunaSearch, "_new_study", new := GroupedOptunaSearch._new_study)
                GroupedOptunaSearch._new_study = lambda self, name, seed: setattr(
                    study := new(self, name, seed), "sampler",
                    WindowedTPESampler(window, seed=seed) if window else TPESampler(seed=seed)) or study
            tuning = Tuning(spec, exp, watch.log)
            tuner = tuning.new_tuner(p, make_trainable(sim_trial, ctxs, None, spec.budget))
            t0 = time.time()
            results = tuning.tune_fit(tuner, p.total_units, exp / "tune" / TUNE_NAME)
            fit = time.time() - t0
    finally:
        if started:
            shutdown_ray()
    rows = sorted((r.metrics for r in results if "t_close" in (r.metrics or {})), key=lambda m: m["t_close"])
    last: dict = {}  # per slot (its process), the trial before
    for m in rows:
        if (prev := last.get(m["pid"])) is not None:
            m["gap_ms"], m["slot_ms"] = 1e3 * (m["t_open"] - prev["t_close"]), 1e3 * (m["t_close"] - prev["t_close"])
        last[m["pid"]] = m
    table, calls, med = [], watch.fit_calls(), (lambda xs, s=1.0: quant(xs, s)["median"])
    for b in range(0, len(rows), bucket):
        part = rows[b:b + bucket]
        rss = [mb for t, mb in watch.samples if t <= part[-1]["t_close"]]
        table.append({"trials": f"{b + 1}-{b + len(part)}", "in_trial": med([m["t_close"] - m["t_open"] for m in part], 1e3),
                      **{k[:-3]: med([m.get(k) for m in part]) for k in rows[0] if k.startswith("rec_")},
                      "gap": med([m.get("gap_ms") for m in part]), "rss_mb": round(rss[-1], 1) if rss else None})  # fmt: skip
    return {"kind": "simulate", "trials": n, "spec": str(spec_path), "experiment": str(exp), "concurrency": spec.budget.concurrency,
            "tpe_window": window, "fit_s": round(fit, 1), "trials_per_s": round(len(rows) / fit, 2), "bucket": bucket,
            "slot_ms": quant([m.get("slot_ms") for m in rows]), "gap_ms": quant([m.get("gap_ms") for m in rows]),
            "driver_share_pct": {k: round(0.1 * sum(ms for _, ms, _ in v) / fit, 2) for k, v in calls.items()},
            "buckets": table, "mlflow": watch.probes, "driver_calls": buckets(calls, bucket), "rss": rss_growth(watch.samples, [m["t_close"] for m in rows]),
            "targets": TARGETS, "tpe": tpe_scaling(p.searches()[0].space, list(tpe_sizes), window or 1000) if tpe_sizes else []}  # fmt: skip


def tpe_scaling(space, sizes: list[int], window: int = 1000, reps: int = 10, seed: int = 0) -> list[dict]:
    """Median ms of one ask (``study.ask()`` and ``space``; a tell after each) on an in-memory study of each size (complete
    trials at random points, two running), per sampler: kdtune's TPE, and with a knob changed."""
    import optuna

    from kdtune.tune.search import WindowedTPESampler

    variants = {"default": {}, "n_ei_candidates=8": {"n_ei_candidates": 8}, "multivariate=False": {"multivariate": False},
                f"window={window}": None}  # fmt: skip
    pool = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))
    for i in range(max(sizes, default=0) + 2):
        space(t := pool.ask())
        if i < max(sizes):
            pool.tell(t, float((i * 7919) % 1000))
    trials, out = pool.get_trials(deepcopy=False), []
    for size in sizes:
        row = {"trials": size}
        for name, kw in variants.items():
            sampler = WindowedTPESampler(window, seed=seed) if kw is None else optuna.samplers.TPESampler(seed=seed, **kw)
            study, times = optuna.create_study(direction="maximize", sampler=sampler), []
            study.add_trials(trials[:size] + trials[-2:])
            for r in range(reps):
                t0 = time.perf_counter()
                space(t := study.ask())
                times.append(1e3 * (time.perf_counter() - t0))
                study.tell(t, float(r))
            row[name] = round(statistics.median(times), 2)
        out.append(row)
    return out
