"""Tests for pipelines/minhash/ on real text (stdlib documentation, Shakespeare when present).

Documents are ~300-word windows of real prose; near-duplicates and partial overlaps are planted
and their true word-5-gram Jaccard is computed exactly with Python sets of the reference
shingles (``word_shingles``).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import random
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from pipelines.minhash import (
    IndexConfigError,
    MinHashConfig,
    MinHashDeduplicator,
    MinHasher,
    SignatureIndex,
    band_hashes,
    candidate_pairs,
    cluster_signatures,
    deduplicate,
    estimate_jaccard,
    exact_duplicates,
    exact_hash,
    exact_hashes,
    lsh_probability,
    normalize_text,
    reference_shingle_hashes,
    shingle_hashes,
    shingle_hashes_batch,
    word_shingles,
)
from pipelines.minhash.shingles import (
    _CLASSES,
    _LOWER_BMP,
    _SPECIAL,
    _char_classes,
    batches,
    exact_hashes_from_batch,
    shingle_hashes_from_batch,
    split_by_encoding,
)

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "text" / "tinyshakespeare_input.txt"

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

DOC_TOKENS = 300


# --------------------------------------------------------------------------------------------
# real-text corpus
# --------------------------------------------------------------------------------------------


def _stdlib_texts() -> list[str]:
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except Exception:  # pragma: no cover - optional stdlib modules
            continue
        parts = [inspect.getdoc(mod) or ""]
        for attr, value in sorted(vars(mod).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                parts.append(inspect.getdoc(value) or "")
            if inspect.isclass(value):
                for method_name, method in sorted(vars(value).items()):
                    if not method_name.startswith("_") and inspect.isfunction(method) and method.__doc__:
                        parts.append(inspect.cleandoc(method.__doc__))
        texts.append("\n\n".join(p for p in parts if p))
    return texts


@lru_cache(maxsize=1)
def base_documents() -> tuple[str, ...]:
    """Mutually dissimilar ~300-word documents of real prose.

    Windows of 300 whitespace tokens; a window is used if it has >= 250 shingles, >= 90 % of
    them distinct (no tables), and <= 5 % of its shingles occur in an earlier window (the stdlib
    repeats some docstrings), so planted pairs are the only similar documents.
    """
    texts = []
    if SHAKESPEARE.is_file():
        texts.append(SHAKESPEARE.read_text(encoding="utf-8"))
    texts.extend(_stdlib_texts())
    seen: set = set()
    out = []
    for text in texts:
        tokens = text.split()
        for s in range(0, len(tokens) - DOC_TOKENS + 1, DOC_TOKENS):
            doc = " ".join(tokens[s : s + DOC_TOKENS])
            shingles = word_shingles(doc)
            distinct = set(shingles)
            if len(shingles) < 250 or len(distinct) < 0.9 * len(shingles):
                continue
            if sum(1 for x in distinct if x in seen) > 0.05 * len(distinct):
                continue
            seen |= distinct
            out.append(doc)
    # ~1,100 with Shakespeare, ~250 from the stdlib alone: the statistical tests scale down
    assert len(out) >= 200, f"only {len(out)} base documents from the stdlib docs"
    return tuple(out)


@lru_cache(maxsize=1)
def vocabulary() -> tuple[str, ...]:
    return tuple(sorted({w for d in base_documents()[:100] for w in d.split()}))


def jaccard(a: str, b: str) -> float:
    sa, sb = set(word_shingles(a)), set(word_shingles(b))
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def near_duplicate(doc: str, rng: random.Random) -> str:
    """Edit 1-3 words and add/replace a header or footer line; true Jaccard >= 0.85."""
    vocab = vocabulary()
    for _ in range(20):
        words = doc.split()
        for _ in range(rng.randint(1, 3)):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        kind = rng.randrange(3)
        if kind == 0:
            by = rng.choice(["admin", "editor", "guest"])
            words = ["Posted", "by", by, "on", f"{rng.randint(1, 28)}", "May"] + words
        elif kind == 1:
            words = words + ["Share", "this:", "Twitter", "Facebook", "Email", f"({rng.randint(2, 99)} comments)"]
        else:  # replace the last sentence-ish tail (footer)
            words = words[:-6] + ["Copyright", "2024", "All", "rights", "reserved."]
        out = " ".join(words)
        if jaccard(doc, out) >= 0.85:
            return out
    raise AssertionError("could not plant a near-duplicate")  # pragma: no cover


def with_substitutions(doc: str, target: float, rng: random.Random) -> str:
    """``doc`` with random words replaced until the true Jaccard drops to about ``target``."""
    words = doc.split()
    vocab = vocabulary()
    positions = rng.sample(range(len(words)), len(words))
    replacement = [rng.choice(vocab) for _ in positions]

    def edited(k: int) -> str:
        w = list(words)
        for p, r in zip(positions[:k], replacement[:k]):
            w[p] = r
        return " ".join(w)

    lo, hi = 0, len(words) // 2  # J(edited(k)) decreases with k
    while lo < hi:
        mid = (lo + hi) // 2
        if jaccard(doc, edited(mid)) > target:
            lo = mid + 1
        else:
            hi = mid
    return edited(lo)


@lru_cache(maxsize=1)
def mixed_corpus():
    """Planted near-duplicate pairs (J >= 0.85) and partial-overlap pairs (J <= 0.5), shuffled.

    Returns ``(docs, near_pairs, low_pairs, near_j, low_j)`` with pairs as document indices.
    """
    rng = random.Random(1234)
    bases = list(base_documents())
    rng.shuffle(bases)
    n = min(300, len(bases) // 3)
    near_src, rest = bases[:n], bases[n:]
    items = []  # (doc, pair id, kind)
    near_j, low_j, low_keys = [], [], []
    for k, doc in enumerate(near_src):
        dup = near_duplicate(doc, rng)
        near_j.append(jaccard(doc, dup))
        items += [(doc, ("near", k)), (dup, ("near", k))]
    for k in range(n):
        a, other = rest[2 * k].split(), rest[2 * k + 1].split()
        shared = int(len(a) * rng.uniform(0.45, 0.67))  # share up to 2/3 of the words: J <= 0.5
        doc_a = " ".join(a)
        doc_b = " ".join(a[:shared] + other[: len(a) - shared])
        j = jaccard(doc_a, doc_b)
        if j > 0.5:
            continue
        low_j.append(j)
        low_keys.append(k)
        items += [(doc_a, ("low", k)), (doc_b, ("low", k))]
    rng.shuffle(items)
    docs = [d for d, _ in items]
    where: dict = {}
    for i, (_, key) in enumerate(items):
        where.setdefault(key, []).append(i)
    near_pairs = [tuple(where[("near", k)]) for k in range(n)]
    low_pairs = [tuple(where[("low", k)]) for k in low_keys]
    return docs, near_pairs, low_pairs, np.array(near_j), np.array(low_j)


@lru_cache(maxsize=1)
def mixed_result():
    docs, *_ = mixed_corpus()
    return deduplicate(docs, MinHashConfig())


# --------------------------------------------------------------------------------------------
# normalisation, shingles, hashes
# --------------------------------------------------------------------------------------------

EDGE_TEXTS = [
    "",
    "   \n\t ",
    "!!! ... ???",
    "Hello, World!",
    "a b c d",
    "3.14 is pi, 1,000,000 dollars; abc123def and 2024-05-01",
    "soft\u00adhyphen zero\u200bwidth ÉCOLE İstanbul Straße",
    "full\u3000width　spaces\u00a0nbsp\u2003em",
    "日本語のテキスト、句読点。 עברית 'quoted' \"double\" — dash – en",
    "1\u200b2 ok 1.2.3 1..2 a_b 12ab34 ٣٤٥ ١٫٥",
    "lone surrogate \ud800 in text",
    "ΟΔΥΣΣΕΥΣ ΣΟΦΟΣ Σ ΣΑ",  # str.lower() makes a final sigma of some, by their context
    "the KELVIN \u212a and the DOTTED \u0130 and \uffff",  # to ASCII; to two characters; a noncharacter
    "\U0001f600 emoji and \U00010400 DESERET",
    "ǅungla Ⓐ ǈ Ⅻ",  # title case, circled and Roman letters have lowercase forms
]


def test_normalize_text_like_fineweb():
    assert normalize_text("  Hello,   WORLD!\n\nIt's 3.14 -- ok? ") == "hello world it s 0 ok"
    assert normalize_text("It's 3.14", normalize_digits=False) == "it s 3 14"
    assert normalize_text("1,000,000 dollars in 2024") == "0 dollars in 0"
    assert normalize_text("soft\u00adhyphen\u200b") == "softhyphen"
    assert normalize_text("snake_case/path.name") == "snake case path name"
    assert normalize_text("") == "" and normalize_text(" \t\n ") == ""


def test_shingles_reference():
    assert word_shingles("a b c d e f", 5) == [("a", "b", "c", "d", "e"), ("b", "c", "d", "e", "f")]
    assert word_shingles("One, two!", 5) == [("one", "two")]  # shorter than n: one shingle
    assert word_shingles(" ... ", 5) == []


@pytest.mark.parametrize("ngram", [1, 3, 5])
@pytest.mark.parametrize("normalize_digits", [True, False])
def test_vectorised_hashes_match_reference(ngram, normalize_digits):
    docs = list(base_documents()[:20]) + EDGE_TEXTS
    hashes, offsets = shingle_hashes_batch(docs, ngram, normalize_digits)
    assert len(offsets) == len(docs) + 1
    for i, doc in enumerate(docs):
        ref = reference_shingle_hashes(doc, ngram, normalize_digits)
        assert len(ref) == len(word_shingles(doc, ngram, normalize_digits))
        np.testing.assert_array_equal(hashes[offsets[i] : offsets[i + 1]], ref)
        np.testing.assert_array_equal(shingle_hashes(doc, ngram, normalize_digits), ref)
    ex = exact_hashes(docs, normalize_digits)
    assert ex.tolist() == [exact_hash(d, normalize_digits) for d in docs]


def test_every_fast_path_gives_the_reference_hashes():
    """MinHasher and exact_hashes take batches of one kind of text: ASCII, all in the BMP
    (lowercased one UTF-16 code unit at a time in numpy), or the others (str.lower)."""
    docs = list(base_documents()[:30]) + EDGE_TEXTS + [d.upper() for d in EDGE_TEXTS] + [
        doc.replace(" ", " — ", 3) for doc in base_documents()[30:40]]  # real text with a non-ASCII dash
    docs.append("two lone surrogates \ud83d\ude00 are two code points, as in UTF-32 with surrogatepass")
    kinds = [len(positions) for positions, _ in split_by_encoding(docs)]
    assert len(kinds) == 3 and min(kinds) >= 5, kinds
    for normalize_digits in (True, False):
        seen = []
        for positions, batch in batches(docs, normalize_digits, max_chars=3000):
            hashes, offsets = shingle_hashes_from_batch(batch, 5)
            exact = exact_hashes_from_batch(batch)
            for k, i in enumerate(positions.tolist()):
                ref = reference_shingle_hashes(docs[i], 5, normalize_digits)
                np.testing.assert_array_equal(hashes[offsets[k]:offsets[k + 1]], ref, err_msg=repr(docs[i][:60]))
                assert exact[k] == exact_hash(docs[i], normalize_digits), repr(docs[i][:60])
                seen.append(i)
        assert sorted(seen) == list(range(len(docs)))


def test_the_tables_filled_on_demand_agree_with_unicode():
    code_points = np.concatenate([np.arange(1 << 16), np.arange(1 << 16, sys.maxunicode + 1, 97)]).astype(np.uint32)
    np.testing.assert_array_equal(_CLASSES(code_points), _char_classes()[code_points])
    lowered = _LOWER_BMP(np.arange(1 << 16, dtype=np.uint16))
    for unit, low in enumerate(lowered.tolist()):
        if low == _SPECIAL:  # left to str.lower(): capital sigma (by context), dotted capital I
            assert unit == 0x3A3 or len(chr(unit).lower()) != 1
        else:
            assert chr(low) == chr(unit).lower(), hex(unit)
    assert (lowered == _SPECIAL).sum() == 2


def test_shingle_hashes_distinct_on_real_text():
    docs = base_documents()[:200]
    distinct = {s for d in docs for s in word_shingles(d)}
    hashes, _ = shingle_hashes_batch(docs)
    assert len(np.unique(hashes)) == len(distinct)  # no 64-bit collisions among ~60k shingles


def test_one_shingle_documents_need_a_full_64_bit_collision():
    # rows alternate between the high and the low 32 bits of the shingle hash: two different
    # shingles that agree in one half (a 1-in-2^32 event per pair, frequent in a big corpus of
    # tiny documents) still disagree in about half of the rows, so verification rejects them
    hasher = MinHasher()
    hi = np.uint64(0x1234567800000000)
    hashes = np.array([hi | np.uint64(0x9ABCDEF1), hi | np.uint64(0x0FEDCBA3), np.uint64(0x9ABCDEF1)], dtype=np.uint64)
    sigs = hasher.signatures_from_hashes(hashes, np.arange(4))
    assert estimate_jaccard(sigs[0], sigs[1]) == 0.5  # the even rows (high half) agree
    assert estimate_jaccard(sigs[0], sigs[2]) == 0.5  # the odd rows (low half) agree
    assert cluster_signatures(sigs).tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# planted near-duplicates and partial overlaps
# --------------------------------------------------------------------------------------------


def test_planted_near_duplicates_removed():
    docs, near_pairs, _, near_j, _ = mixed_corpus()
    result = mixed_result()
    assert len(near_pairs) >= min(250, len(base_documents()) // 3) and near_j.min() >= 0.85
    keep = result.keep
    one_removed = np.array([keep[a] != keep[b] for a, b in near_pairs])
    rate = one_removed.mean()
    assert rate >= 0.95, f"only {rate:.3f} of {len(near_pairs)} near-duplicate pairs removed"
    for a, b in near_pairs:
        assert keep[a] or keep[b]  # never both
        if keep[a] != keep[b]:  # the first in corpus order is the one kept
            assert keep[min(a, b)] and result.representative[max(a, b)] == min(a, b)


def test_partial_overlaps_kept():
    docs, _, low_pairs, _, low_j = mixed_corpus()
    result = mixed_result()
    assert len(low_pairs) >= 0.8 * len(base_documents()[: 3 * 300]) // 3
    assert low_j.max() <= 0.5 and low_j.mean() > 0.3
    members = [i for pair in low_pairs for i in pair]
    removed = float(np.mean(~result.keep[members]))
    assert removed <= 0.01, f"{removed:.3%} of documents with Jaccard <= 0.5 removed"
    # without verification, raw 14x8 LSH flags some of the J~0.5 pairs (the reason for it)
    raw = deduplicate(docs, MinHashConfig(similarity_threshold=None))
    stats = result.stats()
    assert stats["num_removed"] == stats["num_near_duplicates"] == int(np.sum(~result.keep))
    assert raw.num_removed >= result.num_removed


def test_signature_estimates_jaccard():
    docs, near_pairs, low_pairs, near_j, low_j = mixed_corpus()
    sigs = MinHasher().signatures(docs)
    true = np.concatenate([near_j, low_j])
    pairs = np.array(near_pairs + low_pairs)
    est = estimate_jaccard(sigs[pairs[:, 0]], sigs[pairs[:, 1]])
    err = est - true
    # binomial standard error of a 112-hash estimate is <= 0.047
    assert abs(err.mean()) < 0.01 and err.std() < 0.06


# --------------------------------------------------------------------------------------------
# LSH curve: measured candidate rates vs 1-(1-s^r)^b
# --------------------------------------------------------------------------------------------

BUCKETS = [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.0)]


@lru_cache(maxsize=1)
def graded_pairs():
    """One pair per base document, true Jaccard spread over [0.3, 1.0); independent pairs."""
    rng = random.Random(99)
    docs, js = [], []
    bases = base_documents()
    per_bucket = min(150, len(bases) // len(BUCKETS))
    counts = [0] * len(BUCKETS)
    for base in bases:
        open_buckets = [k for k, c in enumerate(counts) if c < per_bucket]
        if not open_buckets:
            break
        lo, hi = BUCKETS[rng.choice(open_buckets)]
        other = with_substitutions(base, rng.uniform(lo, hi), rng)
        j = jaccard(base, other)
        for k, (blo, bhi) in enumerate(BUCKETS):
            if blo <= j < bhi or (k == len(BUCKETS) - 1 and j == 1.0):
                if counts[k] < per_bucket:
                    counts[k] += 1
                    docs += [base, other]
                    js.append(j)
                break
    return docs, np.array(js)


CURVE_SEEDS = (MinHashConfig().seed, 1, 2, 3)


@pytest.mark.parametrize("bands,rows", [(14, 8), (20, 5)])
def test_lsh_detection_matches_theory(bands, rows):
    """Raw LSH (no verification): candidate rate per Jaccard bucket vs 1-(1-s^r)^b.

    The theory is an expectation over the draw of the hash functions, so every pair is run
    under the default seed and three more (independent draws), which also doubles the
    resolution of the test.  Each (pair, seed) detection is Bernoulli(p) with
    p = 1-(1-s^r)^b for the pair's exact Jaccard s, independent across pairs (distinct base
    documents) and seeds: a bucket's rate has standard error sqrt(sum p(1-p))/n, and we allow
    4 standard errors (two-sided p ~ 6e-5 per bucket) plus 0.01 for the finite hashes.
    """
    docs, js = graded_pairs()
    hashes, offsets = shingle_hashes_batch(docs)
    n_docs = len(docs)
    found, band_match, row_match = [], [], []
    for seed in CURVE_SEEDS:
        config = MinHashConfig(num_bands=bands, rows_per_band=rows, seed=seed, similarity_threshold=None)
        sigs = MinHasher(config).signatures_from_hashes(hashes, offsets)
        i, j = candidate_pairs(sigs, config)
        keys = set((i * n_docs + j).tolist())
        found.append([(2 * p) * n_docs + 2 * p + 1 in keys for p in range(len(js))])
        bh = band_hashes(sigs, config)
        band_match.append(bh[0::2] == bh[1::2])  # [pairs, bands]
        row_match.append(sigs[0::2] == sigs[1::2])  # [pairs, hashes]
    found = np.array(found)  # [seeds, pairs]
    theory = lsh_probability(js, bands, rows)
    report = []
    for lo, hi in BUCKETS:
        sel = (js >= lo) & ((js < hi) | (hi == 1.0))
        n = int(sel.sum()) * len(CURVE_SEEDS)
        assert n >= 100, f"bucket [{lo}, {hi}) has only {n} trials"
        observed = found[:, sel].mean()
        expected = theory[sel].mean()
        se = math.sqrt(len(CURVE_SEEDS) * float(np.sum(theory[sel] * (1 - theory[sel])))) / n
        report.append(f"[{lo:.1f},{hi:.1f}) n={n} observed={observed:.3f} theory={expected:.3f} se={se:.3f}")
    print(f"\n{bands}x{rows}\n" + "\n".join(report))
    for lo, hi in BUCKETS:
        sel = (js >= lo) & ((js < hi) | (hi == 1.0))
        n = int(sel.sum()) * len(CURVE_SEEDS)
        se = math.sqrt(len(CURVE_SEEDS) * float(np.sum(theory[sel] * (1 - theory[sel])))) / n
        assert abs(found[:, sel].mean() - theory[sel].mean()) <= 4 * se + 0.01, "\n".join(report)
    # finer checks on all pairs: a band matches with probability s^r (rows independent) and a
    # single row with probability s (the MinHash property)
    band_match = np.array(band_match)
    trials = band_match.size
    exp_band = np.broadcast_to((js**rows)[None, :, None], band_match.shape)
    se_band = math.sqrt(float(np.sum(exp_band * (1 - exp_band)))) / trials
    assert abs(band_match.mean() - exp_band.mean()) <= 4 * se_band + 0.002
    row_match = np.array(row_match)
    se_row = math.sqrt(float(np.mean(js * (1 - js))) / (row_match.size))
    assert abs(row_match.mean() - js.mean()) <= 4 * se_row + 0.002


def test_verification_removes_lsh_false_positives():
    """Same graded pairs, default 14x8: raw LSH merges a share of the J in [0.4, 0.7) pairs;
    with verification (estimate >= 0.75) almost none of them, while J >= 0.85 still merges."""
    docs, js = graded_pairs()
    sigs = MinHasher().signatures(docs)
    merged = {}
    for threshold in (None, 0.75):
        roots = cluster_signatures(sigs, MinHashConfig(similarity_threshold=threshold))
        merged[threshold] = roots[0::2] == roots[1::2]
    mid = (js >= 0.4) & (js < 0.7)
    low = js <= 0.5
    high = js >= 0.85
    print(f"\nJ in [0.4,0.7): raw {merged[None][mid].mean():.3f} verified {merged[0.75][mid].mean():.3f}; "
          f"J <= 0.5: raw {merged[None][low].mean():.3f} verified {merged[0.75][low].mean():.3f}; "
          f"J >= 0.85: raw {merged[None][high].mean():.3f} verified {merged[0.75][high].mean():.3f}")
    assert merged[None][mid].mean() >= 0.1  # the raw curve at s=0.6 is 0.37
    assert merged[0.75][mid].mean() <= 0.03
    assert merged[0.75][low].mean() <= 0.01
    assert merged[0.75][high].mean() >= 0.95


# --------------------------------------------------------------------------------------------
# determinism
# --------------------------------------------------------------------------------------------

_SUBPROCESS = """
import hashlib, json, sys
from pipelines.minhash import MinHasher, MinHashConfig, exact_hashes
docs = json.load(sys.stdin)
sigs = MinHasher(MinHashConfig(seed=7)).signatures(docs)
print(hashlib.sha256(sigs.tobytes()).hexdigest(), hashlib.sha256(exact_hashes(docs).tobytes()).hexdigest())
"""


def test_deterministic_across_processes_and_batches():
    import hashlib

    docs = list(base_documents()[:60]) + EDGE_TEXTS
    sigs = MinHasher(MinHashConfig(seed=7)).signatures(docs)
    np.testing.assert_array_equal(sigs, MinHasher(MinHashConfig(seed=7)).signatures(docs))
    # batch composition and order do not matter
    order = np.random.default_rng(3).permutation(len(docs))
    small_batches = MinHasher(MinHashConfig(seed=7), max_chars=5000, chunk_shingles=300)
    shuffled = small_batches.signatures([docs[k] for k in order])
    np.testing.assert_array_equal(shuffled[np.argsort(order)], sigs)
    assert not np.array_equal(sigs, MinHasher(MinHashConfig(seed=8)).signatures(docs))
    # a fresh process with another hash seed
    digests = (hashlib.sha256(sigs.tobytes()).hexdigest(), hashlib.sha256(exact_hashes(docs).tobytes()).hexdigest())
    expected = " ".join(digests)
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", _SUBPROCESS], input=json.dumps(docs), capture_output=True, text=True, env=env,
        cwd=ROOT, check=True, timeout=60,
    )
    assert out.stdout.strip() == expected


def test_clusters_independent_of_order_and_batching(tmp_path):
    docs, *_ = mixed_corpus()
    docs = docs[:400]
    result = mixed_result()
    config = MinHashConfig()
    # same clusters when the corpus is processed in another order: only the kept member moves
    order = np.random.default_rng(5).permutation(len(docs))
    shuffled = deduplicate([docs[k] for k in order], config, batch_size=37)
    base = deduplicate(docs, config, batch_size=1000)

    def clusters(res, index_map):
        groups: dict = {}
        for i, r in enumerate(res.representative):
            groups.setdefault(int(r), set()).add(int(index_map[i]))
        return sorted(sorted(g) for g in groups.values())

    assert clusters(base, np.arange(len(docs))) == clusters(shuffled, order)
    # a document kept in the whole corpus is also kept when only a prefix is processed
    assert not (result.keep[:400] & ~base.keep).any()
    # the in-memory clustering gives the same clusters as the disk-backed driver
    roots = cluster_signatures(MinHasher(config).signatures(docs), config)
    np.testing.assert_array_equal(roots == np.arange(len(docs)), deduplicate(docs, config, exact=False).keep)


def test_large_bucket_boilerplate(tmp_path):
    base = base_documents()[0].split()
    rng = random.Random(7)
    docs = []
    for k in range(120):  # 120 variants of one page: one cluster, far larger than the window
        words = list(base)
        words[rng.randrange(len(words))] = f"variant{k}"
        docs.append(" ".join(words))
    docs += list(base_documents()[1:30])
    result = deduplicate(docs)
    assert result.keep[:120].sum() == 1 and result.keep[0]
    assert (result.representative[:120] == 0).all()
    assert result.keep[120:].all()
    assert result.num_clusters == 1


# --------------------------------------------------------------------------------------------
# exact duplicates, empty and short documents
# --------------------------------------------------------------------------------------------


def test_exact_duplicates_first_kept():
    doc = base_documents()[5]
    docs = [doc, "Other text entirely.", doc.upper(), doc.replace(" ", "  \n"), base_documents()[6], doc + "!!!"]
    result = deduplicate(docs)
    assert result.keep.tolist() == [True, True, False, False, True, False]
    assert result.exact_duplicate.tolist() == [False, False, True, True, False, True]
    assert result.representative.tolist() == [0, 1, 0, 0, 4, 0]
    h = exact_hashes(docs)
    assert exact_duplicates(h).tolist() == [False, False, True, True, False, True]
    assert exact_duplicates(h[4:], seen=np.sort(h[:2])).tolist() == [False, True]


def test_empty_and_short_documents():
    docs = ["", "   ", "!!!", "", "Hello there", "hello, THERE!", "Hello there friend", "one two three four five",
            "x", "One two three four five."]
    config = MinHashConfig()
    sigs = MinHasher(config).signatures(docs)
    assert sigs.shape == (len(docs), 112) and sigs.dtype == np.uint32
    empty = [0, 1, 2, 3]
    assert (sigs[empty] == 0xFFFFFFFF).all()
    assert not (sigs[4:] == 0xFFFFFFFF).all(axis=1).any()
    assert len(shingle_hashes("Hello there")) == 1  # fewer than 5 words: one shingle
    result = deduplicate(docs, config)
    # documents without words are never duplicates of anything (not even of each other)
    assert result.keep[empty].all()
    # exact duplicates after normalisation go; different short texts stay
    assert result.keep.tolist() == [True, True, True, True, True, False, True, True, True, False]
    assert deduplicate([], config).num_docs == 0
    assert deduplicate([""], config).keep.tolist() == [True]
    # near-duplicate stage alone (no exact pass): identical short texts cluster via MinHash
    no_exact = deduplicate(docs, config, exact=False)
    assert no_exact.keep.tolist() == result.keep.tolist()


# --------------------------------------------------------------------------------------------
# signature index: dedup against an earlier corpus
# --------------------------------------------------------------------------------------------


def test_signature_index_round_trip(tmp_path):
    rng = random.Random(11)
    bases = list(base_documents())
    old = bases[:80]
    config = MinHashConfig()

    with MinHashDeduplicator(config, workdir=tmp_path / "run1") as dd:
        dd.add(old[:50])
        dd.add(old[50:] + [old[3]])  # one exact duplicate inside the first corpus
        r1 = dd.finalize()
        assert r1.num_removed == 1
        index1 = dd.write_index(tmp_path / "index1")
    assert index1.num_docs == 80

    # files: plain .npy + JSON, loadable without pickle
    files = sorted(p.name for p in (tmp_path / "index1").iterdir())
    assert files == sorted(
        ["header.json", "signatures.npy", "exact_hashes.npy"]
        + [f"band_{b:03d}.{kind}.npy" for b in range(14) for kind in ("hashes", "docs")]
    )
    header = json.loads((tmp_path / "index1" / "header.json").read_text())
    assert header["num_docs"] == 80 and header["config"]["num_bands"] == 14
    sig = np.load(tmp_path / "index1" / "signatures.npy", allow_pickle=False)
    assert sig.shape == (80, 112) and sig.dtype == np.uint32
    for b in (0, 13):
        h = np.load(tmp_path / "index1" / f"band_{b:03d}.hashes.npy", allow_pickle=False)
        assert h.dtype == np.uint64 and (np.diff(h.astype(np.float64)) >= 0).all()

    # a new corpus: near-duplicates and an exact copy of indexed documents + new documents
    loaded = SignatureIndex.load(tmp_path / "index1", config)
    np.testing.assert_array_equal(loaded.signatures, MinHasher(config).signatures(old))
    near = [near_duplicate(old[k], rng) for k in range(10)]
    new = bases[100:130]
    batch2 = near + [old[20]] + new + [near_duplicate(new[0], rng)]
    with MinHashDeduplicator(config, workdir=tmp_path / "run2", index=loaded) as dd:
        dd.add(batch2)
        r2 = dd.finalize()
        assert r2.keep.tolist() == [False] * 11 + [True] * 30 + [False]
        assert r2.index_duplicate[:11].all() and not r2.index_duplicate[11:].any()
        assert r2.exact_duplicate[10] and not r2.exact_duplicate[:10].any()
        assert r2.representative[41] == 11 and (r2.representative[:11] == -1).all()
        index2 = dd.write_index(tmp_path / "index2")  # union: old documents + kept new ones
    assert index2.num_docs == 80 + 30
    # querying the union index with signatures directly
    index2 = SignatureIndex.load(tmp_path / "index2", config)
    queries = [near_duplicate(old[30], rng), near_duplicate(new[5], rng), bases[200]]
    q = index2.query(MinHasher(config).signatures(queries))
    assert q.tolist() == [True, True, False]
    assert index2.contains_exact(exact_hashes([old[1], new[2], bases[201]])).tolist() == [True, True, False]

    # a third refresh needs only the latest index
    batch3 = [near_duplicate(old[60], rng), near_duplicate(new[10], rng), bases[210], bases[211]]
    r3 = deduplicate(batch3, config, index=index2)
    assert r3.keep.tolist() == [False, False, True, True]
    assert deduplicate(batch3, config, index=index1).keep.tolist() == [False, True, True, True]

    # overwrite protection and in-place refresh
    with pytest.raises(FileExistsError):
        SignatureIndex.write(tmp_path / "index2", config, MinHasher(config).signatures(batch3))
    idx = SignatureIndex.write(
        tmp_path / "index2", config, MinHasher(config).signatures(batch3[2:]), base=index2, overwrite=True
    )
    assert idx.num_docs == 112 and not idx.has_exact  # exact hashes not given for the new rows


def test_index_config_mismatch(tmp_path):
    config = MinHashConfig()
    sigs = MinHasher(config).signatures(base_documents()[:10])
    SignatureIndex.write(tmp_path / "idx", config, sigs)
    # the threshold is a query-time setting: may differ
    assert SignatureIndex.load(tmp_path / "idx", MinHashConfig(similarity_threshold=0.8)).num_docs == 10
    for other in (MinHashConfig(num_bands=20, rows_per_band=5), MinHashConfig(seed=1), MinHashConfig(ngram=3),
                  MinHashConfig(normalize_digits=False)):
        with pytest.raises(IndexConfigError, match="different MinHash config"):
            SignatureIndex.load(tmp_path / "idx", other)
        with pytest.raises(IndexConfigError):
            MinHashDeduplicator(other, index=SignatureIndex.load(tmp_path / "idx", config))
    with pytest.raises(FileNotFoundError):
        SignatureIndex.load(tmp_path / "missing", config)
    with pytest.raises(ValueError):
        MinHashConfig(num_bands=0)
    with pytest.raises(ValueError):
        MinHashConfig(similarity_threshold=1.5)
