"""The sweep's Tune experiments: the search over every group (one Tuner, restored when it exists) and the
repeats of each group's best configuration, with the run settings both share (storage, callbacks, failures).

A fit that returned with units still pending was interrupted (Ctrl-C); a unit that failed on a full disk ends
the whole fit at once, in one line (:class:`~kdtune.tune.diskfull.DiskFullStop`).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from kdtune.errors import DiskFullError, disk_full_message
from kdtune.spec import SweepSpec
from kdtune.tune.experiment import optuna_storage
from kdtune.tune.plan import SweepPlan
from kdtune.tune.protocol import GROUP_KEY, expand_members
from kdtune.tune.results import repeat_stats

TUNE_NAME = "sweep"
REPEATS_NAME = "repeats"
# The driver's GIL switch interval during a Tune run (Python's default 5 ms): Tune's loop blocks and wakes often
# while the Optuna mirror's thread runs SQLAlchemy; each wake waits up to the interval for the GIL. --sweep 2000
# on 2 cores: orchestration 114.6 / 108.8 ms a trial at 5 ms, 107.7 / 105.8 ms at 0.5 ms (docs/bench.md).
SWITCH_S = 0.0005


def disk_full_error(exp: Path) -> DiskFullError:
    return DiskFullError(disk_full_message(exp, f"kdtune resume {exp}"))


class Tuning:
    def __init__(self, spec: SweepSpec, exp: Path, log=print):
        self.spec, self.exp, self.log = spec, exp, log

    def disk_full(self) -> DiskFullError:
        return disk_full_error(self.exp)

    def fit(self, p: SweepPlan, ctxs: dict, shared):
        from ray import tune

        from kdtune.tune.rayrt import make_trainable
        from kdtune.tune.repairs import clear_errored
        from kdtune.tune.trainable import run_trial
        from kdtune.tune.tunefs import atomic_local_fs

        spec = self.spec
        path = self.exp / "tune" / TUNE_NAME
        trainable = make_trainable(run_trial, ctxs, shared, spec.budget)
        if tune.Tuner.can_restore(str(path), storage_filesystem=atomic_local_fs()):
            on = spec.failures.on_resume
            self.log(f"resuming its {p.total_trials} trials ({len(p.groups)} groups)")
            if on == "restart":
                clear_errored(path, self.exp)
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                       resume_errored=on == "resume", restart_errored=on == "restart",
                                       storage_filesystem=atomic_local_fs())  # fmt: skip
        else:
            for line in p.log_lines():
                self.log(line)
            tuner = self.new_tuner(p, trainable)
        return self.tune_fit(tuner, p.total_units, path)

    def new_tuner(self, p: SweepPlan, trainable):
        from ray import tune

        from kdtune.tune.callbacks import OptunaMirror, ProgressPrinter, TrialNamer
        from kdtune.tune.search import (
            GroupedOptunaSearch,
            GroupedScheduler,
            GroupedSearchGenerator,
            make_scheduler,
        )

        spec = self.spec
        searches = p.searches()
        searcher = GroupedOptunaSearch(searches, spec.metric, spec.mode, spec.budget.epochs, seed=spec.seed,
                                       max_concurrent=spec.budget.concurrency)  # fmt: skip
        scheduler = GroupedScheduler(partial(make_scheduler, spec), spec.metric, spec.mode,
                                     fifo_groups=tuple(g.name for g in p.groups if g.prunes_members))  # fmt: skip
        url, prefix = optuna_storage(self.exp, spec.tracking.optuna)
        mirror = OptunaMirror(url, spec.metric, spec.mode, spec.budget.epochs,
                              {s.name: s.space for s in searches},
                              {g.name: {"method": g.method, "student": g.student, "experiment": spec.name}
                               for g in p.groups}, experiment_dir=str(self.exp), prefix=prefix)  # fmt: skip
        printer = ProgressPrinter(spec.metric, spec.budget.epochs, total=p.total_trials, log=self.log)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=GroupedSearchGenerator(searcher, on_resume=spec.failures.on_resume),
                scheduler=scheduler, metric=spec.metric, mode=spec.mode, num_samples=p.total_units,
                reuse_actors=True, trial_name_creator=TrialNamer(), trial_dirname_creator=TrialNamer(with_id=True),
            ),
            run_config=self.run_config(TUNE_NAME, [printer, mirror]),
        )  # fmt: skip

    def run_config(self, name: str, callbacks: list):
        from ray import tune

        from kdtune.tune.callbacks import ForgetStatistics
        from kdtune.tune.diskfull import DiskFullStop, DiskFullWatch
        from kdtune.tune.tunefs import atomic_local_fs

        # Every Tune checkpoint is kept (a pointer: one small progress.json per epoch): a driver killed between
        # two snapshots restores a unit from the checkpoint its snapshot names, which must still exist.
        return tune.RunConfig(
            name=name, storage_path=str(self.exp / "tune"), storage_filesystem=atomic_local_fs(), verbose=0,
            callbacks=[*callbacks, DiskFullWatch(), ForgetStatistics()], stop=DiskFullStop(),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
            failure_config=tune.FailureConfig(max_failures=self.spec.failures.max_failures),
        )  # fmt: skip

    def tune_fit(self, tuner, expected: int, path: Path):
        """``tuner.fit()``, ended at once, with one line, by a unit that failed on a full disk; a fit that
        returned with units still pending was interrupted (Ctrl-C): the sweep stops here."""
        from kdtune.tune.diskfull import disk_full_trials, reset_disk_full

        reset_disk_full()
        switch = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_S)
        try:
            results = tuner.fit()
        finally:
            sys.setswitchinterval(switch)
        if disk_full_trials():
            raise self.disk_full()
        if len(results) < expected or results.num_terminated + results.num_errors < len(results):
            raise KeyboardInterrupt(f"Tune run {path.name} was interrupted")
        return results

    def repeats(self, summaries: list[dict], ctxs: dict, shared) -> list:
        """Each group's best configuration again with ``repeats - 1`` more seeds (one Tune experiment for all
        groups); each summary gets mean ± std over all of its seeds. Returns the repeats' Tune results."""
        from ray import tune

        from kdtune.tune.callbacks import ProgressPrinter, TrialNamer
        from kdtune.tune.rayrt import make_trainable
        from kdtune.tune.trainable import run_trial
        from kdtune.tune.tunefs import atomic_local_fs

        spec, b = self.spec, self.spec.budget
        path = self.exp / "tune" / REPEATS_NAME
        seeds = [spec.seed + k for k in range(1, b.repeats)]
        # budget.repeat_warm_start: seed: a warm-started group's repeat starts from the CE student of its own seed
        # (its init measured by the trial: init_info None), not from the sweep's one CE student
        warm = {g for g, c in ctxs.items() if b.repeat_warm_start == "seed" and c.base.get("init")}
        rctxs = {f"{g}-repeats": replace(c, group=f"{g}-repeats", phase="repeat", member_rule=None,
                                         init_info=None if g in warm else c.init_info)
                 for g, c in ctxs.items()}  # fmt: skip
        trainable = make_trainable(run_trial, rctxs, shared, b)
        best = [s for s in summaries if s.get("best")]
        inits = self.seed_warm_starts(sorted({(ctxs[s["group"]].params["student"], seed) for s in best
                                              if s["group"] in warm for seed in seeds}))  # fmt: skip
        points = [{**s["best"]["config"], GROUP_KEY: f"{s['group']}-repeats", "train.seed": seed,
                   **({"train.init": inits[(ctxs[s["group"]].params["student"], seed)]} if s["group"] in warm else {})}
                  for s in best for seed in seeds]  # fmt: skip
        if not points:
            return []
        if tune.Tuner.can_restore(str(path), storage_filesystem=atomic_local_fs()):
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                       storage_filesystem=atomic_local_fs())  # fmt: skip
        else:
            self.log(f"repeating each group's best configuration with seeds {seeds}")
            tuner = tune.Tuner(trainable, tune_config=tune.TuneConfig(
                search_alg=fixed_points(points), num_samples=len(points),
                max_concurrent_trials=b.concurrency, reuse_actors=True, trial_name_creator=TrialNamer(),
                trial_dirname_creator=TrialNamer(with_id=True)),
                run_config=self.run_config(REPEATS_NAME, [ProgressPrinter(spec.metric, b.epochs, total=len(points),
                                                                          log=self.log)]))  # fmt: skip
        results = self.tune_fit(tuner, len(points), path)
        members = expand_members(results, b.epochs)
        for s in summaries:
            if s.get("best"):
                mine = [m for m in members if m.config.get(GROUP_KEY) == f"{s['group']}-repeats"]
                s["repeats"] = repeat_stats(s, mine, [spec.seed, *seeds])
        return list(results)

    def seed_warm_starts(self, need: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """The CE student of each (student, seed) in ``need``: the sweep's ``ce-<student>`` stage on that seed
        (``ce-<student>-seed<k>``, cached under the stages like any stage), ``concurrency`` built at a time.
        Returns their ``final.pt`` paths."""
        if not need:
            return {}
        from concurrent.futures import ThreadPoolExecutor

        from kdtune.tune.stages import ensure_stage

        spec, b = self.spec, self.spec.budget
        res = {"num_cpus": b.cpus_per_trial, "num_gpus": 1 if b.gpus_per_trial > 0 else 0}
        self.log(f"repeats' warm starts: {len(need)} CE students, one per (student, seed) "
                 f"(budget.repeat_warm_start: seed)")  # fmt: skip

        def build(item: tuple[str, int]) -> tuple[tuple[str, int], str]:
            student, seed = item
            cfg = {**spec.ce_student_config(student), "seed": seed}
            st = ensure_stage(f"ce-{student}-seed{seed}", cfg, spec.stages_dir, resources=res, log=lambda s: None)
            return item, str(st.model_path)

        with ThreadPoolExecutor(max_workers=max(1, b.concurrency)) as pool:
            return dict(pool.map(build, need))


def fixed_points(points: list[dict]):
    """A Tune searcher that gives ``points`` in order, each once, then says it is finished (the repeats).

    Not Ray's ``BasicVariantGenerator(points_to_evaluate=...)``: it resolves every point against the (empty)
    param space and raised ``KeyError`` as soon as two groups' points held different hyperparameters (KD's ``T``
    and ``w_kd`` beside DKD's ``alpha``); ``tests/test_teachers.py`` repeats two methods."""
    import pickle

    from ray.tune.search import Searcher

    class FixedPoints(Searcher):
        def __init__(self, pts: list[dict]):
            super().__init__()
            self.points, self.given = [dict(x) for x in pts], 0

        def suggest(self, trial_id: str):
            if self.given >= len(self.points):
                return Searcher.FINISHED
            self.given += 1
            return dict(self.points[self.given - 1])

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass

        def save(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "wb") as f:
                pickle.dump({"points": self.points, "given": self.given}, f)

        def restore(self, checkpoint_path: str) -> None:
            with open(checkpoint_path, "rb") as f:
                self.__dict__.update(pickle.load(f))

    return FixedPoints(points)
