"""scripts/benchmark.py on micro configs: the JSON schema, every layout sees the same data, the positions each layout
computes, the mixes, skipped layouts, the GPU preset's code path on a CPU. No timing asserts."""

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
# Both mixes at 6% of the CPU scale: ultrafeedback prompt/response medians 6/15, long_prompt 22.5/7.5, max_length 46.
MICRO = ["--model-size", "micro", "--steps", "2", "--warmup", "1", "--length-scale", "0.06", "--min-length", "2"]
CPU_SKIPPED = {"padded_flash", "padded_padding_free_flash", "shared_prompt_flex", "shared_prompt_packed_flex"}
LAYOUT_KEYS = {
    "step_s",
    "step_s_median",
    "wall_step_s_median",
    "cost_per_prompt_s",
    "peak_mem_mb",
    "peak_mem_delta_mb",
    "mem_method",
    "tokens_per_s",
    "computed_tokens_per_s",
    "unique_tokens",
    "computed_tokens",
    "nonpad_tokens",
    "prompts_per_step",
    "rows_per_step",
    "timed_steps",
    "data_digest",
    "precompute_s",
    "collator_s_median",
    "collator_fraction",
    "host_tensor_max_bytes",
    "host_tensor_max_shape",
    "host_tensor_max_name",
    "host_tensor_max_over_input_ids",
    "device_mask_bytes",
    "device_mask_shape",
    "device_mask_kind",
    "mask_build_s_median",
    "model_flops_per_step",
    "mfu",
}


@pytest.fixture(scope="module")
def benchmark():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def micro_result(benchmark, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "result.json"
    benchmark.main([*MICRO, "--in-process", "--json", str(path)])
    return json.loads(path.read_text())


def timed_rows(benchmark, result, mix):
    """The K-way rows of each timed step of `mix`, sampled again from the settings recorded in the JSON."""
    data = {k: v for k, v in result["mixes"][mix]["data"].items() if k != "distribution"}
    config = result["config"]
    n = (config["warmup"] + config["steps"]) * config["prompts_per_step"]
    rows = benchmark.sample_rows(n, vocab_size=config["model_shape"]["vocab_size"], **data)
    b, w = config["prompts_per_step"], config["warmup"]
    return [rows[(w + i) * b : (w + i + 1) * b] for i in range(config["steps"])]


def test_json_schema(benchmark, micro_result):
    result = micro_result
    assert list(result["mixes"]) == ["ultrafeedback", "long_prompt"]
    assert set(result["skipped"]) == CPU_SKIPPED
    assert "no backward pass on CPU" in result["skipped"]["shared_prompt_flex"]
    ran = [name for name in benchmark.LAYOUTS if name not in CPU_SKIPPED | set(benchmark.LISTWISE_LAYOUTS)]
    assert result["config"]["layouts"] == ran and result["config"]["preset"] == "cpu"
    for mix in result["mixes"].values():
        assert list(mix["layouts"]) == ran
        for name, row in mix["layouts"].items():
            assert LAYOUT_KEYS <= set(row), name
            assert row["timed_steps"] == len(row["step_s"]) == 2
            for key in ("step_s_median", "cost_per_prompt_s", "tokens_per_s", "peak_mem_mb", "model_flops_per_step"):
                assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (name, key)
            assert 0 < row["collator_fraction"] < 1 and row["host_tensor_max_bytes"] > 0
            assert row["mfu"] is None  # no peak FLOP/s on a CPU unless --peak-tflops
            assert row["prompts_per_step"] == 2
            assert (row["precompute_s"] is not None) == name.endswith("_precompute")
            assert (row["mask_build_s_median"] is None) == name.startswith("trl_dpo")
        ratios = mix["ratios"]
        assert ratios["best_shared_variant"] in ("shared_prompt", "shared_prompt_packed")
        assert ratios["position_limit"] == mix["positions"]["position_limit"] > 1
        assert ratios["best_flex_variant"] is None and ratios["padded_padding_free_flash_over_best_flex_step"] is None
        assert [t["met"] in (True, False) for t in mix["targets"]] == [True] * 5  # no flex target on a CPU
        assert [t["met"] in (True, False) for t in mix["targets_v1"]] == [True] * 4
    for key in ("torch", "transformers", "trl", "torch_threads", "cpu_model", "flash_attn"):
        assert key in result["environment"]
    assert result["config"]["k"] == 4 and result["config"]["model_parameters"] > 0
    assert result["config"]["isolation"].startswith("in-process")
    assert result["mfu"]["peak_flops"] is None and "6 + 2r" in result["mfu"]["formula"]


def test_layouts_saw_identical_data(micro_result):
    for mix_name, mix in micro_result["mixes"].items():
        layouts = mix["layouts"]
        assert mix["same_data"] is True
        assert {row["unique_tokens"] for row in layouts.values()} == {mix["positions"]["unique"]}, mix_name
        assert len({row["data_digest"] for row in layouts.values()}) == 1
        # What differs is the work: the padded layout repeats each prompt K times, DPO pairs the prompt and best response.
        computed = {name: row["computed_tokens"] for name, row in layouts.items()}
        assert computed["shared_prompt_packed"] <= computed["shared_prompt"] < computed["padded"]
        assert computed["padded_padding_free"] < computed["padded"] < computed["trl_dpo_pairs"]
        assert layouts["padded"]["rows_per_step"] == 4 * 2 and layouts["shared_prompt"]["rows_per_step"] == 2
        assert layouts["padded_padding_free"]["rows_per_step"] == layouts["shared_prompt_packed"]["rows_per_step"] == 1
        assert layouts["trl_dpo_pairs"]["rows_per_step"] == 2 * 3 * 2  # chosen + rejected rows of 3 pairs per prompt
        assert layouts["trl_dpo_precompute"]["rows_per_step"] == 2 * 3 * 2
        assert mix["data_stats"]["prompt"]["max"] + 2 <= mix["data"]["max_length"]


def test_packed_layouts_compute_exactly_their_positions(benchmark, micro_result):
    """padded_padding_free: K*P + sum(R), no padding; shared prompt: P - 1 + sum(R + 1) (the last prompt token heads
    each branch), packed into one row padded only up to sdpa's mask alignment (a multiple of 8)."""
    for mix_name, mix in micro_result["mixes"].items():
        steps = timed_rows(benchmark, micro_result, mix_name)
        padded_free = [sum(4 * len(r["prompt_ids"]) + sum(map(len, r["completion_ids"])) for r in s) for s in steps]
        shared = [
            sum(len(r["prompt_ids"]) - 1 + sum(len(c) + 1 for c in r["completion_ids"]) for r in s) for s in steps
        ]
        layouts = mix["layouts"]
        ppf, packed = layouts["padded_padding_free"], layouts["shared_prompt_packed"]
        assert ppf["computed_tokens_per_step"] == ppf["nonpad_tokens_per_step"] == padded_free, mix_name
        assert packed["nonpad_tokens_per_step"] == shared, mix_name
        assert packed["computed_tokens_per_step"] == [-(-n // 8) * 8 for n in shared], mix_name
        assert layouts["shared_prompt"]["nonpad_tokens_per_step"] == shared
        assert layouts["padded"]["nonpad_tokens_per_step"] == padded_free
        assert mix["positions"]["padded_padding_free"] == sum(padded_free)
        assert mix["positions"]["shared_prompt"] == sum(shared)
        assert mix["positions"]["position_limit"] == pytest.approx(sum(padded_free) / sum(shared))


def test_collator_tensors_and_device_masks(micro_result):
    """No collator tensor is larger than input_ids (the mask is built on the device); the device mask is the dense
    bool (rows, 1, L, L) one under sdpa, the trainer's for the shared prompt and transformers' packed-sequence mask for
    padded_padding_free."""
    for mix in micro_result["mixes"].values():
        layouts = mix["layouts"]
        for name in ("shared_prompt", "shared_prompt_packed", "padded_padding_free"):
            row = layouts[name]
            assert row["host_tensor_max_over_input_ids"] == 1.0, name
            assert row["device_mask_kind"] == "tensor bool", name
            rows = int(row["rows_per_step"])
            expected = [rows * (computed // rows) ** 2 for computed in row["computed_tokens_per_step"]]
            assert row["device_mask_bytes_per_step"] == expected, name
        assert layouts["shared_prompt_packed"]["device_mask_shape"][:2] == [1, 1]
        for target in mix["targets"]:
            if target["target"].startswith("no collator tensor"):
                assert target["met"] is True


def test_mixes_have_different_length_stats(benchmark, micro_result):
    uf, long = (micro_result["mixes"][name] for name in ("ultrafeedback", "long_prompt"))
    assert uf["data_stats"] != long["data_stats"]
    assert uf["data_stats"]["prompt_response_median_ratio"] < 1 < long["data_stats"]["prompt_response_median_ratio"]
    assert long["positions"]["position_limit"] > uf["positions"]["position_limit"]
    # The mixes at both scales: medians and caps as documented, ratios 0.4 and 3 kept by the CPU scaling.
    for scale, max_length in (("cpu", 768), ("full", 2048)):
        uf, long = (benchmark.mix_settings(name, scale) for name in ("ultrafeedback", "long_prompt"))
        assert uf["max_length"] == long["max_length"] == max_length
        assert uf["prompt_median"] / uf["response_median"] == pytest.approx(0.4)
        assert long["prompt_median"] / long["response_median"] == pytest.approx(3.0)
        assert long["prompt_median"] + long["response_median"] < max_length
    assert benchmark.mix_settings("long_prompt", "full")["prompt_median"] == 600
    assert benchmark.mix_settings("long_prompt", "full")["response_median"] == 200
    assert benchmark.mix_settings("ultrafeedback", "cpu", overrides={"max_length": 99})["max_length"] == 99


def test_listwise_layouts_against_nca(benchmark, tmp_path):
    """Issue #20's listwise row: ListwiseTrainer (Plackett-Luce, LiPO-λ) on the shared_prompt layout, the same data and
    the same computed positions as NCA's shared_prompt, with per-step ratios to NCA (values not asserted)."""
    layouts = ["shared_prompt", *benchmark.LISTWISE_LAYOUTS]
    path = tmp_path / "listwise.json"
    argv = [*MICRO, "--mix", "ultrafeedback", "--layouts", *layouts, "--in-process", "--json", str(path)]
    result = benchmark.main(argv)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert not set(benchmark.LISTWISE_LAYOUTS) & set(benchmark.parse_args([]).layouts)  # named, not in the presets
    mix = result["mixes"]["ultrafeedback"]
    assert list(mix["layouts"]) == layouts and mix["same_data"] is True
    rows = mix["layouts"]
    nca = rows["shared_prompt"]
    assert (nca["trainer"], nca["loss_type"]) == ("trl_nca.NCATrainer", ["nca"])
    for layout, loss in benchmark.LISTWISE_LAYOUTS.items():
        row = rows[layout]
        assert (row["trainer"], row["loss_type"]) == ("trl_nca.ListwiseTrainer", [loss]), layout
        assert row["collator_layout"] == "shared_prompt" and row["padding_free"] is False
        assert LAYOUT_KEYS <= set(row) and row["mask_build_s_median"] is not None
        for key in ("computed_tokens_per_step", "nonpad_tokens_per_step", "device_mask_bytes_per_step", "data_digest"):
            assert row[key] == nca[key], (layout, key)
        ratios = mix["ratios"]
        assert ratios[f"{loss}_over_nca_step"] == pytest.approx(row["step_s_median"] / nca["step_s_median"])
        per_step = [a / b for a, b in zip(row["step_s"], nca["step_s"])]
        assert ratios[f"{loss}_over_nca_step_paired_median"] == pytest.approx(statistics.median(per_step))
        assert ratios[f"{loss}_over_nca_step_paired_min"] == min(per_step)
        assert ratios[f"{loss}_over_nca_step_paired_max"] == max(per_step)
        assert ratios[f"{loss}_over_nca_peak_mem"] > 0
    # The rows trained different objectives on the same batches: their logged losses differ.
    losses = [rows[name]["logged"][-1]["loss"] for name in layouts]
    assert all(math.isfinite(loss) for loss in losses) and len(set(losses)) == 3
    # Without shared_prompt in the run there is nothing to compare: no listwise ratio.
    assert not any(
        "_over_nca" in key for key in benchmark.compute_ratios({"shared_prompt_lipo_lambda": rows[layout]})[0]
    )


def test_explicitly_requested_unavailable_layout_is_a_one_line_error(benchmark):
    with pytest.raises(SystemExit) as raised:
        benchmark.main([*MICRO, "--device", "cpu", "--in-process", "--layouts", "padded", "shared_prompt_flex"])
    message = str(raised.value)
    assert "shared_prompt_flex" in message and "flex_attention" in message and "\n" not in message
    with pytest.raises(SystemExit, match="padded_padding_free_flash"):
        benchmark.main([*MICRO, "--device", "cpu", "--in-process", "--layouts", "padded_padding_free_flash"])


def test_flash_attention_availability_is_transformers_own_check(benchmark, tmp_path, monkeypatch):
    """An importable `flash_attn` that transformers would not use (here a bare package without the flash-attn
    distribution, as a stray or wrongly named install looks) is not available: the layout is skipped, as transformers'
    `is_flash_attn_2_available()` says, instead of being let through by `importlib.util.find_spec`."""
    (tmp_path / "flash_attn").mkdir()
    (tmp_path / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    reason = benchmark.unavailable_reason("padded_padding_free_flash", "cuda", "bf16")
    assert reason is not None and "is_flash_attn_2_available" in reason and "\n" not in reason
    assert benchmark.unavailable_reason("padded_padding_free", "cuda", "bf16") is None


def run_with_flash_let_through(benchmark, monkeypatch, tmp_path, layouts, in_process=True):
    """Run `layouts` on the ultrafeedback micro mix with the availability check passing every layout: on a CPU the
    FlashAttention-2 layouts then fail when their model is built (ImportError), as a flash_attn wheel built for another
    torch fails after passing the check on a GPU."""
    monkeypatch.setattr(benchmark, "unavailable_reason", lambda *args: None)
    path = tmp_path / "result.json"
    argv = [*MICRO, "--mix", "ultrafeedback", "--layouts", *layouts, "--json", str(path)]
    argv += ["--in-process"] if in_process else ["--group-size", str(len(layouts))]
    return argv, path


def test_a_failing_layout_is_recorded_and_the_others_kept(benchmark, tmp_path, monkeypatch, capsys):
    argv, path = run_with_flash_let_through(benchmark, monkeypatch, tmp_path, ["padded_flash", "shared_prompt_packed"])
    result = benchmark.main(argv)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    mix = result["mixes"]["ultrafeedback"]
    assert list(mix["layouts"]) == ["shared_prompt_packed"]  # the other layout's results are kept
    row = mix["layouts"]["shared_prompt_packed"]
    assert row["timed_steps"] == 2 and row["step_s_median"] > 0 and mix["same_data"] is True
    error = mix["failed"]["padded_flash"]
    assert error.startswith("ImportError: ") and "FlashAttention2" in error and "\n" not in error
    assert result["failed"] == {"padded_flash": {"ultrafeedback": error}}
    assert result["config"]["model_parameters"] == row["model_parameters"]
    assert mix["ratios"]["padded_over_best_shared_step"] is None  # padded_flash is not padded: nothing to compare
    out = capsys.readouterr().out
    table_row = next(line for line in out.splitlines() if line.startswith("| padded_flash |"))
    assert "FAILED: ImportError: " in table_row
    assert "1 of 2 layout runs failed: padded_flash (ultrafeedback)" in out


def test_every_layout_failing_exits_nonzero_after_writing_the_json(benchmark, tmp_path, monkeypatch):
    argv, path = run_with_flash_let_through(benchmark, monkeypatch, tmp_path, ["padded_flash", "shared_prompt_flex"])
    with pytest.raises(SystemExit) as raised:
        benchmark.main(argv)
    assert raised.value.code not in (0, None)
    message = str(raised.value.code)
    assert "every layout failed" in message and "padded_flash" in message and "\n" not in message
    result = json.loads(path.read_text())
    assert result["mixes"]["ultrafeedback"]["layouts"] == {}
    assert set(result["failed"]) == {"padded_flash", "shared_prompt_flex"}
    # shared_prompt_flex builds (flex_attention exists on CPU); the trainer refuses to train it on a CPU
    flex_error = result["failed"]["shared_prompt_flex"]["ultrafeedback"]
    assert flex_error.startswith("ValueError: ") and "flex_attention" in flex_error


@pytest.mark.slow
def test_a_failing_worker_process_is_recorded_and_the_others_kept(benchmark, tmp_path, monkeypatch):
    """The subprocess path: the failing worker writes its error and exits; the interleaved group goes on without it."""
    layouts = ["padded_padding_free_flash", "padded_padding_free"]
    argv, path = run_with_flash_let_through(benchmark, monkeypatch, tmp_path, layouts, in_process=False)
    result = benchmark.main(argv)
    mix = result["mixes"]["ultrafeedback"]
    assert list(mix["layouts"]) == ["padded_padding_free"]
    assert mix["layouts"]["padded_padding_free"]["timed_steps"] == 2
    assert mix["failed"]["padded_padding_free_flash"].startswith("ImportError: ")
    assert json.loads(path.read_text())["failed"] == result["failed"]


def test_presets(benchmark):
    gpu = benchmark.parse_args(["--preset", "gpu"])
    assert (gpu.model_size, gpu.dtype, gpu.scale, gpu.prompts_per_step) == ("gpu-1b", "bf16", "full", 8)
    assert gpu.gradient_checkpointing is True and gpu.mix == ["ultrafeedback", "long_prompt"]
    assert {"padded_padding_free_flash", "shared_prompt_packed_flex", "trl_dpo_precompute"} <= set(gpu.layouts)
    assert not gpu.layouts_explicit
    cpu = benchmark.parse_args(["--prompts-per-step", "3", "--layouts", "padded"])
    assert (cpu.model_size, cpu.dtype, cpu.scale, cpu.prompts_per_step, cpu.steps) == ("cpu", "fp32", "cpu", 3, 6)
    assert cpu.layouts_explicit and cpu.layouts == ["padded"]
    assert benchmark.data_settings_from_args(cpu, "ultrafeedback")["prompt_median"] == 100  # the v1 CPU defaults


def test_model_flops_formula(benchmark):
    # P = 2, R = (1, 3): U = 6 unique tokens; causal pairs: prompt 1 + 2, response 1: 2 + 1, response 3: 3*2 + 6.
    batch = [{"prompt_ids": [5, 6], "completion_ids": [[7], [8, 9, 10]]}]
    assert benchmark.attention_pairs(batch) == 3 + 3 + 12
    n, layers, d = 1000, 2, 8
    assert benchmark.step_model_flops(batch, n, layers, d, True) == 8 * n * 6 + 16 * layers * d * 18
    assert benchmark.step_model_flops(batch, n, layers, d, False) == 6 * n * 6 + 12 * layers * d * 18
    assert benchmark.positions_of(batch) == {"unique": 6, "padded_padding_free": 2 * 2 + 4, "shared_prompt": 1 + 6}
    assert benchmark.peak_flops("cpu") == (None, "no peak for a CPU (pass --peak-tflops)")
    assert benchmark.peak_flops("cpu", 2.0)[0] == 2e12


def test_gpu_preset_runs_tiny_on_cpu(benchmark, tmp_path):
    """The GPU preset's code path (bf16, gradient checkpointing, full-scale mix, its layouts, MFU) with micro sizes:
    flex and FlashAttention-2 layouts are skipped on a CPU and recorded."""
    path = tmp_path / "gpu.json"
    argv = ["--preset", "gpu", "--model-size", "micro", "--prompts-per-step", "2", "--steps", "1", "--warmup", "1"]
    argv += ["--length-scale", "0.02", "--min-length", "2", "--mix", "long_prompt", "--in-process"]
    result = benchmark.main([*argv, "--device", "cpu", "--peak-tflops", "0.001", "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    config = result["config"]
    assert (config["preset"], config["dtype"], config["gradient_checkpointing"]) == ("gpu", "bf16", True)
    assert config["scale"] == "full" and result["mixes"]["long_prompt"]["data"]["max_length"] == round(2048 * 0.02)
    assert set(result["skipped"]) == CPU_SKIPPED
    gpu_layouts = benchmark.PRESETS["gpu"]["layouts"]
    layouts = result["mixes"]["long_prompt"]["layouts"]
    assert list(layouts) == [name for name in gpu_layouts if name not in CPU_SKIPPED]
    for name, row in layouts.items():
        assert row["mfu"] == pytest.approx(row["model_flops_per_step"] / row["step_s_median"] / 1e9), name
    assert layouts["trl_dpo_precompute"]["reference_in_step"] is False
    assert result["mixes"]["long_prompt"]["same_data"] is True


def test_worker_protocol(benchmark, tmp_path):
    """The subprocess path: a worker reads a spec and the rows from files and writes one layout's result."""
    args = benchmark.parse_args(MICRO)
    data = benchmark.data_settings_from_args(args, "ultrafeedback")
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
    spec = {"layout": "shared_prompt_packed", "rows_path": str(tmp_path / "rows.json"), "settings": settings}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert benchmark.main(["--_worker", str(tmp_path / "spec.json"), str(tmp_path / "result.json")]) is None
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["collator_layout"] == "shared_prompt" and result["padding_free"] is True
    assert len(result["step_s"]) == 1 and result["rows"] == [1]
    expected = sum(len(r["prompt_ids"]) + sum(map(len, r["completion_ids"])) for r in rows[2:4])
    assert result["unique_tokens"] == [expected]  # the timed step: prompts 2-3 (prompts 0-1 were the warm-up)
    # eager gets the additive float mask, built on the device from the collator's metadata
    assert result["device_mask"][0]["kind"] == "tensor float32"


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
    layouts = ["padded_padding_free", "shared_prompt_packed"]
    argv = [*MICRO, "--mix", "ultrafeedback", "--layouts", *layouts, "--group-size", "2", "--json", str(path)]
    result = benchmark.main(argv)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    mix = result["mixes"]["ultrafeedback"]
    assert mix["same_data"] is True and mix["groups"] == [layouts]
    for row in mix["layouts"].values():
        assert row["timed_steps"] == 2 and row["mem_method"].endswith("fresh process")
        assert row["wall_step_s_median"] >= 0
    assert mix["ratios"]["padded_padding_free_over_best_shared_step"] > 0
    assert mix["ratios"]["padded_over_best_shared_step"] is None  # not run
    assert result["skipped"] == {}


def test_cpu_threads_script_times_fresh_processes(tmp_path, capsys):
    """scripts/cpu_threads.py (the README's thread-count numbers): one run per setting, written and printed."""

    script = load_script(Path(__file__).resolve().parents[1] / "scripts" / "cpu_threads.py")
    out = tmp_path / "threads.json"
    assert script.main(["--threads", "1", "--repeats", "1", "--steps", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["steps"] == 1 and len(results["seconds"]["1"]) == 1 and results["seconds"]["1"][0] > 0
    assert "1 thread(s): median" in capsys.readouterr().out
