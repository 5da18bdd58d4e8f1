"""`kiln serve-model` batching: 8 concurrent greedy requests against the same 8 one at a time.

    python bench/serve.py [--data-dir DATA | --model-dir DIR] [--requests 8] [--new-tokens 96]
                          [--repeats 3] [--quick] [--out bench/results/serve.json]

The model: `--model-dir`, else the newest trained model in DATA (default ./data, what `kiln run`
leaves), else one trained here in about a minute, as tests/model/conftest.py's `trained`
fixture trains one (a byte-level BPE and a small Llama-style model on the reference manual's
topics that ship with Python; `kiln run`'s tiny shape, 4 layers of d128, 128 tokens of context).

The server is the real `kiln serve-model` in its own process, on 127.0.0.1 and a free port, and
the client is the official `openai` client. Each of the N requests is a greedy completion of
its own prompt with `max_tokens` (the model may end one sooner, at <|bos|>). "One at a time"
sends them in turn, each after the previous answer; "concurrent" sends all N from N threads at
once, which the server decodes as one batch. The texts must be identical (each request's
greedy answer does not depend on its neighbours); the figure is the ratio of wall times, best
of `--repeats`. Goal (issue 17): at least 3x with 8 requests.

`--quick` (what the test suite runs, tests/model/test_serve.py) trains for 60 steps instead of
400, with the fixture's smaller shape (2 layers, 64 tokens of context), 32 new tokens, best of 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._results import result_path, write_result  # noqa: E402

PROMPTS = ["The module", "A function that", "Return the", "In Python, a class", "The following",
           "This method", "Raise an exception", "When the file", "An iterator is", "The default value",
           "Each object has", "If the argument", "To create a", "The result of", "Keyword arguments",
           "A string is"]


def train_model(root: Path, quick: bool) -> Path:
    """A small model trained here (the `trained` fixture's recipe); returns its checkpoint dir."""
    from bench._trained import train_pretrain_artifact
    from storage import ArtifactStore

    store = ArtifactStore(root)
    seq_len, layers, vocab, steps = (64, 2, 512, 60) if quick else (128, 4, 2048, 400)
    shape = dict(n_layer=layers, n_head=4, n_kv_head=4, d_model=128)
    artifact, _, _ = train_pretrain_artifact(store, seq_len=seq_len, vocab_size=vocab, shape=shape, steps=steps,
                                             fingerprint="b" * 64)
    return store.local_path(artifact, "model")


def find_model(args, scratch: Path) -> tuple[Path, str]:
    if args.model_dir:
        return Path(args.model_dir), "given"
    data = Path(args.data_dir)
    if data.is_dir():
        from flows.cli import resolve_model_dir
        from storage import ArtifactStore, KilnError

        try:
            return resolve_model_dir(ArtifactStore(data), None), f"newest in {data}"
        except KilnError:
            pass
    started = time.perf_counter()
    path = train_model(scratch, args.quick)
    return path, f"trained here in {time.perf_counter() - started:.0f} s"


def start_server(model_dir: Path, log_path: Path, max_batch: int):
    import openai

    from model.launch import free_port

    port = free_port()
    log = open(log_path, "w")
    server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve-model", str(model_dir), "--port", str(port),
                               "--name", "bench", "--max-batch", str(max_batch)], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    deadline = time.time() + 120
    while True:
        try:
            client.models.list()
            return server, client, log
        except openai.APIConnectionError:
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the server did not start:\n{log_path.read_text()[-3000:]}") from None
            time.sleep(0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--model-dir")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--quick", action="store_true", help="a quick model and run (the test suite's)")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (32 if args.quick else 96)
    repeats = args.repeats or (2 if args.quick else 3)

    from model.launch import stop_process_group

    with tempfile.TemporaryDirectory(prefix="kiln-bench-serve-") as scratch:
        model_dir, origin = find_model(args, Path(scratch))
        server, client, log = start_server(model_dir, Path(scratch) / "server.log", max(args.requests, 1))
        prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" {i}") for i in range(args.requests)]
        try:
            def ask(prompt: str):
                done = client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens, temperature=0)
                return done.choices[0].text, done.usage.completion_tokens

            ask(prompts[0])  # warm: the first forward pays for allocations
            alone_s, together_s = [], []
            alone = together = None
            for _ in range(repeats):
                started = time.perf_counter()
                alone = [ask(p) for p in prompts]
                alone_s.append(time.perf_counter() - started)
                with ThreadPoolExecutor(len(prompts)) as pool:
                    started = time.perf_counter()
                    together = list(pool.map(ask, prompts))
                    together_s.append(time.perf_counter() - started)
        finally:
            stop_process_group(server, grace_s=10)
            log.close()

    tokens = sum(n for _, n in alone)
    result = {
        "model": str(model_dir), "model_origin": origin, "requests": len(prompts), "max_tokens": new_tokens,
        "repeats": repeats, "quick": args.quick, "completion_tokens": tokens,
        "one_at_a_time_s": min(alone_s), "concurrent_s": min(together_s),
        "speedup": min(alone_s) / min(together_s),
        "one_at_a_time_tokens_per_s": tokens / min(alone_s), "concurrent_tokens_per_s": tokens / min(together_s),
        "identical_texts": [t for t, _ in alone] == [t for t, _ in together],
        "cpu_count": os.cpu_count(),
    }
    print(f"model: {model_dir} ({origin}); {len(prompts)} greedy completions of up to {new_tokens} tokens "
          f"({tokens} made), best of {repeats}")
    print(f"{'':22} {'wall s':>8} {'tokens/s':>9}")
    print(f"{'one at a time':22} {result['one_at_a_time_s']:8.2f} {result['one_at_a_time_tokens_per_s']:9.0f}")
    print(f"{'concurrent (batched)':22} {result['concurrent_s']:8.2f} {result['concurrent_tokens_per_s']:9.0f}")
    print(f"speedup {result['speedup']:.2f}x; identical texts: {'yes' if result['identical_texts'] else 'NO'}")
    out = Path(args.out)
    write_result(out, result)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
