"""Helpers for the tests that start a real `prefect server start` and run a flow against it in
another process (tests/test_postgres.py, tests/test_ui.py)."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from model.launch import free_port, stop_process_group

__all__ = ["RUN_FLOW", "clean_env", "free_port", "run_pipeline", "start_server", "stop"]

ROOT = Path(__file__).resolve().parents[1]

# pipeline_flow in its own process, as a deployment's flow run would be; prints its run's id.
RUN_FLOW = """
import json, sys
from prefect.client.orchestration import get_client
from flows.config import load_config
from flows.pipeline import pipeline_flow

until, data_dir, *overrides = sys.argv[1:]
state = pipeline_flow(config=load_config(overrides=overrides), data_dir=data_dir, until=until, return_state=True)
with get_client(sync_client=True) as client:
    run = client.read_flow_run(state.state_details.flow_run_id)
print("KILN-RUN", json.dumps({"id": str(run.id), "name": run.name, "state": state.type.value}))
"""


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without any PREFECT_* setting of the caller's, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", **settings}


def stop(process: subprocess.Popen) -> None:
    """End a server and everything it started (a server gets 15 s to shut down cleanly)."""
    stop_process_group(process, grace_s=15)


def start_server(port: int, env: dict[str, str], cwd: Path, log: Path, timeout: float = 90) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port, its output in `log`, once it answers /api/health."""
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    api, deadline = f"http://127.0.0.1:{port}/api", time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the Prefect server exited ({server.returncode}):\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.5)
    stop(server)
    pytest.fail(f"the Prefect server did not answer {api}/health in {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def run_pipeline(api: str, home: Path, data: Path, until: str, overrides: list[str]) -> dict:
    """RUN_FLOW against `api`, with its own PREFECT_HOME; returns {id, name, state} of the run."""
    env = clean_env(PREFECT_API_URL=api, PREFECT_HOME=str(home), KILN_NO_PROGRESS="1")
    done = subprocess.run([sys.executable, "-c", RUN_FLOW, until, str(data), *overrides],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    lines = [line for line in done.stdout.splitlines() if line.startswith("KILN-RUN ")]
    assert done.returncode == 0 and lines, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return json.loads(lines[-1].removeprefix("KILN-RUN "))
