"""Activation-aware weight quantization (AWQ, Lin et al. 2023), for the blocks of model/model.py.

A few input channels of each linear layer carry much larger activations than the rest, and the
weights that multiply them matter most. AWQ scales those weight columns up by s (so rounding
costs them relatively less) and divides the layer's input by s, which is free: the division is
folded into the operation before (an RMSNorm's weight, or the rows of the layer that produces
the input). Per group of layers sharing an input, s = mean|x|^alpha per input channel, with
alpha searched on a grid to minimise the error of the group's quantized outputs on
calibration activations. alpha = 0 is round-to-nearest, so on the calibration data AWQ never
does worse than RTN.

    attn_norm -> q, k, v       (scale folded into attn_norm.weight)
    v         -> o             (into v_proj's rows; only without grouped-query attention, where
                                each v row feeds exactly one o column)
    mlp_norm  -> gate, up      (into mlp_norm.weight)
    up        -> down          (into up_proj's rows: silu(gate) * (up / s) = (silu(gate) * up) / s)

Optionally (`clip`, off by default), as the reference implementation (llm-awq's auto_clip) does
after scaling, each weight group's range is then clipped: per group of `group_size` weights of an
output row, the clipping |w| <= r max|w| with r on a grid from 1 down to 0.5 that minimises that
group's share of the layer's output error on the calibration activations (r = 1 is no clipping,
so never worse).
Rounding a narrower range is finer for the many small weights, at the cost of the few outliers.
q and k are not clipped (their errors pass through the softmax; the reference skips them too).
Measured on the `kiln run` model (bench/quantize.py): scaling alone takes RTN's perplexity
increase of +0.76% to +0.33%, scaling and clipping to +1.17%: each group's clipping lowers its
own output error on the calibration rows, but its errors are biased and add up across layers in
a model this small. Hence off by default; larger models may gain from it.

Blocks are done one after the other on the calibration batch, each seeing the output of the
blocks before it, as in the reference implementation; weights are then quantized by
`quantize_int4` (model/quantization.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from model.model import Block, RMSNorm, Transformer
from model.quantization import fake_quantize_int4, group_size_for


@dataclass
class ScaleGroup:
    """Linear layers that read the same input, where their input scale is folded, and the module
    whose output the search compares (the reference's `module2inspect`: the whole attention for
    q/k/v, the whole MLP for gate/up, the layer itself otherwise)."""

    name: str
    linears: list[nn.Linear]
    fold_into: RMSNorm | nn.Linear  # an RMSNorm (its weight) or a Linear (its output rows)
    inspect: nn.Module        # called on the group's input, in the shape the block gives it


def scale_groups(block: Block) -> list[ScaleGroup]:
    attn, mlp = block.attn, block.mlp
    groups = [ScaleGroup("qkv", [attn.q_proj, attn.k_proj, attn.v_proj], block.attn_norm, attn)]
    if attn.n_kv_head == attn.n_head:
        groups.append(ScaleGroup("o", [attn.o_proj], attn.v_proj, attn.o_proj))
    groups += [ScaleGroup("gate_up", [mlp.gate_proj, mlp.up_proj], block.mlp_norm, mlp),
               ScaleGroup("down", [mlp.down_proj], mlp.up_proj, mlp.down_proj)]
    return groups


def _inputs_of(block: Block, x: torch.Tensor, cos, sin, modules: Sequence[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """The input each module receives when the block runs on x, in its own shape."""
    seen: dict[nn.Module, torch.Tensor] = {}

    def keep(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:  # None: the output stays
        seen[module] = args[0].detach()

    hooks = [module.register_forward_hook(keep) for module in modules]
    try:
        block(x, cos, sin)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def search_scale(group: ScaleGroup, x: torch.Tensor, run, group_size: int,
                 grid: int) -> tuple[torch.Tensor, float, float]:
    """The input-channel scale s minimising the error of the inspected module's output when the
    group's weights are Q(W diag(s)) diag(s)^-1 (the same as scaling them and dividing the input);
    returns s, the chosen alpha and the error relative to round-to-nearest (<= 1). `run(x)` is
    the inspected module on its input."""
    magnitude = x.reshape(-1, x.size(-1)).abs().mean(dim=0)
    originals = [linear.weight.detach().clone() for linear in group.linears]
    reference = run(x)
    best, best_alpha, best_scale, rtn_error = float("inf"), 0.0, torch.ones_like(magnitude), None
    try:
        for step in range(grid):
            alpha = step / grid
            s = magnitude.pow(alpha).clamp(min=1e-4)
            s = s / (s.max() * s.min()).sqrt()  # centred, so that scaled weights stay in range
            for linear, weight in zip(group.linears, originals):
                linear.weight.copy_(fake_quantize_int4(weight * s, group_size) / s)
            error = float((run(x) - reference).pow(2).mean())
            if rtn_error is None:
                rtn_error = error
            if error < best:
                best, best_alpha, best_scale = error, alpha, s
    finally:
        for linear, weight in zip(group.linears, originals):
            linear.weight.copy_(weight)
    return best_scale, best_alpha, best / rtn_error if rtn_error else 1.0


def apply_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """W <- W diag(s) for the group's layers, and the input divided by s where it is made."""
    for linear in group.linears:
        linear.weight.mul_(s[None, :])
    fold = group.fold_into
    if isinstance(fold, nn.Linear):
        fold.weight.div_(s[:, None])
    else:
        fold.weight.div_(s)


def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, grid: int = 20, max_shrink: float = 0.5,
                rows_per_step: int = 64) -> tuple[torch.Tensor, float]:
    """Per (row, group) the clipping ratio r minimising the error of that group's partial output
    sum_k x_k Q(clip(w_k)) against sum_k x_k w_k; returns the clipped weight and the mean r."""
    out_features, in_features = weight.shape
    size = group_size_for(in_features, group_size)
    xg = x.view(x.size(0), in_features // size, size)                       # [tokens, groups, size]
    clipped, ratios = torch.empty_like(weight), []
    for start in range(0, out_features, rows_per_step):                     # bounded memory per step
        w = weight[start:start + rows_per_step].view(-1, in_features // size, size)  # [rows, groups, size]
        reference = torch.einsum("tgs,ogs->tog", xg, w)
        limit = w.abs().amax(dim=-1, keepdim=True)
        best_error = torch.full(reference.shape[1:], float("inf"))
        best = w.clone()
        best_ratio = torch.ones(reference.shape[1:])
        for step in range(int(max_shrink * grid) + 1):
            ratio = 1 - step / grid
            bound = limit * ratio
            trial = w.clamp(-bound, bound)
            quantized = fake_quantize_int4(trial.reshape(len(w), -1), size).view_as(w)
            error = (torch.einsum("tgs,ogs->tog", xg, quantized) - reference).pow(2).mean(dim=0)
            better = error < best_error
            best_error = torch.where(better, error, best_error)
            best = torch.where(better[..., None], trial, best)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        clipped[start:start + rows_per_step] = best.reshape(len(w), in_features)
        ratios.append(best_ratio.flatten())
    return clipped, float(torch.cat(ratios).mean())


def clip_targets(block: Block) -> list[nn.Linear]:
    """The linear layers whose weight ranges AWQ clips (all but q and k)."""
    return [block.attn.v_proj, block.attn.o_proj, block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj]


@torch.no_grad()
def awq_scale(model: Transformer, calibration: torch.Tensor, group_size: int, grid: int = 20,
              max_tokens: int = 4096, clip: bool = False, clip_tokens: int = 1024) -> dict[str, dict[str, float]]:
    """Rescale `model` in place (its outputs are unchanged up to rounding) so that its block
    weights quantize better to int4, then (`clip`) clip their ranges; returns alpha and the error
    ratio to RTN per layer group, and the mean clipping ratio per block (`blocks.i.clip`).
    `calibration` is [rows, seq] token ids; at most `max_tokens` activations per group are used."""
    model.eval()
    x = model.embed(calibration)
    cos, sin = model._rope(0, calibration.size(1), calibration.device)
    chosen: dict[str, dict[str, float]] = {}
    for index, block in enumerate(cast("Iterable[Block]", model.blocks)):  # a ModuleList of Blocks
        for group in scale_groups(block):
            inputs = _inputs_of(block, x, cos, sin, [group.inspect])[group.inspect]
            if group.inspect is block.attn:
                def run(inputs, attn=block.attn):
                    return attn(inputs, cos, sin)
            else:
                run = group.inspect
                inputs = inputs.reshape(-1, inputs.size(-1))
                if inputs.size(0) > max_tokens:  # an even spread of positions, not the first rows only
                    inputs = inputs[torch.linspace(0, inputs.size(0) - 1, max_tokens).long()]
            s, alpha, ratio = search_scale(group, inputs.float(), run, group_size, grid)
            apply_scale(group, s)
            chosen[f"blocks.{index}.{group.name}"] = {"alpha": alpha, "error_vs_rtn": round(ratio, 4)}
        following = block(x, cos, sin)  # what the next block sees: this block, scaled, in full precision
        if clip:
            targets = clip_targets(block)
            seen = _inputs_of(block, x, cos, sin, targets)
            ratios = []
            for linear in targets:
                inputs = seen[linear].reshape(-1, linear.in_features)
                inputs = inputs[torch.linspace(0, inputs.size(0) - 1, min(clip_tokens, inputs.size(0))).long()]
                clipped, ratio = search_clip(linear.weight.float(), inputs.float(), group_size)
                linear.weight.copy_(clipped)
                ratios.append(ratio)
            chosen[f"blocks.{index}.clip"] = {"mean_ratio": round(sum(ratios) / len(ratios), 4)}
        x = following
    return chosen
