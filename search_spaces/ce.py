"""Cross-entropy from scratch: the baseline every distillation method is compared with.

CE has no hyperparameters of its own, so the space is empty and a sweep runs it once per student (its recipe,
``lr`` and the like, comes from the spec's ``train:``; a spec may still search a training field, e.g.
``methods: {ce: {space: {lr: {low: 0.01, high: 0.1, log: true}}}}``).
"""


def space(trial, ctx):
    return None


DEFAULT: list = []
