"""Text in, text out: a loaded checkpoint with its tokenizer, streaming generation, and `kiln chat`.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so streamed text is decoded
from all tokens so far and only the settled part is printed; a character split across tokens
appears once it is whole.

A chat (`ChatSession`, driven by `run_chat`) keeps the conversation's token ids and one KV
cache: each turn feeds only the new user turn (the previous reply's `<|end|>`, the user's
message, `<|assistant|>`), and generation stops at `<|end|>`. When the next turn and a reply
would not fit in the model's context, the oldest turns are dropped and what is left is encoded
again from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from tokenizers import Tokenizer

from model.chat_format import BOS, END, PAD, ROLE_TOKENS, ChatFormat
from model.checkpoint import CheckpointError, load_checkpoint
from model.generate import SamplingConfig, generate_tokens
from model.model import KVCache, Transformer


@dataclass
class Loaded:
    model: Transformer
    tokenizer: Tokenizer
    directory: Path

    def token_id(self, token: str) -> int:
        found = self.tokenizer.token_to_id(token)
        if found is None:
            raise CheckpointError(f"{self.directory}: the tokenizer has no {token} token")
        return found

    def encode_document_start(self, text: str) -> list[int]:
        """A prompt as the start of a document: BOS, then the text (as in pretraining)."""
        return [self.token_id(BOS), *self.tokenizer.encode(text, add_special_tokens=False).ids]


def load_for_generation(directory: Path, device: str = "cpu") -> Loaded:
    directory = Path(directory)
    model, _ = load_checkpoint(directory, device)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.exists():
        raise CheckpointError(f"{tokenizer_file}: missing; the checkpoint has no tokenizer")
    return Loaded(model, Tokenizer.from_file(str(tokenizer_file)), directory)


def stream_text(loaded: Loaded, prompt_ids: list[int], sampling: SamplingConfig,
                stop_tokens: tuple[str, ...] = (BOS,), cache: KVCache | None = None,
                generated: list[int] | None = None) -> Iterator[str]:
    """Generate after prompt_ids, yielding text pieces as they settle; the token ids go to
    `generated` when given."""
    stop_ids = {loaded.token_id(t) for t in stop_tokens}
    generated = [] if generated is None else generated
    shown = ""
    for token in generate_tokens(loaded.model, prompt_ids, sampling, stop_ids, cache):
        generated.append(token)
        text = loaded.tokenizer.decode(generated, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue  # half a character so far
        yield text[len(shown):]
        shown = text
    text = loaded.tokenizer.decode(generated, skip_special_tokens=False)
    if len(text) > len(shown):
        yield text[len(shown):]


# ------------------------------------------------------------------ chat


# A reply ends at <|end|>; a model that starts another turn or document instead ends it too.
STOP_TOKENS = (END, BOS, PAD, *ROLE_TOKENS.values())


def sample_document(loaded: Loaded, prompt: str, max_new_tokens: int, seed: int = 0,
                    stop_tokens: tuple[str, ...] = (BOS,)) -> str:
    """`prompt` continued as the start of a document, sampled with the default temperature,
    top-k and top-p and a fixed seed: the sample a stage records with its results."""
    stop = {loaded.token_id(t) for t in stop_tokens}
    tokens = list(generate_tokens(loaded.model, loaded.encode_document_start(prompt),
                                  SamplingConfig(max_new_tokens=max_new_tokens, seed=seed), stop_ids=stop))
    return prompt + loaded.tokenizer.decode(tokens)


class ContextFull(ValueError):
    """A message too long for the model's context even with every earlier turn dropped."""


class ChatSession:
    """One conversation with a model: its messages, its token ids, and the KV cache holding a
    prefix of those ids (all of them after a turn but the reply's closing `<|end|>`)."""

    def __init__(self, loaded: Loaded, sampling: SamplingConfig, system: str | None = None,
                 context: int | None = None):
        self.loaded, self.sampling, self.system = loaded, sampling, system
        self.format = ChatFormat.from_dir(loaded.directory)
        self.context = context or loaded.model.config.seq_len
        self.cache = loaded.model.new_cache(1, self.context)
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = [{"role": "system", "content": self.system}] if self.system else []
        self.ids: list[int] = []
        self.cache.crop(0)

    @property
    def reserve(self) -> int:
        """Positions kept free for the reply."""
        return min(self.sampling.max_new_tokens, self.context // 2)

    def _prompt(self, message: dict[str, str]) -> list[int]:
        """The ids up to the reply: the new turn appended to the cached ones, or, when that
        would overflow, the conversation without its oldest turns, encoded from the start."""
        if self.ids:
            new = self.format.encode([*self.messages, message], add_generation_prompt=True, start=len(self.messages))
            if len(self.ids) + len(new) + self.reserve <= self.context:
                return self.ids + new.ids
        system = [m for m in self.messages if m["role"] == "system"]
        alone = len(self.format.encode([*system, message], add_generation_prompt=True))
        if alone + self.reserve > self.context:
            raise ContextFull(f"the message takes {alone} tokens with the chat markup; the model's context is "
                              f"{self.context}, {self.reserve} of them kept for the reply")
        while True:
            ids = self.format.encode([*self.messages, message], add_generation_prompt=True).ids
            if len(ids) + self.reserve <= self.context:
                break
            first = next(i for i, m in enumerate(self.messages) if m["role"] != "system")
            end = next((i for i in range(first + 1, len(self.messages)) if self.messages[i]["role"] == "user"),
                       len(self.messages))
            del self.messages[first:end]  # the oldest exchange: a user turn and the replies to it
        self.cache.crop(0)
        return ids

    def reply(self, text: str) -> Generator[str, None, None]:
        """Send a user message; yields the reply's text as it is generated."""
        message = {"role": "user", "content": text}
        prompt = self._prompt(message)
        generated: list[int] = []
        try:
            yield from stream_text(self.loaded, prompt, self.sampling, stop_tokens=STOP_TOKENS, cache=self.cache,
                                   generated=generated)
        finally:  # also when interrupted: what was said stays in the conversation
            reply = self.loaded.tokenizer.decode(generated, skip_special_tokens=False)
            self.messages += [message, {"role": "assistant", "content": reply}]
            self.ids = prompt + generated + [self.format.end_id]


HELP = "Type a message. /reset clears the conversation, /exit (or Ctrl-D) leaves."


def run_chat(loaded: Loaded, input_fn: Callable[[str], str], output: TextIO,
             sampling: SamplingConfig | None = None, system: str | None = None) -> ChatSession:
    """The interactive loop: read a line, stream the reply; `/reset`, `/exit`, end of input."""
    session = ChatSession(loaded, sampling or SamplingConfig(max_new_tokens=256), system)
    output.write(f"Chatting with {loaded.directory} ({session.context} tokens of context). {HELP}\n")
    output.flush()
    while True:
        try:
            line = input_fn("you> ")
        except (EOFError, KeyboardInterrupt):
            output.write("\n")
            break
        command = line.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            output.write("(conversation cleared)\n")
            continue
        if command in ("/help", "/?"):
            output.write(HELP + "\n")
            continue
        output.write("kiln> ")
        output.flush()
        stream = session.reply(line)
        try:
            for piece in stream:
                output.write(piece)
                output.flush()
        except KeyboardInterrupt:
            output.write(" [stopped]")
        except ContextFull as err:
            output.write(f"(not sent: {err})")
        finally:
            stream.close()
        output.write("\n")
        output.flush()
    return session
