"""The run config: one section per stage, loaded from YAML and `--set key=value` overrides.

`configs/tiny.yaml` is the offline default. A section holds exactly the stage's pydantic
config, so the same models validate the YAML, render as the Prefect UI's forms and feed the
stage's fingerprint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.dpo import DPOConfig
from model.evaluate import EvaluateConfig
from model.pretrain import PretrainConfig
from model.sft import SFTConfig
from pipelines.clean import CleanConfig
from pipelines.dedup import DedupConfig
from pipelines.ingest import IngestConfig
from pipelines.pack import PackConfig
from pipelines.sample_crawl import SampleCrawlConfig
from pipelines.tokenizer import TokenizerConfig
from storage import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


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
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}: expected key=value, e.g. clean.gopher_quality.min_doc_words=30")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def _first_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    reason = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"]
    return f"{source}: {where}: {reason}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KilnConfig:
    """The config from a YAML file (default configs/tiny.yaml) with `key=value` overrides applied."""
    source = Path(path) if path else DEFAULT_CONFIG
    if not source.exists() and not source.is_absolute() and (CONFIG_DIR / source).exists():
        source = CONFIG_DIR / source  # `--config small.yaml` finds the bundled presets
    if not source.exists() and (CONFIG_DIR / f"{source}.yaml").exists():
        source = CONFIG_DIR / f"{source}.yaml"  # `--config small`
    try:
        data = yaml.safe_load(source.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return KilnConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err, str(source))) from None
