"""The model: KV-cache decoding equals full recompute; export to Llama keeps the logits; bad checkpoints."""

import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.export import export_llama
from model.generate import SamplingConfig, generate_tokens, greedy_without_cache
from model.model import ModelConfig, Transformer, parameter_groups


def small_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=300, seq_len=64, n_layer=2, n_head=4, n_kv_head=2, d_model=64)
    return Transformer(ModelConfig(**{**settings, **overrides}))


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_greedy_with_kv_cache_equals_without(n_kv_head):
    model = small_model(n_kv_head=n_kv_head, init_std=0.3)  # larger weights: varied argmaxes
    prompt = [5, 17, 42, 7, 99, 3]
    cached = list(generate_tokens(model, prompt, SamplingConfig(max_new_tokens=40, temperature=0)))
    assert cached == greedy_without_cache(model, prompt, 40)
    assert len(set(cached)) > 3, "a degenerate model would make this test vacuous"


def test_incremental_forward_matches_full_forward():
    model = small_model().eval()
    tokens = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        full, _ = model(tokens)
        cache = model.new_cache(2, 64)
        parts = [model(tokens[:, a:b], cache=cache)[0] for a, b in ((0, 11), (11, 12), (12, 30))]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_loss_ignores_masked_targets():
    model = small_model()
    tokens = torch.randint(0, 300, (2, 16))
    targets = tokens.roll(-1, dims=1)
    masked = targets.clone()
    masked[:, :8] = -100
    _, loss = model(tokens, masked)
    logits, _ = model(tokens)
    expected = torch.nn.functional.cross_entropy(logits[:, 8:].reshape(-1, 300), targets[:, 8:].reshape(-1))
    assert torch.allclose(loss, expected, atol=1e-6)


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_training_loss_and_gradients_equal_the_plain_cross_entropy(tie):
    """Training computes head + loss in chunks (LinearCrossEntropy), with the gradient made in
    the forward pass: the loss and every parameter's gradient equal those of full logits."""
    model = small_model(tie_embeddings=tie, vocab_size=40009)  # chunks of 64 rows: 64 + 64 + 22
    tokens = torch.randint(0, 40009, (3, 50))
    targets = tokens.roll(-1, dims=1)
    targets[0, :20] = -100
    logits, plain = model(tokens)[0], None
    plain = torch.nn.functional.cross_entropy(logits.reshape(-1, 40009), targets.reshape(-1), ignore_index=-100)
    (plain * 3).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    none, chunked = model.train()(tokens, targets)
    assert none is None, "no logits are made in training"
    (chunked * 3).backward()
    assert torch.allclose(chunked, plain, atol=1e-6)
    for name, param in model.named_parameters():
        assert torch.allclose(param.grad, expected[name], atol=1e-6, rtol=1e-4), name


def test_no_weight_decay_on_norms_and_embeddings():
    model = small_model(tie_embeddings=True)
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    assert id(model.embed.weight) not in decayed
    assert all(id(b.attn_norm.weight) not in decayed for b in model.blocks)
    assert id(model.blocks[0].attn.q_proj.weight) in decayed


@pytest.mark.parametrize("tie", [True, False])
def test_export_to_llama_keeps_logits(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    model = small_model(tie_embeddings=tie, n_kv_head=2)
    save_checkpoint(tmp_path / "ckpt", model, model.config)
    export_llama(tmp_path / "ckpt", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, 300, (3, 50))
    with torch.no_grad():
        ours, _ = model.eval()(tokens)
        theirs = hf(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path / "ok", model, model.config, extra={"step": 7})
    loaded, meta = load_checkpoint(tmp_path / "ok")
    assert meta["step"] == 7
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")
    weights = tmp_path / "ok" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "ok")

    save_checkpoint(tmp_path / "other", small_model(d_model=32), small_model(d_model=32).config)
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    config["model"]["d_model"] = 64
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit its config"):
        load_checkpoint(tmp_path / "other")
