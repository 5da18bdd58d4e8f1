"""A small model trained here on real prose, shared by the tests that need learned weights
(quantization error and GGUF perplexity mean little on random weights)."""

import pytest

from bench._trained import train_pretrain_artifact
from storage import ArtifactStore

TRAINED_SHAPE = dict(n_layer=2, n_head=4, n_kv_head=4, d_model=128)
TRAINED_STEPS = 300


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(store, pretrain artifact, pack, tokenizer): a d128 model trained for 300 steps on Python's
    reference manual, stored as a pretrain artifact."""
    store = ArtifactStore(tmp_path_factory.mktemp("trained"))
    artifact, packed, tok = train_pretrain_artifact(store, seq_len=64, vocab_size=512, shape=TRAINED_SHAPE,
                                                    steps=TRAINED_STEPS, fingerprint="q" * 64)
    return store, artifact, packed, tok
