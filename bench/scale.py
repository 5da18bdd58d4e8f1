"""Scale: the corpus stages on 1x, 4x and 16x the input, and Ray's overhead on one node.

    python bench/scale.py [--factors 1,4,16] [--workers 2] [--ray-factor 4] [--out bench/results/scale.json]

Input: Debian's documentation (2,391 real HTML pages, bench/debian_docs.py) written as WARC, k
copies for k x. Each run is `kiln corpus` (ingest -> clean -> dedup) on a fresh data directory,
a process of its own; a sampler reads the resident memory of every process of its tree every
0.2 s. Figures:

* time per document of the corpus stages (their built seconds over the documents ingested):
  at 16x within 1.2x of 1x;
* peak resident memory of the largest single process (driver, worker or Ray task) at 16x
  within 1.2x of 4x (dedup included: its units hold one shard or one band);
* Ray's overhead: `--executor ray` on one node (a local Ray, 2 CPUs) against `--executor local`
  with the same workers, at `--ray-factor`: >= 0.9x the throughput.

Ray binds its servers to every interface unless the node is 127.0.0.1 (which it rewrites to the
machine's address), so the measured runs go in a network namespace whose only interface is
loopback (`unshare --net`, as root); the packages are downloaded before that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402
from bench.debian_docs import write_warcs  # noqa: E402

STAGES = ("ingest", "clean", "dedup")


def peak_rss(process: subprocess.Popen, stop: threading.Event, found: dict) -> None:
    """The largest resident set of any one process of the tree, sampled until `stop`."""
    import psutil

    try:
        root = psutil.Process(process.pid)
    except psutil.NoSuchProcess:
        return
    while not stop.wait(0.2):
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for proc in tree:
            try:
                rss = proc.memory_info().rss
                if rss > found["peak"]:
                    found.update(peak=rss, name=" ".join(proc.cmdline()[:3])[:80])
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue


def corpus(inputs: Path, data: Path, workers: int, executor: str, env: dict) -> dict:
    args = [sys.executable, "-m", "flows.cli", "corpus", "--data-dir", str(data), "--input", str(inputs),
            "--executor", executor]
    for section in ("ingest", "clean", "dedup"):
        args += ["--set", f"{section}.workers={workers}"]
    found = {"peak": 0, "name": ""}
    stop = threading.Event()
    started = time.perf_counter()
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = threading.Thread(target=peak_rss, args=(process, stop, found))
    sampler.start()
    output, _ = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"kiln corpus failed:\n{output[-4000:]}")
    from storage import ArtifactStore

    store = ArtifactStore(data)
    stats = {stage: store.list(stage)[0].stats for stage in STAGES}
    seconds = {stage: stats[stage]["seconds"] for stage in STAGES}
    documents = stats["ingest"]["documents_out"]
    return {"wall_s": round(time.perf_counter() - started, 1), "stage_seconds": seconds,
            "documents": documents, "kept": stats["dedup"]["documents_out"],
            "s_per_1000_docs": round(1000 * sum(seconds.values()) / documents, 2),
            "docs_per_s": round(documents / sum(seconds.values()), 1),
            "peak_rss_mb": round(found["peak"] / 2**20), "peak_process": found["name"],
            "nodes": stats["clean"].get("nodes"), "executor": stats["clean"].get("executor")}


def measure(args: argparse.Namespace, work: Path) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), KILN_NO_PROGRESS="1", RAY_USAGE_STATS_ENABLED="0",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    results: dict = {"runs": {}}
    for factor in args.factors:
        run = corpus(work / f"x{factor}", work / f"data-local-x{factor}", args.workers, "local", env)
        results["runs"][f"local x{factor}"] = run
        print(f"local x{factor}: {run}", flush=True)
    run = corpus(work / f"x{args.ray_factor}", work / f"data-ray-x{args.ray_factor}", args.workers, "ray", env)
    results["runs"][f"ray x{args.ray_factor}"] = run
    print(f"ray x{args.ray_factor}: {run}", flush=True)
    runs = results["runs"]
    first, last = f"local x{args.factors[0]}", f"local x{args.factors[-1]}"
    results["time_per_doc_ratio"] = round(runs[last]["s_per_1000_docs"] / runs[first]["s_per_1000_docs"], 3)
    if len(args.factors) >= 2:
        before = f"local x{args.factors[-2]}"
        results["peak_rss_ratio"] = round(runs[last]["peak_rss_mb"] / runs[before]["peak_rss_mb"], 3)
    results["ray_throughput_ratio"] = round(
        runs[f"ray x{args.ray_factor}"]["docs_per_s"] / runs[f"local x{args.ray_factor}"]["docs_per_s"], 3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--factors", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ray-factor", type=int, default=4)
    parser.add_argument("--work", type=Path, default=None, help="where the WARCs and data go (default: a temp dir)")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-scale-"))
    if args.ray_factor not in args.factors:
        args.factors = sorted({*args.factors, args.ray_factor})
    if not args.inside:
        for factor in args.factors:  # downloads and WARC writing: before the network goes
            write_warcs(work, work / f"x{factor}", factor)
        command = [sys.executable, __file__, "--inside", "--work", str(work), "--workers", str(args.workers),
                   "--factors", ",".join(map(str, args.factors)), "--ray-factor", str(args.ray_factor),
                   "--out", str(args.out)]
        sys.exit(subprocess.run(["unshare", "--net", *command]).returncode)
    results = measure(args, work)
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=2))
    print(f"time per document at {args.factors[-1]}x: {results['time_per_doc_ratio']}x that at {args.factors[0]}x "
          f"(goal <= 1.2); peak memory of the largest process at {args.factors[-1]}x: "
          f"{results.get('peak_rss_ratio')}x that at "
          f"{args.factors[-2] if len(args.factors) > 1 else '-'}x (goal <= 1.2); "
          f"ray on one node: {results['ray_throughput_ratio']}x local's throughput (goal >= 0.9)")
    write_result(args.out, results)


if __name__ == "__main__":
    main()
