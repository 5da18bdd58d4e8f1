"""`kiln serve-model`: a trained (or quantized) model behind an OpenAI-compatible HTTP API.

    GET  /v1/models
    POST /v1/chat/completions   messages -> the chat template -> a reply, ending at <|end|>
    POST /v1/completions        a prompt (a string, strings, token ids), continued as a document

Request fields, by OpenAI's names and meanings: temperature, top_p, max_tokens (and
max_completion_tokens), stop (a string or a list), seed, stream and stream_options.include_usage
(a last chunk with the usage); chat messages whose content is a string or a list of text parts;
chat logprobs/top_logprobs (choices[].logprobs.content[]); on /v1/completions, a list of prompts
(one choice each, index i), logprobs N (the legacy shape: tokens, token_logprobs, top_logprobs,
text_offset), echo (the prompt's own tokens and their logprobs; the first has none) and
max_tokens 0 (score a prompt, generate nothing), which is how lm-evaluation-harness's
`local-completions` backend asks for log-likelihoods. Log-probabilities are the model's own
(log-softmax of its logits), whatever the temperature.

Prompts and BOS: every training document starts with `<|bos|>`, so a string prompt to
/v1/completions is encoded as the start of a document (`Loaded.encode_document_start`: BOS,
then the text), as is a chat. A prompt of token ids is used exactly as given: a client that
tokenizes for itself (lm-eval does, with the exported Hugging Face tokenizer, whose default
call adds BOS: `add_bos_token=True` in lm-eval's model_args) decides, and the ids it scores are
the ids it sent.

What OpenAI defines but this server does not do (n > 1, best_of, tools and functions,
response_format other than text, logit_bias, frequency or presence penalties, suffix, audio
...) gets a 400 that names the field, unless it is set to its neutral value (n: 1, penalties
0, ...); `user`, `store`, `metadata` and `service_tier` change nothing about the output and are
accepted. Fields OpenAI does not define are ignored (and logged), as vLLM and most servers do,
because clients send their own extensions. Every client error is a 4xx in OpenAI's error
shape ({"error": {"message", "type", "param", "code"}}); a 500 would be a bug in this server.
With an API key (`--api-key`, or `KILN_API_KEY`) every /v1 route wants
`Authorization: Bearer KEY` and answers 401 without it.

Batching: one scheduler owns the model and decodes every request in flight together, each in
its own row of a shared KV cache at its own position (model/generate.py's `Batch`); new
requests join between steps (at most --max-batch rows; more wait their turn), finished ones
leave, so N requests at once cost about one request's steps instead of N. Each request has its
own seeded torch.Generator, so what it gets does not depend on what else is in the batch. The
scheduler runs on the main thread (torch's CPU kernels are ~3x slower on another) and
uvicorn's event loop on a second one; the scheduler hands each step's tokens to an asyncio
queue per prompt, and the responses are asynchronous: a client that goes away (a dropped
stream, a closed socket) cancels its generation, whose row leaves the batch at the next step.
Nothing waits on a gone client, and SIGTERM stops the server within a few seconds even with
requests in flight (uvicorn's graceful shutdown, bounded to 3 s). FastAPI and uvicorn serve
it, on 127.0.0.1 by default.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Set
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, cast

import torch

# at module level: FastAPI resolves the endpoints' annotations (Request) from this module's names
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from model.chat import STOP_TOKENS, Loaded
from model.chat_format import BOS, ChatFormat
from model.generate import Batch, Decoding, SamplingConfig, Sequence

log = logging.getLogger("kiln")

MAX_BODY_BYTES = 16 << 20
MAX_PROMPTS = 256          # prompts in one /v1/completions request
MAX_TOP_LOGPROBS = 20      # OpenAI's limit for chat; the legacy endpoint's is 5, we allow 20 on both
INT64 = (-(2 ** 63), 2 ** 63 - 1)


class RequestError(Exception):
    """A client error: status, message, the field it is about, OpenAI's error type and code."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------ the request schema


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    # "developer" is OpenAI's newer name for the system role
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        # text parts are joined by newlines, as vLLM and OpenAI's own templates do
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class Sampling(BaseModel):
    """The request fields both endpoints take (OpenAI's names, defaults and ranges)."""

    model_config = ConfigDict(extra="allow")   # unknown fields: ignored (and logged), see the docstring

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | Annotated[list[str], Field(max_length=32)] | None = None
    seed: int | None = Field(None, ge=INT64[0], le=INT64[1])
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # accepted, no effect on what the model says
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_new_tokens: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=max_new_tokens, temperature=1.0 if self.temperature is None
                              else self.temperature, top_k=None, top_p=self.top_p, seed=self.seed)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: int | None = Field(16, ge=0)   # OpenAI's default for completions; 0 scores the prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool | None = False


def _neutral(*values: Any):
    return lambda value: value in values


# OpenAI request fields this server does not implement: a 400 naming the field unless its value
# is one that asks for nothing (null, or the value that means "off").
UNSUPPORTED: dict[str, dict[str, Any]] = {
    "common": {
        "n": _neutral(None, 1),
        "logit_bias": lambda v: v is None or v == {},
        "frequency_penalty": _neutral(None, 0),
        "presence_penalty": _neutral(None, 0),
    },
    "chat": {
        "tools": lambda v: v is None or v == [],
        "tool_choice": _neutral(None, "none"),
        "parallel_tool_calls": lambda v: True,   # meaningless without tools, which are refused
        "functions": lambda v: v is None or v == [],
        "function_call": _neutral(None, "none"),
        "response_format": lambda v: v is None or v == {"type": "text"},
        "modalities": lambda v: v is None or v == ["text"],
        "audio": _neutral(None),
        "prediction": _neutral(None),
        "reasoning_effort": _neutral(None),
        "web_search_options": _neutral(None),
        "verbosity": _neutral(None),
    },
    "text": {
        "best_of": _neutral(None, 1),
        "suffix": _neutral(None, ""),
    },
}
# in a message: tool calls and results, audio, and `name` (the template has no place for a name)
MESSAGE_UNSUPPORTED = ("name", "tool_calls", "tool_call_id", "function_call", "audio", "refusal")


def _surrogate_at(data: Any) -> str | None:
    """The path of the first string (or key) holding a lone surrogate ('\\udcff' is valid JSON,
    not valid Unicode, and neither the tokenizer nor a UTF-8 response can carry it)."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # iterative: a deeply nested body must not exhaust the stack
        path, value = stack.pop()
        if isinstance(value, str):
            if any("\ud800" <= c <= "\udfff" for c in value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if any("\ud800" <= c <= "\udfff" for c in key):
                    return path or "body"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _shown(value: Any) -> str:
    """A value as the error message shows it: JSON, cut short (a deeply nested one by its type)."""
    try:
        return json.dumps(value)[:100]
    except (ValueError, RecursionError):
        return type(value).__name__


def _param(loc: tuple) -> str:
    """A pydantic error location as OpenAI names parameters: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "bool", "TextPart") or "[" in str(part):
            continue  # the union member pydantic tried (str, list[str], ...): not a parameter
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def parse_request(raw: bytes, kind: Literal["chat", "text"]) -> ChatRequest | CompletionRequest:
    """The request body as a validated request, or a RequestError saying what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(f"the body is {len(raw)} bytes; at most {MAX_BODY_BYTES}", status=413)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"the body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise RequestError(f"the body must be a JSON object, not {type(data).__name__}")
    where = _surrogate_at(data)
    if where:
        raise RequestError("a string holds a lone surrogate (not valid Unicode)", param=where)
    for name, neutral in {**UNSUPPORTED["common"], **UNSUPPORTED[kind]}.items():
        if name in data and not neutral(data[name]):
            raise RequestError(f"{name}={_shown(data[name])} is not supported by this server", param=name)
    if kind == "chat" and isinstance(data.get("messages"), list):
        for i, message in enumerate(data["messages"]):
            for name in MESSAGE_UNSUPPORTED if isinstance(message, dict) else ():
                if message.get(name) not in (None, []):
                    raise RequestError(f"messages[{i}].{name} is not supported by this server",
                                       param=f"messages[{i}].{name}")
    schema = ChatRequest if kind == "chat" else CompletionRequest
    try:
        request = schema.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False, include_input=False)
        problems = "; ".join(f"{_param(e['loc'])}: {e['msg']}" for e in errors[:5])
        raise RequestError(problems, param=_param(errors[0]["loc"])) from None
    except RecursionError:
        raise RequestError("the body is nested too deeply") from None
    if request.model_extra:
        log.info("serve-model: ignoring fields this server does not know: %s", ", ".join(sorted(request.model_extra)))
    if request.stream_options is not None and not request.stream:
        raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
    if isinstance(request, ChatRequest) and request.top_logprobs is not None and not request.logprobs:
        raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
    return request


# ------------------------------------------------------------------ tokens as the API shows them


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet: the printable character that stands for each byte (GPT-2's
    bytes_to_unicode), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class TokenTable:
    """Each token's bytes, and its name in responses: the text when the bytes are UTF-8, else
    OpenAI's `bytes:\\xe2\\x80` form (so that two partial characters never share a name)."""

    def __init__(self, tokenizer):
        decoder = _byte_decoder()
        special = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self.bytes: list[bytes] = [b""] * tokenizer.get_vocab_size()
        for token, index in tokenizer.get_vocab().items():
            if token in special or any(c not in decoder for c in token):
                self.bytes[index] = tokenizer.decode([index], skip_special_tokens=False).encode()
            else:
                self.bytes[index] = bytes(decoder[c] for c in token)
        self.names = [self._name(b) for b in self.bytes]

    @staticmethod
    def _name(raw: bytes) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)

    def offsets(self, ids: list[int], start: int = 0, zero_width: Set[int] = frozenset()) -> list[int]:
        """The character offset where each token starts, from `start`: the characters before it
        are the UTF-8 lead bytes before it (a token that ends mid-character counts it)."""
        out, at = [], start
        for i, token in enumerate(ids):
            out.append(at)
            if i not in zero_width:
                at += sum(1 for b in self.bytes[token] if b & 0xC0 != 0x80)
        return out


@dataclass
class Scored:
    """One token with its logprob (None: the first token of a prompt, nothing before it) and the
    top alternatives [(id, logprob)], best first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]] | None


def score_positions(logits: torch.Tensor, tokens: list[int], top_n: int) -> list[tuple[float, list]]:
    """logits [T, vocab] and the T tokens chosen after them -> (each token's logprob, top_n)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    if top_n:
        values, ids = logprobs.topk(top_n, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in tokens]
    return list(zip(chosen, tops))


# ------------------------------------------------------------------ text: stop strings, pieces


class StopCut:
    """Text pieces cut at the first stop string. Text that may be the start of a stop string is
    held back until the next piece settles it."""

    def __init__(self, stops: list[str]):
        self.stops, self.held, self.stopped = stops, "", False

    def feed(self, piece: str) -> str:
        """What can be shown of the text so far, given `piece`; sets `stopped` at a stop string."""
        if not self.stops:
            return piece
        self.held += piece
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[:min(found)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.held.endswith(s[:k])), default=0)
        out = self.held[:len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def until_stop(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """The text of `pieces` up to (not including) the first stop string."""
    cut = StopCut(stops)
    for piece in pieces:
        shown = cut.feed(piece)
        if shown:
            yield shown
        if cut.stopped:
            return
    rest = cut.flush()
    if rest:
        yield rest


# ------------------------------------------------------------------ the engine


class PromptTooLong(ValueError):
    pass


@dataclass
class Prompt:
    ids: list[int]
    text: str                 # the prompt as an echo shows it
    added_bos: bool = False   # the server put BOS in front (a string prompt): no characters in `text`


@dataclass
class Piece:
    """What one prompt's generation adds: text, the scored tokens behind it, and at the end
    the finish reason."""

    text: str = ""
    scored: list[Scored] = field(default_factory=list)
    finish: str | None = None


class Generation:
    """One prompt in the batch, seen from the event loop: the scheduler thread calls its
    callbacks, which hand events to an asyncio queue; `pieces()` turns them into text."""

    def __init__(self, engine: Engine, prompt: Prompt, sampling: SamplingConfig, stop_ids: frozenset[int],
                 stops: list[str], logprobs: int | None, echo: bool):
        self.engine, self.prompt, self.stops, self.logprobs, self.echo = engine, prompt, stops, logprobs, echo
        self.queue: asyncio.Queue = asyncio.Queue()
        self.generated: list[int] = []
        self.finished = False   # ended by the model, its limit or a stop string (not by a client gone)
        self.sequence = Sequence(prompt.ids, Decoding.start(sampling, stop_ids, engine.device),
                                 on_token=self._on_token, on_end=self._on_end,
                                 on_prompt=self._on_prompt if echo and logprobs is not None else None)

    # --- in the scheduler thread

    def _put(self, event: tuple) -> None:
        self.engine.post(self.queue, event)

    def _on_prompt(self, logits: torch.Tensor) -> None:
        assert self.logprobs is not None, "on_prompt is set only when logprobs are asked for"
        ids = self.prompt.ids
        scored = score_positions(logits[:-1], ids[1:], self.logprobs) if len(ids) > 1 else []
        self._put(("prompt", [Scored(ids[0], None, None), *(Scored(t, lp, top) for t, (lp, top)
                                                             in zip(ids[1:], scored))]))

    def _on_token(self, token: int, logits: torch.Tensor) -> bool:
        scored = None
        if self.logprobs is not None:
            [(lp, top)] = score_positions(logits[None], [token], self.logprobs)
            scored = Scored(token, lp, top)
        self._put(("token", token, scored))
        return not self.sequence.cancelled

    def _on_end(self, reason: str) -> None:
        self._put(("end", reason))

    # --- on the event loop

    async def pieces(self) -> AsyncIterator[Piece]:
        """The generation's text as it settles. With echo the first piece is the prompt (its
        scored tokens with logprobs); the last piece has the finish reason. Leaving early (a
        stop string, a client gone, a cancelled task) takes the sequence out of the batch."""
        tokenizer = self.engine.loaded.tokenizer
        cut = StopCut(self.stops)
        shown = emitted = 0          # characters decoded and settled; characters given out
        offset = 0                   # characters of the generated tokens so far
        pending: list[tuple[int, Scored]] = []   # scored tokens not given out yet, with their offsets

        def settled() -> list[Scored]:
            """The scored tokens whose text has been given out (a token held back with the start
            of a possible stop string waits; one after a stop string never goes)."""
            nonlocal pending
            given = [s for at, s in pending if at < emitted]
            pending = pending[len(given):]
            return given

        self.engine.submit(self.sequence)
        try:
            if self.echo:
                scored = []
                if self.logprobs is not None:
                    event = await self.queue.get()
                    if event[0] != "prompt":
                        raise RuntimeError("generation failed (see the server log)")
                    scored = event[1]
                yield Piece(self.prompt.text, scored)
            while True:
                event = await self.queue.get()
                if event[0] == "token":
                    _, token, scored = event
                    self.generated.append(token)
                    if scored is not None:
                        pending.append((offset, scored))
                    offset += sum(1 for b in self.engine.tokens.bytes[token] if b & 0xC0 != 0x80)
                    text = tokenizer.decode(self.generated, skip_special_tokens=False)
                    if text.endswith("\ufffd"):
                        continue  # half a character so far
                    out = cut.feed(text[shown:])
                    shown = len(text)
                    emitted += len(out)
                    if cut.stopped:
                        self.finished = True
                        yield Piece(out, settled(), "stop")
                        return
                    given = settled()
                    if out or given:
                        yield Piece(out, given)
                    continue
                reason = event[1]   # "end"
                if reason == "error":
                    raise RuntimeError("generation failed (see the server log)")
                text = tokenizer.decode(self.generated, skip_special_tokens=False)
                out = cut.feed(text[shown:])
                if not cut.stopped:
                    out += cut.flush()
                emitted += len(out)
                given = settled() if cut.stopped else [s for _, s in pending]
                self.finished = True
                yield Piece(out, given, "stop" if cut.stopped or reason == "stop" else "length")
                return
        finally:
            # a stop string, a client gone, the server stopping: the row leaves at the next step
            self.sequence.cancelled = True
            if not self.finished:
                log.info("serve-model: a client gone (or the server stopping): generation cancelled after %d of "
                         "at most %d tokens", len(self.generated), self.sequence.decoding.config.max_new_tokens)


class Engine:
    """The model, its chat format and tokens, and the scheduler that decodes every request in
    flight as one batch (`run`: on the main thread under `serve`, else on a thread of its own)."""

    def __init__(self, loaded: Loaded, name: str, max_batch: int = 16):
        self.loaded, self.name = loaded, name
        self.format = ChatFormat.from_dir(loaded.directory)
        self.context = loaded.model.config.seq_len
        self.vocab = loaded.model.config.vocab_size
        self.device = next(loaded.model.parameters()).device
        self.bos = loaded.token_id(BOS)
        self.tokens = TokenTable(loaded.tokenizer)
        self.chat_stops = frozenset(loaded.token_id(t) for t in STOP_TOKENS)
        self.text_stops = frozenset({self.bos})
        self.created = int(time.time())
        self.max_batch = max_batch
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_main_thread = False   # set by `serve`, which runs the scheduler there
        self._outbox: list[tuple[asyncio.Queue, tuple]] = []   # events of this step, for the event loop

    # --- prompts

    def chat_prompt(self, request: ChatRequest) -> Prompt:
        try:
            ids = self.format.encode([m.as_dict() for m in request.messages], add_generation_prompt=True).ids
        except ValueError as err:  # the template refuses the conversation (e.g. its order of roles)
            raise RequestError(f"messages: {err}", param="messages") from None
        return Prompt(ids, "", True)

    def completion_prompts(self, request: CompletionRequest) -> list[Prompt]:
        prompt = request.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        elif prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for item in cast("list[str | list[int]]", prompt):  # a list of prompts now
            if isinstance(item, str):
                out.append(Prompt(self.loaded.encode_document_start(item), item, True))
                continue
            bad = next((t for t in item if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise RequestError(f"token id {bad} is not in this model's vocabulary (0 to {self.vocab - 1})",
                                   param="prompt")
            out.append(Prompt(list(item), self.loaded.tokenizer.decode(item, skip_special_tokens=False)))
        return out

    def room(self, prompt: Prompt, limit: int | None, param: str) -> int:
        """How many tokens to generate after the prompt: the request's limit, at most what fits."""
        free = self.context - len(prompt.ids)
        if free < 0 or (free == 0 and limit != 0):
            raise RequestError(f"the prompt is {len(prompt.ids)} tokens; this model's context is {self.context}"
                               + ("" if free < 0 else ", with no room for a reply"), param=param)
        return free if limit is None else min(limit, free)

    # --- the scheduler

    def attach(self) -> None:
        """Called on the event loop that serves the requests, when it starts: the scheduler's
        events go to it. Unless `serve` runs the scheduler on the main thread, it gets a thread."""
        self._loop = asyncio.get_running_loop()
        if self._thread is None and not self.on_main_thread:
            self._thread = threading.Thread(target=self.run, name="kiln-decode", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """End the scheduler (what is in flight ends as dropped)."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def post(self, queue: asyncio.Queue, event: tuple) -> None:
        """In the scheduler thread: an event for a generation's queue, delivered after the step."""
        self._outbox.append((queue, event))

    def _flush(self) -> None:
        # one wake-up of the event loop per step, not one per token: each costs a syscall and a
        # turn of the loop, which at small models is as much as the step itself
        if not self._outbox:
            return
        events, self._outbox = self._outbox, []
        assert self._loop is not None, "attach() records it before any request makes an event"
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is stopping
            self._loop.call_soon_threadsafe(_deliver, events)

    def submit(self, sequence: Sequence) -> None:
        with self._wake:
            self._waiting.append(sequence)
            self._wake.notify()

    def run(self) -> None:
        """The scheduler, until `close`: admit waiting sequences while rows are free, one step
        for all, again."""
        batch = Batch(self.loaded.model, self.max_batch, self.context)
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not batch.active:
                    self._wake.wait()
                if self._closing:
                    break
                joining: list[Sequence] = []
                while self._waiting and len(batch.active) + len(joining) < self.max_batch:
                    joining.append(self._waiting.popleft())
            try:
                for sequence in joining:
                    batch.add(sequence)
                    self._flush()
                batch.step()
            except Exception:  # noqa: BLE001 - a bug must not stop the server: those in flight fail
                log.exception("serve-model: decoding failed")
                for sequence in joining:
                    if sequence not in batch.active:
                        sequence.on_end("error")
                batch.end_all("error")
                batch = Batch(self.loaded.model, self.max_batch, self.context)
            self._flush()
        batch.end_all("dropped")
        with self._wake:
            while self._waiting:
                self._waiting.popleft().on_end("dropped")
        self._flush()


def _deliver(events: list[tuple[asyncio.Queue, tuple]]) -> None:
    for queue, event in events:
        queue.put_nowait(event)


# ------------------------------------------------------------------ the HTTP API


def create_app(engine: Engine, api_key: str | None = None):
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        engine.attach()
        try:
            yield
        finally:
            engine.close()

    app = FastAPI(title="Kiln model server", version="1", lifespan=lifespan)

    def error(err: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), err.status, headers=headers)

    @app.exception_handler(RequestError)
    async def request_error(_request, exc: RequestError) -> JSONResponse:
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error(RequestError(str(exc.detail), status=exc.status_code, kind=kind))

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{_param(e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        return error(RequestError(problems))

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise RequestError("a valid API key is needed: Authorization: Bearer KEY", status=401,
                               code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": engine.created,
                                            "owned_by": "kiln"}]}

    async def read(request: Request, kind: Literal["chat", "text"]):
        parsed = parse_request(await request.body(), kind)
        if parsed.model not in (None, engine.name):
            raise RequestError(f"no model {parsed.model!r}; this server has {engine.name!r}", param="model",
                               status=404, kind="not_found_error", code="model_not_found")
        return parsed

    def generations(parsed: ChatRequest | CompletionRequest, prompts: list[Prompt]) -> list[Generation]:
        """One generation per prompt (none starts before all are known to be valid)."""
        if isinstance(parsed, ChatRequest):
            logprobs = (parsed.top_logprobs or 0) if parsed.logprobs else None
            stop_ids, echo, param = engine.chat_stops, False, "messages"
        else:
            logprobs, stop_ids, echo, param = parsed.logprobs, engine.text_stops, bool(parsed.echo), "prompt"
        return [Generation(engine, prompt, parsed.sampling(engine.room(prompt, parsed.limit(), param)), stop_ids,
                           parsed.stops(), logprobs, echo) for prompt in prompts]

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        parsed = await read(request, "chat")
        return await respond(request, parsed, generations(parsed, [engine.chat_prompt(parsed)]), "chat")

    @v1.post("/completions")
    async def completions(request: Request):
        parsed = await read(request, "text")
        return await respond(request, parsed, generations(parsed, engine.completion_prompts(parsed)), "text")

    app.include_router(v1)

    # --- responses

    def chat_logprobs(scored: list[Scored]) -> dict:
        def entry(token: int, logprob: float | None) -> dict:
            return {"token": engine.tokens.names[token], "logprob": logprob,
                    "bytes": list(engine.tokens.bytes[token])}

        return {"content": [{**entry(s.token, s.logprob), "top_logprobs": [entry(t, lp) for t, lp in s.top or []]}
                            for s in scored], "refusal": None}

    def text_logprobs(scored: list[Scored], offsets: list[int]) -> dict:
        def tops(s: Scored) -> dict | None:
            if s.top is None:
                return None
            out: dict[str, float | None] = {engine.tokens.names[t]: lp for t, lp in s.top}
            out.setdefault(engine.tokens.names[s.token], s.logprob)  # the chosen one always shows
            return out

        return {"tokens": [engine.tokens.names[s.token] for s in scored],
                "token_logprobs": [s.logprob for s in scored], "top_logprobs": [tops(s) for s in scored],
                "text_offset": offsets}

    class Choice:
        """One choice's text, its scored tokens and their offsets, built piece by piece."""

        def __init__(self, generation: Generation):
            self.generation, self.text = generation, ""
            self.scored: list[Scored] = []
            self.offsets: list[int] = []
            self.finish: str | None = None
            self.echoed = not generation.echo
            # text_offset of generated tokens runs on from the end of the prompt, as OpenAI's does
            self.at = len(generation.prompt.text)

        def add(self, piece: Piece) -> list[int]:
            """Take a piece; returns the text offsets of its scored tokens."""
            ids = [s.token for s in piece.scored]
            if not self.echoed:   # the echoed prompt: offsets from 0, BOS the server added has no characters
                self.echoed = True
                offsets = engine.tokens.offsets(ids, 0, {0} if self.generation.prompt.added_bos else set())
            else:
                offsets = engine.tokens.offsets([*ids, 0], self.at)
                self.at = offsets.pop()
            self.text += piece.text
            self.scored += piece.scored
            self.offsets += offsets
            self.finish = piece.finish or self.finish
            return offsets

    def usage(gens: list[Generation]) -> dict:
        prompt_tokens = sum(len(g.prompt.ids) for g in gens)
        completion = sum(len(g.generated) for g in gens)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    async def until_disconnected(request: Request) -> None:
        # the body has been read: the next message uvicorn gives is the client going away
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def respond(request: Request, parsed, gens: list[Generation], kind: str):
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": ident, "created": int(time.time()), "model": engine.name}
        wants_logprobs = gens[0].logprobs is not None
        choices = [Choice(g) for g in gens]

        async def collect(choice: Choice) -> None:
            async for piece in choice.generation.pieces():
                choice.add(piece)

        if not parsed.stream:
            work = asyncio.ensure_future(asyncio.gather(*(collect(c) for c in choices)))
            gone = asyncio.ensure_future(until_disconnected(request))
            try:
                racing: set[asyncio.Future[Any]] = {work, gone}
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not work.done():   # the client left (or the server is stopping): stop generating
                    work.cancel()
            if not work.done() or work.cancelled():
                return Response(status_code=499)  # nobody reads it
            work.result()
            if kind == "chat":
                out = [{"index": 0, "message": {"role": "assistant", "content": c.text, "refusal": None},
                        "logprobs": chat_logprobs(c.scored) if wants_logprobs else None,
                        "finish_reason": c.finish} for c in choices]
            else:
                out = [{"index": i, "text": c.text, "finish_reason": c.finish,
                        "logprobs": text_logprobs(c.scored, c.offsets) if wants_logprobs else None}
                       for i, c in enumerate(choices)]
            return {**base, "object": "chat.completion" if kind == "chat" else "text_completion",
                    "choices": out, "usage": usage(gens)}

        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        with_usage = parsed.include_usage()

        def event(choice_list: list[dict], **extra) -> str:
            body = {**base, "object": obj, "choices": choice_list, **extra}
            if with_usage and "usage" not in extra:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            merged: asyncio.Queue = asyncio.Queue()

            async def feed(i: int, choice: Choice) -> None:
                try:
                    async for piece in choice.generation.pieces():
                        merged.put_nowait((i, piece, choice.add(piece)))
                    merged.put_nowait((i, None, None))
                except Exception as err:  # noqa: BLE001 - told to the client, below
                    merged.put_nowait((i, err, None))

            tasks = [asyncio.ensure_future(feed(i, c)) for i, c in enumerate(choices)]
            try:
                if kind == "chat":
                    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])
                running = len(tasks)
                while running:
                    i, piece, offsets = await merged.get()
                    if piece is None:
                        running -= 1
                        continue
                    if isinstance(piece, Exception):
                        error = {"message": str(piece), "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        return
                    if kind == "chat":
                        delta = {"content": piece.text} if piece.text or not piece.finish else {}
                        yield event([{"index": i, "delta": delta, "finish_reason": piece.finish,
                                      "logprobs": chat_logprobs(piece.scored) if wants_logprobs else None}])
                    else:
                        yield event([{"index": i, "text": piece.text, "finish_reason": piece.finish,
                                      "logprobs": text_logprobs(piece.scored, offsets) if wants_logprobs else None}])
                if with_usage:
                    yield event([], usage=usage(gens))
                yield "data: [DONE]\n\n"
            finally:  # also when the client is gone: every generation of this request stops
                for task in tasks:
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int):
    """The listening socket, bound here so that a port in use or a bad address is a KilnError
    (one line from the CLI), not a uvicorn traceback."""
    import socket

    from storage import KilnError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it every response waits ~40 ms on Nagle and the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise KilnError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def serve(engine: Engine, sock, api_key: str | None = None, graceful_s: int = 3) -> None:
    """Serve on a bound socket until SIGTERM or Ctrl-C; requests still in flight then get
    `graceful_s` seconds before they are cut.

    The model runs on the main thread and uvicorn's event loop on another: torch's CPU kernels
    run about 3x slower on a thread other than the one that set up its thread pool (measured:
    the same batched decoding, 0.3 s on the main thread, 0.9 s on a second one). Signals reach
    the main thread only, so the handlers here tell uvicorn to stop (a second Ctrl-C: at once);
    when it has, its lifespan's end closes the scheduler and `run` returns."""
    import signal

    import uvicorn

    config = uvicorn.Config(create_app(engine, api_key), log_level="info", timeout_graceful_shutdown=graceful_s)
    server = uvicorn.Server(config)
    engine.on_main_thread = True

    def serve_http() -> None:
        try:
            server.run(sockets=[sock])
        finally:
            engine.close()  # also when uvicorn failed to start

    def stop(signum, _frame) -> None:
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    http = threading.Thread(target=serve_http, name="kiln-http", daemon=True)
    http.start()
    try:
        engine.run()
    finally:
        http.join(graceful_s + 5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
