"""One Tune experiment for a whole sweep: a searcher that keeps one Optuna study per (student, method) group,
and a scheduler that stops trials by comparing them only with trials of their own group.

Every group's trials are scheduled together, so a slot never waits while a trial of any group could run.
Which group a trial belongs to travels in its config under :data:`GROUP_KEY` (the trainable pops it).

:class:`GroupedOptunaSearch` is Ray's :class:`~ray.tune.search.Searcher` interface over Optuna's ask/tell
API (Ray's own ``OptunaSearch`` keeps a single study and tells a scheduler-stopped trial as COMPLETE with its
low-fidelity value, which misleads TPE). Each group's study starts with its published points enqueued; a
trial is handed to the group with the most trials still to give (so the big groups start first and the last
trials of all groups run side by side), and each group gets exactly its budget. A trial's per-epoch values
are reported to its study; a trial that ended before its last epoch without an error (early-stopped by the
scheduler) is told PRUNED, as Optuna's own pruners do, so TPE ranks it as a pruned trial, not as a finished
one; an errored trial is told FAIL.

:class:`GroupedScheduler` holds one scheduler per group (ASHA, HyperBand or FIFO, made by a factory) and
hands each trial's events to its group's scheduler; ASHA's rungs therefore hold one group's results only.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher, SearchGenerator
from ray.tune.search.search_generator import _load_newest_checkpoint

GROUP_KEY = "kdtune.group"


def group_of(config: dict | None) -> str | None:
    return (config or {}).get(GROUP_KEY)


@dataclass
class GroupSearch:
    """One group as the searcher sees it: its space, its budget and its starting points."""

    name: str
    space: Callable  # SpaceFn: define-by-run, returns constants
    budget: int
    starts: list[dict] = field(default_factory=list)
    fuse: int = 1  # members per Tune trial (a fused bundle, kdtune.tune.fused)


class _PickledState:
    """``save``/``restore`` of Tune's searcher and scheduler interfaces: the whole object state, pickled (the
    Optuna studies are in memory; see the module docstring of :mod:`kdtune.tune.callbacks`)."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))


class GroupedOptunaSearch(_PickledState, Searcher):
    def __init__(self, groups: list[GroupSearch], metric: str, mode: str, epochs: int, seed: int = 0,
                 max_concurrent: int = 0):
        super().__init__(metric=metric, mode=mode)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.groups = {g.name: g for g in groups}
        self.order = [g.name for g in groups]
        self.epochs = int(epochs)
        self.seed = int(seed)
        self.max_concurrent = int(max_concurrent)
        self.asked: dict[str, int] = {g.name: 0 for g in groups}
        self.studies = {}
        for i, g in enumerate(groups):
            g.starts = _starts_inside(g)
            study = self._new_study(g.name, self.seed + i)
            for p in g.starts[: g.budget]:
                study.enqueue_trial(p, skip_if_exists=True)
            self.studies[g.name] = study
        self.live: dict[str, tuple[str, Any]] = {}  # tune trial id -> (group, optuna trial)
        self.reported: dict[str, set[int]] = {}

    def _new_study(self, name: str, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # also in a restored copy (no __init__)
        study = optuna.create_study(
            study_name=name, direction="maximize" if self.mode == "max" else "minimize",
            sampler=optuna.samplers.TPESampler(seed=seed),
        )  # fmt: skip
        _name_metric(study, self.metric)
        return study

    def rebuild(self, trials: list[dict], requeue_errored: bool) -> None:
        """Make this searcher's state that of the restored Tune experiment: ``trials`` are the trials of the
        snapshot Tune resumes from (:func:`snapshot_trials`, creation order).

        Each group's study is made again holding each of the group's trials once, with the trial's own
        parameters: a terminated trial told as it ended (COMPLETE, PRUNED, FAIL), a trial Tune runs again
        (pending, running, paused; errored when ``requeue_errored``) live, with its last reported value. The
        starting points its trials have not used yet are enqueued again, and ``asked`` counts the trials Tune
        has, so each group still gets exactly its budget. A pickled searcher is not trusted for this: the
        files of a snapshot are written one after another, and a driver killed between two of them leaves a
        searcher state that is older or newer than the trial list (a trial run twice or never). The samplers
        are seeded anew (a sampler seeded as at the start would draw the first random points again)."""
        from kdtune.tune.fused import MEMBERS_KEY

        self.asked = {n: 0 for n in self.order}
        self.live, self.reported, self.bundles = {}, {}, {}
        mine: dict[str, list[dict]] = {n: [] for n in self.order}
        for t in trials:
            g = group_of(t.get("config"))
            if g in mine:
                mine[g].append(t)
        for i, name in enumerate(self.order):
            g = self.groups[name]
            study = self._new_study(name, self.seed + i + 7919 * (1 + len(trials)))
            self.studies[name] = study
            for t in mine[name]:
                res = t.get("last_result") or {}
                status = t.get("status")
                ended = status == "TERMINATED" or (status == "ERROR" and not requeue_errored)
                if MEMBERS_KEY in t["config"]:
                    self._rebuild_bundle(t, name, g, study, res, ended, error=status == "ERROR")
                    continue
                study.enqueue_trial({k: v for k, v in t["config"].items() if k != GROUP_KEY})
                ot = study.ask()
                g.space(ot)
                self.asked[name] += 1
                if ended:
                    self._tell(study, ot, res, error=status == "ERROR", seen=set())
                    continue
                self.live[t["trial_id"]] = (name, ot)
                step, v = res.get("training_iteration"), res.get(self.metric)
                if step is not None and _finite(v):
                    ot.report(float(v), int(step))
                    self.reported[t["trial_id"]] = {int(step)}
            for p in g.starts[: g.budget][self.asked[name]:]:
                study.enqueue_trial(p, skip_if_exists=True)

    def _rebuild_bundle(self, t: dict, name: str, g: GroupSearch, study, res: dict, ended: bool,
                        error: bool) -> None:
        """:meth:`rebuild` for a fused bundle: each member (``kdtune.members`` in the trial's config) its own
        Optuna trial again, told from the bundle's last result when the bundle ended, else live."""
        from kdtune.tune.fused import MEMBERS_KEY

        if not hasattr(self, "bundles"):
            self.bundles = {}
        trials = {}
        for m in t["config"][MEMBERS_KEY]:
            study.enqueue_trial(dict(m["config"]))
            ot = study.ask()
            g.space(ot)
            trials[m["id"]] = ot
        self.asked[name] += len(trials)
        tid = t["trial_id"]
        self.live[tid] = (name, None)
        self.bundles[tid] = {"group": name, "trials": trials, "told": set(), "reported": {}}
        if ended:
            self.live.pop(tid, None)
            self._bundle_result(tid, res, final=True, error=error)
        elif res:
            self._bundle_result(tid, res, final=False)

    # ------------------------------------------------------------------ Searcher interface
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are ours: one study per group, made in __init__

    def _next_group(self) -> str | None:
        open_ = [n for n in self.order if self.asked[n] < self.groups[n].budget]
        if not open_:
            return None
        live = {n: 0 for n in self.order}
        for g, _ in self.live.values():
            live[g] += 1
        return max(open_, key=lambda n: (self.groups[n].budget - self.asked[n], -live[n], -self.order.index(n)))

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        self.max_concurrent = int(max_concurrent)
        return True

    def suggest(self, trial_id: str) -> dict | None:
        if self.max_concurrent and len(self.live) >= self.max_concurrent:
            return None  # a slot frees when a live trial ends (the limit counts restored trials too)
        name = self._next_group()
        if name is None:
            return Searcher.FINISHED
        g = self.groups[name]
        if getattr(g, "fuse", 1) > 1:
            return self._suggest_bundle(trial_id, name, g)
        ot = self.studies[name].ask()
        consts = g.space(ot) or {}
        self.asked[name] += 1
        self.live[trial_id] = (name, ot)
        return {GROUP_KEY: name, **ot.params, **consts}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in getattr(self, "bundles", {}):
            return self._bundle_result(trial_id, result, final=False)
        entry = self.live.get(trial_id)
        v = result.get(self.metric)
        step = result.get("training_iteration")
        if entry is None or step is None or not _finite(v):
            return
        seen = self.reported.setdefault(trial_id, set())
        if int(step) not in seen:
            entry[1].report(float(v), int(step))
            seen.add(int(step))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in getattr(self, "bundles", {}):
            self.live.pop(trial_id, None)
            return self._bundle_result(trial_id, result or {}, final=True, error=error)
        entry = self.live.pop(trial_id, None)
        seen = self.reported.pop(trial_id, set())
        if entry is None:
            return
        name, ot = entry
        self._tell(self.studies[name], ot, result or {}, error=error, seen=seen)

    def _tell(self, study, ot, result: dict, error: bool, seen: set[int]) -> None:
        from optuna.trial import TrialState

        value = result.get(self.metric)
        epoch = result.get("epoch", result.get("training_iteration"))
        try:
            if error or not _finite(value):
                study.tell(ot, state=TrialState.FAIL)
            elif epoch is not None and int(epoch) < self.epochs:
                if int(epoch) not in seen:
                    ot.report(float(value), int(epoch))
                study.tell(ot, state=TrialState.PRUNED)
            else:
                study.tell(ot, float(value))
        except RuntimeError:  # told already (a resumed experiment replaying an event): nothing to change
            pass

    # ------------------------------------------------------------------ fused bundles (budget.fuse)
    def _suggest_bundle(self, trial_id: str, name: str, g: GroupSearch) -> dict:
        """Ask the group's study for up to ``fuse`` trials at once: one Tune config holding the members."""
        from kdtune.tune.fused import MEMBERS_KEY

        if not hasattr(self, "bundles"):
            self.bundles = {}
        k = min(g.fuse, g.budget - self.asked[name])
        members, trials = [], {}
        for i in range(k):
            ot = self.studies[name].ask()
            consts = g.space(ot) or {}
            mid = f"{trial_id}-m{i}"
            members.append({"id": mid, "number": ot.number, "config": {**ot.params, **consts}})
            trials[mid] = ot
        self.asked[name] += k
        self.live[trial_id] = (name, None)
        self.bundles[trial_id] = {"group": name, "trials": trials, "told": set(), "reported": {}}
        return {GROUP_KEY: name, MEMBERS_KEY: members}

    def _bundle_result(self, trial_id: str, result: dict, final: bool, error: bool = False) -> None:
        """Each member's per-epoch value to its own Optuna trial; its outcome (COMPLETE, PRUNED, FAIL) once
        the bundle says it is final (or, for members still open, when the bundle ends)."""
        from optuna.trial import TrialState

        from kdtune.tune.fused import member_results

        b = self.bundles[trial_id]
        study = self.studies[b["group"]]
        rows = member_results(result)
        for mid, ot in b["trials"].items():
            if mid in b["told"]:
                continue
            r = rows.get(mid, {})
            v, epoch, outcome = r.get(self.metric), r.get("epoch"), r.get("outcome")
            seen = b["reported"].setdefault(mid, set())
            if _finite(v) and epoch is not None and int(epoch) not in seen:
                ot.report(float(v), int(epoch))
                seen.add(int(epoch))
            if outcome in (None, "running") and not final:
                continue
            try:
                if outcome == "completed" and _finite(v):
                    study.tell(ot, float(v))
                elif outcome == "pruned" or (outcome == "running" and not error and _finite(v)):
                    study.tell(ot, state=TrialState.PRUNED)
                else:
                    study.tell(ot, state=TrialState.FAIL)
            except RuntimeError:  # told already (a resumed experiment replaying an event)
                pass
            b["told"].add(mid)
        if final:
            self.bundles.pop(trial_id, None)

    def outcome_counts(self) -> dict[str, dict[str, int]]:
        """Per group: how many trials its study holds in each state (COMPLETE, PRUNED, FAIL, RUNNING…)."""
        out: dict[str, dict[str, int]] = {}
        for name, study in self.studies.items():
            counts: dict[str, int] = {}
            for t in study.trials:
                counts[t.state.name] = counts.get(t.state.name, 0) + 1
            out[name] = counts
        return out



class GroupedSearchGenerator(SearchGenerator):
    """Tune's search generator over a :class:`GroupedOptunaSearch`, whose resume rebuilds the searcher from
    the trial list Tune restores (:meth:`GroupedOptunaSearch.rebuild`) instead of its pickles.

    The searcher counts its own live trials against ``max_concurrent`` (Ray's ``ConcurrencyLimiter`` would
    start empty on a resume and drop the results of the trials it did not start). ``on_resume`` is the
    spec's ``failures.on_resume``: whether Tune runs the snapshot's errored trials again."""

    def __init__(self, searcher: GroupedOptunaSearch, on_resume: str = "resume"):
        super().__init__(searcher)
        self.on_resume = on_resume

    def restore_from_dir(self, dirpath: str) -> None:
        # The generator's own state (the experiment spec, the number of samples) as Tune restores it; then
        # the searcher from the trial list of the snapshot Tune restored.
        state = _load_newest_checkpoint(dirpath, self.CKPT_FILE_TMPL.format("*"))
        if not state:
            raise RuntimeError(f"Unable to find checkpoint in {dirpath}.")
        self.set_state(state)
        trials = snapshot_trials(dirpath) or []
        self._counter = max(self._counter, len(trials))
        self._finished = False  # a search-generator state newer than the trial list may say finished
        self.searcher.rebuild(trials, requeue_errored=self.on_resume in ("resume", "restart"))


def _snapshot_files(tune_dir) -> list:
    from pathlib import Path

    return sorted(Path(tune_dir).glob("experiment_state-*.json"), key=lambda f: f.name)


def snapshot_trials(tune_dir) -> list[dict] | None:
    """The trials of the newest experiment snapshot of a Tune experiment folder (the one Tune resumes from:
    the greatest name), in creation order: ``trial_id``, ``status``, ``config`` and ``last_result``. None
    when there is no snapshot; :class:`~kdtune.config.ConfigError` naming the file when it is damaged."""
    from ray.tune.experiment.trial import _TrainingRunMetadata
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    from kdtune.config import ConfigError

    files = _snapshot_files(tune_dir)
    if not files:
        return None
    f = files[-1]
    out = []
    try:
        for trial_json, meta_json in json.loads(f.read_text())["trial_data"]:
            t = _loads_with_cloudpickle(trial_json)
            meta = _TrainingRunMetadata.from_json_state(meta_json)
            out.append({"trial_id": t["trial_id"], "status": t["status"], "config": dict(t["config"] or {}),
                        "last_result": dict(meta.last_result or {})})  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{f} is damaged ({type(e).__name__}); move it away to resume from an older snapshot if there is "
            "one, or restore it from a backup"
        ) from e
    return out


class GroupedScheduler(_PickledState, TrialScheduler):
    """One trial scheduler per group, made by ``factory()`` when a group's first trial arrives."""

    def __init__(self, factory: Callable[[], TrialScheduler], metric: str, mode: str,
                 fifo_groups: tuple[str, ...] = ()):  # fmt: skip
        super().__init__()
        self.factory = factory
        self._metric = metric
        self.mode = mode
        self.subs: dict[str | None, TrialScheduler] = {}
        # fused groups (budget.fuse > 1): Tune never stops a bundle; its members are pruned inside it
        self.fifo_groups = tuple(fifo_groups)

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True

    def _sub(self, trial) -> TrialScheduler:
        g = group_of(trial.config)
        if g not in self.subs:
            self.subs[g] = FIFOScheduler() if g in getattr(self, "fifo_groups", ()) else self.factory()
        return self.subs[g]

    def on_trial_add(self, tune_controller, trial) -> None:
        self._sub(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self._sub(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result) -> str:
        return self._sub(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self._sub(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self._sub(trial).on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        for sub in self.subs.values():
            t = sub.choose_trial_to_run(tune_controller)
            if t is not None:
                return t
        return FIFOScheduler().choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return "; ".join(f"{g}: {s.debug_string()}" for g, s in self.subs.items())



def _starts_inside(g: GroupSearch) -> list[dict]:
    """The group's starting points that lie inside the space the searcher is given. The plan checked them
    against the space it knew; the sweep's may differ (DiSK's ``delta_offset`` range follows the CE stage's
    error, known once that stage is built), and Optuna runs an enqueued value outside a range with only a
    warning. A point dropped here is said on the driver's output."""
    check = getattr(g.space, "valid_starts", None)
    if check is None or not g.starts:
        return list(g.starts)
    kept, notes = check(list(g.starts))
    for note in notes:
        if "left out" in note:
            print(f"kdtune: {g.name}: {note}", flush=True)
    return kept


def _name_metric(study, metric: str) -> None:
    """``study.set_metric_names`` (what optuna-dashboard shows instead of "Objective 0"), without its
    ExperimentalWarning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.set_metric_names([metric])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
