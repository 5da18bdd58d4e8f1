"""The dedup stage on real text: planted duplicates, shard layout, refresh against an earlier index,
the one-process result exactly however the units ran; and the executor it runs on."""

import functools
import os
import random
import time
from pydoc_data.topics import topics

import pyarrow as pa
import pytest

from pipelines.common import ConfigError, InputError, document_shards, read_shard, shard_name
from pipelines.dedup import STAGE, DedupConfig
from pipelines.executor import LocalExecutor
from pipelines.minhash import units, word_shingles
from storage import ArtifactStore


def real_documents() -> list[str]:
    """Reference-manual prose that ships with Python, cut into ~300-word documents.

    The manual repeats itself (a few topics share whole sections): those chunks are left out
    so that every planted duplicate below has exactly one original."""
    words = " ".join(topics[k] for k in sorted(topics)).split()
    chunks = [" ".join(words[i:i + 300]) for i in range(0, len(words) - 300, 300)]
    distinct, seen = [], []
    for chunk in chunks:
        shingles = set(word_shingles(chunk))
        if all(len(shingles & other) / len(shingles | other) < 0.3 for other in seen):
            distinct.append(chunk)
            seen.append(shingles)
    return distinct


def edit_words(text: str, rng: random.Random, edits: int) -> str:
    words = text.split()
    for _ in range(edits):
        words[rng.randrange(len(words))] = rng.choice(["alpha", "beta", "gamma", "delta"])
    return " ".join(words)


def clean_artifact(store: ArtifactStore, shards: list[list[str]], tag: str):
    def build(writer):
        for i, texts in enumerate(shards):
            ids = [f"{tag}-{i}-{j}" for j in range(len(texts))]
            writer.write_parquet(shard_name(i), pa.table({"id": ids, "url": ids, "text": texts}))
        return {}

    return store.produce("clean", tag * 64 if len(tag) == 1 else tag, build, config={}, inputs=[], code_version="1")


def kept_ids(store, manifest):
    return [i for s in document_shards(manifest)
            for i in read_shard(store, manifest, s, ["id"]).column("id").to_pylist()]


def test_planted_duplicates_are_removed_and_originals_kept(tmp_path):
    store = ArtifactStore(tmp_path)
    rng = random.Random(7)
    docs = real_documents()[:160]
    near = [edit_words(d, rng, 3) for d in docs[:40]]        # a few words edited
    exact = [d.upper() + "  " for d in docs[40:60]]          # same text once normalized
    clean = clean_artifact(store, [docs[:80], docs[80:] + near, exact], "a")
    manifest = STAGE.run(DedupConfig(), [clean], store)
    stats = manifest.stats
    assert stats["documents_in"] == 220
    assert stats["dropped"]["exact_duplicate"] == 20
    assert stats["dropped"]["near_duplicate"] >= 38  # >= 95% of the planted near-duplicates
    kept = set(kept_ids(store, manifest))
    assert all(f"a-0-{j}" in kept for j in range(80)), "the originals (first in corpus order) are kept"
    assert stats["documents_out"] == 220 - 20 - stats["dropped"]["near_duplicate"]
    assert [s for s in document_shards(manifest)] == [shard_name(0), shard_name(1), shard_name(2)]
    assert manifest.files_under("index"), "the signature index is part of the artifact"


def test_refresh_keeps_only_new_documents(tmp_path):
    store = ArtifactStore(tmp_path)
    rng = random.Random(3)
    docs = real_documents()
    first = STAGE.run(DedupConfig(), [clean_artifact(store, [docs[:80]], "b")], store)
    refreshed_crawl = [edit_words(d, rng, 2) for d in docs[:30]] + docs[80:120]
    second = STAGE.run(DedupConfig(against=first.fingerprint),
                       [clean_artifact(store, [refreshed_crawl], "c"), first], store)
    assert second.stats["dropped"]["in_earlier_corpus"] >= 29
    assert set(kept_ids(store, second)) >= {f"c-0-{j}" for j in range(30, 70)}
    assert second.stats["index_documents"] == 80 + second.stats["documents_out"]


def test_deterministic_and_independent_of_batch_size(tmp_path):
    docs = real_documents()[:120]
    docs += [edit_words(d, random.Random(1), 2) for d in docs[:20]]
    one, two = ArtifactStore(tmp_path / "1"), ArtifactStore(tmp_path / "2")
    a = STAGE.run(DedupConfig(batch_size=7), [clean_artifact(one, [docs], "d")], one)
    b = STAGE.run(DedupConfig(batch_size=4096), [clean_artifact(two, [docs], "d")], two)
    assert [(f.path, f.sha256) for f in a.files] == [(f.path, f.sha256) for f in b.files]


def test_mismatched_index_and_wrong_input_are_clear_errors(tmp_path):
    store = ArtifactStore(tmp_path)
    docs = real_documents()[:30]
    clean = clean_artifact(store, [docs], "e")
    first = STAGE.run(DedupConfig(), [clean], store)
    with pytest.raises(ConfigError, match="other MinHash settings"):
        STAGE.run(DedupConfig(num_bands=20, rows_per_band=5), [clean, first], store)
    with pytest.raises(InputError, match="not a dedup artifact"):
        STAGE.run(DedupConfig(), [clean, clean], store)


def test_invalid_minhash_settings_fail_validation():
    with pytest.raises(ValueError):
        DedupConfig(num_bands=0)


def one_machine(config: DedupConfig, texts: list[str], tmp_path, index=None):
    """The single-process reference: MinHashDeduplicator over all texts, then SignatureIndex.write."""
    from pipelines.minhash import MinHashConfig, MinHashDeduplicator

    minhash = MinHashConfig(**{k: getattr(config, k) for k in MinHashConfig.model_fields})
    with MinHashDeduplicator(minhash, workdir=tmp_path / "ref-work", index=index, exact=config.exact) as dedup:
        dedup.add(texts)
        result = dedup.finalize()
        written = dedup.write_index(tmp_path / "ref-index", union=True, overwrite=True)
    return result, written


@pytest.mark.parametrize("workers,pool", [(1, False), (2, False), (3, True)],
                         ids=["one-process", "too-small-for-a-pool", "pool-and-shards-cut-into-parts"])
def test_units_give_the_one_machine_result_exactly(tmp_path, monkeypatch, workers, pool):
    """Per-part, per-partition and per-band units, clustered by a union-find whose root is the
    lowest document: the same documents kept, the same index bytes, as one process over the
    whole corpus; the same again for a refresh against that index. Whether the units ran here
    or in worker processes, and in how many parts the shards were cut, changes nothing."""
    import hashlib

    from pipelines.minhash import SignatureIndex

    if pool:  # worker processes whatever the corpus size, and parts of a few dozen documents
        monkeypatch.setattr(LocalExecutor, "START_SECONDS", 0.0)
        monkeypatch.setattr(units, "MIN_PART_ROWS", 16)
        parts = units.plan_parts(["a", "b", "c", "d"], [60, 75, 46, 40], workers)
        assert len(parts) == 5 and [p.rows for p in parts if p.shard == 1] == [37, 38]

    rng = random.Random(11)
    docs = real_documents()[:150]
    near = [edit_words(d, rng, rng.randint(1, 8)) for d in docs[:50]]   # some within the threshold, some not
    exact = [d.upper() for d in docs[50:70]] + [near[0]]
    shards = [docs[:60], near[:25] + docs[60:110], exact + near[25:], docs[110:]]
    store = ArtifactStore(tmp_path / "store")
    clean = clean_artifact(store, shards, "f")
    config = DedupConfig(workers=workers)
    manifest = STAGE.run(config, [clean], store)
    texts = [t for shard in shards for t in shard]
    result, reference = one_machine(config, texts, tmp_path / "one")
    all_ids = [f"f-{i}-{j}" for i, shard in enumerate(shards) for j in range(len(shard))]
    assert kept_ids(store, manifest) == [i for i, keep in zip(all_ids, result.keep) if keep]
    assert manifest.stats["dropped"]["exact_duplicate"] == int((result.exact_duplicate & ~result.index_duplicate).sum())
    assert manifest.stats["clusters"] == result.num_clusters

    def index_files(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}

    assert index_files(store.local_path(manifest, "index")) == index_files(reference.path)

    refresh = [edit_words(d, rng, 2) for d in docs[:30]] + real_documents()[150:190] + [docs[5].upper()]
    again = STAGE.run(DedupConfig(workers=workers, against=manifest.fingerprint),
                      [clean_artifact(store, [refresh], "g"), manifest], store)
    result2, reference2 = one_machine(config, refresh, tmp_path / "two", index=SignatureIndex.load(reference.path))
    assert kept_ids(store, again) == [f"g-0-{j}" for j, keep in enumerate(result2.keep) if keep]
    assert again.stats["dropped"]["in_earlier_corpus"] == int(result2.index_duplicate.sum()) > 25
    assert index_files(store.local_path(again, "index")) == index_files(reference2.path)


def test_parts_cover_every_row_once_in_corpus_order():
    for shards, rows, workers in [(1, [5000], 2), (3, [10, 0, 4000], 4), (8, [3000] * 8, 2), (1, [0], 2)]:
        parts = units.plan_parts([f"s{i}" for i in range(shards)], rows, workers)
        assert [(p.shard, p.first) for p in parts] == sorted((p.shard, p.first) for p in parts)
        for shard, n in enumerate(rows):
            mine = [p for p in parts if p.shard == shard]
            assert mine and mine[0].first == 0 and sum(p.rows for p in mine) == n
            assert all(a.first + a.rows == b.first for a, b in zip(mine, mine[1:]))
    assert len(units.plan_parts(["s"], [5000], 2)) == 4  # a big shard is shared by the workers
    assert len(units.plan_parts(["s"], [5000], 1)) == 1
    assert len(units.plan_parts(["s"], [1500], 2)) == 1  # ... a small one is not worth cutting


# ------------------------------------------------------------------ the executor, as the stage uses it


def square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def helped_unit(item: tuple[int, int, int]) -> tuple[int, int]:
    x, caller, bad = item
    time.sleep(0.2 if os.getpid() == caller else 0.005)  # slow here: the workers take over once up
    if x == bad:
        raise ValueError(f"unit {x} is bad")
    return x * x, os.getpid()


def test_a_phase_shorter_than_starting_a_pool_runs_in_this_process():
    with LocalExecutor(workers=2, caller_helps=True) as executor:
        ran = [result for result, _ in executor.map(square, range(8))]
        again = [result for result, _ in executor.map(square, range(3))]
        assert executor._start is None and executor._pool is None, "no pool was started"
    assert [r for r, _ in ran] == [x * x for x in range(8)]
    assert {pid for _, pid in ran + again} == {os.getpid()}


def test_the_pool_starts_while_this_process_runs_the_first_units(monkeypatch):
    monkeypatch.setattr(LocalExecutor, "START_SECONDS", 0.0)
    caller = os.getpid()
    with LocalExecutor(workers=2, caller_helps=True) as executor:
        first = [result for result, _ in executor.map(helped_unit, [(x, caller, -1) for x in range(30)])]
        second = [result for result, _ in executor.map(helped_unit, [(x, caller, -1) for x in range(4)])]
    assert [r for r, _ in first] == [x * x for x in range(30)], "in the items' order"
    pids = [pid for _, pid in first]
    assert pids[0] == caller and set(pids) - {caller}, "begun here, taken over by the workers"
    assert caller not in {pid for _, pid in second}, "once up, the pool runs the later phases"
    assert executor._pool is None, "closed at the end of the stage"


@pytest.mark.parametrize("bad", [0, 29], ids=["here", "in-a-worker"])
def test_a_failed_unit_raises_its_own_error_wherever_it_ran(monkeypatch, bad):
    monkeypatch.setattr(LocalExecutor, "START_SECONDS", 0.0)
    executor = LocalExecutor(workers=2, caller_helps=True)
    with pytest.raises(ValueError, match=f"unit {bad} is bad"):
        list(executor.map(functools.partial(helped_unit), [(x, os.getpid(), bad) for x in range(30)]))
    assert executor._pool is None and executor._start is None
