"""scripts/benchmark_sampling.py on a micro run of the transformers backend (the vLLM and server backends run in
`.ci/vllm_stage.sh`'s environment): the rates it reports are the run's own counts over its sampling time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_sampling.py"


@pytest.mark.slow
def test_micro_run_reports_the_counts_of_each_run(tmp_path):
    out = tmp_path / "sampling.json"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--backends", "transformers", "--prompts", "3", "--num_completions", "2"]
        + ["--max_new_tokens", "4", "--repeats", "2", "--json", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    runs = result["runs"]["transformers"]
    assert len(runs) == 2 and result["server_start_s"] is None
    for entry in runs:
        assert entry["completions"] == 3 * 2 and 0 < entry["tokens"] <= 3 * 2 * 4
        assert entry["completions_per_s"] == pytest.approx(entry["completions"] / entry["sampling_s"])
        assert 0 < entry["sampling_s"] < entry["command_s"]
    rates = sorted(r["completions_per_s"] for r in runs)
    assert result["median"]["transformers"]["completions_per_s"] == pytest.approx(sum(rates) / 2)
    assert "medians:" in run.stdout


def test_vllm_backends_without_vllm_are_one_line(tmp_path):
    """Asking for the vLLM or server backend where vLLM does not import is one line, exit 2 (a `vllm` module that
    fails to import stands in for a missing install, so the check runs whether or not vLLM is installed)."""
    (tmp_path / "vllm.py").write_text("raise ImportError('No module named vllm')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    for backend in ("vllm", "server"):
        run = subprocess.run(
            [sys.executable, str(SCRIPT), "--backends", backend], capture_output=True, text=True, env=env
        )
        assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert "need vLLM" in run.stderr


def test_docs_quote_the_committed_results():
    """docs/reward_data.md's backend table is the rendering of the committed results file, number for number."""
    docs = (SCRIPT.parents[1] / "docs" / "reward_data.md").read_text()
    run = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--render",
            str(SCRIPT.parents[1] / "docs/benchmarks/cpu-issue17-sampling.json"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    table = run.stdout.strip()
    assert table.count("\n|") == 4 and table in docs
