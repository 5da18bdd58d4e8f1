"""The corpus stages with the artifact store on S3 (a local S3 server): the manifest commits."""

from pipelines import clean, dedup, ingest, sample_crawl
from pipelines.common import document_shards, read_shard
from storage import ArtifactStore


def test_sample_crawl_to_dedup_on_s3(s3_bucket):
    store = ArtifactStore("s3://kiln/data")
    crawl = sample_crawl.STAGE.run(sample_crawl.SampleCrawlConfig(max_pages=40), [], store)
    documents = ingest.STAGE.run(ingest.IngestConfig(workers=1), [crawl], store)
    cleaned = clean.STAGE.run(clean.CleanConfig(workers=1), [documents], store)
    deduped = dedup.STAGE.run(dedup.DedupConfig(), [cleaned], store)

    assert documents.stats["documents_out"] == 40
    assert 0 < deduped.stats["documents_out"] <= cleaned.stats["documents_out"]
    assert store.problems(deduped, "sha256") == []
    texts = [t for s in document_shards(deduped)
             for t in read_shard(store, deduped, s, ["text"]).column("text").to_pylist()]
    assert len(texts) == deduped.stats["documents_out"] and all(texts)
    chain = store.lineage(deduped.fingerprint)
    stages = [chain["stage"], chain["inputs"][0]["stage"], chain["inputs"][0]["inputs"][0]["stage"]]
    assert stages == ["dedup", "clean", "ingest"]
