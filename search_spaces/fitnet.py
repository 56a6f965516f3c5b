"""FitNet (Romero et al., ICLR 2015) in the CRD benchmark's one-stage form:
``w_ce CE + beta mean (ConvReg(f_s^h) - f_t^h)^2`` on the hint layer h of both networks, with a trainable
regressor, no KD term (see kdtune/losses/fitnet.py).

Searched: the hint weight beta on a log scale, a decade either side of the published value. The CE weight (1)
and the hint layer (2, RepDistiller's ``--hint_layer`` default, which every pair of the CRD table uses) stay
fixed; a spec can add ``hint_layer`` to the search (a layer a model does not have is refused when the method is
built). Starting point: beta = 100, the CRD benchmark's ``-b 100`` for FitNet
(``scripts/run_cifar_distill.sh``; FitNet is not in Hamidi et al.'s list).
"""


def space(trial, ctx):
    trial.suggest_float("beta", 10.0, 1000.0, log=True)


def starts(ctx):
    return [{"beta": 100.0}]
