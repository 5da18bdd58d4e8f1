"""One WARC record -> one document row (or the reason it is skipped): the table's schema, the
skip reasons every record is counted under, and WARC-Date parsing."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from pipelines.charset import decode_bytes
from pipelines.common import KilnError
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.payload import (
    HTML_TYPES,
    SNIFF_TYPES,
    TooLarge,
    decode_payload,
    looks_like_html,
    parse_content_type,
)

SCHEMA = pa.schema([
    ("id", pa.string()),                 # sha256(record id, url)[:32]: same file, same ids
    ("url", pa.string()),
    ("html", pa.string()),               # null for WET records
    ("text", pa.string()),               # WET text; null for HTML
    ("fetch_date", pa.string()),         # ISO 8601 UTC, null when WARC-Date is not a date
    ("fetch_date_raw", pa.string()),     # WARC-Date as written
    ("warc_record_id", pa.string()),
    ("content_type", pa.string()),       # text/html, application/xhtml+xml, text/plain (WET)
    ("charset", pa.string()),            # the Python codec that decoded the page
    ("charset_source", pa.string()),     # bom | header | meta | default | detected
    ("truncated", pa.bool_()),           # the crawler cut the payload (WARC-Truncated)
    ("payload_bytes", pa.int64()),
    ("source", pa.string()),             # the crawl file: path, URL or <stage>/<fingerprint>/<path>
    ("warc_offset", pa.int64()),         # where the record (its gzip member) starts in the file
])

SKIP_REASONS = (
    "record_type",       # request, metadata, warcinfo, resource, revisit, ...
    "not_http",          # response without an HTTP message (dns:, ftp:, whois:) or a broken one
    "non_200",
    "not_html",          # (for WET conversion records: not text/plain)
    "no_url",
    "too_large",         # payload over max_page_bytes, skipped without reading it
    "truncated",         # the record ends early: truncated file or damaged gzip member
    "bad_encoding",      # Content-Encoding / chunking that does not decode
    "empty",
    "undecodable",       # no charset decodes it into text (binary, mixed garbage)
    "damaged",           # not readable as a record: a broken gzip member, garbage for a header
)


def empty_counts() -> dict[str, int]:
    counts = {"records": 0, "documents": 0}
    counts.update({f"skipped_{reason}": 0 for reason in SKIP_REASONS})
    counts.update(bytes=0, document_bytes=0, resyncs=0, parse_errors=0, charset_detected=0,
                  decoded_with_bad_bytes=0, fetch_date_unparsed=0)
    return counts


def document_row(record, kind: str, source: str, offset: int, config: IngestConfig,
              counts: dict[str, int]) -> dict[str, Any] | str:
    """The row for one response/conversion record, or the reason it is skipped."""
    headers = record.headers
    http = None
    if kind == "response":
        if not record.is_http:
            return "not_http"
        http = record.http_headers
        status = http.status_code
        if status is None:
            return "not_http"
        if status != 200:
            return "non_200"
        mime, label = parse_content_type(http.get("Content-Type"))
        sniff = mime in SNIFF_TYPES
        if not sniff and mime not in HTML_TYPES:
            return "not_html"
    else:
        mime, label = parse_content_type(headers.get("Content-Type"))
        mime, sniff = mime or "text/plain", False
        if mime != "text/plain":
            return "not_html"
        label = label or "utf-8"  # WET is UTF-8
    url = (headers.get("WARC-Target-URI") or "").strip().strip("<>")
    if not url:
        return "no_url"
    length = record.content_length
    if length > config.max_page_bytes:
        return "too_large"  # fastwarc skips the body without holding it
    try:
        body = record.reader.read()
    except BaseException as err:
        reraise_if_fatal(err)
        return "truncated"
    if len(body) < length:
        return "truncated"
    if http is not None:
        try:
            body = decode_payload(body, http.get("Transfer-Encoding"), http.get("Content-Encoding"),
                                  config.max_page_bytes)
        except TooLarge:
            return "too_large"
        except ValueError:
            return "bad_encoding"
        if sniff:
            if not looks_like_html(body):
                return "not_html"
            mime = "text/html"
    if not body or body.isspace():
        return "empty"
    decoded = decode_bytes(body, label, html=kind == "response")
    if decoded is None:
        return "undecodable"
    text, charset, charset_source, replaced = decoded
    if not text or text.isspace():
        return "empty"
    counts["charset_detected"] += charset_source == "detected"
    counts["decoded_with_bad_bytes"] += replaced
    raw_date = headers.get("WARC-Date")
    fetch_date = parse_warc_date(raw_date)
    counts["fetch_date_unparsed"] += fetch_date is None
    record_id = (headers.get("WARC-Record-ID") or "").strip()
    key = f"{record_id}\n{url}" if record_id else f"{source}\n{offset}\n{url}"
    return {
        "id": hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32],
        "url": url,
        "html": text if kind == "response" else None,
        "text": text if kind == "conversion" else None,
        "fetch_date": fetch_date,
        "fetch_date_raw": raw_date,
        "warc_record_id": record_id or None,
        "content_type": mime,
        "charset": charset,
        "charset_source": charset_source,
        "truncated": headers.get("WARC-Truncated") is not None,
        "payload_bytes": len(body),
        "source": source,
        "warc_offset": offset,
    }


_WARC_DATE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"  # date
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"  # time, seconds and fraction optional
    r"\s*(Z|[+-]\d{2}:?\d{2})?",  # zone
    re.IGNORECASE)


def parse_warc_date(value: str | None) -> str | None:
    """WARC-Date as ISO 8601 UTC (`2008-04-30T20:48:25Z`); None when it is not a real date
    (ClueWeb09 writes days like `2008-10-294`)."""
    if not value:
        return None
    value = value.strip()
    try:
        if re.fullmatch(r"\d{14}", value):  # ARC-style 20080430204825
            moment = datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        else:
            match = _WARC_DATE.fullmatch(value)
            if not match:
                return None
            year, month, day, hour, minute, second, fraction, zone = match.groups()
            micro = int((fraction or "0")[:6].ljust(6, "0"))
            moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                              micro, tzinfo=UTC)
            if zone and zone.upper() != "Z":
                sign = 1 if zone[0] == "+" else -1
                digits = zone[1:].replace(":", "")
                moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    except (ValueError, OverflowError):
        return None
    micro = moment.microsecond
    timespec = "seconds" if not micro else "milliseconds" if micro % 1000 == 0 else "microseconds"
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


def reraise_if_fatal(err: BaseException) -> None:
    if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit, KilnError)):
        raise err
