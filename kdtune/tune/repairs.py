"""What the driver repairs after its trials' processes are gone: MLflow runs a killed or stopped process left
open or could not record, runs of trials Tune forgot (orphans), and the folders of errored trials a restart
trains anew; and what it adds to trial runs then: each group's best student (``tracking.models: best``). One owner per record: a run is touched only once :func:`~kdtune.tune.record.trial_gone` says
its process let go of it, and every write is idempotent, so a repair interrupted is a repair redone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kdtune.tune.protocol import MemberResult, Outcome
from kdtune.tune.record import read_done, read_events, trial_folder, wait_trials_gone, write_event


def record_unrecorded_runs(uri: str | None, experiment: str, parent_run_id: str | None, experiment_dir,
                           trials: list[tuple[str, dict]]) -> int:
    """Record in MLflow what a trial's process could not (its ``unrecorded`` event: the tracking database
    locked beyond the retry window as it ended its run); returns how many runs were recorded. Once the
    process is gone, the run is found by trial id (or made, with the trial's config as params), the epochs of
    its saved state it lacks are logged, the outcome set, the run ended FINISHED and a ``recorded`` event
    written, so a later call redoes nothing."""
    if not uri:
        return 0
    import torch

    from kdtune.tracking import TrialTracker
    from kdtune.tracking.client import TAG_OUTCOME

    todo = []
    for tid, config in trials:
        folder = trial_folder(experiment_dir, tid)
        ev = read_events(folder)
        last = max((i for i, e in enumerate(ev) if e.get("event") == "recorded"), default=-1)
        if any(e.get("event") == "unrecorded" for e in ev[last + 1:]) and (folder / "ckpt" / "state.pt").is_file():
            todo.append((tid, config, folder))
    held = {f.name for f in wait_trials_gone([f for _, _, f in todo])}
    n = 0
    for tid, config, folder in todo:
        if tid in held:
            continue
        history = torch.load(folder / "ckpt" / "state.pt", map_location="cpu", weights_only=True)["history"]
        tt = TrialTracker(uri, experiment, parent_run_id, tid)
        if not tt.params:  # a run made here, or one whose params never reached the store
            tt.log_params(config)
        tt.backfill(history)
        tt.set_tags({TAG_OUTCOME: (read_done(folder) or {"outcome": "failed"})["outcome"]})
        tt.end("FINISHED")
        write_event(folder, event="recorded", trial_id=tid, epochs=len(history))
        n += 1
    return n


def close_open_runs(uri: str | None, experiment: str, members: list[MemberResult], epochs: int,
                    groups: list[str] | None = None, experiment_dir: str | Path | None = None) -> int:
    """End the MLflow runs the members left RUNNING (a process Tune ended before it closed its run), with the
    member's outcome; mark every trial run of ``groups`` that no member owns an orphan
    (:func:`kdtune.tracking.client.mark_orphan`: a driver killed between two snapshots forgot the trial, and
    the searcher asked anew in its place). Returns how many runs were closed."""
    if not uri:
        return 0
    from kdtune.tracking import TAG_FAILURE, TAG_OUTCOME, TAG_STOPPED_EPOCH, TAG_TRIAL_ID, TRIAL_FILTER
    from kdtune.tracking.client import get_client, mark_orphan, quote, retry_locked, search_all_runs, set_tags
    from kdtune.tracking.trial import experiment_id_for

    client = get_client(uri)
    exp_id = experiment_id_for(uri, experiment)
    closed = 0
    ids = [m.metrics["trial_id"] for m in members]
    held = {f.name for f in wait_trials_gone([trial_folder(experiment_dir, t) for t in ids])} if experiment_dir else set()
    for m, tid in zip(members, ids):
        if tid in held:
            continue  # still owned by a live trial process: it closes the run itself
        for run in search_all_runs(client, [exp_id], f"tags.`{TAG_TRIAL_ID}` = {quote(tid)}"):
            if run.info.status != "RUNNING":
                continue
            epoch = m.metrics.get("epoch")
            tags = {TAG_OUTCOME: m.outcome.value}
            status = "FINISHED"
            if not m.outcome.ok:
                status, tags[TAG_FAILURE] = "FAILED", (m.error or m.outcome.value)[:500]
            elif m.outcome is Outcome.PRUNED:
                tags["kdtune.stop_reason"] = f"stopped by the scheduler after epoch {epoch}/{epochs}"
            if epoch is not None and m.outcome is not Outcome.COMPLETED:
                tags[TAG_STOPPED_EPOCH] = str(epoch)
            set_tags(client, run.info.run_id, tags)
            retry_locked(client.set_terminated, run.info.run_id, status)
            closed += 1
    known = set(ids)
    for group in groups or []:
        flt = f"tags.`kdtune.group` = {quote(group)} AND {TRIAL_FILTER}"
        for run in search_all_runs(client, [exp_id], flt):
            if run.data.tags.get(TAG_TRIAL_ID) in known:
                continue
            reason = "orphan: the sweep driver died before Tune recorded this trial; the searcher asked anew"
            closed += run.info.status == "RUNNING"
            mark_orphan(client, run, reason)
    return closed


def errored_units(tune_dir: Path) -> list[str]:
    """Ids of the units the newest experiment snapshot of a Tune run records as ERROR."""
    from kdtune.tune.rayrt import snapshot_trials

    return [t["trial_id"] for t in snapshot_trials(tune_dir) or [] if t["status"] == "ERROR"]


def clear_errored(tune_dir: Path, exp: Path) -> None:
    """``failures.on_resume: restart``: errored units start from scratch, so their folders and their members'
    go (a member's folder is ``<unit id>-m<i>``)."""
    for tid in errored_units(tune_dir):
        shutil.rmtree(trial_folder(exp, tid), ignore_errors=True)
        for member in trial_folder(exp, tid).parent.glob(f"{tid}-m*"):
            shutil.rmtree(member, ignore_errors=True)


def log_best_students(tracker, experiment_dir, summaries: list[dict], data, log=print) -> None:
    """``tracking.models: best``: each group's best trial's student (its ``final.pt``) as an MLflow model of
    its run, and its ``best.pt`` under ``checkpoints/``, added by the driver once every trial process let go
    of its run, instead of by every trial (a logged model costs a trial about 55 ms, more than a toy trial's
    epoch, and the checkpoint 8 ms). Idempotent: a run that has its model already is left as it is."""
    from kdtune.models.checkpoint import load_model

    for s in summaries:
        best = s.get("best") or {}
        final = trial_folder(experiment_dir, str(best.get("trial_id"))) / "ckpt" / "final.pt"
        if not best.get("mlflow_run_id") or not final.is_file():
            continue
        try:
            student, _ = load_model(final, role="trial checkpoint")
            tracker.log_trial_student(best["mlflow_run_id"], student, data,
                                      step=int(best.get("epochs_run") or best.get("epoch") or 0),
                                      checkpoint=final.parent / "best.pt")  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the sweep's figures stand without the model
            log(f"note: {s['group']}: the best student was not logged to MLflow: {type(e).__name__}: {e}")
