"""Pretraining under accelerate: resume after SIGKILL is bit-identical; 2 CPU ranks are real."""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from pydoc_data.topics import topics

import pyarrow as pa
import pytest

from model import pretrain
from model.model import ModelShape
from pipelines import pack, tokenizer
from pipelines.common import shard_name
from storage import ArtifactStore, ConfigError, InputError

MODEL = ModelShape(n_layer=2, n_head=4, n_kv_head=2, d_model=64)


def documents_artifact(store: ArtifactStore):
    """The reference manual's topics (prose that ships with Python) as a document artifact."""
    texts = [topics[k] for k in sorted(topics)]

    def build(writer):
        writer.write_parquet(shard_name(0), pa.table({"id": [f"t{i}" for i in range(len(texts))],
                                                      "url": list(sorted(topics)), "text": texts}))
        return {"documents_out": len(texts)}

    return store.produce("dedup", "d" * 64, build, config={}, inputs=[], code_version="1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("pretrain-data"))
    documents = documents_artifact(store)
    tok = tokenizer.STAGE.run(tokenizer.TokenizerConfig(vocab_size=512), [documents], store)
    packed = pack.STAGE.run(pack.PackConfig(seq_len=64, val_fraction=0.1, workers=1), [documents, tok], store)
    return store, packed, tok


def config(**train) -> pretrain.PretrainConfig:
    settings = dict(batch_size=8, max_steps=24, warmup_steps=4, eval_every=12, eval_batches=2,
                    checkpoint_every=8, log_every=4, lr=3e-3)
    return pretrain.PretrainConfig(model=MODEL, train=pretrain.TrainConfig(**{**settings, **train}))


def losses(store: ArtifactStore, manifest) -> list[float]:
    rows = [json.loads(line) for line in store.local_path(manifest, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)), "one row per step, none repeated"
    return [r["loss"] for r in rows]


def copy_inputs(source: ArtifactStore, target_dir: Path, manifests) -> ArtifactStore:
    for m in manifests:
        shutil.copytree(source.local_path(m), target_dir / m.stage / m.fingerprint)
    return ArtifactStore(target_dir)


@pytest.mark.slow
def test_resume_after_sigkill_logs_the_same_losses(data, tmp_path):
    store, packed, tok = data
    # 48 steps: the victim, killed once it is past step 10, is still far from its last step
    reference = pretrain.STAGE.run(config(max_steps=48), [packed, tok],
                                   copy_inputs(store, tmp_path / "a", [packed, tok]))
    reference_store = ArtifactStore(tmp_path / "a")
    assert len(losses(reference_store, reference)) == 48

    killed_store = copy_inputs(store, tmp_path / "b", [packed, tok])
    kill_mid_run(tmp_path / "b", "config(max_steps=48)", (packed, tok))  # mid-run, after the step-8 checkpoint

    resumed = pretrain.STAGE.run(config(max_steps=48), [packed, tok], killed_store)
    log = killed_store.local_path(resumed, "train.log").read_text()
    assert re.search(r"resumed from step-000000(08|16|24|32|40) \(step (8|16|24|32|40)\)", log), \
        "resumed from a checkpoint before the last step, not restarted from step 0"
    assert losses(killed_store, resumed) == losses(reference_store, reference), "bit-identical on CPU"


def next_staging(stage_dir: Path, process) -> Path:
    deadline = time.time() + 120
    while time.time() < deadline:
        found = list(stage_dir.glob(".staging-*"))
        if found:
            return found[0]
        assert process.poll() is None
        time.sleep(0.2)
    raise AssertionError("no staging directory appeared")


def step_logged(staging: Path) -> int:
    metrics = staging / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def kill_mid_run(store_dir: Path, script_config: str, inputs, checkpoint: str = "step-00000008") -> None:
    """Run the stage in another process and SIGKILL its whole process group (launcher and every
    rank) once the checkpoint is written and a later step is logged."""
    packed, tok = inputs
    script = textwrap.dedent(f"""
        from model import pretrain
        from storage import ArtifactStore
        from tests.model.test_pretrain import {script_config.split("(")[0]}
        store = ArtifactStore({str(store_dir)!r})
        pretrain.STAGE.run({script_config}, [store.find({packed.fingerprint!r}), store.find({tok.fingerprint!r})],
                           store)
    """)
    victim = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[2],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = next_staging(store_dir / "pretrain", victim)
    deadline = time.time() + 300
    while not any((staging / "checkpoints").glob(checkpoint)) or step_logged(staging) < 10:
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    # The training processes are in a process group of their own: they outlive the SIGKILL of the
    # run that launched them by at most a second (they watch it), and their launcher holds the
    # artifact's lock until they are gone, so nothing writes into the staging directory after this.
    fingerprint = staging.name.removeprefix(".staging-")
    with open(store_dir / "pretrain" / ".locks" / f"{fingerprint}.lock", "a+") as handle:
        deadline = time.time() + 30
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline, "the orphaned training processes did not exit"
                time.sleep(0.1)
        fcntl.flock(handle, fcntl.LOCK_UN)
    # On a loaded machine the run can outpace the poll and write a later checkpoint before the kill
    # lands. Removing those leaves exactly what a kill a few steps after `checkpoint` leaves (resume
    # truncates metrics.jsonl to the checkpoint's step), so the resume under test is always mid-run.
    for later in (staging / "checkpoints").glob("step-*"):
        if later.name > checkpoint and (staging / "checkpoints" / checkpoint).is_dir():
            shutil.rmtree(later)


GQA = dict(n_layer=2, n_head=4, n_kv_head=2, d_model=64, tie_embeddings=False)  # the 1b preset's shape, small


def parallel_config(processes: int, parallelism: str = "ddp") -> pretrain.PretrainConfig:
    """The same global batch (8 rows) on 1 or 2 ranks, with the 1b preset's settings: grouped-query
    attention, untied embeddings, activation checkpointing."""
    cfg = config(batch_size=8 // processes, max_steps=16, activation_checkpointing=True)
    cfg.model = ModelShape(**GQA)
    cfg.launch = pretrain.LaunchConfig(num_processes=processes, parallelism=parallelism)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_cpu_ranks_train_checkpoint_resume_and_match_one_rank(data, tmp_path, parallelism):
    store, packed, tok = data
    single = pretrain.STAGE.run(parallel_config(1), [packed, tok], copy_inputs(store, tmp_path / "one", [packed, tok]))
    double = pretrain.STAGE.run(parallel_config(2, parallelism), [packed, tok],
                                copy_inputs(store, tmp_path / "two", [packed, tok]))
    two_store = ArtifactStore(tmp_path / "two")
    log = two_store.local_path(double, "train.log").read_text()
    assert f"world_size=2 parallelism={parallelism}" in log
    one_losses = losses(ArtifactStore(tmp_path / "one"), single)
    two_losses = losses(two_store, double)
    # Same global batch (2 ranks x 4 = 8 rows, the same rows): the same gradients up to the
    # order of float additions, so the curves agree to well within 1%.
    assert max(abs(a - b) / a for a, b in zip(one_losses, two_losses)) < 0.01
    assert one_losses[-1] < one_losses[0]

    # the checkpoint is written by both ranks: each its own safetensors file, under FSDP2 half the state each
    shards = sorted(two_store.local_path(double, "checkpoints/step-00000016/state").glob("*.safetensors"))
    assert len(shards) == 2, shards
    if parallelism == "fsdp":
        from safetensors import safe_open

        elements = []
        for shard in shards:
            with safe_open(str(shard), "pt") as handle:
                elements.append(sum(handle.get_slice(k).get_shape()[0] for k in handle.keys()
                                    if handle.get_slice(k).get_shape()))
        assert abs(elements[0] - elements[1]) <= 0.05 * sum(elements), f"sharded in halves: {elements}"

    killed = copy_inputs(store, tmp_path / "killed", [packed, tok])
    kill_mid_run(tmp_path / "killed", f"parallel_config(2, {parallelism!r})", (packed, tok))
    resumed = pretrain.STAGE.run(parallel_config(2, parallelism), [packed, tok], killed)
    resumed_log = killed.local_path(resumed, "train.log").read_text()
    assert re.search(r"resumed from step-00000008 \(step 8\)", resumed_log)
    assert losses(killed, resumed) == two_losses, "the same per-step losses as the uninterrupted run"
    from model.checkpoint import load_checkpoint

    model, _ = load_checkpoint(two_store.local_path(double, "model"))
    assert model.config.n_kv_head == 2 and not model.config.tie_embeddings, "the final model is whole"


def test_bad_inputs_are_clear_errors(data, tmp_path):
    store, packed, tok = data
    with pytest.raises(InputError, match="needs a pack and a tokenizer"):
        pretrain.STAGE.run(config(), [tok, packed], store)
    other = tokenizer.STAGE.run(tokenizer.TokenizerConfig(vocab_size=400), [documents_artifact(store)], store)
    with pytest.raises(InputError, match="vocab size 512.*has 400"):
        pretrain.STAGE.run(config(), [packed, other], store)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        pretrain.STAGE.run(config(batch_size=10_000), [packed, tok], store)


def test_the_launch_configs_load_through_accelerate_and_the_presets_use_them():
    """Accelerate only launches; what each preset asks of it must be a config accelerate reads."""
    from accelerate.commands.config.config_args import load_config_from_file

    from flows.config import load_config
    from model.launch import ACCELERATE_CONFIGS, accelerate_command

    loaded = {path.stem: load_config_from_file(str(path)) for path in ACCELERATE_CONFIGS.glob("*.yaml")}
    assert set(loaded) == {"single_gpu", "multi_gpu"}
    assert str(loaded["multi_gpu"].distributed_type).endswith("MULTI_GPU")
    for preset in ("tiny", "small", "medium", "1b"):
        launch = load_config(preset).pretrain.launch
        command, _ = accelerate_command("model.train", Path("run.json"), launch)
        if launch.accelerate_config:
            assert str(ACCELERATE_CONFIGS / f"{launch.accelerate_config}.yaml") in command
    assert load_config("1b").pretrain.launch.parallelism == "fsdp"
