"""Benchmark: a second `kiln run` (every stage a cache hit) vs an empty Prefect flow run.

    python bench/rerun.py [--data-dir DIR] [--repeats 5] [--server] [--out bench/results/rerun.json]

Both sides are what a user types, each a fresh process timed from start to exit:

* kiln: `kiln run --data-dir DIR` on a data directory where the whole pipeline is built (the
  first `kiln run` is made here when DIR has none). Its output must report every stage cached.
* peer: `python -c` defining a flow with no tasks and running it: the least any Prefect run costs.

Both get the same environment and the same Prefect API: by default none is running, so each
starts Prefect's temporary local server as `kiln run` does on a fresh machine; with `--server`,
a `prefect server start` launched here serves both (as after `kiln server`). The sides alternate,
the order flipping each repeat; the ratio is of the medians. The goal: <= 1.5x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402
from flows.terminal_tables import statuses_from_output  # noqa: E402
from model.launch import free_port  # noqa: E402

KILN = [sys.executable, "-m", "flows.cli"]
EMPTY_FLOW = "from prefect import flow\n@flow(name='empty')\ndef empty():\n    pass\nempty()\n"
STAGES = ("sample-crawl", "ingest", "clean", "dedup", "tokenizer", "pack", "pretrain", "sft", "dpo", "evaluate")


def timed(command: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({done.returncode}):\n"
                         f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def all_cached(output: str) -> bool:
    return statuses_from_output(output) == dict.fromkeys(STAGES, "cached")


def start_server(env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the Prefect server did not come up within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="a built data directory (default: build one here)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server", action="store_true", help="both sides use a running Prefect server")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "rerun.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="kiln-bench-rerun-") as scratch:
        home = Path(scratch) / "prefect-home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
        env.update(PREFECT_HOME=str(home), KILN_NO_PROGRESS="1", PYTHONPATH=str(ROOT),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
        server = None
        if args.server:
            server, env["PREFECT_API_URL"] = start_server(env)
        try:
            data = args.data_dir or Path(scratch) / "data"
            first_seconds = None
            if not (data / "evaluate").is_dir():
                print(f"building the pipeline in {data} (the first kiln run) ...", flush=True)
                first_seconds, _ = timed([*KILN, "run", "--data-dir", str(data)], env)
                print(f"  first kiln run: {first_seconds:.1f} s")
            times: dict[str, list[float]] = {"kiln": [], "empty": []}
            for repeat in range(-1, args.repeats):  # -1: a warm-up of each, not counted (a fresh
                order = ("kiln", "empty") if repeat % 2 == 0 else ("empty", "kiln")  # PREFECT_HOME's database)
                for side in order:
                    if side == "kiln":
                        seconds, output = timed([*KILN, "run", "--data-dir", str(data)], env)
                        if not all_cached(output):
                            raise SystemExit(f"the rerun was not all cached:\n{output[-4000:]}")
                    else:
                        seconds, _ = timed([sys.executable, "-c", EMPTY_FLOW], env)
                    if repeat >= 0:
                        times[side].append(seconds)
                    print(f"  {repeat + 1 or 'warm-up'}/{args.repeats} {side:6s} {seconds:6.2f} s", flush=True)
        finally:
            if server:
                os.killpg(server.pid, 9)

    medians = {side: statistics.median(values) for side, values in times.items()}
    ratio = medians["kiln"] / medians["empty"]
    api = "a running Prefect server" if args.server else "Prefect's temporary server (started by each process)"
    print(f"\nsecond kiln run, every stage cached: {medians['kiln']:.2f} s (median of {args.repeats})")
    print(f"empty Prefect flow run:              {medians['empty']:.2f} s")
    print(f"ratio {ratio:.2f}x (goal <= 1.5x); API: {api}")
    write_result(args.out, {
        "benchmark": "rerun", "argv": sys.argv[1:], "api": api, "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)), "first_run_seconds": first_seconds, "seconds": times,
        "median_seconds": medians, "ratio": round(ratio, 3), "goal": 1.5,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
