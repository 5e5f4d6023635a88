"""Input checking, tokenization and collation of K-way rows."""

import logging

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from trl import DPOConfig

from trl_nca import DataCollatorForKWayReward, InfoNCAConfig, NCAConfig, NCATrainer
from trl_nca.data import prepare_dataset

GOOD = {"prompt": "hi", "completions": [" a", " b"], "rewards": [1.0, 0.0]}
CHAT_GOOD = {
    "prompt": [{"role": "user", "content": "hi"}],
    "completions": [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "b"}]],
    "rewards": [1.0, 0.0],
}

MALFORMED = [
    ("missing-rewards", {"prompt": "hi", "completions": [" a", " b"], "rewards": None}, r"row 1: missing column `rewards`"),
    ("length-mismatch", {**GOOD, "rewards": [1.0, 0.0, 2.0]}, r"row 1: `completions` has 2 .* `rewards` has 3"),
    ("completions-not-list", {**GOOD, "completions": " a"}, r"row 1, column `completions`: expected a list"),
    ("rewards-not-list", {**GOOD, "rewards": 1.0}, r"row 1, column `rewards`: expected a list"),
    ("k-one", {**GOOD, "completions": [" a"], "rewards": [1.0]}, r"row 1, column `completions`: expected at least 2"),
    ("nan-reward", {**GOOD, "rewards": [float("nan"), 0.0]}, r"row 1, column `rewards\[0\]`: expected a finite"),
    ("inf-reward", {**GOOD, "rewards": [1.0, float("-inf")]}, r"row 1, column `rewards\[1\]`: expected a finite"),
    ("string-reward", {**GOOD, "rewards": ["8", "N/A"]}, r"row 1, column `rewards\[0\]`: expected a number"),
    ("none-reward", {**GOOD, "rewards": [None, 0.0]}, r"row 1, column `rewards\[0\]`: expected a number"),
    ("empty-completion", {**GOOD, "completions": [" a", ""]}, r"row 1, column `completions\[1\]`: the completion is empty"),
    ("text-prompt-chat-completions", {**GOOD, "completions": CHAT_GOOD["completions"]}, r"row 1, column `completions\[0\]`: expected a string"),
    ("chat-prompt-text-completion", {**CHAT_GOOD, "completions": ["a", "b"]}, r"row 1, column `completions\[0\]`: expected a list of chat messages"),
    ("chat-no-assistant", {**CHAT_GOOD, "completions": [[{"role": "assistant", "content": "a"}], [{"role": "user", "content": "b"}]]}, r"row 1, column `completions\[1\]`: .*needs an 'assistant' turn"),
    ("chat-empty-assistant", {**CHAT_GOOD, "completions": [[{"role": "assistant", "content": "a"}], [{"role": "assistant", "content": ""}]]}, r"row 1, column `completions\[1\]`: the 'assistant' turn is empty"),
    ("bad-prompt", {**GOOD, "prompt": 3}, r"row 1, column `prompt`: expected a string or a list of chat messages"),
]  # fmt: skip


@pytest.mark.parametrize("name,bad,message", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_rows_fail_before_training(tokenizer, name, bad, message):
    good = CHAT_GOOD if isinstance(bad.get("prompt"), list) else GOOD
    try:
        dataset = Dataset.from_list([good, bad, good])
    except Exception:  # Arrow cannot hold this mixture in one column; a dataset of such rows still must fail.
        dataset = Dataset.from_list([bad, bad])
        message = message.replace("row 1", "row 0")
    with pytest.raises(ValueError, match=message):
        prepare_dataset(dataset, tokenizer, tokenizer.eos_token, None, "keep_start")


def test_unknown_layout_is_explained(tokenizer):
    with pytest.raises(ValueError, match="Cannot tell the dataset format"):
        prepare_dataset(Dataset.from_list([{"text": "hi"}]), tokenizer, tokenizer.eos_token, None, "keep_start")


def test_mixed_reward_and_preference_rows_rejected(tokenizer):
    rows = [{"prompt": "a", "chosen": " x", "rejected": " y", "completions": None, "rewards": None}]
    with pytest.raises(ValueError, match="row 0"):
        prepare_dataset(Dataset.from_list(rows), tokenizer, tokenizer.eos_token, None, "keep_start")


def test_text_tokenization_matches_dpo_and_adds_eos(tokenizer):
    dataset = prepare_dataset(
        Dataset.from_list([{"prompt": "the sky is", "completions": [" blue", " red</s>"], "rewards": [2, 1]}]),
        tokenizer,
        tokenizer.eos_token,
        None,
        "keep_start",
    )
    row = dataset[0]
    prompt_ids = tokenizer("the sky is")["input_ids"]
    assert row["prompt_ids"] == prompt_ids
    assert row["completion_ids"][0] == tokenizer("the sky is blue</s>")["input_ids"][len(prompt_ids) :]
    assert row["completion_ids"][1][-1] == tokenizer.eos_token_id and row["completion_ids"][1].count(2) == 1
    assert row["rewards"] == [2.0, 1.0] and row["hard_labels"] is False


def test_chat_tokenization_uses_generation_prompt_and_tools(tokenizer):
    dataset = prepare_dataset(Dataset.from_list([CHAT_GOOD]), tokenizer, tokenizer.eos_token, None, "keep_start")
    row = dataset[0]
    prompt_text = tokenizer.decode(row["prompt_ids"])
    assert prompt_text.endswith("<|assistant|>\n")
    assert tokenizer.decode(row["completion_ids"][0]) == "a<|end|>\n"


def test_preference_rows_become_hard_k2(tokenizer):
    dataset = prepare_dataset(
        Dataset.from_list([{"chosen": "the sky is blue", "rejected": "the sky is green"}]),
        tokenizer,
        tokenizer.eos_token,
        None,
        "keep_start",
    )
    row = dataset[0]
    assert row["rewards"] == [1.0, 0.0] and row["hard_labels"] is True
    assert tokenizer.decode(row["prompt_ids"]) == "the sky is"
    assert tokenizer.decode(row["completion_ids"][0]) == " blue</s>"


def test_long_prompts_dropped_with_counting_warning(tokenizer, caplog):
    rows = [GOOD, {**GOOD, "prompt": "one two three four five six seven eight nine ten"}, GOOD]
    with caplog.at_level(logging.WARNING):
        dataset = prepare_dataset(Dataset.from_list(rows), tokenizer, tokenizer.eos_token, 6, "keep_start")
    assert len(dataset) == 2
    assert "Dropped 1 of 3 train rows" in caplog.text
    # keep_end keeps the response end, so nothing is dropped.
    assert len(prepare_dataset(Dataset.from_list(rows), tokenizer, tokenizer.eos_token, 6, "keep_end")) == 3


def test_collator_padded_layout_is_example_major_with_ragged_k():
    collator = DataCollatorForKWayReward(pad_token_id=0, max_length=5)
    batch = collator(
        [
            {"prompt_ids": [5, 6], "completion_ids": [[7], [8, 9, 10, 11]], "rewards": [1.0, 2.0], "ref_logps": [-1, -2]},
            {"prompt_ids": [3], "completion_ids": [[4], [4, 4], [9]], "rewards": [0.0, 1.0, 3.0], "hard_labels": True, "ref_logps": [-3, -4, -5]},
        ]
    )  # fmt: skip
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 0, 0],
        [5, 6, 8, 9, 10],
        [3, 4, 0, 0, 0],
        [3, 4, 4, 0, 0],
        [3, 9, 0, 0, 0],
    ]
    assert batch["completion_mask"].tolist()[1] == [0, 0, 1, 1, 1]  # truncated keep_start
    assert batch["attention_mask"].sum(1).tolist() == [3, 5, 2, 3, 2]
    assert batch["response_mask"].tolist() == [[True, True, False], [True, True, True]]
    assert batch["response_index"].tolist() == [0, 1, 3, 4, 5]
    assert batch["rewards"].tolist() == [[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]]
    assert batch["hard_labels"].tolist() == [False, True]
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]


def test_collator_keep_end_and_pad_to_multiple():
    collator = DataCollatorForKWayReward(
        pad_token_id=1, max_length=3, truncation_mode="keep_end", pad_to_multiple_of=4
    )
    batch = collator([{"prompt_ids": [5, 6], "completion_ids": [[7, 8], [9]], "rewards": [1.0, 0.0]}])
    assert batch["input_ids"].tolist() == [[6, 7, 8, 1], [5, 6, 9, 1]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1, 0], [0, 0, 1, 0]]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(alpha=-0.5), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(beta=0.0), "beta"),
        (dict(loss_type=["sigmoid"]), "trains with loss_type 'nca'"),
        (dict(loss_type=["infonca"]), "for InfoNCA use InfoNCAConfig"),
        (dict(loss_type=["sft"]), "trains with loss_type 'nca'"),
        (dict(ld_alpha=0.5), "DPO-only option"),
        (dict(use_weighting=True), "DPO-only option"),
        (dict(f_divergence_type="js_divergence"), "DPO-only option"),
        (dict(label_smoothing=0.1), "DPO-only option"),
    ],
)
def test_invalid_config_is_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_args(NCAConfig, tmp_path, **overrides)


def test_wrong_config_class_is_refused(tmp_path, tokenizer, make_model):
    for args in (cpu_args(DPOConfig, tmp_path), cpu_args(InfoNCAConfig, tmp_path)):
        with pytest.raises(TypeError, match="needs a NCAConfig"):
            NCATrainer(make_model(), args=args, train_dataset=Dataset.from_list([GOOD]), processing_class=tokenizer)


def test_vision_dataset_is_refused(tmp_path, tokenizer, make_model):
    with pytest.raises(ValueError, match="vision"):
        NCATrainer(
            make_model(),
            args=cpu_args(NCAConfig, tmp_path),
            train_dataset=Dataset.from_list([{**GOOD, "image": "x.png"}]),
            processing_class=tokenizer,
        )


def test_target_and_layout_tensors_are_float32(tokenizer):
    dataset = prepare_dataset(Dataset.from_list([GOOD]), tokenizer, tokenizer.eos_token, None, "keep_start")
    batch = DataCollatorForKWayReward(pad_token_id=0)([dataset[0]])
    assert batch["rewards"].dtype == torch.float32 and batch["input_ids"].dtype == torch.long


# Prompts whose last token merges with the start of the completion (" i" + "s blue" -> " is blue"), so the tokenized
# prompt is not a prefix of the tokenized prompt+completion; each leaves a different token out of the prompt.
MERGING = [("the sky i", "s blue"), ("hello wor", "ld"), ("what is th", "e answer"), ("one tw", "o three")]


def merging_rows(n: int) -> list[dict]:
    """`n` reward rows: every third row's prompt merges with its completions (cycling over `MERGING`), the others
    are clean."""
    rows = []
    for i in range(n):
        if i % 3 == 0:
            prompt, start = MERGING[(i // 3) % len(MERGING)]
            completions = [start, start + " now"]
        else:
            prompt, completions = f"row {i} is", [" blue", " red"]
        rows.append({"prompt": prompt, "completions": completions, "rewards": [1.0, 0.0]})
    return rows


def rows_whose_prompt_is_not_a_prefix(rows: list[dict], tokenizer) -> list[int]:
    """Oracle: the rows where the tokenized prompt is not a prefix of some tokenized prompt+completion+EOS."""
    affected = []
    for index, row in enumerate(rows):
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full = [tokenizer(row["prompt"] + c + tokenizer.eos_token)["input_ids"] for c in row["completions"]]
        if any(ids[: len(prompt_ids)] != prompt_ids for ids in full):
            affected.append(index)
    return affected


def prefix_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is not a prefix of the tokenized" in r.getMessage()]


@pytest.mark.parametrize("num_proc", [None, 2])
def test_prompt_not_a_prefix_is_one_warning_with_the_count(tokenizer, caplog, num_proc):
    """One line per dataset (not one per distinct token left out), counting the rows, also when `num_proc`
    processes tokenize it."""
    rows = merging_rows(24)
    affected = rows_whose_prompt_is_not_a_prefix(rows, tokenizer)
    assert len(affected) == 8 and len({rows[i]["prompt"] for i in affected}) == len(MERGING)  # the oracle's view
    with caplog.at_level(logging.WARNING):
        dataset = prepare_dataset(
            Dataset.from_list(rows), tokenizer, tokenizer.eos_token, None, "keep_start", num_proc=num_proc
        )
    (message,) = prefix_warnings(caplog)
    assert f"in {len(affected)} of {len(rows)} train rows" in message
    assert f"row {affected[0]}, ' i' is left out of the prompt" in message
    assert "_trl_nca_prompt_tail" not in dataset.column_names
    assert tokenizer.decode(dataset[0]["completion_ids"][0]) == " is blue</s>"  # the left-out token is trained on
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prepare_dataset(Dataset.from_list(merging_rows(24)[1:3]), tokenizer, tokenizer.eos_token, None, "keep_start")
    assert prefix_warnings(caplog) == []


def test_prompt_not_a_prefix_in_a_stream_is_one_warning(tokenizer, caplog):
    """A stream is tokenized as it is read, so it is not counted: the first affected row is reported, once."""
    rows = merging_rows(24)
    stream = prepare_dataset(
        Dataset.from_list(rows).to_iterable_dataset(), tokenizer, tokenizer.eos_token, None, "keep_start"
    )
    with caplog.at_level(logging.WARNING):
        assert len(list(stream)) == len(rows)
    (message,) = prefix_warnings(caplog)
    assert "row 0 of the streamed train dataset" in message and "' i' is left out of the prompt" in message
