"""The dedup stage: exact, then MinHash near-duplicate removal over the cleaned corpus, in units
of work that run on the stage's executor (a process pool, or Ray tasks on a cluster).

Input: a clean artifact, optionally followed by an earlier dedup artifact whose signature
index the new documents are also checked against (a refreshed crawl then keeps only what is
new). Output: the kept documents, shard for shard, and `index/`, the signature index of
everything kept so far (the earlier index included), for the next refresh.

The phases (pipelines/minhash/units.py): signatures per shard; exact duplicates per hash
partition; LSH candidates verified per band; then, here, the clustering: a union-find over the
verified pairs (only documents that have a duplicate take part) whose root is always the lowest
document number. Its result is the one-machine result exactly (`MinHashDeduplicator`): the
components of a graph do not depend on the order its edges come in, nor on whether an edge
inside a component is verified twice; tests/pipelines/test_dedup.py checks the two agree.
Then the kept rows per shard and the new index per band. Memory per unit: one shard or one
band, whatever the corpus size; in this process: the duplicates.
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import numpy as np
from pydantic import Field

from pipelines.common import ConfigError, InputError, Progress, Stage, document_shards
from pipelines.executor import Executor, ParallelStageConfig, executor_for
from pipelines.minhash import MinHashConfig
from pipelines.minhash.index import _FORMAT, _FORMAT_VERSION
from pipelines.minhash.lsh import UnionFind
from pipelines.minhash.units import (WORK, BandTask, Corpus, Earlier, ExactTask, FilterTask, IndexTask, SignatureTask,
                                     band_unit, exact_unit, filter_unit, index_unit, load_npy, signature_unit, work)
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
    if header.get("format") != _FORMAT or header.get("version") != _FORMAT_VERSION:
        raise InputError(f"dedup/{manifest.short}: not a {_FORMAT} v{_FORMAT_VERSION} index")
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
        for task, (result, node) in zip(tasks, executor.map(fn, tasks)):
            results.append(result)
            amount = result["documents"] if isinstance(result, dict) and "documents" in result else 1
            bar.unit_done(node, amount if bar_total is not None else 1, f"{name} {len(results) - 1}")
    return results


def _cluster(corpus: Corpus, partitions: int, bands: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The dropped documents (sorted), and which of them are exact, near or earlier duplicates,
    by the one-machine rules (MinHashDeduplicator.finalize), on the sparse set of documents that
    have a duplicate."""
    writer = corpus.writer
    exact = [load_npy(writer, work("exactdup", p)) for p in range(partitions)]
    exact = np.concatenate(exact) if exact else np.zeros((0, 2), np.int64)
    ex_index = np.unique(np.concatenate([load_npy(writer, work("exactidx", p)) for p in range(partitions)]
                                        or [np.zeros(0, np.int64)]))
    edges = np.concatenate([load_npy(writer, work("edges", b)) for b in range(bands)] or [np.zeros((0, 2), np.int64)])
    flagged = np.unique(np.concatenate([load_npy(writer, work("flagged", b)) for b in range(bands)]
                                       or [np.zeros(0, np.int64)]))
    # documents in a component; numbered in ascending order, so the lowest root is the lowest document
    nodes = np.unique(np.concatenate([edges.ravel(), exact.ravel(), flagged, ex_index]).astype(np.int64))
    uf = UnionFind(len(nodes))
    if len(edges):
        uf.union(np.searchsorted(nodes, edges[:, 0]), np.searchsorted(nodes, edges[:, 1]))
    roots = nodes[uf.roots()]                                   # root of each node (itself when alone)
    root_of = dict(zip(nodes.tolist(), roots.tolist()))
    first_of = dict(zip(exact[:, 0].tolist(), exact[:, 1].tolist()))
    anchored_roots = {root_of[f] for f in flagged.tolist()}
    in_index = set(ex_index.tolist())
    dropped, kinds = [], {"exact": [], "near": [], "earlier": [], "rep": []}
    for doc in nodes.tolist():
        if doc in first_of:  # an exact duplicate within the corpus: stands for its first occurrence
            first = first_of[doc]
            rep = root_of[first]
            anchored = rep in anchored_roots or first in in_index or doc in in_index
        else:
            rep = root_of[doc]
            anchored = rep in anchored_roots or doc in in_index
        if rep == doc and not anchored:
            continue
        dropped.append(doc)
        exact_dup = doc in first_of or doc in in_index
        kinds["exact"].append(exact_dup and not anchored)
        kinds["near"].append(not exact_dup and not anchored)
        kinds["earlier"].append(anchored)
        kinds["rep"].append(-1 if anchored else rep)
    return np.array(dropped, dtype=np.int64), {k: np.array(v) for k, v in kinds.items()}


def build_dedup(config: DedupConfig, inputs: list[Manifest], store: ArtifactStore,
                writer: ArtifactWriter) -> dict[str, Any]:
    if not inputs:
        raise InputError("dedup: needs a clean artifact as input")
    with executor_for(config, store) as executor:
        return _deduplicate(config, inputs[0], inputs[1:], store, writer, executor)


def _deduplicate(config: DedupConfig, clean: Manifest, earlier: list[Manifest], store: ArtifactStore,
                 writer: ArtifactWriter, executor: Executor) -> dict[str, Any]:
    """Signatures, exact duplicates, bands, clusters, kept rows, index: each phase in units."""
    shards = document_shards(clean)
    corpus = Corpus(writer, config, config.exact, earlier=_earlier(store, earlier, config))
    rows = [clean.file(s).rows for s in shards]
    total = sum(rows) if None not in rows else None

    signed = _run(executor, "signatures", signature_unit,
                  [SignatureTask(corpus, i, s, clean, config.batch_size) for i, s in enumerate(shards)], total)
    counts = tuple(r["documents"] for r in signed)
    corpus = Corpus(writer, corpus.config, config.exact, counts, corpus.earlier)
    bands = config.num_bands
    partitions = bands  # as many exact-hash partitions as bands: the same memory per unit
    if config.exact:
        _run(executor, "exact duplicates", exact_unit, [ExactTask(corpus, p, partitions) for p in range(partitions)])
    else:
        partitions = 0
    empty = tuple(tuple(r["empty"]) for r in signed)
    band_stats = _run(executor, "bands", band_unit, [BandTask(corpus, b, partitions, empty) for b in range(bands)])
    dropped, kinds = _cluster(corpus, partitions, bands)

    offsets = corpus.offsets
    shard_of = np.searchsorted(offsets, dropped, side="right") - 1
    gone = [tuple((dropped[shard_of == i] - offsets[i]).tolist()) for i in range(len(shards))]
    _run(executor, "kept rows", filter_unit,
         [FilterTask(corpus, i, s, clean, gone[i]) for i, s in enumerate(shards)])
    kept = tuple(tuple(np.setdiff1d(np.arange(n), np.array(g, dtype=np.int64)).tolist()) for n, g in zip(counts, gone))
    has_exact = config.exact and (corpus.earlier is None or corpus.earlier.has_exact)
    index_tasks = [IndexTask(corpus, "signatures", kept=kept)] + [IndexTask(corpus, "band", b, kept)
                                                                   for b in range(bands)]
    if has_exact:
        index_tasks.append(IndexTask(corpus, "exact", kept=kept))
    _run(executor, "index", index_unit, index_tasks)

    earlier_docs = corpus.earlier.num_docs if corpus.earlier is not None else 0
    documents_in = int(sum(counts))
    documents_out = documents_in - len(dropped)
    header = {
        "format": _FORMAT, "version": _FORMAT_VERSION, "config": config.signature_fields(),
        "num_docs": earlier_docs + documents_out, "num_hashes": config.num_hashes, "signature_dtype": "uint32",
        "band_hash_dtype": "uint64", "unicode_version": unicodedata.unidata_version, "has_exact": has_exact,
    }  # as SignatureIndex.write writes it
    writer.write_bytes(f"{INDEX_DIR}/header.json", (json.dumps(header, indent=2, sort_keys=True) + "\n").encode())
    if writer.fs.exists(writer.path(WORK)):
        writer.fs.rm(writer.path(WORK), recursive=True)  # the units' work files are not part of the artifact
    return {
        "documents_in": documents_in,
        "documents_out": documents_out,
        "dropped": {
            "exact_duplicate": int(kinds["exact"].sum()) if len(dropped) else 0,
            "near_duplicate": int(kinds["near"].sum()) if len(dropped) else 0,
            "in_earlier_corpus": int(kinds["earlier"].sum()) if len(dropped) else 0,
        },
        "duplicate_rate": round(len(dropped) / documents_in, 4) if documents_in else 0.0,
        "clusters": int(len(np.unique(kinds["rep"][kinds["rep"] >= 0]))) if len(dropped) else 0,
        "candidate_pairs": sum(s["candidate_pairs"] for s in band_stats),
        "verified_pairs": sum(s["verified_pairs"] for s in band_stats),
        "index_documents": int(documents_out + earlier_docs),
        **executor.stats(),
    }


# 2: in units on the stage's executor (signatures per shard, exact partitions, bands, kept rows, index)
STAGE = Stage("dedup", DedupConfig, build_dedup, code_version="2")
