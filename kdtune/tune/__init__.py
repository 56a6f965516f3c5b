"""The Ray Tune layer: sweep driver, trainable, search spaces, stages, resume, lock and the CLI commands.

Nothing here is imported eagerly: ``kdtune train`` must not pay for Ray, Optuna or MLflow. Use
``from kdtune.tune.runner import sweep, resume`` (``kdtune.sweep`` is the same ``sweep``).
"""


def sweep(spec_or_path, **kwargs):
    """Run (or resume) the sweep a spec describes; see :func:`kdtune.tune.runner.sweep`."""
    from kdtune.tune.runner import sweep as _sweep

    return _sweep(spec_or_path, **kwargs)


def resume(experiment, storage=None, **kwargs):
    """Finish an interrupted sweep; see :func:`kdtune.tune.runner.resume`."""
    from kdtune.tune.runner import resume as _resume

    return _resume(experiment, storage, **kwargs)
