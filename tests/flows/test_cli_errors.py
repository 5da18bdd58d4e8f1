"""Unusable settings and paths: one line naming the path and the reason, last, exit 2, never a
traceback, nothing retried that retrying cannot mend, nothing left behind, nothing read outside
the data directory (reliability defects 5, 6 and 7)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage import ArtifactStore
from tests.flows.test_corpus_flow import run_cli

ROOT = Path(__file__).resolve().parents[2]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kiln: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"one error line, printed last:\n{err}"
    assert "Traceback" not in err
    return errors[0]


def test_a_data_dir_that_is_a_file(monkeypatch, capsys, tmp_path):
    (tmp_path / "afile").write_text("not a directory")
    code, err = run_cli(monkeypatch, capsys, "ingest", "--data-dir", str(tmp_path / "afile"))
    assert code == 2 and f"{tmp_path / 'afile'}: not a directory" in one_error_line(err)
    code, err = run_cli(monkeypatch, capsys, "ls", "--data-dir", str(tmp_path / "afile"))
    assert code == 2 and "not a directory" in one_error_line(err)


def test_a_config_that_is_a_directory(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "ingest", "--data-dir", str(tmp_path), "--config", str(tmp_path))
    assert code == 2 and f"{tmp_path}: a directory, not a config file" in one_error_line(err)


def test_settings_out_of_bounds(monkeypatch, capsys, tmp_path):
    for setting, reason in [("clean.gopher_quality.min_doc_words=-5", "greater than or equal to 0"),
                            ("clean.fineweb_quality.line_punct_thr=1.5", "less than or equal to 1"),
                            ("clean.c4_quality.min_num_sentences=-2", "greater than or equal to -1"),
                            ("pretrain.train.beta2=1", "less than 1"),
                            ("dedup.num_bands=0", "greater than or equal to 1")]:
        code, err = run_cli(monkeypatch, capsys, "clean", "--data-dir", str(tmp_path), "--set", setting)
        line = one_error_line(err)
        assert code == 2 and f"--set {setting}: " in line and reason in line, line
    assert not any(tmp_path.iterdir()), "refused before anything was written"


def test_paths_outside_the_data_dir_are_refused(monkeypatch, capsys, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    elsewhere = tmp_path / "elsewhere" / "stage" / ("a" * 64)
    elsewhere.mkdir(parents=True)
    for args, reason in [(["ls", "--stage", ".."], "'..': not a stage name"),
                         (["ls", "--stage", "../elsewhere"], "not a stage name"),
                         (["lineage", "*****"], "at least 6 characters"),
                         (["lineage", "********"], "'********': not a fingerprint"),
                         (["lineage", "../../etc"], "not inside the data directory"),
                         (["lineage", str(elsewhere)], "not inside the data directory")]:
        code, err = run_cli(monkeypatch, capsys, *args, "--data-dir", str(data))
        assert code == 2 and reason in one_error_line(err), (args, err)


@pytest.fixture
def make_read_only():
    """Make a directory really read-only: a read-only mount when running as root (root ignores
    permissions), its permissions otherwise. Undone afterwards."""
    undo = []

    def read_only(path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            path.chmod(0o555)
            undo.append(lambda: path.chmod(0o755))
            return
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
        if mounted.returncode != 0:
            pytest.skip("running as root, and a read-only mount is not allowed here "
                        f"({mounted.stderr.decode().strip()})")
        undo.append(lambda: subprocess.run(["umount", str(path)], check=True))

    yield read_only
    for step in reversed(undo):
        step()


def test_a_read_only_data_dir_is_one_line_and_not_retried(prefect_server, monkeypatch, capsys, tmp_path,
                                                          make_read_only):
    data = tmp_path / "data"
    make_read_only(data)  # the whole data directory: refused before anything runs
    code, err = run_cli(monkeypatch, capsys, "ingest", "--data-dir", str(data), "--set", "sample_crawl.max_pages=10")
    assert code == 2 and f"{data}: not writable" in one_error_line(err)

    data = tmp_path / "data2"
    make_read_only(data / "sample-crawl")  # a stage's directory only: its task fails, once
    code, err = run_cli(monkeypatch, capsys, "ingest", "--data-dir", str(data), "--set", "sample_crawl.max_pages=10")
    line = one_error_line(err)
    assert code == 2 and str(data / "sample-crawl") in line and ("read-only" in line or "permission" in line), line
    assert err.lower().count("read-only file system") + err.lower().count("permission denied") == 1, \
        f"not retried, not repeated:\n{err}"


def test_a_failed_build_leaves_no_staging_behind(monkeypatch, capsys, tmp_path):
    notes = tmp_path / "notes.warc.gz"
    notes.write_text("just some notes\n")
    code, err = run_cli(monkeypatch, capsys, "ingest", "--data-dir", str(tmp_path / "data"), "--input", str(notes))
    assert code == 2 and "not a WARC file" in one_error_line(err)
    assert not list((tmp_path / "data").rglob(".staging-*")), "no empty staging directory left"
    assert ArtifactStore(tmp_path / "data").list() == []


def test_kiln_verify_names_a_damaged_file(monkeypatch, capsys, tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = store.produce("demo", "f" * 64, lambda w: w.write_bytes("a.bin", b"abcdef") or {}, config={},
                             inputs=[], code_version="1")
    code, err = run_cli(monkeypatch, capsys, "verify", "--data-dir", str(tmp_path))
    assert code is None or code == 0, err
    store.local_path(manifest, "a.bin").write_bytes(b"abcdeF")
    code, err = run_cli(monkeypatch, capsys, "verify", "--data-dir", str(tmp_path))
    assert code == 2 and f"demo/{'f' * 12}/a.bin: sha256 differs" in one_error_line(err)


def test_verify_of_a_missing_data_dir_is_one_line(monkeypatch, capsys, tmp_path):
    code, err = run_cli(monkeypatch, capsys, "verify", "--data-dir", str(tmp_path / "nonexistent"))
    assert code == 2 and f"{tmp_path / 'nonexistent'}: no such data directory" in one_error_line(err)
    assert not (tmp_path / "nonexistent").exists(), "a reader creates nothing"


def test_verify_never_hashes_a_path_outside_its_artifact(monkeypatch, capsys, tmp_path):
    """A hand-edited manifest naming `../../../../../../etc/hostname` once made `kiln verify`
    hash that file and answer "all match"."""
    store = ArtifactStore(tmp_path)
    manifest = store.produce("demo", "f" * 64, lambda w: w.write_bytes("a.bin", b"abcdef") or {}, config={},
                             inputs=[], code_version="1")
    path = store.local_path(manifest) / "_manifest.json"
    path.write_text(path.read_text().replace('"a.bin"', '"../../../../../../etc/hostname"'))
    code, err = run_cli(monkeypatch, capsys, "verify", "--data-dir", str(tmp_path))
    line = one_error_line(err)
    assert code == 2 and "1 damaged file(s)" in line and "not a relative path inside the artifact" in line, line


def test_stray_directories_in_the_data_root_are_skipped(monkeypatch, capsys, tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = store.produce("demo", "f" * 64, lambda w: w.write_bytes("a.bin", b"abcdef") or {}, config={},
                             inputs=[], code_version="1")
    (tmp_path / "lost+found").mkdir()
    (tmp_path / "backup.old" / "x").mkdir(parents=True)
    for args in (["ls"], ["verify"], ["lineage", manifest.short]):
        code, err = run_cli(monkeypatch, capsys, *args, "--data-dir", str(tmp_path))
        assert code in (None, 0), (args, err)
        assert "Traceback" not in err and "not a stage name" not in err.replace("(not a stage name)", "")


def _kiln(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    kiln = Path(sys.executable).with_name("kiln")
    settings = {key: value for key, value in {**os.environ, **(env or {})}.items() if value is not None}
    return subprocess.Popen([str(kiln), *args], cwd=ROOT, env=settings, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_an_unreachable_ray_cluster_is_one_line_within_30_s(tmp_path):
    """Ray retries an unreachable GCS for minutes; Kiln says so in one line."""
    started = time.monotonic()
    done = _kiln("ingest", "--data-dir", str(tmp_path / "data"), "--executor", "ray", "--ray-address",
                 "127.0.0.1:1", env={"RAY_USAGE_STATS_ENABLED": "0"})
    _, err = done.communicate(timeout=120)
    assert done.returncode == 2 and "cannot reach the Ray cluster at 127.0.0.1:1" in one_error_line(err), err
    assert time.monotonic() - started < 30


def test_a_port_that_accepts_but_is_not_ray_times_out(tmp_path):
    """A server that takes the connection and never answers as Ray's GCS does."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    code = ("from pipelines.executor import connect_ray\n"
            f"connect_ray('127.0.0.1:{port}', timeout_s=4)\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    listener.close()
    assert done.returncode != 0 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in done.stderr
    assert time.monotonic() - started < 30


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = status.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_leaves_no_prefect_server_behind(tmp_path):
    """Without a Prefect server, `kiln` starts Prefect's temporary one (uvicorn, ~200 MB,
    listening); it must end with the command, even one killed with SIGKILL."""
    env = {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": None}
    kiln = _kiln("ingest", "--data-dir", str(tmp_path / "data"), env=env)  # the bundled sample crawl
    try:
        deadline, servers = time.monotonic() + 120, []
        while not servers and time.monotonic() < deadline and kiln.poll() is None:
            servers = [pid for pid in _children(kiln.pid)
                       if "uvicorn" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
            time.sleep(0.2)
        assert servers, f"no temporary server seen (exit {kiln.poll()})"
        os.kill(kiln.pid, signal.SIGKILL)
        kiln.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in servers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in servers), "the temporary Prefect server outlived kill -9"
    finally:
        if kiln.poll() is None:
            kiln.kill()
        kiln.communicate()
