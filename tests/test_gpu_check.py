"""scripts/gpu_check.py on a CPU: the JSON and every check's status (CUDA-only checks skipped, saying why), and each
check's own code run on CPU-capable stand-ins (sdpa for flex, eager for FlashAttention-2, the transformers backend for
vLLM), where it must pass and where it must catch a planted difference."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
KINDS = ("ok", "failed: ", "skipped: ")


@pytest.fixture(scope="module")
def gpu_check():
    return load_script(SCRIPT)


def on_cpu(gpu_check, tmp_path, **overrides):
    """The CPU settings of the command line, with CPU-capable stand-ins where named."""
    return gpu_check.settings_for("cpu", str(tmp_path))._replace(**overrides)


def one_line(status: str) -> bool:
    return status.startswith(KINDS) and "\n" not in status


@pytest.fixture(scope="module")
def cpu_run(gpu_check, tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu_check") / "result.json"
    argv = ["--device", "cpu", "--in-process", "--only", "flex", "fa2", "moe_aux", "vllm", "--json", str(path)]
    code = gpu_check.main(argv)
    return code, json.loads(path.read_text())


def test_cpu_run_writes_a_status_for_every_chosen_check(cpu_run):
    code, result = cpu_run
    checks = result["checks"]
    assert list(checks) == ["flex", "fa2", "moe_aux", "vllm"]  # the script's order, only those asked for
    for name, check in checks.items():
        assert one_line(check["status"]), (name, check["status"])
        assert isinstance(check["numbers"], dict) and check["seconds"] >= 0
    assert checks["flex"]["status"].startswith("skipped: ") and "CPU" in checks["flex"]["status"]
    assert checks["fa2"]["status"] == "skipped: FlashAttention-2 runs on CUDA only"
    if importlib.util.find_spec("vllm") is None:
        assert checks["vllm"]["status"].startswith("skipped: vllm is not importable")
    # moe_aux runs on a CPU too (and passes: see the test below)
    moe = checks["moe_aux"]
    assert not moe["status"].startswith("skipped")
    for mode in ("no_checkpointing", "gc_reentrant", "gc_non_reentrant"):
        numbers = moe["numbers"][mode]
        assert numbers["router_tensors"] > 0 and numbers["router_grad_norm"] > 0, mode
        assert math.isfinite(numbers["loss"][0]) and numbers["aux_loss"][0] > 0, mode
    for mode in ("gc_reentrant", "gc_non_reentrant"):
        assert moe["numbers"][mode]["router_grad_rel_diff"] >= 0
    summary = result["summary"]
    assert sorted(summary["ok"] + summary["failed"] + summary["skipped"]) == sorted(checks)
    assert code == (1 if summary["failed"] else 0)
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"]
    assert result["settings"]["device"] == "cpu" and result["time_limits_s"] is None


def test_moe_aux_check_passes(cpu_run):
    """The router gradient with gradient checkpointing (reentrant or not) equals the one without."""
    moe = cpu_run[1]["checks"]["moe_aux"]
    assert moe["status"] == "ok", moe["status"]
    assert moe["numbers"]["gc_reentrant"]["router_grad_rel_diff"] <= 1e-4


def test_flex_check_code_on_sdpa_stand_ins(gpu_check, tmp_path):
    """The flex check's runs and comparisons with the shared-prompt layouts under sdpa (flex cannot train on a CPU):
    every variant equals padded sdpa in fp32, gradient checkpointing (both kinds) included."""
    settings = on_cpu(gpu_check, tmp_path, flex_layouts=("shared_prompt", "shared_prompt_packed"))
    check = gpu_check.run_check("flex", settings)
    assert check["status"] == "ok", check["status"]
    runs = check["numbers"]["runs"]
    expected = ["padded_sdpa", "shared_prompt", "shared_prompt+gc_reentrant", "shared_prompt+gc_non_reentrant"]
    assert list(runs) == [*expected, "shared_prompt_packed"]
    steps = 1 + settings.steps  # one warm-up step, then the timed ones, every one logged
    for name, run in runs.items():
        assert len(run["losses"]) == len(run["grad_norms"]) == steps, name
        assert len(run["step_s"]) == settings.steps and run["dynamo_graphs"] == 0, name
    assert runs["shared_prompt"]["trained_layout"] == ["shared_prompt", False]
    assert runs["shared_prompt_packed"]["trained_layout"] == ["shared_prompt", True]
    for name in list(runs)[1:]:
        assert runs[name]["max_loss_diff"] <= 1e-5 and runs[name]["max_grad_norm_rel_diff"] <= 1e-4, name


def test_flex_check_catches_a_gradient_that_differs(gpu_check, tmp_path, monkeypatch):
    """A variant whose gradient norms are 10% off the baseline's (what a checkpointing bug that drops part of the
    gradient looks like) fails the check, named; its losses, equal to the baseline's, do not."""
    run_layout = gpu_check.benchmark.run_layout

    def off_under_reentrant_checkpointing(layout, rows, settings, *args, **kwargs):
        part = run_layout(layout, rows, settings, *args, **kwargs)
        if (settings.get("gradient_checkpointing_kwargs") or {}).get("use_reentrant"):
            part["logged"] = [{**log, "grad_norm": 1.1 * log["grad_norm"]} for log in part["logged"]]
        return part

    monkeypatch.setattr(gpu_check.benchmark, "run_layout", off_under_reentrant_checkpointing)
    settings = on_cpu(gpu_check, tmp_path, flex_layouts=("shared_prompt", "shared_prompt_packed"))
    check = gpu_check.run_check("flex", settings)
    assert check["status"] == "failed: shared_prompt+gc_reentrant: gradient norm differs from padded sdpa by 10.00%"
    assert check["numbers"]["runs"]["shared_prompt+gc_reentrant"]["max_loss_diff"] <= 1e-5


def test_flex_check_records_each_failing_variant(gpu_check, tmp_path, monkeypatch):
    """Let the flex layouts through on a CPU (as a GPU whose flex path breaks): every flex variant fails (the trainer
    refuses to train flex_attention on a CPU), each error is recorded and the baseline's numbers are kept."""
    monkeypatch.setattr(gpu_check.benchmark, "unavailable_reason", lambda *args: None)
    check = gpu_check.run_check("flex", on_cpu(gpu_check, tmp_path))
    assert one_line(check["status"]) and check["status"].startswith("failed: shared_prompt_flex: ValueError: ")
    runs = check["numbers"]["runs"]
    assert len(runs["padded_sdpa"]["losses"]) == 4
    for name in list(runs)[1:]:
        assert runs[name]["error"].startswith("ValueError: ") and "flex_attention" in runs[name]["error"], name


def test_a_check_stopped_at_its_time_limit_keeps_what_it_measured(gpu_check, tmp_path, monkeypatch):
    """SIGTERM (sent before the limit) raises in the check's process; the variants finished before it are kept."""
    import signal

    run_layout, calls = gpu_check.benchmark.run_layout, []

    def stopped_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            gpu_check._stop(signal.SIGTERM, None)  # what the handler does when the signal arrives
        return run_layout(*args, **kwargs)

    monkeypatch.setattr(gpu_check.benchmark, "run_layout", stopped_at_the_third)
    settings = on_cpu(gpu_check, tmp_path, flex_layouts=("shared_prompt", "shared_prompt_packed"))
    check = gpu_check.run_check("flex", settings)
    assert check["status"].startswith("failed: TimeoutError: the check ran past its time limit")
    assert list(check["numbers"]["runs"]) == ["padded_sdpa", "shared_prompt"]


def test_fa2_check_code_on_an_eager_stand_in(gpu_check, tmp_path):
    check = gpu_check.run_check("fa2", on_cpu(gpu_check, tmp_path, fa2_attn="eager"))
    assert check["status"] == "ok", check["status"]
    numbers = check["numbers"]
    assert numbers["attn_implementation"] == "eager" and numbers["logps_excess_over_tolerance"] <= 0
    assert numbers["trained_layout"] == numbers["layout"]
    assert len(numbers["losses"]) == 3 and all(math.isfinite(loss) for loss in numbers["losses"])


def test_fa2_check_catches_log_probs_that_differ(gpu_check, tmp_path, monkeypatch):
    """The reference (sdpa) model built with other weights: the log-probs differ and the check says by how much."""
    build = gpu_check.build_tiny_model

    def other_sdpa_weights(tokenizer, architecture, attn_implementation, seed, **kwargs):
        seed = seed + 1 if attn_implementation == "sdpa" else seed
        return build(tokenizer, architecture, attn_implementation=attn_implementation, seed=seed, **kwargs)

    monkeypatch.setattr(gpu_check, "build_tiny_model", other_sdpa_weights)
    check = gpu_check.run_check("fa2", on_cpu(gpu_check, tmp_path, fa2_attn="eager"))
    assert check["status"].startswith("failed: log-probs differ from padded sdpa by "), check["status"]
    assert check["numbers"]["logps_excess_over_tolerance"] > 0


def test_vllm_check_code_on_the_transformers_backend(gpu_check, tmp_path):
    """The pool path of `trl-nca generate` (two models, one after the other, then the reward model)."""
    check = gpu_check.run_check("vllm", on_cpu(gpu_check, tmp_path, vllm_backend="transformers"))
    assert check["status"] == "ok", check["status"]
    numbers = check["numbers"]
    assert numbers["exit_status"] == 0 and numbers["completions_sampled"] == 4 * 8
    assert {"sampling/model_0_s", "sampling/model_1_s"} <= set(numbers["timings"])
    assert numbers["free_gib"] == {}  # GPU memory is measured on CUDA only


def test_qlora_check_code_on_a_cpu(gpu_check, tmp_path, monkeypatch):
    """One 4-bit QLoRA step from a saved model path. bitsandbytes' CPU inference repacking (AVX512-BF16 CPUs) is
    turned off, as it is on a CPU without it: then gradients reach every LoRA layer."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    check = gpu_check.run_check("qlora", on_cpu(gpu_check, tmp_path))
    assert check["status"] == "ok", check["status"]
    numbers = check["numbers"]
    assert numbers["linear4bit_modules"] == 14  # 2 layers x 7 linear layers
    assert numbers["lora_b_changed"] == numbers["lora_b_tensors"] == 14
    assert math.isfinite(numbers["losses"][0])


@pytest.mark.slow
def test_checks_run_in_their_own_processes_with_a_time_limit(gpu_check, tmp_path, monkeypatch):
    """The default path: a check past its limit is stopped and recorded as failed; the next one still runs."""
    monkeypatch.setitem(gpu_check.TIME_LIMITS_S, "flex", 1)  # less than its process needs to start
    path = tmp_path / "result.json"
    code = gpu_check.main(["--device", "cpu", "--only", "flex", "fa2", "--json", str(path)])
    checks = json.loads(path.read_text())["checks"]
    assert code == 1
    assert checks["flex"]["status"].startswith("failed: TimeoutError: "), checks["flex"]["status"]
    assert checks["fa2"]["status"] == "skipped: FlashAttention-2 runs on CUDA only"
    assert checks["fa2"]["process_s"] >= checks["fa2"]["seconds"]  # its process's start-up (imports) included
