"""Ingest: WARC crawl files -> Parquet document shards (one row per HTML page or WET text).

Inputs are local paths, globs, directories, `file://` / `https://` / `s3://` URLs, Common Crawl
`warc.paths.gz` listings, and the `*.warc(.gz)` files of upstream artifacts. Each crawl file is
read once, front to back: its raw bytes are hashed for lineage as they stream past. Every input
file is one unit of work (parallel, resumable): it becomes `shards/<file>-<part>.parquet`, then
`sources/<file>.json` (its hash, stats and shards), written last, so a killed run skips the
files whose record is there.

Reading: fastwarc, in quirks mode, parses the file by itself: fast. When it stumbles on damage
(garbage between gzip members, a corrupt or truncated member), reading goes back to the last
good record and `WarcStream` takes over for the rest of the file: it inflates gzip members one
by one, skips what is not a member, and ends a broken member's record short (counted as
truncated) before going on at the next member. Plain WARCs: fastwarc skips to the next `WARC/`.

Why fastwarc, not warcio: both read the real files in ../shared/data identically (WARC/0.17,
ClueWeb's 0.18 with invalid dates and LF-only HTTP headers, 1.1), fastwarc only in quirks
mode, and fastwarc reads them 2.7-3.2x faster. Neither reads past garbage (warcio stops, fastwarc
raises on gzip damage), hence the fallback.

Stats (manifest.stats): files, files_resumed, shards; records (all WARC records read) =
documents + the skipped_<reason> counts (SKIP_REASONS); bytes (crawl files), document_bytes
(payloads kept); resyncs (damaged or foreign bytes skipped), parse_errors (fastwarc failures
in the fallback); charset_detected, decoded_with_bad_bytes, fetch_date_unparsed; seconds,
docs_per_second, mb_per_second (crawl bytes).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, ClassVar

import pyarrow as pa
from pydantic import Field

from pipelines.common import (InputError, KilnError, Progress, Stage, StageConfig, TransientError,
                              default_workers, merge_counts, parallel_map, shard_name)
from storage import ArtifactStore, ArtifactWriter, Manifest

log = logging.getLogger("kiln.ingest")


class IngestConfig(StageConfig):
    """What to read and what to keep. `workers`, `timeout_s` and `storage_options` change how
    the files are fetched, not what comes out, so they are not part of the fingerprint."""

    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers", "timeout_s", "storage_options"})

    inputs: list[str] = Field(default_factory=list, description=(
        "Crawl files: paths, globs, directories, file:// https:// s3:// URLs, or *.paths(.gz) listings"))
    paths_base_url: str = Field("https://data.commoncrawl.org/",
                                description="Base that relative lines of a *.paths listing are joined to")
    limit_files: int | None = Field(None, ge=1, description="Take only the first N crawl files")
    max_page_bytes: int = Field(5_000_000, ge=1, description="Skip pages larger than this (bytes)")
    max_docs_per_shard: int = Field(10_000, ge=1)
    max_shard_bytes: int = Field(128 << 20, ge=1, description="Start a new shard past this many page bytes")
    workers: int = Field(default_factory=default_workers, ge=1)
    timeout_s: float = Field(60.0, gt=0, description="Connect/read timeout for http(s) inputs")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="fsspec options for remote inputs (credentials, anon, ...)")


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
)

WARC_NAME = re.compile(r"\.(warc|wet|wat)(\.gz)?$", re.IGNORECASE)
LISTING_NAME = re.compile(r"paths(\.txt)?(\.gz)?$", re.IGNORECASE)
GLOB_CHARS = re.compile(r"[*?\[]")
GZIP_MAGIC = b"\x1f\x8b\x08"
READ_CHUNK = 1 << 20
RAW_WINDOW = 8 << 20        # raw bytes kept to go back to the last good record when fastwarc fails
RESYNC_WINDOW = 1 << 20     # raw bytes of a member kept to look for the next member in if it breaks
META_SCAN_BYTES = 4096      # where <meta charset> is looked for (WHATWG prescans 1024; real pages put it later)
DETECT_SAMPLE = 64 << 10    # bytes given to charset_normalizer
MAX_BAD_BYTES = 0.001       # a declared charset may fail on this share of bytes (at least 4): stray bytes
MAX_CONTROL_CHARS = 0.01    # more control characters than this in decoded text: binary, not a page


# ============================================================== the stage


def build_ingest(config: IngestConfig, inputs: list[Manifest], store: ArtifactStore, writer: ArtifactWriter) -> dict:
    started = time.perf_counter()
    tasks = plan_files(config, inputs, store, writer)
    totals: dict[str, Any] = empty_counts()
    totals.update(files=len(tasks), files_resumed=0, shards=0)
    sources = []
    # records advance as each file completes: workers do not report from inside a file
    with Progress("ingest", total=len(tasks), unit="files") as bar, \
            Progress("ingest", total=None, unit="records") as records_bar:
        for result in parallel_map(ingest_file, tasks, config.workers):
            for relpath, rows in result["shards"].items():
                writer.record_rows(relpath, rows)  # rows counted in a worker process are not in our writer
            merge_counts(totals, result["counts"])
            totals["files_resumed"] += result["resumed"]
            totals["shards"] += len(result["shards"])
            if result["external"]:
                sources.append({"url": result["source"], "bytes": result["bytes"], "sha256": result["sha256"]})
            bar.advance()
            records_bar.advance(result["counts"]["records"])
            log.info("ingest: %s: %d records, %d documents%s", result["source"], result["counts"]["records"],
                     result["counts"]["documents"], " (done in an earlier run)" if result["resumed"] else "")
    writer.sources = sources
    # The names every stage reports (see flows/summary.py): records in, documents out.
    totals["documents_in"] = totals["records"]
    totals["documents_out"] = totals["documents"]
    totals["dropped"] = {reason: totals[f"skipped_{reason}"] for reason in SKIP_REASONS if totals[f"skipped_{reason}"]}
    seconds = time.perf_counter() - started
    totals["seconds"] = round(seconds, 3)
    totals["docs_per_second"] = round(totals["documents"] / seconds, 1) if seconds else None
    totals["mb_per_second"] = round(totals["bytes"] / 1e6 / seconds, 2) if seconds else None
    return totals


def expand_inputs(config: IngestConfig) -> list[str]:
    """`config.inputs` as crawl file locations, deduplicated, capped at `limit_files`.
    Raises InputError for a missing path, a glob that matches nothing, a bad listing."""
    files = [url for spec in config.inputs for url in expand_input(spec, config)]
    return list(dict.fromkeys(files))[: config.limit_files]


def describe_sources(config: IngestConfig) -> list[list]:
    """What identifies the crawl files right now, for the fingerprint: each file's location
    with its size and modification time (local) or ETag / Last-Modified (remote)."""
    described = []
    for url in expand_inputs(config):
        if "://" not in url:
            stat = os.stat(url)
            described.append([url, stat.st_size, stat.st_mtime_ns])
            continue
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(url, **_fs_options(url, config.storage_options, config.timeout_s))
            info = fs.info(path)
            described.append([url, info.get("size"), info.get("ETag") or info.get("LastModified") or info.get("mtime")])
        except Exception:  # noqa: BLE001 - unreachable now: the build itself reports it properly
            described.append([url, None, None])
    return described


STAGE = Stage("ingest", IngestConfig, build_ingest, code_version="1", describe_sources=describe_sources)


def empty_counts() -> dict[str, int]:
    counts = {"records": 0, "documents": 0}
    counts.update({f"skipped_{reason}": 0 for reason in SKIP_REASONS})
    counts.update(bytes=0, document_bytes=0, resyncs=0, parse_errors=0, charset_detected=0,
                  decoded_with_bad_bytes=0, fetch_date_unparsed=0)
    return counts


# ============================================================== planning: which files


@dataclass(frozen=True)
class FileTask:
    """One crawl file to ingest; picklable, for a worker process."""

    index: int
    source: str                          # the name in the `source` column and in manifest.sources
    url: str                             # what fsspec (or open()) reads
    config: IngestConfig
    writer: ArtifactWriter
    storage_options: dict[str, Any] = field(default_factory=dict)
    expected_sha256: str | None = None   # set for upstream artifact files: checked as we read
    external: bool = True                # from outside the store: lineage ends here


def plan_files(config: IngestConfig, inputs: list[Manifest], store: ArtifactStore, writer: ArtifactWriter) -> list[FileTask]:
    """The crawl files, in a fixed order: upstream artifacts' files, then `config.inputs` expanded."""
    found: list[tuple[str, str, dict, str | None, bool]] = []
    for manifest in inputs:
        for entry in manifest.files:
            if WARC_NAME.search(entry.path):
                found.append((f"{manifest.stage}/{manifest.fingerprint}/{entry.path}", store.uri(manifest, entry.path),
                              store.storage_options, entry.sha256, False))
    for spec in config.inputs:
        for url in expand_input(spec, config):
            found.append((url, url, config.storage_options, None, True))
    if not found:
        if not config.inputs and not inputs:
            raise InputError("ingest: no inputs; give crawl files in `inputs` (paths, globs, URLs) or an upstream artifact")
        raise InputError("ingest: the upstream artifacts hold no .warc/.warc.gz files")
    seen, unique = set(), []
    for item in found:
        if item[1] not in seen:
            seen.add(item[1])
            unique.append(item)
    if config.limit_files is not None:
        unique = unique[: config.limit_files]
    return [FileTask(i, source, url, config, writer, options, sha, external)
            for i, (source, url, options, sha, external) in enumerate(unique)]


def expand_input(spec: str, config: IngestConfig) -> list[str]:
    """One `inputs` entry -> crawl file locations (absolute local paths or URLs)."""
    spec = spec.strip()
    if not spec:
        raise InputError("ingest: an empty string in `inputs`")
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    remote = "://" in spec
    if GLOB_CHARS.search(spec):
        matches = _glob_remote(spec, config) if remote else sorted(
            os.path.abspath(p) for p in _glob_local(spec) if os.path.isfile(p))
        if not matches:
            raise InputError(f"{spec}: the glob matches no file")
        return [url for match in matches for url in (_listing(match, config) if _is_listing(match) else [match])]
    if remote:
        return _listing(spec, config) if _is_listing(spec) else [spec]
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if WARC_NAME.search(name))
        if not files:
            raise InputError(f"{spec}: the directory holds no .warc/.warc.gz files")
        return files
    if not os.path.exists(path):
        raise InputError(f"{spec}: no such file")
    return _listing(path, config) if _is_listing(path) else [path]


def _glob_local(pattern: str) -> list[str]:
    import glob

    return glob.glob(os.path.expanduser(pattern), recursive=True)


def _glob_remote(pattern: str, config: IngestConfig) -> list[str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(pattern, **_fs_options(pattern, config.storage_options, config.timeout_s))
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
    except Exception as err:
        raise _remote_error(pattern, err) from None


def _is_listing(location: str) -> bool:
    return bool(LISTING_NAME.search(location.rsplit("/", 1)[-1])) and not WARC_NAME.search(location)


def _listing(location: str, config: IngestConfig) -> list[str]:
    """A Common Crawl `warc.paths.gz`: one path per line, relative to `paths_base_url`."""
    try:
        with _open(location, config.storage_options, config.timeout_s) as handle:
            data = handle.read()
    except KilnError:
        raise
    except Exception as err:
        raise _remote_error(location, err) from None
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{location}: a broken gzip listing ({err})") from None
    base = config.paths_base_url.rstrip("/") + "/"
    urls = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line or line.startswith("/"):
            urls.append(line)
        else:
            urls.append(base + line.lstrip("/"))
        if config.limit_files is not None and len(urls) >= config.limit_files:
            break  # listings name tens of thousands of files
    if not urls:
        raise InputError(f"{location}: the listing names no files")
    return urls


# ============================================================== one file (runs in a worker)


def sidecar_name(index: int) -> str:
    return f"sources/{index:05d}.json"


def ingest_shard_name(index: int, part: int) -> str:
    """`shards/00003-0001.parquet`: file index then part, so names never depend on the workers."""
    return shard_name(index).removesuffix(".parquet") + f"-{part:04d}.parquet"


def ingest_file(task: FileTask) -> dict[str, Any]:
    """Read one crawl file into its shards; returns its counts, hash and shard row counts."""
    writer, config = task.writer, task.config
    done = _previous_result(task)
    if done is not None:
        return done
    counts = empty_counts()
    shards: dict[str, int] = {}
    buffer = _ShardBuffer()

    def flush() -> None:
        relpath = ingest_shard_name(task.index, len(shards))
        table = buffer.table()
        if not writer.done(relpath):  # a killed run left it complete: same input, same bytes
            writer.write_parquet(relpath, table)
        shards[relpath] = table.num_rows

    with _open(task.url, task.storage_options, config.timeout_s) as handle:
        raw = _RawReader(handle, task.source)
        for row in read_documents(raw, task.source, config, counts):
            buffer.add(row)
            if len(buffer) >= config.max_docs_per_shard or buffer.bytes >= config.max_shard_bytes:
                flush()
        raw.drain()
    if buffer or not shards:
        flush()  # one shard per file at least, so an empty crawl file still has a (typed, empty) shard
    _remove_stale_shards(writer, task.index, shards)
    counts["bytes"] = raw.bytes
    sha256 = raw.sha256.hexdigest()
    if task.expected_sha256 and sha256 != task.expected_sha256:
        raise InputError(f"{task.source}: sha256 differs from its artifact's manifest; the file changed after commit")
    result = {"index": task.index, "source": task.source, "bytes": raw.bytes, "sha256": sha256,
              "external": task.external, "counts": counts, "shards": shards}
    writer.write_json(sidecar_name(task.index), result)  # last: marks the file done
    return {**result, "resumed": False}


def _previous_result(task: FileTask) -> dict[str, Any] | None:
    """The result a killed run recorded for this file, when it recorded one for the same file."""
    relpath = sidecar_name(task.index)
    if not task.writer.done(relpath):
        return None
    try:
        with task.writer.fs.open(task.writer.path(relpath), "rb") as handle:
            result = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    if result.get("source") != task.source or not all(task.writer.done(p) for p in result.get("shards", {})):
        return None  # a glob now expands differently, or shards went missing: redo the file
    counts = empty_counts()
    counts.update(result["counts"])
    return {**result, "counts": counts, "resumed": True}


def _remove_stale_shards(writer: ArtifactWriter, index: int, keep: dict[str, int]) -> None:
    """Parts a killed run wrote for another file at this index (its glob expanded differently)."""
    pattern = writer.path(ingest_shard_name(index, 0).replace("-0000.parquet", "-*.parquet"))
    root = writer.workdir.rstrip("/") + "/"
    for path in writer.fs.glob(pattern):
        relpath = path[len(root):] if path.startswith(root) else path
        if relpath not in keep:
            writer.fs.rm(path)


class _ShardBuffer:
    """Rows of the shard being filled, column by column."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.columns: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.bytes = 0

    def add(self, row: dict[str, Any]) -> None:
        for name, values in self.columns.items():
            values.append(row[name])
        self.bytes += row["payload_bytes"]

    def __len__(self) -> int:
        return len(self.columns["id"])

    def table(self) -> pa.Table:
        # from_arrays, not pa.table(dict): that one imports pandas (0.3 s) to check its argument
        table = pa.Table.from_arrays([pa.array(self.columns[f.name], f.type) for f in SCHEMA], schema=SCHEMA)
        self.clear()
        return table


# ============================================================== opening files, and their errors


def _fs_options(url: str, storage_options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    options = dict(storage_options)
    if url.startswith(("http://", "https://")) and "client_kwargs" not in options:
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)}
    return options


def _open(location: str, storage_options: dict[str, Any], timeout_s: float) -> BinaryIO:
    if "://" not in location:
        try:
            return open(location, "rb")
        except FileNotFoundError:
            raise InputError(f"{location}: no such file") from None
        except OSError as err:
            raise InputError(f"{location}: cannot be read ({err.strerror or err})") from None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(location, **_fs_options(location, storage_options, timeout_s))
        if location.startswith(("http://", "https://")):
            return fs.open(path, "rb", block_size=0)  # stream it; no range requests
        return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")
    except Exception as err:
        raise _remote_error(location, err) from None


def _remote_error(location: str, err: BaseException, reading: bool = False) -> KilnError:
    """A network or storage failure as InputError (will fail again) or TransientError (may pass)."""
    chain, cause = [], err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        status = getattr(cause, "status", None) or getattr(cause, "status_code", None)
        if isinstance(status, int) and status >= 400:
            if status >= 500 or status in (408, 425, 429):
                return TransientError(f"{location}: HTTP {status}; may pass, retry later")
            reason = {401: "access denied", 403: "access denied", 404: "not found", 410: "gone"}.get(status, "refused")
            return InputError(f"{location}: {reason} (HTTP {status})")
    names = {type(c).__name__ for c in chain}
    if any(isinstance(c, TimeoutError) for c in chain) or names & {"ServerTimeoutError", "ReadTimeoutError", "ConnectTimeoutError"}:
        return TransientError(f"{location}: timed out; may pass, retry later")
    if names & {"gaierror", "ClientConnectorDNSError"}:
        return InputError(f"{location}: unreachable (unknown host)")
    if reading and any(isinstance(c, (ConnectionError, OSError)) for c in chain):
        return TransientError(f"{location}: connection lost while reading ({type(chain[-1]).__name__}); may pass")
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "ClientConnectorError" in names:
        return InputError(f"{location}: unreachable (connection refused)")
    if names & {"ServerDisconnectedError", "ClientPayloadError", "ClientOSError"} or any(
            isinstance(c, ConnectionResetError) for c in chain):
        return TransientError(f"{location}: connection lost ({type(chain[-1]).__name__}); may pass")
    if any(isinstance(c, PermissionError) for c in chain):
        return InputError(f"{location}: access denied")
    if any(isinstance(c, FileNotFoundError) for c in chain):
        return InputError(f"{location}: not found")
    detail = str(chain[-1]).strip().splitlines()[0][:200] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return InputError(f"{location}: cannot be read ({detail})")


class _RawReader:
    """The crawl file's bytes, read once, front to back, hashed and counted on the way.

    The last RAW_WINDOW bytes are kept, so a reader can `rewind` a little (to the last good
    record, after fastwarc stumbles) without reading or hashing anything twice.
    """

    def __init__(self, handle: BinaryIO, source: str):
        self.handle, self.source = handle, source
        self.sha256 = hashlib.sha256()
        self.bytes = 0                   # read from the file (and hashed)
        self.position = 0                # handed out; below `bytes` while replaying
        self._window = bytearray()       # raw bytes from _window_start to `bytes`
        self._window_start = 0
        self._replay = b""

    def read(self, size: int = READ_CHUNK) -> bytes:
        if size is None or size < 0:
            size = READ_CHUNK
        if self._replay:
            data, self._replay = self._replay[:size], self._replay[size:]
            self.position += len(data)
            return data
        try:
            data = self.handle.read(size)
        except KilnError:
            raise
        except Exception as err:
            if "://" not in self.source and isinstance(err, OSError):
                raise InputError(f"{self.source}: read error ({err})") from None
            raise _remote_error(self.source, err, reading=True) from None
        self.sha256.update(data)
        self.bytes += len(data)
        self.position += len(data)
        self._window += data
        if len(self._window) > 2 * RAW_WINDOW:
            cut = len(self._window) - RAW_WINDOW
            del self._window[:cut]
            self._window_start += cut
        return data

    def tell(self) -> int:
        return self.position

    def rewind(self, offset: int) -> bool:
        """Serve the bytes from `offset` again; False when they are no longer kept."""
        if not self._window_start <= offset <= self.bytes:
            return False
        self._replay = bytes(self._window[offset - self._window_start:])
        self.position = offset
        return True

    def drain(self) -> None:
        """Hash what the parser did not need (trailing bytes after the last record)."""
        self._replay = b""
        while self.read():
            pass


def check_is_warc(raw: _RawReader, source: str) -> bool:
    """Whether the file is gzipped; InputError when it is no WARC file at all."""
    head = raw.read(1 << 16)
    raw.rewind(0)
    if head[:3] == GZIP_MAGIC:
        try:
            inner = zlib.decompressobj(31).decompress(head, 64)
        except zlib.error:
            inner = b""
        if inner.lstrip()[:5] != b"WARC/":
            raise InputError(f"{source}: not a WARC file (gzip, but what it holds is not WARC)")
        return True
    if head[:64].lstrip()[:5] == b"WARC/":
        return False
    kinds = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
             (b"%PDF", "a PDF document"), (b"PK\x03\x04", "a ZIP archive"), (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
             (b"BZh", "bzip2-compressed"), (b"\xfd7zXZ", "xz-compressed"), (b"filedesc://", "an ARC file")]
    what = next((name for magic, name in kinds if head.startswith(magic)), None)
    if what is None:
        what = "an empty file" if not head else f"starts with {head[:24]!r}"
    raise InputError(f"{source}: not a WARC file ({what})")


# ============================================================== the decompressed stream


class WarcStream:
    """The WARC bytes of a crawl file, from where the raw reader is, as a file-like object for
    fastwarc (read, tell): the slow but sure way, for files fastwarc stumbles on.

    Gzip files are inflated member by member. Bytes that are not a gzip member are skipped up
    to the next member (`resyncs`). A member that breaks (truncated, corrupt) ends the current
    segment: `read` returns b"" there, so the record being read comes out short, and
    `next_segment()` moves on to the next member found after the broken one's start.
    """

    def __init__(self, raw: _RawReader, gzipped: bool, skip_first_member: bool = False):
        self.raw, self.gzip = raw, gzipped
        self.resyncs = 0
        self._skip_member = skip_first_member   # inflate it to find its end, but its record is done
        self._pending_raw = raw.tell()          # raw offset of _pending[0]
        self._pending = raw.read(READ_CHUNK)    # raw bytes not yet inflated, from _pending_off on
        self._pending_off = 0
        self._raw_eof = not self._pending
        self._buf, self._buf_off = b"", 0       # WARC bytes not yet read
        self._pos = 0                           # WARC bytes handed out (tell)
        self._produced = 0                      # WARC bytes made so far
        self._segment_end = False
        self._inflater = None
        self._feed = 4 << 10                    # raw bytes given to the inflater at a time
        self._tail = b""                        # input the inflater has not consumed yet
        self._member_raw = bytearray()          # the current member's raw bytes (its last RESYNC_WINDOW)
        self._member_out = 0                    # bytes it has inflated to
        self._member_from_start = True
        self._resync_from: bytes | None = None  # set when a member broke
        self.members: deque[tuple[int, int]] = deque([(0, self._pending_raw)])  # (WARC, raw) offsets

    # -------------------------------------------------------- file protocol for fastwarc

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (fewer before a piece boundary); b"" at the end of the segment."""
        while self._buf_off >= len(self._buf):
            if self._segment_end:
                return b""
            self._buf, self._buf_off = self._produce(), 0
        if size is None or size < 0:
            size = len(self._buf)
        data = self._buf[self._buf_off:self._buf_off + size]
        self._buf_off += len(data)
        self._pos += len(data)
        return data

    def tell(self) -> int:
        return self._pos

    # -------------------------------------------------------- segments

    def next_segment(self) -> bool:
        """After a break: go on at the next gzip member (dropping what the reader left of the
        broken one); plain files go on where they are. False at the end."""
        if self.gzip:
            self._buf, self._buf_off = b"", 0
        if self._resync_from is not None:
            # the next member may start inside the bytes the broken inflater swallowed
            self._pending = self._resync_from + self._pending[self._pending_off:]
            self._pending_raw = self._raw_offset() - len(self._resync_from)
            self._pending_off = 0
            self._resync_from = None
        self._segment_end = False
        return not (self._raw_eof and self._pending_off >= len(self._pending) and not self._tail)

    def abandon_member(self) -> None:
        """The parser failed: skip the rest of the current gzip member (plain: carry on)."""
        if self.gzip and self._inflater is not None:
            self._break_member(salvage=False)
        self._segment_end = True

    def raw_offset_of(self, position: int) -> int:
        """The raw offset of the gzip member holding WARC offset `position` (itself when plain)."""
        if not self.gzip:
            return position
        while len(self.members) > 1 and self.members[1][0] <= position:
            self.members.popleft()
        return self.members[0][1]

    # -------------------------------------------------------- internals

    def _raw_offset(self) -> int:
        return self._pending_raw + self._pending_off

    def _fill_pending(self, at_least: int) -> None:
        while len(self._pending) - self._pending_off < at_least and not self._raw_eof:
            more = self.raw.read(READ_CHUNK)
            if not more:
                self._raw_eof = True
                break
            self._pending_raw += self._pending_off
            self._pending, self._pending_off = self._pending[self._pending_off:] + more, 0

    def _take_raw(self, size: int) -> bytes:
        """The next raw bytes; always a slice of _pending that ends at _pending_off."""
        if self._pending_off >= len(self._pending):
            self._fill_pending(1)
        data = self._pending[self._pending_off:self._pending_off + size]
        self._pending_off += len(data)
        return data

    def _produce(self) -> bytes:
        """The next piece of WARC bytes; b"" (and _segment_end) at a break or at the end."""
        if not self.gzip:
            data = self._take_raw(READ_CHUNK)
            if not data:
                self._segment_end = True
            self._produced += len(data)
            return data
        if self._inflater is None and not self._start_member():
            self._segment_end = True
            return b""
        # Small bites for small members (most hold one record of a few KB: what is left over is
        # copied back), growing for big ones.
        data = self._tail or self._take_raw(self._feed)
        if not data:  # the file ends inside this member
            return self._break_member()
        if not self._tail:
            self._remember(data)
            self._feed = min(self._feed * 2, 256 << 10)
        try:
            out = self._inflater.decompress(data, READ_CHUNK)
        except zlib.error:
            return self._break_member()
        if self._inflater.eof:
            # unused_data is a suffix of the slice taken from _pending: give it back
            self._pending_off -= len(self._inflater.unused_data)
            self._inflater, self._tail, self._member_raw = None, b"", bytearray()
            if self._skip_member:
                self._skip_member = False
                return b""
        else:
            self._tail = self._inflater.unconsumed_tail
        if self._skip_member:
            return b""
        self._produced += len(out)
        self._member_out += len(out)
        return out

    def _remember(self, data: bytes) -> None:
        self._member_raw += data
        if len(self._member_raw) > 2 * RESYNC_WINDOW:
            del self._member_raw[: len(self._member_raw) - RESYNC_WINDOW]
            self._member_from_start = False

    def _break_member(self, salvage: bool = True) -> bytes:
        """End the segment at a damaged member; returns what it held before the damage."""
        rest = self._salvage() if salvage and not self._skip_member else b""
        self._skip_member = False
        self._resync_from = bytes(self._member_raw[1:] if self._member_from_start else self._member_raw)
        self._inflater, self._tail, self._member_raw = None, b"", bytearray()
        self._segment_end = True
        self._produced += len(rest)
        return rest

    def _salvage(self) -> bytes:
        """Inflate the broken member again in small steps: a zlib error loses the output of the
        call that hit it, and without that output the damaged record would vanish uncounted."""
        if not self._member_from_start:
            return b""
        inflater, pieces, raw = zlib.decompressobj(31), [], bytes(self._member_raw)
        for start in range(0, len(raw), 512):
            try:
                pieces.append(inflater.decompress(raw[start:start + 512]))
            except zlib.error:
                break
            if inflater.eof:
                break
        return b"".join(pieces)[self._member_out:]

    def _start_member(self) -> bool:
        """Move to the next gzip member, skipping anything else; False at the end of the file."""
        skipped = False
        while True:
            self._fill_pending(10)
            if self._pending_off >= len(self._pending):
                self.resyncs += skipped
                return False
            at = self._pending.find(GZIP_MAGIC, self._pending_off)
            flags = self._pending[at + 3:at + 4]
            if at == self._pending_off and (not flags or flags[0] < 0x20):
                break  # a gzip header: magic, deflate, no reserved flag bits
            skipped = True
            if at < 0:  # keep 2 bytes: a magic may straddle the end of the chunk
                self._pending_off = len(self._pending) if self._raw_eof else max(self._pending_off, len(self._pending) - 2)
            else:
                self._pending_off = at if at > self._pending_off else at + 1
        self.resyncs += skipped
        self._skip_member = self._skip_member and not skipped  # not at the member we were to skip
        self._inflater, self._feed, self._member_out = zlib.decompressobj(31), 4 << 10, 0
        self._member_raw, self._member_from_start = bytearray(), True
        self.members.append((self._produced, self._raw_offset()))
        return True


# ============================================================== records -> documents


def read_documents(raw: _RawReader, source: str, config: IngestConfig, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
    """Rows for the HTML pages (and WET texts) of one crawl file; counts what it skips, by reason.

    fastwarc reads the file itself (fast) until it fails on damage; from the record after the
    last good one, `WarcStream` takes over (slower, but it reads past damage).
    """
    from fastwarc.warc import ArchiveIterator

    gzipped = check_is_warc(raw, source)
    state: dict[str, Any] = {"last": None}
    records = ArchiveIterator(raw, parse_http=True, quirks_mode=True, auto_decode="none", stream_detect=gzipped)
    error = yield from _rows(iter(records), lambda position: position, source, config, counts, state)
    if error is None:
        return
    log.warning("%s: %s near byte %d; reading on past the damage", source, _one_line(error), raw.tell())
    # Back to the gzip member of the last good record (skipped, then on from its end), or for
    # plain files just past that record's start (fastwarc finds the next `WARC/` line).
    last = state["last"]
    resume = 0 if last is None else last if gzipped else last + 1
    if not raw.rewind(resume):
        counts["parse_errors"] += 1  # too far back to go there: what lies between is lost
    stream = WarcStream(raw, gzipped, skip_first_member=gzipped and last is not None)
    try:
        while True:
            started_at = stream.tell()
            records = ArchiveIterator(stream, parse_http=True, quirks_mode=True, auto_decode="none",
                                      stream_detect=False)
            error = yield from _rows(iter(records), stream.raw_offset_of, source, config, counts, state)
            if error is not None:
                counts["parse_errors"] += 1
                log.warning("%s: WARC parse error near byte %d (%s); skipping ahead", source, raw.tell(),
                            _one_line(error))
                if stream.tell() == started_at:
                    return  # no progress: give up on the rest of this file
                stream.abandon_member()
            if not stream.next_segment():
                return
    finally:
        counts["resyncs"] += stream.resyncs


def _rows(records: Iterator, offset_of, source: str, config: IngestConfig, counts: dict[str, int],
          state: dict[str, Any]):
    """Rows from a fastwarc iterator until it ends (returns None) or fails (returns the error)."""
    from fastwarc.warc import WarcRecordType

    kinds = {int(WarcRecordType.response): "response", int(WarcRecordType.conversion): "conversion"}
    while True:
        try:
            record = next(records)
        except StopIteration:
            return None
        except BaseException as err:  # fastwarc's Rust panics are BaseExceptions
            _reraise_if_fatal(err)
            return err
        state["last"] = record.stream_pos
        counts["records"] += 1
        kind = kinds.get(int(record.record_type))
        if kind is None:
            counts["skipped_record_type"] += 1
            continue
        row = _document(record, kind, source, offset_of(record.stream_pos), config, counts)
        if isinstance(row, str):
            counts[f"skipped_{row}"] += 1
        else:
            counts["documents"] += 1
            counts["document_bytes"] += row["payload_bytes"]
            yield row


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _reraise_if_fatal(err: BaseException) -> None:
    if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit, KilnError)):
        raise err


def _document(record, kind: str, source: str, offset: int, config: IngestConfig,
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
        _reraise_if_fatal(err)
        return "truncated"
    if len(body) < length:
        return "truncated"
    if http is not None:
        try:
            body = decode_payload(body, http.get("Transfer-Encoding"), http.get("Content-Encoding"), config.max_page_bytes)
        except _TooLarge:
            return "too_large"
        except ValueError:
            return "bad_encoding"
        if sniff:
            if not looks_like_html(body):
                return "not_html"
            mime = "text/html"
    if not body or body.isspace():
        return "empty"
    decoded = _decode(body, label, html=kind == "response")
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


# ============================================================== HTTP payloads

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


class _TooLarge(Exception):
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
            raise _TooLarge()
    return body


_CHUNK_LINE = re.compile(rb"[0-9a-fA-F]{1,8}[ \t]*(?:;[^\r\n]*)?\r?\n")


def _dechunk(body: bytes) -> bytes:
    parts, pos = [], 0
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
            raise _TooLarge()
        return out + inflater.flush() if not inflater.unconsumed_tail else out
    raise ValueError("does not inflate")


def _looks_like_text(body: bytes) -> bool:
    head = body[:512].lstrip(b"\xef\xbb\xbf\xfe\xff \t\r\n")
    return head[:1] == b"<" or (bool(head) and b"\x00" not in head and sum(b < 9 or 13 < b < 32 for b in head) == 0)


# ============================================================== charsets

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


def _c1_passthrough(err: UnicodeDecodeError) -> tuple[str, int]:
    # WHATWG windows-1252 maps the 5 bytes cp1252 leaves undefined to the C1 controls
    return err.object[err.start:err.end].decode("latin-1"), err.end


def _cp1252_repair(err: UnicodeDecodeError) -> tuple[str, int]:
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


def decode_text(body: bytes, declared: str | None, html: bool = True) -> tuple[str, str, str, bool] | None:
    """Bytes -> (text, codec, where the charset came from, whether bad bytes were replaced), or None.

    Order: a byte-order mark; the declared charset (HTTP header, then `<meta>`); UTF-8; the
    declared charset (or UTF-8) again, tolerating a few bad bytes (mixed-up pages are common);
    then charset_normalizer's guess. A decoding that yields binary garbage counts as a failure.
    """
    decoded = _decode(body, declared, html)
    if decoded is None:
        return None
    text, *how = decoded
    return (text.decode("utf-8") if isinstance(text, bytes) else text, *how)


def _decode(body: bytes, declared: str | None, html: bool) -> tuple[str | bytes, str, str, bool] | None:
    """`decode_text`, but text that is valid UTF-8 comes back as those bytes."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            text = _decode_strict(body[len(bom):], codec)
            if text is not None and _is_text(text):
                return text, codec, "bom", False
            break
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


# ============================================================== dates

_WARC_DATE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?\s*(Z|[+-]\d{2}:?\d{2})?", re.IGNORECASE)


def parse_warc_date(value: str | None) -> str | None:
    """WARC-Date as ISO 8601 UTC (`2008-04-30T20:48:25Z`); None when it is not a real date
    (ClueWeb09 writes days like `2008-10-294`)."""
    if not value:
        return None
    value = value.strip()
    try:
        if re.fullmatch(r"\d{14}", value):  # ARC-style 20080430204825
            moment = datetime.strptime(value, "%Y%m%d%H%M%S").replace(tzinfo=timezone.utc)
        else:
            match = _WARC_DATE.fullmatch(value)
            if not match:
                return None
            year, month, day, hour, minute, second, fraction, zone = match.groups()
            micro = int((fraction or "0")[:6].ljust(6, "0"))
            moment = datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0),
                              micro, tzinfo=timezone.utc)
            if zone and zone.upper() != "Z":
                sign = 1 if zone[0] == "+" else -1
                digits = zone[1:].replace(":", "")
                moment -= sign * timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
    except (ValueError, OverflowError):
        return None
    micro = moment.microsecond
    timespec = "seconds" if not micro else "milliseconds" if micro % 1000 == 0 else "microseconds"
    return moment.isoformat(timespec=timespec).replace("+00:00", "Z")


