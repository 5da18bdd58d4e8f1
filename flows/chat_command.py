"""`kiln chat`: talk to a trained model in the terminal (registered in flows/cli.py; its
arguments shared with the other model commands through flows/options.py).

The loop itself is `model.chat.run_chat`; this is the command line around it.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from flows.options import DataDirOpt, ModelArg, resolve_model_dir


def chat(
    model: ModelArg = None,
    data_dir: DataDirOpt = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_k: Annotated[int | None, typer.Option(help="Sample among the k likeliest tokens.")] = 50,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling: the smallest set with this mass.")] = 0.95,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per reply.")] = 256,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation with.")] = None,
) -> None:
    """Chat with a trained model: streamed replies, history kept in the KV cache; /reset, /exit."""
    from model.chat import load_for_generation, run_chat
    from model.generate import SamplingConfig
    from storage import ArtifactStore, default_root

    loaded = load_for_generation(resolve_model_dir(ArtifactStore(data_dir or default_root()), model))
    sampling = SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    run_chat(loaded, input, sys.stdout, sampling, system=system)
