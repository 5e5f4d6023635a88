"""Command-line and recipe parsing for the ``trl-nca`` verbs, and the fast check that reports a mistake in them before
torch and transformers are imported.

`ScriptParser` is TRL's `TrlParser` made strict: nothing unknown is accepted, and a mistake is one line naming the flag
or the recipe key the user wrote. Building the training parser needs the trainer configs (``trl.DPOConfig``, i.e.
transformers' ``TrainingArguments``, i.e. torch: 5-8 s). So every time it is built, its option table (names, types,
choices) is written to a small cache (`OptionTable`), keyed by the versions of the packages that define the options;
the next command checks its flags and recipe against that table in milliseconds, and only then imports the heavy
stack. Without a cache entry (the first command after an install or an upgrade) the check is skipped and the heavy
parser reports the same errors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trl import TrlParser  # light: no torch, no transformers.TrainingArguments

from trl_nca.cli_common import UsageError, cache_dir, did_you_mean, recipe_path

#: The packages whose versions decide the training parser's options (their fields and accelerate's launch flags).
_OPTION_PACKAGES = ("trl", "transformers", "accelerate")
#: trl_nca's own files that define options (a source checkout changes them without changing the version).
_OPTION_SOURCES = ("config.py", "generate_config.py", "arguments.py", "scripts/train.py")
_ARGUMENT_ERROR = re.compile(r"^argument (--[\w.-]+)(?:/--[\w.-]+)*: (.*)$", re.DOTALL)


def name_the_recipe_key(message: str, argv: Sequence[str], recipe: Mapping[str, Any], what: str = "recipe") -> str:
    """Rewrite argparse's ``argument --max_steps/--max-steps: invalid int value: 'four'`` as a mistake in the recipe's
    key ``max_steps`` when that value came from the recipe (the flag was not typed): the user never wrote the flag."""
    match = _ARGUMENT_ERROR.match(message)
    if not match:
        return message
    flag, reason = match.groups()
    key = flag[2:].replace("-", "_")
    typed = any(token.split("=", 1)[0] in (flag, f"--{key}", f"--{key.replace('_', '-')}") for token in argv)
    if typed or key not in recipe:
        return message
    return f"{what} {recipe_path(argv)}: key `{key}`: {reason}"


def parse_known_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str], recipe: Mapping[str, Any], what: str = "recipe"
) -> tuple[argparse.Namespace, list[str]]:
    """``parser.parse_known_args`` on the flags of a normalized `argv` (without ``--config FILE``; the recipe's values
    are the parser's defaults already); a bad value read from the `recipe` names its key (`name_the_recipe_key`)."""
    flags = list(argv)
    if "--config" in flags:
        index = flags.index("--config")
        del flags[index : index + 2]
    try:
        return parser.parse_known_args(flags)
    except UsageError as error:
        raise UsageError(name_the_recipe_key(str(error), argv, recipe, what)) from None


class ScriptParser(TrlParser):
    """`TrlParser` for the CLI: flags must be spelled out (no prefixes: ``--max_step`` is not ``--max_steps``) and a
    parse error raises `UsageError` (one line, exit status 2) instead of printing the whole usage."""

    def __init__(self, dataclass_types, **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)

    def error(self, message: str):
        raise UsageError(message)

    def field_names(self) -> list[str]:
        """Every recipe key: the dataclass fields."""
        return [action.dest for action in self._actions if action.option_strings and action.dest != "help"]

    def option_names(self) -> list[str]:
        """Every flag, spelled out."""
        return [option for action in self._actions for option in action.option_strings if option.startswith("--")]

    def parse_strictly(self, args: Sequence[str], what: str = "recipe") -> tuple:
        """``parse_args_and_config`` that accepts nothing unknown: an unknown key of the YAML file (`what`), an unknown
        flag, a bad value or a failed dataclass check is a `UsageError` naming the closest known name (a bad value
        read from the YAML file names its key there)."""
        from trl_nca.cli_common import read_recipe

        try:
            *parsed, unknown_keys, unknown_flags = self.parse_args_and_config(
                list(args), return_remaining_strings=True, separate_remaining_strings=True
            )
        except UsageError as error:
            raise UsageError(name_the_recipe_key(str(error), args, read_recipe(args), what)) from None
        except ValueError as error:  # the dataclasses' own checks (e.g. alpha < 0) and a malformed file
            raise UsageError(str(error)) from None
        if unknown_keys:
            key = unknown_keys[0].lstrip("-")
            raise UsageError(f"unknown key `{key}` in the {what}{did_you_mean(key, self.field_names())}.")
        flags = [token for token in unknown_flags if token.startswith("-")] or unknown_flags
        if flags:
            name = flags[0].split("=", 1)[0]
            raise UsageError(f"unknown flag `{name}`{did_you_mean(name, self.option_names())}.")
        return tuple(parsed)


def split_launcher_flags(
    unknown: Sequence[str], script_options: Iterable[str], launcher_options: Mapping[str, bool]
) -> list[str]:
    """The launcher (``accelerate launch``) flags among the tokens the training script does not know; a `UsageError`
    for any other token, with the closest known flag. `launcher_options` maps each launcher flag to whether it takes a
    value. Flags must be spelled out (no abbreviations)."""
    flags, index = [], 0
    while index < len(unknown):
        token = unknown[index]
        name = token.split("=", 1)[0]
        if name not in launcher_options:
            hint = did_you_mean(name, [*script_options, *launcher_options]) if name.startswith("--") else ""
            what = "flag" if name.startswith("--") else "argument"
            raise UsageError(f"unknown {what} `{name}`{hint}. See `trl-nca train RECIPE --help` for the flags.")
        flags.append(token)
        index += 1
        takes_value = launcher_options[name] and "=" not in token
        if takes_value and index < len(unknown) and not unknown[index].startswith("--"):
            flags.append(unknown[index])
            index += 1
    return flags


def _string_to_bool(value: str) -> bool:
    """transformers' ``string_to_bool`` (the same accepted spellings and message), without importing it."""
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


def _is_plain(value: Any) -> bool:
    """Whether `value` survives a JSON round trip unchanged (None, bool, int, float, str, or lists of them)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and all(_is_plain(item) and not isinstance(item, list) for item in value)


_TYPES = {"int": int, "float": float, "bool": _string_to_bool, "str": str}


def _type_name(action: argparse.Action) -> str:
    """How the light parser converts an option's value: ``int``, ``float``, ``bool``, else ``str`` (no check)."""
    if action.choices is not None:
        return "str"
    if action.type in (int, float):
        return action.type.__name__
    if getattr(action.type, "__name__", "") == "string_to_bool":
        return "bool"
    return "str"


@dataclass
class OptionTable:
    """What a parser accepts, enough to re-check a command line without the classes that define it: each option's
    flags, destination, value type (``int``/``float``/``bool``/``str``), choices and ``nargs``; and the launcher flags
    (name -> takes a value) that ``trl-nca train`` passes to ``accelerate launch``."""

    options: list[dict[str, Any]]
    launcher_options: dict[str, bool]

    @classmethod
    def from_parser(cls, parser: argparse.ArgumentParser, launcher_options: Mapping[str, bool]) -> OptionTable:
        options = []
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            choices = None if action.choices is None else [str(getattr(c, "value", c)) for c in action.choices]
            const = action.const if isinstance(action.const, (bool, int, float, str)) else None
            default = action.default if _is_plain(action.default) else None
            options.append(
                {
                    "flags": list(action.option_strings),
                    "dest": action.dest,
                    "type": _type_name(action),
                    "choices": choices,
                    "nargs": action.nargs,
                    "const": const,
                    "default": default,
                }
            )
        return cls(options=options, launcher_options=dict(launcher_options))

    def light_parser(self) -> argparse.ArgumentParser:
        """An `argparse` parser with the same options and conversions that raises `UsageError` on a mistake."""

        class _Parser(argparse.ArgumentParser):
            def error(self, message: str):
                raise UsageError(message)

        parser = _Parser(add_help=False, allow_abbrev=False)
        for option in self.options:
            if option["nargs"] == 0:  # store_true / store_false / store_const
                parser.add_argument(
                    *option["flags"],
                    dest=option["dest"],
                    action="store_const",
                    const=option["const"],
                    default=option.get("default"),
                )
                continue
            kwargs: dict[str, Any] = {
                "dest": option["dest"],
                "type": _TYPES[option["type"]],
                "default": option.get("default"),
            }
            if option["choices"] is not None:
                kwargs["choices"] = option["choices"]
            if option["nargs"] is not None:
                kwargs["nargs"] = option["nargs"]
            if option["nargs"] == "?":
                kwargs["const"] = option["const"]
            parser.add_argument(*option["flags"], **kwargs)
        return parser

    def parse(
        self, argv: Sequence[str], recipe: Mapping[str, Any], what: str = "recipe", unknown_key_hint: str = ""
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse `argv` (normalized: ``--config FILE`` first) over the `recipe` read from it as the full parser
        would: (the namespace, the launcher flags among the tokens). Raises the `UsageError` the full parser would
        raise: an unknown recipe key, an unknown flag (unless it is a launcher flag), a value of the wrong type or
        not among the choices (named by its recipe key when it came from the recipe)."""
        parser = self.light_parser()
        fields = [option["dest"] for option in self.options]
        for key in recipe:
            if key != "env" and key not in fields:
                raise UsageError(
                    f"unknown key `{key}` in the {what} {recipe_path(argv)}{did_you_mean(key, fields)}."
                    + unknown_key_hint
                )
        parser.set_defaults(**{key: value for key, value in recipe.items() if key in fields})
        namespace, unknown = parse_known_flags(parser, argv, recipe, what)
        script_options = [flag for option in self.options for flag in option["flags"] if flag.startswith("--")]
        return namespace, split_launcher_flags(unknown, script_options, self.launcher_options)

    # The cache.
    @staticmethod
    def cache_path(name: str) -> Path:
        """The cache file of the table called `name` for the installed package versions."""
        from importlib.metadata import PackageNotFoundError, version

        import trl_nca

        package_dir = Path(trl_nca.__file__).parent
        key_parts: list[str] = [trl_nca.__version__]
        for package in _OPTION_PACKAGES:
            try:
                key_parts.append(f"{package}=={version(package)}")
            except PackageNotFoundError:
                key_parts.append(f"{package} missing")
        for source in _OPTION_SOURCES:
            stat = (package_dir / source).stat()
            key_parts.append(f"{source}:{stat.st_size}:{stat.st_mtime_ns}")
        digest = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:16]
        return cache_dir() / f"options-{name}-{digest}.json"

    @classmethod
    def load(cls, name: str) -> OptionTable | None:
        """The cached table `name`, or ``None`` when there is none for these versions (or it cannot be read)."""
        try:
            data = json.loads(cls.cache_path(name).read_text())
            return cls(options=data["options"], launcher_options=data["launcher_options"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, name: str) -> None:
        """Write the table to the cache (atomically); a cache that cannot be written is skipped silently."""
        path = self.cache_path(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(f".{path.name}.{os.getpid()}")
            temporary.write_text(json.dumps({"options": self.options, "launcher_options": self.launcher_options}))
            os.replace(temporary, path)
        except OSError:
            pass
