"""Deterministic integer hashing: splitmix64 streams for constants, murmur3's fmix64 to mix.

No Python `hash()` and no numpy random streams: every constant comes from splitmix64, so
signatures are the same across processes, machines and runs.
"""

from __future__ import annotations

import numpy as np

U64 = np.uint64
MASK64 = (1 << 64) - 1


def splitmix64(seed: int, n: int) -> list[int]:
    state = seed & MASK64
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        out.append(z ^ (z >> 31))
    return out


_FMIX_C1 = 0xFF51AFD7ED558CCD
_FMIX_C2 = 0xC4CEB9FE1A85EC53


def fmix64_inplace(x: np.ndarray) -> np.ndarray:
    """murmur3 fmix64 on a uint64 array, in place (wrapping arithmetic)."""
    x ^= x >> U64(33)
    x *= U64(_FMIX_C1)
    x ^= x >> U64(33)
    x *= U64(_FMIX_C2)
    x ^= x >> U64(33)
    return x


def fmix64_int(x: int) -> int:
    x ^= x >> 33
    x = (x * _FMIX_C1) & MASK64
    x ^= x >> 33
    x = (x * _FMIX_C2) & MASK64
    return x ^ (x >> 33)
