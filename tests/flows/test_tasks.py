"""The generic stage task: retries what may pass, fails fast on user errors, caches on fingerprints."""

import pytest
from prefect import flow

import flows.stages
from flows.tasks import run_stage
from pipelines.common import InputError, Stage, StageConfig, TransientError


class FlakyConfig(StageConfig):
    failures: int = 0
    error: str = "transient"


ATTEMPTS: list[int] = []


def flaky_build(config, inputs, store, writer):
    ATTEMPTS.append(1)
    if len(ATTEMPTS) <= config.failures:
        raise TransientError("crawl.example: connection reset") if config.error == "transient" \
            else InputError("crawl.warc.gz: not a WARC file")
    writer.write_bytes("out.txt", b"done")
    return {"attempts": len(ATTEMPTS)}


@pytest.fixture
def flaky_stage(monkeypatch):
    ATTEMPTS.clear()
    entry = flows.stages.StageEntry(Stage("flaky", FlakyConfig, flaky_build), (), "A stage that fails at first.")
    monkeypatch.setitem(flows.stages.STAGES, "flaky", entry)


@flow
def one_stage(config: FlakyConfig, data_dir: str) -> dict:
    return run_stage("flaky", config, [], data_dir)


def test_transient_errors_are_retried(prefect_server, flaky_stage, tmp_path):
    result = one_stage(FlakyConfig(failures=2), str(tmp_path))
    assert result["manifest"]["stats"]["attempts"] == 3 and len(ATTEMPTS) == 3


def test_input_errors_are_not_retried(prefect_server, flaky_stage, tmp_path):
    with pytest.raises(InputError, match="not a WARC file"):
        one_stage(FlakyConfig(failures=1, error="input"), str(tmp_path))
    assert len(ATTEMPTS) == 1


def test_cache_hit_needs_the_artifact(prefect_server, flaky_stage, tmp_path):
    first = one_stage(FlakyConfig(), str(tmp_path))
    second = one_stage(FlakyConfig(), str(tmp_path))
    assert not first["cached"] and second["cached"] and len(ATTEMPTS) == 1
    assert second["state"] == "Cached", "the second run is Prefect's own cache hit"
    (tmp_path / "flaky" / first["manifest"]["fingerprint"] / "out.txt").unlink()
    third = one_stage(FlakyConfig(), str(tmp_path))
    assert not third["cached"] and len(ATTEMPTS) == 2
