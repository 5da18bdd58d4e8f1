"""The pipeline flow: the stages of the table in order, each a cached task; `until` stops the chain early.

    crawl -> ingest -> clean -> dedup -> tokenizer -> pack -> pretrain -> sft -> dpo -> (quantize) -> evaluate

Only the stages `until` needs run (flows/stages.py `chain`); with crawl files given, the
offline sample crawl is skipped. A stage runs only when its output artifact is missing (the
task's cache).
"""

from __future__ import annotations

from prefect import flow

from flows.config import KilnConfig
from flows.stages import TABLE, chain
from flows.tasks import run_stage
from storage import ArtifactStore, Manifest, default_root


@flow(name="pipeline", persist_result=False)
def pipeline_flow(
    config: KilnConfig = KilnConfig(),  # noqa: B008 - Prefect reads the default into the flow's parameter schema
    data_dir: str = default_root(),
    until: str = TABLE[-1].name,
    force: list[str] = [],  # noqa: B006 - Prefect parameters must be JSON; never mutated
) -> dict[str, dict]:
    """Run the stages up to `until`; returns each stage's manifest and whether it was cached."""
    runs: dict[str, dict] = {}
    for entry in chain(until, config):
        if entry.skip_if is not None and entry.skip_if(config):
            continue
        section = getattr(config, entry.section)
        inputs = [Manifest.model_validate(runs[name]["manifest"]) for name in entry.inputs_for(config) if name in runs]
        inputs += entry.read_extra_inputs(section, ArtifactStore(data_dir))
        runs[entry.name] = run_stage(entry.name, section, inputs, data_dir, entry.name in force)
    return runs
