"""Sampling with the KV cache: the prompt is encoded once, then each new token costs one step.

`generate_tokens` yields token ids as they are chosen, so callers can stream text; greedy
decoding (temperature 0) is deterministic and equals decoding without the cache.

Batched decoding (what `kiln serve-model` runs): `BatchDecoder` holds several sequences in one
KV cache, a row each, each at its own position (ragged: a per-row attention mask and per-row
rotary positions), and feeds one token to every row in a single forward; `Batch` drives it,
sequences joining and leaving between steps, each with its own sampling settings and seeded
generator (`Decoding`), so every sequence gets the tokens `generate_tokens` gives it alone
(`generate_batch`; tests/model/test_serve.py checks it, greedy and sampled).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Set
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F

from model.model import Block, KVCache, Transformer, apply_rope


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
                    stop_ids: Set[int] = frozenset(), cache: KVCache | None = None) -> Iterator[int]:
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


# ------------------------------------------------------------------ batched decoding


@dataclass
class Decoding:
    """One sequence's sampling state in a batch: its settings, its own seeded generator (made as
    `generate_tokens` makes it, so a seeded request samples the same tokens alone or batched),
    the ids that end it, and how many tokens it has chosen."""

    config: SamplingConfig
    stop_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    produced: int = 0

    @classmethod
    def start(cls, config: SamplingConfig, stop_ids=frozenset(), device="cpu") -> Decoding:
        generator = torch.Generator(device=device).manual_seed(config.seed) if config.seed is not None else None
        return cls(config, frozenset(stop_ids), generator)

    def choose(self, logits: torch.Tensor) -> int:
        """logits [vocab] of this sequence's last position -> the next id."""
        self.produced += 1
        return int(choose_next(logits[None], self.config, self.generator).item())


class BatchDecoder:
    """Sequences decoded together: one row each of a shared KV cache, each row at its own position.

    Rows are added (their prompt encoded alone, causally, into the row) and removed at any time,
    between steps; `step` feeds one token to every row at once, so N sequences cost one forward
    of N tokens instead of N forwards of one. Rows are kept dense, 0..rows-1: removing a row
    moves the last one into its place (the caller mirrors the move in its own list), so every
    step works on a prefix of the cache, views and no copies. Rows are ragged: each writes its
    new key and value at its own position and attends, through a mask, to its own filled
    positions only (their rotary angles are per-row positions too). With one row (or rows all of
    the same length) no mask is needed and none is passed, as in `generate_tokens`.

    This re-states the transformer's forward (model/model.py) with per-row positions, through
    the model's own modules, so a quantized model decodes batched the same way.
    """

    def __init__(self, model: Transformer, max_rows: int, max_len: int):
        model.eval()
        self.model, self.max_rows, self.max_len = model, max_rows, max_len
        param = next(model.parameters())
        self.device = param.device
        config = model.config
        shape = (max_rows, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=param.dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=self.device, dtype=param.dtype) for _ in range(config.n_layer)]
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=self.device)  # positions filled per row
        self.rows = 0
        # the rotary tables for every position a row can reach (the model extends its own past
        # the trained length when asked for more)
        self.cos, self.sin = model._rope(0, max_len, self.device)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, write, attend) -> torch.Tensor:
        """tokens and positions [B, T] -> logits [B, T, vocab]. `write(layer, k, v)` stores the new
        keys and values in the cache, `attend(layer, q)` is attention over the cache."""
        model = self.model
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]   # [B, 1, T, D]: every head
        B, T = tokens.shape
        x = model.embed(tokens)
        for layer, block in enumerate(cast("Iterable[Block]", model.blocks)):  # a ModuleList of Blocks
            attn = block.attn
            h = block.attn_norm(x)
            q = attn.q_proj(h).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            write(layer, k, v)
            out = attend(layer, q)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(B, T, -1))
            x = x + block.mlp(block.mlp_norm(x))
        return model.head(model.norm(x))

    def _sdpa(self, q, k, v, mask, causal: bool) -> torch.Tensor:
        attn = cast(Block, self.model.blocks[0]).attn
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=attn.n_kv_head != attn.n_head)

    @torch.no_grad()
    def add(self, prompt: list[int]) -> tuple[int, torch.Tensor]:
        """Encode `prompt` into a new row: (its index, the logits [len(prompt), vocab] of every
        prompt position; the last one's are the next token's)."""
        if self.rows >= self.max_rows:
            raise ValueError(f"the batch is full ({self.max_rows} rows)")
        if not 0 < len(prompt) <= self.max_len:
            raise ValueError(f"a prompt of {len(prompt)} tokens; rows hold 1 to {self.max_len}")
        row, T = self.rows, len(prompt)

        def write(layer, k, v):
            self.keys[layer][row, :, :T] = k[0]
            self.values[layer][row, :, :T] = v[0]

        def attend(layer, q):  # a fresh sequence: causal over its own positions, as the model does
            return self._sdpa(q, self.keys[layer][row:row + 1, :, :T], self.values[layer][row:row + 1, :, :T],
                              None, True)

        tokens = torch.tensor([prompt], device=self.device)
        logits = self._forward(tokens, torch.arange(T, device=self.device)[None], write, attend)
        self.lengths[row] = T
        self.rows += 1
        return row, logits[0]

    @torch.no_grad()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """One token for each row (rows 0..rows-1, in order) -> the next logits [rows, vocab]."""
        n = self.rows
        if len(tokens) != n:
            raise ValueError(f"{len(tokens)} tokens for {n} rows")
        positions = self.lengths[:n].clone()
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"a row is full: {self.max_len} positions")
        index = torch.arange(n, device=self.device)
        end = int(positions.max()) + 1
        # each row sees its own filled positions and the new one: nothing beyond its length
        ragged = bool((positions != positions[0]).any())
        mask = (torch.arange(end, device=self.device) <= positions[:, None])[:, None, None, :] if ragged else None

        def write(layer, k, v):  # each row's new key and value at that row's own position
            self.keys[layer][index, :, positions] = k[:, :, 0]
            self.values[layer][index, :, positions] = v[:, :, 0]

        def attend(layer, q):
            return self._sdpa(q, self.keys[layer][:n, :, :end], self.values[layer][:n, :, :end], mask, False)

        logits = self._forward(torch.tensor(tokens, device=self.device)[:, None], positions[:, None], write, attend)
        self.lengths[:n] += 1
        return logits[:, -1]

    def length(self, row: int) -> int:
        return int(self.lengths[row])

    def remove(self, row: int) -> int | None:
        """Free `row`: the last row moves into its place. Returns the index that moved (now `row`),
        or None when `row` was the last."""
        last = self.rows - 1
        if not 0 <= row <= last:
            raise IndexError(f"no row {row} of {self.rows}")
        self.rows = last
        if row == last:
            return None
        filled = int(self.lengths[last])
        for cache in (*self.keys, *self.values):
            cache[row, :, :filled] = cache[last, :, :filled]
        self.lengths[row] = self.lengths[last]
        return last


@dataclass(eq=False)
class Sequence:
    """A prompt to continue in a `Batch`, with the callbacks that receive what it makes.

    on_prompt(logits [len(prompt), vocab]) once the prompt is encoded (scoring a prompt);
    on_token(id, logits [vocab] it was chosen from) for each token: returning False ends the
    sequence there (a stop string seen); on_end(reason) last: "stop" (a stop id was chosen, not
    given to on_token), "length" (max_new_tokens, or the row is full) or "dropped" (on_token
    said no, or `cancelled` was set: a client gone)."""

    prompt: list[int]
    decoding: Decoding
    on_token: Callable[[int, torch.Tensor], bool] = lambda token, logits: True
    on_end: Callable[[str], None] = lambda reason: None
    on_prompt: Callable[[torch.Tensor], None] | None = None
    cancelled: bool = False   # set from any thread; the batch drops the row before its next step


class Batch:
    """Sequences that join, decode together and leave one by one: a BatchDecoder driven row by
    row. One thread owns it; `add` and `step` run the model."""

    def __init__(self, model: Transformer, max_rows: int, max_len: int):
        self.decoder = BatchDecoder(model, max_rows, max_len)
        self.active: list[Sequence] = []   # index = row in the decoder
        self.next_tokens: list[int] = []    # each row's chosen token, the next one fed

    def has_room(self) -> bool:
        return len(self.active) < self.decoder.max_rows

    def add(self, sequence: Sequence) -> None:
        """Encode the sequence's prompt and choose its first token (its row starts decoding at
        the next `step`). A sequence with max_new_tokens 0 ends here, after on_prompt."""
        if sequence.cancelled:
            sequence.on_end("dropped")
            return
        row, logits = self.decoder.add(sequence.prompt)
        if sequence.on_prompt is not None:
            sequence.on_prompt(logits)
        self.active.append(sequence)
        self.next_tokens.append(0)
        if sequence.decoding.config.max_new_tokens <= 0:
            self._end(row, "length")
            return
        self._settle(row, logits[-1])

    def step(self) -> None:
        """Drop cancelled rows, then one token for every row."""
        for row in reversed(range(len(self.active))):
            if self.active[row].cancelled:
                self._end(row, "dropped")
        if not self.active:
            return
        logits = self.decoder.step(self.next_tokens)
        # settle from the last row down: a row that ends takes the last row's place, one settled already
        for row in reversed(range(len(self.active))):
            self._settle(row, logits[row])

    def _settle(self, row: int, logits: torch.Tensor) -> None:
        """Choose the row's next token and hand it over, or end the row."""
        sequence = self.active[row]
        decoding = sequence.decoding
        token = decoding.choose(logits)
        if token in decoding.stop_ids:
            self._end(row, "stop")
        elif not sequence.on_token(token, logits):
            self._end(row, "dropped")
        elif decoding.produced >= decoding.config.max_new_tokens or self.decoder.length(row) >= self.decoder.max_len:
            self._end(row, "length")
        else:
            self.next_tokens[row] = token

    def _end(self, row: int, reason: str) -> None:
        sequence = self.active[row]
        moved = self.decoder.remove(row)
        if moved is not None:
            self.active[row], self.next_tokens[row] = self.active[moved], self.next_tokens[moved]
        self.active.pop()
        self.next_tokens.pop()
        sequence.on_end(reason)

    def end_all(self, reason: str) -> None:
        for row in reversed(range(len(self.active))):
            self._end(row, reason)


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], configs: list[SamplingConfig],
                   stop_ids: Set[int] = frozenset(), max_rows: int | None = None) -> list[list[int]]:
    """What `generate_tokens` yields for each prompt, decoded together in one Batch; with
    `max_rows` below the number of prompts, prompts wait and join as rows finish (as requests
    join the server's batch)."""
    max_len = max(len(p) + c.max_new_tokens for p, c in zip(prompts, configs))
    batch = Batch(model, max_rows or len(prompts), max_len)
    device = batch.decoder.device
    results: list[list[int]] = [[] for _ in prompts]

    def collect(out: list[int]) -> Callable[[int, torch.Tensor], bool]:
        def on_token(token: int, _logits: torch.Tensor) -> bool:
            out.append(token)
            return True
        return on_token

    waiting = [Sequence(prompt, Decoding.start(config, stop_ids, device), on_token=collect(out))
               for prompt, config, out in zip(prompts, configs, results)]
    while waiting or batch.active:
        while waiting and batch.has_room():
            batch.add(waiting.pop(0))
        batch.step()
    return results
