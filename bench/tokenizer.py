"""Benchmark: the tokenizer stage vs raw Hugging Face `tokenizers` training, same text, same trainer.

    python bench/tokenizer.py [--mb 40] [--repeats 3] [--threads 2] [--out bench/results/tokenizer.json]

The corpus is real text gathered offline, written once as a document artifact (Parquet
shards, like dedup's output): Shakespeare, the instruction/preference data and the article
bodies from ``../shared/data`` when present, Python's reference-manual topics, then Python
source files (the standard library, then installed packages) until ``--mb`` megabytes.

* raw: ``Tokenizer(BPE())`` with the same pre-tokenizer (GPT-4 split + byte level), decoder and
  ``BpeTrainer`` settings, ``train_from_iterator`` over exactly the documents the stage trains
  on (the stage holds ~1% out), then ``save``. Three feeds: ``raw-parquet`` streams them from
  one Parquet file with pyarrow (``iter_batches``, as any trainer on a Parquet corpus would: the
  peer the ratios are taken against), ``raw-iter`` one at a time from a JSON-lines file (nothing
  held, no pyarrow), ``raw-list`` loads them into a list first. The raw children import only
  ``tokenizers``, ``json`` and (raw-parquet) ``pyarrow.parquet``: not Kiln, fsspec or pydantic.
* stage: ``STAGE.run(TokenizerConfig(...), [artifact], store, force=True)``: the key pass, the
  streamed training from Parquet, the held-out encoding, the output files, the manifest.

Each measurement is a fresh subprocess (sides alternate, ``--repeats`` times): wall and CPU
time of the work (imports excluded; CPU time, all threads, is the steadier figure on a shared
machine) and the process's peak resident memory (``VmHWM``, imports included; the RSS after
imports is reported too, since the stage's imports alone, pyarrow, fsspec and pydantic, cost
~60 MB more than ``tokenizers``). Both sides use ``--threads`` trainer threads. The ratios
compare the best and median times and the median peak memory of each side. The tokenizers
must be identical (same vocabulary and merges): the exit status is 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
READ_BATCH = 1024
VOCAB_SIZE = 8192
MAX_DOC_CHARS = 50_000
SHARDS = 8


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return usage.ru_utime + usage.ru_stime


def _memory_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ the children


def child_raw(spec: dict) -> dict:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    rss_before, cpu_before = _memory_mb("VmRSS"), _cpu_seconds()
    started = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(spec["pattern"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec["vocab_size"], min_frequency=spec["min_frequency"], special_tokens=spec["special_tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )

    def documents():
        with open(spec["jsonl"], encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)

    if spec["side"] == "raw-parquet":
        import pyarrow.parquet as pq

        rss_before = _memory_mb("VmRSS")

        def documents():  # noqa: F811 - the Parquet feed
            parquet = pq.ParquetFile(spec["parquet"])
            for batch in parquet.iter_batches(batch_size=spec["batch_size"], columns=["text"]):
                yield from batch.column(0).to_pylist()

    if spec["side"] == "raw-list":
        texts = list(documents())
        tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    else:
        tokenizer.train_from_iterator(documents(), trainer)
    tokenizer.save(spec["output"])
    return {"seconds": time.perf_counter() - started, "cpu_seconds": _cpu_seconds() - cpu_before,
            "rss_before_mb": rss_before}


def child_stage(spec: dict) -> dict:
    sys.path.insert(0, str(ROOT))
    from pipelines.tokenizer import STAGE, TOKENIZER_FILE, TokenizerConfig
    from storage import ArtifactStore

    store = ArtifactStore(spec["store"])
    documents = store.find(spec["artifact"])
    config = TokenizerConfig(vocab_size=spec["vocab_size"], min_frequency=spec["min_frequency"],
                             workers=spec["threads"])
    rss_before, cpu_before = _memory_mb("VmRSS"), _cpu_seconds()
    started = time.perf_counter()
    manifest = STAGE.run(config, [documents], store, force=True)
    seconds, cpu_seconds = time.perf_counter() - started, _cpu_seconds() - cpu_before
    Path(spec["output"]).write_bytes(store.local_path(manifest, TOKENIZER_FILE).read_bytes())
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before_mb": rss_before, "stats": manifest.stats}


def child_main(spec_json: str) -> None:
    started = time.perf_counter()
    spec = json.loads(spec_json)
    result = child_stage(spec) if spec["side"] == "stage" else child_raw(spec)
    result["peak_mb"] = _memory_mb("VmHWM")
    result["process_seconds"] = time.perf_counter() - started
    print(json.dumps(result))


def run_child(spec: dict, threads: int) -> dict:
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "KILN_NO_PROGRESS": "1"}
    env.pop("TOKENIZERS_PARALLELISM", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{spec['side']} child failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_with_startup_s"] = time.perf_counter() - started
    return result


# ------------------------------------------------------------------ the corpus


def prose() -> list[str]:
    docs: list[str] = []
    shakespeare = SHARED / "text" / "tinyshakespeare_input.txt"
    if shakespeare.is_file():
        text = shakespeare.read_text(encoding="utf-8")
        docs.extend(text[i:i + 4000] for i in range(0, len(text), 4000))
    for path in sorted((SHARED / "instruct").glob("*.json")) if (SHARED / "instruct").is_dir() else []:
        for entry in json.loads(path.read_text(encoding="utf-8")):
            docs.append("\n\n".join(v for v in entry.values() if isinstance(v, str) and v))
    truth = SHARED / "html_extraction" / "scrapinghub_aeb" / "ground-truth.json"
    if truth.is_file():
        data = json.loads(truth.read_text(encoding="utf-8"))
        docs.extend(data[k]["articleBody"] for k in sorted(data))
    from pydoc_data.topics import topics

    docs.extend(topics[k] for k in sorted(topics))
    return docs


def source_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    found = sorted(p for p in stdlib.rglob("*.py") if purelib not in p.parents)
    return found + sorted(purelib.rglob("*.py"))


def corpus(megabytes: float) -> list[str]:
    """Real text, ~`megabytes` of UTF-8 in documents of at most MAX_DOC_CHARS characters."""
    limit = int(megabytes * 1e6)
    docs, size = [], 0
    def add(text: str) -> bool:
        nonlocal size
        for start in range(0, len(text), MAX_DOC_CHARS):
            piece = text[start:start + MAX_DOC_CHARS]
            docs.append(piece)
            size += len(piece.encode())
            if size >= limit:
                return False
        return True
    for text in prose():
        if not add(text):
            return docs
    for path in source_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip() and not add(text):
            return docs
    return docs


def write_artifact(store, docs: list[str], shards: int = SHARDS):
    import pyarrow as pa

    from pipelines.common import shard_name

    per_shard = -(-len(docs) // shards)

    def build(writer):
        for i in range(shards):
            texts = docs[i * per_shard:(i + 1) * per_shard]
            ids = [f"bench-{i * per_shard + j}" for j in range(len(texts))]
            writer.write_parquet(shard_name(i), pa.table({"id": ids, "url": ids, "text": texts}))
        return {"documents_out": len(docs)}

    return store.produce("dedup", "b" * 64, build, config={"bench": "tokenizer"}, inputs=[], code_version="1",
                         force=True)


def training_documents(store, artifact) -> list[str]:
    """The documents the stage trains on: everything but its held-out choice (same code)."""
    import numpy as np

    from pipelines.common import document_shards
    from pipelines.tokenizer import TokenizerConfig, _Corpus, _held_out_cutoff, _key_hashes

    corpus_reader = _Corpus(store, artifact, document_shards(artifact), READ_BATCH)
    corpus_reader.check_schema()
    cutoff, _, _ = _held_out_cutoff(corpus_reader, TokenizerConfig())
    kept = []
    for _, batch in corpus_reader.batches(["text", "id"]):
        texts, keys = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        held = _key_hashes(keys) <= np.uint64(cutoff)
        kept.extend(t for t, h in zip(texts, held.tolist()) if not h)
    return kept


def same_model(a: Path, b: Path) -> bool:
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    return (left["model"]["vocab"] == right["model"]["vocab"] and left["model"]["merges"] == right["model"]["merges"]
            and left["added_tokens"] == right["added_tokens"] and left["pre_tokenizer"] == right["pre_tokenizer"])


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=40.0, help="corpus size in MB of UTF-8 text")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="trainer threads on both sides")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "tokenizer.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return

    sys.path.insert(0, str(ROOT))
    from pipelines.tokenizer import GPT4_PATTERN, SPECIAL_TOKENS, TokenizerConfig
    from storage import ArtifactStore

    with tempfile.TemporaryDirectory(prefix="kiln-bench-tokenizer-") as work_dir:
        work = Path(work_dir)
        docs = corpus(args.mb)
        store = ArtifactStore(work / "store")
        artifact = write_artifact(store, docs)
        train = training_documents(store, artifact)
        jsonl = work / "train.jsonl"
        with open(jsonl, "w", encoding="utf-8") as handle:
            for text in train:
                handle.write(json.dumps(text) + "\n")
        corpus_bytes = sum(len(d.encode()) for d in docs)
        print(f"corpus: {len(docs)} documents, {corpus_bytes / 1e6:.1f} MB; the stage trains on {len(train)} "
              f"({sum(len(t.encode()) for t in train) / 1e6:.1f} MB); {args.threads} threads; vocab {VOCAB_SIZE}")
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Row groups the size of the artifact's shards (one group each): the same reads as the stage's.
        train_parquet = work / "train.parquet"
        pq.write_table(pa.table({"text": train}), train_parquet, compression="zstd",
                       row_group_size=-(-len(docs) // SHARDS))
        del docs, train

        common = {"pattern": GPT4_PATTERN, "special_tokens": SPECIAL_TOKENS, "vocab_size": VOCAB_SIZE,
                  "min_frequency": 2, "threads": args.threads, "jsonl": str(jsonl),
                  "store": str(store.root), "artifact": artifact.fingerprint,
                  "parquet": str(train_parquet), "batch_size": TokenizerConfig().batch_size}
        sides = ["raw-parquet", "stage", "raw-iter", "raw-list"]
        runs: dict[str, list[dict]] = {side: [] for side in sides}
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else sides[::-1]
            for side in order:
                output = work / f"{side}-{repeat}.json"
                result = run_child({**common, "side": side, "output": str(output)}, args.threads)
                runs[side].append(result)
                print(f"  {repeat + 1}/{args.repeats} {side:9s} {result['seconds']:7.2f} s  "
                      f"cpu {result['cpu_seconds']:7.2f} s   "
                      f"peak {result['peak_mb']:7.1f} MB   (after imports {result['rss_before_mb']:.1f} MB)")
        reference = work / "raw-parquet-0.json"
        identical = {side: all(same_model(reference, work / f"{side}-{r}.json") for r in range(args.repeats))
                     for side in sides}
        stage_stats = runs["stage"][-1].get("stats", {})

    summary = {}
    for side in sides:
        seconds = [r["seconds"] for r in runs[side]]
        cpu = [r["cpu_seconds"] for r in runs[side]]
        peaks = [r["peak_mb"] for r in runs[side]]
        summary[side] = {
            "best_s": round(min(seconds), 3), "median_s": round(statistics.median(seconds), 3),
            "best_cpu_s": round(min(cpu), 3), "median_cpu_s": round(statistics.median(cpu), 3),
            "median_peak_mb": round(statistics.median(peaks), 1), "max_peak_mb": round(max(peaks), 1),
            "median_rss_after_imports_mb": round(statistics.median(r["rss_before_mb"] for r in runs[side]), 1),
            "same_tokenizer_as_raw": identical[side],
        }
    ratios = {
        baseline: {
            "time_best": round(summary["stage"]["best_s"] / summary[baseline]["best_s"], 3),
            "time_median": round(summary["stage"]["median_s"] / summary[baseline]["median_s"], 3),
            "cpu_time_median": round(summary["stage"]["median_cpu_s"] / summary[baseline]["median_cpu_s"], 3),
            "peak_memory": round(summary["stage"]["median_peak_mb"] / summary[baseline]["median_peak_mb"], 3),
            "memory_beyond_imports": round(
                (summary["stage"]["median_peak_mb"] - summary["stage"]["median_rss_after_imports_mb"])
                / (summary[baseline]["median_peak_mb"] - summary[baseline]["median_rss_after_imports_mb"]), 3),
        }
        for baseline in ("raw-parquet", "raw-iter", "raw-list")
    }
    print()
    print(f"{'side':10s} {'best s':>8s} {'median s':>9s} {'median cpu s':>13s} {'peak MB':>8s} "
          f"{'after imports':>14s} same tokenizer")
    for side in sides:
        s = summary[side]
        print(f"{side:10s} {s['best_s']:8.2f} {s['median_s']:9.2f} {s['median_cpu_s']:13.2f} "
              f"{s['median_peak_mb']:8.1f} {s['median_rss_after_imports_mb']:14.1f} {s['same_tokenizer_as_raw']}")
    for baseline, r in ratios.items():
        print(f"stage / {baseline}: time {r['time_best']:.3f}x (best), {r['time_median']:.3f}x (median), "
              f"cpu {r['cpu_time_median']:.3f}x; peak memory {r['peak_memory']:.3f}x "
              f"({r['memory_beyond_imports']:.3f}x counting only what the work adds after imports)")
    print("targets: time <= 1.1x, peak memory <= 1.2x")
    print(f"stage stats: {json.dumps(stage_stats)}")

    write_result(args.out, {
        "benchmark": "tokenizer", "argv": sys.argv[1:], "python": platform.python_version(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "threads": args.threads, "vocab_size": VOCAB_SIZE,
        "repeats": args.repeats, "summary": summary, "ratios": ratios, "stage_stats": stage_stats, "runs": runs,
        "targets": {"time": 1.1, "peak_memory": 1.2},
    })
    print(f"wrote {args.out}")
    if not all(identical.values()):
        raise SystemExit("the stage's tokenizer differs from raw training on the same documents")


if __name__ == "__main__":
    main()
