"""The GPU path in one short run: training, attention kernels, FSDP2, decoding, quantized decoding
and a bf16-vs-fp32 check, each part on its own, one JSON and one table.

On a machine with one CUDA GPU, from the repository root:

    python bench/gpu.py --out gpu.json

It should take 4 to 5 minutes on one H100 (an estimate: no GPU has run it yet; the two compiled
parts are most of it); `--max-seconds 480` (the default) skips the parts not started after 8
minutes, with the reason in the table.

Python packages it needs beyond a bare CUDA machine with torch (bring them as wheels where there
is no network, e.g. `pip download transformers pydantic pyarrow pyyaml -d wheels` on a machine
with one, then `pip install --no-index --find-links wheels transformers pydantic pyarrow pyyaml`):
transformers, pydantic, numpy, pyarrow, safetensors, tokenizers and pyyaml, with what they require
(with transformers 5.25: huggingface-hub, hf-xet, httpx2, httpcore2, h11, anyio, idna, truststore,
kernels, typer, click, rich, pygments, markdown-it-py, mdurl, shellingham, tomlkit, tqdm, regex,
packaging, pydantic-core, annotated-types, annotated-doc, typing-inspection). A dry run in a venv
holding only those and torch's own requirements passes; `meta.packages_beyond_torch` in the JSON
lists them with the versions of the run. Nothing is downloaded: the token shards are written here.

    python bench/gpu.py --dry-run        # every part on the CPU, tiny shapes: 30-60 s on 2 cores
    python bench/gpu.py --parts decode,quant --out gpu-rerun.json   # only some parts again

Without a CUDA device (`make bench` on a CPU machine) it says so and does the dry run. The JSON
goes to `--out` (default bench/results/gpu.json, or gpu-dry-run.json for a dry run), rewritten
after every part, so a run cut short keeps what it measured; it never replaces a file that is not
an earlier result of this script. The exit status is 1 when any part failed.

The parts (a part that fails records its traceback and the run goes on; in a dry run the
GPU-only checks are skipped with the reason printed):

* `flops`: the FLOPs of one training step counted by torch's FlopCounterMode (on the meta device,
  no compute) against `Transformer.flops_per_token`, the formula MFU divides by, for the
  presets small, medium and 1b.
* `train-eager`, `train-compiled`: the `small` preset (seq 1,024, batch 32 x 4 accumulated),
  bf16 autocast, `torch.compile` off and on, run by model/train.py's own `Run` (its model,
  AdamW, gradient clipping, and `TokenShardLoader` over a pack artifact of synthetic token shards
  written here in the pack stage's format: the path `kiln pretrain` runs). Tokens/s over the
  timed steps, MFU (the formula's FLOPs / the device's dense bf16 peak, model/train.py's table:
  H100 and H200 989 TFLOP/s, A100 312; any other device: no MFU, and why), peak memory, the loss
  (it must fall: the shards are a Zipf-distributed token stream in which every token is followed
  by a fixed successor half the time), compiled graphs and graph breaks (no recompiling in the
  timed steps), the SDPA kernels a profiled step ran.
* `hf-eager`, `hf-compiled`: the same steps on transformers' `LlamaForCausalLM` with the same
  shape, the same weights (copied through model/export.py's mapping; the first losses must
  agree), batches and optimizer. The table gives Kiln's tokens/s over it.
* `attention`: which SDPA backend a training step of `small` runs (profiled: flash, memory-
  efficient, cuDNN or math), asserted fused; the step run again with only the flash kernel
  allowed; the same for the GQA shape of the 1b preset.
* `fsdp`: FSDP2 at world size 1 through model/parallel.py (a 1-rank process group: NCCL on the
  GPU, gloo on the CPU): it trains, model/checkpoint.py's sharded checkpoint
  (torch.distributed.checkpoint) saves and loads into a model of other weights, and the weights,
  the optimizer state, the loader position and the next step's loss come back equal.
* `decode`: KV-cache greedy decoding at batch 1 (`generate_tokens`) against transformers'
  `generate` on the model exported by `export_llama`, fp32 (tokens must be identical) and bf16.
* `quant`: the quantize stage's int8 and int4 (round-to-nearest) models, loaded as `kiln
  generate` loads them, decoding on the device, with the matmul kernel each layer used; on a GPU,
  also which of torch's CUDA int8/int4 weight-only kernels exist and agree with dequantizing.
* `correctness`: a reduced shape, its first 50 training steps in bf16 on the GPU against the same
  weights and batches in fp32 on the CPU: every step's loss within 2%.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.model import ModelConfig, Transformer  # noqa: E402
from model.run_spec import TrainConfig  # noqa: E402

BENCH = "bench/gpu.py"  # the mark in every JSON this script writes: only such a file is replaced
PRESETS = ROOT / "configs"


# ------------------------------------------------------------------ sizes


def preset(name: str) -> tuple[ModelConfig, dict]:
    """A preset's model (configs/NAME.yaml: its shape, vocabulary and context) and train section."""
    import yaml

    raw = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    config = ModelConfig(**raw["pretrain"]["model"], vocab_size=raw["tokenizer"]["vocab_size"],
                         seq_len=raw["pack"]["seq_len"])
    return config, raw["pretrain"]["train"]


@dataclass
class Sizes:
    """What each part runs: the preset's shapes on a GPU, tiny ones in a dry run."""

    train: ModelConfig            # the training, attention, FSDP and decoding model
    batch: int
    accum: int
    lr: float
    warmup_steps: int             # untimed steps (the compile happens in the first)
    timed_steps: int
    fsdp_batch: int
    fsdp_steps: int
    check: ModelConfig            # the correctness part's reduced shape
    check_batch: int
    check_steps: int
    prompt: int
    new_tokens: int
    rounds: int
    rows: int                     # rows of synthetic shards per pack
    gqa: ModelConfig              # the attention part's grouped-query shape
    flop_presets: tuple[str, ...] = ("small", "medium", "1b")


def gpu_sizes() -> Sizes:
    small, train = preset("small")
    big, _ = preset("1b")
    return Sizes(train=small, batch=train["batch_size"], accum=train["grad_accum"], lr=train["lr"],
                 warmup_steps=3, timed_steps=10, fsdp_batch=8, fsdp_steps=4,
                 check=ModelConfig(vocab_size=4096, seq_len=256, n_layer=4, n_head=4, n_kv_head=4, d_model=256),
                 check_batch=8, check_steps=50, prompt=32, new_tokens=200, rounds=3, rows=2048, gqa=big)


def dry_sizes() -> Sizes:
    tiny = ModelConfig(vocab_size=512, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64)
    return Sizes(train=tiny, batch=4, accum=2, lr=3e-3, warmup_steps=2, timed_steps=3, fsdp_batch=4, fsdp_steps=3,
                 check=tiny.model_copy(update={"seq_len": 32}), check_batch=4, check_steps=50,
                 prompt=8, new_tokens=24, rounds=2, rows=256, gqa=tiny)


# ------------------------------------------------------------------ the run's context


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    scratch: Path
    dry_run: bool
    _packs: dict = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return "bf16"  # autocast on the GPU; on the CPU too, so that a dry run meets its dtype mismatches

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def pack(self, seq_len: int, vocab_size: int):
        """(store, pack manifest, tokenizer directory) of synthetic shards, written once per shape."""
        key = (seq_len, vocab_size)
        if key not in self._packs:
            self._packs[key] = write_pack(self.scratch / f"store-{seq_len}-{vocab_size}", seq_len, vocab_size,
                                          self.sizes.rows)
        return self._packs[key]


def synthetic_rows(rows: int, seq_len: int, vocab_size: int, seed: int):
    """[rows, seq_len + 1] token ids (never the last id, which is the pad): a Zipf-distributed
    stream (exponent 1.1) where each token is followed by its fixed successor half the time, so the
    loss falls fast from ln(vocab) as a model learns the frequencies, then the successors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = vocab_size - 1
    weights = 1.0 / np.arange(1, ids + 1) ** 1.1
    order = rng.permutation(ids)
    successor = rng.permutation(ids)
    fresh = order[rng.choice(ids, size=(rows, seq_len + 1), p=weights / weights.sum())]
    follow = rng.random((rows, seq_len + 1)) < 0.5
    out = fresh.copy()
    for t in range(1, seq_len + 1):
        out[:, t] = np.where(follow[:, t], successor[out[:, t - 1]], fresh[:, t])
    return out


def write_pack(root: Path, seq_len: int, vocab_size: int, rows: int):
    """A pack artifact in a fresh store, as the pack stage writes one (pipelines/pack.py: `train/`
    and `val/` Parquet shards of one fixed-size list column `tokens`, uint16 while the vocabulary
    fits, the stats the loader reads), and a word-level tokenizer of the same vocabulary (the
    training run reads its token lengths)."""
    import numpy as np
    import pyarrow as pa
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    from storage import ArtifactStore

    store = ArtifactStore(root)
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
    pad = vocab_size - 1
    splits = {"train": synthetic_rows(rows, seq_len, vocab_size, 0),
              "val": synthetic_rows(max(8, rows // 16), seq_len, vocab_size, 1)}

    def build(writer) -> dict:
        for split, data in splits.items():
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(data.astype(dtype).reshape(-1)), seq_len + 1)
            writer.write_parquet(f"{split}/00000-0000.parquet", pa.table({"tokens": tokens}),
                                 use_dictionary=False, write_statistics=False)
        return {"seq_len": seq_len, "row_tokens": seq_len + 1, "vocab_size": vocab_size, "dtype": np.dtype(dtype).name,
                "bos_id": 0, "pad_id": pad, "rows": sum(len(d) for d in splits.values()),
                "rows_per_split": {split: len(d) for split, d in splits.items()}, "synthetic": True}

    fingerprint = f"bench-gpu-{seq_len}-{vocab_size}-{rows}".ljust(64, "0")
    manifest = store.produce("pack", fingerprint, build, config={"synthetic": True}, inputs=[], code_version="bench")
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir(exist_ok=True)
    Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0")).save(
        str(tokenizer_dir / "tokenizer.json"))
    return store, manifest, tokenizer_dir


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def kiln_run(ctx: Context, name: str, config: ModelConfig, train: TrainConfig, on_cpu: bool = False):
    """model/train.py's `Run` over the synthetic shards: the model, optimizer and loader a
    `kiln pretrain` run builds (`on_cpu`: on the CPU whatever the machine has, as
    ACCELERATE_USE_CPU makes it)."""
    from model.run_spec import PretrainData, RunSpec
    from model.train import Run

    store, pack, tokenizer_dir = ctx.pack(config.seq_len, config.vocab_size)
    spec = RunSpec(stage="bench", out_dir=ctx.scratch / name, model=config, train=train,
                   data=PretrainData(store=store.url, pack=pack.fingerprint), tokenizer_dir=tokenizer_dir)
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    with environment(ACCELERATE_USE_CPU="1" if on_cpu or not ctx.cuda else ""):
        return Run(spec)


def train_config(ctx: Context, compile: bool = False, **changes) -> TrainConfig:
    s = ctx.sizes
    values = {"batch_size": s.batch, "grad_accum": s.accum, "lr": s.lr, "warmup_steps": 0,
              "max_steps": s.warmup_steps + s.timed_steps, "precision": ctx.precision, "compile": compile}
    return TrainConfig(**{**values, **changes})


def free_memory(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(ctx: Context, out: dict) -> None:
    if ctx.cuda:
        out["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    else:
        out["peak_memory_gb"] = None
        out["peak_memory_why_none"] = "CPU: no CUDA allocator to ask"


def mfu(ctx: Context, flops_per_token: float, tokens_per_s: float, out: dict) -> None:
    """MFU against the device's dense bf16 peak, from model/train.py's table (the MFU its log prints)."""
    from model.train import PEAK_BF16_FLOPS, _peak_flops

    peak = _peak_flops(ctx.device)
    out["flops_per_token"] = flops_per_token
    if peak is None:
        name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "CPU"
        out["mfu"] = None
        out["mfu_why_none"] = f"{name}: no dense bf16 peak in model/train.py's table ({', '.join(PEAK_BF16_FLOPS)})"
        return
    out["peak_flops"] = peak
    out["mfu"] = round(flops_per_token * tokens_per_s / peak, 4)
    name = torch.cuda.get_device_name(ctx.device)
    if "PCIe" in name or "NVL" in name:
        out["mfu_note"] = f"{name}: the table's figure is the SXM part's; this card's dense bf16 peak is lower"


def timed(ctx: Context, step: Callable[[], float], warmup: int, steps: int,
          after_warmup: Callable[[], None] | None = None) -> tuple[list[float], float, float]:
    """Run `warmup` (at least 1) untimed steps, then `steps` timed ones: (every step's loss, seconds
    of the first step, which holds the compile, seconds of the timed steps)."""
    losses = []
    ctx.sync()
    start = time.perf_counter()
    losses.append(step())
    ctx.sync()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        losses.append(step())
    if after_warmup is not None:
        after_warmup()
    ctx.sync()
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    ctx.sync()
    return losses, first, time.perf_counter() - start


def check(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def loss_falls(out: dict, losses: list[float]) -> None:
    out["losses"] = [round(x, 4) for x in losses]
    out["loss_first"], out["loss_last"] = losses[0], losses[-1]
    check(all(math.isfinite(x) for x in losses), f"a loss is not finite: {losses}")
    check(losses[-1] < losses[0], f"the loss did not fall: {losses[0]:.4f} -> {losses[-1]:.4f}")


# ------------------------------------------------------------------ which SDPA kernel runs

BACKENDS = {  # the aten op SDPA dispatches to -> the backend
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN",
    "aten::_scaled_dot_product_fused_attention_overrideable": "fused (other)",
    "aten::_scaled_dot_product_attention_math": "math",
}


def sdpa_kernels(ctx: Context, fn: Callable[[], Any]) -> dict:
    """Run fn under the profiler: the SDPA backends it dispatched to, and the GPU kernels whose
    names say attention (the evidence)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.cuda else [])
    with profile(activities=activities) as prof:
        fn()
        ctx.sync()
    names = {event.key for event in prof.key_averages()}
    backends = sorted({backend for op, backend in BACKENDS.items() if op in names})
    kernels = sorted(n for n in names if not n.startswith("aten::") and
                     any(word in n.lower() for word in ("flash", "fmha", "attention", "sdpa")))[:8]
    return {"backends": backends, "kernels": kernels}


# ------------------------------------------------------------------ the parts


def part_flops(ctx: Context, out: dict) -> None:
    """FlopCounterMode over one training forward + backward, on the meta device (no memory, no
    compute), against the formula MFU divides by."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    shapes = {name: preset(name)[0] for name in ctx.sizes.flop_presets}
    if ctx.dry_run:
        shapes["dry-run"] = ctx.sizes.train
    for name, config in shapes.items():
        with torch.device("meta"):
            model = Transformer(config).train()
            tokens = torch.zeros(1, config.seq_len, dtype=torch.long)
        # the math backend is plain matmuls, which the counter counts on any device
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            _, loss = model(tokens, tokens)
            loss.backward()
        counted = counter.get_total_flops() / config.seq_len
        formula = model.flops_per_token(config.seq_len)
        out[name] = {"counted_per_token": counted, "formula_per_token": formula, "ratio": round(counted / formula, 4),
                     "params": model.num_params(non_embedding=False), "tied": config.tie_embeddings}
        if not config.tie_embeddings:
            out[name]["note"] = ("untied: the formula's 6N counts the embedding table, which no matmul multiplies "
                                 f"({6 * config.vocab_size * config.d_model / formula:.1%} of it)")
    for name, row in out.items():
        tolerance = 0.02 if row["tied"] else 0.1
        check(abs(row["ratio"] - 1) <= tolerance, f"{name}: counted FLOPs / formula = {row['ratio']}")
    out["summary"] = ", ".join(f"{name} {row['ratio']:.3f}" for name, row in out.items() if isinstance(row, dict)) \
        + " (counted / formula)"


def train_kiln(ctx: Context, out: dict, compile: bool) -> None:
    s = ctx.sizes
    free_memory(ctx)
    from torch._dynamo.utils import counters

    if compile:
        torch._dynamo.reset()
        counters.clear()
    run = kiln_run(ctx, "train-compiled" if compile else "train-eager", s.train, train_config(ctx, compile))
    out.update(device=str(run.dist.device), precision=run.dist.precision, compile=compile, batch=s.batch,
               grad_accum=s.accum, seq_len=s.train.seq_len, params=run.raw_model.num_params(False),
               loader="TokenShardLoader over a synthetic pack artifact")
    check(run.dist.device.type == ctx.device.type, f"the run is on {run.dist.device}, not {ctx.device}")
    tokens_per_step = s.batch * s.accum * s.train.seq_len

    def step() -> float:
        return run._optimizer_step()[0]

    graphs: dict[str, int] = {}
    losses, first, seconds = timed(ctx, step, s.warmup_steps, s.timed_steps,
                                   after_warmup=lambda: graphs.update(warm=counters["stats"]["unique_graphs"]))
    out["first_step_s"] = round(first, 2)
    out["tokens_per_s"] = round(tokens_per_step * s.timed_steps / seconds, 1)
    mfu(ctx, run.raw_model.flops_per_token(s.train.seq_len), out["tokens_per_s"], out)
    peak_memory(ctx, out)
    if compile:
        out["compiled_graphs"] = counters["stats"]["unique_graphs"]
        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["graph_break_reasons"] = sorted(counters["graph_break"])[:5]
        out["graphs_compiled_in_timed_steps"] = counters["stats"]["unique_graphs"] - graphs["warm"]
    # one more step, profiled: which attention kernels the training step really runs
    out["attention"] = sdpa_kernels(ctx, step)
    loss_falls(out, losses)
    if compile:
        check(out["graphs_compiled_in_timed_steps"] == 0,
              f"{out['graphs_compiled_in_timed_steps']} graphs compiled during the timed steps: it recompiles")
    memory = f", peak {out['peak_memory_gb']} GB" if out["peak_memory_gb"] is not None else ""
    mfu_text = f"MFU {out['mfu']:.1%}" if out["mfu"] is not None else "MFU n/a"
    out["summary"] = (f"{out['tokens_per_s']:,.0f} tok/s, {mfu_text}{memory}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
                      + (f", {out['compiled_graphs']} graphs, {out['graph_breaks']} breaks, "
                         f"first step {first:.0f} s" if compile else ""))


def part_train_eager(ctx: Context, out: dict) -> None:
    train_kiln(ctx, out, compile=False)


def part_train_compiled(ctx: Context, out: dict) -> None:
    train_kiln(ctx, out, compile=True)


def train_hf(ctx: Context, out: dict, compile: bool) -> None:
    """LlamaForCausalLM, Kiln's weights copied in, the same batches, optimizer and step as `Run`'s."""
    import transformers

    from bench.train import adamw, hf_loss, hf_parameter_groups, hf_twin
    from model.data import TokenShardLoader
    from model.train import _seed_everything, lr_at

    transformers.logging.set_verbosity_error()
    s = ctx.sizes
    free_memory(ctx)
    if compile:
        torch._dynamo.reset()
    train = train_config(ctx, compile)
    _seed_everything(train.seed)  # as Run seeds before it builds its model: the same initial weights
    ours = Transformer(s.train).train()
    hf = hf_twin(ours).train()
    groups = hf_parameter_groups(ours, hf, train.weight_decay)  # before .to(): it matches by storage
    hf.to(ctx.device)
    optimizer = adamw(groups, train)
    store, pack, _ = ctx.pack(s.train.seq_len, s.train.vocab_size)
    batches = iter(TokenShardLoader(store, pack, split="train", batch_size=s.batch, seed=train.seed))
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16)
    # the same start: Kiln's and HF's loss on the first batch, same weights, under the same autocast
    x, y = (t.to(ctx.device) for t in next(TokenShardLoader(store, pack, split="train", batch_size=s.batch,
                                                            seed=train.seed)))
    ours.to(ctx.device)
    with torch.no_grad(), autocast:
        kiln_first, hf_first = ours(x, y)[1].item(), hf_loss(hf, x, y).item()
    out["first_loss"] = {"kiln": kiln_first, "hf": hf_first}
    check(abs(kiln_first - hf_first) <= 0.01 * abs(kiln_first),
          f"Kiln and HF start from different losses: {kiln_first:.4f} vs {hf_first:.4f}")
    ours.cpu()  # off the device before HF's steps are measured
    free_memory(ctx)
    # a dry run compiles the peer with aot_eager: dynamo's capture and AOT autograd without inductor's
    # C++ build of a second model's kernels (~20 s of a ~50 s run on 2 cores); Kiln's own part uses inductor
    backend = "aot_eager" if compile and ctx.dry_run else "inductor"
    if compile and ctx.dry_run:
        out.setdefault("skipped_checks", {})["inductor for transformers' model"] = \
            "the dry run compiles it with aot_eager (no C++ build, ~20 s saved); train-compiled uses inductor"
    model = torch.compile(hf, backend=backend) if compile else hf
    state = {"step": 0}

    def step() -> float:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(state["step"], train)
        model.train()
        total = 0.0
        for _ in range(train.grad_accum):
            inputs, targets = (t.to(ctx.device) for t in next(batches))
            with autocast:
                loss = hf_loss(model, inputs, targets)
            (loss / train.grad_accum).backward()
            total += loss.detach().float().item() / train.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return total

    losses, first, seconds = timed(ctx, step, s.warmup_steps, s.timed_steps)
    tokens_per_step = s.batch * s.accum * s.train.seq_len
    out.update(transformers=transformers.__version__, compile=compile, attn_implementation="sdpa",
               compile_backend=backend if compile else None,
               first_step_s=round(first, 2), tokens_per_s=round(tokens_per_step * s.timed_steps / seconds, 1))
    mfu(ctx, ours.flops_per_token(s.train.seq_len), out["tokens_per_s"], out)  # the same model, the same FLOPs
    peak_memory(ctx, out)
    loss_falls(out, losses)
    mfu_text = f"MFU {out['mfu']:.1%}" if out["mfu"] is not None else "MFU n/a"
    memory = f", peak {out['peak_memory_gb']} GB" if out["peak_memory_gb"] is not None else ""
    out["summary"] = f"{out['tokens_per_s']:,.0f} tok/s, {mfu_text}{memory}, loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def part_hf_eager(ctx: Context, out: dict) -> None:
    train_hf(ctx, out, compile=False)


def part_hf_compiled(ctx: Context, out: dict) -> None:
    train_hf(ctx, out, compile=True)


def part_attention(ctx: Context, out: dict) -> None:
    """The SDPA backend a training step (forward and backward) of the training shape runs, and the
    1b preset's grouped-query shape in one attention layer; asserted fused, then run with the flash
    kernel alone allowed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from model.data import TokenShardLoader
    from model.model import Attention, rope_tables

    s = ctx.sizes
    free_memory(ctx)
    torch.manual_seed(0)
    model = Transformer(s.train).to(ctx.device).train()
    store, pack, _ = ctx.pack(s.train.seq_len, s.train.vocab_size)
    x, y = (t.to(ctx.device)[:max(1, s.batch // 4)] for t in next(TokenShardLoader(store, pack, batch_size=s.batch)))
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16)

    def model_step() -> None:
        with autocast:
            _, loss = model(x, y)
        loss.backward()

    layer_config = s.gqa
    layer = Attention(layer_config, 0).to(ctx.device)
    h = torch.randn(1, layer_config.seq_len, layer_config.d_model, device=ctx.device, requires_grad=True)
    cos, sin = (t.to(ctx.device) for t in rope_tables(layer_config.head_dim, layer_config.seq_len,
                                                      layer_config.rope_theta))

    def layer_step() -> None:
        with autocast:
            out_ = layer(h, cos, sin)
        out_.float().sum().backward()

    shapes = {"train": (model_step, f"{s.train.n_head} heads, {s.train.n_kv_head} kv heads, seq {s.train.seq_len}"),
              "gqa": (layer_step, (f"{layer_config.n_head} heads, {layer_config.n_kv_head} kv heads, "
                                   f"seq {layer_config.seq_len}"))}
    fused = {"flash", "flash (CPU)", "memory-efficient", "cuDNN", "fused (other)"}
    for name, (fn, what) in shapes.items():
        fn()  # warm: the profile shows the steady state
        seen = sdpa_kernels(ctx, fn)
        out[name] = {"shape": what, **seen}
        if ctx.cuda:
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    fn()
                ctx.sync()
                out[name]["flash_only_runs"] = True
            except RuntimeError as err:
                out[name]["flash_only_runs"] = False
                out[name]["flash_only_error"] = str(err).strip().splitlines()[0][:300]
        else:
            out.setdefault("skipped_checks", {})[f"{name}: flash kernel alone"] = \
                "the CUDA flash kernel needs a GPU (the CPU has its own flash kernel, profiled above)"
    for name in shapes:
        check(bool(out[name]["backends"]), f"{name}: no SDPA op seen in the profile")
        check(set(out[name]["backends"]) <= fused, f"{name}: SDPA ran {out[name]['backends']}, not a fused kernel")
        if ctx.cuda:
            check(out[name]["flash_only_runs"], f"{name}: the flash kernel alone does not run: "
                                                f"{out[name].get('flash_only_error')}")
    out["summary"] = "; ".join(f"{name}: {'+'.join(out[name]['backends'])}"
                               + (f", flash alone {'runs' if out[name]['flash_only_runs'] else 'FAILS'}"
                                  if ctx.cuda else "") for name in shapes)


def part_fsdp(ctx: Context, out: dict) -> None:
    """FSDP2 at world size 1 through model/parallel.py, and a sharded checkpoint round trip."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torch.distributed.tensor import DTensor

    from model.checkpoint import full_model_state, load_training_checkpoint, save_training_checkpoint
    from model.data import TokenShardLoader
    from model.model import parameter_groups
    from model.parallel import Distributed, parallelize

    s = ctx.sizes
    free_memory(ctx)
    backend = "nccl" if ctx.cuda else "gloo"
    if not ctx.cuda:
        out.setdefault("skipped_checks", {})["nccl"] = "NCCL needs a GPU: the same path over gloo instead"
    train = train_config(ctx)
    store, pack, _ = ctx.pack(s.train.seq_len, s.train.vocab_size)
    with environment(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", ACCELERATE_USE_CPU="" if ctx.cuda else "1"):
        run = Distributed.from_env(ctx.precision)
    dist.init_process_group(backend, init_method=f"file://{ctx.scratch / 'fsdp-pg'}", rank=0, world_size=1,
                            device_id=run.device if ctx.cuda else None)
    try:
        out.update(backend=dist.get_backend(), world_size=dist.get_world_size(), device=str(run.device),
                   precision=run.precision)

        def sharded(seed: int):
            torch.manual_seed(seed)
            model = parallelize(Transformer(s.train), "fsdp", run, shard_alone=True)
            optimizer = torch.optim.AdamW(parameter_groups(model, train.weight_decay), lr=train.lr,
                                          betas=(train.beta1, train.beta2), fused=False)
            return model, optimizer

        def step(model, optimizer, batch) -> float:
            inputs, targets = (t.to(run.device) for t in batch)
            with run.autocast():
                _, loss = model(inputs, targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        model, optimizer = sharded(0)
        weight = model.blocks[0].attn.q_proj.weight
        out["sharded"] = isinstance(weight, DTensor)
        check(out["sharded"], f"the blocks' weights are {type(weight).__name__}, not DTensors: not sharded")
        loader = TokenShardLoader(store, pack, split="train", batch_size=s.fsdp_batch, seed=train.seed)
        ctx.sync()
        start = time.perf_counter()
        losses = [step(model, optimizer, next(loader)) for _ in range(s.fsdp_steps)]
        ctx.sync()
        out["tokens_per_s"] = round(s.fsdp_steps * s.fsdp_batch * s.train.seq_len / (time.perf_counter() - start), 1)
        loss_falls(out, losses)
        start = time.perf_counter()
        path = save_training_checkpoint(ctx.scratch / "fsdp", s.fsdp_steps, model, optimizer, run,
                                        loaders=run.gather_json(loader.state_dict()), keep=1)
        out["save_s"] = round(time.perf_counter() - start, 2)
        out["checkpoint_files"] = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        after = next(loader)

        restored, restored_optimizer = sharded(1)  # other weights: the load must replace them all
        start = time.perf_counter()
        state = load_training_checkpoint(path, restored, restored_optimizer, run)
        out["load_s"] = round(time.perf_counter() - start, 2)
        mine, theirs = full_model_state(model), full_model_state(restored)
        out["weights_equal"] = mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        mine_opt, theirs_opt = get_state_dict(model, optimizer, options=full)[1], \
            get_state_dict(restored, restored_optimizer, options=full)[1]
        out["optimizer_equal"] = all(torch.equal(torch.as_tensor(value), torch.as_tensor(theirs_opt["state"][fqn][key]))
                                     for fqn, values in mine_opt["state"].items() for key, value in values.items())
        resumed = TokenShardLoader(store, pack, split="train", batch_size=s.fsdp_batch, seed=train.seed)
        resumed.load_state_dict(state["loader"])
        out["loader_resumes"] = state["step"] == s.fsdp_steps and all(
            torch.equal(a, b) for a, b in zip(next(resumed), after))
        next_loss, next_restored = step(model, optimizer, after), step(restored, restored_optimizer, after)
        out["next_loss"] = {"trained": next_loss, "restored": next_restored}
        check(out["weights_equal"], "the weights loaded from the sharded checkpoint differ from the saved ones")
        check(out["optimizer_equal"], "the optimizer state loaded from the sharded checkpoint differs")
        check(out["loader_resumes"], "the loader position did not come back")
        check(abs(next_loss - next_restored) <= 1e-6 * abs(next_loss),
              f"the next step's loss differs after the round trip: {next_loss} vs {next_restored}")
        out["round_trip_equal"] = True
        out["summary"] = (f"{backend}, world 1, sharded; {out['tokens_per_s']:,.0f} tok/s; checkpoint saved in "
                          f"{out['save_s']} s, loaded in {out['load_s']} s: "
                          "weights, optimizer, loader and next loss equal")
    finally:
        dist.destroy_process_group()
        free_memory(ctx)


def decode_model(ctx: Context) -> tuple[ModelConfig, Path]:
    """The decoding model, saved as a checkpoint: the training shape with large weights (init_std
    0.3, as bench/train.py does) so that greedy choices vary rather than repeat one token."""
    from model.checkpoint import save_checkpoint

    config = ctx.sizes.train.model_copy(update={"init_std": 0.3})
    directory = ctx.scratch / "decode-checkpoint"
    if not directory.exists():
        torch.manual_seed(0)
        save_checkpoint(directory, Transformer(config), config)
    return config, directory


def prompt_ids(ctx: Context) -> list[int]:
    config = ctx.sizes.train
    return synthetic_rows(1, ctx.sizes.prompt, config.vocab_size, 2)[0, :ctx.sizes.prompt].tolist()


def best_rates(ctx: Context, contenders: dict[str, Callable[[], None]], work: float) -> dict[str, float]:
    """Best tokens/s of each contender over the rounds, the order flipping every round (bench/train.py's way)."""
    from bench.train import alternate

    def synced(fn):
        def run():
            fn()
            ctx.sync()
        return run

    rates = alternate({name: synced(fn) for name, fn in contenders.items()}, ctx.sizes.rounds, work)
    return {name: round(max(r["wall"]), 1) for name, r in rates.items()}


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode_against_hf(ctx: Context, checkpoint: Path, exported: Path, dtype: torch.dtype, prompt: list[int],
                      sampling) -> tuple[dict, list[int]]:
    """Kiln's model loaded as `kiln generate` loads it, and HF's from the export, both in `dtype`:
    best tokens/s of each and whether the greedy tokens are the same."""
    from transformers import AutoModelForCausalLM

    from model.checkpoint import load_checkpoint
    from model.generate import generate_tokens

    n = sampling.max_new_tokens
    ours = load_checkpoint(checkpoint, ctx.device)[0].to(dtype)
    hf = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="sdpa", dtype=dtype).to(ctx.device).eval()
    input_ids = torch.tensor([prompt], device=ctx.device)
    outputs: dict[str, list[int]] = {}

    def run_ours():
        outputs["kiln"] = list(generate_tokens(ours, prompt, sampling))

    def run_hf():
        with torch.no_grad():
            ids = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        outputs["hf"] = ids[0, len(prompt):].tolist()

    run_ours()  # warm-up
    run_hf()
    rates = best_rates(ctx, {"kiln": run_ours, "hf": run_hf}, n)
    differs = first_difference(outputs["kiln"], outputs["hf"])
    return {"kiln_tokens_per_s": rates["kiln"], "hf_tokens_per_s": rates["hf"],
            "ratio": round(rates["kiln"] / rates["hf"], 3), "identical": differs is None,
            "first_difference": differs, "distinct_tokens": len(set(outputs["kiln"]))}, outputs["kiln"]


def part_decode(ctx: Context, out: dict) -> None:
    """`generate_tokens` (KV cache, greedy, batch 1) against HF `generate` on the exported model."""
    import transformers

    from model.export import export_llama
    from model.generate import SamplingConfig

    transformers.logging.set_verbosity_error()
    free_memory(ctx)
    _, checkpoint = decode_model(ctx)
    exported = export_llama(checkpoint, ctx.scratch / "decode-hf")
    prompt, n = prompt_ids(ctx), ctx.sizes.new_tokens
    sampling = SamplingConfig(max_new_tokens=n, temperature=0)
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        out[dtype_name], tokens = decode_against_hf(ctx, checkpoint, exported, dtype, prompt, sampling)
        if dtype_name == "fp32":
            out["kiln_tokens"] = tokens
        free_memory(ctx)
    out.update(new_tokens=n, prompt_tokens=len(prompt), transformers=transformers.__version__)
    check(out["fp32"]["identical"], f"fp32 greedy tokens differ from HF's at token {out['fp32']['first_difference']}")
    check(out["fp32"]["distinct_tokens"] > 1, "greedy decoding repeats one token: the comparison says little")
    out["summary"] = "; ".join(
        f"{d} {out[d]['kiln_tokens_per_s']:,.0f} vs {out[d]['hf_tokens_per_s']:,.0f} tok/s ({out[d]['ratio']:.2f}x), "
        + ("identical" if out[d]["identical"] else f"differs at {out[d]['first_difference']}")
        for d in ("fp32", "bf16"))


def probe_cuda_kernels(ctx: Context, out: dict) -> None:
    """Which of torch's CUDA weight-only int8 / int4 kernels exist here, agree with dequantizing
    Kiln's stored form, and how fast one batch-1 matmul is against dense bf16."""
    import torch.nn.functional as F

    from model.quantization import quantize_int4, quantize_int8

    torch.manual_seed(0)
    rows, columns = 4 * 1024, 4 * 1024
    w = torch.randn(rows, columns, device=ctx.device) * 0.02
    x = torch.randn(1, columns, device=ctx.device, dtype=torch.bfloat16)

    def timing(fn) -> float:
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        return round(start.elapsed_time(end) / 50 * 1000, 1)  # microseconds

    dense = w.to(torch.bfloat16)
    out["shape"] = [rows, columns]
    out["dense_bf16_us"] = timing(lambda: F.linear(x, dense))
    q8 = quantize_int8(w)
    q4 = quantize_int4(w, 128)
    ints = q4.integers().to(torch.uint8)
    candidates = {  # name: (op, a function that returns the matmul to call, the dequantized reference)
        "int8: torch._weight_int8pack_mm": (
            "aten::_weight_int8pack_mm", lambda: lambda: torch._weight_int8pack_mm(x, q8.values, q8.scales.to(x.dtype)),
            q8),
        "int4: aten._weight_int4pack_mm": ("aten::_weight_int4pack_mm", lambda: _int4_kernel(x, ints, q4), q4),
    }
    for name, (op, make, weight) in candidates.items():
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        row: dict[str, Any] = {"op": op, "cuda_kernel_registered": registered}
        try:
            fn = make()  # the int4 kernel's packing may refuse this GPU already
            got, expected = fn().float(), x.float() @ weight.dequantize().t()
            error = float((got - expected).abs().max() / expected.abs().max())
            row.update(runs=True, relative_error=round(error, 5), agrees=error < 2e-2, microseconds=timing(fn))
        except Exception as err:  # noqa: BLE001 - a kernel missing or refusing this GPU is the finding
            row.update(runs=False, error=f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}")
        out[name] = row


def _int4_kernel(x: torch.Tensor, ints: torch.Tensor, q4) -> Callable[[], torch.Tensor]:
    """torch's tinygemm int4 kernel on Kiln's int4 weight: the same (q - 8) * scale + zero form;
    values repacked two a byte with the even column in the high nibble, as the CUDA packer takes them."""
    packed = torch.ops.aten._convert_weight_to_int4pack((ints[:, ::2] << 4 | ints[:, 1::2]).contiguous(), 8)
    scales_and_zeros = torch.stack([q4.scales, q4.zeros], dim=-1).transpose(0, 1).contiguous().to(x.dtype)
    group = q4.group_size
    return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, scales_and_zeros)


def part_quant(ctx: Context, out: dict) -> None:
    """The quantize stage's int8 and int4-rtn models (model/quantize.py), written and loaded as a
    quantize artifact's model is (`load_checkpoint`), decoding on the device."""
    from model.checkpoint import load_checkpoint, write_model
    from model.generate import SamplingConfig, generate_tokens
    from model.quantization import QuantizedLinear
    from model.quantize import quantize_model, quantized_state

    free_memory(ctx)
    config, checkpoint = decode_model(ctx)
    prompt, n = prompt_ids(ctx), ctx.sizes.new_tokens
    sampling = SamplingConfig(max_new_tokens=n, temperature=0)
    dense = load_checkpoint(checkpoint, ctx.device)[0]
    reference = list(generate_tokens(dense, prompt, sampling))

    def decoder(model) -> Callable[[], None]:
        return lambda: list(generate_tokens(model, prompt, sampling))

    contenders = {"fp32": decoder(dense)}
    for method in ("int8", "int4-rtn"):
        source = load_checkpoint(checkpoint)[0]
        weights, _ = quantize_model(source, method, 128)
        directory = ctx.scratch / f"quant-{method}"
        directory.mkdir(exist_ok=True)
        spec = {"method": method, "bits": 8 if method == "int8" else 4, "group_size": None if method == "int8" else 128,
                "layers": sorted(weights), "source": "bench"}
        write_model(directory, quantized_state(source, weights), config, extra={"quantization": spec})
        model = load_checkpoint(directory, ctx.device)[0]
        tokens = list(generate_tokens(model, prompt, sampling))
        out[method] = {"kernels": dict(Counter(m.kernel for m in model.modules() if isinstance(m, QuantizedLinear))),
                       "first_difference_from_fp32": first_difference(tokens, reference)}
        contenders[method] = decoder(model)
    rates = best_rates(ctx, contenders, n)
    for name, rate in rates.items():
        out.setdefault(name, {})["tokens_per_s"] = rate
    if ctx.cuda:
        probe_cuda_kernels(ctx, out.setdefault("cuda_kernels", {}))
        usable = [name for name, row in out["cuda_kernels"].items() if isinstance(row, dict) and row.get("agrees")]
        out["cuda_kernels_usable"] = usable
        if all(out[m]["kernels"].keys() == {"dequantize"} for m in ("int8", "int4-rtn")):
            out["note"] = ("QuantizedLinear switches to torch's packed kernels on the CPU only: on the GPU every "
                           "quantized layer dequantized its weight for each matmul")
    else:
        out.setdefault("skipped_checks", {})["CUDA int8/int4 kernels"] = \
            "torch's CUDA weight-only kernels need a GPU; the CPU's packed kernels ran instead"
    for method in ("int8", "int4-rtn"):
        check(bool(out[method]["kernels"]), f"{method}: no quantized layer in the loaded model")
    kernels = {m: f" ({', '.join(f'{c} {k}' for k, c in out[m]['kernels'].items())})" for m in ("int8", "int4-rtn")}
    out["summary"] = "; ".join(f"{m} {out[m]['tokens_per_s']:,.0f} tok/s{kernels.get(m, '')}"
                               for m in ("fp32", "int8", "int4-rtn"))
    if ctx.cuda:
        out["summary"] += f"; CUDA kernels that run and agree: {', '.join(out['cuda_kernels_usable']) or 'none'}"


def part_correctness(ctx: Context, out: dict) -> None:
    """The first steps at a reduced shape: bf16 autocast on the device against fp32 on the CPU,
    the same initial weights (Run seeds, then builds the model on the CPU) and the same batches."""
    s = ctx.sizes
    free_memory(ctx)
    train = train_config(ctx, batch_size=s.check_batch, grad_accum=1, max_steps=s.check_steps)
    runs = {"bf16 " + ctx.device.type: kiln_run(ctx, "check-bf16", s.check, train),
            "fp32 cpu": kiln_run(ctx, "check-fp32", s.check, train.model_copy(update={"precision": "fp32"}),
                                 on_cpu=True)}
    if not ctx.cuda:
        out.setdefault("skipped_checks", {})["bf16 on the GPU"] = "no GPU: bf16 autocast on the CPU stands in for it"
    losses = {}
    for name, run in runs.items():
        losses[name] = [run._optimizer_step()[0] for _ in range(s.check_steps)]
        out[name] = {"device": str(run.dist.device), "precision": run.dist.precision}
    (low_name, low), (ref_name, ref) = losses.items()
    gaps = [abs(a - b) / abs(b) for a, b in zip(low, ref)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    out.update(steps=s.check_steps, shape=s.check.to_dict(), max_relative_gap=round(gaps[worst], 5),
               worst_step=worst + 1,
               losses={name: [round(x, 4) for x in values] for name, values in losses.items()})
    check(runs[low_name].dist.device.type == ctx.device.type and runs[ref_name].dist.device.type == "cpu",
          "the runs are not on the devices they were meant for")
    check(ref[-1] < ref[0], f"the fp32 loss did not fall: {ref[0]:.4f} -> {ref[-1]:.4f}")
    check(gaps[worst] <= 0.02, f"step {worst + 1}: {low_name} loss {low[worst]:.4f} vs fp32 {ref[worst]:.4f}")
    out["summary"] = (f"{s.check_steps} steps, worst gap {gaps[worst]:.2%} at step {worst + 1} "
                      f"(loss {ref[0]:.3f} -> {ref[-1]:.3f})")


PARTS: dict[str, Callable[[Context, dict], None]] = {
    "flops": part_flops,
    "train-eager": part_train_eager,
    "train-compiled": part_train_compiled,
    "hf-eager": part_hf_eager,
    "attention": part_attention,
    "fsdp": part_fsdp,
    "decode": part_decode,
    "quant": part_quant,
    "correctness": part_correctness,
    "hf-compiled": part_hf_compiled,   # last: the longest compile, the least needed figure
}


# ------------------------------------------------------------------ report


def ratios(parts: dict) -> dict:
    """Kiln's training tokens/s over HF's, for every pair that ran."""
    out = {}
    pairs = {"kiln_compiled_vs_hf_eager": ("train-compiled", "hf-eager"),
             "kiln_eager_vs_hf_eager": ("train-eager", "hf-eager"),
             "kiln_compiled_vs_hf_compiled": ("train-compiled", "hf-compiled")}
    for name, (ours, theirs) in pairs.items():
        a, b = parts.get(ours, {}), parts.get(theirs, {})
        if a.get("tokens_per_s") and b.get("tokens_per_s"):
            out[name] = round(a["tokens_per_s"] / b["tokens_per_s"], 3)
    return out


def table(result: dict) -> str:
    rows = [f"{'part':<16} {'status':<8} {'seconds':>8}  figures"]
    for name, part in result["parts"].items():
        figures = part.get("summary") or part.get("reason") or part.get("error", "")
        rows.append(f"{name:<16} {part['status']:<8} {part.get('seconds', 0):>8.1f}  {figures}")
        for check_name, why in part.get("skipped_checks", {}).items():
            rows.append(f"{'':<16} {'':<8} {'':>8}  - skipped {check_name}: {why}")
    if result.get("ratios"):
        rows.append("training tokens/s, Kiln / transformers: " +
                    ", ".join(f"{k.replace('_', ' ')} {v:.2f}x" for k, v in result["ratios"].items()))
    failed = [n for n, p in result["parts"].items() if p["status"] == "failed"]
    rows.append(f"{result['meta']['device']}: " + (f"FAILED {', '.join(failed)}" if failed else "no part failed"))
    return "\n".join(rows)


IMPORTS = ("transformers", "pydantic", "numpy", "pyarrow", "safetensors", "tokenizers", "pyyaml")  # beyond torch


def packages_beyond_torch() -> dict[str, str]:
    """The distributions to bring to a bare CUDA machine with torch, with the versions here: what
    this script imports beyond torch (and Kiln's own code), with everything they require, less what
    torch itself requires. (A dry run in a venv holding only these and torch's own passes.)"""
    import re
    from importlib import metadata

    from packaging.markers import Marker

    def requirements(roots) -> set[str]:
        seen, todo = set(), list(roots)
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            for line in metadata.requires(name) or []:
                if ";" in line and not Marker(line.split(";", 1)[1]).evaluate({"extra": ""}):
                    continue
                todo.append(re.split(r"[ ;<>=!\[~(]", line)[0].lower().replace("_", "-"))
        return seen

    needed = requirements(IMPORTS) - requirements(["torch"])
    return {name: metadata.version(name) for name in sorted(needed)}


def check_out_path(path: Path) -> None:
    """Refuse to replace anything but an earlier result of this script."""
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("bench") != BENCH:
        raise SystemExit(f"{BENCH}: {path} exists and is not an earlier result of {BENCH}; "
                         "not replacing it (choose another --out)")


def write_json(path: Path, result: dict) -> None:
    from storage import atomic_write_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps(result, indent=2, default=str).encode())


def device_meta(device: torch.device) -> dict:
    meta = {"torch": torch.__version__, "python": platform.python_version(), "host_cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
                    memory_gb=round(props.total_memory / 1e9, 1), bf16=torch.cuda.is_bf16_supported())
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every part on the CPU, tiny shapes (what the suite runs)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON (default bench/results/gpu.json, or gpu-dry-run.json for a dry run)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"a comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--max-seconds", type=float, default=480,
                        help="parts not started after this many seconds are skipped (default 480: 8 minutes)")
    args = parser.parse_args(argv)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown:
        parser.error(f"--parts: no part {', '.join(unknown)} (the parts: {', '.join(PARTS)})")
    dry_run = args.dry_run
    if not dry_run and not torch.cuda.is_available():
        print(f"{BENCH}: no CUDA device here: running --dry-run instead (the GPU figures need a GPU)", flush=True)
        dry_run = True
    out_path = args.out or ROOT / "bench" / "results" / ("gpu-dry-run.json" if dry_run else "gpu.json")
    check_out_path(out_path)
    if dry_run:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # model/parallel.py's Distributed then picks the CPU
    device = torch.device("cpu") if dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    result: dict[str, Any] = {"bench": BENCH, "mode": "dry-run" if dry_run else "gpu", "ok": False,
                              "meta": device_meta(device), "parts": {}}
    print(f"{BENCH}: {result['mode']} on {result['meta']['device']}; parts: {', '.join(wanted)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-gpu-") as scratch:
        ctx = Context(device=device, sizes=dry_sizes() if dry_run else gpu_sizes(), scratch=Path(scratch),
                      dry_run=dry_run)
        for name in wanted:
            part: dict[str, Any] = {}
            elapsed = time.perf_counter() - started
            if elapsed > args.max_seconds:
                part.update(status="skipped", reason=f"the time budget (--max-seconds {args.max_seconds:.0f}) was "
                                                     f"spent before this part ({elapsed:.0f} s)")
            else:
                part_start = time.perf_counter()
                try:
                    PARTS[name](ctx, part)
                    part["status"] = "ok"
                except Exception as err:  # noqa: BLE001 - one part failing must not stop the others
                    part.update(status="failed", error=f"{type(err).__name__}: {str(err).strip()[:500]}",
                                traceback=traceback.format_exc())
                    print(part["traceback"], file=sys.stderr, flush=True)
                part["seconds"] = round(time.perf_counter() - part_start, 1)
                with contextlib.suppress(Exception):  # the part's models go: compiled code holds them too
                    torch._dynamo.reset()
                    free_memory(ctx)
            # the status first, then the figures, for whoever reads the JSON
            result["parts"][name] = {"status": part.pop("status"), **part}
            line = result["parts"][name]
            print(f"[{name}] {line['status']} ({line.get('seconds', 0):.1f} s): "
                  f"{line.get('summary') or line.get('reason') or line.get('error', '')}", flush=True)
            for check_name, why in line.get("skipped_checks", {}).items():
                print(f"[{name}]   skipped {check_name}: {why}", flush=True)
            result["ratios"] = ratios(result["parts"])
            result["seconds"] = round(time.perf_counter() - started, 1)
            write_json(out_path, result)
    failed = [n for n, p in result["parts"].items() if p["status"] == "failed"]
    result.update(ok=not failed, failed=failed, seconds=round(time.perf_counter() - started, 1))
    with contextlib.suppress(Exception):  # a finding about the machine, never a failure
        result["meta"]["packages_beyond_torch"] = packages_beyond_torch()
    result["table"] = table(result)
    write_json(out_path, result)
    print()
    print(result["table"])
    print(f"{result['seconds']:.0f} s; wrote {out_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
