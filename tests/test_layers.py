"""The package's layers hold: read from the source (every import, function-local ones included), not from
what happens to be imported at run time.

ground < domain < config < engine and spec < tracking < tune < faces (the README's "Layout" draws them). A
module imports only its own layer and those below; the engine imports no Ray, MLflow or Optuna; no import
cycle; no module imports another module's ``_private`` name. And the Ray private functions kdtune uses (one
adapter, :mod:`kdtune.tune.rayrt`) still exist in the installed Ray.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kdtune"
LAYERS = [
    # kdtune.tracking.uri parses and checks a URI string (no MLflow): the spec reads it, so it lies at the ground
    ("ground", ("kdtune.errors", "kdtune.tables", "kdtune.registry", "kdtune.storage", "kdtune.version",
                "kdtune.tracking.uri")),
    ("domain", ("kdtune.data", "kdtune.models", "kdtune.losses", "kdtune.names")),
    ("config", ("kdtune.config", "kdtune.trial_config")),
    ("engine and spec", ("kdtune.engine", "kdtune.spec", "kdtune.spec_schema", "kdtune.spec_model")),
    ("tracking", ("kdtune.tracking",)),
    ("tune", ("kdtune.tune", "kdtune.preflight")),
    ("faces", ("kdtune.tune.cli", "kdtune.cli", "kdtune.__main__", "kdtune.report", "kdtune.dashboard",
               "kdtune.bench", "kdtune.reproduce", "kdtune")),
]  # fmt: skip
HEAVY = ("ray", "mlflow", "optuna")


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


MODULES = modules()


def layer_of(mod: str) -> int:
    """The most specific prefix wins (``kdtune.tune.cli`` is a face, ``kdtune.tune.plan`` tune)."""
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for pre in prefixes:
            if (mod == pre or mod.startswith(pre + ".")) and pre.count(".") > depth:
                best, depth = i, pre.count(".")
    assert best is not None, f"{mod} is in no layer: add it to tests/test_layers.py LAYERS"
    return best


def resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(mod: str) -> list[tuple[str, str | None, str]]:
    """(imported module, imported name or None, full dotted name) for every import in ``mod``'s source."""
    path = MODULES[mod]
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out += [(base, a.name, f"{base}.{a.name}") for a in node.names]
    return out


def edges() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for base, _name, full in imports(m):
            if not base.startswith("kdtune"):
                continue
            target = resolve(full) if full in MODULES else resolve(base)
            if target and target != m:
                g[m].add(target)
    return g


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
                  for m, targets in g.items() for t in targets if layer_of(t) > layer_of(m))  # fmt: skip


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer_and_imports_only_downwards():
    bad = upward(edges())
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    found = cycles(edges())
    assert not found, f"import cycles: {found}"


def test_the_checks_find_a_planted_violation():
    """The checks have teeth: an upward import and a cycle planted in a copy of the real graph are found."""
    g = {m: set(t) for m, t in edges().items()}
    g["kdtune.engine.trainer"].add("kdtune.tune.plan")
    g["kdtune.tune.plan"].add("kdtune.tune.driver")
    g["kdtune.tune.driver"].add("kdtune.tune.plan")
    assert any(v.startswith("kdtune.engine.trainer (engine and spec) imports kdtune.tune.plan") for v in upward(g))
    assert any({"kdtune.tune.driver", "kdtune.tune.plan"} <= set(c) for c in cycles(g))


def test_the_engine_and_the_ground_import_no_ray_mlflow_or_optuna():
    bad = [(m, base) for m in MODULES if layer_of(m) <= 3 for base, _, _ in imports(m)
           if base.split(".")[0] in HEAVY]  # fmt: skip
    assert not bad, bad


def test_no_module_imports_another_modules_private_name():
    bad = []
    for m in MODULES:
        for base, name, full in imports(m):
            if base.startswith("kdtune") and name and name.startswith("_") and not name.startswith("__"):
                if (resolve(full) if full in MODULES else resolve(base)) != m:
                    bad.append(f"{m} imports {name} from {base}")
    assert not bad, "\n".join(bad)


def test_tune_files_stay_small():
    big = {p.name: n for p in (ROOT / "tune").glob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not big, f"files of kdtune/tune over 450 lines: {big}"


@pytest.mark.parametrize("module,name", __import__("kdtune.tune.rayrt", fromlist=["RAY_PRIVATE"]).RAY_PRIVATE)
def test_the_ray_private_functions_kdtune_uses_still_exist(module, name):
    pytest.importorskip("ray")
    assert hasattr(importlib.import_module(module), name), (
        f"Ray no longer has {module}.{name}: adapt kdtune/tune/rayrt.py to this Ray release"
    )
