"""The settings of MinHash near-duplicate detection (the dedup stage's config extends them)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipelines.minhash.hashing import MASK64

# Bumped whenever the normalisation or hashing scheme changes: part of the index header, so an
# index written by an older scheme fails loudly instead of silently never matching.
HASH_SCHEME = "kiln-minhash-v1"


class MinHashConfig(BaseModel):
    """Parameters of the MinHash/LSH near-duplicate detector.

    ``similarity_threshold`` is the minimum Jaccard estimate (fraction of equal signature values)
    a candidate pair needs to be merged; ``None`` merges every LSH candidate (raw LSH).
    """

    model_config = ConfigDict(extra="forbid")

    ngram: int = Field(5, ge=1, strict=True, description="Words per shingle.")
    num_bands: int = Field(14, ge=1, strict=True, description="LSH bands.")
    rows_per_band: int = Field(8, ge=1, strict=True, description="MinHash rows per band (hashes = bands x rows).")
    seed: int = Field(0x6B696C6E, ge=0, le=MASK64, strict=True,
                      description="Seed of the hash functions; an index only matches its own seed.")
    similarity_threshold: float | None = Field(
        0.75, gt=0, le=1,
        description="A candidate pair is a duplicate only if its estimated Jaccard reaches this; "
                    "None keeps every LSH candidate (flags ~5% of pairs at similarity 0.5 with 14x8).",
    )
    normalize_digits: bool = Field(True, description="Treat every number as 0 when comparing.")

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


class IndexConfigError(ValueError):
    """A signature index was written with a configuration incompatible with the current one."""


def lsh_probability(s, num_bands: int, rows_per_band: int):
    """Theoretical LSH candidate probability 1 - (1 - s^r)^b for Jaccard similarity ``s``."""
    s = np.asarray(s, dtype=np.float64)
    p = 1.0 - (1.0 - s**rows_per_band) ** num_bands
    return float(p) if p.ndim == 0 else p
