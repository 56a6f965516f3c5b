"""The Ray Tune function trainable: one trial = one engine run, reported once per epoch with a checkpoint.

The trial's config holds only the searched hyperparameters (and constants of the space); everything shared by
the trials of a group (the base TrainConfig, the teacher and warm-start paths, tracking) travels in a
:class:`TrialContext`, and the preloaded :class:`~kdtune.data.DataBundle` through ``tune.with_parameters``.

Per trial:

1. ``TrainConfig`` = the group's base + the config (a key names a method hyperparameter when the method has
   one of that name, else a TrainConfig field);
2. restore the engine's full state: a retried or resumed trial goes on from its last epoch, not from scratch;
3. per epoch: save ``state.pt`` (and ``best.pt`` when validation improves), log the metrics to the trial's
   MLflow run, ``tune.report(metrics, checkpoint=...)``; the time all this takes is measured
   (:class:`OrchestrationClock`) and reported as ``orch_s`` and ``orch_frac`` of the trial's wall time;
4. after the last epoch, before its report (Tune may end the process once it has the final result): the best
   checkpoint and the final student as MLflow artifacts, the run ended FINISHED, ``done.json`` written. A
   trial stopped by the scheduler (ASHA) ends FINISHED with the reason; a diverged one (NaN loss) FAILED
   with the reason, and a marker keeps its retries from training again. The driver closes any run a killed
   process left open (:func:`kdtune.tune.runner.close_open_runs`).

Each trial keeps a folder of its own, ``<experiment>/trials/<trial id>/``, on the experiment's (shared)
storage: ``ckpt/`` (``state.pt``, ``best.pt``, ``progress.json``; also what each report hands to Tune as
the checkpoint), ``done.json`` (the final result) and ``events.jsonl`` (an append-only log of each start,
with the epoch restored, and each epoch: the audit trail the kill-and-resume test reads). Tune restores a
trial from the checkpoint of its last experiment snapshot, which lags the trial by up to a snapshot period
after a driver is killed (or has none yet); the trial's own folder is never behind, so a restored trial
continues from its newest state, and a trial that had finished reports its final result again without
training. (A sweep resumed with ``failures.on_resume: restart`` clears the folders of its errored trials.)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
# Result keys reported to Tune: numbers only (the scheduler and searcher read them).
_SKIP = ("is_best",)


@dataclass
class TrialContext:
    """What every trial of one (student, method) group shares; pickled to the trial by Ray."""

    group: str
    method: str
    base: dict  # TrainConfig dict without the searched values
    experiment_dir: str
    threads: int = 1
    tracking_uri: str | None = None
    experiment_name: str | None = None
    parent_run_id: str | None = None
    phase: str = "search"  # "search" | "repeat"
    params: dict = field(default_factory=dict)  # extra MLflow params (student, teacher, data, ...)
    teacher_info: dict | None = None  # the teacher's accuracy, measured once by its stage
    init_info: dict | None = None  # the warm start's errors, measured once by the CE stage
    fuse: dict | None = None  # a fused group's member early stopping (kdtune.tune.fused): metric, mode, rungs


@dataclass
class SharedData:
    """A DataBundle put in Ray's object store once per sweep and shared by every group's trials (passing the
    bundle itself through ``tune.with_parameters`` would store one copy per group)."""

    ref: Any

    def get(self):
        import ray

        return ray.get(self.ref)


def split_config(config: dict[str, Any], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(TrainConfig fields, method hyperparameters) of a trial config. A name that is both (IPWD's
    ``momentum``) is the hyperparameter; ``train.<field>`` forces the field."""
    from kdtune.losses import METHODS

    hps = METHODS.get(method).hparams
    fields: dict[str, Any] = {}
    hp: dict[str, Any] = {}
    for k, v in config.items():
        if k.startswith("train."):
            fields[k[len("train.") :]] = v
        elif k in hps:
            hp[k] = v
        else:
            fields[k] = v
    return fields, hp


def trial_config(ctx: TrialContext, config: dict[str, Any]):
    from kdtune.config import TrainConfig

    fields, hp = split_config(config, ctx.method)
    base = dict(ctx.base)
    base_hp = dict(base.pop("hp", None) or {})
    return TrainConfig.from_dict({**base, **fields, "hp": {**base_hp, **hp}})


def diverged_marker(ctx: TrialContext, trial_id: str) -> Path:
    return Path(ctx.experiment_dir) / "diverged" / f"{trial_id}.txt"


def trial_folder(experiment_dir: str | Path, trial_id: str) -> Path:
    return Path(experiment_dir) / "trials" / trial_id


def read_events(folder: Path) -> list[dict]:
    """The events of a trial folder (``trial_folder(...)``), oldest first."""
    try:
        lines = (folder / EVENTS_FILE).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(ln) for ln in lines if ln.strip()]


def _event(folder: Path, **kw) -> None:
    kw.setdefault("time", time.time())
    kw.setdefault("pid", os.getpid())
    kw.setdefault("host", socket.gethostname())
    try:
        with open(folder / EVENTS_FILE, "a") as f:
            f.write(json.dumps(kw, default=str) + "\n")
    except OSError:
        pass


def _recover_epoch_events(folder: Path, history: list[dict], trial_id: str) -> None:
    """A process killed after it saved an epoch's state but before it wrote the epoch's event trained that
    epoch once: the restored state holds it. Its event is written now, marked ``recovered``, so the audit
    trail (one ``epoch`` event per epoch trained) matches the state the trial goes on from."""
    seen = {e.get("epoch") for e in read_events(folder) if e.get("event") == "epoch"}
    for h in history:
        if h.get("epoch") not in seen:
            _event(folder, event="epoch", epoch=h.get("epoch"), trial_id=trial_id, recovered=True)


def _epoch_of(ckpt_dir: Path) -> int:
    try:
        return int(json.loads((ckpt_dir / "progress.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return -1


def _write_json(path: Path, obj: Any, durable: bool = True) -> None:
    from kdtune.storage import atomic_write_text

    atomic_write_text(path, json.dumps(obj, default=str), durable=durable)


def _numeric(m: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in m.items():
        if k in _SKIP or v is None or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = v
    return out


class OrchestrationClock:
    """Seconds a trial spends on everything but training and evaluation: checkpoint writes, MLflow logging,
    ``tune.report`` (and the wait for Tune to take the result), between one epoch's end and the next's start.

    ``figures()`` gives ``orch_s`` (all bookkeeping of the epochs before, plus this epoch's so far) and
    ``orch_frac``, that over the trial's wall time since its training loop began (in this process).
    """

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.total = 0.0
        self._t0: float | None = None

    def begin(self) -> None:
        self._t0 = self.clock()

    def end(self) -> None:
        if self._t0 is not None:
            self.total += self.clock() - self._t0
            self._t0 = None

    def figures(self) -> dict[str, float]:
        now = self.clock()
        spent = self.total + (now - self._t0 if self._t0 is not None else 0.0)
        return {"orch_s": spent, "orch_frac": spent / max(now - self.start, 1e-9)}


def run_trial(config: dict[str, Any], ctxs: dict[str, TrialContext] | None = None, data=None,
              ctx: TrialContext | None = None) -> None:
    """The function trainable (wrap with ``tune.with_parameters(run_trial, ctxs={group: ctx}, data=...)``):
    the trial's group, under ``kdtune.group`` in its config, picks its context (or give one ``ctx``)."""
    import torch
    from ray import tune

    from kdtune.engine.trainer import DivergedError
    from kdtune.tune.search import GROUP_KEY

    config = dict(config)
    group = config.pop(GROUP_KEY, None)
    if ctx is None:
        assert ctxs is not None and group in ctxs, f"run_trial has no TrialContext for group {group!r}"
        ctx = ctxs[group]
    torch.set_num_threads(max(1, int(ctx.threads)))
    tctx = tune.get_context()
    trial_id, trial_name, trial_dir = tctx.get_trial_id(), tctx.get_trial_name(), tctx.get_trial_dir()
    from kdtune.tune.fused import MEMBERS_KEY, run_bundle

    if MEMBERS_KEY in config:  # a fused bundle of K members (budget.fuse): one Tune trial, K trials
        return run_bundle(config, ctx, data, trial_id, trial_name)

    marker = diverged_marker(ctx, trial_id)
    if marker.exists():
        # A diverged trial retried by Ray (max_failures) or resumed with resume_errored: it would diverge again.
        raise DivergedError(marker.read_text().strip())

    folder = trial_folder(ctx.experiment_dir, trial_id)
    ck = folder / "ckpt"
    ck.mkdir(parents=True, exist_ok=True)
    done = folder / "done.json"
    _event(folder, event="open", trial_id=trial_id, nice=os.nice(0))  # this process now owns the trial's run and folder
    try:
        if done.exists():
            # Finished before the driver died, but after Tune's last snapshot: report the final result again.
            final = json.loads(done.read_text())
            _event(folder, event="start", epoch=final.get("epoch"), finished=True, trial_id=trial_id)
            tune.report(final)
            return
        _run(config, ctx, data, trial_id, trial_name, trial_dir, folder, ck, marker)
    finally:
        # The driver touches this trial's run only after this event (or once this process is gone).
        _event(folder, event="closed", trial_id=trial_id)


def _run(config, ctx, data, trial_id, trial_name, trial_dir, folder: Path, ck: Path, marker: Path) -> None:
    from ray import tune

    from kdtune.engine.trainer import DivergedError, Trainer
    from kdtune.tracking.client import TAG_OUTCOME, TAG_STOPPED_EPOCH

    tracker = None
    if ctx.tracking_uri:
        from kdtune.tracking import TrialTracker

        tracker = TrialTracker(ctx.tracking_uri, ctx.experiment_name, ctx.parent_run_id, trial_id, trial_name,
                               background=True, system_metrics=True)  # fmt: skip
        seed = config.get("train.seed", config.get("seed", ctx.base.get("seed")))
        tracker.log_trial_params(ctx.method, config, ctx.base, {**ctx.params, "method": ctx.method, "phase": ctx.phase, "seed": seed})
        tracker.set_tags({"kdtune.group": ctx.group, "kdtune.method": ctx.method, "kdtune.phase": ctx.phase,
                          "kdtune.trial_dir": str(folder), TAG_OUTCOME: "running"})  # fmt: skip

    trainer = None
    cfg = None
    try:
        if isinstance(data, SharedData):
            data = data.get()
        cfg = trial_config(ctx, config)
        trainer = Trainer(cfg, data=data, teacher_info=ctx.teacher_info, init_info=ctx.init_info)
        tune_ckpt = tune.get_checkpoint()
        if tune_ckpt is not None:
            with tune_ckpt.as_directory() as d:
                if _epoch_of(Path(d)) > _epoch_of(ck):  # our folder is never behind, unless it was lost
                    for f in Path(d).iterdir():
                        if f.is_file():
                            shutil.copy2(f, ck / f.name)
        if (ck / "state.pt").is_file():
            trainer.load_state(ck / "state.pt")
            if tracker is not None and trainer.history:
                tracker.backfill(trainer.history)
            _recover_epoch_events(folder, trainer.history, trial_id)
        _event(folder, event="start", epoch=trainer.epoch, epochs=cfg.epochs, trial_id=trial_id)

        if trainer.epoch >= cfg.epochs and trainer.history:
            # Restored after its last epoch, before it closed: close the run, report the final result again.
            final = _numeric(trainer.history[-1])
            _finish(tracker, trainer, folder, final, trial_id)
            tune.report(final)
        orch = OrchestrationClock()
        report_ms = 0.0
        for m in trainer.run():
            orch.begin()
            t_save = time.perf_counter()
            trainer.save_state(ck / "state.pt")
            if m["is_best"]:
                trainer.save_model(ck / "best.pt", durable=False)
            _write_json(ck / "progress.json", {"epoch": trainer.epoch}, durable=False)
            # Tune's checkpoint is a pointer (the epoch): the state lives in the trial's own folder, on the
            # experiment's storage, so nothing is copied per epoch.
            pointer = folder / "tune-ckpt"
            pointer.mkdir(exist_ok=True)
            _write_json(pointer / "progress.json", {"epoch": trainer.epoch, "folder": str(folder)}, durable=False)
            save_ms = 1000 * (time.perf_counter() - t_save)
            result = {**_numeric(m), **orch.figures()}
            if tracker is not None:
                tracker.log_metrics(result, step=m["epoch"])
            # the audit trail, with where this epoch's bookkeeping went (the report's share: the one before)
            _event(folder, event="epoch", epoch=m["epoch"], trial_id=trial_id, orch_s=result["orch_s"],
                   save_ms=round(save_ms, 1), report_ms=round(report_ms, 1))  # fmt: skip
            if trainer.epoch >= cfg.epochs:
                # Close the run before the last report: once Tune has the final result it may end this
                # process at any moment.
                _finish(tracker, trainer, folder, result, trial_id, orch)
            t_report = time.perf_counter()
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(str(pointer)))
            report_ms = 1000 * (time.perf_counter() - t_report)
            orch.end()
    except DivergedError as e:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(str(e))
        _event(folder, event="diverged", reason=str(e), trial_id=trial_id)
        if tracker is not None:
            tracker.set_tags({TAG_OUTCOME: "diverged", TAG_STOPPED_EPOCH: trainer.epoch if trainer else 0})
            tracker.end("FAILED", f"diverged: {e}")
        raise
    except SystemExit:
        # Tune ends a trial by raising SystemExit in tune.report: after its last epoch (already closed above),
        # or earlier when the scheduler (ASHA) stops it: complete by design, at lower fidelity.
        epoch = trainer.epoch if trainer is not None else 0
        total = cfg.epochs if cfg is not None else None
        if total is None or epoch < total:
            _event(folder, event="stopped", epoch=epoch, trial_id=trial_id)
            if tracker is not None and not tracker.ended:
                _log_best(tracker, ck)
                tracker.set_tags({TAG_OUTCOME: "pruned", TAG_STOPPED_EPOCH: epoch,
                                  "kdtune.stop_reason": f"stopped by the scheduler after epoch {epoch}/{total}"})
                tracker.end("FINISHED")
        raise
    except BaseException as e:
        if tracker is not None and not tracker.ended:
            try:
                tracker.set_tags({TAG_OUTCOME: "failed", TAG_STOPPED_EPOCH: trainer.epoch if trainer else 0})
                tracker.end("FAILED", f"{type(e).__name__}: {e}")
            except Exception:  # noqa: BLE001 - the trial's own error is the one to report (a full disk refuses
                pass  # both); its run stays open and the driver, or the resumed trial, ends it
        raise


def _finish(tracker, trainer, folder: Path, final: dict, trial_id: str, orch=None) -> None:
    """The end of a complete trial: artifacts, the run closed, ``done.json`` (the final result, whose
    orchestration figures then include the artifact uploads)."""
    if tracker is not None:
        try:
            _log_best(tracker, folder / "ckpt")
            tracker.log_student(trainer, step=trainer.epoch)
        except Exception as e:  # noqa: BLE001 - a tracking failure never costs a trained trial
            _event(folder, event="unrecorded", what="artifacts", reason=f"{type(e).__name__}: {e}"[:500],
                   trial_id=trial_id)
    if orch is not None:
        final.update(orch.figures())
        if tracker is not None:
            tracker.log_metrics({k: final[k] for k in ("orch_s", "orch_frac")}, step=trainer.epoch)
    if tracker is not None:
        from kdtune.tracking.client import TAG_OUTCOME

        try:
            tracker.set_tags({TAG_OUTCOME: "completed"})
            tracker.end("FINISHED")
        except Exception as e:  # noqa: BLE001 - the trial is trained: the driver records its run afterwards
            _event(folder, event="unrecorded", what="run", reason=f"{type(e).__name__}: {e}"[:500],
                   trial_id=trial_id)  # fmt: skip
    _write_json(folder / "done.json", final)
    _event(folder, event="done", epoch=trainer.epoch, trial_id=trial_id)


def _log_best(tracker, ck: Path) -> None:
    best = ck / "best.pt"
    if best.is_file():
        tracker.log_artifact(best, "checkpoints")


def trial_gone(folder: Path) -> bool:
    """Whether the process that last ran this trial has let go of its records (MLflow run, folder): it wrote
    its ``closed`` event after its last ``open``, or it is dead (checked on this host only). A trial that
    never started here is gone too."""
    from kdtune.tune.lock import pid_alive

    last_start = None
    closed = False
    for ev in read_events(folder):
        if ev.get("event") == "open":
            last_start, closed = ev, False
        elif ev.get("event") == "closed" and last_start is not None and ev.get("pid") == last_start.get("pid"):
            closed = True
    if last_start is None or closed:
        return True
    if last_start.get("host") == socket.gethostname():
        return not pid_alive(int(last_start.get("pid", -1)))
    return False


def wait_trials_gone(folders: list[Path], timeout_s: float = 60.0, poll_s: float = 0.2) -> list[Path]:
    """Poll until every trial folder is :func:`trial_gone`; returns those still held after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    pending = list(folders)
    while pending:
        pending = [f for f in pending if not trial_gone(f)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(poll_s)
    return pending
