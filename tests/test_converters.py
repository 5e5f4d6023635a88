"""Converters from public layouts to trl-nca reward rows and back, checked against hand-written expectations."""

import json
from pathlib import Path

import pytest
from datasets import Dataset

from trl_nca.converters import (
    authors_preference_to_reward,
    authors_reward_to_reward,
    dedupe_completions,
    parse_score,
    preference_to_reward,
    prepare_reward_dataset,
    reward_to_preference,
    reward_to_preference_pairs,
    split_dataset,
    ultrafeedback_to_reward,
)

FIXTURES = Path(__file__).parent / "fixtures"


def read_jsonl(name):
    with open(FIXTURES / name) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uf_rows():
    return {row["instruction"]: row for row in read_jsonl("ultrafeedback_raw.jsonl")}


@pytest.fixture(scope="module")
def authors_rows():
    return {row["prompt_id"]: row for row in read_jsonl("authors_reward.jsonl")}


@pytest.fixture(scope="module")
def authors_pref_rows():
    return {row["prompt_id"]: row for row in read_jsonl("authors_preference.jsonl")}


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------------------------------
# parse_score
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [("4", 4.0), (" 3 ", 3.0), (7, 7.0), (6.5, 6.5), ("N/A", None), ("", None), (None, None), ("abc", None)],
)
def test_parse_score(value, expected):
    assert parse_score(value) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "nan", True, [4]])
def test_parse_score_rejects_non_finite_and_non_numbers(value):
    assert parse_score(value) is None


# ---------------------------------------------------------------------------------------------------------------------
# raw UltraFeedback
# ---------------------------------------------------------------------------------------------------------------------
def test_ultrafeedback_conversational_default(uf_rows):
    row = ultrafeedback_to_reward(uf_rows["What is 2+2?"])
    assert row == {
        "prompt": user("What is 2+2?"),
        "completions": [
            assistant("2 + 2 = 4."),
            assistant("The answer is 4."),
            assistant("2 + 2 = 5."),
            assistant("Four."),
        ],
        "rewards": [8.0, 6.5, 3.0, 7.0],
    }


def test_ultrafeedback_text(uf_rows):
    row = ultrafeedback_to_reward(uf_rows["What is 2+2?"], conversational=False)
    assert row == {
        "prompt": "What is 2+2?",
        "completions": ["2 + 2 = 4.", "The answer is 4.", "2 + 2 = 5.", "Four."],
        "rewards": [8.0, 6.5, 3.0, 7.0],
    }


def test_ultrafeedback_drops_null_and_absent_overall_score(uf_rows):
    # "Red." has overall_score null, "Blue is one." has no overall_score key at all.
    row = ultrafeedback_to_reward(uf_rows["Name a primary color."], conversational=False)
    assert row["completions"] == ["Red, blue and yellow are the primary colors.", "Green."]
    assert row["rewards"] == [9.0, 4.0]


def test_ultrafeedback_drops_na_string_overall_score(uf_rows):
    example = json.loads(json.dumps(uf_rows["What is 2+2?"]))
    example["completions"][1]["overall_score"] = "N/A"
    example["completions"][2]["overall_score"] = float("nan")
    row = ultrafeedback_to_reward(example, conversational=False)
    assert row["completions"] == ["2 + 2 = 4.", "Four."]
    assert row["rewards"] == [8.0, 7.0]


def test_ultrafeedback_fine_grained_mean_skips_na(uf_rows):
    # ratings (helpfulness, honesty, instruction_following, truthfulness):
    # (4, N/A, 5, N/A) -> 4.5; all N/A -> dropped; (5, 5, 5, 5) -> 5; (2, N/A, 2, 2) -> 2
    row = ultrafeedback_to_reward(uf_rows["Explain gravity in one sentence."], score="fine_grained_mean")
    assert [c[0]["content"] for c in row["completions"]] == [
        "Gravity is the attraction between masses.",
        "Gravity is the force by which masses attract each other, weakening with the square of their distance.",
        "Gravity is a kind of magnetism.",
    ]
    assert row["rewards"] == [4.5, 5.0, 2.0]


def test_ultrafeedback_fine_grained_mean_rescues_rows_without_overall(uf_rows):
    row = ultrafeedback_to_reward(uf_rows["Name a primary color."], score="fine_grained_mean", conversational=False)
    assert row["completions"] == ["Red.", "Blue is one.", "Red, blue and yellow are the primary colors.", "Green."]
    assert row["rewards"] == [4.5, 3.0, 5.0, 2.0]


def test_ultrafeedback_stored_fine_grained_field(uf_rows):
    row = ultrafeedback_to_reward(uf_rows["Explain gravity in one sentence."], score="fine-grained_score")
    assert row["rewards"] == [4.5, 5.0, 2.0]


@pytest.mark.parametrize(
    "aspect, expected",
    [("helpfulness", [4.0, 5.0, 2.0]), ("honesty", [5.0]), ("instruction_following", [5.0, 5.0, 2.0])],
)
def test_ultrafeedback_single_aspect(uf_rows, aspect, expected):
    row = ultrafeedback_to_reward(uf_rows["Explain gravity in one sentence."], score=aspect)
    assert row["rewards"] == expected


def test_ultrafeedback_aspect_as_list_of_ratings():
    example = {
        "instruction": "q",
        "completions": [
            {"response": "a", "annotations": {"helpfulness": [{"Rating": "4"}, {"Rating": "2"}, {"Rating": "N/A"}]}},
            {"response": "b", "annotations": {"helpfulness": {"Rating": "1", "Rationale": "r"}}},
        ],
    }
    assert ultrafeedback_to_reward(example, score="helpfulness", conversational=False)["rewards"] == [3.0, 1.0]


def test_ultrafeedback_empty_responses(uf_rows):
    example = uf_rows["Say something nice."]
    row = ultrafeedback_to_reward(example, conversational=False)
    assert row["completions"] == ["You are doing great!", "Nice."]
    assert row["rewards"] == [8.0, 4.0]
    kept = ultrafeedback_to_reward(example, conversational=False, drop_empty=False)
    assert kept["completions"] == ["", "   \n", "You are doing great!", "Nice."]
    assert kept["rewards"] == [1.0, 1.0, 8.0, 4.0]


def test_ultrafeedback_unknown_score(uf_rows):
    with pytest.raises(ValueError, match="Unknown UltraFeedback score"):
        ultrafeedback_to_reward(uf_rows["What is 2+2?"], score="helpfullness")


def test_ultrafeedback_works_with_dataset_map():
    ds = Dataset.from_json(str(FIXTURES / "ultrafeedback_raw.jsonl"))
    out = ds.map(ultrafeedback_to_reward, remove_columns=ds.column_names)
    assert sorted(out.column_names) == ["completions", "prompt", "rewards"]
    assert len(out) == 10
    assert out[0]["rewards"] == [8.0, 6.5, 3.0, 7.0]
    assert out[6]["rewards"] == [9.0]  # "What is the capital of France?": one of two scores is null


# ---------------------------------------------------------------------------------------------------------------------
# the authors' layouts
# ---------------------------------------------------------------------------------------------------------------------
def test_authors_reward_conversational(authors_rows):
    row = authors_reward_to_reward(authors_rows["p1"])
    assert row["prompt"] == user("How do I boil an egg?")
    assert row["completions"] == [
        assistant("Put it in boiling water for 9 minutes, then cool it."),
        assistant("Boil water, add the egg, wait."),
        assistant("Microwave it."),
        assistant("Eggs cannot be boiled."),
    ]
    assert row["rewards"] == [9.0, 7.5, 6.0, 3.0]


def test_authors_reward_text(authors_rows):
    row = authors_reward_to_reward(authors_rows["p2"], conversational=False)
    assert row == {
        "prompt": "Name a planet.",
        "completions": ["Mars.", "Jupiter.", "The Moon.", "Pluto, sort of."],
        "rewards": [8.0, 8.0, 5.0, 5.0],
    }


def test_authors_reward_placeholder_row_has_no_completions(authors_rows):
    # Rows the authors' script could not fill hold "N/A" answers with null scores.
    row = authors_reward_to_reward(authors_rows["p3"])
    assert row["completions"] == [] and row["rewards"] == []


def test_authors_reward_any_number_of_columns_in_numeric_order():
    example = {"prompt": "q"}
    for i in range(11):
        example[f"A{i}"] = user("q") + assistant(f"answer {i}")
        example[f"score_A{i}"] = float(i)
    row = authors_reward_to_reward(example, conversational=False)
    assert row["completions"] == [f"answer {i}" for i in range(11)]
    assert row["rewards"] == [float(i) for i in range(11)]


def test_authors_reward_errors():
    chat = user("q") + assistant("a")
    with pytest.raises(ValueError, match="score_A1"):
        authors_reward_to_reward({"prompt": "q", "A0": chat, "score_A0": 1.0, "A1": chat})
    with pytest.raises(ValueError, match="share"):
        authors_reward_to_reward({"A0": chat, "score_A0": 1.0, "A1": user("other") + assistant("b"), "score_A1": 0.0})
    with pytest.raises(ValueError, match="No `A0`"):
        authors_reward_to_reward({"prompt": "q"})


def test_authors_preference(authors_pref_rows):
    row = authors_preference_to_reward(authors_pref_rows["q1"])
    assert row == {
        "prompt": user("What colour is grass?"),
        "completions": [assistant("Green."), assistant("Purple.")],
        "rewards": [1.0, 0.0],
    }
    assert authors_preference_to_reward(authors_pref_rows["q1"], use_scores=True)["rewards"] == [8.0, 5.0]
    assert authors_preference_to_reward(authors_pref_rows["q2"], use_scores=True)["rewards"] == [6.0, 6.0]


def test_authors_preference_empty_rejected(authors_pref_rows):
    row = authors_preference_to_reward(authors_pref_rows["q3"])
    assert row["completions"] == [assistant("5.")]
    assert row["rewards"] == [1.0]


# ---------------------------------------------------------------------------------------------------------------------
# TRL preference rows
# ---------------------------------------------------------------------------------------------------------------------
def test_preference_explicit_text():
    row = preference_to_reward({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
    assert row == {"prompt": "The sky is", "completions": [" blue.", " green."], "rewards": [1.0, 0.0]}


def test_preference_implicit_text():
    row = preference_to_reward({"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"})
    assert row == {"prompt": "Q: sky? A:", "completions": [" blue", " green"], "rewards": [1.0, 0.0]}


def test_preference_implicit_conversational_multi_turn():
    example = read_jsonl("preference_implicit.jsonl")[1]
    row = preference_to_reward(example, chosen_reward=2.0, rejected_reward=-1.0)
    assert row["prompt"] == [
        {"role": "user", "content": "What is 3*3?"},
        {"role": "assistant", "content": "9"},
        {"role": "user", "content": "And 3*4?"},
    ]
    assert row["completions"] == [assistant("12"), assistant("13")]
    assert row["rewards"] == [2.0, -1.0]


def test_preference_string_prompt_with_chat_completions_is_extracted():
    # HuggingFaceH4/ultrafeedback_binarized style: a text prompt column next to full chats.
    example = {"prompt": "Hi", "chosen": user("Hi") + assistant("Hello!"), "rejected": user("Hi") + assistant("No.")}
    row = preference_to_reward(example)
    assert row["prompt"] == user("Hi")
    assert row["completions"] == [assistant("Hello!"), assistant("No.")]


def test_preference_rewards_must_be_ordered():
    with pytest.raises(ValueError, match="larger"):
        preference_to_reward({"prompt": "p", "chosen": "a", "rejected": "b"}, chosen_reward=0.0, rejected_reward=0.0)


# ---------------------------------------------------------------------------------------------------------------------
# dedupe
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "keep, expected", [("mean", [2.0, 5.0, 0.0]), ("max", [3.0, 5.0, 0.0]), ("first", [1.0, 5.0, 0.0])]
)
def test_dedupe_completions(keep, expected):
    example = {"prompt": "p", "completions": ["a", "b", " a ", "c"], "rewards": [1.0, 5.0, 3.0, 0.0], "id": 7}
    row = dedupe_completions(example, keep=keep)
    assert row == {"prompt": "p", "completions": ["a", "b", "c"], "rewards": expected, "id": 7}


def test_dedupe_conversational():
    example = {
        "prompt": user("p"),
        "completions": [assistant("x"), assistant("y"), assistant("x")],
        "rewards": [4.0, 1.0, 2.0],
    }
    row = dedupe_completions(example)
    assert row["completions"] == [assistant("x"), assistant("y")]
    assert row["rewards"] == [3.0, 1.0]


# ---------------------------------------------------------------------------------------------------------------------
# reward -> preference
# ---------------------------------------------------------------------------------------------------------------------
ROW = {"prompt": "p", "completions": ["w", "x", "y", "z"], "rewards": [2.0, 9.0, 1.0, 5.0]}


def test_reward_to_preference_best_vs_worst():
    assert reward_to_preference(ROW) == {
        "prompt": "p",
        "chosen": "x",
        "rejected": "y",
        "score_chosen": 9.0,
        "score_rejected": 1.0,
    }


def test_reward_to_preference_worst_tie_takes_first():
    row = {"prompt": "p", "completions": ["a", "b", "c"], "rewards": [3.0, 1.0, 1.0]}
    assert reward_to_preference(row)["rejected"] == "b"


def test_reward_to_preference_best_vs_random():
    draws = {reward_to_preference(ROW, mode="best_vs_random", seed=s)["rejected"] for s in range(40)}
    assert draws <= {"w", "y", "z"} and len(draws) > 1
    assert reward_to_preference(ROW, mode="best_vs_random", seed=3) == reward_to_preference(
        ROW, mode="best_vs_random", seed=3
    )
    # a completion tied with the best is never the rejected one
    tied = {"prompt": "p", "completions": ["a", "b", "c"], "rewards": [9.0, 9.0, 1.0]}
    assert {reward_to_preference(tied, mode="best_vs_random", seed=s)["rejected"] for s in range(20)} == {"c"}


def test_reward_to_preference_errors():
    with pytest.raises(ValueError, match="equal"):
        reward_to_preference({"prompt": "p", "completions": ["a", "b"], "rewards": [1.0, 1.0]})
    with pytest.raises(ValueError, match="Unknown mode"):
        reward_to_preference(ROW, mode="best_vs_rest")


@pytest.fixture(scope="module")
def two_rows():
    return Dataset.from_dict(
        {
            "prompt": ["P", "Q"],
            "completions": [["a", "b", "c", "d"], ["e", "f"]],
            "rewards": [[1.0, 4.0, 4.0, 0.0], [2.0, 2.0]],
        }
    )


def pairs_of(ds, mode):
    out = ds.map(reward_to_preference_pairs, batched=True, fn_kwargs={"mode": mode}, remove_columns=ds.column_names)
    assert out.column_names == ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"]
    return [(r["prompt"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in out]


def test_pairs_best_vs_rest_skips_ties(two_rows):
    # best is "b" (first of the two 4.0s); b-c tie skipped; prompt Q is all tied.
    assert pairs_of(two_rows, "best_vs_rest") == [("P", "b", "a", 4.0, 1.0), ("P", "b", "d", 4.0, 0.0)]


def test_pairs_best_vs_worst(two_rows):
    assert pairs_of(two_rows, "best_vs_worst") == [("P", "b", "d", 4.0, 0.0)]


def test_pairs_all_pairs(two_rows):
    assert pairs_of(two_rows, "all_pairs") == [
        ("P", "b", "a", 4.0, 1.0),
        ("P", "c", "a", 4.0, 1.0),
        ("P", "a", "d", 1.0, 0.0),
        ("P", "b", "d", 4.0, 0.0),
        ("P", "c", "d", 4.0, 0.0),
    ]


def test_pairs_unknown_mode(two_rows):
    with pytest.raises(ValueError, match="Unknown mode"):
        reward_to_preference_pairs(two_rows[:], mode="best_vs_random")


# ---------------------------------------------------------------------------------------------------------------------
# prepare_reward_dataset / split_dataset
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uf_dataset():
    return Dataset.from_json(str(FIXTURES / "ultrafeedback_raw.jsonl"))


def check_accounting(report):
    dropped = sum(report["completions_dropped"].values())
    assert report["completions_read"] == report["completions_kept"] + dropped
    assert report["rows_read"] == report["rows_kept"] + sum(report["rows_dropped"].values())


def test_prepare_ultrafeedback_default(uf_dataset):
    ds, report = prepare_reward_dataset(uf_dataset)
    # Counted by hand from tests/fixtures/ultrafeedback_raw.jsonl (10 prompts, 34 responses):
    # dropped rows: "capital of France" (1 scored response left) and "Tell me a joke." (1 response);
    # missing scores: 2 in "primary color", 1 in "capital of France"; empty: 2 in "Say something nice.";
    # duplicate: the repeated haiku.
    assert report["rows_read"] == 10
    assert report["rows_kept"] == 8
    assert report["rows_dropped"] == {"too_few_completions": 2, "all_rewards_tied": 0}
    assert report["completions_read"] == 34
    assert report["completions_kept"] == 26
    assert report["completions_dropped"] == {
        "missing_score": 3,
        "empty_response": 2,
        "duplicate_response": 1,
        "over_k": 0,
        "in_dropped_rows": 2,
    }
    assert report["k_counts"] == {"2": 2, "3": 2, "4": 4}
    check_accounting(report)
    rows = {r["prompt"][0]["content"]: r for r in ds}
    haiku = rows["Write a haiku about rain."]
    assert [c[0]["content"] for c in haiku["completions"]] == [
        "Grey clouds gather low\nthe first drops darken the stone\nthe garden drinks deep",
        "Soft rain on the roof\nwhispers to the sleeping town\npuddles hold the sky",
        "Rain is wet.",
    ]
    assert haiku["rewards"] == [8.0, 6.0, 2.0]  # sorted best first; the duplicate's 5 and 7 averaged
    assert rows["What is 2+2?"]["rewards"] == [8.0, 7.0, 6.5, 3.0]
    assert rows["Translate 'bonjour' to English."]["rewards"] == [7.0, 5.0, 5.0]


def test_prepare_drop_ties(uf_dataset):
    ds, report = prepare_reward_dataset(uf_dataset, drop_ties=True)
    assert report["rows_kept"] == 7
    assert report["rows_dropped"] == {"too_few_completions": 2, "all_rewards_tied": 1}
    assert report["completions_dropped"]["in_dropped_rows"] == 6
    assert "Is the sky green?" not in {r["prompt"][0]["content"] for r in ds}
    check_accounting(report)


def test_prepare_fine_grained_mean(uf_dataset):
    ds, report = prepare_reward_dataset(uf_dataset, score="fine_grained_mean", conversational=False)
    assert report["rows_kept"] == 9
    assert report["completions_kept"] == 29
    assert report["completions_dropped"] == {
        "missing_score": 1,
        "empty_response": 2,
        "duplicate_response": 1,
        "over_k": 0,
        "in_dropped_rows": 1,
    }
    rows = {r["prompt"]: r for r in ds}
    assert rows["Write a haiku about rain."]["rewards"] == [5.0, 3.5, 1.5]
    assert rows["What is the capital of France?"]["rewards"] == [5.0, 1.25]
    check_accounting(report)


def test_prepare_exact_k(uf_dataset):
    ds, report = prepare_reward_dataset(uf_dataset, k=4)
    assert report["rows_kept"] == 4
    assert report["rows_dropped"]["too_few_completions"] == 6
    assert all(len(r["completions"]) == 4 for r in ds)


@pytest.mark.parametrize(
    "k, strategy, expected",
    [(2, "top", [8.0, 7.0]), (2, "spread", [8.0, 3.0]), (3, "top", [8.0, 7.0, 6.5]), (3, "spread", [8.0, 6.5, 3.0])],
)
def test_prepare_k_selection(uf_dataset, k, strategy, expected):
    ds, report = prepare_reward_dataset(uf_dataset.select([0]), k=k, k_strategy=strategy)
    assert ds[0]["rewards"] == expected
    assert report["completions_dropped"]["over_k"] == 4 - k
    check_accounting(report)


def test_prepare_without_dedupe_keeps_duplicates(uf_dataset):
    ds, report = prepare_reward_dataset(uf_dataset, dedupe=None, conversational=False)
    rows = {r["prompt"]: r for r in ds}
    assert rows["Write a haiku about rain."]["rewards"] == [8.0, 7.0, 5.0, 2.0]
    assert report["completions_dropped"]["duplicate_response"] == 0


def test_prepare_authors_reward():
    ds, report = prepare_reward_dataset(
        Dataset.from_json(str(FIXTURES / "authors_reward.jsonl")), source_format="authors_reward"
    )
    assert report["rows_kept"] == 4
    assert report["completions_read"] == 20
    assert report["completions_kept"] == 15
    assert report["completions_dropped"]["missing_score"] == 4
    assert report["completions_dropped"]["duplicate_response"] == 1
    rows = {r["prompt"][0]["content"]: r for r in ds}
    assert rows["What is the opposite of hot?"]["rewards"] == [9.0, 6.5, 2.0]
    check_accounting(report)


def test_prepare_authors_preference():
    source = Dataset.from_json(str(FIXTURES / "authors_preference.jsonl"))
    ds, report = prepare_reward_dataset(source, source_format="authors_preference")
    assert report["rows_kept"] == 3
    assert report["completions_dropped"]["empty_response"] == 1
    assert all(r["rewards"] == [1.0, 0.0] for r in ds)
    ds, report = prepare_reward_dataset(source, source_format="authors_preference", use_scores=True, drop_ties=True)
    assert report["rows_kept"] == 2
    assert report["rows_dropped"] == {"too_few_completions": 1, "all_rewards_tied": 1}
    assert sorted(r["rewards"] for r in ds) == [[7.0, 3.5], [8.0, 5.0]]


def test_prepare_trl_preference():
    ds, report = prepare_reward_dataset(
        Dataset.from_json(str(FIXTURES / "preference_implicit.jsonl")), source_format="preference"
    )
    assert report["rows_kept"] == 2
    assert ds[0]["prompt"] == user("Hi!")
    assert ds[0]["completions"] == [assistant("Hello, how can I help?"), assistant("Go away.")]


def test_prepare_all_dropped_gives_empty_dataset(uf_dataset):
    ds, report = prepare_reward_dataset(uf_dataset.select([6, 8]))
    assert len(ds) == 0 and ds.column_names == ["prompt", "completions", "rewards"]
    assert report["rows_kept"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"min_k": 1}, {"k": 1}, {"k_strategy": "bottom"}, {"dedupe": "min"}, {"source_format": "hh"}, {"score": "x"}],
)
def test_prepare_rejects_bad_options(uf_dataset, kwargs):
    with pytest.raises(ValueError):
        prepare_reward_dataset(uf_dataset, **kwargs)


@pytest.mark.parametrize("n, test_size, n_test", [(8, 0.25, 2), (8, 0.05, 1), (8, 3, 3), (8, 0, 0), (1, 0.5, 0)])
def test_split_dataset(n, test_size, n_test):
    ds = Dataset.from_dict({"prompt": [f"p{i}" for i in range(n)]})
    splits = split_dataset(ds, test_size=test_size, seed=0)
    assert len(splits["test"]) == n_test
    assert len(splits["train"]) == n - n_test
    assert sorted(list(splits["train"]["prompt"]) + list(splits["test"]["prompt"])) == sorted(ds["prompt"])


@pytest.mark.parametrize(
    "fixture, kwargs",
    [
        ("ultrafeedback_raw.jsonl", {}),
        ("ultrafeedback_raw.jsonl", {"score": "fine_grained_mean", "conversational": False}),
        ("authors_reward.jsonl", {"source_format": "authors_reward"}),
        ("authors_reward.jsonl", {"source_format": "authors_reward", "conversational": False}),
        ("authors_preference.jsonl", {"source_format": "authors_preference", "use_scores": True}),
        ("preference_implicit.jsonl", {"source_format": "preference"}),
    ],
)
def test_prepared_rows_pass_the_trainers_validation(fixture, kwargs):
    from trl_nca.data import validate_example

    ds, _ = prepare_reward_dataset(Dataset.from_json(str(FIXTURES / fixture)), **kwargs)
    assert len(ds) > 0
    for index, row in enumerate(ds):
        validate_example(row, index)
