"""The Python API's mistakes and noise: DeepSpeed's accelerator line, a reference model with another vocabulary, rows
holding both data formats, and a dataset whose rewards are all tied."""

import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from recipe_data import save_dataset, save_model

from trl_nca import ListwiseConfig, ListwiseTrainer, NCAConfig, NCATrainer, default_deepspeed_accelerator
from trl_nca.trainer import count_tied_rows

REPO = Path(__file__).resolve().parent.parent
DEEPSPEED_LINE = "Setting accelerator to CPU"
WORDS = ["one", "two", "three", "blue", "green", "dog", "cat", "sky", "sea", "big"]


def reward_rows(n: int = 8, k: int = 3, tied: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        completions = [" " + " ".join(WORDS[(i + j) % 10] for j in range(m + 1)) for m in range(k)]
        rewards = [0.5] * k if tied else [float((i + m) % k) for m in range(k)]
        rows.append({"prompt": f"what is {WORDS[i % 10]}?", "completions": completions, "rewards": rewards})
    return rows


def _env_without_ds_accelerator() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "PYTHONWARNINGS")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed's "Setting accelerator to CPU" line
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def probe(monkeypatch):
    """Run `default_deepspeed_accelerator` against a chosen machine: what torch has compiled in, how many CUDA devices
    it sees, and which packages are installed; returns the `DS_ACCELERATOR` it leaves."""
    real_find_spec = importlib.util.find_spec

    def run(compiled: str | None, cuda_devices: int = 0, installed=("deepspeed",), user_value: str | None = None):
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        if user_value is not None:
            monkeypatch.setenv("DS_ACCELERATOR", user_value)
        device = None if compiled is None else torch.device(compiled)
        monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda check_available=False: device)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
        watched = ("deepspeed", "torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu", "torch_supa")
        watched += ("torch_xmlir",)

        def find_spec(name, *args):
            if name in watched:
                return real_find_spec("json") if name in installed else None
            return real_find_spec(name, *args)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)
        default_deepspeed_accelerator()
        return os.environ.get("DS_ACCELERATOR")

    return run


def test_deepspeed_accelerator_is_set_only_where_deepspeed_would_pick_the_cpu(probe):
    assert probe(compiled=None) == "cpu"  # a CPU build of torch
    assert probe(compiled="cuda", cuda_devices=0) == "cpu"  # a CUDA build that sees no GPU
    assert probe(compiled="cuda", cuda_devices=2) is None  # DeepSpeed picks CUDA: its own detection decides
    assert probe(compiled="xpu") is None
    assert probe(compiled=None, installed=("deepspeed", "torch_npu")) is None  # DeepSpeed would probe the NPU
    assert probe(compiled=None, installed=()) is None  # no DeepSpeed: nothing to quiet
    assert probe(compiled=None, user_value="xpu") == "xpu"  # the user's value is never overridden
    assert probe(compiled="cuda", cuda_devices=0, user_value="cuda") == "cuda"


API_SCRIPT = """
import json, os, sys
from datasets import Dataset
from trl_nca import NCAConfig, NCATrainer
from trl_nca.tiny import build_tiny_model, build_tokenizer

tokenizer = build_tokenizer()
rows = [{"prompt": "hi", "completions": [" a", " b c"], "rewards": [1.0, 0.0]}] * 4
args = NCAConfig(sys.argv[1], use_cpu=True, report_to="none", save_strategy="no", max_steps=1, bf16=False)
NCATrainer(
    build_tiny_model(tokenizer),
    ref_model=build_tiny_model(tokenizer, seed=1),
    args=args,
    train_dataset=Dataset.from_list(rows),
    processing_class=tokenizer,
)
from deepspeed.accelerator import get_accelerator

print(json.dumps({"imported": "deepspeed" in sys.modules, "accelerator": get_accelerator().device_name()}))
"""


def test_an_api_script_prints_no_deepspeed_accelerator_line(tmp_path):
    """`from trl_nca import NCATrainer` and building a trainer (accelerate imports DeepSpeed there) on a CPU: DeepSpeed
    still runs on the CPU, without its "we were unable to detect" line."""
    pytest.importorskip("deepspeed")
    result = subprocess.run(
        [sys.executable, "-c", API_SCRIPT, str(tmp_path / "out")],
        env=_env_without_ds_accelerator(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["imported"]  # the trainer did import DeepSpeed, so its line would have been printed
    assert DEEPSPEED_LINE not in result.stdout + result.stderr
    if torch.accelerator.current_accelerator(check_available=True) is None:
        assert state["accelerator"] == "cpu"  # the accelerator DeepSpeed would have picked by itself


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["nca_reward.yaml", "nca_reward_zero3_cpu.yaml"])
def test_a_cpu_training_run_prints_no_deepspeed_accelerator_line(tmp_path, recipe):
    """`trl-nca train` on a CPU without `DS_ACCELERATOR` in the environment: one process, and a ZeRO-3 launch (whose
    launcher and two training processes each imported DeepSpeed)."""
    pytest.importorskip("deepspeed")
    model, data = save_model(tmp_path / "model", "mistral"), save_dataset(tmp_path / "data", "reward")
    script = Path(sys.executable).with_name("trl-nca")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "trl_nca.cli"]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    result = subprocess.run(
        [*command, "train", str(REPO / "recipes" / "tiny" / recipe), "--model_name_or_path", model,
         "--dataset_name", data, "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
         "--main_process_port", port],
        env=_env_without_ds_accelerator(), capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert DEEPSPEED_LINE not in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# A reference model with another vocabulary
# ---------------------------------------------------------------------------------------------------------------------


def test_a_reference_model_with_another_vocabulary_is_refused(tmp_path, tokenizer, make_model):
    """The CLI refuses such a `ref_model_name_or_path`; the API refuses such a `ref_model`, naming both sizes."""
    dataset = Dataset.from_list(reward_rows())
    policy_size = len(tokenizer)
    with pytest.raises(ValueError, match=rf"vocabulary of 500 tokens and the policy one of {policy_size}"):
        NCATrainer(
            make_model(),
            ref_model=make_model(vocab_size=500),
            args=cpu_args(NCAConfig, tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )


def test_the_vocabulary_check_reads_a_policy_given_by_name_and_resized_embeddings(
    tmp_path, tokenizer, make_model, tiny_model_dir
):
    dataset = Dataset.from_list(reward_rows())
    size = len(tokenizer)
    with pytest.raises(ValueError, match=rf"vocabulary of 500 tokens and the policy one of {size}"):
        NCATrainer(
            tiny_model_dir,
            ref_model=make_model(vocab_size=500),
            args=cpu_args(NCAConfig, tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    # A policy whose embeddings were resized (new tokens) against a reference that was not.
    policy = make_model()
    policy.resize_token_embeddings(size + 8)
    with pytest.raises(ValueError, match=rf"vocabulary of {size} tokens and the policy one of {size + 8}"):
        NCATrainer(
            policy,
            ref_model=make_model(),
            args=cpu_args(NCAConfig, tmp_path),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
    reference = make_model(seed=1)
    reference.resize_token_embeddings(size + 8)
    trainer = NCATrainer(
        policy,
        ref_model=reference,
        args=cpu_args(NCAConfig, tmp_path),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.ref_model is not None  # same sizes: accepted


# ---------------------------------------------------------------------------------------------------------------------
# Rows holding both formats
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True])
def test_rows_with_reward_and_preference_columns_are_refused(tmp_path, tokenizer, make_model, streamed):
    """Today's rule would train on `completions`/`rewards` and ignore `chosen`/`rejected`; the user must choose."""
    rows = [{**row, "chosen": " yes", "rejected": " no"} for row in reward_rows()]
    dataset = Dataset.from_list(rows)
    pattern = r"train dataset, row 0: .*reward columns \(`completions`/`rewards`\) and preference columns \(`chosen`/"
    with pytest.raises(ValueError, match=pattern):
        NCATrainer(
            make_model(),
            ref_model=make_model(),
            args=cpu_args(NCAConfig, tmp_path),
            train_dataset=dataset.to_iterable_dataset() if streamed else dataset,
            processing_class=tokenizer,
        )


# ---------------------------------------------------------------------------------------------------------------------
# All rewards tied
# ---------------------------------------------------------------------------------------------------------------------


def tie_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "have all their rewards tied" in r.getMessage()]


def test_count_tied_rows_over_arrow_chunks():
    import pyarrow as pa

    column = pa.chunked_array([pa.array([[1.0, 1.0], [3.0, 1.0, 3.0]]), pa.array([[0.0, 0.0], [5.0, 5.0, 5.0]])])
    assert count_tied_rows(column) == 3
    assert count_tied_rows(column.chunk(1).slice(1)) == 1  # a sliced chunk: offsets not starting at 0
    rows = reward_rows(n=50) + reward_rows(n=30, k=4, tied=True)
    assert count_tied_rows(Dataset.from_list(rows).with_format("arrow")["rewards"]) == 30


def test_a_dataset_of_tied_rewards_warns_once_and_trains_with_zero_gradient(tmp_path, tokenizer, make_model, caplog):
    with caplog.at_level(logging.WARNING):
        trainer = NCATrainer(
            make_model(),
            ref_model=make_model(),  # the policy's initial weights, as the default reference
            args=cpu_args(NCAConfig, tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1),
            train_dataset=Dataset.from_list(reward_rows(n=6, tied=True)),
            eval_dataset=Dataset.from_list(reward_rows(n=2, tied=True)),
            processing_class=tokenizer,
        )
    (message,) = tie_warnings(caplog)
    assert message.startswith("All 6 rows of the train dataset have all their rewards tied") and "nca loss" in message
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
    assert log["grad_norm"] == 0.0  # what the warning says


@pytest.mark.parametrize(
    "rows,overrides,warned",
    [
        (reward_rows(n=6, tied=True)[:5] + reward_rows(n=1), {}, False),  # one row with a preference is enough
        (reward_rows(n=6, tied=True), {"tie_break": "first"}, False),  # the first response gets a bonus
        (reward_rows(n=6, tied=True), {"loss_type": ["lipo_lambda", "sft"]}, True),
    ],
    ids=["one-untied-row", "tie-break-first", "listwise"],
)
def test_tied_rewards_warning_only_without_any_signal(
    tmp_path, tokenizer, make_model, caplog, rows, overrides, warned
):
    listwise = "loss_type" in overrides
    config_cls, trainer_cls = (ListwiseConfig, ListwiseTrainer) if listwise else (NCAConfig, NCATrainer)
    with caplog.at_level(logging.WARNING):
        trainer_cls(
            make_model(),
            ref_model=make_model(),
            args=cpu_args(config_cls, tmp_path, **overrides),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
    assert len(tie_warnings(caplog)) == int(warned)
    if warned:
        assert "the lipo_lambda loss" in tie_warnings(caplog)[0]


def test_a_streamed_dataset_of_tied_rewards_warns_on_its_first_step(tmp_path, tokenizer, make_model, caplog):
    stream = Dataset.from_list(reward_rows(n=6, tied=True)).to_iterable_dataset()
    with caplog.at_level(logging.WARNING):
        NCATrainer(
            make_model(),
            ref_model=make_model(),
            args=cpu_args(NCAConfig, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2),
            train_dataset=stream,
            processing_class=tokenizer,
        )
    (message,) = tie_warnings(caplog)
    assert message.startswith("The first 4 rows of the streamed train dataset (a stream is not read in full)")
