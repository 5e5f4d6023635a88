"""Drop-in parity with `trl.DPOTrainer`: what it accepts and how it fails, we accept and fail alike.

The oracle is TRL itself: DPOTrainer's own tokenization of the same rows (token for token), DPOTrainer's exception
types and wording on the same conditions (the cases of TRL's `tests/test_dpo_trainer.py`), and our own trainer on the
same rows as a map-style `Dataset` for the streamed ones.
"""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import trl
from conftest import cpu_args
from datasets import Dataset, DatasetDict, IterableDatasetDict
from test_trainer import preference_rows, reward_rows
from trl import DPOConfig, DPOTrainer

from trl_nca import InfoNCAConfig, InfoNCATrainer, NCAConfig, NCATrainer
from trl_nca.data import prepare_dataset
from trl_nca.tiny import build_tokenizer

TRAINERS = [(NCATrainer, NCAConfig), (InfoNCATrainer, InfoNCAConfig)]
# Qwen2.5's chat template, shipped with TRL: it renders `tools`, `tool_calls` turns and `tool` messages.
QWEN_TEMPLATE = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
# TRL's toolcall test data, in its standard tool-calling format (assistant turns with `tool_calls` and no content).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "start_timer",
            "description": "Starts a timer.",
            "parameters": {
                "type": "object",
                "properties": {"duration": {"type": "integer"}},
                "required": ["duration"],
            },
        },
    }
]


def _call(duration: int) -> dict:
    return {"type": "function", "function": {"name": "start_timer", "arguments": {"duration": duration}}}


TOOL_CHOSEN = [
    {"role": "assistant", "tool_calls": [_call(600)]},
    {"role": "tool", "name": "start_timer", "content": "600"},
    {"role": "assistant", "content": "Timer set for 10 minutes."},
]
TOOL_REJECTED = [{"role": "assistant", "content": "Timer set for 10 seconds."}]
TOOL_ONLY = [{"role": "assistant", "tool_calls": [_call(10)]}]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def dpo_tokenize(dataset, tokenizer, max_length=None):
    """DPOTrainer's own `_prepare_dataset` on `dataset` (it only reads the tokenizer's EOS from the trainer)."""
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    return DPOTrainer._prepare_dataset(SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "train")


def ours_tokenize(dataset, tokenizer):
    return prepare_dataset(dataset, tokenizer, tokenizer.eos_token, None, "keep_start")


def assert_same_tokens(ours, dpo):
    assert len(ours) == len(dpo)
    for mine, theirs in zip(ours, dpo):
        assert mine["prompt_ids"] == theirs["prompt_ids"]
        assert mine["completion_ids"] == [theirs["chosen_ids"], theirs["rejected_ids"]]


# ---------------------------------------------------------------------------------------------- tokenization parity
def test_tool_calling_preference_rows_tokenize_as_dpo(qwen_tokenizer):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Set a timer for 10 minutes."}],
            "chosen": TOOL_CHOSEN,
            "rejected": rejected,
            "tools": json.dumps(TOOLS),
        }
        for rejected in (TOOL_REJECTED, TOOL_ONLY)
    ]
    for dataset in (Dataset.from_list(rows), Dataset.from_list(rows, on_mixed_types="use_json")):
        ours = ours_tokenize(dataset, qwen_tokenizer)
        assert_same_tokens(ours, dpo_tokenize(dataset, qwen_tokenizer))
        # The tools are rendered into the prompt, and the tool call into the response.
        assert "start_timer" in qwen_tokenizer.decode(ours[0]["prompt_ids"])
        assert "<tool_call>" in qwen_tokenizer.decode(ours[1]["completion_ids"][1])


def test_tool_calling_reward_rows_train(tmp_path, qwen_tokenizer, make_model):
    row = {
        "prompt": [{"role": "user", "content": "Set a timer for 10 minutes."}],
        "completions": [TOOL_CHOSEN, TOOL_REJECTED, TOOL_ONLY],
        "rewards": [1.0, 0.2, 0.5],
        "tools": json.dumps(TOOLS),
    }
    dataset = Dataset.from_list([row, row], on_mixed_types="use_json")
    trainer = NCATrainer(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(NCAConfig, tmp_path, max_steps=1),
        train_dataset=dataset,
        processing_class=qwen_tokenizer,
    )
    tokenized = trainer.train_dataset[0]
    chosen_only = Dataset.from_list([{"prompt": row["prompt"], "chosen": TOOL_CHOSEN, "rejected": TOOL_ONLY,
                                      "tools": row["tools"]}], on_mixed_types="use_json")  # fmt: skip
    expected = dpo_tokenize(chosen_only, qwen_tokenizer)[0]
    assert tokenized["prompt_ids"] == expected["prompt_ids"]
    assert tokenized["completion_ids"][0] == expected["chosen_ids"]
    assert tokenized["completion_ids"][2] == expected["rejected_ids"]
    trainer.train()
    assert math.isfinite(trainer.state.log_history[-1]["train_loss"])


def test_preference_rows_keep_chat_template_kwargs_and_tools(qwen_tokenizer):
    """TRL's `test_train_with_chat_template_kwargs` template switch, and `tools`, on preference rows (explicit and
    implicit prompt): the prompt renders exactly as DPOTrainer renders it."""
    template = QWEN_TEMPLATE.replace(
        "'<|im_start|>system\\n", "'<|im_start|>' + ('SYSTEM' if shout else 'system') + '\\n"
    )
    assert template != QWEN_TEMPLATE
    tokenizer = build_tokenizer()
    tokenizer.chat_template = template
    user = [{"role": "user", "content": "say blue"}]
    rows = [
        {"prompt": user, "chosen": [{"role": "assistant", "content": "blue"}],
         "rejected": [{"role": "assistant", "content": "red"}], "chat_template_kwargs": {"shout": bool(i % 2)},
         "tools": json.dumps(TOOLS) if i > 1 else None}
        for i in range(4)
    ]  # fmt: skip
    implicit = [{**row, "chosen": user + row["chosen"], "rejected": user + row["rejected"]} for row in rows]
    for data in (rows, [{k: v for k, v in row.items() if k != "prompt"} for row in implicit]):
        dataset = Dataset.from_list(data)
        ours = ours_tokenize(dataset, tokenizer)
        assert_same_tokens(ours, dpo_tokenize(dataset, tokenizer))
        prompts = [tokenizer.decode(row["prompt_ids"]) for row in ours]
        assert "SYSTEM" not in prompts[0] and "SYSTEM" in prompts[1]
        assert "start_timer" not in prompts[1] and "start_timer" in prompts[2]


def test_bool_rewards_count_as_one_and_zero(tokenizer):
    rows = [{"prompt": "hi", "completions": [" a", " b", " c"], "rewards": [True, False, True]}] * 2
    as_floats = [{**row, "rewards": [1.0, 0.0, 1.0]} for row in rows]
    mixed = [rows[0], as_floats[0]]  # Arrow casts this column to float64
    tokenized = [ours_tokenize(Dataset.from_list(data), tokenizer) for data in (rows, as_floats, mixed)]
    assert all(list(t["rewards"]) == list(tokenized[1]["rewards"]) for t in tokenized)
    assert tokenized[0]["completion_ids"] == tokenized[1]["completion_ids"]


# ---------------------------------------------------------------------------------------------- streamed evaluation
def _eval_metrics(trainer_cls, config_cls, tmp_path, make_model, tokenizer, init_eval, layout, **evaluate_kwargs):
    trainer = trainer_cls(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(config_cls, tmp_path, kway_layout=layout, per_device_eval_batch_size=2),
        train_dataset=Dataset.from_list(reward_rows(n=4)),
        eval_dataset=init_eval,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate(**evaluate_kwargs)
    return {key: value for key, value in metrics.items() if "runtime" not in key and "per_second" not in key}


def _assert_same_metrics(streamed, map_style):
    assert streamed.keys() == map_style.keys()
    for key, value in map_style.items():
        assert streamed[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
@pytest.mark.parametrize("trainer_cls,config_cls", TRAINERS)
def test_streamed_eval_equals_map_style(tmp_path, tokenizer, make_model, trainer_cls, config_cls, layout):
    # 5 prompts with ragged K in batches of 2: the last batch is short, K differs between batches.
    rows = Dataset.from_list(reward_rows(n=5, k=4, ragged=True))
    run = lambda init_eval, **evaluate_kwargs: _eval_metrics(  # noqa: E731
        trainer_cls, config_cls, tmp_path, make_model, tokenizer, init_eval, layout, **evaluate_kwargs
    )
    map_style = run(rows)
    assert map_style["eval_loss"] > 0
    _assert_same_metrics(run(rows.to_iterable_dataset()), map_style)
    # A raw streamed set passed to `evaluate()` itself, as TRL's `test_evaluate_with_eval_dataset` does.
    _assert_same_metrics(run(None, eval_dataset=rows.to_iterable_dataset()), map_style)


@pytest.mark.parametrize("layout", ["padded", "shared_prompt"])
def test_streamed_eval_dicts_equal_map_style(tmp_path, tokenizer, make_model, layout):
    first, second = Dataset.from_list(reward_rows(n=3)), Dataset.from_list(preference_rows(n=3))
    run = lambda eval_dataset: _eval_metrics(  # noqa: E731
        NCATrainer, NCAConfig, tmp_path, make_model, tokenizer, eval_dataset, layout
    )
    map_style = run(DatasetDict({"rw": first, "pref": second}))
    assert {"eval_rw_loss", "eval_pref_loss"} <= map_style.keys()
    streamed = {"rw": first.to_iterable_dataset(), "pref": second.to_iterable_dataset()}
    _assert_same_metrics(run(streamed), map_style)
    _assert_same_metrics(run(IterableDatasetDict(streamed)), map_style)


# ---------------------------------------------------------------------------------------------- errors as DPOTrainer's
def _dpo_and_ours():
    """(trainer class, config class, train rows) for DPOTrainer (the oracle) and both of ours."""
    return [(DPOTrainer, DPOConfig, preference_rows()), *[(t, c, reward_rows()) for t, c in TRAINERS]]


def _build(trainer_cls, config_cls, tmp_path, make_model, tokenizer, train, eval_dataset=None, **overrides):
    return trainer_cls(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(config_cls, tmp_path, max_steps=1, **overrides),
        train_dataset=train,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("iterable_as", ["train", "eval", "eval_dict", "eval_iterable_dataset_dict"])
@pytest.mark.parametrize("case", range(3), ids=["dpo", "nca", "infonca"])
def test_precompute_with_streamed_data_raises_as_dpo(tmp_path, tokenizer, make_model, iterable_as, case):
    trainer_cls, config_cls, rows = _dpo_and_ours()[case]
    data = Dataset.from_list(rows)
    train, eval_dataset = data, None
    if iterable_as == "train":
        train = data.to_iterable_dataset()
    elif iterable_as == "eval":
        eval_dataset = data.to_iterable_dataset()
    elif iterable_as == "eval_dict":
        eval_dataset = {"eval": data.to_iterable_dataset()}
    else:
        eval_dataset = IterableDatasetDict({"eval": data.to_iterable_dataset()})
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        _build(trainer_cls, config_cls, tmp_path, make_model, tokenizer, train, eval_dataset,
               precompute_ref_log_probs=True)  # fmt: skip


@pytest.mark.parametrize("case", range(3), ids=["dpo", "nca", "infonca"])
def test_init_errors_match_dpo(tmp_path, tokenizer, make_model, case):
    trainer_cls, config_cls, rows = _dpo_and_ours()[case]
    data = Dataset.from_list(rows)
    with pytest.raises(ValueError, match="`train_dataset` is required"):
        _build(trainer_cls, config_cls, tmp_path, make_model, tokenizer, None)
    with pytest.raises(TypeError, match="`processing_class` must be either a `PreTrainedTokenizerBase`"):
        trainer_cls(make_model(), ref_model=make_model(), args=cpu_args(config_cls, tmp_path), train_dataset=data,
                    processing_class=object())  # fmt: skip
    with pytest.raises(ValueError, match=r"`pad_token` \('<nope>'\) is not found in the vocabulary"):
        _build(trainer_cls, config_cls, tmp_path, make_model, tokenizer, data, pad_token="<nope>")
    with pytest.raises(ValueError, match="vision-related.*vision-language model"):
        _build(trainer_cls, config_cls, tmp_path, make_model, tokenizer, data.add_column("image", [None] * len(data)))


@pytest.mark.parametrize("trainer_cls,config_cls", TRAINERS)
def test_dispatch_batches_forced_off_as_dpo_does_for_streams(tmp_path, tokenizer, make_model, trainer_cls, config_cls):
    rows = Dataset.from_list(reward_rows(n=3, ragged=True))
    trainer = _build(trainer_cls, config_cls, tmp_path, make_model, tokenizer, rows, rows.to_iterable_dataset(),
                     accelerator_config={"dispatch_batches": True}, per_device_eval_batch_size=2)  # fmt: skip
    assert trainer.args.accelerator_config.dispatch_batches is False
    assert math.isfinite(trainer.evaluate()["eval_loss"])


# ---------------------------------------------------------------------------------------------- bad input, clear errors
@pytest.mark.parametrize("trainer_cls,config_cls", TRAINERS)
def test_empty_datasets_are_named(tmp_path, tokenizer, make_model, trainer_cls, config_cls):
    rows = Dataset.from_list(reward_rows(n=2))
    build = lambda train, eval_dataset=None: _build(  # noqa: E731
        trainer_cls, config_cls, tmp_path, make_model, tokenizer, train, eval_dataset
    )
    # A map-style dataset with no rows, and a stream that yields none.
    for empty in (rows.select([]), rows.to_iterable_dataset().filter(lambda _: False)):
        with pytest.raises(ValueError, match=r"The train dataset is empty \(0 rows\)"):
            build(empty)
        with pytest.raises(ValueError, match=r"The eval dataset is empty \(0 rows\)"):
            build(rows, empty)
        with pytest.raises(ValueError, match=r"The holdout dataset is empty \(0 rows\)"):
            build(rows, {"valid": rows, "holdout": empty})


@pytest.mark.parametrize("streamed", [False, True])
def test_every_row_dropped_by_max_length_is_an_error_before_precompute(tmp_path, tokenizer, make_model, streamed):
    rows = Dataset.from_list(reward_rows(n=3))
    train = rows.to_iterable_dataset() if streamed else rows
    with pytest.raises(ValueError, match=r"Every row of the train dataset was dropped: .*max_length=3"):
        _build(NCATrainer, NCAConfig, tmp_path, make_model, tokenizer, train, max_length=3,
               precompute_ref_log_probs=not streamed)  # fmt: skip
    with pytest.raises(ValueError, match=r"Every row of the eval dataset was dropped"):
        _build(NCATrainer, NCAConfig, tmp_path, make_model, tokenizer, Dataset.from_list(reward_rows(n=2)),
               Dataset.from_list([{**reward_rows(n=1)[0], "prompt": "one two " * 20}]), max_length=12)  # fmt: skip


def test_row_errors_name_the_eval_set(tmp_path, tokenizer, make_model):
    rows = reward_rows(n=3)
    bad = Dataset.from_list([rows[0], {**rows[1], "rewards": [1.0, float("nan"), 0.0, 0.0]}])
    with pytest.raises(ValueError, match=r"^eval dataset, row 1, column `rewards\[1\]`: expected a finite"):
        _build(NCATrainer, NCAConfig, tmp_path, make_model, tokenizer, Dataset.from_list(rows), bad)
    with pytest.raises(ValueError, match=r"^holdout dataset, row 1, column `rewards\[1\]`"):
        _build(NCATrainer, NCAConfig, tmp_path, make_model, tokenizer, Dataset.from_list(rows), {"holdout": bad})


# ---------------------------------------------------------------------------------------------- TRL's DPO tests, ported
@pytest.mark.parametrize("case", range(3), ids=["dpo", "nca", "infonca"])
def test_compute_metrics_and_multiple_eval_sets_as_dpo(tmp_path, tokenizer, make_model, case):
    """TRL's `test_train_with_compute_metrics` and `test_train_with_multiple_eval_dataset`."""
    trainer_cls, config_cls, rows = _dpo_and_ours()[case]
    data = Dataset.from_list(rows[:4])
    trainer = trainer_cls(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(config_cls, tmp_path, max_steps=2, eval_strategy="steps", eval_steps=2),
        train_dataset=data,
        eval_dataset={"data1": data, "data2": data},
        processing_class=tokenizer,
        compute_metrics=lambda prediction: {"my_metric": 0.123},
    )
    trainer.train()
    logged = {key for log in trainer.state.log_history for key in log}
    assert {"eval_data1_loss", "eval_data2_loss", "eval_data1_my_metric", "eval_data2_my_metric"} <= logged
    assert {trainer._tag_names[1], "trl"} <= set(trainer.model.model_tags)


@pytest.mark.parametrize("case", range(3), ids=["dpo", "nca", "infonca"])
def test_evaluate_new_dataset_after_training_with_precompute_raises_as_dpo(tmp_path, tokenizer, make_model, case):
    """TRL's `test_evaluate_precompute_ref_log_probs_after_training_raises`: no reference is left after training."""
    trainer_cls, config_cls, rows = _dpo_and_ours()[case]
    data = Dataset.from_list(rows[:4])
    trainer = trainer_cls(
        make_model(),
        args=cpu_args(config_cls, tmp_path, max_steps=1, precompute_ref_log_probs=True),
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert math.isfinite(trainer.evaluate(eval_dataset=Dataset.from_list(rows[4:]))["eval_loss"])
    trainer.train()
    with pytest.raises(ValueError, match="Cannot compute reference log-probs for a dataset passed to"):
        trainer.evaluate(eval_dataset=Dataset.from_list(rows[4:]))


@pytest.mark.slow
def test_streamed_eval_on_two_processes_equals_one_process_map_style(tmp_path):
    """2-process DDP (gloo): streamed and map-style eval sets give the same metrics, and the eval loss of a single
    process on the same rows (the batches of 2 prompts are the same; only their process differs)."""
    import os
    import subprocess
    import sys

    import streamed_eval_probe as probe

    tests = Path(__file__).resolve().parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    config = tests.parent / "recipes" / "accelerate_configs" / "cpu_ddp.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
               "--main_process_port", "0", str(tests / "streamed_eval_probe.py"), str(tmp_path)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    single = probe.evaluate("padded", Dataset.from_list(probe.rows()), str(tmp_path / "single"))
    for layout in ("padded", "shared_prompt"):
        map_style, streamed = metrics[f"{layout}/map"], metrics[f"{layout}/streamed"]
        assert map_style["world_size"] == streamed["world_size"] == 2
        _assert_same_metrics(streamed, map_style)
        assert map_style["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
