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

import difflib
import importlib
import logging
import os
import shlex
import signal
import site
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

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

RECIPES_ENV = "TRL_NCA_RECIPES_DIR"
#: Set by ``trl-nca train`` for multi-process launches: each training process exits when the launcher is gone.
WATCH_PARENT_ENV = "TRL_NCA_WATCH_PARENT"
#: The ``trl-nca train`` arguments, so that a training process can print the command that resumes the run.
COMMAND_ENV = "TRL_NCA_COMMAND"


class UsageError(ValueError):
    """A mistake in the command line or the recipe: printed as one line, exit status 2, no traceback."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean `x`?)`` for the known name closest to ``name`` (one extends the other, or they are spelled
    alike), else an empty string."""
    known = list(known)
    extending = [k for k in known if len(k) > 3 and (name.startswith(k) or k.startswith(name))]
    if extending:
        return f" (did you mean `{min(extending, key=lambda k: abs(len(k) - len(name)))}`?)"
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f" (did you mean `{match[0]}`?)" if match else ""


def recipe_dirs() -> list[Path]:
    """Folders searched for bundled recipes, in priority order (only those that exist)."""
    candidates = []
    if os.environ.get(RECIPES_ENV):
        candidates.append(Path(os.environ[RECIPES_ENV]))
    candidates.append(Path(__file__).resolve().parent.parent / "recipes")
    candidates.append(Path(sys.prefix) / "share" / "trl-nca" / "recipes")
    candidates.append(Path(site.getuserbase()) / "share" / "trl-nca" / "recipes")  # pip install --user
    return [path for path in candidates if path.is_dir()]


def resolve_recipe(name: str | os.PathLike) -> Path:
    """A recipe path: ``name`` itself when it is a file, else ``name`` (or ``name.yaml``) in a bundled recipes dir."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in recipe_dirs():
        for candidate in (folder / path, folder / path.with_name(path.name + ".yaml")):
            if candidate.is_file():
                return candidate
    searched = ", ".join(str(folder) for folder in recipe_dirs()) or "no recipes folder found"
    bundled = [str(p.relative_to(d).with_suffix("")) for d in recipe_dirs() for p in d.rglob("*.yaml")]
    raise UsageError(
        f"Recipe {name!s} is neither a file nor a bundled recipe{did_you_mean(str(path.with_suffix('')), bundled)} "
        f"(searched: {searched})."
    )


def resolve_accelerate_config(name: str | os.PathLike) -> Path:
    """An accelerate config path: ``name`` itself when it is a file, else a bundled ``NAME.yaml``.

    Bundled names come from ``recipes/accelerate_configs`` (see the module docstring for where that is looked up),
    then from TRL's own ``trl/accelerate_configs``.
    """
    path = Path(name)
    if path.is_file():
        return path
    filename = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    for folder in recipe_dirs():
        candidate = folder / "accelerate_configs" / filename
        if candidate.is_file():
            return candidate
    import importlib.resources as resources

    trl_candidate = resources.files("trl.accelerate_configs").joinpath(filename)
    if trl_candidate.is_file():
        return Path(str(trl_candidate))
    bundled = sorted({p.stem for folder in recipe_dirs() for p in (folder / "accelerate_configs").glob("*.yaml")})
    raise UsageError(
        f"Accelerate config {name!s} is neither a file nor a bundled config{did_you_mean(path.stem, bundled)} "
        f"(bundled: {', '.join(bundled) or 'none'})."
    )


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


def _split_launcher_flags(unknown: Sequence[str], script_options: Iterable[str]) -> list[str]:
    """The ``accelerate launch`` flags among the tokens the training script does not know; a `UsageError` for any
    other token, with the closest known flag. Flags must be spelled out (no abbreviations)."""
    accelerate = _accelerate_options()
    flags, index = [], 0
    while index < len(unknown):
        token = unknown[index]
        name = token.split("=", 1)[0]
        if name not in accelerate:
            hint = did_you_mean(name, [*script_options, *accelerate]) if name.startswith("--") else ""
            what = "flag" if name.startswith("--") else "argument"
            raise UsageError(f"unknown {what} `{name}`{hint}. See `trl-nca train RECIPE --help` for the flags.")
        flags.append(token)
        index += 1
        if accelerate[name] and "=" not in token and index < len(unknown) and not unknown[index].startswith("--"):
            flags.append(unknown[index])
            index += 1
    return flags


def build_launch_arguments(argv: Sequence[str]) -> tuple[list[str], list[str], str]:
    """Split ``trl-nca train`` arguments into (``accelerate launch`` arguments, training-script arguments, output dir).

    The recipe and the flags are checked against the training script's parser (without building the configs, so no
    distributed state is created in the launcher): unknown recipe keys, unknown flags and bad values raise a
    `UsageError`; ``accelerate launch`` options pass through; ``accelerate_config``/``num_processes`` become
    ``--config_file``/``--num_processes``. The recipe's ``env:`` mapping is exported so that the launcher and every
    process see it.
    """
    from trl_nca.scripts.train import make_parser, normalize_argv, peek_trainer, read_recipe

    if not argv:
        raise UsageError("no recipe given: usage: trl-nca train RECIPE [--flag value ...] (`trl-nca train RECIPE -h`)")
    script_argv = normalize_argv(argv)
    parser = make_parser(peek_trainer(script_argv), prog="trl-nca train")
    if "-h" in script_argv or "--help" in script_argv:
        parser.print_help()
        raise SystemExit(0)
    recipe = read_recipe(script_argv)
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise UsageError("The recipe's `env` must be a mapping of environment variables.")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    unknown_keys = parser.set_defaults_with_config(**recipe)
    if unknown_keys:
        key = unknown_keys[0].lstrip("-")
        raise UsageError(
            f"unknown key `{key}` in the recipe {script_argv[script_argv.index('--config') + 1]}"
            f"{did_you_mean(key, parser.field_names())}. Recipe keys are fields of the script arguments, the trainer "
            "config or trl.ModelConfig (launcher options belong in the accelerate config)."
        )
    parse_argv = list(script_argv)
    if "--config" in parse_argv:
        index = parse_argv.index("--config")
        del parse_argv[index : index + 2]
    namespace, unknown = parser.parse_known_args(parse_argv)
    launcher_flags = _split_launcher_flags(unknown, parser.option_names())

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

    for name in ["accelerate.commands.launch", *logging.root.manager.loggerDict]:
        if name.startswith(("accelerate.commands.launch", "torch.distributed.elastic", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        launch_command(_launch_parser().parse_args(launch_args))
    except KeyboardInterrupt:
        print(interrupted_message(output_dir), file=sys.stderr)
        return 130
    except SystemExit as error:  # accelerate >= 1.16 turns an interruption into exit 130 / 128 + signal
        if not isinstance(error.code, int) or error.code not in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            raise
        print(interrupted_message(output_dir), file=sys.stderr)
        return error.code
    except Exception as error:  # torchrun's ChildFailedError, and SignalException before accelerate 1.16
        name = type(error).__name__
        if name == "SignalException":
            print(interrupted_message(output_dir), file=sys.stderr)
            return 128 + int(getattr(error, "sigval", signal.SIGINT))
        if name != "ChildFailedError":
            raise
        codes = {failure.exitcode for failure in getattr(error, "failures", {}).values()}
        if codes == {2}:  # a user error, already printed by the training process (rank 0)
            return 2
        print(failure_message(error, output_dir), file=sys.stderr)
        return 1
    return 0


def _last_checkpoint_text(output_dir: str | None) -> str:
    from trl_nca.checkpoints import newest_intact_checkpoint

    checkpoint = newest_intact_checkpoint(output_dir) if output_dir else None
    if checkpoint is None:
        return f"no checkpoint in {output_dir} to resume from"
    command = os.environ.get(COMMAND_ENV, "trl-nca train RECIPE")
    if "--resume_from_checkpoint" not in command:
        command += " --resume_from_checkpoint last"
    return f"last checkpoint: {checkpoint}; resume with: {command}"


def interrupted_message(output_dir: str | None) -> str:
    """The one line printed when a run is interrupted: where the last checkpoint is and how to resume."""
    return f"trl-nca train: interrupted; {_last_checkpoint_text(output_dir)}"


def failure_message(error: Exception, output_dir: str | None) -> str:
    """One line for a training process that died (killed, out of memory, ...), from torchrun's ChildFailedError: the
    first process that failed (the others are stopped after it)."""
    failures = getattr(error, "failures", None)
    if failures:
        rank, failure = error.get_first_failure()
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        what = f"training process rank {rank} (pid {failure.pid}) {how}"
    else:
        what = f"a training process failed ({error})"
    return f"trl-nca train: {what}; the run stopped; {_last_checkpoint_text(output_dir)}"


#: Libraries whose FutureWarning/DeprecationWarning are noise to a `trl-nca train` user: they come from code the user
#: does not call (e.g. transformers' ``gradient_checkpointing`` -> ``activation_checkpointing`` rename, which TRL's
#: own defaults and internals trigger on every run).
QUIET_MODULES = (
    r"(transformers|trl|trl_nca|accelerate|torch|peft|deepspeed|datasets|bitsandbytes|huggingface_hub|safetensors)"
    r"(\.|$)"
)


def quiet_warnings() -> None:
    """Hide the FutureWarning/DeprecationWarning that the libraries `trl-nca train` drives raise about their own
    internals (`QUIET_MODULES`), in this process only (the training script calls it too). Warnings from the user's
    code (``--callbacks``) still show, and ``-W``/``PYTHONWARNINGS`` turn this off."""
    import warnings

    if sys.warnoptions:
        return
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_MODULES)


#: Loggers that speak when bitsandbytes is imported (peft and TRL import it whenever it is installed): on a CPU with
#: AVX512-BF16 it tries to fetch a 4-bit kernel from the Hub and warns when it cannot. Only 4-bit runs care.
OPTIONAL_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub")


class _HeldRecords(logging.Filter):
    """Keeps a logger's records back (instead of printing them) until `release_optional_kernel_logs`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def hold_optional_kernel_logs() -> None:
    """Hold back what `OPTIONAL_KERNEL_LOGGERS` log from now on; call before TRL/peft are imported."""
    for name in OPTIONAL_KERNEL_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(held, _HeldRecords) for held in logger.filters):
            logger.addFilter(_HeldRecords())


def release_optional_kernel_logs(show: bool) -> None:
    """Stop holding `OPTIONAL_KERNEL_LOGGERS` back; print what they logged meanwhile when `show` (a quantized run)."""
    for name in OPTIONAL_KERNEL_LOGGERS:
        logger = logging.getLogger(name)
        for held in [held for held in logger.filters if isinstance(held, _HeldRecords)]:
            logger.removeFilter(held)
            for record in held.records if show else []:
                logger.handle(record)


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
    hold_optional_kernel_logs()  # dropped here; a training process shows its own for quantized runs
    if command == "train":
        quiet_warnings()
        try:
            return train(rest)
        except UsageError as error:
            print(f"trl-nca train: error: {error}", file=sys.stderr)
            return 2
    if command == "generate":
        return _dispatch("trl_nca.scripts.generate", rest)
    if command == "iterate":
        return _dispatch("trl_nca.scripts.iterate", rest)
    if command == "demo":
        return _dispatch("trl_nca.demo.run", rest)
    if command == "plot":
        return _dispatch("trl_nca.plotting", rest)
    print(f"trl-nca: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
