"""The `kiln` command. Every stage command runs the chain up to that stage; what is already
built comes back from the cache, so `kiln clean` after `kiln ingest` only cleans."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console

from pipelines.common import KilnError
from storage import ArtifactStore, StorageError, default_root

app = typer.Typer(
    name="kiln", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Kiln: from a raw web crawl to a language model, as cached, resumable Prefect stages.",
)
# Summaries stay readable when the output is a log file or a pipe (rich would use 80 columns).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="YAML run config (default: configs/tiny.yaml).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a setting: section.key=value (repeatable).")]
DataDirOpt = Annotated[Optional[str], typer.Option("--data-dir", help="Artifact store: a directory or fsspec URL (default ./data or $KILN_DATA).")]
InputOpt = Annotated[Optional[list[str]], typer.Option("--input", help="Crawl input: WARC path, glob or URL (repeatable). None: the offline sample crawl.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rebuild this command's stages even when cached.")]

CORPUS_COMMANDS = {
    "ingest": "Read WARC files into Parquet document shards.",
    "clean": "Extract main text and apply the quality filters (runs ingest first if needed).",
    "dedup": "Exact and MinHash near-duplicate removal (runs ingest and clean first if needed).",
    "corpus": "The whole corpus chain: ingest -> clean -> dedup.",
}


def _corpus_command(command: str):
    def run(config: ConfigOpt = None, set_: SetOpt = None, data_dir: DataDirOpt = None,
            input_: InputOpt = None, force: ForceOpt = False) -> None:
        from flows.config import load_config
        from flows.corpus import CORPUS_STAGES, corpus_flow
        from flows.summary import print_corpus_summary
        from pipelines.ingest import expand_inputs

        overrides = list(set_ or [])
        cfg = load_config(config, overrides)
        if input_:
            cfg.ingest.inputs = list(input_)
        expand_inputs(cfg.ingest)  # a missing path or empty glob fails here, before Prefect starts
        until = "dedup" if command == "corpus" else command
        chain = ["sample-crawl", *CORPUS_STAGES[: CORPUS_STAGES.index(until) + 1]]
        forced = [s for s in chain if force and (command == "corpus" or s == command)]
        store_dir = data_dir or default_root()
        runs = corpus_flow(config=cfg, data_dir=store_dir, until=until, force=forced)
        print_corpus_summary(console, runs, ArtifactStore(store_dir))

    run.__name__ = command
    run.__doc__ = CORPUS_COMMANDS[command]
    return run


for _name in CORPUS_COMMANDS:
    app.command(_name, help=CORPUS_COMMANDS[_name])(_corpus_command(_name))


@app.command()
def lineage(
    artifact: Annotated[str, typer.Argument(help="A fingerprint (or its first 6+ characters) or an artifact path.")],
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the lineage tree as JSON.")] = False,
) -> None:
    """Trace an artifact back to the crawl files and configs that made it."""
    from flows.summary import print_lineage

    store = ArtifactStore(data_dir or default_root())
    tree = store.lineage(_fingerprint_of(artifact))
    if as_json:
        print(json.dumps(tree, indent=2))
    else:
        print_lineage(Console(), tree)


def _fingerprint_of(artifact: str) -> str:
    """Accept a fingerprint, or any path inside an artifact directory `<stage>/<fingerprint>/...`."""
    for part in reversed(Path(artifact).parts):
        if len(part) == 64 and all(c in "0123456789abcdef" for c in part):
            return part
    return artifact


@app.command("ls")
def list_artifacts(data_dir: DataDirOpt = None, stage: Annotated[Optional[str], typer.Option(help="Only this stage.")] = None) -> None:
    """List the committed artifacts in the store."""
    from flows.summary import print_artifacts

    store = ArtifactStore(data_dir or default_root())
    print_artifacts(Console(), store.list(stage))


class _WithoutUserErrorTracebacks(logging.Formatter):
    """Prefect logs a failed task with its traceback; for a user error (a missing file, a bad
    setting) the one-line message says everything, so the terminal gets just that line. The
    record is left as it was for the other handlers (the run log in the UI keeps the traceback)."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        if not (record.exc_info and isinstance(record.exc_info[1], (KilnError, StorageError))):
            return self.inner.format(record)
        saved = record.exc_info, record.exc_text
        record.exc_info, record.exc_text = None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text = saved


def _quiet_prefect_tracebacks() -> None:
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # Prefect would do it at the first flow run; its handlers must exist now

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)] + [logging.root]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutUserErrorTracebacks):
                handler.setFormatter(_WithoutUserErrorTracebacks(handler.formatter))


def _log_to_terminal() -> None:
    """Our stages' progress lines on stderr (Prefect's own console handler shows its lines)."""
    kiln_log = logging.getLogger("kiln")
    if not kiln_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        kiln_log.addHandler(handler)
    kiln_log.setLevel(logging.INFO)
    kiln_log.propagate = False


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    _log_to_terminal()
    _quiet_prefect_tracebacks()
    try:
        app()
    except (KilnError, StorageError) as err:
        console.print(f"[bold red]kiln: error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except ValidationError as err:
        console.print(f"[bold red]kiln: error:[/] invalid setting: {err.errors()[0]['msg']}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("kiln: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
