"""Running a space file's ``space(trial, ctx)``: the trial wrappers and the constraint plan.

``OverrideTrial`` wraps an Optuna trial so that the spec's overrides replace the file's ``suggest_*`` calls and
every constrained parameter is asked within what the constraints leave of it; ``RecordingTrial`` stands in for
a trial to record distributions; ``make_plan`` runs the space's default path to decide, before any trial,
what the constraints leave of each parameter (refusing, with ConfigError, a constraint no value can meet).

Invariant: no trial runs a value outside the space the user wrote, and each value asked meets the constraints
decided before it (a choice set's draw that breaks one is replaced by the nearest choice that meets it).
Read more: docs/spaces.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError, did_you_mean
from kdtune.spec import Override
from kdtune.tune.space_constraints import Constraint, Dom, Plan, fmt_value, is_num, read_constraints


class OverrideTrial:
    """Wraps an Optuna trial: ``suggest_*`` calls of overridden names follow the spec instead of the file, and
    every parameter a constraint names is asked within what the constraints leave of it (``plan``).

    A range is asked with the bounds the values decided before it allow (Optuna lets a range move between
    trials); a set of choices must stay the same in every trial, so it is asked whole (less the values no
    configuration can use) and a draw that breaks a constraint is replaced by the nearest choice that meets it
    (``projected``: the trial trains with it; Optuna's own record keeps the draw)."""

    def __init__(self, trial: Any, overrides: dict[str, Override], plan: Plan | None = None):
        self._trial = trial
        self._overrides = overrides
        self._plan = plan
        self.fixed: dict[str, Any] = {}
        self.seen: set[str] = set()
        self.values: dict[str, Any] = {}  # name -> the value this trial runs
        self.asked: dict[str, Dom] = {}  # name -> the domain asked of the trial
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
            return self._ask(name, Dom("float", low=low, high=high, step=step, log=log, anchor=low))
        return self.apply(name, o)

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._ask(name, Dom.int_range(low, high, step, log))
        return self.apply(name, o)

    def suggest_categorical(self, name: str, choices):
        self.seen.add(name)
        o = self._overrides.get(name)
        if o is None:
            return self._ask(name, Dom("set", choices=tuple(choices)))
        return self.apply(name, o)

    def apply(self, name: str, o: Override) -> Any:
        if o.kind == "fixed":
            self.fixed[name] = o.value
            self.values[name] = o.value
            return o.value
        if o.kind == "choices":
            return self._ask(name, Dom("set", choices=tuple(o.choices)))
        if o.integer:
            return self._ask(name, Dom.int_range(o.low, o.high, o.step or 1, o.log))
        low, high = float(o.low), float(o.high)  # type: ignore[arg-type]
        return self._ask(name, Dom("float", low=low, high=high, step=o.step, log=o.log, anchor=low))

    def _pending(self) -> dict[str, Any]:
        """The values the trial will answer with when asked (an enqueued starting point, or the point a
        recording trial is given)."""
        t = self._trial
        pending = t.params_in if isinstance(t, RecordingTrial) else getattr(t, "_fixed_params", None)
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

    def _ask(self, name: str, dom: Dom) -> Any:
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
                       key=lambda i: (abs(allowed.choices[i] - v) if is_num(v) and is_num(allowed.choices[i])
                                      else math.inf, i))  # fmt: skip
            v = self.projected[name] = allowed.choices[best]
        self.values[name] = v
        return v


class RecordingTrial:
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
        return "choice {" + ", ".join(map(fmt_value, d.choices)) + "}"
    if isinstance(d, (FloatDistribution, IntDistribution)):
        kind = "int" if isinstance(d, IntDistribution) else "float"
        scale = " log" if d.log else ""
        step = f" step {fmt_value(d.step)}" if d.step not in (None, 1) or (kind == "float" and d.step) else ""
        return f"{kind}{scale} [{fmt_value(d.low)}, {fmt_value(d.high)}]{step}"
    return repr(d)


def make_plan(fn: Any) -> Plan:
    """Read the file's constraints, the domains of the parameters they name (on the space's default path, with
    the spec's overrides), and narrow the domains until each constraint can be met from every value left:
    exact for each constraint alone, from the bounds (an order between two ranges or sets, a bound, "not both
    0"). A constraint no value can meet raises ConfigError naming both fields. Constraints between several
    parameters at once are checked again by sampling in :func:`kdtune.tune.spaces.build_space`. ``fn`` is a
    :class:`kdtune.tune.spaces.SpaceFn` (its method, ctx, filename, overrides and module are read)."""
    from kdtune.losses import METHODS

    cons = read_constraints(fn.module, fn.ctx, fn.filename)
    if not cons:
        return Plan([])
    rec = RecordingTrial({})
    t = OverrideTrial(rec, fn.overrides, None)
    ret = fn.module.space(t, fn.ctx)
    for name, o in fn.overrides.items():
        if name not in t.seen:
            t.apply(name, o)
    ret = ret if isinstance(ret, dict) else {}
    hps = METHODS.get(fn.method).hparams
    plan = Plan(cons)
    unknown = set()
    for name in dict.fromkeys(n for c in cons for n in c.names):
        o = fn.overrides.get(name)
        if o is not None:
            plan.origin[name] = f"methods.{fn.method}.space.{name}"
        else:
            plan.origin[name] = Path(fn.filename).name
        if o is not None and o.kind == "fixed":
            plan.raw[name] = Dom.value(o.value)
        elif name in rec.distributions:
            plan.raw[name] = Dom.of(rec.distributions[name])
        elif name in ret:
            plan.raw[name] = Dom.value(ret[name])
            plan.static[name] = ret[name]
        elif name in hps and hps[name].default is not None:
            plan.raw[name] = Dom.value(hps[name].default)
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


def _empty_message(fn: Any, c: Constraint, plan: Plan) -> str:
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
                f"{below} {fmt_value(hi)} or raise {c.right} {above} {fmt_value(lo)}")  # fmt: skip
    name = c.names[0]
    bound = c.right if name == c.left else c.left
    what = f"{c.what} ({fmt_value(bound)})" if c.what else fmt_value(bound)
    if name == c.left:
        verb, need = ("is not below", "<") if c.strict else ("exceeds", "<=")
    else:
        verb, need = ("is not above", ">") if c.strict else ("is below", ">=")
    d = plan.doms[name]
    subject = (
        f"{m}.{name}={fmt_value(d.choices[0])}"
        if d.fixed
        else f"every {m}.{name} {d.text()} ({plan.origin[name]})"
    )
    return f"{head}{subject} {verb} {what}; set {name} {need} {fmt_value(bound)}"
