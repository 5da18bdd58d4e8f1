"""Main-content extraction: one HTML page in, its article text out (or None).

``extract(html, url)`` is the single call the cleaning stage uses. The default
backend is trafilatura, run on a tree that we parse and prepare ourselves:

1. decode bytes by BOM / UTF-8 validity / declared charset (``decode_html``);
2. parse once with lxml, with a parser that skips lxml.html's per-element
   Python class lookup (a Python call for every element proxy that our code
   or trafilatura creates);
3. drop subtrees that trafilatura deletes anyway (scripts, styles, svg, nav,
   aside, footer, ...) so its XPath passes, which evaluate EXSLT regexes in
   Python per element, walk a smaller tree;
4. drop standfirsts (the summary line under a headline) and re-join article
   bodies that the page splits into several same-class containers;
5. run trafilatura in fast mode (no readability/justext comparison) with the
   recall focus, which on the benchmark is both the best and the fastest mode;
6. drop the headline if it leads the text: an article body does not repeat it.

Everything is deterministic: no cross-document state (trafilatura's
``deduplicate`` keeps an LRU cache across calls, so it stays off) and no
randomness. ``KilnExtractor`` wraps the function as a datatrove block.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from typing import Literal

import trafilatura
from datatrove.pipeline.extractors.base import BaseExtractor
from lxml import etree, html as lxml_html
from pydantic import BaseModel, ConfigDict, Field
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.html import HTMLTree

from pipelines.charset import decode_text

__all__ = [
    "DEFAULT_CONFIG",
    "ExtractConfig",
    "KilnExtractor",
    "decode_html",
    "extract",
    "headline_candidates",
    "merge_split_bodies",
    "parse_html",
    "strip_headline",
]


class ExtractConfig(BaseModel):
    """The knobs worth turning; the defaults are the measured best on the scrapinghub
    article-extraction benchmark (see bench/extraction.py)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["trafilatura", "resiliparse"] = Field(
        "trafilatura", description="trafilatura (quality) or resiliparse (about 5x faster, clearly lower "
                                   "precision: it keeps more boilerplate; F1 0.906 vs 0.973).")
    focus: Literal["recall", "balanced", "precision"] = Field(
        "recall", description="trafilatura's precision/recall balance. recall scored best (0.973; balanced "
                              "0.972, precision 0.952) and skips trafilatura's second pass over short results.")
    fast: bool = Field(True, description="Skip trafilatura's comparison with readability/justext: a quarter "
                                         "less time, and on the benchmark that comparison costs F1 (0.969).")
    include_tables: bool = Field(True, description="Keep text inside <table>; tables often hold real content.")
    strip_headline: bool = Field(True, description="Remove the headline and the standfirst, page furniture "
                                                   "rather than article body.")
    merge_split_bodies: bool = Field(True, description="Re-join an article body split over several same-class "
                                                       "containers (ads in between), which trafilatura would "
                                                       "otherwise cut after the first piece.")


DEFAULT_CONFIG = ExtractConfig()


# --------------------------------------------------------------------------- decoding


def decode_html(data: bytes, charset: str | None = None) -> str:
    """Decode an HTML byte string with pipelines/charset.py (the decoder ingest uses), valid
    UTF-8 first: a BOM wins; then bytes that are valid UTF-8 are UTF-8 (text in any other
    non-ASCII encoding is practically never valid UTF-8, while pages mislabelled as latin-1 that
    really are UTF-8 are common); then the transport ``charset`` (e.g. from the HTTP header of a
    WARC record); then the page's <meta> charset; else a detector's guess. Labels are mapped the
    WHATWG way (latin-1 and ascii -> windows-1252, as browsers do); what decodes with nothing
    becomes U+FFFD."""
    decoded = decode_text(data, charset, prefer_utf8=True)
    return decoded[0] if decoded is not None else data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- parsing

def _make_parser(encoding: str | None = None) -> lxml_html.HTMLParser:
    parser = lxml_html.HTMLParser(
        collect_ids=False, default_doctype=False, remove_comments=True, remove_pis=True, encoding=encoding
    )
    # Every element is an HtmlElement (what trafilatura expects); the default
    # lxml.html lookup calls back into Python per element to pick subclasses
    # (InputElement, FormElement, ...) that nothing here uses.
    parser.set_element_class_lookup(etree.ElementDefaultClassLookup(element=lxml_html.HtmlElement))
    return parser


_PARSER = _make_parser()
_BYTES_PARSER = _make_parser("utf-8")
_INVALID_XML_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def parse_html(html: str) -> lxml_html.HtmlElement | None:
    """Parse a document with lxml; None when there is nothing to parse."""
    if "\x00" in html:  # libxml2 would turn each NUL into a U+FFFD of the text
        html = html.replace("\x00", "")
    try:
        return lxml_html.document_fromstring(html, parser=_PARSER)
    except ValueError:
        # A str with an <?xml encoding=...?> declaration, or with characters
        # XML forbids: clean it and hand lxml UTF-8 bytes instead.
        data = _INVALID_XML_CHARS.sub("", html).encode("utf-8", errors="replace")
        try:
            return lxml_html.document_fromstring(data, parser=_BYTES_PARSER)
        except (etree.ParserError, ValueError):
            return None
    except etree.ParserError:  # "Document is empty"
        return None


# --------------------------------------------------------------------------- tree preparation

# Subtrees trafilatura deletes during its own cleaning (or that hold no text);
# removing them before it runs only saves it the work. <form> stays: some
# sites (ASP.NET) wrap the whole page in one.
_NOISE_TAGS = (
    "style", "svg", "noscript", "template", "iframe", "object", "embed", "canvas", "video", "audio",
    "map", "select", "textarea", "link", "meta", "nav", "aside", "footer",
)  # fmt: skip
# Class tokens of the summary line set under a headline ("dek" in US
# newsrooms, "standfirst" in British ones) and of the label above it.
_STANDFIRST_CLASS = re.compile(
    r"(?:^|[\s_-])(?:sub-?head(?:line)?|subline|sub-?title|dek|deck|standfirst|strapline|kicker)(?:$|[\s_-])",
    re.IGNORECASE,
)
_STANDFIRST_MAX_CHARS = 400
# Class names that say "this is the article body".
_BODY_CLASS = re.compile(r"(?:article|story|post|entry|main|body)[-_]*(?:body|content|text)|articlebody", re.IGNORECASE)
_CONTAINER_CLASSES = etree.XPath("//div/@class | //section/@class | //article/@class")
_CONTAINERS_WITH_CLASS = etree.XPath("//*[self::div or self::section or self::article][@class = $cls]")


def _strip_noise(tree: lxml_html.HtmlElement) -> None:
    # JSON-LD stays: trafilatura reads schema.org text from it as a fallback.
    for script in tree.iter("script"):
        if script.get("type") != "application/ld+json":
            script.tag = "kiln-drop"
    etree.strip_elements(tree, "kiln-drop", *_NOISE_TAGS, with_tail=False)


def _strip_standfirsts(tree: lxml_html.HtmlElement) -> None:
    doomed = [
        el
        for el in tree.iter("h2", "h3", "h4", "h5", "h6", "p")
        if _STANDFIRST_CLASS.search(el.get("class") or "") and len(el.text_content()) < _STANDFIRST_MAX_CHARS
    ]
    for el in doomed:
        el.drop_tree()  # keeps the tail text


def _text_len(el: lxml_html.HtmlElement) -> int:
    return len(el.text_content().strip())


def merge_split_bodies(tree: lxml_html.HtmlElement, min_chars: int = 150, max_gap_chars: int = 200) -> None:
    """Move the pieces of an article body split over several containers of the
    same body-like class into the first piece.

    trafilatura takes the first container its body XPaths match, so on such
    pages (ads between the pieces) it keeps only the first part. A page has one
    article body, so same-class body containers are pieces of it, provided
    that at least two carry real paragraphs and that little text (ad labels)
    lies between them; a listing of posts, with titles between, is left alone.
    """
    counts = Counter(cls for cls in _CONTAINER_CLASSES(tree) if _BODY_CLASS.search(cls))
    for cls, count in counts.items():
        if count < 2:
            continue
        found = _CONTAINERS_WITH_CLASS(tree, cls=cls)
        pieces = [el for el in found if not any(a in found for a in el.iterancestors())]
        substantial = sum(1 for el in pieces if sum(len(p.text_content()) for p in el.iter("p")) >= min_chars)
        if substantial >= 2:
            _merge_pieces(pieces, max_gap_chars)


def _merge_pieces(pieces: list[lxml_html.HtmlElement], max_gap_chars: int) -> None:
    """Append each piece to the first, in document order, while the text
    around them (inside their lowest common ancestor) stays short."""
    first = pieces[0]
    for other in pieces[1:]:
        first_ancestors = set(first.iterancestors())
        common = next((a for a in other.iterancestors() if a in first_ancestors), None)
        if common is None:
            return
        inside = [el for el in pieces if common in set(el.iterancestors())]
        if _text_len(common) - sum(_text_len(el) for el in inside) > max_gap_chars:
            return
        _append_content(first, other)
        other.drop_tree()  # now empty; its tail stays where it was


def _append_content(target: lxml_html.HtmlElement, source: lxml_html.HtmlElement) -> None:
    if source.text:
        if len(target):
            target[-1].tail = (target[-1].tail or "") + source.text
        else:
            target.text = (target.text or "") + source.text
        source.text = None
    target.extend(list(source))


# --------------------------------------------------------------------------- headline

_WORDS = re.compile(r"\w+")
_TITLE_SEPARATORS = re.compile(r"\s[|\-–—:·•]\s")
_HEADLINE_META = etree.XPath('//meta[@property="og:title" or @name="twitter:title"]/@content')
_HEADLINE_SEARCH_LINES = 3
_MIN_PARTIAL_HEADLINE = 15


def _norm(text: str) -> str:
    return " ".join(_WORDS.findall(text.lower()))


def headline_candidates(tree: lxml_html.HtmlElement) -> set[str]:
    """Normalised forms the page's headline may take: its <h1>s, og/twitter
    titles, and <title> whole or split at " | " / " - " (site-name suffixes)."""
    found = [el.text_content() for el in tree.iter("h1")]
    found += _HEADLINE_META(tree)
    for title in tree.iter("title"):
        text = title.text_content()
        found.append(text)
        found += [part for part in _TITLE_SEPARATORS.split(text) if len(part) > _MIN_PARTIAL_HEADLINE]
    return {norm for norm in map(_norm, found) if norm}


def strip_headline(text: str, candidates: set[str]) -> str | None:
    """Drop the first of the leading lines that is the headline (or a
    substantial part of it); share widgets sometimes push it to line 2 or 3."""
    lines = text.split("\n")
    for i, line in enumerate(lines[:_HEADLINE_SEARCH_LINES]):
        norm = _norm(line)
        if norm and any(norm == c or (len(norm) > _MIN_PARTIAL_HEADLINE and norm in c) for c in candidates):
            return "\n".join(lines[:i] + lines[i + 1 :]).strip() or None
    return text


# --------------------------------------------------------------------------- backends

# trafilatura 2.x calls the fallback switch "fast", 1.x "no_fallback".
_FAST_KW = "fast" if "fast" in inspect.signature(trafilatura.extract).parameters else "no_fallback"


def _trafilatura_kwargs(config: ExtractConfig) -> dict:
    return {
        _FAST_KW: config.fast,
        "favor_recall": config.focus == "recall",
        "favor_precision": config.focus == "precision",
        "include_comments": False,
        "include_tables": config.include_tables,
        "deduplicate": False,
    }


def _extract_trafilatura(html: str, url: str | None, config: ExtractConfig) -> str | None:
    tree = parse_html(html)
    if tree is None:
        return None
    candidates = headline_candidates(tree) if config.strip_headline else set()
    _strip_noise(tree)
    if config.strip_headline:
        _strip_standfirsts(tree)
    if config.merge_split_bodies:
        merge_split_bodies(tree)
    # Taken before trafilatura runs: trafilatura 1.x prunes the tree it is given in place.
    link_labels = _link_labels(tree)
    text = trafilatura.extract(tree, url=url, **_trafilatura_kwargs(config))
    if text and candidates:
        text = strip_headline(text, candidates)
    if text and _mostly_link_text(text, link_labels):
        return None
    return text


_MAX_LINK_TEXT_SHARE = 0.7


def _link_labels(tree: lxml_html.HtmlElement) -> set[str]:
    return {_norm(a.text_content()) for a in tree.iter("a")}


def _mostly_link_text(text: str, link_labels: set[str]) -> bool:
    """True when the text is mostly lines that are whole link labels: on a page
    without an article (a menu, an index) trafilatura's recall mode falls
    back to the link lists, which are not main content."""
    lines = [(len(line), norm) for line in text.split("\n") if (norm := _norm(line))]
    linked = sum(size for size, norm in lines if norm in link_labels)
    return linked > _MAX_LINK_TEXT_SHARE * sum(size for size, _ in lines)


def _extract_resiliparse(html: str, config: ExtractConfig) -> str | None:
    tree = HTMLTree.parse(html)
    if tree.body is None:
        return None
    text: str | None = extract_plain_text(tree, main_content=True)
    if text and config.strip_headline:
        found = [tree.title or ""] + [el.text or "" for el in tree.body.get_elements_by_tag_name("h1")]
        text = strip_headline(text, {norm for norm in map(_norm, found) if norm})
    # No link-text guard here: reading the labels of all links off resiliparse's
    # DOM costs several times the extraction itself.
    return text


# --------------------------------------------------------------------------- public API

_MARKUP_PROBE_CHARS = 4096


def extract(html: str | bytes, url: str | None = None, config: ExtractConfig = DEFAULT_CONFIG) -> str | None:
    """Return the main text of an HTML page, paragraphs separated by newlines,
    or None when the page has no main content."""
    if isinstance(html, bytes):
        html = decode_html(html)
    if "<" not in html[:_MARKUP_PROBE_CHARS]:
        return None  # empty, plain text or binary: not an HTML page
    if config.backend == "resiliparse":
        text = _extract_resiliparse(html, config)
    else:
        text = _extract_trafilatura(html, url, config)
    text = text.strip() if text else ""
    return text or None


class KilnExtractor(BaseExtractor):
    """datatrove block running ``extract``; a drop-in for
    ``datatrove.pipeline.extractors.Trafilatura``.

    It inherits BaseExtractor.run unchanged, so it gets the same orchestration
    as datatrove's Trafilatura block: one long-lived worker process (forked
    once, restarted only after a timeout or a crash) that receives each page
    over a pipe and must answer within ``timeout`` seconds. Neither block pays
    anything per document that the other does not.
    """

    name = "⛏ Kiln extractor"
    _requires_dependencies = ["trafilatura", "lxml", "resiliparse"]

    def __init__(self, config: ExtractConfig = DEFAULT_CONFIG, timeout: float = 1.0):
        super().__init__(timeout)
        self.config = config

    def extract(self, text: str) -> str:
        return extract(text, config=self.config) or ""
