"""Fused bundles in a sweep (``budget.fuse: K``): K trials of one group trained as one
:class:`~kdtune.engine.bundle.Bundle` inside ONE Tune trial (one scheduled unit, one trial's resources).

Who sees what:

- **Tune** sees the bundle: one trial, one slot, one ``tune.report`` per epoch. Its result carries the bundle's
  best live value of the metric (for Tune's bookkeeping) and every member's own figures as flat keys
  ``member/<member id>/<key>`` (:func:`member_results` reads them back). The Tune-level scheduler of a fused
  group is FIFO: Tune never stops a bundle, because a bundle is not one configuration.
- **Optuna** sees the members: :class:`~kdtune.tune.search.GroupedOptunaSearch` asks K trials of the group's
  study at once for one bundle and tells each member's Optuna trial its own per-epoch values and outcome
  (COMPLETE, PRUNED, FAIL). ``optuna.db`` (the mirror) holds one trial per member.
- **Each member** is a trial everywhere else: its own folder ``trials/<member id>/`` (``events.jsonl``,
  ``ckpt/state.pt`` in the lone Trainer's format, ``best.pt``, ``done.json``), its own MLflow child run
  (tagged with its member id as ``kdtune.trial_id`` and ``kdtune.bundle``), its own row in ``state.json``,
  ``results.json`` and the report. A member id is ``<tune trial id>-m<i>``.

Early stopping of members (ASHA's rule, per member, inside the bundle): with ``scheduler: asha`` (or
``hyperband``, which a fused group runs as ASHA's single bracket) a member reaching a rung (epoch
``grace_period · reduction_factor^k`` below ``budget.epochs``) records its value in the group's rung file
``fuse/<group>/rungs.jsonl`` (shared by all bundles of the group, across processes and nodes) and is pruned
when it is below the top ``1/reduction_factor`` of the values recorded there before it, as Ray's ASHA decides
for a trial. A pruned member is closed (``outcome: pruned``, its epochs so far) and dropped from the stacks
(:meth:`Bundle.drop`): it stops costing compute at once. The bundle ends when its last member completes or
is pruned. With ``scheduler: none`` members are never pruned.

Checkpoints and resume. Every epoch each live member's state is written next to its ``state.pt`` as
``state.pending.pt``; then ``commit.json`` in the bundle's own folder ``trials/<tune trial id>/`` names the
epoch; then each pending file replaces ``state.pt``. A restarted bundle (a retried worker, a resumed driver)
rolls the pending files of a committed epoch forward and drops those of an uncommitted one, so all live
members resume at the same epoch (a bundle trains its members in lock step) and no committed epoch is trained
twice. Epoch events and MLflow metrics of a committed epoch that a kill kept from being written are written
on restart (``events.jsonl``: ``recovered: true``; MLflow: backfilled). A member whose ``done.json`` exists is
finished (completed, pruned or diverged) and is not trained again. Tune is handed no checkpoint: the members'
folders are the state, so nothing goes stale when Tune keeps only its newest checkpoint.

``auto`` (:func:`resolve_fuse`): on the CPU K = :data:`CPU_AUTO_FUSE` (4). On two CPU cores the bundle's gain
is the teacher forward and the loader pass shared by the members and one trial's start-up (Ray actor, data,
teacher, MLflow) for K trials; ``kdtune bench --fuse`` measured 2.0x (FLOP-ideal 2.0x) at K = 4 against 2.4x
at K = 8 for resnet32x4 -> resnet8x4, so K = 4 takes most of the gain while TPE is asked for at most 4 points
at once (a larger batch of asks is sampled from less information). On a GPU K is the trial's share of the
device's memory (``gpus_per_trial`` of it) divided by :data:`GPU_MEMBER_GIB` per member, in [1, 16]; a driver
that sees no GPU (a CPU head node) uses :data:`CPU_AUTO_FUSE`. The GPU figure is a documented estimate, not
a measurement (no GPU was lent to the session that built this). A method that cannot be fused
(``Method.unfusable``: DiSK) gets K = 1 under ``auto`` and is refused with an explicit K > 1.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError

MEMBERS_KEY = "kdtune.members"
MEMBER_PREFIX = "member/"
COMMIT_FILE = "commit.json"
PENDING = "state.pending.pt"
CPU_AUTO_FUSE = 4
GPU_MEMBER_GIB = 2.0
MAX_AUTO_FUSE = 16
# Per-member keys reported to Tune (and so to the searcher, the mirror and the summaries).
MEMBER_KEYS = ("epoch", "val_acc", "best_val_acc", "val_loss", "train_loss", "test_acc", "test_loss",
               "test_acc_at_best_val", "orch_frac")  # fmt: skip


# ---------------------------------------------------------------------------------------------- planning


def resolve_fuse(fuse: int | str, method: str, gpus_per_trial: float, budget: int, gpu_gib: float | None = None) -> int:
    """K for one group: ``fuse`` (int or ``auto``) checked against the method, capped at the group's budget.
    ``gpu_gib``: the device's memory (None: asked of torch when ``gpus_per_trial > 0``)."""
    from kdtune.losses import METHODS

    cls = METHODS.get(method)
    if fuse == "auto":
        if cls.unfusable:
            return 1
        k = CPU_AUTO_FUSE
        if gpus_per_trial > 0:
            gib = gpu_gib if gpu_gib is not None else _gpu_gib()
            if gib is not None:
                k = int(gib * min(1.0, gpus_per_trial) // GPU_MEMBER_GIB)
        k = max(1, min(MAX_AUTO_FUSE, k))
    else:
        k = int(fuse)
        if k > 1 and cls.unfusable:
            raise ConfigError(
                f"budget.fuse={k} cannot fuse method {method}: {cls.unfusable}; use budget.fuse: auto "
                f"({method} then runs one trial per slot) or 1"
            )
    return max(1, min(k, budget))


def _gpu_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:  # noqa: BLE001 - no device: the CPU's value
        pass
    return None


def check_fusable(group: str, parameters: dict, method: str, base: dict) -> None:
    """A fused group may search only what members can hold each their own way (FUSABLE_FIELDS, method
    hyperparameters); one line naming the first parameter that is not."""
    from kdtune.engine.bundle import FUSABLE_FIELDS
    from kdtune.losses import METHODS

    hps = METHODS.get(method).hparams
    for name in parameters:
        field_ = name[len("train."):] if name.startswith("train.") else name
        if name in hps and not name.startswith("train."):
            continue
        if field_ not in FUSABLE_FIELDS:
            raise ConfigError(
                f"budget.fuse: group {group} searches {name}, which the members of a bundle must share "
                f"(they may differ only in the method's hyperparameters and {', '.join(FUSABLE_FIELDS)}); "
                "use budget.fuse: 1 or fix it in the space"
            )
    if base.get("compile"):
        raise ConfigError("budget.fuse > 1 cannot be used with train.compile=true; drop one of them")


def units(budget: int, fuse: int) -> int:
    """Tune trials a group of ``budget`` members needs in bundles of ``fuse``."""
    return math.ceil(budget / max(1, fuse))


# ---------------------------------------------------------------------------------------------- results


def is_bundle(config: dict | None) -> bool:
    return MEMBERS_KEY in (config or {})


def member_results(result: dict | None) -> dict[str, dict[str, Any]]:
    """``member/<id>/<key>`` keys of a bundle's (flat) result, as {member id: {key: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in (result or {}).items():
        if isinstance(k, str) and k.startswith(MEMBER_PREFIX):
            mid, _, key = k[len(MEMBER_PREFIX):].rpartition("/")
            if mid:
                out.setdefault(mid, {})[key] = v
    return out


def member_row(mid: str, r: dict) -> dict:
    return {f"{MEMBER_PREFIX}{mid}/{k}": v for k, v in r.items() if v is not None}


class MemberResult:
    """A bundle's member as a Tune ``Result`` reads to the driver's summaries and :func:`close_open_runs`:
    ``metrics`` (with ``trial_id`` = the member id and ``bundle``), ``config`` (group + the member's
    hyperparameters), ``error`` (the bundle's error for a member it left unfinished, or a diverged member's
    reason) and ``path``."""

    def __init__(self, metrics: dict, config: dict, error, path: str):
        self.metrics = metrics
        self.config = config
        self.error = error
        self.path = path


def expand_members(results) -> list:
    """Tune results with each bundle replaced by its members (:class:`MemberResult`); others as they are."""
    from kdtune.tune.search import GROUP_KEY

    out = []
    for r in results:
        config = r.config or {}
        if not is_bundle(config):
            out.append(r)
            continue
        last = member_results(r.metrics or {})
        bid = str((r.metrics or {}).get("trial_id") or Path(r.path).name.rsplit("_", 1)[-1])
        for m in config[MEMBERS_KEY]:
            mid = m["id"]
            got = dict(last.get(mid, {}))
            outcome = got.pop("outcome", None)
            metrics = {**got, "trial_id": mid, "bundle": bid}
            error = None
            if outcome == "diverged":
                error = f"DivergedError: {got.get('error') or 'diverged'}"
            elif outcome not in ("completed", "pruned"):
                error = r.error if r.error is not None else f"the bundle {bid} ended before member {mid} did"
            metrics.pop("error", None)
            out.append(MemberResult(metrics, {GROUP_KEY: config.get(GROUP_KEY), **m["config"]}, error,
                                    str(Path(r.path).parent / mid)))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------- member ASHA


def rung_epochs(epochs: int, grace_period: int, reduction_factor: float) -> list[int]:
    """ASHA's rung milestones below ``epochs`` (Ray's ASHA with one bracket)."""
    out, k = [], 0
    while True:
        r = int(grace_period * reduction_factor**k)
        if r >= epochs:
            return out
        if not out or r > out[-1]:
            out.append(r)
        k += 1


class MemberPruner:
    """ASHA's decision for a member at a rung, against every value the group's members recorded at that rung
    (``fuse/<group>/rungs.jsonl``, appended by all bundles of the group). Idempotent per (member, rung): a
    restarted bundle asking again gets the decision taken against the values recorded before it."""

    def __init__(self, path: Path, rungs: list[int], reduction_factor: float, mode: str):
        self.path = path
        self.rungs = set(rungs)
        self.rf = reduction_factor
        self.mode = mode
        path.parent.mkdir(parents=True, exist_ok=True)

    def _records(self) -> list[dict]:
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for ln in lines:
            try:
                out.append(json.loads(ln))
            except ValueError:
                pass  # a line a kill cut short
        return out

    def prune(self, member: str, epoch: int, value: float | None) -> bool:
        if epoch not in self.rungs or value is None or not math.isfinite(value):
            return False
        before = []
        for rec in self._records():
            if rec.get("rung") != epoch:
                continue
            if rec.get("member") == member:
                break  # recorded already: decide against what came before it
            before.append(float(rec["value"]))
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps({"member": member, "rung": epoch, "value": value, "time": time.time()}) + "\n")
        if not before:
            return False
        import numpy as np

        v = value if self.mode == "max" else -value
        vals = [x if self.mode == "max" else -x for x in before]
        cutoff = float(np.nanpercentile(vals, (1 - 1 / self.rf) * 100))
        return v < cutoff


# ---------------------------------------------------------------------------------------------- the trainable


def run_bundle(config: dict, ctx, data, trial_id: str, trial_name: str) -> None:
    """The bundle trainable (called by :func:`kdtune.tune.trainable.run_trial` for a config with
    :data:`MEMBERS_KEY`)."""
    from kdtune.tune.trainable import _event, trial_folder

    members = list(config[MEMBERS_KEY])
    bfolder = trial_folder(ctx.experiment_dir, trial_id)
    bfolder.mkdir(parents=True, exist_ok=True)
    mfolders = {m["id"]: trial_folder(ctx.experiment_dir, m["id"]) for m in members}
    _event(bfolder, event="open", trial_id=trial_id, members=list(mfolders), nice=os.nice(0))
    for mid, f in mfolders.items():
        (f / "ckpt").mkdir(parents=True, exist_ok=True)
        _event(f, event="open", trial_id=mid, bundle=trial_id, nice=os.nice(0))
    try:
        _BundleTrial(members, ctx, data, trial_id, trial_name, bfolder, mfolders).run()
    finally:
        for mid, f in mfolders.items():
            _event(f, event="closed", trial_id=mid, bundle=trial_id)
        _event(bfolder, event="closed", trial_id=trial_id)


class _BundleTrial:
    def __init__(self, members, ctx, data, trial_id, trial_name, bfolder: Path, mfolders: dict[str, Path]):
        self.members = members
        self.ctx = ctx
        self.data = data
        self.trial_id = trial_id
        self.trial_name = trial_name
        self.bfolder = bfolder
        self.mfolders = mfolders
        self.final: dict[str, dict] = {}  # member id -> its done.json (with "outcome")
        self.last: dict[str, dict] = {}  # member id -> its latest reported figures
        self.trackers: dict[str, Any] = {}
        self.pruner: MemberPruner | None = None

    # ------------------------------------------------------------------ helpers
    def _event(self, mid: str, **kw) -> None:
        from kdtune.tune.trainable import _event

        _event(self.mfolders[mid], trial_id=mid, bundle=self.trial_id, **kw)

    def _figures(self, m: dict, outcome: str) -> dict:
        r = {k: m.get(k) for k in MEMBER_KEYS if isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool)}
        r["outcome"] = outcome
        return r

    def _report(self, orch: dict | None = None) -> None:
        from ray import tune

        spec_metric = self.metric
        rows: dict[str, Any] = {}
        for mid in self.mfolders:
            r = self.final.get(mid) or self.last.get(mid)
            if r:
                rows.update(member_row(mid, {k: r.get(k) for k in (*MEMBER_KEYS, "outcome", "error")}))
        vals = [r.get(spec_metric) for r in (self.final.get(m) or self.last.get(m) or {} for m in self.mfolders)]
        vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        best = (max(vals) if self.mode == "max" else min(vals)) if vals else float("nan")
        epoch = max([int(r.get("epoch") or 0) for r in [*self.final.values(), *self.last.values()]], default=0)
        result = {spec_metric: best, "epoch": epoch, "trial_id": self.trial_id, "bundle_size": self.size,
                  **(orch or {}), **rows}  # fmt: skip
        tune.report(result)

    @property
    def size(self) -> int:
        return self.bundle.size if getattr(self, "bundle", None) is not None else 0

    # ------------------------------------------------------------------ the run
    def run(self) -> None:
        from kdtune.tune.trainable import SharedData

        ctx = self.ctx
        settings = ctx.fuse or {}
        self.metric = settings.get("metric", "val_acc")
        self.mode = settings.get("mode", "max")
        rungs = settings.get("rungs") or []
        if rungs:
            self.pruner = MemberPruner(Path(ctx.experiment_dir) / "fuse" / ctx.group / "rungs.jsonl", rungs,
                                       float(settings.get("reduction_factor", 2.0)), self.mode)  # fmt: skip
        for m in self.members:
            done = self.mfolders[m["id"]] / "done.json"
            if done.is_file():
                self.final[m["id"]] = json.loads(done.read_text())
        live = [m for m in self.members if m["id"] not in self.final]
        if not live:
            for m in self.members:
                self._event(m["id"], event="start", epoch=self.final[m["id"]].get("epoch"), finished=True)
            self._report()
            return
        data = self.data.get() if isinstance(self.data, SharedData) else self.data
        try:
            self._train(live, data)
        except BaseException as e:
            from kdtune.tracking.client import TAG_OUTCOME, TAG_STOPPED_EPOCH

            for mid, tr in self.trackers.items():
                if not tr.ended:
                    ep = (self.last.get(mid) or {}).get("epoch") or 0
                    try:
                        tr.set_tags({TAG_OUTCOME: "failed", TAG_STOPPED_EPOCH: ep})
                        tr.end("FAILED", f"{type(e).__name__}: {e}")
                    except Exception:  # noqa: BLE001 - the bundle's own error is the one to report
                        pass
            raise

    def _open_trackers(self, live: list[dict]) -> None:
        ctx = self.ctx
        if not ctx.tracking_uri:
            return
        from kdtune.tracking import TrialTracker
        from kdtune.tracking.client import TAG_OUTCOME

        for i, m in enumerate(self.members):
            if m not in live:
                continue
            mid = m["id"]
            tr = TrialTracker(ctx.tracking_uri, ctx.experiment_name, ctx.parent_run_id, mid,
                              f"{self.trial_name}-m{i}", background=True)  # fmt: skip
            seed = m["config"].get("train.seed", m["config"].get("seed", ctx.base.get("seed")))
            tr.log_trial_params(ctx.method, m["config"], ctx.base,  # the names a lone trial logs (dkd.beta, train.lr)
                                {**ctx.params, "method": ctx.method, "phase": ctx.phase, "seed": seed})  # fmt: skip
            tr.set_tags({"kdtune.group": ctx.group, "kdtune.method": ctx.method, "kdtune.phase": ctx.phase,
                         "kdtune.trial_dir": str(self.mfolders[mid]), "kdtune.bundle": self.trial_id,
                         "kdtune.bundle_members": len(self.members), TAG_OUTCOME: "running"})  # fmt: skip
            self.trackers[mid] = tr

    def _restore(self, bundle, live: list[dict]) -> int:
        """Roll the members' pending states forward (committed epoch) or away; load them; returns the epoch."""
        from kdtune.engine.trainer import read_state
        from kdtune.errors import CheckpointError

        try:
            committed = int(json.loads((self.bfolder / COMMIT_FILE).read_text())["epoch"])
        except (OSError, ValueError, KeyError):
            committed = -1
        states = {}
        for m in live:
            ck = self.mfolders[m["id"]] / "ckpt"
            pending = ck / PENDING
            if pending.is_file():
                try:
                    ok = int(read_state(pending, bundle.device)["epoch"]) == committed
                except CheckpointError:
                    ok = False
                if ok:
                    pending.replace(ck / "state.pt")
                else:
                    pending.unlink()
            if (ck / "state.pt").is_file():
                states[m["id"]] = read_state(ck / "state.pt", bundle.device)
        if not states:
            return 0
        epochs = {mid: int(s["epoch"]) for mid, s in states.items()}
        if len(states) != len(live) or len(set(epochs.values())) != 1:
            raise CheckpointError(
                f"bundle {self.trial_id}: its members' states are at different epochs ({epochs}, committed "
                f"{committed}); restart it with failures.on_resume: restart"
            )
        for mid, st in states.items():
            bundle.load_member_state(mid, st)
        return bundle.epoch

    def _train(self, live: list[dict], data) -> None:
        from kdtune.engine.bundle import Bundle
        from kdtune.tune.trainable import OrchestrationClock, read_events, trial_config

        ctx = self.ctx
        self._open_trackers(live)
        cfgs = [trial_config(ctx, m["config"]) for m in live]
        bundle = Bundle(cfgs, data=data, keys=[m["id"] for m in live], teacher_info=ctx.teacher_info,
                        init_info=ctx.init_info)  # fmt: skip
        self.bundle = bundle
        self.epochs = cfgs[0].epochs
        start = self._restore(bundle, live)
        for m in live:
            mid = m["id"]
            self._event(mid, event="start", epoch=start, epochs=self.epochs, bundle_size=bundle.size)
        self._event_bundle("start", epoch=start, members=bundle.keys, mode=bundle.mode, exact=bundle.exact,
                           mode_exact=bundle.mode_exact,
                           mode_ms={m: round(1e3 * t, 2) for m, t in bundle.mode_timings.items()})  # fmt: skip
        for mid in bundle.keys:  # how the stacked student ran (auto: the fastest exact mode; a resume picks again)
            if mid in self.trackers:
                self.trackers[mid].set_tags({"kdtune.bundle_mode": bundle.mode})
        if start > 0:
            # A committed epoch whose bookkeeping a kill cut short: its events, MLflow metrics, rung decision.
            for mid in list(bundle.keys):
                hist = bundle.member(mid).history
                seen = {e.get("epoch") for e in read_events(self.mfolders[mid]) if e.get("event") == "epoch"}
                for h in hist:
                    if h.get("epoch") not in seen:
                        self._event(mid, event="epoch", epoch=h["epoch"], recovered=True)
                if mid in self.trackers and hist:
                    self.trackers[mid].backfill(hist)
                if hist:
                    self.last[mid] = self._figures(hist[-1], "running")
            self._decide(list(bundle.keys), {mid: bundle.member(mid).history[-1] for mid in bundle.keys})
            if not bundle.size or bundle.epoch >= self.epochs:  # every member finished: the final result again
                self._report()
                return
        orch = OrchestrationClock()
        for ms in bundle.run():
            orch.begin()
            self._epoch(bundle, ms, orch)
            orch.end()
            if not bundle.size:
                break

    def _event_bundle(self, event: str, **kw) -> None:
        from kdtune.tune.trainable import _event

        _event(self.bfolder, event=event, trial_id=self.trial_id, **kw)

    def _epoch(self, bundle, ms: list[dict], orch) -> None:
        from kdtune.engine.trainer import atomic_torch_save
        from kdtune.tune.trainable import _numeric, _write_json

        by = {m["member"]: m for m in ms}
        # diverged members first: they are out of the bundle already, and out of the commit that follows
        for mid, m in by.items():
            if m.get("diverged"):
                self._close(mid, {"epoch": m["epoch"], "error": m["error"]}, "diverged", reason=m["error"])
        live = [mid for mid in bundle.keys if mid in by]
        for mid in live:
            ck = self.mfolders[mid] / "ckpt"
            atomic_torch_save(bundle.member_state(mid), ck / PENDING)
            if by[mid].get("is_best"):
                bundle.save_model(mid, ck / "best.pt")
        _write_json(self.bfolder / COMMIT_FILE, {"epoch": bundle.epoch, "members": live})
        for mid in live:
            ck = self.mfolders[mid] / "ckpt"
            (ck / PENDING).replace(ck / "state.pt")
            _write_json(ck / "progress.json", {"epoch": bundle.epoch}, durable=False)
        figures = orch.figures()
        merged = {}
        for mid in live:
            m = merged[mid] = {**_numeric(by[mid]), **figures}
            if mid in self.trackers:
                self.trackers[mid].log_metrics(m, step=m["epoch"])
            self._event(mid, event="epoch", epoch=m["epoch"], orch_s=figures["orch_s"])
            self.last[mid] = self._figures(m, "running")
        self._decide(live, merged)
        self._report(figures)

    def _decide(self, live: list[str], by: dict[str, dict]) -> None:
        """Per live member after a committed epoch: complete (last epoch), pruned (ASHA's rule), or go on."""
        bundle = self.bundle
        for mid in live:
            m = by[mid]
            epoch = int(m["epoch"])
            if epoch >= self.epochs:
                self._close(mid, m, "completed")
            elif self.pruner is not None and self.pruner.prune(mid, epoch, m.get(self.metric)):
                self._close(mid, m, "pruned", reason=f"stopped by ASHA's rule for members after epoch {epoch}/{self.epochs}")
                bundle.drop(mid)

    def _close(self, mid: str, m: dict, outcome: str, reason: str | None = None) -> None:
        from kdtune.tracking.client import TAG_OUTCOME, TAG_STOPPED_EPOCH
        from kdtune.tune.trainable import _log_best, _write_json

        final = {**self._figures(m, outcome), "epoch": m.get("epoch")}
        if m.get("error"):
            final["error"] = str(m["error"])[:500]
        tr = self.trackers.get(mid)
        ck = self.mfolders[mid] / "ckpt"
        if tr is not None and not tr.ended:
            try:
                _log_best(tr, ck)
                if outcome == "completed":
                    tr.log_model(self.bundle.sync_member(mid).student, name="model", step=int(m["epoch"]))
            except Exception as e:  # noqa: BLE001 - a tracking failure never costs a trained member
                self._event(mid, event="unrecorded", what="artifacts", reason=f"{type(e).__name__}: {e}"[:500])
            tags = {TAG_OUTCOME: outcome}
            if outcome != "completed":
                tags[TAG_STOPPED_EPOCH] = m.get("epoch")
            if outcome == "pruned" and reason:
                tags["kdtune.stop_reason"] = reason
            tr.set_tags(tags)
            tr.end("FAILED" if outcome == "diverged" else "FINISHED", reason if outcome == "diverged" else None)
        if outcome == "completed":
            self.bundle.save_model(mid, ck / "final.pt")
        _write_json(self.mfolders[mid] / "done.json", final)
        self._event(mid, event={"completed": "done", "pruned": "stopped"}.get(outcome, outcome),
                    epoch=m.get("epoch"), outcome=outcome)  # fmt: skip
        self.final[mid] = final
        self.last.pop(mid, None)


def member_early_stopping(spec) -> dict:
    """What a fused group's bundles need to prune members (``TrialContext.fuse``): the metric, and the rungs
    of ASHA's rule (none with ``scheduler: none``)."""
    s = spec.scheduler
    rungs = rung_epochs(spec.budget.epochs, s.grace_period, s.reduction_factor) if s.name != "none" else []
    return {"metric": spec.metric, "mode": spec.mode, "rungs": rungs, "reduction_factor": s.reduction_factor}
