"""The sweep's entry points: :func:`sweep` runs (or resumes) the sweep a spec describes, :func:`resume`
finishes an interrupted one from its saved spec and spaces, :func:`prepare` is what ``kdtune validate`` plans.

The work is the :class:`~kdtune.tune.driver.Driver`'s; the layers of the sweep (protocol, records, trainable,
search, results, repairs, the Ray runtime) are drawn in the README's "Layout" section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdtune.spec import SweepSpec, load_spec
from kdtune.tune.driver import Driver
from kdtune.tune.experiment import Experiment, find_experiment
from kdtune.tune.plan import plan
from kdtune.tune.results import SweepFailed, SweepResult, result_from_state

__all__ = ["SweepFailed", "SweepResult", "prepare", "resume", "result_of", "sweep"]


def sweep(spec_or_path: SweepSpec | str | Path | dict, *, log=print) -> SweepResult:
    """Run the sweep a spec describes; an existing unfinished experiment of that name is resumed."""
    spec = spec_or_path if isinstance(spec_or_path, SweepSpec) else load_spec(spec_or_path)
    return Driver(spec, log=log).run(resume_only=False)


def resume(experiment: str, storage: str | None = None, *, log=print) -> SweepResult:
    """Finish an interrupted sweep (``kdtune resume``), from its saved spec and spaces."""
    exp = find_experiment(experiment, storage)
    spec = Experiment(exp).spec()
    if Path(spec.experiment_dir).resolve() != exp.resolve():
        # The folder was moved: follow it (storage is where it lies now).
        raw = spec.to_dict()
        raw["storage"] = str(exp.parent)
        raw["name"] = exp.name
        spec = load_spec(raw)
    return Driver(spec, log=log).run(resume_only=True)


def result_of(exp: Path) -> SweepResult:
    """The results an experiment's ``state.json`` holds (finished or not), without running anything."""
    folder = Experiment(exp)
    return result_from_state(folder.spec(), exp, folder.state())


def prepare(spec: SweepSpec) -> dict[str, Any]:
    """Everything a sweep checks before Ray starts (``kdtune validate``): the plan, described."""
    p = plan(spec)
    return {"groups": [{"group": g.name, "teacher": g.teacher, "teacher_arch": g.teacher_arch, "student": g.student,
                        "method": g.method, "parameters": p.space(g).describe(),
                        "starts": g.starts, "notes": g.notes, "trials": g.budget, "fuse": g.fuse,
                        "units": g.units} for g in p.groups],
            "stages": {n: str(st.dir) for n, st in p.stages.items()}}  # fmt: skip


def make_scheduler(spec):
    """:func:`kdtune.tune.search.make_scheduler` under the name Tune's pickles of experiments begun before
    2026-12-05 refer to (their per-group scheduler factory); ``tests/test_legacy_resume.py`` resumes one."""
    from kdtune.tune.search import make_scheduler as make

    return make(spec)
