"""Row converters from the public data layouts people hold to trl-nca's reward format, and back to pairs.

trl-nca's **reward format** (see `trl_nca.data`) is one row per prompt::

    {"prompt": str | list[message], "completions": list[str | list[message]], "rewards": list[float]}

K (the number of completions) may differ per row. In the conversational form the prompt holds the user turn(s) and each
completion is `[{"role": "assistant", "content": ...}]`, as TRL does for preference data.

Every converter here is a pure function of one row (or one batch, for the pair expansion), so it can be handed to
`datasets.Dataset.map`. A converter never invents a reward: a response whose score is missing or unparsable is dropped
from its row, and so is an empty response (the trainers reject empty completions). A converted row may therefore have
fewer than two completions; :func:`prepare_reward_dataset` removes such rows and counts every drop by reason, which is
what `scripts/prepare_ultrafeedback.py` reports.

Layouts handled:

- raw `openbmb/UltraFeedback` (:func:`ultrafeedback_to_reward`);
- the authors' `ChenDRAG/ultrafeedback_reward` (:func:`authors_reward_to_reward`) and
  `ChenDRAG/ultrafeedback_preference` (:func:`authors_preference_to_reward`);
- TRL preference rows, explicit or implicit prompt, text or conversational (:func:`preference_to_reward`);
- the reverse, reward rows to DPO pairs for baselines on the same data (:func:`reward_to_preference`,
  :func:`reward_to_preference_pairs`).
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from typing import Any

from datasets import Dataset, DatasetDict
from trl.data_utils import maybe_extract_prompt

__all__ = [
    "ULTRAFEEDBACK_ASPECTS",
    "ULTRAFEEDBACK_SCORES",
    "SOURCE_FORMATS",
    "parse_score",
    "ultrafeedback_to_reward",
    "authors_reward_to_reward",
    "authors_preference_to_reward",
    "preference_to_reward",
    "dedupe_completions",
    "reward_to_preference",
    "reward_to_preference_pairs",
    "prepare_reward_dataset",
    "split_dataset",
]

#: The four aspects GPT-4 rated in UltraFeedback, as keys of each completion's `annotations`.
ULTRAFEEDBACK_ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
#: Valid `score` choices for :func:`ultrafeedback_to_reward`.
ULTRAFEEDBACK_SCORES = ("overall_score", "fine_grained_mean", "fine-grained_score", *ULTRAFEEDBACK_ASPECTS)
#: Valid `source_format` choices for :func:`prepare_reward_dataset`.
SOURCE_FORMATS = ("ultrafeedback", "authors_reward", "authors_preference", "preference")
#: Modes of :func:`reward_to_preference` (one pair per prompt).
SINGLE_PAIR_MODES = ("best_vs_worst", "best_vs_random")
#: Modes of :func:`reward_to_preference_pairs` (several pairs per prompt).
PAIRS_MODES = ("best_vs_worst", "best_vs_rest", "all_pairs")

_MISSING_SCORE = "missing_score"
_EMPTY_RESPONSE = "empty_response"


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------
def parse_score(value: Any) -> float | None:
    """A score as a finite float, or `None` when it is unusable.

    Accepts numbers and numeric strings (UltraFeedback stores aspect ratings as strings such as `"4"`). Returns `None`
    for `None`, booleans, `NaN`/`inf`, `"N/A"` and any other string that is not a number.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _response_text(completion: Any) -> str:
    """The text of a completion: the string itself, or the concatenated contents of its messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "\n".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return ""


def _assemble(
    prompt: Any,
    candidates: list[tuple[Any, float | None]],
    drop_empty: bool,
    stats: Counter | None,
) -> dict:
    """Build a reward row from (completion, reward-or-None) candidates, dropping unusable ones (and counting why)."""
    completions, rewards = [], []
    for completion, reward in candidates:
        if stats is not None:
            stats["completions_read"] += 1
        if reward is None:
            if stats is not None:
                stats[_MISSING_SCORE] += 1
            continue
        if completion is None or (drop_empty and not _response_text(completion).strip()):
            if stats is not None:
                stats[_EMPTY_RESPONSE] += 1
            continue
        completions.append(completion)
        rewards.append(reward)
    return {"prompt": prompt, "completions": completions, "rewards": rewards}


# --------------------------------------------------------------------------------------------------------------------
# raw UltraFeedback
# --------------------------------------------------------------------------------------------------------------------
def _aspect_rating(annotations: Any, aspect: str) -> float | None:
    """The `Rating` of one aspect. The published dataset stores a dict per aspect; an early release stored a list of
    such dicts, which is averaged over its usable ratings."""
    if not isinstance(annotations, dict):
        return None
    entry = annotations.get(aspect)
    if isinstance(entry, dict):
        return parse_score(entry.get("Rating"))
    if isinstance(entry, list):
        ratings = [parse_score(e.get("Rating")) for e in entry if isinstance(e, dict)]
        ratings = [r for r in ratings if r is not None]
        return sum(ratings) / len(ratings) if ratings else None
    return None


def _ultrafeedback_score(completion: dict, score: str) -> float | None:
    if score == "fine_grained_mean":
        ratings = [_aspect_rating(completion.get("annotations"), a) for a in ULTRAFEEDBACK_ASPECTS]
        ratings = [r for r in ratings if r is not None]
        return sum(ratings) / len(ratings) if ratings else None
    if score in ULTRAFEEDBACK_ASPECTS:
        return _aspect_rating(completion.get("annotations"), score)
    return parse_score(completion.get(score))


def _ultrafeedback_row(example: dict, score: str, conversational: bool, drop_empty: bool, stats: Counter | None):
    if score not in ULTRAFEEDBACK_SCORES:
        raise ValueError(f"Unknown UltraFeedback score {score!r}; choose one of {ULTRAFEEDBACK_SCORES}.")
    instruction = example["instruction"]
    prompt: Any = [{"role": "user", "content": instruction}] if conversational else instruction
    candidates = []
    for completion in example.get("completions") or []:
        response = completion.get("response")
        if conversational and response is not None:
            response = [{"role": "assistant", "content": response}]
        candidates.append((response, _ultrafeedback_score(completion, score)))
    return _assemble(prompt, candidates, drop_empty, stats)


def ultrafeedback_to_reward(
    example: dict,
    score: str = "overall_score",
    conversational: bool = True,
    drop_empty: bool = True,
) -> dict:
    """Convert one raw `openbmb/UltraFeedback` row to a reward row.

    Schema followed (the dataset card's "Dataset Format" section of github.com/OpenBMB/UltraFeedback and the HF
    `openbmb/UltraFeedback` parquet, revision 40b43656 onwards): top-level `source` (str), `instruction` (str),
    `models` (list of str), `correct_answers`/`incorrect_answers` (list of str) and `completions`, a list (usually 4)
    of dicts with `model`, `principle`, `custom_system_prompt`, `response` (str), `critique` (str), `overall_score`
    (float, 1-10, from the critique), `fine-grained_score` (float, the mean of the usable aspect ratings) and
    `annotations`: a dict with keys `helpfulness`, `honesty`, `instruction_following`, `truthfulness`, each
    `{"Rating": "1".."5" or "N/A", "Rationale": str}` (`helpfulness` and `truthfulness` also carry `Type` and
    `Rationale For Rating`). Only `instruction`, `completions[*].response` and the chosen score are read; the
    per-completion `custom_system_prompt` (the principle the *generator* was given) is not part of the prompt, as in
    the authors' and HuggingFaceH4's conversions.

    Args:
        example: one raw row.
        score: the reward source. `"overall_score"` (default) is the 1-10 critique score that both the authors'
            `ChenDRAG/ultrafeedback_reward` and `HuggingFaceH4/ultrafeedback_binarized` rank by, so the default
            reproduces the published NCA/InfoNCA setting; use a revision with the Dec-2023 fix of the spurious 10s.
            `"fine_grained_mean"` is the mean of the four aspect ratings, skipping "N/A" (what the `fine-grained_score`
            field holds; `"fine-grained_score"` reads that field as stored). An aspect name (e.g. `"helpfulness"`)
            uses that aspect's rating alone.
        conversational: `True` (default; the layout the authors trained on) gives a `[{"role": "user"}]` prompt and
            `[{"role": "assistant"}]` completions; `False` gives plain strings.
        drop_empty: drop responses that are empty or whitespace only.

    Returns:
        `{"prompt", "completions", "rewards"}`, completions in source order. Completions whose score is missing,
        `None`, `NaN` or "N/A" are dropped (never given an invented reward), so K may be below 2.
    """
    return _ultrafeedback_row(example, score, conversational, drop_empty, None)


# --------------------------------------------------------------------------------------------------------------------
# the authors' released layouts
# --------------------------------------------------------------------------------------------------------------------
_A_COLUMN = re.compile(r"^A(\d+)$")


def _authors_reward_row(example: dict, conversational: bool, drop_empty: bool, stats: Counter | None) -> dict:
    indices = sorted(int(m.group(1)) for m in map(_A_COLUMN.match, example) if m)
    if not indices:
        raise ValueError(f"No `A0`, `A1`, ... columns in a row with columns {sorted(example)}.")
    prompt: Any = None
    candidates = []
    for i in indices:
        if f"score_A{i}" not in example:
            raise ValueError(f"Column `A{i}` has no matching `score_A{i}` column.")
        chat = example[f"A{i}"]
        reward = parse_score(example[f"score_A{i}"])
        if not chat:
            candidates.append((None, reward))
            continue
        if not isinstance(chat, list) or chat[-1].get("role") != "assistant":
            raise ValueError(f"`A{i}` must be a chat list ending with an assistant turn, got {chat!r:.80}.")
        head = chat[:-1]
        if prompt is None:
            prompt = head
        elif head != prompt:
            raise ValueError(f"`A{i}` does not share the conversation before the answer with `A{indices[0]}`.")
        completion = [chat[-1]] if conversational else chat[-1].get("content")
        candidates.append((completion, reward))
    if not conversational or prompt is None:
        text = example.get("prompt")
        if text is None and prompt:
            text = prompt[-1]["content"]
        prompt = text if not conversational else [{"role": "user", "content": text}]
    return _assemble(prompt, candidates, drop_empty, stats)


def authors_reward_to_reward(example: dict, conversational: bool = True, drop_empty: bool = True) -> dict:
    """Convert one row of the authors' `ChenDRAG/ultrafeedback_reward` layout to a reward row.

    Layout (their `generate_dataset_reward.py` and the `A0..A3`/`score_A0..score_A3` columns their `data_utils.py`
    reads): `prompt` (str, the UltraFeedback instruction), `A0`, `A1`, ... each a chat
    `[{"role": "user", ...}, {"role": "assistant", ...}]`, and `score_A0`, `score_A1`, ... (floats, the UltraFeedback
    `overall_score`, sorted so `A0` is best). Any number of `A{i}` columns is accepted; other columns are ignored. Rows
    their script could not fill hold `"N/A"` answers with null scores; such answers are dropped as missing scores.

    Args:
        example: one row.
        conversational: `True` (default) keeps the chat: prompt = the turns before the answer (shared by all `A{i}`),
            completion = `[assistant turn]`. `False` gives the `prompt` string and the answer strings.
        drop_empty: drop answers that are empty or whitespace only.

    Returns:
        `{"prompt", "completions", "rewards"}` in column order `A0, A1, ...`.
    """
    return _authors_reward_row(example, conversational, drop_empty, None)


def _preference_row(
    example: dict,
    chosen_reward: float,
    rejected_reward: float,
    use_scores: bool,
    drop_empty: bool,
    stats: Counter | None,
) -> dict:
    row = maybe_extract_prompt({k: example[k] for k in ("prompt", "chosen", "rejected") if k in example})
    if use_scores:
        rewards = (parse_score(example.get("score_chosen")), parse_score(example.get("score_rejected")))
    else:
        if not chosen_reward > rejected_reward:
            raise ValueError(
                f"chosen_reward ({chosen_reward}) must be larger than rejected_reward ({rejected_reward})."
            )
        rewards = (float(chosen_reward), float(rejected_reward))
    candidates = [(row["chosen"], rewards[0]), (row["rejected"], rewards[1])]
    return _assemble(row["prompt"], candidates, drop_empty, stats)


def preference_to_reward(
    example: dict,
    chosen_reward: float = 1.0,
    rejected_reward: float = 0.0,
    drop_empty: bool = True,
) -> dict:
    """Convert a TRL preference row (`prompt`/`chosen`/`rejected`, or implicit prompt) to a K = 2 reward row.

    Text or conversational, explicit or implicit prompt, as `trl.DPOTrainer` accepts; the implicit prompt is taken with
    `trl.data_utils.maybe_extract_prompt` (the common prefix of chosen and rejected).

    Note: the trainers accept preference rows directly and then use hard labels (w = (1, 0)), which makes InfoNCA equal
    DPO. As rewards, (1, 0) go through `softmax(r / alpha)` like any other reward; use this converter to mix preference
    rows into a reward dataset, not to reproduce DPO.

    Returns:
        `{"prompt", "completions": [chosen, rejected], "rewards": [chosen_reward, rejected_reward]}`.
    """
    return _preference_row(example, chosen_reward, rejected_reward, False, drop_empty, None)


def authors_preference_to_reward(
    example: dict,
    use_scores: bool = False,
    chosen_reward: float = 1.0,
    rejected_reward: float = 0.0,
    drop_empty: bool = True,
) -> dict:
    """Convert a row of the authors' `ChenDRAG/ultrafeedback_preference` layout to a K = 2 reward row.

    Layout: the `HuggingFaceH4/ultrafeedback_binarized` schema: `prompt` (str), `prompt_id`, `chosen` and `rejected`
    (chats `[{"role": "user"}, {"role": "assistant"}]`), `messages`, and `score_chosen`/`score_rejected` (the
    UltraFeedback `overall_score` of each side). The authors' `run_preference.py` reads `chosen`/`rejected` as such
    chats; that their dataset shares the rest of the H4 schema is inferred (same generator style, and 61,966 training
    rows = H4's 61,135 plus the TruthfulQA prompts H4 filtered out) and not confirmed from the files.

    Args:
        example: one row.
        use_scores: `True` uses `score_chosen`/`score_rejected` as rewards (missing or "N/A" scores drop that side);
            `False` (default) uses `chosen_reward`/`rejected_reward`, as :func:`preference_to_reward`.

    Returns:
        `{"prompt", "completions": [chosen, rejected], "rewards": [...]}`, prompt and completions as chats.
    """
    return _preference_row(example, chosen_reward, rejected_reward, use_scores, drop_empty, None)


# --------------------------------------------------------------------------------------------------------------------
# cleaning
# --------------------------------------------------------------------------------------------------------------------
def _dedupe(example: dict, keep: str, stats: Counter | None) -> dict:
    if keep not in ("mean", "max", "first"):
        raise ValueError(f"keep must be 'mean', 'max' or 'first', got {keep!r}.")
    groups: dict[str, list[int]] = {}
    for i, completion in enumerate(example["completions"]):
        groups.setdefault(_response_text(completion).strip(), []).append(i)
    completions, rewards = [], []
    for members in groups.values():
        values = [float(example["rewards"][i]) for i in members]
        completions.append(example["completions"][members[0]])
        rewards.append({"mean": sum(values) / len(values), "max": max(values), "first": values[0]}[keep])
        if stats is not None:
            stats["duplicate_response"] += len(members) - 1
    return {**example, "completions": completions, "rewards": rewards}


def dedupe_completions(example: dict, keep: str = "mean") -> dict:
    """Merge completions of one reward row whose text is identical (after stripping surrounding whitespace).

    The merged completion sits where its first copy was. Its reward is, by `keep`:
    `"mean"` (default): the mean of the copies' rewards. Copies are the same text rated independently (in
    UltraFeedback: the same answer from two models, each critiqued separately), so the rewards differ only by rater
    noise and the mean is the better estimate; `"max"` would systematically favour duplicated answers, which are often
    short boilerplate. `"max"` and `"first"` are available.

    Returns:
        the row with `completions`/`rewards` replaced; other columns are kept.
    """
    return _dedupe(example, keep, None)


def _sorted_indices(rewards: list[float]) -> list[int]:
    """Indices by reward, best first; ties keep their order."""
    return sorted(range(len(rewards)), key=lambda i: -rewards[i])


def _worst_index(rewards: list[float]) -> int:
    """The first completion with the lowest reward."""
    return min(range(len(rewards)), key=lambda i: (rewards[i], i))


# --------------------------------------------------------------------------------------------------------------------
# reward -> preference
# --------------------------------------------------------------------------------------------------------------------
def _pair(prompt: Any, completions: list, rewards: list, win: int, lose: int) -> dict:
    return {
        "prompt": prompt,
        "chosen": completions[win],
        "rejected": completions[lose],
        "score_chosen": float(rewards[win]),
        "score_rejected": float(rewards[lose]),
    }


def reward_to_preference(example: dict, mode: str = "best_vs_worst", seed: int = 0) -> dict:
    """One DPO pair from a reward row, for running DPO baselines on the same data.

    Modes: `"best_vs_worst"` pairs the highest-rewarded completion with the lowest; `"best_vs_random"` pairs the best
    with one drawn uniformly among those rewarded strictly lower (the `HuggingFaceH4/ultrafeedback_binarized` recipe),
    with a generator seeded by `seed` and the prompt so the draw is reproducible. Ties go to the earlier completion.

    Returns:
        `{"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}` (TRL's explicit-prompt preference format).

    Raises:
        ValueError: if all rewards of the row are equal (there is no pair); filter such rows first or use
            :func:`reward_to_preference_pairs`, which skips them.
    """
    completions, rewards = example["completions"], [float(r) for r in example["rewards"]]
    order = _sorted_indices(rewards)
    best = order[0]
    lower = [i for i in order if rewards[i] < rewards[best]]
    if not lower:
        raise ValueError(f"All {len(rewards)} rewards of this row are equal ({rewards[best]}); there is no pair.")
    if mode == "best_vs_worst":
        lose = _worst_index(rewards)
    elif mode == "best_vs_random":
        rng = random.Random(f"{seed}:{example['prompt']!r}")
        lose = rng.choice(sorted(lower))
    else:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {SINGLE_PAIR_MODES}.")
    return _pair(example["prompt"], completions, rewards, best, lose)


def reward_to_preference_pairs(batch: dict[str, list], mode: str = "best_vs_rest") -> dict[str, list]:
    """Expand a batch of reward rows into DPO pairs; use with `Dataset.map(batched=True, remove_columns=...)`.

    Modes: `"best_vs_worst"` (one pair per prompt), `"best_vs_rest"` (the best against each other completion: K-1
    pairs), `"all_pairs"` (every pair of completions, the higher-rewarded one chosen: K(K-1)/2 pairs). Pairs whose
    rewards tie are skipped (so a prompt whose rewards are all equal yields no pair). The best is the first completion
    with the highest reward.

    Example::

        pairs = reward_ds.map(reward_to_preference_pairs, batched=True, remove_columns=reward_ds.column_names)

    Returns:
        columns `prompt`, `chosen`, `rejected`, `score_chosen`, `score_rejected`.
    """
    if mode not in PAIRS_MODES:
        raise ValueError(f"Unknown mode {mode!r}; choose one of {PAIRS_MODES}.")
    out: dict[str, list] = {k: [] for k in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected")}
    for prompt, completions, raw_rewards in zip(batch["prompt"], batch["completions"], batch["rewards"]):
        rewards = [float(r) for r in raw_rewards]
        order = _sorted_indices(rewards)
        if mode == "best_vs_worst":
            pairs = [(order[0], _worst_index(rewards))]
        elif mode == "best_vs_rest":
            pairs = [(order[0], j) for j in range(len(rewards)) if j != order[0]]
        else:
            pairs = [(i, j) if rewards[i] >= rewards[j] else (j, i) for i in range(len(rewards)) for j in range(i)]
            pairs.sort(key=lambda p: (min(p), max(p)))
        for win, lose in pairs:
            if rewards[win] == rewards[lose]:
                continue
            for key, value in _pair(prompt, completions, rewards, win, lose).items():
                out[key].append(value)
    return out


# --------------------------------------------------------------------------------------------------------------------
# whole-dataset preparation (what scripts/prepare_ultrafeedback.py runs)
# --------------------------------------------------------------------------------------------------------------------
def _select_k(row: dict, k: int, strategy: str) -> dict:
    """Keep k completions of a row already sorted best first."""
    n = len(row["completions"])
    if strategy == "top":
        keep = list(range(k))
    else:  # spread: best, worst and evenly spaced ranks between them
        keep = [int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)]
    return {**row, "completions": [row["completions"][i] for i in keep], "rewards": [row["rewards"][i] for i in keep]}


def prepare_reward_dataset(
    dataset: Dataset,
    *,
    source_format: str = "ultrafeedback",
    score: str = "overall_score",
    conversational: bool = True,
    min_k: int = 2,
    k: int | None = None,
    k_strategy: str = "top",
    drop_ties: bool = False,
    dedupe: str | None = "mean",
    drop_empty: bool = True,
    use_scores: bool = False,
) -> tuple[Dataset, dict]:
    """Convert and clean a whole dataset into reward rows, and count every drop by reason.

    Per row, in this order: convert (`source_format`: `"ultrafeedback"`, `"authors_reward"`, `"authors_preference"` or
    `"preference"`), which drops completions with a missing/"N/A" score or an empty response; merge duplicate responses
    (`dedupe`: `"mean"`/`"max"`/`"first"`, see :func:`dedupe_completions`; `None` keeps duplicates); sort completions
    by reward, best first (ties keep source order); drop the row if fewer than `min_k` completions remain (or fewer
    than `k` when `k` is set); with `k`, keep exactly `k` completions (`k_strategy="top"`: the k best;
    `"spread"`: the best, the worst and evenly spaced ranks between them, which keeps the strongest contrast); with
    `drop_ties`, drop the row if all its rewards are equal (no preference signal).

    Args:
        dataset: the source rows.
        score, conversational: for `"ultrafeedback"` (see :func:`ultrafeedback_to_reward`); `conversational` also
            applies to `"authors_reward"`. Preference formats keep the data's own form.
        use_scores: for `"authors_preference"`, use `score_chosen`/`score_rejected` as rewards.

    Returns:
        `(reward_dataset, report)`. The report holds `rows_read`, `rows_kept`, `rows_dropped` (by reason:
        `too_few_completions`, `all_rewards_tied`), `completions_read`, `completions_kept`, `completions_dropped` (by
        reason: `missing_score`, `empty_response`, `duplicate_response`, `over_k`, `in_dropped_rows`), `k_counts` (how
        many kept rows have each K) and the settings used. `completions_read` equals `completions_kept` plus all
        `completions_dropped`.
    """
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"Unknown source_format {source_format!r}; choose one of {SOURCE_FORMATS}.")
    if min_k < 2:
        raise ValueError(f"min_k must be at least 2 (K >= 2 responses per prompt), got {min_k}.")
    if k is not None and k < 2:
        raise ValueError(f"k must be at least 2, got {k}.")
    if k_strategy not in ("top", "spread"):
        raise ValueError(f"k_strategy must be 'top' or 'spread', got {k_strategy!r}.")
    if dedupe not in (None, "mean", "max", "first"):
        raise ValueError(f"dedupe must be None, 'mean', 'max' or 'first', got {dedupe!r}.")
    if source_format == "ultrafeedback" and score not in ULTRAFEEDBACK_SCORES:
        raise ValueError(f"Unknown UltraFeedback score {score!r}; choose one of {ULTRAFEEDBACK_SCORES}.")

    def convert(example: dict, stats: Counter) -> dict:
        if source_format == "ultrafeedback":
            return _ultrafeedback_row(example, score, conversational, drop_empty, stats)
        if source_format == "authors_reward":
            return _authors_reward_row(example, conversational, drop_empty, stats)
        return _preference_row(
            example, 1.0, 0.0, use_scores and source_format == "authors_preference", drop_empty, stats
        )

    stats: Counter = Counter()
    k_counts: Counter = Counter()
    kept: list[dict] = []
    need = max(min_k, k or 0)
    for example in dataset:
        stats["rows_read"] += 1
        row = convert(example, stats)
        if dedupe is not None:
            row = _dedupe(row, dedupe, stats)
        order = _sorted_indices(row["rewards"])
        row = {
            "prompt": row["prompt"],
            "completions": [row["completions"][i] for i in order],
            "rewards": [float(row["rewards"][i]) for i in order],
        }
        if len(row["completions"]) < need:
            stats["too_few_completions"] += 1
            stats["in_dropped_rows"] += len(row["completions"])
            continue
        if k is not None and len(row["completions"]) > k:
            stats["over_k"] += len(row["completions"]) - k
            row = _select_k(row, k, k_strategy)
        if drop_ties and len(set(row["rewards"])) == 1:
            stats["all_rewards_tied"] += 1
            stats["in_dropped_rows"] += len(row["completions"])
            continue
        k_counts[len(row["completions"])] += 1
        kept.append(row)

    if kept:
        result = Dataset.from_list(kept)
    else:
        result = Dataset.from_dict({"prompt": [], "completions": [], "rewards": []})
    dropped_completions = {
        reason: stats[reason]
        for reason in (_MISSING_SCORE, _EMPTY_RESPONSE, "duplicate_response", "over_k", "in_dropped_rows")
    }
    report = {
        "source_format": source_format,
        "settings": {
            "score": score if source_format == "ultrafeedback" else None,
            "conversational": conversational,
            "min_k": min_k,
            "k": k,
            "k_strategy": k_strategy,
            "drop_ties": drop_ties,
            "dedupe": dedupe,
            "drop_empty": drop_empty,
            "use_scores": use_scores,
        },
        "rows_read": stats["rows_read"],
        "rows_kept": len(kept),
        "rows_dropped": {
            "too_few_completions": stats["too_few_completions"],
            "all_rewards_tied": stats["all_rewards_tied"],
        },
        "completions_read": stats["completions_read"],
        "completions_kept": sum(len(r["completions"]) for r in kept),
        "completions_dropped": dropped_completions,
        "k_counts": {str(n): k_counts[n] for n in sorted(k_counts)},
    }
    return result, report


def split_dataset(dataset: Dataset, test_size: float = 0.05, seed: int = 42) -> DatasetDict:
    """Shuffle-split into `DatasetDict(train=..., test=...)` with `Dataset.train_test_split`.

    `test_size` is a fraction in [0, 1) or a row count (>= 1). The test split gets `ceil(fraction * n)` rows, but never
    all of them: when it would be empty or would leave no training row, every row goes to `train` and `test` is empty.
    """
    n = len(dataset)
    n_test = math.ceil(test_size * n) if test_size < 1 else int(test_size)
    if n_test <= 0 or n_test >= n:
        return DatasetDict(train=dataset, test=dataset.select([]))
    return dataset.train_test_split(test_size=n_test, seed=seed, shuffle=True)
