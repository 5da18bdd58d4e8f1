"""Benchmark: Kiln's vectorised MinHash + LSH (pipelines/minhash/) vs datasketch, one core.

    python bench/minhash.py [--docs 3000] [--repeats 3] [--out bench/results/minhash.json]

Both sides get the same ~2,000-character real documents (Shakespeare chunks from
``../shared/data/text`` when present, Python reference-manual topics, stdlib docstrings, article
bodies from ``../shared/data/html_extraction`` when present), with planted near-duplicates
(a few words edited and a header or footer changed, true word-5-gram Jaccard >= 0.85).

* datasketch: our reference ``normalize_text`` + word 5-gram shingles in Python,
  ``MinHash(num_perm=112).update_batch`` of the UTF-8 shingles, and
  ``MinHashLSH(num_perm=112, params=(14, 8))``: ``query`` then ``insert`` per document.
* Kiln: ``MinHashDeduplicator`` (signatures, band spill to disk, per-band sort, candidate
  verification on the signatures, union-find, keep the lowest index), with and without the
  exact-duplicate pass.

The process is pinned to one CPU and BLAS/OpenMP thread pools are set to 1 before numpy loads;
the two sides run alternately ``--repeats`` times and the best time of each is compared, so
load from other processes on the machine hits both sides alike.  Agreement: the fraction of
planted pairs each side finds (datasketch: LSH candidate whose MinHash Jaccard estimate is
>= 0.75, i.e. the same verification rule; Kiln: same cluster), and the fraction both find.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402

import numpy as np  # noqa: E402

from pipelines.minhash import (  # noqa: E402
    MinHashConfig,
    MinHashDeduplicator,
    MinHasher,
    band_hashes,
    lsh_probability,
    normalize_text,
    word_shingles,
)

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


def corpus_texts() -> list[str]:
    """Real prose: Shakespeare, reference-manual topics, stdlib docstrings, article bodies."""
    texts: list[str] = []
    shakespeare = SHARED / "text" / "tinyshakespeare_input.txt"
    if shakespeare.is_file():
        texts.append(shakespeare.read_text(encoding="utf-8"))
    import pydoc_data.topics

    texts.extend(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
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
    truth = SHARED / "html_extraction" / "scrapinghub_aeb" / "ground-truth.json"
    if truth.is_file():
        data = json.loads(truth.read_text(encoding="utf-8"))
        texts.extend(data[k]["articleBody"] for k in sorted(data))
    return texts


def chunk_documents(texts: list[str], size: int = 2000) -> list[str]:
    """~``size``-character documents cut at whitespace: non-overlapping chunks of every text,
    then chunks shifted by half a document (sharing ~half their text with two others)."""
    out: list[str] = []
    for shift in (0, size // 2):
        for text in texts:
            pos = shift
            while pos + size // 2 < len(text):
                end = text.find(" ", pos + size)
                end = len(text) if end < 0 else end
                start = text.find(" ", pos) if pos else 0
                doc = text[max(start, 0) : end].strip()
                if len(doc) > size // 2:
                    out.append(doc)
                pos = end
    return out


def true_jaccard(a: str, b: str) -> float:
    sa, sb = set(word_shingles(a)), set(word_shingles(b))
    return len(sa & sb) / len(sa | sb)


def plant_near_duplicates(docs: list[str], n_pairs: int, rng: random.Random) -> tuple[list[str], list[tuple[int, int]]]:
    """Append ``n_pairs`` edited copies (2-3 words replaced, header or footer changed) of random
    documents of >= 250 words, redrawn until the true word-5-gram Jaccard is >= 0.85; returns
    the corpus and the planted (original, copy) index pairs."""
    vocab = sorted({w for d in docs[:200] for w in d.split()})
    pairs = []
    out = list(docs)
    for src in rng.sample(range(len(docs)), len(docs)):
        if len(pairs) == n_pairs:
            break
        if len(docs[src].split()) < 250:
            continue
        for _attempt in range(5):
            words = docs[src].split()
            for _ in range(rng.randint(2, 3)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            if rng.random() < 0.5:
                words = ["Posted", "on", f"{rng.randint(1, 28)}", "March", "by", "admin"] + words
            else:
                words = words + ["Share", "this", "page:", "Twitter", "Facebook", f"#{rng.randint(1, 999)}"]
            copy = " ".join(words)
            if true_jaccard(docs[src], copy) >= 0.85:
                pairs.append((src, len(out)))
                out.append(copy)
                break
    return out, pairs


def run_datasketch(docs: list[str], num_perm: int, params: tuple[int, int]):
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(num_perm=num_perm, params=params)
    minhashes = []
    candidates = []
    for i, doc in enumerate(docs):
        words = normalize_text(doc).split()
        n = 5
        grams = [" ".join(words[j : j + n]) for j in range(max(len(words) - n + 1, 1 if words else 0))]
        m = MinHash(num_perm=num_perm)
        m.update_batch([g.encode("utf-8") for g in grams])
        candidates.append(lsh.query(m))
        lsh.insert(i, m)
        minhashes.append(m)
    elapsed = time.perf_counter() - t0
    return elapsed, minhashes, candidates


def run_kiln(docs: list[str], config: MinHashConfig, exact: bool, batch: int = 1024):
    """Returns (total seconds, seconds in add() = signatures + band spill, result)."""
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        t0 = time.perf_counter()
        with MinHashDeduplicator(config, workdir=tmp, exact=exact) as dd:
            for s in range(0, len(docs), batch):
                dd.add(docs[s : s + batch])
            t_add = time.perf_counter() - t0
            result = dd.finalize()
        elapsed = time.perf_counter() - t0
    return elapsed, t_add, result


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=3000, help="corpus size (documents)")
    parser.add_argument("--planted", type=int, default=300, help="planted near-duplicate pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "minhash.json")
    args = parser.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
        cpu = args.cpu if args.cpu is not None else allowed[0]
        os.sched_setaffinity(0, {cpu})

    rng = random.Random(20240601)
    base = chunk_documents(corpus_texts())
    rng.shuffle(base)
    base = base[: max(args.docs - args.planted, 1)]
    docs, planted = plant_near_duplicates(base, min(args.planted, len(base)), rng)
    jac = np.array([true_jaccard(docs[a], docs[b]) for a, b in planted])
    mean_chars = float(np.mean([len(d) for d in docs]))
    print(f"{len(docs)} documents, mean {mean_chars:.0f} chars; {len(planted)} planted pairs, "
          f"true Jaccard min {jac.min():.3f} mean {jac.mean():.3f}")

    config = MinHashConfig()  # 14 bands x 8 rows = 112 hashes, threshold 0.75
    params = (config.num_bands, config.rows_per_band)
    ds_times, k_times, k_add_times, k_exact_times = [], [], [], []
    ds_state = kiln_result = None
    for rep in range(args.repeats):
        t, mhs, cands = run_datasketch(docs, config.num_hashes, params)
        ds_times.append(t)
        ds_state = (mhs, cands)
        t, t_add, kiln_result = run_kiln(docs, config, exact=False)
        k_times.append(t)
        k_add_times.append(t_add)
        t, _, _ = run_kiln(docs, config, exact=True)
        k_exact_times.append(t)
        print(f"  repeat {rep + 1}: datasketch {ds_times[-1]:.3f}s  kiln {k_times[-1]:.3f}s  "
              f"kiln+exact {k_exact_times[-1]:.3f}s")

    n = len(docs)
    ds_rate = n / min(ds_times)
    k_rate = n / min(k_times)
    ke_rate = n / min(k_exact_times)

    mhs, cands = ds_state
    ds_found = np.array(
        [a in set(cands[b]) and mhs[a].jaccard(mhs[b]) >= config.similarity_threshold for a, b in planted]
    )
    ds_raw = np.array([a in set(cands[b]) for a, b in planted])
    rep_ = kiln_result.representative
    k_found = np.array([rep_[a] == rep_[b] and rep_[a] >= 0 for a, b in planted])
    both = ds_found & k_found
    results = {
        "benchmark": "minhash",
        "docs": n,
        "mean_chars": round(mean_chars, 1),
        "num_hashes": config.num_hashes,
        "bands_rows": list(params),
        "repeats": args.repeats,
        "datasketch_seconds": ds_times,
        "kiln_seconds": k_times,
        "kiln_signature_seconds": k_add_times,
        "kiln_with_exact_seconds": k_exact_times,
        "datasketch_docs_per_s": round(ds_rate, 1),
        "kiln_docs_per_s": round(k_rate, 1),
        "kiln_with_exact_docs_per_s": round(ke_rate, 1),
        "kiln_us_per_doc": round(1e6 / k_rate, 1),
        "kiln_signature_share": round(min(k_add_times) / min(k_times), 3),
        "speedup": round(k_rate / ds_rate, 2),
        "speedup_with_exact": round(ke_rate / ds_rate, 2),
        "planted_pairs": len(planted),
        "planted_true_jaccard_min": round(float(jac.min()), 4),
        "planted_found_datasketch_raw_lsh": round(float(ds_raw.mean()), 4),
        "planted_found_datasketch_verified": round(float(ds_found.mean()), 4),
        "planted_found_kiln": round(float(k_found.mean()), 4),
        "planted_found_both": round(float(both.mean()), 4),
        "kiln_stats": kiln_result.stats(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "pinned_cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    print(f"datasketch: {ds_rate:,.0f} docs/s")
    print(f"kiln:       {k_rate:,.0f} docs/s  ({k_rate / ds_rate:.1f}x; {1e6 / k_rate:.0f} us/doc, "
          f"{min(k_add_times) / min(k_times):.0%} of it signatures + spill, the rest LSH + clustering)")
    print(f"kiln+exact: {ke_rate:,.0f} docs/s  ({ke_rate / ds_rate:.1f}x)")
    print(f"planted pairs found: datasketch {ds_found.mean():.3f} (raw LSH {ds_raw.mean():.3f}), "
          f"kiln {k_found.mean():.3f}, both {both.mean():.3f}")
    print(f"kiln stats: {kiln_result.stats()}")
    quality = hash_family_quality()
    results["hash_family_quality"] = quality
    print("hash family on random sets (4000 pairs each): J, bands x rows, row match, est. sd vs binomial, "
          "band match vs J^r, candidates vs theory")
    for q in quality:
        print(f"  J={q['jaccard']:.3f} {q['bands_rows'][0]}x{q['bands_rows'][1]}: row {q['row_match_rate']:.4f}  "
              f"sd {q['estimate_sd']:.4f} vs {q['binomial_sd']:.4f}  band {q['band_match_rate']:.4f} vs "
              f"{q['theory_band']:.4f}  candidates {q['candidate_rate']:.4f} vs {q['theory_candidate']:.4f}")
    write_result(args.out, results)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
