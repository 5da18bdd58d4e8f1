"""The stage table is the one list of stages: a new stage is one module and its line in the table,
and the CLI, the run config, the pipeline and the deployments pick it up."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stages import CHAINS, STAGES, TABLE, chain

ROOT = Path(__file__).resolve().parents[2]

TOY_STAGE = '''"""A toy stage: counts the words of its setting."""

from pydantic import Field

from pipelines.common import Stage, StageConfig


class ToyConfig(StageConfig):
    text: str = Field("one two three", description="Words to count.")


def build_toy(config, inputs, store, writer):
    words = len(config.text.split())
    writer.write_json("count.json", {"words": words})
    return {"words": words}


STAGE = Stage("toy", ToyConfig, build_toy)
'''


def test_the_chain_of_a_stage_is_what_it_reads():
    assert [e.name for e in chain("tokenizer")] == ["sample-crawl", "ingest", "clean", "dedup", "tokenizer"]
    everything_but_quantize = [e.name for e in TABLE if e.name != "quantize"]
    assert [e.name for e in chain("evaluate")] == everything_but_quantize, "evaluate reads the dpo model"
    from flows.config import load_config

    quantized = load_config(None, ["evaluate.model=quantize"])
    assert [e.name for e in chain("evaluate", quantized)] == [e.name for e in TABLE]
    of_pretrain = load_config(None, ["quantize.model=pretrain"])
    assert "sft" not in {e.name for e in chain("quantize", of_pretrain)}, "no SFT to quantize a pretrained model"
    assert CHAINS["run"][0] == TABLE[-1].name and set(STAGES) == {e.name for e in TABLE}
    with pytest.raises(KeyError, match="no stage 'nope'"):
        chain("nope")


def test_every_line_names_its_module_s_stage_and_reads_only_earlier_stages():
    from flows.stages import check_table

    check_table(with_modules=True)  # imports every stage: its STAGE's name is the line's
    assert all(entry.stage.name == entry.name for entry in TABLE)


def test_the_config_stub_declares_the_table_s_sections():
    """flows/config.pyi, what editors and type checkers read, says what flows/config.py builds."""
    import ast

    from flows.config import KilnConfig

    stub = ast.parse((ROOT / "flows" / "config.pyi").read_text())
    imported = {alias.asname or alias.name: f"{node.module}.{alias.name}" for node in ast.walk(stub)
                if isinstance(node, ast.ImportFrom) for alias in node.names}
    (declared,) = [node for node in stub.body if isinstance(node, ast.ClassDef) and node.name == "KilnConfig"]
    declared_fields = [node for node in declared.body if isinstance(node, ast.AnnAssign)]
    fields = {node.target.id: ast.unparse(node.annotation) for node in declared_fields}
    defaults = {node.target.id: ast.unparse(node.value) for node in declared_fields if node.value}
    assert list(fields) == list(KilnConfig.model_fields) == ["name", *(e.section for e in TABLE)]
    assert all(defaults[e.section] == f"Field(default_factory={fields[e.section]})" for e in TABLE), \
        "every section defaults to its stage's config, as KilnConfig's fields do (mypy reads the defaults)"
    for entry in TABLE:
        config_cls = entry.stage.config_cls
        assert imported[fields[entry.section]] == f"{config_cls.__module__}.{config_cls.__name__}", entry.section
        assert KilnConfig.model_fields[entry.section].annotation is config_cls


@pytest.mark.parametrize("command", [["--help"], ["ls"], ["lineage", "abcdef"]])
def test_the_light_commands_import_no_stage_and_no_torch(command, tmp_path):
    """`kiln --help`, `kiln ls` and `kiln lineage` need the table's names, not its stages."""
    probe = ("import sys\nfrom flows import cli\nsys.argv = ['kiln', *sys.argv[1:]]\n"
             "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'datatrove', 'ray')"
             " or m.startswith(('model.', 'pipelines.')))\n"
             "print('HEAVY', heavy)\n")
    extra = ["--data-dir", str(tmp_path)] if command != ["--help"] else []
    done = subprocess.run([sys.executable, "-c", probe, *command, *extra], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert "HEAVY []" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.fixture
def checkout_with_a_toy_stage(tmp_path):
    """A copy of Kiln's packages with pipelines/toy.py and its line in the table."""
    copy = tmp_path / "kiln"
    for package in ("pipelines", "model", "flows", "storage", "configs"):
        shutil.copytree(ROOT / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "pipelines" / "toy.py").write_text(TOY_STAGE)
    table = copy / "flows" / "stages.py"
    before = table.read_text().splitlines()
    end = before.index(")", before.index("TABLE: tuple[StageEntry, ...] = ("))  # the table's closing line
    line = '    StageEntry("toy", "pipelines.toy", (), "Count the words of toy.text."),'
    after = [*before[:end], line, *before[end:]]
    table.write_text("\n".join(after) + "\n")
    changed = [line for line in after if line not in before]
    assert len(changed) == 1 and len(after) == len(before) + 1, changed  # the table line, nothing else
    return copy


@pytest.mark.slow
def test_a_new_stage_is_one_module_and_one_line(checkout_with_a_toy_stage, tmp_path):
    copy = checkout_with_a_toy_stage
    env = {**os.environ, "PYTHONPATH": str(copy), "COLUMNS": "200", "KILN_NO_PROGRESS": "1"}
    env.pop("PREFECT_API_URL", None)  # the command starts its own temporary server

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, *args], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    assert re.search(r"toy\s+Count the words of toy\.text\.", run("-m", "flows.cli", "--help")), "a command"
    probe = run("-c", "from flows.config import load_config; from flows.deployments import build_deployments\n"
                      "c = load_config(None, ['toy.text=a b c d'])\n"
                      "print(type(c.toy).__name__, repr(c.toy.text))\n"
                      "print([d.name for d in build_deployments('/tmp/unused', 'tiny', [], '0 3 * * *')])")
    assert "ToyConfig 'a b c d'" in probe, "a section of the run config, with --set"
    assert "'kiln-toy'" in probe, "a deployment whose form is its config"

    data = tmp_path / "data"
    output = run("-m", "flows.cli", "toy", "--data-dir", str(data), "--set", "toy.text=a b c d")
    assert re.search(r"│ toy\s+│ built", output), output
    (artifact,) = (data / "toy").glob("*/count.json")
    assert json.loads(artifact.read_text()) == {"words": 4}
    assert not (data / "ingest").exists(), "only the stages the toy stage reads run (none)"
