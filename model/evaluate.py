"""Evaluation: held-out loss, perplexity and bits per byte; multiple-choice by log-likelihood.

The multiple-choice scorer reads a local JSONL file, one question per line, HellaSwag style:
`{"context": "...", "endings": ["...", "..."], "label": 1}`. Each ending is scored by the sum
of its tokens' log-probabilities given the context; `acc` picks the highest sum, `acc_norm`
the highest per byte of the ending (HellaSwag's length-normalised score). With no file, the
stage builds a continuation task from held-out documents: the true continuation of a
document's opening against continuations taken from other documents. Everything is offline.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from model.chat_format import BOS
from model.model import IGNORE_INDEX
from storage import ArtifactStore, ArtifactWriter, InputError, Manifest, Stage, StageConfig


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token stands for (0 for special tokens), for bits per byte.

    Byte-level BPE writes each byte as one printable character; counting a token's characters
    that belong to that alphabet gives its exact byte length.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.float64)
    for token, index in tokenizer.get_vocab().items():
        if token not in special:
            lengths[index] = sum(1 for char in token if char in alphabet)
    return lengths


@torch.no_grad()
def heldout_metrics(model, batches, token_bytes: torch.Tensor, device) -> dict[str, float]:
    """val_loss (nats per token), val_ppl and val_bpb over (inputs, targets) batches."""
    token_bytes = token_bytes.to(device)
    nats = tokens = utf8_bytes = 0.0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        logits, _ = model(inputs)
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none")
        counted = targets.flatten() != IGNORE_INDEX
        nats += losses[counted].double().sum().item()
        tokens += counted.sum().item()
        utf8_bytes += token_bytes[targets.flatten()[counted]].sum().item()
    loss = nats / max(tokens, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": nats / math.log(2) / max(utf8_bytes, 1)}


@torch.no_grad()
def choice_logprobs(model, tokenizer, context: str, endings: list[str], device) -> list[float]:
    """Sum of log-probabilities of each ending's tokens after the context."""
    context_ids = tokenizer.encode(context, add_special_tokens=False).ids
    scores = []
    for ending in endings:
        ending_ids = tokenizer.encode(ending, add_special_tokens=False).ids
        ids = (context_ids + ending_ids)[-model.config.seq_len - 1:]
        n_ending = min(len(ending_ids), len(ids) - 1)
        inputs = torch.tensor([ids[:-1]], device=device)
        logits, _ = model(inputs)
        logprobs = logits[0, -n_ending:].float().log_softmax(-1)
        targets = torch.tensor(ids[-n_ending:], device=device)
        scores.append(logprobs.gather(1, targets[:, None]).sum().item())
    return scores


def read_choice_file(path: Path) -> list[dict[str, Any]]:
    items = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            assert isinstance(item["context"], str) and isinstance(item["endings"], list)
            assert 0 <= int(item["label"]) < len(item["endings"])
        except (ValueError, KeyError, AssertionError, TypeError):
            raise InputError(f"{path}:{number}: expected {{\"context\", \"endings\", \"label\"}}") from None
        items.append(item)
    if not items:
        raise InputError(f"{path}: no questions")
    return items


def multiple_choice(model, tokenizer, items: list[dict[str, Any]], device) -> dict[str, float]:
    correct = correct_norm = 0
    for item in items:
        scores = choice_logprobs(model, tokenizer, item["context"], item["endings"], device)
        per_byte = [s / max(1, len(e.encode())) for s, e in zip(scores, item["endings"])]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == int(item["label"]))
        correct_norm += int(max(range(len(per_byte)), key=per_byte.__getitem__) == int(item["label"]))
    return {"mc_acc": correct / len(items), "mc_acc_norm": correct_norm / len(items), "mc_questions": len(items)}


def continuation_task(texts: list[str], questions: int, choices: int = 4, context_words: int = 32,
                      ending_words: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    """Multiple choice from held-out documents: which continuation follows this opening?"""
    usable = [t.split() for t in texts if len(t.split()) >= context_words + ending_words]
    if len(usable) < choices:
        return []
    rng = random.Random(seed)
    items = []
    for words in rng.sample(usable, min(questions, len(usable))):
        start = rng.randrange(0, len(words) - context_words - ending_words + 1)
        context = " ".join(words[start:start + context_words])
        true_ending = " " + " ".join(words[start + context_words:start + context_words + ending_words])
        endings = [true_ending]
        while len(endings) < choices:
            other = rng.choice(usable)
            if other is words:
                continue
            at = rng.randrange(0, len(other) - ending_words + 1)
            endings.append(" " + " ".join(other[at:at + ending_words]))
        order = list(range(choices))
        rng.shuffle(order)
        items.append({"context": context, "endings": [endings[i] for i in order], "label": order.index(0)})
    return items


# ------------------------------------------------------------------ the stage


class EvaluateConfig(StageConfig):
    model: Literal["pretrain", "sft", "dpo", "quantize"] = Field(
        "dpo", description="Which model of the chain to evaluate (quantize: the quantized one).")
    eval_batches: int = Field(50, ge=1, description="Validation batches for loss / perplexity / bits per byte.")
    batch_size: int = Field(16, ge=1)
    mc_file: str | None = Field(None, description="A local JSONL multiple-choice file; None: the held-out "
                                                  "continuation task built from the validation split.")
    mc_questions: int = Field(200, ge=1, description="Questions in the built continuation task.")
    sample_prompt: str = Field("The", description="A prompt for the sample generation recorded with the results.")
    sample_tokens: int = Field(60, ge=1)
    harness: list[str] = Field([], description="lm-evaluation-harness tasks to run on the model (e.g. hellaswag, "
                                               "arc_easy: downloaded by lm_eval, "
                                               "or local YAMLs via harness_include_path).")
    harness_include_path: str | None = Field(None, description="A directory of local lm_eval task YAMLs.")
    harness_limit: int | None = Field(None, ge=1, description="At most this many examples per harness task.")
    harness_fewshot: int | None = Field(None, ge=0, description="Few-shot examples (None: each task's default).")
    harness_batch_size: int = Field(8, ge=1)
    chat_prompt: str | None = Field("What does `json.dumps` do?",
                                    description="A user message answered (greedily) when the model is a chat model "
                                                "(SFT or DPO); None: no chat sample.")


def _val_documents(store: ArtifactStore, pack: Manifest, tokenizer, bos_id: int, limit: int) -> list[str]:
    """Validation rows decoded and cut at document boundaries (BOS)."""
    import pyarrow.parquet as pq

    texts: list[str] = []
    for entry in pack.files_under("val"):
        with store.open(pack, entry.path) as handle:
            for row in pq.read_table(handle).column("tokens").to_pylist():
                piece: list[int] = []
                for token in row + [bos_id]:
                    if token == bos_id and piece:
                        texts.append(tokenizer.decode(piece))
                        piece = []
                    elif token != bos_id:
                        piece.append(token)
                if len(texts) >= limit:
                    return texts
    return texts


def chat_reply(model, model_dir: Path, config: EvaluateConfig) -> str:
    """The model's greedy reply to `chat_prompt`, in the chat format stored with it."""
    from model.chat import STOP_TOKENS
    from model.chat_format import ChatFormat
    from model.generate import SamplingConfig, generate_tokens

    assert config.chat_prompt is not None, "asked only with a prompt"
    chat = ChatFormat.from_dir(model_dir)
    prompt = chat.encode([{"role": "user", "content": config.chat_prompt}], add_generation_prompt=True).ids
    stop = {i for t in STOP_TOKENS if (i := chat.tokenizer.token_to_id(t)) is not None}
    reply = list(generate_tokens(model, prompt, SamplingConfig(max_new_tokens=config.sample_tokens, temperature=0.0),
                                 stop_ids=stop))
    return chat.tokenizer.decode(reply).strip()


def build_evaluate(config: EvaluateConfig, inputs: list[Manifest], store: ArtifactStore,
                   writer: ArtifactWriter) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from model.checkpoint import artifact_checkpoint, load_checkpoint, model_inputs
    from model.data import TokenShardLoader

    trained, pack, tokenizer_manifest = model_inputs("evaluate", config.model, inputs)
    model, meta = load_checkpoint(artifact_checkpoint(store, trained))
    # a quantized model is a chat model when the model it was made from is one
    made_by = meta.get("quantization", {}).get("source", trained.stage).split("/")[0]
    tokenizer = Tokenizer.from_file(str(store.local_path(tokenizer_manifest, "tokenizer.json")))
    bos_id = tokenizer.token_to_id(BOS)
    assert bos_id is not None, "the tokenizer stage always adds BOS"
    loader = TokenShardLoader(store, pack, split="val", batch_size=config.batch_size, seed=0, shuffle=False)
    results: dict[str, Any] = heldout_metrics(model, itertools.islice(loader, config.eval_batches),
                                              token_byte_lengths(tokenizer), "cpu")
    items = (read_choice_file(Path(config.mc_file)) if config.mc_file else
             continuation_task(_val_documents(store, pack, tokenizer, bos_id, 4 * config.mc_questions),
                               config.mc_questions))
    if items:
        results.update(multiple_choice(model, tokenizer, items, "cpu"))
        results["mc_chance"] = sum(1 / len(i["endings"]) for i in items) / len(items)
    chat_model = made_by in ("sft", "dpo")
    from model.chat import STOP_TOKENS, Loaded, sample_document  # a chat model's text ends at <|end|>

    results["sample"] = sample_document(Loaded(model, tokenizer, artifact_checkpoint(store, trained)),
                                        config.sample_prompt, config.sample_tokens,
                                        stop_tokens=(BOS, *STOP_TOKENS) if chat_model else (BOS,))
    if config.chat_prompt and chat_model:
        results["chat_sample"] = {"user": config.chat_prompt,
                                  "assistant": chat_reply(model, artifact_checkpoint(store, trained), config)}
    if config.harness:
        from model.harness import run_harness, summary

        harness = run_harness(artifact_checkpoint(store, trained), config.harness, config.harness_include_path,
                              config.harness_limit, config.harness_fewshot, config.harness_batch_size)
        writer.write_json("harness.json", harness)
        results["harness"] = summary(harness)
    results["model"] = f"{trained.stage}/{trained.fingerprint}"
    if "quantization" in meta:
        results["quantization"] = {k: v for k, v in meta["quantization"].items() if k != "layers"}
    writer.write_json("results.json", results)
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in results.items()}


STAGE = Stage("evaluate", EvaluateConfig, build_evaluate, code_version="3")  # 3: a chat model's sample ends at <|end|>
