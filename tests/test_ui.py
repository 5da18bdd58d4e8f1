"""The Prefect UI in a real browser (headless Chromium): after a small pipeline run, the run's page
shows the run and its stage task runs. Screenshots are kept in test-output/.

The session's `prefect_server` (prefect_test_harness) serves the API only, never the UI
(PREFECT_UI_ENABLED=0, ephemeral), so this module starts a `prefect server start` of its own, with
the UI, in a throwaway PREFECT_HOME, and runs the flow against it in a separate process."""

import json
import re
import shutil
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.prefect_servers import clean_env, free_port, run_pipeline, start_server, stop

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "test-output"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
STAGES = ["sample-crawl", "ingest", "clean"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM, reason="no Chromium to drive (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """A Prefect server with its UI on a free port. PREFECT_UI_API_URL tells the UI where the API
    is: the UI is otherwise given the PREFECT_SERVER_API_HOST/PORT settings (127.0.0.1:4200), not
    the --port the server was started with."""
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the dev extra has it)")
    tmp = tmp_path_factory.mktemp("prefect-ui")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = clean_env(PREFECT_HOME=str(tmp / "home"), PREFECT_UI_API_URL=f"{base}/api",
                    PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp / 'prefect.db'}")
    server = start_server(port, env, tmp, tmp / "prefect-server.log")
    try:
        with urllib.request.urlopen(f"{base}/ui-settings", timeout=10) as response:
            assert json.load(response)["api_url"] == f"{base}/api"
        yield SimpleNamespace(url=base, tmp=tmp)
    finally:
        stop(server)


@pytest.fixture(scope="module")
def pipeline_run(ui_server) -> dict:
    """pipeline_flow(until="clean") on a 20-page sample crawl, against the UI's server."""
    overrides = ["sample_crawl.max_pages=20", "ingest.workers=1", "clean.workers=1"]
    run = run_pipeline(f"{ui_server.url}/api", ui_server.tmp / "client-home", ui_server.tmp / "data", "clean",
                       overrides)
    assert run["state"] == "COMPLETED"
    return run


@pytest.fixture(scope="module")
def browser(ui_server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


# v1 at the address `kiln` prints after a run ({ui}/runs/flow-run/<id>); v2 is what a browser
# without a saved preference is sent to from the UI's front page.
@pytest.mark.parametrize("ui, path", [("v1", "/runs/flow-run/{id}"), ("v2", "/v2/runs/flow-run/{id}")],
                         ids=["v1", "v2"])
def test_flow_run_page_shows_the_run_and_its_stages(ui_server, pipeline_run, browser, ui, path):
    from playwright.sync_api import expect

    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / f"prefect-ui-{ui}-flow-run.png"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(ui_server.url + path.format(id=pipeline_run["id"]), timeout=60_000)
        expect(page.get_by_text(pipeline_run["name"], exact=True).first).to_be_visible(timeout=45_000)
        expect(page.get_by_text("Completed", exact=True).first).to_be_visible()
        expect(page.get_by_text(f"{len(STAGES)} Task runs").first).to_be_visible()

        page.get_by_text("Task Runs", exact=True).first.click()  # the tab listing the run's task runs
        expect(page).to_have_url(re.compile(r"[?&]tab=Task\+?Runs"))  # (the Logs tab names tasks too)
        expect(page.get_by_text(f"{len(STAGES)} Completed").first).to_be_visible(timeout=30_000)
        for stage in STAGES:
            expect(page.get_by_text(stage, exact=True).locator("visible=true").first).to_be_visible(timeout=30_000)
        assert not page.get_by_text("Can't connect to Server API").count(), "the UI could not reach the API"
    finally:
        page.screenshot(path=str(shot), full_page=True)
        page.close()
    assert shot.stat().st_size > 10_000
