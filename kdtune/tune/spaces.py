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
an override for a parameter the file does not suggest adds it, and wins over a constant the file returns.

Constraints between parameters (DiSK's ``lambda_max > lambda_min``, its ``K`` at most the number of classes,
DKD's alpha and beta not both 0) are declared by the file, not repaired in ``space()``: ``CONSTRAINTS`` or
``constraints(ctx)``, a list of ``(a, op, b)`` (``op`` one of ``< <= > >=``, ``a``/``b`` a parameter or a
number, an optional fourth item saying what the number is) or ``(a, "or", b)`` (not both 0). The rule: **no
trial runs a value outside the space the user wrote** (the spec's override, else the file's), starting points
included, and every trial meets the constraints:

- before any trial, each constrained parameter's domain is narrowed to the values some value of the others can
  accompany, decided exactly from the bounds (an order between two ranges or choice sets, a bound, "not both
  0"); a constraint that leaves a domain empty is refused (ConfigError naming both fields and the fix: exit 2
  in ``kdtune validate`` and ``kdtune sweep``);
- in a trial, a range is asked within what the values decided before it allow; a choice set (Optuna keeps one
  per name) is asked whole and a draw that breaks a constraint is replaced by the nearest choice that meets it;
- what the bounds cannot decide (several constraints on a parameter, a check the method makes that the file
  does not declare) is checked by sampling configurations (:func:`check_by_sampling`);
- starting points outside the space, or breaking a constraint, are dropped (:meth:`SpaceFn.valid_starts`).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import sysconfig
import types
from dataclasses import dataclass, field, replace
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


# ---------------------------------------------------------------------------------------------- constraints
# A space file declares the constraints between its parameters (``CONSTRAINTS`` or ``constraints(ctx)``); kdtune
# keeps every trial inside the user's space and inside the constraints (see the module docstring).

_OPS = ("<", "<=", ">", ">=")


def _is_num(v: Any) -> bool:
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and not (isinstance(v, float) and math.isnan(v))
    )


def _same(a: Any, b: Any) -> bool:
    """``a == b``, without True standing for 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


@dataclass(frozen=True)
class _Dom:
    """The values one parameter may take: a finite ``set`` (a fixed value is a set of one), or a closed range
    (``float`` or ``int``; ``log``; on the grid ``anchor + k * step`` when ``step`` is given)."""

    kind: str  # "set" | "float" | "int"
    choices: tuple = ()
    low: float = 0.0
    high: float = 0.0
    step: float | None = None
    log: bool = False
    anchor: float = 0.0
    fixed: bool = False

    @classmethod
    def of(cls, dist) -> _Dom:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        if isinstance(dist, CategoricalDistribution):
            return cls("set", choices=tuple(dist.choices))
        if isinstance(dist, IntDistribution):
            return cls.int_range(dist.low, dist.high, dist.step, dist.log)
        return cls("float", low=dist.low, high=dist.high, step=dist.step, log=dist.log, anchor=dist.low)

    @classmethod
    def int_range(cls, low, high, step=1, log=False) -> _Dom:
        step = int(step or 1)
        return cls(
            "int", low=int(low), high=int(high), step=step if step != 1 else None, log=log, anchor=int(low)
        )

    @classmethod
    def value(cls, v: Any) -> _Dom:
        return cls("set", choices=(v,), fixed=True)

    def lo(self):
        if self.kind == "set":
            nums = [c for c in self.choices if _is_num(c)]
            return min(nums) if nums else None
        return self.low

    def hi(self):
        if self.kind == "set":
            nums = [c for c in self.choices if _is_num(c)]
            return max(nums) if nums else None
        return self.high

    def zero_only(self) -> bool:
        return self.kind == "set" and bool(self.choices) and all(_is_num(c) and c == 0 for c in self.choices)

    def contains(self, v: Any) -> bool:
        if self.kind == "set":
            return any(_same(v, c) for c in self.choices)
        return _is_num(v) and self.low <= v <= self.high

    def _grid(self, x: float, strict: bool, up: bool):
        """The first value of this range's kind at or beyond ``x`` (strictly beyond when ``strict``), going up
        or down."""
        if self.step is not None:
            k = math.floor((x - self.anchor) / self.step) + (-1 if up else 2)
            while True:
                g = self.anchor + k * self.step
                if (g > x or (g == x and not strict)) if up else (g < x or (g == x and not strict)):
                    return int(round(g)) if self.kind == "int" else g
                k += 1 if up else -1
        if self.kind == "int":
            if up:
                return math.floor(x) + 1 if strict else math.ceil(x)
            return math.ceil(x) - 1 if strict else math.floor(x)
        if not strict:
            return x
        return math.nextafter(x, math.inf if up else -math.inf)

    def restrict(self, lo=None, lo_strict=False, hi=None, hi_strict=False, nonzero=False) -> _Dom | None:
        """This domain within ``lo``/``hi`` (strict bounds exclude the bound itself) and, with ``nonzero``,
        without 0; None when nothing is left. (A range cannot lose a 0 inside it, only at an end.)"""
        if self.kind == "set":

            def ok(c):
                if lo is None and hi is None and not nonzero:
                    return True
                if not _is_num(c):
                    return False
                if lo is not None and (c <= lo if lo_strict else c < lo):
                    return False
                if hi is not None and (c >= hi if hi_strict else c > hi):
                    return False
                return not (nonzero and c == 0)

            keep = tuple(c for c in self.choices if ok(c))
            return replace(self, choices=keep) if keep else None
        low, high = self.low, self.high
        if lo is not None:
            low = max(low, self._grid(lo, lo_strict, up=True))
        if hi is not None:
            high = min(high, self._grid(hi, hi_strict, up=False))
        if nonzero and low == 0:
            low = self._grid(0, True, up=True)
        if nonzero and high == 0:
            high = self._grid(0, True, up=False)
        if low > high:
            return None
        return replace(self, low=low, high=high)

    def within(self, other: _Dom) -> _Dom:
        """This domain cut to ``other`` (the static narrowing computed for the same call); itself when the two
        do not fit together (a file whose range moves between trials)."""
        if self.kind == "set":
            keep = tuple(c for c in self.choices if other.contains(c))
            return replace(self, choices=keep) if keep else self
        if other.kind != self.kind:
            return self
        low, high = max(self.low, other.low), min(self.high, other.high)
        return replace(self, low=low, high=high) if low <= high else self

    def suggest(self, trial: Any, name: str) -> Any:
        if self.kind == "set":
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log
            )
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def body(self) -> str:
        if self.fixed:
            return _fmt(self.choices[0])
        if self.kind == "set":
            return "{" + ", ".join(map(_fmt, self.choices)) + "}"
        return f"[{_fmt(self.low)}, {_fmt(self.high)}]"

    def text(self) -> str:
        return f"= {self.body()}" if self.fixed else f"in {self.body()}"


@dataclass(frozen=True)
class _Constraint:
    """``left < right`` (``strict``) or ``left <= right`` ("order"; either side a parameter or a number), or "not
    all of ``names`` are 0" ("any"). ``text`` is the constraint as the space file writes it."""

    kind: str
    names: tuple
    left: Any = None
    right: Any = None
    strict: bool = True
    what: str = ""  # what a number stands for ("the number of classes")
    text: str = ""

    def value(self, side: Any, known) -> tuple[bool, Any]:
        return known(side) if isinstance(side, str) else (True, side)

    def holds(self, known) -> bool:
        """Whether the constraint holds for the values ``known(name) -> (known?, value)`` gives (True when a
        value is unknown)."""
        if self.kind == "any":
            vals = [known(n) for n in self.names]
            return not all(k for k, _ in vals) or any(v != 0 for _, v in vals)
        (kl, lv), (kr, rv) = self.value(self.left, known), self.value(self.right, known)
        if not (kl and kr):
            return True
        try:
            return lv < rv if self.strict else lv <= rv
        except TypeError:
            return False

    def condition(self, name: str, known) -> dict | None:
        """How ``name``'s domain narrows given the other parameters' values (None: not yet known)."""
        if self.kind == "any":
            others = [known(n) for n in self.names if n != name]
            if all(k for k, _ in others) and all(_is_num(v) and v == 0 for _, v in others):
                return {"nonzero": True}
            return None
        if name == self.left:
            k, v = self.value(self.right, known)
            return {"hi": v, "hi_strict": self.strict} if k and _is_num(v) else None
        k, v = self.value(self.left, known)
        return {"lo": v, "lo_strict": self.strict} if k and _is_num(v) else None

    def prune(self, doms: dict[str, _Dom]) -> dict[str, _Dom] | None:
        """The domains of its parameters with every value removed that no value of the others satisfies (the
        exact projection for one constraint, decided from the bounds); None when one becomes empty."""
        if self.kind == "any":
            ds = [doms[n] for n in self.names]
            if all(d.zero_only() for d in ds):
                return None
            out = {}
            for i, n in enumerate(self.names):
                if all(d.zero_only() for j, d in enumerate(ds) if j != i):
                    out[n] = ds[i].restrict(nonzero=True)
                    if out[n] is None:
                        return None
            return out
        left = doms[self.left] if isinstance(self.left, str) else _Dom.value(self.left)
        right = doms[self.right] if isinstance(self.right, str) else _Dom.value(self.right)
        if right.hi() is None or left.lo() is None:
            return {}  # not numbers: the sampled check decides
        new_left = left.restrict(hi=right.hi(), hi_strict=self.strict)
        if new_left is None:
            return None
        new_right = right.restrict(lo=new_left.lo(), lo_strict=self.strict)
        if new_right is None:
            return None
        out = {}
        if isinstance(self.left, str):
            out[self.left] = new_left
        if isinstance(self.right, str):
            out[self.right] = new_right
        return out


def read_constraints(module: types.ModuleType, ctx: SpaceContext, filename: str) -> list[_Constraint]:
    """The constraints a space file declares: ``constraints(ctx)`` or ``CONSTRAINTS``, a list of
    ``(a, op, b)`` or ``(a, op, b, what)`` with ``op`` one of ``<  <=  >  >=`` (``a``/``b`` a parameter name or
    a number; ``what`` says what a number is) or ``or`` (``(a, "or", b)``: not both 0). A number given as None
    (e.g. an unknown class count) drops the constraint."""
    fn = getattr(module, "constraints", None)
    try:
        raw = fn(ctx) if callable(fn) else getattr(module, "CONSTRAINTS", ())
    except Exception as e:  # noqa: BLE001 - the user's own space file
        raise ConfigError(
            f"search space {filename}: constraints(ctx) fails: {type(e).__name__}: {e}; fix it"
        ) from None
    out = []
    for c in raw or ():
        if not isinstance(c, (tuple, list)) or len(c) not in (3, 4) or c[1] not in (*_OPS, "or"):
            raise ConfigError(
                f"search space {filename}: constraint {c!r} is not (a, op, b) with op one of <, <=, >, >=, or; fix it"
            )
        a, op, b = c[:3]
        what = str(c[3]) if len(c) == 4 else ""
        text = f"{a} {op} {b}"
        if op == "or":
            if not (isinstance(a, str) and isinstance(b, str)):
                raise ConfigError(
                    f"search space {filename}: constraint {c!r}: 'or' joins two parameter names"
                )
            out.append(_Constraint("any", (a, b), text=f"{a} and {b} not both 0"))
            continue
        if a is None or b is None:
            continue
        if not any(isinstance(s, str) for s in (a, b)) or any(
            not isinstance(s, str) and not _is_num(s) for s in (a, b)
        ):
            raise ConfigError(f"search space {filename}: constraint {c!r} must compare a parameter name with a "
                              "parameter name or a number")  # fmt: skip
        left, right = (a, b) if op in ("<", "<=") else (b, a)
        names = tuple(s for s in (left, right) if isinstance(s, str))
        out.append(_Constraint("order", names, left, right, strict=op in ("<", ">"), what=what, text=text))
    return out


@dataclass
class _Plan:
    """The constraints of a space and what they leave of each parameter they name, decided before any trial:
    ``raw`` the domains as written (the spec's override, else the file's), ``doms`` the same with every value
    removed that no value of the other parameters can accompany, ``static`` the values of the named parameters
    that are not searched (a constant, or the method's default), ``origin`` where each domain was written."""

    constraints: list
    raw: dict = field(default_factory=dict)
    doms: dict = field(default_factory=dict)
    static: dict = field(default_factory=dict)
    origin: dict = field(default_factory=dict)

    def on(self, name: str) -> list:
        return [c for c in self.constraints if name in c.names]


def _make_plan(fn: SpaceFn) -> _Plan:
    """Read the file's constraints, the domains of the parameters they name (on the space's default path, with
    the spec's overrides), and narrow the domains until each constraint can be met from every value left:
    exact for each constraint alone, from the bounds (an order between two ranges or sets, a bound, "not both
    0"). A constraint no value can meet raises ConfigError naming both fields. Constraints between several
    parameters at once are checked again by sampling in :func:`build_space`."""
    from kdtune.losses import METHODS

    cons = read_constraints(fn.module, fn.ctx, fn.filename)
    if not cons:
        return _Plan([])
    rec = _RecordingTrial({})
    t = _OverrideTrial(rec, fn.overrides, None)
    ret = fn.module.space(t, fn.ctx)
    for name, o in fn.overrides.items():
        if name not in t.seen:
            t.apply(name, o)
    ret = ret if isinstance(ret, dict) else {}
    hps = METHODS.get(fn.method).hparams
    plan = _Plan(cons)
    unknown = set()
    for name in dict.fromkeys(n for c in cons for n in c.names):
        o = fn.overrides.get(name)
        if o is not None:
            plan.origin[name] = f"methods.{fn.method}.space.{name}"
        else:
            plan.origin[name] = Path(fn.filename).name
        if o is not None and o.kind == "fixed":
            plan.raw[name] = _Dom.value(o.value)
        elif name in rec.distributions:
            plan.raw[name] = _Dom.of(rec.distributions[name])
        elif name in ret:
            plan.raw[name] = _Dom.value(ret[name])
            plan.static[name] = ret[name]
        elif name in hps and hps[name].default is not None:
            plan.raw[name] = _Dom.value(hps[name].default)
            plan.static[name] = hps[name].default
            plan.origin[name] = f"{fn.method}'s default"
        elif name in hps:
            unknown.add(name)
        else:
            raise ConfigError(
                f"search space {fn.filename}: a constraint names {name!r}{did_you_mean(name, sorted(hps))}, "
                f"which is neither searched nor a hyperparameter of {fn.method}; fix the file"
            )
    plan.constraints = [c for c in cons if not unknown & set(c.names)]
    plan.doms = dict(plan.raw)
    for _ in range(100):
        changed = False
        for c in plan.constraints:
            new = c.prune(plan.doms)
            if new is None:
                raise ConfigError(_empty_message(fn, c, plan))
            for name, d in new.items():
                if d != plan.doms[name]:
                    plan.doms[name] = d
                    changed = True
        if not changed:
            break
    return plan


def _empty_message(fn: SpaceFn, c: _Constraint, plan: _Plan) -> str:
    """One line: which constraint no configuration of the space meets, naming each field, and the fix."""
    m = fn.method
    head = f"methods.{m} ({fn.ctx.student} on {fn.ctx.data}): "

    def field_(n):
        return f"{n} {plan.doms[n].text()} ({plan.origin[n]})"

    if c.kind == "any":
        names = " and ".join(f"{m}.{n}" for n in c.names)
        parts = ", ".join(field_(n) for n in c.names)
        return (f"{head}{names} are {'both' if len(c.names) == 2 else 'all'} 0 in every configuration of the space ({parts}), "
                f"so {m} adds nothing; let one of them be > 0")  # fmt: skip
    if len(c.names) == 2:
        lo, hi = plan.doms[c.left].lo(), plan.doms[c.right].hi()
        verb = "exceeds" if c.strict else "reaches"
        below, above = ("below", "above") if c.strict else ("to at most", "to at least")
        return (f"{head}no {field_(c.right)} {verb} {field_(c.left)}, and {m} needs {c.text}; lower {c.left} "
                f"{below} {_fmt(hi)} or raise {c.right} {above} {_fmt(lo)}")  # fmt: skip
    name = c.names[0]
    bound = c.right if name == c.left else c.left
    what = f"{c.what} ({_fmt(bound)})" if c.what else _fmt(bound)
    if name == c.left:
        verb, need = ("is not below", "<") if c.strict else ("exceeds", "<=")
    else:
        verb, need = ("is not above", ">") if c.strict else ("is below", ">=")
    d = plan.doms[name]
    subject = (
        f"{m}.{name}={_fmt(d.choices[0])}"
        if d.fixed
        else f"every {m}.{name} {d.text()} ({plan.origin[name]})"
    )
    return f"{head}{subject} {verb} {what}; set {name} {need} {_fmt(bound)}"


# ---------------------------------------------------------------------------------------------- trials


class _OverrideTrial:
    """Wraps an Optuna trial: ``suggest_*`` calls of overridden names follow the spec instead of the file, and
    every parameter a constraint names is asked within what the constraints leave of it (``plan``).

    A range is asked with the bounds the values decided before it allow (Optuna lets a range move between
    trials); a set of choices must stay the same in every trial, so it is asked whole (less the values no
    configuration can use) and a draw that breaks a constraint is replaced by the nearest choice that meets it
    (``projected``: the trial trains with it; Optuna's own record keeps the draw)."""

    def __init__(self, trial: Any, overrides: dict[str, Override], plan: _Plan | None = None):
        self._trial = trial
        self._overrides = overrides
        self._plan = plan
        self.fixed: dict[str, Any] = {}
        self.seen: set[str] = set()
        self.values: dict[str, Any] = {}  # name -> the value this trial runs
        self.asked: dict[str, _Dom] = {}  # name -> the domain asked of the trial
        self.projected: dict[str, Any] = {}  # name -> the choice that replaced a draw
        self.why: dict[str, str] = {}  # name -> the constraint that made the projection
        self.dropped: dict[str, Any] = {}  # name -> a constant of the file's outside what it asked

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trial, name)

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._ask(name, _Dom("float", low=low, high=high, step=step, log=log, anchor=low))
        return self.apply(name, o)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._ask(name, _Dom.int_range(low, high, step, log))
        return self.apply(name, o)

    def suggest_categorical(self, name: str, choices):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._ask(name, _Dom("set", choices=tuple(choices)))
        return self.apply(name, o)

    def apply(self, name: str, o: Override) -> Any:
        if o.kind == "fixed":
            self.fixed[name] = o.value
            self.values[name] = o.value
            return o.value
        if o.kind == "choices":
            return self._ask(name, _Dom("set", choices=tuple(o.choices)))
        if o.integer:
            return self._ask(name, _Dom.int_range(o.low, o.high, o.step or 1, o.log))
        low, high = float(o.low), float(o.high)  # type: ignore[arg-type]
        return self._ask(name, _Dom("float", low=low, high=high, step=o.step, log=o.log, anchor=low))

    def _pending(self) -> dict[str, Any]:
        """The values the trial will answer with when asked (an enqueued starting point, or the point a
        recording trial is given)."""
        t = self._trial
        pending = t.params_in if isinstance(t, _RecordingTrial) else getattr(t, "_fixed_params", None)
        return pending if isinstance(pending, dict) else {}

    def known(self, name: str) -> tuple[bool, Any]:
        """``(True, value)`` once ``name``'s value in this trial is decided: asked already, fixed by the spec,
        given by the trial's enqueued point (a starting point keeps its own values: the parameters asked before
        them are asked to fit them), or not searched (a constant or the method's default)."""
        if name in self.values:
            return True, self.values[name]
        o = self._overrides.get(name)
        if o is not None and o.kind == "fixed":
            return True, o.value
        pending = self._pending()
        if name in pending:
            return True, pending[name]
        if self._plan is not None and name in self._plan.static:
            return True, self._plan.static[name]
        return False, None

    def _ask(self, name: str, dom: _Dom) -> Any:
        plan = self._plan
        allowed = asked = dom
        if plan is not None and name in plan.doms:
            allowed = asked = dom.within(plan.doms[name])
            for c in plan.on(name):
                cond = c.condition(name, self.known)
                narrowed = allowed.restrict(**cond) if cond else None
                if narrowed is not None:  # never None once the plan holds; the sampled check would say
                    allowed = narrowed
                    self.why[name] = c.text
            if asked.kind != "set":
                asked = allowed
        v = asked.suggest(self._trial, name)
        self.asked[name] = asked
        if asked.kind == "set" and not allowed.contains(v):
            best = min(range(len(allowed.choices)),
                       key=lambda i: (abs(allowed.choices[i] - v) if _is_num(v) and _is_num(allowed.choices[i])
                                      else math.inf, i))  # fmt: skip
            v = self.projected[name] = allowed.choices[best]
        self.values[name] = v
        return v


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

    @property
    def constraint_plan(self) -> _Plan:
        """The constraints of the space and what they leave of each parameter (made once per process; a space
        no configuration of which meets them raises ConfigError)."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = self.__dict__["_plan"] = _make_plan(self)
        return plan

    def __call__(self, trial: Any) -> dict | None:
        return self.run(trial)[0]

    def run(self, trial: Any) -> tuple[dict, _OverrideTrial]:
        """``(constants, wrapper)``: the trial's constants (the file's, the spec's fixed values and the choices
        that replaced a draw to meet a constraint), and the wrapper that asked ``trial`` (its ``values`` are
        what the trial runs).

        The spec's override of a name wins over a constant the file returns for it; a constant the file returns
        for a name it asked of the trial must lie in what was asked, else it is left out (``dropped``, refused
        by :func:`build_space`): no trial runs a value outside the space."""
        t = _OverrideTrial(trial, self.overrides, self.constraint_plan)
        ret = self.module.space(t, self.ctx)
        if ret is not None and not isinstance(ret, dict):
            raise TypeError(
                f"{self.filename}: space() must return a dict of constants or None, not {type(ret)}"
            )
        for name, o in self.overrides.items():
            if name not in t.seen:
                t.apply(name, o)
        out: dict[str, Any] = {}
        for k, v in (ret or {}).items():
            if k in self.overrides:
                continue
            if k in t.asked and not t.asked[k].contains(v):
                t.dropped[k] = v
                continue
            out[k] = v
            t.values.setdefault(k, v)
        out.update(t.fixed)
        out.update(t.projected)
        return out, t

    # --------------------------------------------------------------- introspection without a study
    def record(self, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any], dict]:
        """Run the space on a recording trial that answers from ``params`` (else the first choice / low end).

        Returns ``(config, distributions, out_of_range)``: the trial's config as the searcher would make it
        (suggested values and returned constants), the Optuna distribution of every suggested name, and a line
        (``name=value outside the space`` or ``name=value breaks <constraint>``) per given value that does not
        fit.
        """
        params = params or {}
        rec = _RecordingTrial(params)
        consts, t = self.run(rec)
        config = {**rec.values, **(consts or {})}
        outside = [f"{o} outside the space" for o in rec.outside]
        for k in t.projected:
            if k in params and not any(o.startswith(f"{k}=") for o in rec.outside):
                outside.append(f"{k}={params[k]!r} breaks {t.why.get(k, 'a constraint')}")
        return config, rec.distributions, outside

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
        """Starting points that fit the (overridden, constrained) space, with fixed overrides applied; and notes
        on the points dropped or trimmed. Duplicates are removed.

        A point with a value outside the user's space, or one that breaks a constraint, is dropped, never
        projected into the space: a published point is a combination someone ran, and its nearest point inside a
        narrowed space is a combination nobody ran (the searcher explores the space anyway). The one change made
        to a point is the spec's fixed values, which replace the point's own (the user asked for exactly that
        value in every trial); the point is then checked whole, constraints included, against the space."""
        points = self.starts() if points is None else [dict(p) for p in points]
        kept: list[dict] = []
        notes: list[str] = []
        for p in points:
            for name, o in self.overrides.items():
                if o.kind == "fixed":
                    p.pop(name, None)
            config, dists, outside = self.record(p)
            if outside:
                notes.append(f"starting point {p} left out: {', '.join(outside)}")
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

    def narrowed(self) -> list[str]:
        """Notes on the searched parameters the constraints narrow (the values left can meet every constraint;
        the others could not)."""
        plan = self.constraint_plan
        notes = []
        for name, d in plan.doms.items():
            if d != plan.raw[name] and name not in plan.static and not plan.raw[name].fixed:
                why = " and ".join(c.text for c in plan.on(name))
                notes.append(f"{name} narrowed to {d.body()} (of {plan.raw[name].body()} in {plan.origin[name]}) by "
                             f"the constraint {why}")  # fmt: skip
        return notes

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

    def __getstate__(self):  # the plan is made again where it is unpickled
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
    check_by_sampling(fn)
    return fn


SAMPLED = 24  # configurations drawn by check_by_sampling


def check_by_sampling(fn: SpaceFn, n: int = SAMPLED, seed: int = 0) -> None:
    """Draw ``n`` configurations from the space as a sweep would (Optuna's RandomSampler, seeded) and refuse the
    space if any breaks a declared constraint or the method's own check of its hyperparameters
    (``check_combination``, e.g. DKD's alpha and beta not both 0).

    The analysis from the bounds (:func:`_make_plan`) is exact for each declared constraint on its own; what it
    cannot decide -- several constraints on one parameter, a constraint on a parameter asked on some paths only,
    a check the method makes that its space file does not declare -- is decided here, by sampling, so a space
    can pass it and still hold a rare failing configuration. A constant the file returns for a parameter it
    asked of the trial, outside what it asked (an old-style repair), is refused here too."""
    import optuna

    from kdtune.losses import METHODS

    cls = METHODS.get(fn.method)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    finally:
        optuna.logging.set_verbosity(verbosity)
    failures: list[str] = []
    drawn = 0
    for _ in range(n):
        trial = study.ask()
        consts, t = fn.run(trial)
        drawn += 1
        if t.dropped:
            k, v = next(iter(t.dropped.items()))
            raise ConfigError(
                f"search space {fn.filename} returns {k}={_fmt(v)}, outside what it asks of the trial for {k} "
                f"({t.asked[k].text()}); declare the constraint it repairs in CONSTRAINTS instead of returning a "
                "value: fix the file"
            )
        config = {**trial.params, **consts}
        broken = [f"{c.text} fails" for c in fn.constraint_plan.constraints if not c.holds(t.known)]
        try:
            cls.resolve({k: v for k, v in config.items() if k in cls.hparams})
        except ConfigError as e:
            broken.append(str(e))
        if broken:
            failures.append(broken[0])
        study.tell(trial, 0.0)
        if not trial.params:
            break  # nothing is drawn: the space is one configuration
    if failures:
        raise ConfigError(
            f"methods.{fn.method} ({fn.ctx.student} on {fn.ctx.data}): {len(failures)} of {drawn} configurations "
            f"sampled from the space fail ({failures[0]}); narrow methods.{fn.method}.space so that none can"
        )


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
