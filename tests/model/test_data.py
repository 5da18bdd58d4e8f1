"""The training loader over a real pack artifact: shifted targets, ranks, epochs, exact resume."""

import json
from collections import Counter

import pytest
import torch

import pipelines.pack
from model.data import TokenShardLoader
from model.model import IGNORE_INDEX
from pipelines.pack import STAGE, PackConfig
from storage import ArtifactStore
from tests.pipelines.test_pack import DATA, document_artifact, in_shards, real_documents, rows_of, tokenizer_artifact

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")
BATCH = 8


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """~3,000 rows of 33 tokens in ~10 shards of many small row groups, so that windows, shards
    and epochs all have boundaries to cross."""
    store = ArtifactStore(tmp_path_factory.mktemp("loader"))
    inputs = [document_artifact(store, in_shards(real_documents()[::8], 2), "loader"), tokenizer_artifact(store)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipelines.pack, "ROW_GROUP_BYTES", 4096)
        concat = STAGE.run(PackConfig(policy="concat", seq_len=32, shard_target_bytes=20_000, workers=1), inputs, store)
        best_fit = STAGE.run(PackConfig(seq_len=32, shard_target_bytes=20_000, best_fit_buffer_rows=4, workers=1),
                             inputs, store)
    return store, concat, best_fit


def loader(packed, which=1, **settings) -> TokenShardLoader:
    store, manifest = packed[0], packed[which]
    settings.setdefault("batch_size", BATCH)
    return TokenShardLoader(store, manifest, **settings)


def rows_from(batch, pad: int = 1) -> list[tuple[int, ...]]:
    """The packed rows back from (inputs, targets); masked targets were PAD (id 1 in these tests)."""
    inputs, targets = batch
    return [tuple(x) + (pad if t[-1] == IGNORE_INDEX else t[-1],) for x, t in zip(inputs.tolist(), targets.tolist())]


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_batches_are_rows_shifted_by_one_with_padding_masked(packed):
    store, _, best_fit = packed
    data = loader(packed, 2)
    assert len(data.units) > 40 and len({path for path, _, _ in data.units}) > 5
    pad = best_fit.stats["pad_id"]
    rows = [tuple(r) for r in rows_of(store, best_fit, "train").tolist()]
    seen = []
    for inputs, targets in take(data, data.batches_per_epoch):
        assert inputs.shape == targets.shape == (BATCH, 32) and inputs.dtype == targets.dtype == torch.int64
        masked = targets == IGNORE_INDEX
        assert torch.equal(inputs[:, 1:][~masked[:, :-1]], targets[:, :-1][~masked[:, :-1]])
        assert (inputs[:, 1:][masked[:, :-1]] == pad).all(), "only PAD targets are masked"
        seen += rows_from((inputs, targets), pad)
    assert any(pad in row for row in seen)
    assert not Counter(seen) - Counter(rows), "the epoch is rows of the split, each once"
    assert len(rows) - BATCH < len(seen) <= len(rows)
    assert len(data._windows) <= 2, "a window of row groups at a time"


def test_ranks_take_disjoint_batches_that_cover_the_epoch(packed):
    store, concat, _ = packed
    rows = Counter(tuple(r) for r in rows_of(store, concat, "train").tolist())
    ranks = [loader(packed, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch == ranks[1].batches_per_epoch
    seen = [Counter(row for batch in take(r, r.batches_per_epoch) for row in rows_from(batch)) for r in ranks]
    assert not seen[0] & seen[1], "disjoint"
    together = seen[0] + seen[1]
    assert not together - rows
    assert sum(rows.values()) - sum(together.values()) < 2 * BATCH, "together they cover the epoch"
    assert all(r.state_dict()["epoch"] == 0 for r in ranks)
    next(ranks[0])
    assert ranks[0].state_dict()["epoch"] == 1 and ranks[0].state_dict()["position"] == 1


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resumed_loader_continues_at_exactly_the_next_batch(packed, world_size):
    for rank in range(world_size):
        settings = dict(seed=3, rank=rank, world_size=world_size)
        straight = loader(packed, **settings)
        end = straight.batches_per_epoch
        k = end - 3  # resume shortly before the epoch ends: the next epoch must follow
        reference = take(straight, end + 5)
        stopped = loader(packed, **settings)
        assert same(take(stopped, k), reference[:k])
        state = json.loads(json.dumps(stopped.state_dict()))  # plain JSON, as a checkpoint stores it
        resumed = loader(packed, **settings)
        resumed.load_state_dict(state)
        assert same(take(resumed, 8), reference[k:k + 8])
        assert resumed.state_dict()["epoch"] == 1


def test_epochs_reshuffle_deterministically(packed):
    a, b, other = loader(packed, seed=1), loader(packed, seed=1), loader(packed, seed=2)
    n = a.batches_per_epoch
    first, second = take(a, n), take(a, n)
    assert same(first + second, take(b, 2 * n)), "same seed, same batches"
    assert not same(first, second), "a new epoch, a new order"
    assert not same(first, take(other, n))


def test_validation_in_stored_order_and_errors(packed):
    store, concat, _ = packed
    val = loader(packed, split="val", shuffle=False, batch_size=4)
    rows = [tuple(r) for r in rows_of(store, concat, "val").tolist()]
    assert rows_from(next(val)) + rows_from(next(val)) == rows[:8]
    with pytest.raises(ValueError, match="fewer than one batch"):
        loader(packed, split="val", batch_size=len(rows) + 1)
    with pytest.raises(ValueError, match="world_size=2"):
        loader(packed).load_state_dict(loader(packed, rank=1, world_size=2).state_dict())
    with pytest.raises(ValueError, match="not a pack artifact"):
        TokenShardLoader(store, concat.model_copy(update={"stage": "dedup"}))
