"""Search spaces: one small Python file per method, found on a lookup path, run define-by-run by Optuna.

A space file ``search_spaces/<method>.py`` defines

- ``space(trial, ctx) -> dict | None``: Optuna define-by-run code (``trial.suggest_float(...)``...);
  the returned dict holds constants that go into the trial's config too;
- the published starting points, enqueued as a sweep's first trials: either ``starts(ctx) -> list[dict]``
  or the tables ``PUBLISHED = {(data, teacher, student): [point, ...]}`` and ``DEFAULT = [point, ...]``
  (used for pairs without a published entry).

``ctx`` is a :class:`SpaceContext` (method, data, teacher and student architectures, epochs, classes, and the
CE-trained student's train error ``ce_error`` for DiSK's budget). The keys of a point are hyperparameters of
the method (or TrainConfig fields such as ``lr``).

Lookup path (first hit wins): the directories in ``$KDTUNE_SPACES`` (``os.pathsep``-separated: your own
spaces), then ``search_spaces/`` beside the ``kdtune`` package (a source checkout or editable install), then
``<prefix>/share/kdtune/search_spaces`` (a wheel install: the files are shipped as data files; the prefix
kdtune's own site-packages lies in, then the interpreter's). A sweep copies
the source of the spaces it uses into its experiment directory and runs that copy ever after, so resuming
never picks up an edited file.

A spec narrows or widens a space without editing these files (``methods.<name>.space``): each override
replaces the matching ``suggest_*`` call (a fixed value, a list of choices, or a ``{low, high, log}`` range);
an override for a parameter the file does not suggest adds it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError, did_you_mean
from kdtune.spec import Override

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


# ---------------------------------------------------------------------------------------------- trials


class _OverrideTrial:
    """Wraps an Optuna trial: ``suggest_*`` calls of overridden names follow the spec instead of the file."""

    def __init__(self, trial: Any, overrides: dict[str, Override]):
        self._trial = trial
        self._overrides = overrides
        self.fixed: dict[str, Any] = {}
        self.seen: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._trial.suggest_float(name, low, high, step=step, log=log)
        return self.apply(name, o)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._trial.suggest_int(name, low, high, step=step, log=log)
        return self.apply(name, o)

    def suggest_categorical(self, name: str, choices):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._trial.suggest_categorical(name, list(choices))
        return self.apply(name, o)

    def apply(self, name: str, o: Override) -> Any:
        if o.kind == "fixed":
            self.fixed[name] = o.value
            return o.value
        if o.kind == "choices":
            return self._trial.suggest_categorical(name, list(o.choices))
        if o.integer:
            return self._trial.suggest_int(name, int(o.low), int(o.high), step=int(o.step or 1), log=o.log)
        return self._trial.suggest_float(name, float(o.low), float(o.high), step=o.step, log=o.log)


class SpaceFn:
    """The define-by-run function handed to the sweep's searcher (``GroupedOptunaSearch``): the space file's ``space(trial, ctx)`` with the
    spec's overrides applied. Picklable (it carries the file's source, not the module), as Ray requires."""

    def __init__(self, method: str, source: str, filename: str, ctx: SpaceContext,
                 overrides: dict[str, Override] | None = None):  # fmt: skip
        self.method = method
        self.source = source
        self.filename = filename
        self.ctx = ctx
        self.overrides = dict(overrides or {})
        self.module  # noqa: B018 - load now so a broken file fails before Ray starts

    @property
    def module(self) -> types.ModuleType:
        return module_from_source(self.source, self.filename, self.method)

    def __call__(self, trial: Any) -> dict | None:
        t = _OverrideTrial(trial, self.overrides)
        ret = self.module.space(t, self.ctx)
        if ret is not None and not isinstance(ret, dict):
            raise TypeError(
                f"{self.filename}: space() must return a dict of constants or None, not {type(ret)}"
            )
        for name, o in self.overrides.items():
            if name not in t.seen:
                t.apply(name, o)
        out = dict(ret or {})
        out.update(t.fixed)
        return out

    # --------------------------------------------------------------- introspection without a study
    def record(self, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict]:
        """Run the space on a recording trial that answers from ``params`` (else the first choice / low end).

        Returns ``(config, distributions, out_of_range)``: the trial's config as the searcher would make it
        (suggested values and returned constants), the Optuna distribution of every suggested name, and the
        names whose given value lies outside its distribution.
        """
        rec = _RecordingTrial(params or {})
        consts = self(rec)
        config = {**rec.values, **(consts or {})}
        return config, rec.distributions, rec.outside

    def parameters(self) -> dict[str, Any]:
        """The distributions of the space as its default path sees them (for ``kdtune spaces``)."""
        return self.record()[1]

    def starts(self) -> list[dict[str, Any]]:
        """The published starting points for this context, as the file gives them (before any filtering)."""
        mod = self.module
        if callable(getattr(mod, "starts", None)):
            pts = mod.starts(self.ctx)
        else:
            published = getattr(mod, "PUBLISHED", {}) or {}
            pts = published.get(self.ctx.pair) or getattr(mod, "DEFAULT", []) or []
        return [dict(p) for p in (pts or [])]

    def valid_starts(self, points: list[dict] | None = None) -> tuple[list[dict], list[str]]:
        """Starting points that fit the (overridden) space, with fixed overrides applied; and notes on the
        points dropped or trimmed. Duplicates are removed."""
        points = self.starts() if points is None else [dict(p) for p in points]
        kept: list[dict] = []
        notes: list[str] = []
        for p in points:
            for name, o in self.overrides.items():
                if o.kind == "fixed":
                    p.pop(name, None)
            config, dists, outside = self.record(p)
            if outside:
                notes.append(f"starting point {p} left out: {', '.join(outside)} outside the space")
                continue
            unknown = [k for k in p if k not in dists]
            for k in unknown:
                p.pop(k)
            if unknown:
                notes.append(f"starting point keys {unknown} are not searched here; ignored")
            point = {k: v for k, v in p.items() if k in dists}
            if point and point not in kept:
                kept.append(point)
        return kept, notes

    def describe(self) -> list[str]:
        """Human-readable lines: one per parameter with its distribution."""
        lines = []
        config, dists, _ = self.record()
        for p in self.starts():  # conditional parameters show up on the paths the starting points take
            try:
                _, more, _ = self.record(p)
            except Exception:  # noqa: BLE001 - a bad point is reported by valid_starts, not here
                continue
            for k, d in more.items():
                dists.setdefault(k, d)
        for name, d in dists.items():
            src = " (spec)" if name in self.overrides else ""
            lines.append(f"{name:<16} {describe_distribution(d)}{src}")
        for name, v in config.items():
            if name not in dists:
                src = " (spec)" if name in self.overrides else ""
                lines.append(f"{name:<16} fixed {v!r}{src}")
        return lines

    def __getstate__(self):
        return {k: self.__dict__[k] for k in ("method", "source", "filename", "ctx", "overrides")}

    def __setstate__(self, state):
        self.__dict__.update(state)


class _RecordingTrial:
    """A stand-in for an Optuna trial: records distributions, answers from given values or a default."""

    def __init__(self, params: dict[str, Any]):
        self.params_in = params
        self.values: dict[str, Any] = {}
        self.distributions: dict[str, Any] = {}
        self.outside: list[str] = []
        self.number = 0
        self.user_attrs: dict[str, Any] = {}

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.values)

    def _answer(self, name: str, dist, default):
        self.distributions[name] = dist
        if name in self.params_in:
            v = self.params_in[name]
            try:
                ok = dist._contains(dist.to_internal_repr(v))
            except (ValueError, TypeError):
                ok = False
            if not ok:
                self.outside.append(f"{name}={v!r}")
        else:
            v = default
        self.values[name] = v
        return v

    def suggest_float(self, name, low, high, *, step=None, log=False):
        from optuna.distributions import FloatDistribution

        return self._answer(name, FloatDistribution(low, high, step=step, log=log), low)

    def suggest_int(self, name, low, high, *, step=1, log=False):
        from optuna.distributions import IntDistribution

        return self._answer(name, IntDistribution(low, high, step=step, log=log), low)

    def suggest_categorical(self, name, choices):
        from optuna.distributions import CategoricalDistribution

        choices = list(choices)
        return self._answer(name, CategoricalDistribution(choices), choices[0])

    def set_user_attr(self, key, value):
        self.user_attrs[key] = value


def describe_distribution(d) -> str:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(d, CategoricalDistribution):
        return "choice {" + ", ".join(map(_fmt, d.choices)) + "}"
    if isinstance(d, (FloatDistribution, IntDistribution)):
        kind = "int" if isinstance(d, IntDistribution) else "float"
        scale = " log" if d.log else ""
        step = f" step {_fmt(d.step)}" if d.step not in (None, 1) or (kind == "float" and d.step) else ""
        return f"{kind}{scale} [{_fmt(d.low)}, {_fmt(d.high)}]{step}"
    return repr(d)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ---------------------------------------------------------------------------------------------- building


def build_space(method: str, ctx: SpaceContext, overrides: dict[str, Override] | None = None,
                source: tuple[str, str] | None = None) -> SpaceFn:  # fmt: skip
    """The SpaceFn of ``method`` for ``ctx``; ``source`` = ``(filename, text)`` (default: the lookup path).

    Runs the space once on a recording trial, so a file that errors, an override that names nothing the
    method can use, or a space that suggests an unknown hyperparameter fails here, before Ray starts.
    """
    from kdtune.config import TrainConfig
    from kdtune.losses import METHODS

    filename, text = source if source is not None else load_source(method)
    fn = SpaceFn(method, text, filename, ctx, overrides)
    try:
        config, dists, _ = fn.record()
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConfigError(
            f"search space {filename} fails for {ctx.pair}: {type(e).__name__}: {e}; fix it"
        ) from None
    hps = METHODS.get(method).hparams
    fields = set(TrainConfig.fields())
    for name in config:
        if name not in hps and name not in fields:
            raise ConfigError(
                f"search space {filename} sets {name!r}{did_you_mean(name, sorted(hps))}, which is neither a "
                f"hyperparameter of {method} nor a training field; fix the file"
            )
    for name, d in dists.items():
        if name in hps:
            _check_within(filename, method, name, d, hps[name])
    return fn


def _check_within(filename: str, method: str, name: str, dist, hp) -> None:
    """A distribution's ends must be valid values of the hyperparameter (e.g. no T <= 0)."""
    from optuna.distributions import CategoricalDistribution

    values = list(dist.choices) if isinstance(dist, CategoricalDistribution) else [dist.low, dist.high]
    for v in values:
        if isinstance(v, float) and math.isinf(v):
            continue
        try:
            hp.check(name, v, method)
        except ConfigError as e:
            raise ConfigError(f"search space {filename}: {e}") from None


def space_sources(methods: list[str]) -> dict[str, tuple[str, str]]:
    """method -> (filename, source) from the lookup path."""
    return {m: load_source(m) for m in methods}
