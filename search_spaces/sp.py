"""SP, similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller computes it:
``w_ce CE + beta ||normalize(G_t) - normalize(G_s)||_F^2 / B^2`` with ``G = F F^T`` of the flattened last stage
outputs, no KD term (see kdtune/losses/sp.py).

Searched: the SP weight beta on a log scale, a decade either side of the published value. The CE weight stays
1. Starting point: beta = 3000, the CRD benchmark's ``-b 3000`` (``scripts/run_cifar_distill.sh``) and Hamidi et
al.'s gamma for SP (teacher-training supplement, section 2). The term scales with the batch size through its
row normalisation and 1/B^2, and the published value is for B = 64: at another batch size the optimum moves,
which the decade either side covers.
"""


def space(trial, ctx):
    trial.suggest_float("beta", 300.0, 30000.0, log=True)


def starts(ctx):
    return [{"beta": 3000.0}]
