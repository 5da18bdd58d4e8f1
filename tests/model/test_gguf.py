"""`kiln export --format gguf`: read back by llama.cpp (llama-cpp-python) and by transformers'
GGUF loader, the tokens and the logits are Kiln's; the chat template travels in the file."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.chat import load_for_generation
from model.checkpoint import load_checkpoint
from model.export_gguf import GGUF_TYPES, export_gguf, rope_pairs
from model.generate import SamplingConfig, generate_tokens
from storage import ArtifactStore, InputError
from tests.conftest import SHARED_DATA, needs_shared_data
from tests.model.test_chat_format import tokenizer_artifact
from tests.model.test_sft import model_artifact

ROOT = Path(__file__).resolve().parents[2]
TEXTS = ["The json module's dumps() returns a str.", "  indented\n\n\tcode = {'a': 1}  # 1234567 ünïcödé 日本語",
         "<|user|>Hi there<|end|><|assistant|>"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    store = ArtifactStore(tmp_path_factory.mktemp("gguf"))
    tok = tokenizer_artifact(store)
    artifact = model_artifact(store, "sft", tok, seed=5)
    return store, artifact, store.local_path(artifact, "model")


def kiln_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    ours, _ = load_checkpoint(model_dir)
    with torch.no_grad():
        return ours(torch.tensor([ids]))[0][0].numpy()


def test_rope_pairs_turn_rotate_half_into_adjacent_pairs():
    head_dim, heads = 8, 2
    rows = torch.arange(heads * head_dim, dtype=torch.float32)[:, None].repeat(1, 3)
    paired = rope_pairs(rows, heads)[:, 0].long().tolist()
    # rotate-half partners (i, i + 4) become neighbours (2i, 2i + 1), head by head
    assert paired == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_kiln_export_gguf_and_transformers_reads_it(model, tmp_path):
    store, artifact, model_dir = model
    done = subprocess.run([sys.executable, "-m", "flows.cli", "export", artifact.fingerprint, "--format", "gguf",
                           "--type", "f32", "-o", str(tmp_path / "m.gguf"), "--data-dir", store.root],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in TEXTS:
        expected = ours.encode(text, add_special_tokens=False).ids
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text
    ids = ours.encode(TEXTS[0]).ids
    with torch.no_grad():
        theirs = hf(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(theirs, kiln_logits(model_dir, ids), atol=1e-4)


def test_a_bad_type_is_one_line(model, tmp_path):
    _, _, model_dir = model
    with pytest.raises(InputError, match="q3_k: not a GGUF type"):
        export_gguf(model_dir, tmp_path / "m.gguf", "q3_k")
    assert not list(tmp_path.iterdir()), "nothing half-written"


# ------------------------------------------------------------------ llama.cpp, the real client

def thousand_documents() -> list[str]:
    """1,000 real documents: the 181 articles of the extraction benchmark (several languages and
    scripts), then instructions with their inputs and answers."""
    articles = json.loads((SHARED_DATA / "html_extraction" / "scrapinghub_aeb" / "ground-truth.json").read_text())
    texts = [a["articleBody"] for _, a in sorted(articles.items())]
    entries = json.loads((SHARED_DATA / "instruct" / "rasbt_ch07_instruction-data.json").read_text())
    texts += [f"{e['instruction']}\n\n{e['input']}\n\n{e['output']}" for e in entries]
    return texts[:1000]


@pytest.fixture(scope="module")
def llama_cpp():
    """llama-cpp-python, loading models without llama.cpp's extra weight buffers: measured on this
    project's machine, their repacked q8_0/q4_0 matmuls (the CPU reports AMX-INT8) crash the process
    with a segmentation fault in llama_decode, whatever the model's size; f32/f16 are unaffected.
    Without them llama.cpp runs its plain CPU kernels, the same numbers."""
    module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds from source)")
    defaults = module.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.llama.llama_cpp, "llama_model_default_params", plain_buffers)
        yield module


@pytest.fixture(scope="module")
def trained_gguf(trained, llama_cpp, tmp_path_factory):
    """The trained model exported in every GGUF type, and its directory."""
    store, artifact, _, _ = trained
    model_dir = store.local_path(artifact, "model")
    out = tmp_path_factory.mktemp("gguf-trained")
    return model_dir, {kind: export_gguf(model_dir, out / f"m-{kind}.gguf", kind) for kind in GGUF_TYPES}


def load(llama_cpp, path: Path, **options):
    return llama_cpp.Llama(model_path=str(path), n_threads=2, verbose=False, seed=0, **options)


@needs_shared_data
def test_llama_cpp_tokenizes_1000_documents_as_kiln(trained_gguf, llama_cpp):
    model_dir, files = trained_gguf
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    llm = load(llama_cpp, files["f32"], vocab_only=True)
    documents = thousand_documents()
    assert len(documents) == 1000

    def llama_ids(text: str) -> list[int]:
        return llm.tokenize(text.encode(), add_bos=False, special=True)

    different = [d for d in documents if llama_ids(d) != ours.encode(d, add_special_tokens=False).ids]
    assert not different, f"{len(different)} of 1000 tokenized otherwise, e.g. {different[0][:200]!r}"
    for text in TEXTS:  # special tokens are parsed, as Kiln parses them
        assert llama_ids(text) == ours.encode(text, add_special_tokens=False).ids, text
    assert "<|assistant|>" in llm.metadata.get("tokenizer.chat_template", ""), "the chat template travels"


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_llama_cpp_greedy_continuation_is_kiln_generate_s(trained_gguf, llama_cpp, kind):
    model_dir, files = trained_gguf
    loaded = load_for_generation(model_dir)
    prompt = loaded.encode_document_start("The for statement")
    ours = list(generate_tokens(loaded.model, prompt, SamplingConfig(max_new_tokens=40, temperature=0.0)))
    llm = load(llama_cpp, files[kind], n_ctx=64)
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        if len(theirs) == len(ours) or token in (loaded.token_id("<|bos|>"),):
            break
        theirs.append(token)
    assert theirs == ours, (kind, loaded.tokenizer.decode(ours), loaded.tokenizer.decode(theirs))


def test_llama_cpp_called_as_users_call_it_answers_as_kiln_generate(trained_gguf, llama_cpp):
    """`Llama(path)(prompt)`, as llama-cli, Ollama and LM Studio prompt: BOS comes from the
    file's `add_bos_token`, so the continuation is `kiln generate --temperature 0`'s."""
    from tests.model.test_export import PROMPTS, kiln_greedy

    model_dir, files = trained_gguf
    loaded = load_for_generation(model_dir)
    llm = load(llama_cpp, files["f32"], n_ctx=64)
    assert llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    for prompt in PROMPTS:
        ours = loaded.tokenizer.decode(kiln_greedy(model_dir, prompt, 24))
        theirs = llm(prompt, max_tokens=24, temperature=0.0, top_k=1, repeat_penalty=1.0)["choices"][0]["text"]
        assert theirs == ours, (prompt, theirs, ours)


def llama_cpp_perplexity(llama_cpp, path: Path, rows: list[list[int]]) -> float:
    """exp(mean negative log-likelihood) of each row's tokens after its first, from llama.cpp's logits."""
    llm = load(llama_cpp, path, n_ctx=len(rows[0]), logits_all=True, n_batch=len(rows[0]))
    nats = count = 0.0
    for row in rows:
        llm.reset()
        llm.eval(row)
        logits = np.asarray(llm.scores[:len(row) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nats -= logprobs[np.arange(len(row) - 1), row[1:]].sum()
        count += len(row) - 1
    return math.exp(nats / count)


def test_llama_cpp_perplexity_of_q8_0_and_q4_0_near_f16(trained, trained_gguf, llama_cpp):
    store, _, packed, _ = trained
    _, files = trained_gguf
    import pyarrow.parquet as pq

    rows = [r for f in packed.files_under("val")
            for r in pq.read_table(store.local_path(packed, f.path)).column("tokens").to_pylist()][:48]
    found = {kind: llama_cpp_perplexity(llama_cpp, files[kind], rows) for kind in ("f32", "f16", "q8_0", "q4_0")}
    assert abs(found["f16"] / found["f32"] - 1) < 0.005, found
    assert abs(found["q8_0"] / found["f16"] - 1) < 0.02, found
    assert abs(found["q4_0"] / found["f16"] - 1) < 0.15, found
    model_dir = store.local_path(trained[1], "model")
    with torch.no_grad():
        logits = torch.cat([torch.from_numpy(kiln_logits(model_dir, row)[None]) for row in rows])
    targets = torch.tensor(rows)[:, 1:]
    ours = math.exp(-float(logits[:, :-1].double().log_softmax(-1).gather(2, targets[..., None]).mean()))
    assert abs(found["f32"] / ours - 1) < 1e-3, (ours, found)
    assert ours < 100, f"a trained model (a uniform guess over 512 tokens: 512): {found}"
