"""What a document is made of for MinHash: normalised words, word n-gram shingles, their hashes.

1. **Normalisation** (as FineWeb's ``simplify_text``): lowercase, Unicode format characters
   (``Cf``) removed, punctuation, symbols, separators and control characters turned into word
   breaks, whitespace collapsed, optionally every run of decimal digits replaced by ``0``.
   :func:`normalize_text` is the readable reference; the batch path does the same per code
   point in numpy (class and lowercase tables filled in as code points are met; texts are
   batched by encoding, ASCII, all in the BMP or neither, so that str.lower(), slow outside
   ASCII and holding the GIL, is needed only for the last) and is tested to agree with it.
2. **Shingles**: word n-grams; a document with fewer than ``n`` words gives one shingle of all
   its words, a document without words none.
3. **Shingle hashes** (64 bit): a polynomial hash of every word's code points (one prefix sum
   mod 2^64 over the batch), then a polynomial over the shingle's word hashes and fmix64.
4. **Exact hashes**: xxh3 of the normalised text, for exact-duplicate removal.
"""

from __future__ import annotations

import re
import sys
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np
import xxhash

from pipelines.minhash.hashing import MASK64, U64, fmix64_inplace, fmix64_int, splitmix64

_POLY_BASE = splitmix64(0x5348494E474C45, 1)[0] | 1  # base of the per-word polynomial hash
# seed-independent constants of the shingle hash (fixed for HASH_SCHEME v1)
_WORD_BASE = splitmix64(0x574F52445348, 1)[0] | 1  # base of the polynomial over a shingle's word hashes


class _Powers:
    """Cached base^j and base^-j mod 2^64 (j < n), grown on demand."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.base_inv = pow(base, -1, 1 << 64)
        self._arrays = (np.ones(1, dtype=U64), np.ones(1, dtype=U64))

    def get(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        pw, inv = self._arrays  # one tuple: never a new pow with an old inv
        if len(pw) < n:
            size = max(n, 2 * len(pw), 1 << 16)
            with np.errstate(over="ignore"):
                p = np.full(size, self.base, dtype=U64)
                p[0] = 1
                q = np.full(size, self.base_inv, dtype=U64)
                q[0] = 1
                pw, inv = np.cumprod(p, dtype=U64), np.cumprod(q, dtype=U64)
            self._arrays = (pw, inv)
        return pw[:n], inv[:n]


_CHAR_POWERS = _Powers(_POLY_BASE)
_WORD_POWERS = _Powers(_WORD_BASE)


# character classes; word characters are exactly the classes <= _DIGIT
_WORD, _DIGIT, _SPACE, _DECSEP, _DELETE = 0, 1, 2, 3, 4
_DECIMAL_SEPARATORS = ".,\u060c\u066b"


def _class_of(code_point: int) -> int:
    ch = chr(code_point)
    if ch in _DECIMAL_SEPARATORS:
        return _DECSEP
    c = unicodedata.category(ch)
    if c[0] in "PSZ" or c == "Cc" or ch.isspace():
        return _SPACE
    if c == "Cf":
        return _DELETE
    if c == "Nd":
        return _DIGIT
    return _WORD


@lru_cache(maxsize=1)
def _char_classes() -> np.ndarray:
    """Class of every code point: word / decimal digit / break / decimal separator / delete
    (the reference path's table; the batch path fills in :data:`_CLASSES` as it meets them)."""
    table = np.fromiter(map(_class_of, range(sys.maxunicode + 1)), dtype=np.uint8, count=sys.maxunicode + 1)
    table.setflags(write=False)
    return table


class _LazyTable:
    """`fn` of every index below `size`, looked up in a table filled in as indices are first
    met: a text uses a few hundred of the 1.1 M code points, and building a whole table cost
    every process of the dedup stage 0.2-0.5 s before it hashed anything."""

    def __init__(self, size: int, dtype, unknown: int, fn, first: int = 256) -> None:
        self.table = np.full(size, unknown, dtype=dtype)
        self.unknown, self.fn = unknown, fn
        self.lock = threading.Lock()
        self._learn(np.arange(min(first, size)))

    def _learn(self, indices: np.ndarray) -> None:
        with self.lock:
            self.table[indices] = np.fromiter(map(self.fn, indices.tolist()), dtype=self.table.dtype,
                                              count=len(indices))

    def __call__(self, index: np.ndarray, table: np.ndarray | None = None) -> np.ndarray:
        table = self.table if table is None else table
        out = np.take(table, index)
        if len(out) and int(out.max()) == self.unknown:
            self._learn(np.unique(index[out == self.unknown]))
            out = np.take(table, index)
        return out


class _ClassTable(_LazyTable):
    """:func:`_class_of` of every code point; the Basic Multilingual Plane's part (64 KiB) stays
    in cache and is indexed by 16-bit code points."""

    def __init__(self) -> None:
        super().__init__(sys.maxunicode + 1, np.uint8, 255, _class_of)
        self.bmp = self.table[:1 << 16]  # a view: filled together

    def __call__(self, cps: np.ndarray) -> np.ndarray:  # type: ignore[override]
        """uint8 classes of code points (uint32; uint8 or uint16 ones are in the BMP)."""
        if cps.dtype.itemsize < 4:
            return super().__call__(cps, self.bmp)
        if len(cps) and int(cps.max()) < (1 << 16):
            return super().__call__(cps.astype(np.uint16), self.bmp)
        return super().__call__(cps)


_SPECIAL = 0xFFFFFFFE  # a code unit str.lower() maps by context (capital sigma) or to several characters


def _lower_unit(unit: int) -> int:
    lowered = chr(unit).lower()
    if unit == 0x3A3 or len(lowered) != 1 or ord(lowered) >= 1 << 16:
        return _SPECIAL
    return ord(lowered)


_CLASSES = _ClassTable()
_LOWER_BMP = _LazyTable(1 << 16, np.uint32, 0xFFFFFFFF, _lower_unit)  # str.lower of one UTF-16 code unit


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
        h = (h + ord(ch) * p) & MASK64
        p = (p * _POLY_BASE) & MASK64
    return h


def reference_shingle_hashes(text: str, ngram: int = 5, normalize_digits: bool = True) -> np.ndarray:
    """Pure-Python (slow) computation of the shingle hashes, to check the vectorised path.

    word hash ``w = sum_j cp_j * B^j``; shingle hash ``fmix64(sum_t w_t * Q^t)`` (mod 2^64).
    """
    out = []
    for shingle in word_shingles(text, ngram, normalize_digits):
        acc, q = 0, 1
        for word in shingle:
            acc = (acc + _reference_word_hash(word) * q) & MASK64
            q = (q * _WORD_BASE) & MASK64
        out.append(fmix64_int(acc))
    return np.array(out, dtype=U64)


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


def _lowered_code_points(texts: Sequence[str], utf16: list[bytes] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The code points of the lowercased texts, joined by "\\n" (a word break: no word spans two
    documents): uint32 ones for the hashes, and the narrowest array of them for the classes.

    str.lower() is fast on ASCII and slow elsewhere (4 ns a character), and holds the GIL: texts
    whose characters are all in the BMP (`utf16`: their UTF-16 encodings, one code unit each) are
    lowercased one code unit at a time in numpy instead, unless one of them has a character that
    str.lower() maps by its context (capital sigma) or to several characters (dotted capital I)."""
    if utf16 is None and all(t.isascii() for t in texts):
        units = np.frombuffer("\n".join(texts).lower().encode("ascii"), dtype=np.uint8)
        return units.astype(np.uint32), units
    if utf16 is not None:
        lowered = _LOWER_BMP(np.frombuffer(b"\n\x00".join(utf16), dtype=np.uint16))
        if not len(lowered) or int(lowered.max()) < _SPECIAL:
            return lowered, lowered.astype(np.uint16)
    cps = np.frombuffer("\n".join([t.lower() for t in texts]).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return cps, cps


def split_by_encoding(texts: Sequence[str]) -> list[tuple[np.ndarray, list[bytes] | None]]:
    """The positions of the ASCII texts, of those all in the BMP (with their UTF-16 encodings),
    and of the others: batches of one kind take the fast paths of :func:`_lowered_code_points`."""
    ascii_, bmp, other, utf16 = [], [], [], []
    for i, t in enumerate(texts):
        if t.isascii():
            ascii_.append(i)
            continue
        encoded = t.encode("utf-16-le", "surrogatepass")
        if len(encoded) == 2 * len(t) and "\u03a3" not in t and "\u0130" not in t:
            bmp.append(i)
            utf16.append(encoded)
        else:
            other.append(i)
    groups = [(np.array(ascii_, dtype=np.int64), None), (np.array(bmp, dtype=np.int64), utf16),
              (np.array(other, dtype=np.int64), None)]
    return [(positions, encoded) for positions, encoded in groups if len(positions)]


def prepare_batch(texts: Sequence[str], normalize_digits: bool, utf16: list[bytes] | None = None) -> _Batch:
    n_docs = len(texts)
    cps, narrow = _lowered_code_points(texts, utf16)
    n = len(cps)
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=n_docs)  # lowercasing keeps lengths...
    if n != lens.sum() + max(n_docs - 1, 0):  # ... but for a dotted capital I
        lens = np.fromiter((len(t.lower()) for t in texts), dtype=np.int64, count=n_docs)
    doc_start = np.zeros(n_docs + 1, dtype=np.int64)
    np.cumsum(lens + 1, out=doc_start[1:])
    doc_start[n_docs] = n
    cls = _CLASSES(narrow)

    # format characters are deleted (rare: an extra pass only when present)
    if n and int(cls.max()) == _DELETE:
        gone = cls == _DELETE
        doc_start -= np.searchsorted(np.flatnonzero(gone), doc_start)
        cps, cls = cps[~gone], cls[~gone]
        n = len(cps)
    word = cls <= _DIGIT
    if normalize_digits and n:
        digit = cls == _DIGIT
        if digit.any():
            # a decimal separator between two digits is part of the number; a number is one "0"
            run = digit.copy()
            sep = cls[1:-1] == _DECSEP
            sep &= digit[:-2]
            sep &= digit[2:]
            run[1:-1] |= sep
            word[1:-1] |= sep
            cps = np.where(run, np.uint32(48), cps)
            later = run[1:] & run[:-1]  # every run keeps its first character only
            if later.any():
                keep = np.ones(n, dtype=bool)
                keep[1:] = ~later
                doc_start -= np.searchsorted(np.flatnonzero(later) + 1, doc_start)
                cps, word = cps[keep], word[keep]
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
    prefix = np.empty(n + 1, dtype=U64)
    prefix[0] = 0
    with np.errstate(over="ignore"):
        vals = np.multiply(batch.cps, pw, dtype=U64)
        np.cumsum(vals, out=prefix[1:])
        h = prefix[batch.word_end] - prefix[batch.word_start]
        h *= inv[batch.word_start]
    return h


def shingle_hashes_from_batch(batch: _Batch, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of a batch: ``(uint64 [n_shingles], per-document offsets [n_docs+1])``."""
    offs = batch.doc_word_offsets
    counts = np.diff(offs)
    per_doc = np.where(counts >= ngram, counts - ngram + 1, np.minimum(counts, 1))
    shingle_offsets = np.zeros(batch.n_docs + 1, dtype=np.int64)
    np.cumsum(per_doc, out=shingle_offsets[1:])
    nw = len(batch.word_start)
    if nw == 0:
        return np.zeros(0, dtype=U64), shingle_offsets
    words = _word_hashes(batch)
    wp, winv = _WORD_POWERS.get(nw)
    prefix = np.empty(nw + 1, dtype=U64)
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
    return fmix64_inplace(acc), shingle_offsets


def iter_batches(texts: Sequence[str], max_chars: int) -> Iterable[tuple[int, int]]:
    start = 0
    chars = 0
    for i, t in enumerate(texts):
        chars += len(t) + 1
        if chars >= max_chars:
            yield start, i + 1
            start, chars = i + 1, 0
    if start < len(texts):
        yield start, len(texts)


DEFAULT_MAX_CHARS = 1 << 18


def batches(texts: Sequence[str], normalize_digits: bool, max_chars: int = DEFAULT_MAX_CHARS
            ) -> Iterable[tuple[np.ndarray, _Batch]]:
    """The texts as batches of about `max_chars` characters, each of one encoding
    (:func:`split_by_encoding`): (the positions of its texts, the batch)."""
    texts = texts if isinstance(texts, list) else list(texts)
    for positions, utf16 in split_by_encoding(texts):
        group = [texts[i] for i in positions.tolist()]
        for a, b in iter_batches(group, max_chars):
            yield positions[a:b], prepare_batch(group[a:b], normalize_digits, utf16[a:b] if utf16 else None)


def shingle_hashes_batch(
    texts: Sequence[str], ngram: int = 5, normalize_digits: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes of many documents: ``(hashes uint64 [total], offsets int64 [n_docs+1])``.

    The hashes of document ``i`` are ``hashes[offsets[i]:offsets[i+1]]`` (in text order, repeats
    kept).
    """
    batch = prepare_batch(list(texts), normalize_digits)
    return shingle_hashes_from_batch(batch, ngram)


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


def exact_hashes_from_batch(batch: _Batch) -> np.ndarray:
    """Same values as :func:`exact_hash`, from the batch arrays (normalised text re-assembled)."""
    out = np.zeros(batch.n_docs, dtype=U64)
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


def exact_hashes(texts: Sequence[str], normalize_digits: bool = True, max_chars: int = DEFAULT_MAX_CHARS) -> np.ndarray:
    """:func:`exact_hash` of many documents (vectorised normalisation), uint64 [n_docs]."""
    texts = list(texts)
    out = np.zeros(len(texts), dtype=U64)
    for positions, batch in batches(texts, normalize_digits, max_chars):
        out[positions] = exact_hashes_from_batch(batch)
    return out


def exact_duplicates(hashes: np.ndarray, seen: np.ndarray | None = None) -> np.ndarray:
    """Mask of exact duplicates: a document whose (non-zero) hash occurs earlier in ``hashes``
    or in the sorted array ``seen`` (e.g. ``SignatureIndex.exact_hashes``).  First occurrences
    are kept; hash 0 (empty normalised text) is never a duplicate."""
    hashes = np.asarray(hashes, dtype=U64)
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
