"""lm-evaluation-harness on a Kiln model, offline: two local tasks built from ../shared/data (a
multiple-choice task on the preference data, a rolling log-likelihood task on Shakespeare),
run through the evaluate stage; the harness's bits per byte equal Kiln's own computation."""

import json
import textwrap

import pytest
import torch

from model import evaluate
from model.checkpoint import load_checkpoint
from pipelines import pack
from storage import ArtifactStore, ConfigError
from tests.conftest import SHARED_DATA, needs_shared_data
from tests.model.test_chat_format import tokenizer_artifact
from tests.model.test_sft import model_artifact

pytest.importorskip("lm_eval")
PREFERENCES = SHARED_DATA / "instruct" / "rasbt_ch07_instruction-data-with-preference.json"
SHAKESPEARE = SHARED_DATA / "text" / "tinyshakespeare_input.txt"


def tasks_dir(tmp_path, passages: list[str], preferences: list[dict]):
    (tmp_path / "shakespeare.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    (tmp_path / "preferences.jsonl").write_text("".join(json.dumps(e) + "\n" for e in preferences))
    (tmp_path / "kiln_shakespeare.yaml").write_text(textwrap.dedent(f"""\
        task: kiln_shakespeare
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "shakespeare.jsonl"}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        """))
    (tmp_path / "kiln_preferences.yaml").write_text(textwrap.dedent(f"""\
        task: kiln_preferences
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tmp_path / "preferences.jsonl"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{instruction}}}}\\n{{{{input}}}}\\nAnswer:"
        doc_to_choice: "{{{{[chosen, rejected]}}}}"
        doc_to_target: 0
        metric_list:
          - metric: acc
          - metric: acc_norm
        """))
    return tmp_path


@needs_shared_data
@pytest.mark.slow
def test_harness_tasks_run_offline_and_agree_with_kiln(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    store = ArtifactStore(tmp_path / "data")
    tok = tokenizer_artifact(store)
    documents = store.find("d" * 64)
    packed = pack.STAGE.run(pack.PackConfig(seq_len=64, val_fraction=0.2, workers=1), [documents, tok], store)
    model = model_artifact(store, "pretrain", tok, seed=4)
    loaded, _ = load_checkpoint(store.local_path(model, "model"))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(store.local_path(tok, "tokenizer.json")))
    speeches = [p.strip() for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    passages = [p for p in speeches if len(tokenizer.encode(p).ids) < 60][:24]  # one window each
    # the preference entries whose question and either answer fit the model's 64-token context
    entries = json.loads(PREFERENCES.read_text())
    def tokens(e: dict, answer: str) -> int:
        return len(tokenizer.encode(f"{e['instruction']}\n{e['input']}\nAnswer: {e[answer]}").ids)

    fits = [e for e in entries if all(tokens(e, k) < 60 for k in ("chosen", "rejected"))]
    assert len(fits) >= 40
    (tmp_path / "tasks").mkdir()
    include = tasks_dir(tmp_path / "tasks", passages, fits)

    settings = evaluate.EvaluateConfig(model="pretrain", eval_batches=2, mc_questions=4, sample_tokens=4,
                                       chat_prompt=None, harness=["kiln_shakespeare", "kiln_preferences"],
                                       harness_include_path=str(include), harness_limit=40)
    made = evaluate.STAGE.run(settings, [model, packed, tok], store)
    table = made.stats["harness"]
    assert 0 <= table["kiln_preferences"]["acc"] <= 1 and "acc_norm" in table["kiln_preferences"]
    stored = json.loads(store.local_path(made, "harness.json").read_text())
    assert stored["n-samples"]["kiln_preferences"]["effective"] == 40, "the limit reached lm_eval"
    assert stored["n-samples"]["kiln_shakespeare"]["effective"] == len(passages)

    # the same passages through what `kiln evaluate` computes its held-out figures with, in the
    # window lm_eval scores: the exported tokenizer puts BOS in front of a text (as trained), and a
    # rolling window starts with one more (its prefix token), as for any Llama model; every token
    # after the first scored, bytes from the token table (BOS has none)
    bos = tokenizer.token_to_id("<|bos|>")
    rows = [[bos, bos, *tokenizer.encode(p, add_special_tokens=False).ids] for p in passages]
    with torch.no_grad():
        ours = evaluate.heldout_metrics(loaded, ((torch.tensor([r[:-1]]), torch.tensor([r[1:]])) for r in rows),
                                        evaluate.token_byte_lengths(tokenizer), "cpu")
    assert table["kiln_shakespeare"]["bits_per_byte"] == pytest.approx(ours["val_bpb"], rel=0.01)
    assert table["kiln_shakespeare"]["bits_per_byte"] == pytest.approx(ours["val_bpb"], rel=1e-4), "in fact equal"
    assert sum(len(p.encode()) for p in passages) == pytest.approx(
        sum(int(evaluate.token_byte_lengths(tokenizer)[r[1:]].sum()) for r in rows)), "bytes counted alike"


def test_an_unknown_task_is_one_line(tmp_path):
    from model.harness import run_harness

    with pytest.raises(ConfigError, match="no task 'no_such_task'"):
        run_harness(tmp_path, ["no_such_task"], include_path=str(tmp_path))
