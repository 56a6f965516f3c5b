"""kdtune validate --schema: the sweep spec's JSON Schema, from a pydantic model that cannot drift from the spec."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from kdtune import spec as spec_mod
from kdtune.cli import main

jsonschema = pytest.importorskip("jsonschema")
SWEEPS = sorted((Path(__file__).resolve().parent.parent / "sweeps").glob("*.yaml"))


@pytest.fixture(scope="module")
def schema():
    from kdtune.spec_schema import json_schema

    return json_schema()


def test_cli_prints_the_schema(capsys, schema):
    assert main(["validate", "--schema"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == schema and printed["$schema"].endswith("2020-12/schema")
    assert main(["validate"]) == 2
    assert capsys.readouterr().err.strip() == (
        "kdtune: error: kdtune validate needs a spec file (kdtune validate sweeps/digits.yaml), or --schema"
    )


def _props(schema, ref):
    return set(schema["$defs"][ref]["properties"])


def test_schema_holds_exactly_the_specs_fields(schema):
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(spec_mod.SweepSpec)} - {"source"}
    assert _props(schema, "Budget") == {f.name for f in dataclasses.fields(spec_mod.Budget)}
    assert _props(schema, "Scheduler") == {f.name for f in dataclasses.fields(spec_mod.SchedulerSpec)}
    assert _props(schema, "Tracking") == {f.name for f in dataclasses.fields(spec_mod.TrackingSpec)}
    assert _props(schema, "Failures") == {f.name for f in dataclasses.fields(spec_mod.FailureSpec)}
    assert _props(schema, "Teacher") == {f.name for f in dataclasses.fields(spec_mod.TeacherSpec)}
    from kdtune.config import TrainConfig

    assert _props(schema, "TrainFields") == set(TrainConfig.fields()) - set(spec_mod.SWEEP_OWNED)
    assert set(schema["required"]) == {"students", "methods"}


@pytest.mark.parametrize("path", SWEEPS, ids=[p.name for p in SWEEPS])
def test_shipped_specs_validate(schema, path):
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


@pytest.mark.parametrize(
    "bad",
    [
        {"budget": {"trails": 3}},  # a typo in a field name
        {"methods": ["dkdd"]},  # not a method
        {"students": ["resnet9"]},
        {"metric": "test_acc"},  # never select on the test split
        {"budget": {"trials": 0}},
        {"train": {"lr": "fast"}},
        {"train": {"epochs": 3}},  # set by the sweep (budget.epochs)
        {"scheduler": {"name": "pbt"}},
    ],
)
def test_schema_refuses_what_load_spec_refuses(schema, bad):
    from kdtune.errors import ConfigError

    raw = {"name": "s", "data": "digits", "students": ["resnet8"], "methods": ["kd"], **bad}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(raw, schema)
    with pytest.raises(ConfigError):
        spec_mod.load_spec(raw)


def _bounded(schema):
    """(path, low, low_open, high, high_open, integer) of every bounded number the schema holds."""

    def walk(props, prefix):
        for name, p in props.items():
            p = next((a for a in p.get("anyOf", [p]) if a.get("type") in ("integer", "number")), p)
            if p.get("type") in ("integer", "number") and any(
                k in p for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
            ):
                yield (f"{prefix}{name}", p.get("minimum", p.get("exclusiveMinimum")), "exclusiveMinimum" in p,
                       p.get("maximum", p.get("exclusiveMaximum")), "exclusiveMaximum" in p, p["type"] == "integer")  # fmt: skip

    yield from walk(schema["properties"], "")
    for section, ref in (("budget", "Budget"), ("scheduler", "Scheduler"), ("failures", "Failures")):
        yield from walk(schema["$defs"][ref]["properties"], f"{section}.")


def test_schema_bounds_are_load_specs_bounds(schema):
    """At each bound and just past it, the schema and load_spec agree: the two cannot drift apart silently."""
    from kdtune.errors import ConfigError

    checked = 0
    for path, lo, lo_open, hi, hi_open, integer in _bounded(schema):
        eps = 1 if integer else 1e-6
        values = [v for v in (lo, lo - eps if lo is not None else None, hi, hi + eps if hi is not None else None)
                  if v is not None]  # fmt: skip
        values += [lo + eps] if lo_open else []  # just inside an open bound
        values += [hi - eps] if hi_open else []
        for v in values:
            raw = {"name": "s", "data": "digits", "students": ["resnet8"], "methods": ["ce"],
                   "budget": {"epochs": 10_000}}  # fmt: skip
            section, _, field = path.rpartition(".")
            (raw.setdefault(section, {}) if section else raw)[field] = v
            if path == "val_fraction":
                raw["metric"] = "train_loss"  # val_fraction: 0 is fine without a validation metric
            if path == "budget.epochs" or path.startswith("scheduler."):
                raw["scheduler"] = {"name": "none"} if path == "budget.epochs" else raw.get("scheduler")
            try:
                jsonschema.validate(raw, schema)
                schema_ok = True
            except jsonschema.ValidationError:
                schema_ok = False
            try:
                spec_mod.load_spec(raw)
                spec_ok = True
            except ConfigError:
                spec_ok = False
            assert schema_ok == spec_ok, f"{path}={v}: schema {'accepts' if schema_ok else 'refuses'}, load_spec " \
                f"{'accepts' if spec_ok else 'refuses'}"
            checked += 1
    assert checked >= 30


@pytest.mark.parametrize(
    "bad, line",
    [
        ({"download": "yes"}, "download='yes' must be true or false"),
        ({"seed": "3"}, "seed='3' must be an integer"),  # strict: a string is not a number
        ({"seed": True}, "seed=True must be an integer"),
        ({"budget": {"trials": 2.5}}, "budget.trials=2.5 must be an integer"),
        ({"budget": {"cpus_per_trial": float("inf")}}, "budget.cpus_per_trial=inf must be a number"),
        ({"budget": {"cpus_per_trial": 0}}, "budget.cpus_per_trial=0 is out of range; it must be in (0, 1024]"),
        ({"val_fraction": 1.0}, "val_fraction=1 is out of range; it must be in [0, 1)"),
        ({"budget": {"epochs": 4}, "scheduler": {"grace_period": 5}},
         "scheduler.grace_period=5 is out of range; it must be in [1, 4]"),  # the model's bound, tightened
        ({"methods": {"ce": {"trials": 0}}}, "methods.ce.trials=0 is out of range; it must be in [1, 100000]"),
        ({"tracking": {"enabled": 1}}, "tracking.enabled=1 must be true or false"),
        ({"metric": 3}, "metric=3 must be a string"),
    ],
)
def test_scalar_fields_are_checked_by_the_pydantic_model_in_one_line(bad, line):
    from kdtune.errors import ConfigError

    raw = {"name": "s", "data": "digits", "students": ["resnet8"], "methods": ["ce"], **bad}
    with pytest.raises(ConfigError) as e:
        spec_mod.load_spec(raw)
    assert str(e.value) == line


# ---------------------------------------------------------------------------------------------- one declaration
# kdtune.spec_model declares each field of the spec once (default, bounds, description); the loader and the
# JSON Schema read it from there. These fail as soon as a default or a bound is written a second time.

# What a loaded spec holds that is no declared default: required fields, the teacher given below, a storage made
# absolute, the metric's mode, the scheduler's grace period computed from the epochs, and the file read.
NOT_DEFAULTS = {"name", "students", "methods", "teacher", "storage", "mode", "scheduler", "source",
                "scheduler.grace_period"}  # fmt: skip


@pytest.mark.parametrize("sections", ["absent", "empty"])
def test_left_out_fields_get_their_one_declared_default(schema, sections):
    """A spec that sets nothing optional (no sections, or empty ones) loads to the declared defaults, and the
    schema shows those defaults."""
    from kdtune.spec_model import fields_of

    raw = {"name": "s", "students": ["resnet8"], "methods": {"ce": None, "kd": {}}, "teacher": {"model": "resnet8x4"}}
    if sections == "empty":
        raw.update({k: {} for k in ("budget", "scheduler", "tracking", "failures", "train", "ce_student")})
    spec = spec_mod.load_spec(raw)
    defs = schema["$defs"]
    parts = [
        ("", spec_mod.SweepSpec, spec, schema["properties"]),
        ("budget.", spec_mod.Budget, spec.budget, defs["Budget"]["properties"]),
        ("scheduler.", spec_mod.SchedulerSpec, spec.scheduler, defs["Scheduler"]["properties"]),
        ("tracking.", spec_mod.TrackingSpec, spec.tracking, defs["Tracking"]["properties"]),
        ("failures.", spec_mod.FailureSpec, spec.failures, defs["Failures"]["properties"]),
        ("teacher.", spec_mod.TeacherSpec, spec.teacher, defs["Teacher"]["properties"]),
        ("methods.kd.", spec_mod.MethodSpec, spec.method("kd"), defs["MethodOptions"]["properties"]),
    ]
    checked = shown = 0
    for prefix, cls, obj, props in parts:
        for key, info in fields_of(cls).items():
            if info.is_required() or f"{prefix}{key}" in NOT_DEFAULTS or (prefix and key == "model"):
                continue
            declared = info.get_default(call_default_factory=True)
            assert getattr(obj, key) == declared, (
                f"{prefix}{key}: load_spec filled in {getattr(obj, key)!r}, the declaration says {declared!r}"
            )
            checked += 1
            if "default" in props.get(key, {}) and not dataclasses.is_dataclass(declared):  # what an editor shows
                assert props[key]["default"] == declared, f"{prefix}{key}: the schema shows another default"
                shown += 1
    assert checked >= 25 and shown >= 20
    trials = defs["Budget"]["properties"]["trials"]
    assert (trials["default"], trials["minimum"], trials["maximum"]) == (8, 1, spec_mod.MAX_TRIALS)
    assert spec.scheduler.grace_period == spec_mod.default_grace_period(spec.budget.epochs)
    assert spec.storage == str(Path(spec_mod.default_of(spec_mod.SweepSpec, "storage")).absolute())


def _declared_numbers() -> set:
    """Every numeric default and bound the spec's fields declare, but 0 and 1 (indices and counts)."""
    from kdtune.spec_model import SECTIONS, fields_of
    from kdtune.spec_schema import bounds

    out = set()
    for cls in (*SECTIONS.values(), spec_mod.Override):
        for info in fields_of(cls).values():
            for v in (info.get_default(call_default_factory=True), *bounds(info).values()):
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.add(v)
    return out - {0, 1}


def _restated_defaults(source: str) -> list[str]:
    """Where ``source`` restates a default or bound: ``raw.get("<field>", <literal>)`` (the declared default
    written again) and numeric literals equal to a declared default or bound (``8``, ``30``, ``0.1``, ``64``...)."""
    import ast

    from kdtune.spec_model import SECTIONS, fields_of

    names = {k for cls in (*SECTIONS.values(), spec_mod.Override) for k in fields_of(cls)}
    numbers = _declared_numbers()
    found = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("get", "setdefault", "pop") and len(node.args) == 2
                and all(isinstance(a, ast.Constant) for a in node.args) and node.args[0].value in names
                and node.args[1].value is not None):  # fmt: skip
            found.append((node.lineno, f".{node.func.attr}({node.args[0].value!r}, {node.args[1].value!r})"))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in numbers:
            found.append((node.lineno, repr(node.value)))
    return [f"line {n}: {what}" for n, what in sorted(found)]


def test_no_default_or_bound_is_written_outside_the_declaration():
    # the check finds what the hand-written parser held before (each default a third time)
    old = 'trials = _int(raw, "trials", 8)\nname = raw.get("name", "asha")\nif not 1 <= v <= 64: pass\n'
    assert _restated_defaults(old) == ["line 1: 8", "line 2: .get('name', 'asha')", "line 3: 64"]
    assert {8, 30, 0.1, 2.0, spec_mod.MAX_TRIALS, spec_mod.MAX_EPOCHS, spec_mod.MAX_FUSE} <= _declared_numbers()
    root = Path(spec_mod.__file__).parent
    for module in ("spec.py", "spec_schema.py"):  # the loader and the checks; spec_model.py is the declaration
        assert _restated_defaults((root / module).read_text()) == [], module


def test_the_declaration_the_schema_and_the_loader_import_in_one_direction():
    """kdtune.spec (the loader) -> kdtune.spec_schema (JSON Schema, checks) -> kdtune.spec_model (declaration)."""
    import ast

    root = Path(spec_mod.__file__).parent

    def imports(module: str) -> set[str]:
        tree = ast.parse((root / module).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}  # fmt: skip

    assert not {"kdtune.spec", "kdtune.spec_schema"} & imports("spec_model.py")
    assert "kdtune.spec" not in imports("spec_schema.py")
    assert {"kdtune.spec_model", "kdtune.spec_schema"} <= imports("spec.py")
