"""End to end against datatrove: `kiln corpus` vs datatrove's own pipeline on the same WARC files.

    python bench/datatrove_e2e.py [--copies 4] [--workers 2] [--out bench/results/datatrove_e2e.json]

The same WARC files (Debian's documentation, bench/debian_docs.py), the same number of worker
processes, one after the other in this run:

* Kiln: `kiln corpus --input <files>`: ingest -> clean (URL filter, extraction, Gopher repetition
  and quality, C4, FineWeb, PII) -> dedup (exact, then MinHash 14 x 8 on word 5-grams).
* datatrove 0.10.1 under LocalPipelineExecutor: WarcReader -> URLFilter -> Trafilatura ->
  GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter -> FineWebQualityFilter ->
  PIIFormatter -> JsonlWriter, then its 4-stage MinHash dedup (signatures, buckets, clusters,
  filter) with 14 buckets x 8 hashes on word 5-grams; the filters with Kiln's thresholds.

Language identification is off on both sides: datatrove's LanguageFilter downloads its fastText
model, which this offline machine cannot. Two traps measured here: datatrove's WarcReader needs
faust-cchardet and python-magic, and drops every page whose payload libmagic does not call
text/html unless the record carries WARC-Identified-Payload-Type (the WARCs here carry it, as
Common Crawl's do); its MinHash needs HashConfig(hash_fc="sha1") with xxhash 4. Reported: input
pages per second, wall clock, and each side's kept documents. Goal: Kiln >= 2x datatrove.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402
from bench.debian_docs import write_warcs  # noqa: E402


def kiln_corpus(warcs: Path, data: Path, workers: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_HOME=str(data.parent / "prefect-home"), KILN_NO_PROGRESS="1")
    args = [sys.executable, "-m", "flows.cli", "corpus", "--data-dir", str(data), "--input", str(warcs),
            "--set", "clean.language.enabled=false"]
    for section in ("ingest", "clean", "dedup"):
        args += ["--set", f"{section}.workers={workers}"]
    started = time.perf_counter()
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"kiln corpus failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    from storage import ArtifactStore

    store = ArtifactStore(data)
    stats = {stage: store.list(stage)[0].stats for stage in ("ingest", "clean", "dedup")}
    return {"wall_s": round(wall, 1), "pages": stats["ingest"]["documents_out"],
            "after_filters": stats["clean"]["documents_out"], "kept": stats["dedup"]["documents_out"],
            "stage_seconds": round(sum(s["seconds"] for s in stats.values()), 1)}


def datatrove_pipeline(warcs: Path, work: Path, workers: int, tasks: int) -> dict:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        URLFilter,
    )
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader, WarcReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from pipelines.steps import C4QualityConfig, GopherQualityConfig

    minhash = MinhashConfig(hash_config=HashConfig(hash_fc="sha1", precision=64), num_buckets=14,
                            hashes_per_bucket=8, n_grams=5)
    gopher, c4 = GopherQualityConfig(), C4QualityConfig()  # Kiln's thresholds
    filtered, sigs, buckets, clusters, out = (work / name for name in ("filtered", "sigs", "buckets", "clusters",
                                                                      "out"))
    logs = work / "logs"
    started = time.perf_counter()
    stages = [
        ([WarcReader(str(warcs), glob_pattern="*.warc.gz"), URLFilter(), Trafilatura(favour_precision=False),
          GopherRepetitionFilter(), GopherQualityFilter(**gopher.settings()), C4QualityFilter(**c4.settings()),
          FineWebQualityFilter(), PIIFormatter(), JsonlWriter(str(filtered))], tasks),
        ([JsonlReader(str(filtered)), MinhashDedupSignature(output_folder=str(sigs), config=minhash)], tasks),
        ([MinhashDedupBuckets(input_folder=str(sigs), output_folder=str(buckets), config=minhash)],
         minhash.num_buckets),
        ([MinhashDedupCluster(input_folder=str(buckets), output_folder=str(clusters), config=minhash)], 1),
        ([JsonlReader(str(filtered)), MinhashDedupFilter(input_folder=str(clusters)), JsonlWriter(str(out))], tasks),
    ]
    for i, (pipeline, n) in enumerate(stages):
        LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=workers, logging_dir=str(logs / f"s{i}"),
                              skip_completed=False).run()
    wall = time.perf_counter() - started

    def count(folder: Path) -> int:
        import gzip

        return sum(sum(1 for _ in gzip.open(p, "rt")) for p in folder.glob("*.jsonl.gz"))

    return {"wall_s": round(wall, 1), "after_filters": count(filtered), "kept": count(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "datatrove_e2e.json")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kiln-e2e-"))
    warcs = work / f"x{args.copies}"
    files = write_warcs(work, warcs, args.copies)
    for name in ("kiln", "datatrove"):
        shutil.rmtree(work / name, ignore_errors=True)
    kiln = kiln_corpus(warcs, work / "kiln" / "data", args.workers)
    print(f"kiln: {kiln}", flush=True)
    theirs = datatrove_pipeline(warcs, work / "datatrove", args.workers, tasks=len(files))
    print(f"datatrove: {theirs}", flush=True)
    pages = kiln["pages"]
    result = {"pages": pages, "files": len(files), "workers": args.workers, "kiln": kiln, "datatrove": theirs,
              "kiln_docs_per_s": round(pages / kiln["wall_s"], 1),
              "datatrove_docs_per_s": round(pages / theirs["wall_s"], 1)}
    result["ratio"] = round(result["kiln_docs_per_s"] / result["datatrove_docs_per_s"], 2)
    print(f"{pages:,} pages, {args.workers} workers: kiln {result['kiln_docs_per_s']} pages/s "
          f"(kept {kiln['kept']:,}), datatrove {result['datatrove_docs_per_s']} pages/s (kept {theirs['kept']:,}): "
          f"{result['ratio']}x (goal >= 2x)")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
