"""The demo task: sort a short list of digits, with a graded, programmatic ground-truth reward.

A prompt asks the model to sort a few digits in ascending order (``"Sort ascending: 7 3 9 3 1"``); the ideal answer is
``"1 3 3 7 9"``. The reward of an answer is the length of its longest common subsequence (LCS) with the ideal answer,
divided by the length of the longer of the two:

- exactly ``1.0`` only for the ideal answer;
- graded partial credit for near misses: one adjacent swap, one dropped, added or wrong digit each cost about ``1/n``;
  copying the input unsorted scores its longest already-sorted subsequence;
- ``0.0`` for an empty or unparsable answer. Tokens that are not single digits never match.

Why it is a fair small-scale stand-in for UltraFeedback-style reward data, and what it cannot show: docs/demo.md.
The imperfect demonstrator used for SFT sorts correctly only part of the time and otherwise makes the kinds of mistakes
the reward grades: swaps, drops, insertions, substitutions, early stops and unsorted copies.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

PROMPT_PREFIX = "Sort ascending:"
DIGITS = "0123456789"

# Mistakes of the imperfect demonstrator, with their relative frequencies.
_CORRUPTIONS = ("swap", "drop", "insert", "substitute", "truncate", "copy")
_CORRUPTION_WEIGHTS = (3, 2, 2, 2, 1, 1)


def make_digits(rng: random.Random, min_len: int, max_len: int) -> list[int]:
    """A random list of digits whose length is uniform in ``[min_len, max_len]``."""
    return [rng.randrange(10) for _ in range(rng.randint(min_len, max_len))]


def format_prompt(digits: Sequence[int]) -> str:
    """The user message for a list of digits, e.g. ``"Sort ascending: 7 3 9 3 1"``."""
    return f"{PROMPT_PREFIX} {' '.join(str(d) for d in digits)}"


def parse_prompt(prompt: str) -> list[int]:
    """Inverse of `format_prompt`. Raises `ValueError` on anything else."""
    if not prompt.startswith(PROMPT_PREFIX):
        raise ValueError(f"Not a sorting prompt: {prompt!r}")
    return [int(tok) for tok in prompt[len(PROMPT_PREFIX) :].split()]


def ideal_answer(digits: Sequence[int]) -> str:
    """The optimal response: the digits sorted ascending, space separated."""
    return " ".join(str(d) for d in sorted(digits))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)) dynamic programme)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def sort_reward(prompt: str, response: str) -> float:
    """Ground-truth reward in [0, 1] of `response` to the sorting `prompt` (see the module docstring).

    The response is split on whitespace; every token is compared as a string with the ideal answer's digits, so
    ``"3,"`` or ``"x"`` never match. The score is ``LCS(response, ideal) / max(len(response), len(ideal))``.
    """
    target = ideal_answer(parse_prompt(prompt)).split()
    tokens = response.split()
    if not tokens or not target:
        return float(tokens == target)
    return _lcs_length(tokens, target) / max(len(tokens), len(target))


def sort_reward_func(prompts: Sequence, completions: Sequence, **kwargs: object) -> list[float]:
    """`sort_reward` as a reward function with `trl.GRPOTrainer`'s signature (the demo's reward source for
    `trl_nca.reward_data.build_reward_dataset`): conversational prompts (the last message is the user's) and
    completions (assistant messages), or plain text."""

    def text(x: str | list[dict]) -> str:
        return x if isinstance(x, str) else x[-1]["content"]

    return [sort_reward(text(p), text(c)) for p, c in zip(prompts, completions, strict=True)]


def demonstrate(digits: Sequence[int], rng: random.Random, p_correct: float) -> str:
    """An imperfect demonstration: the ideal answer with probability `p_correct`, otherwise one or two mistakes."""
    answer = sorted(digits)
    if rng.random() < p_correct:
        return ideal_answer(digits)
    for _ in range(1 if rng.random() < 0.7 else 2):
        kind = rng.choices(_CORRUPTIONS, weights=_CORRUPTION_WEIGHTS)[0]
        n = len(answer)
        if kind == "swap" and n >= 2:
            i = rng.randrange(n - 1)
            answer[i], answer[i + 1] = answer[i + 1], answer[i]
        elif kind == "drop" and n >= 2:
            del answer[rng.randrange(n)]
        elif kind == "insert":
            answer.insert(rng.randrange(n + 1), rng.randrange(10))
        elif kind == "substitute" and n >= 1:
            answer[rng.randrange(n)] = rng.randrange(10)
        elif kind == "truncate" and n >= 3:
            answer = answer[: n - rng.randint(1, 2)]
        elif kind == "copy":
            answer = list(digits)
    return " ".join(str(d) for d in answer)


def make_prompts(n: int, rng: random.Random, min_len: int, max_len: int) -> list[list[int]]:
    """`n` random digit lists (prompts are drawn independently; splits come from independent generators)."""
    return [make_digits(rng, min_len, max_len) for _ in range(n)]


def tokenizer_corpus(n_lines: int = 2000, seed: int = 0, min_len: int = 2, max_len: int = 9) -> list[str]:
    """Text to train the demo's byte-level BPE on: prompts and answers of the task, so every digit is one token."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        digits = make_digits(rng, min_len, max_len)
        lines.append(format_prompt(digits))
        lines.append(ideal_answer(digits))
    return lines
