"""The ``kdtune`` command line.

Every subcommand is a function taking the parsed arguments and returning an exit code. Errors the user can
fix (:class:`~kdtune.errors.KdtuneError`) print one line, ``kdtune: error: ...``, and exit with status 2.
Ray, Optuna and MLflow are imported only by the sweep commands.
"""

from __future__ import annotations

import argparse
import os
import sys

from kdtune.errors import KdtuneError

TRAIN_EPILOG = """\
settings are key=value words (YAML values); method hyperparameters bare (T=4) or prefixed (kd.T=4).
a switch's words need no quotes: amp=off (YAML's no and false read as off too).
examples:
  kdtune train data=digits model=resnet8x4 method=ce epochs=30 out=runs/teacher
  kdtune train data=digits model=resnet8 teacher=runs/teacher method=kd epochs=30 out=runs/kd
  kdtune train --config trial.yaml epochs=5
  kdtune train data=cifar100 data_root=~/data model=resnet8x4 teacher=t.pt method=dkd preset=crd
fields (type, default, valid values):
{fields}
"""


def _train(args) -> int:
    from kdtune.config import TrainConfig

    cfg = TrainConfig.from_args(args.settings, args.config)  # refuses bad input before torch is imported
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    from kdtune.engine import iter_train

    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    progress = not args.no_progress and sys.stderr.isatty()
    gen = iter_train(cfg, log=log, progress=progress)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            result = stop.value
            break
    where = f"; wrote {cfg.out}" if cfg.out else ""
    print(
        f"done: test acc {result['test_acc']:.2f}% (best {result['best_test_acc']:.2f}%) after "
        f"{result['epochs']} epochs in {result['wall_s']:.1f}s{where}",
        flush=True,
    )
    return 0


def _methods(args) -> int:
    from kdtune.losses import METHODS

    names = [args.name] if args.name else METHODS.names()
    for name in names:
        cls = METHODS.get(name)
        needs = [w for w, f in (("teacher", cls.needs_teacher), ("init", cls.needs_init)) if f]
        print(f"{name}: {cls.summary}" + (f"  [needs {', '.join(needs)}]" if needs else ""))
        for hp_name, hp in cls.hparams.items():
            print(f"    {hp_name:<14} default {hp.default!s:<8} range {hp.range_text():<16} {hp.doc}")
    return 0


def _models(args) -> int:
    from kdtune.models import list_models

    names = list_models(args.pattern)
    if not names:
        raise KdtuneError(f"no model matches {args.pattern!r}; try `kdtune models` for the whole list")
    print("\n".join(names))
    return 0


def _data(args) -> int:
    from kdtune.data import default_root, list_datasets

    print("\n".join(list_datasets()))
    print(f"(data_root default: {default_root()}; set KDTUNE_DATA or data_root=)")
    return 0


def _bench(args) -> int:
    """Its options are parsed here, not when the parser is built: kdtune.bench imports torch."""
    from kdtune.bench import add_arguments
    from kdtune.bench import main as bench_main

    p = argparse.ArgumentParser(prog="kdtune bench", description=BENCH_HELP)
    add_arguments(p)
    return bench_main(p.parse_args(args.rest))


def _reproduce(args) -> int:
    import importlib

    from kdtune.reproduce import REPRODUCTIONS

    if args.what not in REPRODUCTIONS:
        raise KdtuneError(f"unknown reproduction {args.what!r}; available: {', '.join(REPRODUCTIONS)}")
    return int(importlib.import_module(REPRODUCTIONS[args.what]).main(args.rest) or 0)


def _store(args) -> int:
    """``kdtune store list|delete``: the teacher stores under a folder, their sizes, and deleting them."""
    from pathlib import Path

    from kdtune.engine.teacher_store import default_root, list_stores
    from kdtune.tables import table

    root = Path(args.dir).expanduser() if args.dir else default_root()
    stores = list_stores(root) if root.is_dir() else []
    if args.action == "list":
        if not stores:
            print(f"no teacher store under {root}")
            return 0
        rows = [[Path(s["path"]).name, s["key"].get("teacher_arch", "?"), s["key"].get("data", "?"),
                 str(s["key"].get("batch_size", "?")), str(len(s["epochs"])), f"{s['bytes'] / 1e6:.1f} MB"]
                for s in stores]  # fmt: skip
        print(table(["store", "teacher", "data", "batch", "epochs", "size"], rows))
        print(f"{len(stores)} stores, {sum(s['bytes'] for s in stores) / 1e6:.1f} MB under {root}")
        return 0
    names = {Path(s["path"]).name: s for s in stores}
    chosen = list(names) if args.all else args.names
    if not chosen:
        raise KdtuneError("kdtune store delete needs store names (from `kdtune store list`) or --all")
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise KdtuneError(f"no teacher store {unknown[0]!r} under {root}; `kdtune store list --dir {root}` shows them")
    import shutil

    for n in chosen:
        shutil.rmtree(names[n]["path"])
        print(f"deleted {n} ({names[n]['bytes'] / 1e6:.1f} MB)")
    return 0


BENCH_HELP = "images/s of kdtune's training step vs a reference-style loop"


def build_parser() -> argparse.ArgumentParser:
    from kdtune.config import TrainConfig
    from kdtune.version import __version__

    p = argparse.ArgumentParser(prog="kdtune", description="Sweeps of knowledge-distillation methods.")
    p.add_argument("--version", action="version", version=f"kdtune {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train one model (teacher or student)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG.format(fields="\n".join(TrainConfig.field_help())),
    )
    t.add_argument("--config", help="YAML file of settings; key=value words override it")
    t.add_argument("--quiet", action="store_true", help="print only the final line")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and run nothing")
    t.add_argument("settings", nargs="*", metavar="key=value")
    t.set_defaults(func=_train)

    m = sub.add_parser("methods", help="list methods with their hyperparameters, defaults and ranges")
    m.add_argument("name", nargs="?")
    m.set_defaults(func=_methods)

    mo = sub.add_parser("models", help="list registered models (glob pattern)")
    mo.add_argument("pattern", nargs="?", default="*")
    mo.set_defaults(func=_models)

    d = sub.add_parser("data", help="list data sets")
    d.set_defaults(func=_data)

    b = sub.add_parser("bench", help=BENCH_HELP, add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (kdtune bench --help)")
    b.set_defaults(func=_bench)

    st = sub.add_parser("store", help="list or delete teacher stores (teacher outputs kept per training view)")
    st.add_argument("action", choices=["list", "delete"])
    st.add_argument("names", nargs="*", help="with delete: the stores to delete (names from list)")
    st.add_argument("--all", action="store_true", help="with delete: every store under the folder")
    st.add_argument("--dir", default=None, help="the stores' folder (default ~/.cache/kdtune/teacher-store; a "
                    "sweep's: <storage>/stages/teacher-store)")  # fmt: skip
    st.set_defaults(func=_store)

    from kdtune.reproduce import REPRODUCTIONS

    r = sub.add_parser("reproduce", help=f"reproduce a paper's result on the CPU ({', '.join(REPRODUCTIONS)})")
    r.add_argument("what", choices=list(REPRODUCTIONS))
    r.add_argument("rest", nargs=argparse.REMAINDER, help="options of the reproduction (see its --help)")
    r.set_defaults(func=_reproduce)

    from kdtune.tune.cli import add_commands

    add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "train":  # argparse leaves over the key=value words after an option (a=1 --quiet b=2)
        args.settings += [w for w in extra if not w.startswith("-")]
        extra = [w for w in extra if w.startswith("-")]
    if extra and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "bench":
        args.rest = extra + args.rest  # the benchmark's own options, parsed by _bench
    try:
        return int(args.func(args) or 0)
    except KdtuneError as e:
        print(f"kdtune: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print("kdtune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `kdtune validate spec | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe closed
    except Exception as e:
        from kdtune.errors import disk_full_message, is_disk_full

        if not is_disk_full(e):
            raise
        where = getattr(e, "filename", None) or "its output"
        print(f"kdtune: error: {disk_full_message(where)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
