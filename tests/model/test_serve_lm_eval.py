"""lm-evaluation-harness against `kiln serve-model`: its `local-completions` backend (echo,
logprobs, token-id prompts, several prompts a request, the API key) runs a log-likelihood task
on the server, and the figures equal those of its `hf` backend on the exported model."""

import json
import math
import textwrap

import pytest

from model.export import export_llama
from tests.conftest import SHARED_DATA, needs_shared_data
from tests.model.test_serve import KEY, start_server

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API backends need it
SHAKESPEARE = SHARED_DATA / "text" / "tinyshakespeare_input.txt"


def continuation_task(directory, pairs: list[tuple[str, str]]):
    """A local loglikelihood task: each document a context and the continuation to score."""
    data = directory / "continuations.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": t}) + "\n" for c, t in pairs))
    (directory / "kiln_continuations.yaml").write_text(textwrap.dedent(f"""\
        task: kiln_continuations
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: loglikelihood
        doc_to_text: "{{{{context}}}}"
        doc_to_target: "{{{{continuation}}}}"
        metric_list:
          - metric: perplexity
          - metric: acc
        """))
    return directory


@needs_shared_data
def test_lm_eval_local_completions_against_the_server_equals_its_hf_backend(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # what lm-eval's local-completions sends as its Bearer key
    from lm_eval.tasks import TaskManager
    from tokenizers import Tokenizer

    store, artifact, _, _ = trained
    model_dir = store.local_path(artifact, "model")
    exported = export_llama(model_dir, tmp_path / "hf")
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    # Shakespeare's lines split into a context and a continuation (half the line, or its last
    # word), 60 tokens at most together:
    # inside the model's 64 positions with BOS and the one token lm-eval asks the server to make
    lines = [line.strip() for line in SHAKESPEARE.read_text().splitlines() if len(line.split()) >= 6]
    pairs = []
    for line in lines:
        words = line.split()
        cut = len(words) - 1 if len(pairs) % 2 else len(words) // 2   # the last word, or half the line
        context, rest = " ".join(words[:cut]), " " + " ".join(words[cut:])
        if len(tokenizer.encode(context + rest, add_special_tokens=False).ids) < 60:
            pairs.append((context, rest))
        if len(pairs) == 24:
            break
    manager = TaskManager(include_path=str(continuation_task(tmp_path, pairs)))

    # BOS: every training document starts with <|bos|>. The exported tokenizer's default call
    # adds it (its post-processor), which is what the hf backend uses for context and whole;
    # local-completions encodes with add_special_tokens=False unless add_bos_token=True, so it
    # is told to. It then sends token ids, which the server uses as given (no BOS of its own),
    # so both backends score the same ids: [BOS, context..., continuation...].
    hf = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(exported), "dtype": "float32"},
                                 tasks=["kiln_continuations"], task_manager=manager, device="cpu", batch_size=8,
                                 log_samples=True)
    server, client, log = start_server(model_dir, tmp_path / "server.log")
    try:
        served = lm_eval.simple_evaluate(
            model="local-completions", task_manager=manager, tasks=["kiln_continuations"], log_samples=True,
            model_args={"base_url": f"{str(client.base_url).rstrip('/')}/completions", "model": "kiln-test",
                        "tokenizer": str(exported), "tokenizer_backend": "huggingface", "add_bos_token": True,
                        "max_length": 64, "batch_size": 4, "num_concurrent": 2, "max_retries": 1})
    finally:
        from tests.prefect_servers import stop

        stop(server)
        log.close()

    ours, theirs = served["results"]["kiln_continuations"], hf["results"]["kiln_continuations"]
    print("local-completions:", ours, "\nhf:", theirs)
    # lm-eval's "perplexity" of a loglikelihood task is exp(-mean loglikelihood of a whole
    # continuation), ~1e32 here: its log, the mean loglikelihood in nats, is the figure compared
    assert math.log(ours["perplexity,none"]) == pytest.approx(math.log(theirs["perplexity,none"]), abs=1e-3)
    assert ours["acc,none"] == theirs["acc,none"]
    per_doc = [float(r[0][0]) for s in served["samples"]["kiln_continuations"] for r in s["resps"]]
    hf_doc = [float(r[0][0]) for s in hf["samples"]["kiln_continuations"] for r in s["resps"]]
    assert len(per_doc) == len(pairs) and per_doc == pytest.approx(hf_doc, abs=1e-3), "each document's loglikelihood"
    served_first, hf_first = served["samples"]["kiln_continuations"][0], hf["samples"]["kiln_continuations"][0]
    assert served_first["arguments"] == hf_first["arguments"]
    # the ids scored start with BOS on both sides
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(str(exported))
    assert hf_tokenizer(pairs[0][0]).input_ids[0] == tokenizer.token_to_id("<|bos|>")
