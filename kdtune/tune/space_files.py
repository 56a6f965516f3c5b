"""Finding and loading search-space files: ``SpaceContext`` (what a space is built for), the lookup path
(``$KDTUNE_SPACES``, ``search_spaces/`` beside the package, ``<prefix>/share/kdtune/search_spaces``; first hit
wins), and executing a file's source into a module.

Invariants: a source is executed at most once per process (cached by its hash), and a file that fails to load
or defines no ``space(trial, ctx)`` raises ConfigError. Nothing here imports Optuna. Read more: docs/spaces.md.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import types
from dataclasses import dataclass, field
from pathlib import Path

from kdtune.errors import ConfigError

_MODULES: dict[str, types.ModuleType] = {}  # source hash -> executed module (per process)


@dataclass(frozen=True)
class SpaceContext:
    method: str
    data: str
    student: str
    teacher: str | None = None
    epochs: int = 30
    num_classes: int | None = None
    ce_error: float | None = None  # train error of the CE-trained student (DiSK's budget anchor)
    extra: dict = field(default_factory=dict)

    @property
    def pair(self) -> tuple[str, str | None, str]:
        return (self.data, self.teacher, self.student)


# ---------------------------------------------------------------------------------------------- lookup


def search_path() -> list[Path]:
    """Directories searched for ``<method>.py``, in order."""
    dirs = [Path(p).expanduser() for p in os.environ.get("KDTUNE_SPACES", "").split(os.pathsep) if p]
    pkg = Path(__file__).resolve().parents[1]  # .../kdtune
    dirs.append(pkg.parent / "search_spaces")
    share = Path("share") / "kdtune" / "search_spaces"
    # the prefix this kdtune was installed into (.../lib/pythonX.Y/site-packages/kdtune: --prefix, --user)
    if len(pkg.parents) > 3 and pkg.parent.name == "site-packages":
        dirs.append(pkg.parents[3] / share)
    dirs.append(Path(sysconfig.get_path("data")) / share)
    dirs.append(Path(sys.prefix) / share)
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_space_file(method: str) -> Path:
    for d in search_path():
        f = d / f"{method}.py"
        if f.is_file():
            return f
    raise ConfigError(
        f"no search space for method {method!r}: {method}.py is in none of "
        f"{', '.join(str(d) for d in search_path())}; add one there or point KDTUNE_SPACES at its folder"
    )


def available_spaces() -> list[str]:
    names = set()
    for d in search_path():
        if d.is_dir():
            names.update(f.stem for f in d.glob("*.py") if not f.name.startswith("_"))
    return sorted(names)


def load_source(method: str) -> tuple[str, str]:
    """``(filename, source)`` of the method's space file."""
    f = find_space_file(method)
    return str(f), f.read_text()


def module_from_source(source: str, filename: str, method: str) -> types.ModuleType:
    key = hashlib.sha256(source.encode()).hexdigest()
    mod = _MODULES.get(key)
    if mod is None:
        mod = types.ModuleType(f"kdtune_space_{method}")
        mod.__file__ = filename
        try:
            exec(compile(source, filename, "exec"), mod.__dict__)  # noqa: S102 - the user's own space file
        except Exception as e:  # noqa: BLE001
            raise ConfigError(
                f"search space {filename} fails to load: {type(e).__name__}: {e}; fix the file"
            ) from None
        if not callable(getattr(mod, "space", None)):
            raise ConfigError(f"search space {filename} defines no space(trial, ctx) function; add one")
        _MODULES[key] = mod
    return mod


def space_sources(methods: list[str]) -> dict[str, tuple[str, str]]:
    """method -> (filename, source) from the lookup path."""
    return {m: load_source(m) for m in methods}
