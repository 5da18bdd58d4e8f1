"""datatrove's Gopher and C4 quality filters and py3langid's language identifier, deciding as
they do in a fraction of the time.

Each class here subclasses the original and keeps its constructor, settings, rejection
reasons and (for C4) the text it keeps; only the hot method is rewritten, where the original
spends its time in per-word or per-byte Python loops:

* Gopher repetition joins every word n-gram into a string, 15 times over (n = 2..10, for the
  top and the duplicated n-grams): 3-4 ms for a 1,000-word article. Here every n-gram is one
  polynomial hash of its characters, computed for all n-grams at once with numpy from prefix
  hashes, and each n after the first looks only at the positions where the (n-1)-grams
  repeat. Hash matches are confirmed on the strings themselves; a collision (never seen;
  2^-64 per pair) hands the document to datatrove's own code. One difference by design:
  duplicated n-grams are compared word by word (see FastGopherRepetitionFilter).
* Gopher quality tests every word character by character (punctuation only? any letter?);
  here only the words that are not all letters are looked at, a sixth of them in prose.
* C4 splits every kept line into sentences to count them, although only "at least
  `min_num_sentences`" matters, and updates its line statistics one by one.
* py3langid walks its automaton over the text one byte at a time in Python; here all
  positions step at once (FastLanguageIdentifier), with the same scores to the bit.

tests/pipelines/test_quality.py checks verdicts, reasons, kept text, statistics and language
scores against the originals on Python's documentation, the benchmark articles, planted
repetitive documents and random word sequences.
"""

from __future__ import annotations

from collections import Counter
from itertools import compress
from operator import not_

import numpy as np
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.c4_filters import CITATION_REGEX, ELLIPSIS, END_PUNCTUATION, POLICY_SUBSTRINGS
from datatrove.pipeline.filters.gopher_repetition_filter import (
    find_all_duplicate,
    find_duplicates,
    find_top_duplicate,
    get_n_grams,
)
from datatrove.utils.text import PUNCTUATION_SET, split_into_sentences, split_into_words
from py3langid.langid import LanguageIdentifier

__all__ = [
    "FastC4QualityFilter",
    "FastGopherQualityFilter",
    "FastGopherRepetitionFilter",
    "FastLanguageIdentifier",
    "NGramHashes",
    "RepeatedNGrams",
]


# ------------------------------------------------------------------ Gopher repetition

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd, so invertible modulo 2^64
_BASE_INVERSE = np.uint64(pow(int(_BASE), -1, 2**64))


class _Collision(Exception):
    """Two different n-grams with one hash: let datatrove's string code decide."""


class NGramHashes:
    """A hash for every word n-gram of a document, for any n, from the words joined by spaces.

    A string's hash is sum(c_j * B^j) over its characters, modulo 2^64 (numpy's uint64
    arithmetic wraps). From the prefix sums P[k] of the joined text, the n-gram spanning
    characters [a, b) hashes to (P[b] - P[a]) * B^-a, the same wherever it stands, so one
    subtraction and one multiplication per n-gram give all of them.
    """

    def __init__(self, words: list[str]):
        self.words = words
        self.text = " ".join(words)
        codes = np.frombuffer(self.text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        powers = np.full(len(codes) + 1, _BASE, dtype=np.uint64)
        powers[0] = 1
        np.cumprod(powers, out=powers)
        self._prefix = np.zeros(len(codes) + 1, dtype=np.uint64)
        np.cumsum(codes * powers[:-1], out=self._prefix[1:])
        inverse = np.full(len(codes) + 1, _BASE_INVERSE, dtype=np.uint64)
        inverse[0] = 1
        self._inverse_powers = np.cumprod(inverse)
        lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        self._starts = np.zeros(len(words) + 1, dtype=np.int64)  # where word k starts, and the end
        np.cumsum(lengths + 1, out=self._starts[1:])

    def count(self, n: int) -> int:
        return max(len(self.words) - n + 1, 0)

    def spans(self, n: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(start, end) in `text` of the n-grams that begin at word `positions`."""
        return self._starts[positions], self._starts[positions + n] - 1

    def hashes(self, n: int, positions: np.ndarray) -> np.ndarray:
        starts, ends = self.spans(n, positions)
        return (self._prefix[ends] - self._prefix[starts]) * self._inverse_powers[starts]

    def spaced_length(self, n: int, position: int) -> int:
        """len(" ".join(words[position:position + n]))"""
        return int(self._starts[position + n] - self._starts[position]) - 1

    def same(self, n: int, positions: list[int], others: list[int]) -> bool:
        """Whether the n-gram at each of `positions` is the one at its partner in `others`."""
        starts, ends = self.spans(n, np.asarray(positions + others, dtype=np.int64))
        half, text = len(positions), self.text
        return all(text[starts[i] : ends[i]] == text[starts[half + i] : ends[half + i]] for i in range(half))


class RepeatedNGrams:
    """The n-grams of a document that occur more than once, for growing n.

    If an n-gram occurs twice, so does its first (n-1)-gram: the occurrences of repeated
    n-grams lie among those of repeated (n-1)-grams. So after the first n, each larger n
    hashes and sorts only those positions, a few percent of the words in an article.
    Hash matches are confirmed on the strings before they decide anything.
    """

    def __init__(self, words: list[str]):
        self.grams = NGramHashes(words)
        if self.grams.text.count(" ") != max(len(words) - 1, 0):
            raise _Collision  # a word with a space in it would blur the n-grams: datatrove's way
        self._repeated: dict[int, np.ndarray] = {}  # n -> word positions of its repeated n-grams
        self._groups: dict[int, tuple] = {}

    def groups(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, first occurrence, count) of the n-grams that may repeat, in order."""
        if n not in self._groups:
            smaller = [k for k in self._repeated if k < n]
            count = self.grams.count(n)
            if smaller:
                positions = self._repeated[max(smaller)]
                positions = positions[positions < count]
            else:
                positions = np.arange(count, dtype=np.int64)
            _, first, kinds, counts = np.unique(
                self.grams.hashes(n, positions), return_index=True, return_inverse=True, return_counts=True
            )
            firsts, counts = positions[first][kinds], counts[kinds]
            self._groups[n] = positions, firsts, counts
            self._repeated[n] = positions[counts > 1]
        return self._groups[n]

    def top_chars(self, n: int) -> int:
        """datatrove's find_top_duplicate(get_n_grams(words, n)): length of the most frequent
        n-gram (joined by spaces) times its count; among equally frequent ones, the one that
        comes first (Counter order). All n-grams once: the first one."""
        positions, firsts, counts = self.groups(n)
        if not len(counts) or counts.max() == 1:
            return self.grams.spaced_length(n, 0)
        top = counts.max()
        first = int(firsts[counts == top].min())
        members = positions[firsts == first].tolist()
        if not self.grams.same(n, members, [first] * len(members)):
            raise _Collision
        return self.grams.spaced_length(n, first) * int(top)

    def repeated_chars(self, n: int) -> int:
        """datatrove's find_all_duplicate(words, n): scanning left to right, each n-gram
        already seen adds its characters ("".join) and the scan jumps past it; a new one is
        remembered.

        Only an n-gram seen earlier (a candidate) can count. It counts when an earlier
        occurrence was visited: its first one, unless a jump skipped it, or an earlier
        candidate of its kind that the scan remembered."""
        positions, firsts, _ = self.groups(n)
        later = firsts < positions
        candidates, earliest = positions[later].tolist(), firsts[later].tolist()
        if not candidates:
            return 0
        if not self.grams.same(n, candidates, earliest):
            raise _Collision
        skipped: set[int] = set()  # positions inside jumps
        remembered: set[int] = set()  # first occurrences, standing for their kind
        total, scan = 0, 0
        for at, first in zip(candidates, earliest):
            if at < scan:
                continue  # jumped over
            if first not in skipped or first in remembered:
                total += self.grams.spaced_length(n, at) - (n - 1)
                skipped.update(range(at + 1, at + n))
                scan = at + n
            else:
                remembered.add(first)
                scan = at + 1
        return total


class FastGopherRepetitionFilter(GopherRepetitionFilter):
    """datatrove's GopherRepetitionFilter with its n-gram counts done on hashes.

    One difference, by design: n-grams are compared word by word. datatrove compares its
    duplicated n-grams as strings joined without spaces, so ("ab", "c") equals ("a", "bc")
    there; no decision differs on the test corpora."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        if not text:
            return False, "empty"
        rejected = self._repeated_blocks(text)
        if rejected:
            return False, rejected
        words = split_into_words(text, self.language)
        try:
            rejected = self._repeated_n_grams(text, words)
        except _Collision:
            rejected = _datatrove_n_gram_verdict(self, text, words)
        return (False, rejected) if rejected else True

    def _repeated_blocks(self, text: str) -> str | None:
        paragraphs = self.paragraph_exp.split(text.strip())
        duplicates, chars = find_duplicates(paragraphs)
        if self.dup_para_frac and duplicates / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if self.dup_para_char_frac and chars / len(text) > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = self._line_splitter.split(text)
        duplicates, chars = find_duplicates(lines)
        if self.dup_line_frac and duplicates / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if self.dup_line_char_frac and chars / len(text) > self.dup_line_char_frac:
            return "dup_line_char_frac"
        return None

    def _repeated_n_grams(self, text: str, words: list[str]) -> str | None:
        repeats = RepeatedNGrams(words)
        for n, n_frac in self.top_n_grams:
            if len(words) >= n and repeats.top_chars(n) / len(text) > n_frac:
                return f"top_{n}_gram"
        for n, n_frac in self.dup_n_grams:
            if repeats.repeated_chars(n) / len(text) > n_frac:
                return f"duplicated_{n}_n_grams"
        return None


def _datatrove_n_gram_verdict(step: GopherRepetitionFilter, text: str, words: list[str]) -> str | None:
    for n, n_frac in step.top_n_grams:
        n_grams = get_n_grams(words, n)
        if n_grams and find_top_duplicate(n_grams) / len(text) > n_frac:
            return f"top_{n}_gram"
    for n, n_frac in step.dup_n_grams:
        if find_all_duplicate(words, n) / len(text) > n_frac:
            return f"duplicated_{n}_n_grams"
    return None


# ------------------------------------------------------------------ Gopher quality


_PUNCTUATION = "".join(sorted(PUNCTUATION_SET))


class FastGopherQualityFilter(GopherQualityFilter):
    """datatrove's GopherQualityFilter that looks at the characters of the words that are not all letters only."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        text = doc.text
        words = split_into_words(text, self.language)
        if not words:
            return super().filter(doc)
        n_words = len(words)
        # Most words are letters only; only the others need a look at each character.
        others = list(compress(words, map(not_, map(str.isalpha, words))))
        symbols = [word for word in others if not word.strip(_PUNCTUATION)]
        n_kept = n_words - len(symbols)  # datatrove's non_symbol_words

        if self.min_doc_words and n_kept < self.min_doc_words:
            return False, "gopher_short_doc"
        if self.max_doc_words and n_kept > self.max_doc_words:
            return False, "gopher_long_doc"

        kept_chars = sum(map(len, words)) - sum(map(len, symbols))
        average = kept_chars / n_kept if n_kept else float("nan")  # np.mean's value, nan when empty
        if self.min_avg_word_length and average < self.min_avg_word_length:
            return False, "gopher_below_avg_threshold"
        if self.max_avg_word_length and average > self.max_avg_word_length:
            return False, "gopher_above_avg_threshold"

        if self.max_symbol_word_ratio and text.count("#") / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_hashes"
        if self.max_symbol_word_ratio and (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
            return False, "gopher_too_many_ellipsis"

        lines = text.splitlines()
        bullets = sum(s.lstrip().startswith(("•", "-")) for s in lines)
        if self.max_bullet_lines_ratio and bullets / len(lines) > self.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        ellipses = sum(s.rstrip().endswith(("...", "…")) for s in lines)
        if self.max_ellipsis_lines_ratio and ellipses / len(lines) > self.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"

        with_letter = n_words - len(others) + sum(1 for word in others if any(map(str.isalpha, word)))
        if self.max_non_alpha_words_ratio and with_letter / n_words < self.max_non_alpha_words_ratio:
            return False, "gopher_below_alpha_threshold"

        if self.min_stop_words and len(self.stop_words.intersection(words)) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return True


# ------------------------------------------------------------------ C4


class FastC4QualityFilter(C4QualityFilter):
    """datatrove's C4QualityFilter that stops counting sentences once there are enough, and
    adds up its line statistics per document."""

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lines = doc.text.splitlines() if self.split_paragraph else split_into_sentences(doc.text, self.language)
        counts: Counter[str] = Counter()
        try:
            return self._filter_lines(doc, lines, counts)
        finally:
            for key, value in counts.items():
                self.stat_update(key, value=value)

    def _filter_lines(self, doc: Document, lines: list[str], counts: Counter) -> bool | tuple[bool, str]:
        num_sentences, kept_lines = 0, []
        enough = self.min_num_sentences <= 0  # -1 switches the rule off
        for line in lines:
            line = line.strip()
            words = line.split()
            counts["line-total"] += 1
            if self.max_word_length != -1 and any(len(word) > self.max_word_length for word in words):
                counts["line-filter-too_long_word"] += 1
                continue
            if self.remove_citations:
                line = CITATION_REGEX.sub("", line)
            if self.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                counts["line-filter-no_terminal_punc"] += 1
                continue
            if len(words) < self.min_words_per_line:
                counts["line-filter-too_few_words"] += 1
                continue
            line_l = line.lower()
            if self.filter_lorem_ipsum and "lorem ipsum" in line_l:
                return False, "lorem_ipsum"
            if self.filter_javascript and "javascript" in line_l:
                counts["line-filter-javascript"] += 1
                continue
            if self.filter_curly_bracket and "{" in line:
                return False, "curly_bracket"
            if self.filter_policy and any(p in line_l for p in POLICY_SUBSTRINGS):
                counts["line-filter-policy"] += 1
                continue
            if not enough:  # past the minimum, the count no longer matters
                num_sentences += len(split_into_sentences(line, self.language)) if self.split_paragraph else 1
                enough = num_sentences >= self.min_num_sentences
            kept_lines.append(line)
            counts["line-kept"] += 1
        if not enough:
            return False, "too_few_sentences"
        doc.text = ("\n" if self.split_paragraph else " ").join(kept_lines).strip()
        return True


# ------------------------------------------------------------------ language identification


class FastLanguageIdentifier(LanguageIdentifier):
    """py3langid's identifier (its model, scores and ranking) with its feature counting in numpy.

    py3langid counts its byte n-gram features by walking a DFA over the text's bytes in a
    Python loop, 0.2 µs a byte. The DFA is an Aho-Corasick automaton whose states are
    the trie's nodes: after any text it stands at the longest suffix of the text that is a
    node, which is never longer than the deepest node. So the state after byte i is the state
    reached from the start by the last `depth` bytes alone, and `depth` vectorized steps over
    all positions at once give every state, in a sixth of the time. The feature counts (and
    their first-seen order, which fixes the float sum) are the ones py3langid's walk makes,
    so the scores are py3langid's to the bit; the whole `rank` takes half the time.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._moves = np.frombuffer(self.tk_nextmove, dtype=np.uint32)
        self._rows = np.asarray(self._rowbase, dtype=np.intp)
        self._outputs = np.asarray(self.tk_output, dtype=np.intp)
        self._depth = self._deepest_state()
        # Stored as float16; every score multiplies rows of it in float32, converting the rows
        # each time. Converted once (exactly: every float16 is a float32), 28 MB more.
        self.nb_ptc: np.ndarray = np.asarray(self.nb_ptc, dtype=np.float32)

    def _deepest_state(self) -> int:
        """Breadth-first from the start state: how many bytes reach the farthest state."""
        reached = np.zeros(len(self._rows), dtype=bool)
        reached[0] = True
        frontier, depth, every_byte = np.zeros(1, dtype=np.intp), -1, np.arange(256, dtype=np.intp)
        while frontier.size:
            rows = np.unique(self._rows[frontier])
            fresh = np.zeros(len(self._rows), dtype=bool)
            fresh[self._moves[(rows[:, None] + every_byte).ravel()]] = True
            fresh &= ~reached
            reached |= fresh
            frontier, depth = np.flatnonzero(fresh), depth + 1
        return depth

    def _raw_score(self, text: bytes):
        if len(text) < 2 * self._depth:
            return super()._raw_score(text)
        visits = self._visits(np.frombuffer(text, dtype=np.uint8))
        return self._sparse_score(visits, self.nb_ptc) if visits else super()._raw_score(text)

    def _visits(self, data: np.ndarray) -> Counter:
        """{feature: count} in first-seen order, as py3langid's visit_counts."""
        depth, steady = self._depth, len(data) - self._depth + 1
        head, state = [], 0  # the first bytes have less behind them: walked one by one
        for byte in data[: depth - 1].tolist():
            state = int(self._moves[self._rows[state] + byte])
            head.append(state)
        states = np.zeros(steady, dtype=np.intp)
        for back in range(depth):
            states = np.take(self._moves, np.take(self._rows, states) + data[back : back + steady])
        features = np.take(self._outputs, np.concatenate([np.asarray(head, dtype=np.intp), states]))
        return Counter(features[features >= 0].tolist())
