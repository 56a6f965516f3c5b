"""`kdtune bench --method`: a method's training step timed beside KD's on the same pair and batches."""

from __future__ import annotations

import json


def test_bench_method_rows(tmp_path, capsys):
    from kdtune.cli import main

    out = tmp_path / "bench.json"
    argv = ["bench", "--teacher", "resnet8", "--student", "resnet8", "--batch", "4", "--steps", "1", "--warmup", "0",
            "--repeats", "1", "--only", "kdtune", "--method", "dkd", "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    row = json.loads(out.read_text())[0]
    assert row["method:dkd"][0] > 0 and row["kdtune"][0] > 0
    assert "kdtune, method dkd (step " in capsys.readouterr().out
    assert main(argv[:-2] + ["--method", "nope"]) == 2  # an unknown method: one line, exit 2
