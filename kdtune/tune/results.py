"""A sweep's results: one summary per group from its members' results, the repeats' statistics, the overall
best, and the figures of how the slots were used (slot utilisation, timeline, orchestration share).

Every figure here is read from records with one owner each: Tune's results (through
:func:`kdtune.tune.protocol.expand_members`), the units' events (``open``/``closed``) and MLflow.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtune.errors import KdtuneError
from kdtune.tune.protocol import GROUP_KEY, MemberResult, Outcome, finite
from kdtune.tune.record import read_events, trial_folder


class SweepFailed(KdtuneError):
    """A sweep whose work produced no result (every trial failed): one line per cause; exit status 1."""

    exit_code = 1


@dataclass
class SweepResult:
    """What ``kdtune.sweep(...)`` returns: one summary per (student, method) group and the overall best."""

    name: str
    experiment_dir: str
    status: str
    metric: str
    mode: str
    groups: list = field(default_factory=list)
    best: dict | None = None
    tracking_uri: str | None = None
    stages: dict = field(default_factory=dict)
    wall_s: float | None = None
    slot_utilisation: float | None = None  # trial wall time / (concurrency x the sweep's wall after its stages)
    stages_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def group(self, method: str, student: str | None = None, teacher: str | None = None) -> dict:
        """The summary of the group of ``method`` (and ``student``, and ``teacher``'s name in a sweep of several
        teachers); a sweep of several teachers needs ``teacher`` for a method that reads one."""
        found = [g for g in self.groups if g["method"] == method and student in (None, g["student"])
                 and teacher in (None, g.get("teacher"))]  # fmt: skip
        if len({g.get("teacher") for g in found}) > 1:
            raise KeyError(f"{method}: one group per teacher ({', '.join(sorted(g['teacher'] for g in found))}); "
                           "name the teacher")  # fmt: skip
        if not found:
            raise KeyError(method)
        return found[0]

    def table(self) -> str:
        """Best trial per (student, method), as a fixed-width text table."""
        from kdtune.tables import table

        rows = []
        for g in self.groups:
            b = g.get("best") or {}
            rep = g.get("repeats")
            val = fmt_num(b.get(self.metric))
            test = fmt_num(b.get("test_acc"))
            if rep:
                val = (
                    f"{rep['val_mean']:.2f} ± {rep['val_std']:.2f}"
                    if rep.get("val_mean") is not None
                    else val
                )
                test = f"{rep['test_mean']:.2f} ± {rep['test_std']:.2f}"
            counts = f"{g.get('trials', 0)}"
            extra = []
            if g.get("stopped"):
                extra.append(f"{g['stopped']} stopped")
            if g.get("errored"):
                extra.append(f"{g['errored']} failed")
            if extra:
                counts += f" ({', '.join(extra)})"
            hp = " ".join(f"{k}={fmt_short(v)}" for k, v in (b.get("config") or {}).items()) or "-"
            rows.append((g.get("teacher") or "-", g["student"], g["method"], counts, val, test, hp))
        head = ("teacher", "student", "method", "trials", f"best {self.metric}", "test_acc", "hyperparameters")
        if not any(g.get("teacher") for g in self.groups):  # one teacher or none: no teacher column
            head, rows = head[1:], [r[1:] for r in rows]
        return table(head, rows)


def result_from_state(spec, exp: Path, state: dict, tracking_uri: str | None = None) -> SweepResult:
    """The results an experiment's ``state.json`` holds (finished or not), in the spec's group order."""
    groups = [state["groups"][g.name] for g in spec.groups() if g.name in state.get("groups", {})]
    return SweepResult(name=spec.name, experiment_dir=str(exp), status=state.get("status"), metric=spec.metric,
                       mode=spec.mode, groups=groups, best=state.get("best"), tracking_uri=tracking_uri,
                       stages=state.get("stages", {}), slot_utilisation=state.get("slot_utilisation"))  # fmt: skip


def fmt_num(v: Any) -> str:
    return f"{v:.2f}" if finite(v) else "-"


def fmt_short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def fmt_duration(s: float) -> str:
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def summarize(group: str, student: str, method: str, members: list[MemberResult], metric: str, mode: str,
              epochs: int) -> dict:
    """A group's summary from its members: each trial's row, the counts by outcome, and the best trial
    (completed before pruned, then by ``metric``)."""
    trials = []
    for r in members:
        m = r.metrics
        trials.append({
            "trial_id": m["trial_id"], "config": {k: v for k, v in r.config.items() if k != GROUP_KEY},
            "epochs_run": m.get("epoch"), "outcome": r.outcome.value, metric: m.get(metric),
            "val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"), "best_val_acc": m.get("best_val_acc"),
            "orch_frac": m.get("orch_frac"), "error": r.error,
        })  # fmt: skip
        if m.get("bundle"):
            trials[-1]["bundle"] = m["bundle"]
    ok = [t for t in trials if t["error"] is None and finite(t.get(metric))]
    best = max(ok, key=lambda t: rank(t, metric, mode, epochs)) if ok else None
    return {
        "group": group, "student": student, "method": method, "status": "done", "trials": len(trials),
        "completed": sum(1 for t in ok if t["outcome"] == Outcome.COMPLETED.value),
        "stopped": sum(1 for t in ok if t["outcome"] != Outcome.COMPLETED.value),
        "errored": sum(1 for t in trials if t["error"] is not None), "best": best, "all": trials,
    }  # fmt: skip


def repeat_stats(summary: dict, repeats: list[MemberResult], seeds: list[int]) -> dict:
    """Mean ± std of validation and test accuracy over a group's best trial and its completed repeats, and the
    repeats themselves (``runs``: trial id, seed, outcome), so that a reader finds their folders."""
    best = summary["best"]
    ms = [r.metrics for r in repeats if r.outcome is Outcome.COMPLETED]
    vals = [v for v in [best.get("val_acc"), *(m.get("val_acc") for m in ms)] if finite(v)]
    tests = [v for v in [best.get("test_acc"), *(m.get("test_acc") for m in ms)] if finite(v)]
    runs = [{"trial_id": r.metrics["trial_id"], "seed": r.config.get("train.seed"), "outcome": r.outcome.value}
            for r in repeats]  # fmt: skip
    return {"seeds": seeds, "n": len(tests), "val_mean": _mean(vals), "val_std": _std(vals),
            "test_mean": _mean(tests), "test_std": _std(tests), "test": tests, "runs": runs}  # fmt: skip


def rank(t: dict, metric: str, mode: str, epochs: int):
    v = t[metric]
    return (t.get("epochs_run") == epochs, v if mode == "max" else -v)


def overall_best(summaries: list[dict], metric: str, mode: str, epochs: int) -> dict | None:
    bests = [dict(g["best"], group=g["group"], method=g["method"], student=g["student"]) for g in summaries
             if g.get("best")]  # fmt: skip
    return max(bests, key=lambda t: rank(t, metric, mode, epochs)) if bests else None


def orchestration_summary(summaries: list[dict]) -> str | None:
    """One line: the median and largest share of a trial's wall time spent on orchestration (checkpoint
    writes, MLflow logging, Tune reporting), over the trials of this run that reported it."""
    fracs = [t["orch_frac"] for g in summaries for t in g.get("all", []) if finite(t.get("orch_frac"))]
    if not fracs:
        return None
    return (f"orchestration (checkpoints, MLflow, Tune reports): median {100 * statistics.median(fracs):.2f}% "
            f"of a trial's wall time, max {100 * max(fracs):.2f}%, over {len(fracs)} trials")  # fmt: skip


def slot_utilisation(exp: Path, trial_ids: list[str], concurrency: int, wall_s: float,
                     since: float = 0.0) -> float | None:
    """Σ over trials of the time a trial process held it (``open`` to ``closed`` in its events, summed over
    its restarts, from ``since`` on) ÷ (``concurrency`` × ``wall_s``, the sweep's wall time after its
    stages, in this driver)."""
    if wall_s <= 0 or concurrency <= 0 or not trial_ids:
        return None
    busy = 0.0
    for tid in trial_ids:
        opened = None
        for ev in read_events(trial_folder(exp, tid)):
            if ev.get("event") == "open":
                opened = ev.get("time")
            elif ev.get("event") == "closed" and opened is not None:
                busy += max(0.0, float(ev["time"]) - max(float(opened), since))
                opened = None
    return busy / (concurrency * wall_s)


def timeline(exp: Path, trial_ids: list[str], **marks: float) -> dict[str, float]:
    """Seconds from the sweep's start to each mark, and to the first trial's start and the last trial's end
    (from the trials' events): where the time outside the trials goes."""
    t0 = marks.pop("t0")
    times = [(ev["event"], float(ev["time"])) for tid in trial_ids for ev in read_events(exp / "trials" / tid)
             if ev.get("event") in ("open", "closed") and float(ev["time"]) >= marks.get("tune_start", t0)]  # fmt: skip
    out = {k: round(v - t0, 2) for k, v in marks.items()}
    if times:
        out["first_trial_open"] = round(min(t for e, t in times if e == "open") - t0, 2)
        out["last_trial_closed"] = round(max(t for e, t in times) - t0, 2)
    return out


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def _std(xs):
    return statistics.stdev(xs) if len(xs) > 1 else 0.0
