"""scripts/benchmark.py on a micro config: the JSON schema, and every layout sees the same data. No timing asserts."""

import json
import math
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
MICRO = [
    "--model-size",
    "micro",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--prompts-per-step",
    "2",
    "--prompt-median",
    "6",
    "--response-median",
    "10",
    "--min-length",
    "2",
    "--prompt-max",
    "16",
    "--max-length",
    "48",
]
LAYOUT_KEYS = {
    "step_s",
    "step_s_median",
    "wall_step_s_median",
    "cost_per_prompt_s",
    "peak_mem_mb",
    "peak_mem_delta_mb",
    "mem_method",
    "tokens_per_s",
    "unique_tokens",
    "computed_tokens",
    "nonpad_tokens",
    "prompts_per_step",
    "rows_per_step",
    "timed_steps",
    "data_digest",
    "precompute_s",
}


@pytest.fixture(scope="module")
def benchmark():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def micro_result(benchmark, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "result.json"
    benchmark.main([*MICRO, "--in-process", "--json", str(path)])
    return json.loads(path.read_text())


def test_json_schema(benchmark, micro_result):
    result = micro_result
    assert set(result["layouts"]) == set(benchmark.LAYOUTS)
    for name, row in result["layouts"].items():
        assert LAYOUT_KEYS <= set(row), name
        assert row["timed_steps"] == len(row["step_s"]) == 2
        for key in ("step_s_median", "cost_per_prompt_s", "tokens_per_s", "peak_mem_mb"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (name, key)
        assert row["prompts_per_step"] == 2
        assert (row["precompute_s"] is not None) == name.endswith("_precompute")
    assert {"padded_over_shared_step", "shared_over_sft_floor_step", "trl_dpo_over_shared_per_epoch"} <= set(
        result["ratios"]
    )
    assert all(value is not None for value in result["ratios"].values())
    assert [t["met"] in (True, False) for t in result["targets"]] == [True] * 4
    for key in ("torch", "transformers", "trl", "torch_threads", "cpu_model"):
        assert key in result["environment"]
    assert result["config"]["k"] == 4 and result["config"]["model_parameters"] > 0
    assert result["not_built"] == ["shared_prompt_packed (several prompts packed into one row)"]
    assert result["config"]["isolation"].startswith("in-process")


def test_layouts_saw_identical_data(micro_result):
    layouts = micro_result["layouts"]
    assert micro_result["same_data"] is True
    assert len({row["unique_tokens"] for row in layouts.values()}) == 1
    assert len({row["data_digest"] for row in layouts.values()}) == 1
    # What differs is the work: the padded layout repeats each prompt K times, DPO pairs repeat prompt and best response.
    computed = {name: row["computed_tokens"] for name, row in layouts.items()}
    assert computed["shared_prompt"] < computed["padded"] < computed["trl_dpo_pairs"]
    assert layouts["padded"]["rows_per_step"] == 4 * 2 and layouts["shared_prompt"]["rows_per_step"] == 2
    assert layouts["trl_dpo_pairs"]["rows_per_step"] == 2 * 3 * 2  # chosen + rejected rows of 3 pairs per prompt
    stats = micro_result["data_stats"]
    assert stats["prompt"]["max"] <= 16 and stats["prompt"]["max"] + 2 <= 48


def test_worker_protocol(benchmark, tmp_path):
    """The subprocess path: a worker reads a spec and the rows from files and writes one layout's result."""
    args = benchmark.parse_args(MICRO)
    data = {**benchmark.data_settings_from_args(args), "seed": 0}
    rows = benchmark.sample_rows(4, vocab_size=benchmark.MODEL_SIZES["micro"]["vocab_size"], **data)
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    settings = dict(
        model_size="micro",
        attn="eager",
        dtype="fp32",
        device="cpu",
        prompts_per_step=2,
        steps=1,
        warmup=1,
        threads=None,
        output_dir=str(tmp_path / "out"),
    )
    spec = {"layout": "shared_prompt", "rows_path": str(tmp_path / "rows.json"), "settings": settings}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert benchmark.main(["--_worker", str(tmp_path / "spec.json"), str(tmp_path / "result.json")]) is None
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["collator_layout"] == "shared_prompt" and len(result["step_s"]) == 1
    expected = sum(len(r["prompt_ids"]) + sum(map(len, r["completion_ids"])) for r in rows[2:4])
    assert result["unique_tokens"] == [expected]  # the timed step: prompts 2-3 (prompts 0-1 were the warm-up)


def test_sampled_lengths_follow_the_distribution(benchmark):
    rows = benchmark.sample_rows(
        200,
        vocab_size=32000,
        prompt_median=100,
        prompt_sigma=0.8,
        response_median=250,
        response_sigma=0.6,
        min_length=8,
        prompt_max=512,
        max_length=768,
        seed=0,
    )
    stats = benchmark.length_stats(rows)
    assert stats["prompt"]["median"] == pytest.approx(100, abs=2)
    assert stats["response"]["median"] == pytest.approx(250, abs=3)
    assert stats["prompt_response_median_ratio"] == pytest.approx(0.4, abs=0.01)
    assert all(len(r["prompt_ids"]) + len(c) <= 768 for r in rows for c in r["completion_ids"])
    assert all(len(r["completion_ids"]) == 4 for r in rows)
    pairs = benchmark.dpo_pair_rows(rows[:1])
    assert len(pairs) == 3 and all(p["chosen_ids"] == pairs[0]["chosen_ids"] for p in pairs)


@pytest.mark.slow
def test_interleaved_subprocess_workers(benchmark, tmp_path):
    """The default path: one worker process per layout, interleaved step by step through pipes."""
    path = tmp_path / "result.json"
    result = benchmark.main([*MICRO, "--layouts", "padded", "shared_prompt", "--group-size", "2", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert result["same_data"] is True and result["config"]["groups"] == [["padded", "shared_prompt"]]
    for row in result["layouts"].values():
        assert row["timed_steps"] == 2 and row["mem_method"].endswith("fresh process")
        assert row["wall_step_s_median"] >= 0
    assert result["ratios"]["padded_over_shared_step"] > 0
    assert result["ratios"]["trl_dpo_over_shared_per_epoch"] is None  # not run


def test_cpu_threads_script_times_fresh_processes(tmp_path, capsys):
    """scripts/cpu_threads.py (the README's thread-count numbers): one run per setting, written and printed."""

    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "cpu_threads.py")
    out = tmp_path / "threads.json"
    assert script.main(["--threads", "1", "--repeats", "1", "--steps", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["steps"] == 1 and len(results["seconds"]["1"]) == 1 and results["seconds"]["1"][0] > 0
    assert "1 thread(s): median" in capsys.readouterr().out
