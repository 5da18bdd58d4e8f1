"""`kiln serve` registers the deployments and the refresh schedule; a refresh reads only new files."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.deployments import corpus_refresh
from pipelines.sample_crawl import STAGE as SAMPLE, SampleCrawlConfig
from storage import ArtifactStore


@pytest.fixture
def crawl_files(tmp_path):
    """Four real WARC files: the offline sample crawl, split four ways."""
    store = ArtifactStore(tmp_path / "crawl-maker")
    manifest = SAMPLE.run(SampleCrawlConfig(max_pages=120, files=4), [], store)
    paths = []
    for entry in manifest.files:
        target = tmp_path / "crawl-source" / Path(entry.path).name
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(store.local_path(manifest, entry.path), target)
        paths.append(target)
    return sorted(paths)


def test_refresh_ingests_only_the_new_file(prefect_server, tmp_path, crawl_files):
    crawl_dir = tmp_path / "crawl"
    crawl_dir.mkdir()
    for path in crawl_files[:3]:
        shutil.copyfile(path, crawl_dir / path.name)
    data = str(tmp_path / "data")
    settings = dict(base_config="tiny", data_dir=data, until="dedup")
    first = corpus_refresh(crawl=[str(crawl_dir)], **settings)
    assert first["ingest"]["manifest"]["stats"]["files"] == 3

    assert corpus_refresh(crawl=[str(crawl_dir)], **settings) == {}, "no new file: nothing to do"

    shutil.copyfile(crawl_files[3], crawl_dir / crawl_files[3].name)
    second = corpus_refresh(crawl=[str(crawl_dir)], **settings)
    ingest = second["ingest"]["manifest"]
    assert ingest["stats"]["files"] == 1 and ingest["sources"][0]["url"].endswith(crawl_files[3].name)
    assert ingest["stats"]["documents_out"] == 30, "the new file's 30 pages, and only those"
    assert second["dedup"]["manifest"]["inputs"][1] == first["dedup"]["manifest"]["fingerprint"], \
        "deduplicated against the earlier corpus"


def prefect_env(tmp_path) -> dict:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": os.environ["PREFECT_HOME"],
            "COLUMNS": "250"}  # wide enough that `prefect deployment ls` prints whole names


@pytest.mark.slow
def test_kiln_serve_registers_deployments_and_schedule(prefect_server, tmp_path, crawl_files):
    env = prefect_env(tmp_path)
    served = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--data-dir", str(tmp_path / "data"),
         "--refresh-input", str(tmp_path / "crawl"), "--cron", "*/30 * * * *"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline, listing = time.time() + 180, ""
        while time.time() < deadline and "kiln-corpus-refresh" not in listing:
            assert served.poll() is None, served.stdout.read()
            time.sleep(2)
            listing = subprocess.run([sys.executable, "-m", "prefect", "deployment", "ls"], env=env,
                                     capture_output=True, text=True).stdout
        for name in ("kiln-pipeline", "kiln-clean", "kiln-pretrain", "kiln-corpus-refresh"):
            assert name in listing, listing
        inspected = subprocess.run([sys.executable, "-m", "prefect", "deployment", "inspect",
                                    "corpus-refresh/kiln-corpus-refresh", "--output", "json"],
                                   env=env, capture_output=True, text=True)
        details = json.loads(inspected.stdout)
        assert details["schedules"][0]["schedule"]["cron"] == "*/30 * * * *"
        clean = json.loads(subprocess.run([sys.executable, "-m", "prefect", "deployment", "inspect",
                                           "stage-clean/kiln-clean", "--output", "json"],
                                          env=env, capture_output=True, text=True).stdout)
        form = clean["parameter_openapi_schema"]["properties"]["config"]
        assert "gopher_quality" in json.dumps(clean["parameter_openapi_schema"]), "the stage config is the form"
        assert form, "a form for the clean settings"
    finally:
        os.killpg(served.pid, 15)
        served.wait(timeout=30)
