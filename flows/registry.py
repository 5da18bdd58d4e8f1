"""Every stage by name, for the generic Prefect task (its inputs must be JSON, so it gets a name)."""

from model import dpo, evaluate, pretrain, sft
from pipelines import clean, dedup, ingest, pack, sample_crawl, tokenizer
from storage import Stage

STAGES: dict[str, Stage] = {
    s.name: s for s in (sample_crawl.STAGE, ingest.STAGE, clean.STAGE, dedup.STAGE, tokenizer.STAGE, pack.STAGE,
                        pretrain.STAGE, sft.STAGE, dpo.STAGE, evaluate.STAGE)
}
