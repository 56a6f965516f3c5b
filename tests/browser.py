"""A finished sweep as a person sees it: ``kdtune dashboard`` started for real, MLflow's UI and optuna-dashboard
opened in headless Chromium (Playwright), what each page shows read back, and a screenshot of each page.

Used by ``tests/test_browser.py`` (a small sweep it runs) and by ``make screenshots`` (the demo experiment, into
``docs/screenshots``)::

    python -m tests.browser runs/sweeps/digits-demo docs/screenshots

Chromium: ``$KDTUNE_CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH (Debian's
``chromium`` package: ``.ci/setup-chromium.sh``), else Playwright's own download (``playwright install
chromium``). :func:`chromium` says why when there is none.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
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


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m tests.browser <experiment folder> <screenshot folder>")
    got = shoot(Path(sys.argv[1]), Path(sys.argv[2]))
    print("\n".join(got["shots"]))
