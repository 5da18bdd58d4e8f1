"""The tables printed at the end of a command: what ran, what it made, what it dropped and why.

Stages report their numbers in the manifest's stats with shared key names:
`documents_in`, `documents_out`, `dropped` ({reason: count}; clean's is `rejected`, by filter),
`seconds`.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from storage import ArtifactStore, Manifest


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else ("-" if value is None else str(value))


def dropped(stats: dict[str, Any]) -> dict[str, int]:
    return stats.get("dropped") or stats.get("rejected") or {}


def stage_rows(runs: dict[str, dict]) -> list[dict[str, Any]]:
    rows = []
    for name, run in runs.items():
        stats = run["manifest"]["stats"]
        built_seconds = stats.get("seconds")
        docs_in = stats.get("documents_in")
        rows.append({
            "stage": name,
            "status": "cached" if run["cached"] else "built",
            "in": stats.get("documents_in"),
            "out": stats.get("documents_out"),
            "dropped": sum(dropped(stats).values()),
            "seconds": run["seconds"],
            "docs_per_s": round(docs_in / built_seconds) if docs_in and built_seconds else None,
            "fingerprint": run["manifest"]["fingerprint"],
        })
    return rows


def headline(stage: str, stats: dict[str, Any]) -> str:
    """The figures that say how a stage went, beyond documents in and out."""
    def get(key, fmt="{}"):
        value = stats.get(key)
        return fmt.format(value) if value is not None else None

    parts = {
        "sample-crawl": [get("pages", "{} pages")],
        "dedup": [get("duplicate_rate", "{:.1%} duplicates")],
        "tokenizer": [get("vocab_size", "vocab {}"), get("bytes_per_token", "{:.2f} bytes/token")],
        "pack": [f"{stats['tokens'].get('train', 0):,} train / {stats['tokens'].get('val', 0):,} val tokens"
                 if isinstance(stats.get("tokens"), dict) else None,
                 get("padding_fraction", "{:.1%} padding"), get("tokens_cropped_fraction", "{:.1%} cropped")],
        "pretrain": [get("steps", "{} steps"), get("val_bpb", "val {:.3f} bits/byte"),
                     get("tokens_per_s", "{:,.0f} tok/s")],
        "sft": [get("steps", "{} steps"),
                "held-out response loss "
                f"{stats['pretrained_val_response_loss']:.2f} -> {stats['val_response_loss']:.2f}"
                if "val_response_loss" in stats and "pretrained_val_response_loss" in stats else None],
        "dpo": [get("steps", "{} steps"), get("val_reward_accuracy", "held-out reward accuracy {:.2f}"),
                get("val_reward_margin", "margin {:.2f}")],
        "quantize": [get("method"), get("group_size", "group {}"), get("size_ratio", "{:.2f}x the weights' bytes"),
                     f"AWQ mean alpha {stats['awq']['mean_alpha']:.2f}"
                     if isinstance(stats.get("awq"), dict) else None],
        "evaluate": [get("val_bpb", "val {:.3f} bits/byte"), get("val_ppl", "ppl {:.1f}"),
                     f"multiple choice {stats['mc_acc']:.2f} (chance {stats['mc_chance']:.2f})"
                     if "mc_acc" in stats and "mc_chance" in stats else None],
    }.get(stage, [])
    return ", ".join(p for p in parts if p)


def print_summary(console: Console, runs: dict[str, dict], store: ArtifactStore) -> None:
    table = Table(title="kiln: stages", title_justify="left")
    numeric = ("docs in", "docs out", "dropped", "time", "docs/s")
    for column in ("stage", "status", *numeric, "figures", "artifact"):
        table.add_column(column, justify="right" if column in numeric else "left", no_wrap=column != "figures")
    for row in stage_rows(runs):
        table.add_row(
            row["stage"], row["status"], _count(row["in"]), _count(row["out"]), _count(row["dropped"] or None),
            f"{row['seconds']:.1f}s", _count(row["docs_per_s"]),
            headline(row["stage"], runs[row["stage"]]["manifest"]["stats"]), row["fingerprint"][:12],
        )
    console.print(table)

    reasons = Table(title="dropped, by reason", title_justify="left")
    for column in ("stage", "reason", "documents"):
        reasons.add_column(column, justify="right" if column == "documents" else "left")
    for name, run in runs.items():
        for reason, count in sorted(dropped(run["manifest"]["stats"]).items(), key=lambda kv: -kv[1]):
            if count:
                reasons.add_row(name, reason, _count(count))
    if reasons.row_count:
        console.print(reasons)

    dedup = runs.get("dedup", {}).get("manifest", {}).get("stats", {})
    if dedup.get("documents_in"):
        rate = 1 - dedup.get("documents_out", 0) / dedup["documents_in"]
        console.print(f"duplicate rate: {rate:.1%}")
    evaluated = runs.get("evaluate", {}).get("manifest", {}).get("stats", {})
    if evaluated.get("harness"):
        harness = Table(title="lm-evaluation-harness", title_justify="left")
        for column in ("task", "metric", "value"):
            harness.add_column(column, justify="right" if column == "value" else "left")
        for task, metrics in evaluated["harness"].items():
            for metric, value in metrics.items():
                harness.add_row(task, metric, f"{value:.4g}")
        console.print(harness)
    # the document continuation of the model trained to continue documents; a chat model's is its chat answer
    pretrained = runs.get("pretrain", {}).get("manifest", {}).get("stats", {})
    sample = pretrained.get("sample", evaluated.get("sample"))
    if sample is not None:
        console.print(f"sample generation: {sample}", markup=False, highlight=False)
    if evaluated.get("chat_sample"):
        chat = evaluated["chat_sample"]
        console.print(f"sample chat:  user: {chat['user']}\n        assistant: {chat['assistant']}", markup=False,
                      highlight=False)
    last = list(runs.values())[-1]["manifest"]
    console.print(f"artifacts in {store.url}; trace one with: kiln lineage {last['fingerprint'][:12]}")


def statuses_from_output(output: str) -> dict[str, str]:
    """stage -> "built"/"cached", read back from a printed stages table (tests and bench/rerun.py
    check what a `kiln` command reported)."""
    cells = [line.split("│") for line in output.splitlines() if line.startswith("│")]
    # the stages table has 9 columns (10 cells with the borders); the drops table has 3
    return {c[1].strip(): c[2].strip() for c in cells if len(c) >= 10 and c[1].strip()}


def print_lineage(console: Console, tree: dict[str, Any]) -> None:
    def label(node: dict[str, Any]) -> str:
        if node.get("missing"):
            return f"[red]{node['fingerprint'][:12]} (missing)"
        if node.get("cycle"):
            return f"[red]{node['stage']} {node['fingerprint'][:12]} (cycle: an input of its own inputs)"
        return f"[bold]{node['stage']}[/] {node['fingerprint'][:12]}  created {node['created'][:19]}"

    def add(branch: Tree, node: dict[str, Any]) -> None:
        for source in node.get("sources", []):
            branch.add(f"crawl file {source.get('url')}  sha256 {str(source.get('sha256', ''))[:12]}")
        for parent in node.get("inputs", []):
            add(branch.add(label(parent)), parent)

    root = Tree(label(tree))
    add(root, tree)
    console.print(root)


def print_artifacts(console: Console, manifests: list[Manifest]) -> None:
    table = Table()
    for column in ("stage", "fingerprint", "created", "files", "bytes", "inputs"):
        table.add_column(column)
    for m in manifests:
        table.add_row(m.stage, m.short, m.created[:19], str(len(m.files)),
                      _count(sum(f.bytes for f in m.files)), ", ".join(i[:12] for i in m.inputs))
    console.print(table)
