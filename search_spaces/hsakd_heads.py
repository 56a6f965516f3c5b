"""HSAKD's teacher stage (``hsakd_heads``): the rotation heads trained on the frozen teacher, not a method a sweep
searches. It has no hyperparameters to search (its recipe is the ``hsakd_heads`` preset), so the space is empty;
a sweep builds the stage itself for its ``hsakd`` groups (kdtune.tune.stages.ensure_heads_stage).
"""


def space(trial, ctx):
    return None


DEFAULT: list = []
