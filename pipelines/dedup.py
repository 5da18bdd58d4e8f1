"""The dedup stage: exact, then MinHash near-duplicate removal over the cleaned corpus, in units
of work that run on the stage's executor (a process pool, or Ray tasks on a cluster).
`kiln dedup` runs it, and bench/minhash.py times it against datasketch.

Input: a clean artifact, optionally followed by an earlier dedup artifact whose signature
index the new documents are also checked against (a refreshed crawl then keeps only what is
new). Output: the kept documents, shard for shard, and `index/`, the signature index of
everything kept so far (the earlier index included), for the next refresh.

The phases (pipelines/minhash/units.py): signatures per part (a shard, or a run of its rows);
exact duplicates per hash partition; LSH candidates verified per band; then, here, the
clustering: a union-find over the verified pairs (only documents that have a duplicate take
part) whose root is always the lowest document number. Its result is the one-process result
exactly (`MinHashDeduplicator`, the tests' reference): the components of a graph do not depend
on the order its edges come in, nor on whether an edge inside a component is verified twice;
tests/pipelines/test_dedup.py checks the two agree. Then the kept rows per shard and the new
index per band, in one phase. Memory per unit: one shard or one band, whatever the corpus size;
in this process: the duplicates.

Where the time goes (20,000 documents of 2,000 characters, one core): the signatures ~70%
(normalising, shingle hashes, 112 min-hashes, exact hashes; see pipelines/minhash/shingles.py),
the kept shards ~15% (Parquet read and written again), bands and index ~10%. A local pool's
forkserver takes ~0.4 s to start (it imports numpy and pyarrow): this process runs the first
units meanwhile, and a corpus too small to pay for the pool runs here alone (LocalExecutor).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import Field

from pipelines.common import ConfigError, InputError, Progress, Stage, document_shards
from pipelines.executor import Executor, LocalExecutor, ParallelStageConfig, executor_for
from pipelines.minhash import MinHashConfig
from pipelines.minhash.index import FORMAT, FORMAT_VERSION, header_bytes, index_header
from pipelines.minhash.lsh import UnionFind
from pipelines.minhash.units import (
    WORK,
    BandTask,
    Corpus,
    Earlier,
    ExactTask,
    FilterTask,
    IndexTask,
    SignatureTask,
    band_unit,
    concat,
    exact_unit,
    output_unit,
    plan_parts,
    signature_unit,
)
from storage import ArtifactStore, ArtifactWriter, Manifest

INDEX_DIR = "index"
class DedupConfig(ParallelStageConfig, MinHashConfig):
    """The MinHash settings (pipelines/minhash/config.py) and what the stage adds to them."""

    exact: bool = Field(True, description="Drop exact duplicates of the normalized text first.")
    against: str | None = Field(
        None, description="Fingerprint of an earlier dedup artifact: also drop documents it already holds.",
    )
    batch_size: int = Field(4096, ge=1, description="Documents hashed per batch.")


def earlier_corpus(config: DedupConfig, store: ArtifactStore) -> list[Manifest]:
    """The dedup artifact a refreshed crawl is deduplicated against (`against`), if any."""
    return [store.find(config.against)] if config.against else []


def _earlier(store: ArtifactStore, earlier: list[Manifest], config: DedupConfig) -> Earlier | None:
    if not earlier:
        return None
    manifest = earlier[-1]  # each index holds all earlier ones: the latest is enough
    if manifest.stage != "dedup" or not manifest.files_under(INDEX_DIR):
        raise InputError(f"{manifest.stage}/{manifest.short}: not a dedup artifact with a signature index")
    with store.open(manifest, f"{INDEX_DIR}/header.json") as handle:
        header = json.loads(handle.read())
    if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
        raise InputError(f"dedup/{manifest.short}: not a {FORMAT} v{FORMAT_VERSION} index")
    wanted = config.signature_fields()
    differ = {k: (header["config"].get(k), v) for k, v in wanted.items() if header["config"].get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: index={a!r} current={b!r}" for k, (a, b) in differ.items())
        raise ConfigError(f"dedup/{manifest.short}: its index was made with other MinHash settings ({detail})")
    return Earlier(store.url, store.storage_options, manifest, int(header["num_docs"]), bool(header.get("has_exact")))


def _run(executor: Executor, name: str, fn, tasks: list, bar_total: int | None = None) -> list:
    results = []
    with Progress(f"dedup: {name}", bar_total if bar_total is not None else len(tasks),
                  unit="docs" if bar_total is not None else "units", units=len(tasks)) as bar:
        for result, node in executor.map(fn, tasks):
            results.append(result)
            amount = result["documents"] if isinstance(result, dict) and "documents" in result else 1
            bar.unit_done(node, amount if bar_total is not None else 1, f"{name} {len(results) - 1}")
    return results


def _cluster(exact: list[dict], bands: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The dropped documents (sorted), and which of them are exact, near or earlier duplicates and
    whom they were dropped for, by the one-machine rules (MinHashDeduplicator.finalize), on the
    sparse set of documents that have a duplicate."""
    dup = concat([r["duplicates"] for r in exact], np.zeros((0, 2), np.int64))     # (duplicate, first)
    in_index = np.unique(concat([r["in_earlier"] for r in exact]))
    edges = concat([r["edges"] for r in bands], np.zeros((0, 2), np.int64))
    flagged = np.unique(concat([r["flagged"] for r in bands]))
    # documents in a component; numbered in ascending order, so the lowest root is the lowest document
    nodes = np.unique(np.concatenate([edges.ravel(), dup.ravel(), flagged, in_index]).astype(np.int64))
    uf = UnionFind(len(nodes))
    if len(edges):
        uf.union(np.searchsorted(nodes, edges[:, 0]), np.searchsorted(nodes, edges[:, 1]))
    root = nodes[uf.roots()]                                  # root of each node (itself when alone)
    first = nodes.copy()          # an exact duplicate within the corpus stands for its first occurrence
    is_exact = np.zeros(len(nodes), dtype=bool)
    if len(dup):
        where = np.searchsorted(nodes, dup[:, 0])
        first[where], is_exact[where] = dup[:, 1], True
    first_at = np.searchsorted(nodes, first)
    rep = root[first_at]
    indexed = np.isin(nodes, in_index)
    anchored = np.isin(rep, root[np.searchsorted(nodes, flagged)]) | indexed | (is_exact & indexed[first_at])
    gone = (rep != nodes) | anchored
    exact_dup = (is_exact | indexed)[gone]
    anchored = anchored[gone]
    kinds = {"exact": exact_dup & ~anchored, "near": ~exact_dup & ~anchored, "earlier": anchored,
             "rep": np.where(anchored, -1, rep[gone])}
    return nodes[gone], kinds


def _shard_rows(store: ArtifactStore, clean: Manifest, shards: list[str]) -> list[int]:
    """Rows of each shard: as the manifest records them, else from the Parquet footer."""
    import pyarrow.parquet as pq

    rows = []
    for relpath in shards:
        known = clean.file(relpath).rows
        if known is None:
            with store.open(clean, relpath) as handle:
                known = pq.ParquetFile(handle).metadata.num_rows
        rows.append(int(known))
    return rows


def _executor(config: DedupConfig, store: ArtifactStore) -> Executor:
    """The stage's executor; a local pool starts while this process already runs the first units
    (see LocalExecutor): a small corpus is done before the workers would be up."""
    if config.executor == "local":
        return LocalExecutor(config.workers, caller_helps=True)
    return executor_for(config, store)


def build_dedup(config: DedupConfig, inputs: list[Manifest], store: ArtifactStore,
                writer: ArtifactWriter) -> dict[str, Any]:
    if not inputs:
        raise InputError("dedup: needs a clean artifact as input")
    with _executor(config, store) as executor:
        return _deduplicate(config, inputs[0], document_shards(inputs[0]), inputs[1:], store, writer, executor)


def _deduplicate(config: DedupConfig, clean: Manifest, shards: list[str], earlier: list[Manifest],
                 store: ArtifactStore, writer: ArtifactWriter, executor: Executor) -> dict[str, Any]:
    """Signatures, exact duplicates, bands, clusters, then the kept rows and the index: each phase in units."""
    rows = _shard_rows(store, clean, shards)
    parts = plan_parts(shards, rows, config.workers)
    minhash = MinHashConfig(**{name: getattr(config, name) for name in MinHashConfig.model_fields})
    # the units get the MinHash settings only: a worker unpickles them without importing this module
    corpus = Corpus(writer, minhash, config.exact, parts, _earlier(store, earlier, config))
    signed = _run(executor, "signatures", signature_unit,
                  [SignatureTask(corpus, p, clean, config.batch_size) for p in range(len(parts))], sum(rows))
    empty = tuple(r["empty"] for r in signed)
    bands = config.num_bands
    partitions = bands if config.exact else 0  # as many exact-hash partitions as bands: the same memory per unit
    exact = _run(executor, "exact duplicates", exact_unit,
                 [ExactTask(corpus, p, partitions) for p in range(partitions)])
    inactive = np.unique(concat([r["duplicates"][:, 0] for r in exact] + [r["in_earlier"] for r in exact]))
    band_results = _run(executor, "bands", band_unit, [BandTask(corpus, b, inactive, empty) for b in range(bands)])
    dropped, kinds = _cluster(exact, band_results)

    offsets = corpus.offsets
    part_of = np.searchsorted(offsets, dropped, side="right") - 1
    by_part = tuple(dropped[part_of == p] - offsets[p] for p in range(len(parts)))
    shard_offsets = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])  # parts run shard by shard
    shard_of = np.searchsorted(shard_offsets, dropped, side="right") - 1
    by_shard = [dropped[shard_of == s] - shard_offsets[s] for s in range(len(shards))]
    has_exact = config.exact and (corpus.earlier is None or corpus.earlier.has_exact)
    output: list[FilterTask | IndexTask] = [FilterTask(corpus, s, relpath, clean, by_shard[s])
                                            for s, relpath in enumerate(shards)]
    output += [IndexTask(corpus, "signatures", dropped=by_part, empty=empty)]
    output += [IndexTask(corpus, "exact", dropped=by_part, empty=empty)] if has_exact else []
    output += [IndexTask(corpus, "band", b, by_part, empty) for b in range(bands)]
    _run(executor, "kept rows and index", output_unit, output)

    earlier_docs = corpus.earlier.num_docs if corpus.earlier is not None else 0
    documents_in = int(sum(rows))
    documents_out = documents_in - len(dropped)
    writer.write_bytes(f"{INDEX_DIR}/header.json",
                       header_bytes(index_header(corpus.config, earlier_docs + documents_out, has_exact)))
    if writer.fs.exists(writer.path(WORK)):
        writer.fs.rm(writer.path(WORK), recursive=True)  # the units' work files are not part of the artifact
    return {
        "documents_in": documents_in,
        "documents_out": documents_out,
        "dropped": {
            "exact_duplicate": int(kinds["exact"].sum()),
            "near_duplicate": int(kinds["near"].sum()),
            "in_earlier_corpus": int(kinds["earlier"].sum()),
        },
        "duplicate_rate": round(len(dropped) / documents_in, 4) if documents_in else 0.0,
        "clusters": int(len(np.unique(kinds["rep"][kinds["rep"] >= 0]))),
        "candidate_pairs": sum(s["candidate_pairs"] for s in band_results),
        "verified_pairs": sum(s["verified_pairs"] for s in band_results),
        "index_documents": int(documents_out + earlier_docs),
        **executor.stats(),
    }


# 2: in units on the stage's executor (signatures per shard, exact partitions, bands, kept rows, index);
# the same output since (signatures per part, duplicates handed back in memory, kept rows and index in one phase)
STAGE = Stage("dedup", DedupConfig, build_dedup, code_version="2")
