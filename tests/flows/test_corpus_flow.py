"""The corpus stages of the pipeline flow under Prefect: caching on fingerprints, partial reruns, kill -9, bad input."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.config import load_config
from flows.pipeline import pipeline_flow
from storage import ArtifactStore

# A quarter of the sample crawl keeps these flows quick; the chain is the same.
SMALL = ["sample_crawl.max_pages=160", "clean.workers=1", "ingest.workers=1"]


def statuses(runs: dict) -> dict[str, str]:
    return {stage: "cached" if run["cached"] else "built" for stage, run in runs.items()}


def file_hashes(manifest: dict) -> list[tuple[str, str]]:
    return [(f["path"], f["sha256"]) for f in manifest["files"]]


@pytest.mark.slow
def test_cached_rerun_partial_rerun_and_deleted_artifact(prefect_server, tmp_path):
    data = str(tmp_path / "data")
    first = pipeline_flow(until="dedup", config=load_config(overrides=SMALL), data_dir=data)
    assert statuses(first) == {"sample-crawl": "built", "ingest": "built", "clean": "built", "dedup": "built"}
    assert first["dedup"]["manifest"]["stats"]["documents_out"] > 0

    again = pipeline_flow(until="dedup", config=load_config(overrides=SMALL), data_dir=data)
    assert set(statuses(again).values()) == {"cached"}, "the same command twice recomputes nothing"
    assert again["dedup"]["manifest"]["fingerprint"] == first["dedup"]["manifest"]["fingerprint"]

    stricter_config = load_config(overrides=SMALL + ["clean.gopher_quality.min_doc_words=80"])
    stricter = pipeline_flow(until="dedup", config=stricter_config, data_dir=data)
    assert statuses(stricter) == {"sample-crawl": "cached", "ingest": "cached", "clean": "built", "dedup": "built"}

    store = ArtifactStore(data)
    clean = first["clean"]["manifest"]
    import shutil

    shutil.rmtree(store.artifact_dir("clean", clean["fingerprint"]))
    rebuilt = pipeline_flow(until="dedup", config=load_config(overrides=SMALL), data_dir=data)
    assert statuses(rebuilt)["clean"] == "built", "a deleted artifact is rebuilt, not a stale cache hit"
    assert statuses(rebuilt)["dedup"] == "cached"
    assert file_hashes(rebuilt["clean"]["manifest"]) == file_hashes(clean)

    # One byte flipped in the middle of a dedup shard, its size unchanged: rebuilt, not served.
    dedup = first["dedup"]["manifest"]
    shard = Path(store.artifact_dir("dedup", dedup["fingerprint"])) / "shards" / "00000.parquet"
    damaged = bytearray(shard.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    shard.write_bytes(bytes(damaged))
    healed = pipeline_flow(until="dedup", config=load_config(overrides=SMALL), data_dir=data)
    assert statuses(healed) == {"sample-crawl": "cached", "ingest": "cached", "clean": "cached", "dedup": "built"}
    assert file_hashes(healed["dedup"]["manifest"]) == file_hashes(dedup)


def kiln(*args: str, env: dict, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **popen)


def cli_env(tmp_path: Path) -> dict:
    home = tmp_path / "prefect-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return {**env, "PREFECT_HOME": str(home), "KILN_NO_PROGRESS": "1"}


def corpus_manifests(data: Path) -> dict[str, list]:
    store = ArtifactStore(data)
    return {stage: [file_hashes(m.model_dump()) for m in store.list(stage)] for stage in ("ingest", "clean", "dedup")}


@pytest.mark.slow
def test_kill_9_at_a_random_moment_then_rerun_gives_identical_artifacts(tmp_path):
    args = ["corpus", *[a for s in SMALL for a in ("--set", s)]]
    env = cli_env(tmp_path)

    started = time.perf_counter()
    reference = kiln(*args, "--data-dir", str(tmp_path / "reference"), env=env)
    output, _ = reference.communicate(timeout=600)
    duration = time.perf_counter() - started
    assert reference.returncode == 0, output

    seed = random.randrange(1 << 30)
    moment = random.Random(seed).uniform(0.5, duration * 0.9)
    victim = kiln(*args, "--data-dir", str(tmp_path / "killed"), env=env)
    time.sleep(moment)
    os.killpg(victim.pid, signal.SIGKILL)  # the CLI, its Prefect server and any stage workers
    victim.wait()

    rerun = kiln(*args, "--data-dir", str(tmp_path / "killed"), env=env)
    output, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, f"seed {seed}, killed after {moment:.1f}s:\n{output}"
    assert corpus_manifests(tmp_path / "killed") == corpus_manifests(tmp_path / "reference"), \
        f"seed {seed}: killed after {moment:.1f}s of {duration:.1f}s"
    leftovers = [p for p in (tmp_path / "killed").rglob(".staging-*")]
    assert leftovers == [], "the rerun finished or removed every staging directory"


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from flows import cli

    monkeypatch.setattr(sys, "argv", ["kiln", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("make_input, reason", [
    (lambda tmp: str(tmp / "missing.warc.gz"), "no such file"),
    (lambda tmp: str(tmp / "*.warc.gz"), "matches no file"),
    (lambda tmp: "http://127.0.0.1:9/crawl.warc.gz", "127.0.0.1:9"),
    (lambda tmp: (tmp / "notes.warc.gz").write_text("just some notes\n") and str(tmp / "notes.warc.gz"), "not a WARC"),
])
def test_bad_input_is_one_clear_line_and_nothing_visible(prefect_server, tmp_path, monkeypatch, capsys, make_input,
                                                         reason):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    bad = make_input(inputs)
    code, err = run_cli(monkeypatch, capsys, "ingest", "--data-dir", str(tmp_path / "data"), "--input", bad)
    assert code == 2
    error_lines = [line for line in err.splitlines() if line.startswith("kiln: error:")]
    assert len(error_lines) == 1 and reason in error_lines[0], err
    assert "Traceback" not in err
    assert ArtifactStore(tmp_path / "data").list() == [], "nothing committed"
    assert not list((tmp_path / "data").rglob("*.parquet")), "no half-written shard anywhere"


def test_bad_config_is_one_clear_line(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "clean", "--data-dir", str(tmp_path),
                        "--set", "clean.no_such_filter.enabled=false")
    assert code == 2 and "clean.no_such_filter: unknown setting" in err
    code, err = run_cli(monkeypatch, capsys, "clean", "--data-dir", str(tmp_path),
                        "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and "nope.yaml: config file not found" in err
