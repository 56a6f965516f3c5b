"""DIST, Knowledge Distillation from a Stronger Teacher (Huang et al., NeurIPS 2022):
``w_ce CE + w_kd tau^2 (beta L_inter + gamma L_intra)`` with Pearson-correlation relations of
``softmax(z / tau)`` over each row (inter-class) and each column (intra-class).

Searched: beta, gamma and the overall weight on log scales, and tau. Starting points: the official CIFAR-100
setting tau = 4, beta = gamma = 1, weight 2 (CE weight 1); ImageNet: tau = 1, weight 2.
"""


CONSTRAINTS = [("beta", "or", "gamma")]  # DIST adds nothing when beta and gamma are both 0 (kdtune.tune.spaces)


def space(trial, ctx):
    trial.suggest_float("beta", 0.25, 4.0, log=True)
    trial.suggest_float("gamma", 0.25, 4.0, log=True)
    trial.suggest_float("tau", 1.0, 8.0)
    trial.suggest_float("w_kd", 0.5, 8.0, log=True)


def starts(ctx):
    tau = 1.0 if ctx.data == "imagenet" else 4.0
    return [{"beta": 1.0, "gamma": 1.0, "tau": tau, "w_kd": 2.0}]
