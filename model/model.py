"""A decoder-only transformer in plain PyTorch (Llama-style), readable top to bottom.

    tokens -> embedding -> N x [RMSNorm -> attention (RoPE, GQA) -> + ; RMSNorm -> SwiGLU -> +]
           -> RMSNorm -> linear head -> logits

Conventions follow Llama so that `model/export.py` only renames weights: rotary embeddings
rotate the two halves of each head (`rotate_half`), projections carry no bias, norms are
RMSNorm with a learned scale. Attention goes through `scaled_dot_product_attention`, which
picks flash / memory-efficient kernels where the device has them. A KV cache makes decoding
one token cost one token's work. In training, the head and the loss are one chunked step
(`LinearCrossEntropy`): the [tokens, vocab] logits are never held whole.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

IGNORE_INDEX = -100  # a target the loss skips (padding, SFT's prompt tokens): torch's cross_entropy default


class ModelShape(BaseModel):
    """The architecture, as a run config sets it (`pretrain.model`); the vocabulary size and the
    context length come from the data (ModelConfig adds them)."""

    model_config = ConfigDict(extra="forbid")

    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    n_kv_head: int = Field(4, ge=1, description="Fewer than n_head: grouped-query attention.")
    d_model: int = Field(256, ge=8)
    ffn_hidden: int | None = Field(None, ge=1, description="SwiGLU width; default ~8/3 d_model rounded to 64.")
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = True
    dropout: float = Field(0.0, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        return self


class ModelConfig(ModelShape):
    """Everything that builds a Transformer; stored in every checkpoint's config.json."""

    vocab_size: int = Field(8192, ge=1)
    seq_len: int = Field(256, ge=1, description="The longest context trained on; RoPE tables cover it.")

    @model_validator(mode="after")
    def _default_ffn(self) -> ModelConfig:
        if self.ffn_hidden is None:
            self.ffn_hidden = 64 * math.ceil(8 * self.d_model / 3 / 64)
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return self.model_dump()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 even under bf16 autocast: the mean of squares underflows otherwise.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency), each [length, head_dim], halves repeated.

    sin's first half is stored negated: Llama's rotate_half is (-second, first), and folding
    its sign into the table saves a negation (and its backward) in every attention layer.
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by position: pairs are (i, i + D/2), as in Llama's rotate_half."""
    first, second = x.chunk(2, dim=-1)
    swapped = torch.cat([second, first], dim=-1)  # times the sign-folded sin: rotate_half(x) * sin
    return (x * cos + swapped * sin).type_as(x)


class KVCache:
    """Keys and values of every layer for positions [0, length), preallocated to max_len."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.max_len = max_len
        self.length = 0  # positions filled, advanced by the model after each forward

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def crop(self, length: int) -> None:
        """Forget positions from `length` on (a chat turn rewound, a prompt re-encoded)."""
        self.length = min(self.length, length)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)      # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)   # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                                       # [B, Hkv, past+T, D]
        # A fresh sequence is causal; one new token after the cache sees every position, unmasked;
        # several new tokens see every cached position and the causal part of their own block.
        mask = None
        if past and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        # enable_gqa: each group of query heads shares one key/value head, not copied per head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden = config.ffn_hidden
        assert hidden is not None, "ModelConfig's validator sets the SwiGLU width"
        self.gate_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.up_proj = nn.Linear(config.d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, layer)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of `hidden @ weight.T` against targets (IGNORE_INDEX skipped), by chunks of rows.

    Each chunk's gradient (softmax minus one-hot) is made in the forward pass, straight from
    its logits while they are in cache, and the chunk's logits are then dropped: the full
    [tokens, vocab] logits, their log-softmax and its gradient are never held, which saves
    memory (most of it at large vocabularies) and, on CPU, time. Backward only scales the two
    gradients by the incoming one.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # ~8 MB of fp32 logits per chunk on a CPU (cache-sized); on an accelerator, big matmuls
        budget = 1 << 23 if hidden.device.type == "cpu" else 1 << 30
        rows = max(64, budget // (4 * weight.size(0)))
        kept = targets != IGNORE_INDEX
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), rows):
            h, t, k = hidden[start:start + rows], targets[start:start + rows], kept[start:start + rows]
            logits = (h @ weight.t().to(h.dtype)).float()
            safe = t.clamp(min=0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            peak = logits.amax(dim=-1, keepdim=True)
            grad = logits.sub_(peak).exp_()              # in place, one pass: the softmax's numerators
            sums = grad.sum(dim=-1, keepdim=True)
            total += ((peak + sums.log()).squeeze(1) - picked).mul_(k).sum()      # log-sum-exp - logit
            grad.div_(sums)                                                        # softmax
            grad[torch.arange(len(t), device=t.device), safe] -= 1                  # minus one-hot
            grad = grad.mul_(k[:, None]).to(h.dtype)                               # ignored rows: 0
            grad_hidden[start:start + rows] = grad @ weight.to(h.dtype)
            grad_weight += (grad.t() @ h).to(weight.dtype)
        count = kept.sum().clamp(min=1)
        ctx.save_for_backward(grad_hidden, grad_weight, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_hidden * scale.to(grad_hidden.dtype), grad_weight * scale.to(grad_weight.dtype), None


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # buffers (register_buffer): [positions, head_dim]
    rope_sin: torch.Tensor

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(config.head_dim, config.seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection is shrunk by
        # 1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth.
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(param, mean=0.0, std=config.init_std / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    def _rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + length
        if end > self.rope_cos.size(0):  # decoding past the trained length: extend the tables
            cos, sin = rope_tables(self.config.head_dim, max(end, 2 * self.rope_cos.size(0)), self.config.rope_theta)
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        return self.rope_cos[start:end], self.rope_sin[start:end]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """tokens [B, T] -> logits [B, T, vocab]; with targets, also the mean cross-entropy
        (targets of IGNORE_INDEX are skipped: padding, prompt tokens in SFT). Training with targets
        returns the loss alone (logits None): it never makes the whole logits."""
        start = cache.length if cache is not None else 0
        cos, sin = self._rope(start, tokens.size(1), tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, None, use_reentrant=False)
            else:
                x = block(x, cos, sin, cache)
        if cache is not None:
            cache.length += tokens.size(1)
        x = self.norm(x)
        if targets is not None and self.training and torch.is_grad_enabled():  # training: no logits
            return None, LinearCrossEntropy.apply(x.flatten(0, 1), self.head.weight, targets.flatten())
        logits = self.head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        param = next(self.parameters())
        return KVCache(self.config, batch_size, max_len, param.device, param.dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        return total - (self.embed.weight.numel() if non_embedding else 0)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), as in the PaLM paper's MFU: 6N plus
        the attention scores' 12 * layers * d_model * seq_len."""
        seq_len = seq_len or self.config.seq_len
        c = self.config
        return 6 * self.num_params(non_embedding=False) + 12 * c.n_layer * c.d_model * seq_len


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay the matrices of linear layers; not norms, biases or embeddings."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    embedding = model.get_parameter("embed.weight") if getattr(model, "config", None) is not None else None
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            tied_embedding = param is embedding
            (decay if is_matrix and not tied_embedding else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
