# The static face of flows/config.py, for type checkers and editors ("go to definition" on
# `config.pretrain.train.lr`). flows/config.py builds KilnConfig from the stage table at import;
# this declares the same sections, and tests/flows/test_stage_table.py checks that they agree.
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from model.dpo import DPOConfig
from model.evaluate import EvaluateConfig
from model.pretrain import PretrainConfig
from model.quantize import QuantizeConfig
from model.sft import SFTConfig
from pipelines.clean import CleanConfig
from pipelines.dedup import DedupConfig
from pipelines.ingest.config import IngestConfig
from pipelines.pack import PackConfig
from pipelines.sample_crawl import SampleCrawlConfig
from pipelines.tokenizer import TokenizerConfig

CONFIG_DIR: Path
DEFAULT_CONFIG: Path

class KilnConfig(BaseModel):
    """Every stage's settings. Sections left out of a YAML file keep their defaults."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("custom", description="A label for this config, shown in summaries.")
    sample_crawl: SampleCrawlConfig = Field(default_factory=SampleCrawlConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pack: PackConfig = Field(default_factory=PackConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]: ...
def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KilnConfig: ...
