"""MinHash near-duplicate detection for Kiln's dedup stage (pure numpy, single-threaded).

Pipeline, all vectorised over a batch of documents:

1. **Normalisation** (as FineWeb's ``simplify_text``): lowercase (``str.lower``), Unicode format
   characters (category ``Cf``: soft hyphen, zero-width space/joiners, ...) removed, punctuation,
   symbols, separators and control characters turned into word breaks, whitespace collapsed, and
   optionally every run of decimal digits (``\\d+([.,،٫]\\d+)*``) replaced by ``0``.
   :func:`normalize_text` is the readable reference; the batch path does the same per code point
   in numpy (a 1.1 M-entry class table indexed by code point) and is tested to agree with it.
2. **Shingles**: word n-grams (default 5); a document with fewer than ``n`` words gives one
   shingle of all its words; a document without words gives none.
3. **Shingle hashes** (64 bit): a polynomial hash ``w = sum_j cp_j * B^j`` of every word's code
   points (one prefix sum mod 2^64 over the batch, normalised with powers of the modular inverse
   of the odd base), then a second polynomial over the shingle's word hashes
   ``sum_t w_t * Q^t`` (again prefix sums over all words of the batch) and murmur3's ``fmix64``.
4. **MinHash**: ``num_bands * rows_per_band`` hash functions ``h_k(x) = a_k * (x_k | 1) mod 2^32``
   (``a_k`` odd, from a splitmix64 stream of the config's ``seed``; ``x_k`` the high 32 bits of
   the shingle hash for even k, the low 32 bits for odd k, so only a full 64-bit collision makes
   two shingles alike in every row): each is a bijection of the odd 32-bit values, so on the
   pseudo-random shingle hashes every row is a min-wise sample; the
   rows' independence is checked empirically (estimator variance = binomial, band-collision rate =
   s^r, see the tests).  The minimum per document is an ``np.minimum.reduceat`` over chunks of
   8192 shingles laid out ``[hash function, shingle]`` (uint32, SIMD, cache-resident).
   Signatures are ``uint32 [n_docs, num_hashes]``; a document without shingles gets the
   all-``0xFFFFFFFF`` signature and never matches anything.
5. **LSH**: one 64-bit hash per (document, band) (the ``r`` rows combined with odd multipliers and
   ``fmix64``), spilled to one file per band; each band is then sorted on its own (one band in
   memory at a time), documents sharing a bucket become candidate pairs, every candidate is
   verified on the full signatures (fraction of equal values ``>= similarity_threshold``;
   ``None`` switches verification off), and verified pairs are merged with a vectorised
   union-find whose roots are always the lowest document index, i.e. the document kept.

Everything is deterministic across processes and machines (no Python ``hash()``, no numpy RNG
streams): constants come from splitmix64.  The only environment dependence is the Unicode
database of the running Python (``str.lower`` and character categories); its version is stored in
index headers and a mismatch gives a warning.

On-disk signature index (a directory, see :class:`SignatureIndex`)::

    header.json                 format, version, config (signature-relevant fields),
                                num_docs, num_hashes, unicode version, has_exact
    signatures.npy              uint32 [num_docs, num_hashes] (np.load(mmap_mode="r"))
    band_000.hashes.npy ...     uint64 [m] band hashes of band b, sorted ascending
    band_000.docs.npy ...       uint32 [m] document number (row of signatures.npy) of each entry,
                                ascending within equal hashes; documents without shingles omitted
    exact_hashes.npy            uint64 sorted unique normalised-text hashes (optional)

Nothing is pickled; every ``.npy`` is read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import unicodedata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import xxhash

__all__ = [
    "MinHashConfig",
    "IndexConfigError",
    "normalize_text",
    "word_shingles",
    "shingle_hashes",
    "shingle_hashes_batch",
    "reference_shingle_hashes",
    "MinHasher",
    "band_hashes",
    "lsh_probability",
    "estimate_jaccard",
    "candidate_pairs",
    "cluster_signatures",
    "exact_hash",
    "exact_hashes",
    "exact_duplicates",
    "DedupResult",
    "MinHashDeduplicator",
    "SignatureIndex",
    "deduplicate",
]

_U64 = np.uint64
_MASK64 = (1 << 64) - 1
_EMPTY = np.uint32(0xFFFFFFFF)
SIGNATURE_DTYPE = np.dtype("<u4")
_BAND_RECORD = np.dtype([("h", "<u8"), ("d", "<u4")])
_FORMAT = "kiln-minhash-index"
_FORMAT_VERSION = 1
# Bumped whenever the normalisation or hashing scheme changes: part of the index header, so an
# index written by an older scheme fails loudly instead of silently never matching.
HASH_SCHEME = "kiln-minhash-v1"


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MinHashConfig:
    """Parameters of the MinHash/LSH near-duplicate detector.

    ``similarity_threshold`` is the minimum Jaccard estimate (fraction of equal signature values)
    a candidate pair needs to be merged; ``None`` merges every LSH candidate (raw LSH).
    """

    ngram: int = 5
    num_bands: int = 14
    rows_per_band: int = 8
    seed: int = 0x6B696C6E  # "kiln"
    similarity_threshold: float | None = 0.75
    normalize_digits: bool = True

    def __post_init__(self) -> None:
        for name in ("ngram", "num_bands", "rows_per_band"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MinHashConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= _MASK64:
            raise ValueError(f"MinHashConfig.seed must be an int in [0, 2**64), got {self.seed!r}")
        t = self.similarity_threshold
        if t is not None and not (isinstance(t, (int, float)) and 0.0 < float(t) <= 1.0):
            raise ValueError(f"MinHashConfig.similarity_threshold must be in (0, 1] or None, got {t!r}")

    @property
    def num_hashes(self) -> int:
        return self.num_bands * self.rows_per_band

    def lsh_probability(self, s: float | np.ndarray) -> float | np.ndarray:
        """Probability that a pair of Jaccard ``s`` shares at least one band: 1-(1-s^r)^b."""
        return lsh_probability(s, self.num_bands, self.rows_per_band)

    def signature_fields(self) -> dict:
        """The fields that determine signatures and band hashes (must match to reuse an index)."""
        return {
            "hash_scheme": HASH_SCHEME,
            "ngram": self.ngram,
            "num_bands": self.num_bands,
            "rows_per_band": self.rows_per_band,
            "seed": self.seed,
            "normalize_digits": self.normalize_digits,
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MinHashConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class IndexConfigError(ValueError):
    """A signature index was written with a configuration incompatible with the current one."""


def lsh_probability(s, num_bands: int, rows_per_band: int):
    """Theoretical LSH candidate probability 1 - (1 - s^r)^b for Jaccard similarity ``s``."""
    s = np.asarray(s, dtype=np.float64)
    p = 1.0 - (1.0 - s**rows_per_band) ** num_bands
    return float(p) if p.ndim == 0 else p


# --------------------------------------------------------------------------------------------
# deterministic constants
# --------------------------------------------------------------------------------------------


def _splitmix64(seed: int, n: int) -> list[int]:
    state = seed & _MASK64
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        out.append(z ^ (z >> 31))
    return out


_POLY_BASE = _splitmix64(0x5348494E474C45, 1)[0] | 1  # base of the per-word polynomial hash
_FMIX_C1 = 0xFF51AFD7ED558CCD
_FMIX_C2 = 0xC4CEB9FE1A85EC53


def _fmix64_inplace(x: np.ndarray) -> np.ndarray:
    """murmur3 fmix64 on a uint64 array, in place (wrapping arithmetic)."""
    x ^= x >> _U64(33)
    x *= _U64(_FMIX_C1)
    x ^= x >> _U64(33)
    x *= _U64(_FMIX_C2)
    x ^= x >> _U64(33)
    return x


def _fmix64_int(x: int) -> int:
    x ^= x >> 33
    x = (x * _FMIX_C1) & _MASK64
    x ^= x >> 33
    x = (x * _FMIX_C2) & _MASK64
    return x ^ (x >> 33)


# seed-independent constants of the shingle hash (fixed for HASH_SCHEME v1)
_WORD_BASE = _splitmix64(0x574F52445348, 1)[0] | 1  # base of the polynomial over a shingle's word hashes


class _Powers:
    """Cached base^j and base^-j mod 2^64 (j < n), grown on demand."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.base_inv = pow(base, -1, 1 << 64)
        self._arrays = (np.ones(1, dtype=_U64), np.ones(1, dtype=_U64))

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pw, inv = self._arrays  # one tuple: never a new pow with an old inv
        if len(pw) < n:
            size = max(n, 2 * len(pw), 1 << 16)
            with np.errstate(over="ignore"):
                p = np.full(size, self.base, dtype=_U64)
                p[0] = 1
                q = np.full(size, self.base_inv, dtype=_U64)
                q[0] = 1
                pw, inv = np.cumprod(p, dtype=_U64), np.cumprod(q, dtype=_U64)
            self._arrays = (pw, inv)
        return pw[:n], inv[:n]


_CHAR_POWERS = _Powers(_POLY_BASE)
_WORD_POWERS = _Powers(_WORD_BASE)


# --------------------------------------------------------------------------------------------
# normalisation
# --------------------------------------------------------------------------------------------

# character classes; word characters are exactly the classes <= _DIGIT
_WORD, _DIGIT, _SPACE, _DECSEP, _DELETE = 0, 1, 2, 3, 4
_DECIMAL_SEPARATORS = ".,\u060c\u066b"


@lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """Class of every code point: word / decimal digit / break / decimal separator / delete."""
    cat = unicodedata.category
    table = np.zeros(sys.maxunicode + 1, dtype=np.uint8)
    for i in range(sys.maxunicode + 1):
        ch = chr(i)
        c = cat(ch)
        if c[0] in "PSZ" or c == "Cc" or ch.isspace():
            table[i] = _SPACE
        elif c == "Cf":
            table[i] = _DELETE
        elif c == "Nd":
            table[i] = _DIGIT
    for ch in _DECIMAL_SEPARATORS:
        table[ord(ch)] = _DECSEP
    table.setflags(write=False)
    return table


@lru_cache(maxsize=1)
def _reference_tables() -> tuple[dict, dict]:
    table = _char_classes()
    delete = {int(i): None for i in np.flatnonzero(table == _DELETE)}
    space = {int(i): " " for i in np.flatnonzero((table == _SPACE) | (table == _DECSEP))}
    return delete, space


_DIGIT_RUN = re.compile(r"\d+(?:[" + _DECIMAL_SEPARATORS + r"]\d+)*")


def normalize_text(text: str, normalize_digits: bool = True) -> str:
    """Reference normalisation: the words the fast path hashes, joined by single spaces.

    lowercase; delete format characters (Cf); with ``normalize_digits`` every run of decimal
    digits (``\\d+([.,،٫]\\d+)*``) becomes ``0``; punctuation, symbols, separators, control
    characters and whitespace become word breaks; whitespace collapsed and stripped.
    """
    delete, space = _reference_tables()
    text = text.lower().translate(delete)
    if normalize_digits:
        text = _DIGIT_RUN.sub("0", text)
    return " ".join(text.translate(space).split())


def word_shingles(text: str, ngram: int = 5, normalize_digits: bool = True) -> list[tuple[str, ...]]:
    """Reference shingling: the word n-grams of the normalised text (with repeats, in order).

    Fewer than ``ngram`` words give one shingle of all words; no words give no shingles.
    """
    words = normalize_text(text, normalize_digits).split(" ")
    if words == [""]:
        return []
    if len(words) < ngram:
        return [tuple(words)]
    return [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]


def _reference_word_hash(word: str) -> int:
    h, p = 0, 1
    for ch in word:
        h = (h + ord(ch) * p) & _MASK64
        p = (p * _POLY_BASE) & _MASK64
    return h


def reference_shingle_hashes(text: str, ngram: int = 5, normalize_digits: bool = True) -> np.ndarray:
    """Pure-Python (slow) computation of the shingle hashes, to check the vectorised path.

    word hash ``w = sum_j cp_j * B^j``; shingle hash ``fmix64(sum_t w_t * Q^t)`` (mod 2^64).
    """
    out = []
    for shingle in word_shingles(text, ngram, normalize_digits):
        acc, q = 0, 1
        for word in shingle:
            acc = (acc + _reference_word_hash(word) * q) & _MASK64
            q = (q * _WORD_BASE) & _MASK64
        out.append(_fmix64_int(acc))
    return np.array(out, dtype=_U64)


class _Batch:
    """Normalised words of a batch of documents, as numpy arrays over code points."""

    __slots__ = ("cps", "word", "word_start", "word_end", "doc_word_offsets", "n_docs")

    def __init__(self, cps, word, word_start, word_end, doc_word_offsets, n_docs):
        self.cps = cps  # uint32 code points (normalised: digits collapsed, Cf deleted)
        self.word = word  # bool mask: cps[i] is part of a word
        self.word_start = word_start  # int64 [n_words] index into cps
        self.word_end = word_end  # int64 [n_words] exclusive
        self.doc_word_offsets = doc_word_offsets  # int64 [n_docs + 1]
        self.n_docs = n_docs


def _prepare_batch(texts: Sequence[str], normalize_digits: bool) -> _Batch:
    n_docs = len(texts)
    lowered = [t.lower() for t in texts]
    lens = np.fromiter(map(len, lowered), dtype=np.int64, count=n_docs)
    # "\n" (a word break) between documents: no word spans two documents
    big = "\n".join(lowered)
    cps = np.frombuffer(big.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    n = len(cps)
    doc_start = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lens + 1, out=doc_start[1:])
    doc_start[n_docs] = n
    cls = np.take(_char_classes(), cps)

    # format characters are deleted (rare: an extra pass only when present)
    special = np.flatnonzero(cls >= _DECSEP)
    dele = special[cls[special] == _DELETE]
    if len(dele):
        cps, cls = np.delete(cps, dele), np.delete(cls, dele)
        doc_start -= np.searchsorted(dele, doc_start)
        n = len(cps)
        special = np.flatnonzero(cls >= _DECSEP)
    word = cls <= _DIGIT
    if normalize_digits:
        digits = np.flatnonzero(cls == _DIGIT)
        if len(digits):
            seps = special[(special > 0) & (special < n - 1)]  # only separators are left
            seps = seps[(cls[seps - 1] == _DIGIT) & (cls[seps + 1] == _DIGIT)]
            run = np.union1d(digits, seps) if len(seps) else digits
            cps = cps.copy()
            cps[run] = 48  # "0"
            word[seps] = True
            drop = run[1:][np.diff(run) == 1]  # every run keeps its first character only
            if len(drop):
                cps, word = np.delete(cps, drop), np.delete(word, drop)
                doc_start -= np.searchsorted(drop, doc_start)
                n = len(cps)

    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return _Batch(cps, word, empty, empty, np.zeros(n_docs + 1, dtype=np.int64), n_docs)
    edge = np.empty(n + 1, dtype=bool)
    edge[0] = word[0]
    edge[n] = word[-1]
    np.not_equal(word[1:], word[:-1], out=edge[1:n])
    bounds = np.flatnonzero(edge)
    word_start = bounds[0::2]
    word_end = bounds[1::2]
    doc_word_offsets = np.searchsorted(word_start, doc_start)
    return _Batch(cps, word, word_start, word_end, doc_word_offsets, n_docs)


def _word_hashes(batch: _Batch) -> np.ndarray:
    """Polynomial hash sum_j cp_j * B^j (mod 2^64) of every word."""
    n = len(batch.cps)
    pw, inv = _CHAR_POWERS.get(n)
    prefix = np.empty(n + 1, dtype=_U64)
    prefix[0] = 0
    with np.errstate(over="ignore"):
        vals = np.multiply(batch.cps, pw, dtype=_U64)
        np.cumsum(vals, out=prefix[1:])
        h = prefix[batch.word_end] - prefix[batch.word_start]
        h *= inv[batch.word_start]
    return h


def _shingle_hashes_from_batch(batch: _Batch, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of a batch: ``(uint64 [n_shingles], per-document offsets [n_docs+1])``."""
    offs = batch.doc_word_offsets
    counts = np.diff(offs)
    per_doc = np.where(counts >= ngram, counts - ngram + 1, np.minimum(counts, 1))
    shingle_offsets = np.zeros(batch.n_docs + 1, dtype=np.int64)
    np.cumsum(per_doc, out=shingle_offsets[1:])
    nw = len(batch.word_start)
    if nw == 0:
        return np.zeros(0, dtype=_U64), shingle_offsets
    words = _word_hashes(batch)
    wp, winv = _WORD_POWERS.get(nw)
    prefix = np.empty(nw + 1, dtype=_U64)
    prefix[0] = 0
    # the shingle starting at word i ends at min(i + n, end of its document)
    doc_end = np.repeat(offs[1:], counts)
    valid = np.arange(ngram, nw + ngram) <= doc_end
    short = (counts > 0) & (counts < ngram)
    if short.any():
        valid[offs[:-1][short]] = True
    starts = np.flatnonzero(valid)
    ends = np.minimum(starts + ngram, doc_end[starts])
    with np.errstate(over="ignore"):
        words *= wp
        np.cumsum(words, out=prefix[1:])
        acc = prefix[ends] - prefix[starts]
        acc *= winv[starts]
    return _fmix64_inplace(acc), shingle_offsets


def _iter_batches(texts: Sequence[str], max_chars: int) -> Iterable[tuple[int, int]]:
    start = 0
    chars = 0
    for i, t in enumerate(texts):
        chars += len(t) + 1
        if chars >= max_chars:
            yield start, i + 1
            start, chars = i + 1, 0
    if start < len(texts):
        yield start, len(texts)


_DEFAULT_MAX_CHARS = 1 << 18


def shingle_hashes_batch(
    texts: Sequence[str], ngram: int = 5, normalize_digits: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many documents: ``(hashes uint64 [total], offsets int64 [n_docs+1])``.

    The hashes of document ``i`` are ``hashes[offsets[i]:offsets[i+1]]`` (in text order, repeats
    kept).
    """
    batch = _prepare_batch(list(texts), normalize_digits)
    return _shingle_hashes_from_batch(batch, ngram)


def shingle_hashes(text: str, ngram: int = 5, normalize_digits: bool = True) -> np.ndarray:
    """Shingle hashes (uint64) of one document."""
    return shingle_hashes_batch([text], ngram, normalize_digits)[0]


# --------------------------------------------------------------------------------------------
# exact hashes
# --------------------------------------------------------------------------------------------


def exact_hash(text: str, normalize_digits: bool = True) -> int:
    """xxh3_64 of the UTF-32-LE encoding of :func:`normalize_text`; 0 for an empty normalisation
    (and 1 instead of a genuine 0), so 0 can mean "nothing to compare"."""
    norm = normalize_text(text, normalize_digits)
    if not norm:
        return 0
    return xxhash.xxh3_64_intdigest(norm.encode("utf-32-le", "surrogatepass")) or 1


def _exact_hashes_from_batch(batch: _Batch) -> np.ndarray:
    """Same values as :func:`exact_hash`, from the batch arrays (normalised text re-assembled)."""
    out = np.zeros(batch.n_docs, dtype=_U64)
    nw = len(batch.word_start)
    if nw == 0:
        return out
    ws, we, offs = batch.word_start, batch.word_end, batch.doc_word_offsets
    counts = np.diff(offs)
    nonempty = counts > 0
    # keep the word characters and the first character of each gap between two words of a
    # document; that character becomes " " (its position in the output is computed per word)
    inner = np.ones(nw, dtype=bool)
    inner[offs[1:][nonempty] - 1] = False
    keep = batch.word.copy()
    keep[we[inner]] = True
    text = batch.cps[keep]
    cum_len = np.zeros(nw + 1, dtype=np.int64)
    np.cumsum(we - ws, out=cum_len[1:])
    gaps_before = np.zeros(nw + 1, dtype=np.int64)
    np.cumsum(inner, out=gaps_before[1:])
    text[(cum_len[1:] + gaps_before[:-1])[inner]] = 32
    doc_pos = cum_len[offs] + gaps_before[offs]  # gaps after a doc's last word do not exist
    raw = memoryview(text.tobytes())
    digest = xxhash.xxh3_64_intdigest
    bounds = (4 * doc_pos).tolist()
    for i in np.flatnonzero(nonempty).tolist():
        out[i] = digest(raw[bounds[i] : bounds[i + 1]]) or 1
    return out


def exact_hashes(texts: Sequence[str], normalize_digits: bool = True, max_chars: int = _DEFAULT_MAX_CHARS) -> np.ndarray:
    """:func:`exact_hash` of many documents (vectorised normalisation), uint64 [n_docs]."""
    texts = list(texts)
    out = np.zeros(len(texts), dtype=_U64)
    for a, b in _iter_batches(texts, max_chars):
        out[a:b] = _exact_hashes_from_batch(_prepare_batch(texts[a:b], normalize_digits))
    return out


def exact_duplicates(hashes: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """Mask of exact duplicates: a document whose (non-zero) hash occurs earlier in ``hashes``
    or in the sorted array ``seen`` (e.g. ``SignatureIndex.exact_hashes``).  First occurrences
    are kept; hash 0 (empty normalised text) is never a duplicate."""
    hashes = np.asarray(hashes, dtype=_U64)
    dup = np.zeros(len(hashes), dtype=bool)
    if len(hashes) == 0:
        return dup
    _, first = np.unique(hashes, return_index=True)
    dup[:] = True
    dup[first] = False
    if seen is not None and len(seen):
        pos = np.minimum(np.searchsorted(seen, hashes), len(seen) - 1)
        dup |= np.asarray(seen[pos]) == hashes
    dup &= hashes != 0
    return dup


# --------------------------------------------------------------------------------------------
# MinHash signatures
# --------------------------------------------------------------------------------------------


class MinHasher:
    """Computes MinHash signatures (and optionally exact hashes) for batches of documents.

    Holds a scratch buffer: use one instance per thread (the module itself starts no threads).

    Hash function k maps a shingle hash x (64 bit, fmix64-mixed) to ``a_k * (x_k | 1) mod 2^32``
    with odd ``a_k`` and ``x_k`` the high 32 bits of x for even k, the low 32 bits for odd k:
    a bijection of the odd 32-bit values, so each row is an exact min-wise sample of
    pseudo-random inputs.  Forcing the low bit avoids the common fixed point 0; alternating the
    halves means two different shingles only look alike in every row if all 64 bits collide
    (a 32-bit collision would make two one-shingle documents identical in all rows).
    """

    def __init__(self, config: MinHashConfig | None = None, chunk_shingles: int = 8192, max_chars: int = _DEFAULT_MAX_CHARS):
        self.config = config or MinHashConfig()
        k = self.config.num_hashes
        self.multipliers = np.array([(v >> 32) | 1 for v in _splitmix64(self.config.seed, k)], dtype=np.uint32)
        self._a_hi = self.multipliers[0::2, None]  # rows 0, 2, 4, ... use the high half
        self._a_lo = self.multipliers[1::2, None]  # rows 1, 3, 5, ... the low half
        self._k_hi = len(self._a_hi)
        arranged = np.concatenate([np.arange(0, k, 2), np.arange(1, k, 2)])
        self._unarrange = np.argsort(arranged)
        self.chunk_shingles = int(chunk_shingles)
        self.max_chars = int(max_chars)
        self._buf = np.empty((k, self.chunk_shingles), dtype=np.uint32)

    def signatures_from_hashes(self, hashes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """MinHash signatures from shingle hashes grouped by ``offsets`` -> uint32 [n_docs, K]."""
        k = self.config.num_hashes
        n_docs = len(offsets) - 1
        sig = np.full((k, n_docs), _EMPTY, dtype=np.uint32)
        total = int(offsets[-1]) if n_docs else 0
        if total:
            hashes = np.asarray(hashes, dtype=_U64)
            x_hi = (hashes >> _U64(32)).astype(np.uint32)
            x_hi |= np.uint32(1)
            x_lo = hashes.astype(np.uint32)
            x_lo |= np.uint32(1)
            k_hi = self._k_hi
            doc_first = offsets[:-1]
            nonempty = np.flatnonzero(offsets[1:] > doc_first)
            starts = doc_first[nonempty]
            ends = offsets[1:][nonempty]
            chunk = self.chunk_shingles
            for c0 in range(0, total, chunk):
                c1 = min(c0 + chunk, total)
                lo = np.searchsorted(ends, c0, side="right")  # documents overlapping [c0, c1)
                hi = np.searchsorted(starts, c1, side="left")
                seg = np.maximum(starts[lo:hi], c0) - c0
                docs = nonempty[lo:hi]
                buf = self._buf[:, : c1 - c0]
                np.multiply(self._a_hi, x_hi[None, c0:c1], out=buf[:k_hi])
                np.multiply(self._a_lo, x_lo[None, c0:c1], out=buf[k_hi:])
                mins = np.minimum.reduceat(buf, seg, axis=1)
                if starts[lo] < c0:  # only a chunk's first document can have started earlier
                    np.minimum(mins[:, 0], sig[:, docs[0]], out=mins[:, 0])
                sig[:, docs] = mins
            sig = sig[self._unarrange]  # rows were computed high-half rows first
        return np.ascontiguousarray(sig.T)

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """MinHash signatures uint32 [n_docs, num_hashes] of the given documents."""
        return self.process(texts, exact=False)[0]

    def process(self, texts: Sequence[str], exact: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Signatures and (if ``exact``) :func:`exact_hash` values of a batch of documents."""
        texts = texts if isinstance(texts, list) else list(texts)
        k = self.config.num_hashes
        sigs = np.empty((len(texts), k), dtype=SIGNATURE_DTYPE)
        ex = np.zeros(len(texts), dtype=_U64) if exact else None
        for a, b in _iter_batches(texts, self.max_chars):
            batch = _prepare_batch(texts[a:b], self.config.normalize_digits)
            hashes, offsets = _shingle_hashes_from_batch(batch, self.config.ngram)
            sigs[a:b] = self.signatures_from_hashes(hashes, offsets)
            if exact:
                ex[a:b] = _exact_hashes_from_batch(batch)
        return sigs, ex


# --------------------------------------------------------------------------------------------
# LSH: band hashes, candidate pairs, verification, union-find
# --------------------------------------------------------------------------------------------

# Within a bucket (documents sorted by index) every document is compared with the
# ``_BUCKET_WINDOW`` documents before it and with the bucket's first document, so buckets of up
# to ``_BUCKET_WINDOW + 1`` documents are compared all-pairs and huge (boilerplate) buckets stay
# linear.  Against an index, a document is compared with the first ``_BUCKET_WINDOW`` indexed
# documents of each bucket it falls into.
_BUCKET_WINDOW = 16
_VERIFY_CHUNK = 1 << 15


@lru_cache(maxsize=64)
def _band_multipliers(seed: int, num_hashes: int) -> np.ndarray:
    mult = np.array([v | 1 for v in _splitmix64(seed ^ 0x42414E44, num_hashes)], dtype=_U64)  # "BAND"
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
        x = sig.astype(_U64) * mult
        out = x.reshape(len(sig), config.num_bands, config.rows_per_band).sum(axis=2, dtype=_U64)
    return _fmix64_inplace(out)


def _nonempty(signatures: np.ndarray) -> np.ndarray:
    return ~(np.asarray(signatures) == _EMPTY).all(axis=1)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray | float:
    """Jaccard estimate(s): fraction of equal signature values (row-wise for 2-D inputs)."""
    a, b = np.asarray(sig_a), np.asarray(sig_b)
    est = (a == b).mean(axis=-1)
    return float(est) if np.ndim(est) == 0 else est


def _required_matches(config: MinHashConfig) -> int | None:
    t = config.similarity_threshold
    if t is None:
        return None
    return int(math.ceil(t * config.num_hashes - 1e-9))


def _bucket_pairs(h: np.ndarray, d: np.ndarray, window: int = _BUCKET_WINDOW) -> tuple[np.ndarray, np.ndarray]:
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


def _verify(sig_a_src, a_idx: np.ndarray, sig_b_src, b_idx: np.ndarray, need: int | None) -> np.ndarray:
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


class _UnionFind:
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


def _unique_pairs(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique pairs of document numbers (< 2**32)."""
    key = np.unique((i.astype(_U64) << _U64(32)) | j.astype(_U64))
    return (key >> _U64(32)).astype(np.int64), (key & _U64(0xFFFFFFFF)).astype(np.int64)


def _merge_candidates(uf: _UnionFind, sigs, i: np.ndarray, j: np.ndarray, need: int | None) -> tuple[int, int]:
    """Verify candidate pairs not yet in one component and union the ones that pass."""
    if len(i) == 0:
        return 0, 0
    todo = uf.find(i) != uf.find(j)
    i, j = i[todo], j[todo]
    if len(i) == 0:
        return 0, 0
    if len(i) > 1:  # the same pair from several windows/bands: verify once
        i, j = _unique_pairs(i, j)
    ok = _verify(sigs, i, sigs, j, need)
    uf.union(i[ok], j[ok])
    return len(i), int(ok.sum())


def candidate_pairs(signatures: np.ndarray, config: MinHashConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """All raw LSH candidate pairs (no verification) of in-memory signatures.

    Returns unique ``(i, j)`` arrays with ``i < j``: documents sharing at least one band bucket
    (within the per-bucket window, see ``_BUCKET_WINDOW``).
    """
    config = config or MinHashConfig()
    sig = np.asarray(signatures)
    bands = band_hashes(sig, config)
    docs = np.flatnonzero(_nonempty(sig))
    left, right = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    for b in range(config.num_bands):
        i, j = _bucket_pairs(bands[docs, b], docs)
        left.append(i)
        right.append(j)
    return _unique_pairs(np.concatenate(left), np.concatenate(right))


def cluster_signatures(signatures: np.ndarray, config: MinHashConfig | None = None) -> np.ndarray:
    """In-memory clustering: representative (lowest index in its cluster) of every document."""
    config = config or MinHashConfig()
    sig = np.asarray(signatures)
    uf = _UnionFind(len(sig))
    bands = band_hashes(sig, config)
    docs = np.flatnonzero(_nonempty(sig))
    need = _required_matches(config)
    for b in range(config.num_bands):
        i, j = _bucket_pairs(bands[docs, b], docs)
        _merge_candidates(uf, sig, i, j, need)
    return uf.roots()


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

_NPY_HEADER_BYTES = 128


class _NpyAppender:
    """Writes a 2-D ``.npy`` file row block by row block (the header is fixed up on close)."""

    def __init__(self, path: Path, dtype: np.dtype, ncols: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.ncols = ncols
        self.rows = 0
        self._f = open(self.path, "wb")
        self._f.write(b"\0" * _NPY_HEADER_BYTES)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.ncols:
            raise ValueError(f"expected rows of width {self.ncols}, got shape {rows.shape}")
        self._f.write(rows.tobytes())
        self.rows += len(rows)

    def close(self) -> None:
        if self._f.closed:
            return
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.rows, self.ncols)},
        )
        raw = header.getvalue()
        if len(raw) != _NPY_HEADER_BYTES:  # pragma: no cover - only for absurd row counts
            raise RuntimeError(f"unexpected .npy header size {len(raw)}")
        self._f.seek(0)
        self._f.write(raw)
        self._f.close()


def _load_npy(path: Path, mmap: bool = True) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


class _BandSpill:
    """Per-band files of (band hash, document number) records, appended batch by batch."""

    def __init__(self, directory: Path, num_bands: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.paths = [self.directory / f"band_{b:03d}.bin" for b in range(num_bands)]
        self._files = [open(p, "wb") for p in self.paths]

    def append(self, bands: np.ndarray, docs: np.ndarray) -> None:
        rec = np.empty(len(docs), dtype=_BAND_RECORD)
        rec["d"] = docs
        for b, f in enumerate(self._files):
            rec["h"] = bands[:, b]
            f.write(rec.tobytes())

    def close(self) -> None:
        for f in self._files:
            f.close()

    def read(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        rec = np.fromfile(self.paths[b], dtype=_BAND_RECORD)
        return rec["h"].copy(), rec["d"].astype(np.int64)


# --------------------------------------------------------------------------------------------
# signature index (dedup against an earlier corpus)
# --------------------------------------------------------------------------------------------


class SignatureIndex:
    """Signatures + sorted per-band hashes (+ exact hashes) of an earlier corpus, on disk.

    Use :meth:`write` to create one (optionally as the union of an existing index and new
    documents) and :meth:`load` to open one; see the module docstring for the file layout.
    """

    def __init__(self, path: Path, header: dict, config: MinHashConfig):
        self.path = Path(path)
        self.header = header
        self.config = config
        self.num_docs = int(header["num_docs"])
        self.has_exact = bool(header.get("has_exact", False))
        self._signatures = None
        self._exact = None

    # ---- opening ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, config: MinHashConfig | None = None) -> "SignatureIndex":
        """Open an index; raises :class:`IndexConfigError` if it was built with other parameters.

        ``config`` (default: the index's own parameters) supplies the ``similarity_threshold``
        of :meth:`query` (a :class:`MinHashDeduplicator` uses its own config's threshold).
        After :meth:`write` overwrote an index in place, use the index object it returns.
        """
        path = Path(path)
        header_path = path / "header.json"
        if not header_path.is_file():
            raise FileNotFoundError(f"no signature index at {path} (missing header.json)")
        header = json.loads(header_path.read_text())
        if header.get("format") != _FORMAT or header.get("version") != _FORMAT_VERSION:
            raise IndexConfigError(
                f"{path}: not a {_FORMAT} v{_FORMAT_VERSION} index "
                f"(format={header.get('format')!r}, version={header.get('version')!r})"
            )
        stored = header["config"]
        if config is None:
            config = MinHashConfig.from_dict({k: v for k, v in stored.items() if k != "hash_scheme"})
        wanted = config.signature_fields()
        diff = {k: (stored.get(k), wanted[k]) for k in wanted if stored.get(k) != wanted[k]}
        if diff:
            detail = ", ".join(f"{k}: index={a!r} current={b!r}" for k, (a, b) in diff.items())
            raise IndexConfigError(f"signature index {path} was built with a different MinHash config ({detail})")
        if header.get("unicode_version") != unicodedata.unidata_version:
            warnings.warn(
                f"signature index {path} was built with Unicode {header.get('unicode_version')}, this Python "
                f"has {unicodedata.unidata_version}: texts with characters new in between may hash differently",
                stacklevel=2,
            )
        return cls(path, header, config)

    @property
    def signatures(self) -> np.ndarray:
        """uint32 [num_docs, num_hashes], memory-mapped."""
        if self._signatures is None:
            self._signatures = _load_npy(self.path / "signatures.npy")
        return self._signatures

    @property
    def exact_hashes(self) -> np.ndarray | None:
        """Sorted unique exact hashes of the indexed documents (None if not stored)."""
        if not self.has_exact:
            return None
        if self._exact is None:
            self._exact = _load_npy(self.path / "exact_hashes.npy")
        return self._exact

    def band(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Sorted band hashes and their document numbers for band ``b`` (memory-mapped)."""
        return (
            _load_npy(self.path / f"band_{b:03d}.hashes.npy"),
            _load_npy(self.path / f"band_{b:03d}.docs.npy"),
        )

    # ---- queries ---------------------------------------------------------------------------
    def contains_exact(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of (non-zero) exact hashes present in the index."""
        hashes = np.asarray(hashes, dtype=_U64)
        ex = self.exact_hashes
        if ex is None or len(ex) == 0 or len(hashes) == 0:
            return np.zeros(len(hashes), dtype=bool)
        pos = np.minimum(np.searchsorted(ex, hashes), len(ex) - 1)
        return (np.asarray(ex[pos]) == hashes) & (hashes != 0)

    def _query_band(self, b: int, h: np.ndarray, d: np.ndarray, sigs, flagged: np.ndarray, need: int | None) -> None:
        """Flag documents ``d`` (band-``b`` hashes ``h``, signatures in ``sigs``) that share a
        bucket with an indexed document and agree with it in >= ``need`` signature values."""
        sel = ~flagged[d]
        h, d = h[sel], d[sel]
        if len(h) == 0 or self.num_docs == 0:
            return
        ih, idoc = self.band(b)
        if len(ih) == 0:
            return
        order = np.argsort(h)
        h, d = h[order], d[order]
        lo = np.searchsorted(ih, h, side="left")
        hi = np.searchsorted(ih, h, side="right")
        cnt = np.minimum(hi - lo, _BUCKET_WINDOW)
        hit = cnt > 0
        if not hit.any():
            return
        cnt, lo, d = cnt[hit], lo[hit], d[hit]
        total = int(cnt.sum())
        first = np.zeros(len(cnt), dtype=np.int64)
        np.cumsum(cnt[:-1], out=first[1:])
        q = np.repeat(d, cnt)
        p = np.repeat(lo, cnt) + (np.arange(total) - np.repeat(first, cnt))
        targets = np.asarray(idoc[p]).astype(np.int64)
        ok = _verify(sigs, q, self.signatures, targets, need)
        flagged[q[ok]] = True

    def query(self, signatures: np.ndarray) -> np.ndarray:
        """Mask of documents (in-memory signatures) that are near-duplicates of an indexed one."""
        sig = np.asarray(signatures)
        flagged = np.zeros(len(sig), dtype=bool)
        bands = band_hashes(sig, self.config)
        docs = np.flatnonzero(_nonempty(sig))
        for b in range(self.config.num_bands):
            self._query_band(b, bands[docs, b], docs, sig, flagged, _required_matches(self.config))
        return flagged

    # ---- writing ---------------------------------------------------------------------------
    @classmethod
    def write(
        cls,
        path: str | os.PathLike,
        config: MinHashConfig,
        signatures: np.ndarray,
        exact_hashes: np.ndarray | None = None,
        base: "SignatureIndex | None" = None,
        rows: np.ndarray | None = None,
        overwrite: bool = False,
        chunk_docs: int = 1 << 16,
    ) -> "SignatureIndex":
        """Write an index of ``base``'s documents (if any) followed by the given documents.

        ``signatures`` may be a memory-mapped array; ``rows`` optionally selects the documents
        to add (e.g. the kept ones).  ``exact_hashes`` (aligned with ``signatures``) are stored
        if given and ``base`` has them too.  The new documents are numbered after ``base``'s.
        """
        path = Path(path)
        k = config.num_hashes
        if base is not None:
            base_fields, fields = base.config.signature_fields(), config.signature_fields()
            if base_fields != fields:
                raise IndexConfigError(f"base index {base.path} has config {base_fields}, writing with {fields}")
        sig_src = signatures
        if np.ndim(sig_src) != 2 or np.shape(sig_src)[1] != k:
            raise ValueError(f"signatures must have shape [n, {k}], got {np.shape(sig_src)}")
        if rows is None:
            rows = np.arange(len(sig_src), dtype=np.int64)
        rows = np.asarray(rows, dtype=np.int64)
        n_base = base.num_docs if base is not None else 0
        n_total = n_base + len(rows)
        if n_total >= 2**32:
            raise ValueError("a signature index holds at most 2**32 - 1 documents")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            sig_out = _NpyAppender(tmp / "signatures.npy", SIGNATURE_DTYPE, k)
            if base is not None:
                for s in range(0, n_base, chunk_docs):
                    sig_out.append(np.asarray(base.signatures[s : s + chunk_docs]))
            spill = _BandSpill(tmp / "spill", config.num_bands)
            for s in range(0, len(rows), chunk_docs):
                r = rows[s : s + chunk_docs]
                chunk = np.asarray(sig_src[r], dtype=SIGNATURE_DTYPE)
                sig_out.append(chunk)
                ne = _nonempty(chunk)
                spill.append(band_hashes(chunk[ne], config), n_base + s + np.flatnonzero(ne))
            sig_out.close()
            spill.close()
            for b in range(config.num_bands):
                h, d = spill.read(b)
                if base is not None:
                    bh, bd = base.band(b)
                    h = np.concatenate([np.asarray(bh), h])
                    d = np.concatenate([np.asarray(bd, dtype=np.int64), d])
                order = np.argsort(h, kind="stable")  # two sorted runs; keeps doc order in buckets
                np.save(tmp / f"band_{b:03d}.hashes.npy", h[order], allow_pickle=False)
                np.save(tmp / f"band_{b:03d}.docs.npy", d[order].astype(np.uint32), allow_pickle=False)
                os.remove(spill.paths[b])
            shutil.rmtree(tmp / "spill")
            has_exact = exact_hashes is not None and (base is None or base.has_exact)
            if has_exact:
                new = np.asarray(exact_hashes, dtype=_U64)[rows]
                merged = np.unique(new[new != 0])
                if base is not None and len(base.exact_hashes):
                    merged = np.union1d(np.asarray(base.exact_hashes), merged)
                np.save(tmp / "exact_hashes.npy", merged.astype(_U64), allow_pickle=False)
            header = {
                "format": _FORMAT,
                "version": _FORMAT_VERSION,
                "config": config.signature_fields(),
                "num_docs": n_total,
                "num_hashes": k,
                "signature_dtype": "uint32",
                "band_hash_dtype": "uint64",
                "unicode_version": unicodedata.unidata_version,
                "has_exact": has_exact,
            }
            (tmp / "header.json").write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
            if path.exists():
                trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
                os.replace(path, trash / "index")
                os.replace(tmp, path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls.load(path, config)


# --------------------------------------------------------------------------------------------
# the dedup driver (streaming, disk-backed)
# --------------------------------------------------------------------------------------------


@dataclass
class DedupResult:
    """Outcome of a dedup run over ``num_docs`` documents (in the order they were added).

    ``representative[i]`` is the document kept in place of ``i`` (``i`` itself when kept; -1
    when ``i`` was dropped because its cluster contains a document of the index).
    ``exact_duplicate``: dropped, same normalised text as an earlier or indexed document.
    ``near_duplicate``: dropped by MinHash (and not an exact duplicate).
    ``index_duplicate``: dropped because it matches (exactly or nearly) the index.
    """

    keep: np.ndarray
    representative: np.ndarray
    exact_duplicate: np.ndarray
    near_duplicate: np.ndarray
    index_duplicate: np.ndarray
    num_clusters: int
    candidate_pairs: int
    verified_pairs: int

    @property
    def num_docs(self) -> int:
        return len(self.keep)

    @property
    def num_removed(self) -> int:
        return int(self.num_docs - np.count_nonzero(self.keep))

    @property
    def drop_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.keep)

    def stats(self) -> dict:
        return {
            "num_docs": self.num_docs,
            "num_kept": int(np.count_nonzero(self.keep)),
            "num_removed": self.num_removed,
            "num_exact_duplicates": int(np.count_nonzero(self.exact_duplicate)),
            "num_near_duplicates": int(np.count_nonzero(self.near_duplicate)),
            "num_index_duplicates": int(np.count_nonzero(self.index_duplicate)),
            "num_clusters": self.num_clusters,
            "candidate_pairs": self.candidate_pairs,
            "verified_pairs": self.verified_pairs,
        }


class MinHashDeduplicator:
    """Streaming near-duplicate removal with bounded memory.

    ``add()`` batches of texts (or precomputed signatures); signatures go to
    ``workdir/signatures.npy`` and band hashes to one spill file per band.  ``finalize()``
    drops exact duplicates (first occurrence kept), then processes one band at a time (sort,
    candidates, verification on the memory-mapped signatures, union-find), optionally also
    against a :class:`SignatureIndex` of an earlier corpus (the indexed documents count as
    coming first: a document whose cluster reaches an indexed one is dropped, with
    ``representative == -1``).  ``write_index()`` then writes the index of the kept documents
    (as a union with ``index`` when ``union=True``).  ``workdir`` (default: a temporary
    directory removed by ``close()``) holds ``signatures.npy`` and ``bands/band_XXX.bin``
    (records of uint64 band hash + uint32 document number).

    Memory beyond the on-disk signatures: one band's records (12 bytes/doc) and a few arrays of
    8 bytes/doc (exact hashes, union-find parents).
    """

    def __init__(
        self,
        config: MinHashConfig | None = None,
        workdir: str | os.PathLike | None = None,
        index: SignatureIndex | None = None,
        exact: bool = True,
    ):
        self.config = config or MinHashConfig()
        if index is not None and index.config.signature_fields() != self.config.signature_fields():
            raise IndexConfigError("the index was loaded with a different MinHash config")
        self.index = index
        self.exact = exact
        self.hasher = MinHasher(self.config)
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="kiln-minhash-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sig_out = _NpyAppender(self.workdir / "signatures.npy", SIGNATURE_DTYPE, self.config.num_hashes)
        self._spill = _BandSpill(self.workdir / "bands", self.config.num_bands)
        self._exact_parts: list[np.ndarray] = []
        self.num_docs = 0
        self.result: DedupResult | None = None

    def __enter__(self) -> "MinHashDeduplicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sig_out.close()
        self._spill.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def add(self, texts: Sequence[str]) -> np.ndarray:
        """Add a batch of documents; returns their document numbers."""
        sigs, ex = self.hasher.process(texts, exact=self.exact)
        return self.add_signatures(sigs, ex)

    def add_signatures(self, signatures: np.ndarray, exact_hashes: np.ndarray | None = None) -> np.ndarray:
        """Add precomputed signatures (and exact hashes, when ``exact``); returns doc numbers."""
        if self.result is not None:
            raise RuntimeError("finalize() was already called")
        sigs = np.asarray(signatures, dtype=SIGNATURE_DTYPE)
        if sigs.ndim != 2 or sigs.shape[1] != self.config.num_hashes:
            raise ValueError(f"signatures must have shape [n, {self.config.num_hashes}], got {sigs.shape}")
        if self.exact:
            if exact_hashes is None or len(exact_hashes) != len(sigs):
                raise ValueError("exact hashes are required (exact=True)")
            self._exact_parts.append(np.asarray(exact_hashes, dtype=_U64))
        first = self.num_docs
        if first + len(sigs) >= 2**32:
            raise ValueError("at most 2**32 - 1 documents per run")
        self._sig_out.append(sigs)
        ne = _nonempty(sigs)
        self._spill.append(band_hashes(sigs[ne], self.config), first + np.flatnonzero(ne))
        self.num_docs += len(sigs)
        return np.arange(first, self.num_docs)

    @property
    def signatures(self) -> np.ndarray:
        """The run's signatures, memory-mapped (after ``finalize()``)."""
        return _load_npy(self.workdir / "signatures.npy")

    @property
    def exact_hashes(self) -> np.ndarray | None:
        if not self.exact:
            return None
        if self._exact_parts:
            return np.concatenate(self._exact_parts)
        return np.zeros(0, dtype=_U64)

    def finalize(self) -> DedupResult:
        if self.result is not None:
            return self.result
        self._sig_out.close()
        self._spill.close()
        n = self.num_docs
        sigs = self.signatures
        arange = np.arange(n, dtype=np.int64)

        # 1. exact duplicates
        first_occ = arange.copy()
        ex_index = np.zeros(n, dtype=bool)
        if self.exact and n:
            eh = self.exact_hashes
            self._exact_parts = [eh]
            _, first, inverse = np.unique(eh, return_index=True, return_inverse=True)
            first_occ = np.where(eh != 0, first[inverse], arange)
            if self.index is not None:
                ex_index = self.index.contains_exact(eh)
        ex_within = first_occ != arange
        active = ~ex_within & ~ex_index

        # 2. near duplicates, one band at a time
        uf = _UnionFind(n)
        flagged = np.zeros(n, dtype=bool)  # near-duplicate of an indexed document
        need = _required_matches(self.config)
        n_cand = n_ok = 0
        for b in range(self.config.num_bands):
            h, d = self._spill.read(b)
            keep = active[d]
            h, d = h[keep], d[keep]
            if self.index is not None:
                self.index._query_band(b, h, d, sigs, flagged, need)
            i, j = _bucket_pairs(h, d)
            c, ok = _merge_candidates(uf, sigs, i, j, need)
            n_cand += c
            n_ok += ok
            del h, d, i, j
        roots = uf.roots()

        # 3. decisions
        anchored_root = np.zeros(n, dtype=bool)
        anchored_root[roots[flagged]] = True
        anchored = anchored_root[roots] | ex_index
        rep = roots
        rep[ex_within] = roots[first_occ[ex_within]]
        anchored[ex_within] |= anchored[first_occ[ex_within]]
        keep = (rep == arange) & ~anchored
        rep[anchored] = -1
        exact_dup = ex_within | ex_index
        near_dup = ~keep & ~exact_dup
        dropped_reps = rep[~keep & (rep >= 0)]
        self.result = DedupResult(
            keep=keep,
            representative=rep,
            exact_duplicate=exact_dup,
            near_duplicate=near_dup,
            index_duplicate=anchored,
            num_clusters=int(len(np.unique(dropped_reps))),
            candidate_pairs=n_cand,
            verified_pairs=n_ok,
        )
        return self.result

    def write_index(
        self, path: str | os.PathLike, union: bool = True, overwrite: bool = False
    ) -> SignatureIndex:
        """Write a :class:`SignatureIndex` of the kept documents (after the index's documents
        when ``union`` and an index was given), so later runs need only the newest index."""
        result = self.finalize()
        return SignatureIndex.write(
            path,
            self.config,
            self.signatures,
            exact_hashes=self.exact_hashes,
            base=self.index if union else None,
            rows=np.flatnonzero(result.keep),
            overwrite=overwrite,
        )


def deduplicate(
    texts: Sequence[str],
    config: MinHashConfig | None = None,
    index: SignatureIndex | None = None,
    exact: bool = True,
    workdir: str | os.PathLike | None = None,
    batch_size: int = 4096,
) -> DedupResult:
    """Convenience: exact + MinHash dedup of an in-memory list of texts."""
    with MinHashDeduplicator(config, workdir=workdir, index=index, exact=exact) as dd:
        texts = list(texts)
        for s in range(0, len(texts), batch_size):
            dd.add(texts[s : s + batch_size])
        return dd.finalize()
