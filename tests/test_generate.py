"""`trl-nca generate`: sampling, scoring, assembly, resumption and multi-process runs, against independent oracles."""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cpu_args
from datasets import Dataset, load_from_disk

from trl_nca import NCAConfig, NCATrainer, RewardDataConfig, build_reward_dataset
from trl_nca.generation import (
    SamplingOptions,
    TransformersSampler,
    VLLMSampler,
    decode_sample,
    generate_completions,
    keyed_seed,
)
from trl_nca.reward_data import ResumeError
from trl_nca.scoring import RewardFunctionError, RewardModel, call_source, combine_scores, load_reward_function
from trl_nca.tiny import build_tiny_model, build_tiny_reward_model

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 300


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Sampling many short sequences: one thread is several times faster than two spinning ones on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conversational(n: int) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": str(2 * i)} for i in range(n)
    ]


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory, tokenizer):
    """Two tiny policies of different weights and a tiny reward model, saved as local model ids."""
    root = tmp_path_factory.mktemp("generate-models")
    paths = {}
    for name, seed in (("policy_a", 0), ("policy_b", 1)):
        model = build_tiny_model(
            tokenizer, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, seed=seed
        )
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    build_tiny_reward_model(tokenizer, seed=3).save_pretrained(root / "rm")
    tokenizer.save_pretrained(root / "rm")
    paths["rm"] = str(root / "rm")
    return paths


REWARDS_PY = textwrap.dedent(
    """
    import os, time

    def length_reward(prompts, completions, **kwargs):
        return [len(c[0]["content"]) / 10 for c in completions]

    def answer_reward(prompts, completions, answer, **kwargs):
        # None (no score) for the prompts whose answer is "0", as a GRPO multi-task reward does
        return [None if a == "0" else float(a in c[0]["content"]) for c, a in zip(completions, answer)]

    def slow_reward(prompts, completions, **kwargs):
        time.sleep(float(os.environ.get("SLOW_REWARD_S", "0")))
        return [float(len(c[0]["content"]) % 7) for c in completions]
    """
)


@pytest.fixture(scope="module")
def rewards_py(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "rewards.py"
    path.write_text(REWARDS_PY)
    return str(path)


def _config(tmp_path, pool_dirs, **overrides) -> RewardDataConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=[pool_dirs["policy_a"]],
        num_completions=4,
        max_new_tokens=8,
        reward_funcs=["unused"],
        chunk_size=3,
        generation_batch_size=2,
        dtype="float32",
    )
    values.update(overrides)
    return RewardDataConfig(**values)


# ---------------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_per_seed_and_key(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    prompts = [row["prompt"] for row in _conversational(5)]
    sampler = TransformersSampler(model, tokenizer, SamplingOptions(max_new_tokens=10), batch_size=2)

    def texts(seed, key):
        return [[s.completion[0]["content"] for s in row] for row in sampler.sample(prompts, 3, seed, key=key)]

    first = texts(0, "a")
    assert first == texts(0, "a")  # same seed and key: same completions, whatever ran in between
    assert first != texts(1, "a") and first != texts(0, "b")
    # Every completion is an assistant message, cut after its stop token (kept in the ids, as GRPOTrainer keeps the
    # first EOS) and decoded from its ids without it.
    stops = set(sampler.stop_ids)
    samples = [sample for row in sampler.sample(prompts, 3, 0, key="a") for sample in row]
    for sample in samples:
        ids = sample.completion_ids
        assert sample.completion[0]["role"] == "assistant"
        assert len(ids) <= 10
        assert sample.finished == (ids[-1] in stops) and not set(ids[:-1]) & stops
        text_ids = ids[:-1] if sample.finished else ids
        assert tokenizer.decode(text_ids, skip_special_tokens=True) == sample.completion[0]["content"]
    # generate_completions is the same chunked schedule: chunk 0 of a single model is key model0/chunk0.
    via_helper = generate_completions(
        model,
        tokenizer,
        prompts,
        3,
        seed=0,
        options=SamplingOptions(max_new_tokens=10),
        batch_size=2,
        chunk_size=5,
        show_progress=False,
    )
    assert [[s.completion_ids for s in row] for row in via_helper] == [
        [s.completion_ids for s in row] for row in sampler.sample(prompts, 3, 0, key="model0/chunk0")
    ]
    assert keyed_seed(0, "a") == keyed_seed(0, "a") != keyed_seed(0, "b")


def test_standard_prompts_sample_text_completions(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sampler = TransformersSampler(model, tokenizer, SamplingOptions(max_new_tokens=6))
    rows = sampler.sample(["The sky is", "Two plus two is"], 2, seed=0)
    assert all(isinstance(s.completion, str) for row in rows for s in row)
    greedy = TransformersSampler(model, tokenizer, SamplingOptions(max_new_tokens=6, do_sample=False))
    first, second = greedy.sample(["The sky is"], 2, seed=0)[0]
    assert first.completion_ids == second.completion_ids  # greedy: identical


def test_completion_ids_keep_the_stop_token_as_grpo_does(tokenizer):
    """GRPOTrainer (TRL 1.16, grpo_trainer.py `_generate_and_score_completions`) masks a completion after its first
    EOS, keeping the EOS: reward functions see it in `completion_ids`, so DAPO's length penalty counts it."""
    from trl.rewards import get_soft_overlong_punishment

    end = tokenizer.convert_tokens_to_ids("<|end|>")
    word = tokenizer(" four", add_special_tokens=False)["input_ids"]
    pad = tokenizer.pad_token_id
    stopped = decode_sample(tokenizer, word * 3 + [end, pad, pad], [end], conversational=False)
    cut = decode_sample(tokenizer, word * 4, [end], conversational=False)
    assert stopped.completion_ids == word * 3 + [end] and stopped.finished
    assert stopped.completion == " four four four"  # the text has no stop token
    assert cut.completion_ids == word * 4 and not cut.finished
    # GRPO's rule written out: everything up to and including the first stop token.
    generated = word * 3 + [end, pad, pad]
    grpo_ids = generated[: generated.index(end) + 1]
    assert stopped.completion_ids == grpo_ids
    n = len(grpo_ids)
    penalty = get_soft_overlong_punishment(max_completion_len=n, soft_punish_cache=1)
    assert penalty(completion_ids=[stopped.completion_ids]) == penalty(completion_ids=[grpo_ids])
    assert penalty(completion_ids=[stopped.completion_ids[:-1]]) != penalty(completion_ids=[grpo_ids])


# vLLM 0.32.0's rule, vllm/sampling_params.py: below `_SAMPLING_EPS` the temperature means greedy sampling, and
# `SamplingParams.__post_init__` then calls `_verify_greedy_sampling`, which refuses `n > 1`.
VLLM_SAMPLING_EPS = 1e-5


def fake_vllm(monkeypatch, tokenizer, calls: dict, shutdown_error: Exception | None = None) -> None:
    """Install a stand-in `vllm` package (vLLM is not installed in the main environment; tests/test_vllm_real.py runs
    the real one). It records what the backend asks of it, validates `SamplingParams` as vLLM 0.32 does, answers
    `generate` with completion `j` of every prompt = " four" + `j` times " cat" (so copies and distinct samples differ),
    and tears down like vLLM's in-process engine: `engine_core.shutdown()` and `destroy_distributed_environment()`
    destroy torch's default process group (vllm/v1/engine/core.py `EngineCore.shutdown` ->
    `cleanup_dist_env_and_memory`)."""
    calls.setdefault("shutdown", 0)
    calls.setdefault("destroyed", [])

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            if self.temperature < VLLM_SAMPLING_EPS and self.n > 1:
                raise ValueError(f"n must be 1 when using greedy sampling, got {self.n}.")

    def destroy_default_group():
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    class EngineCore:
        def shutdown(self):
            calls["shutdown"] += 1
            if shutdown_error is not None:
                raise shutdown_error
            destroy_default_group()

    class FakeLLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            self.llm_engine = types.SimpleNamespace(engine_core=EngineCore())

        def generate(self, prompts, params, use_tqdm):
            calls["prompts"], calls["params"] = prompts, params
            ids = tokenizer(" four", add_special_tokens=False)["input_ids"]
            cat = tokenizer(" cat", add_special_tokens=False)["input_ids"]
            stop = tokenizer.convert_tokens_to_ids("<|end|>")
            # vLLM takes one SamplingParams for every prompt, or a list of one per prompt.
            per_prompt = params if isinstance(params, list) else [params] * len(prompts)
            assert len(per_prompt) == len(prompts)
            return [
                types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(token_ids=ids + cat * j + [stop, 7, 7]) for j in range(p.n)]
                )
                for p in per_prompt
            ]

    def destroy_model_parallel():
        calls["destroyed"].append("model_parallel")

    def destroy_distributed_environment():
        calls["destroyed"].append("distributed_environment")
        destroy_default_group()

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    distributed = types.ModuleType("vllm.distributed")
    parallel_state = types.ModuleType("vllm.distributed.parallel_state")
    parallel_state.destroy_model_parallel = destroy_model_parallel
    parallel_state.destroy_distributed_environment = destroy_distributed_environment
    vllm.distributed, distributed.parallel_state = distributed, parallel_state
    for name, module in (
        ("vllm", vllm),
        ("vllm.distributed", distributed),
        ("vllm.distributed.parallel_state", parallel_state),
    ):
        monkeypatch.setitem(sys.modules, name, module)


def test_vllm_backend_passes_the_sampling_options_and_decodes_like_transformers(
    monkeypatch, tiny_model_dir, tokenizer
):
    """The stand-in module records what the backend asks of vLLM and what it decodes from vLLM's token ids."""
    calls = {}
    fake_vllm(monkeypatch, tokenizer, calls)
    options = SamplingOptions(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=12)
    sampler = VLLMSampler(tiny_model_dir, tokenizer, options, dtype="float32")
    prompts = [row["prompt"] for row in _conversational(2)]
    rows = sampler.sample(prompts, 3, seed=5, key="k")
    # One SamplingParams per prompt: the same options, a seed of its own (the server backend's rule), so prompts of a
    # chunk do not share their random numbers.
    first, second = calls["params"]
    for index, params in enumerate((first, second)):
        assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (3, 0.7, 0.9, -1, 12)
        assert params.seed == keyed_seed(keyed_seed(5, "k"), index) % 2**31
        assert set(params.stop_token_ids) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")}
    assert first.seed != second.seed
    expected_prompt = tokenizer.apply_chat_template(prompts[0], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert calls["prompts"][0]["prompt_token_ids"] == list(expected_prompt)
    assert calls["llm"]["model"] == tiny_model_dir
    assert [[s.completion[0]["content"] for s in row] for row in rows] == [[" four", " four cat", " four cat cat"]] * 2
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match="pip install vllm"):
        VLLMSampler(tiny_model_dir, tokenizer)


@pytest.mark.parametrize(
    "options",
    [SamplingOptions(do_sample=False, max_new_tokens=12), SamplingOptions(temperature=0.0, max_new_tokens=12)],
    ids=["do_sample_false", "temperature_0"],
)
def test_vllm_greedy_sampling_returns_k_copies_of_one_completion(monkeypatch, tiny_model_dir, tokenizer, options):
    """vLLM refuses `n > 1` with greedy sampling: the backend asks for one completion and copies it K times, as the
    transformers backend does."""
    calls = {}
    fake_vllm(monkeypatch, tokenizer, calls)
    sampler = VLLMSampler(tiny_model_dir, tokenizer, options, dtype="float32")
    rows = sampler.sample([row["prompt"] for row in _conversational(2)], 4, seed=0)
    for params in calls["params"]:
        assert (params.n, params.temperature, params.max_tokens) == (1, 0.0, 12)
    four = tokenizer(" four", add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|end|>")]
    assert [[s.completion_ids for s in row] for row in rows] == [[four] * 4] * 2
    assert all(s.finished and s.completion[0]["content"] == " four" for row in rows for s in row)
    assert len({id(s) for row in rows for s in row}) == 8  # copies, not one shared (mutable) Sample


def test_vllm_close_shuts_the_engine_down_and_keeps_the_launchers_process_group(
    monkeypatch, tmp_path, tiny_model_dir, tokenizer
):
    """`close()` shuts the engine down and tears down vLLM's parallel state (an in-process engine otherwise keeps its
    weights and KV cache until garbage collection), without destroying the process group that `accelerate launch`
    made before the engine (vLLM's teardown destroys torch's default group; the run's barriers still need it)."""
    calls = {}
    fake_vllm(monkeypatch, tokenizer, calls)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sampler = VLLMSampler(tiny_model_dir, tokenizer, dtype="float32")
        sampler.close()
        assert calls["shutdown"] == 1 and calls["destroyed"] == ["model_parallel", "distributed_environment"]
        assert torch.distributed.is_initialized()
        torch.distributed.barrier()  # the launcher's group still works
        assert sampler.llm is None
        sampler.close()  # a second close is a no-op
        assert calls["shutdown"] == 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    # Without a launcher's group (one process), the group vLLM made for itself is vLLM's to destroy.
    calls.clear()
    fake_vllm(monkeypatch, tokenizer, calls)
    sampler = VLLMSampler(tiny_model_dir, tokenizer, dtype="float32")
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store2'}", rank=0, world_size=1)
    try:
        sampler.close()
        assert calls["shutdown"] == 1 and not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_a_failed_vllm_shutdown_is_one_warning_not_an_error(monkeypatch, tiny_model_dir, tokenizer, caplog):
    calls = {}
    fake_vllm(monkeypatch, tokenizer, calls, shutdown_error=RuntimeError("engine core died"))
    sampler = VLLMSampler(tiny_model_dir, tokenizer, dtype="float32", name="policy_a")
    with caplog.at_level("WARNING", logger="trl_nca.generation"):
        sampler.close()
    assert calls["shutdown"] == 1 and sampler.llm is None
    (record,) = [r for r in caplog.records if r.name == "trl_nca.generation"]
    message = record.getMessage()
    assert "\n" not in message and "policy_a" in message and "RuntimeError: engine core died" in message


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


def test_reward_model_scores_equal_an_independent_forward(pool_dirs):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = [[{"role": "user", "content": "Sort 3 1 2"}], [{"role": "user", "content": "Add 2 and 2"}]] * 2
    completions = [[{"role": "assistant", "content": text}] for text in ("1 2 3", "4", "3 2 1 and more", "five")]
    scorer = RewardModel(pool_dirs["rm"], batch_size=3, dtype=torch.float32)
    scores = scorer(prompts=prompts, completions=completions)

    model = AutoModelForSequenceClassification.from_pretrained(pool_dirs["rm"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(pool_dirs["rm"])
    expected = []
    for prompt, completion in zip(prompts, completions):
        text = f"<|user|>\n{prompt[0]['content']}<|end|>\n<|assistant|>\n{completion[0]['content']}<|end|>\n"
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected.append(model(input_ids=ids).logits[0, 0].item())
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(set(round(s, 6) for s in scores)) == 4
    # Text prompts: prompt + completion, as GRPOTrainer scores them.
    text_scores = scorer(prompts=["The sky is"], completions=[" blue"])
    ids = torch.tensor([tok("The sky is blue", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert text_scores[0] == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)


def test_reward_model_with_several_labels_is_refused(tmp_path, tokenizer):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.for_model(
        "mistral",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=3,
    )
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "rm3")
    tokenizer.save_pretrained(tmp_path / "rm3")
    with pytest.raises(RewardFunctionError, match="expected one output label.*found 3"):
        RewardModel(str(tmp_path / "rm3"))


def test_grpo_reward_functions_get_grpo_arguments():
    from trl.rewards import think_format_reward  # one of TRL's own GRPO reward functions, unchanged

    seen = {}

    def recorder(prompts, completions, completion_ids, trainer_state, log_metric, solution, **kwargs):
        seen.update(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            solution=solution,
            trainer_state=trainer_state,
            extra=sorted(kwargs),
        )
        log_metric("mean_length", sum(len(c[0]["content"]) for c in completions) / len(completions))
        return [1.0, 0, True]

    prompts = [[{"role": "user", "content": "q1"}]] * 2 + [[{"role": "user", "content": "q2"}]]
    completions = [[{"role": "assistant", "content": t}] for t in ("<think>a</think>b", "ab", "<think>x</think>y")]
    metrics = {}
    scores = call_source(
        "recorder",
        recorder,
        prompts,
        completions,
        [[1], [2, 3], [4]],
        {"solution": ["s1", "s1", "s2"]},
        rows=[0, 0, 1],
        positions=[0, 1, 0],
        metrics=metrics,
    )
    assert scores == [1.0, 0.0, 1.0]  # bools count as 1/0
    assert seen["solution"] == ["s1", "s1", "s2"] and seen["completion_ids"] == [[1], [2, 3], [4]]
    assert seen["prompts"] == prompts and seen["trainer_state"] is None and seen["extra"] == ["log_extra"]
    assert metrics == {"recorder/mean_length": [12.0]}
    assert call_source(
        "think", think_format_reward, prompts, completions, [[1], [2], [3]], {}, [0, 0, 1], [0, 1, 0]
    ) == [1.0, 0.0, 1.0]
    # TRL's math verifier reads the dataset's `solution` column through the keyword arguments.
    from trl.rewards import accuracy_reward

    answers = [[{"role": "assistant", "content": t}] for t in ("So \\boxed{4}.", "\\boxed{5}", "\\boxed{9}")]
    verified = call_source(
        "accuracy_reward",
        accuracy_reward,
        prompts,
        answers,
        [[1], [2], [3]],
        {"solution": ["$4$", "$4$", "$9$"]},
        [0, 0, 1],
        [0, 1, 0],
    )
    assert verified == [1.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("output", "error"),
    [
        ([1.0, 2.0], r"reward function `bad` returned 2 scores for 3 completions \(prompt rows 4-5\)"),
        ([1.0, float("nan"), 0.0], r"reward function `bad` returned nan for row 4, completion 1; expected a finite"),
        ([1.0, 2.0, "high"], r"reward function `bad` returned 'high' for row 5, completion 0"),
        ([1.0, float("inf"), 0.0], r"returned inf for row 4, completion 1"),
        (0.5, r"reward function `bad` returned float; expected a list"),
    ],
)
def test_bad_reward_function_outputs_name_the_function_row_and_value(output, error):
    prompts = ["a", "a", "b"]
    with pytest.raises(RewardFunctionError, match=error):
        call_source(
            "bad",
            lambda **kwargs: output,
            prompts,
            ["x", "y", "z"],
            [[], [], []],
            {},
            rows=[4, 4, 5],
            positions=[0, 1, 0],
        )


def test_combine_scores_is_the_weighted_sum_over_the_sources_that_scored():
    combined = combine_scores([[1.0, None, None, 2.0], [0.5, 3.0, None, None]], [2.0, -1.0])
    assert combined == [1.5, -3.0, None, 4.0]


def test_load_reward_function_specs(rewards_py, tmp_path):
    assert load_reward_function(f"{rewards_py}:length_reward").__name__ == "length_reward"
    assert load_reward_function("trl.rewards:think_format_reward").__name__ == "think_format_reward"
    with pytest.raises(RewardFunctionError, match="has no function `nope`"):
        load_reward_function(f"{rewards_py}:nope")
    with pytest.raises(RewardFunctionError, match="cannot import `no_such_module_xyz`"):
        load_reward_function("no_such_module_xyz:f")
    with pytest.raises(RewardFunctionError, match="no file"):
        load_reward_function(f"{tmp_path}/missing.py:f")


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


def test_pool_rows_scores_weights_and_card(tmp_path, pool_dirs, rewards_py):
    from trl_nca.reward_data import merged_chunk  # noqa: F401  (part of the public pipeline)

    prompts = Dataset.from_list(_conversational(7))
    config = _config(
        tmp_path,
        pool_dirs,
        model_name_or_path=[pool_dirs["policy_a"], pool_dirs["policy_b"]],
        completions_per_model=[3, 1],
        reward_funcs=[pool_dirs["rm"], f"{rewards_py}:length_reward", f"{rewards_py}:answer_reward"],
        reward_weights=[1.0, 0.5, 2.0],
    )
    dataset, stats = build_reward_dataset(config, prompts, show_progress=False)
    assert stats["prompts"] == 7 and stats["completions_sampled"] == 28 and stats["processes"] == 1
    assert len(dataset) == stats["prompts_kept"]
    for row in dataset:
        assert row["answer"] == str(2 * int(row["prompt"][0]["content"].split()[2]))  # other columns kept
        assert set(row["models"]) <= {"policy_a", "policy_b"}
        assert row["models"] == sorted(row["models"])  # pool order
        for k, reward in enumerate(row["rewards"]):
            parts = [
                (1.0, row["rewards_rm"][k]),
                (0.5, row["rewards_length_reward"][k]),
                (2.0, row["rewards_answer_reward"][k]),
            ]
            assert reward == pytest.approx(math.fsum(w * v for w, v in parts if v is not None))
            assert row["rewards_length_reward"][k] == len(row["completions"][k][0]["content"]) / 10
        assert (row["rewards_answer_reward"][0] is None) == (row["answer"] == "0")
    # Outputs: save_to_disk, JSONL and the card agree.
    on_disk = load_from_disk(str(tmp_path / "out" / "dataset"))
    assert on_disk.to_list() == dataset.to_list()
    jsonl = [json.loads(line) for line in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in jsonl] == dataset["completions"]
    assert jsonl == dataset.to_list()  # every float to the last digit
    card = (tmp_path / "out" / "README.md").read_text()
    assert pool_dirs["policy_b"] in card and "| `rewards_answer_reward` |" in card and "temperature=1.0" in card
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["prompts_kept"] == len(dataset)


def test_rates_leave_out_the_time_spent_loading_and_closing_the_model(tmp_path, pool_dirs, rewards_py, monkeypatch):
    """An engine's start-up and shutdown (vLLM: tens of seconds and several) are not sampling: `stats.json` records
    them under `setup`, and the summary's rates divide by the stage's time without them."""
    from trl_nca import reward_data
    from trl_nca.scripts.generate import summary

    load_sampler = reward_data.load_sampler

    def slow_load(*args, **kwargs):
        time.sleep(0.3)
        sampler = load_sampler(*args, **kwargs)
        close = sampler.close
        sampler.close = lambda: (time.sleep(0.2), close())
        return sampler

    monkeypatch.setattr(reward_data, "load_sampler", slow_load)
    config = _config(tmp_path, pool_dirs, reward_funcs=[f"{rewards_py}:length_reward"])
    _, stats = build_reward_dataset(config, Dataset.from_list(_conversational(4)), show_progress=False)
    timings, setup = stats["timings"], stats["setup"]
    assert set(setup) == set(timings) == {"sampling/policy_a_s", "scoring/length_reward_s"}
    assert 0.5 <= setup["sampling/policy_a_s"] < timings["sampling/policy_a_s"]
    assert setup["scoring/length_reward_s"] < 0.3
    rate = stats["completions_sampled"] / (timings["sampling/policy_a_s"] - setup["sampling/policy_a_s"])
    text = summary(stats, config.output_dir)
    assert f"sampling {rate:.1f} completions/s" in text
    assert f"({setup['sampling/policy_a_s']:.1f} s loading and closing)" in text


def test_duplicates_empty_and_unscored_completions_are_dropped_and_counted(tmp_path):
    """Committed samples written by hand (the sampling stage then has nothing to do): the assembly's rules."""
    from trl_nca.reward_data import ChunkStore

    def sample(text):
        return {
            "completion": [{"role": "assistant", "content": text}],
            "completion_ids": [1] * len(text),
            "finished": text != "cut",
        }

    samples = {  # per model: prompt row -> its samples
        0: {0: ["a", "a", " ", "b"], 1: ["x", "y", "z", "cut"], 2: ["p", "", "q", "r"]},
        1: {0: ["b", "c"], 1: ["x", "w"], 2: ["p", "p"]},
    }
    store = ChunkStore(tmp_path / "out" / "chunks")
    for m, rows in samples.items():
        store.write("samples", m, 0, [{"row": r, "samples": [sample(t) for t in ts]} for r, ts in rows.items()])
    seen = []

    def score(prompts, completions, **kwargs):
        texts = [c[0]["content"] for c in completions]
        seen.extend(texts)
        return [None if t in ("y", "z", "w", "q") else float(ord(t[0])) for t in texts]

    config = RewardDataConfig(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=["m0", "m1"],
        num_completions=6,
        completions_per_model=[4, 2],
        reward_funcs=["unused"],
        chunk_size=3,
    )
    dataset, stats = build_reward_dataset(
        config, Dataset.from_list(_conversational(3)), reward_funcs=[score], show_progress=False
    )
    # Empty and duplicate completions never reach the scorer; the first model's copy of a duplicate is kept.
    assert seen == ["a", "b", "c", "x", "y", "z", "cut", "w", "p", "q", "r"]
    assert (stats["completions_sampled"], stats["completions_empty"], stats["completions_duplicates"]) == (18, 2, 5)
    assert (stats["completions_unscored"], stats["completions_truncated"], stats["prompts_too_few"]) == (4, 1, 0)
    rows = dataset.to_list()
    assert [[c[0]["content"] for c in r["completions"]] for r in rows] == [["a", "b", "c"], ["x", "cut"], ["p", "r"]]
    assert rows[0]["models"] == ["m0", "m0", "m1"] and rows[0]["rewards"] == [97.0, 98.0, 99.0]
    assert stats["completions_kept"] == 7 == 18 - 2 - 5 - 4
    # min_completions=3 drops the prompts left with two.
    config.min_completions, config.output_dir = 3, str(tmp_path / "out")
    dataset, stats = build_reward_dataset(
        config, Dataset.from_list(_conversational(3)), reward_funcs=[score], show_progress=False
    )
    assert stats["prompts_too_few"] == 2 and len(dataset) == 1


def test_the_output_trains_with_nca_trainer(tmp_path, pool_dirs, rewards_py, tokenizer, make_model):
    config = _config(tmp_path, pool_dirs, reward_funcs=[pool_dirs["rm"]])
    dataset, _ = build_reward_dataset(config, Dataset.from_list(_conversational(4)), show_progress=False)
    assert len(dataset) == 4
    trainer = NCATrainer(
        model=make_model(),
        ref_model=make_model(),
        args=cpu_args(NCAConfig, tmp_path / "train", max_steps=2, alpha=0.5),
        train_dataset=load_from_disk(str(tmp_path / "out" / "dataset")),
        processing_class=tokenizer,
    )
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_a_different_configuration_is_not_resumed(tmp_path, pool_dirs):
    prompts = Dataset.from_list(_conversational(3))
    score = [lambda prompts, completions, **kw: [1.0] * len(completions)]
    build_reward_dataset(_config(tmp_path, pool_dirs), prompts, reward_funcs=score, show_progress=False)
    with pytest.raises(ResumeError, match=r"`temperature`: 1.0 there, 0.5 now"):
        build_reward_dataset(_config(tmp_path, pool_dirs, temperature=0.5), prompts, reward_funcs=score)
    _, stats = build_reward_dataset(
        _config(tmp_path, pool_dirs, temperature=0.5, overwrite=True), prompts, reward_funcs=score, show_progress=False
    )
    assert stats["chunks_computed"]["sampling/policy_a"] == 1  # started over
    with pytest.raises(ResumeError, match="`prompts_sha256`"):  # other prompts, same settings
        build_reward_dataset(
            _config(tmp_path, pool_dirs, temperature=0.5), Dataset.from_list(_conversational(4)), reward_funcs=score
        )
    with pytest.raises(ValueError, match="`reward_funcs` is required"):
        build_reward_dataset(_config(tmp_path, pool_dirs, reward_funcs=[]), prompts)


def _texts(dataset) -> list[list[str]]:
    return [[c[0]["content"] for c in row] for row in dataset["completions"]]


def test_changing_only_the_reward_sources_keeps_the_committed_samples(tmp_path, pool_dirs, rewards_py):
    """Per-stage resumption: the samples are keyed by the sampling settings, each source's scores by the source. A
    re-run with other sources samples nothing, keeps the scores of the unchanged sources, and yields the rows of a
    fresh run with the new sources; an edited reward-function file is scored again."""
    prompts = Dataset.from_list(_conversational(5))
    own = tmp_path / "own_rewards.py"
    own.write_text("def digits(prompts, completions, **kwargs):\n    return [1.0] * len(completions)\n")

    def run(name, funcs, **overrides):
        config = _config(tmp_path, pool_dirs, output_dir=str(tmp_path / name), reward_funcs=funcs, **overrides)
        return build_reward_dataset(config, prompts, show_progress=False)

    first_funcs = [pool_dirs["rm"], f"{rewards_py}:length_reward"]
    first, stats = run("out", first_funcs)
    assert stats["n_chunks"] == 2 and stats["chunks_computed"]["sampling/policy_a"] == 2
    chunks = tmp_path / "out" / "chunks"
    before = {p.name for p in chunks.glob("scores-*")}
    assert len(before) == 2

    new_funcs = [pool_dirs["rm"], f"{rewards_py}:answer_reward", f"{own}:digits"]
    second, stats = run("out", new_funcs)  # no --overwrite needed
    assert stats["chunks_computed"] == {
        "sampling/policy_a": 0,
        "scoring/rm": 0,  # unchanged source: its committed scores are kept
        "scoring/answer_reward": 2,
        "scoring/digits": 2,
    }
    after = {p.name for p in chunks.glob("scores-*")}
    assert len(after) == 3 and len(after & before) == 1  # rm's scores kept, the dropped source's removed
    assert not list(chunks.glob("scores-length_reward-*"))
    assert _texts(second) == _texts(first) and second["rewards_rm"] == first["rewards_rm"]
    fresh, _ = run("fresh", new_funcs)  # the oracle: the same settings from scratch
    assert second.to_list() == fresh.to_list()
    recorded = json.loads((tmp_path / "out" / "generate_config.json").read_text())
    assert [s["name"] for s in recorded["reward_sources"]] == ["rm", "answer_reward", "digits"]

    # An edited reward-function file is a new source: scored again, the others kept.
    own.write_text("def digits(prompts, completions, **kwargs):\n    return [2.0] * len(completions)\n")
    third, stats = run("out", new_funcs)
    assert stats["chunks_computed"]["scoring/digits"] == 2 and stats["chunks_computed"]["scoring/answer_reward"] == 0
    assert all(set(row) == {2.0} for row in third["rewards_digits"]) and _texts(third) == _texts(first)
    # `deduplicate` decides which completions are scored: every source is scored again, nothing is sampled.
    _, stats = run("out", new_funcs, deduplicate=False)
    assert stats["chunks_computed"]["sampling/policy_a"] == 0 and stats["chunks_computed"]["scoring/rm"] == 2


def test_samples_of_an_older_trl_nca_are_not_resumed(tmp_path, pool_dirs):
    """Chunks recorded without `samples_format` hold `completion_ids` without the stop token: refused in one line,
    sampled again with --overwrite true."""
    prompts = Dataset.from_list(_conversational(3))
    score = [lambda prompts, completions, **kw: [1.0] * len(completions)]
    build_reward_dataset(_config(tmp_path, pool_dirs), prompts, reward_funcs=score, show_progress=False)
    state = tmp_path / "out" / "generate_config.json"
    recorded = json.loads(state.read_text())
    del recorded["samples_format"]
    state.write_text(json.dumps(recorded))
    with pytest.raises(ResumeError, match=r"written by an older trl-nca .* re-run with --overwrite true") as error:
        build_reward_dataset(_config(tmp_path, pool_dirs), prompts, reward_funcs=score, show_progress=False)
    assert "\n" not in str(error.value)
    _, stats = build_reward_dataset(
        _config(tmp_path, pool_dirs, overwrite=True), prompts, reward_funcs=score, show_progress=False
    )
    assert stats["chunks_computed"]["sampling/policy_a"] == 1
    assert json.loads(state.read_text())["samples_format"] == 2


def test_the_state_file_is_written_atomically_and_leftover_temporary_chunks_are_removed(
    tmp_path, pool_dirs, monkeypatch
):
    import trl_nca.reward_data as reward_data

    prompts = Dataset.from_list(_conversational(3))
    score = [lambda prompts, completions, **kw: [1.0] * len(completions)]
    replaced = []
    real_replace = os.replace

    def recording_replace(src, dst):
        replaced.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(reward_data.os, "replace", recording_replace)
    build_reward_dataset(_config(tmp_path, pool_dirs), prompts, reward_funcs=score, show_progress=False)
    assert ("generate_config.tmp" + str(os.getpid()), "generate_config.json") in replaced
    # A killed run leaves half-written chunks behind: the next run removes them (and its result is unchanged).
    chunks = tmp_path / "out" / "chunks"
    leftovers = [chunks / "samples-0" / "chunk-000001.tmp4242", next(chunks.glob("scores-*")) / "chunk-000000.tmp7"]
    for path in leftovers:
        path.write_text('{"half": ')
    build_reward_dataset(_config(tmp_path, pool_dirs), prompts, reward_funcs=score, show_progress=False)
    assert not any(path.exists() for path in leftovers) and not list(chunks.glob("*/*.tmp*"))


def _reward_model_variant(tmp_path, pool_dirs, tokenizer, name, **changes):
    """A copy of the tiny reward model's folder with `changes`: `num_labels`, or `chat_template=None`."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    folder = tmp_path / name
    config = AutoConfig.from_pretrained(pool_dirs["rm"])
    config.num_labels = changes.get("num_labels", 1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    copy = tokenizer.__class__.from_pretrained(pool_dirs["rm"])
    if "chat_template" in changes:
        copy.chat_template = changes["chat_template"]
    copy.save_pretrained(folder)
    return str(folder)


SOURCE_FILE = textwrap.dedent(
    """
    def no_kwargs(prompts, completions):
        return [1.0] * len(completions)

    def reads_solution(prompts, completions, **kwargs):
        return [float(s in c[0]["content"]) for c, s in zip(completions, kwargs["solution"])]

    def needs_tests(completions, tests, **kwargs):
        return [1.0] * len(completions)

    def positional_only(prompts, completions, /, **kwargs):
        return [1.0] * len(completions)
    """
)

# (case, reward_funcs or a maker of them, other flags, the error's text)
SOURCE_ERRORS = [
    ("reward-model-missing", lambda d: [d["tmp"] + "/no_such_rm"], (), "reward_funcs: the folder {tmp}/no_such_rm does not exist"),
    ("reward-model-3-labels", lambda d: [d["rm3"]], (), "reward model `{rm3}`: expected one output label (a scalar score), found 3"),
    ("reward-model-no-chat-template", lambda d: [d["rm_plain"]], (), "reward model `{rm_plain}`: its tokenizer cannot render a prompt and its completion"),
    ("syntax-error", lambda d: [d["tmp"] + "/broken.py:f"], (), "reward function `{tmp}/broken.py:f`: syntax error in {tmp}/broken.py:2: '[' was never closed."),
    ("import-error", lambda d: [d["tmp"] + "/raises.py:f"], (), "reward function `{tmp}/raises.py:f`: importing {tmp}/raises.py failed at {tmp}/raises.py:2: ZeroDivisionError"),
    ("no-kwargs", lambda d: [d["funcs"] + ":no_kwargs"], (), "reward function `no_kwargs` ({funcs}:1) cannot take the keyword arguments `completion_ids`, `trainer_state`, `log_extra`, `log_metric`, `answer` that GRPOTrainer passes"),
    ("positional-only", lambda d: [d["funcs"] + ":positional_only"], (), "reward function `positional_only` ({funcs}:10) takes `prompts` as a positional-only parameter"),
    ("trl-accuracy-reward-without-solution", lambda d: ["trl.rewards:accuracy_reward"], (), "reward function `accuracy_reward` ({trl_rewards}:{accuracy_line}) needs the dataset column `solution`, which the prompts lack (columns: prompt, answer)"),
    ("column-in-signature", lambda d: [d["funcs"] + ":needs_tests"], (), "reward function `needs_tests` ({funcs}:7) needs the dataset column `tests`"),
    ("column-read-from-kwargs", lambda d: [d["rm"], d["funcs"] + ":reads_solution"], (), "reward function `reads_solution` ({funcs}:4) reads the dataset column `solution` (`kwargs['solution']` at {funcs}:5), which the prompts lack (columns: prompt, answer)"),
    ("prompt-column", lambda d: [d["rm"]], ("--prompt_column", "question"), "prompt dataset: no column `question` (columns: prompt, answer); set --prompt_column."),
]  # fmt: skip


@pytest.mark.parametrize("case,funcs,flags,message", SOURCE_ERRORS, ids=[c[0] for c in SOURCE_ERRORS])
def test_reward_sources_are_checked_before_sampling(
    case, funcs, flags, message, tmp_path, pool_dirs, rewards_py, tokenizer, capsys, monkeypatch
):
    """Each mistake stops the command in one line before any model is loaded for sampling."""
    import inspect

    import trl.rewards

    import trl_nca.reward_data as reward_data
    from trl_nca.scripts.generate import main

    (tmp_path / "broken.py").write_text(
        "def f(completions, **kwargs):\n    return [\n        1.0 for c in completions\n"
    )
    (tmp_path / "raises.py").write_text("SCALE = 1\nRATE = SCALE / 0\n")
    (tmp_path / "funcs.py").write_text(SOURCE_FILE.lstrip("\n"))
    names = {
        "tmp": str(tmp_path),
        "rm": pool_dirs["rm"],
        "funcs": str(tmp_path / "funcs.py"),
        "trl_rewards": inspect.getsourcefile(trl.rewards.accuracy_reward),
        "accuracy_line": inspect.getsourcelines(trl.rewards.accuracy_reward)[1],
    }
    if case == "reward-model-3-labels":
        names["rm3"] = _reward_model_variant(tmp_path, pool_dirs, tokenizer, "rm3", num_labels=3)
    if case == "reward-model-no-chat-template":
        names["rm_plain"] = _reward_model_variant(tmp_path, pool_dirs, tokenizer, "rm_plain", chat_template=None)

    def no_sampling(*args, **kwargs):
        raise AssertionError("a sampling model was loaded before the reward sources were checked")

    monkeypatch.setattr(reward_data, "load_sampler", no_sampling)
    config = _write_run(tmp_path, pool_dirs, rewards_py, "run", reward_funcs=funcs(names))
    assert main([str(config), *flags]) == 2
    assert message.format(**names) in _one_error(capsys.readouterr().err)
    assert not (tmp_path / "run" / "chunks").exists()


def test_a_column_read_guarded_by_a_membership_test_is_not_an_error(tmp_path):
    """The placeholder call tells a failing `kwargs["x"]` read from one guarded by `"x" in kwargs`; functions that
    read no missing column are never called before sampling."""
    from trl_nca.scoring import check_reward_function

    module = tmp_path / "guarded.py"
    module.write_text(
        textwrap.dedent(
            """
            calls = []

            def guarded(completions, **kwargs):
                calls.append(len(completions))
                if "solution" in kwargs:
                    return [float(s in c) for c, s in zip(completions, kwargs["solution"])]
                return [None] * len(completions)

            def plain(completions, **kwargs):
                calls.append(len(completions))
                return [1.0] * len(completions)
            """
        )
    )
    guarded = load_reward_function(f"{module}:guarded")
    check_reward_function("guarded", guarded, "a prompt", {"answer": "4"})
    assert sys.modules[guarded.__module__].calls == [1]  # called once, on the placeholder
    plain = load_reward_function(f"{module}:plain")
    check_reward_function("plain", plain, "a prompt", {"answer": "4"})
    assert sys.modules[guarded.__module__].calls == [1]  # not called: nothing to find out
    check_reward_function("guarded", guarded, "a prompt", {"solution": "4"})  # the column is there


def _one_error(err: str) -> str:
    """The one error line of a failed command (the progress bars of the stages that ran also go to stderr)."""
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert errors[0].startswith("trl-nca generate: error: "), errors[0]
    return errors[0]


def test_a_truncated_state_file_is_one_line_or_overwritten(tmp_path, pool_dirs, rewards_py, capsys):
    from trl_nca.scripts.generate import main

    config = _write_run(tmp_path, pool_dirs, rewards_py, "trunc", reward_funcs=[f"{rewards_py}:length_reward"])
    assert main([str(config)]) == 0
    state = tmp_path / "trunc" / "generate_config.json"
    state.write_text(state.read_text()[:40])  # what a crash mid-write left before the writes were atomic
    capsys.readouterr()
    assert main([str(config)]) == 2
    err = _one_error(capsys.readouterr().err)
    assert f"{state} is unreadable (truncated or corrupt" in err and "--overwrite true" in err
    assert main([str(config), "--overwrite", "true"]) == 0
    assert json.loads(state.read_text())["samples_format"] == 2
    assert json.loads((tmp_path / "trunc" / "stats.json").read_text())["chunks_computed"]["sampling/policy_a"] == 8


def test_a_run_that_keeps_no_prompt_fails_in_one_line_and_writes_no_dataset(tmp_path, pool_dirs, rewards_py, capsys):
    from trl_nca.scripts.generate import main

    scores_py = tmp_path / "scores.py"
    scores_py.write_text(
        textwrap.dedent(
            """
            def no_score(prompts, completions, **kwargs):
                return [None] * len(completions)

            def all_but_first(prompts, completions, **kwargs):  # chunk_size 1: one prompt's completions per call
                return [None] + [1.0] * (len(completions) - 1)
            """
        )
    )
    config = _write_run(tmp_path, pool_dirs, rewards_py, "none", reward_funcs=[f"{scores_py}:no_score"])
    assert main([str(config)]) == 2
    captured = capsys.readouterr()
    assert "train on it" not in captured.out
    err = _one_error(captured.err)
    assert not (tmp_path / "none" / "dataset").exists() and not (tmp_path / "none" / "data.jsonl").exists()
    # The counts, from the committed samples themselves: per prompt, in pool order, empty texts and repeated texts.
    texts: dict[int, list[str]] = {}
    for model in (0, 1):
        for path in sorted((tmp_path / "none" / "chunks" / f"samples-{model}").glob("chunk-*.json")):
            for entry in json.loads(path.read_text()):
                texts.setdefault(entry["row"], []).extend(s["completion"][0]["content"] for s in entry["samples"])
    empty = sum(not t.strip() for row in texts.values() for t in row)
    distinct = sum(len({t for t in row if t.strip()}) for row in texts.values())
    duplicates = 24 - empty - distinct
    assert sum(len(row) for row in texts.values()) == 24
    assert err == (
        "trl-nca generate: error: no prompt kept: all 8 prompts were left with fewer than min_completions=2 scored "
        f"completions (24 sampled; {empty} empty, {duplicates} duplicates, {distinct} unscored removed): no reward "
        f"source scored any completion (every score was None); nothing was written to {tmp_path / 'none'}/dataset."
    )

    # Too few left: a re-run that only raises min_completions re-assembles, keeps nothing, and removes the outputs of
    # the run before it.
    config = _write_run(tmp_path, pool_dirs, rewards_py, "few", reward_funcs=[f"{scores_py}:all_but_first"])
    assert main([str(config)]) == 0 and (tmp_path / "few" / "dataset").is_dir()
    assert max(len(row["completions"]) for row in _rows(tmp_path / "few")) == 2
    capsys.readouterr()
    assert main([str(config), "--min_completions", "3"]) == 2
    err = _one_error(capsys.readouterr().err)
    assert "all 8 prompts were left with fewer than min_completions=3 scored completions" in err
    assert err.endswith(f"raise num_completions, lower min_completions, or set deduplicate false; nothing was "
                        f"written to {tmp_path / 'few'}/dataset.")  # fmt: skip
    for name in ("dataset", "data.jsonl", "stats.json", "README.md"):
        assert not (tmp_path / "few" / name).exists(), name


def test_num_completions_below_min_completions_is_refused(tmp_path, pool_dirs, rewards_py, capsys):
    from trl_nca.scripts.generate import main

    with pytest.raises(ValueError, match=r"every prompt would be dropped; raise num_completions, or set min_comp"):
        RewardDataConfig(output_dir="x", model_name_or_path=["a"], reward_funcs=["f:g"], num_completions=1)
    with pytest.raises(ValueError, match=r"`num_completions` \(3\) is below `min_completions` \(4\)"):
        RewardDataConfig(output_dir="x", model_name_or_path=["a"], num_completions=3, min_completions=4)
    with pytest.raises(ValueError, match=r"`min_completions` must be at least 1"):
        RewardDataConfig(output_dir="x", model_name_or_path=["a"], min_completions=0)
    config = _write_run(
        tmp_path,
        pool_dirs,
        rewards_py,
        "single",
        model_name_or_path=[pool_dirs["policy_a"]],
        reward_funcs=[f"{rewards_py}:length_reward"],
    )
    assert main([str(config), "--num_completions", "1"]) == 2
    err = _one_error(capsys.readouterr().err)
    assert "ask for single samples" in err and "need K >= 2" in err, err
    assert not (tmp_path / "single").exists()  # refused before anything ran
    # Asked for: one sample per prompt, and the summary says the K-way trainers refuse them.
    assert main([str(config), "--num_completions", "1", "--min_completions", "1"]) == 0
    assert "NCATrainer/InfoNCATrainer refuse" in capsys.readouterr().out
    assert all(len(row["completions"]) == 1 for row in _rows(tmp_path / "single"))


def test_config_checks():
    with pytest.raises(ValueError, match="sum to `num_completions`"):
        RewardDataConfig(
            output_dir="x", model_name_or_path=["a", "b"], reward_funcs=["f:g"], completions_per_model=[1, 1]
        )
    with pytest.raises(ValueError, match="`reward_weights` has 1 weights for 2"):
        RewardDataConfig(output_dir="x", model_name_or_path=["a"], reward_funcs=["f:g", "h:i"], reward_weights=[1.0])
    assert RewardDataConfig(
        output_dir="x", model_name_or_path=["a", "b", "c"], reward_funcs=["f:g"], num_completions=8
    ).completions_per_model == [3, 3, 2]
    base = dict(output_dir="x", model_name_or_path=["a", "b"], reward_funcs=["f:g"])
    with pytest.raises(ValueError, match="backend `server` needs `server_base_url`"):
        RewardDataConfig(**base, backend="server")
    with pytest.raises(ValueError, match="`server_model_names` has 1 names for 2 models"):
        RewardDataConfig(**base, backend="server", server_base_url="http://h:8000/v1", server_model_names=["m"])
    with pytest.raises(ValueError, match="`server_max_concurrency` must be at least 1"):
        RewardDataConfig(**base, backend="server", server_base_url="http://h:8000/v1", server_max_concurrency=0)
    assert RewardDataConfig(**base, backend="server", server_base_url="http://h:8000/v1").server_base_url == [
        "http://h:8000/v1"
    ]


# ---------------------------------------------------------------------------------------------------------------------
# The command: resumption after SIGKILL, two processes, errors
# ---------------------------------------------------------------------------------------------------------------------


def _env(**extra):
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        ACCELERATE_USE_CPU="true",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def _write_run(tmp_path, pool_dirs, rewards_py, name, **overrides):
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps(r) + "\n" for r in _conversational(8)))
    config = dict(
        dataset_name=str(prompts),
        model_name_or_path=[pool_dirs["policy_a"], pool_dirs["policy_b"]],
        num_completions=3,
        max_new_tokens=6,
        reward_funcs=[pool_dirs["rm"], f"{rewards_py}:slow_reward"],
        chunk_size=1,
        dtype="float32",
        output_dir=str(tmp_path / name),
    )
    config.update(overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _rows(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "data.jsonl").read_text().splitlines()]


def _generate(*args, env=None, timeout=TIMEOUT):
    return subprocess.run(
        [sys.executable, "-m", "trl_nca.cli", "generate", *map(str, args)],
        env=env or _env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path, pool_dirs, rewards_py):
    whole = _generate(_write_run(tmp_path, pool_dirs, rewards_py, "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    config = _write_run(tmp_path, pool_dirs, rewards_py, "killed")
    chunks = tmp_path / "killed" / "chunks"
    process = subprocess.Popen(
        [sys.executable, "-m", "trl_nca.cli", "generate", str(config)],
        cwd=REPO,
        env=_env(SLOW_REWARD_S="0.4"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + TIMEOUT
    while len(list(chunks.glob("scores-slow_reward-*/chunk-*.json"))) < 3:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list(chunks.glob("scores-slow_reward-*/chunk-*.json")))
    assert 3 <= committed < 8 and not (tmp_path / "killed" / "data.jsonl").exists()

    resumed = _generate(config)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stats = json.loads((tmp_path / "killed" / "stats.json").read_text())
    assert stats["chunks_computed"]["sampling/policy_a"] == 0 and stats["chunks_computed"]["scoring/rm"] == 0
    assert stats["chunks_computed"]["scoring/slow_reward"] == 8 - committed
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "whole")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_yield_the_rows_of_one(tmp_path, pool_dirs, rewards_py):
    one = _generate(_write_run(tmp_path, pool_dirs, rewards_py, "one", chunk_size=3))
    assert one.returncode == 0, one.stderr[-3000:]
    config = _write_run(tmp_path, pool_dirs, rewards_py, "two", chunk_size=3)
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "recipes" / "accelerate_configs" / "cpu_ddp.yaml"),
            "--main_process_port",
            str(_free_port()),
            "-m",
            "trl_nca.scripts.generate",
            str(config),
        ],
        env=_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    stats = json.loads((tmp_path / "two" / "stats.json").read_text())
    assert stats["processes"] == 2
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")


def test_command_errors_are_one_line(tmp_path, pool_dirs, rewards_py, capsys):
    from trl_nca.scripts.generate import main

    config = _write_run(tmp_path, pool_dirs, rewards_py, "errors", reward_funcs=[f"{rewards_py}:length_reward"])
    bad_py = tmp_path / "bad.py"
    bad_py.write_text("def wrong_length(prompts, completions, **kw):\n    return [1.0]\n")
    cases = [
        (("--temprature", "0.5"), "unknown flag `--temprature` (did you mean `--temperature`?)"),
        (("--reward_funcs", f"{bad_py}:wrong_length"), "reward function `wrong_length` returned 1 scores for 3"),
        (("--reward_funcs", f"{bad_py}:missing"), "has no function `missing`"),
        (("--prompt_column", "question"), "no column `question`"),
        (("--completions_per_model", "1", "1"), "must be non-negative and sum to `num_completions` (3)"),
        (("--dataset_name", str(tmp_path / "missing.jsonl")), "no data file matches"),
    ]
    for number, (args, message) in enumerate(cases):
        status = main([str(config), *args, "--output_dir", str(tmp_path / f"errors-{number}")])
        err = capsys.readouterr().err  # progress bars of the stages that ran, then the error
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert status == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
        assert errors[0].startswith("trl-nca generate: error:") and message in errors[0], errors[0]


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: every shipped `generate*.yaml` parses strictly and runs with tiny models of its architectures
# ---------------------------------------------------------------------------------------------------------------------

GENERATE_RECIPES = sorted((REPO / "recipes").rglob("generate*.yaml"))
# The architecture of every model a recipe names (the tiny stand-in is built with it).
ARCHITECTURES = {
    "HuggingFaceH4/mistral-7b-sft-beta": "mistral",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral",
    "mistralai/Mathstral-7B-v0.1": "mistral",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2",
    "meta-llama/Llama-3.1-8B-Instruct": "llama",
    "Skywork/Skywork-Reward-V2-Llama-3.1-8B": "llama",
}


def test_generate_recipes_are_found():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in GENERATE_RECIPES}
    assert {
        "tiny/generate.yaml",
        "mistral-7b/generate_math_verifier.yaml",
        "mistral-7b/generate_pool_rm.yaml",
    } <= names


@pytest.mark.parametrize("recipe", GENERATE_RECIPES, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_generate_recipe_runs_with_tiny_models(recipe, tmp_path, tokenizer):
    from trl_nca.scripts.generate import parse_args
    from trl_nca.tiny import save_tiny_assets

    raw = yaml.safe_load(recipe.read_text())
    config = parse_args([str(recipe)])  # strict: every key is a RewardDataConfig field
    assert {k: getattr(config, k) for k in raw} == raw
    assets = save_tiny_assets(str(tmp_path / "assets"))
    models, funcs = [], []
    for i, name in enumerate(config.model_name_or_path):
        if name.startswith("runs/tiny/"):
            models.append(assets["policy"])
            continue
        path = tmp_path / f"model{i}"
        build_tiny_model(
            tokenizer,
            ARCHITECTURES[name],
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            seed=i,
        ).save_pretrained(path)
        tokenizer.save_pretrained(path)
        models.append(str(path))
    for i, spec in enumerate(config.reward_funcs):
        if ":" in spec:
            funcs.append(spec)  # a reward function runs as written
        elif spec.startswith("runs/tiny/"):
            funcs.append(assets["reward_model"])
        else:
            path = tmp_path / f"rm{i}"
            build_tiny_reward_model(tokenizer, ARCHITECTURES[spec], seed=i).save_pretrained(path)
            tokenizer.save_pretrained(path)
            funcs.append(str(path))
    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {config.prompt_column: [{"role": "user", "content": f"What is {i} + {i}?"}], "solution": f"${2 * i}$"}
        for i in range(3)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [
        "--dataset_name",
        str(prompts),
        "--max_new_tokens",
        "6",
        "--dtype",
        "float32",
        "--output_dir",
        str(tmp_path / "out"),
        "--model_name_or_path",
        *models,
        "--reward_funcs",
        *funcs,
    ]
    with contextlib.ExitStack() as stack:
        if raw.get("backend") == "server":  # the recipe's servers: one OpenAI-compatible fake serving every model
            from test_server_backend import FakeState, fake_server

            url = stack.enter_context(fake_server(FakeState(tokenizer, served=models)))
            overrides += ["--server_base_url", url]
        config = parse_args([str(recipe), *overrides])
        dataset, stats = build_reward_dataset(config, Dataset.from_list(rows), show_progress=False)
    assert stats["completions_sampled"] == 3 * raw["num_completions"]
    assert len(dataset) == stats["prompts_kept"] > 0
    assert set(dataset[0]["models"]) <= set(config.model_names or [Path(m).name for m in models])
    for row in dataset:
        assert all(math.isfinite(r) for r in row["rewards"])


@pytest.mark.slow
def test_the_documented_three_commands_run_on_a_fresh_checkout(tmp_path):
    """docs/reward_data.md's offline example, command by command as written (in a folder with the recipes)."""
    text = (REPO / "docs" / "reward_data.md").read_text()
    section = text.split("## Try it on a CPU, offline")[1].split("```bash")[1].split("```")[0]
    commands = [c.split("  #")[0].strip() for c in section.replace("\\\n", " ").splitlines() if c.strip()]
    assert [c.split()[:2] for c in commands] == [
        ["python", "-m"],
        ["trl-nca", "generate"],
        ["trl-nca", "train"],
        ["trl-nca", "plot"],
    ]
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    bin_dir = str(Path(sys.executable).parent)
    env = _env(PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]))
    for command in commands:
        result = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
    data = load_from_disk(str(tmp_path / "runs" / "tiny" / "reward-data" / "dataset"))
    assert len(data) == 8 and all(len(r) == 4 for r in data["rewards"])
    assert (tmp_path / "runs" / "tiny" / "nca" / "model.safetensors").is_file()
    assert list((tmp_path / "runs" / "tiny" / "nca" / "plots").glob("*.png"))


def test_push_to_hub_pushes_the_dataset_and_its_card(tmp_path, pool_dirs, monkeypatch):
    import huggingface_hub

    pushed = {}
    monkeypatch.setattr(
        Dataset, "push_to_hub", lambda self, repo_id, **kw: pushed.update(rows=len(self), repo=repo_id, **kw)
    )
    monkeypatch.setattr(
        huggingface_hub.DatasetCard,
        "push_to_hub",
        lambda self, repo_id, **kw: pushed.update(card=self.content, card_repo=repo_id),
    )
    config = _config(tmp_path, pool_dirs, push_to_hub=True, hub_dataset_id="me/reward-data", hub_private=True)
    dataset, _ = build_reward_dataset(
        config,
        Dataset.from_list(_conversational(2)),
        reward_funcs=[lambda prompts, completions, **kw: [1.0] * len(completions)],
        show_progress=False,
    )
    assert pushed["repo"] == pushed["card_repo"] == "me/reward-data" and pushed["private"] is True
    assert pushed["rows"] == len(dataset) == 2
    assert pushed["card"] == (tmp_path / "out" / "README.md").read_text() and "policy_a" in pushed["card"]
    with pytest.raises(ValueError, match="needs `hub_dataset_id`"):
        _config(tmp_path, pool_dirs, push_to_hub=True)
