"""Quantization: the int8/int4 math, torch's packed kernels against dequantizing (a few rows by
the one, many by the other), AWQ's rescaling keeping the model's function, the quantize stage on a
model trained here on real prose, and bench/quantize.py's quick mode."""

import copy
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from model import evaluate, quantization, quantize
from model.awq import awq_scale, search_clip
from model.checkpoint import load_checkpoint
from model.quantization import (
    PACKED_KERNEL_MAX_ROWS,
    QuantizedLinear,
    fake_quantize_int4,
    group_size_for,
    install,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from tests.model.conftest import TRAINED_SHAPE

ROOT = Path(__file__).resolve().parents[2]


def test_int8_and_int4_stay_within_half_a_step():
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3, 256)
    q8 = quantize_int8(w)
    assert q8.values.dtype == torch.int8 and q8.shape == (48, 256)
    assert ((q8.dequantize() - w).abs() <= q8.scales[:, None] / 2 + 1e-6).all()
    q4 = quantize_int4(w, 128)
    assert q4.values.dtype == torch.uint8 and q4.values.shape == (48, 128) and q4.group_size == 128
    step = q4.scales.repeat_interleave(128, dim=1)
    assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-5).all()
    q = torch.randint(0, 16, (5, 64), dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert group_size_for(704, 128) == 64 and group_size_for(256, 128) == 128 and group_size_for(96, 128) == 96


@pytest.mark.parametrize("bits", [8, 4])
def test_the_packed_cpu_kernels_agree_with_dequantizing(bits):
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(1))
    linear = QuantizedLinear(quantize_int8(w) if bits == 8 else quantize_int4(w, 128))
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(2))
    reference = linear(x)
    assert linear.kernel == "dequantize"
    assert linear.use_kernel() == ("int8-pack" if bits == 8 else "int4-pack"), "torch 2.13's CPU kernels exist"
    assert torch.allclose(linear.packed_matmul(x), reference, atol=1e-3 * float(reference.abs().max()))
    assert torch.allclose(linear(x[:1]), reference[:1], atol=1e-3 * float(reference.abs().max())), "one row: the kernel"


# ------------------------------------------------------------------ a model trained on real prose

CALIBRATION_ROWS = 32


def heldout_rows(store, packed) -> torch.Tensor:
    """The val rows the calibration does not use (it takes the split's last rows)."""
    tables = [pq.read_table(store.local_path(packed, f.path)) for f in packed.files_under("val")]
    rows = [r for t in tables for r in t.column("tokens").to_pylist()]
    return torch.tensor(rows[:-CALIBRATION_ROWS])


@torch.no_grad()
def perplexity(model, rows: torch.Tensor) -> float:
    _, loss = model.eval()(rows[:, :-1], rows[:, 1:])
    return math.exp(float(loss))


@pytest.mark.parametrize("method", quantize.METHODS)
def test_many_rows_dequantize_for_the_call_and_agree_with_the_packed_kernels(trained, method, monkeypatch):
    """Evaluation and prefill (many rows) multiply by each weight dequantized for the call, decoding
    (a few rows) by torch's packed kernel: on a trained model's weights, and on the activations each
    layer sees in it, the two agree, and the logits are those of the packed kernels alone (what
    they were) and close to fp32's."""
    store, artifact, packed, _ = trained
    model, _ = load_checkpoint(store.local_path(artifact, "model"))
    rows = heldout_rows(store, packed)[:16, :-1]  # 16 x 64: 1024 rows for every matmul
    calibration = quantize.calibration_rows(store, packed, CALIBRATION_ROWS) if method == "int4-awq" else None
    with torch.no_grad():
        reference = model(rows)[0]
        quantized = copy.deepcopy(model)
        kernels = install(quantized, quantize.quantize_model(quantized, method, 128, calibration)[0])
        assert set(kernels) == ({"int8-pack"} if method == "int8" else {"int4-pack", "int8-pack"}), kernels
        seen: dict[QuantizedLinear, torch.Tensor] = {}

        def keep(module, args, _output):
            seen[module] = args[0].reshape(-1, module.in_features)

        hooks = [m.register_forward_hook(keep) for m in quantized.modules() if isinstance(m, QuantizedLinear)]
        logits = quantized(rows)[0]
        for hook in hooks:
            hook.remove()
        assert len(seen) == 7 * TRAINED_SHAPE["n_layer"] + 1, "every block's linear layers and the head"
        for layer, x in seen.items():
            assert x.size(0) > PACKED_KERNEL_MAX_ROWS
            by_kernel = layer.packed_matmul(x)
            assert torch.allclose(layer(x), by_kernel, rtol=1e-4, atol=1e-5 * float(by_kernel.abs().max()))
        monkeypatch.setattr(quantization, "PACKED_KERNEL_MAX_ROWS", rows.numel())
        by_kernels = quantized(rows)[0]
        monkeypatch.undo()
        one_token = quantized(rows[:1, :1])[0]  # one row: the packed kernels
    scale = float(reference.abs().max())
    assert float((logits - by_kernels).abs().max()) < 1e-4 * scale
    assert torch.allclose(one_token[0, 0], logits[0, 0], atol=1e-4 * scale)
    error = float((logits - reference).abs().mean() / reference.abs().mean())
    agree = float((logits.argmax(-1) == reference.argmax(-1)).float().mean())
    assert error < (0.01 if method == "int8" else 0.05) and agree > (0.98 if method == "int8" else 0.9), (error, agree)


def test_awq_rescaling_keeps_what_the_model_computes(trained):
    store, artifact, packed, _ = trained
    model, _ = load_checkpoint(store.local_path(artifact, "model"))
    rows = heldout_rows(store, packed)[:16, :-1]
    before = model(rows)[0]
    scaled = copy.deepcopy(model)
    calibration = quantize.calibration_rows(store, packed, CALIBRATION_ROWS)
    chosen = awq_scale(scaled, calibration, group_size=128, clip=False)
    assert torch.allclose(scaled(rows)[0], before, atol=1e-3), "the scales are folded, not lost"
    assert len(chosen) == TRAINED_SHAPE["n_layer"] * 4, "qkv, o, gate_up and down in every block"
    assert all(c["error_vs_rtn"] <= 1.0 for c in chosen.values()), "alpha = 0 is RTN: never worse on calibration"
    assert any(c["alpha"] > 0 for c in chosen.values()), "a trained model has salient channels"


def test_clipping_never_raises_a_group_s_error_and_narrows_some():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 256, generator=generator)
    weight[:, 7] *= 8  # an outlier column: clipping it trades its error for finer steps elsewhere
    x = torch.randn(512, 256, generator=generator)
    clipped, mean_ratio = search_clip(weight, x, 128)
    assert mean_ratio < 1 and (clipped.abs() <= weight.abs() + 1e-7).all()

    def error(w):
        return float((x @ fake_quantize_int4(w, 128).t() - x @ weight.t()).pow(2).mean())

    assert error(clipped) < error(weight), "the clipped weights quantize closer to the original outputs"


@pytest.mark.slow
def test_quantize_stage_int8_close_int4_small_and_evaluate_reads_it(trained, caplog, tmp_path):
    store, artifact, packed, tok = trained
    rows = heldout_rows(store, packed)
    reference = perplexity(load_checkpoint(store.local_path(artifact, "model"))[0], rows)
    found = {}
    for method in quantize.METHODS:
        settings = quantize.QuantizeConfig(model="pretrain", method=method, calibration_rows=CALIBRATION_ROWS)
        made = quantize.STAGE.run(settings, [artifact, packed, tok], store)
        with caplog.at_level("INFO", logger="kiln"):
            model, meta = load_checkpoint(store.local_path(made, "model"))
        assert meta["quantization"]["method"] == method
        assert ("int8-pack" if method == "int8" else "int4-pack") in caplog.text, "the log says which matmul runs"
        found[method] = (perplexity(model, rows), made)
    int8, rtn, awq = (found[m][0] for m in quantize.METHODS)
    assert abs(int8 / reference - 1) < 0.01, (reference, int8)
    # this model, trained for seconds, has no strong activation outliers: int4 costs it little either way
    assert 0 < rtn / reference - 1 < 0.02 and 0 < awq / reference - 1 < 0.02, (reference, rtn, awq)
    for method in ("int4-rtn", "int4-awq"):
        assert found[method][1].stats["size_ratio"] <= 0.3, found[method][1].stats

    made = found["int4-awq"][1]
    assert quantize.STAGE.run(quantize.QuantizeConfig(model="pretrain", calibration_rows=CALIBRATION_ROWS),
                              [artifact, packed, tok], store).fingerprint == made.fingerprint, "cached"
    results = evaluate.STAGE.run(evaluate.EvaluateConfig(model="quantize", eval_batches=4, mc_questions=8,
                                                         sample_tokens=8), [made, packed, tok], store).stats
    assert results["quantization"]["method"] == "int4-awq" and results["val_ppl"] > 1
    assert store.lineage(made.fingerprint)["inputs"][0]["stage"] == "pretrain"

    # exported (dequantized) for transformers, it computes what the quantized model computes
    from transformers import AutoModelForCausalLM

    from model.export import export_llama

    hf = AutoModelForCausalLM.from_pretrained(str(export_llama(store.local_path(made, "model"), tmp_path / "hf")))
    ours = load_checkpoint(store.local_path(made, "model"))[0]
    ids = rows[:2, :32]
    with torch.no_grad():
        expected = ours(ids)[0]
        assert torch.allclose(hf(ids).logits, expected, atol=2e-3 * float(expected.abs().max()))


def plant_activation_outliers(model, channels=(3, 40, 77, 101), factor=30.0) -> None:
    """What large language models have and AWQ is for: a few input channels whose activations
    are much larger than the rest, their weights correspondingly small. Planted without changing
    the function: the norm's gain of those channels times `factor`, the weight columns that read
    them divided by it."""
    with torch.no_grad():
        for block in model.blocks:
            for norm, linears in ((block.attn_norm, (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)),
                                  (block.mlp_norm, (block.mlp.gate_proj, block.mlp.up_proj))):
                norm.weight[list(channels)] *= factor
                for linear in linears:
                    linear.weight[:, list(channels)] /= factor


def test_with_activation_outliers_awq_costs_at_most_half_of_rtn(trained):
    # AWQ's paper: LLaMA-7B on WikiText-2, FP16 5.68, RTN 5.96, AWQ 5.78; here at most half the increase too
    store, artifact, packed, _ = trained
    rows = heldout_rows(store, packed)
    model, _ = load_checkpoint(store.local_path(artifact, "model"))
    reference = perplexity(model, rows)
    plant_activation_outliers(model)
    assert perplexity(model, rows) == pytest.approx(reference, rel=1e-4), "the same function"
    found = {}
    for method in ("int4-rtn", "int4-awq"):
        quantized = copy.deepcopy(model)
        weights, _ = quantize.quantize_model(quantized, method, 128, quantize.calibration_rows(store, packed,
                                                                                               CALIBRATION_ROWS))
        install(quantized, weights)
        found[method] = perplexity(quantized, rows)
    rtn, awq = found["int4-rtn"] - reference, found["int4-awq"] - reference
    assert rtn > 0.01 * reference, f"the outliers make round-to-nearest costly: {found}, fp32 {reference}"
    assert awq <= 0.5 * rtn, f"{found}, fp32 {reference}"


@pytest.mark.slow
def test_the_bench_quick_mode(trained, tmp_path):
    """bench/quantize.py --quick, as the suite runs it, on a copy of the trained model's store:
    the four models side by side, with the evaluate stage's time against fp32's and the
    matmul crossover that PACKED_KERNEL_MAX_ROWS is set from (the goals are read in the bench's
    own output, bench/results/quantize.json, not asserted here)."""
    store, _, _, _ = trained
    data, out = tmp_path / "data", tmp_path / "quantize.json"
    shutil.copytree(store.root, data)
    command = [sys.executable, "bench/quantize.py", "--quick", "--data-dir", str(data), "--model", "pretrain", "--out",
               str(out)]
    done = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["runs"]) == ["fp32", *quantize.METHODS]
    for method in quantize.METHODS:
        assert result["runs"][method]["evaluate"]["seconds"] > 0
        assert math.isfinite(result["evaluate_vs_fp32"][method]) and result["evaluate_vs_fp32"][method] > 0
    assert set(result["crossover_rows"]) == {"128", "256"}
    assert result["packed_kernel_max_rows"] == PACKED_KERNEL_MAX_ROWS
    assert "quantized evaluate / fp32 evaluate" in done.stdout
