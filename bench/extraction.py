"""Benchmark: Kiln's main-content extractor (pipelines/extract.py) against trafilatura,
resiliparse and datatrove's Trafilatura block, on one core.

    python bench/extraction.py [--repeats 3] [--out bench/results/extraction.json]

Data: the scrapinghub article-extraction benchmark (181 pages, ``html/<hash>.html.gz`` and
``ground-truth.json``) from ``../shared/data/html_extraction/scrapinghub_aeb``; the script
says so and exits 0 when that folder is absent. Pages are decoded once, with
``pipelines.extract.decode_html``, and every contender gets the same strings.

* Quality: the benchmark's own metric (``bench/extraction_metric.py``: word 4-gram shingles,
  per-document precision and recall, averaged, F1 of the two means).
* Speed: CPU seconds over the 181 pages (this process plus its finished worker processes,
  so other load on the machine does not count and the figure is one core's work), best of
  ``--repeats`` rounds, every contender taking its turn within each round, the process and
  its workers pinned to one CPU.
* Blocks: datatrove's ``Trafilatura`` block (its defaults) and our ``KilnExtractor``, alone
  and each followed by the same four filters (Gopher repetition, Gopher quality, C4 with
  ``filter_no_terminal_punct=False``, FineWeb quality) chained as ``step.run(docs, rank=0,
  world_size=1)`` generators. Both inherit ``BaseExtractor.run`` unchanged (one worker
  process fed over a pipe, per-page timeout), so they pay the same orchestration; what it
  costs per page is measured on a no-op extractor block against the bare no-op.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

from datatrove.pipeline.extractors.base import BaseExtractor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from bench._results import result_path, write_result  # noqa: E402

AEB = ROOT.parent / "shared" / "data" / "html_extraction" / "scrapinghub_aeb"
DEFAULT_OUT = ROOT / "bench" / "results" / "extraction.json"

Pages = dict[str, tuple[str, str | None]]  # id -> (html, url)


def load_pages(folder: Path = AEB) -> tuple[Pages, dict]:
    from pipelines.extract import decode_html

    ground_truth = json.loads((folder / "ground-truth.json").read_text(encoding="utf-8"))
    pages = {}
    for key in sorted(ground_truth):
        with gzip.open(folder / "html" / f"{key}.html.gz") as f:
            pages[key] = (decode_html(f.read()), ground_truth[key].get("url"))
    return pages, ground_truth


def pin_to_one_cpu() -> list[int] | None:
    """Run everything, block workers included (they inherit the mask), on one CPU, so that
    functions and blocks meet the same cache and the same neighbours."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    return sorted(os.sched_getaffinity(0))


def quiet_logs() -> None:
    """trafilatura warns about every page it discards and datatrove logs each worker's
    shutdown; neither helps reading the table."""
    import logging

    from datatrove.utils.logging import logger

    logging.getLogger("trafilatura").setLevel(logging.CRITICAL)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")


# ------------------------------------------------------------------ contenders


def function_contenders() -> dict[str, Callable[[str, str | None], str | None]]:
    import trafilatura
    from resiliparse.extract.html2text import extract_plain_text

    from pipelines.extract import ExtractConfig, extract

    resiliparse_backend = ExtractConfig(backend="resiliparse")
    return {
        "kiln": lambda html, url: extract(html, url),
        "kiln (resiliparse backend)": lambda html, url: extract(html, url, resiliparse_backend),
        # what the benchmark's own run_trafilatura.py calls
        "trafilatura (include_comments=False)": lambda html, url: trafilatura.extract(html, include_comments=False),
        "trafilatura (defaults)": lambda html, url: trafilatura.extract(html),
        # the call inside datatrove's Trafilatura block, with its defaults
        "trafilatura (datatrove block args)": lambda html, url: trafilatura.extract(
            html, favor_precision=True, include_comments=False, deduplicate=True
        ),
        "resiliparse": lambda html, url: extract_plain_text(html, main_content=True),
    }


def cpu_clock() -> float:
    """CPU seconds of this process plus those of its finished children (a datatrove
    extractor block's worker is joined when the block ends): load from other processes on
    the machine does not count, and one core's worth of work is what is measured."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def timed(fn: Callable[[], object], clock: Callable[[], float]) -> tuple[float, object]:
    start = clock()
    result = fn()
    return clock() - start, result


def quality_filters() -> list:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return [
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
    ]


def run_chain(pages: Pages, extractor_factory: Callable[[], object], with_filters: bool, passes: int = 1) -> list:
    from datatrove.data import Document

    docs = (
        Document(text=html, id=f"{key}/{i}", metadata={"url": url})
        for i in range(passes)
        for key, (html, url) in pages.items()
    )
    steps = [extractor_factory()] + (quality_filters() if with_filters else [])
    for step in steps:
        docs = step.run(docs, rank=0, world_size=1)
    return list(docs)


class NullExtractor(BaseExtractor):
    """A BaseExtractor whose extraction costs nothing: against the bare no-op it isolates
    what BaseExtractor's orchestration (worker process, pipe, timeout) costs per page."""

    name = "null extractor"

    def __init__(self, timeout: float = 1.0):
        super().__init__(timeout)

    def extract(self, text: str) -> str:
        return null_extract(text)


def null_extract(text: str) -> str:
    return text[:100]


def fresh_trafilatura_dedup(fn: Callable[[], object]) -> Callable[[], object]:
    """trafilatura's deduplicate=True (on in datatrove's block) keeps a module-level LRU
    cache across documents; a worker forked after an earlier pass would inherit it and drop
    every page as a duplicate. Each datatrove-args run starts from an empty cache, as a
    fresh pipeline worker would."""
    from trafilatura.deduplication import LRU_TEST

    def run():
        LRU_TEST.clear()
        return fn()

    return run


def block_contenders(pages: Pages) -> dict[str, Callable[[], list]]:
    from datatrove.pipeline.extractors import Trafilatura

    from pipelines.extract import KilnExtractor

    return {
        "KilnExtractor block": lambda: run_chain(pages, KilnExtractor, False),
        "datatrove Trafilatura block": fresh_trafilatura_dedup(lambda: run_chain(pages, Trafilatura, False)),
        "KilnExtractor + filters": lambda: run_chain(pages, KilnExtractor, True),
        "datatrove Trafilatura + filters": fresh_trafilatura_dedup(lambda: run_chain(pages, Trafilatura, True)),
    }


Timings = dict[str, float]


def run_rounds(pages: Pages, repeats: int) -> tuple[Timings, dict[str, dict], Timings, dict[str, int]]:
    """Best CPU time of every contender over ``repeats`` rounds, all contenders (functions
    and datatrove chains) taking turns within each round; with the functions' predictions
    and the number of pages each chain keeps."""
    functions = function_contenders()
    chains = block_contenders(pages)
    run_chain(pages, NullExtractor, True)  # warm-up: the filters load their tokenizers once
    function_s = {name: float("inf") for name in functions}
    chain_s = {name: float("inf") for name in chains}
    predictions: dict[str, dict] = {}
    kept: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in functions.items():
            run = lambda fn=fn: {k: fn(html, url) for k, (html, url) in pages.items()}  # noqa: E731
            if name == "trafilatura (datatrove block args)":
                run = fresh_trafilatura_dedup(run)
            seconds, predictions[name] = timed(run, cpu_clock)
            function_s[name] = min(function_s[name], seconds)
        for name, chain in chains.items():
            seconds, result = timed(chain, cpu_clock)
            chain_s[name] = min(chain_s[name], seconds)
            kept[name] = len(result)
    return function_s, predictions, chain_s, kept


def orchestration_ms_per_page(pages: Pages, repeats: int, passes: int = 5) -> float:
    """CPU ms per page of BaseExtractor.run around a no-op, over ``passes`` passes through
    the pages in one chain (a pipeline worker sees thousands of pages per process, so the
    one fork per block is amortised as it would be there)."""
    n = passes * len(pages)
    bare = lambda: [null_extract(html) for _ in range(passes) for html, _ in pages.values()]  # noqa: E731
    block = lambda: run_chain(pages, NullExtractor, False, passes)  # noqa: E731
    best_bare = best_block = float("inf")
    for _ in range(repeats):
        best_bare = min(best_bare, timed(bare, cpu_clock)[0])
        best_block = min(best_block, timed(block, cpu_clock)[0])
    return (best_block - best_bare) / n * 1000


# ------------------------------------------------------------------ report


def score(ground_truth: dict, predictions: dict[str, dict]) -> dict[str, dict[str, float]]:
    from extraction_metric import evaluate

    return {name: evaluate(ground_truth, preds) for name, preds in predictions.items()}


def block_ratios(block_s: dict) -> dict[str, float]:
    return {
        "kiln_block_vs_datatrove_trafilatura_block": block_s["datatrove Trafilatura block"]
        / block_s["KilnExtractor block"],
        "kiln_chain_vs_datatrove_trafilatura_chain": block_s["datatrove Trafilatura + filters"]
        / block_s["KilnExtractor + filters"],
    }


def print_table(n: int, cpu_s: dict, quality: dict, block_s: dict, kept: dict, orchestration_ms: float) -> None:
    base = cpu_s["kiln"]
    print(f"\n{n} pages, CPU time (one core). Quality: scrapinghub article-extraction-benchmark metric.\n")
    print(f"{'extractor':<40} {'F1':>6} {'prec':>6} {'recall':>6} {'docs/s':>8} {'time vs kiln':>13}")
    for name, seconds in cpu_s.items():
        q = quality[name]
        print(
            f"{name:<40} {q['f1']:6.3f} {q['precision']:6.3f} {q['recall']:6.3f} "
            f"{n / seconds:8.1f} {seconds / base:12.2f}x"
        )
    print(f"\n{'datatrove steps (CPU incl. worker)':<40} {'docs/s':>8} {'kept':>6}")
    for name, seconds in block_s.items():
        print(f"{name:<40} {n / seconds:8.1f} {kept[name]:>6}")
    ratios = block_ratios(block_s)
    print(
        f"\nKilnExtractor block is {ratios['kiln_block_vs_datatrove_trafilatura_block']:.2f}x as fast as datatrove's "
        f"Trafilatura block; followed by the filters: {ratios['kiln_chain_vs_datatrove_trafilatura_chain']:.2f}x."
    )
    print(
        f"BaseExtractor orchestration (same for both blocks): {orchestration_ms:.3f} ms/page, "
        f"{orchestration_ms / (base / n * 1000):.1%} of kiln's extraction time per page."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each contender's best round counts")
    parser.add_argument("--out", type=result_path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (AEB / "ground-truth.json").is_file():
        print(f"skipped: benchmark data not found at {AEB}")
        return 0

    quiet_logs()
    pinned = pin_to_one_cpu()
    pages, ground_truth = load_pages()
    cpu_s, predictions, block_s, kept = run_rounds(pages, args.repeats)
    quality = score(ground_truth, predictions)
    orchestration_ms = orchestration_ms_per_page(pages, args.repeats)
    n = len(pages)
    print_table(n, cpu_s, quality, block_s, kept, orchestration_ms)

    results = {
        "pages": n,
        "repeats": args.repeats,
        "pinned_cpus": pinned,
        "python": platform.python_version(),
        "versions": {pkg: version(pkg) for pkg in ("trafilatura", "resiliparse", "datatrove", "lxml")},
        "functions": {
            name: {**quality[name], "cpu_seconds": cpu_s[name], "docs_per_s": n / cpu_s[name]} for name in cpu_s
        },
        "datatrove_chains": {
            name: {"cpu_seconds": s, "docs_per_s": n / s, "kept": kept[name]} for name, s in block_s.items()
        },
        "ratios": {
            "kiln_vs_trafilatura_speed": cpu_s["trafilatura (include_comments=False)"] / cpu_s["kiln"],
            "kiln_vs_resiliparse_speed": cpu_s["resiliparse"] / cpu_s["kiln"],
            **block_ratios(block_s),
        },
        "orchestration_ms_per_page": orchestration_ms,
    }
    write_result(args.out, results)
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
