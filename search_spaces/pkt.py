"""PKT, probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018): ``w_ce CE + beta L_PKT``, ``L_PKT`` the
cosine-kernel KL between the batch's similarity distributions of the pooled penultimate vectors, averaged over
the ``B^2`` entries (kdtune/losses/pkt.py).

Searched: ``beta`` on a log scale, a decade either side of the published weight (the term's scale depends on the
batch size through its ``1/B^2`` mean, so the published value is tied to ``B = 64``). ``w_ce`` stays 1, as in
every feature method of the CRD benchmark (a spec may add it).
Starting point: RepDistiller's ``scripts/run_cifar_distill.sh`` (``--distill pkt -a 0 -b 30000``, CE weight 1,
no KD term), one weight for every teacher -> student pair; also mdistiller's PKT feature weight and the
teacher-training supplement's gamma (section 2: 30000).
"""


def space(trial, ctx):
    trial.suggest_float("beta", 3000.0, 300000.0, log=True)


DEFAULT = [{"beta": 30000.0}]
