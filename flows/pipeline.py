"""The pipeline flow: every stage in order, each a cached task; `until` stops the chain early.

    crawl -> ingest -> clean -> dedup -> tokenizer -> pack -> pretrain -> sft -> dpo -> evaluate

With no crawl input the offline sample crawl is made first. Each stage's inputs are named in
CHAIN; a stage runs only when its output artifact is missing (the task's cache).
"""

from __future__ import annotations

from prefect import flow

from flows.config import KilnConfig
from flows.tasks import run_stage
from storage import ArtifactStore, default_root

# stage -> the stages whose artifacts it reads, in order
CHAIN: dict[str, tuple[str, ...]] = {
    "ingest": ("sample-crawl",),
    "clean": ("ingest",),
    "dedup": ("clean",),
    "tokenizer": ("dedup",),
    "pack": ("dedup", "tokenizer"),
    "pretrain": ("pack", "tokenizer"),
    "sft": ("pretrain", "tokenizer"),
    "dpo": ("sft", "tokenizer"),
    "evaluate": ("dpo", "pack", "tokenizer"),
}
STAGES = tuple(CHAIN)
SECTIONS = {"sample-crawl": "sample_crawl"}  # stage name -> config section, where they differ


@flow(name="pipeline", persist_result=False)
def pipeline_flow(
    config: KilnConfig = KilnConfig(),
    data_dir: str = default_root(),
    until: str = "evaluate",
    force: list[str] = [],  # noqa: B006 - Prefect parameters must be JSON; never mutated
) -> dict[str, dict]:
    """Run the stages up to `until`; returns each stage's manifest and whether it was cached."""
    runs: dict[str, dict] = {}
    if not config.ingest.inputs:
        runs["sample-crawl"] = run_stage("sample-crawl", config.sample_crawl, [], data_dir, "sample-crawl" in force)
    for stage in STAGES[: STAGES.index(until) + 1]:
        inputs = [runs[name] for name in CHAIN[stage] if name in runs]
        if stage == "dedup":
            inputs += earlier_corpus(config, data_dir)
        section = getattr(config, SECTIONS.get(stage, stage))
        runs[stage] = run_stage(stage, section, inputs, data_dir, stage in force)
    return runs


def earlier_corpus(config: KilnConfig, data_dir: str) -> list[dict]:
    """The dedup artifact a refreshed crawl is deduplicated against (`dedup.against`), if any."""
    if not config.dedup.against:
        return []
    return [{"manifest": ArtifactStore(data_dir).find(config.dedup.against).model_dump(mode="json")}]
