"""The ``trl-nca`` console script.

Subcommands:

- ``trl-nca train CONFIG.yaml [--key value ...]``: launch ``trl_nca.scripts.train`` through ``accelerate launch``.
  ``CONFIG.yaml`` is a path or a bundled recipe name (``mistral-7b/nca_reward_qlora``). Flags override the recipe's
  values. ``--accelerate_config NAME|PATH`` and ``--num_processes N`` (flags or recipe keys) set the launcher, like
  ``trl dpo``; any other flag the training script does not know is passed to ``accelerate launch`` (for example
  ``--main_process_port 29511``).
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
import os
import site
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """usage: trl-nca <command> [<args>]

commands:
  train CONFIG.yaml [--key value ...]   train with NCA/InfoNCA through `accelerate launch`
                                        (--accelerate_config NAME|PATH, --num_processes N)
  demo ...                              run the offline demo (trl-nca demo -h)
  plot ...                              plot training logs (trl-nca plot -h)
"""

RECIPES_ENV = "TRL_NCA_RECIPES_DIR"


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
    raise FileNotFoundError(f"Recipe {name!s} is neither a file nor a bundled recipe (searched: {searched}).")


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
    raise FileNotFoundError(
        f"Accelerate config {name!s} is neither a file nor a bundled config (bundled: {', '.join(bundled) or 'none'})."
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


def build_launch_arguments(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``trl-nca train`` arguments into (``accelerate launch`` arguments, training-script arguments).

    The recipe and the flags are checked against the training script's parser (without building the configs, so no
    distributed state is created in the launcher): unknown recipe keys raise; unknown flags go to
    ``accelerate launch``; ``accelerate_config``/``num_processes`` become ``--config_file``/``--num_processes``. The
    recipe's ``env:`` mapping is exported so that the launcher and every process see it.
    """
    from trl_nca.scripts.train import make_parser, normalize_argv, peek_trainer, read_recipe

    script_argv = normalize_argv(argv)
    if "-h" in script_argv or "--help" in script_argv:
        make_parser(peek_trainer(script_argv), prog="trl-nca train").parse_args(["--help"])
    parser = make_parser(peek_trainer(script_argv), prog="trl-nca train")
    recipe = read_recipe(script_argv)
    env = recipe.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ValueError("The recipe's `env` must be a mapping of environment variables.")
    for key, value in env.items():
        os.environ[str(key)] = str(value)
    unknown_keys = parser.set_defaults_with_config(**recipe)
    if unknown_keys:
        raise ValueError(
            f"Unknown keys in the recipe: {unknown_keys[::2]}. Recipe keys must be fields of the script arguments, "
            "the trainer config or trl.ModelConfig (launcher options belong in the accelerate config)."
        )
    parse_argv = list(script_argv)
    if "--config" in parse_argv:
        index = parse_argv.index("--config")
        del parse_argv[index : index + 2]
    namespace, launcher_flags = parser.parse_known_args(parse_argv)

    launch_args: list[str] = []
    if namespace.accelerate_config:
        launch_args += ["--config_file", str(resolve_accelerate_config(namespace.accelerate_config))]
    if namespace.num_processes is not None:
        launch_args += ["--num_processes", str(namespace.num_processes)]
    launch_args += launcher_flags
    return launch_args, _remove_subsequence(script_argv, launcher_flags)


def train(argv: Sequence[str]) -> int:
    """``trl-nca train``: launch ``trl_nca.scripts.train`` with ``accelerate launch``; returns the exit status."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    launch_args, script_args = build_launch_arguments(argv)
    accelerate_args = launch_command_parser().parse_args(
        launch_args + ["--module", "trl_nca.scripts.train"] + script_args
    )
    try:
        launch_command(accelerate_args)
    except subprocess.CalledProcessError as error:
        return error.returncode or 1
    except Exception as error:  # torchrun's ChildFailedError and friends: accelerate already printed the details
        if type(error).__name__ == "ChildFailedError":
            return 1
        raise
    return 0


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
    if command == "train":
        return train(rest)
    if command == "demo":
        return _dispatch("trl_nca.demo.run", rest)
    if command == "plot":
        return _dispatch("trl_nca.plotting", rest)
    print(f"trl-nca: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
