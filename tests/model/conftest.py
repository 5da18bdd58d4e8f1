"""A small model trained here on real prose, shared by the tests that need learned weights
(quantization error and GGUF perplexity mean little on random weights)."""

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.data import TokenShardLoader
from model.model import ModelConfig, Transformer
from pipelines import pack, tokenizer
from storage import ArtifactStore

TRAINED_SHAPE = dict(n_layer=2, n_head=4, n_kv_head=4, d_model=128)
TRAINED_STEPS = 300


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(store, pretrain artifact, pack, tokenizer): a d128 model trained for 300 steps on Python's
    reference manual, stored as a pretrain artifact."""
    from tests.model.test_pretrain import documents_artifact

    store = ArtifactStore(tmp_path_factory.mktemp("trained"))
    documents = documents_artifact(store)
    tok = tokenizer.STAGE.run(tokenizer.TokenizerConfig(vocab_size=512), [documents], store)
    packed = pack.STAGE.run(pack.PackConfig(seq_len=64, val_fraction=0.1, workers=1), [documents, tok], store)
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tok.stats["vocab_size"], seq_len=64, **TRAINED_SHAPE)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = iter(TokenShardLoader(store, packed, "train", batch_size=16, seed=0))
    model.train()
    for _ in range(TRAINED_STEPS):
        inputs, targets = next(loader)
        _, loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def build(writer):
        save_checkpoint(writer.local_path("model"), model, config, store.local_path(tok))
        return {"steps": TRAINED_STEPS}

    artifact = store.produce("pretrain", "q" * 64, build, config={}, inputs=[packed.fingerprint], code_version="1")
    return store, artifact, packed, tok
