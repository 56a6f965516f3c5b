"""Published CIFAR-100 top-1 test accuracies (%) per method and teacher -> student pair, with their source.

Only numbers printed in the papers kept in ``shared/papers/`` (and, for SP and CC, in the CRD benchmark's
README) are here, each with its table: [TTM] (Zheng & Yang, ICLR 2024), [IPWD] (Niu et al., NeurIPS 2022),
[DiSK] (ICLR 2023 submission; its own recipe, so its numbers compare only with each other) and [CRD] (the
feature methods of the CRD benchmark, Tian et al., ICLR 2020).

Model names are kdtune's registry names (``wrn_40_2``, ``resnet32x4``, ``mobilenetv2`` = CRD's width-0.5
``mobile_half``, ``shufflev1``, ``shufflev2``, ``resnet50``, ``resnet10_m`` ...). DiSK's "MobileNetV2x2"
(width 2) is not kdtune's ``mobilenetv2`` and is left out.

More: docs/report.md §Published numbers (each source's tables, runs and caveats).
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
CRD_T1 = "CRD (Tian et al., ICLR 2020) as printed in TTM/WTTM (Zheng & Yang, ICLR 2024) Table 1, std Table 11"
IPWD_T2_REVIEWKD = ("ReviewKD (Chen et al., CVPR 2021) as printed in IPWD (Niu et al., NeurIPS 2022) appendix "
                    "Table 2; its official recipe (teacher in train mode, lr 0.1, batch 128); no std")
HSAKD_README = ("HSAKD README (winycg/HSAKD @ 28c8dc2), its CIFAR-100 results Table, frozen-backbone teacher; mean ± std of 3 runs, best epoch, "
                "CRD/SSKD teachers: not comparable to CRD's table")
CRD_T3 = "CRD (Tian et al., ICLR 2020) as printed in TTM/WTTM (Zheng & Yang, ICLR 2024) Table 3, std Table 12"
CRD_README_SAME = "RepDistiller README @ b84f547, same-architecture table (= CRD paper Table 1); no std"
CRD_README_DIFF = "RepDistiller README @ b84f547, different-architecture table (= CRD paper Table 2); no std"

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

# The CRD benchmark's feature methods (kdtune names), same column order as _T1 / _T3: method -> (means, stds).
_T1_CRD = {
    "fitnet": ([73.58, 72.24, 69.21, 68.99, 71.06, 73.50, 71.02], [0.32, 0.24, 0.36, 0.27, 0.13, 0.28, 0.31]),
    "at": ([74.08, 72.77, 70.55, 70.22, 72.31, 73.44, 71.43], [0.25, 0.10, 0.27, 0.16, 0.08, 0.19, 0.09]),
    "vid": ([74.11, 73.30, 70.38, 70.16, 72.61, 73.09, 71.23], [0.24, 0.13, 0.14, 0.39, 0.28, 0.21, 0.06]),
    "rkd": ([73.35, 72.22, 69.61, 69.25, 71.82, 71.90, 71.48], [0.09, 0.20, 0.06, 0.05, 0.34, 0.11, 0.05]),
    "pkt": ([74.54, 73.45, 70.34, 70.25, 72.61, 73.64, 72.88], [0.04, 0.19, 0.04, 0.04, 0.17, 0.18, 0.09]),
    "crd": ([75.48, 74.14, 71.16, 71.46, 73.48, 75.51, 73.94], [0.09, 0.22, 0.17, 0.09, 0.13, 0.18, 0.22]),
}
_T3_CRD = {
    "fitnet": ([64.14, 63.16, 70.69, 73.59, 73.54, 73.73], [0.50, 0.47, 0.22, 0.15, 0.22, 0.32]),
    "at": ([59.40, 58.58, 71.84, 71.73, 72.73, 73.32], [0.20, 0.54, 0.28, 0.31, 0.09, 0.35]),
    "vid": ([65.56, 67.57, 70.30, 73.38, 73.40, 73.61], [0.42, 0.28, 0.31, 0.09, 0.17, 0.12]),
    "rkd": ([64.52, 64.43, 71.50, 72.28, 73.21, 72.21], [0.45, 0.42, 0.07, 0.39, 0.28, 0.16]),
    "pkt": ([67.13, 66.52, 73.01, 74.10, 74.69, 73.89], [0.30, 0.33, 0.14, 0.25, 0.34, 0.16]),
    "crd": ([69.73, 69.11, 74.30, 75.11, 75.65, 76.05], [0.42, 0.28, 0.14, 0.32, 0.10, 0.14]),
}
# SP and CC: RepDistiller's README only (TTM does not list them), no std.
_T1_README = {
    "sp": [73.83, 72.43, 69.67, 70.04, 72.69, 72.94, 72.68],
    "cc": [73.56, 72.21, 69.63, 69.48, 71.48, 72.97, 70.71],
}
_T3_README = {
    "sp": [66.30, 68.08, 73.34, 73.48, 74.56, 74.52],
    "cc": [64.86, 65.43, 70.25, 71.14, 71.29, 71.38],
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
    for pairs, feature, src, readme, readme_src in (
        (_T1_PAIRS, _T1_CRD, CRD_T1, _T1_README, CRD_README_SAME),
        (_T3_PAIRS, _T3_CRD, CRD_T3, _T3_README, CRD_README_DIFF),
    ):
        for method, (means, stds) in feature.items():
            for (teacher, student), acc, std in zip(pairs, means, stds, strict=True):
                table[(teacher, student, method)] = Published(acc, std, src)
        for method, means in readme.items():
            for (teacher, student), acc in zip(pairs, means, strict=True):
                table[(teacher, student, method)] = Published(acc, None, readme_src)
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
    # ReviewKD: the five pairs a paper kept here prints (its vgg13/resnet50 -> mobilenetv2 numbers, flagged in the
    # fact sheet, are in no paper here and are left out)
    for (teacher, student), acc in {
        ("wrn_40_2", "wrn_16_2"): 76.12,
        ("resnet56", "resnet20"): 71.89,
        ("resnet110", "resnet32"): 73.89,
        ("resnet32x4", "shufflev2"): 77.78,
        ("wrn_40_2", "shufflev1"): 77.14,
    }.items():
        table[(teacher, student, "reviewkd")] = Published(acc, None, IPWD_T2_REVIEWKD)
    # HSAKD: its README's rows (its stride-1 MobileNetV2 rows left out: not kdtune's mobilenetv2)
    for (teacher, student), (acc, std) in {
        ("wrn_40_2", "wrn_16_2"): (77.20, 0.17),
        ("wrn_40_2", "wrn_40_1"): (77.00, 0.21),
        ("resnet56", "resnet20"): (72.58, 0.33),
        ("resnet32x4", "resnet8x4"): (77.26, 0.14),
        ("wrn_40_2", "shufflev1"): (78.51, 0.20),
        ("resnet32x4", "shufflev2"): (79.93, 0.11),
    }.items():
        table[(teacher, student, "hsakd")] = Published(acc, std, HSAKD_README)
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
