"""Bad input is refused before any work: exit code 2, one ``kdtune: error:`` line, never a traceback.

Most cases call ``kdtune.cli.main(argv)`` in-process (fast); a few run the real console entry point.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdtune.cli import main

NON_UTF8 = "data: digits\nname: caf\xe9\n".encode("latin-1")


def _spec(tmp_path: Path, **changes) -> dict:
    spec = {
        "name": "bad-input",
        "data": "digits",
        "teacher": {"checkpoint": str(tmp_path / "teacher.pt"), "model": "resnet8"},
        "students": ["resnet8"],
        "methods": ["kd"],
        "budget": {"trials": 2, "epochs": 2},
        "train": {"device": "cpu"},
        "storage": str(tmp_path / "runs"),
    }
    spec.update(changes)
    return spec


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        path.write_text(yaml.safe_dump(content))
    else:
        path.write_text(content)
    return path


def _checkpoint(path: Path, arch="resnet8", num_classes=10, in_channels=1) -> Path:
    from kdtune.models import create_model
    from kdtune.models.checkpoint import save_model

    return save_model(path, create_model(arch, num_classes=num_classes, in_channels=in_channels), arch,
                      num_classes, in_channels)  # fmt: skip


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> Path:
    """A resnet8 for digits (10 classes, 1 channel): the checkpoint every valid spec here points at."""
    return _checkpoint(tmp_path_factory.mktemp("teacher") / "teacher.pt")


def _experiment(tmp_path: Path, teacher_file: Path, file: str, content) -> list[str]:
    spec = _write(tmp_path / "spec.yaml", _spec(tmp_path, teacher={"checkpoint": str(teacher_file),
                                                                   "model": "resnet8"}))  # fmt: skip
    _write(tmp_path / "runs" / "bad-input" / file, content)
    return ["validate", str(spec)]


def _resume_case(tmp_path: Path, file: str, content) -> list[str]:
    exp = tmp_path / "runs" / "bad-input"
    _write(exp / "spec.yaml", _spec(tmp_path))
    _write(exp / file, content)
    return ["resume", str(exp)]


def _damaged_sqlite(tmp_path: Path) -> bytes:
    """A real SQLite file (right header) whose pages after the first are overwritten."""
    import sqlite3

    db = tmp_path / "real.db"
    con = sqlite3.connect(db)
    con.execute("create table t (x text)")
    con.executemany("insert into t values (?)", [("x" * 500,)] * 200)
    con.commit()
    con.close()
    data = bytearray(db.read_bytes())
    data[4096:] = b"\xff" * (len(data) - 4096)
    return bytes(data)


def _teacher_case(tmp_path: Path, make) -> list[str]:
    make(tmp_path / "teacher.pt")
    return ["validate", str(_write(tmp_path / "spec.yaml", _spec(tmp_path)))]


# (id, build argv from tmp_path and the good teacher file, what the one error line must contain)
CASES = [
    ("config-missing", lambda t, c: ["train", "--config", str(t / "none.yaml")], "does not exist"),
    ("config-directory", lambda t, c: ["train", "--config", str(t)], "is a directory"),
    ("config-not-utf8", lambda t, c: ["train", "--config", str(_write(t / "c.yaml", NON_UTF8))],
     "is not UTF-8 text (byte 0xe9 on line 2)"),
    ("config-damaged-yaml", lambda t, c: ["train", "--config", str(_write(t / "c.yaml", "epochs: 3\nlr: [1, 2\n"))],
     "c.yaml' is not valid YAML at line 3"),
    ("config-not-mapping", lambda t, c: ["train", "--config", str(_write(t / "c.yaml", "- 1\n- 2\n"))],
     "must be a mapping"),
    ("train-unknown-model", lambda t, c: ["train", "model=nosuch"], "`kdtune models` lists them"),
    ("train-unknown-method", lambda t, c: ["train", "method=kdd"], "unknown method 'kdd' (did you mean 'kd'?)"),
    ("train-unknown-data", lambda t, c: ["train", "data=mnist"], "unknown data set 'mnist'"),
    ("train-epochs-out-of-range", lambda t, c: ["train", "epochs=-1"], "epochs=-1 is out of range"),
    ("train-lr-out-of-range", lambda t, c: ["train", "lr=0"], "lr=0.0 is out of range"),
    ("train-hp-out-of-range", lambda t, c: ["train", "method=kd", "teacher=t.pt", "T=-1"], "kd.T=-1.0 is out of range"),
    ("train-not-key-value", lambda t, c: ["train", "epochs"], "key=value"),
    ("train-amp-on", lambda t, c: ["train", "amp=on"], "amp=on/yes/true is not valid; choose one of auto, bf16, off"),
    ("train-amp-typo", lambda t, c: ["train", "amp=of"], "amp='of' is not valid (did you mean 'off'?)"),
    ("spec-missing", lambda t, c: ["validate", str(t / "none.yaml")], "does not exist"),
    ("spec-directory", lambda t, c: ["validate", str(t)], "is a directory"),
    ("spec-not-utf8", lambda t, c: ["validate", str(_write(t / "s.yaml", NON_UTF8))], "is not UTF-8 text"),
    ("sweep-spec-not-utf8", lambda t, c: ["sweep", str(_write(t / "s.yaml", NON_UTF8))], "is not UTF-8 text"),
    ("spec-damaged-yaml", lambda t, c: ["validate", str(_write(t / "s.yaml", "name: x\nmethods: {kd: [\n"))],
     "is not valid YAML at line"),
    ("spec-unknown-method", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(t, methods=["dkdd"])))],
     "methods.dkdd: unknown method 'dkdd' (did you mean 'dkd'?)"),
    ("spec-unknown-student", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(t, students=["resnet9"])))],
     "students[0]: unknown model 'resnet9'"),
    ("spec-out-of-range", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(t, budget={"trials": 0})))],
     "budget.trials=0 is out of range"),
    ("spec-method-constraint", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(
        t, teacher={"checkpoint": str(c), "model": "resnet8"}, methods={"dkd": {"space": {"alpha": 0, "beta": 0}}}
    )))], "dkd.alpha and dkd.beta are both 0"),
    ("spec-disk-K-over-class-count", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(
        t, teacher={"model": "resnet8"}, methods={"disk": {"space": {"K": 20}}})))],
     "methods.disk (resnet8 on digits): disk.K=20 exceeds the number of classes (10)"),
    ("teacher-missing", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(t)))], "does not exist"),
    ("teacher-other-class-count", lambda t, c: _teacher_case(t, lambda p: _checkpoint(p, num_classes=7)),
     "is a resnet8 with 7 classes, but data digits has 10 classes"),
    ("teacher-other-channels", lambda t, c: _teacher_case(t, lambda p: _checkpoint(p, in_channels=3)),
     "data digits has 1 input channel"),
    ("teacher-other-arch", lambda t, c: _teacher_case(t, lambda p: _checkpoint(p, arch="resnet14")),
     "is a resnet14 with 10 classes, but arch=resnet8"),
    ("teacher-truncated", lambda t, c: _teacher_case(t, lambda p: _write(p, c.read_bytes()[:3000])),
     "the file is truncated or damaged (3000 bytes"),
    ("teacher-not-a-checkpoint", lambda t, c: _teacher_case(t, lambda p: _write(p, "just text\n")),
     "not a torch.save file (it starts with b'just')"),
    ("teacher-empty-file", lambda t, c: _teacher_case(t, lambda p: _write(p, b"")), "the file is empty"),
    ("teacher-directory", lambda t, c: _teacher_case(t, lambda p: p.mkdir()), "is a directory"),
    ("experiment-damaged-optuna-db", lambda t, c: _experiment(t, c, "optuna.db", b"garbage" * 10),
     "optuna.db is not an SQLite database"),
    ("experiment-damaged-mlflow-db", lambda t, c: _experiment(t, c, "mlflow.db", b"\x00" * 100),
     "mlflow.db is not an SQLite database"),
    ("experiment-damaged-optuna-db-pages", lambda t, c: _experiment(t, c, "optuna.db", _damaged_sqlite(t)),
     "optuna.db is a damaged SQLite database"),
    ("experiment-damaged-state", lambda t, c: _experiment(t, c, "state.json", "{not json"),
     "state.json is not valid JSON"),
    ("sweep-damaged-optuna-db", lambda t, c: ["sweep"] + _experiment(t, c, "optuna.db", b"garbage")[1:],
     "optuna.db is not an SQLite database"),
    ("resume-unknown-experiment", lambda t, c: ["resume", str(t / "nothing")], "no sweep experiment"),
    ("resume-damaged-state", lambda t, c: _resume_case(t, "state.json", b"\x00\x01"), "state.json is not valid JSON"),
    ("resume-damaged-optuna-db", lambda t, c: _resume_case(t, "optuna.db", "not a db"), "not an SQLite database"),
    ("resume-spec-not-utf8", lambda t, c: _resume_case(t, "spec.yaml", NON_UTF8),
     "the experiment's saved spec"),
    ("report-damaged-mlflow-db", lambda t, c: ["report"] + _resume_case(t, "mlflow.db", b"\x00" * 64)[1:],
     "mlflow.db is not an SQLite database"),
    ("data-missing", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(
        t, data="cifar100", data_root=str(t / "nodata"), teacher={"model": "resnet8"})))], "nodata"),
    ("storage-is-a-file", lambda t, c: ["validate", str(_write(t / "s.yaml", _spec(
        t, teacher={"checkpoint": str(c), "model": "resnet8"}, storage=str(_write(t / "afile", "x")))))],
     "is a file, not a directory"),
]


@pytest.mark.parametrize("build, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(tmp_path, teacher_file, capsys, build, needle):
    argv = build(tmp_path, teacher_file)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (argv, out, err)
    assert len(lines) == 1 and lines[0].startswith("kdtune: error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err + out


@pytest.mark.parametrize("methods", [["kd"], ["disk", "ipwd", "dkd"]])
def test_good_spec_with_a_fitting_teacher_checkpoint_validates(tmp_path, teacher_file, capsys, methods):
    """The checks refuse only what cannot run: DiSK's published K (20) is bounded by digits' 10 classes."""
    spec = _write(tmp_path / "s.yaml", _spec(tmp_path, teacher={"checkpoint": str(teacher_file), "model": "resnet8"},
                                             methods=methods))  # fmt: skip
    assert main(["validate", str(spec)]) == 0, capsys.readouterr().err
    assert "is valid" in capsys.readouterr().out


def test_several_problems_are_one_error_line_each(tmp_path, teacher_file):
    from kdtune.errors import ConfigError
    from kdtune.preflight import preflight
    from kdtune.spec import load_spec

    _checkpoint(tmp_path / "teacher.pt", num_classes=7)
    spec = load_spec(_spec(tmp_path))
    _write(tmp_path / "runs" / "bad-input" / "state.json", "{")
    with pytest.raises(ConfigError) as e:
        preflight(spec)
    lines = str(e.value).splitlines()
    assert lines[0] == "2 problems:" and "7 classes" in lines[1] and "state.json" in lines[2]


def test_print_config_prints_the_resolved_config_and_runs_nothing(tmp_path, teacher_file, capsys):
    assert main(["train", "--print-config", "epochs=3", "method=kd", f"teacher={teacher_file}", "T=2"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["epochs"] == 3 and cfg["hp"]["T"] == 2.0 and cfg["hp"]["w_kd"] == 0.9
    spec = _write(tmp_path / "s.yaml", _spec(tmp_path, teacher={"checkpoint": str(teacher_file), "model": "resnet8"}))
    assert main(["sweep", "--print-config", str(spec)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "bad-input" and printed["methods"] == {"kd": {"space": {}, "starts": True, "trials": None}}
    assert not (tmp_path / "runs").exists()


def test_print_config_reads_switch_words_and_settings_after_options(capsys):
    """amp=off is the documented word, not YAML's False; key=value words may follow an option."""
    assert main(["train", "--print-config", "amp=off", "--quiet", "epochs=3", "compile=true"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["amp"], cfg["epochs"], cfg["compile"]) == ("off", 3, True)
    assert main(["train", "--print-config", "amp=no"]) == 0 and "amp: 'off'" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "epochs=3", "--quiet", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_train_help_shows_type_default_and_range(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ") and ln.split()}
    assert lines["epochs"].split()[1:4] == ["int", "default", "30"] and lines["epochs"].endswith("an integer >= 1")
    assert "float" in lines["lr"] and "a number > 0" in lines["lr"]
    assert "one of sgd, adamw" in lines["optimizer"] and "one of auto, bf16, off" in lines["amp"]


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kdtune", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(
    "args, needle",
    [(["train", "epochs=-1"], "epochs=-1"), (["train", "model=nosuch"], "unknown model 'nosuch'"),
     (["train", "amp=yes"], "amp=on/yes/true is not valid; choose one of auto, bf16, off")],
)
def test_console_refusals(args, needle):
    p = _run(*args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("kdtune: error:") and needle in lines[0]
    assert "Traceback" not in p.stderr


def test_console_non_utf8_spec(tmp_path):
    p = _run("validate", str(_write(tmp_path / "s.yaml", NON_UTF8)))
    assert p.returncode == 2 and p.stderr.startswith("kdtune: error:") and "not UTF-8" in p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_console_help_lists_commands():
    p = _run("--help")
    assert p.returncode == 0 and "train" in p.stdout and "validate" in p.stdout and "bench" in p.stdout


def test_sound_experiment_files_pass(tmp_path):
    import sqlite3

    from kdtune.preflight import check_experiment

    exp = tmp_path / "exp"
    exp.mkdir()
    for name in ("optuna.db", "mlflow.db"):
        con = sqlite3.connect(exp / name)
        con.execute("create table t (x int)")
        con.commit()
        con.close()
    (exp / "state.json").write_text('{"status": "interrupted", "groups": {}}')
    (exp / "spec.yaml").write_text("name: exp\n")
    check_experiment(exp)


def test_a_closed_pipe_ends_the_command_quietly(monkeypatch, capsys):
    """``kdtune validate spec | head -1``: the reader closing the pipe ends kdtune with 141 (as SIGPIPE would),
    not a traceback, and no second error when Python flushes stdout at exit."""
    import io
    import os

    from kdtune.cli import main

    r, w = os.pipe()
    os.close(r)  # the reader is gone: every write raises BrokenPipeError
    out = io.TextIOWrapper(os.fdopen(w, "wb", buffering=0), write_through=True)
    monkeypatch.setattr("sys.stdout", out)
    assert main(["validate", str(Path(__file__).resolve().parents[1] / "sweeps" / "digits.yaml")]) == 141
    out.write("after")  # stdout now points at /dev/null
    out.close()
