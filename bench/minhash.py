"""Benchmark: the dedup stage users run (`kiln dedup`) against datasketch, on the same real
documents, in one run.

    python bench/minhash.py [--sizes 1000,20000] [--workers 2] [--repeats 3] [--quick]
                            [--out bench/results/minhash.json]

The documents are real text: C4's web pages (``../shared/data/jsonl``) whole, and ~2,000-character
pieces of Wikipedia articles (English and Latgalian dumps), books, Shakespeare, arXiv papers and
news article bodies (``../shared/data``), of Python's reference manual and docstrings and of the
installed packages' descriptions (their READMEs: these two are there without ``../shared/data``,
and make corpora of up to ~4,000 documents). A corpus of N documents is 77% such documents, 20%
near-duplicates planted among them (2-3 words replaced, a header or a footer added; one original
may have several) and 3% exact duplicates after normalisation (upper-cased, spaces added),
shuffled, so an original may come after its copies.

* Kiln: the documents are written as a clean artifact (Parquet shards of ``--shard-docs``
  documents, the columns the clean stage writes) in an artifact store in a temporary
  directory, and ``dedup.STAGE.run(DedupConfig(workers=W), [clean], store)`` builds the dedup
  artifact: what ``kiln dedup`` runs (signatures, exact duplicates, LSH, clustering, the kept
  shards and the signature index, on the local executor, committed to the store). Each repeat
  runs in a fresh Python process (modules imported before the clock starts), so it pays for
  starting the worker pool as a user's command does (the stage runs its first units while the
  pool starts, and starts none for a corpus too small to pay for it).
* datasketch, in this process, pinned to one CPU: the same normalisation and word 5-grams
  (``normalize_text``) in Python, ``MinHash.generator(..., num_perm=112)`` (datasketch's
  fastest CPU path, the permutations made once) and ``MinHashLSH(num_perm=112, params=(14, 8))``,
  ``query`` then ``insert`` per document; every candidate verified on its MinHash (estimated
  Jaccard >= 0.75, the stage's rule) and merged in a union-find that keeps the first document
  of each cluster in corpus order, as the stage does.

The sides alternate ``--repeats`` times; the best time of each is compared, so load from other
processes on the machine hits both alike. Reported per size: the stage's documents/s with W
workers and per core (divided by the cores it had), datasketch's on one core, and the ratios.
Agreement: the fraction of documents both keep or both drop, and of planted pairs each finds.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import bz2  # noqa: E402
import gzip  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

from bench._results import result_path, write_result  # noqa: E402
from pipelines.minhash import MinHashConfig, MinHasher, band_hashes, lsh_probability, normalize_text  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
STDLIB_MODULES = (
    "argparse asyncio base64 bisect calendar collections concurrent.futures configparser contextlib copy csv "
    "dataclasses datetime decimal difflib doctest email enum fractions ftplib functools gettext glob gzip "
    "hashlib heapq hmac html.parser http.client http.server imaplib inspect ipaddress itertools json locale "
    "logging mailbox mimetypes multiprocessing operator optparse os pathlib pdb pickle platform plistlib "
    "poplib pprint queue random re sched secrets selectors shelve shlex shutil smtplib socket sqlite3 ssl "
    "statistics string subprocess tarfile tempfile textwrap threading timeit tokenize trace traceback types "
    "typing unittest urllib.parse urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree "
    "zipfile zoneinfo"
).split()
DOC_CHARS = 2000

# ------------------------------------------------------------------ real documents


def _wiki_pages(path: Path) -> list[str]:
    import xml.etree.ElementTree as ET

    pages = []
    with (bz2.open(path, "rb") if path.suffix == ".bz2" else open(path, "rb")) as handle:
        for _, element in ET.iterparse(handle):
            if element.tag.rsplit("}", 1)[-1] == "text" and element.text:
                if not element.text.lstrip().lower().startswith("#redirect"):
                    pages.append(element.text)
            element.clear()
    return pages


def _stdlib_texts() -> list[str]:
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - optional modules
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr, value in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                parts.append(inspect.getdoc(value) or "")
        texts.append("\n\n".join(p for p in parts if p))
    return texts


def _package_descriptions() -> list[str]:
    """The long descriptions (mostly the READMEs) of the installed Python packages."""
    from importlib.metadata import distributions

    texts = {}
    for dist in distributions():
        metadata = dist.read_text("METADATA") or ""
        name = dist.metadata["Name"] or ""
        body = metadata.partition("\n\n")[2].strip()
        if body and name and name.lower() != "kiln":  # not this project's own README: it changes
            texts[name.lower()] = body
    return [texts[k] for k in sorted(texts)]


def long_texts() -> list[str]:
    """Real texts to cut into documents: Wikipedia, books, Shakespeare, arXiv, news, Python's
    docs, the installed packages' descriptions."""
    texts: list[str] = []
    for name in ("piskvorky_gensim_enwiki-pages-articles1-shortened.xml.bz2",
                 "spencermountain_dumpster-dive_ltgwiki-pages-articles.xml"):
        if (SHARED / "mediawiki" / name).is_file():
            texts.extend(_wiki_pages(SHARED / "mediawiki" / name))
    for path in sorted((SHARED / "books").glob("*.txt")) + [SHARED / "text" / "tinyshakespeare_input.txt"]:
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    arxiv = SHARED / "jsonl" / "mosaicml_llm-foundry_redpajama-arxiv.jsonl"
    if arxiv.is_file():
        texts.extend(json.loads(line)["text"] for line in arxiv.open(encoding="utf-8") if line.strip())
    truth = SHARED / "html_extraction" / "scrapinghub_aeb" / "ground-truth.json"
    if truth.is_file():
        data = json.loads(truth.read_text(encoding="utf-8"))
        texts.extend(data[k]["articleBody"] for k in sorted(data))
    return texts + _stdlib_texts() + _package_descriptions()


def chunk_documents(texts: list[str], size: int = DOC_CHARS) -> list[str]:
    """~``size``-character documents cut at whitespace: non-overlapping pieces of every text,
    then pieces shifted by half a document (each shares about half its text with two others)."""
    out: list[str] = []
    for shift in (0, size // 2):
        for text in texts:
            pos = shift
            while pos + size // 2 < len(text):
                end = text.find(" ", pos + size)
                end = len(text) if end < 0 else end
                start = text.find(" ", pos) if pos else 0
                doc = text[max(start, 0):end].strip()
                if len(doc) > size // 2:
                    out.append(doc)
                pos = end
    return out


def real_documents() -> list[str]:
    """C4's web pages as they are, then the pieces of the long texts; each text once."""
    docs: list[str] = []
    c4 = SHARED / "jsonl" / "allenai_OLMo_c4-sample.00000-of-00001.json.gz"
    if c4.is_file():
        with gzip.open(c4, "rt", encoding="utf-8") as handle:
            docs.extend(json.loads(line)["text"] for line in handle if line.strip())
    docs += chunk_documents(long_texts())
    return list(dict.fromkeys(d for d in docs if d.strip()))


def largest_corpus(pool: list[str]) -> int:
    """The most documents :func:`make_corpus` can make from `pool` (77% of them are originals)."""
    n = int(len(pool) / 0.77)
    while n - n // 5 - (3 * n) // 100 > len(pool):
        n -= 1
    return n


def make_corpus(n: int, pool: list[str], seed: int = 20240601) -> tuple[list[str], list[tuple[int, int]]]:
    """``n`` documents: real ones, near-duplicates and exact duplicates of them, shuffled; and the
    planted (original, copy) pairs as positions in the corpus."""
    rng = random.Random(seed)
    n_near, n_exact = n // 5, (3 * n) // 100
    n_base = n - n_near - n_exact
    base = rng.sample(pool, n_base)
    vocab = sorted({w for d in base[:200] for w in d.split()})
    long_enough = [i for i, d in enumerate(base) if len(d.split()) >= 250] or list(range(n_base))
    items = [(d, i) for i, d in enumerate(base)]   # (text, the original it copies)
    for _ in range(n_near):
        src = rng.choice(long_enough)
        words = base[src].split()
        for _ in range(rng.randint(2, 3)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        if rng.random() < 0.5:
            words = ["Posted", "on", f"{rng.randint(1, 28)}", "March", "by", "admin"] + words
        else:
            words = words + ["Share", "this", "page:", "Twitter", "Facebook", f"#{rng.randint(1, 999)}"]
        items.append((" ".join(words), src))
    for _ in range(n_exact):
        src = rng.randrange(n_base)
        items.append((base[src].upper() + "  ", src))
    order = list(range(len(items)))
    rng.shuffle(order)
    docs = [items[k][0] for k in order]
    position = {k: p for p, k in enumerate(order)}
    planted = [(position[items[k][1]], position[k]) for k in range(n_base, len(items))]
    return docs, planted


def true_jaccard(a: str, b: str, n: int = 5) -> float:
    def grams(text: str) -> set:
        words = normalize_text(text).split()
        return {tuple(words[i:i + n]) for i in range(max(len(words) - n + 1, 1 if words else 0))}

    sa, sb = grams(a), grams(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


# ------------------------------------------------------------------ the dedup stage


def write_clean_artifact(store_root: Path, docs: list[str], shard_docs: int):
    """The documents as a clean artifact: Parquet shards with the clean stage's columns."""
    import pyarrow as pa

    from pipelines.common import shard_name
    from storage import ArtifactStore

    store = ArtifactStore(store_root)

    def build(writer):
        for s, start in enumerate(range(0, len(docs), shard_docs)):
            texts = docs[start:start + shard_docs]
            ids = [f"doc-{start + j:07d}" for j in range(len(texts))]
            writer.write_parquet(shard_name(s), pa.table({
                "id": ids, "url": [f"https://bench.example.org/{i}" for i in ids], "text": texts,
                "language": ["en"] * len(texts), "language_score": [1.0] * len(texts)}))
        return {"documents_out": len(docs)}

    fp = f"bench-{len(docs)}-{shard_docs}"
    return store.produce("clean", fp, build, config={"bench": fp}, inputs=[], code_version="bench")


def time_stage(store_root: str, clean_fp: str, workers: int) -> dict:
    """One `kiln dedup` build, timed from the stage's call to its committed artifact (this runs
    in a fresh process: the pool starts as in a user's command)."""
    from pipelines.dedup import STAGE, DedupConfig
    from storage import ArtifactStore

    store = ArtifactStore(store_root)
    shutil.rmtree(store.stage_dir("dedup"), ignore_errors=True)
    clean = store.find(clean_fp)
    config = DedupConfig(workers=workers)
    t0 = time.perf_counter()
    manifest = STAGE.run(config, [clean], store)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "fingerprint": manifest.fingerprint, "stats": manifest.stats}


def run_stage(store_root: Path, clean_fp: str, workers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), KILN_NO_PROGRESS="1")
    out = subprocess.run([sys.executable, __file__, "--time-stage", str(store_root), clean_fp, str(workers)],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if out.returncode:
        raise SystemExit(f"the dedup stage failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def stage_kept(store_root: Path, fingerprint: str) -> np.ndarray:
    """Positions in the corpus of the documents the dedup artifact kept."""
    from pipelines.common import document_shards, read_shard
    from storage import ArtifactStore

    store = ArtifactStore(store_root)
    manifest = store.find(fingerprint)
    ids = [i for s in document_shards(manifest)
           for i in read_shard(store, manifest, s, ["id"]).column("id").to_pylist()]
    return np.array([int(i.split("-")[1]) for i in ids], dtype=np.int64)


# ------------------------------------------------------------------ datasketch


def run_datasketch(docs: list[str], config: MinHashConfig) -> tuple[float, np.ndarray]:
    """Seconds, and the keep mask: MinHash + LSH + verification + keep the first of each cluster."""
    from datasketch import MinHash, MinHashLSH

    n, need = config.ngram, config.similarity_threshold

    def shingles():
        for doc in docs:
            words = normalize_text(doc).split()
            yield [" ".join(words[j:j + n]).encode("utf-8") for j in range(max(len(words) - n + 1, 1 if words else 0))]

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=config.num_hashes, params=(config.num_bands, config.rows_per_band))
    parent = list(range(len(docs)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    minhashes = []
    for i, m in enumerate(MinHash.generator(shingles(), num_perm=config.num_hashes)):
        if not m.is_empty():
            for j in lsh.query(m):
                if m.jaccard(minhashes[j]) >= need:
                    a, b = find(i), find(j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)  # the root is the first document in corpus order
            lsh.insert(i, m)
        minhashes.append(m)
    keep = np.array([find(i) == i for i in range(len(docs))])
    return time.perf_counter() - t0, keep


# ------------------------------------------------------------------ one size


def _cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def bench_size(n: int, pool: list[str], args, tmp: Path) -> dict:
    docs, planted = make_corpus(n, pool)
    mean_chars = float(np.mean([len(d) for d in docs]))
    sample = planted[:: max(1, len(planted) // 200)]
    jac = np.array([true_jaccard(docs[a], docs[b]) for a, b in sample])
    store_root = tmp / f"store-{n}"
    clean = write_clean_artifact(store_root, docs, args.shard_docs)
    shards = sum(1 for f in clean.files if f.path.endswith(".parquet"))
    print(f"{n:,} documents, mean {mean_chars:,.0f} chars, {shards} clean shards; "
          f"{len(planted)} planted pairs (true Jaccard of {len(sample)}: min {jac.min():.3f}, mean {jac.mean():.3f})",
          flush=True)

    config = MinHashConfig()  # 14 bands x 8 rows = 112 hashes, threshold 0.75: the stage's defaults
    cpus = _cpus()
    cores = min(args.workers, len(cpus))
    stage_times, ds_times = [], []
    stage = ds_keep = None
    for rep in range(args.repeats):
        stage = run_stage(store_root, clean.fingerprint, args.workers)
        stage_times.append(stage["seconds"])
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {cpus[0]})
        try:
            t, ds_keep = run_datasketch(docs, config)
        finally:
            if hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, set(cpus))
        ds_times.append(t)
        print(f"  repeat {rep + 1}: stage ({args.workers} workers) {stage_times[-1]:.3f} s   "
              f"datasketch (1 core) {ds_times[-1]:.3f} s", flush=True)

    kept = stage_kept(store_root, stage["fingerprint"])
    stage_keep = np.zeros(n, dtype=bool)
    stage_keep[kept] = True
    stage_rate = n / min(stage_times)
    ds_rate = n / min(ds_times)
    # a planted pair is found when not both are kept (an earlier copy may stand for both)
    found_stage = np.array([not (stage_keep[a] and stage_keep[b]) for a, b in planted])
    found_ds = np.array([not (ds_keep[a] and ds_keep[b]) for a, b in planted])
    result = {
        "docs": n,
        "mean_chars": round(mean_chars, 1),
        "clean_shards": shards,
        "workers": args.workers,
        "cores": cores,
        "stage_seconds": [round(t, 4) for t in stage_times],
        "datasketch_seconds": [round(t, 4) for t in ds_times],
        "stage_docs_per_s": round(stage_rate, 1),
        "stage_docs_per_s_per_core": round(stage_rate / cores, 1),
        "datasketch_docs_per_s": round(ds_rate, 1),
        "ratio": round(stage_rate / ds_rate, 2),
        "ratio_per_core": round(stage_rate / cores / ds_rate, 2),
        "kept_stage": int(stage_keep.sum()),
        "kept_datasketch": int(ds_keep.sum()),
        "kept_agreement": round(float(np.mean(stage_keep == ds_keep)), 5),
        "planted_pairs": len(planted),
        "planted_true_jaccard_min": round(float(jac.min()), 4),
        "planted_found_stage": round(float(found_stage.mean()), 4),
        "planted_found_datasketch": round(float(found_ds.mean()), 4),
        "stage_stats": stage["stats"],
    }
    print(f"  stage {stage_rate:,.0f} docs/s with {args.workers} workers ({stage_rate / cores:,.0f} per core); "
          f"datasketch {ds_rate:,.0f} docs/s on one core: {result['ratio']:.2f}x, "
          f"{result['ratio_per_core']:.2f}x per core; kept {result['kept_stage']} / {result['kept_datasketch']}, "
          f"agreement {result['kept_agreement']:.4f}", flush=True)
    return result


def hash_family_quality(pairs: int = 4000, set_size: int = 300, seed: int = 7) -> list[dict]:
    """Monte-Carlo check of the MinHash family on pseudo-random sets of known Jaccard.

    For each target similarity: mean per-row match rate vs J (bias), standard deviation of the
    112-hash estimate vs the binomial sqrt(J(1-J)/K), band match rate vs J^r and the any-band
    (LSH candidate) rate vs 1-(1-J^r)^b, for 14x8 and 20x5 with the default seed.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for target in (0.5, 0.75, 0.9):
        shared = int(round(2 * set_size * target / (1 + target)))
        jac = shared / (2 * set_size - shared)
        u = rng.integers(0, 2**64 - 1, (pairs, 2 * set_size - shared), dtype=np.uint64, endpoint=True)
        a = u[:, :set_size]
        b = np.concatenate([u[:, :shared], u[:, set_size:]], axis=1)
        hashes = np.concatenate([a, b]).reshape(-1)
        offsets = np.arange(0, 2 * pairs * set_size + 1, set_size)
        for bands, r in ((14, 8), (20, 5)):
            config = MinHashConfig(num_bands=bands, rows_per_band=r)
            sig = MinHasher(config).signatures_from_hashes(hashes, offsets)
            sa, sb = sig[:pairs], sig[pairs:]
            match = sa == sb
            est = match.mean(axis=1)
            band = band_hashes(sa, config) == band_hashes(sb, config)
            rows.append({
                "jaccard": round(jac, 4), "bands_rows": [bands, r],
                "row_match_rate": round(float(match.mean()), 4),
                "estimate_sd": round(float(est.std()), 4),
                "binomial_sd": round(float(np.sqrt(jac * (1 - jac) / config.num_hashes)), 4),
                "band_match_rate": round(float(band.mean()), 4), "theory_band": round(jac**r, 4),
                "candidate_rate": round(float(band.any(axis=1).mean()), 4),
                "theory_candidate": round(lsh_probability(jac, bands, r), 4),
            })
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--time-stage"]:
        print(json.dumps(time_stage(argv[1], argv[2], int(argv[3])), default=str))
        return {}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,20000", help="corpus sizes, comma-separated: the small one first")
    parser.add_argument("--workers", type=int, default=2, help="the stage's workers")
    parser.add_argument("--shard-docs", type=int, default=2000, help="documents per clean shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small corpora (300 and 1,500 documents), one repeat")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "minhash.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.shard_docs = "300,1500", 1, 500
    pool = real_documents()
    print(f"{len(pool):,} real documents to draw from", flush=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) > largest_corpus(pool):  # without ../shared/data: Python's docs and the packages' only
        print(f"WARNING: {len(pool):,} real documents make at most {largest_corpus(pool):,}: the sizes are "
              f"capped (../shared/data has the texts for 20,000)", flush=True)
        sizes = [min(n, largest_corpus(pool)) for n in sizes]
    normalize_text("")  # its tables, once, before any clock starts (the stage's are filled as it goes)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-minhash-") as tmp:
        by_size = [bench_size(n, pool, args, Path(tmp)) for n in sizes]
    small, large = by_size[0], by_size[-1]
    results = {
        "benchmark": "minhash",
        "quick": args.quick,
        "sizes": by_size,
        "real_documents": len(pool),
        # the goals: faster than datasketch on the small corpus; >= 10x per core on the large one
        "ratio_small": small["ratio"],
        "ratio_per_core_large": large["ratio_per_core"],
        "kept_agreement_min": min(r["kept_agreement"] for r in by_size),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": len(_cpus()),
    }
    if not args.quick:
        results["hash_family_quality"] = hash_family_quality()
    for r in by_size:
        print(f"{r['docs']:>7,} docs: stage {r['stage_docs_per_s']:>9,.0f} docs/s ({r['workers']} workers), "
              f"{r['stage_docs_per_s_per_core']:>9,.0f} per core; datasketch {r['datasketch_docs_per_s']:>7,.0f}: "
              f"{r['ratio']:.2f}x, {r['ratio_per_core']:.2f}x per core; agreement {r['kept_agreement']:.4f}")
    write_result(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
