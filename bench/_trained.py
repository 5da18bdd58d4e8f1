"""A small model trained on real prose in a few seconds: the recipe of tests/model/conftest.py's
`trained` fixture, which the benchmarks that need learned weights (quantize, serve) also use when
no model is given."""

from __future__ import annotations

from typing import Any

from storage import ArtifactStore, Manifest


def train_pretrain_artifact(store: ArtifactStore, *, seq_len: int, vocab_size: int, shape: dict[str, Any],
                            steps: int, fingerprint: str) -> tuple[Manifest, Manifest, Manifest]:
    """(pretrain artifact, pack, tokenizer) in `store`: a tokenizer and a pack of Python's
    reference manual, and a model of `shape` trained `steps` steps on it (AdamW, lr 3e-3, seed 0)."""
    import torch

    from model.checkpoint import save_checkpoint
    from model.data import TokenShardLoader
    from model.model import ModelConfig, Transformer
    from pipelines import pack, tokenizer
    from tests.model.test_pretrain import documents_artifact

    documents = documents_artifact(store)
    tok = tokenizer.STAGE.run(tokenizer.TokenizerConfig(vocab_size=vocab_size), [documents], store)
    packed = pack.STAGE.run(pack.PackConfig(seq_len=seq_len, val_fraction=0.1, workers=1), [documents, tok], store)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.stats["vocab_size"], seq_len=seq_len, **shape)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = iter(TokenShardLoader(store, packed, "train", batch_size=16, seed=0))
    model.train()
    for _ in range(steps):
        inputs, targets = next(loader)
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def build(writer):
        save_checkpoint(writer.local_path("model"), model, config, store.local_path(tok))
        return {"steps": steps}

    artifact = store.produce("pretrain", fingerprint, build, config={}, inputs=[packed.fingerprint], code_version="1")
    return artifact, packed, tok
