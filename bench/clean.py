"""Benchmark: the clean stage (extraction and quality filters) against datatrove's own
Trafilatura block followed by the same filters, on the same pages, on one core.

    python bench/clean.py [--rounds 5] [--out bench/results/clean.json]

Data: the 181 pages of the scrapinghub article-extraction benchmark
(``../shared/data/html_extraction/scrapinghub_aeb``); the script says so and exits 0 when
that folder is absent. Pages are decoded once, with ``pipelines.extract.decode_html``, and
every contender gets the same strings. Each contender is a chain of datatrove steps whose
generators feed each other as in a pipeline (``step.run(docs, rank=0, world_size=1)``):

* (A) datatrove: its ``Trafilatura`` block (its defaults: favour precision, deduplicate, a
  forked worker with a per-page timeout), then its stock ``GopherRepetitionFilter``,
  ``GopherQualityFilter``, ``C4QualityFilter`` (with our ``filter_no_terminal_punct=False``)
  and ``FineWebQualityFilter``, which count words with datatrove's spaCy tokenizer. (Our Gopher
  quality setting differs in one threshold, which changes what it keeps, not its cost.)
* (B) Kiln: ``pipelines.clean.clean_steps(CleanConfig(workers=1))``, all of it: URL filter,
  extraction, language identification, the same four filters (our settings, the fast
  tokenizer; Gopher and C4 as ``pipelines/quality.py``'s subclasses, which decide as
  datatrove's), PII scrubbing; so more work than (A), not less. For reference, also the same
  chain with ``tokenizer="spacy"``, and with only extraction and the four filters, as in (A).
* (C) ``pipelines.clean.STAGE.run`` on an ingest-like artifact holding the same pages (one
  shard: ingest writes up to 10,000 pages to one): (B) plus reading and writing Parquet and
  the manifest. Reading the shard alone (zstd, 6 MB for 31 MB of HTML) is timed too.
* Extraction alone, ``pipelines.extract.extract`` page by page, for reference.

Speed: CPU seconds of this process and its finished children (datatrove's block extracts
in a forked worker, joined when the block ends), so the load of other processes on the
shared machine does not count; everything pinned to CPU 0. ``--rounds`` rounds, every
contender taking its turn in each round; the best and the median round are reported, the
best one compared. Per-step milliseconds come from the steps' own timers (datatrove's
``track_time``: wall clock, so there the machine's load counts, and (A)'s extraction
includes its worker's pipe) in each contender's best round.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import extraction  # noqa: E402 - bench/extraction.py: the same pages, CPU pinning and quiet logs

from bench._results import result_path, write_result  # noqa: E402

AEB = extraction.AEB
DEFAULT_OUT = ROOT / "bench" / "results" / "clean.json"
WORD_FILTERS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")

Pages = list[tuple[str, str, str | None]]  # (id, html, url)


def load_pages() -> Pages:
    """The benchmark's pages as (id, html, url), in id order (bench/extraction.py reads them)."""
    pages, _ = extraction.load_pages()
    return [(key, html, url) for key, (html, url) in pages.items()]


def quiet() -> None:
    """As bench/extraction.py, and no progress bar or stage log lines either."""
    import logging

    extraction.quiet_logs()
    os.environ["KILN_NO_PROGRESS"] = "1"
    logging.getLogger("kiln").setLevel(logging.WARNING)


def cpu_clock() -> float:
    """CPU seconds of this process plus those of its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# ------------------------------------------------------------------ contenders


class Chain:
    """Named datatrove steps run as one pipeline over the pages; `run()` returns the documents kept."""

    def __init__(self, label: str, steps: list, documents: Callable, before: Callable | None = None):
        self.label, self.steps, self.documents, self.before = label, steps, documents, before

    def run(self) -> list:
        from datatrove.utils.stats import Stats

        if self.before:
            self.before()
        for _, step in self.steps:
            step.stats = Stats(str(step))  # fresh timers and counts for this round
        docs = self.documents()
        for _, step in self.steps:
            docs = step.run(docs, rank=0, world_size=1)
        return list(docs)

    def step_ms(self) -> dict[str, dict[str, float]]:
        """Per step: the documents that reached it and its milliseconds per document."""
        out = {}
        for name, step in self.steps:
            reached = step.stats.stats["total"].total if "total" in step.stats.stats else 0
            out[name] = {"docs": int(reached), "ms_per_doc": 1000 * step.stats.time_stats.total / max(reached, 1)}
        return out


def datatrove_chain(pages: Pages) -> Chain:
    from datatrove.data import Document
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )
    from trafilatura.deduplication import LRU_TEST

    steps = [
        ("extraction", Trafilatura()),
        ("gopher_repetition", GopherRepetitionFilter()),
        ("gopher_quality", GopherQualityFilter()),
        ("c4_quality", C4QualityFilter(filter_no_terminal_punct=False)),
        ("fineweb_quality", FineWebQualityFilter()),
    ]

    def documents():
        for key, html, url in pages:
            yield Document(text=html, id=key, metadata={"url": url})

    # deduplicate=True keeps an LRU cache of the text seen across documents, which the forked
    # worker inherits: a second pass over the same pages would drop them all as duplicates.
    return Chain("A", steps, documents, before=LRU_TEST.clear)


def kiln_chain(label: str, pages: Pages, only: tuple[str, ...] = (), **settings) -> Chain:
    from datatrove.data import Document

    from pipelines.clean import CleanConfig, clean_steps
    from pipelines.steps import NEEDS_EXTRACTION

    steps = [(name, step) for name, step in clean_steps(CleanConfig(workers=1, **settings)) if not only or name in only]

    def documents():
        for row, (key, html, url) in enumerate(pages):
            yield Document(text=html, id=key, metadata={"url": url, "row": row, NEEDS_EXTRACTION: True})

    return Chain(label, steps, documents)


class StageRun:
    """The clean stage on an ingest-like artifact of the pages, built again (force) every round."""

    def __init__(self, pages: Pages, folder: Path):
        from storage import ArtifactStore, fingerprint

        self.store = ArtifactStore(folder)
        fp = fingerprint("ingest", {"bench": "clean"}, [], "bench")
        self.source = self.store.produce(
            "ingest", fp, lambda writer: self._write(writer, pages), config={"bench": "clean"}, inputs=[],
            code_version="bench",
        )

    @staticmethod
    def _write(writer, pages: Pages) -> dict:
        import pyarrow as pa

        writer.write_parquet("shards/00000.parquet", pa.table({
            "id": [key for key, _, _ in pages],
            "url": [url for _, _, url in pages],
            "html": pa.array([html for _, html, _ in pages], pa.string()),
            "text": pa.array([None] * len(pages), pa.string()),
        }))
        return {"documents": len(pages)}

    def run(self) -> list:
        from pipelines.clean import STAGE, CleanConfig

        manifest = STAGE.run(CleanConfig(workers=1), [self.source], self.store, force=True)
        return [None] * manifest.stats["documents_out"]


class ShardRead:
    """What (C) does besides (B): reading the ingest shard, the HTML to Python strings."""

    def __init__(self, stage: StageRun):
        self.stage = stage

    def run(self) -> list:
        from pipelines.common import read_shard

        return read_shard(self.stage.store, self.stage.source, "shards/00000.parquet").column("html").to_pylist()


class ExtractionAlone:
    def __init__(self, pages: Pages):
        self.pages = pages

    def run(self) -> list:
        from pipelines.extract import extract

        return [text for _, html, url in self.pages if (text := extract(html, url))]


# ------------------------------------------------------------------ rounds and report


def measure(contenders: dict[str, object], rounds: int, n_pages: int) -> dict[str, dict]:
    """Every contender once to warm up (spaCy, the blocklists, the language model), then
    `rounds` rounds of all of them in turn."""
    for contender in contenders.values():
        contender.run()
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    results: dict[str, dict] = {}
    for _ in range(rounds):
        for name, contender in contenders.items():
            start = cpu_clock()
            kept = contender.run()
            took = cpu_clock() - start
            if not seconds[name] or took < min(seconds[name]):
                results[name] = {"kept": len(kept)}
                if isinstance(contender, Chain):
                    results[name] |= {"label": contender.label, "steps": contender.step_ms()}
            seconds[name].append(took)
    for name, times in seconds.items():
        best, median = min(times), statistics.median(times)
        results[name] |= {"cpu_seconds": times, "docs_per_s": n_pages / best, "docs_per_s_median": n_pages / median}
    return results


def ratios(results: dict[str, dict]) -> dict[str, float]:
    speed = {name.split(")")[0][1:]: r["docs_per_s"] for name, r in results.items() if name.startswith("(")}
    return {
        "B_vs_A": speed["B"] / speed["A"],
        "C_vs_A": speed["C"] / speed["A"],
        "C_vs_B": speed["C"] / speed["B"],
        "B_vs_B_with_spacy_tokenizer": speed["B"] / speed["B'"],
        "B_extraction_and_4_filters_vs_A": speed["B''"] / speed["A"],
        "C_minus_B_ms_per_page": 1000 / speed["C"] - 1000 / speed["B"],
        "shard_read_ms_per_page": 1000 / results["reading the ingest shard alone"]["docs_per_s"],
    }


def print_report(n: int, results: dict[str, dict], ratio: dict[str, float]) -> None:
    print(f"\n{n} pages, one core, CPU time of the best round (of the median one in brackets).\n")
    print(f"{'contender':<40} {'docs/s':>8} {'(median)':>9} {'kept':>5}")
    for name, r in results.items():
        print(f"{name:<40} {r['docs_per_s']:8.1f} {r['docs_per_s_median']:9.1f} {r['kept']:>5}")

    chains = [r for r in results.values() if "steps" in r]
    steps = list(dict.fromkeys(step for r in chains for step in r["steps"]))
    print("\nms per document that reaches the step (its own timer, wall clock), best round:\n")
    print(f"{'step':<18}" + "".join(f"{r['label']:>18}" for r in chains))
    for step in steps:
        cells = [(r["steps"].get(step)) for r in chains]
        print(f"{step:<18}" + "".join(f"{c['ms_per_doc']:10.2f} ({c['docs']:>3})" if c else " " * 18 for c in cells))

    print(
        f"\n(B) Kiln's whole clean chain runs at {ratio['B_vs_A']:.2f}x the speed of (A) datatrove's "
        f"Trafilatura + filters;\n(B'') its extraction and the same four filters alone at "
        f"{ratio['B_extraction_and_4_filters_vs_A']:.2f}x; (C) the stage through STAGE.run at {ratio['C_vs_A']:.2f}x,"
        f" {ratio['C_vs_B']:.3f}x (B): {ratio['C_minus_B_ms_per_page']:.2f} ms more per page, reading the ingest "
        f"shard alone {ratio['shard_read_ms_per_page']:.2f} ms.\nWith spaCy's tokenizer (B') instead of the fast "
        f"one, (B) would run {ratio['B_vs_B_with_spacy_tokenizer']:.2f}x slower."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each contender's best round counts")
    parser.add_argument("--out", type=result_path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (AEB / "ground-truth.json").is_file():
        print(f"skipped: benchmark data not found at {AEB}")
        return 0

    quiet()
    pinned = extraction.pin_to_one_cpu()
    pages = load_pages()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-clean-") as folder:
        contenders = {
            "(A) datatrove Trafilatura + 4 filters": datatrove_chain(pages),
            "(B) kiln clean chain": kiln_chain("B", pages),
            "(B') the same, spaCy tokenizer": kiln_chain("B'", pages, tokenizer="spacy"),
            "(B'') kiln extraction + 4 filters": kiln_chain("B''", pages, only=("extraction", *WORD_FILTERS)),
            "(C) kiln clean STAGE.run": (stage := StageRun(pages, Path(folder))),
            "reading the ingest shard alone": ShardRead(stage),
            "kiln extraction alone": ExtractionAlone(pages),
        }
        results = measure(contenders, args.rounds, len(pages))
    ratio = ratios(results)
    print_report(len(pages), results, ratio)

    out = {
        "pages": len(pages),
        "rounds": args.rounds,
        "pinned_cpus": pinned,
        "clock": "CPU seconds, this process and its finished children",
        "python": platform.python_version(),
        "versions": {pkg: version(pkg) for pkg in ("datatrove", "trafilatura", "spacy", "py3langid")},
        "contenders": results,
        "ratios": ratio,
    }
    write_result(args.out, out)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
