"""The steps of the clean chain: each step's settings (a pydantic model, also the Prefect UI's
form) and the datatrove block it builds (`settings.build(words)`).

    url_filter → extraction → language → gopher_repetition → gopher_quality → c4_quality
    → fineweb_quality → pii

The blocks are datatrove's own where they serve as they are (FineWeb), pipelines/quality.py's
faster subclasses (Gopher, C4, py3langid), or the small subclasses here: the URL filter made
offline, the PII formatter made independent of what the process cleaned before, and the
extraction step around pipelines/extract.py with a per-page CPU time limit.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections import deque, namedtuple
from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated, Any

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters import FineWebQualityFilter, URLFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.utils.word_tokenizers import WordTokenizer
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipelines.extract import ExtractConfig, KilnExtractor, extract
from pipelines.quality import (
    FastC4QualityFilter,
    FastGopherQualityFilter,
    FastGopherRepetitionFilter,
    FastLanguageIdentifier,
)
from storage import ConfigError

log = logging.getLogger("kiln")

NEEDS_EXTRACTION = "needs_extraction"  # metadata of a document whose text is still its page's HTML
REASON = "filter_reason"  # the metadata key datatrove's filters give a rejected document's reason


# ------------------------------------------------------------------ settings

Fraction = Annotated[float, Field(ge=0, le=1)]
Count = Annotated[int, Field(ge=0)]
NGramLimit = tuple[Annotated[int, Field(ge=1)], Fraction]  # (n, the largest share of text its n-grams may take)


class FilterConfig(BaseModel):
    """A step that can be switched off; its other fields are the datatrove block's arguments."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    enabled: bool = True

    def settings(self) -> dict[str, Any]:
        """The block's constructor arguments: every field but `enabled`."""
        return self.model_dump(exclude={"enabled"})

    def build(self, words: WordTokenizer) -> PipelineStep:
        raise NotImplementedError


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

    def build(self, words: WordTokenizer) -> PipelineStep:
        return OfflineURLFilter(**self.settings())



class ExtractionConfig(ExtractConfig):
    """Main-content extraction with pipelines/extract.py's settings, and how it is run."""

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

    def build(self, words: WordTokenizer) -> PipelineStep:
        return ExtractionStep(self)


class LanguageFilterConfig(FilterConfig):
    """Language identification with py3langid's bundled model (offline)."""

    languages: list[str] = Field(
        default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps all, only labelling them."
    )
    # datatrove's LanguageFilter default. py3langid's probabilities are calibrated (see
    # LanguageIdFilter), so this threshold means what it means for fastText there.
    min_score: float = Field(0.65, ge=0, le=1, description="Keep a document when a kept language scores above this.")

    def build(self, words: WordTokenizer) -> PipelineStep:
        return LanguageIdFilter(self.languages, self.min_score)



class GopherRepetitionConfig(FilterConfig):
    """Gopher's repetition rules (Rae et al. 2021, table A1); datatrove's defaults."""

    dup_line_frac: Fraction | None = 0.3
    dup_para_frac: Fraction | None = 0.3
    dup_line_char_frac: Fraction | None = 0.2
    dup_para_char_frac: Fraction | None = 0.2
    top_n_grams: list[NGramLimit] = Field(default_factory=lambda: [(2, 0.2), (3, 0.18), (4, 0.16)])
    dup_n_grams: list[NGramLimit] = Field(
        default_factory=lambda: [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)]
    )

    def build(self, words: WordTokenizer) -> PipelineStep:
        settings = self.settings()
        settings["top_n_grams"] = tuple(map(tuple, self.top_n_grams))
        settings["dup_n_grams"] = tuple(map(tuple, self.dup_n_grams))
        return FastGopherRepetitionFilter(**settings, language=words)



class GopherQualityConfig(FilterConfig):
    """Gopher's quality rules; datatrove's defaults but one. `None` switches a rule off."""

    min_doc_words: Count | None = 50
    max_doc_words: Count | None = 100_000
    min_avg_word_length: Count | None = 3
    max_avg_word_length: Count | None = 10
    max_symbol_word_ratio: Fraction | None = 0.1
    max_bullet_lines_ratio: Fraction | None = 0.9
    max_ellipsis_lines_ratio: Fraction | None = 0.3
    # The least fraction of words with a letter (datatrove's name is misleading). datatrove
    # counts punctuation tokens as words, so at its default 0.8, 16 of the 161 English
    # human-written article bodies of the scrapinghub benchmark fail (median 0.856); at 0.7,
    # two do, both tables of sports scores. Gopher meant words, not punctuation.
    max_non_alpha_words_ratio: Fraction | None = 0.7
    min_stop_words: Count | None = 2
    stop_words: list[str] = Field(
        default_factory=lambda: ["the", "be", "to", "of", "and", "that", "have", "with"],
        description="English; set them for another language.",
    )

    def build(self, words: WordTokenizer) -> PipelineStep:
        return FastGopherQualityFilter(**self.settings(), language=words)



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
    min_num_sentences: int = Field(5, ge=-1, description="-1 switches the rule off.")
    min_words_per_line: int = Field(3, ge=-1, description="-1 switches the rule off.")
    max_word_length: int = Field(1000, ge=-1, description="-1 switches the rule off.")
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True

    def build(self, words: WordTokenizer) -> PipelineStep:
        return FastC4QualityFilter(**self.settings(), language=words)



class FineWebQualityConfig(FilterConfig):
    """FineWeb's own rules (Penedo et al. 2024); datatrove's defaults."""

    line_punct_thr: Fraction = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: Fraction = 0.67
    short_line_length: Count = 30
    char_duplicates_ratio: Fraction = 0.01
    new_line_ratio: Fraction = 0.3

    def build(self, words: WordTokenizer) -> PipelineStep:
        return FineWebQualityFilter(**self.settings(), language=words)



class PIIConfig(FilterConfig):
    """Replace e-mail and IP addresses with datatrove's placeholder ones."""

    remove_emails: bool = True
    remove_ips: bool = True
    only_remove_public_ips: bool = True

    def build(self, words: WordTokenizer) -> PipelineStep:
        return CountingPIIFormatter(**self.settings())


# ------------------------------------------------------------------ blocks


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


class OfflineURLFilter(URLFilter):
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


class CountingPIIFormatter(PIIFormatter):
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


class ExtractionStep(PipelineStep):
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

    def __init__(self, config: ExtractionConfig):
        super().__init__()
        self.config, self.timeout, self.isolate = config, config.timeout_s, config.isolate
        self.extractor = KilnExtractor(config, timeout=config.timeout_s)
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
