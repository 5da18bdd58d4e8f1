"""The offline default input: a small crawl of the standard library's documentation.

With no `--input`, Kiln needs a crawl that exists on every machine without a download. This
stage renders the installed Python's own documentation (module, class and function
docstrings, and the reference-manual topics of `pydoc_data`) as the pages of a documentation
site (see `sample_pages.py`) and writes them as WARC response records with warcio, together
with what a real crawl also holds: robots.txt, a redirect, a 404 page and an image.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from pydantic import Field
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipelines.common import InputError, Stage, StageConfig
from storage import ArtifactStore, ArtifactWriter, Manifest

PAGES_SCRIPT = Path(__file__).with_name("sample_pages.py")
CRAWL_DATE = "2024-06-01T00:00:00Z"  # fixed, so the same Python gives byte-identical WARCs


class SampleCrawlConfig(StageConfig):
    files: int = Field(4, ge=1, le=64, description="How many WARC files to split the crawl into.")
    max_pages: int | None = Field(None, ge=1, description="Keep only the first N pages (quick runs, tests).")


def render_pages() -> list[dict[str, str]]:
    """The documentation pages, rendered in a fresh interpreter that sees the stdlib only."""
    runner = f"import runpy; runpy.run_path({str(PAGES_SCRIPT)!r}, run_name='__main__')"
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory() as empty_dir:  # cwd on sys.path must shadow nothing
        result = subprocess.run(
            [sys.executable, "-S", "-s", "-c", runner], cwd=empty_dir, env=env,
            capture_output=True, text=True, encoding="utf-8",
        )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"{PAGES_SCRIPT}: rendering the sample documentation failed ({tail})")
    return [json.loads(line) for line in result.stdout.splitlines()]


def _record_id(url: str, kind: str) -> str:
    return f"<urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, kind + ':' + url)}>"


def _response(writer: WARCWriter, url: str, status: str, content_type: str, body: bytes, extra_headers=()):
    http_headers = StatusAndHeaders(
        status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra_headers],
        protocol="HTTP/1.1",
    )
    record = writer.create_warc_record(
        url, "response", payload=io.BytesIO(body), length=len(body), http_headers=http_headers,
        warc_headers_dict={"WARC-Date": CRAWL_DATE, "WARC-Record-ID": _record_id(url, "response")},
    )
    writer.write_record(record)


def _crawl_extras(host: str) -> list[tuple[str, str, str, bytes, tuple]]:
    """What a crawl of a documentation site holds besides its pages (all skipped by ingest)."""
    png = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000") + b"\0" * 16
    return [
        (f"{host}/robots.txt", "200 OK", "text/plain", b"User-agent: *\nAllow: /\n", ()),
        (f"{host}/library/", "301 Moved Permanently", "text/html", b"", (("Location", f"{host}/3/library/"),)),
        (f"{host}/3/library/missing.html", "404 Not Found", "text/html; charset=utf-8",
         b"<html><body><h1>404 Not Found</h1></body></html>", ()),
        (f"{host}/_static/logo.png", "200 OK", "image/png", png, ()),
    ]


def build_sample_crawl(config: SampleCrawlConfig, inputs: list[Manifest], store: ArtifactStore,
                       writer: ArtifactWriter) -> dict[str, Any]:
    pages = render_pages()[: config.max_pages]
    host = pages[0]["url"].split("/", 3)[:3]
    extras = _crawl_extras("/".join(host))
    html_bytes = 0
    for index in range(config.files):
        buffer = io.BytesIO()
        warc = WARCWriter(buffer, gzip=True, warc_version="1.1")
        for page in pages[index::config.files]:
            body = page["html"].encode("utf-8")
            html_bytes += len(body)
            _response(warc, page["url"], "200 OK", "text/html; charset=utf-8", body)
        if index < len(extras):
            _response(warc, *extras[index][:4], extra_headers=extras[index][4])
        writer.write_bytes(f"crawl/sample-{index:05d}.warc.gz", buffer.getvalue())
    return {"pages": len(pages), "html_bytes": html_bytes, "files": config.files,
            "python": sys.version.split()[0]}


# The pages depend on the Python that renders them: its version is part of the code version.
STAGE = Stage("sample-crawl", SampleCrawlConfig, build_sample_crawl,
              code_version=f"2-python{sys.version.split()[0]}")
