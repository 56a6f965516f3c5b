"""An experiment folder (``<storage>/<name>/``): the spec it began with, its spaces, its state, its results.

Only the sweep driver that holds ``sweep.lock`` writes ``spec.yaml`` (the resolved spec; a changed spec is
refused on resume), ``spaces/`` (the search-space sources a resumed sweep runs), ``state.json`` and
``results.json``, each in one atomic write (:func:`kdtune.storage.atomic_write_text`). Beside them:
``tune/`` (the Ray Tune experiments of the sweep and of the repeats), ``trials/<id>/``, ``optuna.db``, the
embedded MLflow store and ``diverged/``.

More: docs/sweep_storage.md §The experiment folder (the layout, file by file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from kdtune.errors import ConfigError, KdtuneError
from kdtune.spec import SweepSpec, diff_specs, load_spec
from kdtune.storage import atomic_write_text

STATE_FILE = "state.json"
SPEC_FILE = "spec.yaml"
RESULTS_FILE = "results.json"
DEFAULT_STORAGE = "runs/sweeps"
OPTUNA_FILE = "optuna.db"


def optuna_storage(exp_dir: str | Path, url: str | None = None) -> tuple[str, str]:
    """Where the Optuna mirror of an experiment lives, and the prefix of its studies' names: the experiment's
    own ``optuna.db`` (studies named by group), or ``tracking.optuna``, a database shared by experiments
    (PostgreSQL beside a tracking server: ``postgresql://user@host/db``), where a study is
    ``<experiment>/<group>``."""
    exp_dir = Path(exp_dir)
    if not url:
        return f"sqlite:///{exp_dir.absolute() / OPTUNA_FILE}", ""
    return url, f"{exp_dir.name}/"


def check_optuna_storage(url: str | None) -> None:
    """``tracking.optuna`` opened once before Ray starts (its tables made if new); ConfigError in one line when
    it cannot be, e.g. MLflow's own database (both keep a table ``alembic_version``). None: nothing to check."""
    if not url:
        return
    import optuna

    try:
        optuna.storages.RDBStorage(url)
    except Exception as e:  # noqa: BLE001 - a bad URL, an unreachable server, a foreign schema: one line each
        why = " ".join(str(e).split())[:300]
        hint = ("give Optuna a database (or schema) of its own on that server, not MLflow's"
                if "schema" in why else "check the URL, the server and the driver's access to it")  # fmt: skip
        raise ConfigError(f"tracking.optuna={url!r} cannot be opened ({type(e).__name__}: {why}); {hint}") from None


def saved_optuna_storage(exp_dir: str | Path) -> tuple[str, str]:
    """:func:`optuna_storage` of an experiment as its saved ``spec.yaml`` names it."""
    try:
        raw = yaml.safe_load((Path(exp_dir) / SPEC_FILE).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    tracking = raw.get("tracking") if isinstance(raw, dict) else None
    return optuna_storage(exp_dir, tracking.get("optuna") if isinstance(tracking, dict) else None)


class Experiment:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ reading
    @property
    def started(self) -> bool:
        return (self.path / SPEC_FILE).is_file()

    def saved_spec_dict(self) -> dict[str, Any]:
        p = self.path / SPEC_FILE
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"{p} is damaged ({type(e).__name__}); restore it from a backup, or start the "
                              "sweep under a new name") from None  # fmt: skip
        if not isinstance(raw, dict):
            raise ConfigError(f"{p} is damaged (not a mapping); restore it, or start the sweep under a new name")
        return raw

    def spec(self) -> SweepSpec:
        return load_spec(self.saved_spec_dict())

    def state(self) -> dict[str, Any]:
        p = self.path / STATE_FILE
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"status": None, "groups": {}}
        except (OSError, UnicodeDecodeError, ValueError):
            # Written atomically, so this is damage from outside; the Tune experiment and the trial folders
            # hold the truth, and a resumed sweep writes it again.
            return {"status": None, "groups": {}, "damaged": True}

    def resume_diff(self, spec: SweepSpec) -> list[str]:
        """The fields in which ``spec`` differs from the spec this experiment began with (``storage`` is where
        it lies now, not a change of the sweep). A field the saved spec lacks (added by a later kdtune) counts
        as its default, as the saved spec reads."""
        saved = self.saved_spec_dict()
        try:
            saved = load_spec(saved).to_dict()
        except KdtuneError:  # compared as written; what cannot be read is refused where it is loaded
            pass
        return [d for d in diff_specs(saved, spec.to_dict()) if d != "storage"]

    def check_same_spec(self, spec: SweepSpec) -> None:
        diff = self.resume_diff(spec)
        if diff:
            shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise ConfigError(
                f"experiment {spec.name} at {self.path} began with another spec ({shown} differ); restore those "
                f"fields to resume it, or give the sweep a new name: to start a new one"
            )

    # ------------------------------------------------------------------ writing (the lock holder only)
    def write_start(self, spec: SweepSpec, sources: dict[str, tuple[str, str]]) -> None:
        (self.path / "spaces").mkdir(parents=True, exist_ok=True)
        for m, (_, text) in sources.items():
            atomic_write_text(self.path / "spaces" / f"{m}.py", text)
        atomic_write_text(self.path / SPEC_FILE, spec.to_yaml())

    def write_state(self, state: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / STATE_FILE, json.dumps(state, indent=2, default=str))

    def write_results(self, results: dict[str, Any]) -> Path:
        return atomic_write_text(self.path / RESULTS_FILE, json.dumps(results, indent=2, default=str))


def find_experiment(experiment: str, storage: str | None = None) -> Path:
    """An experiment directory from a path or a name under ``storage`` (default runs/sweeps)."""
    p = Path(experiment).expanduser()
    if (p / SPEC_FILE).is_file():
        return p.absolute()
    base = Path(storage or DEFAULT_STORAGE).expanduser()
    q = base / experiment
    if (q / SPEC_FILE).is_file():
        return q.absolute()
    raise ConfigError(
        f"no sweep experiment {experiment!r}: neither {p} nor {q} holds a {SPEC_FILE}; give the experiment's "
        "directory, or its name with --storage <path>"
    )


def whole_optuna_db(path: Path) -> None:
    """Make the mirror's SQLite database whole before it is used. A new one is built under a temporary name
    and renamed into place. SQLite runs each of Optuna's ``CREATE`` statements on its own, and Optuna adds no
    index to a table that already exists. So a driver killed between ``CREATE TABLE studies`` and its unique
    index left a database that took one study name twice: the Optuna trials of one group split over two
    studies. One left that way without a duplicate yet gets the index now."""
    import sqlite3

    if not path.exists():
        import optuna

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp}")
        storage.remove_session()
        storage.engine.dispose()
        os.replace(tmp, path)
        return
    con = sqlite3.connect(path)
    try:
        names = [r[0] for r in con.execute("SELECT study_name FROM studies")]
        if len(names) == len(set(names)):
            con.execute("CREATE UNIQUE INDEX IF NOT EXISTS ix_studies_study_name ON studies (study_name)")
            con.commit()
    except sqlite3.Error:
        pass  # a damaged database is refused in one line by the preflight, before Ray starts
    finally:
        con.close()
