"""MinHash near-duplicate detection for Kiln's dedup stage (pure numpy, single-threaded).

All vectorised over batches of documents: normalised words -> word 5-gram shingle hashes
(`shingles`) -> MinHash signatures (`signatures`) -> LSH bands, candidate pairs verified on the
full signatures, union-find whose root is always the lowest document index, i.e. the document
kept (`lsh`). `units` are the dedup stage's units of work over a corpus (pipelines/dedup.py
runs them), optionally against the signature index of an earlier corpus (`index`);
`deduplicator` is the same in one process, the reference the tests hold the stage to
(tests/pipelines/test_dedup.py: the same documents kept, the same index bytes). `files` reads
and writes `.npy` rows, `config` holds the settings, `hashing` the deterministic mixers.

Everything is deterministic across processes and machines (no Python ``hash()``, no numpy RNG
streams): constants come from splitmix64. The only environment dependence is the Unicode
database of the running Python (``str.lower`` and character categories); its version is stored
in index headers and a mismatch gives a warning. Nothing is pickled.

This module re-exports the public API.
"""

from __future__ import annotations

from pipelines.minhash.config import HASH_SCHEME, IndexConfigError, MinHashConfig, lsh_probability
from pipelines.minhash.deduplicator import DedupResult, MinHashDeduplicator, deduplicate
from pipelines.minhash.index import SignatureIndex
from pipelines.minhash.lsh import band_hashes, candidate_pairs, cluster_signatures, estimate_jaccard
from pipelines.minhash.shingles import (
                                        exact_duplicates,
                                        exact_hash,
                                        exact_hashes,
                                        normalize_text,
                                        reference_shingle_hashes,
                                        shingle_hashes,
                                        shingle_hashes_batch,
                                        word_shingles,
)
from pipelines.minhash.signatures import MinHasher

__all__ = [
    "HASH_SCHEME",
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
