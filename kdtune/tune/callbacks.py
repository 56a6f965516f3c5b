"""Tune callbacks of a sweep: a one-line-per-trial progress printer, and the mirror of finished trials into an
Optuna database study (SQLite beside the experiment) for ``optuna-dashboard`` and Optuna's importance tools.

The searcher's own study lives in memory and is saved with the experiment (an RDB-backed study did not
survive a hard driver kill, see shared/STACK.md); the mirror is written only from the driver, once per
trial (by its Tune trial id, so a resumed sweep never adds a trial twice).
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune import Callback

_SHOWN_KEYS = 4


class TrialNamer:
    """``trial_name_creator``: ``<group>_<n>`` (n = Tune's trial counter), and the directory name with the id."""

    def __init__(self, group: str, with_id: bool = False):
        self.group = group
        self.with_id = with_id

    def __call__(self, trial) -> str:
        tag = str(getattr(trial, "experiment_tag", "") or "")
        num = tag.split("_", 1)[0]
        name = f"{self.group}_{int(num):03d}" if num.isdigit() else f"{self.group}_{trial.trial_id}"
        return f"{name}_{trial.trial_id}" if self.with_id else name


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class ProgressPrinter(Callback):
    """One line per finished, stopped or failed trial; nothing per epoch."""

    def __init__(self, label: str, metric: str, epochs: int, log=print):
        self.label = label
        self.metric = metric
        self.epochs = epochs
        self.log = log

    def __getstate__(self):
        d = dict(self.__dict__)
        d["log"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.log = print

    def _params(self, trial) -> str:
        items = list((trial.config or {}).items())
        return " ".join(f"{k}={_fmt(v)}" for k, v in items)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        ep = r.get("epoch", r.get("training_iteration", "?"))
        val = r.get(self.metric)
        how = "done" if ep == self.epochs else f"stopped at epoch {ep}/{self.epochs}"
        val_s = (
            f"{self.metric} {val:.2f}"
            if isinstance(val, (int, float)) and math.isfinite(val)
            else "no result"
        )
        test = r.get("test_acc")
        test_s = f" (test {test:.2f})" if isinstance(test, (int, float)) else ""
        self.log(f"  {self.label:<18} {trial.trial_id}  {how:<20} {val_s}{test_s}  {self._params(trial)}")

    def on_trial_error(self, iteration, trials, trial, **info):
        err = getattr(trial, "error_file", None)
        reason = ""
        if err:
            try:
                lines = [ln for ln in open(err).read().strip().splitlines() if ln.strip()]
                reason = lines[-1][:200] if lines else ""
            except OSError:
                pass
        self.log(f"  {self.label:<18} {trial.trial_id}  FAILED  {reason}  {self._params(trial)}")


class OptunaMirror(Callback):
    """Copy each finished Tune trial into the Optuna study ``study_name`` of ``storage_url`` (SQLite)."""

    def __init__(self, storage_url: str, study_name: str, metric: str, mode: str, space_fn=None,
                 group_attrs: dict | None = None):  # fmt: skip
        self.storage_url = storage_url
        self.study_name = study_name
        self.metric = metric
        self.mode = mode
        self.space_fn = space_fn
        self.group_attrs = dict(group_attrs or {})
        self._study = None
        self._curves: dict[str, dict[int, float]] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_study"] = None
        return d

    def study(self):
        if self._study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            self._study = optuna.create_study(
                storage=self.storage_url, study_name=self.study_name, load_if_exists=True,
                direction="maximize" if self.mode == "max" else "minimize",
            )  # fmt: skip
            for k, v in self.group_attrs.items():
                self._study.set_user_attr(k, v)
        return self._study

    def on_trial_result(self, iteration, trials, trial, result, **info):
        v = result.get(self.metric)
        step = result.get("training_iteration")
        if isinstance(v, (int, float)) and math.isfinite(v) and step is not None:
            self._curves.setdefault(trial.trial_id, {})[int(step)] = float(v)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._mirror(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._mirror(trial, failed=True)

    def _mirror(self, trial, failed: bool) -> None:
        import optuna
        from optuna.trial import TrialState

        try:
            study = self.study()
            for t in study.get_trials(deepcopy=False):
                if t.user_attrs.get("tune_trial_id") == trial.trial_id:
                    return
            config = dict(trial.config or {})
            params, dists = {}, {}
            if self.space_fn is not None:
                _, dists, _ = self.space_fn.record(config)
                params = {k: config[k] for k in dists if k in config}
            value = (trial.last_result or {}).get(self.metric)
            ok = not failed and isinstance(value, (int, float)) and math.isfinite(value)
            r = trial.last_result or {}
            attrs = {"tune_trial_id": trial.trial_id, "epochs_run": r.get("training_iteration"),
                     "test_acc": r.get("test_acc"), **{f"const.{k}": v for k, v in config.items() if k not in dists}}  # fmt: skip
            ft = optuna.trial.create_trial(
                params=params, distributions={k: dists[k] for k in params}, value=float(value) if ok else None,
                state=TrialState.COMPLETE if ok else TrialState.FAIL, user_attrs=attrs,
                intermediate_values=self._curves.pop(trial.trial_id, {}),
            )  # fmt: skip
            study.add_trial(ft)
        except Exception as e:  # noqa: BLE001 - the mirror must never break a sweep
            print(f"kdtune: warning: could not mirror trial {trial.trial_id} into {self.storage_url}: {e}")
