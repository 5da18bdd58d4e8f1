"""The stage table: every stage once, in chain order.

The `kiln` commands (flows/cli.py), the pipeline flow (flows/pipeline.py), the deployments
(flows/deployments.py) and the run config `KilnConfig` (flows/config.py) are all derived from
it. A new stage is one file in `pipelines/` or `model/` that defines its `STAGE` (config class
and build function, see storage/stage.py), plus one line here naming the stages it reads.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, get_args

if TYPE_CHECKING:
    from storage import ArtifactStore, Manifest, Stage


@dataclass(frozen=True)
class StageEntry:
    """One line of the table: a stage (its name and the module that defines its `STAGE`), the
    stages whose artifacts it reads, its help text. The module is imported when the stage is
    first needed, so `kiln --help`, `kiln ls` and `kiln lineage` import no stage (and no torch)."""

    name: str
    module: str
    inputs: tuple[str, ...]
    help: str
    command: bool = True  # a `kiln <name>` command and a deployment of its own
    # skipped in a run whose config says so (the sample crawl, when crawl files are given)
    skip_if: Callable[[Any], bool] | None = None
    # the module's function naming artifacts read beyond `inputs`, from the stage's own config
    # (dedup.against): (config, store) -> manifests
    extra_inputs: str | None = None
    # its first input is the trained model its section's `model` setting names (quantize, evaluate);
    # `inputs` holds the default
    model_input: bool = False
    # its artifact holds a model (`model/`) that generate, chat, export and serve-model take
    makes_model: bool = False

    @cached_property
    def stage(self) -> Stage:
        stage = importlib.import_module(self.module).STAGE
        assert stage.name == self.name, f"{self.module}.STAGE is {stage.name!r}, the table says {self.name!r}"
        return stage

    @classmethod
    def of(cls, stage: Stage, inputs: tuple[str, ...], help: str, **settings: Any) -> StageEntry:
        """An entry for a stage object at hand (a test's), not found through a module."""
        entry = cls(stage.name, "", inputs, help, **settings)
        entry.__dict__["stage"] = stage  # what the cached property would hold
        return entry

    def read_extra_inputs(self, config: Any, store: ArtifactStore) -> list[Manifest]:
        if self.extra_inputs is None:
            return []
        return getattr(importlib.import_module(self.module), self.extra_inputs)(config, store)

    @property
    def section(self) -> str:
        """The stage's section of the run config: `sample_crawl` for `sample-crawl`."""
        return self.name.replace("-", "_")

    @property
    def trains_a_model(self) -> bool:
        return "launch" in self.stage.config_cls.model_fields

    def inputs_for(self, config: Any | None) -> tuple[str, ...]:
        """The stages this one reads under a run config (None: the table's defaults)."""
        if not self.model_input or config is None:
            return self.inputs
        return (getattr(config, self.section).model, *self.inputs[1:])


TABLE: tuple[StageEntry, ...] = (
    StageEntry("sample-crawl", "pipelines.sample_crawl", (),
               "The offline sample crawl (Python's documentation as WARC).",
               command=False, skip_if=lambda config: bool(config.ingest.inputs)),
    StageEntry("ingest", "pipelines.ingest", ("sample-crawl",),
               "Read WARC files into Parquet document shards."),
    StageEntry("clean", "pipelines.clean", ("ingest",),
               "Extract main text and apply the quality filters (runs ingest first if needed)."),
    StageEntry("dedup", "pipelines.dedup", ("clean",),
               "Exact and MinHash near-duplicate removal (runs ingest and clean first if needed).",
               extra_inputs="earlier_corpus"),
    StageEntry("tokenizer", "pipelines.tokenizer", ("dedup",),
               "Train the byte-level BPE tokenizer on the deduplicated corpus."),
    StageEntry("pack", "pipelines.pack", ("dedup", "tokenizer"),
               "Tokenize and pack the corpus into Parquet token shards (train/ and val/)."),
    StageEntry("pretrain", "model.pretrain", ("pack", "tokenizer"),
               "Pretrain the transformer under accelerate on the token shards.", makes_model=True),
    StageEntry("sft", "model.sft", ("pretrain", "tokenizer"),
               "Supervised fine-tuning on instruction data (offline default: Q&A from the stdlib docs).",
               makes_model=True),
    StageEntry("dpo", "model.dpo", ("sft", "tokenizer"),
               "Preference tuning (DPO or IPO) of the SFT model.", makes_model=True),
    StageEntry("quantize", "model.quantize", ("dpo", "pack", "tokenizer"),
               "Quantize a trained model's weights: int8, or int4 by round-to-nearest or AWQ.",
               model_input=True, makes_model=True),
    StageEntry("evaluate", "model.evaluate", ("dpo", "pack", "tokenizer"),
               "Held-out loss, perplexity, bits per byte and multiple-choice accuracy.", model_input=True),
)
STAGES: dict[str, StageEntry] = {entry.name: entry for entry in TABLE}

# Commands that run a chain: name -> (its last stage, help). `--force` rebuilds every stage of it.
CHAINS: dict[str, tuple[str, str]] = {
    "corpus": ("dedup", "The corpus chain: ingest -> clean -> dedup."),
    "data": ("pack", "The data chain: corpus -> tokenizer -> pack."),
    "run": (TABLE[-1].name, "The whole pipeline on the run config: crawl to evaluated model, with a sample."),
}


def chain(until: str, config: Any | None = None) -> list[StageEntry]:
    """The stages `until` needs (its inputs, theirs, ...) and itself, in table order; with a run
    config, the models its settings name (`evaluate.model=quantize`)."""
    if until not in STAGES:
        raise KeyError(f"no stage {until!r} (stages: {', '.join(STAGES)})")
    needed, pending = set(), [until]
    while pending:
        name = pending.pop()
        if name not in needed:
            needed.add(name)
            pending += STAGES[name].inputs_for(config)
    return [entry for entry in TABLE if entry.name in needed]


def model_stages() -> tuple[str, ...]:
    """The stages whose artifacts hold a trained model (`model/`)."""
    return tuple(entry.name for entry in TABLE if entry.trains_a_model)


def check_table(with_modules: bool = False) -> None:
    """Every stage reads only stages before it; `with_modules` (the tests) also imports each
    stage and checks the models its `model` setting may name."""
    for position, entry in enumerate(TABLE):
        earlier = {e.name for e in TABLE[:position]}
        choices = (get_args(entry.stage.config_cls.model_fields["model"].annotation)
                   if entry.model_input and with_modules else ())
        missing = [name for name in (*entry.inputs, *choices) if name not in earlier]
        assert not missing, f"stage {entry.name} reads {missing}, which do not come before it in the table"
        if with_modules:
            assert not entry.trains_a_model or entry.makes_model, f"stage {entry.name} trains a model: makes_model"


check_table()
