"""Bytes -> text for web pages, the WHATWG way: a BOM, the declared charset (HTTP header, then
`<meta>`), UTF-8, a few stray bytes tolerated, then a detector's guess. Used by ingest (every
page) and by extraction (pages given as bytes)."""

from __future__ import annotations

import codecs
import re

META_SCAN_BYTES = 4096      # where <meta charset> is looked for (WHATWG prescans 1024; real pages put it later)
DETECT_SAMPLE = 64 << 10    # bytes given to charset_normalizer
MAX_BAD_BYTES = 0.001       # a declared charset may fail on this share of bytes (at least 4): stray bytes
MAX_CONTROL_CHARS = 0.01    # more control characters than this in decoded text: binary, not a page

# WHATWG Encoding Standard labels -> Python codecs (tried in order; the first that decodes wins).
# Where Python's codec is narrower than the web's decoder, the web's superset comes first:
# windows-1252 for latin1/ascii, cp932 for Shift_JIS, gb18030 for gb2312/GBK, cp949 for EUC-KR.
_WHATWG = {
    ("utf-8",): "unicode-1-1-utf-8 unicode11utf8 unicode20utf8 utf-8 utf8 x-unicode20utf8",
    ("cp866",): "866 cp866 csibm866 ibm866",
    ("iso8859-2",): "csisolatin2 iso-8859-2 iso-ir-101 iso8859-2 iso88592 iso_8859-2 iso_8859-2:1987 l2 latin2",
    ("iso8859-3",): "csisolatin3 iso-8859-3 iso-ir-109 iso8859-3 iso88593 iso_8859-3 iso_8859-3:1988 l3 latin3",
    ("iso8859-4",): "csisolatin4 iso-8859-4 iso-ir-110 iso8859-4 iso88594 iso_8859-4 iso_8859-4:1988 l4 latin4",
    ("iso8859-5",): "csisolatincyrillic cyrillic iso-8859-5 iso-ir-144 iso8859-5 iso88595 iso_8859-5 iso_8859-5:1988",
    ("iso8859-6",): "arabic asmo-708 csiso88596e csiso88596i csisolatinarabic ecma-114 iso-8859-6 iso-8859-6-e "
                    "iso-8859-6-i iso-ir-127 iso8859-6 iso88596 iso_8859-6 iso_8859-6:1987",
    ("iso8859-7",): "csisolatingreek ecma-118 elot_928 greek greek8 iso-8859-7 iso-ir-126 iso8859-7 iso88597 "
                    "iso_8859-7 iso_8859-7:1987 sun_eu_greek",
    ("iso8859-8",): "csiso88598e csisolatinhebrew hebrew iso-8859-8 iso-8859-8-e iso-ir-138 iso8859-8 iso88598 "
                    "iso_8859-8 iso_8859-8:1988 visual csiso88598i iso-8859-8-i logical",
    ("iso8859-10",): "csisolatin6 iso-8859-10 iso-ir-157 iso8859-10 iso885910 l6 latin6",
    ("iso8859-13",): "iso-8859-13 iso8859-13 iso885913",
    ("iso8859-14",): "iso-8859-14 iso8859-14 iso885914",
    ("iso8859-15",): "csisolatin9 iso-8859-15 iso8859-15 iso885915 iso_8859-15 l9",
    ("iso8859-16",): "iso-8859-16",
    ("koi8-r",): "cskoi8r koi koi8 koi8-r koi8_r",
    ("koi8-u",): "koi8-ru koi8-u",
    ("mac-roman",): "csmacintosh mac macintosh x-mac-roman",
    ("cp874",): "dos-874 iso-8859-11 iso8859-11 iso885911 tis-620 windows-874",
    ("cp1250",): "cp1250 windows-1250 x-cp1250",
    ("cp1251",): "cp1251 windows-1251 x-cp1251",
    ("cp1252",): "ansi_x3.4-1968 ascii cp1252 cp819 csisolatin1 ibm819 iso-8859-1 iso-ir-100 iso8859-1 iso88591 "
                 "iso_8859-1 iso_8859-1:1987 l1 latin1 us-ascii windows-1252 x-cp1252",
    ("cp1253",): "cp1253 windows-1253 x-cp1253",
    ("cp1254",): "cp1254 csisolatin5 iso-8859-9 iso-ir-148 iso8859-9 iso88599 iso_8859-9 iso_8859-9:1989 l5 "
                 "latin5 windows-1254 x-cp1254",
    ("cp1255",): "cp1255 windows-1255 x-cp1255",
    ("cp1256",): "cp1256 windows-1256 x-cp1256",
    ("cp1257",): "cp1257 windows-1257 x-cp1257",
    ("cp1258",): "cp1258 windows-1258 x-cp1258",
    ("mac-cyrillic",): "x-mac-cyrillic x-mac-ukrainian",
    ("gb18030",): "chinese csgb2312 csiso58gb231280 gb2312 gb_2312 gb_2312-80 gbk iso-ir-58 x-gbk gb18030",
    ("big5hkscs", "cp950"): "big5 big5-hkscs cn-big5 csbig5 x-x-big5",
    ("euc_jp", "euc_jis_2004"): "cseucpkdfmtjapanese euc-jp x-euc-jp",
    ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2"): "csiso2022jp iso-2022-jp",
    ("cp932", "shift_jis_2004"): "csshiftjis ms932 ms_kanji shift-jis shift_jis sjis windows-31j x-sjis",
    ("cp949",): "cseuckr csksc56011987 euc-kr iso-ir-149 korean ks_c_5601-1987 ks_c_5601-1989 ksc5601 ksc_5601 "
                "windows-949",
    ("iso2022_kr",): "csiso2022kr iso-2022-kr",  # WHATWG: "replacement"; Python can still read it
    ("hz",): "hz-gb-2312",
    ("utf-16-be",): "unicodefffe utf-16be",
    ("utf-16-le",): "csunicode iso-10646-ucs-2 ucs-2 unicode unicodefeff utf-16 utf-16le",
}
WHATWG_LABELS: dict[str, tuple[str, ...]] = {
    label: codecs_ for codecs_, labels in _WHATWG.items() for label in labels.split()}
_BOMS = ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))


def _c1_passthrough(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError), "a decoding handler"
    # WHATWG windows-1252 maps the 5 bytes cp1252 leaves undefined to the C1 controls
    return err.object[err.start:err.end].decode("latin-1"), err.end


def _cp1252_repair(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeDecodeError), "a decoding handler"
    return err.object[err.start:err.end].decode("cp1252", "kiln-c1"), err.end


codecs.register_error("kiln-c1", _c1_passthrough)
codecs.register_error("kiln-cp1252", _cp1252_repair)


def charset_codecs(label: str | None) -> tuple[str, ...]:
    """Python codecs for a charset label, following WHATWG; () when the label is unknown."""
    if not label:
        return ()
    key = label.strip().strip("\"'").lower()
    if key in WHATWG_LABELS:
        return WHATWG_LABELS[key]
    try:
        info = codecs.lookup(key)
    except (LookupError, ValueError):
        return ()
    if not getattr(info, "_is_text_encoding", True):
        return ()  # rot13, base64, zlib: codecs but not charsets
    return WHATWG_LABELS.get(info.name, (info.name,))


_META = re.compile(rb"<meta\s[^>]*>", re.IGNORECASE)
_ATTR = re.compile(rb"""([a-zA-Z_:-]+)\s*=\s*("[^"]*"|'[^']*'|[^\s>]+)""")
_COMMENT = re.compile(rb"<!--.*?(?:-->|$)", re.DOTALL)


def meta_charset(body: bytes) -> str | None:
    """The charset a page declares in `<meta charset>` or `<meta http-equiv=content-type>`."""
    head = _COMMENT.sub(b"", body[:META_SCAN_BYTES])
    for tag in _META.finditer(head):
        attrs = {k.lower(): v.strip(b"\"'") for k, v in _ATTR.findall(tag.group())}
        label = attrs.get(b"charset")
        if label is None and attrs.get(b"http-equiv", b"").lower() == b"content-type":
            match = re.search(rb"charset\s*=\s*[\"']?([^\"';\s]+)", attrs.get(b"content", b""), re.IGNORECASE)
            label = match.group(1) if match else None
        if label and charset_codecs(label.decode("latin-1")):
            return label.decode("latin-1")
    return None


def _decode_strict(body: bytes, codec: str) -> str | bytes | None:
    """The page as text, or None. Valid UTF-8 stays bytes: Arrow takes it as is, while turning a
    non-ASCII str back into UTF-8 costs several times more than the decoding did."""
    try:
        if codec == "utf-8":
            if not body.isascii():
                body.decode("utf-8")  # validates; the str is dropped
            return body
        return body.decode(codec, "kiln-c1" if codec == "cp1252" else "strict")
    except (UnicodeDecodeError, LookupError):
        return None


_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f-\x9f\ufffd]")
_NOT_CONTROL_BYTES = bytes(b for b in range(256) if not (b < 9 or b == 11 or 13 < b < 32 or b == 127))


def _is_text(text: str | bytes) -> bool:
    sample = text[:16384]  # binary garbage shows at once; no need to scan all of a big page
    if isinstance(sample, bytes):
        controls = len(sample.translate(None, _NOT_CONTROL_BYTES))
    else:
        controls = len(_CONTROL.findall(sample))
    return controls <= MAX_CONTROL_CHARS * len(sample)


def decode_text(body: bytes, declared: str | None, html: bool = True,
                prefer_utf8: bool = False) -> tuple[str, str, str, bool] | None:
    """Bytes -> (text, codec, where the charset came from, whether bad bytes were replaced), or None.

    Order: a byte-order mark; the declared charset (HTTP header, then `<meta>`); UTF-8; the
    declared charset (or UTF-8) again, tolerating a few bad bytes (mixed-up pages are common);
    then charset_normalizer's guess. A decoding that yields binary garbage counts as a failure.
    `prefer_utf8` tries UTF-8 right after the byte-order mark: text in another non-ASCII charset
    is practically never valid UTF-8, while UTF-8 pages labelled latin-1 are common (extraction
    of pages given as bytes; ingest follows WHATWG, where the declaration wins).
    """
    decoded = decode_bytes(body, declared, html, prefer_utf8)
    if decoded is None:
        return None
    text, codec, source, replaced = decoded
    return text.decode("utf-8") if isinstance(text, bytes) else text, codec, source, replaced


def decode_bytes(body: bytes, declared: str | None, html: bool,
                 prefer_utf8: bool = False) -> tuple[str | bytes, str, str, bool] | None:
    """`decode_text`, but text that is valid UTF-8 comes back as those bytes."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            text = _decode_strict(body[len(bom):], codec)
            if text is not None and _is_text(text):
                return text, codec, "bom", False
            break
    if prefer_utf8 and (text := _decode_strict(body, "utf-8")) is not None and _is_text(text):
        return text, "utf-8", "default", False
    candidates: list[tuple[str, str]] = [(c, "header") for c in charset_codecs(declared)]
    for codec, where in candidates:  # the HTTP header wins over <meta> (WHATWG)
        text = _decode_strict(body, codec)
        if text is not None and _is_text(text):
            return _strip_bom(text), codec, where, False
    if html:
        # a <meta> cannot declare UTF-16: the bytes it was read from are ASCII-compatible
        candidates += [("utf-8" if c.startswith("utf-16") else c, "meta") for c in charset_codecs(meta_charset(body))]
    tried = {codec for codec, where in candidates if where == "header"}
    for codec, where in candidates + [("utf-8", "default")]:
        if codec in tried:
            continue
        tried.add(codec)
        text = _decode_strict(body, codec)
        if text is not None and _is_text(text):
            return _strip_bom(text), codec, where, False
    # A few bad bytes in a page that declares its charset, or in one that is plainly UTF-8 (many
    # valid multi-byte sequences), are stray bytes, not a wrong charset: replace (or repair) them.
    for codec, where in candidates[:1] or [("utf-8", "default")]:
        text = body.decode(codec, "replace")
        bad = text.count("\ufffd")
        if bad > max(4, MAX_BAD_BYTES * len(body)) or not _is_text(text.replace("\ufffd", "")):
            continue
        if where == "default" and len(_NON_ASCII.findall(text)) - bad < 10 * bad:
            continue
        if codec == "utf-8":  # stray bytes in UTF-8 pages are nearly always windows-1252 text pasted in
            text = body.decode("utf-8", "kiln-cp1252")
        return _strip_bom(text), codec, where, True
    from charset_normalizer import from_bytes

    best = from_bytes(body[:DETECT_SAMPLE]).best()
    if best is not None:
        codec = codecs.lookup(best.encoding).name
        for candidate in WHATWG_LABELS.get(codec, (codec,)):
            text = _decode_strict(body, candidate)
            if text is not None and _is_text(text):
                return _strip_bom(text), candidate, "detected", False
    return None


def _strip_bom(text: str | bytes) -> str | bytes:
    return text.removeprefix(codecs.BOM_UTF8) if isinstance(text, bytes) else text.removeprefix("\ufeff")
