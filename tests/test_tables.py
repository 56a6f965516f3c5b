"""The one table helper (kdtune.tables, on tabulate) and the tables built on it: the sweep's summary and the
report's text and Markdown tables."""

from __future__ import annotations

from kdtune.tables import table


def test_table_cells_print_as_given():
    out = table(["name", "value", "hp"], [["a", "0.50", "T=4 alpha=1"], ["longer", "12", None]])
    lines = out.splitlines()
    assert lines[0].split() == ["name", "value", "hp"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["a", "0.50", "T=4", "alpha=1"]  # "0.50" stays, not parsed to 0.5
    assert lines[3].split() == ["longer", "12", "-"]  # None shows as "-"
    assert all(ln == ln.rstrip() for ln in lines)
    # columns line up: each column starts at the same offset on every line
    assert lines[2].index("0.50") == lines[0].index("value") == lines[3].index("12")


def test_table_right_alignment_and_markdown_escape():
    out = table(["K", "img/s"], [["1", "5.0"], ["16", "1,234.5"]], align=["right", "right"]).splitlines()
    assert out[2].endswith("5.0") and out[3].endswith("1,234.5") and len(out[2]) == len(out[3])
    md = table(["a", "b"], [["x|y", "1"]], fmt="github").splitlines()
    assert md[0].startswith("| a") and md[1].startswith("|-") and "x\\|y" in md[2]


def test_sweep_table_and_report_tables():
    from kdtune.report.table import format_markdown, format_text
    from kdtune.tune.runner import SweepResult

    groups = [{"student": "resnet8", "method": "kd", "trials": 3, "stopped": 1,
               "best": {"val_acc": 91.25, "test_acc": 90.5, "config": {"kd.T": 4.0}}},
              {"student": "resnet8", "method": "dkd", "trials": 2, "errored": 2}]  # fmt: skip
    r = SweepResult(name="x", experiment_dir="/tmp/x", status="finished", metric="val_acc", mode="max", groups=groups)
    lines = r.table().splitlines()
    assert lines[0].split()[:4] == ["student", "method", "trials", "best"]
    assert "3 (1 stopped)" in lines[2] and "kd.T=4" in lines[2]
    assert "2 (2 failed)" in lines[3] and lines[3].split()[-1] == "-"

    row = {"data": "digits", "teacher": "resnet8x4", "student": "resnet8", "method": "kd", "value": 91.0,
           "value_std": 0.5, "n_seeds": 2, "test_acc": 90.0, "test_acc_std": None, "published": None,
           "published_std": None, "published_source": None, "hparams": {"T": "4|5"}, "n_trials": 4, "n_failed": 1}  # fmt: skip
    text = format_text([row]).splitlines()
    assert text[0] == "data: digits" and text[1].split()[:3] == ["teacher", "->", "student"]
    assert "91.00 ± 0.50" in text[3] and "4 (1 failed)" in text[3]
    md = format_markdown([row])
    assert "| resnet8x4 -> resnet8 " in md and "T=4\\|5" in md
