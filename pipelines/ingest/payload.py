"""HTTP payloads as crawlers store them: chunked or compressed bodies undone, types sniffed."""

from __future__ import annotations

import re
import zlib

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
SNIFF_TYPES = frozenset({"", "unknown/unknown", "application/unknown", "*/*"})
# WHATWG MIME sniffing: these tags (followed by space or '>') open an HTML document
_HTML_SNIFF = re.compile(
    rb"\s*(?:<!doctype html|<html|<head|<script|<iframe|<h1|<div|<font|<table|<a|<style|<title|<b|<body|<br|<p"
    rb"|<!--)[\s>]", re.IGNORECASE)


def parse_content_type(value: str | None) -> tuple[str, str | None]:
    """`text/html; charset="utf-8"` -> ("text/html", "utf-8")."""
    if not value:
        return "", None
    mime, _, params = value.partition(";")
    match = re.search(r"charset\s*=\s*[\"']?([^\"';,\s]+)", params, re.IGNORECASE)
    return mime.strip().lower(), match.group(1) if match else None


def looks_like_html(body: bytes) -> bool:
    return bool(_HTML_SNIFF.match(body.lstrip(b"\xef\xbb\xbf"), 0))


class TooLarge(Exception):
    pass


def decode_payload(body: bytes, transfer_encoding: str | None, content_encoding: str | None, limit: int) -> bytes:
    """Undo chunking and gzip/deflate/br, when the crawler stored them (many store decoded bytes
    but keep the headers: ClueWeb says gzip over plain HTML). Raises ValueError when it cannot."""
    if transfer_encoding and "chunked" in transfer_encoding.lower() and _CHUNK_LINE.match(body):
        body = _dechunk(body)
    for coding in reversed([c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]):
        if coding in ("identity", "none") or _looks_like_text(body):
            continue
        if coding in ("gzip", "x-gzip", "deflate"):
            body = _inflate(body, limit, 31 if body[:2] == b"\x1f\x8b" else (15 if coding == "deflate" else 31))
        elif coding == "br":
            try:
                import brotli
            except ImportError:
                raise ValueError("brotli is not installed") from None
            try:
                body = brotli.decompress(body)
            except Exception as err:  # brotli.error, by module version
                raise ValueError(str(err)) from None
        else:
            raise ValueError(f"unsupported Content-Encoding {coding}")
        if len(body) > limit:
            raise TooLarge()
    return body


_CHUNK_LINE = re.compile(rb"[0-9a-fA-F]{1,8}[ \t]*(?:;[^\r\n]*)?\r?\n")


def _dechunk(body: bytes) -> bytes:
    parts: list[bytes] = []
    pos = 0
    while pos < len(body):
        match = _CHUNK_LINE.match(body, pos)
        if not match:
            return body  # not chunked after all: the crawler stored it decoded
        size = int(match.group().split(b";")[0].strip(), 16)
        if size == 0:
            break
        start = match.end()
        if not parts and start + size > len(body):
            return body  # a first "chunk" longer than the body: a hex-looking first line, not chunking
        parts.append(body[start:start + size])
        pos = start + size
        pos += 2 if body[pos:pos + 2] == b"\r\n" else (1 if body[pos:pos + 1] == b"\n" else 0)
    return b"".join(parts)  # (cut short: what came)


def _inflate(body: bytes, limit: int, wbits: int) -> bytes:
    for bits in (wbits, -15):  # "deflate" is zlib-wrapped by the spec, raw in practice too
        inflater = zlib.decompressobj(bits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise TooLarge()
        return out + inflater.flush() if not inflater.unconsumed_tail else out
    raise ValueError("does not inflate")


def _looks_like_text(body: bytes) -> bool:
    head = body[:512].lstrip(b"\xef\xbb\xbf\xfe\xff \t\r\n")
    return head[:1] == b"<" or (bool(head) and b"\x00" not in head and sum(b < 9 or 13 < b < 32 for b in head) == 0)
