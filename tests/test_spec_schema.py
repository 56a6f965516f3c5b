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
