"""`trl-nca generate`: sampling, scoring, assembly, resumption and multi-process runs, against independent oracles."""

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
from trl_nca.generation import SamplingOptions, TransformersSampler, VLLMSampler, generate_completions, keyed_seed
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
    # Every completion is an assistant message, cut at a stop token and decoded from its ids.
    for row in sampler.sample(prompts, 3, 0, key="a"):
        for sample in row:
            assert sample.completion[0]["role"] == "assistant"
            assert len(sample.completion_ids) <= 10
            assert not set(sample.completion_ids) & set(sampler.stop_ids)
            assert tokenizer.decode(sample.completion_ids, skip_special_tokens=True) == sample.completion[0]["content"]
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
            outputs = [types.SimpleNamespace(token_ids=ids + cat * j + [stop, 7, 7]) for j in range(params.n)]
            return [types.SimpleNamespace(outputs=outputs) for _ in prompts]

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
    params = calls["params"]
    assert (params.n, params.temperature, params.top_p, params.top_k, params.max_tokens) == (3, 0.7, 0.9, -1, 12)
    assert params.seed == keyed_seed(5, "k") % 2**31
    assert set(params.stop_token_ids) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")}
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
    params = calls["params"]
    assert (params.n, params.temperature, params.max_tokens) == (1, 0.0, 12)
    four = tokenizer(" four", add_special_tokens=False)["input_ids"]
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

    def other_score(prompts, completions, **kwargs):
        return [0.0] * len(completions)

    # Sources passed as callables are part of the recorded configuration too (by name).
    with pytest.raises(ResumeError, match=r"`reward_sources`: \['<lambda>'\] there, \['other_score'\] now"):
        build_reward_dataset(_config(tmp_path, pool_dirs, temperature=0.5), prompts, reward_funcs=[other_score])
    with pytest.raises(ResumeError, match="`prompts_sha256`"):  # other prompts, same settings
        build_reward_dataset(
            _config(tmp_path, pool_dirs, temperature=0.5), Dataset.from_list(_conversational(4)), reward_funcs=score
        )
    with pytest.raises(ValueError, match="`reward_funcs` is required"):
        build_reward_dataset(_config(tmp_path, pool_dirs, reward_funcs=[]), prompts)


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
    scores_dir = tmp_path / "killed" / "chunks" / "scores-1"
    process = subprocess.Popen(
        [sys.executable, "-m", "trl_nca.cli", "generate", str(config)],
        cwd=REPO,
        env=_env(SLOW_REWARD_S="0.4"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + TIMEOUT
    while not (scores_dir.is_dir() and len(list(scores_dir.glob("chunk-*.json"))) >= 3):
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    committed = len(list(scores_dir.glob("chunk-*.json")))
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
