"""Export a Kiln checkpoint as one GGUF file, for llama.cpp (and Ollama, LM Studio, transformers).

The model is written as llama.cpp's `llama` architecture (Kiln's model is Llama's, see
model/export.py), with the tokenizer inside the file: the byte-level BPE vocabulary and merges
as `gpt2`, the pre-tokenizer as `llama-bpe` (Kiln splits text with exactly Llama 3's pattern;
llama.cpp splits otherwise under an unknown name), the special tokens typed as control tokens,
and the chat template, so llama.cpp tokenizes and formats chats exactly as Kiln does.

Two layouts differ from Hugging Face's: llama.cpp's RoPE rotates adjacent pairs (x0, x1), Kiln
and Hugging Face rotate the halves (x_i, x_{i+d/2}); so the rows of the q and k projections are
permuted per head (as llama.cpp's own converter does), which makes the two agree. Tensor types:
f32, f16, q8_0 or q4_0 (the gguf package's own quantizers; q4_k it can only read) for the
matrices, f32 for the norms. A quantized Kiln model (the quantize stage) is dequantized first,
so AWQ's rescaling carries into q4_0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from model.chat_format import END
from model.checkpoint import load_checkpoint
from model.export import llama_state_dict
from storage import InputError
from storage.outputs import write_output_file

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
GGUFType = Literal["f32", "f16", "q8_0", "q4_0"]

# Kiln's (= Hugging Face Llama's) names -> llama.cpp's, `{i}` the block
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def gguf_name(hf_name: str) -> str:
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers."):
        index = parts[2]
        return TENSOR_NAMES[".".join(parts[:2] + ["{i}"] + parts[3:])].format(i=index)
    return TENSOR_NAMES[hf_name]


def rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order to llama.cpp's adjacent pairs."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def _tensor(name: str, weight: torch.Tensor, kind: GGUFType):
    """(data, raw type) of one tensor: 1-d tensors (norms) stay f32, matrices take `kind`."""
    import gguf
    from gguf import quants

    array = weight.detach().float().cpu().numpy()
    if array.ndim == 1 or kind == "f32":
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "f16":
        return array.astype(np.float16), gguf.GGMLQuantizationType.F16
    qtype = gguf.GGMLQuantizationType.Q8_0 if kind == "q8_0" else gguf.GGMLQuantizationType.Q4_0
    if array.shape[-1] % 32:
        raise InputError(f"{name}: rows of {array.shape[-1]} values do not split into {kind}'s blocks of 32")
    return quants.quantize(array, qtype), qtype


def _tokenizer_metadata(writer, checkpoint: Path) -> None:
    """The vocabulary, merges, special tokens and chat template, from the checkpoint's files."""
    import gguf

    try:
        spec = json.loads((checkpoint / "tokenizer.json").read_text())
        config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    except FileNotFoundError as err:
        raise InputError(f"{err.filename}: missing; GGUF carries the tokenizer, export needs it") from None
    vocab: dict[str, int] = spec["model"]["vocab"]
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    tokens = [""] * (max([*vocab.values(), *added.values()]) + 1)
    for token, index in {**vocab, **added}.items():
        tokens[index] = token
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("pad_token", writer.add_pad_token_id)):
        if config.get(key) in added:
            add(added[config[key]])
    if END in added:  # a chat turn ends here: llama.cpp stops generating at end-of-generation tokens
        writer.add_eot_token_id(added[END])
    # every training document starts with BOS, so a prompt must too: llama.cpp adds it (even for a
    # checkpoint whose tokenizer predates `add_bos_token`)
    writer.add_add_bos_token("bos_token" in config)
    writer.add_add_eos_token(False)
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


KILN_KEY = "kiln.export"  # our metadata key: a GGUF carrying it is one Kiln wrote (and may replace)


def written_by_kiln(path: Path) -> bool:
    """Whether `path` is a GGUF file that Kiln exported (its metadata holds KILN_KEY)."""
    import gguf

    try:
        return KILN_KEY in gguf.GGUFReader(str(path), "r").fields
    except Exception:  # noqa: BLE001 - anything unreadable as GGUF is not ours
        return False


def export_gguf(checkpoint: Path, output: Path, kind: GGUFType = "f16", overwrite: bool = False) -> Path:
    """Write `output` (a .gguf file) from a checkpoint directory; returns its path. An existing
    file there is replaced only when it is an earlier Kiln export and `overwrite` is set."""
    import gguf

    if kind not in GGUF_TYPES:
        raise InputError(f"{kind}: not a GGUF type Kiln writes (one of {', '.join(GGUF_TYPES)})")
    checkpoint, output = Path(checkpoint), Path(output)
    model, _ = load_checkpoint(checkpoint)
    c = model.config
    state = llama_state_dict(model)
    for i in range(c.n_layer):
        for proj, heads in (("q_proj", c.n_head), ("k_proj", c.n_kv_head)):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            state[name] = rope_pairs(state[name], heads)
    writer = gguf.GGUFWriter(path=None, arch="llama")
    writer.add_name(checkpoint.parent.name if checkpoint.name == "model" else checkpoint.name)
    writer.add_context_length(c.seq_len)
    writer.add_embedding_length(c.d_model)
    writer.add_block_count(c.n_layer)
    assert c.ffn_hidden is not None  # ModelConfig's validator sets it
    writer.add_feed_forward_length(c.ffn_hidden)
    writer.add_head_count(c.n_head)
    writer.add_head_count_kv(c.n_kv_head)
    writer.add_rope_dimension_count(c.head_dim)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    _tokenizer_metadata(writer, checkpoint)
    for name, weight in state.items():
        data, qtype = _tensor(name, weight, kind)
        writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    writer.add_string(KILN_KEY, json.dumps({"source": str(checkpoint), "type": kind}))

    def write(temp: str) -> None:
        writer.write_header_to_file(Path(temp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    return write_output_file(output, write, what="GGUF export", is_ours=written_by_kiln, overwrite=overwrite)
