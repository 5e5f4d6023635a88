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
