"""Tiny on-disk datasets in every `dataset_format` of trl_nca.scripts.train, and tiny model folders, for recipe tests.

Everything is generated offline from a seed: sentences drawn from the tiny tokenizer's corpus words, so they tokenize
into a handful of tokens each.
"""

from __future__ import annotations

import random
from pathlib import Path

from datasets import Dataset, DatasetDict

from trl_nca.tiny import save_tiny

WORDS = (
    "the sky is blue green red big small cat dog bird runs jumps over under near far fast slow answer question "
    "number sum sort list word letter please write give tell me what why how one two three four five good bad best"
).split()

FORMATS = ("reward", "preference", "ultrafeedback", "authors_reward", "authors_preference")


def _sentence(rng: random.Random, low: int = 3, high: int = 8) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) + "."


def _row(fmt: str, rng: random.Random, k: int) -> dict:
    """One row of `fmt` with K = `k` responses (2 for the preference layouts), conversational where the layout is."""
    question = _sentence(rng)
    answers = [_sentence(rng) for _ in range(k)]
    scores = sorted((round(rng.uniform(1.0, 10.0), 1) for _ in range(k)), reverse=True)
    user = {"role": "user", "content": question}
    if fmt == "reward":
        return {
            "prompt": [user],
            "completions": [[{"role": "assistant", "content": a}] for a in answers],
            "rewards": scores,
        }
    if fmt == "preference":
        return {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": answers[0]}],
            "rejected": [{"role": "assistant", "content": answers[1]}],
        }
    if fmt == "ultrafeedback":
        return {
            "source": "tiny",
            "instruction": question,
            "models": [f"model-{i}" for i in range(k)],
            "completions": [
                {"model": f"model-{i}", "response": a, "overall_score": s, "fine-grained_score": s / 2}
                for i, (a, s) in enumerate(zip(answers, scores))
            ],
        }
    if fmt == "authors_reward":
        row: dict = {"prompt": question, "prompt_id": str(rng.getrandbits(32))}
        for i, (a, s) in enumerate(zip(answers, scores)):
            row[f"A{i}"] = [user, {"role": "assistant", "content": a}]
            row[f"score_A{i}"] = s
        return row
    if fmt == "authors_preference":
        chosen = [user, {"role": "assistant", "content": answers[0]}]
        rejected = [user, {"role": "assistant", "content": answers[1]}]
        return {
            "prompt": question,
            "prompt_id": str(rng.getrandbits(32)),
            "chosen": chosen,
            "rejected": rejected,
            "messages": chosen,
            "score_chosen": scores[0],
            "score_rejected": scores[1],
        }
    raise ValueError(f"Unknown format {fmt!r}; choose one of {FORMATS}.")


def make_dataset(
    fmt: str,
    n_train: int = 16,
    n_test: int = 4,
    k: int = 4,
    seed: int = 0,
    train_split: str = "train",
    test_split: str = "test",
) -> DatasetDict:
    """A `DatasetDict` with `train_split`/`test_split` in layout `fmt` (reward rows get K = k, preference K = 2)."""
    rng = random.Random(seed)
    k = 2 if fmt in ("preference", "authors_preference") else k
    rows = {
        split: [_row(fmt, rng, k) for _ in range(n)] for split, n in ((train_split, n_train), (test_split, n_test))
    }
    return DatasetDict({split: Dataset.from_list(split_rows) for split, split_rows in rows.items()})


def save_dataset(path: str | Path, fmt: str, **kwargs) -> str:
    """Write `make_dataset(fmt, **kwargs)` with `save_to_disk` and return the folder."""
    make_dataset(fmt, **kwargs).save_to_disk(str(path))
    return str(path)


def save_model(path: str | Path, architecture: str, **model_kwargs) -> str:
    """A tiny random model of `architecture` plus its tokenizer, saved to `path` (a local model id).

    `model_kwargs` go to `trl_nca.tiny.build_tiny_model` (e.g. `num_hidden_layers=1`).
    """
    return save_tiny(str(path), architecture, **model_kwargs)
