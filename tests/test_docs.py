"""Every ```python block in README.md and docs/*.md runs as written (offline, on a CPU)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _blocks():
    for path in DOCS:
        for index, match in enumerate(BLOCK.finditer(path.read_text(encoding="utf-8"))):
            yield pytest.param(path, match.group(1), id=f"{path.relative_to(ROOT)}#{index}")


def test_docs_have_code_blocks():
    assert len(list(_blocks())) >= 5


@pytest.mark.parametrize("path,code", list(_blocks()))
def test_code_block_runs(tmp_path, path, code):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{path.name} block failed:\n{code}\n--- stderr ---\n{result.stderr[-3000:]}"


COMMAND_PAIR_DOCS = [ROOT / "README.md", ROOT / "docs" / "recipes.md"]


@pytest.mark.parametrize("path", COMMAND_PAIR_DOCS, ids=lambda p: p.name)
def test_documented_prepare_and_train_pair_changes_only_dataset_name(path):
    """The documented pair: `prepare_ultrafeedback.py ... --output DIR`, then a GPU recipe with `--dataset_name DIR`
    and no other flag, whose splits are the ones the script writes (tests/test_prepare_script.py trains it)."""
    from conftest import load_script

    from trl_nca.scripts.train import parse_args

    text = path.read_text(encoding="utf-8")
    prepare = re.search(r"^python scripts/prepare_ultrafeedback\.py (.*?)(?:#.*)?$", text, re.M)
    train = re.search(r"^trl-nca train (\S+\.yaml) --dataset_name (\S+)(.*)$", text, re.M)
    assert prepare and train, f"{path.name} does not show the prepare + train command pair"
    assert train.group(3).split("#")[0].strip() == "", "the train command changes more than --dataset_name"
    script = load_script(ROOT / "scripts" / "prepare_ultrafeedback.py")
    written = script.build_parser().parse_args(prepare.group(1).split())  # the documented flags, as written
    output = written.output
    assert train.group(2) == output
    cpu = ["--bf16", "false", "--load_in_4bit", "false"]  # this box has no GPU: the recipe's bf16 would be refused
    script_args, _, _ = parse_args([str(ROOT / train.group(1)), "--dataset_name", output, *cpu])
    assert script_args.dataset_name == output
    assert script_args.dataset_train_split == written.train_split
    assert script_args.dataset_test_split == written.test_split
