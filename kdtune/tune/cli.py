"""Sweep subcommands of ``kdtune``: sweep, resume, report, spaces, validate.

Ray, Optuna and MLflow are imported inside the commands only, so ``kdtune train`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SWEEP_EPILOG = """\
examples:
  kdtune sweep sweeps/digits.yaml                 the README demo: several methods on digits, a few minutes
  kdtune sweep sweeps/cifar100-r32x4-r8x4.yaml    a published CIFAR-100 pair (GPU)
  RAY_ADDRESS=auto kdtune sweep spec.yaml         on a running Ray cluster (storage must be shared)
Running it again on an unfinished experiment resumes it; a finished one prints its results.
"""


def add_commands(sub) -> None:
    """Add the sweep subcommands to the ``kdtune`` parser."""
    s = sub.add_parser("sweep", help="run a sweep described in one YAML file (resumes an unfinished one)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=SWEEP_EPILOG)  # fmt: skip
    s.add_argument("spec", help="the sweep spec (YAML); examples in sweeps/")
    s.add_argument("--name", help="experiment name (default: the spec's name:, else the file name)")
    s.add_argument(
        "--storage", help="where experiments live (default: the spec's storage:, else runs/sweeps)"
    )
    s.add_argument("--print-config", action="store_true", help="print the resolved spec and run nothing")
    s.set_defaults(func=_sweep)

    r = sub.add_parser("resume", help="finish a sweep that was interrupted (killed driver, Ctrl-C, crash)")
    r.add_argument("experiment", help="the experiment's directory, or its name under --storage")
    r.add_argument("--storage", help="where experiments live (default runs/sweeps)")
    r.set_defaults(func=_resume)

    p = sub.add_parser(
        "report", help="best trial per method and pair, with its config (table, CSV, Markdown, plots)"
    )
    from kdtune.report import add_arguments as report_arguments

    report_arguments(p)
    p.set_defaults(func=_report)

    db = sub.add_parser(
        "dashboard",
        help="MLflow's UI and optuna-dashboard for one experiment on 127.0.0.1, until Ctrl-C",
        description="Start `mlflow ui` (this environment's, on the experiment's tracking store) and "
        "optuna-dashboard (pip install 'kdtune[dashboard]') on the experiment's optuna.db, print both "
        "addresses, and stop both on Ctrl-C.",
    )
    db.add_argument("experiment", help="the experiment's directory, or its name under --storage")
    db.add_argument("--storage", help="where experiments live (default runs/sweeps)")
    db.add_argument("--mlflow-port", type=int, default=None, help="MLflow UI's port (default: a free one)")
    db.add_argument("--optuna-port", type=int, default=None, help="optuna-dashboard's port (default: a free one)")
    db.set_defaults(func=_dashboard)

    sp = sub.add_parser("spaces", help="print a method's search space and published starting points")
    sp.add_argument("method", nargs="?", help="a method (default: all with a space file)")
    sp.add_argument("--data", default="cifar100", help="data set of the context (default cifar100)")
    sp.add_argument("--teacher", default="resnet32x4", help="teacher architecture (default resnet32x4)")
    sp.add_argument("--student", default="resnet8x4", help="student architecture (default resnet8x4)")
    sp.add_argument("--epochs", type=int, default=240, help="epochs per trial (default 240)")
    sp.add_argument("--classes", type=int, default=None, help="number of classes (default: the data set's)")
    sp.add_argument("--ce-error", type=float, default=None, help="CE student's train error (DiSK's anchor)")
    sp.set_defaults(func=_spaces)

    v = sub.add_parser(
        "validate",
        help="check a sweep spec without starting: fields, spaces, starting points, method constraints, the "
        "teacher checkpoint, the data, the storage (kdtune.preflight)",
    )
    v.add_argument("spec", nargs="?", help="the sweep spec (YAML)")
    v.add_argument("--schema", action="store_true",
                   help="print the sweep spec's JSON Schema (for editors: completion and checks of spec files)")  # fmt: skip
    v.add_argument("--step-times", metavar="FILE",
                   help="a `kdtune bench --json FILE` made on your GPU: the GPU-hour estimate uses its measured "
                   "images/s (default: counted FLOPs at an assumed 40%% of an H100's bf16 peak; docs/estimate.md)")  # fmt: skip
    v.set_defaults(func=_validate)


# ---------------------------------------------------------------------------------------------- commands


def _load(args):
    from kdtune.config import load_yaml_mapping
    from kdtune.spec import load_spec

    spec_path = Path(args.spec)
    what, hint = "sweep spec", "check the path (examples in sweeps/)"
    if getattr(args, "name", None) or getattr(args, "storage", None):
        raw = load_yaml_mapping(spec_path, what, hint)
        raw.setdefault("name", spec_path.stem)
        if args.name:
            raw["name"] = args.name
        if args.storage:
            raw["storage"] = args.storage
        return load_spec(raw, base_dir=spec_path.resolve().parent)
    load_yaml_mapping(spec_path, what, hint)  # a missing, non-UTF-8 or damaged file: its own one line
    return load_spec(spec_path)


def _sweep(args) -> int:
    spec = _load(args)
    if args.print_config:
        print(spec.to_yaml(), end="")
        return 0

    from kdtune.tune.runner import sweep

    result = sweep(spec, log=_print)
    _finish(result)
    return 0


def _resume(args) -> int:
    from kdtune.preflight import check_experiment
    from kdtune.tune.experiment import find_experiment
    from kdtune.tune.runner import resume

    check_experiment(find_experiment(args.experiment, args.storage))  # damaged files: one line, before Ray
    result = resume(args.experiment, args.storage, log=_print)
    _finish(result)
    return 0


def _report(args) -> int:
    from kdtune.preflight import check_experiment
    from kdtune.report.main import find_experiment_dir

    check_experiment(find_experiment_dir(args.experiment, args.storage))  # damaged files: one line
    try:
        from kdtune.report import main_report
    except ImportError:
        return _fallback_report(args)
    return int(main_report(args) or 0)


def _dashboard(args) -> int:
    from kdtune.dashboard import run_dashboard

    return run_dashboard(args.experiment, args.storage, args.mlflow_port, args.optuna_port, log=_print)


def _fallback_report(args) -> int:
    """The sweep's own summary (results/state.json) when the MLflow report module is not installed."""
    from kdtune.tune.experiment import find_experiment
    from kdtune.tune.runner import result_of

    print(result_of(find_experiment(args.experiment, args.storage)).table())
    return 0


def _spaces(args) -> int:
    from kdtune.data import DATASETS
    from kdtune.losses import METHODS
    from kdtune.tune.spaces import SpaceContext, available_spaces, build_space

    DATASETS.get(args.data)
    names = [args.method] if args.method else [m for m in available_spaces() if m in METHODS]
    if args.method:
        METHODS.get(args.method)
    from kdtune.names import DATASET_SHAPES

    classes = args.classes or DATASET_SHAPES[args.data][0]
    for i, name in enumerate(names):
        cls = METHODS.get(name)
        teacher = args.teacher if cls.needs_teacher else None
        ctx = SpaceContext(method=name, data=args.data, student=args.student, teacher=teacher, epochs=args.epochs,
                           num_classes=classes, ce_error=args.ce_error)  # fmt: skip
        fn = build_space(name, ctx)
        pair = f"{teacher} -> {args.student}" if teacher else args.student
        if i:
            print()
        print(f"{name}: {cls.summary}")
        print(f"  file: {fn.filename}")
        print(f"  context: {args.data}, {pair}, {args.epochs} epochs")
        lines = fn.describe()
        print("  space:" + ("" if lines else " empty (one run per student)"))
        for ln in lines:
            print(f"    {ln}")
        points, notes = fn.valid_starts()
        print("  starting points:" + ("" if points else " none"))
        for p in points:
            print("    " + ", ".join(f"{k}={_short(v)}" for k, v in p.items()))
        for n in notes:
            print(f"    ({n})")
        published = getattr(fn.module, "PUBLISHED", None) or getattr(fn.module, "BETA", None)
        if published:
            pairs = sorted({f"{d}:{t}->{s}" for (d, t, s) in published})
            print(f"  published pairs: {', '.join(pairs)}")
    return 0


def _validate(args) -> int:
    if args.schema:
        import json

        from kdtune.spec_schema import json_schema

        print(json.dumps(json_schema(), indent=2))
        return 0
    if not args.spec:
        from kdtune.errors import ConfigError

        raise ConfigError("kdtune validate needs a spec file (kdtune validate sweeps/digits.yaml), or --schema")
    step_times = None
    if args.step_times:  # a file that is no bench output: one line, before the spec is planned
        from kdtune.tune.estimate import load_step_times

        step_times = load_step_times(args.step_times)
    from kdtune.preflight import preflight
    from kdtune.tune.plan import plan

    spec = _load(args)
    preflight(spec)
    p = plan(spec)  # kdtune.tune.runner.prepare's description, from the one plan the estimate reads too
    info = {"groups": [{"group": g.name, "parameters": p.space(g).describe(), "starts": g.starts, "notes": g.notes,
                        "trials": g.budget, "fuse": g.fuse, "units": g.units} for g in p.groups]}  # fmt: skip
    b = spec.budget
    teachers = [(f"{t.name}: " if t.name else "") + (t.checkpoint or f"stage {t.model} ({t.method})")
                for t in spec.teacher_list()] or ["none"]  # fmt: skip
    print(f"spec {args.spec} is valid: experiment {spec.name} at {spec.experiment_dir}")
    print(f"  data {spec.data}, teacher{'s' if len(teachers) > 1 else ''} {'; '.join(teachers)}, "
          f"students {', '.join(spec.students)}")  # fmt: skip
    total = sum(g["trials"] for g in info["groups"])
    print(f"  budget: {total} trials x {b.epochs} epochs in one Tune experiment, {b.concurrency} at a time, "
          f"{b.cpus_per_trial:g} CPU + {b.gpus_per_trial:g} GPU per trial; scheduler {spec.scheduler.name} per "
          f"group; metric {spec.metric} ({spec.mode})")  # fmt: skip
    for g in info["groups"]:
        params = (
            ", ".join(ln.split()[0] for ln in g["parameters"] if " fixed " not in ln) or "nothing (one run)"
        )
        n = g["trials"]
        fused = f"; fused {g['fuse']} per Tune trial ({g['units']} bundles)" if g.get("fuse", 1) > 1 else ""
        print(f"  {g['group']}: {n} trial{'s' if n != 1 else ''}; searches {params}; "
              f"{len(g['starts'])} starting points{fused}")  # fmt: skip
        for n in g["notes"]:
            print(f"    ({n})")
    try:
        from kdtune.bench import BF16_PEAK_TFLOPS
        from kdtune.tune.estimate import estimate

        est = estimate(p, step_times=step_times, source=args.step_times or "", peak_name="H100",
                       peak_flops=BF16_PEAK_TFLOPS["H100"] * 1e12)  # fmt: skip
        lines = est.lines()
    except Exception as e:  # noqa: BLE001 - the spec is valid; an estimate that fails must not say otherwise
        lines = [f"estimate: not available ({type(e).__name__}: {e})"]
    print("\n".join("  " + ln for ln in lines))
    return 0


# ---------------------------------------------------------------------------------------------- output


def _print(line: str) -> None:
    print(line, flush=True)


def _short(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _finish(result) -> None:
    """After a sweep: the report (MLflow's when available, else the sweep's own table) and where to look."""
    shown = False
    if result.tracking_uri:
        try:
            from kdtune.report import main_report

            ns = argparse.Namespace(experiment=result.experiment_dir, storage=None, csv=None, markdown=None,
                                    plots=False, out=None, from_sweep=True)  # fmt: skip
            main_report(ns)
            shown = True
        except ImportError:
            pass
        except Exception as e:  # noqa: BLE001 - the sweep is done; a report problem must not hide it
            print(f"(report failed: {type(e).__name__}: {e}; the sweep's own table follows)", file=sys.stderr)
    if not shown:
        print(result.table())
    if result.best:
        b = result.best
        print(f"best: {b['method']} on {b['student']}, {result.metric} {b.get(result.metric, float('nan')):.2f}"
              + (f", registered as {b['registered']}" if b.get("registered") else ""))  # fmt: skip
    exp = Path(result.experiment_dir)
    if result.tracking_uri and not shown:
        print(f"MLflow UI:  mlflow ui --backend-store-uri {result.tracking_uri}"
              if result.tracking_uri.startswith("sqlite") else f"MLflow UI:  {result.tracking_uri}")  # fmt: skip
    print(f"report:     kdtune report {exp} --plots")
    print(f"dashboards: kdtune dashboard {exp}")
