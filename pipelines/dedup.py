"""The dedup stage: exact, then MinHash near-duplicate removal over the cleaned corpus.

Input: a clean artifact, optionally followed by an earlier dedup artifact whose signature
index the new documents are also checked against (a refreshed crawl then keeps only what is
new). Output: the kept documents, shard for shard, and `index/`, the signature index of
everything kept so far (the earlier index included), for the next refresh.

Two passes over the text: signatures (streamed, spilled to disk, see pipelines/minhash/), then the
kept rows written out. Memory holds one batch of text and one LSH band at a time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipelines.common import ConfigError, InputError, Progress, Stage, StageConfig, document_shards, read_shard
from pipelines.minhash import IndexConfigError, MinHashConfig, MinHashDeduplicator, SignatureIndex
from storage import ArtifactStore, ArtifactWriter, Manifest

INDEX_DIR = "index"


class DedupConfig(StageConfig, MinHashConfig):
    """The MinHash settings (pipelines/minhash/config.py) and what the stage adds to them."""

    exact: bool = Field(True, description="Drop exact duplicates of the normalized text first.")
    against: str | None = Field(
        None, description="Fingerprint of an earlier dedup artifact: also drop documents it already holds.",
    )
    batch_size: int = Field(4096, ge=1, description="Documents hashed per batch.")


def earlier_corpus(config: DedupConfig, store: ArtifactStore) -> list[Manifest]:
    """The dedup artifact a refreshed crawl is deduplicated against (`against`), if any."""
    return [store.find(config.against)] if config.against else []


def _load_earlier_index(store: ArtifactStore, earlier: list[Manifest], config: DedupConfig,
                        scratch: Path) -> SignatureIndex | None:
    if not earlier:
        return None
    manifest = earlier[-1]  # each index holds all earlier ones: the latest is enough
    if manifest.stage != "dedup" or not manifest.files_under(INDEX_DIR):
        raise InputError(f"{manifest.stage}/{manifest.short}: not a dedup artifact with a signature index")
    try:
        return SignatureIndex.load(store.local_dir(manifest, INDEX_DIR, scratch), config)
    except IndexConfigError as err:
        raise ConfigError(f"dedup/{manifest.short}: its index was made with other MinHash settings ({err})") from None


def _signature_pass(dedup: MinHashDeduplicator, store: ArtifactStore, clean: Manifest,
                    shards: list[str], batch_size: int) -> list[int]:
    """Hash every document in corpus order; returns the number of documents per shard."""
    counts = []
    total = sum(clean.file(s).rows or 0 for s in shards) or None
    with Progress("dedup: signatures", total, "docs") as bar:
        for shard in shards:
            table = read_shard(store, clean, shard, columns=["text"])
            texts = table.column("text").to_pylist()
            for start in range(0, len(texts), batch_size):
                batch = [t or "" for t in texts[start:start + batch_size]]
                dedup.add(batch)
                bar.advance(len(batch))
            counts.append(len(texts))
    return counts


def _write_kept(writer: ArtifactWriter, store: ArtifactStore, clean: Manifest, shards: list[str],
                counts: list[int], keep: np.ndarray) -> None:
    offset = 0
    for shard, count in zip(shards, counts):
        keep_here = keep[offset:offset + count]
        offset += count
        if writer.done(shard):
            continue  # written by an earlier, interrupted run (the keep mask is deterministic)
        table = read_shard(store, clean, shard)
        writer.write_parquet(shard, table.filter(pa.array(keep_here)))


def _write_index(writer: ArtifactWriter, dedup: MinHashDeduplicator, scratch: Path) -> None:
    local = scratch / "index"
    dedup.write_index(local, union=True, overwrite=True)
    for path in sorted(local.rglob("*")):
        if path.is_file():
            with writer.open(f"{INDEX_DIR}/{path.relative_to(local).as_posix()}") as handle:
                handle.write(path.read_bytes())


def build_dedup(config: DedupConfig, inputs: list[Manifest], store: ArtifactStore,
                writer: ArtifactWriter) -> dict[str, Any]:
    if not inputs:
        raise InputError("dedup: needs a clean artifact as input")
    clean, earlier = inputs[0], inputs[1:]
    shards = document_shards(clean)
    with tempfile.TemporaryDirectory(prefix="kiln-dedup-") as scratch_dir:
        scratch = Path(scratch_dir)
        index = _load_earlier_index(store, earlier, config, scratch)
        with MinHashDeduplicator(config, workdir=scratch / "work", index=index, exact=config.exact) as dedup:
            counts = _signature_pass(dedup, store, clean, shards, config.batch_size)
            result = dedup.finalize()
            _write_kept(writer, store, clean, shards, counts, result.keep)
            _write_index(writer, dedup, scratch)
    near_only = result.near_duplicate & ~result.index_duplicate
    exact_only = result.exact_duplicate & ~result.index_duplicate
    documents_in = int(result.num_docs)
    documents_out = documents_in - result.num_removed
    return {
        "documents_in": documents_in,
        "documents_out": documents_out,
        "dropped": {
            "exact_duplicate": int(np.count_nonzero(exact_only)),
            "near_duplicate": int(np.count_nonzero(near_only)),
            "in_earlier_corpus": int(np.count_nonzero(result.index_duplicate)),
        },
        "duplicate_rate": round(result.num_removed / documents_in, 4) if documents_in else 0.0,
        "clusters": int(result.num_clusters),
        "candidate_pairs": int(result.candidate_pairs),
        "verified_pairs": int(result.verified_pairs),
        "index_documents": int(documents_out + (index.num_docs if index is not None else 0)),
    }


STAGE = Stage("dedup", DedupConfig, build_dedup, code_version="1")
