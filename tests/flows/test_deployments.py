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
        retry_reruns_the_failed_stage_only(env, tmp_path)
    finally:
        os.killpg(served.pid, 15)
        served.wait(timeout=30)


def wait_for_final_state(flow_run_id, timeout: float = 600):
    from prefect.client.orchestration import get_client

    deadline = time.time() + timeout
    with get_client(sync_client=True) as client:
        while time.time() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                return run
            time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} did not finish within {timeout} s")


def task_states(flow_run_id) -> dict[str, list[str]]:
    """Each stage's task run states in the flow run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    states: dict[str, list[str]] = {}
    for run in sorted(runs, key=lambda r: r.created):
        states.setdefault(run.name, []).append(run.state.name)
    return states


def retry_reruns_the_failed_stage_only(env: dict, tmp_path: Path) -> None:
    """A pipeline run of the served deployment fails at sft (its data file is not there yet);
    `prefect flow-run retry` after the file appears reruns sft, and takes every stage before it
    from the cache."""
    from prefect.deployments import run_deployment

    from flows.config import load_config
    from model.instruction_data import default_data
    from tests.flows.test_pipeline import QUICK

    instructions = tmp_path / "instructions.jsonl"
    config = load_config(overrides=QUICK + [f"sft.data={instructions}"])
    data = tmp_path / "data"
    run = run_deployment("pipeline/kiln-pipeline", timeout=0, parameters={
        "config": config.model_dump(mode="json"), "data_dir": str(data), "until": "sft"})
    failed = wait_for_final_state(run.id)
    assert failed.state.is_failed(), failed.state
    assert "instructions.jsonl" in str(failed.state.message), failed.state.message
    pretrained = ArtifactStore(data).list("pretrain")
    assert len(pretrained) == 1 and not ArtifactStore(data).list("sft")
    manifest_mtime = (data / "pretrain" / pretrained[0].fingerprint / "_manifest.json").stat().st_mtime_ns

    default_data("sft", instructions)  # the offline default instructions, as the file that was missing
    retried = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "retry", str(run.id)], env=env,
                             capture_output=True, text=True)
    assert retried.returncode == 0, retried.stdout + retried.stderr
    done = wait_for_final_state(run.id)
    assert done.state.is_completed(), done.state
    assert len(ArtifactStore(data).list("sft")) == 1, "the failed stage ran"
    assert (data / "pretrain" / pretrained[0].fingerprint / "_manifest.json").stat().st_mtime_ns == manifest_mtime
    states = task_states(run.id)
    for stage in ("sample-crawl", "ingest", "clean", "dedup", "tokenizer", "pack", "pretrain"):
        assert states[stage][-1] == "Cached", f"{stage} came back from the cache on the retry: {states[stage]}"
    assert states["sft"][-1] == "Completed", states["sft"]
