"""DiSK's two toy problems, generated as appendix A.1-A.2 of Kag et al. ("Scaffolding a Student to Instill
Knowledge", ICLR 2023 submission) write them.

- 1-D intervals (A.1): ``x`` in [0, 9], labelled red (0) / blue (1) by ``f* = h(x; 2, 3) + h(x; 5, 7)``,
  balanced classes; 1000 train, 100 test and an independent 100-point validation draw.
- 2-D Gaussians (A.2): six centres, two per class, ``x`` drawn with standard deviation ``r = 0.05`` per
  coordinate (``std=`` changes it), equal class sizes; 1000 train, 1000 test and a validation draw.

The registered data sets (``disk-intervals``, ``disk-gaussians``) hold float32 ``(N, D)`` features with
``in_channels = D`` and ``image_size = None``; ``seed`` picks the draw (train, validation and test come from one
generator, so they are independent and disjoint draws) and ``val_fraction`` the size of the validation draw
relative to the training set (0.1: the paper's 100 points).

More: docs/toys.md §Data (the labelling function, the sampling, the centres, the reading of ``N(c, r I)``).
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
