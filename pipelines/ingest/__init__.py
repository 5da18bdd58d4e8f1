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
documents + the skipped_<reason> counts (SKIP_REASONS), checked for every file (its numbers are
in `sources/<file>.json`); bytes (crawl files), document_bytes
(payloads kept); resyncs (damaged or foreign bytes skipped), parse_errors (fastwarc failures
in the fallback); charset_detected, decoded_with_bad_bytes, fetch_date_unparsed; seconds,
docs_per_second, mb_per_second (crawl bytes).

The package: this module is the stage (planning the files, one file as a unit of work, resume);
`config` its settings, `inputs` which files and how to open them, `warc` reading records
(fastwarc, and the resynchronising reader past damage), `records` a record as a row (or a skip
reason), `payload` HTTP bodies; charsets are pipelines/charset.py, shared with extraction.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipelines.common import InputError, Progress, Stage, merge_counts, shard_name
from pipelines.executor import executor_for
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.inputs import WARC_NAME, describe_sources, expand_input, expand_inputs, open_input
from pipelines.ingest.records import SCHEMA, SKIP_REASONS, empty_counts
from pipelines.ingest.warc import RawReader, read_documents
from storage import ArtifactStore, ArtifactWriter, Manifest

__all__ = ["STAGE", "IngestConfig", "build_ingest", "expand_inputs"]

log = logging.getLogger("kiln.ingest")


def build_ingest(config: IngestConfig, inputs: list[Manifest], store: ArtifactStore, writer: ArtifactWriter) -> dict:
    started = time.perf_counter()
    tasks = plan_files(config, inputs, store, writer)
    totals: dict[str, Any] = empty_counts()
    totals.update(files=len(tasks), files_resumed=0, shards=0)
    sources = []
    # records advance as each file completes: workers do not report from inside a file
    with executor_for(config, store) as executor, \
            Progress("ingest", total=None, unit="records", units=len(tasks)) as bar:
        for result, node in executor.map(ingest_file, tasks):
            for relpath, rows in result["shards"].items():
                writer.record_rows(relpath, rows)  # rows counted in a worker process are not in our writer
            check_accounting(result["source"], result["counts"])
            merge_counts(totals, result["counts"])
            totals["files_resumed"] += result["resumed"]
            totals["shards"] += len(result["shards"])
            if result["external"]:
                sources.append({"url": result["source"], "bytes": result["bytes"], "sha256": result["sha256"]})
            bar.unit_done(node, result["counts"]["records"], result["source"])
            log.info("ingest: %s: %d records, %d documents%s", result["source"], result["counts"]["records"],
                     result["counts"]["documents"], " (done in an earlier run)" if result["resumed"] else "")
    writer.sources = sources
    totals.update(executor.stats())
    # The names every stage reports (see flows/terminal_tables.py): records in, documents out.
    totals["documents_in"] = totals["records"]
    totals["documents_out"] = totals["documents"]
    totals["dropped"] = {reason: totals[f"skipped_{reason}"] for reason in SKIP_REASONS if totals[f"skipped_{reason}"]}
    seconds = time.perf_counter() - started
    totals["seconds"] = round(seconds, 3)
    totals["docs_per_second"] = round(totals["documents"] / seconds, 1) if seconds else None
    totals["mb_per_second"] = round(totals["bytes"] / 1e6 / seconds, 2) if seconds else None
    return totals


def check_accounting(source: str, counts: dict[str, int]) -> None:
    """Every record of a file is a document or skipped for a reason; a file whose numbers do
    not add up is a bug in the reader, never a file to commit."""
    skipped = sum(counts[f"skipped_{reason}"] for reason in SKIP_REASONS)
    if counts["records"] != counts["documents"] + skipped:
        raise RuntimeError(f"{source}: {counts['records']} records read, but {counts['documents']} documents "
                           f"+ {skipped} skipped; a record is unaccounted for")


STAGE = Stage("ingest", IngestConfig, build_ingest, code_version="1", describe_sources=describe_sources)


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


def plan_files(config: IngestConfig, inputs: list[Manifest], store: ArtifactStore,
               writer: ArtifactWriter) -> list[FileTask]:
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
            raise InputError("ingest: no inputs; give crawl files in `inputs` (paths, globs, URLs) "
                             "or an upstream artifact")
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

    with open_input(task.url, task.storage_options, config.timeout_s) as handle:
        raw = RawReader(handle, task.source)
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
