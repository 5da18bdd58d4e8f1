"""LSH over MinHash signatures: band hashes, candidate pairs, verification, union-find.

One 64-bit hash per (document, band) (the ``r`` rows combined with odd multipliers and fmix64).
Documents sharing a band's bucket are candidate pairs; every candidate is verified on the full
signatures (fraction of equal values ``>= similarity_threshold``; ``None`` switches
verification off), and verified pairs are merged with a vectorised union-find whose roots are
always the lowest document index, i.e. the document kept. Memory: one band at a time.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from pipelines.minhash.config import MinHashConfig
from pipelines.minhash.hashing import U64, fmix64_inplace, splitmix64
from pipelines.minhash.signatures import nonempty

# Within a bucket (documents sorted by index) every document is compared with the
# ``BUCKET_WINDOW`` documents before it and with the bucket's first document, so buckets of up
# to ``BUCKET_WINDOW + 1`` documents are compared all-pairs and huge (boilerplate) buckets stay
# linear.  Against an index, a document is compared with the first ``BUCKET_WINDOW`` indexed
# documents of each bucket it falls into.
BUCKET_WINDOW = 16
_VERIFY_CHUNK = 1 << 15


@lru_cache(maxsize=64)
def _band_multipliers(seed: int, num_hashes: int) -> np.ndarray:
    mult = np.array([v | 1 for v in splitmix64(seed ^ 0x42414E44, num_hashes)], dtype=U64)  # "BAND"
    mult.setflags(write=False)
    return mult


def band_hashes(signatures: np.ndarray, config: MinHashConfig | None = None) -> np.ndarray:
    """One 64-bit hash per band: uint64 [n_docs, num_bands] (r rows combined, then fmix64).

    Documents without shingles (all-0xFFFFFFFF signature) get hash values like any other but
    are never inserted into LSH buckets.
    """
    config = config or MinHashConfig()
    sig = np.asarray(signatures)
    k = config.num_hashes
    if sig.ndim != 2 or sig.shape[1] != k:
        raise ValueError(f"signatures must have shape [n, {k}], got {sig.shape}")
    mult = _band_multipliers(config.seed, k)
    with np.errstate(over="ignore"):
        x = sig.astype(U64) * mult
        out = x.reshape(len(sig), config.num_bands, config.rows_per_band).sum(axis=2, dtype=U64)
    return fmix64_inplace(out)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """Jaccard estimate(s): fraction of equal signature values (row-wise for 2-D inputs)."""
    a, b = np.asarray(sig_a), np.asarray(sig_b)
    est = (a == b).mean(axis=-1)
    return float(est) if np.ndim(est) == 0 else est


def required_matches(config: MinHashConfig) -> int | None:
    t = config.similarity_threshold
    if t is None:
        return None
    return int(math.ceil(t * config.num_hashes - 1e-9))


def bucket_pairs(h: np.ndarray, d: np.ndarray, window: int = BUCKET_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs ``(i, j)``, ``i < j``, of documents ``d`` sharing a band hash ``h``.

    ``d`` must be ascending (then every bucket lists its documents in ascending order).  Pairs
    may repeat across bands; callers skip pairs already in one cluster.
    """
    empty = np.zeros(0, dtype=np.int64)
    if len(h) < 2:
        return empty, empty
    order = np.argsort(h, kind="stable")
    hs = h[order]
    same = hs[1:] == hs[:-1]
    if not same.any():
        return empty, empty
    member = np.zeros(len(hs), dtype=bool)
    member[1:] |= same
    member[:-1] |= same
    hs = hs[member]
    ds = np.asarray(d)[order][member].astype(np.int64)
    m = len(hs)
    new_bucket = np.empty(m, dtype=bool)
    new_bucket[0] = True
    np.not_equal(hs[1:], hs[:-1], out=new_bucket[1:])
    pos = np.arange(m)
    first = np.maximum.accumulate(np.where(new_bucket, pos, 0))
    left, right = [], []
    for w in range(1, min(window, m - 1) + 1):
        eq = hs[w:] == hs[:-w]
        if not eq.any():
            break  # no bucket larger than w
        left.append(ds[:-w][eq])
        right.append(ds[w:][eq])
    far = pos - first > window
    if far.any():
        left.append(ds[first[far]])
        right.append(ds[far])
    return np.concatenate(left), np.concatenate(right)


def verify_pairs(sig_a_src, a_idx: np.ndarray, sig_b_src, b_idx: np.ndarray, need: int | None) -> np.ndarray:
    """Mask of pairs whose signatures agree in at least ``need`` positions (None: all pass)."""
    if need is None or len(a_idx) == 0:
        return np.ones(len(a_idx), dtype=bool)
    ok = np.empty(len(a_idx), dtype=bool)
    for s in range(0, len(a_idx), _VERIFY_CHUNK):
        e = s + _VERIFY_CHUNK
        ra = np.asarray(sig_a_src[a_idx[s:e]])
        rb = np.asarray(sig_b_src[b_idx[s:e]])
        ok[s:e] = np.count_nonzero(ra == rb, axis=1) >= need
    return ok


class UnionFind:
    """Vectorised union-find; the root of a component is always its smallest element."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: np.ndarray) -> np.ndarray:
        parent = self.parent
        r = parent[x]
        while True:
            rr = parent[r]
            if np.array_equal(rr, r):
                return r
            r = rr

    def union(self, u: np.ndarray, v: np.ndarray) -> None:
        parent = self.parent
        while len(u):
            ru, rv = self.find(u), self.find(v)
            diff = ru != rv
            if not diff.any():
                break
            ru, rv = ru[diff], rv[diff]
            lo, hi = np.minimum(ru, rv), np.maximum(ru, rv)
            np.minimum.at(parent, hi, lo)  # hook larger root under smaller root
            u, v = lo, hi
        self.compress()

    def compress(self) -> None:
        parent = self.parent
        while True:
            pp = parent[parent]
            if np.array_equal(pp, parent):
                return
            parent[:] = pp

    def roots(self) -> np.ndarray:
        self.compress()
        return self.parent.copy()


def unique_pairs(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique pairs of document numbers (< 2**32)."""
    key = np.unique((i.astype(U64) << U64(32)) | j.astype(U64))
    return (key >> U64(32)).astype(np.int64), (key & U64(0xFFFFFFFF)).astype(np.int64)


def merge_candidates(uf: UnionFind, sigs, i: np.ndarray, j: np.ndarray, need: int | None) -> tuple[int, int]:
    """Verify candidate pairs not yet in one component and union the ones that pass."""
    if len(i) == 0:
        return 0, 0
    todo = uf.find(i) != uf.find(j)
    i, j = i[todo], j[todo]
    if len(i) == 0:
        return 0, 0
    if len(i) > 1:  # the same pair from several windows/bands: verify once
        i, j = unique_pairs(i, j)
    ok = verify_pairs(sigs, i, sigs, j, need)
    uf.union(i[ok], j[ok])
    return len(i), int(ok.sum())


def candidate_pairs(signatures: np.ndarray, config: MinHashConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All raw LSH candidate pairs (no verification) of in-memory signatures.

    Returns unique ``(i, j)`` arrays with ``i < j``: documents sharing at least one band bucket
    (within the per-bucket window, see ``BUCKET_WINDOW``).
    """
    config = config or MinHashConfig()
    sig = np.asarray(signatures)
    bands = band_hashes(sig, config)
    docs = np.flatnonzero(nonempty(sig))
    left, right = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for b in range(config.num_bands):
        i, j = bucket_pairs(bands[docs, b], docs)
        left.append(i)
        right.append(j)
    return unique_pairs(np.concatenate(left), np.concatenate(right))


def cluster_signatures(signatures: np.ndarray, config: MinHashConfig | None = None) -> np.ndarray:
    """In-memory clustering: representative (lowest index in its cluster) of every document."""
    config = config or MinHashConfig()
    sig = np.asarray(signatures)
    uf = UnionFind(len(sig))
    bands = band_hashes(sig, config)
    docs = np.flatnonzero(nonempty(sig))
    need = required_matches(config)
    for b in range(config.num_bands):
        i, j = bucket_pairs(bands[docs, b], docs)
        merge_candidates(uf, sig, i, j, need)
    return uf.roots()


def indexed_matches(ih: np.ndarray, idoc, h: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (query document, indexed document) that share a bucket of one band: documents `d`
    with band hashes `h` against an index band (`ih` sorted, `idoc` its documents), at most
    BUCKET_WINDOW indexed documents per bucket."""
    order = np.argsort(h)
    h, d = h[order], d[order]
    lo = np.searchsorted(ih, h, side="left")
    hi = np.searchsorted(ih, h, side="right")
    cnt = np.minimum(hi - lo, BUCKET_WINDOW)
    hit = cnt > 0
    cnt, lo, d = cnt[hit], lo[hit], d[hit]
    total = int(cnt.sum())
    first = np.zeros(len(cnt), dtype=np.int64)
    np.cumsum(cnt[:-1], out=first[1:])
    q = np.repeat(d, cnt)
    p = np.repeat(lo, cnt) + (np.arange(total) - np.repeat(first, cnt))
    return q, np.asarray(idoc[p]).astype(np.int64)
