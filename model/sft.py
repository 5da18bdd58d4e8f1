"""The SFT stage: supervised fine-tuning of a pretrained model on conversations, under accelerate.

Inputs: a trained model artifact (pretrain: its `model/` directory) and the tokenizer artifact.
Data: a local file or directory of instruction data in the common formats, or, by default, Q&A
built offline from the standard library's documentation (model/stdlib_qa.py):

    Alpaca-style   {"instruction": ..., "input": ..., "output": ...}   as a JSON list or JSONL
    messages       {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}   JSONL

Each conversation is rendered with the tokenizer's chat template (model/chat_format.py), the
loss mask covering what the assistant says; a stable hash of the prompt holds out
`holdout_fraction` of them. Short conversations are packed into rows of `seq_len + 1` tokens,
each led by BOS as documents are in pretraining, the mask carried along; a conversation longer
than a row is cut to it. The rows go to `data/{train,val}.parquet` in the artifact, and the
shared training loop (model/train.py) starts from the pretrained weights with `SFTObjective`:
cross-entropy on the assistant's tokens only. Checkpoints and resume work as in pretraining.

The held-out metric is `val_response_loss` (nats per assistant token); the pretrained model's
value on the same rows is measured once before training (`baseline.json`) and recorded as
`pretrained_val_response_loss` beside the SFT model's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from model.chat_format import ChatFormat, ChatTokens, check_messages
from model.checkpoint import TOKENIZER_FILES, read_config
from model.launch import LaunchConfig
from model.pretrain import local_copy, train_in_staging, training_stats
from model.train import METRICS, NextTokenObjective, TrainConfig
from storage import ArtifactStore, ArtifactWriter, ConfigError, InputError, Manifest, Stage, StageConfig, local_sha256

log = logging.getLogger("kiln")

STDLIB_QA = Path(__file__).with_name("stdlib_qa.py")
DATA_SUFFIXES = (".json", ".jsonl")
_HASH_RANGE = 1 << 64


def sft_train_defaults() -> TrainConfig:
    """Fine-tuning: a lower peak rate and far fewer steps than pretraining."""
    return TrainConfig(batch_size=16, max_steps=200, lr=3e-4, warmup_steps=20, eval_every=50, eval_batches=20,
                       checkpoint_every=100, log_every=10)


class SFTConfig(StageConfig):
    data: str | None = Field(None, description="Local instruction data: a .json (list) or .jsonl file, or a "
                                               "directory of them. None: Q&A built from the Python standard "
                                               "library's documentation (offline).")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of conversations held out for "
                                                                 "validation, by a stable hash of the prompt.")
    on_bad_line: Literal["skip", "error"] = Field(
        "skip", description="A malformed entry: skip it (logged as file:line: reason, and counted) or stop "
                            "with an error naming file and line.")
    seq_len: int | None = Field(None, ge=8, description="Tokens per row; default: the pretrained model's.")
    train: TrainConfig = Field(default_factory=sft_train_defaults)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)


# ------------------------------------------------------------------ reading instruction data


class BadEntry(ValueError):
    """An entry that does not have the expected shape; the message is the reason."""


def data_files(path: str) -> list[Path]:
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise InputError(f"{root}: no .json or .jsonl files")
        return files
    if not root.is_file():
        raise InputError(f"{root}: no such file or directory")
    return [root]


def describe_data(data: str | None) -> dict[str, Any]:
    """What identifies the data now (it joins the fingerprint): file contents, or the Python
    whose documentation the default data is made from."""
    if data is None:
        return {"default": "stdlib-docs", "python": sys.version, "script": local_sha256(STDLIB_QA)}
    return {"files": [{"path": str(p), "sha256": local_sha256(p)} for p in data_files(data)]}



def _json_entries(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) for each entry of a JSON list or each line of a JSONL file. A line that is
    not JSON comes as (line, BadEntry); a JSON list that does not parse is an InputError in
    either mode: there is no next entry to go on from."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_list(path, text, len(text) - len(stripped))
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as err:
            yield number, BadEntry(f"not valid JSON ({err.msg}, column {err.colno})")


def _json_list(path: Path, text: str, start: int) -> Iterator[tuple[int, Any]]:
    decoder = json.JSONDecoder()
    position, line = start + 1, 1 + text.count("\n", 0, start)

    def skip_space() -> None:
        nonlocal position, line
        while position < len(text) and text[position] in " \t\r\n":
            line += text[position] == "\n"
            position += 1

    try:
        skip_space()
        if text.startswith("]", position):
            position += 1
        else:
            while True:
                skip_space()
                value, end = decoder.raw_decode(text, position)
                yield line, value
                line += text.count("\n", position, end)
                position = end
                skip_space()
                if text.startswith(",", position):
                    position += 1
                elif text.startswith("]", position):
                    position += 1
                    break
                else:
                    raise json.JSONDecodeError("expected ',' or ']' after an entry", text, position)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    skip_space()
    if position < len(text):
        raise InputError(f"{path}:{line}: text after the end of the JSON list")


def read_entries(files: list[Path], parse: Callable[[Any], Any], on_bad_line: str) -> tuple[list[Any], list[str]]:
    """Parsed entries of every file in order, and the `file:line: reason` of each bad one."""
    entries, bad = [], []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        for line, value in _json_entries(path, text):
            try:
                if isinstance(value, BadEntry):
                    raise value
                entries.append(parse(value))
            except BadEntry as err:
                where = f"{path}:{line}: {err}"
                if on_bad_line == "error":
                    raise InputError(where) from None
                log.warning("skipped %s", where)
                bad.append(where)
    return entries, bad


def string_field(entry: dict, key: str, required: bool = True) -> str:
    if key not in entry or entry[key] is None:
        if required:
            raise BadEntry(f"missing field {key!r}")
        return ""
    if not isinstance(entry[key], str):
        raise BadEntry(f"field {key!r} must be a string, got {type(entry[key]).__name__}")
    return entry[key]


def alpaca_prompt(entry: dict) -> list[dict[str, str]]:
    """The user turn of an Alpaca-style entry: the instruction, then its input after a blank line."""
    instruction, extra = string_field(entry, "instruction"), string_field(entry, "input", required=False)
    if not instruction.strip():
        raise BadEntry("field 'instruction' is empty")
    return [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra.strip() else "")}]


def sft_conversation(entry: Any) -> list[dict[str, str]]:
    """An entry of instruction data as chat messages."""
    if not isinstance(entry, dict):
        raise BadEntry(f"expected a JSON object, got {type(entry).__name__}")
    if "messages" in entry:
        try:
            messages = check_messages(entry["messages"])
        except ValueError as err:
            raise BadEntry(str(err)) from None
        if not any(m["role"] == "assistant" and m["content"] for m in messages):
            raise BadEntry("no assistant message to learn from")
        return messages
    if "instruction" not in entry:
        raise BadEntry("expected 'messages', or 'instruction' and 'output'")
    output = string_field(entry, "output")
    if not output.strip():
        raise BadEntry("field 'output' is empty")
    return [*alpaca_prompt(entry), {"role": "assistant", "content": output}]


def holdout_key(prompt: list[dict[str, str]]) -> int:
    """A stable 64-bit hash of a prompt: the same prompt is held out in SFT and in DPO."""
    canonical = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(canonical.encode(), digest_size=8).digest(), "big")


def split_holdout(items: list[Any], prompts: list[list[dict[str, str]]], fraction: float) -> tuple[list, list]:
    """(train, val) by the hash of each item's prompt; at least one item is held out when
    fraction > 0 and there are two or more."""
    keys = [holdout_key(p) for p in prompts]
    cutoff = int(fraction * _HASH_RANGE)
    held = [k < cutoff for k in keys]
    if fraction > 0 and not any(held) and len(items) > 1:
        held[min(range(len(keys)), key=keys.__getitem__)] = True
    return [x for x, h in zip(items, held) if not h], [x for x, h in zip(items, held) if h]


def default_data(kind: Literal["sft", "dpo"], target: Path) -> Path:
    """Write the offline default data (model/stdlib_qa.py in a fresh interpreter) to target."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    with tempfile.TemporaryDirectory(prefix="kiln-stdlib-qa-") as empty_dir:
        result = subprocess.run([sys.executable, "-S", "-s", str(STDLIB_QA), kind], cwd=empty_dir, env=env,
                                capture_output=True, timeout=600)
    if result.returncode != 0:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise InputError(f"{STDLIB_QA}: failed to build the default data: {' / '.join(tail)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(result.stdout)
    return target


# ------------------------------------------------------------------ rows


def pack_conversations(encoded: list[ChatTokens], row_len: int, pad_id: int,
                       window: int = 64) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Conversations (each led by BOS) packed into rows of row_len: (tokens, mask) [rows, row_len].

    First fit among the last `window` rows still open; a conversation longer than a row is cut
    to it, and dropped if nothing trainable is left."""
    rows: list[ChatTokens] = []
    counts = {"truncated": 0, "dropped_too_long": 0}
    for conversation in encoded:
        if len(conversation) > row_len:
            counts["truncated"] += 1
            conversation = ChatTokens(conversation.ids[:row_len], conversation.mask[:row_len])
            if not any(conversation.mask):
                counts["dropped_too_long"] += 1
                continue
        for row in rows[-window:]:
            if len(row) + len(conversation) <= row_len:
                row.ids += conversation.ids
                row.mask += conversation.mask
                break
        else:
            rows.append(ChatTokens(list(conversation.ids), list(conversation.mask)))
    tokens = np.full((len(rows), row_len), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), row_len), dtype=bool)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = row.ids
        mask[i, :len(row)] = row.mask
    return tokens, mask, counts


def write_table(path: Path, columns: dict[str, list]) -> None:
    """A Parquet file written under a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(columns), temp, compression="zstd")
    os.replace(temp, path)


def write_rows(path: Path, tokens: np.ndarray, mask: np.ndarray) -> None:
    write_table(path, {"tokens": pa.array(list(tokens), pa.list_(pa.int32())),
                       "mask": pa.array(list(mask), pa.list_(pa.bool_()))})


def read_table_columns(path: str | Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


def read_rows(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    width = len(table.column("tokens")[0]) if table.num_rows else 0
    tokens = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, width).astype(np.int64)
    mask = np.asarray(table.column("mask").combine_chunks().flatten().to_numpy(zero_copy_only=False),
                      dtype=bool).reshape(-1, width)
    return tokens, mask


def row_batch(tokens: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of rows: targets are -100 wherever the next token is not trained on."""
    rows = torch.from_numpy(tokens)
    targets = rows[:, 1:].masked_fill(~torch.from_numpy(mask[:, 1:]), -100)
    return rows[:, :-1].contiguous(), targets.contiguous()


# ------------------------------------------------------------------ batches of examples


class IndexLoader:
    """Batches of example indices, endless: epochs of a seeded permutation one after another.

    Global batch g is positions [g*B*W, (g+1)*B*W) of the stream of epochs; rank r takes its
    B-slice r of each. A batch may span two epochs, so any number of examples serves any batch
    size. State = batches this rank has taken: the stream is a pure function of (seed, n)."""

    def __init__(self, count: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if count < 1:
            raise ValueError("no examples to make batches of")
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.taken = 0
        self._epoch: tuple[int, np.ndarray | None] = (-1, None)

    def _order(self, epoch: int) -> np.ndarray:
        if self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.count))
        return self._epoch[1]

    def batch(self, g: int) -> np.ndarray:
        start = (g * self.world_size + self.rank) * self.batch_size
        positions = range(start, start + self.batch_size)
        return np.array([self._order(p // self.count)[p % self.count] for p in positions])

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            indices = self.batch(self.taken)
            self.taken += 1
            yield indices

    def state_dict(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.taken = int(state["taken"])


def eval_indices(count: int, rank: int, world_size: int, limit: int) -> list[int]:
    """The held-out examples a rank evaluates: the same ones at every evaluation, and as many on
    every rank (no rank waits at a collective while another still runs)."""
    per_rank = max(1, min(limit, count // world_size))
    return [(rank + k * world_size) % count for k in range(per_rank)]


@torch.no_grad()
def response_loss_sums(model, tokens: np.ndarray, mask: np.ndarray, batch_size: int, device) -> tuple[float, int]:
    """(nats, tokens) of the trained-on tokens of rows."""
    nats, counted = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        inputs, targets = (t.to(device) for t in row_batch(tokens[start:start + batch_size],
                                                          mask[start:start + batch_size]))
        logits, _ = model(inputs)
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                   ignore_index=-100, reduction="sum")
        nats += losses.item()
        counted += int((targets != -100).sum())
    return nats, counted


# ------------------------------------------------------------------ the stage


def check_model_inputs(stage: str, inputs: list[Manifest], model_stages: tuple[str, ...]) -> tuple[Manifest, Manifest]:
    names = [m.stage for m in inputs]
    if len(inputs) != 2 or names[0] not in model_stages or names[1] != "tokenizer":
        raise InputError(f"{stage}: needs a {' or '.join(model_stages)} artifact and a tokenizer artifact, got {names}")
    trained, tokenizer = inputs
    if not any(f.path == "model/model.safetensors" for f in trained.files):
        raise InputError(f"{trained.stage}/{trained.short}: not a trained model artifact (no model/model.safetensors)")
    return trained, tokenizer


def artifact_dir(store: ArtifactStore, manifest: Manifest, prefix: str, scratch: Path) -> Path:
    """A local directory with the artifact's files under `prefix` (downloaded for object stores)."""
    if store.is_local:
        return store.local_path(manifest, prefix)
    target = scratch / f"{manifest.stage}-{manifest.short}" / prefix
    for entry in manifest.files_under(prefix):
        destination = target / Path(entry.path).relative_to(prefix)
        destination.parent.mkdir(parents=True, exist_ok=True)
        with store.open(manifest, entry.path) as src, open(destination, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def model_settings(model_dir: Path, tokenizer: Manifest, seq_len: int | None) -> dict[str, Any]:
    """The trained model's architecture, with the row length of this stage."""
    settings = dict(read_config(model_dir)["model"])
    if tokenizer.stats.get("vocab_size") not in (None, settings["vocab_size"]):
        raise InputError(f"{model_dir}: the model has a vocabulary of {settings['vocab_size']}, the tokenizer "
                         f"tokenizer/{tokenizer.short} has {tokenizer.stats['vocab_size']}")
    return {**settings, "seq_len": seq_len or settings["seq_len"]}


def output_dir(store: ArtifactStore, writer: ArtifactWriter, scratch: Path) -> Path:
    """Where the training process writes: the artifact's staging directory on local stores (it
    survives a kill: a rerun resumes), scratch space otherwise (train_in_staging uploads it)."""
    return writer.local_path("") if store.is_local else scratch / "out"


def load_data(config: SFTConfig | Any, kind: Literal["sft", "dpo"], out_dir: Path,
              parse: Callable[[Any], Any]) -> tuple[list[Any], list[str], str]:
    """(entries, bad lines, a description of the source) of the configured data."""
    if config.data is None:
        files = [default_data(kind, out_dir / "data" / f"stdlib-{kind}.jsonl")]
        source = f"stdlib docs (Python {sys.version.split()[0]})"
    else:
        files = data_files(config.data)
        source = config.data
    entries, bad = read_entries(files, parse, config.on_bad_line)
    if not entries:
        raise InputError(f"{source}: no usable entries ({len(bad)} malformed)")
    return entries, bad, source


def last_eval(out_dir: Path, key: str) -> dict[str, Any]:
    rows = [json.loads(line) for line in (out_dir / METRICS).read_text().splitlines()]
    evals = [r for r in rows if key in r]
    return {k: v for k, v in evals[-1].items() if k.startswith("val_")} if evals else {}


def build_sft(config: SFTConfig, inputs: list[Manifest], store: ArtifactStore, writer: ArtifactWriter) -> dict[str, Any]:
    pretrained, tokenizer = check_model_inputs("sft", inputs, ("pretrain", "sft", "dpo"))
    processes = config.launch.num_processes * config.launch.num_machines
    with tempfile.TemporaryDirectory(prefix="kiln-sft-") as scratch_dir:
        scratch = Path(scratch_dir)
        model_dir = artifact_dir(store, pretrained, "model", scratch)
        tokenizer_path = local_copy(store, tokenizer, TOKENIZER_FILES, scratch)
        model = model_settings(model_dir, tokenizer, config.seq_len)
        out_dir = output_dir(store, writer, scratch)
        conversations, bad, source = load_data(config, "sft", out_dir, sft_conversation)
        prompts = [c[:max(i for i, m in enumerate(c) if m["role"] == "assistant")] for c in conversations]
        train, val = split_holdout(list(zip(conversations, prompts)), prompts, config.holdout_fraction)
        if not val:
            raise ConfigError(f"sft: nothing held out of {len(conversations)} conversations; raise holdout_fraction")
        chat = ChatFormat.from_dir(tokenizer_path)
        stats: dict[str, Any] = {"data": source, "bad_lines": len(bad), "bad_line_examples": bad[:10],
                                 "seq_len": model["seq_len"], "conversations": {}, "rows": {},
                                 "trainable_tokens": {}, "truncated": 0, "dropped_too_long": 0}
        for split, items in (("train", train), ("val", val)):
            tokens, mask, counts = pack_conversations([chat.encode(c) for c, _ in items], model["seq_len"] + 1,
                                                      chat.pad_id)
            if len(tokens) == 0:
                raise InputError(f"sft: no {split} conversation fits in seq_len {model['seq_len']}")
            write_rows(out_dir / "data" / f"{split}.parquet", tokens, mask)
            stats["conversations"][split] = len(items)
            stats["rows"][split] = len(tokens)
            stats["trainable_tokens"][split] = int(mask[:, 1:].sum())
            stats["truncated"] += counts["truncated"]
            stats["dropped_too_long"] += counts["dropped_too_long"]
        baseline = pretrained_response_loss(model_dir, out_dir, config.train)
        spec = {
            "objective": "model.sft:SFTObjective",
            "model": model,
            "train": config.train.model_dump(),
            "init_from": str(model_dir),
            "tokenizer_dir": str(tokenizer_path),
            "rows": {split: str(out_dir / "data" / f"{split}.parquet") for split in ("train", "val")},
            "expected_world_size": processes,
        }
        out_dir = train_in_staging("sft", spec, config.launch, store, writer, scratch)
        return {**training_stats(out_dir), **last_eval(out_dir, "val_response_loss"),
                "pretrained_val_response_loss": baseline, **stats,
                "init_from": f"{pretrained.stage}/{pretrained.fingerprint}"}


def pretrained_response_loss(model_dir: Path, out_dir: Path, train: TrainConfig) -> float:
    """The starting model's held-out response loss, on the rows a single process evaluates;
    measured once and kept in baseline.json (a resumed build reads it back)."""
    from model.checkpoint import load_checkpoint

    path = out_dir / "baseline.json"
    if path.exists():
        return json.loads(path.read_text())["val_response_loss"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _ = load_checkpoint(model_dir, device)
    tokens, mask = read_rows(out_dir / "data" / "val.parquet")
    keep = eval_indices(len(tokens), 0, 1, train.eval_batches * train.batch_size)
    nats, counted = response_loss_sums(model, tokens[keep], mask[keep], train.batch_size, device)
    del model
    loss = round(nats / max(counted, 1), 6)
    path.write_text(json.dumps({"val_response_loss": loss, "tokens": counted}))
    return loss


class SFTObjective(NextTokenObjective):
    """Cross-entropy on the assistant's tokens of packed conversation rows."""

    def __init__(self, spec: dict, run):
        self.config = TrainConfig(**spec["train"])
        self.device = run.accelerator.device
        self.train_tokens, self.train_mask = read_rows(spec["rows"]["train"])
        self.val_tokens, self.val_mask = read_rows(spec["rows"]["val"])

    def train_batches(self, rank: int, world_size: int) -> _RowBatches:
        return _RowBatches(self, IndexLoader(len(self.train_tokens), self.config.batch_size, self.config.seed,
                                             rank, world_size))

    def evaluate(self, model, rank: int, world_size: int, batches: int) -> dict[str, float]:
        keep = eval_indices(len(self.val_tokens), rank, world_size, batches * self.config.batch_size)
        nats, counted = response_loss_sums(model, self.val_tokens[keep], self.val_mask[keep],
                                           self.config.batch_size, self.device)
        return {"val_response_loss": nats / max(counted, 1)}


class _RowBatches:
    """An IndexLoader's batches as (inputs, targets) tensors of rows; its state is the loader's."""

    def __init__(self, objective: SFTObjective, loader: IndexLoader):
        self.objective, self.loader = objective, loader

    def __iter__(self):
        for indices in self.loader:
            yield row_batch(self.objective.train_tokens[indices], self.objective.train_mask[indices])

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


STAGE = Stage("sft", SFTConfig, build_sft, code_version="1", describe_sources=lambda c: describe_data(c.data))
