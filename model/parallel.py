"""Data parallelism as a component the training loop calls (torchtitan's way): the process group,
the device and precision, and the model replicated (DDP) or sharded (FSDP2) across the ranks.

`accelerate launch` only starts the processes and sets RANK / WORLD_SIZE / MASTER_ADDR; this
module does the rest with torch's own APIs, so the same code path runs on CPUs over gloo (the
tests: 2 ranks really train, their checkpoints really shard) and on GPUs over NCCL.

    none  one process
    ddp   DistributedDataParallel: every rank holds the whole model; gradients are all-reduced
    fsdp  torch.distributed.fsdp.fully_shard (FSDP2): parameters, gradients and optimizer state
          sharded over the ranks as DTensors, one unit per transformer block plus the root
          (embedding, final norm, head); with bf16, parameters are gathered and gradients
          reduced in bf16, the sharded master weights stay fp32
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from model.model import Transformer

Parallelism = Literal["ddp", "fsdp"]


@dataclass
class Distributed:
    """This process's place in the run: rank, world size, device, and the autocast to use."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: Literal["fp32", "bf16", "fp16"]

    @classmethod
    def from_env(cls, precision: str = "auto") -> Distributed:
        """Join the process group `accelerate launch` (or torchrun) described in the environment."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true")
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        if precision == "auto":
            precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
        return cls(rank, world, local_rank, device, precision)  # type: ignore[arg-type]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean over the ranks of each value."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        if self.world > 1:
            dist.all_reduce(tensor)
            tensor /= self.world
        return tensor.tolist()

    def gather_json(self, value: Any) -> list[Any]:
        """Every rank's value (JSON-able), in rank order: sent as UTF-8 bytes in tensors, never
        pickled (torch's all_gather_object pickles)."""
        if self.world == 1:
            return [value]
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        data = torch.tensor(list(json.dumps(value).encode()), dtype=torch.uint8, device=device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[:len(data)] = data
        parts = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return [json.loads(bytes(p[:int(s.item())].tolist()).decode()) for p, s in zip(parts, sizes)]

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def parallelize(model: Transformer, parallelism: Parallelism, run: Distributed,
                shard_alone: bool = False) -> torch.nn.Module:
    """The model on this rank's device, replicated or sharded over the ranks. One process is left
    as it is, unless `shard_alone` (FSDP2 at world size 1 in a 1-rank process group the caller
    made: bench/gpu.py runs the sharded path on a single GPU)."""
    model = model.to(run.device)
    if run.world == 1 and not (shard_alone and parallelism == "fsdp"):
        return model
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[run.local_rank] if run.device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = run.autocast_dtype
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=dtype) if dtype else MixedPrecisionPolicy()
    for block in model.blocks:  # one unit per block: gathered for its forward, freed after
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)  # the root: embedding, final norm, head
    return model


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module, parallelism: Parallelism, skip: bool) -> Iterator[None]:
    """Accumulate this micro-batch's gradients locally (`skip`), reducing them only on the last."""
    if not skip or not isinstance(model, torch.nn.Module):
        yield
        return
    no_sync = getattr(model, "no_sync", None)
    if no_sync is not None:  # DDP
        with no_sync():
            yield
        return
    set_gradient_sync = getattr(model, "set_requires_gradient_sync", None)
    if set_gradient_sync is not None:  # FSDP2
        set_gradient_sync(False)
        try:
            yield
        finally:
            set_gradient_sync(True)
        return
    yield


def unwrap(model: torch.nn.Module) -> Transformer:
    """The Transformer inside DDP and torch.compile wrappers (FSDP2 shards it in place)."""
    inner: Any = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)
