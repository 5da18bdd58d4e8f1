"""Sampling with the KV cache: the prompt is encoded once, then each new token costs one step.

`generate_tokens` yields token ids as they are chosen, so callers can stream text; greedy
decoding (temperature 0) is deterministic and equals decoding without the cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from model.model import KVCache, Transformer


@dataclass
class SamplingConfig:
    max_new_tokens: int = 200
    temperature: float = 0.8      # 0 = greedy
    top_k: int | None = 50
    top_p: float | None = 0.95
    seed: int | None = None


def choose_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, vocab] of the last position -> next token ids [B, 1]."""
    if config.temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.size(-1):
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= config.top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


@torch.no_grad()
def generate_tokens(model: Transformer, prompt: list[int], config: SamplingConfig,
                    stop_ids: set[int] = frozenset(), cache: KVCache | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens ids after `prompt`, stopping at any id in stop_ids (not yielded).

    With a `cache` that already holds a prefix of the prompt (a chat's earlier turns), only the
    new part of the prompt is encoded.
    """
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
    if cache is None:
        cache = model.new_cache(1, len(prompt) + config.max_new_tokens)
    fresh = prompt[cache.length:]
    if not fresh:  # the whole prompt is cached: re-feed the last token to get its logits
        cache.crop(len(prompt) - 1)
        fresh = prompt[-1:]
    logits, _ = model(torch.tensor([fresh], device=device), cache=cache)
    for _ in range(config.max_new_tokens):
        token = choose_next(logits[:, -1, :], config, generator)
        token_id = int(token.item())
        if token_id in stop_ids:
            return
        yield token_id
        if cache.length >= cache.max_len:
            return
        logits, _ = model(token, cache=cache)


@torch.no_grad()
def greedy_without_cache(model: Transformer, prompt: list[int], max_new_tokens: int) -> list[int]:
    """The reference the cache is checked against: re-run the whole sequence for every token."""
    model.eval()
    device = next(model.parameters()).device
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        logits, _ = model(torch.tensor([tokens], device=device))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]
