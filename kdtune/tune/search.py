"""One Tune experiment for a whole sweep: a searcher that keeps one Optuna study per (student, method) group,
and a scheduler that stops trials by comparing them only with trials of their own group.

Every group's units (Tune trials of K ≥ 1 members, :mod:`kdtune.tune.protocol`) are scheduled together, so a
slot never waits while a unit of any group could run; the group travels in a unit's config (``GROUP_KEY``).

:class:`GroupedOptunaSearch` is Ray's :class:`~ray.tune.search.Searcher` interface over Optuna's ask/tell
API: each member is one Optuna trial of its group's study, each group gets exactly its budget, its published
points first, and a member is told its :class:`~kdtune.tune.protocol.Outcome`'s state (PRUNED when stopped
early, FAIL when it failed or diverged). :class:`GroupedScheduler` holds one scheduler per group (ASHA,
HyperBand or FIFO), so ASHA's rungs hold one group's results only.

More: docs/grouped_search.md (why not Ray's ``OptunaSearch``, the order in which groups get trials).
"""

from __future__ import annotations

import heapq
import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field

from optuna.samplers import TPESampler
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher, SearchGenerator

from kdtune.tune.protocol import (
    GROUP_KEY,
    Member,
    Outcome,
    finite,
    group_of,
    member_id,
    member_rows,
    members_of,
    unit_config,
)
from kdtune.tune.rayrt import newest_generator_state, snapshot_trials

__all__ = ["GROUP_KEY", "GroupSearch", "GroupedOptunaSearch", "GroupedScheduler", "GroupedSearchGenerator",
           "group_of", "snapshot_trials"]  # fmt: skip


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
        self.live: dict[str, str] = {}  # tune trial id -> group
        self.units: dict[str, dict] = {}  # tune trial id -> its members' Optuna trials and what they were told

    def _new_study(self, name: str, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # also in a restored copy (no __init__)
        study = optuna.create_study(
            study_name=name, direction="maximize" if self.mode == "max" else "minimize",
            sampler=WindowedTPESampler(window=TPE_WINDOW, seed=seed),
        )  # fmt: skip
        name_metric(study, self.metric)
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
        self.asked = {n: 0 for n in self.order}
        self.live, self.units = {}, {}
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
                status = t.get("status")
                ended = status == "TERMINATED" or (status == "ERROR" and not requeue_errored)
                asked = {}
                for m in members_of(t["trial_id"], t["config"]):
                    study.enqueue_trial(dict(m.config))
                    ot = study.ask()
                    g.space(ot)
                    asked[m.id] = ot
                self.asked[name] += len(asked)
                self._open_unit(t["trial_id"], name, t["config"], asked)
                res = t.get("last_result") or {}
                if ended:
                    self.on_trial_complete(t["trial_id"], res, error=status == "ERROR")
                elif res:
                    self.on_trial_result(t["trial_id"], res)
            for p in g.starts[: g.budget][self.asked[name]:]:
                study.enqueue_trial(p, skip_if_exists=True)

    def _open_unit(self, trial_id: str, group: str, config: dict, trials: dict) -> None:
        self.live[trial_id] = group
        self.units[trial_id] = {"group": group, "config": config, "trials": trials, "told": set(), "reported": {}}

    # ------------------------------------------------------------------ Searcher interface
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # metric and mode are ours: one study per group, made in __init__

    def _next_group(self) -> str | None:
        open_ = [n for n in self.order if self.asked[n] < self.groups[n].budget]
        if not open_:
            return None
        live = {n: 0 for n in self.order}
        for g in self.live.values():
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
        k = min(max(1, g.fuse), g.budget - self.asked[name])
        members, trials = [], {}
        for i in range(k):
            ot = self.studies[name].ask()
            consts = g.space(ot) or {}
            mid = member_id(trial_id, i, k)
            members.append(Member(mid, {**ot.params, **consts}, ot.number))
            trials[mid] = ot
        self.asked[name] += k
        config = unit_config(name, members)
        self._open_unit(trial_id, name, config, trials)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.units:
            self._told(trial_id, result or {}, ended=False)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.pop(trial_id, None)
        if trial_id in self.units:
            self._told(trial_id, result or {}, ended=True, error=error)
            self.units.pop(trial_id, None)

    def _told(self, trial_id: str, result: dict, ended: bool, error: bool = False) -> None:
        """Each member's per-epoch value to its own Optuna trial; its outcome once it has one (the unit said
        so, or the unit ended), as :class:`~kdtune.tune.protocol.Outcome` maps it to Optuna's state."""
        u = self.units[trial_id]
        study = self.studies[u["group"]]
        rows = member_rows(trial_id, u["config"], result, ended=ended, error=error, epochs=self.epochs)
        for mid, ot in u["trials"].items():
            if mid in u["told"]:
                continue
            r = rows.get(mid, {})
            v, epoch, outcome = r.get(self.metric), r.get("epoch"), Outcome(r.get("outcome", "running"))
            seen = u["reported"].setdefault(mid, set())
            if finite(v) and epoch is not None and int(epoch) not in seen:
                ot.report(float(v), int(epoch))
                seen.add(int(epoch))
            if outcome is Outcome.RUNNING:
                continue
            try:
                if outcome is Outcome.COMPLETED:
                    study.tell(ot, float(v))
                else:
                    study.tell(ot, state=outcome.optuna_state)
            except RuntimeError:  # told already (a resumed experiment replaying an event)
                pass
            u["told"].add(mid)

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
        state = newest_generator_state(dirpath, self.CKPT_FILE_TMPL.format("*"))
        if not state:
            raise RuntimeError(f"Unable to find checkpoint in {dirpath}.")
        self.set_state(state)
        trials = snapshot_trials(dirpath) or []
        self._counter = max(self._counter, len(trials))
        self._finished = False  # a search-generator state newer than the trial list may say finished
        self.searcher.rebuild(trials, requeue_errored=self.on_resume in ("resume", "restart"))


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
        if not finite(result.get(self._metric)):  # a unit whose members all diverged: nothing to compare
            return TrialScheduler.CONTINUE
        return self._sub(trial).on_trial_result(tune_controller, trial, by_epoch(result))

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        if not finite((result or {}).get(self._metric)):  # no value to record (its members all diverged)
            self._sub(trial).on_trial_remove(tune_controller, trial)
            return
        self._sub(trial).on_trial_complete(tune_controller, trial, by_epoch(result))

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


def name_metric(study, metric: str) -> None:
    """``study.set_metric_names`` (what optuna-dashboard shows instead of "Objective 0"), without its
    ExperimentalWarning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.set_metric_names([metric])


# TPE reads the best 25 complete trials (its "below" group never holds more), the running ones and this many recent
TPE_WINDOW = 1000


def recent(trials: list, window: int, maximize: bool = True) -> list:
    """``trials`` (by number) cut to the best 25 complete ones (TPE's "below" group never holds more), the running
    ones and the ``window`` most recent."""
    from optuna.trial import TrialState

    if len(trials) <= window:
        return trials
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    keep = {t.number for t in heapq.nsmallest(25, done, key=lambda t: -t.value if maximize else t.value)}
    keep |= {t.number for t in trials[-window:]}
    return [t for t in trials if t.number in keep or t.state == TrialState.RUNNING]


class WindowedTPESampler(TPESampler):
    """Optuna's TPESampler whose TPE reads a study's :func:`recent` trials: its ask bounded in the study's size
    (TPE reads every trial at each ask: 62 ms at 10,000 trials, 12.5 ms with a window of 1,000; measured by
    ``kdtune bench --simulate``). A study of at most ``window`` trials samples exactly as TPESampler does."""

    def __init__(self, window: int = 1000, **kw):
        super().__init__(**kw)
        self.window = window

    def _sample(self, study, trial, search_space):
        full, up = study._get_trials, study.direction.name == "MAXIMIZE"
        study._get_trials = lambda *a, **k: recent(full(*a, **k), self.window, up)  # for this ask only
        try:
            return super()._sample(study, trial, search_space)
        finally:
            del study._get_trials


def by_epoch(result: dict) -> dict:
    """The result a group's scheduler reads: its ``training_iteration`` is the unit's epoch. A unit reports only
    at the epochs its scheduler decides at (:func:`report_epochs`), so Tune's count of reports is not its epoch;
    a scheduler pickled before this rule (``time_attr="training_iteration"``) reads the epoch all the same."""
    epoch = result.get("epoch")
    if epoch is None or result.get("training_iteration") == epoch:
        return result
    return {**result, "training_iteration": epoch}


def report_epochs(spec) -> frozenset[int] | None:
    """The epochs at which a group's scheduler decides, where every unit reports to Tune (besides its last
    epoch and a progress report every few seconds): ASHA's rungs, none for FIFO; None (every epoch) for
    HyperBand, whose brackets pause and resume trials. ASHA stops a unit at the first report at or past a
    rung, so reporting at each rung's epoch gives the decisions of a report per epoch. The rungs are read from
    the scheduler Ray builds (every epoch when its layout is not the one known)."""
    if spec.scheduler.name == "none":
        return frozenset()
    if spec.scheduler.name != "asha":
        return None
    rungs = [m for b in getattr(make_scheduler(spec), "_brackets", None) or [None] for m, _ in getattr(b, "_rungs", ())]
    if not rungs:
        return None
    return frozenset(int(math.ceil(m)) for m in rungs)


def make_scheduler(spec):
    """ASHA (default), HyperBand or none (FIFO), over epochs (``training_iteration``, which
    :class:`GroupedScheduler` sets to the unit's epoch: :func:`by_epoch`), for one group."""
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler

    s = spec.scheduler
    if s.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", metric=spec.metric, mode=spec.mode,
                             max_t=spec.budget.epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor)  # fmt: skip
    if s.name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", metric=spec.metric, mode=spec.mode,
                                  max_t=spec.budget.epochs, reduction_factor=s.reduction_factor)  # fmt: skip
    return FIFOScheduler()
