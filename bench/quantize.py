"""Quantization side by side: fp32, int8, int4 by round-to-nearest and int4 by AWQ.

    python bench/quantize.py [--data-dir DATA] [--model dpo] [--group-size 128] [--new-tokens 200]
                             [--evaluate-repeats 3] [--quick] [--out bench/results/quantize.json]

DATA is a Kiln data directory that holds a trained model with its pack and tokenizer: the one
`kiln run` leaves, or a larger model (`kiln pretrain --data-dir DATA --set pretrain.model...`).
Without `--data-dir`: ./data (or $KILN_DATA) when it holds a `--model` model, else one trained
here first in a scratch directory as tests/model/conftest.py's `trained` fixture trains one
(`kiln run`'s tiny shape: 4 layers of d128, 128 tokens of context, a 2048-token BPE; 400 steps
on the reference manual's topics that ship with Python, about a minute), measured as a pretrain
model.
The quantize stage builds int8, int4-rtn and int4-awq from the newest `--model` artifact (cached
in DATA like any stage), then each of the four models is measured in a fresh process of its own:

* held-out perplexity: Kiln's val_ppl over the pack's `val` rows, without the last
  `calibration_rows` rows (AWQ calibrates on those);
* weights on disk (`model/model.safetensors`), as a ratio of fp32's;
* decode tokens/s: KV-cache greedy decoding, batch 1, `--new-tokens` after a 32-token prompt,
  best of 3, with the matmul each quantized layer runs at batch 1 (torch's packed kernel or
  dequantize);
* memory: the bytes of the tensors the loaded model holds (the int4 kernel's packed copy
  included), and the process's peak resident set (imports, evaluate, load, perplexity, decoding;
  torch, pyarrow and tokenizers alone hold ~430 MB, which is most of it at these sizes).

The evaluate stage, what `kiln evaluate` (`--set evaluate.model=quantize` for a quantized model)
runs: `evaluate.STAGE.run(config, inputs, store, force=True)` (its artifact in DATA rebuilt) with
the stage's default settings (50 batches of 16 held-out rows, 200 multiple-choice questions, a
sample), each run in a fresh process (its checkpoint load included; the first one before the
measurements above, in the same process), the four models in turn `--evaluate-repeats` times, so
that load from other processes on the machine hits them alike; best time of each, and the
figure: quantized evaluate time / fp32 evaluate time.

Then matmuls on square random matrices of 128 to 4096 over row counts (tokens in the batch) 1
to 4096 (to 256 at 4096): fp32 `F.linear`, and `QuantizedLinear` int8 and int4 by torch's
packed CPU kernels and by dequantizing the weight for the call and a plain matmul (the packed
kernel is no longer timed once it takes 4x dequantizing's time: its time grows with the rows);
the crossover (the fewest rows from which dequantizing is faster) is what
`model.quantization.PACKED_KERNEL_MAX_ROWS` is set from.

`--quick` (what the test suite runs, tests/model/test_quantize.py): 32 calibration rows, 32 new
tokens, the evaluate stage on 2 batches, 16 questions and a 16-token sample, once each, and the
matmuls at 128 and 256 only; without `--data-dir`, the fixture's shape (2 layers, 64 tokens of
context, a 512-token BPE) trained 60 steps.

Goals: int8 perplexity within 1% of fp32; AWQ's increase at most half of RTN's at the same group
size; int4 weights <= 0.3x fp32's on disk (issue 14); a quantized model's evaluate at most 2x the
fp32 one's (issue 17).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402

METHODS = ("int8", "int4-rtn", "int4-awq")


def weight_bytes(model) -> int:
    """Bytes of the tensors the loaded model holds: parameters, buffers and the int4 kernel's own
    packed copy (each storage once; a tied head shares the embedding's)."""
    kernel_copies = (getattr(m, name, None) for m in model.modules() for name in ("_packed", "_scales_and_zeros"))
    tensors = [*model.parameters(), *model.buffers(), *(t for t in kernel_copies if t is not None)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure(data: Path, fingerprint: str, stage: str, pack_fp: str, tok_fp: str, calibration: int,
            new_tokens: int, quick: bool) -> dict:
    """One model, in this (fresh) process: the evaluate stage first, as a `kiln evaluate` process
    runs it, then perplexity, decode speed, peak memory."""
    evaluated = time_evaluate(data, fingerprint, stage, pack_fp, tok_fp, quick)
    import torch
    from tokenizers import Tokenizer

    from model.checkpoint import load_checkpoint
    from model.data import TokenShardLoader
    from model.evaluate import heldout_metrics, token_byte_lengths
    from model.generate import SamplingConfig, generate_tokens
    from model.quantization import QuantizedLinear
    from storage import ArtifactStore

    store = ArtifactStore(data)
    manifest, pack, tok = store.find(fingerprint), store.find(pack_fp), store.find(tok_fp)
    tokenizer = Tokenizer.from_file(str(store.local_path(tok, "tokenizer.json")))
    model, _ = load_checkpoint(store.local_path(manifest, "model"))
    model_bytes = weight_bytes(model)
    model.eval()
    loader = TokenShardLoader(store, pack, split="val", batch_size=1, seed=0, shuffle=False)
    rows = list(itertools.islice(loader, loader.rows_per_epoch))  # one pass over the split, in order
    heldout = rows[:max(len(rows) - calibration, 1)]
    batches = [(torch.cat([r[0] for r in heldout[i:i + 16]]), torch.cat([r[1] for r in heldout[i:i + 16]]))
               for i in range(0, len(heldout), 16)]
    with torch.no_grad():
        metrics = heldout_metrics(model, batches, token_byte_lengths(tokenizer), "cpu")
    prompt = heldout[0][0][0, :32].tolist()
    best, generated = 0.0, []
    for _ in range(3):
        started = time.perf_counter()
        generated = list(generate_tokens(model, prompt, SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)))
        best = max(best, len(generated) / (time.perf_counter() - started))
    kernels = sorted({m.kernel for m in model.modules() if isinstance(m, QuantizedLinear)})
    return {"stage": stage, "fingerprint": fingerprint, "val_ppl": round(metrics["val_ppl"], 4),
            "val_bpb": round(metrics["val_bpb"], 4), "heldout_rows": len(heldout),
            "bytes": (store.local_path(manifest, "model") / "model.safetensors").stat().st_size,
            "decode_tok_s": round(best, 1), "decode_tokens": len(generated), "matmuls": kernels or ["fp32"],
            "model_rss_mb": round(model_bytes / 2**20, 1), "evaluate": evaluated,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def train_here(root: Path, quick: bool) -> None:
    """A tokenizer, a pack and a pretrain artifact in a fresh store at `root` (the `trained`
    fixture's recipe; `kiln run`'s tiny shape unless `quick`)."""
    from bench._trained import train_pretrain_artifact
    from storage import ArtifactStore

    seq_len, layers, vocab, steps = (64, 2, 512, 60) if quick else (128, 4, 2048, 400)
    shape = dict(n_layer=layers, n_head=4, n_kv_head=4, d_model=128)
    train_pretrain_artifact(ArtifactStore(root), seq_len=seq_len, vocab_size=vocab, shape=shape, steps=steps,
                            fingerprint="b" * 64)


def evaluate_settings(model: str, quick: bool):
    """The evaluate stage's config for the model made by stage `model`: its defaults, or fewer with `quick`."""
    from model import evaluate

    extra = {"eval_batches": 2, "mc_questions": 16, "sample_tokens": 16} if quick else {}
    return evaluate.EvaluateConfig(model=model, **extra)


def time_evaluate(data: Path, fingerprint: str, stage: str, pack_fp: str, tok_fp: str, quick: bool) -> dict:
    """The evaluate stage on one model, in this (fresh) process, as `kiln evaluate` runs it."""
    from model import evaluate
    from storage import ArtifactStore

    store = ArtifactStore(data)
    inputs = [store.find(fingerprint), store.find(pack_fp), store.find(tok_fp)]
    started = time.perf_counter()
    done = evaluate.STAGE.run(evaluate_settings(stage, quick), inputs, store, force=True)
    return {"seconds": round(time.perf_counter() - started, 3), "val_ppl": done.stats["val_ppl"],
            "mc_acc": done.stats.get("mc_acc")}


def timed(call, budget: float = 0.2) -> float:
    """Microseconds of the fastest of at least 3 calls (after one more to warm up)."""
    call()
    best, spent, calls = float("inf"), 0.0, 0
    while spent < budget or calls < 3:
        started = time.perf_counter()
        call()
        took = time.perf_counter() - started
        best, spent, calls = min(best, took), spent + took, calls + 1
    return round(best * 1e6, 1)


def matmul_rows(sizes=(128, 256, 1024, 4096), row_counts=(1, 2, 3, 4, 6, 8, 16, 64, 256, 1024, 4096)) -> dict:
    """Microseconds per [rows, n] x [n, n] matmul: fp32, and QuantizedLinear int8 and int4 by
    torch's packed kernel and by dequantizing for the call; per n and bits, the crossover: the
    fewest rows from which dequantizing is faster (None: the packed kernel at every count)."""
    import torch
    import torch.nn.functional as F

    from model.quantization import QuantizedLinear, quantize_int4, quantize_int8

    found: dict = {"us": {}, "crossover_rows": {}}
    for n in sizes:
        weight = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
        layers = {"int8": QuantizedLinear(quantize_int8(weight)), "int4": QuantizedLinear(quantize_int4(weight, 128))}
        packed = {name: layer.use_kernel() != "dequantize" for name, layer in layers.items()}
        crossover: dict[str, int | None] = dict.fromkeys(layers)
        table = found["us"][n] = {}
        for rows in row_counts:
            if rows * n * n > 2**32:  # 4096 x 4096 up to 256 rows
                break
            x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
            row = table[rows] = {"fp32": timed(partial(F.linear, x, weight))}
            for name, layer in layers.items():
                row[f"{name} dequantize"] = timed(partial(layer.dequantized_matmul, x))
                if packed[name]:
                    row[f"{name} packed"] = timed(partial(layer.packed_matmul, x))
                    if row[f"{name} packed"] > row[f"{name} dequantize"] and crossover[name] is None:
                        crossover[name] = rows
                    # its time grows with the rows, dequantizing's hardly: no need to time it further
                    packed[name] = row[f"{name} packed"] < 4 * row[f"{name} dequantize"]
        found["crossover_rows"][n] = crossover
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path,
                        help="a Kiln data directory (default: ./data when it holds the model, else train one here)")
    parser.add_argument("--model", default="dpo", choices=["pretrain", "sft", "dpo"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calibration-rows", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--evaluate-repeats", type=int)
    parser.add_argument("--quick", action="store_true", help="a quick run (the test suite's)")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "quantize.json")
    parser.add_argument("--measure", nargs=4, metavar=("FP", "STAGE", "PACK", "TOKENIZER"), help=argparse.SUPPRESS)
    parser.add_argument("--time-evaluate", nargs=4, metavar=("FP", "STAGE", "PACK", "TOKENIZER"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    calibration = args.calibration_rows or (32 if args.quick else 64)
    new_tokens = args.new_tokens or (32 if args.quick else 200)
    repeats = args.evaluate_repeats or (1 if args.quick else 3)
    if args.measure:
        print(json.dumps(measure(args.data_dir, *args.measure, calibration, new_tokens, args.quick)))
        return
    if args.time_evaluate:
        print(json.dumps(time_evaluate(args.data_dir, *args.time_evaluate, args.quick)))
        return
    if args.data_dir is None and not args.quick:  # what `kiln run` leaves, when it holds the model
        default = Path(os.environ.get("KILN_DATA", "data"))
        if (default / args.model).is_dir() and any((default / args.model).glob("*/_manifest.json")):
            args.data_dir = default
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quantize-") as scratch:
        if args.data_dir is None:
            started = time.perf_counter()
            args.data_dir, args.model = Path(scratch), "pretrain"
            train_here(args.data_dir, args.quick)
            print(f"trained a model here in {time.perf_counter() - started:.0f} s", flush=True)
        run(args, calibration, new_tokens, repeats)


def run(args, calibration: int, new_tokens: int, repeats: int) -> None:
    from model import quantize
    from model.checkpoint import read_config
    from model.quantization import PACKED_KERNEL_MAX_ROWS
    from storage import ArtifactStore

    store = ArtifactStore(args.data_dir)
    if not store.list(args.model):
        sys.exit(f"{args.data_dir}: no {args.model} model (pass --model, or leave --data-dir out to train one here)")
    trained = store.list(args.model)[-1]
    pack, tok = store.list("pack")[-1], store.list("tokenizer")[-1]
    shape = read_config(store.local_path(trained, "model"))
    contenders = [("fp32", trained)]
    for method in METHODS:
        config = quantize.QuantizeConfig(model=args.model, method=method, group_size=args.group_size,
                                         calibration_rows=calibration)
        contenders.append((method, quantize.STAGE.run(config, [trained, pack, tok], store)))
    results: dict = {"model": f"{trained.stage}/{trained.short}", "shape": shape.get("model", shape),
                     "group_size": args.group_size, "quick": args.quick, "runs": {}}

    def child(flag: str, manifest) -> dict:
        command = [sys.executable, __file__, "--data-dir", str(args.data_dir), "--calibration-rows", str(calibration),
                   "--new-tokens", str(new_tokens), *(["--quick"] if args.quick else []),
                   flag, manifest.fingerprint, manifest.stage, pack.fingerprint, tok.fingerprint]
        done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{flag} {manifest.stage}/{manifest.short} failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.splitlines()[-1])

    for name, manifest in contenders:
        results["runs"][name] = child("--measure", manifest)
        if name == "int4-awq":
            results["runs"][name]["awq"] = {k: v for k, v in manifest.stats.get("awq", {}).items() if k != "groups"}
        print(f"{name}: {results['runs'][name]}", flush=True)
    runs = results["runs"]
    evaluate_s = {name: [run_["evaluate"]["seconds"]] for name, run_ in runs.items()}
    for _ in range(repeats - 1):  # the four in turn again, so that a busy moment hits them alike
        for name, manifest in contenders:
            evaluate_s[name].append(child("--time-evaluate", manifest)["seconds"])
    for name, times in evaluate_s.items():
        runs[name]["evaluate"].update(seconds=min(times), all_seconds=times)
    fp32 = runs["fp32"]
    for run_ in runs.values():
        run_["ppl_increase_pct"] = round(100 * (run_["val_ppl"] / fp32["val_ppl"] - 1), 3)
        run_["size_ratio"] = round(run_["bytes"] / fp32["bytes"], 4)
        run_["evaluate_vs_fp32"] = round(run_["evaluate"]["seconds"] / fp32["evaluate"]["seconds"], 3)
    rtn, awq = runs["int4-rtn"]["ppl_increase_pct"], runs["int4-awq"]["ppl_increase_pct"]
    results["int8_within_1pct"] = abs(runs["int8"]["ppl_increase_pct"]) < 1
    results["awq_increase_over_rtn_increase"] = round(awq / rtn, 3) if rtn > 0 else None
    results["int4_size_ratio_max"] = max(runs["int4-rtn"]["size_ratio"], runs["int4-awq"]["size_ratio"])
    results["evaluate_vs_fp32"] = {m: runs[m]["evaluate_vs_fp32"] for m in METHODS}
    results["evaluate_vs_fp32_max"] = max(results["evaluate_vs_fp32"].values())

    print(f"\n{results['model']}: {json.dumps(results['shape'])}, int4 group {args.group_size}")
    print("| model | held-out ppl | vs fp32 | weights on disk | decode tok/s | memory: model / process peak | "
          "evaluate | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run_ in runs.items():
        print(f"| {name} | {run_['val_ppl']:.3f} | {run_['ppl_increase_pct']:+.2f}% | {run_['bytes'] / 2**20:.2f} MB "
              f"({run_['size_ratio']:.2f}x) | {run_['decode_tok_s']:.0f} | {run_['model_rss_mb']:.1f} / "
              f"{run_['peak_rss_mb']} MB | {run_['evaluate']['seconds']:.2f} s | {run_['evaluate_vs_fp32']:.2f}x |")
    print(f"AWQ's increase / RTN's: {results['awq_increase_over_rtn_increase']} (goal <= 0.5); "
          f"int8 within 1%: {results['int8_within_1pct']}; int4 size <= 0.3x: {results['int4_size_ratio_max'] <= 0.3}; "
          f"quantized evaluate / fp32 evaluate: {results['evaluate_vs_fp32_max']:.2f}x at most (goal <= 2)")

    sweep = matmul_rows((128, 256), (1, 2, 4, 8, 64, 1024)) if args.quick else matmul_rows()
    results["matmul_us"], results["crossover_rows"] = sweep["us"], sweep["crossover_rows"]
    results["packed_kernel_max_rows"] = PACKED_KERNEL_MAX_ROWS
    columns = ["fp32", "int8 packed", "int8 dequantize", "int4 packed", "int4 dequantize"]
    print("\n| n x n matrix, rows | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for n, table in sweep["us"].items():
        for rows, row in table.items():
            cells = (f"{row[c]:,.0f} µs" if c in row else "" for c in columns)
            print(f"| {n} x {n}, {rows} | " + " | ".join(cells) + " |")
    print("crossover (fewest rows from which dequantizing beats the packed kernel): " +
          "; ".join(f"{n}: int8 {c['int8']}, int4 {c['int4']}" for n, c in sweep["crossover_rows"].items()) +
          f"; QuantizedLinear uses the packed kernel up to {PACKED_KERNEL_MAX_ROWS} rows")
    write_result(args.out, results)


if __name__ == "__main__":
    main()
