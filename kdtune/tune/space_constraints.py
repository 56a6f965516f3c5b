"""Constraints between a space's parameters and the exact narrowing of their domains from the bounds.

``Dom`` is the values one parameter may take (a choice set or a range); ``Constraint`` is one declared
constraint (``a < b``, ``a <= b`` or "not both 0"); ``read_constraints`` reads ``CONSTRAINTS`` /
``constraints(ctx)`` from a space file; ``Plan`` holds what the constraints leave of each parameter (made by
:func:`kdtune.tune.space_trials.make_plan`).

Invariants: ``Constraint.prune`` is the exact projection of one constraint, decided from the bounds (it never
removes a value some value of the others can accompany); a domain is never widened. No Optuna at import.
Read more: docs/spaces.md.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field, replace
from typing import Any

from kdtune.errors import ConfigError
from kdtune.tune.space_files import SpaceContext

_OPS = ("<", "<=", ">", ">=")


def is_num(v: Any) -> bool:
    return (
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and not (isinstance(v, float) and math.isnan(v))
    )


def _same(a: Any, b: Any) -> bool:
    """``a == b``, without True standing for 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


@dataclass(frozen=True)
class Dom:
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
    def of(cls, dist) -> Dom:
        from optuna.distributions import CategoricalDistribution, IntDistribution

        if isinstance(dist, CategoricalDistribution):
            return cls("set", choices=tuple(dist.choices))
        if isinstance(dist, IntDistribution):
            return cls.int_range(dist.low, dist.high, dist.step, dist.log)
        return cls("float", low=dist.low, high=dist.high, step=dist.step, log=dist.log, anchor=dist.low)

    @classmethod
    def int_range(cls, low, high, step=1, log=False) -> Dom:
        step = int(step or 1)
        return cls(
            "int", low=int(low), high=int(high), step=step if step != 1 else None, log=log, anchor=int(low)
        )

    @classmethod
    def value(cls, v: Any) -> Dom:
        return cls("set", choices=(v,), fixed=True)

    def lo(self):
        if self.kind == "set":
            nums = [c for c in self.choices if is_num(c)]
            return min(nums) if nums else None
        return self.low

    def hi(self):
        if self.kind == "set":
            nums = [c for c in self.choices if is_num(c)]
            return max(nums) if nums else None
        return self.high

    def zero_only(self) -> bool:
        return self.kind == "set" and bool(self.choices) and all(is_num(c) and c == 0 for c in self.choices)

    def contains(self, v: Any) -> bool:
        if self.kind == "set":
            return any(_same(v, c) for c in self.choices)
        return is_num(v) and self.low <= v <= self.high

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

    def restrict(self, lo=None, lo_strict=False, hi=None, hi_strict=False, nonzero=False) -> Dom | None:
        """This domain within ``lo``/``hi`` (strict bounds exclude the bound itself) and, with ``nonzero``,
        without 0; None when nothing is left. (A range cannot lose a 0 inside it, only at an end.)"""
        if self.kind == "set":

            def ok(c):
                if lo is None and hi is None and not nonzero:
                    return True
                if not is_num(c):
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

    def within(self, other: Dom) -> Dom:
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
            return fmt_value(self.choices[0])
        if self.kind == "set":
            return "{" + ", ".join(map(fmt_value, self.choices)) + "}"
        return f"[{fmt_value(self.low)}, {fmt_value(self.high)}]"

    def text(self) -> str:
        return f"= {self.body()}" if self.fixed else f"in {self.body()}"


@dataclass(frozen=True)
class Constraint:
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
            if all(k for k, _ in others) and all(is_num(v) and v == 0 for _, v in others):
                return {"nonzero": True}
            return None
        if name == self.left:
            k, v = self.value(self.right, known)
            return {"hi": v, "hi_strict": self.strict} if k and is_num(v) else None
        k, v = self.value(self.left, known)
        return {"lo": v, "lo_strict": self.strict} if k and is_num(v) else None

    def prune(self, doms: dict[str, Dom]) -> dict[str, Dom] | None:
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
        left = doms[self.left] if isinstance(self.left, str) else Dom.value(self.left)
        right = doms[self.right] if isinstance(self.right, str) else Dom.value(self.right)
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


def read_constraints(module: types.ModuleType, ctx: SpaceContext, filename: str) -> list[Constraint]:
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
            out.append(Constraint("any", (a, b), text=f"{a} and {b} not both 0"))
            continue
        if a is None or b is None:
            continue
        if not any(isinstance(s, str) for s in (a, b)) or any(
            not isinstance(s, str) and not is_num(s) for s in (a, b)
        ):
            raise ConfigError(f"search space {filename}: constraint {c!r} must compare a parameter name with a "
                              "parameter name or a number")  # fmt: skip
        left, right = (a, b) if op in ("<", "<=") else (b, a)
        names = tuple(s for s in (left, right) if isinstance(s, str))
        out.append(Constraint("order", names, left, right, strict=op in ("<", ">"), what=what, text=text))
    return out


@dataclass
class Plan:
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


def fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)
