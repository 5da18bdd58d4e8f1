"""Weight-only quantization, written here: int8 per output channel, int4 in groups along the input.

    int8:  w ~ q * scale[row]                     q in [-127, 127], one scale per output channel
    int4:  w ~ (q - 8) * scale[row, g] + zero[row, g]   q in [0, 15], per group of `group_size` inputs

Round-to-nearest (RTN) is `quantize_int4(w)`; AWQ (model/awq.py) first rescales the input
channels so that the ones carrying large activations lose less, then calls the same function.
Stored as safetensors, nothing pickled: int8 values as int8, int4 values two to a byte (low
nibble first), scales and zeros as float32.

At run time `QuantizedLinear` multiplies a few rows (decoding: one token per sequence) with
torch's packed CPU kernels where they exist (`torch._weight_int8pack_mm`;
`aten._weight_int4pack_mm_for_cpu` after `aten._convert_weight_to_int4pack_for_cpu`), checked
against dequantizing at load. Those kernels are made for one or few rows: their time grows with
the rows as one matrix-vector product per row, to about 40x (int8) and 85x (int4) a plain fp32
matmul's at 1024 rows of a 128- or 256-wide layer (measured on 2 cores). So beyond
`PACKED_KERNEL_MAX_ROWS` rows (evaluation, prefill, batched serving), and where there is no
kernel, the layer dequantizes its weight for that call only (a float copy freed after the
matmul; the module holds the quantized weight) and multiplies with a plain matmul.
`QuantizedEmbedding` gathers rows and dequantizes only those (a tied head and embedding share
one int8 matrix).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("kiln")

INT4_MID = 8  # int4 values are stored unsigned, 0..15, centred on 8
# Up to how many rows (tokens in the batch) QuantizedLinear multiplies by torch's packed kernel;
# beyond, dequantizing the weight for the call and a plain matmul is faster. The crossover measured
# by bench/quantize.py (2 cores, torch 2.13), the fewest rows from which dequantizing wins: int8 2
# to 4 on a 128 x 128 matrix, 2 at 256, 1 to 3 at 1024, 4 to 6 at 4096; int4 4, 2, 1 to 2, 3.
PACKED_KERNEL_MAX_ROWS = 2


@dataclass
class QuantizedWeight:
    """One quantized [out, in] matrix: its integer values, scales and (int4) zeros."""

    bits: int
    values: torch.Tensor              # int8 [out, in], or uint8 [out, in / 2]: two int4 values a byte
    scales: torch.Tensor              # float32 [out] (int8) or [out, groups] (int4)
    zeros: torch.Tensor | None = None  # float32 [out, groups] (int4)
    offsets: torch.Tensor | None = None  # zeros - 8 * scales (int4), derived, never stored: see dequantize

    @property
    def shape(self) -> tuple[int, int]:
        rows, columns = self.values.shape
        return rows, columns * (2 if self.bits == 4 else 1)

    @property
    def group_size(self) -> int | None:
        return self.shape[1] // self.scales.size(1) if self.bits == 4 else None

    def integers(self) -> torch.Tensor:
        """The integer values, one per weight: int8 as stored, int4 unpacked to 0..15 (int32)."""
        return self.values if self.bits == 8 else unpack_int4(self.values)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float matrix, in one new tensor of `dtype` worked on in place (a 4096 x 4096
        int4 matrix in 17 ms, against 176 ms through int32 and out-of-place arithmetic)."""
        scales = self.scales.to(dtype)
        if self.bits == 8:
            return self.values.to(dtype).mul_(scales[:, None])
        rows, columns = self.shape
        group_size = self.group_size
        assert group_size is not None, "an int4 weight has groups"
        nibbles = torch.stack([self.values & 0xF, self.values >> 4], dim=-1).view(rows, -1, group_size)
        offsets = self.offsets
        if offsets is None:
            assert self.zeros is not None, "an int4 weight has zeros"
            offsets = int4_offsets(self.scales, self.zeros)
        offsets = offsets.to(dtype)
        return nibbles.to(dtype).mul_(scales[..., None]).add_(offsets[..., None]).view(rows, columns)

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors to store under `prefix` (e.g. `blocks.0.attn.q_proj.`)."""
        out = {f"{prefix}qweight": self.values, f"{prefix}scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(cls, state: dict[str, torch.Tensor], prefix: str) -> QuantizedWeight:
        values = state[f"{prefix}qweight"]
        return cls(8 if values.dtype == torch.int8 else 4, values, state[f"{prefix}scales"],
                   state.get(f"{prefix}zeros"))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.scales, self.zeros) if t is not None)


def int4_offsets(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """(q - 8) * scale + zero = q * scale + offset: one multiply-add per weight to dequantize."""
    return zeros - INT4_MID * scales


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric int8, one scale per output channel (row)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
    values = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight(8, values, scales)


def group_size_for(columns: int, group_size: int) -> int:
    """`group_size`, or the largest multiple of 32 below it that divides the row (a SwiGLU
    width of 704 takes groups of 64 at a group size of 128): groups never straddle rows."""
    for size in range(min(group_size, columns), 0, -32 if group_size % 32 == 0 else -1):
        if columns % size == 0:
            return size
    return columns


def quantize_int4(weight: torch.Tensor, group_size: int) -> QuantizedWeight:
    """Asymmetric int4 by round-to-nearest, per group of `group_size` consecutive inputs: the
    group's [min, max] split into 15 steps."""
    w = weight.detach().float()
    rows, columns = w.shape
    size = group_size_for(columns, group_size)
    groups = w.view(rows, columns // size, size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8)
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    zeros = low + INT4_MID * scales  # so that (q - 8) * scale + zero = low + q * scale
    return QuantizedWeight(4, pack_int4(q.view(rows, columns)), scales, zeros)


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """What `quantize_int4` then `dequantize` gives, without packing (AWQ's search calls it often)."""
    rows, columns = weight.shape
    size = group_size_for(columns, group_size)
    groups = weight.view(rows, columns // size, size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scales = ((high - low) / 15).clamp(min=1e-8)
    return (torch.round((groups - low) / scales).clamp(0, 15) * scales + low).view(rows, columns)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[rows, columns] values 0..15 -> uint8 [rows, columns / 2], low nibble = even column."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.size(0)
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(rows, -1).to(torch.int32)


# ------------------------------------------------------------------ modules that use them


class QuantizedLinear(nn.Module):
    """A bias-free Linear whose weight is a QuantizedWeight. `kernel` is "int8-pack" or
    "int4-pack" (torch's CPU kernel, for up to PACKED_KERNEL_MAX_ROWS rows; more are multiplied
    as with "dequantize") or "dequantize" (the weight rebuilt for each matmul)."""

    qweight: torch.Tensor  # buffers (register_buffer), for type checkers
    scales: torch.Tensor
    zeros: torch.Tensor  # empty for int8
    offsets: torch.Tensor | None

    def __init__(self, weight: QuantizedWeight):
        super().__init__()
        self.bits, self.out_features, self.in_features = weight.bits, *weight.shape
        self.register_buffer("qweight", weight.values)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("zeros", weight.zeros if weight.zeros is not None else torch.empty(0))
        # what dequantizing adds per group (int4; as small as zeros): computed once, not on each call
        self.register_buffer("offsets", int4_offsets(weight.scales, weight.zeros) if weight.zeros is not None else None,
                             persistent=False)
        self.kernel = "dequantize"
        self._packed: torch.Tensor | None = None  # the int4 kernel's own layout (not stored)
        self._scales_and_zeros: torch.Tensor | None = None

    @property
    def weight_q(self) -> QuantizedWeight:
        return QuantizedWeight(self.bits, self.qweight, self.scales, self.zeros if self.bits == 4 else None,
                               self.offsets)

    def use_kernel(self) -> str:
        """Switch to torch's packed CPU kernel if it runs here and agrees with dequantizing."""
        if self.qweight.device.type != "cpu":
            return self.kernel
        probe = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0))
        expected = probe @ self.weight_q.dequantize().t()
        previous = self.kernel
        try:
            if self.bits == 8:
                self.kernel = "int8-pack"
            else:
                q = self.weight_q
                assert q.zeros is not None, "an int4 weight has zeros"
                self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.integers(), 1)
                self._scales_and_zeros = torch.stack([q.scales, q.zeros], dim=-1).transpose(0, 1).contiguous()
                self.kernel = "int4-pack"
            got = self.packed_matmul(probe)
            if not torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()) + 1e-5):
                raise RuntimeError(f"differs from dequantizing by {float((got - expected).abs().max()):.3g}")
        except (RuntimeError, NotImplementedError, AttributeError) as err:  # no such kernel for this shape/build
            log.debug("quantized matmul kernel unusable (%s); dequantizing on the fly", err)
            self.kernel, self._packed, self._scales_and_zeros = previous, None, None
        return self.kernel

    def packed_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """[rows, in] @ W.T by torch's packed kernel (float32 out)."""
        if self.kernel == "int8-pack":
            return torch._weight_int8pack_mm(flat.float().contiguous(), self.qweight, self.scales)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat.float().contiguous(), self._packed,
                                                          self.in_features // self.scales.size(1),
                                                          self._scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if self.kernel != "dequantize" and flat.size(0) <= PACKED_KERNEL_MAX_ROWS:
            out = self.packed_matmul(flat)
        else:
            out = self.dequantized_matmul(flat)
        return out.to(x.dtype).view(*shape, self.out_features)

    def dequantized_matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """[rows, in] @ W.T by a plain matmul on the weight dequantized for this call only: the
        module goes on holding the quantized weight, and the float copy is freed after the call."""
        return F.linear(flat, self.weight_q.dequantize(flat.dtype))


class QuantizedEmbedding(nn.Module):
    """An embedding table stored quantized: the looked-up rows are dequantized, the rest is not."""

    def __init__(self, linear: QuantizedLinear):
        super().__init__()
        self.linear = linear  # the same tensors as the (tied) head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.linear.weight_q
        rows = QuantizedWeight(q.bits, q.values[tokens.flatten()], q.scales[tokens.flatten()],
                               q.zeros[tokens.flatten()] if q.zeros is not None else None)
        return rows.dequantize().view(*tokens.shape, -1)


def linear_names(model: nn.Module) -> list[str]:
    """The names of the transformer blocks' linear layers (the weights AWQ and RTN quantize)."""
    return [name for name, module in model.named_modules() if name.startswith("blocks.") and
            isinstance(module, (nn.Linear, QuantizedLinear))]


def install(model: nn.Module, weights: dict[str, QuantizedWeight]) -> dict[str, int]:
    """Swap each named Linear of `model` (`head` and `embed` included) for its quantized
    version, switch each to a packed kernel where one works; returns how many use which."""
    kernels: dict[str, int] = {}
    modules = dict(model.named_modules())
    for name, weight in weights.items():
        if name == "embed":
            continue
        parent_name, _, attr = name.rpartition(".")
        linear = QuantizedLinear(weight)
        kind = linear.use_kernel()
        kernels[kind] = kernels.get(kind, 0) + 1
        setattr(modules[parent_name] if parent_name else model, attr, linear)
    if "embed" in weights:
        tied = "head" in weights and weights["head"] is weights["embed"]
        head = cast(QuantizedLinear, model.head) if tied else QuantizedLinear(weights["embed"])  # quantized above
        model.embed = QuantizedEmbedding(head)
    return kernels


def load_quantized(model: nn.Module, state: dict[str, torch.Tensor], layers: list[str]) -> dict[str, int]:
    """Put the quantized `layers` stored in `state` into `model` (quantized_state's layout, see
    model/quantize.py) and the remaining tensors in place; returns the kernels used, by count."""
    weights: dict[str, QuantizedWeight] = {}
    for name in sorted(layers, key=lambda n: n != "embed"):  # embed first: a tied head is stored as it
        weights[name] = (weights["embed"] if name == "head" and "head.qweight" not in state
                         else QuantizedWeight.from_tensors(state, f"{name}."))
    kernels = install(model, weights)
    stored = {f"{name}.{part}" for name in layers for part in ("qweight", "scales", "zeros")}
    rest = {name: tensor for name, tensor in state.items() if name not in stored}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=True)  # assign: the model may be on "meta"
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in weights and not m.startswith("embed.linear.")]
    if missing or unexpected:
        raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return kernels
