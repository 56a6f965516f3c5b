"""The toy data sets: DiSK's two problems (Kag et al., "Scaffolding a Student to Instill Knowledge", ICLR 2023
submission, appendix A.1-A.2) and the teacher-training seed's Gaussians (Hamidi et al., ECCV 2024).

- ``disk-intervals`` (A.1): ``x`` in [0, 9] labelled by ``f* = h(x; 2, 3) + h(x; 5, 7)``, balanced; 1000/100/100.
- ``disk-gaussians`` (A.2): six centres, two per class, std ``r = 0.05``, equal class sizes; 1000/100/1000.
- ``mse-gauss``: K = 3 equiprobable classes, ``x ~ N(mu_y, 6 I)`` in 30-D, ``mu_k = 4 u_k`` with ``u_k`` uniform
  in {-1, 0, 1}^30; 5000/5000/90000; ``info["p_star"][split]`` holds the known p*(k|x) (float64, (N, K)).

All hold float32 ``(N, D)`` features (``in_channels = D``, ``image_size = None``). ``seed`` picks the draw (the
validation and test splits are independent draws, not carved from train); ``val_fraction`` sizes the validation
draw: relative to the training set for the DiSK toys (0.1: the paper's 100 points), and ``val_fraction / 0.1``
times the paper's 5000 points for ``mse-gauss`` (0: none).
More: docs/toys.md §Data (DiSK: labelling, sampling, centres), docs/mse_teacher.md §Data (``mse-gauss``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdtune.data import register_dataset
from kdtune.data.base import DataBundle, Split
from kdtune.errors import ConfigError

# Appendix A.1 / section 2.
INTERVALS_STAR = ((2.0, 3.0), (5.0, 7.0))
INTERVAL_RANGE = (0.0, 9.0)
INTERVAL_KAPPA = 10.0  # sigmoid scale of the labelling function (not given by the paper; see models/toys.py)
# Appendix A.2: (centre, class); red 0, blue 1, green 2.
GAUSS_CENTRES = (
    ((0.0, 0.0), 0),
    ((1.5, 0.0), 1),
    ((3.0, 0.0), 2),
    ((0.0, 1.5), 1),
    ((1.5, 1.5), 2),
    ((3.0, 1.5), 0),
)
GAUSS_STD = 0.05  # the "radius" r of the Gaussian balls, used as the standard deviation
INTERVAL_CLASSES = ("red", "blue")
GAUSS_CLASSES = ("red", "blue", "green")
# Hamidi et al. (ECCV 2024), the synthetic experiment as the authors' ToyGuassian-MSEKD code draws it: 100,000
# points split 5/5/90 % (setting.py: NOISE = 6 is the variance sigma^2; the plotted run: K = 3, DELTA_MU = 4).
MSE_GAUSS_CLASSES = 3
MSE_GAUSS_DIM = 30
MSE_GAUSS_SIGMA2 = 6.0
MSE_GAUSS_DELTA_MU = 4.0
MSE_GAUSS_SIZES = (5000, 5000, 90000)  # train, validation, test
MSE_GAUSS_SPLITS = ("train", "val", "test")


def interval_fstar(x: Tensor, kappa: float = INTERVAL_KAPPA) -> Tensor:
    """``f*(x) = sum_j sigma_k(x - a_j) - sigma_k(x - b_j)`` over the two blue intervals (appendix A.1)."""
    out = torch.zeros_like(x, dtype=torch.float64)
    xd = x.double()
    for a, b in INTERVALS_STAR:
        out += torch.sigmoid(kappa * (xd - a)) - torch.sigmoid(kappa * (xd - b))
    return out


def make_intervals(
    n: int, generator: torch.Generator, kappa: float = INTERVAL_KAPPA
) -> tuple[Tensor, Tensor]:
    """``n`` points of the 1-D problem, half of each class (class 0 gets the odd one): x float32 (n, 1), y int64."""
    if n < 2:
        raise ConfigError(f"the 1-D intervals problem needs n >= 2 points, got {n}")
    want = {1: n // 2, 0: n - n // 2}
    got: dict[int, list[Tensor]] = {0: [], 1: []}
    have = {0: 0, 1: 0}
    lo, hi = INTERVAL_RANGE
    while have[0] < want[0] or have[1] < want[1]:
        x = lo + (hi - lo) * torch.rand(max(2 * n, 64), generator=generator, dtype=torch.float64)
        y = (interval_fstar(x, kappa) >= 0.5).long()
        for c in (0, 1):
            take = x[y == c][: want[c] - have[c]]
            got[c].append(take)
            have[c] += len(take)
    xs = torch.cat([torch.cat(got[0]), torch.cat(got[1])])
    ys = torch.cat([torch.zeros(want[0], dtype=torch.long), torch.ones(want[1], dtype=torch.long)])
    perm = torch.randperm(n, generator=generator)
    return xs[perm].float().unsqueeze(1), ys[perm]


def make_gaussians(n: int, generator: torch.Generator, std: float = GAUSS_STD) -> tuple[Tensor, Tensor]:
    """``n`` points of the 2-D problem: x float32 (n, 2) ~ N(c, std^2 I) around a centre of the class, y int64."""
    if n < 3:
        raise ConfigError(f"the 2-D Gaussians problem needs n >= 3 points, got {n}")
    if std <= 0:
        raise ConfigError(f"the Gaussian standard deviation must be > 0, got {std}")
    per_class = [n // 3 + (1 if c < n % 3 else 0) for c in range(3)]
    centres = torch.tensor([c for c, _ in GAUSS_CENTRES], dtype=torch.float64)
    labels = torch.tensor([k for _, k in GAUSS_CENTRES])
    xs, ys = [], []
    for c, m in enumerate(per_class):
        own = centres[labels == c]  # the class's two centres
        pick = torch.randint(0, len(own), (m,), generator=generator)
        noise = torch.randn(m, 2, generator=generator, dtype=torch.float64) * std
        xs.append(own[pick] + noise)
        ys.append(torch.full((m,), c, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(n, generator=generator)
    return x[perm].float(), y[perm]


def intervals_splits(
    seed: int = 0, n_train: int = 1000, n_val: int = 100, n_test: int = 100, kappa=INTERVAL_KAPPA
):
    """Train, validation and test draws of the 1-D problem from one seeded generator: three ``Split``s."""
    g = torch.Generator().manual_seed(int(seed))
    return tuple(Split(*make_intervals(n, g, kappa)) for n in (n_train, n_val, n_test))


def gaussians_splits(
    seed: int = 0, n_train: int = 1000, n_val: int = 100, n_test: int = 1000, std: float = GAUSS_STD
):
    """Train, validation and test draws of the 2-D problem from one seeded generator: three ``Split``s."""
    g = torch.Generator().manual_seed(int(seed))
    return tuple(Split(*make_gaussians(n, g, std)) for n in (n_train, n_val, n_test))


def _val_size(n_train: int, val_fraction: float) -> int:
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction={val_fraction} is out of range for the toy data sets; valid range (0, 1)"
        )
    return max(3, int(round(n_train * val_fraction)))


@register_dataset("disk-intervals")
def disk_intervals(root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """DiSK's 1-D intervals (appendix A.1): 1000 train, 100 test, validation an independent draw."""
    train, val, test = intervals_splits(seed, 1000, _val_size(1000, val_fraction), 100)
    return DataBundle(
        name="disk-intervals", num_classes=2, in_channels=1, image_size=None, train=train, val=val, test=test,
        class_names=list(INTERVAL_CLASSES),
        info={"blue_intervals": INTERVALS_STAR, "range": INTERVAL_RANGE, "kappa": INTERVAL_KAPPA, "seed": seed},
    )  # fmt: skip


@register_dataset("disk-gaussians")
def disk_gaussians(root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """DiSK's 2-D Gaussians (appendix A.2): 1000 train, 1000 test, validation an independent draw."""
    train, val, test = gaussians_splits(seed, 1000, _val_size(1000, val_fraction), 1000)
    return DataBundle(
        name="disk-gaussians", num_classes=3, in_channels=2, image_size=None, train=train, val=val, test=test,
        class_names=list(GAUSS_CLASSES), info={"centres": GAUSS_CENTRES, "std": GAUSS_STD, "seed": seed},
    )  # fmt: skip


# -- Hamidi et al. (ECCV 2024): K Gaussian classes with a known p*(k|x) ------------------------------------------
def mse_gauss_means(
    seed: int = 0,
    classes: int = MSE_GAUSS_CLASSES,
    dim: int = MSE_GAUSS_DIM,
    delta_mu: float = MSE_GAUSS_DELTA_MU,
) -> Tensor:
    """The class means ``mu_k = delta_mu * u_k``, ``u_k`` uniform in {-1, 0, 1}^dim: float64 (classes, dim).

    Drawn from ``torch.Generator().manual_seed(seed)`` alone, so the means depend on the data seed only."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(-1, 2, (classes, dim), generator=g).double() * float(delta_mu)


def mse_gauss_pstar(x: Tensor, means: Tensor, sigma2: float = MSE_GAUSS_SIGMA2) -> Tensor:
    """The Bayes posterior of equiprobable classes ``N(mu_k, sigma2 I)``: ``softmax_k(-||x - mu_k||^2 / (2 sigma2))``,
    computed in float64 from ``x`` as given (the float32 features the models see): float64 (N, K). The term
    ``||x||^2``, common to all classes, is dropped: ``softmax_k((x . mu_k - ||mu_k||^2 / 2) / sigma2)``."""
    xd, mu = x.double(), means.double()
    return torch.softmax((xd @ mu.T - 0.5 * (mu * mu).sum(1)[None, :]) / float(sigma2), dim=1)


def make_mse_gauss(
    n: int, means: Tensor, generator: torch.Generator, sigma2: float = MSE_GAUSS_SIGMA2
) -> tuple[Tensor, Tensor]:
    """``n`` points: labels i.i.d. uniform over the classes, ``x = mu_y + sqrt(sigma2) * N(0, I)`` (the authors'
    code draws them so). Returns x float32 (n, dim), y int64 (n,)."""
    if sigma2 <= 0:
        raise ConfigError(f"the Gaussian variance sigma^2 must be > 0, got {sigma2}")
    y = torch.randint(0, means.shape[0], (n,), generator=generator)
    noise = torch.randn(n, means.shape[1], generator=generator, dtype=torch.float64)
    return (means.double()[y] + noise * float(sigma2) ** 0.5).float(), y


def mse_gauss_bundle(
    seed: int = 0,
    sizes: tuple[int, int, int] = MSE_GAUSS_SIZES,
    classes: int = MSE_GAUSS_CLASSES,
    dim: int = MSE_GAUSS_DIM,
    delta_mu: float = MSE_GAUSS_DELTA_MU,
    sigma2: float = MSE_GAUSS_SIGMA2,
) -> DataBundle:
    """The ``mse-gauss`` data set, any size or setting: train, validation and test drawn each from its own generator
    seeded by ``(seed, split)`` (a split's draw does not depend on the other splits' sizes), the means by ``seed``.
    ``info`` holds ``means`` (float64), ``sigma2``, ``delta_mu``, ``seed`` and ``p_star`` ({split: float64 (N, K)})."""
    if classes < 2 or dim < 1 or min(sizes) < 0 or sizes[0] < 1 or sizes[2] < 1:
        raise ConfigError(f"mse-gauss needs >= 2 classes, dim >= 1 and non-empty train and test splits; got "
                          f"classes={classes}, dim={dim}, sizes={tuple(sizes)}")  # fmt: skip
    means = mse_gauss_means(seed, classes, dim, delta_mu)
    splits, p_star = [], {}
    for j, (name, n) in enumerate(zip(MSE_GAUSS_SPLITS, sizes)):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (j + 1))
        split = Split(*make_mse_gauss(int(n), means, g, sigma2))
        splits.append(split)
        p_star[name] = mse_gauss_pstar(split.x, means, sigma2)
    return DataBundle(
        name="mse-gauss", num_classes=classes, in_channels=dim, image_size=None, train=splits[0], val=splits[1],
        test=splits[2], class_names=[f"class{k}" for k in range(classes)],
        info={"means": means, "sigma2": float(sigma2), "delta_mu": float(delta_mu), "seed": int(seed),
              "p_star": p_star},
    )  # fmt: skip


@register_dataset("mse-gauss")
def mse_gauss(root=None, download: bool = False, val_fraction: float = 0.1, seed: int = 0) -> DataBundle:
    """Hamidi et al.'s Gaussians (ECCV 2024): K = 3, 30-D, sigma^2 = 6, delta_mu = 4; 5000 train, 90000 test, and
    ``val_fraction / 0.1 * 5000`` validation points (the default 0.1: the authors' 5000)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction={val_fraction} is out of range for mse-gauss; valid range [0, 1)")
    n_train, n_val, n_test = MSE_GAUSS_SIZES
    return mse_gauss_bundle(seed, (n_train, int(round(n_val * val_fraction / 0.1)), n_test))
