"""The whole pipeline as one flow: cached reruns, partial reruns, a killed run resumed, two at once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.config import load_config
from flows.pipeline import pipeline_flow
from flows.terminal_tables import statuses_from_output
from storage import ArtifactStore

# The tiny preset, cut down: the same chain, a few training steps.
QUICK = [
    "sample_crawl.max_pages=120", "ingest.workers=1", "clean.workers=1",
    "pretrain.train.max_steps=8", "pretrain.train.checkpoint_every=2", "pretrain.train.eval_every=4",
    "pretrain.train.eval_batches=1", "pretrain.train.log_every=2", "pretrain.train.batch_size=8",
    "sft.train.max_steps=4", "sft.train.eval_every=4", "sft.train.eval_batches=1", "sft.train.batch_size=4",
    "dpo.train.max_steps=4", "dpo.train.eval_every=4", "dpo.train.eval_batches=1", "dpo.train.batch_size=4",
    "evaluate.eval_batches=2", "evaluate.mc_questions=10", "evaluate.sample_tokens=10",
]


def statuses(runs: dict) -> dict[str, str]:
    return {stage: "cached" if run["cached"] else "built" for stage, run in runs.items()}


@pytest.mark.slow
def test_whole_pipeline_cached_rerun_and_clean_change(prefect_server, tmp_path):
    data = str(tmp_path / "data")
    state = pipeline_flow(config=load_config(overrides=QUICK), data_dir=data, return_state=True)
    first = state.result()
    assert set(statuses(first).values()) == {"built"}
    assert "val_bpb" in first["evaluate"]["manifest"]["stats"]
    artifacts = run_artifacts(state.state_details.flow_run_id)
    for key in ("clean-summary", "clean-dropped", "dedup-dropped", "tokenizer-summary", "pretrain-loss-curve",
                "sft-loss-curve", "dpo-loss-curve", "evaluate-summary", "evaluate-sample", "pack-files",
                "pretrain-tensorboard"):
        assert key in artifacts, f"the run carries {key}: {sorted(artifacts)}"
    assert "gopher_repetition" in artifacts["clean-dropped"], "clean's rejects, by filter"
    assert "Sample chat" in artifacts["evaluate-sample"] and "val_bpb" in artifacts["evaluate-summary"]

    again = pipeline_flow(config=load_config(overrides=QUICK), data_dir=data)
    assert {run["state"] for run in again.values()} == {"Cached"}, "every stage is a Prefect cache hit"

    changed = pipeline_flow(config=load_config(overrides=QUICK + ["clean.gopher_quality.min_doc_words=60"]),
                            data_dir=data)
    before = ["sample-crawl", "ingest"]
    assert [s for s, status in statuses(changed).items() if status == "cached"] == before, \
        "clean and everything after it reran, nothing before it"


def run_artifacts(flow_run_id) -> dict[str, str]:
    """key -> data of every artifact the flow run's tasks published."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        run_filter = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        found = client.read_artifacts(artifact_filter=run_filter)
    return {a.key: str(a.data) for a in found if a.key}


def kiln(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def cli_env(tmp_path: Path) -> dict:
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(home), "KILN_NO_PROGRESS": "1"}


def run_args(data: Path) -> list[str]:
    return ["run", "--data-dir", str(data), *[a for s in QUICK for a in ("--set", s)]]


@pytest.mark.slow
def test_run_killed_during_pretraining_resumes_from_its_checkpoint(tmp_path):
    env, data = cli_env(tmp_path), tmp_path / "data"
    victim = kiln(run_args(data), env)
    deadline = time.time() + 600
    while not list((data / "pretrain").glob(".staging-*/checkpoints/step-00000004")):
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()

    retry = kiln(run_args(data), env)
    output, _ = retry.communicate(timeout=900)
    assert retry.returncode == 0, output
    manifest = ArtifactStore(data).list("pretrain")[0]
    log = ArtifactStore(data).local_path(manifest, "train.log").read_text()
    assert "resumed from step-0000000" in log, "the retry continued from the checkpoint, not from step 0"
    metrics = ArtifactStore(data).local_path(manifest, "metrics.jsonl").read_text()
    steps = [json.loads(line)["step"] for line in metrics.splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_two_runs_at_once_on_one_data_dir(tmp_path):
    env, data = cli_env(tmp_path), tmp_path / "data"
    first, second = kiln(run_args(data), env), kiln(run_args(data), env)
    outputs = [p.communicate(timeout=900)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, "\n".join(outputs)
    store = ArtifactStore(data)
    for stage in ("ingest", "clean", "dedup", "tokenizer", "pack", "pretrain", "sft", "dpo", "evaluate"):
        assert len(store.list(stage)) == 1, f"one {stage} artifact, built once and shared"
        assert store.problems(store.list(stage)[0], "sha256") == []
    assert not list(data.rglob(".staging-*")), "no leftovers"
    built = [statuses_from_output(output) for output in outputs]
    for stage in ("pack", "pretrain", "sft", "dpo", "evaluate"):
        assert sorted(b[stage] for b in built) == ["built", "cached"], f"{stage}: one run built it, the other waited"

