"""Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture", section 7).

``L = CE(s, (1 - eps) onehot(y) + eps / C)``. A teacher objective studied by Hamidi et al. (ECCV 2024) and a
student baseline. The Inception paper uses eps = 0.1, the starting point here.
"""


def space(trial, ctx):
    trial.suggest_float("smoothing", 0.0, 0.3)


DEFAULT = [{"smoothing": 0.1}]
