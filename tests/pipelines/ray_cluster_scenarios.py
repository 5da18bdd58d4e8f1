"""The scenarios of tests/pipelines/test_ray.py, run inside a network namespace of their own.

Ray 2.60 binds its gRPC servers to every interface for any node address but 127.0.0.1, which it
rewrites to the machine's own address; so the two nodes (head 127.0.0.2, worker 127.0.0.3) and
everything that talks to them run in a namespace whose only interface is loopback: nothing of
theirs is reachable from outside 127.0.0.0/8. Usage (as root):

    unshare --net python tests/pipelines/ray_cluster_scenarios.py WORKDIR

Every check is an assert; the last line printed is a JSON summary.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Small units, so that each stage has several to spread; the URL filter off, as its blocklists take
# ~3 s to load in every worker process of every run here (it is a per-document filter like the others).
SETTINGS = ["sample_crawl.max_pages=120", "sample_crawl.files=6", "tokenizer.vocab_size=1024", "pack.unit_bytes=20000",
            "clean.url_filter.enabled=false"]
CORPUS = ("sample-crawl", "ingest", "clean", "dedup")
DATA = (*CORPUS, "tokenizer", "pack")


def sh(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def kiln(command: str, data: str, *extra: str, env: dict, wait: bool = True):
    args = [sys.executable, "-m", "flows.cli", command, "--data-dir", data, *extra]
    for setting in SETTINGS:
        args += ["--set", setting]
    if not wait:  # its output to a file: a pipe nobody reads would stall it
        log = open(LOGS / f"{data.replace('://', '-').replace('/', '_')}.log", "w")
        return subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    return output


def files(data: str, stages) -> dict[str, list]:
    from storage import ArtifactStore

    store = ArtifactStore(data)
    found = {}
    for stage in stages:
        (manifest,) = store.list(stage)
        found[stage] = [(f.path, f.sha256) for f in manifest.files]
    return found


def stats(data: str, stage: str) -> dict:
    from storage import ArtifactStore

    (manifest,) = ArtifactStore(data).list(stage)
    return manifest.stats


def wait_for(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def kill_mid_clean_and_rerun(command: str, store: str, env: dict) -> None:
    """`kiln <command> --executor ray`, SIGKILLed (kiln and all it started) once a first clean
    shard is written, then run again to the end: it must resume from the committed shards."""
    from storage import ArtifactStore

    victim = kiln(command, store, "--executor", "ray", env=env, wait=False)
    target = ArtifactStore(store)

    def a_clean_shard() -> bool:  # in the staging directory (local) or the artifact's own (s3)
        target.fs.invalidate_cache()
        return any(p.endswith(".parquet") for pattern in ("clean/.staging-*/shards/*", "clean/*/shards/*")
                   for p in target.fs.glob(f"{target.root}/{pattern}"))

    wait_for(a_clean_shard, "a first clean shard")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    kiln(command, store, "--executor", "ray", env=env)
    assert stats(store, "clean")["shards_resumed"] >= 1, "resumed from the committed shards"


LOGS = Path("/tmp")


def main(work: Path) -> None:
    global LOGS
    LOGS = work
    summary: dict = {}
    sh("ip", "link", "set", "lo", "up")
    interfaces = sh("ip", "-o", "link", "show").splitlines()
    assert len(interfaces) == 1 and ": lo:" in interfaces[0], interfaces

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per S3 request
    from ray.cluster_utils import Cluster

    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3.start()
    host, port = s3.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(RAY_USAGE_STATS_ENABLED="0", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1", FSSPEC_S3_ENDPOINT_URL=endpoint, KILN_NO_PROGRESS="1")
    import boto3
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec read its settings from the environment at import
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="kiln")
    started = time.time()
    # one Prefect server for every `kiln` here, instead of a temporary one each
    from tests.prefect_servers import free_port, start_server, stop

    port = free_port()
    prefect = start_server(port, dict(os.environ), ROOT, work / "prefect-server.log")
    summary["prefect_up_s"] = round(time.time() - started, 1)
    cluster = Cluster(initialize_head=True, head_node_args={
        "node_ip_address": "127.0.0.2", "num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(node_ip_address="127.0.0.3", num_cpus=1)
    summary["cluster_up_s"] = round(time.time() - started, 1)
    env = dict(os.environ, RAY_ADDRESS=cluster.address, PREFECT_API_URL=f"http://127.0.0.1:{port}/api")
    try:
        listening = [line.split()[3] for line in sh("ss", "-ltnH").splitlines()]
        summary["listening"] = len(listening)
        # nothing but loopback exists here (checked above), so a wildcard bind is a loopback bind
        assert all(a.startswith(("127.", "0.0.0.0:", "*:", "[::]:", "[::1]:", "[::ffff:127.")) for a in listening)

        # 1. `kiln data` on the local pool: the reference
        t = time.time()
        kiln("data", str(work / "local"), env=env)
        summary["local_data_s"] = round(time.time() - t, 1)
        reference = files(str(work / "local"), DATA)

        # 2. `kiln data` on the 2 nodes, its driver killed mid-clean (SIGKILL to kiln), then rerun:
        #    resumed from the committed shards, the same files and sha256s, units on both nodes
        t = time.time()
        kill_mid_clean_and_rerun("data", str(work / "ray"), env)
        summary["ray_data_s"] = round(time.time() - t, 1)
        assert files(str(work / "ray"), DATA) == reference, "the same files, the same sha256s"
        for stage in ("ingest", "clean", "dedup", "pack"):
            ran = stats(str(work / "ray"), stage)
            assert ran["executor"] == "ray" and ran["nodes"] == 2, (stage, ran.get("executor"), ran.get("nodes"))
            assert stats(str(work / "local"), stage)["executor"] == "local"
        summary["driver_lost:local"] = "identical, resumed"

        # 3. the worker node dies (its raylet, SIGKILL) in the middle of clean: done on the head
        t = time.time()
        victim = kiln("corpus", str(work / "node-lost"), "--executor", "ray", env=env, wait=False)
        staging = work / "node-lost" / "clean"
        wait_for(lambda: any(staging.glob(".staging-*/shards/*.parquet")), "a first clean shard")
        os.kill(worker.all_processes["raylet"][0].process.pid, signal.SIGKILL)
        assert victim.wait(timeout=600) == 0, "the run on the node that stayed failed (see its log)"
        assert files(str(work / "node-lost"), CORPUS) == {s: reference[s] for s in CORPUS}
        summary["node_lost"] = "identical"
        summary["node_lost_s"] = round(time.time() - t, 1)

        # 4. the same driver kill on the s3:// store
        t = time.time()
        kill_mid_clean_and_rerun("corpus", "s3://kiln/driver-lost", env)
        assert files("s3://kiln/driver-lost", CORPUS) == {s: reference[s] for s in CORPUS}
        summary["driver_lost:s3"] = "identical, resumed"
        summary["s3_s"] = round(time.time() - t, 1)
    finally:
        cluster.shutdown()
        stop(prefect)
        s3.stop()
    summary["total_s"] = round(time.time() - started, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
