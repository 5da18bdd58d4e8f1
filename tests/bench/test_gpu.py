"""bench/gpu.py --dry-run, as the suite runs it: every part of the GPU benchmark on the CPU at tiny
shapes (bf16 autocast, torch.compile on), so that the script a GPU run depends on cannot rot
before a GPU appears. GPU-only checks are skipped with a reason, never silently."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("flops", "train-eager", "train-compiled", "hf-eager", "attention", "fsdp", "decode", "quant",
         "correctness", "hf-compiled")


def bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/gpu.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    done = bench("--dry-run", "--out", str(out))
    return done, json.loads(out.read_text()) if out.exists() else None


def test_every_part_runs_on_the_cpu_or_says_why_not(dry_run):
    done, result = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert result["bench"] == "bench/gpu.py" and result["mode"] == "dry-run" and result["ok"], result.get("failed")
    assert list(result["parts"]) == list(PARTS)
    for name, part in result["parts"].items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("traceback"))
        for check, why in part.get("skipped_checks", {}).items():
            assert why and f"skipped {check}: {why}" in done.stdout, (name, check)  # printed, never silent
    # the table, printed and in the JSON, names every part with its status
    for name in PARTS:
        assert any(line.split()[:2] == [name, "ok"] for line in result["table"].splitlines()), name
    assert result["table"] in done.stdout
    # the GPU-only checks, each skipped with its reason
    skipped = {check for part in result["parts"].values() for check in part.get("skipped_checks", {})}
    assert {"nccl", "CUDA int8/int4 kernels", "bf16 on the GPU"} <= skipped, skipped
    assert any("flash kernel alone" in check for check in skipped), skipped


def test_the_figures_a_gpu_run_is_read_for(dry_run):
    _, result = dry_run
    parts = result["parts"]
    for name in ("train-eager", "train-compiled", "hf-eager", "hf-compiled", "fsdp"):  # the loss falls
        assert parts[name]["loss_last"] < parts[name]["loss_first"], (name, parts[name]["losses"])
    for name in ("train-eager", "train-compiled", "hf-eager"):
        assert parts[name]["tokens_per_s"] > 0 and parts[name]["mfu"] is None and parts[name]["mfu_why_none"]
    assert parts["train-compiled"]["graphs_compiled_in_timed_steps"] == 0
    assert parts["train-eager"]["attention"]["backends"], parts["train-eager"]["attention"]
    assert set(result["ratios"]) == {"kiln_compiled_vs_hf_eager", "kiln_eager_vs_hf_eager",
                                     "kiln_compiled_vs_hf_compiled"}
    # the MFU formula against counted FLOPs, for every preset
    for name in ("small", "medium", "1b"):
        assert 0.9 <= parts["flops"][name]["ratio"] <= 1.02, parts["flops"][name]
    # the SDPA backend was seen, and is a fused one
    assert parts["attention"]["train"]["backends"] and "math" not in parts["attention"]["train"]["backends"]
    # greedy tokens identical to transformers' generate on the exported model
    assert parts["decode"]["fp32"]["identical"] and parts["decode"]["fp32"]["distinct_tokens"] > 1
    # the sharded checkpoint round trip
    fsdp = parts["fsdp"]
    assert fsdp["sharded"] and fsdp["world_size"] == 1 and fsdp["backend"] == "gloo"
    assert fsdp["weights_equal"] and fsdp["optimizer_equal"] and fsdp["loader_resumes"] and fsdp["round_trip_equal"]
    # quantized decoding said which kernels it used
    assert parts["quant"]["int8"]["kernels"] and parts["quant"]["int4-rtn"]["kernels"]
    # bf16 against fp32 over 50 steps
    assert parts["correctness"]["steps"] == 50 and parts["correctness"]["max_relative_gap"] <= 0.02
    assert "transformers" in result["meta"]["packages_beyond_torch"], result["meta"]["packages_beyond_torch"]


def test_a_file_that_is_not_an_earlier_result_is_never_replaced(tmp_path):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    done = bench("--dry-run", "--parts", "flops", "--out", str(mine), timeout=120)
    assert done.returncode != 0 and "not replacing it" in done.stderr, done.stderr[-2000:]
    assert mine.read_text() == '{"my": "notes"}'
    unknown = bench("--parts", "nope", timeout=120)
    assert unknown.returncode == 2 and "no part nope" in unknown.stderr
