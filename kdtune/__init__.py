"""kdtune: fast, faithful sweeps of knowledge-distillation methods.

``kdtune.train(cfg)`` trains one model and returns its result dict; ``kdtune.iter_train(cfg)`` yields one
metrics dict per epoch; ``kdtune.train_bundle([cfg, ...])`` trains configs of one group (differing only in
fusable fields) as one fused, stacked model with one teacher forward per batch and returns each member's
result dict; ``kdtune.sweep(spec_or_path)`` runs (or resumes) a sweep and returns its
:class:`~kdtune.tune.runner.SweepResult`. The engine imports nothing of Ray, Optuna or MLflow; ``sweep``
imports them when called.
"""

from kdtune.tune import sweep as sweep  # noqa: E402 - kdtune.tune imports nothing heavy until a sweep runs
from kdtune.version import __version__ as __version__  # noqa: E402


def train(cfg=None, /, **overrides):
    from kdtune.engine import train as _train

    return _train(cfg, **overrides)


def iter_train(cfg=None, /, **overrides):
    from kdtune.engine import iter_train as _iter_train

    return _iter_train(cfg, **overrides)


def train_bundle(cfgs, /, **kwargs):
    """Train configs that differ only in fusable fields as one fused bundle; returns their result dicts."""
    from kdtune.engine import train_bundle as _train_bundle

    return _train_bundle(cfgs, **kwargs)
