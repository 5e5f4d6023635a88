"""A new user's mistakes with where models and data come from, and with `--callbacks`: each is one line naming the key
(and the file, the byte, the closest name), exit status 2, within seconds — never a traceback or minutes of Hub
retries (issue #18, items 5 and 6).

The commands run in this process: `trl_nca.scripts.train.run` (what every `trl-nca train` process runs) and
`trl_nca.scripts.generate.main`. The tests run offline (`HF_HUB_OFFLINE=1`, tests/conftest.py); the "online without a
network" case makes the Hub's host name fail to resolve.
"""

from __future__ import annotations

import codecs
import json
import random
import re
import shutil
import socket
import time
from pathlib import Path

import pytest
import yaml
from recipe_data import save_dataset, save_model

from trl_nca.scripts.generate import main as generate_main
from trl_nca.scripts.train import run as train_run

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny" / "nca_reward.yaml")
ABSENT_HUB_ID = "trl-nca-tests/no-such-repo-3f9c"  # never in a test machine's cache, never on the Hub


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from trl_nca.tiny import save_tiny_assets

    root = tmp_path_factory.mktemp("user-errors")
    return {
        "model": save_model(root / "model", "mistral", num_hidden_layers=1),
        "data": save_dataset(root / "data", "reward"),
        **save_tiny_assets(str(root / "tiny")),
    }


def _one_error_line(capsys, command: str = "train") -> str:
    """The only line of stderr, which must be `trl-nca COMMAND: error: ...` (no traceback)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if command == "generate":  # the stages imported so far may have logged (kernels of optional packages); not errors
        lines = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert "Traceback" not in err and len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"trl-nca {command}: error: "), lines[0]
    return lines[0]


def _train(assets, tmp_path, *flags: str) -> tuple[int, float]:
    argv = [RECIPE, "--model_name_or_path", assets["model"], "--dataset_name", assets["data"],
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", *flags]  # fmt: skip
    start = time.monotonic()
    status = train_run(argv)
    return status, time.monotonic() - start


# ---------------------------------------------------------------------------------------------------------------------
# Paths that do not exist, Hub ids that cannot load
# ---------------------------------------------------------------------------------------------------------------------


def test_a_policy_path_typo_is_one_line(capsys, assets, tmp_path, monkeypatch):
    """`models/tiny/modle` cannot be a Hub id (two `/`): transformers said `Repo id must be in the form ...` in 34
    lines. A single name (`modle`) could be a Hub id: offline it must be cached, and the line names the folder's
    closest entry."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "model").symlink_to(assets["model"])
    (tmp_path / "model").symlink_to(assets["model"])
    assert _train(assets, tmp_path, "--model_name_or_path", "models/tiny/modle")[0] == 2
    assert re.fullmatch(
        r"trl-nca train: error: model_name_or_path: the folder models/tiny/modle does not exist \(did you mean "
        r"`models/tiny/model`\?\); give a local folder, or a Hub id such as `mistralai/Mistral-7B-v0.1`\.",
        _one_error_line(capsys),
    )
    assert _train(assets, tmp_path, "--model_name_or_path", "modle")[0] == 2
    assert _one_error_line(capsys) == (
        "trl-nca train: error: model_name_or_path: modle is neither a local folder (did you mean `model`?) nor a Hub "
        "id in the local cache; with HF_HUB_OFFLINE=1 only local paths and cached Hub ids load."
    )
    assert _train(assets, tmp_path, "--model_name_or_path", str(Path(assets["model"]) / "config.json"))[0] == 2
    assert "is a file; give the model's folder (the one holding config.json)" in _one_error_line(capsys)


def test_a_missing_local_dataset_folder_is_one_line_at_once(capsys, assets, tmp_path, monkeypatch):
    """`data/trian` next to `data/train`: datasets took it for a Hub id (a traceback, after ~30 s of retries online)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    shutil.copytree(assets["data"], tmp_path / "data" / "train")
    assert _train(assets, tmp_path, "--dataset_name", "data/trian")[0] == 2
    assert _one_error_line(capsys) == (
        "trl-nca train: error: dataset_name: data/trian is neither a local folder or data file (did you mean "
        "`data/train`?) nor a Hub id in the local cache; with HF_HUB_OFFLINE=1 only local paths and cached Hub ids "
        "load."
    )
    assert _train(assets, tmp_path, "--dataset_name", "./data/trian")[0] == 2  # written as a path: it must exist
    assert "dataset_name: the folder ./data/trian does not exist (did you mean `./data/train`?)" in _one_error_line(
        capsys
    )


@pytest.mark.parametrize("key", ["model_name_or_path", "ref_model_name_or_path", "dataset_name"])
def test_a_hub_id_that_is_not_cached_is_one_line_offline(capsys, assets, tmp_path, key):
    status, _ = _train(assets, tmp_path, f"--{key}", ABSENT_HUB_ID)
    assert status == 2
    what = "folder or data file" if key == "dataset_name" else "folder"
    assert _one_error_line(capsys) == (
        f"trl-nca train: error: {key}: {ABSENT_HUB_ID} is neither a local {what} nor a Hub id in the local cache; "
        "with HF_HUB_OFFLINE=1 only local paths and cached Hub ids load."
    )


@pytest.fixture
def online_without_network(monkeypatch):
    """Offline mode off, no proxy, and the Hub's host name does not resolve (as on a machine without a network)."""
    import datasets.config
    from huggingface_hub import constants

    from trl_nca import sources

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", *sources._PROXY_VARIABLES):
        monkeypatch.delenv(variable, raising=False)

    def no_dns(host, *args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    sources._resolves.cache_clear()
    yield
    sources._resolves.cache_clear()


@pytest.mark.parametrize("key", ["model_name_or_path", "dataset_name"])
def test_a_hub_id_without_a_network_is_one_line_at_once(capsys, assets, tmp_path, online_without_network, key):
    """Online mode but no network: the Hub download retried for ~150 s (a model) or ~30 s (a dataset) and ended in a
    54-line traceback; the Hub's host name not resolving is enough to know."""
    status, elapsed = _train(assets, tmp_path, f"--{key}", ABSENT_HUB_ID)
    assert status == 2
    what = "folder or data file" if key == "dataset_name" else "folder"
    assert _one_error_line(capsys) == (
        f"trl-nca train: error: {key}: {ABSENT_HUB_ID} is not a local {what}, and the Hub cannot be reached to look "
        "it up (its host name does not resolve: no network?) nor is it in the local cache; with HF_HUB_OFFLINE=1 only "
        "local paths and cached Hub ids load."
    )
    if key == "model_name_or_path":
        assert elapsed < 10, elapsed


def test_a_local_path_that_exists_is_not_looked_up_on_the_hub(assets, online_without_network):
    from trl_nca.sources import check_local_path

    check_local_path(assets["model"], "model_name_or_path")
    check_local_path(assets["data"], "dataset_name", kind="dataset")
    check_local_path(assets["prompts"], "dataset_name", kind="dataset")


def test_a_cached_hub_id_passes_offline(tmp_path, monkeypatch):
    """The cache layouts the loaders read offline (huggingface_hub's repo folder for a model, the folder datasets'
    `CachedDatasetModuleFactory` looks in for a dataset), built with the libraries' own naming functions."""
    import datasets.config
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from trl_nca.sources import check_local_path

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    model, dataset = "SomeOrg/Tiny-Model", "SomeOrg/UltraFeedbackPrompts"
    (tmp_path / "hub" / repo_folder_name(repo_id=model, repo_type="model") / "snapshots" / "0123").mkdir(parents=True)
    namespace, name = dataset.split("/")
    (tmp_path / "datasets" / f"{namespace}___{camelcase_to_snakecase(name)}" / "default" / "0.0.0" / "ab").mkdir(
        parents=True
    )
    check_local_path(model, "model_name_or_path")
    check_local_path(dataset, "dataset_name", kind="dataset")
    with pytest.raises(ValueError, match="nor a Hub id in the local cache"):
        check_local_path("SomeOrg/Other-Model", "model_name_or_path")
    with pytest.raises(ValueError, match="nor a Hub id in the local cache"):
        check_local_path(model, "dataset_name", kind="dataset")  # a model's cache is not a dataset's


def test_hub_failures_while_loading_are_one_line_naming_the_key_and_the_cause():
    """What `hub_lookup` makes of the errors a Hub look-up ends in (when `check_local_path` could not tell before)."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    from trl_nca.cli_common import UsageError
    from trl_nca.sources import hub_lookup

    def raised(error: BaseException, key: str, kind: str) -> str:
        with pytest.raises(UsageError) as info, hub_lookup(key, "org/name", kind):
            try:
                raise error
            except BaseException as cause:  # wrapped as datasets and transformers wrap it
                raise OSError("a long message from the library") from cause
        return str(info.value)

    not_found = raised(DatasetNotFoundError("Dataset 'org/name' doesn't exist"), "dataset_name", "dataset")
    assert not_found == (
        "dataset_name: org/name is not a local folder or data file, and the Hub has no dataset org/name that you can "
        "access (a private one needs `hf auth login`)."
    )
    gated = raised(
        DatasetNotFoundError("Dataset 'org/name' is a gated dataset on the Hub."), "dataset_name", "dataset"
    )
    assert gated.startswith("dataset_name: org/name is a gated dataset on the Hub: ask for access on its page")
    assert "https://huggingface.co/datasets/org/name" in gated
    offline = raised(OfflineModeIsEnabled("offline"), "model_name_or_path", "model")
    assert offline.endswith("with HF_HUB_OFFLINE=1 only local paths and cached Hub ids load.")
    invalid = raised(HFValidationError("Repo id must be ..."), "model_name_or_path", "model")
    assert invalid == "model_name_or_path: org/name is not a local folder, nor a Hub id (`name` or `namespace/name`)."
    # Online (offline mode off in huggingface_hub's constants): a connection error is "could not be reached".
    from huggingface_hub import constants

    offline_mode, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        unreachable = raised(LocalEntryNotFoundError("connection error"), "model_name_or_path", "model")
    finally:
        constants.HF_HUB_OFFLINE = offline_mode
    assert unreachable == (
        "model_name_or_path: org/name is not found locally, and the Hub could not be reached (LocalEntryNotFoundError: "
        "connection error); with HF_HUB_OFFLINE=1 only local paths and cached Hub ids load."
    )
    with pytest.raises(KeyError), hub_lookup("dataset_name", "org/name", "dataset"):  # not a Hub failure: as it is
        raise KeyError("prompt")


def test_what_can_only_be_a_local_path():
    from trl_nca.sources import is_hub_id, must_be_local

    hub_ids = ["gpt2", "mistralai/Mistral-7B-v0.1", "HuggingFaceH4/ultrafeedback_binarized", "data/train"]
    paths = ["runs/tiny/policy", "./model", "../model", "~/model", "/abs/model", "rows.jsonl", "a/rows.parquet",
             "org/name.git", "a--b", ".hidden", "with space", "C:\\models\\x"]  # fmt: skip
    assert all(is_hub_id(name) and not must_be_local(name) for name in hub_ids)
    assert all(must_be_local(name) for name in paths)


def test_hub_reachability_is_not_guessed_behind_a_proxy(monkeypatch, online_without_network):
    from trl_nca.sources import hub_reachable

    assert hub_reachable() is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert hub_reachable() is None


# ---------------------------------------------------------------------------------------------------------------------
# output_dir, files that are not UTF-8
# ---------------------------------------------------------------------------------------------------------------------


def test_an_output_dir_that_is_a_file_is_one_line(capsys, assets, tmp_path):
    """It was a `FileExistsError` traceback (train and generate)."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x\n")
    assert _train(assets, tmp_path, "--output_dir", str(a_file))[0] == 2
    assert _one_error_line(capsys) == (
        f"trl-nca train: error: output_dir: {a_file} is a file, not a folder; give a folder (new or existing) for the "
        "outputs."
    )
    assert _train(assets, tmp_path, "--output_dir", str(a_file / "run"))[0] == 2
    assert _one_error_line(capsys) == (
        f"trl-nca train: error: output_dir: {a_file / 'run'} cannot be created: {a_file} is a file, not a folder."
    )


def _latin1_rows(path: Path, suffix: str) -> tuple[int, int]:
    """Rows of the reward format, the third one with a Latin-1 `é`; returns (byte offset, line) of that byte."""
    rows = [{"prompt": f"question {i}", "completions": ["a", "b"], "rewards": [1.0, 0.0]} for i in range(4)]
    rows[2]["prompt"] = "café"
    if suffix == ".csv":
        text = "prompt,answer\n" + "".join(f"{row['prompt']},x\n" for row in rows)
    else:
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    data = text.encode("latin-1")
    path.write_bytes(data)
    offset = data.index(b"\xe9")
    return offset, data[:offset].count(b"\n") + 1


@pytest.mark.parametrize("layout", ["file.jsonl", "file.csv", "folder"])
def test_a_data_file_that_is_not_utf8_names_the_file_and_byte(capsys, assets, tmp_path, layout):
    """It was a `UnicodeDecodeError` traceback: for JSON only when a row was first read (datasets stores the bytes)."""
    if layout == "folder":
        (tmp_path / "data").mkdir()
        bad = tmp_path / "data" / "train.jsonl"
        name = tmp_path / "data"
    else:
        bad = name = tmp_path / f"rows{Path(layout).suffix}"
    offset, line = _latin1_rows(bad, bad.suffix)
    if layout == "file.jsonl":  # datasets' own cache of the file (built by an older trl-nca, a notebook): still caught
        from datasets import load_dataset

        load_dataset("json", data_files={"train": str(bad)})
    assert _train(assets, tmp_path, "--dataset_name", str(name))[0] == 2
    assert _one_error_line(capsys) == (
        f"trl-nca train: error: dataset_name: {bad} is not UTF-8 text: the byte 0xe9 at offset {offset} (line {line}) "
        "cannot be decoded; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
    )


def test_the_first_bad_byte_is_found_across_chunk_boundaries(tmp_path):
    """Against Python's own decoder on the whole file, with chunks small enough to cut multi-byte characters."""
    from trl_nca.sources import first_non_utf8_byte

    rng = random.Random(0)
    pieces = ["a", "\n", "é", "€", "𝄞", "日本"]
    for trial in range(200):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        data = bytearray(text.encode())
        if trial % 4:  # most files get a bad byte: a stray continuation, a cut sequence, or Latin-1
            position = rng.randint(0, len(data))
            data[position:position] = rng.choice([b"\x80", b"\xe2\x82", b"\xe9", b"\xff"])
        path = tmp_path / "f.txt"
        path.write_bytes(bytes(data))
        try:
            codecs.decode(bytes(data), "utf-8")
            expected = None
        except UnicodeDecodeError as error:
            expected = (error.start, data[error.start], bytes(data[: error.start]).count(b"\n") + 1)
        for chunk_size in (1, 2, 3, 5, 1 << 20):
            assert first_non_utf8_byte(path, chunk_size) == expected, (bytes(data), chunk_size)


def test_a_file_found_utf8_is_read_once_per_version(tmp_path, monkeypatch):
    from trl_nca import sources

    good = tmp_path / "rows.jsonl"
    good.write_text('{"prompt": "café"}\n')
    sources.check_utf8([str(good)])

    def read_again(file, *args):
        raise AssertionError(f"{file} was read again")

    monkeypatch.setattr(sources, "first_non_utf8_byte", read_again)
    sources.check_utf8([str(good)])  # same path, size and time: remembered
    good.write_text('{"prompt": "cafés"}\n')
    with pytest.raises(AssertionError, match="was read again"):  # a new version is read
        sources.check_utf8([str(good)])


# ---------------------------------------------------------------------------------------------------------------------
# trl-nca generate
# ---------------------------------------------------------------------------------------------------------------------


def _generate(tmp_path, assets, **overrides) -> int:
    config = {
        "dataset_name": assets["prompts"],
        "model_name_or_path": [assets["policy"]],
        "reward_funcs": [assets["reward_model"]],
        "num_completions": 2,
        "max_new_tokens": 2,
        "dtype": "float32",
        "output_dir": str(tmp_path / "generated"),
        **overrides,
    }
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(config))
    return generate_main([str(path)])


def test_generate_sources_and_output_dir_are_one_line(capsys, assets, tmp_path):
    """The prompts, the sampling models, the reward models and the output folder, checked before anything loads: a
    sampling-model typo was an 84-line traceback, an output_dir that is a file a `FileExistsError`."""
    policy = Path(assets["policy"])
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x\n")
    latin1 = tmp_path / "prompts.jsonl"
    offset, line = _latin1_rows(latin1, ".jsonl")
    cases = [
        ({"model_name_or_path": [str(policy.parent / "polcy")]},
         f"model_name_or_path: the folder {policy.parent / 'polcy'} does not exist (did you mean `{policy}`?)"),
        ({"reward_funcs": [str(policy.parent / "reward_modle")]},
         f"reward_funcs: the folder {policy.parent / 'reward_modle'} does not exist (did you mean "
         f"`{policy.parent / 'reward_model'}`?)"),
        ({"reward_funcs": ["my_rewards.py"]}, "reward_funcs: my_rewards.py names a file but no function in it"),
        ({"dataset_name": str(policy.parent / "promts.jsonl")}, "dataset_name: no data file matches"),
        ({"model_name_or_path": [ABSENT_HUB_ID]},
         f"model_name_or_path: {ABSENT_HUB_ID} is neither a local folder nor a Hub id in the local cache; with "
         "HF_HUB_OFFLINE=1 only local paths and cached Hub ids load."),
        ({"output_dir": str(a_file)}, f"output_dir: {a_file} is a file, not a folder"),
        ({"dataset_name": str(latin1)},
         f"dataset_name: {latin1} is not UTF-8 text: the byte 0xe9 at offset {offset} (line {line})"),
    ]  # fmt: skip
    for overrides, message in cases:
        assert _generate(tmp_path, assets, **overrides) == 2, overrides
        assert message in _one_error_line(capsys, "generate"), overrides
    from trl_nca.cli_common import UsageError
    from trl_nca.generate_config import RewardDataConfig
    from trl_nca.reward_data import build_reward_dataset

    config = RewardDataConfig(output_dir=str(a_file), model_name_or_path=[assets["policy"]], reward_funcs=["f:g"])
    with pytest.raises(UsageError, match="is a file, not a folder"):  # the Python API too
        build_reward_dataset(config, prompts=None)


# ---------------------------------------------------------------------------------------------------------------------
# --callbacks
# ---------------------------------------------------------------------------------------------------------------------

CALLBACKS_MODULE = """
from transformers import TrainerCallback


class GoodCallback(TrainerCallback):
    pass


class NeedsArguments(TrainerCallback):
    def __init__(self, path, every=1):
        self.path = path


class Broken(TrainerCallback):
    def __init__(self):
        raise RuntimeError("cannot open the log")


class NotACallback:
    pass
"""


def test_callback_spec_errors_are_one_line(capsys, assets, tmp_path, monkeypatch):
    """Each was a traceback (`ValueError`, `ModuleNotFoundError`, `AttributeError`, `TypeError`), and only after the
    data and the reference model were loaded."""
    (tmp_path / "my_callbacks.py").write_text(CALLBACKS_MODULE)
    (tmp_path / "raises_on_import.py").write_text("x = 1\nraise ValueError('misconfigured')\n")
    (tmp_path / "imports_missing.py").write_text("import not_installed_pkg_3f9c\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        ("my_callbacks.GoodCallback", r"callbacks: 'my_callbacks.GoodCallback' must look like 'module.path:ClassName'"),
        ("no_such_module_3f9c:Cb", r"callbacks: 'no_such_module_3f9c:Cb': no module named 'no_such_module_3f9c' "
         r"\(run from the folder that holds it"),
        ("my_callbacks:GoodCalback", r"callbacks: 'my_callbacks:GoodCalback': my_callbacks has no GoodCalback "
         r"\(did you mean `GoodCallback`\?\)\.$"),
        ("my_callbacks:NeedsArguments", r"callbacks: 'my_callbacks:NeedsArguments': NeedsArguments\(\) cannot be "
         r"created without arguments \(missing a required argument: 'path'\); .*give its parameters defaults\.$"),
        ("my_callbacks:NotACallback", r"NotACallback is not a transformers.TrainerCallback subclass\.$"),
        ("my_callbacks:Broken", r"callbacks: 'my_callbacks:Broken': Broken\(\) failed: RuntimeError: cannot open the "
         r"log \(.*my_callbacks.py:16\)$"),
        ("raises_on_import:Cb", r"callbacks: 'raises_on_import:Cb': importing raises_on_import failed: ValueError: "
         r"misconfigured \(.*raises_on_import.py:2\)$"),
        ("imports_missing:Cb", r"callbacks: 'imports_missing:Cb': importing imports_missing failed: "
         r"ModuleNotFoundError: No module named 'not_installed_pkg_3f9c' \(.*imports_missing.py:1\)$"),
    ]  # fmt: skip
    for spec, message in cases:
        assert _train(assets, tmp_path, "--callbacks", spec)[0] == 2, spec
        assert re.search(message, _one_error_line(capsys)), spec


def test_a_good_callback_is_created_and_added(tmp_path, monkeypatch):
    from trl_nca.scripts.train import load_callbacks

    (tmp_path / "my_callbacks.py").write_text(CALLBACKS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    (callback,) = load_callbacks(["my_callbacks:GoodCallback"])
    assert type(callback).__name__ == "GoodCallback"


# ---------------------------------------------------------------------------------------------------------------------
# The README says how to run offline
# ---------------------------------------------------------------------------------------------------------------------


def test_the_quick_start_says_how_to_run_offline():
    readme = (REPO / "README.md").read_text()
    quick_start = readme[readme.index("## Quick start") : readme.index("\n## ", readme.index("## Quick start") + 1)]
    assert "HF_HUB_OFFLINE=1" in quick_start


def test_a_model_folder_without_a_config_is_one_line(tmp_path):
    from trl_nca.cli_common import UsageError
    from trl_nca.sources import check_local_path

    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"^model_name_or_path: the folder .*empty holds no model \(no config.json\)"):
        check_local_path(str(tmp_path / "empty"), "model_name_or_path")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    check_local_path(str(tmp_path / "adapter"), "model_name_or_path")  # a PEFT adapter folder is a model
