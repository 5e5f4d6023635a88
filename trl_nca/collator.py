"""Tokens to tensors: the K-way reward collator.

A batch of B prompts with K_b responses each becomes two groups of tensors:

- model inputs, in the collator's *layout*: `input_ids`, `attention_mask`, `completion_mask` (and `position_ids` for
  layouts that need them). The padded layout has one row per (prompt, response) pair, example-major: the responses of
  prompt 0 first, then those of prompt 1, ... Rows exist only for real responses (ragged K costs nothing).
- per-prompt targets, independent of the layout: `rewards` and `response_mask` `(B, K_max)`, `hard_labels` `(B,)`,
  `ref_logps` `(B, K_max)` when precomputed, and `response_index` `(N,)`: the flat slot `b * K_max + k` of each of
  the N real responses, in the order the layout scores them.

Layouts (`layout=`):

- `"padded"`: one right-padded row per (prompt, response), example-major: the responses of prompt 0 first, then those
  of prompt 1, ... Rows exist only for real responses (ragged K costs nothing). The prompt is computed K times.
- `"shared_prompt"`: one row per prompt, `P[:-1] | P[-1] R_1 | P[-1] R_2 | ...`: the prompt once, then each response
  as a branch that attends to the prompt and causally to itself only (a 4D mask, `(B, 1, L, L)` bool, True = attend),
  with `position_ids` continuing from the prompt in every branch. The last prompt token is repeated at the head of
  each branch so TRL's fused LM head, which scores one label per position, predicts every response's first token.
  Adds `response_ids` (`(B, L)`, the ordinal of the response a token belongs to, -1 elsewhere) and `padding_mask`.

The trainer sums token log-probs per response with `completion_mask` (and `response_ids` when present) and places
them in `(B, K_max)` with `response_index`, so the layout never reaches the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad


def _truncate(ids: list[int], mask: list[int], max_length: int | None, mode: str) -> tuple[list[int], list[int]]:
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    if mode == "keep_start":
        return ids[:max_length], mask[:max_length]
    if mode == "keep_end":
        return ids[-max_length:], mask[-max_length:]
    raise ValueError(f"Unknown truncation_mode {mode!r}: expected 'keep_start' or 'keep_end'.")


def truncate_like_the_authors(
    prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int
) -> tuple[list[int], list[list[int]]]:
    """The authors' truncation (TRL < 0.12's DPO rule with `truncation_mode="keep_end"`), for one prompt and its K
    responses: if the prompt plus the longest response exceeds `max_length`, keep the prompt's last
    `max_prompt_length` tokens; if still too long, keep the first `max_length - max_prompt_length` tokens of every
    response. Every response shares the same (truncated) prompt."""
    longest = max(len(completion) for completion in completions)
    if len(prompt) + longest > max_length:
        prompt = prompt[-max_prompt_length:]
    if len(prompt) + longest > max_length:
        completions = [completion[: max_length - max_prompt_length] for completion in completions]
    return prompt, completions


@dataclass
class DataCollatorForKWayReward:
    """Collate tokenized K-way rows (`prompt_ids`, `completion_ids`, `rewards`, optional `hard_labels`, `ref_logps`).

    Args:
        pad_token_id: token id used for padding `input_ids`.
        max_length: each prompt+response sequence is truncated to this many tokens (None = no truncation).
        truncation_mode: `"keep_start"` (default) or `"keep_end"`, as in `trl.DPOConfig`.
        pad_to_multiple_of: pad the sequence length to a multiple of this value.
        layout: `"padded"` (default) or `"shared_prompt"` (see the module docstring).
        sliding_window: with `"shared_prompt"`, the model's sliding attention window, baked into the 4D mask (a 4D
            mask replaces the model's own mask, window included). None = full attention.
        max_prompt_length: when set (with `max_length`), the authors' truncation (`truncate_like_the_authors`)
            replaces `truncation_mode`.
        return_tensors: only `"pt"` is supported.

    Example:
    ```python
    >>> collator = DataCollatorForKWayReward(pad_token_id=0)
    >>> batch = collator([{"prompt_ids": [5, 6], "completion_ids": [[7], [8, 9], [10]], "rewards": [1.0, 0.0, 0.5]}])
    >>> batch["input_ids"].tolist(), batch["response_mask"].tolist()
    ([[5, 6, 7, 0], [5, 6, 8, 9], [5, 6, 10, 0]], [[True, True, True]])
    ```
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    layout: str = "padded"
    sliding_window: int | None = None
    max_prompt_length: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.layout not in ("padded", "shared_prompt"):
            raise ValueError(f"Unknown layout {self.layout!r}: expected 'padded' or 'shared_prompt'.")
        if self.max_prompt_length is not None:
            if self.max_length is None:
                raise ValueError("max_prompt_length needs max_length (the budget of prompt + response).")
            if not 0 < self.max_prompt_length < self.max_length:
                raise ValueError(
                    f"max_prompt_length must be > 0 and < max_length={self.max_length}, got {self.max_prompt_length}."
                )
        if (
            self.layout == "shared_prompt"
            and self.max_length is not None
            and self.max_prompt_length is None
            and self.truncation_mode != "keep_start"
        ):
            raise ValueError(
                "The shared_prompt layout truncates responses only (`truncation_mode='keep_start'`): with "
                "'keep_end' each response would keep a different part of the prompt. Use layout='padded'."
            )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate_targets(examples)
        if self.max_prompt_length is not None:
            examples = [self._truncate_like_the_authors(example) for example in examples]
        if self.layout == "shared_prompt":
            batch.update(self.collate_shared_prompt(examples))
        else:
            batch.update(self.collate_sequences(examples))
        return batch

    def _truncate_like_the_authors(self, example: dict[str, Any]) -> dict[str, Any]:
        prompt, completions = truncate_like_the_authors(
            example["prompt_ids"], example["completion_ids"], self.max_length, self.max_prompt_length
        )
        return {**example, "prompt_ids": prompt, "completion_ids": completions}

    @staticmethod
    def collate_targets(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Per-prompt tensors shared by every layout."""
        k_max = max(len(example["completion_ids"]) for example in examples)
        n_prompts = len(examples)
        rewards = torch.zeros(n_prompts, k_max, dtype=torch.float32)
        response_mask = torch.zeros(n_prompts, k_max, dtype=torch.bool)
        for b, example in enumerate(examples):
            k = len(example["completion_ids"])
            rewards[b, :k] = torch.tensor(example["rewards"], dtype=torch.float32)
            response_mask[b, :k] = True
        batch = {
            "rewards": rewards,
            "response_mask": response_mask,
            "hard_labels": torch.tensor([bool(e.get("hard_labels", False)) for e in examples], dtype=torch.bool),
            "response_index": response_mask.view(-1).nonzero().squeeze(-1),
        }
        if "ref_logps" in examples[0]:
            ref_logps = torch.zeros(n_prompts, k_max, dtype=torch.float32)
            for b, example in enumerate(examples):
                ref_logps[b, : len(example["ref_logps"])] = torch.tensor(example["ref_logps"], dtype=torch.float32)
            batch["ref_logps"] = ref_logps
        return batch

    def collate_sequences(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The padded layout: one right-padded row per (prompt, response), example-major."""
        input_ids, completion_mask = [], []
        for example in examples:
            prompt = example["prompt_ids"]
            for completion in example["completion_ids"]:
                mask = [0] * len(prompt) + [1] * len(completion)
                ids, mask = _truncate(prompt + completion, mask, self.max_length, self.truncation_mode)
                input_ids.append(torch.tensor(ids, dtype=torch.long))
                completion_mask.append(torch.tensor(mask, dtype=torch.long))
        attention_mask = [torch.ones_like(ids) for ids in input_ids]
        return {
            "input_ids": pad(input_ids, self.pad_token_id, "right", self.pad_to_multiple_of),
            "attention_mask": pad(attention_mask, 0, "right", self.pad_to_multiple_of),
            "completion_mask": pad(completion_mask, 0, "right", self.pad_to_multiple_of),
        }

    def collate_shared_prompt(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The shared-prompt layout: one row per prompt, its responses as branches after it."""
        rows = []  # per prompt: (token ids, positions, branch group (0 = prompt), completion flags, response ordinal)
        ordinal = 0
        for example in examples:
            prompt = example["prompt_ids"]
            prefix, head = prompt[:-1], prompt[-1:]
            ids, pos = list(prefix), list(range(len(prefix)))
            group, completion, response = [0] * len(prefix), [0] * len(prefix), [-1] * len(prefix)
            for k, completion_ids in enumerate(example["completion_ids"]):
                if self.max_length is not None:  # the same tokens survive as in the padded layout's keep_start
                    completion_ids = completion_ids[: max(self.max_length - len(prompt), 0)]
                branch = head + completion_ids
                ids += branch
                pos += range(len(prefix), len(prefix) + len(branch))
                group += [k + 1] * len(branch)
                completion += [0] * len(head) + [1] * len(completion_ids)
                response += [-1] * len(head) + [ordinal] * len(completion_ids)
                ordinal += 1
            rows.append((ids, pos, group, completion, response))

        def stack(column: int, padding_value: int) -> torch.Tensor:
            tensors = [torch.tensor(row[column], dtype=torch.long) for row in rows]
            return pad(tensors, padding_value, "right", self.pad_to_multiple_of)

        input_ids, position_ids = stack(0, self.pad_token_id), stack(1, 0)
        group, completion_mask, response_ids = stack(2, -1), stack(3, 0), stack(4, -1)
        # q attends k: k is in the prompt or in q's own branch, and k is not after q (positions); padding tokens
        # (group -1) only see padding, which keeps every softmax row non-empty.
        g_q, g_k = group.unsqueeze(2), group.unsqueeze(1)
        p_q, p_k = position_ids.unsqueeze(2), position_ids.unsqueeze(1)
        allowed = (((g_k == 0) & (g_q >= 0)) | (g_k == g_q)) & (p_k <= p_q)
        if self.sliding_window is not None:
            allowed &= p_q - p_k < self.sliding_window
        return {
            "input_ids": input_ids,
            "attention_mask": allowed.unsqueeze(1),
            "position_ids": position_ids,
            "completion_mask": completion_mask,
            "response_ids": response_ids,
            "padding_mask": (group >= 0).long(),
        }
