"""VID, variational information distillation (Ahn et al., CVPR 2019), as RepDistiller trains it:
``w_ce CE + beta sum_stages mean 1/2 [(R(f_s) - f_t)^2 / sigma2_c + log sigma2_c]`` with learnt mean
regressors and per-channel variances (see kdtune/losses/vid.py).

Searched: the VID weight beta on a log scale around the benchmark's value. The CE weight (1, no KD term), the
initial variance (5.0) and the variance floor (1e-5) stay at RepDistiller's values. Starting point: beta = 1,
the CRD benchmark's ``-b 1`` for VID (``scripts/run_cifar_distill.sh``; Hamidi et al.'s gamma for VID).
"""


def space(trial, ctx):
    trial.suggest_float("beta", 0.1, 10.0, log=True)


def starts(ctx):
    return [{"beta": 1.0}]
