"""kdtune: fast, faithful sweeps of knowledge-distillation methods.

``kdtune.train(cfg)`` trains one model and returns its result dict; ``kdtune.iter_train(cfg)`` yields one
metrics dict per epoch; ``kdtune.sweep(spec_or_path)`` runs (or resumes) a sweep and returns its
:class:`~kdtune.tune.runner.SweepResult`. The engine imports nothing of Ray, Optuna or MLflow; ``sweep``
imports them when called.
"""

__version__ = "0.1.0"

from kdtune.tune import sweep as sweep  # noqa: E402 - kdtune.tune imports nothing heavy until a sweep runs


def train(cfg=None, /, **overrides):
    from kdtune.engine import train as _train

    return _train(cfg, **overrides)


def iter_train(cfg=None, /, **overrides):
    from kdtune.engine import iter_train as _iter_train

    return _iter_train(cfg, **overrides)
