"""Every stage by name, for the generic Prefect task (its inputs must be JSON, so it gets a name)."""

from pipelines import clean, dedup, ingest, sample_crawl
from pipelines.common import Stage

STAGES: dict[str, Stage] = {s.name: s for s in (sample_crawl.STAGE, ingest.STAGE, clean.STAGE, dedup.STAGE)}
