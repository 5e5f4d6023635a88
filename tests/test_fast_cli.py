"""The CLI reports mistakes before the heavy imports (issue #18, items 7, 8, 11 and the recipe-key half of 6).

The oracle for the fast check is the full parser: every command line below gets the same verdict and the same line
from the cached option table (`trl_nca.arguments.OptionTable`) as from `trl_nca.scripts.train.make_parser`, and a
subprocess proves that the fast path imported neither torch nor transformers' training arguments.
"""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trl_nca.cli
from trl_nca.arguments import OptionTable, ScriptParser, name_the_recipe_key
from trl_nca.cli import _accelerate_options, build_launch_arguments
from trl_nca.cli import main as cli_main
from trl_nca.cli_common import UsageError, normalize_argv, read_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny"


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(HF_HUB_OFFLINE="1", DS_ACCELERATOR="cpu", TRL_NCA_CACHE_DIR=str(cache))
    env.update(extra)
    return env


def _full_parser_verdict(argv: list[str]) -> str | None:
    """What the full training parser says about `argv` (`trl-nca train` arguments): None, or its error line."""
    from trl_nca.scripts.train import make_parser

    script_argv = normalize_argv(argv)
    recipe = read_recipe(script_argv)
    recipe.pop("env", None)
    parser = make_parser(recipe.get("trainer", "nca"))
    unknown = parser.set_defaults_with_config(**recipe)
    if unknown:
        return f"unknown key `{unknown[0].lstrip('-')}`"
    flags = script_argv[2:] if script_argv[:1] == ["--config"] else script_argv
    try:
        _, rest = parser.parse_known_args(flags)
        from trl_nca.arguments import split_launcher_flags

        split_launcher_flags(rest, parser.option_names(), _accelerate_options())
    except UsageError as error:
        return name_the_recipe_key(str(error), script_argv, recipe)
    return None


def _fast_verdict(table: OptionTable, argv: list[str]) -> str | None:
    script_argv = normalize_argv(argv)
    try:
        table.parse(script_argv, read_recipe(script_argv))
    except UsageError as error:
        return str(error)
    return None


@pytest.fixture(scope="module")
def nca_table():
    from trl_nca.scripts.train import make_parser

    return OptionTable.from_parser(make_parser("nca"), _accelerate_options())


def _recipe(tmp_path: Path, extra: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text((TINY / "nca_reward.yaml").read_text() + "\n" + extra)
    return str(path)


CASES = [
    ([], None),
    (["--max_steps", "3", "--learning_rate", "1e-5", "--bf16", "false", "--loss_type", "nca", "sft"], None),
    (["--gradient_checkpointing", "--num_machines", "2", "--machine_rank", "1", "--main_process_port", "1"], None),
    (["--no_remove_unused_columns", "--tie_break=first", "--report_to", "none"], None),
    (["--max_stpes", "3"], "unknown flag `--max_stpes` (did you mean `--max_steps`?)"),
    (["--max_steps", "four"], "argument --max_steps/--max-steps: invalid int value: 'four'"),
    (["--learning_rate", "fast"], "invalid float value: 'fast'"),
    (["--bf16", "maybe"], "Truthy value expected: got maybe"),
    (["--tie_break", "median"], "invalid choice: 'median'"),
    (["--num_machine", "2"], "unknown flag `--num_machine` (did you mean `--num_machines`?)"),
    (["stray"], "unknown argument `stray`"),
]


@pytest.mark.parametrize(("flags", "expected"), CASES)
def test_the_cached_table_gives_the_full_parsers_verdict_on_flags(nca_table, flags, expected):
    argv = [str(TINY / "nca_reward.yaml"), *flags]
    full, fast = _full_parser_verdict(argv), _fast_verdict(nca_table, argv)
    if expected is None:
        assert full is None and fast is None
    else:
        assert expected in full
        assert fast == full or fast.startswith(full)  # the same line (the fast one may add the `--help` hint)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ("max_steps: four\n", "key `max_steps`: invalid int value: 'four'"),
        ("gradient_checkpointing: perhaps\n", "key `gradient_checkpointing`: Truthy value expected"),
        ("max_stpes: 3\n", "unknown key `max_stpes`"),
    ],
)
def test_a_bad_recipe_value_names_the_recipe_key_not_a_flag(nca_table, tmp_path, extra, expected):
    argv = [_recipe(tmp_path, extra)]
    full, fast = _full_parser_verdict(argv), _fast_verdict(nca_table, argv)
    assert expected in full and expected in fast
    assert "--" not in fast.split("key")[0]  # no flag the user never typed
    if extra.startswith("max_steps"):  # a flag typed on the command line is still named as the flag
        typed = _fast_verdict(nca_table, [argv[0], "--max_steps", "five"])
        assert typed.startswith("argument --max_steps") and "five" in typed


def test_recipe_key_errors_through_the_cli_name_the_file_and_key(tmp_path, capsys):
    recipe = _recipe(tmp_path, "max_steps: four\n")
    for _ in range(2):  # the first run builds the full parser (and caches its table), the second uses the table
        assert cli_main(["train", recipe]) == 2
        assert capsys.readouterr().err.strip() == (
            f"trl-nca train: error: recipe {recipe}: key `max_steps`: invalid int value: 'four'"
        )


def test_generate_names_the_key_of_its_config(tmp_path, capsys):
    config = tmp_path / "generate.yaml"
    config.write_text((TINY / "generate.yaml").read_text() + "\nmax_new_tokens: many\n")
    assert cli_main(["generate", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"trl-nca generate: error: config {config}: key `max_new_tokens`: invalid int value: 'many'"


_PROBE = """
import sys, time
from trl_nca.cli import main
start = time.perf_counter()
status = main(sys.argv[1:])
print(status, round(time.perf_counter() - start, 3), "torch" in sys.modules,
      "transformers.training_args" in sys.modules, file=sys.stderr)
"""


def _probe(cache: Path, *argv: str) -> tuple[str, int, float, bool]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], env=_env(cache), capture_output=True, text=True, timeout=300
    )
    *lines, probe = result.stderr.strip().splitlines()
    status, seconds, torch_loaded, training_args_loaded = probe.split()
    return "\n".join(lines), int(status), float(seconds), torch_loaded == "True" or training_args_loaded == "True"


def test_a_flag_typo_is_reported_before_torch_is_imported_once_the_table_is_cached(tmp_path):
    cache = tmp_path / "cache"
    argv = ("train", str(TINY / "nca_reward.yaml"), "--max_stpes", "4")
    first = _probe(cache, *argv)
    assert first[1] == 2 and first[3], first  # no table yet: the full parser (torch) reports it
    assert len(list(cache.glob("options-train-nca-*.json"))) == 1
    second = _probe(cache, *argv)
    assert second[0] == first[0] and second[1] == 2  # the same one line
    assert not second[3], "the fast path imported torch or transformers' TrainingArguments"
    print(f"time to error for a flag typo: {first[2]:.2f} s without the table, {second[2]:.2f} s with it")
    # Another trainer has its own table (its config has other fields): not checked until it has been built once.
    assert not list(cache.glob("options-train-infonca-*.json"))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("generate", str(TINY / "generate.yaml"), "--max_new_token", "4"), "did you mean `--max_new_tokens`?"),
        (("iterate", str(TINY / "iterate.yaml"), "--round", "2"), "did you mean `--rounds`?"),
        (("trian", "recipe.yaml"), "unknown command `trian` (did you mean `train`?)"),
    ],
)
def test_generate_iterate_and_command_typos_import_nothing_heavy(tmp_path, argv, expected):
    message, status, seconds, heavy = _probe(tmp_path / "cache", *argv)
    assert status == 2 and not heavy
    assert len(message.splitlines()) == 1 and expected in message


def test_a_stale_or_unreadable_cache_is_never_trusted(tmp_path, monkeypatch, nca_table):
    monkeypatch.setenv("TRL_NCA_CACHE_DIR", str(tmp_path))
    nca_table.save("train-nca")
    path = OptionTable.cache_path("train-nca")
    assert path.is_file() and OptionTable.load("train-nca").options == nca_table.options
    # Another version of a package that defines options: another key, so the old table is not used.
    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9" if name == "trl" else real_version(name))
    assert OptionTable.cache_path("train-nca") != path and OptionTable.load("train-nca") is None
    monkeypatch.setattr(importlib.metadata, "version", real_version)
    path.write_text("{not json")
    assert OptionTable.load("train-nca") is None
    argv = [str(TINY / "nca_reward.yaml"), "--max_stpes", "1"]

    class FullParser(Exception):
        pass

    def full_parser(*args):
        raise FullParser

    monkeypatch.setattr(trl_nca.cli, "_parse_with_full_parser", full_parser)
    with pytest.raises(FullParser):  # nothing is decided from an unreadable table: the full parser runs
        build_launch_arguments(argv)
    path.write_text(json.dumps({"options": nca_table.options, "launcher_options": nca_table.launcher_options}))
    with pytest.raises(UsageError, match="max_stpes"):
        build_launch_arguments(argv)


def test_the_table_splits_a_launch_exactly_as_the_full_parser(tmp_path, monkeypatch, nca_table):
    argv = [str(TINY / "nca_reward.yaml"), "--max_steps", "3", "--num_machines", "2", "--accelerate_config", "zero3",
            "--main_process_port=29511", "--bf16", "false", "--num_processes", "16", "--machine_rank", "1"]  # fmt: skip
    monkeypatch.setenv("TRL_NCA_CACHE_DIR", str(tmp_path / "empty"))
    full = build_launch_arguments(argv)
    monkeypatch.setenv("TRL_NCA_CACHE_DIR", str(tmp_path / "warm"))
    nca_table.save("train-nca")
    monkeypatch.setattr(trl_nca.cli, "_parse_with_full_parser", None)  # the table alone must do it
    assert build_launch_arguments(argv) == full
    assert full[0][:2] == ["--config_file", str(REPO / "recipes" / "accelerate_configs" / "zero3.yaml")]
    assert "--num_machines" in full[0] and "--max_steps" in full[1] and full[2] is not None


def test_each_trainer_has_its_own_table_with_exactly_its_fields():
    from trl_nca.scripts.train import make_parser

    tables = {}
    for trainer in ("nca", "infonca", "listwise"):
        parser = make_parser(trainer)
        tables[trainer] = OptionTable.from_parser(parser, _accelerate_options())
        assert [o["dest"] for o in tables[trainer].options] == parser.field_names()
    only_listwise = {o["dest"] for o in tables["listwise"].options} - {o["dest"] for o in tables["nca"].options}
    assert only_listwise  # so a listwise key checked against NCA's table would be refused: one table per trainer


# ---------------------------------------------------------------------------------------------- Ctrl-C
def _interrupt_during_startup(argv: list[str], tmp_path: Path, wait_for: str | None = None, delay: float = 1.5):
    """Start ``trl-nca ARGV``, send SIGINT `delay` s after it starts (or after its command line shows `wait_for`, for
    the training process `trl-nca train` execs into), return (status, stderr lines)."""
    script = Path(sys.executable).with_name("trl-nca")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "trl_nca.cli"]
    process = subprocess.Popen(
        [*command, *argv], env=_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    if wait_for is not None:
        deadline = time.monotonic() + 120
        while wait_for not in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
    time.sleep(delay)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    return process.returncode, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def startup_configs(tmp_path_factory, tiny_model_dir):
    """Valid arguments for each verb (so that nothing fails before the interruption): model, data, output folders."""
    folder = tmp_path_factory.mktemp("startup")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(4)))
    rows = folder / "reward.jsonl"
    rows.write_text(json.dumps({"prompt": "q", "completions": ["a", "b"], "rewards": [1.0, 0.0]}) + "\n")
    iterate = folder / "iterate.yaml"
    iterate.write_text(
        f"model_name_or_path: {tiny_model_dir}\nrounds: 1\ngenerate:\n  dataset_name: {prompts}\n"
        f"  reward_funcs: [{tiny_model_dir}]\n  max_new_tokens: 4\ntrain:\n  recipe: tiny/nca_reward\n"
    )
    model = ["--model_name_or_path", tiny_model_dir]
    return {
        "train": ["train", str(TINY / "nca_reward.yaml"), *model, "--dataset_name", str(rows)],
        "generate": ["generate", str(TINY / "generate.yaml"), *model, "--dataset_name", str(prompts),
                     "--reward_funcs", tiny_model_dir],
        "iterate": ["iterate", str(iterate)],
    }  # fmt: skip


@pytest.mark.parametrize(
    ("verb", "wait_for", "expected"),
    [
        ("train", None, "trl-nca train: interrupted; no checkpoint in "),
        ("train", "trl_nca.scripts.train", "trl-nca train: interrupted; no checkpoint in "),
        ("generate", None, "trl-nca generate: interrupted; the finished chunks are kept"),
        ("iterate", None, "trl-nca iterate: interrupted; finished rounds"),
    ],
    ids=["train-launcher", "train-process", "generate", "iterate"],
)
def test_ctrl_c_during_start_up_prints_one_line(tmp_path, startup_configs, verb, wait_for, expected):
    out = str(tmp_path / "out")
    status, lines = _interrupt_during_startup(
        [*startup_configs[verb], "--output_dir", out], tmp_path, wait_for, delay=0.3 if wait_for else 1.5
    )
    assert status == 130, lines
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    if verb == "train":
        assert out in lines[0]  # where the checkpoints would be: read from the flags


# ---------------------------------------------------------------------------------------------- module graph
LIGHT_MODULES = ("trl_nca/cli_common.py", "trl_nca/arguments.py", "trl_nca/generate_config.py", "trl_nca/cli.py")


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_entry_points_stand_above_the_shared_module_with_no_circle():
    # Nothing below the entry points imports `trl_nca.cli`, at module level or inside a function.
    for path in (REPO / "trl_nca").rglob("*.py"):
        if path.name == "cli.py" or path.parts[-2:] == ("scripts", "iterate.py") or "demo" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "trl_nca.cli", f"{path} imports trl_nca.cli"
    # The shared modules import nothing heavy at module level.
    for module in LIGHT_MODULES:
        heavy = {
            name for name in _module_level_imports(REPO / module) if name.split(".")[0] in ("torch", "transformers")
        }
        assert not heavy, f"{module} imports {heavy}"
    code = "import sys, trl_nca.cli, trl_nca.arguments, trl_nca.generate_config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


def test_script_parser_is_importable_from_its_old_place():
    from trl_nca.scripts.train import ScriptParser as Again

    assert Again is ScriptParser


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (("  max_steps: 2", "  max_steps: four"), "train.max_steps: invalid int value: 'four'"),
        (("  max_new_tokens: 8", "  max_new_tokens: eight"), "generate.max_new_tokens: invalid int value: 'eight'"),
    ],
)
def test_iterate_names_the_key_in_its_own_config_not_the_stage_file_it_writes(
    tmp_path, monkeypatch, capsys, edit, expected
):
    (tmp_path / "policy").mkdir()
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "q"}) + "\n")
    (tmp_path / "reward_model").mkdir()
    config = tmp_path / "iterate.yaml"
    config.write_text((TINY / "iterate.yaml").read_text().replace(*edit))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["iterate", str(config)]) == 2
    assert capsys.readouterr().err.strip() == f"trl-nca iterate: error: {expected}"


EXIT_PROBE = """
import sys
import torch.distributed as dist
from trl_nca.cli_common import exit_process

dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
status = int(sys.argv[2])
try:
    exit_process(status)
except SystemExit as exit:
    print(exit.code, dist.is_initialized())
"""


@pytest.mark.parametrize(("status", "initialized"), [(0, False), (2, True)])
def test_a_successful_exit_leaves_the_process_group_first(tmp_path, status, initialized):
    """Destroyed after a success (a process that exits with gloo's threads alive can abort with SIGABRT); kept after
    a failure, where a peer may still be inside a collective."""
    store = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-c", EXIT_PROBE, str(store), str(status)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [str(status), str(initialized)]


def test_exit_process_imports_no_torch():
    code = "import sys\nfrom trl_nca.cli_common import exit_process\ntry:\n    exit_process(0)\nexcept SystemExit:\n"
    code += "    print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr
