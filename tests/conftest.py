"""Test-wide settings: Prefect in a throwaway home, offline, one shared server per session."""

import os
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="kiln-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KILN_NO_PROGRESS", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")


@pytest.fixture(scope="session")
def prefect_server():
    """One Prefect API for every in-process flow of the session (it takes ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def s3_bucket(monkeypatch):
    """A real S3 API on 127.0.0.1 (moto's server) with a bucket `kiln`. fsspec finds the
    endpoint through FSSPEC_S3_ENDPOINT_URL, as a user's S3-compatible store would."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                "FSSPEC_S3_ENDPOINT_URL": endpoint}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read its env settings at import
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="kiln")
    yield endpoint
    server.stop()
    fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)
