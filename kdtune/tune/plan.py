"""Planning a sweep: ``plan(spec) -> SweepPlan``, pure (no Ray, no MLflow, no training, no files written).

A plan is everything a sweep will do, decided before anything starts: the stages it needs (each with its
config, key and the path it will have), and for each (student, method) group its base TrainConfig (teacher and
warm-start paths pointing at those stage paths), its search space, its published starting points and its
trial budget. ``kdtune validate`` is planning; ``kdtune sweep`` runs a plan. A DiSK group's space depends on
the CE student's training error (``delta`` is centred on it), known only once that stage is built: its
``needs_ce_error`` is True and :meth:`SweepPlan.space` is called again with the stage's figure.

A space whose constraints no configuration meets is refused here, in one line naming the fields (the spaces
are built by :func:`kdtune.tune.spaces.build_space`); the starting points a group keeps lie inside the user's
space and meet the constraints, and its notes say what the constraints narrowed and which points were left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdtune.errors import ConfigError
from kdtune.spec import SweepSpec, stage_key


@dataclass(frozen=True)
class StagePlan:
    name: str  # "teacher" | "ce-<student>"
    config: dict
    key: str
    dir: Path

    @property
    def model_path(self) -> Path:
        return self.dir / "final.pt"


@dataclass
class GroupPlan:
    name: str  # "<student>-<method>"
    student: str
    method: str
    base: dict  # the TrainConfig dict every trial starts from (searched values added per trial)
    budget: int  # trials
    starts: list[dict]
    notes: list[str]
    parameters: dict  # name -> Optuna distribution, as the space's default path sees them
    stages: tuple[str, ...]  # names of the stages it needs
    needs_ce_error: bool = False
    fuse: int = 1  # members per fused bundle (one Tune trial); budget.fuse resolved (kdtune.tune.fused)

    search_fn: Any = None  # the space the sweep searches (set once the stages it depends on are built)

    @property
    def units(self) -> int:
        """Tune trials (scheduled units) of the group: its budget in units of ``fuse`` members."""
        from kdtune.tune.fused import units

        return units(self.budget, self.fuse)

    @property
    def prunes_members(self) -> bool:
        """Whether its members are pruned inside their units (a fused group, which Tune runs FIFO) rather than
        by Tune's scheduler stopping units of one."""
        return self.fuse > 1


@dataclass
class SweepPlan:
    spec: SweepSpec
    teacher_arch: str | None
    stages: dict[str, StagePlan]
    groups: list[GroupPlan]
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # method -> (filename, source)
    num_classes: int | None = None

    @property
    def total_trials(self) -> int:
        return sum(g.budget for g in self.groups)

    @property
    def total_units(self) -> int:
        """Tune trials of the sweep: a fused bundle of K members is one (``total_trials`` counts members)."""
        return sum(g.units for g in self.groups)

    def space(self, group: GroupPlan, ce_error: float | None = None):
        """The group's search space (a picklable define-by-run function)."""
        return space_fn(self.spec, group.student, group.method, self.teacher_arch, ce_error, self.sources,
                        self.num_classes)  # fmt: skip

    def trial_base(self, group: GroupPlan) -> dict:
        """A group's trial config with the sweep's teacher store folder, ``<storage>/stages/teacher-store``
        (shared by every sweep on that storage), unless the spec's ``train:`` names another; ``teacher_store``
        (auto by default: on where the disk holds it) decides whether trials use it."""
        base = group.base
        if base.get("teacher") and not base.get("teacher_store_dir"):
            return {**base, "teacher_store_dir": str(self.spec.stages_dir / "teacher-store")}
        return base

    def chosen_hparams(self, group: GroupPlan) -> list[str]:
        """The hyperparameters a person chose for a group, under the names its trial runs log them
        (``dkd.beta``, ``train.lr``): those its space searches, then those the spec fixes. The rest is every
        trial's alike: the group's MLflow view shows these as columns, ``kdtune report`` in its cell."""
        from kdtune.tracking.trial import logged_names

        fixed = [k for k, o in self.spec.method(group.method).space.items() if o.kind == "fixed"]
        return logged_names(group.method, list(dict.fromkeys([*group.parameters, *fixed])))

    def searches(self) -> list:
        """What the searcher is given per group (its space, budget, starting points and members per unit)."""
        from kdtune.tune.search import GroupSearch

        return [GroupSearch(g.name, g.search_fn or self.space(g), g.budget, g.starts, fuse=g.fuse) for g in self.groups]

    def log_lines(self) -> list[str]:
        """What a new sweep says it is about to do, one line per group and one for the whole."""
        b = self.spec.budget
        lines = []
        for g in self.groups:
            pair = f"{self.teacher_arch} -> {g.student}" if g.base.get("teacher") else g.student
            what = f"{g.budget} trials" if g.parameters else "1 run (no search space)"
            starts = f", {min(len(g.starts), g.budget)} from published starting points" if g.starts else ""
            lines.append(f"  {g.name} ({pair}): {what}{starts}")
        lines += [f"  {g.name}: fused, {g.fuse} trials per Tune trial ({g.units} bundles of one trial's resources "
                  "each)" for g in self.groups if g.fuse > 1]  # fmt: skip
        lines.append(f"{self.total_trials} trials x {b.epochs} epochs, {b.concurrency} at a time, all groups in one "
                     "experiment")  # fmt: skip
        return lines

    def describe(self) -> dict[str, Any]:
        """What ``kdtune validate`` prints: per group its parameters and starting points."""
        from kdtune.tune.spaces import describe_distribution

        return {
            "stages": {n: {"key": s.key, "dir": str(s.dir)} for n, s in self.stages.items()},
            "groups": [
                {"group": g.name, "student": g.student, "method": g.method, "trials": g.budget, "fuse": g.fuse,
                 "parameters": [f"{k}: {describe_distribution(d)}" for k, d in g.parameters.items()],
                 "starts": g.starts, "notes": g.notes, "stages": list(g.stages)}
                for g in self.groups
            ],
        }  # fmt: skip


def space_sources(spec: SweepSpec) -> dict[str, tuple[str, str]]:
    """Each method's space file (filename, source): the experiment's saved copy when there is one (a resumed
    sweep runs the spaces it began with), else the installed file."""
    from kdtune.tune.spaces import load_source

    out = {}
    for m in spec.methods:
        saved = spec.experiment_dir / "spaces" / f"{m.name}.py"
        out[m.name] = (str(saved), saved.read_text()) if saved.is_file() else load_source(m.name)
    return out


def teacher_arch(spec: SweepSpec) -> str | None:
    t = spec.teacher
    if t is None:
        return None
    if t.model is not None:
        return t.model
    from kdtune.models.checkpoint import read_checkpoint, unwrap

    _, header, fmt = unwrap(read_checkpoint(t.checkpoint, role="teacher checkpoint"), "teacher checkpoint",
                            t.checkpoint)  # fmt: skip
    if header is None:
        raise ConfigError(
            f"teacher.checkpoint {t.checkpoint} is a plain state_dict ({fmt}) without its architecture; add "
            "teacher.model: <architecture>"
        )
    return str(header["arch"])


def space_fn(spec, student, method, teacher_arch_, ce_error, sources, num_classes=None):
    from kdtune.losses import METHODS
    from kdtune.tune.spaces import SpaceContext, build_space

    cls = METHODS.get(method)
    ctx = SpaceContext(method=method, data=spec.data, student=student,
                       teacher=teacher_arch_ if cls.needs_teacher else None, epochs=spec.budget.epochs,
                       num_classes=num_classes, ce_error=ce_error)  # fmt: skip
    return build_space(method, ctx, spec.method(method).space, sources[method])


def starting_points(fn, starts) -> tuple[list[dict], list[str]]:
    if starts is False:
        return [], []
    return fn.valid_starts(None if starts is True else list(starts))


def known_classes(data: str) -> int | None:
    """The class count of an in-memory data set (digits, CIFAR, the toys), known without reading it; None for a
    folder data set (counted when its folders are scanned). Spaces and constraints (DiSK's K) depend on it, so
    ``kdtune validate`` plans with the count the sweep will have."""
    from kdtune.names import DATASET_SHAPES
    from kdtune.preflight import FOLDER_DATASETS

    return None if data in FOLDER_DATASETS else DATASET_SHAPES[data][0]


def heads_stage(spec: SweepSpec, teacher_stage: StagePlan | None, teacher_path: str | None, arch: str | None,
                stages: dict[str, StagePlan]) -> StagePlan | None:
    """HSAKD's heads stage when a method needs the teacher's rotation heads: trained once on the frozen teacher
    (the teacher stage, or the teacher checkpoint), keyed by the teacher's key (:mod:`kdtune.tune.stages`)."""
    from kdtune.losses import METHODS
    from kdtune.tune.stages import HEADS_STAGE, checkpoint_teacher, heads_stage_config, heads_stage_key

    if not any(METHODS.get(m).needs_teacher_heads for _, m in spec.groups()) or teacher_path is None:
        return None
    teacher = teacher_stage
    if teacher is None:  # a checkpoint: the heads stage inherits the sweep's data and execution fields
        config = {**spec.train, "epochs": spec.budget.epochs, **spec.data_fields(), "model": arch, "seed": spec.seed}
        teacher = checkpoint_teacher(teacher_path, config)
    cfg = heads_stage_config(teacher)
    key = heads_stage_key(teacher.key, cfg)
    st = stages[HEADS_STAGE] = StagePlan(HEADS_STAGE, cfg, key, Path(spec.stages_dir) / key)
    return st


def plan(spec: SweepSpec, *, sources: dict | None = None, num_classes: int | None = None) -> SweepPlan:
    """The sweep ``spec`` describes, decided: stages, and per group its base config, space, starts, budget."""
    from kdtune.config import TrainConfig
    from kdtune.losses import METHODS
    from kdtune.tune.fused import check_fusable, resolve_fuse

    sources = sources if sources is not None else space_sources(spec)
    if num_classes is None:
        num_classes = known_classes(spec.data)
    arch = teacher_arch(spec)
    stages: dict[str, StagePlan] = {}

    def stage(name: str, cfg: dict) -> StagePlan:
        key = stage_key(TrainConfig.from_dict(cfg))
        st = StagePlan(name, cfg, key, Path(spec.stages_dir) / key)
        stages[name] = st
        return st

    teacher_path = spec.teacher.checkpoint if spec.teacher is not None else None
    teacher_stage = None
    if spec.teacher is not None and spec.teacher.is_stage and spec.needs_teacher:
        teacher_stage = stage("teacher", spec.teacher_stage_config())
        teacher_path = str(teacher_stage.model_path)
    ce = {s: stage(f"ce-{s}", spec.ce_student_config(s)) for s in spec.students} if spec.needs_ce_student else {}
    heads = heads_stage(spec, teacher_stage, teacher_path, arch, stages)

    groups = []
    for student, method in spec.groups():
        cls = METHODS.get(method)
        base = spec.trial_base(student, method)
        needs: list[str] = []
        if cls.needs_teacher:
            base["teacher"] = teacher_path
            if spec.teacher is not None and spec.teacher.model and not spec.teacher.is_stage:
                base["teacher_model"] = spec.teacher.model
            if teacher_stage is not None:
                needs.append(teacher_stage.name)
        if cls.needs_teacher_heads and heads is not None:  # HSAKD: the teacher with its rotation heads
            base["teacher"] = str(heads.model_path)
            base.pop("teacher_model", None)
            needs.append(heads.name)
        if cls.needs_init:
            base["init"] = str(ce[student].model_path)
            needs.append(ce[student].name)
        fn = space_fn(spec, student, method, arch, None, sources, num_classes)
        params = fn.parameters()
        ms = spec.method(method)
        budget = (ms.trials or spec.budget.trials) if params else 1
        points, notes = starting_points(fn, ms.starts)
        notes = fn.narrowed() + notes
        fuse = resolve_fuse(spec.budget.fuse, method, spec.budget.gpus_per_trial, budget)
        if fuse > 1:
            check_fusable(f"{student}-{method}", params, method, base)
        groups.append(GroupPlan(name=f"{student}-{method}", student=student, method=method, base=base,
                                budget=budget, starts=points, notes=notes, parameters=params,
                                stages=tuple(needs), needs_ce_error=bool(cls.needs_init), fuse=fuse))  # fmt: skip
    return SweepPlan(spec=spec, teacher_arch=arch, stages=stages, groups=groups, sources=sources,
                     num_classes=num_classes)  # fmt: skip
