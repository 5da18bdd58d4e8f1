"""`kiln export`: a path the user names is theirs (only an earlier Kiln export is ever replaced,
and only with --overwrite), and the export answers the calls users make (`tok(prompt)` +
`generate`, `pipeline("text-generation")`) exactly as `kiln generate --temperature 0` does."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from model.chat import load_for_generation
from model.generate import SamplingConfig, generate_tokens
from storage.outputs import MARKER
from tests.model.test_gguf import model as gguf_model  # noqa: F401 - the fixture, a small sft model

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["The for statement", "A module is", "import"]


def kiln(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and lines and lines[-1].startswith("kiln: error:"), done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    return lines[-1]


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_users_directory_and_file_survive_export(gguf_model, tmp_path):  # noqa: F811 - the imported fixture
    _, _, model_dir = gguf_model
    models = tmp_path / "models"
    (models / "mine").mkdir(parents=True)
    (models / "notes.txt").write_text("notes")
    (models / "mine" / "other.bin").write_bytes(b"w")
    before = tree(models)
    line = error_line(kiln("export", str(model_dir), "-o", str(models)))
    assert "a directory Kiln did not make" in line and str(models) in line
    assert tree(models) == before, "nothing of the user's touched"
    assert error_line(kiln("export", str(model_dir), "-o", str(models), "--overwrite"))  # --overwrite changes nothing
    assert tree(models) == before

    afile = tmp_path / "afile"
    afile.write_text("file")
    assert "is not a directory" in error_line(kiln("export", str(model_dir), "-o", str(afile)))
    assert afile.read_text() == "file"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no trash, no temporary left"

    # `-o .` in a directory of the user's: one line, no traceback
    assert "did not make" in error_line(kiln("export", str(model_dir), "-o", ".", cwd=models))
    assert tree(models) == before

    # the GGUF writer refuses a file it did not write, in a directory or by name
    gguf = tmp_path / "mine.gguf"
    gguf.write_bytes(b"GGUF but not Kiln's")
    line = error_line(kiln("export", str(model_dir), "--format", "gguf", "--type", "f32", "-o", str(gguf),
                           "--overwrite"))
    assert "not a GGUF export Kiln wrote" in line and gguf.read_bytes() == b"GGUF but not Kiln's"


def test_an_earlier_export_is_replaced_only_with_overwrite_and_only_its_own_files(
        gguf_model, tmp_path):  # noqa: F811 - the imported fixture
    _, _, model_dir = gguf_model
    empty = tmp_path / "empty"
    empty.mkdir()
    done = kiln("export", str(model_dir), "-o", str(empty))  # an empty directory is filled in place
    assert done.returncode == 0, done.stderr[-2000:]
    marker = json.loads((empty / MARKER).read_text())
    assert set(marker["files"]) == {p.name for p in empty.iterdir()} - {MARKER}
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in empty.iterdir()}
    assert len(set(modes.values())) == 1 and modes["model.safetensors"] & 0o044 == 0o044, modes

    assert "pass --overwrite" in error_line(kiln("export", str(model_dir), "-o", str(empty)))
    done = kiln("export", str(model_dir), "-o", str(empty), "--overwrite")
    assert done.returncode == 0, done.stderr[-2000:]
    (empty / "my-notes.md").write_text("mine now")
    line = error_line(kiln("export", str(model_dir), "-o", str(empty), "--overwrite"))
    assert "'my-notes.md', which Kiln did not write" in line and (empty / "my-notes.md").read_text() == "mine now"

    gguf = tmp_path / "m.gguf"
    for args in ([], ["--overwrite"]):
        done = kiln("export", str(model_dir), "--format", "gguf", "--type", "f32", "-o", str(gguf), *args)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "pass --overwrite" in error_line(kiln("export", str(model_dir), "--format", "gguf", "-o", str(gguf)))


def kiln_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> list[int]:
    """What `kiln generate --temperature 0` generates (model/chat.stream_text over these tokens)."""
    loaded = load_for_generation(model_dir)
    return list(generate_tokens(loaded.model, loaded.encode_document_start(prompt),
                                SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                                stop_ids={loaded.token_id("<|bos|>")}))


def test_transformers_default_calls_answer_as_kiln_generate(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    store, artifact, _, _ = trained
    model_dir = store.local_path(artifact, "model")
    out = tmp_path / "hf"
    assert kiln("export", str(model_dir), "-o", str(out)).returncode == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    generator = transformers.pipeline("text-generation", model=hf, tokenizer=tok)
    loaded = load_for_generation(model_dir)
    for prompt in PROMPTS:
        ours = kiln_greedy(model_dir, prompt, 24)
        inputs = tok(prompt, return_tensors="pt")  # the default call: BOS first, as in training
        assert inputs["input_ids"][0].tolist() == loaded.encode_document_start(prompt)
        theirs = hf.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
        if theirs and theirs[-1] == loaded.token_id("<|bos|>"):
            theirs = theirs[:-1]  # transformers keeps the eos it stopped at; Kiln's stream ends before it
        assert theirs == ours, (prompt, tok.decode(theirs), loaded.tokenizer.decode(ours))
        text = generator(prompt, max_new_tokens=24, do_sample=False)[0]["generated_text"]
        assert text == prompt + loaded.tokenizer.decode(ours), text

    # and the command itself prints that continuation
    done = kiln("generate", str(model_dir), "-p", PROMPTS[0], "--temperature", "0", "--max-tokens", "24")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == (PROMPTS[0] + loaded.tokenizer.decode(kiln_greedy(model_dir, PROMPTS[0], 24))).strip()
