"""Benchmark: quality per compute on Tiny Shakespeare, against nanoGPT's CPU recipe.

    python bench/shakespeare.py [--minutes 3] [--data-dir DIR] [--out bench/results/shakespeare.json]

The peer: nanoGPT's `shakespeare_char` recipe for a CPU (block 64, batch 12, 4 layers, 4 heads,
128 embd, 2000 iters, no dropout) trains in about 3 minutes and reaches a validation loss of about
1.88 nats per character, i.e. 1.88 / ln 2 = 2.71 bits per byte (the file is ASCII: one byte per
character). Its validation set is the last 10% of the file, `data[int(n * 0.9):]`.

Kiln, from scratch, with the `tiny` preset (configs/tiny.yaml) and nothing else changed but
what the data forces:

* documents: the first 90% of the file (by characters, exactly nanoGPT's cut) and the last 10%,
  each cut at blank lines (between speeches) into documents of about `DOC_CHARS` characters
  that join back into exactly that text; every document carries `split` ("train" / "val"),
  which the pack stage follows instead of its id hash.
* the tokenizer stage on the train documents only; the pack stage on all of them; the pretrain
  stage under accelerate, as `kiln pretrain` runs it. `--minutes M` scales the preset's
  `max_steps` (made for 3 minutes on 2 quiet cores) by M / 3.
* the figure: bits per byte of the trained model on the WHOLE validation split (every val row
  once, not the stage's first `eval_batches`), counting every UTF-8 byte of the validation text
  (checked) and the loss of every predicted token, document-boundary tokens included.

Timing: the pretrain stage's seconds (launching accelerate, building the model, the steps, the
evaluations and checkpoints along the way, saving the model: data preparation excluded), and the
loop alone (from the training process's first line to its last step, read off its log as it
streams). The machine's load average is recorded with them: on a shared machine, rerun this
script when it is quiet for the figure.
"""

from __future__ import annotations

import os

os.environ.setdefault("KILN_NO_PROGRESS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bench._results import result_path, write_result  # noqa: E402
from flows.config import load_config  # noqa: E402
from model import pretrain  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.evaluate import heldout_metrics, token_byte_lengths  # noqa: E402
from model.train import METRICS  # noqa: E402
from pipelines import pack, tokenizer  # noqa: E402
from pipelines.common import shard_name  # noqa: E402
from storage import ArtifactStore  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXT = SHARED / "text" / "tinyshakespeare_input.txt"
NANOGPT_VAL_LOSS = 1.88                              # nats per character, nanoGPT's README (CPU recipe)
NANOGPT_BPB = NANOGPT_VAL_LOSS / math.log(2)         # 2.71 bits per byte
NANOGPT_RECIPE = "nanoGPT shakespeare_char on CPU: block 64, batch 12, 4x4x128, 2000 iters, ~3 minutes"
DOC_CHARS = 4000                                     # documents of about this many characters
PRESET_MINUTES = 3.0                                 # what the tiny preset's max_steps is made for


# ------------------------------------------------------------------ documents


def cut_documents(text: str, target: int = DOC_CHARS) -> list[str]:
    """Consecutive pieces of `text`, each ending at a blank line once it is `target` characters
    long (the last takes the rest): `"".join(pieces) == text`."""
    pieces, start = [], 0
    while start < len(text):
        blank = text.find("\n\n", start + target)
        end = len(text) if blank < 0 else blank + 2
        pieces.append(text[start:end])
        start = end
    return pieces


def document_artifact(store: ArtifactStore, name: str, parts: dict[str, str]):
    """A document artifact (`shards/00000.parquet`: id, url, text, split) of the named parts."""
    rows = [(f"{split}-{i:04d}", piece, split) for split, text in parts.items()
            for i, piece in enumerate(cut_documents(text))]
    identity = hashlib.sha256(json.dumps([rows, DOC_CHARS]).encode()).hexdigest()

    def build(writer):
        ids, texts, splits = (list(column) for column in zip(*rows))
        writer.write_parquet(shard_name(0), pa.table({
            "id": ids, "url": [f"file://{TEXT.name}#{i}" for i in ids], "text": texts, "split": splits}))
        return {"documents_out": len(rows), **{f"{s}_characters": len(t) for s, t in parts.items()}}

    return store.produce(name, identity, build, config={"doc_chars": DOC_CHARS}, inputs=[], code_version="1")


# ------------------------------------------------------------------ timing off the training log


class StepClock(logging.Handler):
    """Times the training process from the lines it streams (`[pretrain] world_size=...`, then
    `[pretrain] step=N loss=...`): when it started, and when it logged its last step."""

    def __init__(self, last_step: int):
        super().__init__(logging.INFO)
        self.last_step = last_step
        self.started = self.finished = None

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if "world_size=" in line and self.started is None:
            self.started = time.perf_counter()
        elif re.search(rf"\bstep={self.last_step} loss=", line):
            self.finished = time.perf_counter()

    @property
    def seconds(self) -> float | None:
        return round(self.finished - self.started, 1) if self.started and self.finished else None


# ------------------------------------------------------------------ evaluation on the whole split


def whole_split_metrics(store: ArtifactStore, packed, tokenizer_manifest, trained, batch_size: int = 32) -> dict:
    """val_loss / val_bpb over every row of the val split, and the bytes they score."""
    from tokenizers import Tokenizer

    rows = np.concatenate([
        pq.read_table(store.local_path(packed, f.path)).column("tokens").combine_chunks().flatten().to_numpy()
        .reshape(-1, packed.stats["row_tokens"]) for f in sorted(packed.files_under("val"), key=lambda f: f.path)
    ]).astype(np.int64)
    inputs = torch.from_numpy(rows[:, :-1].copy())
    targets = torch.from_numpy(rows[:, 1:].copy())
    targets[targets == packed.stats["pad_id"]] = -100
    tok = Tokenizer.from_file(str(store.local_path(tokenizer_manifest, "tokenizer.json")))
    token_bytes = token_byte_lengths(tok)
    model, _ = load_checkpoint(store.local_path(trained, pretrain.FINAL))
    batches = [(inputs[i:i + batch_size], targets[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    started = time.perf_counter()
    metrics = heldout_metrics(model, batches, token_bytes, "cpu")
    counted = targets[targets != -100]
    return {**metrics, "val_rows": len(rows), "val_tokens_scored": int(counted.numel()),
            "val_bytes_scored": int(token_bytes[counted].sum().item()),
            "eval_seconds": round(time.perf_counter() - started, 1)}


def curve_summary(store: ArtifactStore, trained, points: int = 12) -> dict:
    rows = [json.loads(line) for line in store.local_path(trained, METRICS).read_text().splitlines()]
    every = max(1, len(rows) // points)
    picked = [r for r in rows if r["step"] % every == 0 or r["step"] in (1, rows[-1]["step"])]
    return {
        "train_loss": [[r["step"], round(r["loss"], 3)] for r in picked],
        "val": [[r["step"], round(r["val_loss"], 3), round(r["val_bpb"], 3)] for r in rows if "val_loss" in r],
    }


# ------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=PRESET_MINUTES,
                        help="training budget; scales the preset's max_steps (made for 3 minutes) by minutes / 3")
    parser.add_argument("--config", default="tiny", help="the run config whose tokenizer/pack/pretrain are used")
    parser.add_argument("--data-dir", default=None, help="artifact store (default: a temporary directory)")
    parser.add_argument("--out", type=result_path, default=ROOT / "bench" / "results" / "shakespeare.json")
    args = parser.parse_args(argv)
    if not TEXT.exists():
        print(f"skipped: {TEXT} is absent")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    text = TEXT.read_text()
    cut = int(len(text) * 0.9)  # nanoGPT's data[:int(n*0.9)] / data[int(n*0.9):]
    train_text, val_text = text[:cut], text[cut:]
    config = load_config(args.config)
    steps = max(1, round(config.pretrain.train.max_steps * args.minutes / PRESET_MINUTES))
    train = config.pretrain.train.model_copy(update={
        "max_steps": steps, "warmup_steps": min(config.pretrain.train.warmup_steps, steps // 2)})
    pretrain_config = config.pretrain.model_copy(update={"train": train})

    with tempfile.TemporaryDirectory(prefix="kiln-shakespeare-") as scratch:
        store = ArtifactStore(args.data_dir or scratch)
        prep_started = time.perf_counter()
        everything = document_artifact(store, "shakespeare", {"train": train_text, "val": val_text})
        train_only = document_artifact(store, "shakespeare", {"train": train_text})
        tok = tokenizer.STAGE.run(config.tokenizer, [train_only], store)
        packed = pack.STAGE.run(config.pack, [everything, tok], store)
        prep_seconds = time.perf_counter() - prep_started

        clock = StepClock(steps)
        logging.getLogger("kiln").addHandler(clock)
        load_before = os.getloadavg()
        trained = pretrain.STAGE.run(pretrain_config, [packed, tok], store, force=True)
        load_after = os.getloadavg()
        logging.getLogger("kiln").removeHandler(clock)

        final = whole_split_metrics(store, packed, tok, trained)
        if final["val_bytes_scored"] != len(val_text.encode()):
            raise SystemExit(f"scored {final['val_bytes_scored']} bytes of validation text, "
                             f"the text has {len(val_text.encode())}")
        stats = trained.stats
        result = {
            "benchmark": "tiny preset from scratch on Tiny Shakespeare vs nanoGPT's CPU recipe",
            "command": "python bench/shakespeare.py"
                       + ("" if args.minutes == PRESET_MINUTES else f" --minutes {args.minutes:g}"),
            "data": {"file": str(TEXT.relative_to(SHARED.parents[1])), "characters": len(text),
                     "train_characters": len(train_text), "val_characters": len(val_text),
                     "val_rule": "last 10% of the file, data[int(n*0.9):], as nanoGPT",
                     "documents": everything.stats["documents_out"], "doc_chars": DOC_CHARS},
            "preset": {"config": args.config,
                       "tokenizer": config.tokenizer.model_dump(exclude={"workers", "batch_size"}),
                       "pack": config.pack.model_dump(exclude={"workers", "encode_batch_size"}),
                       "pretrain": {"model": pretrain_config.model.model_dump(), "train": train.model_dump()}},
            "tokenizer": {"vocab_size": tok.stats.get("vocab_size"),
                          "bytes_per_token": tok.stats.get("bytes_per_token")},
            "pack": {k: packed.stats[k] for k in ("seq_len", "policy", "rows_per_split", "tokens", "padding_fraction")},
            "training": {
                "steps": stats["steps"],
                "stage_seconds": stats["seconds"],
                "loop_seconds": clock.seconds,
                "tokens_per_s": stats.get("tokens_per_s"),
                "tokens_seen": stats["steps"] * train.batch_size * train.grad_accum * packed.stats["seq_len"],
                "epochs": round(stats["steps"] * train.batch_size * train.grad_accum
                                / packed.stats["rows_per_split"]["train"], 2),
                "final_train_loss": round(stats["final_train_loss"], 4),
                "data_prep_seconds": round(prep_seconds, 1),
                "torch_threads": torch.get_num_threads(),
                "cpus": len(os.sched_getaffinity(0)),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in load_after],
                "machine": f"{platform.processor() or platform.machine()}, {platform.system()} {platform.release()}",
            },
            "loss_curve": curve_summary(store, trained),
            "result": {
                "val_bpb": round(final["val_bpb"], 4),
                "val_loss_per_token": round(final["val_loss"], 4),
                "val_nats_per_byte": round(final["val_bpb"] * math.log(2), 4),
                "val_rows": final["val_rows"], "val_tokens_scored": final["val_tokens_scored"],
                "val_bytes_scored": final["val_bytes_scored"],
                "final_eval_seconds": final["eval_seconds"],
            },
            "peer": {"recipe": NANOGPT_RECIPE, "val_loss_nats_per_char": NANOGPT_VAL_LOSS,
                     "val_bpb": round(NANOGPT_BPB, 4)},
        }
        result["verdict"] = {
            "beats_nanogpt": final["val_bpb"] < NANOGPT_BPB,
            "within_minutes": stats["seconds"] <= args.minutes * 60,
            "bpb_margin": round(NANOGPT_BPB - final["val_bpb"], 4),
        }
    out = Path(args.out)
    write_result(out, result)
    r, t = result["result"], result["training"]
    print(f"\nTiny Shakespeare, whole validation split "
          f"({r['val_bytes_scored']:,} bytes, {r['val_tokens_scored']:,} tokens):")
    print(f"  kiln tiny:  {r['val_bpb']:.3f} bits/byte  ({r['val_loss_per_token']:.3f} nats/token, "
          f"{r['val_nats_per_byte']:.3f} nats/char)  after {t['steps']} steps, {t['stage_seconds']:.0f} s "
          f"(loop {t['loop_seconds']} s, "
          f"load average {t['load_average_before'][0]:.1f} -> {t['load_average_after'][0]:.1f})")
    print(f"  nanoGPT:    {NANOGPT_BPB:.3f} bits/byte  ({NANOGPT_VAL_LOSS} nats/char, ~3 minutes on CPU)")
    print(f"  -> {'beats' if result['verdict']['beats_nanogpt'] else 'does NOT beat'} nanoGPT by "
          f"{result['verdict']['bpb_margin']:+.3f} bits/byte; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
