"""The standard benchmarks: EleutherAI's lm-evaluation-harness (`lm_eval`) on a Kiln model.

The model is exported as a Hugging Face Llama directory (model/export.py; a quantized model is
dequantized) into scratch space and scored by lm_eval's own `hf` backend, so the numbers are
the harness's, comparable with any other model's. Tasks by name (hellaswag, arc_easy, mmlu,
gsm8k ...: lm_eval downloads their data, so online) or from local task YAMLs (`include_path`,
works offline with `dataset_path: json` and local data files).
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from storage import ConfigError

log = logging.getLogger("kiln")


def summary(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """task -> {metric: value}, the numeric metrics only (`acc,none` -> `acc`)."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "alias" \
                    and math.isfinite(value):
                table.setdefault(task, {})[name] = round(float(value), 6)
    return table


def run_harness(model_dir: Path, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                num_fewshot: int | None = None, batch_size: int = 8) -> dict[str, Any]:
    """lm_eval's results (JSON-safe) for `tasks` on the model in `model_dir`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from model.export import export_llama

    if include_path and not Path(include_path).is_dir():
        raise ConfigError(f"{include_path}: evaluate.harness_include_path is not a directory")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        where = f"not in {include_path}" if include_path else "give local task YAMLs with --include-path"
        raise ConfigError(f"evaluate.harness: lm_eval has no task {unknown[0]!r} ({where})")
    with tempfile.TemporaryDirectory(prefix="kiln-harness-") as scratch:
        exported = export_llama(model_dir, Path(scratch) / "hf")
        log.info("evaluate: lm_eval %s on %s (%s)", lm_eval.__version__, ", ".join(tasks), model_dir)
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(exported), "dtype": "float32"}, tasks=list(tasks),
            num_fewshot=num_fewshot, batch_size=batch_size, device="cpu", limit=limit, task_manager=manager,
            log_samples=False)
    results = json.loads(json.dumps(results, default=str))  # configs hold callables and paths
    results.pop("config", None)  # the exported model's scratch path: not a property of the model
    return results
