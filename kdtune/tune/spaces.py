"""Search spaces: ``SpaceFn`` (a method's space file with the spec's overrides applied, the define-by-run
function the sweep's searcher calls) and ``build_space``, which makes one and refuses a broken space.

Invariants: no trial runs a value outside the space the user wrote (the spec's override, else the file's),
starting points included, and every trial meets the file's declared constraints; a space that cannot is
refused with ConfigError before Ray starts. ``SpaceFn`` pickles as its source, never the executed module.

It also re-exports the names it had before the split (``__all__``): lookup and loading from ``space_files``,
``read_constraints`` from ``space_constraints``, ``describe_distribution`` from ``space_trials``.
Read more: docs/spaces.md.
"""

from __future__ import annotations

import math
import types
from typing import Any

from kdtune.errors import ConfigError, did_you_mean
from kdtune.spec import Override
from kdtune.tune.space_constraints import Plan, fmt_value, read_constraints
from kdtune.tune.space_files import (
    SpaceContext,
    available_spaces,
    find_space_file,
    load_source,
    module_from_source,
    search_path,
    space_sources,
)
from kdtune.tune.space_trials import OverrideTrial, RecordingTrial, describe_distribution, make_plan

__all__ = [
    "SAMPLED",
    "SpaceContext",
    "SpaceFn",
    "available_spaces",
    "build_space",
    "check_by_sampling",
    "describe_distribution",
    "find_space_file",
    "load_source",
    "module_from_source",
    "read_constraints",
    "search_path",
    "space_sources",
]


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
    def constraint_plan(self) -> Plan:
        """The constraints of the space and what they leave of each parameter (made once per process; a space
        no configuration of which meets them raises ConfigError)."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = self.__dict__["_plan"] = make_plan(self)
        return plan

    def __call__(self, trial: Any) -> dict | None:
        return self.run(trial)[0]

    def run(self, trial: Any) -> tuple[dict, OverrideTrial]:
        """``(constants, wrapper)``: the trial's constants (the file's, the spec's fixed values and the choices
        that replaced a draw to meet a constraint), and the wrapper that asked ``trial`` (its ``values`` are
        what the trial runs).

        The spec's override of a name wins over a constant the file returns for it; a constant the file returns
        for a name it asked of the trial must lie in what was asked, else it is left out (``dropped``, refused
        by :func:`build_space`): no trial runs a value outside the space."""
        t = OverrideTrial(trial, self.overrides, self.constraint_plan)
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
        rec = RecordingTrial(params)
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

    The analysis from the bounds (:func:`make_plan`) is exact for each declared constraint on its own; what it
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
                f"search space {fn.filename} returns {k}={fmt_value(v)}, outside what it asks of the trial for {k} "
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
