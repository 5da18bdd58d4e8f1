"""The data stages on a real 2-node Ray cluster started here: the same artifacts as the local
pool, units on both nodes, a node lost mid-stage, a driver killed and rerun (local and s3://).

The cluster and the `kiln` commands run in a network namespace whose only interface is
loopback (tests/pipelines/ray_cluster_scenarios.py says why): `unshare --net`, as root."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCENARIOS = Path(__file__).with_name("ray_cluster_scenarios.py")


def namespace_available() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return "needs root and unshare to run the cluster in a network namespace of its own"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no network namespace here ({probe.stderr.strip()})"
    return None


@pytest.mark.slow
def test_two_ray_nodes_build_what_the_local_pool_builds(tmp_path):
    pytest.importorskip("ray")
    why = namespace_available()
    if why:
        pytest.skip(why)
    done = subprocess.run(["unshare", "--net", sys.executable, str(SCENARIOS), str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["node_lost"] == "identical"
    assert summary["driver_lost:s3"] == "identical, resumed"
    assert summary["driver_lost:local"] == "identical, resumed"
