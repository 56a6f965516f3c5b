"""A full disk ends the whole Tune run at once, in one line: every retry and every later trial would fail the same
way. :class:`DiskFullWatch` (a Tune callback) notes a trial that failed on a full disk (or quota), whether Tune
would retry it or not; :class:`DiskFullStop` (the run's stopper) then stops every trial; the runner reads
:func:`disk_full_trials` after ``fit`` returns (:meth:`kdtune.tune.tuning.Tuning.tune_fit`).
"""

from __future__ import annotations

from ray.tune import Callback
from ray.tune.stopper import Stopper

# The driver's callbacks and stopper are unpickled anew when a Tune run is restored, so what they saw lives
# in this module of the driver process; the runner reads it after ``fit`` returns.
_DISK_FULL: list[str] = []


def reset_disk_full() -> None:
    _DISK_FULL.clear()


def disk_full_trials() -> list[str]:
    """Ids of the trials of this driver's last Tune run that failed on a full disk."""
    return list(_DISK_FULL)


def error_text(trial) -> str:
    """The end of a failed trial's ``error.txt`` (Tune's record of its errors), or "" when there is none."""
    path = getattr(trial, "error_file", None)
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-20000:]
    except OSError:
        return ""


class DiskFullWatch(Callback):
    """Notes a trial that failed on a full disk (or quota), whether Tune would retry it or not."""

    def _check(self, trial) -> None:
        from kdtune.errors import is_disk_full

        if is_disk_full(error_text(trial)) and trial.trial_id not in _DISK_FULL:
            _DISK_FULL.append(trial.trial_id)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._check(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._check(trial)


class DiskFullStop(Stopper):
    """A Tune stopper (``RunConfig(stop=...)``): stops every trial once one has failed on a full disk."""

    def __call__(self, trial_id, result) -> bool:
        return False

    def stop_all(self) -> bool:
        return bool(_DISK_FULL)
