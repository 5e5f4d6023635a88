"""`trl-nca train` as a user meets it: one-line errors, corrupt checkpoints, a quiet terminal, and signals.

User errors are checked in-process through `trl_nca.cli.main` (the launcher; it fails before it would start training)
and `trl_nca.scripts.train.run` (the training script, also what `python -m trl_nca.scripts.train` runs). The signal
tests launch the real console script on a tiny model and signal it while it trains.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cpu_args
from datasets import Dataset
from recipe_data import save_dataset, save_model
from test_trainer import reward_rows

from trl_nca import NCAConfig, NCATrainer
from trl_nca.checkpoints import CheckpointError, newest_intact_checkpoint, resolve_resume_checkpoint
from trl_nca.cli import main as cli_main
from trl_nca.scripts.train import run as script_run

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TINY = REPO / "recipes" / "tiny"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {"model": save_model(root / "model", "mistral"), "data": save_dataset(root / "data", "reward")}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------------------------------- user errors
USAGE_ERRORS = [
    ("prefix-of-a-flag", ["--max_step", "2"], r"unknown flag `--max_step` \(did you mean `--max_steps`\?\)"),
    ("misspelled-flag", ["--learning_rte", "1e-4"], r"unknown flag `--learning_rte` \(did you mean `--learning_rate`\?\)"),
    ("bad-value", ["--learning_rate", "abc"], r"argument --learning_rate.*invalid float value: 'abc'"),
    ("bad-choice", ["--dataset_format", "rewards"], r"argument --dataset_format.*invalid choice: 'rewards'"),
    ("bad-accelerate-config", ["--accelerate_config", "zero33"], r"Accelerate config zero33 .*\(did you mean `zero3`\?\)"),
    ("stray-argument", ["extra"], r"unknown argument `extra`"),
    ("bad-accelerate-value", ["--main_process_port", "abc"], r"argument --main_process_port.*invalid int value: 'abc'"),
    ("bad-accelerate-choice", ["--mixed_precision", "fp9"], r"argument --mixed_precision.*invalid choice: 'fp9'"),
]  # fmt: skip


@pytest.fixture
def no_exec(monkeypatch):
    """The launcher checks run in this process: starting the training script (exec) would replace pytest."""

    def refuse(*args):
        raise AssertionError(f"the launcher started the training script: {args[1]}")

    monkeypatch.setattr(os, "execvpe", refuse)


@pytest.mark.parametrize("name,flags,message", USAGE_ERRORS, ids=[case[0] for case in USAGE_ERRORS])
def test_launcher_user_errors_are_one_line_exit_2(capsys, no_exec, name, flags, message):
    assert cli_main(["train", str(TINY / "nca_reward.yaml"), *flags]) == 2
    assert re.search(message, _one_error_line(capsys))


def test_accelerate_config_errors_are_one_line_exit_2(capsys, no_exec, tmp_path):
    not_a_mapping = tmp_path / "words.yaml"
    not_a_mapping.write_text("just some words\n")
    unknown_key = tmp_path / "typo.yaml"
    unknown_key.write_text(
        (REPO / "recipes" / "accelerate_configs" / "cpu_ddp.yaml").read_text() + "num_proceses: 2\n"
    )
    cases = [
        (not_a_mapping, r"accelerate config .*words.yaml cannot be read: .*mapping"),
        (unknown_key, r"accelerate config .*typo.yaml cannot be read: .*unknown keys \(\['num_proceses'\]\)"),
    ]
    for config, message in cases:
        assert cli_main(["train", str(TINY / "nca_reward.yaml"), "--accelerate_config", str(config)]) == 2
        assert re.search(message, _one_error_line(capsys)), config


def test_train_without_a_recipe_or_flags_prints_its_usage(capsys, no_exec):
    assert cli_main(["train"]) == 2
    assert re.search(r"no recipe given: usage: trl-nca train RECIPE \[--flag value \.\.\.\]", _one_error_line(capsys))


def test_recipe_errors_are_one_line_exit_2(capsys, no_exec, tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text((TINY / "nca_reward.yaml").read_text() + "\nbeta_typo: 0.1\n")
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_text("beta: [0.1\n")
    cases = [
        ([str(typo)], r"unknown key `beta_typo` in the recipe .*typo.yaml \(did you mean `beta`\?\)"),
        ([str(tmp_path / "missing.yaml")], r"Recipe .*missing.yaml is neither a file nor a bundled recipe"),
        (["tiny/nca_rewrd"], r"\(did you mean `tiny/nca_reward`\?\)"),
        ([str(not_yaml)], r"Recipe .*broken.yaml is not valid YAML"),
        ([str(TINY / "nca_reward.yaml"), "--trainer", "infonc"], r"Unknown trainer 'infonc' \(did you mean `infonca`\?\)"),
    ]  # fmt: skip
    for argv, message in cases:
        assert cli_main(["train", *argv]) == 2
        assert re.search(message, _one_error_line(capsys)), argv


def test_training_script_user_errors_are_one_line_exit_2(capsys, assets, tmp_path):
    """What `python -m trl_nca.scripts.train` (and every launched process) reports: flags, config checks, data."""
    base = [str(TINY / "nca_reward.yaml"), "--model_name_or_path", assets["model"], "--output_dir", str(tmp_path)]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    preference = Dataset.from_list([{"prompt": "a", "chosen": " b", "rejected": " c"}] * 2)
    preference.to_json(str(tmp_path / "pairs.jsonl"))
    cases = [
        (["--dataset_name", assets["data"], "--max_step", "2"], r"unknown flag `--max_step` \(did you mean `--max_steps`"),
        (["--dataset_name", assets["data"], "--alpha", "-1"], r"`alpha` \(reward temperature\) must be a finite number >= 0"),
        (["--dataset_name", str(empty)], r"the data file .*empty.jsonl is empty \(no rows\)"),
        (["--dataset_name", str(tmp_path / "nope.jsonl")], r"no data file matches .*nope.jsonl"),
        (["--dataset_name", assets["data"], "--dataset_format", "preference"],
         r"dataset_format: preference expects the columns \['chosen', 'rejected'\], but the train split has .*"
         r"the columns look like dataset_format: reward"),
        (["--dataset_name", str(tmp_path / "pairs.jsonl"), "--dataset_format", "reward"],
         r"dataset_format: reward expects .* the columns look like dataset_format: preference"),
        (["--dataset_name", assets["data"], "--model_name_or_path", str(tmp_path / "no_model")],
         r"model_name_or_path: the folder .*no_model does not exist"),
        (["--dataset_name", assets["data"], "--dataset_train_split", "trian"],
         r"dataset_train_split: .* has no split 'trian' \(did you mean `train`\?\); it has \['test', 'train'\]"),
        (["--dataset_name", assets["data"], "--resume_from_checkpoint", str(tmp_path / "checkpoint-9")],
         r"Cannot resume from .*checkpoint-9: .*is not a folder"),
    ]  # fmt: skip
    for flags, message in cases:
        assert script_run([*base, *flags]) == 2, flags
        assert re.search(message, _one_error_line(capsys)), flags


def test_a_generate_output_folder_as_dataset_name_is_one_line(capsys, assets, tmp_path):
    """`--dataset_name OUTPUT` (the `trl-nca generate` output root, written here by generate's own writers) instead of
    `OUTPUT/dataset`: one line naming the folder to train on, not a traceback from reading its JSON files."""
    from recipe_data import make_dataset

    from trl_nca.config import RewardDataConfig
    from trl_nca.reward_data import check_resumable, write_outputs

    out = tmp_path / "reward-data"
    config = RewardDataConfig(output_dir=str(out), model_name_or_path=["policy"], reward_funcs=["rm"])
    check_resumable(config, out, {"prompts_sha256": "0", "samples_format": 2})
    rows = make_dataset("reward", n_train=4, n_test=1)["train"]
    counts = dict.fromkeys(("sampled", "empty", "duplicates", "unscored", "truncated"), 0)
    stats = {
        "prompts": 4,
        "prompts_kept": 4,
        "prompts_too_few": 0,
        **{f"completions_{k}": v for k, v in counts.items()},
    }
    write_outputs(rows, stats, config, ["policy"], [("rm", "rm", 1.0)], out)
    (out / "chunks" / "samples-0").mkdir(parents=True)
    (out / "chunks" / "samples-0" / "chunk-000000.json").write_text("[]")
    base = [str(TINY / "nca_reward.yaml"), "--model_name_or_path", assets["model"], "--output_dir", str(tmp_path)]
    assert script_run([*base, "--dataset_name", str(out)]) == 2
    assert _one_error_line(capsys) == (
        f"trl-nca train: error: dataset_name: {out} is a `trl-nca generate` output folder; train on {out}/dataset"
    )
    shutil.rmtree(out / "dataset")  # a run that did not finish, or kept no prompt
    assert script_run([*base, "--dataset_name", str(out)]) == 2
    assert f"{out} is a `trl-nca generate` output folder without {out}/dataset" in _one_error_line(capsys)


def test_a_corrupt_checkpoint_stops_the_script_before_any_model_load(
    capsys, assets, checkpoints, tmp_path, monkeypatch
):
    from trl_nca.scripts import train as script

    out = _copy(checkpoints, tmp_path / "run")
    (out / "checkpoint-3" / "trainer_state.json").write_text("{")

    def no_model(name):
        raise AssertionError("the model was loaded before the checkpoint was checked")

    monkeypatch.setattr(script, "get_trainer_class", no_model)
    argv = [str(TINY / "nca_reward.yaml"), "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
            "--output_dir", str(out), "--resume_from_checkpoint", "last"]  # fmt: skip
    assert script_run(argv) == 2
    assert re.search(
        r"Cannot resume from .*checkpoint-3: trainer_state.json is not valid JSON; the newest intact checkpoint is "
        r".*checkpoint-2: resume with --resume_from_checkpoint .*checkpoint-2",
        _one_error_line(capsys),
    )


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    """A run with a checkpoint after each of its 3 steps."""
    from trl_nca.tiny import build_tiny_model

    out = tmp_path_factory.mktemp("ckpt")
    trainer = NCATrainer(
        build_tiny_model(tokenizer, "mistral"),
        ref_model=build_tiny_model(tokenizer, "mistral", seed=1),
        args=cpu_args(NCAConfig, out, max_steps=3, save_strategy="steps", save_steps=1),
        train_dataset=Dataset.from_list(reward_rows(n=6)),
        processing_class=tokenizer,
    )
    trainer.train()
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "damage", ["truncated-weights", "bad-trainer-state", "missing-trainer-state", "truncated-optimizer"]
)
def test_corrupt_checkpoint_names_it_and_the_newest_intact_one(checkpoints, tmp_path, damage):
    out = _copy(checkpoints, tmp_path / "run")
    newest = out / "checkpoint-3"
    if damage == "truncated-weights":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "bad-trainer-state":
        (newest / "trainer_state.json").write_text('{"global_step": 3, "log_hist')
    elif damage == "missing-trainer-state":
        (newest / "trainer_state.json").unlink()
    else:
        optimizer = newest / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])
    assert newest_intact_checkpoint(out) == out / "checkpoint-2"
    for requested in (True, "last", str(newest)):
        with pytest.raises(
            CheckpointError, match=r"Cannot resume from .*checkpoint-3: .*newest intact checkpoint is .*checkpoint-2"
        ):
            resolve_resume_checkpoint(out, requested)
    assert resolve_resume_checkpoint(out, str(out / "checkpoint-2")) == str(out / "checkpoint-2")


def test_resume_from_corrupt_checkpoint_fails_before_training(checkpoints, tmp_path, tokenizer, make_model, capsys):
    out = _copy(checkpoints, tmp_path / "run")
    (out / "checkpoint-3" / "model.safetensors").write_bytes(b"\x00" * 10)
    trainer = NCATrainer(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(NCAConfig, out, max_steps=4, save_strategy="steps", save_steps=1),
        train_dataset=Dataset.from_list(reward_rows(n=6)),
        processing_class=tokenizer,
    )
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint-3: model.safetensors has a corrupt header; the newest intact checkpoint is .*checkpoint-2",
    ):
        trainer.train(resume_from_checkpoint=True)
    # The newest intact checkpoint resumes (one more step from step 2 up to max_steps=4: steps 3 and 4).
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert trainer.state.global_step == 4


# ---------------------------------------------------------------------------------------------- a quiet terminal
@pytest.mark.parametrize("quantized", [False, True])
def test_bitsandbytes_import_warning_is_kept_out_of_unquantized_runs(quantized, caplog):
    from trl import ModelConfig

    from trl_nca.cli import hold_optional_kernel_logs
    from trl_nca.scripts.train import _quiet_optional_imports

    bnb_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    hold_optional_kernel_logs()
    bnb_logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community")  # what its import logs
    assert "gemm_4bit" not in caplog.text  # held while the arguments are unknown
    _quiet_optional_imports(ModelConfig(load_in_4bit=quantized))
    assert ("gemm_4bit" in caplog.text) is quantized
    bnb_logger.warning("a later gemm_4bit warning")  # released: nothing is held back any more
    assert "later gemm_4bit" in caplog.text


def test_cli_hides_library_deprecations_but_not_the_users_own(monkeypatch):
    import warnings

    from trl_nca.cli import quiet_warnings

    def shown(warnoptions: list[str]) -> list[str]:
        monkeypatch.setattr(sys, "warnoptions", warnoptions)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            quiet_warnings()
            for module in ("transformers.training_args", "trl.models.utils", "torch.jit._script", "my_callbacks"):
                for category in (FutureWarning, DeprecationWarning):
                    warnings.warn_explicit(module, category, "file.py", 1, module=module)
        return sorted({str(warning.message) for warning in caught})

    assert shown([]) == ["my_callbacks"]  # a `--callbacks` module of the user's
    assert len(shown(["default"])) == 4  # -W / PYTHONWARNINGS: the user asked to see them


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])))  # fmt: skip
    env.pop("TQDM_DISABLE", None)
    env.update(extra)
    return env


def _trl_nca() -> list[str]:
    script = Path(sys.executable).with_name("trl-nca")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "trl_nca.cli"]


@pytest.mark.slow
def test_a_training_run_prints_no_warning_spam_and_labelled_bars(assets, tmp_path):
    result = subprocess.run(
        [*_trl_nca(), "train", str(TINY / "nca_reward.yaml"), "--model_name_or_path", assets["model"],
         "--dataset_name", assets["data"], "--output_dir", str(tmp_path / "out"), "--max_steps", "2"],
        env=_env(), capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for noise in ("FutureWarning", "DeprecationWarning", "gemm_4bit", "were not passed to `accelerate launch`"):
        assert noise not in output
    assert "NCA training:" in output  # the training bar says what it is


# ---------------------------------------------------------------------------------------------- signals
def _start(assets, out: Path, recipe: str = "nca_reward.yaml") -> subprocess.Popen:
    """`trl-nca train` of a slow tiny run (checkpoint every 2 steps), returned once its first checkpoint exists."""
    extra = ["--main_process_port", str(_free_port())] if "ddp" in recipe else []
    command = [*_trl_nca(), "train", str(TINY / recipe), "--model_name_or_path", assets["model"],
               "--dataset_name", assets["data"], "--output_dir", str(out), "--max_steps", "400",
               "--save_strategy", "steps", "--save_steps", "2", "--callbacks", "distributed_probes:SlowSteps", *extra]  # fmt: skip
    env = _env(TQDM_DISABLE="1", PYTHONFAULTHANDLER="1")  # SIGABRT then dumps every thread's stack
    # A terminal's foreground job takes Ctrl-C; a suite started in the background of a script (`pytest ... &`)
    # inherits SIGINT ignored, and so would the run: give it the default action back, as a terminal would.
    process = subprocess.Popen(command, env=env, cwd=REPO, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (out / "checkpoint-2" / "trainer_state.json").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach its first checkpoint"
        time.sleep(0.2)
    return process


def _training_pids(out: Path) -> list[int]:
    """Live processes whose command line names this run's output folder (the launcher and its trainers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = next(line for line in (proc / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if str(out) in cmdline and "zombie" not in state:
            pids.append(int(proc.name))
    return pids


def _assert_all_gone(out: Path, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while _training_pids(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _training_pids(out), f"training processes survived the launcher: {_training_pids(out)}"


def _kill_tree(out: Path) -> None:
    for pid in _training_pids(out):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["nca_reward.yaml", "nca_reward_ddp_cpu.yaml"], ids=["1-process", "2-process-ddp"])
def test_sigkill_of_the_launcher_stops_training(assets, tmp_path, recipe):
    out = tmp_path / "out"
    process = _start(assets, out, recipe)
    try:
        assert len(_training_pids(out)) == (1 if "ddp" not in recipe else 3)  # no launcher left in a 1-process run
        process.kill()  # SIGKILL: the launcher cannot clean up
        process.wait(timeout=30)
        _assert_all_gone(out)
        steps = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
        time.sleep(2)
        assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == steps  # nobody writes any more
    finally:
        _kill_tree(out)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["nca_reward.yaml", "nca_reward_ddp_cpu.yaml"], ids=["1-process", "2-process-ddp"])
def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_and_resume_command(assets, tmp_path, recipe):
    out = tmp_path / "out"
    process = _start(assets, out, recipe)
    try:
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        try:
            _, err = process.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # show where it hangs: faulthandler (on in `_start`) dumps every thread
            os.killpg(process.pid, signal.SIGABRT)
            pytest.fail(f"no exit 120 s after Ctrl-C; stacks:\n{process.communicate(timeout=60)[1][-6000:]}")
        assert process.returncode == 130
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if "trl-nca train:" in line]
        assert len(lines) == 1, err[-3000:]
        checkpoint = newest_intact_checkpoint(out)
        assert f"interrupted; last checkpoint: {checkpoint}; resume with: trl-nca train " in lines[0]
        assert lines[0].endswith("--resume_from_checkpoint last")
        _assert_all_gone(out)
    finally:
        _kill_tree(out)


@pytest.mark.slow
def test_a_killed_training_process_fails_the_launcher_with_a_message(assets, tmp_path):
    out = tmp_path / "out"
    process = _start(assets, out, "nca_reward_ddp_cpu.yaml")
    try:
        workers = [pid for pid in _training_pids(out) if pid != process.pid]
        assert len(workers) == 2
        os.kill(max(workers), signal.SIGKILL)
        _, err = process.communicate(timeout=120)
        assert process.returncode not in (0, None)
        assert re.search(
            rf"trl-nca train: training process rank \d \(pid {max(workers)}\) was killed by SIGKILL; the run stopped; "
            r"last checkpoint: .*checkpoint-\d+; resume with: trl-nca train",
            err,
        ), err[-3000:]
        _assert_all_gone(out)
    finally:
        _kill_tree(out)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_checkpoint_state_file_is_what_resume_reads(checkpoints):
    """The checkpoints this module damages are real Trainer checkpoints (guards the fixture)."""
    state = json.loads((checkpoints / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and (checkpoints / "checkpoint-3" / "model.safetensors").is_file()


def test_trainers_and_demo_label_their_progress_bars(tmp_path, tokenizer, make_model, monkeypatch):
    """Every bar says what it is: the trainer's own (API users too), and its evaluation bar."""
    from types import SimpleNamespace

    from transformers import ProgressCallback, TrainerState

    from trl_nca import InfoNCAConfig, InfoNCATrainer, callbacks

    trainer = InfoNCATrainer(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(InfoNCAConfig, tmp_path, disable_tqdm=False),
        train_dataset=Dataset.from_list(reward_rows(n=2)),
        processing_class=tokenizer,
    )
    bars = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ProgressCallback)]
    assert len(bars) == 1 and isinstance(bars[0], callbacks.LabelledProgressCallback)
    made = []
    monkeypatch.setattr(
        callbacks, "tqdm", lambda **kwargs: made.append(kwargs) or SimpleNamespace(update=lambda n: None)
    )
    bars[0].on_train_begin(trainer.args, TrainerState(max_steps=3), None)
    bars[0].on_prediction_step(trainer.args, TrainerState(), None, eval_dataloader=[1, 2])
    assert [bar["desc"] for bar in made] == ["InfoNCA training", "Evaluating"] and made[0]["total"] == 3
