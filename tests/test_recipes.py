"""Every shipped recipe parses strictly, points at shipped launch configs, and trains for real on a CPU.

The training check runs each recipe single-process through `trl_nca.scripts.train` with only these changes: the model
becomes a tiny random model of the recipe's architecture (Mistral or Mixtral), the dataset a tiny local one in the
recipe's `dataset_format` and split names, training stops after 2 steps (each logged), the output goes to a temporary folder,
reporting is off, and bf16 becomes fp32 (no bf16 on this CPU). Everything else (QLoRA's 4-bit loading, LoRA targets,
gradient checkpointing, optimizer, accumulation, the router aux loss, ...) runs as written.
"""

from __future__ import annotations

import gc
import math
import os
import re
import subprocess
import sys
from enum import Enum
from pathlib import Path

import pytest
import yaml
from recipe_data import save_dataset, save_model

from trl_nca.cli import UsageError, resolve_accelerate_config, resolve_recipe
from trl_nca.scripts.train import main, make_parser, parse_args

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "recipes"
ACCELERATE_DIR = RECIPES_DIR / "accelerate_configs"
# Training recipes; `generate*.yaml` and `iterate*.yaml` are `trl-nca generate` / `trl-nca iterate` configs, tested in
# test_generate.py and test_iterate.py.
RECIPES = sorted(
    p
    for p in RECIPES_DIR.rglob("*.yaml")
    if ACCELERATE_DIR not in p.parents and not p.stem.startswith(("generate", "iterate"))
)
GPU_RECIPES = [p for p in RECIPES if p.parent.name != "tiny"]
ACCELERATE_CONFIGS = sorted(ACCELERATE_DIR.glob("*.yaml"))
GPU_ACCELERATE_CONFIGS = {"single_device", "ddp", "zero2", "zero3", "zero3_offload", "fsdp2", "multinode_zero3"}
CPU_ACCELERATE_CONFIGS = {"cpu_ddp", "cpu_zero3", "cpu_multinode_zero3"}
# The authors' global batch (8 GPUs x 1 x 4 accumulation steps); every GPU recipe keeps it whatever its layout.
GLOBAL_BATCH = 32
# `trainer:` key -> the config and trainer classes it selects (trl_nca.scripts.train.TRAINERS).
CONFIG_CLASSES = {"nca": "NCAConfig", "infonca": "InfoNCAConfig", "listwise": "ListwiseConfig"}
TRAINER_CLASSES = {"nca": "NCATrainer", "infonca": "InfoNCATrainer", "listwise": "ListwiseTrainer"}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _load(path: Path) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def _normalize(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_normalize(v) for v in value]
    return value


def _parse(path: Path, *overrides: str):
    recipe = _load(path)
    cpu = ["--bf16", "false"] if recipe.get("bf16") else []  # bf16 raises on a host without GPUs; the key still parses
    return recipe, make_parser(recipe.get("trainer", "nca")).parse_args_and_config(
        ["--config", str(path), *cpu, *overrides]
    )


def test_all_recipe_families_are_shipped():
    names = {_rel(p) for p in RECIPES}
    assert {"recipes/mistral-7b/nca_reward_full.yaml", "recipes/mistral-7b/infonca_reward_full.yaml"} <= names
    assert {"recipes/mistral-7b/nca_reward_qlora.yaml", "recipes/mistral-7b/nca_preference_qlora.yaml"} <= names
    assert {"recipes/mixtral-8x7b/nca_reward_lora.yaml", "recipes/mixtral-8x7b/nca_reward_qlora.yaml"} <= names
    assert {
        "recipes/tiny/listwise_reward.yaml",
        "recipes/mistral-7b/listwise_reward_full.yaml",
        "recipes/mistral-7b/listwise_reward_qlora.yaml",
    } <= names
    assert {p.stem for p in ACCELERATE_CONFIGS} == GPU_ACCELERATE_CONFIGS | CPU_ACCELERATE_CONFIGS


@pytest.mark.parametrize("path", RECIPES, ids=_rel)
def test_recipe_parses_with_no_unknown_keys(path):
    recipe = _load(path)
    parser = make_parser(recipe.get("trainer", "nca"))
    # Every key must be a field of the script args, the trainer config or ModelConfig ...
    assert parser.set_defaults_with_config(**recipe) == []
    # ... and land in it unchanged.
    namespace = vars(parser.parse_args([]))
    for key, value in recipe.items():
        got = _normalize(namespace[key])
        if isinstance(value, float):
            assert math.isclose(got, value), (key, got, value)
        else:
            assert got == value, (key, got, value)
    if "accelerate_config" in recipe:  # a bundled config of ours, not a fall-back to TRL's
        assert resolve_accelerate_config(recipe["accelerate_config"]).parent == ACCELERATE_DIR
    if recipe.get("ddp_backend"):
        return  # building that config joins a process group: only under a launcher (test_distributed.py)
    # The dataclasses accept the values (their __post_init__ checks run); unknown keys would raise here too.
    _, (script_args, training_args, model_args) = _parse(path)
    assert type(training_args).__name__ == CONFIG_CLASSES[recipe["trainer"]]
    assert script_args.dataset_format == recipe.get("dataset_format", "reward")
    assert model_args.model_name_or_path == recipe.get("model_name_or_path")


def test_cli_flags_override_recipe_values():
    path = RECIPES_DIR / "mistral-7b" / "nca_reward_qlora.yaml"
    _, (script_args, training_args, model_args) = _parse(path, "--beta", "0.2", "--lora_r", "8")
    assert training_args.beta == 0.2 and model_args.lora_r == 8
    assert training_args.alpha == 1e-4 and script_args.dataset_format == "authors_reward"


def test_unknown_recipe_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES_DIR / "tiny" / "nca_reward.yaml").read_text() + "\nbeta_typo: 0.1\n")
    with pytest.raises(ValueError, match="beta_typo"):
        parse_args([str(bad)])


def test_trainer_key_picks_the_config_class():
    _, (_, training_args, _) = _parse(RECIPES_DIR / "tiny" / "infonca_reward.yaml")
    assert type(training_args).__name__ == "InfoNCAConfig" and training_args.loss_type == ["infonca"]
    # The command line wins over the recipe's `trainer:`.
    script_args, args, _ = parse_args([str(RECIPES_DIR / "tiny" / "infonca_reward.yaml"), "--trainer", "nca"])
    assert type(args).__name__ == "NCAConfig" and script_args.trainer == "nca"


@pytest.mark.parametrize(
    "name", ["tiny/listwise_reward", "mistral-7b/listwise_reward_full", "mistral-7b/listwise_reward_qlora"]
)
def test_listwise_recipes(name):
    """The listwise recipes train Plackett-Luce with no reward temperature; the LiPO-λ option their comments show
    parses once LiPO-λ is the loss, and is refused while it is not (it would be silently ignored)."""
    path = resolve_recipe(name)
    recipe, (_, training_args, _) = _parse(path)
    assert type(training_args).__name__ == "ListwiseConfig" and training_args.loss_type == ["plackett_luce"]
    assert not hasattr(training_args, "alpha") and training_args.tie_break == "share"
    assert training_args.beta == recipe["beta"] == (0.1 if path.parent.name == "tiny" else 0.01)
    assert training_args.plackett_luce_top_m is None and training_args.lipo_label_normalization == "none"
    if path.parent.name == "tiny":
        return
    text = path.read_text()
    assert "# lipo_label_normalization: minmax" in text and "# plackett_luce_top_m: 1" in text
    _, (_, lipo_args, _) = _parse(path, "--loss_type", "lipo_lambda", "--lipo_label_normalization", "minmax")
    assert lipo_args.loss_type == ["lipo_lambda"] and lipo_args.lipo_label_normalization == "minmax"
    with pytest.raises(ValueError, match="lipo_label_normalization"):
        _parse(path, "--lipo_label_normalization", "minmax")
    # Everything but the loss is the NCA recipe's: data, batch, layout, schedule, model, adapters.
    nca = _load(path.with_name(path.name.replace("listwise", "nca")))
    loss_keys = {"trainer", "beta", "alpha", "tie_break", "loss_type", "output_dir", "hub_model_id"}
    assert {k: v for k, v in recipe.items() if k not in loss_keys} == {
        k: v for k, v in nca.items() if k not in loss_keys
    }


def test_bundled_recipe_names_resolve():
    assert resolve_recipe("mistral-7b/nca_reward_qlora") == RECIPES_DIR / "mistral-7b" / "nca_reward_qlora.yaml"
    assert resolve_accelerate_config("cpu_zero3") == ACCELERATE_DIR / "cpu_zero3.yaml"
    with pytest.raises(UsageError, match="no_such_config"):
        resolve_accelerate_config("no_such_config")


@pytest.mark.parametrize("path", GPU_RECIPES, ids=_rel)
def test_gpu_recipe_header_and_batch(path):
    recipe, text = _load(path), path.read_text()
    header = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    assert "Hardware assumed" in header and "Expected memory per GPU" in header
    assert re.search(r"total\s+~ \d+ GB", header), "the memory estimate must end with a total"
    assert f"trl-nca train {_rel(path)}" in header
    assert f"-m trl_nca.scripts.train {_rel(path)}" in header
    processes = recipe["num_processes"]
    assert f"--num_processes {processes}" in header
    assert f"recipes/accelerate_configs/{recipe['accelerate_config']}.yaml" in header
    global_batch = recipe["per_device_train_batch_size"] * recipe["gradient_accumulation_steps"] * processes
    assert global_batch == GLOBAL_BATCH
    assert recipe["bf16"] is True and recipe["dtype"] == "bfloat16"
    # Real model and data ids, not local paths.
    assert (
        re.fullmatch(r"[\w.-]+/[\w.-]+", recipe["model_name_or_path"])
        and not Path(recipe["model_name_or_path"]).exists()
    )
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", recipe["dataset_name"])


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=lambda p: p.stem)
def test_accelerate_config_loads(path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(path))  # ClusterConfig(**yaml): unknown keys raise
    assert isinstance(config, ClusterConfig)
    if path.stem in CPU_ACCELERATE_CONFIGS:
        assert config.num_processes == 2 and config.mixed_precision == "no"
    else:
        assert config.mixed_precision == "bf16"
        # num_processes is the total over the machines: 8 GPUs on each
        assert config.num_processes == (1 if path.stem == "single_device" else 8 * config.num_machines)
    assert config.num_machines == (2 if "multinode" in path.stem else 1)
    if config.num_machines > 1:  # torchrun on every machine (no pdsh/ssh); machine 0 hosts global rank 0
        assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
        assert config.rdzv_backend == "static" and config.main_process_port is not None
    if path.stem.startswith(("zero3", "cpu_zero3", "multinode_zero3", "cpu_multinode_zero3")):
        assert config.deepspeed_config["zero_stage"] == 3
        assert config.deepspeed_config["zero3_init_flag"] is True
        assert config.deepspeed_config["zero3_save_16bit_model"] is True


# ------------------------------------------------------------------------------------------------ 2 real steps
def _architecture(recipe: dict) -> str:
    return "mixtral" if "mixtral" in str(recipe.get("model_name_or_path", "")).lower() else "mistral"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe-models")
    # One decoder layer keeps the 11 runs quick; the architecture-specific modules (GQA attention, MoE experts and
    # router) are all in it.
    return {arch: save_model(root / arch, arch, num_hidden_layers=1) for arch in ("mistral", "mixtral")}


# `ddp_backend: gloo` needs a launcher's process group, so that recipe runs only 2-process (test_distributed.py).
SINGLE_PROCESS_RECIPES = [p for p in RECIPES if _load(p).get("ddp_backend") is None]


@pytest.mark.parametrize("path", SINGLE_PROCESS_RECIPES, ids=_rel)
def test_recipe_trains_two_steps(path, tiny_models, tmp_path):
    from peft import PeftModel

    recipe = _load(path)
    if recipe.get("load_in_4bit"):
        import bitsandbytes  # noqa: F401  (QLoRA recipes need the `quantization` extra, which CI installs)
    fmt = recipe.get("dataset_format", "reward")
    data = save_dataset(
        tmp_path / "data",
        fmt,
        train_split=recipe.get("dataset_train_split", "train"),
        test_split=recipe.get("dataset_test_split", "test"),
        n_test=2,
    )
    argv = [str(path), "--model_name_or_path", tiny_models[_architecture(recipe)], "--dataset_name", data]
    argv += ["--output_dir", str(tmp_path / "out"), "--max_steps", "2", "--logging_steps", "1", "--report_to", "none"]
    if recipe.get("bf16"):
        argv += ["--bf16", "false", "--dtype", "float32"]
    trainer = main(*parse_args(argv))

    assert type(trainer).__name__ == TRAINER_CLASSES[recipe["trainer"]]
    assert trainer.state.global_step == 2
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses and all(math.isfinite(loss) for loss in losses)
    for key in ("beta", "alpha", "learning_rate", "gradient_accumulation_steps", "max_length"):
        if key in recipe:
            assert getattr(trainer.args, key) == pytest.approx(recipe[key])
    # The converter ran: every row carries K responses (4 for reward layouts, 2 for pairs).
    k = 2 if "preference" in fmt else 4
    assert all(len(row) == k for row in trainer.train_dataset["completion_ids"])
    if recipe.get("use_peft"):
        assert isinstance(trainer.model, PeftModel)
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
        trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
        for target in recipe["lora_target_modules"]:
            assert any(f"{target}.lora_A" in name for name in trainable), target
        for target in recipe.get("lora_target_parameters") or []:
            assert any(target.split(".")[-2] in name and "lora_A" in name for name in trainable), target
    else:
        assert (tmp_path / "out" / "model.safetensors").is_file()
    # The run's curves are drawn at the end of training (the `plot` extra), as real PNG files.
    for name in ("logps.png", "rewards.png", "accuracies.png"):
        assert (tmp_path / "out" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    if recipe.get("load_in_4bit"):
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    if recipe.get("router_aux_loss_coef"):
        assert trainer.router_aux_loss_coef == recipe["router_aux_loss_coef"]
        assert trainer.data_collator.layout == "shared_prompt"  # the aux loss no longer forces the padded layout
        assert any("aux_loss" in entry for entry in trainer.state.log_history)
    del trainer
    gc.collect()


# ------------------------------------------------------------------------------------------------ the trl-nca CLI
def test_cli_usage_and_unknown_command(capsys):
    from trl_nca.cli import main as cli_main

    assert cli_main(["--help"]) == 0 and "train CONFIG.yaml" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2 and "unknown command" in capsys.readouterr().err
    assert cli_main([]) == 2


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("trl-nca")
    assert script.is_file(), "install the package (pip install -e .) so the `trl-nca` console script exists"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("trl-nca ")


def test_launcher_splits_accelerate_and_script_arguments(tmp_path, monkeypatch):
    from trl_nca.cli import build_launch_arguments

    monkeypatch.delenv("TRL_NCA_TEST_ENV", raising=False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        (RECIPES_DIR / "tiny" / "nca_reward_zero3_cpu.yaml").read_text() + "env:\n  TRL_NCA_TEST_ENV: 'on'\n"
    )
    launch_args, script_args, output_dir = build_launch_arguments(
        [str(recipe), "--beta", "0.3", "--main_process_port", "29999", "--num_processes", "1"]
    )
    assert Path(launch_args[launch_args.index("--config_file") + 1]) == ACCELERATE_DIR / "cpu_zero3.yaml"
    assert launch_args[launch_args.index("--num_processes") + 1] == "1"  # the flag beats the recipe's 2
    assert launch_args[-2:] == ["--main_process_port", "29999"]  # unknown to the script: goes to accelerate
    assert script_args == ["--config", str(recipe), "--beta", "0.3", "--num_processes", "1"]
    assert output_dir == "runs/tiny-nca-zero3"
    assert os.environ["TRL_NCA_TEST_ENV"] == "on"  # the recipe's env: block reaches the launcher and its children

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: nca\nlearning_rte: 1.0e-5\n")
    with pytest.raises(ValueError, match="learning_rte"):
        build_launch_arguments([str(bad)])


def test_demo_and_plot_dispatch_lazily(monkeypatch):
    import types

    from trl_nca import cli

    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    monkeypatch.setattr(cli.importlib, "import_module", lambda name: calls.append(name) or fake)
    assert cli.main(["demo", "--quick"]) == 0 and cli.main(["plot", "a.json"]) == 0
    assert calls == ["trl_nca.demo.run", ["--quick"], "trl_nca.plotting", ["a.json"]]


# ------------------------------------------------------------------------------------------------ data loading
@pytest.mark.parametrize("source", ["save_to_disk_dict", "save_to_disk_dataset", "jsonl_file", "json_folder"])
def test_dataset_sources(source, tmp_path):
    from recipe_data import make_dataset

    from trl_nca.scripts.train import NCAScriptArguments
    from trl_nca.sources import load_raw_datasets

    data = make_dataset("reward", n_train=6, n_test=2)
    if source == "save_to_disk_dict":
        name = str(tmp_path / "dd")
        data.save_to_disk(name)
    elif source == "save_to_disk_dataset":
        name = str(tmp_path / "ds")
        data["train"].save_to_disk(name)
    elif source == "jsonl_file":
        name = str(tmp_path / "rows.jsonl")
        data["train"].to_json(name)
    else:
        name = str(tmp_path / "folder")
        os.makedirs(name)
        for split in ("train", "test"):
            data[split].to_json(f"{name}/{split}.jsonl")
    loaded = load_raw_datasets(NCAScriptArguments(dataset_name=name, dataset_train_split="train"))
    assert len(loaded["train"]) == 6 and loaded["train"][0]["rewards"] == data["train"][0]["rewards"]
    if source in ("save_to_disk_dict", "json_folder"):
        assert len(loaded["test"]) == 2
    with pytest.raises(ValueError, match="no data file matches .*missing.jsonl"):
        load_raw_datasets(NCAScriptArguments(dataset_name=str(tmp_path / "missing.jsonl")))


def test_conversion_drops_rows_left_with_fewer_than_two_responses():
    from datasets import Dataset

    from trl_nca.scripts.train import convert_dataset_format

    good = {"model": "m", "response": "a fine answer.", "overall_score": 8.0}
    rows = [
        {"instruction": "q one?", "completions": [good, {**good, "response": "worse.", "overall_score": 3.0}]},
        {"instruction": "q two?", "completions": [good, {**good, "overall_score": None}]},  # one usable response
    ]
    converted = convert_dataset_format(Dataset.from_list(rows), "ultrafeedback")
    assert sorted(converted.column_names) == ["completions", "prompt", "rewards"]
    assert len(converted) == 1 and converted[0]["rewards"] == [8.0, 3.0]
    assert convert_dataset_format(rows, "reward") is rows  # the trainers read reward/preference rows as they are
    with pytest.raises(ValueError, match="dataset_format"):
        convert_dataset_format(rows, "csv")
