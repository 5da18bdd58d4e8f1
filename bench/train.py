"""Benchmark: Kiln's `Transformer` vs transformers' `LlamaForCausalLM`, same shape, same weights.

    python bench/train.py [--shapes tiny,medium] [--batch 8] [--rounds 8] [--steps 1] [--compile]
                          [--decode-shapes tiny,medium] [--new-tokens 200] [--prompt 32]
                          [--threads N] [--decode-threads N] [--out bench/results/train.json]

1. Training steps, fp32 on CPU: the HF model is built from `llama_config` and loaded with
   `llama_state_dict` of ours (`attn_implementation="sdpa"`), so both start from identical
   weights; both get the same batch (random token ids, fixed seed) and AdamW with the same
   parameter groups and hyperparameters as `model/train.py`. A step is forward + loss +
   backward + optimizer step + zero_grad. HF gets `use_cache=False` and `shift_labels`, so its
   loss is the same mean cross-entropy over the same targets as ours (checked at step 0).
   Shapes: `tiny` (the pretrain stage's default model: 4 layers, 4 heads, d_model 256, vocab
   8192, seq_len 256) and `medium` (8 layers, 8 heads / 4 key-value heads, d_model 512).
   `--compile` adds `torch.compile(ours)` and `torch.compile(hf)` as two more contenders; the
   table gives every contender against HF eager, and the JSON ours_compiled / hf_compiled too.
2. KV-cache decoding, batch 1: `generate_tokens(..., temperature=0)` vs HF `generate(do_sample=
   False, use_cache=True)` on the model exported with `save_checkpoint` + `export_llama` and
   loaded with `AutoModelForCausalLM.from_pretrained`. Weights drawn with init_std 0.3 so that
   greedy argmaxes vary; the two outputs must be identical token for token.

Only two cores, shared with other jobs: the contenders run alternately (the order flips each
round) after warm-up, and each round yields one tokens/s figure per contender. The table gives
the best and the median; ratios are ours / HF, of the bests and the median of per-round ratios.
The same ratios from process CPU time are printed too: other jobs on the cores stretch wall time
(two threads wait on each other when one is descheduled) far more than they stretch CPU time.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

from bench._results import result_path, write_result  # noqa: E402
from model.checkpoint import save_checkpoint  # noqa: E402
from model.export import export_llama, llama_config, llama_state_dict  # noqa: E402
from model.generate import SamplingConfig, generate_tokens  # noqa: E402
from model.model import ModelConfig, Transformer, parameter_groups  # noqa: E402
from model.run_spec import TrainConfig  # noqa: E402

transformers.logging.set_verbosity_error()

SHAPES = {
    "tiny": ModelConfig(vocab_size=8192, seq_len=256, n_layer=4, n_head=4, n_kv_head=4, d_model=256),
    "tiny-gqa": ModelConfig(vocab_size=8192, seq_len=256, n_layer=4, n_head=4, n_kv_head=2, d_model=256),
    "medium": ModelConfig(vocab_size=8192, seq_len=256, n_layer=8, n_head=8, n_kv_head=4, d_model=512),
}


# ------------------------------------------------------------------ the two models


def hf_twin(model: Transformer) -> LlamaForCausalLM:
    """A LlamaForCausalLM holding a copy of `model`'s weights."""
    config = LlamaConfig(**llama_config(model.config), attn_implementation="sdpa")
    hf = LlamaForCausalLM(config)
    missing, unexpected = hf.load_state_dict({k: v.clone() for k, v in llama_state_dict(model).items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings and hf.lm_head.weight is not hf.model.embed_tokens.weight:
        raise RuntimeError("the HF model's head is not tied to its embedding")
    return hf


def hf_parameter_groups(ours: Transformer, hf: LlamaForCausalLM, weight_decay: float) -> list[dict]:
    """Our `parameter_groups`, translated to the HF model's parameters, in the same order."""
    # llama_state_dict detaches without copying: its tensors share storage with our parameters
    hf_name = {tensor.data_ptr(): name for name, tensor in llama_state_dict(ours).items()}
    hf_params = dict(hf.named_parameters())
    groups = parameter_groups(ours, weight_decay)
    return [{**group, "params": [hf_params[hf_name[p.data_ptr()]] for p in group["params"]]} for group in groups]


def adamw(groups: list[dict], train: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=False)


def ours_loss(model, x, y):
    return model(x, y)[1]


def hf_loss(model, x, y):
    return model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss


def train_step(model, optimizer, loss_fn, x, y) -> float:
    loss = loss_fn(model, x, y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


# ------------------------------------------------------------------ measuring


def alternate(contenders: dict, rounds: int, work_per_round: float) -> dict[str, dict[str, list[float]]]:
    """Run each contender's `run()` once per round, flipping the order every round.

    Rates are work per second of wall-clock time and, less sensitive to other jobs taking the
    cores, work per second of this process's CPU time.
    """
    rates = {name: {"wall": [], "cpu": []} for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            gc.collect()
            wall, cpu = time.perf_counter(), time.process_time()
            contenders[name]()
            rates[name]["wall"].append(work_per_round / (time.perf_counter() - wall))
            rates[name]["cpu"].append(work_per_round / (time.process_time() - cpu))
    return rates


def summarize(rates: dict[str, dict[str, list[float]]], baseline: str = "hf") -> dict:
    """Best and median tokens/s per contender; ratios to the baseline: of the bests, and the
    median of the per-round ratios (each round's contenders ran back to back)."""
    out = {}
    for name, clocks in rates.items():
        out[name] = {"best": max(clocks["wall"]), "median": statistics.median(clocks["wall"]),
                     "rounds": [round(x, 1) for x in clocks["wall"]],
                     "cpu_best": max(clocks["cpu"]), "cpu_median": statistics.median(clocks["cpu"])}
        if name != baseline:
            for clock, prefix in (("wall", ""), ("cpu", "cpu_")):
                mine, theirs = clocks[clock], rates[baseline][clock]
                out[name][prefix + "ratio_best"] = max(mine) / max(theirs)
                out[name][prefix + "ratio_median"] = statistics.median(a / b for a, b in zip(mine, theirs))
    return out


def bench_training(shape: str, args) -> dict:
    config = SHAPES[shape]
    train = TrainConfig()
    torch.manual_seed(0)
    ours = Transformer(config).train()
    hf = hf_twin(ours).train()
    batch = torch.randint(0, config.vocab_size, (args.batch, config.seq_len + 1),
                          generator=torch.Generator().manual_seed(1))
    x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    with torch.no_grad():
        loss_ours, loss_hf = ours_loss(ours, x, y).item(), hf_loss(hf, x, y).item()
    if abs(loss_ours - loss_hf) > 1e-4:
        raise RuntimeError(f"{shape}: step-0 losses differ: ours {loss_ours:.6f}, HF {loss_hf:.6f}")

    runs = {
        "ours": (ours, adamw(parameter_groups(ours, train.weight_decay), train), ours_loss),
        "hf": (hf, adamw(hf_parameter_groups(ours, hf, train.weight_decay), train), hf_loss),
    }
    if args.compile:
        twin = Transformer(config).train()
        twin.load_state_dict(ours.state_dict())
        runs["ours_compiled"] = (torch.compile(twin), adamw(parameter_groups(twin, train.weight_decay), train),
                                 ours_loss)
        hf_compiled = hf_twin(twin).train()  # and HF compiled the same way: compiled vs compiled
        runs["hf_compiled"] = (torch.compile(hf_compiled),
                               adamw(hf_parameter_groups(twin, hf_compiled, train.weight_decay), train), hf_loss)
    last_loss = {}

    def steps(name, model, optimizer, loss_fn):
        def run():
            for _ in range(args.steps):
                last_loss[name] = train_step(model, optimizer, loss_fn, x, y)
        return run

    for model, optimizer, loss_fn in runs.values():  # warm-up: optimizer state, oneDNN primitives, compiling
        for _ in range(args.warmup):
            train_step(model, optimizer, loss_fn, x, y)
    rates = alternate({name: steps(name, *run) for name, run in runs.items()}, args.rounds, args.steps * x.numel())
    result = summarize(rates)
    if args.compile:
        compiled = summarize({k: rates[k] for k in ("ours_compiled", "hf_compiled")}, baseline="hf_compiled")
        result["compiled_vs_compiled"] = compiled["ours_compiled"]
    result.update(shape=config.to_dict(), batch=args.batch, params=ours.num_params(non_embedding=False),
                  loss_step0={"ours": loss_ours, "hf": loss_hf}, loss_last=last_loss)
    del runs, ours, hf
    gc.collect()
    return result


def bench_decoding(shape: str, args) -> dict:
    config = SHAPES[shape].model_copy(update={"init_std": 0.3})  # large weights: varied greedy choices
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", ours, config)
        export_llama(Path(tmp) / "ckpt", Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="sdpa").eval()
    prompt = torch.randint(0, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(2)).tolist()
    n = args.new_tokens
    sampling = SamplingConfig(max_new_tokens=n, temperature=0)
    input_ids = torch.tensor([prompt])
    outputs = {}

    def run_ours():
        outputs["ours"] = list(generate_tokens(ours, prompt, sampling))

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
        outputs["hf"] = out[0, len(prompt):].tolist()

    for _ in range(args.warmup):
        run_ours()
        run_hf()
    rates = alternate({"ours": run_ours, "hf": run_hf}, args.decode_rounds, n)
    result = summarize(rates)
    ours_ids, hf_ids = outputs["ours"], outputs["hf"]
    first_difference = None if ours_ids == hf_ids else next(
        (i for i, (a, b) in enumerate(zip(ours_ids, hf_ids)) if a != b), min(len(ours_ids), len(hf_ids)))
    result.update(new_tokens=n, prompt_tokens=len(prompt), identical=ours_ids == hf_ids,
                  first_difference=first_difference, distinct_tokens=len(set(ours_ids)))
    return result


# ------------------------------------------------------------------ report


def table(results: dict) -> str:
    rows = [f"{'benchmark':<20} {'contender':<14} {'best tok/s':>10} {'median':>8} "
            f"{'ratio best':>10} {'median':>7} {'cpu-time ratio best':>20} {'median':>7}"]
    for section, per_shape in results.items():
        for shape, r in per_shape.items():
            for name in [n for n in r if isinstance(r[n], dict) and "best" in r[n]]:
                c = r[name]
                ratios = (f"{c['ratio_best']:>9.2f}x {c['ratio_median']:>6.2f}x "
                          f"{c['cpu_ratio_best']:>19.2f}x {c['cpu_ratio_median']:>6.2f}x" if "ratio_best" in c else "")
                rows.append(f"{section + ' ' + shape:<20} {name:<14} {c['best']:>10.0f} {c['median']:>8.0f} {ratios}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="tiny,medium", help=f"training shapes, of {sorted(SHAPES)}")
    parser.add_argument("--decode-shapes", default="tiny,medium")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="training steps per contender per round")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--decode-rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads, training")
    parser.add_argument("--decode-threads", type=int, default=None, help="torch threads, decoding (default: --threads)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours) in training")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "train.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results: dict[str, dict] = {"train": {}, "decode": {}}
    for shape in filter(None, args.shapes.split(",")):
        results["train"][shape] = bench_training(shape, args)
        print(f"train {shape}: done", file=sys.stderr, flush=True)
    torch.set_num_threads(args.decode_threads or args.threads)
    for shape in filter(None, args.decode_shapes.split(",")):
        results["decode"][shape] = bench_decoding(shape, args)
        print(f"decode {shape}: done", file=sys.stderr, flush=True)

    print(table(results))
    for shape, r in results["train"].items():
        print(f"train {shape}: step-0 loss ours {r['loss_step0']['ours']:.6f} HF {r['loss_step0']['hf']:.6f}; "
              f"last loss " + ", ".join(f"{k} {v:.6f}" for k, v in r["loss_last"].items()))
    for shape, r in results["decode"].items():
        print(f"decode {shape}: greedy outputs identical: {r['identical']} ({r['new_tokens']} tokens, "
              f"{r['distinct_tokens']} distinct" + (f", first difference at {r['first_difference']})"
                                                    if not r["identical"] else ")"))
    meta = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": args.threads,
            "decode_threads": args.decode_threads or args.threads,
            "cpu": platform.processor() or platform.machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    write_result(args.out, {"meta": meta, **results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
