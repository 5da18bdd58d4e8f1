"""Kill -9 at random moments in every stage of `kiln data`, then rerun: identical artifacts, no leftovers.

    python bench/kill.py [--trials 24] [--seed N] [--out bench/results/kill.json]

One uninterrupted `kiln data` (sample crawl -> ingest -> clean -> dedup -> tokenizer -> pack, on
a cut-down sample crawl) is the reference. Each trial starts the same command on a data
directory of its own and aims at one stage, in turn: once that stage has begun building (its
staging directory appears), it waits a random part of the time the stage took in the reference,
then kills the whole process group (the CLI, its Prefect server, the stage's workers) with
SIGKILL. Then it reruns the command to completion and checks:

* every stage's manifest lists the same files with the same sha256s as the reference;
* no temporary file (`*.tmp-*`) and no staging directory is left anywhere under the data root.

Which stage was being built when the process died is read off the staging directory left
behind. A trial that fails prints its seed and moment; the script exits 1.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402
from storage import TEMP_MARK, ArtifactStore  # noqa: E402

STAGES = ("sample-crawl", "ingest", "clean", "dedup", "tokenizer", "pack")
SETTINGS = ["sample_crawl.max_pages=160", "ingest.workers=1", "clean.workers=1", "tokenizer.vocab_size=1024"]


def kiln(data: Path, env: dict) -> subprocess.Popen:
    args = [sys.executable, "-m", "flows.cli", "data", "--data-dir", str(data)]
    for setting in SETTINGS:
        args += ["--set", setting]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def artifacts(data: Path) -> dict[str, list]:
    store = ArtifactStore(data)
    return {stage: sorted((f.path, f.sha256) for m in store.list(stage) for f in m.files) for stage in STAGES}


def leftovers(data: Path) -> list[str]:
    return [str(p.relative_to(data)) for p in data.rglob("*") if TEMP_MARK in p.name or p.name.startswith(".staging-")]


def building(data: Path) -> list[str]:
    """The stages whose staging directory a killed run left."""
    stages = {p.parent.name for p in data.glob("*/.staging-*")}
    return sorted(stages, key=lambda s: STAGES.index(s) if s in STAGES else 99)


def wait_for_stage(data: Path, stage: str, process: subprocess.Popen, deadline: float) -> bool:
    """Until the stage has begun building (or is already built); False if the run ended first."""
    while time.time() < deadline:
        if any((data / stage).glob(".staging-*")) or any((data / stage).glob("*/_manifest.json")):
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.01)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "kill.json")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="kiln-kill-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(work / "prefect-home"), KILN_NO_PROGRESS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1")

    started = time.perf_counter()
    reference = kiln(work / "reference", env)
    output, _ = reference.communicate(timeout=1800)
    duration = time.perf_counter() - started
    if reference.returncode != 0:
        sys.exit(f"the reference run failed:\n{output}")
    expected = artifacts(work / "reference")
    took = {stage: max(0.05, float(ArtifactStore(work / "reference").list(stage)[0].stats.get("seconds") or 0.05))
            for stage in STAGES}
    print(f"reference `kiln data`: {duration:.1f} s; seed {seed}; data under {work}")
    print("stage seconds in the reference: " + ", ".join(f"{s} {t:.1f}" for s, t in took.items()))

    results, failures = [], 0
    for trial in range(args.trials):
        data = work / f"trial-{trial:02d}"
        aim = STAGES[trial % len(STAGES)]
        victim = kiln(data, env)
        started = time.perf_counter()
        wait_for_stage(data, aim, victim, time.time() + 600)
        time.sleep(rng.uniform(0, 0.9) * took[aim])
        moment = time.perf_counter() - started
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_in = building(data) or ["(between stages)"]
        rerun = kiln(data, env)
        output, _ = rerun.communicate(timeout=1800)
        same = rerun.returncode == 0 and artifacts(data) == expected
        left = leftovers(data)
        ok = same and not left
        failures += not ok
        results.append({"trial": trial, "aimed_at": aim, "moment_s": round(moment, 2), "killed_in": killed_in,
                        "identical": same, "leftovers": left[:5], "ok": ok})
        print(f"trial {trial:2d}: aimed at {aim:12s} killed at {moment:5.1f} s in {', '.join(killed_in):20s} "
              f"rerun {'identical' if same else 'DIFFERENT'}, {len(left)} leftovers")
        if not ok:
            print(output[-3000:])
    stages_hit = sorted({s for r in results for s in r["killed_in"]})
    print(f"\n{args.trials - failures}/{args.trials} trials identical with no leftovers; "
          f"killed while building: {', '.join(stages_hit)}")
    write_result(args.out, {"seed": seed, "reference_s": round(duration, 1), "trials": results,
                                    "stages_hit": stages_hit, "failures": failures})
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
