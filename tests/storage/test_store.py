import json
import multiprocessing
import os
import posixpath
import time

import pytest

from storage import MANIFEST_NAME, ArtifactStore, StorageError, fingerprint


def build_two_files(writer):
    writer.write_bytes("a.txt", b"alpha")
    writer.write_json("sub/b.json", {"x": 1})
    return {"documents": 2}


def produce(store, fp="f" * 64, build=build_two_files, **kw):
    return store.produce("demo", fp, build, config={"k": 1}, inputs=["in1"], code_version="1", **kw)


def test_fingerprint_is_canonical_and_sensitive():
    a = fingerprint("clean", {"x": 1, "y": [1, 2]}, ["i"], "1")
    assert a == fingerprint("clean", {"y": [1, 2], "x": 1}, ["i"], "1")
    assert a != fingerprint("clean", {"x": 2, "y": [1, 2]}, ["i"], "1")
    assert a != fingerprint("clean", {"x": 1, "y": [1, 2]}, ["j"], "1")
    assert a != fingerprint("clean", {"x": 1, "y": [1, 2]}, ["i"], "2")
    assert a != fingerprint("dedup", {"x": 1, "y": [1, 2]}, ["i"], "1")


def test_produce_commits_manifest_with_sizes_hashes_and_lineage(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = produce(store)
    directory = tmp_path / "demo" / ("f" * 64)
    saved = json.loads((directory / MANIFEST_NAME).read_text())
    assert saved["inputs"] == ["in1"] and saved["stats"] == {"documents": 2}
    assert {f["path"] for f in saved["files"]} == {"a.txt", "sub/b.json"}
    entry = manifest.file("a.txt")
    assert entry.bytes == 5 and entry.sha256 == "8ed3f6ad685b959ead7022518e1af76cd816f8e8ec7ccdda1ed4018e8f2223f8"
    assert not list((tmp_path / "demo").glob(".staging-*")), "staging renamed into place"
    assert store.problems(manifest, "sha256") == []


def test_second_produce_does_not_rebuild(tmp_path):
    store = ArtifactStore(tmp_path)
    produce(store)
    calls = []
    produce(store, build=lambda w: calls.append(1) or build_two_files(w))
    assert calls == []


def test_damaged_artifact_is_rebuilt(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = produce(store)
    path = store.local_path(manifest, "a.txt")
    path.write_bytes(b"tampered!")
    assert store.get("demo", manifest.fingerprint) is None
    calls = []
    produce(store, build=lambda w: calls.append(1) or build_two_files(w))
    assert calls == [1] and path.read_bytes() == b"alpha"


def test_same_size_tamper_is_caught_by_sha256(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = produce(store)
    store.local_path(manifest, "a.txt").write_bytes(b"ALPHA")
    assert store.get("demo", manifest.fingerprint, verify="size") is not None
    assert store.problems(manifest, "sha256") == ["a.txt: sha256 differs from the manifest"]


def test_failed_build_leaves_nothing_visible_and_resumes_from_complete_files(tmp_path):
    store = ArtifactStore(tmp_path)

    def failing(writer):
        writer.write_bytes("part-0", b"done")
        with writer.open("part-1") as handle:
            handle.write(b"half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        produce(store, build=failing)
    assert store.get("demo", "f" * 64) is None
    assert not (tmp_path / "demo" / ("f" * 64)).exists()
    staging = tmp_path / "demo" / (".staging-" + "f" * 64)
    assert sorted(p.name for p in staging.iterdir()) == ["part-0"], "no half-written file survives"

    seen = []

    def resume(writer):
        seen.append(writer.done("part-0"))
        writer.write_bytes("part-1", b"done")
        return {}

    manifest = produce(store, build=resume)
    assert seen == [True]
    assert [f.path for f in manifest.files] == ["part-0", "part-1"]


def test_corrupt_manifest_is_treated_as_missing(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = produce(store)
    (store.local_path(manifest) / MANIFEST_NAME).write_text("{not json")
    assert store.get("demo", manifest.fingerprint) is None


def test_find_and_lineage(tmp_path):
    store = ArtifactStore(tmp_path)
    root = store.produce("ingest", "1" * 64, lambda w: w.sources.append({"url": "crawl.warc.gz"}) or {},
                         config={}, inputs=[], code_version="1")
    child = store.produce("clean", "2" * 64, build_two_files, config={"t": 1}, inputs=[root.fingerprint],
                          code_version="1")
    assert store.find("222222").fingerprint == child.fingerprint
    tree = store.lineage(child.fingerprint[:8])
    assert tree["stage"] == "clean"
    assert tree["inputs"][0]["stage"] == "ingest"
    assert tree["inputs"][0]["sources"] == [{"url": "crawl.warc.gz"}]
    with pytest.raises(StorageError, match="no artifact"):
        store.find("abcdef")


def test_object_store_url(tmp_path):
    store = ArtifactStore("memory://kiln-test-store")
    manifest = produce(store)
    assert store.get("demo", manifest.fingerprint, verify="sha256") is not None
    with store.open(manifest, "a.txt") as handle:
        assert handle.read() == b"alpha"


def test_abandoned_staging_of_other_fingerprints_is_removed(tmp_path):
    store = ArtifactStore(tmp_path)
    with pytest.raises(RuntimeError):
        produce(store, fp="a" * 64, build=lambda w: w.write_bytes("x", b"1") or (_ for _ in ()).throw(RuntimeError()))
    assert (tmp_path / "demo" / (".staging-" + "a" * 64)).exists()
    produce(store, fp="b" * 64)
    assert not (tmp_path / "demo" / (".staging-" + "a" * 64)).exists()


def _slow_build(args):
    root, marker = args
    store = ArtifactStore(root)

    def build(writer):
        with open(marker, "a") as handle:
            handle.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        writer.write_bytes("a.txt", b"alpha")
        return {}

    return store.produce("demo", "c" * 64, build, config={}, inputs=[], code_version="1").fingerprint


def test_concurrent_producers_build_once(tmp_path):
    marker = tmp_path / "builds.log"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_slow_build, [(str(tmp_path / "store"), str(marker))] * 2)
    assert results == ["c" * 64] * 2
    assert len(marker.read_text().splitlines()) == 1, "the second run waited and reused the artifact"


def test_s3_store_commits_with_the_manifest_last(s3_bucket):
    store = ArtifactStore("s3://kiln/runs")
    manifest = produce(store)
    assert not store.is_local
    assert store.get("demo", manifest.fingerprint, verify="sha256") is not None
    with store.open(manifest, "sub/b.json") as handle:
        assert json.loads(handle.read()) == {"x": 1}
    assert store.find(manifest.fingerprint[:8]).fingerprint == manifest.fingerprint

    # A directory without its manifest is never read, and is rebuilt from scratch.
    store.fs.rm(f"{store.artifact_dir('demo', manifest.fingerprint)}/{MANIFEST_NAME}")
    assert store.get("demo", manifest.fingerprint) is None
    rebuilt = produce(store)
    assert [f.sha256 for f in rebuilt.files] == [f.sha256 for f in manifest.files]


def test_a_same_size_damage_is_never_served(tmp_path, caplog):
    """Reliability defect 1: one byte flipped in the middle of a committed file, its size (and
    even its modification time) unchanged, used to be served as intact."""
    store = ArtifactStore(tmp_path)
    manifest = produce(store, build=lambda w: w.write_bytes("shard.bin", bytes(range(256)) * 64) or {})
    path = store.local_path(manifest, "shard.bin")
    before = path.stat()
    damaged = bytearray(path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x01
    path.write_bytes(bytes(damaged))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same size and mtime
    with caplog.at_level("WARNING", logger="kiln.storage"):
        assert store.get("demo", manifest.fingerprint) is None
    assert f"{path}: sha256 differs from the manifest; the artifact will be rebuilt" in caplog.text
    calls = []
    rebuilt = produce(store, build=lambda w: calls.append(1) or w.write_bytes("shard.bin", bytes(range(256)) * 64))
    assert calls == [1] and rebuilt.file("shard.bin").sha256 == manifest.file("shard.bin").sha256
    assert store.get("demo", manifest.fingerprint) is not None


def test_an_unchanged_artifact_is_not_hashed_again(tmp_path, monkeypatch):
    """The cost of verification: a file is hashed when it changed since its sha256 last matched."""
    import storage.store

    store = ArtifactStore(tmp_path)
    manifest = produce(store)
    hashed = []
    real = storage.store.sha256_of
    monkeypatch.setattr(storage.store, "sha256_of", lambda fs, path, **kw: hashed.append(path) or real(fs, path))
    for _ in range(3):
        assert store.get("demo", manifest.fingerprint) is not None
    assert hashed == [], "stamps recorded at commit: nothing to hash"
    os.utime(store.local_path(manifest, "a.txt"))  # touched, not changed
    assert store.get("demo", manifest.fingerprint) is not None
    assert store.get("demo", manifest.fingerprint) is not None
    assert [os.path.basename(p) for p in hashed] == ["a.txt"], "hashed once, then its new stamp is trusted"


def test_no_temporary_file_survives_into_a_committed_artifact(tmp_path):
    """Reliability defect 3: a kill left `…parquet.tmp-…` files in the staging directory, and the
    rerun committed them inside the artifact (not in its manifest, but in its shards folder)."""
    from storage import TEMP_MARK

    store = ArtifactStore(tmp_path)
    staging = tmp_path / "demo" / (".staging-" + "f" * 64)
    (staging / "shards").mkdir(parents=True)
    (staging / "shards" / f"00001.parquet{TEMP_MARK}3f9a2c1d").write_bytes(b"half a shard")
    (staging / "index" / f".band_009.hashes.npy{TEMP_MARK}77aa").mkdir(parents=True)
    manifest = produce(store)
    committed = tmp_path / "demo" / ("f" * 64)
    assert not [p for p in committed.rglob("*") if TEMP_MARK in p.name], "leftovers removed on resume"
    assert sorted(f.path for f in manifest.files) == ["a.txt", "sub/b.json"]

    def leaves_a_temporary(writer):
        build_two_files(writer)
        (writer.local_path("shards") / f"00002.parquet{TEMP_MARK}0000").parent.mkdir(parents=True, exist_ok=True)
        (writer.local_path("shards") / f"00002.parquet{TEMP_MARK}0000").write_bytes(b"x")
        return {}

    with pytest.raises(StorageError, match="a temporary file in the artifact being committed"):
        produce(store, fp="e" * 64, build=leaves_a_temporary)
    assert store.get("demo", "e" * 64) is None


def test_write_tree_puts_a_local_directory_into_an_object_store_artifact(tmp_path):
    """How the training and quantize stages' local outputs reach a remote store."""
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "x.bin").write_bytes(b"12")
    (tmp_path / "out" / "top.json").write_text("{}")
    store = ArtifactStore(f"memory://write-tree-{tmp_path.name}")
    made = store.produce("toy", "e" * 64, lambda w: w.write_tree(tmp_path / "out", "model") or {}, config={},
                         inputs=[], code_version="1")
    assert sorted((f.path, f.bytes) for f in made.files) == [("model/a/x.bin", 2), ("model/top.json", 2)]
    with store.open(made, "model/a/x.bin") as handle:
        assert handle.read() == b"12"


def _rewrite_manifest(store, manifest, change):
    path = store.local_path(manifest) / MANIFEST_NAME
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("bad", ["model/../../../escaped.txt", "../../../../../../etc/hostname", "/etc/hostname",
                                 "./a.txt", "sub//b.json", ".."])
def test_a_manifest_path_outside_its_artifact_makes_it_damaged(tmp_path, bad):
    """A manifest comes from a store that may hold anything: a path that leaves the artifact is
    never read, hashed or written to; the artifact is refused as damaged, and `list` says so."""
    store = ArtifactStore(tmp_path / "data")
    manifest = produce(store)
    _rewrite_manifest(store, manifest, lambda r: r["files"][0].update(path=bad))
    assert store.get("demo", manifest.fingerprint, verify="none") is None
    damaged: list[str] = []
    assert store.list(damaged=damaged) == []
    assert len(damaged) == 1 and "not a relative path inside the artifact" in damaged[0]


def test_an_object_store_copy_stays_inside_its_scratch_directory(tmp_path):
    store = ArtifactStore("memory://kiln-test-escape")
    manifest = produce(store, fp="e" * 64)
    path = posixpath.join(store.artifact_dir("demo", manifest.fingerprint), MANIFEST_NAME)
    record = json.loads(store.fs.cat_file(path))
    record["files"].append({**record["files"][0], "path": "sub/../../../escaped.txt"})
    store.fs.pipe_file(path, json.dumps(record).encode())
    assert store.get("demo", manifest.fingerprint, verify="none") is None
    good = store.local_dir(manifest, "", tmp_path / "scratch")  # the manifest read before the tampering
    assert sorted(p.name for p in good.rglob("*") if p.is_file()) == ["a.txt", "b.json"]
    assert not list(tmp_path.rglob("escaped.txt"))


def test_a_manifest_that_is_its_own_input_ends_its_lineage_branch(tmp_path):
    store = ArtifactStore(tmp_path)
    manifest = produce(store)
    _rewrite_manifest(store, manifest, lambda r: r.update(inputs=[manifest.fingerprint]))
    tree = store.lineage(manifest.short)
    assert tree["inputs"] == [{"stage": "demo", "fingerprint": manifest.fingerprint, "cycle": True, "inputs": []}]


def test_directories_that_are_not_stages_are_skipped_with_a_warning(tmp_path, caplog):
    store = ArtifactStore(tmp_path)
    manifest = produce(store)
    for stray in ("lost+found", "backup.old"):
        (tmp_path / stray).mkdir()
    assert store.stages() == ["demo"]
    assert [m.fingerprint for m in store.list()] == [manifest.fingerprint]
    assert "lost+found: not a stage directory" in caplog.text and "backup.old" in caplog.text
