"""The clean stage: the main text of every ingested page, filtered with datatrove's blocks.

Each input shard runs through one chain of datatrove steps, every step's `run()` generator
feeding the next exactly as in a datatrove pipeline, and becomes one output shard:

    url_filter → extraction → language → gopher_repetition → gopher_quality → c4_quality
    → fineweb_quality → pii

The steps and their settings are in pipelines/steps.py. The URL filter goes first
because it reads the URL alone: a blocklisted page costs no extraction. The Gopher, C4 and
FineWeb filters count words and sentences with spaCy's English tokenizer rules restated as one
regular expression (pipelines/words.py, 20 times as fast as spaCy; `tokenizer="spacy"` runs
spaCy itself). The Gopher and C4 filters and py3langid's language identifier are
pipelines/quality.py's subclasses of them, which decide the same in a fraction of the time.
Filters count what they drop by reason
(datatrove's `dropped_<reason>`); those counts, summed over shards, are the manifest's stats.
Shards are cleaned in parallel worker processes; each output shard depends on its input shard
alone, so the artifact is the same for any number of workers, and a killed run resumes from
the shards it finished.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.utils.stats import Stats
from pydantic import Field

from pipelines.common import (
    InputError,
    Progress,
    Stage,
    document_shards,
    merge_counts,
    read_shard,
    shard_name,
)
from pipelines.executor import ParallelStageConfig, executor_for
from pipelines.steps import (
    NEEDS_EXTRACTION,
    REASON,
    C4QualityConfig,
    ExtractionConfig,
    ExtractionStep,
    FineWebQualityConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageFilterConfig,
    PIIConfig,
    UrlFilterConfig,
)
from pipelines.words import ENGLISH_WORDS
from storage import ArtifactStore, ArtifactWriter, Manifest

__all__ = ["STAGE", "STEP_ORDER", "CleanConfig", "build_clean", "clean_steps"]

log = logging.getLogger("kiln")

STATS_KEY = b"kiln.clean.stats"  # a shard's counts, kept in its Parquet metadata for resumed runs


# ------------------------------------------------------------------ config


class CleanConfig(ParallelStageConfig):
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


def clean_steps(config: CleanConfig) -> list[tuple[str, PipelineStep]]:
    """The enabled steps in chain order, with their names, each built by its settings. Steps
    are built once per process for given settings (the URL blocklists take seconds and
    hundreds of MB to load) and shared: `_clean_shard` resets their stats before each shard."""
    words = ENGLISH_WORDS[config.tokenizer]
    steps = []
    for name in STEP_ORDER:
        settings = getattr(config, name)
        if getattr(settings, "enabled", True):
            key = (name, config.tokenizer, settings.model_dump_json())  # the settings, as a cache key
            if key not in _BUILT:
                if len(_BUILT) >= 16:
                    _BUILT.clear()
                _BUILT[key] = settings.build(words)
            steps.append((name, _BUILT[key]))
    return steps


_BUILT: dict[tuple[str, str, str], PipelineStep] = {}


# ------------------------------------------------------------------ one shard


class _Rejects:
    """datatrove's exclusion-writer protocol, keeping the rejected documents in memory."""

    def __init__(self):
        self.documents: list[Document] = []

    def __enter__(self) -> _Rejects:
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
        if isinstance(step, ExtractionStep):
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
    inner = step.extractor if isinstance(step, ExtractionStep) and step.isolate else step
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
    known = [r for r in rows if r is not None]
    total = sum(known) if len(known) == len(rows) else None

    started = time.perf_counter()
    processed = 0
    step_seconds: dict[str, float] = {}
    with executor_for(config, store) as executor, Progress("clean", total, unit="docs", units=len(shards)) as bar:
        bar.advance(sum(r["documents_in"] for r in results if r))
        for task, (result, node) in zip(todo, executor.map(_clean_shard, todo)):
            results[task.index] = result["counts"]
            processed += result["counts"]["documents_in"]
            merge_counts(step_seconds, result["step_seconds"])
            bar.unit_done(node, result["counts"]["documents_in"], task.relpath)
    wall = time.perf_counter() - started
    return {**_stats(results, processed, wall, step_seconds, resumed=len(shards) - len(todo)), **executor.stats()}


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
