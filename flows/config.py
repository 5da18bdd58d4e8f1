"""The run config: one section per stage, loaded from YAML and `--set key=value` overrides.

`configs/tiny.yaml` is the offline default. A section holds exactly the stage's pydantic
config, so the same models validate the YAML, render as the Prefect UI's forms and feed the
stage's fingerprint; the sections are the lines of the stage table (flows/stages.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, ValidationError, create_model

from flows.stages import TABLE
from storage import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"

# Every stage's settings, one section per line of the stage table; sections left out of a YAML
# file keep their defaults. `config.clean` is a CleanConfig, `config.pretrain` a PretrainConfig.
KilnConfig = create_model(
    "KilnConfig",
    __config__=ConfigDict(extra="forbid"),
    __doc__="Every stage's settings. Sections left out of a YAML file keep their defaults.",
    name=(str, Field("custom", description="A label for this config, shown in summaries.")),
    **{entry.section: (entry.stage.config_cls, Field(default_factory=entry.stage.config_cls)) for entry in TABLE},
)


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


def _first_error(err: ValidationError, source: str, overrides: list[str]) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    reason = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"].lower()
    for item in overrides:  # a bad --set is named as the user wrote it
        key = item.partition("=")[0].strip()
        if where == key or where.startswith(key + "."):
            return f"--set {item}: {reason}"
    return f"{source}: {where}: {reason}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None):
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
    except IsADirectoryError:
        raise ConfigError(f"{source}: a directory, not a config file") from None
    except OSError as err:
        raise ConfigError(f"{source}: cannot be read ({(err.strerror or str(err)).lower()})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a text file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return KilnConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error(err, str(source), overrides or [])) from None
