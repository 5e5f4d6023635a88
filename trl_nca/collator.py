"""Tokens to tensors: the K-way reward collator.

A batch of B prompts with K_b responses each becomes two groups of tensors:

- model inputs, in the collator's *layout*: `input_ids`, `attention_mask`, `completion_mask` (and `position_ids` for
  layouts that need them). The padded layout has one row per (prompt, response) pair, example-major: the responses of
  prompt 0 first, then those of prompt 1, ... Rows exist only for real responses (ragged K costs nothing).
- per-prompt targets, independent of the layout: `rewards` and `response_mask` `(B, K_max)`, `hard_labels` `(B,)`,
  `ref_logps` `(B, K_max)` when precomputed, and `response_index` `(N,)`: the flat slot `b * K_max + k` of each of
  the N real responses, in the order the layout scores them.

The trainer only relies on `completion_mask` to sum token log-probs per response and on `response_index` to place
them in `(B, K_max)`, so another layout can replace the padded one without touching the loss.
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


@dataclass
class DataCollatorForKWayReward:
    """Collate tokenized K-way rows (`prompt_ids`, `completion_ids`, `rewards`, optional `hard_labels`, `ref_logps`).

    Args:
        pad_token_id: token id used for padding `input_ids`.
        max_length: each prompt+response sequence is truncated to this many tokens (None = no truncation).
        truncation_mode: `"keep_start"` (default) or `"keep_end"`, as in `trl.DPOConfig`.
        pad_to_multiple_of: pad the sequence length to a multiple of this value.
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
    return_tensors: str = "pt"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collate_targets(examples)
        batch.update(self.collate_sequences(examples))
        return batch

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
