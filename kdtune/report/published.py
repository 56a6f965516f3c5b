"""Published CIFAR-100 top-1 test accuracies (%) per method and teacher -> student pair, with their source.

Only numbers printed in the papers kept in ``shared/papers/`` are here, each with its table:

- [TTM] Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024:
  Table 1 (same-architecture pairs, mean of 5 runs) and Table 3 (different architectures, mean of 3 runs),
  standard deviations from Tables 11 and 12; CRD recipe (240 epochs). DKD's numbers there are the DKD
  paper's (no std); some DIST numbers are TTM's re-implementation (its Tables 1 and 3 say so). The same
  tables give the teachers and the students trained from scratch (CE), which are CRD's numbers.
- [IPWD] Niu et al., "Respecting Transfer Gap in Knowledge Distillation", NeurIPS 2022, appendix Table 1.
- [DiSK] "Distilling selective knowledge" (ICLR 2023 submission): Table 4 (standard pairs) and Table 3
  (its ResNet10 family); CE students from Table 5. DiSK's own recipe: students warm-started from a CE
  student, CE and KD baselines well above the CRD recipe's (its KD for resnet32x4 -> resnet8x4 is 76.25
  against TTM's 73.33), so its numbers compare only with each other. DiSK's KD numbers are used only for
  pairs that TTM does not cover (the ResNet10 family).

Model names are kdtune's registry names (``wrn_40_2``, ``resnet32x4``, ``mobilenetv2`` = CRD's width-0.5
``mobile_half``, ``shufflev1``, ``shufflev2``, ``resnet50``, ``resnet10_m`` ...). DiSK's "MobileNetV2x2"
(width 2) is not kdtune's ``mobilenetv2`` and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    acc: float
    std: float | None
    source: str

    def text(self) -> str:
        return f"{self.acc:.2f}" + (f" ± {self.std:.2f}" if self.std is not None else "")


TTM_T1 = "TTM/WTTM (Zheng & Yang, ICLR 2024) Table 1, std Table 11"
TTM_T3 = "TTM/WTTM (Zheng & Yang, ICLR 2024) Table 3, std Table 12"
TTM_T1_DKD = "TTM/WTTM (Zheng & Yang, ICLR 2024) Table 1 (DKD paper's number)"
TTM_T3_DKD = "TTM/WTTM (Zheng & Yang, ICLR 2024) Table 3 (DKD paper's number)"
CRD_SCRATCH = "TTM/WTTM (Zheng & Yang, ICLR 2024) Tables 1 and 3, 'Student' row (CRD's numbers)"
IPWD_T1 = "IPWD (Niu et al., NeurIPS 2022) appendix Table 1"
DISK_T4 = "DiSK (ICLR 2023 submission) Table 4; DiSK's recipe (CE warm start), not comparable to CRD's"
DISK_T3 = "DiSK (ICLR 2023 submission) Table 3; DiSK's recipe (CE warm start)"
DISK_T5 = "DiSK (ICLR 2023 submission) Table 5, CE accuracy"

# (teacher, student) columns of TTM Table 1 and Table 3, in the papers' order.
_T1_PAIRS = [
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
]
_T3_PAIRS = [
    ("vgg13", "mobilenetv2"),
    ("resnet50", "mobilenetv2"),
    ("resnet50", "vgg8"),
    ("resnet32x4", "shufflev1"),
    ("resnet32x4", "shufflev2"),
    ("wrn_40_2", "shufflev1"),
]
# method -> (means, stds); None where the paper prints n/a (DKD has no std in the paper).
_T1 = {
    "kd": ([74.92, 73.54, 70.66, 70.67, 73.08, 73.33, 72.98], [0.28, 0.20, 0.24, 0.27, 0.18, 0.25, 0.19]),
    "dist": ([75.51, 74.73, 71.75, 71.65, 73.69, 76.31, 73.89], [0.04, 0.24, 0.30, 0.21, 0.23, 0.19, 0.19]),
    "dkd": ([76.24, 74.81, 71.97, None, 74.11, 76.32, 74.68], None),
    "ttm": ([76.23, 74.32, 71.83, 71.46, 73.97, 76.17, 74.33], [0.15, 0.31, 0.16, 0.16, 0.23, 0.28, 0.07]),
    "wttm": ([76.37, 74.58, 71.92, 71.67, 74.13, 76.06, 74.44], [0.10, 0.26, 0.40, 0.28, 0.37, 0.27, 0.19]),
}
_T3 = {
    "kd": ([67.37, 67.35, 73.81, 74.07, 74.45, 74.83], [0.32, 0.32, 0.13, 0.19, 0.27, 0.17]),
    "dist": ([68.50, 68.66, 74.11, 76.34, 77.35, 76.40], [0.26, 0.23, 0.07, 0.18, 0.25, 0.03]),
    "dkd": ([69.71, 70.35, None, 76.45, 77.07, 76.70], None),
    "ttm": ([68.98, 69.24, 74.87, 74.18, 76.57, 75.39], [0.85, 0.28, 0.31, 0.26, 0.26, 0.33]),
    "wttm": ([69.16, 69.59, 74.82, 74.37, 76.55, 75.42], [0.20, 0.58, 0.28, 0.39, 0.08, 0.34]),
}

# Students trained from scratch with CE (pair-independent), CRD's numbers as printed in TTM Tables 1/3.
SCRATCH: dict[str, Published] = {
    s: Published(a, None, CRD_SCRATCH)
    for s, a in {
        "wrn_16_2": 73.26,
        "wrn_40_1": 71.98,
        "resnet20": 69.06,
        "resnet32": 71.14,
        "resnet8x4": 72.50,
        "vgg8": 70.36,
        "mobilenetv2": 64.60,
        "shufflev1": 70.50,
        "shufflev2": 71.82,
    }.items()
}
SCRATCH.update(
    {
        s: Published(a, None, DISK_T5)
        for s, a in {
            "resnet10_xxs": 32.05,
            "resnet10_xs": 42.99,
            "resnet10_s": 52.16,
            "resnet10_m": 65.24,
        }.items()
    }
)

# Teachers (CE), CRD's numbers as printed in TTM Tables 1/3.
TEACHERS: dict[str, float] = {
    "wrn_40_2": 75.61,
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "vgg13": 74.64,
    "resnet50": 79.34,
}


def _build() -> dict[tuple[str, str, str], Published]:
    table: dict[tuple[str, str, str], Published] = {}
    for pairs, methods, src, src_dkd in (
        (_T1_PAIRS, _T1, TTM_T1, TTM_T1_DKD),
        (_T3_PAIRS, _T3, TTM_T3, TTM_T3_DKD),
    ):
        for method, (means, stds) in methods.items():
            for i, (teacher, student) in enumerate(pairs):
                if means[i] is None:
                    continue
                std = stds[i] if stds is not None else None
                table[(teacher, student, method)] = Published(
                    means[i], std, src_dkd if method == "dkd" else src
                )
    for (teacher, student), acc in {
        ("wrn_40_2", "wrn_16_2"): 75.83,
        ("resnet110", "resnet20"): 71.22,
        ("resnet32x4", "shufflev2"): 76.61,
        ("vgg13", "mobilenetv2"): 69.81,
    }.items():
        table[(teacher, student, "ipwd")] = Published(acc, None, IPWD_T1)
    for (teacher, student), acc in {
        ("resnet32x4", "resnet8x4"): 76.92,
        ("resnet32x4", "shufflev2"): 80.23,
        ("resnet32x4", "wrn_16_2"): 77.67,
        ("wrn_40_2", "resnet8x4"): 76.05,
        ("wrn_40_2", "shufflev2"): 78.33,
        ("wrn_40_2", "wrn_40_1"): 75.92,
    }.items():
        table[(teacher, student, "disk")] = Published(acc, None, DISK_T4)
    # DiSK Table 3, CIFAR-100 half: teacher -> {student: (KD, DiSK)}.
    for teacher, rows in {
        "resnet10_l": {
            "resnet10_xxs": (32.64, 37.56),
            "resnet10_s": (54.92, 58.14),
            "resnet10_m": (66.96, 70.03),
        },
        "resnet10": {
            "resnet10_xxs": (34.25, 37.84),
            "resnet10_s": (54.95, 58.36),
            "resnet10_m": (67.27, 70.15),
        },
        "resnet18": {
            "resnet10_xxs": (34.16, 37.80),
            "resnet10_s": (55.76, 58.11),
            "resnet10_m": (68.09, 69.86),
        },
        "resnet34": {
            "resnet10_xxs": (33.93, 37.78),
            "resnet10_s": (54.19, 58.02),
            "resnet10_m": (66.78, 69.89),
        },
    }.items():
        for student, (kd, disk) in rows.items():
            table[(teacher, student, "kd")] = Published(kd, None, DISK_T3)
            table[(teacher, student, "disk")] = Published(disk, None, DISK_T3)
    return table


PUBLISHED: dict[tuple[str, str, str], Published] = _build()


def published(
    data: str | None, teacher: str | None, student: str | None, method: str | None
) -> Published | None:
    """The published CIFAR-100 number for ``method`` on ``teacher -> student``, or ``None``.

    ``ce`` is the student trained from scratch (any teacher). Other data sets have no entry.
    """
    if data is None or str(data).lower() not in ("cifar100", "cifar-100") or not student or not method:
        return None
    if method == "ce":
        return SCRATCH.get(student)
    if not teacher:
        return None
    return PUBLISHED.get((teacher, student, method))
