"""What a user sees in a browser after the tiny DAG, driven by Playwright with Debian's chromium
(the system browser; nothing is downloaded at run time):

- the MLflow UI served by `mlflow server` on a copy of the DAG's store: the experiment's runs
  table lists one row per job with the evaluations folded into the training rows (one row per
  trial); the searches `tags.step = 'train-policy'` and `tags.method LIKE
  'dydiff%'` return exactly the expected runs; the comparison view of two trials shows the
  final normalised score (`eval/normalized_score`) of both;
- the Snakemake report (`snakemake --report`, as `make demo` writes results/report.html): every
  figure loads (natural width > 0) and every paper table renders with its rows.

Screenshots are left in results/browser-test/ (CI artefacts; docs/mlflow-runs.png is one).
Runs where chromium and the playwright package are there; as root on Debian it installs
Debian's chromium with apt-get first (as tests/test_slurm.py installs SLURM). Elsewhere it
skips and says why (pytest -ra prints the reason); DYDIFF_BROWSER_TEST=0 turns it off.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dag_helpers import ROOT, TINY, snakemake, tail
from harness import plan, tracking

pytestmark = pytest.mark.browser
SKIPPED = "browser test skipped: "
SHOTS = ROOT / "results" / "browser-test"


def _installed_chromium() -> str:
    """Debian's chromium: found, or installed with apt-get as root; else skip with the reason."""
    if os.environ.get("DYDIFF_BROWSER_TEST", "1") == "0":
        pytest.skip(SKIPPED + "DYDIFF_BROWSER_TEST=0")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip(SKIPPED + "needs the playwright package (pip install -e '.[test]')")
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip(SKIPPED + "needs chromium (as root on Debian the test installs it with "
                    "apt-get)")
    if not (Path("/etc/debian_version").exists() and shutil.which("apt-get")):
        pytest.skip(SKIPPED + "needs Debian/Ubuntu with apt-get to install chromium")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    start = time.monotonic()
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        res = subprocess.run(install, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(SKIPPED + "apt-get could not install chromium (no package registry "
                        f"reachable?): {res.stderr.strip().splitlines()[-1:]}")
    print(f"\napt-get install chromium: {time.monotonic() - start:.1f} s")
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium():
    """Session scope: decided (and installed) before the session's tiny DAG runs."""
    return _installed_chromium()


@pytest.fixture(scope="module")
def page(chromium):
    """A chromium page (1600 x 1000) on the system browser."""
    from playwright.sync_api import sync_playwright
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def mlflow_ui(page, tiny_dag, tmp_path_factory):
    """`mlflow server` on a copy of the tiny DAG's store (the server may migrate what it
    serves); yields its URL."""
    import mlflow_server
    results, _ = tiny_dag
    store = tmp_path_factory.mktemp("mlflow-ui")
    shutil.copy(results / "mlflow.db", store / "mlflow.db")
    server = mlflow_server.start(store, auth=False, workers=1)
    yield server.uri
    server.stop()


def _search(page, query: str, expected: int) -> list[str]:
    """Type a search into the runs table as a user does; the ids of the rows it lists."""
    box = page.get_by_placeholder("metrics.rmse", exact=False)  # MLflow's example search
    box.fill(query)
    box.press("Enter")
    page.get_by_text(re.compile(rf"^\s*{expected} matching runs?\s*$")).wait_for()
    rows = page.locator(".ag-pinned-left-cols-container .ag-row")
    return sorted(rows.nth(i).get_attribute("row-id") for i in range(rows.count()))


def test_mlflow_ui_one_row_per_trial_search_and_comparison(page, mlflow_ui, tiny_dag):
    results, cfg = tiny_dag
    client = tracking._client(tracking.default_uri(results))
    exp_id = client.get_experiment_by_name(cfg["name"]).experiment_id
    runs = client.search_runs([exp_id], max_results=1000)
    trials = [r for r in runs if r.data.tags["step"] == "train-policy"]
    dydiff = [r for r in trials if r.data.tags["method"].startswith("dydiff")]
    assert len(trials) == len(cfg["methods"]) * len(cfg["tasks"]) * len(cfg["seeds"])
    assert dydiff and len(dydiff) < len(trials)
    start = time.monotonic()
    # The experiment's Runs tab (MLflow 3 opens experiments on its GenAI pages by default).
    page.goto(f"{mlflow_ui}/#/experiments/{exp_id}/runs")
    jobs = [j for j in plan.all_jobs(cfg) if j["step"] != "evaluate"]
    page.get_by_text(re.compile(rf"^\s*{len(jobs)} matching runs\s*$")).wait_for()
    names = page.locator(".ag-pinned-left-cols-container .ag-row").all_inner_texts()
    assert not [n for n in names if "evaluate/" in n]
    assert _search(page, "tags.step = 'train-policy'", len(trials)) == \
        sorted(r.info.run_id for r in trials)
    assert _search(page, "tags.method LIKE 'dydiff%'", len(dydiff)) == \
        sorted(r.info.run_id for r in dydiff)
    # The README's view: trials only, with their description and final score as columns.
    _search(page, "tags.step = 'train-policy'", len(trials))
    page.get_by_role("button", name="Columns").click()
    for column in ("Source", "Models", "Description", "eval/normalized_score"):
        page.get_by_title(column, exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_role("columnheader", name="eval/normalized_score").first.wait_for()
    close = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    if close.count():  # MLflow 3's assistant panel: room for the columns
        close.click()
    page.set_viewport_size({"width": 1900, "height": 520})
    page.screenshot(path=SHOTS / "mlflow-runs.png")
    page.set_viewport_size({"width": 1600, "height": 1000})
    # Compare the first two trials: their final normalised scores side by side.
    rows = page.locator(".ag-pinned-left-cols-container .ag-row")
    pair = [rows.nth(i).get_attribute("row-id") for i in (0, 1)]
    for i in (0, 1):
        rows.nth(i).locator(".ag-selection-checkbox").click()
    page.get_by_role("button", name="Compare").click()
    page.get_by_role("link", name="eval/normalized_score", exact=True).wait_for()
    assert all(run_id in page.url for run_id in pair)
    text = page.locator("body").inner_text()
    for run_id in pair:
        score = client.get_run(run_id).data.metrics["eval/normalized_score"]
        assert f"{score:.4g}" in text, (run_id, score)  # the UI shows 4 significant digits
    page.screenshot(path=SHOTS / "mlflow-compare.png", full_page=True)
    print(f"\nMLflow UI checks: {time.monotonic() - start:.1f} s")


@pytest.fixture(scope="module")
def report(tiny_dag, tmp_path_factory):
    """The tiny DAG's Snakemake report, built as `make demo` builds results/report.html."""
    results, _ = tiny_dag
    path = tmp_path_factory.mktemp("report") / "report.html"
    res = snakemake("--cores", "1", "--configfile", str(TINY), "--config",
                    f"results_dir={results}", "--report", str(path))
    assert res.returncode == 0, tail(res)
    return path


def test_report_every_figure_loads_and_every_table_renders(page, report, tiny_dag):
    results, cfg = tiny_dag
    start = time.monotonic()
    page.goto(report.as_uri())
    entries = page.evaluate("Object.fromEntries(Object.entries(results).map("
                            "([path, r]) => [path, [r.mime_type, r.filename]]))")
    categories = page.evaluate("categories")
    figures = {str(plan.path(cfg, k)) for k in ("aggregate_intervals", "performance_profiles",
                                                 "improvement")}
    figures |= {str(plan.path(cfg, k, task=t)) for t in cfg["tasks"]
                for k in ("rollout_error_png", "rollout_error_at_h_png")}
    assert {p for p, (mime, _) in entries.items() if mime.startswith("image/")} == figures
    tables_dir = plan.path(cfg, "tables").parent
    n_tables = len(list(tables_dir.glob("table_*.md")))
    assert n_tables >= 2 and str(plan.path(cfg, "tables_html")) in entries
    checked = []
    for category, subcategories in categories.items():
        for sub, paths in subcategories.items():
            for path in paths:
                mime, name = entries[path]
                page.goto(report.as_uri())
                page.get_by_role("link", name=category, exact=True).click()
                if len(subcategories) > 1:
                    page.get_by_role("link", name=sub, exact=True).click()
                row = page.locator("tr", has=page.get_by_text(path, exact=True))
                row.locator("a[iconname=eye]").click()
                shot = SHOTS / f"report-{Path(path).parent.name}-{Path(name).stem}.png"
                if mime.startswith("image/"):
                    img = page.locator(f'img[src*="filename={name};"]')
                    img.wait_for()
                    width = img.evaluate("i => new Promise(done => i.complete ? "
                                         "done(i.naturalWidth) : i.onload = () => "
                                         "done(i.naturalWidth))")
                    assert width > 0, path
                elif mime == "text/html":
                    frame = page.frame_locator(f'iframe[src*="filename={name};"]')
                    tables = frame.locator("table")
                    if name == "tables.html":
                        tables.first.wait_for()
                        assert tables.count() == n_tables, path
                        for i in range(n_tables):
                            assert tables.nth(i).locator("tbody tr").count() >= 2, (path, i)
                            assert tables.nth(i).bounding_box()["height"] > 0, (path, i)
                    else:
                        frame.locator("h1").wait_for()
                        assert frame.locator("h1").inner_text() == "dydiff-bench summary"
                else:
                    pytest.fail(f"{path}: a {mime} result the report cannot show inline")
                page.screenshot(path=shot)
                checked.append(path)
    assert sorted(checked) == sorted(entries)
    print(f"\nreport checks ({len(checked)} results): {time.monotonic() - start:.1f} s")
