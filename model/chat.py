"""Text in, text out: a loaded checkpoint with its tokenizer, streaming generation, and `kiln chat`.

Byte-level BPE tokens can end in the middle of a UTF-8 character, so streamed text is decoded
from all tokens so far and only the settled part is printed; a character split across tokens
appears once it is whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

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
        return [self.token_id("<|bos|>"), *self.tokenizer.encode(text, add_special_tokens=False).ids]


def load_for_generation(directory: Path, device: str = "cpu") -> Loaded:
    directory = Path(directory)
    model, _ = load_checkpoint(directory, device)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.exists():
        raise CheckpointError(f"{tokenizer_file}: missing; the checkpoint has no tokenizer")
    return Loaded(model, Tokenizer.from_file(str(tokenizer_file)), directory)


def stream_text(loaded: Loaded, prompt_ids: list[int], sampling: SamplingConfig,
                stop_tokens: tuple[str, ...] = ("<|bos|>",), cache: KVCache | None = None) -> Iterator[str]:
    """Generate after prompt_ids, yielding text pieces as they settle."""
    stop_ids = {loaded.token_id(t) for t in stop_tokens}
    generated: list[int] = []
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
