"""The ``trl-nca`` console script.

Subcommands:

- ``trl-nca train CONFIG.yaml [--key value ...]``: launch ``trl_nca.scripts.train`` through ``accelerate launch``.
  ``CONFIG.yaml`` is a path or a bundled recipe name (``mistral-7b/nca_reward_qlora``). Flags override the recipe's
  values. ``--accelerate_config NAME|PATH`` and ``--num_processes N`` (flags or recipe keys) set the launcher, like
  ``trl dpo``; any other flag the training script does not know is passed to ``accelerate launch`` (for example
  ``--main_process_port 29511``).
- ``trl-nca generate CONFIG.yaml [--key value ...]``: prompts -> reward dataset (``trl_nca.scripts.generate``).
- ``trl-nca iterate CONFIG.yaml [--key value ...]``: rounds of generate -> train (``trl_nca.scripts.iterate``).
- ``trl-nca demo ...``: the offline demo (``trl_nca.demo.run``).
- ``trl-nca plot ...``: plots from training logs (``trl_nca.plotting``).

Bundled recipes and accelerate configs are looked up, in order, in ``$TRL_NCA_RECIPES_DIR``, in the ``recipes/``
folder of a source checkout (next to the ``trl_nca`` package: editable installs), and in
``<sys.prefix>/share/trl-nca/recipes`` or ``<user base>/share/trl-nca/recipes`` (where a wheel installs them as data
files). Accelerate config names missing from all of these fall back to the configs TRL ships
(``trl/accelerate_configs``: ``zero3``, ``fsdp2``, ...).
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from typing import Any

# The shared helpers live in the light `trl_nca.cli_common`; importing them here keeps `trl_nca.cli.X` working.
from trl_nca.cli_common import (  # noqa: F401
    COMMAND_ENV,
    RECIPES_ENV,
    TRAINERS,
    WATCH_PARENT_ENV,
    DatasetError,
    UsageError,
    did_you_mean,
    exit_on_interrupt,
    exit_process,
    failure_message,
    hold_optional_kernel_logs,
    interrupted_line,
    interrupted_message,
    normalize_argv,
    peek_trainer,
    peek_value,
    quiet_warnings,
    read_recipe,
    recipe_dirs,
    recipe_path,
    release_optional_kernel_logs,
    resolve_accelerate_config,
    resolve_recipe,
    restore_interrupt,
)

USAGE = """usage: trl-nca <command> [<args>]

commands:
  train CONFIG.yaml [--key value ...]   train with NCA/InfoNCA/listwise through `accelerate launch`
                                        (--accelerate_config NAME|PATH, --num_processes N)
  generate CONFIG.yaml [--key value ...]
                                        sample and score K completions per prompt: a reward dataset
  iterate CONFIG.yaml [--key value ...] rounds of generate -> train with the current policy
  demo ...                              run the offline demo (trl-nca demo -h)
  plot ...                              plot training logs (trl-nca plot -h)
"""


def _remove_subsequence(tokens: Sequence[str], subsequence: Sequence[str]) -> list[str]:
    """``tokens`` without the first in-order occurrence of ``subsequence`` (argparse's unknown-argument list)."""
    kept, position = [], 0
    for token in tokens:
        if position < len(subsequence) and token == subsequence[position]:
            position += 1
        else:
            kept.append(token)
    if position != len(subsequence):
        raise ValueError(f"Could not separate the launcher arguments {list(subsequence)} from {list(tokens)}.")
    return kept


def _launch_parser():
    """``accelerate launch``'s parser, with a parse error raised as a `UsageError` (one line) instead of its usage."""
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()

    def error(message: str):
        raise UsageError(message)

    parser.error = error
    return parser


def _accelerate_options() -> dict[str, bool]:
    """``accelerate launch``'s option strings, each mapped to whether it takes a value."""
    return {
        option: action.nargs != 0
        for action in _launch_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    }


#: Appended to an unknown recipe key's error by `trl-nca train`.
RECIPE_KEYS_HINT = (
    " Recipe keys are fields of the script arguments, the trainer config or trl.ModelConfig (launcher options belong "
    "in the accelerate config)."
)


def check_train_sources(script_argv: Sequence[str]) -> None:
    """The training script's checks of the policy, reference, dataset and output folder
    (`trl_nca.sources.check_train_sources`), on the values the recipe and flags give, before the training starts."""
    import json

    from trl_nca import sources

    init_kwargs = peek_value(script_argv, "model_init_kwargs") or {}
    if isinstance(init_kwargs, str):
        try:
            init_kwargs = json.loads(init_kwargs)
        except ValueError:
            init_kwargs = {}
    sources.check_train_sources(
        peek_value(script_argv, "model_name_or_path"),
        peek_value(script_argv, "ref_model_name_or_path"),
        peek_value(script_argv, "dataset_name"),
        peek_value(script_argv, "output_dir"),
        cache_dir=init_kwargs.get("cache_dir") if isinstance(init_kwargs, dict) else None,
        streaming=str(peek_value(script_argv, "dataset_streaming", False)).lower() in ("true", "yes", "t", "y", "1"),
    )


def _export_recipe_env(recipe: dict) -> None:
    """Export the recipe's ``env:`` mapping (removed from `recipe`), so that the launcher and every process see it."""
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise UsageError("The recipe's `env` must be a mapping of environment variables.")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


def _parse_with_full_parser(script_argv: list[str], trainer: str, helping: bool) -> tuple[Any, list[str]]:
    """(namespace, launcher flags) from the training script's own parser (the trainer configs: torch and
    transformers are imported); its option table is cached for the next command (`trl_nca.arguments.OptionTable`)."""
    from trl_nca.arguments import OptionTable, parse_known_flags, split_launcher_flags
    from trl_nca.scripts.train import make_parser

    parser = make_parser(trainer, prog="trl-nca train")
    launcher_options = _accelerate_options()
    OptionTable.from_parser(parser, launcher_options).save(f"train-{trainer}")
    if helping:
        parser.print_help()
        raise SystemExit(0)
    recipe = read_recipe(script_argv)
    _export_recipe_env(recipe)
    unknown_keys = parser.set_defaults_with_config(**recipe)
    if unknown_keys:
        key = unknown_keys[0].lstrip("-")
        raise UsageError(
            f"unknown key `{key}` in the recipe {recipe_path(script_argv)}{did_you_mean(key, parser.field_names())}."
            + RECIPE_KEYS_HINT
        )
    namespace, unknown = parse_known_flags(parser, script_argv, recipe)
    return namespace, split_launcher_flags(unknown, parser.option_names(), launcher_options)


def build_launch_arguments(argv: Sequence[str]) -> tuple[list[str], list[str], str]:
    """Split ``trl-nca train`` arguments into (``accelerate launch`` arguments, training-script arguments, output dir).

    The recipe and the flags are checked as the training script's parser checks them (without building the configs,
    so no distributed state is created in the launcher): unknown recipe keys, unknown flags and bad values raise a
    `UsageError`; ``accelerate launch`` options pass through; ``accelerate_config``/``num_processes`` become
    ``--config_file``/``--num_processes``. The recipe's ``env:`` mapping is exported so that the launcher and every
    process see it. The check uses the option table cached by the last full parse of this trainer's arguments
    (`trl_nca.arguments.OptionTable`: no torch, no transformers); without one, the full parser (which caches it).
    """
    if not argv:
        raise UsageError("no recipe given: usage: trl-nca train RECIPE [--flag value ...] (`trl-nca train RECIPE -h`)")
    from trl_nca.arguments import OptionTable

    script_argv = normalize_argv(argv)
    helping = "-h" in script_argv or "--help" in script_argv
    trainer = peek_trainer(script_argv)
    table = None if helping else OptionTable.load(f"train-{trainer}")
    if table is None:
        namespace, launcher_flags = _parse_with_full_parser(script_argv, trainer, helping)
    else:
        recipe = read_recipe(script_argv)
        _export_recipe_env(recipe)
        namespace, launcher_flags = table.parse(script_argv, recipe, unknown_key_hint=RECIPE_KEYS_HINT)

    launch_args: list[str] = []
    if namespace.accelerate_config:
        launch_args += ["--config_file", str(resolve_accelerate_config(namespace.accelerate_config))]
    if namespace.num_processes is not None:
        launch_args += ["--num_processes", str(namespace.num_processes)]
    launch_args += launcher_flags
    return launch_args, _remove_subsequence(script_argv, launcher_flags), namespace.output_dir


def _validated_launch(launch_args: list[str]):
    """accelerate's launch namespace, completed from the accelerate config and defaults (its notice about defaults
    is silenced: ``trl-nca train`` passes what a recipe needs). An unreadable accelerate config or a conflict between
    launcher options is a `UsageError`."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command

    args = _launch_parser().parse_args(launch_args)
    config_file = args.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    if config_file is not None:
        try:
            load_config_from_file(config_file)
        except Exception as error:  # anything in a user's file: not a mapping, unknown keys, bad values, bad YAML
            reason = f"it is not a YAML mapping ({error})" if isinstance(error, AttributeError) else str(error)
            raise UsageError(f"accelerate config {config_file} cannot be read: {' '.join(reason.split())}") from None
    accelerate_logger = logging.getLogger("accelerate.commands.launch")
    level = accelerate_logger.level
    accelerate_logger.setLevel(logging.ERROR)
    try:
        return _validate_launch_command(args)
    except ValueError as error:  # options that cannot go together (e.g. --multi_gpu with one process)
        raise UsageError(f"accelerate launch: {error}") from None
    finally:
        accelerate_logger.setLevel(level)


def _is_single_process(args, defaults) -> bool:
    """Whether ``accelerate launch`` would run the script as one plain process (its ``simple_launcher``)."""
    from accelerate.utils import ComputeEnvironment

    distributed = (args.use_deepspeed or args.use_fsdp or args.use_megatron_lm or args.multi_gpu or args.tpu) and (
        not args.cpu
    )
    sagemaker = defaults is not None and defaults.compute_environment == ComputeEnvironment.AMAZON_SAGEMAKER
    return not distributed and not sagemaker and args.mpirun_hostfile is None


def train(argv: Sequence[str]) -> int:
    """``trl-nca train``: run ``trl_nca.scripts.train`` as ``accelerate launch`` would; returns the exit status.

    A single-process run replaces this process (``exec``): no launcher stays in between, so a signal reaches the
    training itself. A multi-process run goes through accelerate's launcher in this process; its training processes
    exit when it is gone (``TRL_NCA_WATCH_PARENT``), and an interruption or a failed process ends it with one line.
    """
    launch_args, script_args, output_dir = build_launch_arguments(argv)
    launch_args = [*launch_args, "--module", "trl_nca.scripts.train", *script_args]
    os.environ[COMMAND_ENV] = shlex.join(["trl-nca", "train", *argv])
    args, defaults, _ = _validated_launch(launch_args)
    machines = int(args.num_machines or 1)
    if machines > 1:  # what accelerate would get wrong silently, or only after a rendezvous timeout
        processes, rank = int(args.num_processes or 0), args.machine_rank
        if _is_single_process(args, defaults):
            raise UsageError(
                f"a run on {machines} machines needs a distributed accelerate config (DeepSpeed, FSDP or multi-GPU, "
                "e.g. --accelerate_config multinode_zero3); this one starts a single process."
            )
        if processes < machines or processes % machines:
            raise UsageError(
                f"--num_processes {processes} is the total over the {machines} machines: give a multiple of "
                f"{machines} (e.g. {machines * 8} for {machines} machines of 8 GPUs)."
            )
        if not args.main_process_ip:
            raise UsageError(f"a run on {machines} machines needs --main_process_ip: the address of machine 0.")
        if rank is None or not 0 <= int(rank) < machines:
            raise UsageError(f"--machine_rank {rank} is not a machine of this run: give 0 .. {machines - 1}.")
    check_train_sources(script_args)  # what the arguments name: before the training processes import anything
    if _is_single_process(args, defaults):
        from accelerate.utils import prepare_simple_launcher_cmd_env

        command, env = prepare_simple_launcher_cmd_env(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(command[0], command, env)

    from accelerate.commands.launch import launch_command

    os.environ[WATCH_PARENT_ENV] = "1"
    # torchrun's agent logs each signal it relays and each worker it stops; the outcome is reported below in one line.
    import torch.distributed.run  # noqa: F401  (creates the agent's loggers)

    from trl_nca import default_deepspeed_accelerator

    default_deepspeed_accelerator()  # accelerate's DeepSpeed launcher imports DeepSpeed in this process

    for name in ["accelerate.commands.launch", *logging.root.manager.loggerDict]:
        if name.startswith(("accelerate.commands.launch", "torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    restore_interrupt()  # the launcher relays an interruption to the processes and reports it below
    try:
        launch_command(_launch_parser().parse_args(launch_args))
    except KeyboardInterrupt:
        print(interrupted_message(output_dir, machines), file=sys.stderr)
        return 130
    except SystemExit as error:  # accelerate >= 1.16 turns an interruption into exit 130 / 128 + signal
        if not isinstance(error.code, int) or error.code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise
        print(interrupted_message(output_dir, machines), file=sys.stderr)
        return error.code
    except Exception as error:  # torchrun's ChildFailedError, and SignalException before accelerate 1.16
        name = type(error).__name__
        if name == "SignalException":
            print(interrupted_message(output_dir, machines), file=sys.stderr)
            return 128 + int(getattr(error, "sigval", signal.SIGINT))
        if name != "ChildFailedError":
            raise
        codes = {failure.exitcode for failure in getattr(error, "failures", {}).values()}
        if codes == {2}:  # a user error, already printed by the training process (rank 0)
            return 2
        print(failure_message(error, output_dir, machines), file=sys.stderr)
        return 1
    return 0


#: The verbs of ``trl-nca``.
COMMANDS = ("train", "generate", "iterate", "demo", "plot")


def _dispatch(module_name: str, argv: Sequence[str]) -> int:
    """Import ``module_name`` lazily and run its ``main(argv)``."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        print(f"trl-nca: could not import `{module_name}`: {error}", file=sys.stderr)
        return 1
    status = module.main(list(argv))
    return int(status or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``trl-nca`` console script; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        from trl_nca import __version__

        print(f"trl-nca {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(
            f"trl-nca: unknown command `{command}`{did_you_mean(command, COMMANDS)}; the commands are "
            f"{', '.join(COMMANDS)} (`trl-nca --help`).",
            file=sys.stderr,
        )
        return 2
    if argv is None:  # the console script: Ctrl-C during the start-up ends it with one line (`exit_on_interrupt`)
        exit_on_interrupt(lambda: interrupted_line(command, rest))
    try:
        status = _run_command(command, rest)
    except KeyboardInterrupt:  # during the start-up; later each command prints the same line itself
        print(interrupted_line(command, rest), file=sys.stderr)
        status = 130
    if argv is None and status == 130:  # the console script: see `exit_process`
        exit_process(status)
    return status


def _run_command(command: str, rest: list[str]) -> int:
    hold_optional_kernel_logs()  # dropped here; a training process shows its own for quantized runs
    if command == "train":
        quiet_warnings()
        try:
            return train(rest)
        except (UsageError, DatasetError) as error:
            print(f"trl-nca train: error: {error}", file=sys.stderr)
            return 2
    if command == "generate":
        return _dispatch("trl_nca.scripts.generate", rest)
    if command == "iterate":
        return _dispatch("trl_nca.scripts.iterate", rest)
    if command == "demo":
        return _dispatch("trl_nca.demo.run", rest)
    return _dispatch("trl_nca.plotting", rest)


if __name__ == "__main__":
    sys.exit(main())
