"""Quantization side by side: fp32, int8, int4 by round-to-nearest and int4 by AWQ.

    python bench/quantize.py --data-dir DATA [--model dpo] [--group-size 128] [--new-tokens 200]
                             [--out bench/results/quantize.json]

DATA is a Kiln data directory that holds a trained model with its pack and tokenizer: the one
`kiln run` leaves, or a larger model (`kiln pretrain --data-dir DATA --set pretrain.model...`).
The quantize stage builds int8, int4-rtn and int4-awq from the newest `--model` artifact (cached
in DATA like any stage), then each of the four models is measured in a fresh process of its own:

* held-out perplexity: Kiln's val_ppl over the pack's `val` rows, without the last
  `calibration_rows` rows (AWQ calibrates on those);
* weights on disk (`model/model.safetensors`), as a ratio of fp32's;
* decode tokens/s: KV-cache greedy decoding, batch 1, `--new-tokens` after a 32-token prompt,
  best of 3, with the matmul each quantized layer runs (torch's packed kernel or dequantize);
* memory: the bytes of the tensors the loaded model holds (the int4 kernel's packed copy
  included), and the process's peak resident set (imports, load, perplexity and decoding;
  torch, pyarrow and tokenizers alone hold ~430 MB, which is most of it at these sizes).

Then one matmul at batch 1 (what decoding does) on square random matrices of 256 to 4096:
fp32 `F.linear` against torch's packed int8 and int4 CPU kernels through `QuantizedLinear`, to
show where the kernels stand at the sizes of larger models.

Goals (issue 14): int8 perplexity within 1% of fp32; AWQ's increase at most half of RTN's at the
same group size; int4 weights <= 0.3x fp32's on disk.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("int8", "int4-rtn", "int4-awq")


def weight_bytes(model) -> int:
    """Bytes of the tensors the loaded model holds: parameters, buffers and the int4 kernel's own
    packed copy (each storage once; a tied head shares the embedding's)."""
    tensors = [*model.parameters(), *model.buffers(),
               *(t for m in model.modules() for t in (getattr(m, "_packed", None), getattr(m, "_scales_and_zeros", None))
                 if t is not None)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measure(data: Path, fingerprint: str, stage: str, pack_fp: str, tok_fp: str, calibration: int,
            new_tokens: int) -> dict:
    """One model, in this process: perplexity, decode speed, peak memory."""
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
            "model_rss_mb": round(model_bytes / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def kernel_timings(sizes=(256, 1024, 4096)) -> dict[int, dict[str, float]]:
    """Microseconds per batch-1 matmul: fp32 against torch's int8 and int4 packed kernels."""
    import torch
    import torch.nn.functional as F

    from model.quantization import QuantizedLinear, quantize_int4, quantize_int8

    def timed(call) -> float:
        for _ in range(5):
            call()
        started, calls = time.perf_counter(), 0
        while time.perf_counter() - started < 0.5:
            call()
            calls += 1
        return round((time.perf_counter() - started) / calls * 1e6, 1)

    found = {}
    for n in sizes:
        weight, x = torch.randn(n, n, generator=torch.Generator().manual_seed(n)), torch.randn(1, n)
        int8, int4 = QuantizedLinear(quantize_int8(weight)), QuantizedLinear(quantize_int4(weight, 128))
        found[n] = {"fp32": timed(lambda: F.linear(x, weight)),
                    int8.use_kernel(): timed(lambda: int8(x)), int4.use_kernel(): timed(lambda: int4(x))}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--model", default="dpo", choices=["pretrain", "sft", "dpo"])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--calibration-rows", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quantize.json")
    parser.add_argument("--measure", nargs=4, metavar=("FP", "STAGE", "PACK", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.data_dir, *args.measure, args.calibration_rows, args.new_tokens)))
        return

    from model import quantize
    from model.checkpoint import read_config
    from storage import ArtifactStore

    store = ArtifactStore(args.data_dir)
    trained = store.list(args.model)[-1]
    pack, tok = store.list("pack")[-1], store.list("tokenizer")[-1]
    shape = read_config(store.local_path(trained, "model"))
    contenders = [("fp32", trained)]
    for method in METHODS:
        config = quantize.QuantizeConfig(model=args.model, method=method, group_size=args.group_size,
                                         calibration_rows=args.calibration_rows)
        contenders.append((method, quantize.STAGE.run(config, [trained, pack, tok], store)))
    results: dict = {"model": f"{trained.stage}/{trained.short}", "shape": shape.get("model", shape),
                     "group_size": args.group_size, "runs": {}}
    for name, manifest in contenders:
        command = [sys.executable, __file__, "--data-dir", str(args.data_dir), "--calibration-rows",
                   str(args.calibration_rows), "--new-tokens", str(args.new_tokens),
                   "--measure", manifest.fingerprint, manifest.stage, pack.fingerprint, tok.fingerprint]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"measuring {name} failed:\n{done.stderr[-3000:]}")
        results["runs"][name] = json.loads(done.stdout.splitlines()[-1])
        if name == "int4-awq":
            results["runs"][name]["awq"] = {k: v for k, v in manifest.stats.get("awq", {}).items() if k != "groups"}
        print(f"{name}: {results['runs'][name]}", flush=True)
    runs = results["runs"]
    fp32 = runs["fp32"]
    for run in runs.values():
        run["ppl_increase_pct"] = round(100 * (run["val_ppl"] / fp32["val_ppl"] - 1), 3)
        run["size_ratio"] = round(run["bytes"] / fp32["bytes"], 4)
    rtn, awq = runs["int4-rtn"]["ppl_increase_pct"], runs["int4-awq"]["ppl_increase_pct"]
    results["int8_within_1pct"] = abs(runs["int8"]["ppl_increase_pct"]) < 1
    results["awq_increase_over_rtn_increase"] = round(awq / rtn, 3) if rtn > 0 else None
    results["int4_size_ratio_max"] = max(runs["int4-rtn"]["size_ratio"], runs["int4-awq"]["size_ratio"])

    print(f"\n{results['model']}: {json.dumps(results['shape'])}, int4 group {args.group_size}")
    print("| model | held-out ppl | vs fp32 | weights on disk | decode tok/s | memory: model / process peak | matmul |")
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['val_ppl']:.3f} | {run['ppl_increase_pct']:+.2f}% | {run['bytes'] / 2**20:.2f} MB "
              f"({run['size_ratio']:.2f}x) | {run['decode_tok_s']:.0f} | {run['model_rss_mb']:.1f} / {run['peak_rss_mb']} MB | "
              f"{', '.join(run['matmuls'])} |")
    print(f"AWQ's increase / RTN's: {results['awq_increase_over_rtn_increase']} (goal <= 0.5); "
          f"int8 within 1%: {results['int8_within_1pct']}; int4 size <= 0.3x: {results['int4_size_ratio_max'] <= 0.3}")
    results["batch1_matmul_us"] = kernel_timings()
    print("\n| one matmul, batch 1 | " + " | ".join(next(iter(results["batch1_matmul_us"].values()))) + " |")
    print("|---|---|---|---|")
    for n, row in results["batch1_matmul_us"].items():
        print(f"| {n} x {n} | " + " | ".join(f"{us:,.0f} µs" for us in row.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
