"""MinHash signatures: ``num_bands * rows_per_band`` min-wise hashes of a document's shingles.

Hash function k maps a shingle hash x to ``a_k * (x_k | 1) mod 2^32`` (``a_k`` odd, from a
splitmix64 stream of the config's seed; ``x_k`` the high 32 bits of x for even k, the low 32
bits for odd k, so only a full 64-bit collision makes two shingles alike in every row). The
minimum per document is an ``np.minimum.reduceat`` over chunks of 8192 shingles laid out
``[hash function, shingle]`` (uint32, SIMD, cache-resident). Signatures are
``uint32 [n_docs, num_hashes]``; a document without shingles gets the all-``0xFFFFFFFF``
signature (:data:`EMPTY`) and never matches anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipelines.minhash.config import MinHashConfig
from pipelines.minhash.hashing import U64, splitmix64
from pipelines.minhash.shingles import DEFAULT_MAX_CHARS, batches, exact_hashes_from_batch, shingle_hashes_from_batch

EMPTY = np.uint32(0xFFFFFFFF)
SIGNATURE_DTYPE = np.dtype("<u4")


def nonempty(signatures: np.ndarray) -> np.ndarray:
    """Mask of the documents that have shingles (the others match nothing)."""
    return ~(np.asarray(signatures) == EMPTY).all(axis=1)


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

    def __init__(self, config: MinHashConfig | None = None, chunk_shingles: int = 8192,
                 max_chars: int = DEFAULT_MAX_CHARS):
        self.config = config or MinHashConfig()
        k = self.config.num_hashes
        self.multipliers = np.array([(v >> 32) | 1 for v in splitmix64(self.config.seed, k)], dtype=np.uint32)
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
        sig = np.full((k, n_docs), EMPTY, dtype=np.uint32)
        total = int(offsets[-1]) if n_docs else 0
        if total:
            hashes = np.asarray(hashes, dtype=U64)
            x_hi = (hashes >> U64(32)).astype(np.uint32)
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
        ex = np.zeros(len(texts), dtype=U64) if exact else None
        for positions, batch in batches(texts, self.config.normalize_digits, self.max_chars):
            hashes, offsets = shingle_hashes_from_batch(batch, self.config.ngram)
            sigs[positions] = self.signatures_from_hashes(hashes, offsets)
            if ex is not None:
                ex[positions] = exact_hashes_from_batch(batch)
        return sigs, ex
