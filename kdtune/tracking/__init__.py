"""MLflow tracking of sweeps: a parent run per sweep, a child run per trial and per stage.

``SweepTracker`` is the driver's side (experiment, parent run, stages, model registry); ``TrialTracker`` is
a trial's run, found again by its trial id on resume. MLflow itself is imported only when a tracker is
made, so importing this package stays cheap.
"""

from __future__ import annotations

from kdtune.tracking.client import (
    TAG_FAILURE,
    TAG_METRIC,
    TAG_MODE,
    TAG_ORPHAN,
    TAG_OUTCOME,
    TAG_PARENT,
    TAG_ROLE,
    TAG_STAGE,
    TAG_STAGE_KEY,
    TAG_STOPPED_EPOCH,
    TAG_SWEEP_ID,
    TAG_TRIAL_ID,
    TAG_TRIAL_NAME,
    TRIAL_FILTER,
    is_trial_run,
)
from kdtune.tracking.sweep import SweepTracker
from kdtune.tracking.trial import TrialTracker
from kdtune.tracking.uri import check_tracking_uri, default_tracking_uri, normalize_tracking_uri, sqlite_path

__all__ = [
    "SweepTracker",
    "TrialTracker",
    "check_tracking_uri",
    "default_tracking_uri",
    "normalize_tracking_uri",
    "sqlite_path",
    "TAG_FAILURE",
    "TAG_OUTCOME",
    "TAG_STOPPED_EPOCH",
    "TAG_METRIC",
    "TAG_MODE",
    "TAG_ORPHAN",
    "TAG_PARENT",
    "TAG_ROLE",
    "TAG_STAGE",
    "TAG_STAGE_KEY",
    "TAG_SWEEP_ID",
    "TAG_TRIAL_ID",
    "TAG_TRIAL_NAME",
    "TRIAL_FILTER",
    "is_trial_run",
]
