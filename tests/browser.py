"""A finished sweep as a person sees it: ``kdtune dashboard`` started for real, MLflow's UI and optuna-dashboard
opened in headless Chromium (Playwright), what each page shows read back, and a screenshot of each page.

Used by ``tests/test_browser.py`` (a small sweep it runs) and by ``make screenshots`` (the demo experiment, into
``docs/screenshots``)::

    python -m tests.browser runs/sweeps/digits-demo docs/screenshots

and :func:`time_views` times how long each page takes to show its content (one line per page)::

    python -m tests.browser --time runs/sweeps/digits-demo [--repeats 3]

Chromium: ``$KDTUNE_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH (Debian's
``chromium`` package: ``.ci/setup-chromium.sh``), else Playwright's own download (``playwright install
chromium``). :func:`chromium` says why when there is none.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
VIEWPORT = {"width": 1600, "height": 900}
# Charts looked for on a trial's Model metrics tab: the curves, and bookkeeping that belongs elsewhere
CHART_KEYS = ("val_acc", "test_acc", "train_loss", "val_loss", "lr", "system/host_rss_mb", "system/orch_frac",
              "epoch", "epochs")  # fmt: skip


def chromium() -> tuple[str | None, str | None]:
    """(executable or None for Playwright's own, None) when a browser can be launched, else (None, why)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "playwright is not installed (pip install -e '.[dev]')"
    exe = os.environ.get("KDTUNE_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)  # fmt: skip
    if exe:
        return exe, None
    cache = Path(os.environ.get("PLAYWRIGHT_BROWSERS_PATH", Path.home() / ".cache" / "ms-playwright"))
    if any(cache.glob("chromium*")):
        return None, None
    return None, "no Chromium: install Debian's chromium (.ci/setup-chromium.sh) or run `playwright install chromium`"


class Dashboard:
    """``kdtune dashboard <exp>`` in a subprocess: its printed addresses, stopped with Ctrl-C on exit."""

    def __init__(self, exp: Path, timeout_s: float = 240.0):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "kdtune", "dashboard", str(exp)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(ln.rstrip() for ln in self.proc.stdout),
                                       daemon=True)  # fmt: skip
        self.reader.start()
        deadline = time.monotonic() + timeout_s  # a busy 2-core machine: MLflow's server takes its time
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self._get("trials:") and any(ln.startswith("Optuna dashboard is answering") for ln in self.lines):
                break
            time.sleep(0.5)
        self.trials_url = self._get("trials:")
        self.mlflow_url = self._get("MLflow UI:")
        self.optuna_url = self._get("Optuna dashboard:")
        if not (self.trials_url and self.optuna_url):
            self.close()
            raise RuntimeError("kdtune dashboard did not print its addresses:\n" + "\n".join(self.lines))

    def _get(self, prefix: str) -> str | None:
        for ln in list(self.lines):
            if ln.strip().startswith(prefix):
                return ln.strip()[len(prefix) :].split()[0]
        return None

    def pid(self, prefix: str) -> int | None:
        """The process (group) id a server's line names: ``MLflow UI: http://... (pid 123)``."""
        for ln in list(self.lines):
            if ln.strip().startswith(prefix) and "(pid " in ln:
                return int(ln.split("(pid ")[1].split(")")[0])
        return None

    def close(self) -> int | None:
        """Ctrl-C, as a person stops it; then every line it printed is in :attr:`lines`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(timeout=30)
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _settle(page, text: str, timeout_ms: int = 60000) -> None:
    """Wait until ``text`` is on the page (MLflow's pages render in several passes), then a moment more."""
    page.get_by_text(text, exact=False).filter(visible=True).first.wait_for(timeout=timeout_ms)
    page.wait_for_timeout(1500)


def _shot(page, out: Path, name: str) -> str:
    # MLflow 3.17 opens its "MLflow Assistant" side panel (an LLM chat, unused here) over a third of the page
    close = page.locator("button[aria-label='Close']").filter(visible=True)
    if page.get_by_text("Ask questions about your experiments").filter(visible=True).count() and close.count():
        close.last.click()
        page.wait_for_timeout(800)
    path = out / f"{name}.png"
    page.screenshot(path=str(path))
    return str(path)


def study_id(exp: Path, group: str) -> int:
    import optuna

    return optuna.storages.RDBStorage(f"sqlite:///{exp / 'optuna.db'}").get_study_id_from_name(group)


def shoot(exp: Path, out: Path) -> dict:
    """Open the experiment's pages, screenshot each into ``out`` and return what they showed:

    - ``runs``: the trials view of the runs table: its column headers and the run names it lists;
    - ``trial``: the best trial's Model metrics tab: its text, and for each of :data:`CHART_KEYS` whether the
      tab has that chart;
    - ``parent``: the sweep's parent run: its description, metrics and artifacts as the page shows them;
    - ``studies``: optuna-dashboard's study list; ``study`` and ``study_trials``: the page and the trial list
      of the study of the group with the most trials (objective name, states).
    """
    from mlflow import MlflowClient
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    from kdtune.tracking.client import search_all_runs

    exe, why = chromium()
    if why:
        raise RuntimeError(why)
    out.mkdir(parents=True, exist_ok=True)
    results = json.loads((exp / "results.json").read_text())
    client = MlflowClient(f"sqlite:///{exp / 'mlflow.db'}")
    eid = client.get_experiment_by_name(results["name"]).experiment_id
    runs = search_all_runs(client, [eid])
    trials = [r for r in runs if r.data.tags.get("kdtune.role") == "trial"]
    parent = next(r for r in runs if r.data.tags.get("kdtune.role") == "parent")
    best = max(trials, key=lambda r: r.data.metrics.get(results["metric"], float("-inf")))
    seen: dict = {"shots": []}
    with Dashboard(exp) as dash, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=ARGS)
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60000)
        base = dash.mlflow_url

        page.goto(dash.trials_url)
        _settle(page, best.info.run_name)
        page.wait_for_timeout(1500)
        seen["runs"] = {"headers": [h.strip() for h in page.locator("[role=columnheader]").all_inner_texts() if h.strip()],
                        "text": page.inner_text("body"), "url": page.url}  # fmt: skip
        seen["shots"].append(_shot(page, out, "mlflow-runs"))

        # a trial's page as a person reaches it: its name in the table, then the Model metrics tab
        page.get_by_role("link", name=best.info.run_name, exact=True).first.click()
        _settle(page, "Model metrics")
        page.get_by_role("tab", name="Model metrics").first.click()
        _settle(page, results["metric"])
        page.wait_for_timeout(3000)  # the charts draw after their data arrives
        seen["trial"] = {"text": page.inner_text("body"), "name": best.info.run_name, "charts": {}}
        seen["shots"].append(_shot(page, out, "mlflow-trial-charts"))
        # the tab draws only the charts in view: filter by name, and look for the chart's legend
        search = page.get_by_placeholder("Search metric charts")
        for key in CHART_KEYS:
            search.fill(key)
            legend = page.get_by_text(f"{best.info.run_name} ({key})", exact=True).filter(visible=True)
            try:
                legend.first.wait_for(timeout=5000)
                seen["trial"]["charts"][key] = True
            except PlaywrightTimeout:  # no such chart on this tab
                seen["trial"]["charts"][key] = False
        search.fill("")

        page.goto(f"{base}/#/experiments/{eid}/runs/{parent.info.run_id}")
        _settle(page, "Description")
        seen["parent"] = {"text": page.inner_text("body"), "name": parent.info.run_name}
        seen["shots"].append(_shot(page, out, "mlflow-parent"))

        page.goto(dash.optuna_url + "/dashboard")
        group = max(results["groups"], key=lambda g: g.get("trials", 0))["group"]  # the group with most trials
        _settle(page, group)
        seen["studies"] = {"text": page.inner_text("body")}
        seen["shots"].append(_shot(page, out, "optuna-studies"))
        page.goto(f"{dash.optuna_url}/dashboard/studies/{study_id(exp, group)}")
        _settle(page, "History")
        page.wait_for_timeout(2000)
        seen["study"] = {"text": page.inner_text("body"), "group": group, "url": page.url}
        seen["shots"].append(_shot(page, out, "optuna-study"))
        page.goto(page.url.rstrip("/") + "/trials")
        _settle(page, "Trial")
        seen["study_trials"] = {"text": page.inner_text("body")}
        seen["shots"].append(_shot(page, out, "optuna-trials"))
        browser.close()
    seen["trial_names"] = sorted(r.info.run_name for r in trials)
    return seen


# ---------------------------------------------------------------------------------------------- page timings
_RUN_LINK = ".ag-row .ag-cell[col-id='attributes.`Run Name`'] a"  # a run's name in the runs table (ag-grid)


def _get_json(url: str, timeout_s: float = 60.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def _saved_views(base: str, name: str) -> tuple[str, dict[str, dict]]:
    """(experiment id, ``{view id: {"name", "state"}}``) of experiment ``name`` as MLflow's server has it."""
    from kdtune.tracking.views import views_of

    q = urllib.parse.quote(name)
    got = _get_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={q}")
    exp = got["experiment"]
    return str(exp["experiment_id"]), views_of((t["key"], t["value"]) for t in exp.get("tags", []))


class _Requests:
    """The API requests a page makes, per load: path, seconds to the answer's first byte and to its end, and
    for MLflow's runs/search the ``max_results`` asked and the runs answered."""

    def __init__(self, page, pattern: str):
        self.pattern, self.now = re.compile(pattern), []
        page.on("requestfinished", self._done)

    def _done(self, req) -> None:
        if self.pattern.search(req.url):
            self.now.append(req)

    def take(self, since: float | None = None) -> list[dict]:
        """The requests finished since the last take; ``since`` (``time.time()`` at the navigation's start)
        adds when each one was sent (``at_s``) and done (``done_s``), counted from then."""
        out = []
        for req in self.now:
            t = req.timing  # ms, from the request's start (startTime: ms since the epoch)
            row = {"path": urllib.parse.urlsplit(req.url).path, "ttfb_s": round(t["responseStart"] / 1000, 2),
                   "total_s": round(t["responseEnd"] / 1000, 2)}  # fmt: skip
            if since is not None:
                row["at_s"] = round(t["startTime"] / 1000 - since, 2)
                row["done_s"] = round(row["at_s"] + t["responseEnd"] / 1000, 2)
            if req.url.endswith("/runs/search"):
                try:
                    row["max_results"] = json.loads(req.post_data or "{}").get("max_results")
                    body = req.response().json()
                    row["runs"], row["more"] = len(body.get("runs", [])), bool(body.get("next_page_token"))
                    row["bytes"] = len(req.response().body())
                except Exception as e:  # noqa: BLE001 - a log, not a check
                    row["error"] = type(e).__name__
            out.append(row)
        self.now = []
        return out


def _timed_load(page, url: str, ready, log: _Requests, timeout_ms: float) -> tuple[float | None, dict]:
    """Seconds from the navigation's start until ``ready(page, timeout_ms)`` returns (None: it timed out), from a
    blank page so that each load is a whole page load; then what ``ready`` read back, and the API requests."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.goto("about:blank")
    log.take()
    t0, wall0 = time.monotonic(), time.time()
    try:
        page.goto(url, wait_until="commit", timeout=timeout_ms)
        shown = ready(page, timeout_ms) or {}
        took: float | None = time.monotonic() - t0
    except PlaywrightTimeout as e:
        took, shown = None, {"timeout": str(e).splitlines()[0]}
    # the page's own clock: its document's DOMContentLoaded and load, from the navigation's start
    nav = page.evaluate("() => { const n = performance.getEntriesByType('navigation')[0];"
                        " return n ? [n.domContentLoadedEventEnd, n.loadEventEnd] : [0, 0]; }")  # fmt: skip
    shown["dcl_s"], shown["load_s"] = round(nav[0] / 1000, 2), round(nav[1] / 1000, 2)
    shown["requests"] = log.take(wall0)
    return took, shown


def _mlflow_ready(view: dict):
    """The runs table on a saved view is shown: a run's name in its first row, and the view's sort column (else
    its first column) as a header; then reads back the rows drawn, "N matching runs", the view's columns drawn."""
    state = view["state"]
    cols = list(state.get("selectedColumns") or [])
    key = state.get("orderByKey") if state.get("orderByKey") in cols else (cols[0] if cols else None)

    def ready(page, timeout_ms):
        page.locator(_RUN_LINK).first.wait_for(state="visible", timeout=timeout_ms)
        if key:
            header = page.locator(f".ag-header-cell[col-id='{key}']").first
            header.wait_for(state="visible", timeout=timeout_ms)
        ids = "es => es.map(e => e.getAttribute('col-id'))"
        headers = page.locator(".ag-header-cell[col-id]").evaluate_all(ids)
        matching = re.findall(r"(\d+) matching runs?", page.inner_text("body"))
        return {"rows": page.locator(".ag-center-cols-container .ag-row").count(),
                "matching": int(matching[0]) if matching else None,
                "columns": [c for c in cols if c in headers], "view_columns": cols}  # fmt: skip

    return ready


def _optuna_ready(page, timeout_ms):
    """A study's page is shown: its History plot has drawn its points; reads back the points of its first trace
    (one per trial shown)."""
    card = page.locator(".MuiCard-root").filter(has=page.locator("h6", has_text=re.compile(r"^History$")))
    card.locator(".scatterlayer .point").first.wait_for(state="visible", timeout=timeout_ms)
    return {"trials": card.locator(".scatterlayer .trace").first.locator(".point").count()}


def time_views(exp: Path, repeats: int = 3, timeout_s: float = 120.0) -> dict:
    """Time, in headless Chromium, how long ``exp``'s pages take to show their content.

    Starts ``kdtune dashboard <exp>`` (``startup_s``: until it printed its addresses and optuna-dashboard answers),
    then loads ``repeats`` times each saved MLflow view of the experiment (``#/experiments/<id>/runs?
    viewStateShareKey=<view>``: ready when a run's name shows in the table's first row and the view's sort column
    is a header) and each study's page in optuna-dashboard (ready when its History plot has drawn its points).
    A page's first load is cold (a new browser context: nothing cached; the first page also meets servers
    just started), the others warm. Each load starts from a blank page, so it is a whole page load.

    Returns ``{"experiment", "startup_s", "pages": [{"kind": "mlflow"|"optuna", "name", "url", "times"
    (seconds, None where it timed out), "cold_s", "median_s", "loads" (per load, what it read back; the page's
    own DOMContentLoaded and load, ``dcl_s`` and ``load_s``; the API requests that load made: when sent and
    done, seconds to first byte and to the end, the runs asked and answered)}]}``.
    """
    import statistics

    from playwright.sync_api import sync_playwright

    from kdtune.tracking.views import runs_url

    exe, why = chromium()
    if why:
        raise RuntimeError(why)
    exp = Path(exp)
    timeout_ms = timeout_s * 1000
    t0 = time.monotonic()
    with Dashboard(exp) as dash, sync_playwright() as pw:
        startup = time.monotonic() - t0
        todo = []  # (kind, name, url, ready, request pattern)
        if dash.mlflow_url:
            eid, views = _saved_views(dash.mlflow_url, exp.name)
            for vid, view in sorted(views.items(), key=lambda kv: kv[0] != "kdtune-trials"):
                url = runs_url(dash.mlflow_url, eid, vid)
                todo.append(("mlflow", vid, url, _mlflow_ready(view), r"/runs/search"))
        studies = _get_json(f"{dash.optuna_url}/api/studies")["study_summaries"]
        for st in sorted(studies, key=lambda s: s["study_id"]):
            todo.append(("optuna", st["study_name"], f"{dash.optuna_url}/dashboard/studies/{st['study_id']}",
                         _optuna_ready, r"/api/studies/\d+(\?|$)"))  # fmt: skip
        browser = pw.chromium.launch(executable_path=exe, args=ARGS)
        pages = []
        for kind, name, url, ready, pattern in todo:
            context = browser.new_context(viewport=VIEWPORT)  # cold: a context of its own, nothing cached
            page = context.new_page()
            log = _Requests(page, pattern)
            times, loads = [], []
            for _ in range(max(1, repeats)):
                took, seen = _timed_load(page, url, ready, log, timeout_ms)
                times.append(None if took is None else round(took, 2))
                loads.append(seen)
            context.close()
            done = [t for t in times if t is not None]
            pages.append({"kind": kind, "name": name, "url": url, "times": times, "cold_s": times[0],
                          "median_s": round(statistics.median(done), 2) if done else None, "loads": loads})  # fmt: skip
        browser.close()
    return {"experiment": str(exp), "startup_s": round(startup, 2), "pages": pages}


def timing_lines(got: dict) -> list[str]:
    """One readable line per page of :func:`time_views`' answer, after the dashboard's start-up."""

    def sec(t):
        return "timeout" if t is None else f"{t:5.2f}s"

    def load(s):  # when the document loaded, and when its data request was sent and answered
        reqs = [f"{r['path'].split('/')[-1] if 'runs' in r['path'] else 'study'} {r.get('at_s')}->{r.get('done_s')}s"
                + (f" ({r['runs']} runs of max {r['max_results']}{', more' if r.get('more') else ''})"
                   if "runs" in r else "") for r in s.get("requests", [])]  # fmt: skip
        return f"doc {s.get('load_s')}s, " + (", ".join(reqs) or "no data request")

    out = [f"{got['experiment']}: dashboard start-up {got['startup_s']:.2f}s (to its printed addresses)"]
    for p in got["pages"]:
        s = p["loads"][-1]
        what = (f"{s.get('rows')} rows drawn, '{s.get('matching')} matching runs', view columns drawn "
                f"{len(s.get('columns', []))}/{len(s.get('view_columns', []))}" if p["kind"] == "mlflow"
                else f"History plot: {s.get('trials')} trials")  # fmt: skip
        if "timeout" in s:
            what = "TIMED OUT: " + s["timeout"]
        out.append(f"{p['kind']:6} {p['name']:<28} cold {sec(p['cold_s'])}  median {sec(p['median_s'])}  "
                   f"({' '.join(sec(t).strip() for t in p['times'])}) | {what} | cold: {load(p['loads'][0])}"
                   f" | warm: {load(s)}")  # fmt: skip
    return out


def main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m tests.browser", description=__doc__.split("\n\n")[0])
    ap.add_argument("experiment", type=Path, help="a finished sweep's folder")
    ap.add_argument("screenshots", type=Path, nargs="?", help="where the screenshots go (without --time)")
    ap.add_argument("--time", action="store_true", help="time each page's load instead (time_views)")
    ap.add_argument("--repeats", type=int, default=3, help="loads per page with --time, the first cold (3)")
    ap.add_argument("--json", type=Path, help="with --time: also write the whole answer here")
    args = ap.parse_args(argv)
    if args.time:
        got = time_views(args.experiment, repeats=args.repeats)
        print("\n".join(timing_lines(got)))
        if args.json:
            args.json.write_text(json.dumps(got, indent=1))
        return 0
    if args.screenshots is None:
        ap.error("give a screenshot folder, or --time")
    got = shoot(args.experiment, args.screenshots)
    print("\n".join(got["shots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
