"""What every `trl-nca` command shares, importing nothing heavy (the standard library and PyYAML only): the user-error
type, "did you mean", where recipes and accelerate configs are found, reading a recipe, the interruption and failure
lines, and the warning/log filters. The entry points (`trl_nca.cli`, `trl_nca.scripts.*`) stand above it, so a mistake
in a command line or a recipe is reported before torch, transformers or DeepSpeed are imported."""

from __future__ import annotations

import difflib
import logging
import os
import signal
import site
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RECIPES_ENV = "TRL_NCA_RECIPES_DIR"
#: Where trl-nca caches small files (the CLI's option tables, the UTF-8 checks of data files):
#: ``$TRL_NCA_CACHE_DIR``, else ``$XDG_CACHE_HOME/trl-nca``, else ``~/.cache/trl-nca``.
CACHE_ENV = "TRL_NCA_CACHE_DIR"


#: Set by ``trl-nca train`` for multi-process launches: each training process exits when the launcher is gone.
WATCH_PARENT_ENV = "TRL_NCA_WATCH_PARENT"


#: The ``trl-nca train`` arguments, so that a training process can print the command that resumes the run.
COMMAND_ENV = "TRL_NCA_COMMAND"


def cache_dir() -> Path:
    """The folder of trl-nca's caches (see `CACHE_ENV`)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "trl-nca"


class UsageError(ValueError):
    """A mistake in the command line or the recipe: printed as one line, exit status 2, no traceback."""


class DatasetError(ValueError):
    """A dataset the trainers cannot use (empty, malformed row, nothing left after truncation); the message names the
    dataset, the row and the column. The CLI prints it as one line."""


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


#: Trainer name (YAML key ``trainer``) -> (config class, trainer class), both looked up in ``trl_nca``.
TRAINERS: dict[str, tuple[str, str]] = {
    "nca": ("NCAConfig", "NCATrainer"),
    "infonca": ("InfoNCAConfig", "InfoNCATrainer"),
    "listwise": ("ListwiseConfig", "ListwiseTrainer"),
}


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Turn ``CONFIG.yaml [flags]`` into ``--config CONFIG.yaml [flags]``; resolve bundled recipe names.

    A leading positional argument is the recipe: a path, or a name relative to the bundled ``recipes/`` folder
    (``mistral-7b/nca_reward_qlora``, with or without ``.yaml``).
    """
    args = list(argv)
    if args and not args[0].startswith("-"):
        args = ["--config", str(resolve_recipe(args[0]))] + args[1:]
    elif "--config" in args:
        index = args.index("--config")
        if index + 1 >= len(args):
            raise UsageError("Expected a path after `--config`.")
        args[index + 1] = str(resolve_recipe(args[index + 1]))
    return args


def recipe_path(argv: Sequence[str]) -> str | None:
    """The path after ``--config`` in a normalized ``argv``, if any."""
    args = list(argv)
    return args[args.index("--config") + 1] if "--config" in args and args.index("--config") + 1 < len(args) else None


def read_recipe(argv: Sequence[str]) -> dict[str, Any]:
    """The YAML mapping named by ``--config`` in ``argv`` (``{}`` when there is none)."""
    args = list(argv)
    if "--config" not in args:
        return {}
    return read_yaml_mapping(args[args.index("--config") + 1], "Recipe")


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """The YAML mapping in `path` (``{}`` for an empty file); a `UsageError` ``"{what} {path} ..."`` when the file is
    missing, is not YAML or holds something other than a mapping."""
    import yaml

    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist.") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{what} {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{what} {path} must contain a YAML mapping, got {type(data).__name__}.")
    return data


def peek_value(argv: Sequence[str], key: str, default: Any = None) -> Any:
    """The value of ``--key X`` / ``--key=X`` in a normalized ``argv``, else the recipe's ``key:``, else `default`."""
    args = list(argv)
    for index, token in enumerate(args):
        if token == f"--{key}" and index + 1 < len(args):
            return args[index + 1]
        if token.startswith(f"--{key}="):
            return token.split("=", 1)[1]
    return read_recipe(args).get(key, default)


def peek_trainer(argv: Sequence[str]) -> str:
    """The trainer name from ``--trainer X`` / ``--trainer=X`` on the command line, else the recipe's ``trainer:``."""
    name = peek_value(argv, "trainer", "nca")
    if name not in TRAINERS:
        raise UsageError(f"Unknown trainer {name!r}{did_you_mean(name, TRAINERS)}: choose one of {sorted(TRAINERS)}.")
    return name


def is_main_process() -> bool:
    """Whether this is the main process (rank 0) of a launch, or a process run alone (from the launcher's ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"


def _last_checkpoint_text(output_dir: str | None, machines: int = 1) -> str:
    """Where the newest intact checkpoint of ``output_dir`` is and the command that resumes from it (run on every
    machine, each with its own ``--machine_rank``, when the run spans ``machines`` > 1)."""
    from trl_nca.checkpoints import newest_intact_checkpoint

    checkpoint = newest_intact_checkpoint(output_dir) if output_dir else None
    if checkpoint is None:
        return f"no checkpoint in {output_dir} to resume from"
    command = os.environ.get(COMMAND_ENV, "trl-nca train RECIPE")
    if "--resume_from_checkpoint" not in command:
        command += " --resume_from_checkpoint last"
    where = f" (on each of the {machines} machines, with its --machine_rank)" if machines > 1 else ""
    return f"last checkpoint: {checkpoint}; resume with: {command}{where}"


#: What an interrupted ``trl-nca generate`` / ``trl-nca iterate`` prints (at any moment, start-up included).
GENERATE_INTERRUPTED = (
    "trl-nca generate: interrupted; the finished chunks are kept, re-run the same command to resume."
)
ITERATE_INTERRUPTED = (
    "trl-nca iterate: interrupted; finished rounds, generate chunks and checkpoints are kept, re-run the same command "
    "to resume."
)


def interrupted_line(command: str, argv: Sequence[str]) -> str:
    """The one line an interrupted ``trl-nca COMMAND ARGV`` prints, whenever it is interrupted."""
    if command == "generate":
        return GENERATE_INTERRUPTED
    if command == "iterate":
        return ITERATE_INTERRUPTED
    if command != "train":
        return f"trl-nca {command}: interrupted"
    try:
        output_dir = peek_value(normalize_argv(argv), "output_dir")
    except UsageError:  # an argument that would have been reported had the start-up finished
        output_dir = None
    return interrupted_message(None if output_dir is None else str(output_dir))


_EXITING_ON_INTERRUPT = False


def exit_on_interrupt(line: str | Callable[[], str]) -> None:
    """Until the command's own handling takes over (`restore_interrupt`), an interruption (Ctrl-C) prints `line`
    (called then, when it is a function; printed only when the process runs alone: under a multi-process launch the
    launcher prints it) and ends the process at once with status 130, with no traceback.

    For the start-up, while torch, transformers and the models load: a KeyboardInterrupt raised there can cross C++
    code that cannot carry it (torch aborts with ``terminate called after throwing ... KeyboardInterrupt``), and
    nothing is written yet that would need cleaning up."""
    global _EXITING_ON_INTERRUPT

    def handler(signum: int, frame: Any) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            print(line() if callable(line) else line, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)

    signal.signal(signal.SIGINT, handler)
    _EXITING_ON_INTERRUPT = True


def restore_interrupt() -> None:
    """Let Ctrl-C raise `KeyboardInterrupt` again (Python's default), for the command's own handling, when
    `exit_on_interrupt` was in force (a no-op otherwise, e.g. for a command run in-process by Python code)."""
    global _EXITING_ON_INTERRUPT
    if _EXITING_ON_INTERRUPT:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _EXITING_ON_INTERRUPT = False


def exit_process(status: int) -> None:
    """End this process with `status`. After an interruption (130) the process ends at once (``os._exit``, streams
    flushed): CPython kills itself with SIGINT at exit (status -2) when a KeyboardInterrupt crossed some C extension's
    import, even one the command caught and reported.

    After a success the process group of a multi-process launch is destroyed first: a process that exits with gloo's
    worker threads still alive can abort at interpreter teardown ("terminate called without an active exception",
    SIGABRT) after all its work is written. Only then, as a failed rank's peers may still be inside a collective."""
    if status == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status == 0:
        end_process_group()
    sys.exit(status)


def end_process_group() -> None:
    """Destroy torch.distributed's default process group if this process initialised one (a no-op otherwise, and
    without importing torch when nothing imported it)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def interrupted_message(output_dir: str | None, machines: int = 1) -> str:
    """The one line printed when a run is interrupted: where the last checkpoint is and how to resume."""
    return f"trl-nca train: interrupted; {_last_checkpoint_text(output_dir, machines)}"


def failure_message(error: Exception, output_dir: str | None, machines: int = 1) -> str:
    """One line for a training process that died (killed, out of memory, ...) or lost the other processes of the run,
    from torchrun's ChildFailedError: the first process that failed (the others are stopped after it).

    A process that lost its peers (a machine died or was stopped, the network failed) records its error in torchrun's
    error file instead of printing a traceback (``trl_nca.scripts.train.run``); the line quotes its first sentence.
    """
    import re

    def recorded(failure) -> str | None:  # the error a process that lost its peers wrote to its error file
        message = failure.error_file_data.get("message")
        return message["message"] if isinstance(message, dict) and isinstance(message.get("message"), str) else None

    failures = getattr(error, "failures", None)
    if not failures:
        what = f"a training process failed ({error})"
    else:
        # The first process that failed on its own (killed, crashed); the ones that lost it only when none did. The
        # agent stops the survivors with SIGTERM (recorded at the same moment): those only when nothing else failed.
        causes = {rank: failure for rank, failure in failures.items() if recorded(failure) is None} or failures
        rank = min(causes, key=lambda r: (causes[r].exitcode == -signal.SIGTERM, causes[r].timestamp, r))
        failure, lost = causes[rank], recorded(causes[rank])
        code = failure.exitcode
        if lost is not None:
            # "RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.0.0.2]:1161. This is
            # typically caused by ..." -> "RuntimeError: Connection closed by peer [10.0.0.2]:1161"
            reason = re.sub(r"\[[^\]\s]+:\d+\] ", "", " ".join(lost.split()))
            reason = re.split(r"(?<=[^.\s]{2})\. ", reason, maxsplit=1)[0].rstrip(".")
            gone = "a process on another machine stopped, or the network failed" if machines > 1 else "one stopped"
            what = f"training process rank {rank} (pid {failure.pid}) lost the other processes ({reason}): {gone}"
        else:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
            what = f"training process rank {rank} (pid {failure.pid}) {how}"
    return f"trl-nca train: {what}; the run stopped; {_last_checkpoint_text(output_dir, machines)}"


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
