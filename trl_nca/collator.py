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
  as a branch that attends to the prompt and causally to itself only, with `position_ids` continuing from the prompt
  in every branch. The last prompt token is repeated at the head of each branch so TRL's fused LM head, which scores
  one label per position, predicts every response's first token. Nothing quadratic is built here: the layout is
  described per token by `sequence_ids` (the prompt a token belongs to within its row, -1 = padding), `branch_ids`
  (0 = prompt, k + 1 = the k-th response, -1 = padding) and `position_ids`; the trainer turns them into the attention
  mask on the model's device (`trl_nca.attention`). Adds `response_ids` (the ordinal of the response a token belongs
  to, -1 elsewhere) and `padding_mask`.

With `padding_free=True` the whole batch is packed into a single row with no padding between its parts (only at the
end, to `pad_to_multiple_of`): the shared-prompt layout puts every prompt with its branches one after the other
(`sequence_ids` tell them apart, positions restart per prompt); the padded layout concatenates every prompt+response
sequence, with `position_ids` restarting at 0 per sequence and no `attention_mask`, from which transformers derives
the packed causal mask (a block-diagonal mask for sdpa/eager/flex), plus the sequence boundaries FlashAttention's
variable-length path takes (`cu_seq_lens_q/k`, `max_length_q/k`: see `varlen_kwargs`).

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


def varlen_kwargs(lengths: list[int]) -> dict[str, torch.Tensor | int]:
    """The boundaries of sequences of `lengths` packed into one row, as transformers' variable-length attention takes
    them (`cu_seq_lens_q/k`: int32 cumulative lengths; `max_length_q/k`: host ints). Given these, FlashAttention skips
    deriving them from `position_ids` on the device (a sync per layer); sdpa, eager and flex ignore them."""
    lengths = [length for length in lengths if length]  # an empty sequence has no position 0 to derive it from
    cu_seq_lens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    max_length = max(lengths, default=0)
    return {
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max_length,
        "max_length_k": max_length,
    }


@dataclass
class DataCollatorForKWayReward:
    """Collate tokenized K-way rows (`prompt_ids`, `completion_ids`, `rewards`, optional `hard_labels`, `ref_logps`).

    Args:
        pad_token_id: token id used for padding `input_ids`.
        max_length: each prompt+response sequence is truncated to this many tokens (None = no truncation).
        truncation_mode: `"keep_start"` (default) or `"keep_end"`, as in `trl.DPOConfig`.
        pad_to_multiple_of: pad the sequence length to a multiple of this value.
        layout: `"padded"` (default) or `"shared_prompt"` (see the module docstring).
        padding_free: pack the whole batch into one row with no padding between its sequences (`DPOConfig`'s
            `padding_free`; see the module docstring).
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
    padding_free: bool = False
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
        """The padded layout: one right-padded row per (prompt, response), example-major (one packed row with
        `padding_free`)."""
        input_ids, completion_mask = [], []
        for example in examples:
            prompt = example["prompt_ids"]
            for completion in example["completion_ids"]:
                mask = [0] * len(prompt) + [1] * len(completion)
                ids, mask = _truncate(prompt + completion, mask, self.max_length, self.truncation_mode)
                input_ids.append(torch.tensor(ids, dtype=torch.long))
                completion_mask.append(torch.tensor(mask, dtype=torch.long))
        if self.padding_free:
            return self._pack_sequences(input_ids, completion_mask)
        attention_mask = [torch.ones_like(ids) for ids in input_ids]
        return {
            "input_ids": pad(input_ids, self.pad_token_id, "right", self.pad_to_multiple_of),
            "attention_mask": pad(attention_mask, 0, "right", self.pad_to_multiple_of),
            "completion_mask": pad(completion_mask, 0, "right", self.pad_to_multiple_of),
        }

    def _pack_sequences(self, input_ids: list[torch.Tensor], completion_mask: list[torch.Tensor]):
        """The padded layout's sequences in one row, positions restarting per sequence and no attention mask."""
        positions = [torch.arange(ids.numel()) for ids in input_ids]
        response_ids = [torch.where(mask.bool(), ordinal, -1) for ordinal, mask in enumerate(completion_mask)]
        n_real = sum(ids.numel() for ids in input_ids)
        n_pad = self._padding_to_multiple(n_real)
        if n_pad:  # trailing padding forms a sequence of its own (positions restart), scored nowhere
            input_ids.append(torch.full((n_pad,), self.pad_token_id, dtype=torch.long))
            positions.append(torch.arange(n_pad))
            completion_mask.append(torch.zeros(n_pad, dtype=torch.long))
            response_ids.append(torch.full((n_pad,), -1, dtype=torch.long))
        return {
            "input_ids": torch.cat(input_ids).unsqueeze(0),
            "position_ids": torch.cat(positions).unsqueeze(0),
            "completion_mask": torch.cat(completion_mask).unsqueeze(0),
            "response_ids": torch.cat(response_ids).unsqueeze(0),
            "padding_mask": (torch.arange(n_real + n_pad) < n_real).long().unsqueeze(0),
            **varlen_kwargs([ids.numel() for ids in input_ids]),
        }

    def _padding_to_multiple(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return 0 if not multiple else -length % multiple

    def collate_shared_prompt(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The shared-prompt layout: one row per prompt (one row in all with `padding_free`), its responses as
        branches after it, described by O(L) per-token metadata."""
        columns = ("input_ids", "position_ids", "sequence_ids", "branch_ids", "completion_mask", "response_ids")
        rows: list[dict[str, list[int]]] = []
        ordinal = 0
        for index, example in enumerate(examples):
            prompt = example["prompt_ids"]
            prefix, head = prompt[:-1], prompt[-1:]
            row = {
                "input_ids": list(prefix),
                "position_ids": list(range(len(prefix))),
                "branch_ids": [0] * len(prefix),
                "completion_mask": [0] * len(prefix),
                "response_ids": [-1] * len(prefix),
            }
            for k, completion_ids in enumerate(example["completion_ids"]):
                if self.max_length is not None:  # the same tokens survive as in the padded layout's keep_start
                    completion_ids = completion_ids[: max(self.max_length - len(prompt), 0)]
                branch = head + completion_ids
                row["input_ids"] += branch
                row["position_ids"] += range(len(prefix), len(prefix) + len(branch))
                row["branch_ids"] += [k + 1] * len(branch)
                row["completion_mask"] += [0] * len(head) + [1] * len(completion_ids)
                row["response_ids"] += [-1] * len(head) + [ordinal] * len(completion_ids)
                ordinal += 1
            row["sequence_ids"] = [index if self.padding_free else 0] * len(row["input_ids"])
            rows.append(row)
        if self.padding_free:
            rows = [{column: [value for row in rows for value in row[column]] for column in columns}]

        padding_values = {"input_ids": self.pad_token_id, "position_ids": 0, "completion_mask": 0}
        batch = {}
        for column in columns:
            tensors = [torch.tensor(row[column], dtype=torch.long) for row in rows]
            batch[column] = pad(tensors, padding_values.get(column, -1), "right", self.pad_to_multiple_of)
        batch["padding_mask"] = (batch["sequence_ids"] >= 0).long()
        return batch
