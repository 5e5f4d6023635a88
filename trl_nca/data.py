"""Rows and tokens: validating and tokenizing K-way reward data and preference data.

Accepted row formats (standard text or conversational messages, as in TRL):

- reward: `prompt`, `completions` (list of K >= 2 responses), `rewards` (K finite numbers; `True`/`False` count as
  1/0, e.g. pass/fail verdicts); K may differ per row;
- preference: `prompt`/`chosen`/`rejected`, or `chosen`/`rejected` with an implicit prompt (their common prefix). A
  preference row becomes K = 2 with rewards (1, 0) and hard labels.

Tokenized rows carry `prompt_ids`, `completion_ids` (list of K token lists), `rewards` and `hard_labels`, and keep
their original columns. Tokenization follows `trl.DPOTrainer` exactly (EOS appended to text completions, the chat
template with `add_generation_prompt=True` for the prompt, `tools`/`chat_template_kwargs` columns, the completion
starting where prompt and prompt+completion token ids diverge).
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Any

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging
from trl.data_utils import _tokenize, common_prefix_length, extract_prompt
from trl.trainer.utils import global_then_local_main_first

from trl_nca.cli_common import DatasetError  # noqa: F401  (defined with the other user errors)

logger = logging.get_logger(__name__)

REWARD_COLUMNS = ("prompt", "completions", "rewards")
PREFERENCE_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "rewards", "hard_labels")
TEMPLATE_COLUMNS = ("tools", "chat_template_kwargs")


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(isinstance(m, dict) and "role" in m for m in value)


def _has_tool_calls(message: dict) -> bool:
    return bool(message.get("tool_calls"))


def first_row(dataset: Dataset | IterableDataset, dataset_name: str) -> dict:
    """The first row of `dataset`; a `ValueError` naming the dataset when it has none."""
    try:
        return next(iter(dataset))
    except StopIteration:
        raise DatasetError(
            f"The {dataset_name} dataset is empty (0 rows). Pass a dataset with at least one row, or no "
            f"{dataset_name} dataset at all."
        ) from None


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def row_format(example: dict, index: int | None = None) -> str:
    """`"reward"` or `"preference"`, from the columns a row has; a `DatasetError` (naming row `index`) when it has
    the columns of both formats (a row of each kind in one dataset also gives every row both, with None values), or
    of neither."""
    where = "" if index is None else f"row {index}: "
    is_reward = "completions" in example or "rewards" in example
    is_preference = all(column in example for column in PREFERENCE_COLUMNS)
    if is_reward and is_preference:
        raise DatasetError(
            f"{where}the dataset has both reward columns (`completions`/`rewards`) and preference columns "
            "(`chosen`/`rejected`), so which of them to train on is ambiguous. Keep one set: e.g. "
            "`dataset.remove_columns(['chosen', 'rejected'])` trains on the K scored completions."
        )
    if is_reward:
        return "reward"
    if is_preference:
        return "preference"
    raise DatasetError(
        f"{where}Cannot tell the dataset format from its columns {sorted(example)}. trl-nca expects reward data "
        "(`prompt`, `completions`, `rewards`) or preference data (`prompt`/`chosen`/`rejected`, or `chosen`/"
        "`rejected` with an implicit prompt). To convert other layouts see `trl_nca.converters`."
    )


def _check_text_or_messages(value: Any, column: str, index: int, conversational: bool, role: str | None) -> None:
    where = f"row {index}, column `{column}`"
    if conversational:
        if not _is_messages(value):
            raise DatasetError(
                f"{where}: expected a list of chat messages ({{'role', 'content'}} dicts) like the prompt, got "
                f"{_describe(value)}. A row cannot mix plain text and messages."
            )
        # Assistant turns that call tools may have no content (TRL's tool-calling format); every other turn needs it.
        if any(not isinstance(m.get("content"), (str, list)) and not _has_tool_calls(m) for m in value):
            raise DatasetError(
                f"{where}: every message needs a `content` string (or, for an assistant turn, `tool_calls`), got "
                f"{_describe(value)}."
            )
        if role is not None and not any(m["role"] == role for m in value):
            raise DatasetError(
                f"{where}: a conversational completion needs an {role!r} turn, got roles {[m['role'] for m in value]}."
            )
        if role is not None and all(
            not m.get("content") and not _has_tool_calls(m) for m in value if m["role"] == role
        ):
            raise DatasetError(f"{where}: the {role!r} turn is empty.")
    else:
        if not isinstance(value, str):
            raise DatasetError(
                f"{where}: expected a string like the prompt, got {type(value).__name__} {_describe(value)}. A row "
                "cannot mix plain text and messages."
            )
        if role is not None and value == "":
            raise DatasetError(f"{where}: the completion is empty.")


def validate_example(example: dict, index: int) -> None:
    """Raise a `ValueError` naming the column, the row and what was expected if `example` is malformed."""
    kind = row_format(example, index)
    if kind == "preference":
        for column in PREFERENCE_COLUMNS:
            if example.get(column) is None:
                raise DatasetError(f"row {index}, column `{column}`: missing value.")
        conversational = _is_messages(example["chosen"])
        if "prompt" in example:
            _check_text_or_messages(example["prompt"], "prompt", index, conversational, None)
        for column in PREFERENCE_COLUMNS:
            role = "assistant" if conversational and "prompt" in example else None
            _check_text_or_messages(example[column], column, index, conversational, role)
            if not conversational and "prompt" in example and example[column] == "":
                raise DatasetError(f"row {index}, column `{column}`: the completion is empty.")
        return

    for column in REWARD_COLUMNS:
        if column not in example or example[column] is None:
            raise DatasetError(
                f"row {index}: missing column `{column}`. Reward data needs `prompt`, `completions` (list of "
                "responses) and `rewards` (list of numbers, one per response)."
            )
    prompt, completions, rewards = example["prompt"], example["completions"], example["rewards"]
    conversational = _is_messages(prompt)
    if not conversational and not isinstance(prompt, str):
        raise DatasetError(
            f"row {index}, column `prompt`: expected a string or a list of chat messages, got {_describe(prompt)}."
        )
    for column, value in (("completions", completions), ("rewards", rewards)):
        if not isinstance(value, (list, tuple)):
            raise DatasetError(f"row {index}, column `{column}`: expected a list, got {type(value).__name__}.")
    if len(completions) != len(rewards):
        raise DatasetError(
            f"row {index}: `completions` has {len(completions)} responses but `rewards` has {len(rewards)} values; "
            "they must match one to one."
        )
    if len(completions) < 2:
        raise DatasetError(
            f"row {index}, column `completions`: expected at least 2 responses (K >= 2), got {len(completions)}."
        )
    for k, completion in enumerate(completions):
        # `role` also switches on the empty-response check for text completions.
        role = "assistant" if conversational else ""
        _check_text_or_messages(completion, f"completions[{k}]", index, conversational, role)
    for k, reward in enumerate(rewards):
        # bool counts as 1/0 (pass/fail verifiers); Arrow already casts bools mixed with floats that way.
        if not isinstance(reward, numbers.Real):
            raise DatasetError(f"row {index}, column `rewards[{k}]`: expected a number, got {_describe(reward)}.")
        if not math.isfinite(reward):
            raise DatasetError(f"row {index}, column `rewards[{k}]`: expected a finite number, got {reward}.")


def preference_to_kway(example: dict) -> dict:
    """A (validated) preference row as a K = 2 reward row with hard labels: `rewards=[1, 0]`.

    The chat template inputs `tools` and `chat_template_kwargs` are kept, so the row renders as DPOTrainer renders it.
    """
    if "prompt" not in example:
        example = {**example, **extract_prompt(example)}
    return {
        **{key: example[key] for key in TEMPLATE_COLUMNS if key in example},
        "prompt": example["prompt"],
        "completions": [example["chosen"], example["rejected"]],
        "rewards": [1.0, 0.0],
        "hard_labels": True,
    }


def tokenize_example(
    example: dict, processing_class: PreTrainedTokenizerBase, eos_token: str | None = None
) -> dict[str, Any]:
    """Tokenize one reward row into `prompt_ids` and `completion_ids` (one list per response), as DPOTrainer does.

    The completions start where the tokenized prompt and prompt+completion diverge; prompt tokens after that point
    (the chat template renders the prompt alone differently, or tokens merge across the boundary) are left out of the
    prompt. `prepare_dataset` reports how many rows that happens to.
    """
    return _tokenize_row(example, processing_class, eos_token)[0]


def _tokenize_row(
    example: dict, processing_class: PreTrainedTokenizerBase, eos_token: str | None
) -> tuple[dict[str, Any], list[int]]:
    """`tokenize_example`'s row, and the prompt token ids it leaves out of the prompt (usually none)."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    template_kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    prompt = example["prompt"]
    if _is_messages(prompt):
        prompt_ids = _tokenize(processing_class, prompt, add_generation_prompt=True, **template_kwargs)["input_ids"]
        full_ids = [
            _tokenize(processing_class, prompt + completion, **template_kwargs)["input_ids"]
            for completion in example["completions"]
        ]
    else:
        completions = [
            c if eos_token is None or c.endswith(eos_token) else c + eos_token for c in example["completions"]
        ]
        prompt_ids = _tokenize(processing_class, prompt)["input_ids"]
        full_ids = [_tokenize(processing_class, prompt + c)["input_ids"] for c in completions]

    # The completion starts where prompt and prompt+completion diverge (see trl.data_utils.common_prefix_length).
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    row = {
        "prompt_ids": prompt_ids[:prompt_len],
        "completion_ids": [ids[prompt_len:] for ids in full_ids],
        "rewards": [float(r) for r in example["rewards"]],
        "hard_labels": bool(example.get("hard_labels", False)),
    }
    return row, prompt_ids[prompt_len:]


# A private column of the tokenized rows while `prepare_dataset` runs: the prompt token ids left out of the prompt.
_PROMPT_TAIL = "_trl_nca_prompt_tail"
_PROMPT_TAIL_CAUSE = (
    "The tokenized prompt is not a prefix of the tokenized prompt+completion (the chat template renders the prompt "
    "alone differently, or tokens merge across the boundary)"
)


def _report_prompt_tails(dataset: Dataset, processing_class: PreTrainedTokenizerBase, dataset_name: str) -> Dataset:
    """Warn once (main process) with the number of rows whose prompt lost tokens to the responses and an example;
    return `dataset` without the `_PROMPT_TAIL` column. Counted on the Arrow column: no Python copy of the rows."""
    import pyarrow.compute as pc
    from accelerate import PartialState

    column = dataset.data.column(_PROMPT_TAIL)
    affected = pc.greater(pc.list_value_length(column), 0)
    count = pc.sum(affected).as_py() or 0
    if count and PartialState().is_main_process:
        first = pc.index(affected, True).as_py()
        left_out = processing_class.decode(column[first].as_py())
        logger.warning(
            f"{_PROMPT_TAIL_CAUSE} in {count} of {len(dataset)} {dataset_name} rows. Their responses start where the "
            f"two diverge: e.g. in row {first}, {left_out!r} is left out of the prompt."
        )
    return dataset.remove_columns(_PROMPT_TAIL)


def prepare_dataset(
    dataset: Dataset | IterableDataset,
    processing_class: PreTrainedTokenizerBase,
    eos_token: str | None,
    max_length: int | None,
    truncation_mode: str,
    num_proc: int | None = None,
    dataset_name: str = "train",
    max_prompt_length: int | None = None,
) -> Dataset | IterableDataset:
    """Validate and tokenize a reward or preference dataset for the K-way trainers.

    Already tokenized datasets (with `prompt_ids` and `completion_ids`) are returned unchanged. With `max_length` and
    `keep_start` truncation, rows whose prompt alone fills `max_length` are dropped (they have no response token
    left), with a warning that counts them; with `max_prompt_length` (the authors' truncation, which cuts the prompt
    instead) nothing is dropped. Errors name the dataset (`dataset_name`) and the row: an empty dataset, a
    malformed row, or a dataset left without rows by `max_length`.
    """
    first = first_row(dataset, dataset_name)
    if "prompt_ids" in first and "completion_ids" in first:
        return dataset
    if "image" in first or "images" in first:
        raise DatasetError("Vision datasets (`image`/`images` columns) are not supported by the K-way trainers.")
    try:
        kind = row_format(first, 0)
    except DatasetError as error:
        raise DatasetError(f"{dataset_name} dataset, {error}") from None
    map_kwargs: dict[str, Any] = {}
    is_map_style = isinstance(dataset, Dataset)
    if is_map_style:
        map_kwargs["num_proc"] = num_proc
    # A stream is tokenized as it is read, so its rows cannot be counted up front: the first row whose prompt loses
    # tokens is reported, once (per copy of the stream, e.g. per dataloader worker).
    stream_reported: list[bool] = []

    def process(example: dict, index: int) -> dict:
        try:
            if row_format(example, index) != kind:
                raise DatasetError(f"row {index}: the dataset mixes reward rows and preference rows.")
            validate_example(example, index)
        except DatasetError as error:
            raise DatasetError(f"{dataset_name} dataset, {error}") from None
        if kind == "preference":
            example = preference_to_kway(example)
        row, tail = _tokenize_row(example, processing_class, eos_token)
        if is_map_style:
            row[_PROMPT_TAIL] = tail
        elif tail and not stream_reported:
            stream_reported.append(True)
            logger.warning(
                f"{_PROMPT_TAIL_CAUSE} in row {index} of the streamed {dataset_name} dataset (shown once; a streamed "
                f"dataset is not counted). Responses start where the two diverge: {processing_class.decode(tail)!r} "
                "is left out of the prompt."
            )
        return row

    with global_then_local_main_first():
        if is_map_style:
            map_kwargs["desc"] = f"Validating and tokenizing {dataset_name} dataset"
        dataset = dataset.map(process, with_indices=True, **map_kwargs)
        if is_map_style:
            dataset = _report_prompt_tails(dataset, processing_class, dataset_name)
        if max_length is not None and truncation_mode == "keep_start" and max_prompt_length is None:
            keep = lambda example: len(example["prompt_ids"]) < max_length  # noqa: E731
            if is_map_style:
                n_before = len(dataset)
                map_kwargs["desc"] = f"Dropping {dataset_name} prompts longer than max_length"
                dataset = dataset.filter(keep, **map_kwargs)
                if len(dataset) < n_before:
                    logger.warning(
                        f"Dropped {n_before - len(dataset)} of {n_before} {dataset_name} rows whose prompt alone has "
                        f">= max_length={max_length} tokens: no response token would survive truncation."
                    )
            else:
                dataset = dataset.filter(keep)
            # A stream is read up to its first kept row, which also validates the rows before it.
            is_empty = len(dataset) == 0 if is_map_style else next(iter(dataset), None) is None
            if is_empty:
                raise DatasetError(
                    f"Every row of the {dataset_name} dataset was dropped: each prompt alone has >= "
                    f"max_length={max_length} tokens, so no response token would survive truncation. Raise "
                    "`max_length` (or set it to None) or shorten the prompts."
                )
    return dataset
