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


@dataclass(frozen=True)
class TeacherPlan:
    """One teacher of the sweep: its name (None for ``teacher:``), architecture, the checkpoint its trials read
    (a stage's final.pt, or the user's checkpoint), and the stages that make it (teacher, HSAKD heads)."""

    name: str | None
    arch: str | None
    path: str | None
    model: str | None = None  # teacher_model of a checkpoint given with its architecture
    stage: StagePlan | None = None
    heads: StagePlan | None = None


def teacher_stage_name(name: str | None) -> str:
    """A teacher stage's name in a plan (and state.json, MLflow): ``teacher``, or ``teacher-<name>``."""
    return "teacher" if name is None else f"teacher-{name}"


@dataclass
class GroupPlan:
    name: str  # "<student>-<method>", or "<teacher>-<student>-<method>" in a sweep of several teachers
    student: str
    method: str
    base: dict  # the TrainConfig dict every trial starts from (searched values added per trial)
    budget: int  # trials
    starts: list[dict]
    notes: list[str]
    parameters: dict  # name -> Optuna distribution, as the space's default path sees them
    stages: tuple[str, ...]  # names of the stages it needs
    needs_ce_error: bool = False
    teacher: str | None = None  # the teacher's name in a sweep of several teachers
    teacher_arch: str | None = None  # the architecture of the teacher its trials read (None: no teacher)
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
    teachers: dict[str | None, TeacherPlan]
    stages: dict[str, StagePlan]
    groups: list[GroupPlan]
    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # method -> (filename, source)
    num_classes: int | None = None

    @property
    def teacher_arch(self) -> str | None:
        """The architecture of the sweep's first teacher (its only one, for ``teacher:``)."""
        return next((t.arch for t in self.teachers.values()), None)

    @property
    def total_trials(self) -> int:
        return sum(g.budget for g in self.groups)

    @property
    def total_units(self) -> int:
        """Tune trials of the sweep: a fused bundle of K members is one (``total_trials`` counts members)."""
        return sum(g.units for g in self.groups)

    def space(self, group: GroupPlan, ce_error: float | None = None):
        """The group's search space (a picklable define-by-run function)."""
        return space_fn(self.spec, group.student, group.method, group.teacher_arch, ce_error, self.sources,
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
            who = f"{g.teacher_arch} ({g.teacher})" if g.teacher else g.teacher_arch
            pair = f"{who} -> {g.student}" if g.base.get("teacher") else g.student
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
                {"group": g.name, **({"teacher": g.teacher} if g.teacher else {}), "student": g.student,
                 "method": g.method, "trials": g.budget, "fuse": g.fuse,
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


def teacher_arch(t) -> str | None:
    """The architecture of teacher ``t`` (a :class:`~kdtune.spec.TeacherSpec`): its model, else its checkpoint's."""
    if t is None:
        return None
    if t.model is not None:
        return t.model
    from kdtune.models.checkpoint import read_checkpoint, unwrap

    _, header, fmt = unwrap(read_checkpoint(t.checkpoint, role="teacher checkpoint"), "teacher checkpoint",
                            t.checkpoint)  # fmt: skip
    if header is None:
        where = f"teachers.{t.name}" if t.name else "teacher"
        raise ConfigError(
            f"{where}.checkpoint {t.checkpoint} is a plain state_dict ({fmt}) without its architecture; add "
            f"{where}.model: <architecture>"
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


def heads_stage(spec: SweepSpec, teacher: TeacherPlan, stages: dict[str, StagePlan]) -> StagePlan | None:
    """HSAKD's heads stage of ``teacher`` when a method needs the teacher's rotation heads: trained once on the
    frozen teacher (its stage, or its checkpoint), keyed by the teacher's key (:mod:`kdtune.tune.stages`)."""
    from kdtune.losses import METHODS
    from kdtune.tune.stages import HEADS_STAGE, checkpoint_teacher, heads_stage_config, heads_stage_key

    if not any(METHODS.get(g.method).needs_teacher_heads for g in spec.groups()) or teacher.path is None:
        return None
    ref = teacher.stage
    if ref is None and "://" in teacher.path:
        where = f"teachers.{teacher.name}" if teacher.name else "teacher"
        raise ConfigError(f"methods.hsakd needs the rotation heads of {where}, a stage trained on a local checkpoint "
                          f"(keyed by its bytes), but {where}.checkpoint is the URL {teacher.path}; download it and "
                          "give its path")  # fmt: skip
    if ref is None:  # a checkpoint: the heads stage inherits the sweep's data and execution fields
        config = {**spec.train, "epochs": spec.budget.epochs, **spec.data_fields(), "model": teacher.arch,
                  "seed": spec.seed}  # fmt: skip
        ref = checkpoint_teacher(teacher.path, config)
    cfg = heads_stage_config(ref)
    key = heads_stage_key(ref.key, cfg)
    name = HEADS_STAGE if teacher.name is None else f"{HEADS_STAGE}-{teacher.name}"
    st = stages[name] = StagePlan(name, cfg, key, Path(spec.stages_dir) / key)
    return st


def plan_teachers(spec: SweepSpec, stage, stages: dict[str, StagePlan]) -> dict[str | None, TeacherPlan]:
    """Each teacher of the spec, planned: a stage (``stage(name, config)``) for a teacher to train, and the
    HSAKD heads stage where a method reads the rotation heads. Two teachers that are one (the same stage key)
    are refused: the comparison would compare a teacher with itself."""
    import dataclasses

    out: dict[str | None, TeacherPlan] = {}
    stages_by_key: dict[str, str] = {}
    for t in spec.teacher_list():
        arch, path, st = teacher_arch(t), t.checkpoint, None
        if t.is_stage and spec.needs_teacher:
            st = stage(teacher_stage_name(t.name), spec.teacher_stage_config(t))
            if st.key in stages_by_key:
                raise ConfigError(f"teachers.{t.name} trains the same teacher as teachers.{stages_by_key[st.key]} "
                                  "(same model, objective and training); list each teacher once")  # fmt: skip
            stages_by_key[st.key] = str(t.name)
            path = str(st.model_path)
        tp = TeacherPlan(t.name, arch, path, t.model if not t.is_stage else None, st)
        out[t.name] = dataclasses.replace(tp, heads=heads_stage(spec, tp, stages))
    return out


def plan(spec: SweepSpec, *, sources: dict | None = None, num_classes: int | None = None) -> SweepPlan:
    """The sweep ``spec`` describes, decided: stages, and per group its base config, space, starts, budget."""
    from kdtune.config import TrainConfig
    from kdtune.losses import METHODS
    from kdtune.tune.fused import check_fusable, resolve_fuse

    sources = sources if sources is not None else space_sources(spec)
    if num_classes is None:
        num_classes = known_classes(spec.data)
    stages: dict[str, StagePlan] = {}

    def stage(name: str, cfg: dict) -> StagePlan:
        key = stage_key(TrainConfig.from_dict(cfg))
        st = StagePlan(name, cfg, key, Path(spec.stages_dir) / key)
        stages[name] = st
        return st

    teachers = plan_teachers(spec, stage, stages)
    warm = dict.fromkeys(g.student for g in spec.groups() if METHODS.get(g.method).needs_init)  # DiSK's students
    ce = {s: stage(f"ce-{s}", spec.ce_student_config(s)) for s in warm}

    groups = []
    for g in spec.groups():
        student, method = g.student, g.method
        cls = METHODS.get(method)
        base = spec.trial_base(student, method)
        needs: list[str] = []
        tp = teachers.get(g.teacher) if cls.needs_teacher else None
        if tp is not None:
            base["teacher"] = tp.path
            if tp.model:
                base["teacher_model"] = tp.model
            if tp.stage is not None:
                needs.append(tp.stage.name)
            if cls.needs_teacher_heads and tp.heads is not None:  # HSAKD: the teacher with its rotation heads
                base["teacher"] = str(tp.heads.model_path)
                base.pop("teacher_model", None)
                needs.append(tp.heads.name)
        if cls.needs_init:
            base["init"] = str(ce[student].model_path)
            needs.append(ce[student].name)
        arch = tp.arch if tp is not None else None
        fn = space_fn(spec, student, method, arch, None, sources, num_classes)
        params = fn.parameters()
        ms = spec.method(method)
        budget = (ms.trials or spec.budget.trials) if params else 1
        points, notes = starting_points(fn, ms.starts)
        notes = fn.narrowed() + notes
        fuse = resolve_fuse(spec.budget.fuse, method, spec.budget.gpus_per_trial, budget)
        if fuse > 1:
            check_fusable(g.name, params, method, base)
        groups.append(GroupPlan(name=g.name, student=student, method=method, base=base, budget=budget,
                                starts=points, notes=notes, parameters=params, stages=tuple(needs),
                                needs_ce_error=bool(cls.needs_init), teacher=g.teacher, teacher_arch=arch,
                                fuse=fuse))  # fmt: skip
    return SweepPlan(spec=spec, teachers=teachers, stages=stages, groups=groups, sources=sources,
                     num_classes=num_classes)  # fmt: skip
