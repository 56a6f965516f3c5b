"""The teacher comparison: is a student more accurate distilled from one teacher than from another?

Shown by ``kdtune report`` after its table when the trials name 2 or more teachers (``teacher_name``: a sweep
with ``teachers:``). Teachers are ordered as the spec lists them (else by name); the first of each teacher
architecture is the reference. Per (data, teacher architecture, student, method): the test accuracy of each
teacher's best configuration (:func:`kdtune.report.table.best_rows`: chosen on validation; mean ± sample std
over its seeds, n), the difference Δ = other teacher − reference, Welch's two-sided t-test on the seeds' test
accuracies (p, and the 95 % CI of Δ with Welch–Satterthwaite degrees of freedom; "n/a" below 2 seeds a side),
and the mean last ``val_agree`` / ``val_kl_teacher`` of each side's runs. Also each teacher's own test
accuracy, NLL, ECE and entropy from its stage run (``-`` where not logged). The Markdown adds the layout of
Hamidi et al. (ECCV 2024) Table 1: methods × (teacher → student) pairs × one column per teacher, the better
cell bold. Nothing here ranks or chooses: the configurations are those of the table. docs/report.md §Teacher
comparison states the statistics.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdtune.report.table import TEACHER_FIT
from kdtune.tables import table

TAG_TEACHER_NAME = "kdtune.teacher_name"  # on trial and teacher-stage runs of a sweep with `teachers:`
NA_SEEDS = "n/a (set budget.repeats ≥ 2)"
NA_SPREAD = "n/a (no spread over seeds)"
DIAGNOSTICS = ("test_acc", "test_nll", "test_ece", "test_entropy")  # a teacher's own, from its stage run
MORE_DIAGNOSTICS = ("val_acc", "val_nll", "val_ece", "val_entropy")  # kept in the dicts, not printed
TEST_NOTE = (
    "Δ = a teacher's mean test_acc minus the reference's (the first teacher of its architecture, spec order); "
    "uncertainty: Welch's t-test (two-sided, unequal variances) on the per-seed test_acc of the two best "
    "configurations, 95% CI of Δ with Welch–Satterthwaite degrees of freedom"
)
PAPER_NOTE = (
    "Layout of Hamidi et al. (ECCV 2024) Table 1. Cells: the test accuracy of each (teacher, student, method)'s "
    "best configuration (chosen on validation), mean ± sample std over its seeds; bold: the better teacher of "
    "each pair and method."
)


# --------------------------------------------------------------------------- what the sweep recorded
def teacher_names(items: Iterable[Any]) -> set[str]:
    """The teacher names of trials (:class:`~kdtune.report.table.Trial`) or rows (dicts)."""
    out = set()
    for x in items:
        name = x.get("teacher_name") if isinstance(x, Mapping) else getattr(x, "teacher_name", None)
        if name:
            out.add(name)
    return out


def read_spec(exp_dir: str | Path | None = None, client=None, parent_run_id: str | None = None) -> dict | None:
    """The sweep's resolved spec: ``<experiment>/spec.yaml``, else the parent run's ``spec.yaml`` artifact;
    ``None`` where neither can be read."""
    import tempfile

    import yaml

    def load(path: Path) -> dict | None:
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None
        return raw if isinstance(raw, dict) else None

    if exp_dir is not None and (Path(exp_dir) / "spec.yaml").is_file():
        spec = load(Path(exp_dir) / "spec.yaml")
        if spec is not None:
            return spec
    if client is not None and parent_run_id:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                return load(Path(client.download_artifacts(parent_run_id, "spec.yaml", tmp)))
            except Exception:  # no artifact, an unreachable artifact store: order by name instead
                return None
    return None


def spec_teachers(spec: Mapping | None) -> list[dict]:
    """The spec's named teachers (``teachers:``), in its order."""
    listed = (spec or {}).get("teachers")
    if not isinstance(listed, list):
        return []
    return [dict(t) for t in listed if isinstance(t, Mapping) and t.get("name")]


def teacher_order(names: Iterable[str], spec: Mapping | None = None) -> list[str]:
    """``names`` as the spec lists its teachers; names it does not list after them, sorted."""
    names = set(names)
    listed = [str(t["name"]) for t in spec_teachers(spec) if str(t["name"]) in names]
    return listed + sorted(names - set(listed))


def method_order(methods: Iterable[str], spec: Mapping | None = None) -> list[str]:
    """``methods`` as the spec lists them (a mapping or a list), the others after them, sorted."""
    methods = set(methods)
    raw = (spec or {}).get("methods")
    if isinstance(raw, Mapping):
        listed = [str(m) for m in raw]
    elif isinstance(raw, list):
        listed = [str(m.get("name")) if isinstance(m, Mapping) else str(m) for m in raw]
    else:
        listed = []
    listed = [m for m in dict.fromkeys(listed) if m in methods]
    return listed + sorted(methods - set(listed))


def teacher_stages(client, experiment_id: str, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Each named teacher's stage run (stage ``teacher-<name>``, or tag ``kdtune.teacher_name`` on a stage named
    ``teacher...``): ``run_id``, ``model``, ``objective`` (its param ``method``) and its metrics."""
    from kdtune.tracking.client import TAG_ROLE, TAG_STAGE, search_all_runs

    names = set(names)
    out: dict[str, dict[str, Any]] = {}
    for r in search_all_runs(client, [experiment_id], f"tags.`{TAG_ROLE}` = 'stage'"):
        tags, params = r.data.tags, r.data.params
        stage = tags.get(TAG_STAGE) or ""
        name = stage[len("teacher-") :] if stage.startswith("teacher-") else None
        if name not in names and tags.get(TAG_TEACHER_NAME) in names and stage.startswith("teacher"):
            name = tags[TAG_TEACHER_NAME]
        if name in names and name not in out:
            out[name] = {"run_id": r.info.run_id, "model": params.get("model"), "objective": params.get("method")}
            out[name].update(r.data.metrics)
    return out


def teacher_info(order: list[str], spec: Mapping | None, stages: Mapping[str, Mapping], rows: list[dict]) -> dict:
    """Per teacher name: ``model``, ``objective`` (the stage's, else the spec's; ``checkpoint`` for a trained
    one), ``run_id`` of its stage and its :data:`DIAGNOSTICS` (``None`` where not logged)."""
    listed = {str(t["name"]): t for t in spec_teachers(spec)}
    arch = {r["teacher_name"]: r["teacher"] for r in rows if r.get("teacher_name")}
    out = {}
    for name in order:
        st, sp = stages.get(name, {}), listed.get(name, {})
        objective = st.get("objective") or ("checkpoint" if sp.get("checkpoint") else sp.get("method"))
        out[name] = {"model": st.get("model") or sp.get("model") or arch.get(name), "objective": objective}
        out[name]["run_id"] = st.get("run_id")
        out[name].update({k: _finite(st.get(k)) for k in DIAGNOSTICS + MORE_DIAGNOSTICS})
    return out


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


# --------------------------------------------------------------------------- the statistics
@dataclass(frozen=True)
class Welch:
    """Δ = mean(b) − mean(a) and its uncertainty; ``note`` says why there is none (then t, p, df, CI are None)."""

    diff: float
    t: float | None = None
    p: float | None = None
    df: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    note: str | None = None


def welch(a: list[float], b: list[float], level: float = 0.95) -> Welch:
    """Welch's two-sided t-test of ``b`` against ``a`` (``scipy.stats.ttest_ind(b, a, equal_var=False)``) and the
    ``level`` confidence interval of mean(b) − mean(a): Δ ± t_{(1+level)/2, ν} · se, se² = s_a²/n_a + s_b²/n_b,
    ν = se⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1)) (Welch–Satterthwaite)."""
    diff = statistics.fmean(b) - statistics.fmean(a)
    if len(a) < 2 or len(b) < 2:
        return Welch(diff, note=NA_SEEDS)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return Welch(diff, note=NA_SPREAD)
    from scipy import stats

    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    res = stats.ttest_ind(b, a, equal_var=False)
    half = float(stats.t.ppf((1 + level) / 2, df)) * math.sqrt(va + vb)
    return Welch(diff, float(res.statistic), float(res.pvalue), df, diff - half, diff + half)


def _values(row: Mapping | None) -> list[float]:
    return [] if row is None else [float(v) for v in row.get("test_accs") or [] if _finite(v) is not None]


def comparison(rows: list[dict], order: list[str], methods: list[str] | None = None) -> list[dict]:
    """One dict per (data, teacher architecture, student, method) with named teachers: ``data``, ``teacher``
    (architecture), ``student``, ``method``, ``teachers`` (the names of that data set and architecture, in
    ``order``; the first is the reference), ``cells`` (name -> mean, std, n, values, val_agree, val_kl_teacher;
    ``None`` where that teacher has no row) and ``diffs`` (name -> :class:`Welch` against the reference, ``None``
    where a side has no test accuracy)."""
    named = [r for r in rows if r.get("teacher_name")]
    rank = {n: i for i, n in enumerate(order)}
    mrank = {m: i for i, m in enumerate(methods or [])}
    by_key: dict[tuple, dict[str, dict]] = {}
    names: dict[tuple, set[str]] = {}
    for r in named:
        by_key.setdefault((r["data"], r["teacher"], r["student"], r["method"]), {})[r["teacher_name"]] = r
        names.setdefault((r["data"], r["teacher"]), set()).add(r["teacher_name"])
    students = list(dict.fromkeys(r["student"] for r in named))

    def sort_key(key: tuple) -> tuple:
        data, arch, student, method = key
        return data, arch, students.index(student), mrank.get(method, len(mrank)), method

    out = []
    for (data, arch, student, method), by_name in sorted(by_key.items(), key=lambda kv: sort_key(kv[0])):
        those = sorted(names[(data, arch)], key=lambda n: (rank.get(n, len(rank)), n))
        cells = {n: _cell(by_name[n]) if n in by_name else None for n in those}
        ref = _values(by_name.get(those[0]))
        diffs = {}
        for n in those[1:]:
            other = _values(by_name.get(n))
            diffs[n] = welch(ref, other) if ref and other else None
        out.append(
            {"data": data, "teacher": arch, "student": student, "method": method, "teachers": those}
            | {"cells": cells, "diffs": diffs}
        )
    return out


def _cell(row: Mapping) -> dict:
    vals = _values(row)
    return {
        "mean": statistics.fmean(vals) if vals else None,
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "n": len(vals),
        "values": vals,
        **{k: row.get(k) for k in TEACHER_FIT},
        "run_ids": list(row.get("run_ids") or []),
    }


# --------------------------------------------------------------------------- formatting
def fmt_p(p: float | None) -> str:
    if p is None:
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def fmt_cell(cell: Mapping | None, with_n: bool = True) -> str:
    if cell is None or cell["mean"] is None:
        return "-"
    s = f"{cell['mean']:.2f}" + (f" ± {cell['std']:.2f}" if cell["std"] is not None else "")
    return s + (f" (n={cell['n']})" if with_n else "")


def fmt_diff(w: Welch | None) -> tuple[str, str, str]:
    """(Δ, 95% CI, p) cells."""
    if w is None:
        return "-", "-", "-"
    if w.note:
        return f"{w.diff:+.2f}", w.note, "n/a"
    return f"{w.diff:+.2f}", f"[{w.ci_low:+.2f}, {w.ci_high:+.2f}]", fmt_p(w.p)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _fit(cells: Mapping[str, Mapping | None], names: list[str], key: str, digits: int) -> str:
    return " / ".join(_num((cells.get(n) or {}).get(key), digits) for n in names)


def _label(name: str, info: Mapping[str, Mapping]) -> str:
    """A teacher's column: its name, and its objective where that is not the name (``t1 (mse)``)."""
    objective = (info.get(name) or {}).get("objective")
    return name if not objective or objective == name else f"{name} ({objective})"


def _names_of(items: list[dict], arch: str) -> list[str]:
    return next(c["teachers"] for c in items if c["teacher"] == arch)


def _tables(comp: list[dict]) -> dict[tuple[str, str], list[dict]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for c in comp:
        out.setdefault((c["data"], c["teacher"]), []).append(c)
    return out


def _comparison_table(items: list[dict], fmt: str) -> str:
    names = items[0]["teachers"]
    ref, others = names[0], names[1:]
    header = ["teacher -> student", "method", *names]
    for o in others:
        header += [f"Δ {o} − {ref}", "95% CI", "p (Welch)"]
    logged = {k for c in items for cell in c["cells"].values() for k in TEACHER_FIT if (cell or {}).get(k) is not None}
    fits = [k for k in TEACHER_FIT if k in logged]
    header += [f"{k} ({' / '.join(names)})" for k in fits]
    body = []
    for c in items:
        line = [f"{c['teacher']} -> {c['student']}", c["method"], *(fmt_cell(c["cells"][n]) for n in names)]
        for o in others:
            line += list(fmt_diff(c["diffs"][o]))
        line += [_fit(c["cells"], names, k, 2 if k == "val_agree" else 4) for k in fits]
        body.append(line)
    return table(header, body, fmt=fmt)


def _teachers_table(order: list[str], info: Mapping[str, Mapping], fmt: str) -> str:
    body = []
    for n in order:
        t = info[n]
        body.append([n, t.get("model") or "-", t.get("objective") or "-", _num(t.get("test_acc"), 2)])
        body[-1] += [_num(t.get(k), 4) for k in DIAGNOSTICS[1:]]
    return table(["teacher", "model", "objective", *DIAGNOSTICS], body, fmt=fmt)


@dataclass
class TeacherComparison:
    """What the report shows of a sweep of several teachers: ``order`` (teacher names), ``info``
    (:func:`teacher_info`), ``rows`` (:func:`comparison`)."""

    order: list[str]
    info: dict[str, dict[str, Any]]
    rows: list[dict]

    def text(self) -> str:
        lines = [
            f"teacher comparison ({', '.join(self.order)}): test_acc of each (teacher, student, method)'s best "
            "configuration (chosen on validation), mean ± sample std over its seeds (n)"
        ]
        for (data, arch), items in _tables(self.rows).items():
            lines += [f"data: {data}, teachers {arch}: {', '.join(items[0]['teachers'])}"]
            lines += [_comparison_table(items, "simple"), ""]
        lines += [TEST_NOTE, "", "teachers (their own test metrics, from the stage run that trained each):"]
        lines += [_teachers_table(self.order, self.info, "simple")]
        return "\n".join(lines)

    def markdown(self) -> str:
        out = ["## Teacher comparison", ""]
        for data in dict.fromkeys(c["data"] for c in self.rows):
            out += [f"### {data}: test accuracy (%) of the students by teacher", "", self._paper_table(data), ""]
            out += [PAPER_NOTE, ""]
            for (d, _), items in _tables(self.rows).items():
                if d == data:
                    out += [_comparison_table(items, "github"), ""]
        out += [TEST_NOTE + ".", "", "### Teachers", "", _teachers_table(self.order, self.info, "github")]
        return "\n".join(out) + "\n"

    def _paper_table(self, data: str) -> str:
        items = [c for c in self.rows if c["data"] == data]
        pairs = list(dict.fromkeys((c["teacher"], c["student"]) for c in items))
        cols = [(arch, student, n) for arch, student in pairs for n in _names_of(items, arch)]
        header = ["teacher -> student"]
        for i, (arch, student, _) in enumerate(cols):
            header.append(f"{arch} -> {student}" if i == 0 or cols[i - 1][:2] != (arch, student) else "")
        body = [["teacher", *(_label(n, self.info) for _, _, n in cols)]]
        body += [["teacher's own test_acc", *(_num(self.info[n].get("test_acc"), 2) for _, _, n in cols)]]
        for method in dict.fromkeys(c["method"] for c in items):
            cells = {(c["teacher"], c["student"]): c["cells"] for c in items if c["method"] == method}
            line = [method]
            for arch, student, n in cols:
                pair = cells.get((arch, student)) or {}
                means = [x["mean"] for x in pair.values() if x is not None and x["mean"] is not None]
                cell = pair.get(n)
                text = fmt_cell(cell, with_n=False)
                if len(means) > 1 and cell is not None and cell["mean"] == max(means):
                    text = f"**{text}**"
                line.append(text)
            body.append(line)
        return table(header, body, fmt="github")


def teacher_comparison(
    client, experiment_id: str, rows: list[dict], spec: Mapping | None = None
) -> TeacherComparison | None:
    """The comparison of a sweep whose rows name 2 or more teachers, else ``None`` (a sweep of one teacher)."""
    names = teacher_names(rows)
    if len(names) < 2:
        return None
    order = teacher_order(names, spec)
    methods = method_order({r["method"] for r in rows}, spec)
    info = teacher_info(order, spec, teacher_stages(client, experiment_id, names), rows)
    return TeacherComparison(order, info, comparison(rows, order, methods))
