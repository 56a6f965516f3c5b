"""DiSK, distilling selective knowledge (Kag, Acar, Gangrade & Saligrama, "Scaffolding a Student to Instill
Knowledge", ICLR 2023 submission; Algorithm 1, eqs. 3-5).

The ranges of the paper's appendix A.5: tau_t in {1, 2, 4} (plus the default 7, so that the starting point
lies in the space); K in {1, 3, 5, 10, 20, 50} (at most the number of
classes); lambda_min in {0.01, 0.1, 1, 5, 10}; lambda_max in {1, 5, 10, 20, 50, 100, 1000} and above
lambda_min (a categorical of exactly the paper's set; the constraint is declared in ``constraints`` and kept by
kdtune: Optuna allows one fixed choice set per name, so a draw not above the sampled lambda_min is replaced by
the nearest listed value above it, which the trial trains with, while Optuna's own record keeps the draw; a
spec that narrows lambda_max to a range asks it above lambda_min directly, and one that leaves no lambda_max
above any lambda_min is refused);
the budget delta within 0.2 of the CE-trained student's error (searched as ``delta_offset`` around
``ctx.ce_error``, the train error the engine measures on the CE stage, clipped so delta stays in [0, 1]);
Lambda_T in {20, 50}; alpha in {0, 0.1, 0.5, 0.9, 1}. Starting point: the defaults of A.5 (tau_t = 7 as the
text says, K = 20, lambda 0.1 to 50, delta = the CE student's error, Lambda_T = 50), alpha 0.1.
"""

K_SET = (1, 3, 5, 10, 20, 50)
LAMBDA_MIN = (0.01, 0.1, 1.0, 5.0, 10.0)
LAMBDA_MAX = (1.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)


def k_choices(ctx):
    c = ctx.num_classes or max(K_SET)
    ks = [k for k in K_SET if k <= c]
    return ks or [1]


def space(trial, ctx):
    trial.suggest_categorical("tau_t", [1.0, 2.0, 4.0, 7.0])
    trial.suggest_categorical("K", k_choices(ctx))
    trial.suggest_categorical("lambda_min", list(LAMBDA_MIN))
    trial.suggest_categorical("lambda_max", list(LAMBDA_MAX))
    err = ctx.ce_error
    lo, hi = (-0.2, 0.2) if err is None else (max(-0.2, -err), min(0.2, 1.0 - err))
    trial.suggest_float("delta_offset", lo, hi)
    trial.suggest_categorical("lambda_period", [20, 50])
    trial.suggest_categorical("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])


def constraints(ctx):
    """What every trial meets (kdtune.tune.spaces): DiSK's schedule rises from lambda_min to lambda_max, and the
    guide helps the teacher's top K classes, at most all of them (unknown count: no bound)."""
    return [("lambda_max", ">", "lambda_min"), ("K", "<=", ctx.num_classes, "the number of classes")]


def starts(ctx):
    k = max(k for k in k_choices(ctx) if k <= 20)
    return [{"tau_t": 7.0, "K": k, "lambda_min": 0.1, "lambda_max": 50.0, "delta_offset": 0.0,
             "lambda_period": 50, "alpha": 0.1}]  # fmt: skip
