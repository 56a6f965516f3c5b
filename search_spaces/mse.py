"""MSE between the softmax output and the one-hot label (Hamidi et al., "How to Train the Teacher Model for
Effective Knowledge Distillation", ECCV 2024, supplement eq. for the MSE risk).

Its only knob is the weight of the term, which acts as a learning-rate scale on a bounded loss; searched on
a log scale around the paper's 1.
"""


def space(trial, ctx):
    trial.suggest_float("weight", 0.1, 10.0, log=True)


DEFAULT = [{"weight": 1.0}]
