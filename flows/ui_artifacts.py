"""What each stage shows in the Prefect UI: its numbers, drop reasons, loss curve, a link to its files.

Published from the flow after every stage, cached or built, so every run carries the whole
picture. Artifact keys are `<stage>-<what>`; the UI keeps their history across runs.
"""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.terminal_tables import dropped

CHART_WIDTH, CHART_HEIGHT = 60, 12


def _flat(stats: dict[str, Any], prefix: str = "") -> list[dict[str, Any]]:
    rows = []
    for key, value in stats.items():
        if key in ("loss_curve", "dropped"):
            continue
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        elif not isinstance(value, list):
            rows.append({"metric": f"{prefix}{key}", "value": value})
    return rows


def loss_chart(curve: list[list[float]]) -> str:
    """A text chart of the training loss: readable in the UI, a log file or a terminal."""
    if not curve:
        return "(no steps)"
    losses = [loss for _, loss in curve]
    low, high = min(losses), max(losses)
    span = (high - low) or 1.0
    width = min(CHART_WIDTH, len(losses))
    columns = [losses[min(len(losses) - 1, i * len(losses) // CHART_WIDTH)] for i in range(width)]
    grid = [[" "] * len(columns) for _ in range(CHART_HEIGHT)]
    for x, loss in enumerate(columns):
        y = round((high - loss) / span * (CHART_HEIGHT - 1))
        grid[y][x] = "•"
    lines = [f"{high - span * r / (CHART_HEIGHT - 1):7.3f} │{''.join(row)}" for r, row in enumerate(grid)]
    lines.append(" " * 8 + "└" + "─" * len(columns))
    lines.append(" " * 9 + f"step {curve[0][0]} … {curve[-1][0]}")
    return "\n".join(lines)


def publish(stage: str, run: dict[str, Any], location: str | None) -> None:
    manifest = run["manifest"]
    stats = manifest["stats"]
    status = "cached" if run["cached"] else "built"
    create_table_artifact(
        key=f"{stage}-summary", table=_flat(stats),
        description=f"{stage} ({status}) — artifact {manifest['fingerprint'][:12]}",
    )
    if drops := dropped(stats):
        create_table_artifact(
            key=f"{stage}-dropped",
            table=[{"reason": r, "documents": n} for r, n in sorted(drops.items(), key=lambda kv: -kv[1])],
            description=f"{stage}: documents dropped, by reason (clean: by filter)",
        )
    if stats.get("loss_curve"):
        final = {k: v for k, v in stats.items() if k.startswith("val_") or k.startswith("final_")}
        create_markdown_artifact(
            key=f"{stage}-loss-curve",
            markdown=f"## {stage}: training loss\n\n```\n{loss_chart(stats['loss_curve'])}\n```\n\n"
                     + "\n".join(f"- **{k}**: {v}" for k, v in final.items()),
            description=f"{stage}: loss curve and final metrics",
        )
    if stats.get("sample"):
        chat = stats.get("chat_sample")
        answer = f"\n\n## Sample chat\n\n**user:** {chat['user']}\n\n**assistant:** {chat['assistant']}" if chat else ""
        create_markdown_artifact(key=f"{stage}-sample", markdown=f"## Sample generation\n\n> {stats['sample']}{answer}",
                                 description=f"{stage}: samples from the model")
    if location:
        link = location if "://" in location else f"file://{location}"
        create_link_artifact(key=f"{stage}-files", link=link, link_text=f"{stage}/{manifest['fingerprint'][:12]}",
                             description=f"{stage}: the artifact directory")
        if stats.get("loss_curve"):  # a training stage: its TensorBoard run
            create_link_artifact(key=f"{stage}-tensorboard", link=f"{link}/{stage}",
                                 link_text=f"tensorboard --logdir {location}", description="TensorBoard logs")
