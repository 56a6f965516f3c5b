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

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

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
    def __init__(self, groups: list[GroupSearch], metric: str, mode: str, epochs: int, seed: int = 0):
        super().__init__(metric=metric, mode=mode)
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.groups = {g.name: g for g in groups}
        self.order = [g.name for g in groups]
        self.epochs = int(epochs)
        self.asked: dict[str, int] = {g.name: 0 for g in groups}
        self.studies = {}
        for i, g in enumerate(groups):
            study = optuna.create_study(
                study_name=g.name, direction="maximize" if mode == "max" else "minimize",
                sampler=optuna.samplers.TPESampler(seed=seed + i),
            )  # fmt: skip
            _name_metric(study, metric)
            for p in g.starts[: g.budget]:
                study.enqueue_trial(p, skip_if_exists=True)
            self.studies[g.name] = study
        self.live: dict[str, tuple[str, Any]] = {}  # tune trial id -> (group, optuna trial)
        self.reported: dict[str, set[int]] = {}

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

    def suggest(self, trial_id: str) -> dict | None:
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
        from optuna.trial import TrialState

        if trial_id in getattr(self, "bundles", {}):
            self.live.pop(trial_id, None)
            return self._bundle_result(trial_id, result or {}, final=True, error=error)
        entry = self.live.pop(trial_id, None)
        seen = self.reported.pop(trial_id, set())
        if entry is None:
            return
        name, ot = entry
        study = self.studies[name]
        result = result or {}
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



def _name_metric(study, metric: str) -> None:
    """``study.set_metric_names`` (what optuna-dashboard shows instead of "Objective 0"), without its
    ExperimentalWarning."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.set_metric_names([metric])


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
