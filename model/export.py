"""Export a Kiln checkpoint as a Hugging Face Llama directory.

Kiln's model follows Llama's conventions (rotate-half RoPE, bias-free projections, RMSNorm,
SwiGLU), so exporting is renaming weights and writing a `LlamaConfig`: the exported model's
logits equal Kiln's (tests/model/test_model.py checks it within 1e-4; tests/model/test_export.py
checks the paths it writes to and that transformers, called as users call it, answers as `kiln
generate`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from model.chat_format import BOS
from model.checkpoint import TOKENIZER_FILES, WEIGHTS, load_checkpoint
from model.model import Block, ModelConfig, Transformer
from storage.outputs import write_output_dir


def llama_config(config: ModelConfig, special_ids: dict[str, int] | None = None) -> dict:
    special_ids = special_ids or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
    }


def _dense(module) -> torch.Tensor:
    """A layer's weight as a float matrix, dequantized when the model is a quantized one."""
    from model.quantization import QuantizedEmbedding, QuantizedLinear

    if isinstance(module, QuantizedEmbedding):
        module = module.linear
    if isinstance(module, QuantizedLinear):
        return module.weight_q.dequantize()
    return module.weight


def llama_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Kiln parameter names -> Hugging Face Llama names, every weight dense (dequantized)."""
    state = {"model.embed_tokens.weight": _dense(model.embed), "model.norm.weight": model.norm.weight}
    for i, block in enumerate(cast("Iterable[Block]", model.blocks)):  # a ModuleList of Blocks
        prefix = f"model.layers.{i}."
        for name in ("q", "k", "v", "o"):
            state[f"{prefix}self_attn.{name}_proj.weight"] = _dense(getattr(block.attn, f"{name}_proj"))
        for name in ("gate", "up", "down"):
            state[f"{prefix}mlp.{name}_proj.weight"] = _dense(getattr(block.mlp, f"{name}_proj"))
        state[f"{prefix}input_layernorm.weight"] = block.attn_norm.weight
        state[f"{prefix}post_attention_layernorm.weight"] = block.mlp_norm.weight
    if not model.config.tie_embeddings:
        state["lm_head.weight"] = _dense(model.head)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in state.items()}


def _special_ids(checkpoint: Path) -> dict[str, int]:
    """bos/eos/pad ids from the checkpoint's tokenizer files, when it has them."""
    try:
        vocab = json.loads((checkpoint / "tokenizer.json").read_text())["added_tokens"]
        tokens = json.loads((checkpoint / "special_tokens_map.json").read_text())
    except (FileNotFoundError, KeyError, ValueError):
        return {}
    ids = {t["content"]: t["id"] for t in vocab}
    named = {key: (value["content"] if isinstance(value, dict) else value) for key, value in tokens.items()}
    return {key[: -len("_token")]: ids[token] for key, token in named.items()
            if key in ("bos_token", "eos_token", "pad_token") and token in ids}


def prompt_as_trained(directory: Path) -> None:
    """Make the exported tokenizer's default call put BOS in front, as every training document
    has it: transformers' `tok(text)` and `pipeline("text-generation")` then prompt the model as
    `kiln generate` does (Kiln's own code encodes with `add_special_tokens=False` and places BOS
    itself, so the checkpoint's tokenizer is left as trained)."""
    tokenizer_file, config_file = directory / "tokenizer.json", directory / "tokenizer_config.json"
    if not tokenizer_file.exists():
        return
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    bos = tokenizer.token_to_id(BOS)
    if bos is None:
        return
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos)])
    tokenizer.save(str(tokenizer_file), pretty=True)
    if config_file.exists():
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "add_bos_token": True}, indent=2))


def export_llama(checkpoint: Path, output: Path, overwrite: bool = False) -> Path:
    """Write `output/` with config.json, model.safetensors and the tokenizer files: a new or
    empty directory, or (`overwrite`) an earlier export; never a directory Kiln did not make
    (storage/outputs.py)."""
    checkpoint, output = Path(checkpoint), Path(output)
    model, _ = load_checkpoint(checkpoint)
    config = llama_config(model.config, _special_ids(checkpoint))

    def fill(temp: Path) -> None:
        (temp / "config.json").write_text(json.dumps(config, indent=2))
        (temp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
             "pad_token_id": config["pad_token_id"]}, indent=2))
        save_file(llama_state_dict(model), str(temp / WEIGHTS), metadata={"format": "pt"})
        for name in TOKENIZER_FILES:
            if (checkpoint / name).exists():
                shutil.copyfile(checkpoint / name, temp / name)
        prompt_as_trained(temp)

    return write_output_dir(output, fill, kind="export", overwrite=overwrite, about={"source": str(checkpoint)})
