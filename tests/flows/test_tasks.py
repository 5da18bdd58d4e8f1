"""The generic stage task: retries what may pass, fails fast on user errors, caches on fingerprints."""

from pathlib import Path

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
    entry = flows.stages.StageEntry.of(Stage("flaky", FlakyConfig, flaky_build), (), "A stage that fails at first.")
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


class _Touch:
    """Unpickling this creates a file: the proof that a record was unpickled."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.mark.parametrize("serializer", ["pickle", "json-with-a-decoder"])
def test_a_planted_record_is_refused_never_deserialized(prefect_server, flaky_stage, tmp_path, serializer):
    """Reliability defect 4: Prefect reads a cached record back with the serializer the record
    names, so a record rewritten to name `pickle` was unpickled by the next run."""
    import base64
    import json

    import cloudpickle
    from prefect.settings import get_current_settings

    from flows.tasks import cache_key

    first = one_stage(FlakyConfig(), str(tmp_path))
    stage = flows.stages.STAGES["flaky"].stage
    record = Path(get_current_settings().results.local_storage_path) / cache_key(
        stage, first["manifest"]["fingerprint"], str(tmp_path))
    planted = json.loads(record.read_bytes())
    marker = tmp_path / "code-ran"
    if serializer == "pickle":
        planted["metadata"]["serializer"] = {"type": "pickle", "picklelib": "cloudpickle", "picklelib_version": None}
        planted["result"] = base64.b64encode(cloudpickle.dumps(_Touch(marker))).decode()
    else:  # Prefect's JSON serializer imports and calls the object decoder the record names
        planted["metadata"]["serializer"]["object_decoder"] = "pathlib.Path.touch"
        planted["result"] = json.dumps({"a": 1})
    record.write_text(json.dumps(planted))

    second = one_stage(FlakyConfig(), str(tmp_path))
    assert not marker.exists(), "the planted record was deserialized"
    assert second["state"] != "Cached" and second["cached"], "not answered from the record; the artifact was there"
    assert len(ATTEMPTS) == 1, "and the stage was not rebuilt"
    assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "json", "a clean record in its place"
