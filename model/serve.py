"""`kiln serve-model`: a trained (or quantized) model behind an OpenAI-compatible HTTP API.

    GET  /v1/models
    POST /v1/chat/completions   messages -> the chat template -> a reply, ending at <|end|>
    POST /v1/completions        a prompt, continued as the start of a document

Both POSTs take temperature, top_p, max_tokens, stop (a string or a list), seed and stream;
streamed responses are server-sent events (`data: {chunk}` ... `data: [DONE]`), as OpenAI's
clients expect. Generation uses the KV cache, one per request; requests are served one at a
time in arrival order (a lock held for the whole generation), so none is interleaved with
another and the CPU is not split between them. FastAPI and uvicorn serve it, on 127.0.0.1 by
default.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, Field

from model.chat import STOP_TOKENS, Loaded, stream_text
from model.chat_format import ChatFormat
from model.generate import SamplingConfig


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class Sampling(BaseModel):
    """The request fields both endpoints take (OpenAI's names and defaults)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1, description="One choice per request.")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else [s for s in (self.stop or []) if s]


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Sampling):
    prompt: str
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class PromptTooLong(ValueError):
    pass


def until_stop(pieces: Iterator[str], stops: list[str]) -> Iterator[str]:
    """The text of `pieces` up to (not including) the first stop string. Text that may be the
    start of a stop string is held back until the next piece settles it."""
    if not stops:
        yield from pieces
        return
    held = ""
    for piece in pieces:
        held += piece
        found = [i for i in (held.find(s) for s in stops) if i >= 0]
        if found:
            if min(found):
                yield held[:min(found)]
            return
        keep = max((k for s in stops for k in range(1, len(s)) if held.endswith(s[:k])), default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held:
        yield held


class Generator:
    """The model, its chat format, and the lock that queues requests."""

    def __init__(self, loaded: Loaded, name: str):
        self.loaded, self.name = loaded, name
        self.format = ChatFormat.from_dir(loaded.directory)
        self.context = loaded.model.config.seq_len
        self.lock = threading.Lock()
        self.created = int(time.time())

    def prompt_ids(self, request: ChatRequest | CompletionRequest) -> list[int]:
        if isinstance(request, ChatRequest):
            messages = [m.model_dump() for m in request.messages]
            ids = self.format.encode(messages, add_generation_prompt=True).ids
        else:
            ids = self.loaded.encode_document_start(request.prompt)
        if len(ids) >= self.context:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens; this model's context is {self.context}")
        return ids

    def run(self, request: ChatRequest | CompletionRequest, ids: list[int], usage: dict) -> Iterator[str]:
        """Text pieces of one generation, under the lock; `usage` and `finish` filled at the end."""
        room = self.context - len(ids)
        sampling = SamplingConfig(max_new_tokens=min(request.max_tokens or room, room),
                                  temperature=request.temperature, top_k=None, top_p=request.top_p,
                                  seed=request.seed)
        stop_tokens = STOP_TOKENS if isinstance(request, ChatRequest) else ("<|bos|>",)
        generated: list[int] = []
        with self.lock:
            yield from until_stop(stream_text(self.loaded, ids, sampling, stop_tokens, generated=generated),
                                  request.stops())
        stopped = len(generated) < sampling.max_new_tokens or any(s in self.loaded.tokenizer.decode(
            generated, skip_special_tokens=False) for s in request.stops())
        usage.update(prompt_tokens=len(ids), completion_tokens=len(generated),
                     total_tokens=len(ids) + len(generated), finish_reason="stop" if stopped else "length")


def create_app(generator: Generator):
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="Kiln model server", version="1")

    # errors in OpenAI's shape, {"error": {"message", "type", ...}}, which its clients read
    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}}, status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error(422, problems, "invalid_request_error")

    def start(request):
        if request.model not in (None, generator.name):
            raise HTTPException(404, f"no model {request.model!r}; this server has {generator.name!r}")
        try:
            return generator.prompt_ids(request)
        except PromptTooLong as err:
            raise HTTPException(400, str(err)) from None

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": generator.name, "object": "model", "created": generator.created,
                                            "owned_by": "kiln"}]}

    def respond(request, kind: str):
        ids = start(request)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        base = {"id": ident, "created": int(time.time()), "model": generator.name}
        usage: dict = {}
        if not request.stream:
            text = "".join(generator.run(request, ids, usage))
            finish = usage.pop("finish_reason")
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                      if kind == "chat" else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
            return {**base, "object": "chat.completion" if kind == "chat" else "text_completion",
                    "choices": [choice], "usage": usage}

        def events() -> Iterator[str]:
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

            def chunk(content: str | None, finish: str | None, first: bool = False) -> str:
                if kind == "chat":
                    delta = ({"role": "assistant", "content": ""} if first else
                             {"content": content} if content is not None else {})
                    choice = {"index": 0, "delta": delta, "finish_reason": finish}
                else:
                    choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
                return f"data: {json.dumps({**base, 'object': obj, 'choices': [choice]})}\n\n"

            if kind == "chat":
                yield chunk(None, None, first=True)
            for piece in generator.run(request, ids, usage):
                yield chunk(piece, None)
            yield chunk(None, usage.pop("finish_reason"))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest):
        return respond(request, "chat")

    @app.post("/v1/completions")
    def completions(request: CompletionRequest):
        return respond(request, "text")

    return app
