"""scripts/prepare_ultrafeedback.py end to end on the hand-made fixtures: saved splits and report counts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script
from datasets import load_from_disk

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "prepare_ultrafeedback.py"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def subprocess_run(tmp_path_factory):
    """The script run for real, as a user would: raw UltraFeedback, ties dropped, a quarter held out."""
    tmp = tmp_path_factory.mktemp("prepare")
    out = tmp / "uf"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "cache")}
    command = [
        sys.executable,
        str(SCRIPT),
        "--input",
        str(FIXTURES / "ultrafeedback_raw.jsonl"),
        "--drop-ties",
        "--test-size",
        "0.25",
        "--seed",
        "0",
        "--output",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    return out, result


def test_subprocess_report(subprocess_run):
    out, result = subprocess_run
    report = json.loads((out / "prepare_report.json").read_text())
    assert json.loads(result.stdout) == report  # the report is printed too
    # By hand from the fixture: 10 prompts, 34 responses. Two prompts keep a single scored response, one has four
    # equal overall_scores (dropped by --drop-ties); 3 missing scores, 2 empty responses, 1 duplicate.
    assert report["rows_read"] == 10
    assert report["rows_kept"] == 7
    assert report["rows_dropped"] == {"too_few_completions": 2, "all_rewards_tied": 1}
    assert report["completions_read"] == 34
    assert report["completions_kept"] == 22
    assert report["completions_dropped"] == {
        "missing_score": 3,
        "empty_response": 2,
        "duplicate_response": 1,
        "over_k": 0,
        "in_dropped_rows": 6,
    }
    assert report["splits"] == {"train_prefs": 5, "test_prefs": 2}  # ceil(0.25 * 7) = 2
    assert report["settings"]["score"] == "overall_score"


def test_subprocess_saved_dataset(subprocess_run):
    out, _ = subprocess_run
    splits = load_from_disk(str(out))
    assert set(splits) == {"train_prefs", "test_prefs"}
    assert (len(splits["train_prefs"]), len(splits["test_prefs"])) == (5, 2)
    rows = {r["prompt"][0]["content"]: r for split in splits.values() for r in split}
    assert set(rows) == {
        "What is 2+2?",
        "Name a primary color.",
        "Write a haiku about rain.",
        "Translate 'bonjour' to English.",
        "Say something nice.",
        "Explain gravity in one sentence.",
        "List three fruits.",
    }
    nice = rows["Say something nice."]
    assert nice["prompt"] == [{"role": "user", "content": "Say something nice."}]
    assert nice["completions"] == [
        [{"role": "assistant", "content": "You are doing great!"}],
        [{"role": "assistant", "content": "Nice."}],
    ]
    assert nice["rewards"] == [8.0, 4.0]
    assert rows["Explain gravity in one sentence."]["rewards"] == [8.5, 7.5, 6.0, 3.5]


def test_main_authors_reward_with_test_input(script, tmp_path, capsys):
    out = tmp_path / "authors"
    fixture = str(FIXTURES / "authors_reward.jsonl")
    argv = ["--format", "authors_reward", "--input", fixture, "--test-input", fixture, "--output", str(out)]
    assert script.main([*argv, "--cache-dir", str(tmp_path / "cache")]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["splits"] == {"train_prefs": 4, "test_prefs": 4}
    assert report["train_source"]["rows_dropped"] == {"too_few_completions": 1, "all_rewards_tied": 0}
    assert report["test_source"]["completions_dropped"]["missing_score"] == 4
    splits = load_from_disk(str(out))
    assert splits["train_prefs"]["rewards"] == splits["test_prefs"]["rewards"]
    assert "saved" in capsys.readouterr().err


def test_main_exact_k_without_dedupe(script, tmp_path):
    out = tmp_path / "k4"
    argv = ["--input", str(FIXTURES / "ultrafeedback_raw.jsonl"), "--k", "4", "--dedupe", "none", "--text"]
    assert script.main([*argv, "--test-size", "0", "--output", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    # prompts with 4 usable responses once duplicates are kept: 2+2, haiku, sky, gravity, fruits
    assert report["rows_kept"] == 5
    assert report["k_counts"] == {"4": 5}
    assert report["splits"] == {"train_prefs": 5, "test_prefs": 0}
    train = load_from_disk(str(out))["train_prefs"]
    assert isinstance(train[0]["prompt"], str)
    haiku = [r for r in train if r["prompt"] == "Write a haiku about rain."][0]
    assert haiku["rewards"] == [8.0, 7.0, 5.0, 2.0]


def test_main_authors_preference_scores(script, tmp_path):
    out = tmp_path / "pref"
    argv = ["--format", "authors_preference", "--use-scores", "--drop-ties", "--test-size", "0"]
    argv += ["--input", str(FIXTURES / "authors_preference.jsonl"), "--output", str(out)]
    assert script.main([*argv, "--cache-dir", str(tmp_path / "c")]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["rows_kept"] == 2
    assert report["completions_dropped"]["empty_response"] == 1
    assert sorted(load_from_disk(str(out))["train_prefs"]["rewards"]) == [[7.0, 3.5], [8.0, 5.0]]


def test_load_files_rejects_bad_inputs(script, tmp_path):
    bad = tmp_path / "data.csv"
    bad.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported"):
        script.load_files([str(bad)])
    with pytest.raises(FileNotFoundError):
        script.load_files([str(tmp_path / "missing.jsonl")])
    other = tmp_path / "data.parquet"
    other.write_bytes(b"")
    with pytest.raises(ValueError, match="Mix"):
        script.load_files([str(FIXTURES / "authors_reward.jsonl"), str(other)])


REWARD_RECIPES = sorted(
    p
    for p in (ROOT / "recipes").glob("mi*/*.yaml")
    if "preference" not in p.stem and not p.stem.startswith(("generate", "iterate"))  # train recipes only
)  # the GPU reward recipes (Mistral and Mixtral)
TRAINED = {"mistral-7b/nca_reward_qlora.yaml", "mixtral-8x7b/nca_reward_lora.yaml"}


@pytest.mark.parametrize("recipe", REWARD_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_output_trains_with_the_recipes_changing_only_dataset_name(subprocess_run, tmp_path_factory, recipe):
    """`--dataset_name OUT` is the only data flag; the rest are the CPU stand-ins every recipe test uses (a tiny model
    of the recipe's architecture, fp32, a temporary output folder, a step or two)."""
    import yaml
    from recipe_data import save_model

    from trl_nca.scripts.train import main, parse_args
    from trl_nca.sources import load_raw_datasets

    out, _ = subprocess_run
    architecture = "mixtral" if "mixtral" in recipe.parent.name else "mistral"
    model = save_model(tmp_path_factory.mktemp(architecture) / "model", architecture, num_hidden_layers=1)
    run_dir = tmp_path_factory.mktemp("run")
    argv = [str(recipe), "--dataset_name", str(out), "--model_name_or_path", model, "--output_dir", str(run_dir),
            "--max_steps", "1", "--bf16", "false", "--dtype", "float32", "--report_to", "none"]  # fmt: skip
    script_args, training_args, model_args = parse_args(argv)
    assert yaml.safe_load(recipe.read_text())["dataset_name"] != str(out)  # the recipe names the Hub set
    raw = load_raw_datasets(script_args)
    assert {script_args.dataset_train_split, script_args.dataset_test_split} <= set(raw)
    if f"{recipe.parent.name}/{recipe.name}" in TRAINED:
        trainer = main(script_args, training_args, model_args)
        assert trainer.state.global_step == 1 and len(trainer.train_dataset) == 5
