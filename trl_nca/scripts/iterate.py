"""``trl-nca iterate``: rounds of generate with the current policy -> score -> train (any trainer) -> next policy.

    trl-nca iterate CONFIG.yaml [--key value ...]

CONFIG.yaml holds the fields of `IterateConfig` (flags override them), read by `TrlParser` as in ``trl-nca train``.
Round ``i`` runs two stages, each as its own process so that its memory is freed before the next one starts:

1. ``python -m trl_nca.cli generate OUTPUT/round-i/generate.yaml``: K completions per prompt from the policy (the
   initial model in round 1, ``round-{i-1}/model`` after), scored, written to ``OUTPUT/round-i/data``;
2. ``python -m trl_nca.cli train OUTPUT/round-i/train.yaml``: that data trains the policy into ``OUTPUT/round-i/model``
   (through ``accelerate launch``, as ``trl-nca train``: the recipe's ``accelerate_config`` / ``num_processes`` hold).

``OUTPUT/round-i/round.json`` marks a finished round and records its numbers; ``OUTPUT/rounds.json`` lists them all.
Re-running the same command continues from the first unfinished round (see docs/iterate.md).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from trl_nca.arguments import ScriptParser
from trl_nca.cli_common import (
    ITERATE_INTERRUPTED,
    exit_on_interrupt,
    exit_process,
    normalize_argv,
    read_yaml_mapping,
    restore_interrupt,
)

if __name__ == "__main__":  # Ctrl-C while importing is one line too
    exit_on_interrupt(ITERATE_INTERRUPTED)

REFERENCES = ("previous", "initial")
#: Keys of the generate config that iterate sets in every round (``seed`` is the base of the per-round seeds).
GENERATE_KEYS_SET = ("model_name_or_path", "output_dir", "model_names")
#: Keys of the train recipe that iterate sets in every round.
TRAIN_KEYS_SET = (
    "model_name_or_path",
    "ref_model_name_or_path",
    "dataset_name",
    "dataset_format",
    "output_dir",
    "resume_from_checkpoint",
)
STATE_FILE = "iterate_config.json"
ROUND_FILE = "round.json"
SUMMARY_FILE = "rounds.json"


@dataclass
class IterateConfig:
    r"""
    Configuration of ``trl-nca iterate``: ``rounds`` rounds of sampling from the current policy, scoring, and training
    the next policy on the scored samples with ``trl-nca train``.

    Parameters:
        output_dir (`str`):
            Where the run writes: ``round-{i}/data`` (the ``trl-nca generate`` output of round i),
            ``round-{i}/model`` (the policy trained in round i, saved with ``save_model``, plus its checkpoints),
            ``round-{i}/generate.yaml`` and ``round-{i}/train.yaml`` (the exact configs of the two stages),
            ``round-{i}/round.json`` (the round's numbers; its presence marks the round finished), ``rounds.json``
            (all finished rounds) and ``iterate_config.json`` (the settings a re-run must match to resume).
        model_name_or_path (`str`):
            The initial policy: a Hub id or a local model folder. Round 1 samples from it and trains it.
        rounds (`int`, *optional*, defaults to `2`):
            Number of rounds. A finished run can be extended by re-running it with a larger ``rounds``.
        reference (`str`, *optional*, defaults to `"previous"`):
            The reference model μ of round i's training. ``"previous"``: the policy that round starts from (round
            i-1's model; the initial model in round 1), i.e. ``trl-nca train``'s default (a frozen copy of the
            policy's initial weights), as in iterative DPO / self-rewarding training. ``"initial"``: the initial model
            in every round (passed to ``trl-nca train`` as ``ref_model_name_or_path`` from round 2 on; it costs a
            second model in memory, or of the precompute pass with ``precompute_ref_log_probs``).
        generate (`dict` or `str`):
            The ``trl-nca generate`` settings (fields of `trl_nca.RewardDataConfig`): a path to a generate YAML, or a
            mapping of its fields, optionally with ``config: PATH`` naming a YAML whose values the mapping overrides.
            Iterate sets ``model_name_or_path`` (the round's policy, sampling alone), ``model_names`` (its label in
            the ``models`` column: the initial model's folder name, then ``round-{i-1}``) and ``output_dir``
            (``round-{i}/data``) in every round; a mapping must not set them. The seed of round i is ``seed + i - 1``
            (``seed`` defaults to 0), so each round draws new samples.
        train (`dict` or `str`):
            The ``trl-nca train`` settings: a recipe (a path or a bundled name such as ``tiny/nca_reward``), or a
            mapping of recipe keys, optionally with ``recipe: NAME`` naming the recipe whose values the mapping
            overrides. Iterate sets ``model_name_or_path`` (the round's policy), ``dataset_name``
            (``round-{i}/data/dataset``), ``dataset_format: reward``, ``output_dir`` (``round-{i}/model``),
            ``ref_model_name_or_path`` (``reference: initial``) and ``resume_from_checkpoint`` (when a checkpoint of
            an interrupted round exists); a mapping must not set them. The generated data has no test split, so
            ``eval_strategy`` is set to ``"no"`` unless the mapping sets it. PEFT recipes (``use_peft``) are refused:
            they save an adapter, not a model the next round can sample from.
    """

    output_dir: str = field(metadata={"help": "Where the rounds are written (round-{i}/data, round-{i}/model)."})
    model_name_or_path: str | None = field(default=None, metadata={"help": "The initial policy (Hub id or folder)."})
    rounds: int = field(default=2, metadata={"help": "Number of rounds of generate -> train."})
    reference: str = field(
        default="previous",
        metadata={"help": "Reference model of each round's training.", "choices": list(REFERENCES)},
    )
    generate: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "trl-nca generate settings: a YAML path, or a mapping of RewardDataConfig fields."},
    )
    train: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "trl-nca train settings: a recipe (path or bundled name), or a mapping of recipe keys."},
    )

    def __post_init__(self):
        for name in ("generate", "train"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith("{"):  # a JSON object on the command line
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise ValueError(f"`{name}` must be a YAML path or a JSON object: {error}") from None
            elif value is not None and not isinstance(value, (str, dict)):
                raise ValueError(f"`{name}` must be a path or a mapping, got {type(value).__name__}.")
        if not self.model_name_or_path:
            raise ValueError("`model_name_or_path` is required: the initial policy (a Hub id or a local folder).")
        if self.generate is None:
            raise ValueError("`generate` is required: a generate YAML path or a mapping of its fields.")
        if self.train is None:
            raise ValueError("`train` is required: a trl-nca train recipe, or a mapping with `recipe:` and overrides.")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"`rounds` must be an integer >= 1, got {self.rounds!r}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {list(REFERENCES)}, got {self.reference!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and the per-round settings
# ---------------------------------------------------------------------------------------------------------------------


def make_parser(prog: str | None = "trl-nca iterate") -> ScriptParser:
    """``TrlParser`` over `IterateConfig`."""
    return ScriptParser((IterateConfig,), prog=prog)


def parse_args(argv: Sequence[str]) -> IterateConfig:
    """Parse ``[CONFIG.yaml] [--flag value ...]``; a mistake is a `trl_nca.cli.UsageError` naming the closest key."""
    from trl_nca.cli_common import UsageError

    args = normalize_argv(argv)
    if not args:
        raise UsageError("no config given: usage: trl-nca iterate CONFIG.yaml [--flag value ...] (-h for the fields)")
    (config,) = make_parser().parse_strictly(args, what="config")
    return config


def _split_base(value: dict[str, Any] | str, base_key: str) -> tuple[str | None, dict[str, Any]]:
    """(the base file named by `value`, the overrides): a string is a base alone, a mapping may name one."""
    if isinstance(value, str):
        return value, {}
    overrides = dict(value)
    return overrides.pop(base_key, None), overrides


def _refuse_keys(overrides: dict[str, Any], keys: Sequence[str], section: str) -> None:
    from trl_nca.cli_common import UsageError

    for key in keys:
        if key in overrides:
            hint = "the iterate config's `model_name_or_path`" if key == "model_name_or_path" else "iterate"
            raise UsageError(f"{section}.{key}: iterate sets it in every round (from {hint}); remove it.")


def generate_base(config: IterateConfig) -> dict[str, Any]:
    """The generate settings shared by all rounds: the YAML (if any) updated with the mapping, keys checked."""
    from trl_nca.cli_common import UsageError, did_you_mean
    from trl_nca.generate_config import RewardDataConfig

    path, overrides = _split_base(config.generate, "config")
    _refuse_keys(overrides, GENERATE_KEYS_SET, "generate")
    settings = read_yaml_mapping(path, "generate:") if path else {}
    settings.update(overrides)
    known = [f.name for f in fields(RewardDataConfig)]
    for key in settings:
        if key not in known:
            where = f"the generate config {path}" if key not in overrides else "`generate`"
            raise UsageError(f"unknown key `{key}` in {where}{did_you_mean(key, known)}.")
    return settings


def train_base(config: IterateConfig) -> dict[str, Any]:
    """The train settings shared by all rounds: the recipe (if any) updated with the mapping, PEFT refused."""
    from trl_nca.cli_common import UsageError, resolve_recipe

    name, overrides = _split_base(config.train, "recipe")
    _refuse_keys(overrides, TRAIN_KEYS_SET, "train")
    settings = read_yaml_mapping(resolve_recipe(name), "train:") if name else {}
    settings.update(overrides)
    if "eval_strategy" not in overrides:  # the generated data has no test split
        settings["eval_strategy"] = "no"
    if settings.get("use_peft"):
        raise UsageError(
            "train: use_peft recipes save a LoRA adapter, not a model the next round can sample from; use a full "
            "fine-tuning recipe (e.g. mistral-7b/nca_reward_full) or merge the adapter yourself between rounds."
        )
    return settings


def round_dir(config: IterateConfig, index: int) -> Path:
    """``output_dir/round-{index}``."""
    return Path(config.output_dir) / f"round-{index}"


def policy_of_round(config: IterateConfig, index: int) -> str:
    """The policy round `index` samples from and trains: the initial model, then the previous round's model."""
    return config.model_name_or_path if index == 1 else str(round_dir(config, index - 1) / "model")


def policy_label(config: IterateConfig, index: int) -> str:
    """The policy's label in round `index`'s ``models`` column."""
    return Path(config.model_name_or_path).name if index == 1 else f"round-{index - 1}"


def reference_of_round(config: IterateConfig, index: int) -> str | None:
    """The ``ref_model_name_or_path`` of round `index`'s training; None when it is the policy's own starting point
    (``reference: previous``, and round 1 either way)."""
    if config.reference == "initial" and index > 1:
        return config.model_name_or_path
    return None


def generate_settings(config: IterateConfig, base: dict[str, Any], index: int) -> dict[str, Any]:
    """Round `index`'s generate config: `base` with the round's policy, label, output folder and seed."""
    return {
        **base,
        "model_name_or_path": [policy_of_round(config, index)],
        "model_names": [policy_label(config, index)],
        "output_dir": str(round_dir(config, index) / "data"),
        "seed": int(base.get("seed", 0)) + index - 1,
    }


def train_settings(
    config: IterateConfig, base: dict[str, Any], index: int, resume_from: str | None = None
) -> dict[str, Any]:
    """Round `index`'s train recipe: `base` with the round's policy, data, output folder, reference and resume."""
    settings = {
        **base,
        "model_name_or_path": policy_of_round(config, index),
        "dataset_name": str(round_dir(config, index) / "data" / "dataset"),
        "dataset_format": "reward",
        "output_dir": str(round_dir(config, index) / "model"),
    }
    reference = reference_of_round(config, index)
    if reference is not None:
        settings["ref_model_name_or_path"] = reference
    else:
        settings.pop("ref_model_name_or_path", None)
    if resume_from is not None:
        settings["resume_from_checkpoint"] = resume_from
    else:
        settings.pop("resume_from_checkpoint", None)
    return settings


def stage_command(stage: str, config_path: str | os.PathLike) -> list[str]:
    """The command that runs `stage` (``generate`` or ``train``) on a config file, as a fresh Python process."""
    return [sys.executable, "-m", "trl_nca.cli", stage, str(config_path)]


def yaml_form(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` as `_write_yaml` writes them and `yaml.safe_load` reads them back."""
    import yaml

    return yaml.safe_load(yaml.safe_dump(settings, sort_keys=False))


def _write_yaml(path: Path, settings: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(settings, sort_keys=False))
    os.replace(tmp, path)


def _where_in_iterate(message: str, section: str, written: Path, value: dict[str, Any] | str) -> str:
    """A stage parser's error about the config `validate` wrote for it (`written`), said of what the user wrote: the
    key in the iterate config's `section` mapping, or in the base file that mapping names."""
    import re

    match = re.match(rf"^(?:recipe|config) {re.escape(str(written))}: key `(\w+)`: (.*)$", message, re.DOTALL)
    if not match:
        return f"{section}: {message}"
    key, reason = match.groups()
    base, overrides = _split_base(value, "recipe" if section == "train" else "config")
    if key in overrides or base is None:
        return f"{section}.{key}: {reason}"
    return f"{section}: {base}: key `{key}`: {reason}"


def validate(config: IterateConfig, generate: dict[str, Any], train: dict[str, Any]) -> None:
    """Check round 1's two configs with the stages' own parsers (in this process, nothing loaded), so that a typo
    or a bad value fails before any stage starts; a `UsageError` names the section."""
    from trl_nca.cli import build_launch_arguments
    from trl_nca.cli_common import UsageError
    from trl_nca.scripts import generate as generate_script

    with tempfile.TemporaryDirectory(prefix="trl-nca-iterate-") as folder:
        generate_path, train_path = Path(folder) / "generate.yaml", Path(folder) / "train.yaml"
        _write_yaml(generate_path, generate_settings(config, generate, 1))
        _write_yaml(train_path, train_settings(config, train, 1))
        try:
            generate_script.parse_args([str(generate_path)])
        except UsageError as error:
            raise UsageError(_where_in_iterate(str(error), "generate", generate_path, config.generate)) from None
        environment = dict(os.environ)  # the recipe's `env:` is exported by the train stage itself
        try:
            build_launch_arguments([str(train_path)])
        except UsageError as error:
            raise UsageError(_where_in_iterate(str(error), "train", train_path, config.train)) from None
        finally:
            os.environ.clear()
            os.environ.update(environment)


def check_resumable(config: IterateConfig, generate: dict[str, Any], train: dict[str, Any]) -> list[str]:
    """Record the settings in ``output_dir/iterate_config.json``, or check that a re-run matches them; a `UsageError`
    names the first setting that differs. The resolved mappings are compared, so an edited recipe or generate YAML
    counts as a change. Only ``rounds`` may change, and in ``generate`` the settings a ``trl-nca generate`` re-run
    keeps its committed samples across (the scoring settings: ``reward_funcs``, ``reward_weights``,
    ``min_completions``, ...): those are recorded anew and returned (sorted), so the unfinished rounds rescore their
    samples; the finished rounds keep their data."""
    from trl_nca.cli_common import UsageError
    from trl_nca.reward_data import KEEPS_SAMPLES, write_atomic

    settings = {**{k: v for k, v in asdict(config).items() if k != "rounds"}, "generate": generate, "train": train}
    settings = json.loads(json.dumps(settings))  # the JSON form, as recorded
    state = Path(config.output_dir) / STATE_FILE
    rescored: list[str] = []
    if state.is_file():
        recorded = json.loads(state.read_text())
        for key in sorted(set(settings) | set(recorded)):
            if settings.get(key) == recorded.get(key):
                continue
            what = key
            if key == "generate" and isinstance(recorded.get(key), dict):
                old, new = recorded[key], settings[key]
                differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                sampling = [k for k in differ if k not in KEEPS_SAMPLES]
                if not sampling:
                    rescored = differ
                    continue
                what = f"generate.{sampling[0]}"
            raise UsageError(
                f"{config.output_dir} holds an iterate run with a different `{what}` (recorded in {state}); re-run "
                "it with the same settings to resume it (only `rounds` may change, and in `generate` the scoring "
                "settings such as `reward_funcs`), or use another output_dir."
            )
        if not rescored:
            return []
    write_atomic(state, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return rescored


# ---------------------------------------------------------------------------------------------------------------------
# Running the rounds
# ---------------------------------------------------------------------------------------------------------------------


class StageFailed(RuntimeError):
    """A stage's process exited with a non-zero status (`status`)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class _Terminated(Exception):
    """SIGTERM reached ``trl-nca iterate``."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def run_stage(command: list[str], where: str) -> None:
    """Run one stage's process, its output passing through; `StageFailed` on a non-zero exit. An interruption
    (Ctrl-C, SIGTERM) sends the stage's process SIGTERM (a Ctrl-C in a terminal reached it too) and waits for it to
    stop (at most 60 s, then SIGKILL) before the interruption goes on."""
    sys.stdout.flush()
    sys.stderr.flush()
    process = subprocess.Popen(command)
    try:
        status = process.wait()
    except (KeyboardInterrupt, _Terminated):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        raise
    if status != 0:
        how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        raise StageFailed(f"{where} failed: its process {how} (its output is above)", status if status > 0 else 1)


def mean_reward(data_dir: Path) -> float | None:
    """The mean of the ``rewards`` column over every kept completion of a generate output (``data.jsonl``)."""
    total, count = 0.0, 0
    with open(data_dir / "data.jsonl") as handle:
        for line in handle:
            rewards = json.loads(line)["rewards"]
            total += sum(rewards)
            count += len(rewards)
    return total / count if count else None


def train_record(model_dir: Path) -> dict[str, Any]:
    """The training numbers of a finished round, from the ``trainer_state.json`` next to the saved model."""
    state_path = model_dir / "trainer_state.json"
    if not state_path.is_file():
        return {}
    state = json.loads(state_path.read_text())
    losses = [entry["loss"] for entry in state.get("log_history", []) if "loss" in entry]
    return {"global_step": state.get("global_step"), "first_loss": losses[0] if losses else None} | (
        {"last_loss": losses[-1]} if losses else {}
    )


def round_record(config: IterateConfig, index: int, timings: dict[str, float]) -> dict[str, Any]:
    """What ``round-{index}/round.json`` records."""
    folder = round_dir(config, index)
    stats = json.loads((folder / "data" / "stats.json").read_text())
    return {
        "round": index,
        "policy": policy_of_round(config, index),
        "reference": reference_of_round(config, index) or policy_of_round(config, index),
        "data": str(folder / "data"),
        "model": str(folder / "model"),
        "seed": generate_settings(config, {}, index)["seed"],
        "prompts": stats.get("prompts"),
        "prompts_kept": stats.get("prompts_kept"),
        "completions_kept": stats.get("completions_kept"),
        "mean_reward": mean_reward(folder / "data"),
        "mean_reward_by_source": stats.get("mean_reward"),
        "train": train_record(folder / "model"),
        "timings": timings,
    }


def summary(records: Sequence[dict[str, Any]]) -> str:
    """One line per round: prompts kept and the mean reward of the round's data, and where its model is."""
    lines = ["summary (mean reward of each round's samples, scored before that round's training):"]
    for record in records:
        reward = record["mean_reward"]
        lines.append(
            f"  round {record['round']}: {record['prompts_kept']} of {record['prompts']} prompts kept, "
            f"mean reward {'n/a' if reward is None else f'{reward:.4g}'} (sampled by {record['policy']}); "
            f"model {record['model']}"
        )
    return "\n".join(lines)


def _short(path: str, config: IterateConfig) -> str:
    """`path` relative to the output folder when it is inside it (``round-1/model``)."""
    try:
        return str(Path(path).relative_to(config.output_dir))
    except ValueError:
        return path


def run_round(config: IterateConfig, generate: dict[str, Any], train: dict[str, Any], index: int) -> dict[str, Any]:
    """Run (or finish) round `index`: generate unless its data is complete, then train (resuming from the newest
    intact checkpoint of an interrupted training). Returns the round's record, also written to ``round.json``."""
    from trl_nca.checkpoints import list_checkpoints, newest_intact_checkpoint

    folder = round_dir(config, index)
    total = config.rounds
    policy = _short(policy_of_round(config, index), config)
    timings: dict[str, float] = {}

    data_dir = folder / "data"
    path = folder / "generate.yaml"
    settings = generate_settings(config, generate, index)
    complete = (data_dir / "stats.json").is_file() and (data_dir / "dataset").is_dir()
    # Finished data of other scoring settings (a re-run that changed them): rescored from its committed samples, and
    # the training on the old scores (checkpoints included) is dropped, so that nothing resumes from it.
    rescore = complete and path.is_file() and read_yaml_mapping(path, "generate:") != yaml_form(settings)
    model_dir = folder / "model"
    if rescore:
        (data_dir / "stats.json").unlink()
        shutil.rmtree(model_dir, ignore_errors=True)
    if complete and not rescore:
        print(f"round {index}/{total}: generate: done already ({_short(str(data_dir), config)})", flush=True)
    else:
        if rescore:
            resuming = ": the scoring settings changed, it rescores the committed samples"
        else:
            resuming = " resumes its finished chunks" if (data_dir / "chunks").is_dir() else ""
        print(f"round {index}/{total}: generate (policy {policy}){resuming}", flush=True)
        _write_yaml(path, settings)
        start = time.perf_counter()
        run_stage(stage_command("generate", path), f"round {index}/{total}: generate")
        timings["generate_s"] = time.perf_counter() - start

    checkpoint = newest_intact_checkpoint(model_dir)
    reference = reference_of_round(config, index)
    what = f"reference {_short(reference, config)}" if reference else "reference: its own initial weights"
    if rescore:
        note = "; restarts: its data was rescored"
    elif checkpoint is not None:
        note = f"; resumes from {_short(str(checkpoint), config)}"
    elif list_checkpoints(model_dir):
        note = f"; restarts: no intact checkpoint in {_short(str(model_dir), config)}"
    elif model_dir.is_dir() and any(model_dir.iterdir()):
        note = f"; restarts: the interrupted training left no checkpoint in {_short(str(model_dir), config)}"
    else:
        note = ""
    print(f"round {index}/{total}: train (policy {policy}, {what}){note}", flush=True)
    path = folder / "train.yaml"
    _write_yaml(path, train_settings(config, train, index, str(checkpoint) if checkpoint else None))
    start = time.perf_counter()
    run_stage(stage_command("train", path), f"round {index}/{total}: train")
    timings["train_s"] = time.perf_counter() - start

    record = round_record(config, index, timings)
    (folder / ROUND_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def run(config: IterateConfig) -> list[dict[str, Any]]:
    """Validate, then run the unfinished rounds in order; returns every round's record (also in ``rounds.json``)."""
    generate, train = generate_base(config), train_base(config)
    validate(config, generate, train)
    restore_interrupt()  # the checks imported torch; from here on the stages run and an interruption is handled
    rescored = check_resumable(config, generate, train)
    if rescored:
        print(
            f"generate: {', '.join(f'`{key}`' for key in rescored)} changed: the unfinished rounds rescore their "
            "committed samples, the finished rounds keep their data",
            flush=True,
        )
    records = []
    for index in range(1, config.rounds + 1):
        done = round_dir(config, index) / ROUND_FILE
        if done.is_file():
            print(f"round {index}/{config.rounds}: done already ({_short(str(done), config)}), skipped", flush=True)
            records.append(json.loads(done.read_text()))
        else:
            records.append(run_round(config, generate, train, index))
        summary_path = Path(config.output_dir) / SUMMARY_FILE
        summary_path.write_text(json.dumps(records, indent=2) + "\n")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trl-nca iterate``; returns the exit status: 2 for a user error (one line), a failed stage's own status
    (with one line naming the round and the stage), 130 when interrupted."""
    from trl_nca.cli_common import UsageError, quiet_warnings

    quiet_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        make_parser().print_help()
        return 0
    previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        config = parse_args(argv)
        records = run(config)
    except UsageError as error:
        print(f"trl-nca iterate: error: {error}", file=sys.stderr)
        return 2
    except StageFailed as error:
        print(f"trl-nca iterate: error: {error}; re-run the same command to resume.", file=sys.stderr)
        return error.status
    except (KeyboardInterrupt, _Terminated) as error:
        print(ITERATE_INTERRUPTED, file=sys.stderr)
        return 143 if isinstance(error, _Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(summary(records))
    print(f"wrote {config.output_dir}: round-N/data, round-N/model for N = 1..{config.rounds}, {SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    exit_process(main())
