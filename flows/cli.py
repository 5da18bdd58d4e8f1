"""The `kiln` command. Every stage command runs the chain up to that stage; what is already
built comes back from the cache, so `kiln clean` after `kiln ingest` only cleans."""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from flows.options import DataDirOpt, ModelArg, fingerprint_of, resolve_model_dir
from flows.stages import CHAINS, TABLE, chain
from storage import ArtifactStore, KilnError, StorageError, default_root, os_error_line

app = typer.Typer(
    name="kiln", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Kiln: from a raw web crawl to a language model, as cached, resumable Prefect stages.",
)
# Summaries stay readable when the output is a log file or a pipe (rich would use 80 columns).
console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML run config (default: configs/tiny.yaml).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: section.key=value (repeatable).")]
InputOpt = Annotated[list[str] | None, typer.Option(
    "--input", help="Crawl input: WARC path, glob or URL (repeatable). None: the offline sample crawl.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rebuild this command's stages even when cached.")]
ExecutorOpt = Annotated[str | None, typer.Option(
    "--executor", help="Where the data stages run their units: local (a process pool, the default) or ray.")]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="The Ray cluster for --executor ray (default: $RAY_ADDRESS, else a local Ray).")]

HarnessOpt = Annotated[str | None, typer.Option(
    "--harness", help="lm-evaluation-harness tasks, comma-separated (hellaswag,arc_easy,...; online unless local).")]
IncludePathOpt = Annotated[str | None, typer.Option(
    "--include-path", help="A directory of local lm_eval task YAMLs (for --harness).")]

UI_URL = "http://127.0.0.1:4200"


def _stage_command(command: str, until: str, help_text: str, whole_chain: bool):
    """`kiln <command>`: runs the chain up to `until`. `--force` rebuilds the command's own
    stage, or every stage of the chain for the chain commands (corpus, data, run)."""

    def run(config: ConfigOpt = None, set_: SetOpt = None, data_dir: DataDirOpt = None,
            input_: InputOpt = None, force: ForceOpt = False, executor: ExecutorOpt = None,
            ray_address: RayAddressOpt = None, harness: HarnessOpt = None, include_path: IncludePathOpt = None) -> None:
        from flows.config import load_config
        from flows.pipeline import pipeline_flow
        from flows.terminal_tables import print_summary
        from pipelines.executor import check_ray_address
        from pipelines.ingest import expand_inputs

        runtime = [f"{e.section}.{key}={value}" for e in TABLE for key, value in
                   (("executor", executor), ("ray_address", ray_address))
                   if value is not None and key in e.stage.config_cls.model_fields]
        if harness:
            runtime.append(f"evaluate.harness={json.dumps([t.strip() for t in harness.split(',') if t.strip()])}")
        if include_path:
            runtime.append(f"evaluate.harness_include_path={Path(include_path).resolve()}")
        cfg = load_config(config, [*runtime, *(set_ or [])])
        if input_:
            cfg.ingest.inputs = list(input_)
        expand_inputs(cfg.ingest)  # a missing path or empty glob fails here, before Prefect starts
        for entry in chain(until, cfg):  # so does a Ray cluster that is not there
            section = getattr(cfg, entry.section)
            if getattr(section, "executor", None) == "ray":
                check_ray_address(section.ray_address or os.environ.get("RAY_ADDRESS"))
        forced = [e.name for e in chain(until, cfg) if force and (whole_chain or e.name == command)]
        store_dir = data_dir or default_root()
        ArtifactStore(store_dir).check_usable()  # a file, or a read-only directory: one line, now
        with prefect_api() as ui:
            state = pipeline_flow(config=cfg, data_dir=store_dir, until=until, force=forced, return_state=True)
            runs = state.result()
        print_summary(console, runs, ArtifactStore(store_dir))
        run_id = state.state_details.flow_run_id
        if ui:
            console.print(f"this run in the Prefect UI: {ui}/runs/flow-run/{run_id}")
        else:
            console.print(f"to browse runs in the Prefect UI: `kiln server`, then rerun; or open {UI_URL} if one is up")

    run.__name__ = command
    run.__doc__ = help_text
    if "evaluate" not in {e.name for e in chain(until)}:  # the harness options only where evaluate runs
        # typer reads the signature; its annotations resolved here (this module's are strings)
        hints = typing.get_type_hints(run, include_extras=True)
        signature = inspect.signature(run)
        kept = [p.replace(annotation=hints[name]) for name, p in signature.parameters.items()
                if name not in ("harness", "include_path")]
        run.__signature__ = signature.replace(parameters=kept)  # type: ignore[attr-defined] # inspect reads it
    return run


for _entry in TABLE:
    if _entry.command:
        app.command(_entry.name, help=_entry.help)(_stage_command(_entry.name, _entry.name, _entry.help, False))
for _name, (_until, _help) in CHAINS.items():
    app.command(_name, help=_help)(_stage_command(_name, _until, _help, True))


@contextlib.contextmanager
def prefect_api():
    """Use the Prefect server on 127.0.0.1:4200 when one is up (`kiln server`), so runs show in
    its UI; otherwise Prefect's temporary local server. Yields the UI's URL or None. Prefect is
    first imported here (its logging set up as the CLI wants it), not by every command."""
    import urllib.request

    _quiet_prefect_tracebacks()

    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"].removesuffix("/api")
        return
    try:
        with urllib.request.urlopen(f"{UI_URL}/api/health", timeout=0.5) as response:
            up = response.status == 200
    except OSError:
        up = False
    if not up:
        from flows.temporary_server import start_tied_server

        start_tied_server()  # Prefect's own temporary server, which ends with this process however it ends
        yield None
        return
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"{UI_URL}/api"}):
        yield UI_URL


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the API and UI.")] = 4200,
) -> None:
    """Start the Prefect server and UI (SQLite in $PREFECT_HOME); `kiln` commands then run in it."""
    import os

    # The UI finds the API through these settings, not through --port / --host.
    ui_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_API_HOST=host, PREFECT_SERVER_API_PORT=str(port))
    env.setdefault("PREFECT_UI_API_URL", f"http://{ui_host}:{port}/api")
    console.print(f"Prefect UI on http://{host}:{port} (Ctrl-C stops it)")
    os.execvpe(sys.executable, [sys.executable, "-m", "prefect", "server", "start", "--host", host,
                                "--port", str(port)], env)


@app.command()
def serve(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    refresh_input: Annotated[list[str] | None, typer.Option(
        "--refresh-input", help="Crawl files the scheduled refresh looks at (glob, directory, listing).")] = None,
    cron: Annotated[str, typer.Option(help="When the corpus refresh runs (cron, server time zone).")] = "0 3 * * *",
) -> None:
    """Register the deployments (pipeline, each stage, scheduled corpus refresh) and run them."""
    import os

    from flows.deployments import serve_deployments

    with prefect_api() as ui:
        if not ui:
            raise KilnError(f"no Prefect server at {UI_URL}: start one with `kiln server` (or set PREFECT_API_URL)")
        os.environ.setdefault("PREFECT_API_URL", f"{ui}/api")  # the runner's flow-run processes use it too
        console.print(f"serving Kiln deployments; trigger them from {ui}/deployments")
        root = data_dir if data_dir and "://" in data_dir else str(Path(data_dir or default_root()).resolve())
        serve_deployments(root, str(config or "tiny"), list(refresh_input or []), cron)


@app.command()
def generate(
    model: ModelArg = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 200,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k likeliest tokens.")] = 50,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling: the smallest set with this mass.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Continue a prompt with a trained model, streaming tokens as they come (KV cache)."""
    from model.chat import load_for_generation, stream_text
    from model.generate import SamplingConfig

    loaded = load_for_generation(resolve_model_dir(ArtifactStore(data_dir or default_root()), model))
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    out = Console(highlight=False, soft_wrap=True)
    out.print(prompt, end="", style="bold")
    for piece in stream_text(loaded, loaded.encode_document_start(prompt), sampling):
        out.print(piece, end="")
    out.print()


def _register_chat() -> None:
    from flows.chat_command import chat

    app.command("chat")(chat)


_register_chat()


@app.command("export")
def export_model(
    model: ModelArg = None,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="hf: a directory (default ./export); gguf: a .gguf file or a directory for it.")] = None,
    format_: Annotated[str, typer.Option(
        "--format", help="hf (a Hugging Face Llama directory) or gguf (llama.cpp).")] = "hf",
    gguf_type: Annotated[str, typer.Option("--type", help="gguf: f32, f16, q8_0 or q4_0 (norms stay f32).")] = "f16",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an earlier Kiln export at --output (never anything Kiln did not write).")] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Write a Hugging Face Llama directory (AutoModelForCausalLM) or a GGUF file (llama.cpp, Ollama).
    The output is a new path, an empty directory, or with --overwrite an earlier Kiln export."""
    if format_ not in ("hf", "gguf"):
        raise KilnError(f"--format {format_}: expected hf or gguf")
    source = resolve_model_dir(ArtifactStore(data_dir or default_root()), model)
    output = Path((output or Path("export")).absolute())
    if format_ == "hf":
        from model.export import export_llama

        export_llama(source, output, overwrite=overwrite)
        console.print(f"exported {source} -> {output} (AutoModelForCausalLM.from_pretrained({str(output)!r}))")
    else:
        from model.export_gguf import GGUFType, export_gguf

        if output.suffix != ".gguf":
            output = output / f"{source.parent.name if source.name == 'model' else source.name}-{gguf_type}.gguf"
        export_gguf(source, output, typing.cast(GGUFType, gguf_type), overwrite=overwrite)  # it checks the type
        console.print(f"exported {source} -> {output} ({output.stat().st_size / 2**20:.1f} MiB; "
                      f"llama.cpp: llama-cli -m {output})")


@app.command("serve-model")
def serve_model(
    model: ModelArg = None,
    host: Annotated[str, typer.Option(
        help="Interface to listen on (0.0.0.0: every one; then use --api-key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one, printed).")] = 8000,
    name: Annotated[str | None, typer.Option(
        help="The model's id in the API (default: kiln-<stage>-<fp[:8]>).")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="KILN_API_KEY", show_envvar=True,
        help="Require `Authorization: Bearer KEY` on every /v1 route (401 otherwise).")] = None,
    max_batch: Annotated[int, typer.Option(
        help="Requests decoded together at most, each in its own KV cache row; more wait for a free row.")] = 16,
    data_dir: DataDirOpt = None,
) -> None:
    """Serve a model over an OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions."""
    from model.chat import load_for_generation
    from model.serve import Engine, bind, is_loopback, serve

    if not 0 <= port <= 65535:
        raise KilnError(f"--port {port}: a port is 0 to 65535")
    if not 1 <= max_batch <= 1024:
        raise KilnError(f"--max-batch {max_batch}: expected 1 to 1024")
    if api_key is not None and not api_key.strip():
        raise KilnError("--api-key: empty (unset KILN_API_KEY to serve without a key)")
    source = resolve_model_dir(ArtifactStore(data_dir or default_root()), model)
    artifact = source.parent if source.name == "model" else source
    name = name or f"kiln-{artifact.parent.name}-{artifact.name[:8]}"
    if api_key is None and not is_loopback(host):
        console.print(f"warning: serving on {host} without --api-key: anyone who can reach it can use the model",
                      highlight=False)
    engine = Engine(load_for_generation(source), name, max_batch=max_batch)
    sock = bind(host, port)  # a port in use or a bad address: a KilnError, one line
    port = sock.getsockname()[1]
    console.print(f"serving {source} as {name!r} on http://{host}:{port}/v1 (OpenAI API"
                  f"{', API key required' if api_key else ''}; Ctrl-C stops it)", highlight=False)
    serve(engine, sock, api_key)


@app.command()
def lineage(
    artifact: Annotated[str, typer.Argument(help="A fingerprint (or its first 6+ characters) or an artifact path.")],
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the lineage tree as JSON.")] = False,
) -> None:
    """Trace an artifact back to the crawl files and configs that made it."""
    from flows.terminal_tables import print_lineage

    store = ArtifactStore(data_dir or default_root())
    store.check_usable(writable=False)
    tree = store.lineage(_artifact_in(store, artifact))
    if as_json:
        print(json.dumps(tree, indent=2))
    else:
        print_lineage(Console(), tree)


def _artifact_in(store: ArtifactStore, artifact: str) -> str:
    """The fingerprint an argument names: a fingerprint (prefix), or a path inside the store."""
    if store.is_local and ("/" in artifact or Path(artifact).exists()):
        path, root = Path(artifact).resolve(), Path(store.root)
        if not path.is_relative_to(root):
            raise KilnError(f"{artifact}: not inside the data directory {root}")
    return fingerprint_of(artifact)


@app.command("ls")
def list_artifacts(data_dir: DataDirOpt = None,
                   stage: Annotated[str | None, typer.Option(help="Only this stage.")] = None) -> None:
    """List the committed artifacts in the store."""
    from flows.terminal_tables import print_artifacts

    store = ArtifactStore(data_dir or default_root())
    store.check_usable(writable=False)
    print_artifacts(Console(), store.list(stage))


@app.command()
def verify(data_dir: DataDirOpt = None,
           stage: Annotated[str | None, typer.Option(help="Only this stage.")] = None) -> None:
    """Hash every file of the committed artifacts against their manifests (damage below the file
    system, which a rerun's stat check cannot see)."""
    store = ArtifactStore(data_dir or default_root())
    store.check_usable(writable=False)
    damaged: list[str] = []
    manifests = store.list(stage, damaged=damaged)  # an unreadable manifest is damage too
    for problem in damaged:
        console.print(f"damaged: {problem}", highlight=False)
    for manifest in manifests:
        for problem in store.problems(manifest, "sha256"):
            damaged.append(f"{manifest.stage}/{manifest.short}/{problem}")
            console.print(f"damaged: {manifest.stage}/{manifest.fingerprint}/{problem}", highlight=False)
    if damaged:
        raise KilnError(f"{len(damaged)} damaged file(s), first {damaged[0]}; rerun the command that built "
                        "them: a damaged artifact is rebuilt")
    files = sum(len(m.files) for m in manifests)
    console.print(f"{len(manifests)} artifacts, {files} files: all match their manifests")


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


def _user_errors() -> tuple[type[BaseException], ...]:
    return (KilnError, StorageError, OSError)


def _class_names(kinds: tuple[type, ...]) -> set[str]:
    names, pending = set(), list(kinds)
    while pending:
        kind = pending.pop()
        names.add(kind.__name__)
        pending += kind.__subclasses__()
    return names


class _UserErrorsOnce(logging.Filter):
    """A user error reaches the terminal once, as `kiln: error:` last (see main); Prefect's own
    lines about it (the task failed, the flow failed, twice) stay in the run log, not here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], _user_errors()):
            return False
        if record.levelno < logging.INFO or not record.name.startswith("prefect."):
            return True
        message = record.getMessage()
        return not any(f"{name}:" in message or f"{name}(" in message for name in _class_names(_user_errors()))


def _quiet_prefect_tracebacks() -> None:
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # Prefect would do it at the first flow run; its handlers must exist now

    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)] + [logging.root]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if (isinstance(handler, PrefectConsoleHandler)
                    and not isinstance(handler.formatter, _WithoutUserErrorTracebacks)):
                handler.setFormatter(_WithoutUserErrorTracebacks(handler.formatter))
                handler.addFilter(_UserErrorsOnce())


def _log_to_terminal() -> None:
    """Our stages' progress lines on stderr (Prefect's own console handler shows its lines)."""
    kiln_log = logging.getLogger("kiln")
    if not kiln_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        kiln_log.addHandler(handler)
    kiln_log.setLevel(logging.INFO)
    kiln_log.propagate = False


def _fail(message: str) -> None:
    """Print the one error line last: after Prefect's temporary server has said it stopped."""
    try:
        if "prefect.server.api.server" in sys.modules:  # else Prefect started no server here
            from prefect.settings import get_current_settings

            if get_current_settings().api.url is None:
                # the command ran on a temporary server of its own: stop it now, not at exit
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker
                from prefect.server.api.server import SubprocessASGIServer

                APILogWorker.drain_all(timeout=10)  # what the run logged reaches its server first
                EventsWorker.drain_all(timeout=10)
                for server in list(SubprocessASGIServer._instances.values()):
                    server.stop()
    except Exception:  # noqa: BLE001 - an older or newer Prefect: its line may come after ours
        pass
    console.print(f"[bold red]kiln: error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(2)


def main() -> None:
    """Entry point: user errors become one line on stderr, printed last, and exit status 2."""
    _log_to_terminal()
    try:
        app()
    except (KilnError, StorageError) as err:
        _fail(str(err))
    except ValidationError as err:
        _fail(f"invalid setting: {err.errors()[0]['msg']}")
    except OSError as err:
        _fail(os_error_line(err))
    except KeyboardInterrupt:
        console.print("kiln: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
