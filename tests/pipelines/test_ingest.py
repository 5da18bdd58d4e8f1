"""The ingest stage on real crawl files (../shared/data/warc), generated WARC/1.1 and WET files,
planted damage, bad inputs, a local HTTP server, determinism and resume."""

import functools
import gzip
import hashlib
import http.server
import io
import json
import random
import re
import socket
import threading
import tracemalloc
import zlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
from warcio.archiveiterator import ArchiveIterator
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

import pipelines.ingest as ingest_module
from pipelines.charset import charset_codecs, decode_text
from pipelines.common import InputError, TransientError, document_shards, read_shard
from pipelines.ingest import STAGE, IngestConfig
from pipelines.ingest.payload import decode_payload
from pipelines.ingest.records import SCHEMA, SKIP_REASONS, empty_counts, parse_warc_date
from pipelines.ingest.warc import RawReader, read_documents
from storage import ArtifactStore

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "warc"
ARCHIVE_ORG = DATA / "aut_IAH-20080430204825-00000-blackbook.warc.gz"
CLUEWEB_JA = DATA / "resiliparse_clueweb09-ja_quirk.warc.gz"
ALIAS = DATA / "warc2zim_qsl.net-encoding-alias.warc.gz"
needs_data = pytest.mark.skipif(not ARCHIVE_ORG.exists(), reason="real crawl files (../shared/data) absent")
HTML_TYPES = {"text/html", "application/xhtml+xml"}


# ---------------------------------------------------------------- helpers


def ingest(tmp_path, inputs, store=None, manifests=(), **settings):
    store = store or ArtifactStore(tmp_path / "store")
    settings.setdefault("workers", 1)
    return store, STAGE.run(IngestConfig(inputs=[str(i) for i in inputs], **settings), list(manifests), store)


def rows(store, manifest):
    return pa.concat_tables([read_shard(store, manifest, p) for p in document_shards(manifest)]).to_pylist()


def read_counts(path, **settings):
    counts = empty_counts()
    with open(path, "rb") as handle:
        documents = list(read_documents(RawReader(handle, str(path)), str(path), IngestConfig(**settings), counts))
    return documents, counts


def expected_counts(path):
    """What a crawl file holds, read independently with warcio."""
    counts = Counter()
    with open(path, "rb") as handle:
        for record in ArchiveIterator(handle):
            counts["records"] += 1
            if record.rec_type != "response":
                counts["skipped_record_type"] += 1
            elif record.http_headers is None or not record.http_headers.get_statuscode():
                counts["skipped_not_http"] += 1
            elif record.http_headers.get_statuscode() != "200":
                counts["skipped_non_200"] += 1
            elif (record.http_headers.get_header("Content-Type") or "").split(";")[0].strip().lower() not in HTML_TYPES:
                counts["skipped_not_html"] += 1
            elif not record.content_stream().read().strip():
                counts["skipped_empty"] += 1
            else:
                counts["documents"] += 1
    return counts


def members(path_or_data):
    """The gzip members of a per-record-gzipped WARC file (a path, or its bytes)."""
    data = path_or_data if isinstance(path_or_data, bytes) else Path(path_or_data).read_bytes()
    found, pos = [], 0
    while pos < len(data):
        inflater = zlib.decompressobj(31)
        inflater.decompress(data[pos:])
        end = len(data) - len(inflater.unused_data)
        found.append(data[pos:end])
        pos = end
    return found


def html_member_indexes(path):
    """Indexes of the members holding HTML 200 responses."""
    found = []
    for i, member in enumerate(members(path)):
        record = next(iter(ArchiveIterator(io.BytesIO(member))))
        if (record.rec_type == "response" and record.http_headers and record.http_headers.get_statuscode() == "200"
                and "text/html" in (record.http_headers.get_header("Content-Type") or "")):
            found.append(i)
    return found


def warc_bytes(records, version="1.0", compress=True):
    """A WARC file of (uri, record type, payload, http headers or None, content type) records."""
    buffer = io.BytesIO()
    writer = WARCWriter(buffer, gzip=compress, warc_version=version)
    for i, (uri, kind, payload, http_headers, content_type) in enumerate(records):
        headers = {"WARC-Record-ID": f"<urn:uuid:00000000-0000-0000-0000-{i:012d}>",
                   "WARC-Date": "2024-03-01T12:00:00.250Z" if version == "1.1" else "2024-03-01T12:00:00Z"}
        status = StatusAndHeaders(http_headers[0], http_headers[1], protocol="HTTP/1.1") if http_headers else None
        writer.write_record(writer.create_warc_record(
            uri, kind, payload=io.BytesIO(payload), warc_content_type=content_type, warc_headers_dict=headers,
            http_headers=status))
    return buffer.getvalue()


def page(uri, body, content_type="text/html; charset=utf-8", status="200 OK"):
    headers = [("Content-Type", content_type)] if content_type else []
    return uri, "response", body, (status, headers), ""


def big_member(size):
    """One gzip member with a `size`-byte HTML response, made without holding the page in memory."""
    http_head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://big.example/\r\n"
            f"WARC-Date: 2024-03-01T12:00:00Z\r\nWARC-Record-ID: <urn:uuid:big>\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http_head) + size}\r\n\r\n")
    deflate = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [deflate.compress(head.encode() + http_head)]
    chunk = b"<p>" + b"x" * ((1 << 20) - 3)
    for _ in range(size // len(chunk)):
        parts.append(deflate.compress(chunk))
    parts.append(deflate.compress(b"y" * (size % len(chunk)) + b"\r\n\r\n"))
    return b"".join(parts) + deflate.flush()


def shard_hashes(manifest):
    return {f.path: (f.sha256, f.rows) for f in manifest.files}


def nothing_committed(store):
    return store.list("ingest") == []


@pytest.fixture
def http_server(tmp_path):
    """Serves tmp_path/www on 127.0.0.1; paths containing '503' answer 503."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if "503" in self.path:
                self.send_error(503)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------- real files


@needs_data
@pytest.mark.parametrize("path", [ARCHIVE_ORG, CLUEWEB_JA, ALIAS], ids=["warc0.17", "clueweb-warc0.18", "alias"])
def test_real_files_keep_and_skip_what_they_hold(tmp_path, path):
    expected = expected_counts(path)
    store, manifest = ingest(tmp_path, [path])
    stats = manifest.stats
    for key in ("records", "documents", "skipped_record_type", "skipped_not_http", "skipped_non_200",
                "skipped_not_html", "skipped_empty"):
        assert stats[key] == expected[key], key
    assert stats["records"] == stats["documents"] + sum(v for k, v in stats.items() if k.startswith("skipped_"))
    assert stats["skipped_truncated"] == stats["skipped_undecodable"] == stats["parse_errors"] == 0
    assert manifest.sources == [{"url": str(path), "bytes": path.stat().st_size,
                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    documents = rows(store, manifest)
    assert len(documents) == stats["documents"] and len({d["id"] for d in documents}) == len(documents)
    data = path.read_bytes()
    for doc in documents[:20]:  # warc_offset: where the record's gzip member starts, for range requests
        head = zlib.decompressobj(31).decompress(data[doc["warc_offset"]:doc["warc_offset"] + 65536], 4096)
        assert head.startswith(b"WARC/") and doc["warc_record_id"].encode() in head
    assert all(d["html"] and d["text"] is None and d["url"].startswith("http") and d["source"] == str(path)
               for d in documents)


@needs_data
def test_archive_org_counts_match_the_documented_numbers(tmp_path):
    _, manifest = ingest(tmp_path, [ARCHIVE_ORG])
    stats = manifest.stats
    assert stats["records"] == 822                    # 299 response + 261 request + 261 metadata + 1 warcinfo
    assert stats["skipped_not_http"] == 38            # dns: records
    assert stats["skipped_non_200"] == 47             # 404 x40, 30x x7
    assert stats["documents"] + stats["skipped_not_html"] == 214   # the 200s
    assert stats["documents"] == 94                   # 140 text/html minus 46 that are not 200


@needs_data
def test_clueweb_japanese_decodes_and_keeps_its_invalid_dates_raw(tmp_path):
    store, manifest = ingest(tmp_path, [CLUEWEB_JA])
    documents = rows(store, manifest)
    assert len(documents) == 29
    for doc in documents:
        assert doc["charset"] == "euc_jp" and doc["charset_source"] == "header"
        assert re.search("[\u3040-\u30ff]", doc["html"]), "hiragana/katakana present"
        assert "\ufffd" not in doc["html"]
        assert not re.search("[\u00a4\u00a5\u00a1][\u00a0-\u00ff]", doc["html"]), "no EUC-JP-read-as-Latin-1 mojibake"
        assert doc["fetch_date"] is None and re.fullmatch(r"2008-\d\d-\d{3}T.*", doc["fetch_date_raw"])
    assert "ブラウニー ブリーフケース" in documents[0]["html"]
    assert manifest.stats["fetch_date_unparsed"] == 29


@needs_data
def test_charset_alias_page_decodes_correctly(tmp_path):
    store, manifest = ingest(tmp_path, [ALIAS])
    (doc,) = rows(store, manifest)
    assert doc["url"] == "https://www.qsl.net/vk2jem/swlogs.htm"
    assert "identifies as \u201cAll india" in doc["html"]
    assert "\ufffd" not in doc["html"] and "\u00e2\u20ac" not in doc["html"], "no UTF-8-read-as-cp1252 mojibake"
    assert not doc["html"].startswith("\ufeff")
    assert doc["charset"] == "utf-8" and doc["fetch_date"] == "2024-07-08T15:02:25.142Z"


@needs_data
def test_plain_warc_reads_like_gzipped(tmp_path):
    plain = tmp_path / "plain.warc"
    plain.write_bytes(gzip.decompress(ARCHIVE_ORG.read_bytes()))
    _, from_gzip = ingest(tmp_path, [ARCHIVE_ORG])
    _, from_plain = ingest(tmp_path, [plain])
    for key in ("records", "documents", "skipped_non_200", "skipped_not_html", "skipped_not_http"):
        assert from_plain.stats[key] == from_gzip.stats[key], key


# ---------------------------------------------------------------- formats


def test_warc_1_1_and_wet_files(tmp_path):
    warc = tmp_path / "new.warc.gz"
    warc.write_bytes(warc_bytes([
        page("https://a.example/", "<html><body>Grüße aus Köln</body></html>".encode()),
        page("https://b.example/", "<html>ŻÓŁW gęś</html>".encode("iso-8859-2"), "text/html; charset=latin2"),
        page("https://c.example/", b"<!DOCTYPE html><html>no content type</html>", None),
        page("https://d.example/", b"%PDF-1.4 not html", None),
        page("https://e.example/", b"<html>\x80 costs</html>", "text/html; charset=ISO-8859-1"),
        page("https://f.example/", "<html><meta charset=gb2312>中文网页</html>".encode("gb18030"), "text/html"),
        page("https://g.example/", b"<html>missing</html>", status="404 Not Found"),
        ("https://h.example/", "request", b"GET / HTTP/1.1\r\n\r\n", None, "application/http; msgtype=request"),
    ], version="1.1"))
    wet = tmp_path / "crawl.warc.wet.gz"
    wet.write_bytes(warc_bytes([
        ("", "warcinfo", b"software: test\r\n", None, "application/warc-fields"),
        ("https://wet.example/", "conversion", "Plain text, ünïcödé, 日本語".encode(), None, "text/plain"),
        ("https://blank.example/", "conversion", b"   ", None, "text/plain"),
    ]))
    store, manifest = ingest(tmp_path, [warc, wet])
    docs = {d["url"]: d for d in rows(store, manifest)}
    assert set(docs) == {f"https://{c}.example/" for c in ("a", "b", "c", "e", "f", "wet")}
    assert "Grüße aus Köln" in docs["https://a.example/"]["html"]
    assert "ŻÓŁW" in docs["https://b.example/"]["html"] and docs["https://b.example/"]["charset"] == "iso8859-2"
    assert docs["https://c.example/"]["content_type"] == "text/html"   # sniffed
    assert docs["https://e.example/"]["html"] == "<html>€ costs</html>"  # latin1 means windows-1252
    assert "中文网页" in docs["https://f.example/"]["html"] and docs["https://f.example/"]["charset_source"] == "meta"
    assert docs["https://a.example/"]["fetch_date"] == "2024-03-01T12:00:00.250Z"
    wet_doc = docs["https://wet.example/"]
    assert wet_doc["html"] is None and wet_doc["text"] == "Plain text, ünïcödé, 日本語"
    assert wet_doc["content_type"] == "text/plain" and wet_doc["source"] == str(wet)
    assert all(d["text"] is None for url, d in docs.items() if url != "https://wet.example/")
    stats = manifest.stats
    assert (stats["documents"], stats["skipped_not_html"], stats["skipped_non_200"], stats["skipped_empty"],
            stats["skipped_record_type"]) == (6, 1, 1, 1, 2)


def test_decoding_rules():
    assert charset_codecs("ISO-8859-1") == charset_codecs("latin1") == charset_codecs("ascii") == ("cp1252",)
    assert charset_codecs("x-sjis")[0] == charset_codecs("Shift_JIS")[0] == "cp932"
    assert charset_codecs("gb2312") == ("gb18030",) and charset_codecs("rot13") == ()
    assert charset_codecs("iso_8859_1") == ("cp1252",)  # a Python alias, mapped through WHATWG
    sjis = "ﾃｽﾄ①テスト".encode("cp932")  # half-width kana and NEC circled digits: cp932, not shift_jis
    assert decode_text(sjis, "x-sjis")[:2] == ("ﾃｽﾄ①テスト", "cp932")
    text, codec, where, repaired = decode_text("naïve “utf-8” ".encode() * 50 + b"Caf\xe9", None)
    assert text.endswith("Café") and (codec, where, repaired) == ("utf-8", "default", True)
    assert decode_text(random.Random(0).randbytes(20000), "utf-8") is None
    html = b"<html>" + b"hello " * 2000 + b"</html>"
    packed = gzip.compress(html)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(packed[i:i + 700]), packed[i:i + 700])
                       for i in range(0, len(packed), 700)) + b"0\r\n\r\n"
    assert decode_payload(chunked, "chunked", "gzip", 10**6) == html
    assert decode_payload(html, "chunked", "gzip", 10**6) == html  # stored decoded, headers kept (ClueWeb)
    with pytest.raises(ValueError):
        decode_payload(b"\x00\x01 not deflate", None, "deflate", 10**6)
    assert parse_warc_date("2008-10-294T05:21:46-0700") is None
    assert parse_warc_date("2009-01-13T18:05:10-0800") == "2009-01-14T02:05:10Z"


# ---------------------------------------------------------------- damage


@needs_data
def test_planted_bad_records_are_skipped_by_reason(tmp_path):
    parts = members(ARCHIVE_ORG)
    html = html_member_indexes(ARCHIVE_ORG)
    cut, before_garbage = html[10], html[40]
    damaged = list(parts)
    damaged[cut] = parts[cut][: len(parts[cut]) // 2]           # a member truncated mid-stream
    damaged[before_garbage] += b"\x00garbage between members\xff" * 50
    extra = warc_bytes([
        page("http://empty.example/", b""),
        page("http://binary.example/", random.Random(1).randbytes(30000)),
        page("http://after.example/", b"<html>still read</html>"),
    ])
    path = tmp_path / "damaged.warc.gz"
    path.write_bytes(b"".join(damaged) + big_member(50 << 20) + extra + b"\x1f\x8b\x08\x00 truncated at the end")

    tracemalloc.start()
    documents, counts = read_counts(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 30 << 20, f"the 50 MB page was held in memory ({peak >> 20} MB peak)"

    clean = expected_counts(ARCHIVE_ORG)
    assert counts["skipped_truncated"] == 1
    assert counts["skipped_too_large"] == 1
    assert counts["skipped_empty"] == 1
    assert counts["skipped_undecodable"] == 1
    assert counts["documents"] == clean["documents"] - 1 + 1     # minus the truncated page, plus after.example
    assert counts["records"] == clean["records"] + 4            # every record still read, past the garbage
    assert counts["resyncs"] >= 2
    assert "http://after.example/" in {d["url"] for d in documents}


@needs_data
def test_garbage_in_plain_warc_is_skipped(tmp_path):
    records = gzip.decompress(ARCHIVE_ORG.read_bytes()).split(b"\r\n\r\nWARC/0.17\r\n")
    middle = len(records) // 2
    text = b"\r\n\r\nWARC/0.17\r\n".join(records[:middle]) + b"\r\n\r\n" + b"junk junk\r\n" * 100 + \
        b"WARC/0.17\r\n" + b"\r\n\r\nWARC/0.17\r\n".join(records[middle:])
    path = tmp_path / "garbage.warc"
    path.write_bytes(text)
    _, counts = read_counts(path)
    clean = expected_counts(ARCHIVE_ORG)
    assert counts["records"] == clean["records"] and counts["documents"] == clean["documents"]


# ---------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_input_error_and_commit_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    png = tmp_path / "picture.warc.gz"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    text = tmp_path / "notes.warc"
    text.write_text("hello, this is not a crawl\n")
    empty_gzip = tmp_path / "text.warc.gz"
    empty_gzip.write_bytes(gzip.compress(b"just text"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    cases = {
        str(tmp_path / "missing.warc.gz"): "no such file",
        str(tmp_path / "nothing-*.warc.gz"): "matches no file",
        f"http://127.0.0.1:{closed_port}/crawl.warc.gz": "unreachable",
        str(png): "PNG",
        str(text): "not a WARC file",
        str(empty_gzip): "not a WARC file",
    }
    for spec, reason in cases.items():
        with pytest.raises(InputError) as caught:
            ingest(tmp_path, [spec], store=store)
        message = str(caught.value)
        assert Path(spec).name in message and reason in message and "\n" not in message
    with pytest.raises(InputError, match="no inputs"):
        ingest(tmp_path, [], store=store)
    assert nothing_committed(store)


# ---------------------------------------------------------------- remote: listings over HTTP


@needs_data
def test_common_crawl_listing_over_http_with_limit(tmp_path, http_server):
    root, base = http_server
    (root / "crawl").mkdir()
    for name, source in [("a", ALIAS), ("b", CLUEWEB_JA), ("c", ARCHIVE_ORG)]:
        (root / "crawl" / f"{name}.warc.gz").write_bytes(source.read_bytes())
    (root / "warc.paths.gz").write_bytes(gzip.compress(b"crawl/a.warc.gz\ncrawl/b.warc.gz\ncrawl/c.warc.gz\n"))
    store, manifest = ingest(tmp_path, [base + "warc.paths.gz"], paths_base_url=base, limit_files=2)
    assert [s["url"] for s in manifest.sources] == [base + "crawl/a.warc.gz", base + "crawl/b.warc.gz"]
    assert manifest.sources[1]["sha256"] == hashlib.sha256(CLUEWEB_JA.read_bytes()).hexdigest()
    assert manifest.stats["files"] == 2 and manifest.stats["documents"] == 1 + 29
    assert {d["source"] for d in rows(store, manifest)} == {s["url"] for s in manifest.sources}

    with pytest.raises(TransientError, match="503"):
        ingest(tmp_path, [base + "crawl/503.warc.gz"], store=store)
    with pytest.raises(InputError, match="not found"):
        ingest(tmp_path, [base + "crawl/missing.warc.gz"], store=store)


# ---------------------------------------------------------------- upstream artifacts


@needs_data
def test_reads_the_warc_files_of_an_upstream_artifact(tmp_path):
    store = ArtifactStore(tmp_path / "store")

    def build_sample(writer):
        writer.write_bytes("crawl/ja.warc.gz", CLUEWEB_JA.read_bytes())
        writer.write_bytes("README.txt", b"not a crawl file")

    sample = store.produce("sample", "a" * 64, build_sample, config={}, inputs=[], code_version="1")
    _, manifest = ingest(tmp_path, [], store=store, manifests=[sample])
    assert manifest.inputs == [sample.fingerprint] and manifest.sources == []
    assert manifest.stats["documents"] == 29
    assert {d["source"] for d in rows(store, manifest)} == {f"sample/{'a' * 64}/crawl/ja.warc.gz"}


# ---------------------------------------------------------------- determinism, shards, resume


@needs_data
def test_shards_are_the_same_for_any_number_of_workers(tmp_path):
    inputs = [ARCHIVE_ORG, CLUEWEB_JA, ALIAS]
    _, one = ingest(tmp_path, inputs, store=ArtifactStore(tmp_path / "one"), workers=1, max_docs_per_shard=40)
    _, two = ingest(tmp_path, inputs, store=ArtifactStore(tmp_path / "two"), workers=2, max_docs_per_shard=40)
    assert one.fingerprint == two.fingerprint
    assert shard_hashes(one) == shard_hashes(two)
    assert [p for p in document_shards(one)] == [
        "shards/00000-0000.parquet", "shards/00000-0001.parquet", "shards/00000-0002.parquet",
        "shards/00001-0000.parquet", "shards/00002-0000.parquet"]
    assert all(f.rows is not None for f in two.files if f.path.endswith(".parquet"))
    assert pa.schema(read_shard(ArtifactStore(tmp_path / "one"), one, "shards/00000-0000.parquet").schema) == SCHEMA


@needs_data
def test_killed_build_resumes_from_finished_files(tmp_path, monkeypatch):
    first, second = tmp_path / "in" / "1.warc.gz", tmp_path / "in" / "2.warc.gz"
    first.parent.mkdir()
    first.write_bytes(ARCHIVE_ORG.read_bytes())
    second.write_bytes(CLUEWEB_JA.read_bytes())
    store = ArtifactStore(tmp_path / "store")
    real_ingest_file = ingest_module.ingest_file

    def dies_on_second_file(task):
        if task.index == 1:
            raise RuntimeError("killed")
        return real_ingest_file(task)

    monkeypatch.setattr(ingest_module, "ingest_file", dies_on_second_file)
    with pytest.raises(RuntimeError):
        ingest(tmp_path, [first, second], store=store, workers=1)
    assert nothing_committed(store)
    staged = next((tmp_path / "store" / "ingest").glob(".staging-*"))
    shard = staged / "shards" / "00000-0000.parquet"
    written = shard.stat().st_mtime_ns
    assert json.loads((staged / "sources" / "00000.json").read_text())["counts"]["documents"] == 94

    monkeypatch.setattr(ingest_module, "ingest_file", real_ingest_file)
    _, resumed = ingest(tmp_path, [first, second], store=store, workers=1)
    assert resumed.stats["files_resumed"] == 1
    assert (store.local_path(resumed, "shards/00000-0000.parquet")).stat().st_mtime_ns == written
    _, fresh = ingest(tmp_path, [first, second], store=ArtifactStore(tmp_path / "fresh"))
    assert shard_hashes(resumed) == shard_hashes(fresh)
    assert resumed.sources == fresh.sources
    assert {k: v for k, v in resumed.stats.items() if k not in ("seconds", "docs_per_second", "mb_per_second",
                                                               "files_resumed")} == \
        {k: v for k, v in fresh.stats.items() if k not in ("seconds", "docs_per_second", "mb_per_second",
                                                          "files_resumed")}


@needs_data
def test_a_changed_crawl_file_is_a_new_artifact(tmp_path):
    crawl = tmp_path / "crawl.warc.gz"
    crawl.write_bytes(ALIAS.read_bytes())
    store = ArtifactStore(tmp_path / "store")
    _, before = ingest(tmp_path, [crawl], store=store)
    crawl.write_bytes(CLUEWEB_JA.read_bytes())
    _, after = ingest(tmp_path, [crawl], store=store)
    assert after.fingerprint != before.fingerprint
    assert after.stats["documents"] == 29


# ---------------------------------------------------------------- every record accounted for


def accounted(counts) -> bool:
    return counts["records"] == counts["documents"] + sum(counts[f"skipped_{r}"] for r in SKIP_REASONS)


def http_record(i: int, claim_extra: int = 0) -> bytes:
    """One response record, with a Content-Length `claim_extra` bytes more than it holds."""
    body = f"<html><body><p>page {i} ".encode() + b"x" * 300 + b"</p></body></html>"
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + body
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://example.com/{i}\r\n"
            f"WARC-Date: 2024-01-01T00:00:00Z\r\nWARC-Record-ID: <urn:uuid:{i:08d}-0000-0000-0000-000000000000>\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http) + claim_extra}\r\n\r\n")
    return head.encode() + http + b"\r\n\r\n"


def test_a_record_longer_than_its_member_does_not_swallow_the_next(tmp_path):
    path = tmp_path / "six.warc.gz"
    path.write_bytes(b"".join(gzip.compress(http_record(i, 1500 if i == 2 else 0)) for i in range(6)))
    with open(path, "rb") as handle:
        assert sum(1 for _ in ArchiveIterator(handle)) == 6, "warcio reads all six"
    documents, counts = read_counts(path)
    assert counts["records"] == 6 and counts["skipped_truncated"] == 1 and accounted(counts)
    assert [d["url"] for d in documents] == [f"http://example.com/{i}" for i in (0, 1, 3, 4, 5)]


@needs_data
@pytest.mark.parametrize("path", [ARCHIVE_ORG, CLUEWEB_JA, ALIAS], ids=["warc0.17", "clueweb-warc0.18", "alias"])
def test_every_record_of_the_real_files_is_accounted_for(tmp_path, path):
    _, counts = read_counts(path)
    with open(path, "rb") as handle:
        assert counts["records"] == sum(1 for _ in ArchiveIterator(handle))
    assert accounted(counts)
    _, manifest = ingest(tmp_path, [path])
    sidecar = json.loads(ArtifactStore(tmp_path / "store").local_path(manifest, "sources/00000.json").read_text())
    assert accounted(sidecar["counts"]) and manifest.stats["records"] == counts["records"]


def damaged_variants(data: bytes, rng: random.Random, count: int):
    """(kind, damaged bytes, index of the one damaged member or None) of a gzipped WARC."""
    parts = members(data)
    kinds = ("truncate", "flip", "garbage", "length", "plain", "flip-member")
    for n in range(count):
        kind = kinds[n % len(kinds)]
        k = rng.randrange(len(parts))
        if kind == "truncate":
            yield kind, data[:rng.randrange(len(data))], None
        elif kind == "flip":
            damaged = bytearray(data)
            for _ in range(rng.randint(1, 10)):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
            yield kind, bytes(damaged), None
        elif kind == "garbage":
            at = rng.choice([sum(map(len, parts[:k])), rng.randrange(len(data))])
            yield kind, data[:at] + rng.randbytes(rng.randint(1, 2000)) + data[at:], None
        elif kind == "length":  # a Content-Length that lies, either way
            record = gzip.decompress(parts[k])
            wrong = re.sub(rb"Content-Length: (\d+)", lambda m: b"Content-Length: %d" % max(
                0, int(m.group(1)) + rng.choice([-200, -1, 1, 500, 10**6])), record, count=1)
            yield kind, b"".join(parts[:k]) + gzip.compress(wrong) + b"".join(parts[k + 1:]), k
        elif kind == "plain":  # some members stored uncompressed between gzipped ones
            plain = {rng.randrange(len(parts)) for _ in range(rng.randint(1, 3))} - {0}
            yield kind, b"".join(gzip.decompress(p) if i in plain else p for i, p in enumerate(parts)), None
        else:  # bytes flipped inside one member's compressed data
            member = bytearray(parts[k])
            for _ in range(rng.randint(1, 5)):
                member[rng.randrange(10, len(member))] ^= 0xFF
            yield kind, b"".join(parts[:k]) + bytes(member) + b"".join(parts[k + 1:]), k


@needs_data
def test_fuzz_damaged_warcs_never_crash_and_lose_no_record(tmp_path):
    """240 damaged variants of the real files: every one reads without a crash (or is refused as
    not a WARC file, in one line), every record read is counted once, and where one member is
    damaged, every document of the other members is still kept."""
    rng = random.Random(20261205)
    checked = 0
    for source in (CLUEWEB_JA, ALIAS):
        data = source.read_bytes()
        intact = {d["warc_record_id"]: i for i, part in enumerate(members(data))
                  for d in read_counts_bytes(tmp_path, part)[0]}
        for kind, damaged, member in damaged_variants(data, rng, 120):
            try:
                documents, counts = read_counts_bytes(tmp_path, damaged)
            except InputError as err:
                assert "not a WARC file" in str(err) and "\n" not in str(err), (kind, err)
                continue
            assert accounted(counts), (kind, counts)
            if member is not None:
                kept = {d["warc_record_id"] for d in documents}
                lost = [r for r, i in intact.items() if i != member and r not in kept]
                assert not lost, f"{kind}: records of intact members lost: {lost}"
            checked += 1
    assert checked >= 200


def read_counts_bytes(tmp_path, data: bytes):
    path = tmp_path / "variant.warc.gz"
    path.write_bytes(data)
    return read_counts(path)
