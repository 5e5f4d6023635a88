"""`trl-nca iterate`: rounds of generate -> train. Config errors, the per-round settings (policy, reference, seed,
resume), the train script's `ref_model_name_or_path`, a failing stage, and (slow) a real 2-round run of the tiny
recipe followed by a resume that skips the finished rounds."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trl_nca.cli import UsageError
from trl_nca.cli import main as cli_main
from trl_nca.scripts import iterate
from trl_nca.tiny import build_tiny_model, build_tiny_reward_model, build_tokenizer, save_tiny

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny" / "iterate.yaml"
ITERATE_RECIPES = sorted((REPO / "recipes").rglob("iterate*.y*ml"))


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder holding what recipes/tiny/iterate.yaml names: `policy/`, `reward_model/`, `prompts.jsonl`."""
    root = tmp_path_factory.mktemp("iterate")
    tokenizer = build_tokenizer()
    save_tiny(str(root / "policy"), num_hidden_layers=1)
    reward = build_tiny_reward_model(tokenizer)
    reward.save_pretrained(root / "reward_model")
    tokenizer.save_pretrained(root / "reward_model")
    with open(root / "prompts.jsonl", "w") as handle:
        for i in range(4):
            handle.write(json.dumps({"prompt": f"What is {i} plus {i}?"}) + "\n")
    return root


@pytest.fixture
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    return workdir


def _config(tmp_path: Path, **changes) -> Path:
    settings = yaml.safe_load(TINY_RECIPE.read_text())
    settings["output_dir"] = str(tmp_path / "out")
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            settings[section][name] = value
        else:
            settings[key] = value
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


# ---------------------------------------------------------------------------------------------- user errors
CONFIG_ERRORS = [
    ("misspelled-key", {"refrence": "initial"}, r"unknown key `refrence` in the config \(did you mean `reference`\?\)"),
    ("bad-choice", {"reference": "first"}, r"`reference` must be one of \['previous', 'initial'\], got 'first'"),
    ("bad-rounds", {"rounds": 0}, r"`rounds` must be an integer >= 1"),
    ("generate-typo", {"generate__num_completion": 4}, r"unknown key `num_completion` in `generate` \(did you mean `num_completions`\?\)"),
    ("generate-sets-the-model", {"generate__model_name_or_path": "x"}, r"generate.model_name_or_path: iterate sets it in every round"),
    ("generate-bad-value", {"generate__num_completions": 0}, r"^trl-nca iterate: error: generate: `num_completions` must be at least 1"),
    ("train-typo", {"train__max_step": 2}, r"^trl-nca iterate: error: train: unknown key `max_step` .*\(did you mean `max_steps`\?\)"),
    ("train-sets-the-data", {"train__dataset_name": "x"}, r"train.dataset_name: iterate sets it in every round"),
    ("train-peft", {"train__use_peft": True}, r"use_peft recipes save a LoRA adapter"),
    ("missing-recipe", {"train__recipe": "tiny/no_such"}, r"Recipe tiny/no_such is neither a file nor a bundled recipe"),
]  # fmt: skip


@pytest.mark.parametrize("name,changes,message", CONFIG_ERRORS, ids=[case[0] for case in CONFIG_ERRORS])
def test_config_errors_are_one_line_exit_2_before_any_stage(capsys, in_workdir, tmp_path, name, changes, message):
    assert cli_main(["iterate", str(_config(tmp_path, **changes))]) == 2
    assert re.search(message, _one_error_line(capsys))
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


def test_unknown_flag_and_missing_config_are_one_line(capsys, in_workdir, tmp_path):
    assert iterate.main([str(_config(tmp_path)), "--round", "3"]) == 2
    assert "unknown flag `--round` (did you mean `--rounds`?)" in _one_error_line(capsys)
    assert iterate.main([]) == 2
    assert "no config given" in _one_error_line(capsys)


def test_a_changed_setting_refuses_to_resume(capsys, in_workdir, tmp_path):
    config = iterate.parse_args([str(_config(tmp_path))])
    generate, train = iterate.generate_base(config), iterate.train_base(config)
    iterate.check_resumable(config, generate, train)
    config.rounds = 5  # more rounds: allowed
    iterate.check_resumable(config, generate, train)
    with pytest.raises(UsageError, match=r"different `train`.*only `rounds` may change"):
        iterate.check_resumable(config, generate, {**train, "beta": 0.5})
    with pytest.raises(UsageError, match=r"different `generate.temperature`.*the scoring settings such as"):
        iterate.check_resumable(config, {**generate, "temperature": 0.5, "reward_weights": [2.0]}, train)
    # The scoring settings of `generate` may change (generate keeps its committed samples): recorded anew.
    rescoring = {**generate, "reward_funcs": ["reward_model", "f.py:g"], "reward_weights": [1.0, 0.5]}
    assert iterate.check_resumable(config, rescoring, train) == ["reward_funcs", "reward_weights"]
    assert iterate.check_resumable(config, rescoring, train) == []
    with pytest.raises(UsageError, match=r"different `generate.num_completions`"):
        iterate.check_resumable(config, {**rescoring, "num_completions": 5}, train)


# ---------------------------------------------------------------------------------------------- per-round settings
@pytest.mark.parametrize("reference", ["previous", "initial"])
def test_round_settings_policy_reference_seed(in_workdir, tmp_path, reference):
    config = iterate.parse_args([str(_config(tmp_path, reference=reference, rounds=3, generate__seed=7))])
    generate, train = iterate.generate_base(config), iterate.train_base(config)
    out = tmp_path / "out"
    for index in (1, 2, 3):
        gen = iterate.generate_settings(config, generate, index)
        tr = iterate.train_settings(config, train, index)
        policy = "policy" if index == 1 else str(out / f"round-{index - 1}" / "model")
        assert gen["model_name_or_path"] == [policy] and tr["model_name_or_path"] == policy
        assert gen["model_names"] == ["policy" if index == 1 else f"round-{index - 1}"]
        assert gen["output_dir"] == str(out / f"round-{index}" / "data")
        assert gen["seed"] == 7 + index - 1  # a new seed each round
        assert tr["dataset_name"] == str(out / f"round-{index}" / "data" / "dataset")
        assert tr["output_dir"] == str(out / f"round-{index}" / "model")
        assert tr["max_steps"] == 2 and tr["beta"] == 0.1 and tr["eval_strategy"] == "no"  # recipe + overrides
        expected_ref = "policy" if (reference == "initial" and index > 1) else None
        assert tr.get("ref_model_name_or_path") == expected_ref
        assert "resume_from_checkpoint" not in tr
    assert iterate.train_settings(config, train, 2, "ck")["resume_from_checkpoint"] == "ck"
    assert iterate.stage_command("train", "t.yaml") == [sys.executable, "-m", "trl_nca.cli", "train", "t.yaml"]


def _fake_round_data(folder: Path, rewards: list[list[float]]) -> None:
    data = folder / "data"
    (data / "dataset").mkdir(parents=True)
    with open(data / "data.jsonl", "w") as handle:
        for row in rewards:
            handle.write(json.dumps({"prompt": "p", "completions": ["a"] * len(row), "rewards": row}) + "\n")
    (data / "stats.json").write_text(json.dumps({"prompts": 3, "prompts_kept": len(rewards), "mean_reward": {}}))


def _fake_checkpoint(folder: Path, step: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))


def test_resume_skips_finished_rounds_and_complete_data_and_resumes_training(
    capsys, in_workdir, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    (out / "round-1").mkdir(parents=True)
    (out / "round-1" / "round.json").write_text(
        json.dumps({"round": 1, "prompts_kept": 4, "prompts": 4, "mean_reward": 1.5, "policy": "policy", "model": "m"})
    )
    _fake_round_data(out / "round-2", [[1.0, 3.0], [2.0, 6.0]])
    _fake_checkpoint(out / "round-2" / "model" / "checkpoint-1", 1)
    _fake_checkpoint(out / "round-2" / "model" / "checkpoint-2", 2)
    (out / "round-2" / "model" / "checkpoint-2" / "model.safetensors").write_bytes(b"\x00" * 4)  # truncated
    commands = []

    def fake_stage(command, where):
        commands.append(command[3:])
        model = Path(yaml.safe_load(Path(command[4]).read_text())["output_dir"])
        (model / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": [{"loss": 0.5}]}))

    monkeypatch.setattr(iterate, "run_stage", fake_stage)
    assert iterate.main([str(_config(tmp_path, reference="initial"))]) == 0
    stdout = capsys.readouterr().out
    assert "round 1/2: done already (round-1/round.json), skipped" in stdout
    assert "round 2/2: generate: done already (round-2/data)" in stdout
    assert (
        "round 2/2: train (policy round-1/model, reference policy); resumes from round-2/model/checkpoint-1" in stdout
    )
    assert commands == [["train", str(out / "round-2" / "train.yaml")]]  # no generate, no round 1
    settings = yaml.safe_load((out / "round-2" / "train.yaml").read_text())
    assert settings["resume_from_checkpoint"] == str(out / "round-2" / "model" / "checkpoint-1")  # newest intact
    assert settings["ref_model_name_or_path"] == "policy"
    record = json.loads((out / "round-2" / "round.json").read_text())
    assert record["mean_reward"] == pytest.approx(3.0) and record["prompts_kept"] == 2
    assert record["train"]["global_step"] == 2 and record["reference"] == "policy"
    assert [r["round"] for r in json.loads((out / "rounds.json").read_text())] == [1, 2]
    assert "round 2: 2 of 3 prompts kept, mean reward 3 (sampled by" in stdout


def test_a_rerun_with_other_reward_funcs_rescores_the_rounds_samples(capsys, in_workdir, tmp_path, monkeypatch):
    """Round 1's generate runs for real (in this process), its training is interrupted after a checkpoint; a re-run
    with another `reward_funcs` keeps the round's samples, scores them with the new sources, and trains afresh (the
    checkpoint of the old scores is not resumed)."""
    from trl_nca.scripts import generate as generate_script

    (in_workdir / "lengths.py").write_text(
        "def length(completions, **kwargs):\n    return [float(len(c)) for c in completions]\n"
    )
    trains = []

    def stage(command, where):
        name, path = command[3], command[4]
        if name == "generate":
            status = generate_script.main([path])
            if status:
                raise iterate.StageFailed(f"{where} failed: its process exited with status {status}", status)
            return
        model = Path(yaml.safe_load(Path(path).read_text())["output_dir"])
        trains.append(yaml.safe_load(Path(path).read_text()))
        if len(trains) == 1:  # interrupted after its first checkpoint
            _fake_checkpoint(model / "checkpoint-1", 1)
            raise iterate.StageFailed(f"{where} failed: its process exited with status 1", 1)
        model.mkdir(parents=True, exist_ok=True)
        (model / "trainer_state.json").write_text(json.dumps({"global_step": 2, "log_history": [{"loss": 0.5}]}))

    monkeypatch.setattr(iterate, "run_stage", stage)
    assert iterate.main([str(_config(tmp_path, rounds=1))]) == 1
    data = tmp_path / "out" / "round-1" / "data"
    first = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    assert (tmp_path / "out" / "round-1" / "model" / "checkpoint-1").is_dir()
    capsys.readouterr()

    funcs = ["reward_model", "lengths.py:length"]
    assert iterate.main([str(_config(tmp_path, rounds=1, generate__reward_funcs=funcs))]) == 0
    stdout = capsys.readouterr().out
    assert "generate: `reward_funcs` changed: the unfinished rounds rescore their committed samples" in stdout
    assert "round 1/1: generate (policy policy): the scoring settings changed, it rescores the committed" in stdout
    assert "round 1/1: train (policy policy, reference: its own initial weights); restarts: its data was rescored" in (
        stdout
    )
    stats = json.loads((data / "stats.json").read_text())
    assert stats["chunks_computed"] == {"sampling/policy": 0, "scoring/reward_model": 0, "scoring/length": 2}
    second = [json.loads(line) for line in (data / "data.jsonl").read_text().splitlines()]
    assert [r["completions"] for r in second] == [r["completions"] for r in first]
    assert [r["rewards_reward_model"] for r in second] == [r["rewards_reward_model"] for r in first]
    assert [r["rewards_length"] for r in second] == [[float(len(c)) for c in r["completions"]] for r in second]
    assert "resume_from_checkpoint" not in trains[1]  # the checkpoint trained on the old scores is gone
    assert not (tmp_path / "out" / "round-1" / "model" / "checkpoint-1").exists()
    assert (tmp_path / "out" / "round-1" / "round.json").is_file()


def test_a_failing_stage_stops_with_its_status_and_one_line(capsys, in_workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(iterate, "stage_command", lambda stage, path: [sys.executable, "-c", "raise SystemExit(3)"])
    assert iterate.main([str(_config(tmp_path))]) == 3
    err = _one_error_line(capsys)
    assert err.startswith("trl-nca iterate: error: round 1/2: generate failed: its process exited with status 3")
    assert not (tmp_path / "out" / "round-1" / "round.json").exists()


# ---------------------------------------------------------------------------------------------- the reference model
def test_train_script_loads_ref_model_name_or_path_as_the_reference(tmp_path, capsys):
    """`reference: initial` from round 2 on: the policy is another model, the reference is the initial one."""
    import torch
    from recipe_data import save_dataset

    from trl_nca.scripts.train import main, parse_args

    tokenizer = build_tokenizer()
    for name, seed in (("initial", 0), ("policy", 1)):
        build_tiny_model(tokenizer, num_hidden_layers=1, seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    data = save_dataset(tmp_path / "data", "reward", n_test=1)
    argv = ["tiny/nca_reward", "--model_name_or_path", str(tmp_path / "policy"), "--dataset_name", data]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--disable_tqdm", "true"]
    initial = build_tiny_model(tokenizer, num_hidden_layers=1, seed=0).state_dict()
    policy = build_tiny_model(tokenizer, num_hidden_layers=1, seed=1).state_dict()

    trainer = main(*parse_args([*argv, "--ref_model_name_or_path", str(tmp_path / "initial")]))
    reference = trainer.accelerator.unwrap_model(trainer.ref_model).state_dict()
    assert all(torch.equal(reference[k], initial[k]) for k in initial)
    assert not all(torch.equal(reference[k], policy[k]) for k in policy)
    assert f"Reference model: {tmp_path / 'initial'} (ref_model_name_or_path)" in capsys.readouterr().out

    default = main(*parse_args([*argv, "--output_dir", str(tmp_path / "out2")]))  # TRL's default: the policy's start
    reference = default.accelerator.unwrap_model(default.ref_model).state_dict()
    assert all(torch.equal(reference[k], policy[k]) for k in policy)
    assert "Reference model: the initial weights of the policy" in capsys.readouterr().out

    other = tmp_path / "other-vocab"
    build_tiny_model(tokenizer, num_hidden_layers=1, vocab_size=len(tokenizer) + 8).save_pretrained(other)
    with pytest.raises(UsageError, match=r"ref_model_name_or_path: .* vocabulary of .* must share its tokenizer"):
        main(*parse_args([*argv, "--ref_model_name_or_path", str(other)]))
    with pytest.raises(UsageError, match=r"ref_model_name_or_path: the folder .*missing does not exist"):
        main(*parse_args([*argv, "--ref_model_name_or_path", str(tmp_path / "missing")]))


# ---------------------------------------------------------------------------------------------- shipped recipes
@pytest.mark.parametrize("path", ITERATE_RECIPES, ids=lambda p: str(p.relative_to(REPO)))
def test_iterate_recipes_parse_and_validate(path, in_workdir):
    """Every shipped iterate recipe parses strictly and its round-1 generate/train configs pass the stages' own
    parsers (the train recipe it names resolves and its overrides are known keys)."""
    config = iterate.parse_args([str(path)])
    generate, train = iterate.generate_base(config), iterate.train_base(config)
    iterate.validate(config, generate, train)
    assert config.rounds >= 2 and train["eval_strategy"] == "no"
    if path.parent.name != "tiny":  # a real setting: real model and data ids, a GPU launcher
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", config.model_name_or_path)
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", generate["dataset_name"])
        assert train["accelerate_config"] and train["bf16"] is True
        assert f"trl-nca iterate {path.relative_to(REPO)}" in path.read_text()


@pytest.mark.slow
def test_two_rounds_of_the_tiny_recipe_then_resume_skips_them(workdir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "trl_nca.cli", "iterate", str(TINY_RECIPE), "--output_dir", str(out)]
    command += ["--reference", "initial"]
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for index in (1, 2):
        assert (out / f"round-{index}" / "data" / "dataset").is_dir()
        assert (out / f"round-{index}" / "model" / "model.safetensors").is_file()
        assert (out / f"round-{index}" / "round.json").is_file()
    lines = [line for line in result.stdout.splitlines() if line.startswith("round ")]
    assert lines == [
        "round 1/2: generate (policy policy)",
        "round 1/2: train (policy policy, reference: its own initial weights)",
        "round 2/2: generate (policy round-1/model)",
        "round 2/2: train (policy round-1/model, reference policy)",
        *[line for line in lines if line.startswith("round 1: ") or line.startswith("round 2: ")],
    ]
    # Round 2 sampled from round 1's model, with another seed.
    recorded = json.loads((out / "round-2" / "data" / "generate_config.json").read_text())
    assert recorded["model_name_or_path"] == [str(out / "round-1" / "model")] and recorded["seed"] == 1
    assert json.loads((out / "round-1" / "data" / "generate_config.json").read_text())["seed"] == 0
    rows = [json.loads(line) for line in (out / "round-2" / "data" / "data.jsonl").read_text().splitlines()]
    assert rows and all(set(row["models"]) == {"round-1"} for row in rows)
    # The reference: round 2 trained against the initial model, round 1 against its own start.
    assert "Reference model: policy (ref_model_name_or_path)" in result.stdout
    assert "Reference model: the initial weights of the policy policy" in result.stdout
    assert yaml.safe_load((out / "round-2" / "train.yaml").read_text())["ref_model_name_or_path"] == "policy"
    assert "ref_model_name_or_path" not in yaml.safe_load((out / "round-1" / "train.yaml").read_text())
    records = json.loads((out / "rounds.json").read_text())
    assert [r["round"] for r in records] == [1, 2] and all(r["prompts_kept"] == 4 for r in records)
    assert all(r["train"]["global_step"] == 2 and r["mean_reward"] is not None for r in records)
    assert "summary (mean reward" in result.stdout

    # Re-running the finished run starts no stage and rewrites nothing.
    model_file = out / "round-2" / "model" / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"a stage started: {a}"))
    assert iterate.main([str(TINY_RECIPE), "--output_dir", str(out), "--reference", "initial"]) == 0
    stdout = capsys.readouterr().out
    assert "round 1/2: done already" in stdout and "round 2/2: done already" in stdout
    assert model_file.stat().st_mtime_ns == mtime
