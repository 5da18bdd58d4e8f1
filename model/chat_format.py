"""The chat format on the model side: conversations rendered with the template stored with the
tokenizer, and tokenized into ids plus a loss mask.

    <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>

The template is the `chat_template` of the checkpoint's (or tokenizer artifact's)
`tokenizer_config.json`, rendered with jinja2 the way transformers' `apply_chat_template`
renders it, so a model trained here chats the same way once exported. Nothing is imported
from `pipelines`: the tokenizer directory is the contract.

Tokenizing: a conversation is rendered message by message, each message once with a
placeholder for its content, which splits its text into markup (role tokens, `<|end|>`) and
content. Markup is encoded with special tokens recognised; content as plain text, so a user
who types `<|end|>` gets the characters, never the token. With our template the pieces meet at
special tokens, which the tokenizer splits on before anything else, so the ids equal encoding
the whole rendered string (tests/model/test_chat_format.py checks it against transformers).
The loss mask is true on what the model must learn to write: each assistant message's content
and the markup after it (its `<|end|>`); never the system or user turns or the role tokens.

A conversation too long for a training row loses its start, not its end (`crop_prompt`): what
comes before the final assistant turn is cropped from the left, for SFT and DPO alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from storage import InputError

# The special tokens as the model side knows them: the tokenizer stage (pipelines/tokenizer.py,
# which model/ may not import) defines the vocabulary; tests/model/test_chat_format.py checks
# that the two agree.
BOS, PAD, END = "<|bos|>", "<|pad|>", "<|end|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
_PLACEHOLDER = "\x00kiln-content\x00"


@dataclass
class ChatTokens:
    """Token ids of a conversation and, per id, whether it is a training target."""

    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)

    def extend(self, ids: list[int], trainable: bool) -> None:
        self.ids += ids
        self.mask += [trainable] * len(ids)

    def __len__(self) -> int:
        return len(self.ids)


def compile_template(source: str):
    """A jinja2 template compiled as transformers compiles chat templates."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(source)
    except TemplateError as err:
        raise InputError(f"chat_template: not a valid jinja2 template ({err})") from None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as `{"role", "content"}` dicts, or a ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} must be an object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string, got {type(content).__name__}")
        checked.append({"role": role, "content": content})
    return checked


class ChatFormat:
    """A tokenizer and its chat template: render and encode conversations."""

    def __init__(self, tokenizer: Tokenizer, template: str, where: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.template_source = template
        self.template = compile_template(template)
        # A second instance that reads special-token strings as text: for message content.
        self.text_tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.text_tokenizer.encode_special_tokens = True
        found = {token: tokenizer.token_to_id(token) for token in (BOS, PAD, END)}
        ids = {token: i for token, i in found.items() if i is not None}
        missing = [token for token in found if token not in ids]
        if missing:
            raise InputError(f"{where}: the tokenizer has no {', '.join(missing)} token")
        self.bos_id, self.pad_id, self.end_id = ids[BOS], ids[PAD], ids[END]

    @classmethod
    def from_dir(cls, directory: str | Path) -> ChatFormat:
        """From a checkpoint or tokenizer directory: `tokenizer.json` and the `chat_template` in
        `tokenizer_config.json`."""
        directory = Path(directory)
        config_path = directory / TOKENIZER_CONFIG_FILE
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise InputError(f"{directory / TOKENIZER_FILE}: not readable ({str(err).splitlines()[0]})") from None
        try:
            template = json.loads(config_path.read_text())["chat_template"]
        except FileNotFoundError:
            raise InputError(f"{config_path}: missing; the tokenizer has no chat template") from None
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{config_path}: no chat_template") from None
        if not isinstance(template, str):
            raise InputError(f"{config_path}: chat_template is not a single template string")
        return cls(tokenizer, template, str(directory))

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=BOS, eos_token=BOS, pad_token=PAD)

    def _markup(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def _content(self, text: str) -> list[int]:
        return self.text_tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def encode(self, messages: list[dict[str, str]], add_generation_prompt: bool = False, bos: bool = True,
               start: int = 0) -> ChatTokens:
        """Ids and loss mask of `messages[start:]` (and the generation prompt), given that
        `messages[:start]` came before; with bos and start == 0, led by BOS (the document
        boundary of pretraining) if the template does not put it there itself.

        `start` is how a chat encodes only its new turn: the ids of `messages[:start]` followed
        by these are the ids of the whole conversation."""
        messages = check_messages(messages) if messages else []
        tokens = ChatTokens()
        before = self.render(messages[:start]) if start else ""
        for k in range(start, len(messages)):
            message = messages[k]
            with_placeholder = self.render([*messages[:k], {**message, "content": _PLACEHOLDER}])
            if not with_placeholder.startswith(before) or with_placeholder.count(_PLACEHOLDER) != 1:
                raise ValueError("the chat template does not render a conversation message by message")
            opening, closing = with_placeholder[len(before):].split(_PLACEHOLDER)
            trainable = message["role"] == "assistant"
            tokens.extend(self._markup(opening), False)
            tokens.extend(self._content(message["content"]), trainable)
            tokens.extend(self._markup(closing), trainable)
            before += opening + message["content"] + closing
        if messages and before != self.render(messages):
            raise ValueError("the chat template changes message content; the loss mask cannot be placed")
        if add_generation_prompt:
            prompt = self.render(messages, add_generation_prompt=True)
            if not prompt.startswith(before):
                raise ValueError("the chat template's generation prompt is not an addition to the conversation")
            tokens.extend(self._markup(prompt[len(before):]), False)
        if bos and start == 0 and tokens.ids[:1] != [self.bos_id]:  # unless the template starts with it
            tokens = ChatTokens([self.bos_id, *tokens.ids], [False, *tokens.mask])
        return tokens


def crop_prompt(chat: ChatFormat, prompt: list[dict[str, str]], room: int) -> list[dict[str, str]]:
    """The prompt in at most `room` tokens (BOS included), cropped from the left: whole earliest
    turns first, so that it still starts with a user turn (a leading system message is kept while
    there are turns to drop), then the system message, then tokens from the start of the final
    turn's content (the final user turn's, where the prompt ends with one); that content is empty
    when even its markup leaves no room, and then the prompt is longer than `room`.

    What SFT and DPO do with a conversation longer than a row, so that its final assistant turn,
    the one learned from, survives whole (model/sft.py, model/dpo.py)."""
    if not prompt or len(chat.encode(prompt)) <= room:
        return prompt
    system = prompt[:1] if prompt[0]["role"] == "system" and len(prompt) > 1 else []
    turns = prompt[len(system):]
    while len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        if len(chat.encode(system + turns)) <= room:
            return system + turns
    last = turns[-1]
    keep = room - len(chat.encode([{**last, "content": ""}]))
    content = last["content"]
    while True:
        offsets = chat.text_tokenizer.encode(content, add_special_tokens=False).offsets if content else []
        if len(offsets) <= max(keep, 0):
            return [{**last, "content": content}]
        # Cut before the first token kept; the cut text may tokenize a little differently: measure again.
        content = content[max(offsets[len(offsets) - keep][0], 1):] if keep > 0 else ""
