"""The clean stage: the main text of every ingested page, filtered with datatrove's blocks.

Each input shard runs through one chain of datatrove steps, every step's `run()` generator
feeding the next exactly as in a datatrove pipeline, and becomes one output shard:

    url_filter → extraction → language → gopher_repetition → gopher_quality → c4_quality
    → fineweb_quality → pii

The URL filter goes first because it reads the URL alone: a blocklisted page costs no
extraction. The Gopher, C4 and FineWeb filters count words and sentences with spaCy's English
tokenizer rules restated as one regular expression (`FastEnglishWords`, 20 times as fast as
spaCy; `tokenizer="spacy"` runs spaCy itself). The Gopher and C4 filters and py3langid's
language identifier are pipelines/quality.py's subclasses of them, which decide the same in a
fraction of the time. Filters count what they drop by reason
(datatrove's `dropped_<reason>`); those counts, summed over shards, are the manifest's stats.
Shards are cleaned in parallel worker processes; each output shard depends on its input shard
alone, so the artifact is the same for any number of workers, and a killed run resumes from
the shards it finished.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import signal
import threading
import time
import unicodedata
from abc import abstractmethod
from collections import deque, namedtuple
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import FineWebQualityFilter, URLFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.utils.stats import Stats
from datatrove.utils.typeshelper import Languages
from datatrove.utils.word_tokenizers import WordTokenizer, load_word_tokenizer, strip_strings
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.common import (
    ConfigError,
    InputError,
    Progress,
    Stage,
    StageConfig,
    default_workers,
    document_shards,
    merge_counts,
    parallel_map,
    read_shard,
    shard_name,
)
from pipelines.extract import DEFAULT_CONFIG as EXTRACT_DEFAULTS
from pipelines.extract import ExtractConfig, KilnExtractor, extract
from pipelines.quality import (
    FastC4QualityFilter,
    FastGopherQualityFilter,
    FastGopherRepetitionFilter,
    FastLanguageIdentifier,
)
from storage import ArtifactStore, ArtifactWriter, Manifest

__all__ = ["STAGE", "CleanConfig", "LanguageIdFilter", "build_clean", "clean_steps", "extract"]

log = logging.getLogger("kiln")

STATS_KEY = b"kiln.clean.stats"  # a shard's counts, kept in its Parquet metadata for resumed runs
NEEDS_EXTRACTION = "needs_extraction"
REASON = "filter_reason"  # the metadata key datatrove's filters give a rejected document's reason


# ------------------------------------------------------------------ config


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True


class UrlFilterConfig(FilterConfig):
    """datatrove's URLFilter. Its blocklists ship inside datatrove (UT1 domains and URLs, banned
    words); the public-suffix list is tldextract's bundled snapshot, never fetched."""

    use_integrated_lists: bool = Field(True, description="Use the blocklists that ship with datatrove.")
    extra_domains: list[str] = Field(
        default_factory=list, description="More domains to block; a registered domain blocks its subdomains."
    )
    extra_urls: list[str] = Field(default_factory=list, description="Exact URLs to block.")
    banned_words: list[str] = Field(default_factory=list, description="Block a URL containing any of these words.")
    banned_subwords: list[str] = Field(default_factory=list, description="Block a URL containing any of these strings.")
    soft_banned_words: list[str] = Field(default_factory=list, description="Words blocked in numbers.")
    soft_word_threshold: int = Field(2, ge=1, description="How many soft-banned words block a URL.")

    @field_validator("extra_domains", "extra_urls", "banned_words", "banned_subwords", "soft_banned_words")
    @classmethod
    def _no_blanks(cls, values: list[str]) -> list[str]:
        values = [v.strip() for v in values]
        if any(not v or v.startswith("#") for v in values):
            raise ValueError("entries must be non-empty and must not start with '#'")
        return values

    @field_validator("extra_domains")
    @classmethod
    def _lower_domains(cls, values: list[str]) -> list[str]:
        return [v.lower() for v in values]


class ExtractionConfig(BaseModel):
    """Main-content extraction with pipelines.extract (its ExtractConfig, same defaults)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["trafilatura", "resiliparse"] = EXTRACT_DEFAULTS.backend
    focus: Literal["recall", "balanced", "precision"] = EXTRACT_DEFAULTS.focus
    fast: bool = EXTRACT_DEFAULTS.fast
    include_tables: bool = EXTRACT_DEFAULTS.include_tables
    strip_headline: bool = EXTRACT_DEFAULTS.strip_headline
    merge_split_bodies: bool = EXTRACT_DEFAULTS.merge_split_bodies
    # Not datatrove's 1 s: real 1.2 and 1.7 MB pages of the shared test crawls (a forum
    # thread, a radio log) take 0.8 and 1.2 s, so at 1 s they fall on either side of the
    # limit from run to run. Text-heavy pages cost about 0.7 s per MB and ingest keeps pages
    # up to 5 MB; the limit is there for the pages that never finish.
    timeout_s: float = Field(
        10.0, gt=0, description="Per-page limit in CPU seconds (wall seconds with isolate); a slower page is dropped."
    )
    isolate: bool = Field(
        False, description="Extract in datatrove's sandbox process: a hard limit, a fifth slower extraction."
    )


class LanguageFilterConfig(FilterConfig):
    """Language identification with py3langid's bundled model (offline)."""

    languages: list[str] = Field(
        default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps all, only labelling them."
    )
    # datatrove's LanguageFilter default. py3langid's probabilities are calibrated (see
    # LanguageIdFilter), so this threshold means what it means for fastText there.
    min_score: float = Field(0.65, ge=0, le=1, description="Keep a document when a kept language scores above this.")


class GopherRepetitionConfig(FilterConfig):
    """Gopher's repetition rules (Rae et al. 2021, table A1); datatrove's defaults."""

    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2
    top_n_grams: list[tuple[int, float]] = Field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[tuple[int, float]] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    )


class GopherQualityConfig(FilterConfig):
    """Gopher's quality rules; datatrove's defaults but one. `None` switches a rule off."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    # The least fraction of words with a letter (datatrove's name is misleading). datatrove
    # counts punctuation tokens as words, so at its default 0.8, 16 of the 161 English
    # human-written article bodies of the scrapinghub benchmark fail (median 0.856); at 0.7,
    # two do, both tables of sports scores. Gopher meant words, not punctuation.
    max_non_alpha_words_ratio: float | None = 0.7
    min_stop_words: int | None = 2
    stop_words: list[str] = Field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"],
        description="English; set them for another language.",
    )


class C4QualityConfig(FilterConfig):
    """C4's line and page rules (Raffel et al. 2020); note that it rewrites the text it keeps,
    dropping lines with fewer than `min_words_per_line` words and citation marks."""

    split_paragraph: bool = True
    remove_citations: bool = True
    # datatrove's default is True, which deletes every line not ending in punctuation. On the
    # English ground-truth article bodies of the scrapinghub benchmark that removes 17% of the
    # text (headings, list items, captions) and rejects 6 of 161 articles instead of 3.
    # FineWeb's recipe sets it off too and judges punctuation per document (FineWebQuality's
    # line_punct_thr) instead.
    filter_no_terminal_punct: bool = False
    min_num_sentences: int = Field(5, description="-1 switches the rule off.")
    min_words_per_line: int = Field(3, description="-1 switches the rule off.")
    max_word_length: int = Field(1000, description="-1 switches the rule off.")
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebQualityConfig(FilterConfig):
    """FineWeb's own rules (Penedo et al. 2024); datatrove's defaults."""

    line_punct_thr: float = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class PIIConfig(FilterConfig):
    """Replace e-mail and IP addresses with datatrove's placeholder ones."""

    remove_emails: bool = True
    remove_ips: bool = True
    only_remove_public_ips: bool = True


class CleanConfig(StageConfig):
    workers: int = Field(default_factory=default_workers, ge=1, description="Worker processes (runtime only).")
    write_rejected: bool = Field(
        False, description="Also write rejected documents to rejected/<filter>/NNNNN.parquet, with the reason."
    )
    tokenizer: Literal["fast", "spacy"] = Field(
        "fast", description="Words and sentences for the Gopher, C4 and FineWeb filters: spaCy's English "
        "tokenizer (spacy) or the same rules as one regular expression, 20 times as fast (fast)."
    )
    url_filter: UrlFilterConfig = Field(default_factory=UrlFilterConfig)
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    language: LanguageFilterConfig = Field(default_factory=LanguageFilterConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4_quality: C4QualityConfig = Field(default_factory=C4QualityConfig)
    fineweb_quality: FineWebQualityConfig = Field(default_factory=FineWebQualityConfig)
    pii: PIIConfig = Field(default_factory=PIIConfig)


# The chain, in order; each name is a CleanConfig field and a key of the stats.
STEP_ORDER = (
    "url_filter", "extraction", "language", "gopher_repetition", "gopher_quality", "c4_quality",
    "fineweb_quality", "pii",
)


# ------------------------------------------------------------------ steps


@lru_cache(maxsize=1)
def _language_identifier():
    from py3langid.langid import MODEL_FILE

    return FastLanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


class LanguageIdFilter(BaseFilter):
    """Keep documents whose language is one of `languages` with a score above `min_score`.

    py3langid's model ships inside the package, so this runs offline. Its `norm_probs=True`
    softmax divides the naive-Bayes log-scores by sqrt(bytes) first: a plain softmax of them
    gives 0.999+ to every one of the 181 benchmark pages (and 0.66 to "Hello world"), the
    calibrated one ranges down to 0.6 on a table of sports scores. As in datatrove's
    LanguageFilter, the metadata gets the top language and its score, and a document is kept
    when any kept language scores above the threshold.
    """

    name = "🌐 py3langid"

    def __init__(self, languages: list[str], min_score: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        unknown = set(languages) - set(_language_identifier().labels)
        if unknown:
            raise ConfigError(f"language.languages: py3langid does not know {', '.join(sorted(unknown))}")
        self.languages = frozenset(languages)
        self.min_score = min_score

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        ranked = _language_identifier().rank(doc.text)
        language, score = ranked[0]
        doc.metadata["language"], doc.metadata["language_score"] = language, score
        self.stat_update(f"language_{language}")
        if not self.languages:
            return True
        if any(p > self.min_score for lang, p in ranked if lang in self.languages):
            return True
        return False, "low_score" if language in self.languages else "other_language"


# ------------------------------------------------------------------ English words

# The Gopher, C4 and FineWeb filters count words and sentences with a WordTokenizer. datatrove's
# English one is spaCy's tokenizer: 7-8 ms for a 900-token article, because inside the memory
# zone that keeps its string store from growing it creates every lexeme of every document anew
# (2.8 ms once they all exist), and C4 asks it for the sentences of every line: over 80% of
# the filters' time. `FastEnglishWords` gives the same tokens from one compiled regular
# expression that restates spaCy's English rules, in 0.4 ms; `CleanConfig.tokenizer` picks it
# ("fast") or spaCy ("spacy"). On the benchmark articles and Python's documentation 99.99% of
# spaCy's tokens come out the same and the filters decide the same (test_clean.py measures both).


class _RememberingWords(WordTokenizer):
    """A WordTokenizer that remembers the words and sentences of the last few texts: both Gopher
    filters and FineWeb ask for the words of a document in turn. datatrove's own cache of the
    last five calls, of any kind, does not last that long: C4 in between asks for the
    sentences of every line."""

    KEEP = 4

    def __init__(self):
        super().__init__("en")
        self._words: dict[str, list[str]] = {}
        self._spans: dict[str, list[tuple[int, int]]] = {}

    def word_tokenize(self, text: str) -> list[str]:
        return _remember(self._words, text, self._word_tokenize, self.KEEP)

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return _remember(self._spans, text, self._span_tokenize, self.KEEP)

    def sent_tokenize(self, text: str) -> list[str]:
        return strip_strings([text[start:end] for start, end in self.span_tokenize(text)])

    @abstractmethod
    def _word_tokenize(self, text: str) -> list[str]: ...

    @abstractmethod
    def _span_tokenize(self, text: str) -> list[tuple[int, int]]: ...


def _remember(cache: dict, text: str, compute, keep: int):
    found = cache.get(text)
    if found is None:
        if len(cache) >= keep:
            del cache[next(iter(cache))]  # the oldest: dicts keep insertion order
        found = cache[text] = compute(text)
    return found


class SpacyEnglishWords(_RememberingWords):
    """datatrove's English tokenizer (a blank spaCy pipeline, loaded once per process), minus
    the sentencizer that its word_tokenize runs for nothing (the same tokens in 60% of the
    time). Sentences come from datatrove's own."""

    @property
    def _datatrove(self) -> WordTokenizer:
        return load_word_tokenizer(Languages.english)

    def _word_tokenize(self, text: str) -> list[str]:
        nlp = self._datatrove.tokenizer
        try:
            with nlp.memory_zone():  # keeps spaCy's string store from growing with every page
                return strip_strings([token.text for token in nlp.tokenizer(text)])
        except Exception:
            return self._datatrove.word_tokenize(text)  # it knows spaCy's failure cases

    def _span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return self._datatrove.span_tokenize(text)


def _char_class(predicate, *ranges: tuple[int, int]) -> str:
    """The characters of the code point `ranges` that satisfy `predicate`, as the inside of a
    regex [...] class, consecutive ones as a range."""
    runs: list[list[str]] = []
    for char in (chr(c) for start, stop in ranges for c in range(start, stop)):
        if not predicate(char):
            continue
        if runs and ord(char) == ord(runs[-1][1]) + 1:
            runs[-1][1] = char
        else:
            runs.append([char, char])
    return "".join(re.escape(a) if a == b else f"{re.escape(a)}-{re.escape(b)}" for a, b in runs)


def _alternation(words: list[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first


# spaCy's English character classes and special cases (spacy/lang/char_classes.py,
# punctuation.py, tokenizer_exceptions.py, en/), as far as they concern English text.
_UPPER = _char_class(str.isupper, (0x41, 0x530), (0x1E00, 0x1F00))  # capitals: Latin, Greek, Cyrillic
_ICONS = _char_class(lambda c: unicodedata.category(c) == "So", (0xA0, 0x1FC00))  # ©, °, ™, emoji: always split
_LETTER = r"[^\W\d_]"
_QUOTES = "'\"”“`‘´’‚,„»«「」『』（）〔〕【】《》〈〉⟦⟧"
_PUNCT = "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪"
_CURRENCY = "$£€¥฿₽﷼₴₠₡₢₣₤₥₦₧₨₩₪₫₭₮₯₰₱₲₳₵₶₷₸₹₺₻₼₾₿"
_UNITS = (
    "km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh "
    "mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K %"
).split()
# Words that keep their period. The others lose it after a small letter: "etc." is two tokens.
_ABBREVIATIONS = (
    "Adm Ak Ala Apr Ariz Ark Aug Bros Calif Co Colo Conn Corp Dec Del Dr Feb Fla Ga Gen Gov Ia Id Ill Inc "
    "Ind Jan Jr Jul Jun Kan Kans Ky La Ltd Mar Mass Md Messrs Mich Minn Miss Mo Mont Mr Mrs Ms Mt Neb Nebr "
    "Nev Nov Oct Okla Ore Pa Prof Rep Rev Sen Sep Sept St Tenn Va Wash Wis co vs a.m p.m e.g i.e E.g I.e "
    "E.G I.E v.s Ph.D D.C N.C N.D N.H N.J N.M N.Y S.C"
).split()
# Special cases made of characters that the rules would split.
_EMOTICONS = (
    ":) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) (; (-; :( "
    ":-( :(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ :1 :P :-P :p :-p :O "
    ":-O :o :-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D ;D ;-D =D 8D 8-D <3 <33 <333 </3 "
    "'' ’’ and/or w/o C++"
).split()
# spaCy's Sentencizer.default_punct_chars: a token that is one of these ends a sentence.
_TERMINALS = (
    "!.?։؟۔܀܁܂߹।॥၊။።፧፨᙮᜵᜶᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗！．？𐩖𐩗𑁇𑁈𑂾𑂿"
    "𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑩂𑩃𑪛𑪜𑱁𑱂𖩮𖩯𖫵𖬷𖬸𖭄𛲟𝪈｡。"
)


def _english_token_regex() -> re.Pattern:
    """One spaCy token per match of `findall`.

    spaCy cuts a text at spaces into chunks; off each chunk it splits prefixes (opening
    punctuation) and suffixes (closing punctuation, a period, 's), then cuts the rest at
    infixes (hyphens between letters, ...). A special case (Mr., :), don't) overrides the
    rules. Here each alternative is one kind of token, tried in order at a token's first
    character; the lookarounds say where in its chunk it stands."""
    prefix_chars = re.escape("§%=—–" + _PUNCT + _QUOTES + _CURRENCY) + _ICONS
    suffix_chars = re.escape(_PUNCT + _QUOTES + "—–") + _ICONS
    # A final period is split off after a small letter, a digit, punctuation or two capitals,
    # not after a lone capital (J., U.S.). ("|" is spaCy's too: its class holds a joined list.)
    after_period = re.escape("%²-+|" + _PUNCT + _QUOTES)
    period = rf"(?:(?<=[{_UPPER}][{_UPPER}])|(?<=°[FfCcKk])|(?<![{_UPPER}]))(?<=[^\W_]|[{after_period}])\."
    suffix = rf"(?:[{suffix_chars}]|\.\.+|{period}|['’][sS])"
    # Only suffixes follow, to the end of the chunk. Lookaheads stop after 20 of them: each
    # token start looks ahead, and unbounded that is quadratic in a chunk like "!!!...!" or
    # ".,.,.,", which would then take seconds; a run of 20 closing marks is no sentence's end.
    end = rf"(?={suffix}{{0,20}}(?:\s|$))"
    start = rf"(?<![^\s{prefix_chars}])"  # only prefixes precede it in its chunk
    unit = rf"(?:{_alternation(_UNITS)}|[{re.escape(_CURRENCY)}]|\+)"  # off a number: 5 km, 10 %, 5 $
    infix = "|".join((
        r"(?<=\d)[+\-*^](?=[\d-])",  # 1-2, 3*4
        rf"(?<=[^\W\d_{_UPPER}]|[{re.escape(_QUOTES)}])\.(?=[{_UPPER}{re.escape(_QUOTES)}])",  # end.Next
        rf"(?<={_LETTER}),(?={_LETTER})",
        rf"(?<=[^\W_])(?:---|--|——|[-–—~])(?={_LETTER})",  # well-known, 19-year-old; not COVID-19
        rf"(?<=[^\W_])[:<>=/](?={_LETTER})",
        rf"[{_ICONS}]",
    ))
    # 's and n't everywhere; 'm, 've, 'll, 'd, 're where spaCy lists the words (I, you, who, could...).
    clitic = rf"['’](?:[sSd]|re|ll)(?=[^\w'’]|$)|(?<={_LETTER})['’](?:m|ve)(?=[^\w'’]|$)"
    negation = r"n['’]t(?=[^\w'’]|$)"
    split = rf"\.\.|…|{infix}|{suffix}{{1,20}}(?:\s|$)|{clitic}|(?<=\d){unit}{end}"
    closing = r"[,;:!?)\]\"”]{0,20}(?:\s|$)"
    return re.compile(
        r"(?=\S)(?:"  # at a space fail at once: findall tries every alternative at every position
        # Fast paths, nine tokens in ten: a word or number, and punctuation that is always
        # a token of its own.
        rf"{_LETTER}+(?={closing})|[a-z]{{3,}}(?=\.{closing})|(?!8\))\d+(?=\.?{closing})"
        rf"|[,;:!?\"“”‘’«»„*_#&$£€¥§%{{}}|'-](?=\s)|{start}[,!?\"“”‘«»„*_#&$£€¥§%{{}}]|\.(?=\s|$)"
        rf"|[)\]](?![-:=])(?=\.?{closing})|{start}\((?![-:;=o^*.>¬ಠ_╯])"
        # URLs and e-mail addresses, whole
        rf"|{start}(?:[\w+.-]{{2,}}://)?(?:[\w.+-]+@)?(?:[\w-]+\.)+[a-z]{{2,63}}(?::\d{{2,5}})?(?:[/?#]\S*?)?{end}"
        rf"|(?:{_alternation(_ABBREVIATIONS)}|[a-zäöü])\.(?={end}|[{_UPPER}])"
        rf"|(?=[^\w\s]|[8a-zC])(?:{_alternation(_EMOTICONS)}){end}"
        rf"|(?<![\w.])(?:1[0-2]|[1-9])(?=(?:[ap]m|[ap]\.m\.){end})"  # 10 am
        rf"|\.\.+|…"
        rf"|(?<=\d){unit}{end}"
        rf"|{negation}|{clitic}|['’](?:[Cc]ause|[Cc]o[sz]|[Cc]uz|bout|em|nuff){end}|y['’](?=all{end})"
        rf"|{start}(?:\+(?!\d)|[{prefix_chars}])"
        rf"|{infix}"
        # the rest of a chunk, up to the next split
        rf"|(?:(?!(?<=\d){unit}{end})[^\W\d_n]+|\d+|n(?!{negation[1:]})|(?!{split})[^\s\w]|(?!{split})_)+"
        r"|\S)"
    )


def _split_words() -> dict[str, list[str]]:
    """spaCy's special cases for contractions written without their apostrophe (dont, cannot,
    im, id, wed): the words it splits in two although no rule would."""
    clitics = {
        "i": "m ll d ve", "you": "ll d ve re", "he": "ll d s", "she": "ll d s", "it": "ll d s",
        "we": "ll d ve re", "they": "ll d ve re", "that": "s ll d", "this": "s ll d", "these": "ll d re ve",
        "those": "ll d re ve", "could": "ve", "might": "ve", "must": "ve", "should": "ve", "would": "ve",
    } | dict.fromkeys(("who", "what", "when", "where", "why", "how", "there"), "s ll d re ve")
    negated = "ca could do does did had may might must need ought sha should wo would ai are is was were have has dare"
    pairs = [(word, c) for word, cs in clitics.items() for c in cs.split()] + [(w, "nt") for w in negated.split()]
    pairs += [("can", "not"), ("gon", "na"), ("got", "ta"), ("y", "all")]
    real_words = {"ill", "its", "hell", "shell", "shed", "were", "well", "whore"}
    return {
        w + second: [w, second]
        for first, second in pairs for w in (first, first.title())
        if (first + second) not in real_words
    }


class FastEnglishWords(_RememberingWords):
    """spaCy's English tokens and sentences (datatrove's English tokenizer) from one regular
    expression, 20 times as fast. It leaves out spaCy's rarer special cases (a name with 'll or
    'd stays whole there, a few emoticons) and splits sentences where spaCy's sentencizer does:
    before the first token after a standalone ".", "!" or "?" (or its Unicode kin) that is not
    punctuation itself, so closing quotes and brackets stay behind, whatever the case of the
    next word ("It costs $5. and more" is two sentences); an abbreviation and "U.S." keep their
    period and end nothing."""

    TOKEN = _english_token_regex()
    SPLIT = _split_words()
    FIRST_TERMINAL = re.compile(rf"(?<!\S)\S*?[{re.escape(_TERMINALS)}]")  # the chunk it is in
    TERMINALS = frozenset(_TERMINALS)

    def _word_tokenize(self, text: str) -> list[str]:
        tokens = self.TOKEN.findall(text)
        if not self.SPLIT.keys().isdisjoint(tokens):
            tokens = [part for token in tokens for part in self.SPLIT.get(token, (token,))]
        return tokens

    def _span_tokenize(self, text: str) -> list[tuple[int, int]]:
        if not text:
            return []
        spans, start = [], 0
        for end, next_start in self._sentence_breaks(text):
            spans.append((start, end))
            start = next_start
        return spans + [(start, len(text))]

    def _sentence_breaks(self, text: str) -> Iterator[tuple[int, int]]:
        """(end of a sentence, start of the next), as spaCy's Sentencizer would put them."""
        first = self.FIRST_TERMINAL.search(text)
        if first is None:
            return
        after_terminal, end = False, first.start()
        for match in self.TOKEN.finditer(text, first.start()):  # the tokens up to it cannot matter
            token = match.group()
            if after_terminal:
                if _space_token(text, end, match.start()):
                    yield end, end + (text[end] == " ")
                    after_terminal = False
                elif not _is_punct(token):
                    yield end, match.start()
                    after_terminal = False
            if token in self.TERMINALS:
                after_terminal = True
            end = match.end()
        if after_terminal and _space_token(text, end, len(text)):
            yield end, end + (text[end] == " ")


def _space_token(text: str, start: int, stop: int) -> bool:
    # spaCy keeps one space after a token as its trailing whitespace; any other whitespace
    # between two tokens is a token of its own, not punctuation, so it starts a sentence too.
    return stop > start and text[start:stop] != " "


@lru_cache(maxsize=4096)
def _is_punct(token: str) -> bool:
    return all(unicodedata.category(char).startswith("P") for char in token)  # spaCy's is_punct


# One instance of each: the filters of a chain share it, and so its memory of the last texts.
ENGLISH_WORDS: dict[str, _RememberingWords] = {"fast": FastEnglishWords(), "spacy": SpacyEnglishWords()}


class _OfflineURLFilter(URLFilter):
    """datatrove's URLFilter with tldextract's bundled public-suffix snapshot: the default
    TLDExtract fetches the list from the internet first, which stalls offline and makes the
    result depend on the day's list."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.tldextractor = _SuffixSnapshot()

    def filter(self, document: Document) -> bool | tuple[bool, str]:
        if not document.metadata.get("url"):
            return True  # nothing to judge (datatrove would assert)
        return super().filter(document)


_UrlParts = namedtuple("_UrlParts", "registered_domain fqdn")


class _SuffixSnapshot:
    """The two parts URLFilter reads, without tldextract's deprecation warning on every URL."""

    def __init__(self):
        from tldextract import TLDExtract

        self._extract = TLDExtract(cache_dir=None, suffix_list_urls=())

    def __call__(self, url: str) -> _UrlParts:
        parts = self._extract(url)
        return _UrlParts(parts.top_domain_under_public_suffix, parts.fqdn)


class _CountingPIIFormatter(PIIFormatter):
    def format(self, text: str) -> str:
        # datatrove cycles through its placeholder addresses across every document the block
        # sees, so a document's text would depend on what the process cleaned before it (and
        # on the number of workers): start each document at the first placeholder.
        self.emails_replacer._replace_i = self.ip_replacer._replace_i = 0
        scrubbed = super().format(text)
        if scrubbed != text:
            self.stat_update("documents_scrubbed")
        return scrubbed


class _Timeout(BaseException):
    """Not an Exception, so that no `except Exception` inside the extractor swallows it."""


def _raise_timeout(signum, frame):
    raise _Timeout


class _Extraction(PipelineStep):
    """Main-content extraction of the HTML documents; plain-text ones (WET records) pass as
    they are. Yields every document in input order; a failed one leaves with its reason
    (empty, timeout, error, broken_process) and goes to the rejects.

    In process (the default), `extract()` runs right here on the page string: no copy of the
    page, no pipe. The per-page limit is on CPU time (a SIGVTALRM timer), so a page times out
    on a busy machine exactly as on an idle one, and no wall-clock alarm of the caller's is
    touched. Signals need the main thread: a worker process always runs there; `workers=1`
    under a threaded orchestrator runs without the limit. Python cannot interrupt a single
    long call into C. `isolate` instead runs datatrove's BaseExtractor sandbox
    (KilnExtractor.run): each page goes over a pipe to a forked process that is killed at the
    (wall-clock) timeout; on the benchmark pages the pipe costs a fifth more extraction time,
    and every shard starts a process.
    """

    name = "extraction"
    type = "🛢 - EXTRAC"

    def __init__(self, config: ExtractConfig, timeout: float, isolate: bool):
        super().__init__()
        self.config, self.timeout, self.isolate = config, timeout, isolate
        self.extractor = KilnExtractor(config, timeout=timeout)
        self.exclusion_writer = None
        self._warned = False

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        documents = self._isolated(data, rank, world_size) if self.isolate else self._in_process(data)
        for doc in documents:
            self.stat_update("total")
            reason = doc.metadata.get(REASON)
            if reason is None and not doc.text.strip():
                reason = doc.metadata[REASON] = "empty"
            if reason is None:
                self.stat_update("forwarded")
                yield doc
                continue
            self.stat_update("dropped", f"dropped_{reason}")
            if self.exclusion_writer is not None:
                self.exclusion_writer.write(doc, rank)

    def _in_process(self, data: DocumentsPipeline) -> DocumentsPipeline:
        timed = threading.current_thread() is threading.main_thread()
        if not timed:
            _warn_untimed()
        previous = signal.signal(signal.SIGVTALRM, _raise_timeout) if timed else None
        try:
            for doc in data:
                if doc.metadata.pop(NEEDS_EXTRACTION, False):
                    with self.track_time():
                        text, failure = self._extract(doc.text, doc.metadata.get("url"), timed)
                    if text:
                        doc.text = text
                    else:  # the rejects keep the page
                        doc.metadata[REASON] = failure or "empty"
                else:
                    self.stat_update("plain_text")
                yield doc
        finally:
            if timed:
                signal.signal(signal.SIGVTALRM, previous if previous is not None else signal.SIG_DFL)

    def _extract(self, html: str, url: str | None, timed: bool) -> tuple[str | None, str | None]:
        """(text, None), or (None, why it failed)."""
        try:
            if timed:
                signal.setitimer(signal.ITIMER_VIRTUAL, self.timeout)
            try:
                return extract(html, url, self.config), None
            finally:
                if timed:
                    signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        except _Timeout:
            return None, "timeout"
        except Exception as err:  # a page that breaks the extractor is that page's problem
            if not self._warned:
                log.warning("extraction failed (%s: %s); such pages are dropped as 'error'", type(err).__name__, err)
                self._warned = True
            return None, "error"

    def _isolated(self, data: DocumentsPipeline, rank: int, world_size: int) -> DocumentsPipeline:
        """Through the extractor's own run(), which only counts what it drops: a page that it
        does not pass on gets its reason from the counter that moved."""
        _pin_sandbox_to_fork()
        failures = {"timeout": "timeout", "clean_error": "error", "broken_process": "broken_process"}
        counters = self.extractor.stats.stats
        pending: deque[Document] = deque()  # read, not yet passed on, in input order
        passed_on: Document | None = None

        def html_documents() -> Iterator[Document]:
            for doc in data:
                pending.append(doc)
                if not doc.metadata.pop(NEEDS_EXTRACTION, False):
                    self.stat_update("plain_text")
                    continue
                before = {key: counters[key].total for key in failures}
                yield doc
                # The extractor asks for the next page: this one's fate is settled.
                if passed_on is not doc:
                    moved = [reason for key, reason in failures.items() if counters[key].total > before[key]]
                    doc.metadata[REASON] = moved[0] if moved else "empty"

        for doc in self.extractor.run(html_documents(), rank, world_size):
            passed_on = doc
            while pending[0] is not doc:
                yield pending.popleft()  # plain text, or a page the extractor dropped
            yield pending.popleft()
        yield from pending


@lru_cache(maxsize=1)
def _warn_untimed() -> None:
    log.warning("clean: extraction runs without its per-page time limit (not on the main thread)")


@lru_cache(maxsize=1)
def _pin_sandbox_to_fork() -> None:
    # datatrove's ExtractorSandbox starts its process with the default start method. Under
    # forkserver (the default inside our worker processes, which forkserver made) it pickles
    # itself, with the processes it started before, and fails; it was written for fork.
    import multiprocessing

    import datatrove.pipeline.extractors.base as extractor_base

    extractor_base.Process = multiprocessing.get_context("fork").Process


def _json(model: BaseModel) -> str:
    return model.model_dump_json()


@lru_cache(maxsize=16)
def _build_step(name: str, settings: str, tokenizer: str) -> PipelineStep:
    """One step, built once per process for given settings (the URL blocklists take seconds
    and hundreds of MB to load)."""
    s = json.loads(settings)
    words = ENGLISH_WORDS[tokenizer]
    s.pop("enabled", None)
    if name == "url_filter":
        return _OfflineURLFilter(**s)
    if name == "extraction":
        timeout, isolate = s.pop("timeout_s"), s.pop("isolate")
        return _Extraction(ExtractConfig(**s), timeout, isolate)
    if name == "language":
        return LanguageIdFilter(**s)
    if name == "gopher_repetition":
        s["top_n_grams"] = tuple(map(tuple, s["top_n_grams"]))
        s["dup_n_grams"] = tuple(map(tuple, s["dup_n_grams"]))
        return FastGopherRepetitionFilter(**s, language=words)
    if name == "gopher_quality":
        return FastGopherQualityFilter(**s, language=words)
    if name == "c4_quality":
        return FastC4QualityFilter(**s, language=words)
    if name == "fineweb_quality":
        return FineWebQualityFilter(**s, language=words)
    if name == "pii":
        return _CountingPIIFormatter(**s)
    raise ValueError(name)


def clean_steps(config: CleanConfig) -> list[tuple[str, PipelineStep]]:
    """The enabled steps in chain order, with their names. Steps are shared within a process:
    `_clean_shard` resets their stats before each shard."""
    steps = []
    for name in STEP_ORDER:
        settings = getattr(config, name)
        if getattr(settings, "enabled", True):
            steps.append((name, _build_step(name, _json(settings), config.tokenizer)))
    return steps


# ------------------------------------------------------------------ one shard


class _Rejects:
    """datatrove's exclusion-writer protocol, keeping the rejected documents in memory."""

    def __init__(self):
        self.documents: list[Document] = []

    def __enter__(self) -> "_Rejects":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def write(self, document: Document, rank: int = 0, **_) -> None:
        self.documents.append(document)


@dataclass(frozen=True)
class _ShardTask:
    config: CleanConfig
    manifest: Manifest
    store_url: str
    storage_options: dict
    relpath: str
    index: int
    writer: ArtifactWriter


def _read(task: _ShardTask):
    import pyarrow as pa

    store = ArtifactStore(task.store_url, **task.storage_options)
    where = store.uri(task.manifest, task.relpath)
    try:
        table = read_shard(store, task.manifest, task.relpath)
    except (pa.ArrowException, OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{where}: not a readable Parquet shard ({reason})") from None
    names = set(table.column_names)
    missing = [c for c in ("id", "url") if c not in names] + ([] if names & {"html", "text"} else ["html or text"])
    if missing:
        raise InputError(f"{where}: not a document shard (no {', '.join(missing)} column)")
    return table


def _documents(table) -> Iterator[Document]:
    """Documents from the rows, a batch at a time (the HTML is converted to str once, here)."""
    row = 0
    for batch in table.to_batches(max_chunksize=256):
        columns = batch.schema.names
        ids, urls = batch.column("id").to_pylist(), batch.column("url").to_pylist()
        html = batch.column("html").to_pylist() if "html" in columns else [None] * len(ids)
        text = batch.column("text").to_pylist() if "text" in columns else [None] * len(ids)
        for doc_id, url, page, plain in zip(ids, urls, html, text):
            metadata = {"url": url, "row": row}
            if page:
                metadata[NEEDS_EXTRACTION] = True
            yield Document(text=page or plain or "", id=str(doc_id), metadata=metadata)
            row += 1


def _step_counts(step: PipelineStep) -> dict[str, int]:
    return {key: int(value.total) for key, value in step.stats.stats.items() if key != "doc_len"}


def _clean_shard(task: _ShardTask) -> dict[str, Any]:
    """Clean one input shard into `shard_name(index)`; returns its counts and timings."""
    table = _read(task)
    steps = clean_steps(task.config)
    rejects = {name: _Rejects() for name, step in steps if hasattr(step, "exclusion_writer")}
    if not task.config.write_rejected:
        rejects = {}
    for name, step in steps:
        step.stats = Stats(str(step))
        if isinstance(step, _Extraction):
            step.extractor.stats = Stats(str(step.extractor))
        if hasattr(step, "exclusion_writer"):
            step.exclusion_writer = rejects.get(name)

    pipeline: DocumentsPipeline = _documents(table)
    for _, step in steps:
        pipeline = step.run(pipeline, rank=task.index, world_size=1)
    kept = list(pipeline)

    for name, collected in rejects.items():
        if collected.documents:
            relpath = f"rejected/{name}/{posixpath.basename(shard_name(task.index))}"
            task.writer.write_parquet(relpath, _rejects_table(collected.documents))

    out = _output_table(table, kept)
    counts = {
        "documents_in": table.num_rows,
        "documents_out": len(kept),
        "characters_out": sum(len(doc.text) for doc in kept),
        "steps": {name: _step_counts(step) for name, step in steps},
    }
    out = out.replace_schema_metadata({STATS_KEY: json.dumps(counts, sort_keys=True).encode()})
    task.writer.write_parquet(shard_name(task.index), out)  # last: its presence marks the shard done
    return {"counts": counts, "step_seconds": {name: _step_seconds(step) for name, step in steps}}


def _step_seconds(step: PipelineStep) -> float:
    inner = step.extractor if isinstance(step, _Extraction) and step.isolate else step
    return inner.stats.time_stats.total


def _output_table(table, kept: list[Document]):
    import pyarrow as pa

    rows = pa.array([doc.metadata["row"] for doc in kept], pa.int64())
    carried = [c for c in table.column_names if c not in ("id", "url", "html", "text", "language", "language_score")]
    out = table.select(["id", "url", *carried]).take(rows)
    out = out.add_column(2, "text", pa.array([doc.text for doc in kept], pa.string()))
    out = out.append_column("language", pa.array([doc.metadata.get("language") for doc in kept], pa.string()))
    scores = [doc.metadata.get("language_score") for doc in kept]
    return out.append_column("language_score", pa.array(scores, pa.float64()))


def _rejects_table(documents: list[Document]):
    import pyarrow as pa

    def column(key, kind):
        return pa.array([doc.metadata.get(key) for doc in documents], kind)

    return pa.table({
        "id": pa.array([doc.id for doc in documents], pa.string()),
        "url": column("url", pa.string()),
        "reason": column(REASON, pa.string()),
        # what the filter saw; the page itself when extraction failed
        "text": pa.array([doc.text for doc in documents], pa.string()),
        "language": column("language", pa.string()),
        "language_score": column("language_score", pa.float64()),
    })


def _finished_counts(writer: ArtifactWriter, relpath: str) -> dict[str, Any] | None:
    """The counts of a shard an earlier, killed run finished, or None to redo it."""
    import pyarrow.parquet as pq

    if not writer.done(relpath):
        return None
    try:
        with writer.fs.open(writer.path(relpath), "rb") as handle:
            metadata = pq.read_schema(handle).metadata or {}
        return json.loads(metadata[STATS_KEY])
    except Exception:  # a damaged leftover: clean the shard again
        return None


# ------------------------------------------------------------------ the stage


def build_clean(
    config: CleanConfig, inputs: list[Manifest], store: ArtifactStore, writer: ArtifactWriter
) -> dict[str, Any]:
    if len(inputs) != 1:
        raise InputError(f"clean: takes one ingest artifact, got {len(inputs)}")
    (source,) = inputs
    shards = document_shards(source)
    if not shards:
        raise InputError(f"{store.uri(source)}: no document shards under shards/")
    clean_steps(config)  # build here first, so a bad setting fails before any worker starts

    results: list[dict[str, Any] | None] = [_finished_counts(writer, shard_name(i)) for i in range(len(shards))]
    todo = [
        _ShardTask(config, source, store.url, store.storage_options, relpath, i, writer)
        for i, relpath in enumerate(shards) if results[i] is None
    ]
    rows = [source.file(relpath).rows for relpath in shards]
    total = sum(rows) if all(r is not None for r in rows) else None

    started = time.perf_counter()
    processed, step_seconds = 0, {}
    with Progress("clean", total, unit="docs") as bar:
        bar.advance(sum(r["documents_in"] for r in results if r))
        for task, result in zip(todo, parallel_map(_clean_shard, todo, config.workers)):
            results[task.index] = result["counts"]
            processed += result["counts"]["documents_in"]
            merge_counts(step_seconds, result["step_seconds"])
            bar.advance(result["counts"]["documents_in"])
    wall = time.perf_counter() - started
    return _stats(results, processed, wall, step_seconds, resumed=len(shards) - len(todo))


def _stats(results, processed, wall, step_seconds, resumed) -> dict[str, Any]:
    steps: dict[str, dict[str, int]] = {}
    for counts in results:
        for name, part in counts["steps"].items():
            merge_counts(steps.setdefault(name, {}), part)
    rejected, by_reason = {}, {}
    for name, counts in steps.items():
        if name == "pii":
            continue
        reasons = {k[len("dropped_"):]: v for k, v in sorted(counts.items()) if k.startswith("dropped_")}
        unexplained = counts.get("dropped", 0) - sum(reasons.values())
        if unexplained:
            reasons["unspecified"] = unexplained
        rejected[name], by_reason[name] = counts.get("dropped", 0), reasons
    languages = {
        k[len("language_"):]: v for k, v in sorted(steps.get("language", {}).items(), key=lambda kv: -kv[1])
        if k.startswith("language_")
    }
    return {
        "documents_in": sum(c["documents_in"] for c in results),
        "documents_out": sum(c["documents_out"] for c in results),
        "characters_out": sum(c["characters_out"] for c in results),
        "extraction_failures": rejected.get("extraction", 0),
        "rejected": rejected,
        "rejected_by_reason": by_reason,
        "languages": languages,
        "pii_documents_scrubbed": steps.get("pii", {}).get("documents_scrubbed", 0),
        "shards": len(results),
        "shards_resumed": resumed,
        "docs_per_second": round(processed / wall, 2) if processed and wall > 0 else None,
        "step_seconds": {name: round(s, 3) for name, s in step_seconds.items()},
        "step_counters": steps,
    }


STAGE = Stage("clean", CleanConfig, build_clean, code_version="2")  # 2: pipelines/quality.py filters
