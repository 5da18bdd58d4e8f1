"""The corpus flow: crawl -> ingest -> clean -> dedup (the offline sample crawl when no input)."""

from __future__ import annotations

from prefect import flow

from flows.config import KilnConfig
from flows.tasks import run_stage
from storage import ArtifactStore, default_root

CORPUS_STAGES = ("ingest", "clean", "dedup")


@flow(name="corpus", persist_result=False)
def corpus_flow(
    config: KilnConfig = KilnConfig(),
    data_dir: str = default_root(),
    until: str = "dedup",
    force: list[str] = [],  # noqa: B006 - Prefect parameters must be JSON; never mutated
) -> dict[str, dict]:
    """Ingest a crawl, clean it and deduplicate it; returns each stage's manifest and status."""
    runs: dict[str, dict] = {}
    crawl: list[dict] = []
    if not config.ingest.inputs:
        runs["sample-crawl"] = run_stage("sample-crawl", config.sample_crawl, [], data_dir, "sample-crawl" in force)
        crawl = [runs["sample-crawl"]]
    runs["ingest"] = run_stage("ingest", config.ingest, crawl, data_dir, "ingest" in force)
    if until == "ingest":
        return runs
    runs["clean"] = run_stage("clean", config.clean, [runs["ingest"]], data_dir, "clean" in force)
    if until == "clean":
        return runs
    earlier = earlier_corpora(config, data_dir)
    runs["dedup"] = run_stage("dedup", config.dedup, [runs["clean"], *earlier], data_dir, "dedup" in force)
    return runs


def earlier_corpora(config: KilnConfig, data_dir: str) -> list[dict]:
    """The dedup artifact a refreshed crawl is deduplicated against (`dedup.against`), if any."""
    if not config.dedup.against:
        return []
    return [{"manifest": ArtifactStore(data_dir).find(config.dedup.against).model_dump(mode="json")}]
