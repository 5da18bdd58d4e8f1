"""pipelines/quality.py decides as datatrove's filters and py3langid do: the same verdicts, the
same reasons, the same kept text and statistics, the same language scores, on real text."""

import gzip
import json
import random
from pathlib import Path

import pytest
from datatrove.data import Document
from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams
from datatrove.utils.word_tokenizers import WordTokenizer
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from pipelines import quality
from pipelines.extract import extract
from pipelines.words import ENGLISH_WORDS

AEB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "html_extraction" / "scrapinghub_aeb"
WORDS = ENGLISH_WORDS["fast"]


@pytest.fixture(scope="module")
def texts():
    """Python's documentation (79 pydoc topics: prose, grammar, code), the extracted text of the
    181 benchmark articles (eight languages) when the shared data is here, and repetitive
    variants of them: a passage repeated, a paragraph repeated, a word salad."""
    from pydoc_data.topics import topics

    found = dict(topics)
    if AEB.is_dir():
        truth = json.loads((AEB / "ground-truth.json").read_text())
        for key in sorted(truth):
            html = gzip.decompress((AEB / "html" / f"{key}.html.gz").read_bytes()).decode("utf-8", "replace")
            if text := extract(html, truth[key]["url"]):
                found[key] = text
    rng = random.Random(0)
    for key, text in list(found.items())[::3]:
        words = text.split()
        start, size = rng.randrange(max(len(words) - 30, 1)), rng.randint(5, 30)
        passage = " ".join(words[start : start + size])
        found[f"{key}/passage"] = text + f"\n{passage}" * rng.randint(1, 8)
        found[f"{key}/paragraph"] = " ".join(words[:40]) * rng.randint(2, 5)
        found[f"{key}/salad"] = "\n".join(rng.choice(words) for _ in range(300))
    return found


def verdicts(step, texts):
    result = {}
    for key, text in texts.items():
        doc = Document(text=text, id=key)
        verdict = step.filter(doc)
        result[key] = (verdict if verdict is True else verdict[1], doc.text)
    return result


def counters(step):
    return {key: stat.total for key, stat in step.stats.stats.items()}


@pytest.mark.parametrize(
    "ours, theirs, settings",
    [
        (quality.FastGopherRepetitionFilter, GopherRepetitionFilter, {}),
        (quality.FastGopherQualityFilter, GopherQualityFilter, {"max_non_alpha_words_ratio": 0.7}),
        (quality.FastGopherQualityFilter, GopherQualityFilter, {}),
        (quality.FastC4QualityFilter, C4QualityFilter, {"filter_no_terminal_punct": False}),
        (quality.FastC4QualityFilter, C4QualityFilter, {}),
    ],
    ids=["gopher_repetition", "gopher_quality", "gopher_quality_datatrove", "c4", "c4_datatrove"],
)
def test_filters_decide_as_datatrove(texts, ours, theirs, settings):
    fast, reference = ours(language=WORDS, **settings), theirs(language=WORDS, **settings)
    expected, found = verdicts(reference, texts), verdicts(fast, texts)
    assert found == expected  # the verdict, its reason, and the text the filter leaves
    assert counters(fast) == counters(reference)
    reasons = {verdict for verdict, _ in expected.values()}
    assert True in reasons and len(reasons) >= 3, f"the texts exercise the filter: {reasons}"


def test_repetition_checks_n_grams_when_lines_do_not_repeat(texts):
    """Most repetitive variants fail on their lines; these reach the n-gram rules."""
    step = GopherRepetitionFilter(language=WORDS)
    reasons = {verdict for verdict, _ in verdicts(step, texts).values()}
    assert {"duplicated_5_n_grams", "dup_line_frac"} <= reasons


@pytest.mark.parametrize("vocabulary", [2, 3, 5, 40])
def test_n_gram_counts_equal_datatrove_on_random_word_sequences(vocabulary):
    """Small vocabularies repeat n-grams in every overlapping way: the duplicate scan's jumps
    and what it remembers are exercised far beyond what prose does. (Words of different lengths,
    each in <>: no two word sequences join into the same string, see the next test.)"""
    rng = random.Random(vocabulary)
    for _ in range(300):
        words = [f"<{'w' * (i % 3)}{i}>" for i in (rng.randrange(vocabulary) for _ in range(rng.randint(0, 60)))]
        repeats = quality.RepeatedNGrams(words)
        for n in range(2, 11):  # growing n, as the filter asks
            if len(words) >= n:
                assert repeats.top_chars(n) == find_top_duplicate(get_n_grams(words, n)), (words, n)
            assert repeats.repeated_chars(n) == find_all_duplicate(words, n), (words, n)


def test_duplicated_n_grams_are_compared_word_by_word():
    """The one difference, documented in FastGopherRepetitionFilter: datatrove joins duplicated
    n-grams without spaces, so ("ab", "c") and ("a", "bc") are one n-gram there."""
    words = ["ab", "c", "x", "a", "bc", "y"]
    assert find_all_duplicate(words, 2) == 3
    assert quality.RepeatedNGrams(words).repeated_chars(2) == 0
    assert quality.RepeatedNGrams(["ab", "c", "x", "ab", "c", "y"]).repeated_chars(2) == 3


def test_a_hash_collision_falls_back_to_datatrove(texts, monkeypatch):
    monkeypatch.setattr(quality.NGramHashes, "same", lambda self, n, positions, others: False)
    fast, reference = quality.FastGopherRepetitionFilter(language=WORDS), GopherRepetitionFilter(language=WORDS)
    assert verdicts(fast, texts) == verdicts(reference, texts)


def test_words_with_spaces_are_left_to_datatrove():
    class SpacedWords(WordTokenizer):  # keeps "New York" whole: joined by spaces, n-grams would blur
        def word_tokenize(self, text):
            return ["New York", "is", "big"] * 30 + ["New", "York is", "big"]

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    with pytest.raises(quality._Collision):
        quality.RepeatedNGrams(SpacedWords().word_tokenize(""))
    text = "New York is big. " * 31
    for ours, theirs in ((quality.FastGopherRepetitionFilter, GopherRepetitionFilter),
                         (quality.FastGopherQualityFilter, GopherQualityFilter)):
        fast, reference = ours(language=SpacedWords()), theirs(language=SpacedWords())
        assert fast.filter(Document(text=text, id="x")) == reference.filter(Document(text=text, id="x"))


def test_language_scores_are_py3langid_scores(texts):
    reference = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    fast = quality.FastLanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    assert fast._depth == 6  # the bundled model's deepest n-gram state
    samples = list(texts.values()) + [
        "", "a", "Hello", "Hello world", "Das ist ein kurzer Satz.", "日本語のテキストです。", "ÉCRIT EN MAJUSCULES",
        "x" * 11, b"bytes in UTF-8 \xc3\xa9t\xc3\xa9", "\ud800 lone surrogate",
    ]
    for sample in samples:
        assert fast.rank(sample) == reference.rank(sample)  # every label, every score, to the bit
        assert fast.classify(sample) == reference.classify(sample)
    languages = {reference.classify(sample)[0] for sample in samples}
    assert len(languages) >= (5 if AEB.is_dir() else 3), languages
