"""Deployments for the Prefect UI: the whole pipeline, each stage on its own, the corpus refresh.

A stage's deployment takes that stage's pydantic config as its one form (rendered by the UI),
plus the run config the rest of the chain comes from; running it rebuilds that stage (and what
depends on it) and takes everything upstream from the cache. The refresh deployment runs on a
cron schedule: it ingests only crawl files no earlier corpus holds, deduplicates them against
the newest corpus, and continues down the chain.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from prefect import flow, serve
from prefect.types.entrypoint import EntrypointType

from flows.config import load_config
from flows.pipeline import pipeline_flow
from flows.stages import STAGES, TABLE, StageEntry
from storage import ArtifactStore, default_root, local_sha256

log = logging.getLogger("kiln")


def _stage_flow(entry: StageEntry):
    """A flow whose form is one stage's config; the rest of the run config comes from `base_config`."""
    config_cls = entry.stage.config_cls

    def run(config, base_config: str = "tiny", crawl: list[str] | None = None, data_dir: str = default_root()):
        full = load_config(base_config)
        setattr(full, entry.section, config)
        if crawl:
            full.ingest.inputs = list(crawl)
        return pipeline_flow(config=full, data_dir=data_dir, until=entry.name)

    name = f"{entry.section}_stage"
    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"Rebuild the {entry.name} stage with these settings; upstream stages come from the cache."
    params = inspect.signature(run).parameters
    run.__signature__ = inspect.Signature([  # type: ignore[attr-defined] # what inspect.signature reads
        inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=config_cls(),
                          annotation=config_cls),
        *(p.replace(annotation={"base_config": str, "crawl": list[str] | None, "data_dir": str}[p.name])
          for p in list(params.values())[1:]),
    ])
    run.__annotations__ = {"config": config_cls, "base_config": str, "crawl": list[str] | None, "data_dir": str}
    return flow(name=f"stage-{entry.name}", persist_result=False)(run)


# One flow per stage command, each a module attribute (`flows.deployments.clean_stage`): a
# deployment's flow run imports its flow by that path.
STAGE_FLOWS = {entry.name: _stage_flow(entry) for entry in TABLE if entry.command}
globals().update({stage_flow.fn.__name__: stage_flow for stage_flow in STAGE_FLOWS.values()})


def ingested_sources(store: ArtifactStore, fingerprint: str) -> set[tuple[str, str]]:
    """(location, sha256) of every crawl file an artifact was made from, through its lineage."""
    found, pending = set(), [store.lineage(fingerprint)]
    while pending:
        node = pending.pop()
        found |= {(s.get("url"), s.get("sha256")) for s in node.get("sources", [])}
        pending += node.get("inputs", [])
    return found


@flow(name="corpus-refresh", persist_result=False)
def corpus_refresh(crawl: list[str], base_config: str = "tiny", data_dir: str = default_root(),
                   until: str = "pack") -> dict[str, Any]:
    """Ingest the crawl files no earlier corpus holds, dedup them against the newest corpus,
    and continue to `until`."""
    from pipelines.ingest import expand_inputs

    config = load_config(base_config)
    config.ingest.inputs = list(crawl)
    store = ArtifactStore(data_dir)
    corpora = store.list("dedup")
    latest = max(corpora, key=lambda m: m.created) if corpora else None
    seen = ingested_sources(store, latest.fingerprint) if latest else set()
    seen_urls = {url for url, _ in seen}
    new = [f for f in expand_inputs(config.ingest)
           if ((f, local_sha256(f)) not in seen if "://" not in f else f not in seen_urls)]
    if not new:
        log.info("corpus refresh: no new crawl files among %d", len(crawl))
        return {}
    log.info("corpus refresh: %d new crawl file(s), deduplicated against %s", len(new),
             f"dedup/{latest.short}" if latest else "nothing (first corpus)")
    config.ingest.inputs = new
    config.dedup.against = latest.fingerprint if latest else None
    runs = pipeline_flow(config=config, data_dir=data_dir, until="dedup")
    if until == "dedup" or not runs["dedup"]["manifest"]["stats"].get("documents_out"):
        return runs  # nothing new survived cleaning and dedup: nothing to train on
    return pipeline_flow(config=config, data_dir=data_dir, until=until)


def build_deployments(data_dir: str, base_config: str, refresh_crawl: list[str], cron: str) -> list:
    """The pipeline, one deployment per stage, and the scheduled refresh, ready for `serve`."""
    config = load_config(base_config)
    common: dict[str, Any] = {"entrypoint_type": EntrypointType.MODULE_PATH}
    deployments = [pipeline_flow.to_deployment(
        "kiln-pipeline", parameters={"config": config.model_dump(mode="json"), "data_dir": data_dir},
        description="The whole pipeline, crawl to evaluated model.", tags=["kiln"], **common)]
    for stage, stage_flow in STAGE_FLOWS.items():
        section = getattr(config, STAGES[stage].section)
        deployments.append(stage_flow.to_deployment(
            f"kiln-{stage}", parameters={"config": section.model_dump(mode="json"), "base_config": base_config,
                                         "data_dir": data_dir},
            description=f"Rebuild {stage} with new settings.", tags=["kiln", "stage"], **common))
    deployments.append(corpus_refresh.to_deployment(
        "kiln-corpus-refresh", cron=cron,
        parameters={"crawl": refresh_crawl, "base_config": base_config, "data_dir": data_dir},
        description=f"Ingest new crawl files ({cron}), dedup against the newest corpus.", tags=["kiln", "refresh"],
        **common))
    return deployments


def serve_deployments(data_dir: str, base_config: str, refresh_crawl: list[str], cron: str) -> None:
    serve(*build_deployments(data_dir, base_config, refresh_crawl, cron))

