"""Scoring completions: reward models and reward functions with GRPOTrainer's signature, combined with weights.

A reward source is called like `trl.GRPOTrainer` calls its `reward_funcs`:

    fn(prompts=[...], completions=[...], completion_ids=[...], **columns) -> list[float | None]

one entry per completion (the prompt repeated for each of its completions), the prompt dataset's other columns as
keyword arguments (repeated the same way), plus `trainer_state=None`, `log_extra` and `log_metric`, so a GRPO reward
function works unchanged. `None` means "no score": as in GRPO, the weighted sum skips it, and a completion no source
scores is dropped. A reward model (`AutoModelForSequenceClassification` with one label) is such a source too: the
conversation is rendered with its own tokenizer's chat template and scored in batches, as GRPO scores it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RewardFunction = Callable[..., list]

_FUNCTION_SPEC = re.compile(r"^(?P<module>[\w.]+|.+\.py):(?P<name>\w+)$")


class RewardFunctionError(ValueError):
    """A reward source cannot be loaded, or returned something that is not one score (or `None`) per completion."""


def is_function_spec(spec: str) -> bool:
    """Whether `spec` names a reward function (`module:function` or `path/to/file.py:function`) rather than a reward
    model (a local folder or a model id)."""
    return not Path(spec).is_dir() and _FUNCTION_SPEC.match(spec) is not None


def load_reward_function(spec: str) -> RewardFunction:
    """Import the function named by `module:function` (an importable module) or `path/to/file.py:function`.

    A file is executed once per process (a second load reuses the module). A file that does not compile or fails
    while it is imported is a `RewardFunctionError` naming the file and line.
    """
    match = _FUNCTION_SPEC.match(spec)
    if match is None:
        raise RewardFunctionError(f"reward function `{spec}`: expected `module:function` or `file.py:function`.")
    module_name, name = match["module"], match["name"]
    if module_name.endswith(".py"):
        module = _load_file(spec, Path(module_name))
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise RewardFunctionError(f"reward function `{spec}`: cannot import `{module_name}` ({error}).") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardFunctionError(f"reward function `{spec}`: `{module_name}` has no function `{name}`.")
    return function


def _load_file(spec: str, path: Path) -> Any:
    """The module of a reward-function file, executed on its first load (a load after the file changed executes it
    again)."""
    if not path.is_file():
        raise RewardFunctionError(f"reward function `{spec}`: no file {path}.")
    key = hashlib.sha256(str(path.resolve()).encode() + b"\0" + path.read_bytes()).hexdigest()[:16]
    module_name = f"_trl_nca_rewards_{path.stem}_{key}"
    loaded = sys.modules.get(module_name)
    if loaded is not None:
        return loaded
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        del sys.modules[module_name]
        raise RewardFunctionError(
            f"reward function `{spec}`: syntax error in {error.filename or path}:{error.lineno}: {error.msg}."
        ) from None
    except Exception as error:
        del sys.modules[module_name]
        frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
        where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else str(path)
        raise RewardFunctionError(
            f"reward function `{spec}`: importing {path} failed at {where}: {type(error).__name__}: {error}"
        ) from None
    return module


def source_name(source: Any) -> str:
    """A short name for a reward source: the function's name, or the reward model's folder/repository name."""
    if isinstance(source, str):
        return source.rsplit(":", 1)[-1] if is_function_spec(source) else Path(source.rstrip("/")).name
    return getattr(source, "__name__", None) or type(source).__name__


def reward_model_texts(
    tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any], chat_template_kwargs: dict | None = None
) -> list[str]:
    """What a reward model reads for each (prompt, completion): the conversation rendered with the reward model's own
    chat template, or prompt + completion for text rows (as GRPOTrainer renders them)."""
    from trl.data_utils import apply_chat_template, is_conversational

    if prompts and is_conversational({"prompt": prompts[0]}):
        return [
            apply_chat_template({"messages": list(p) + list(c)}, tokenizer, **(chat_template_kwargs or {}))["text"]
            for p, c in zip(prompts, completions, strict=True)
        ]
    return [p + c for p, c in zip(prompts, completions, strict=True)]


def _labels_error(model_name_or_path: str, num_labels: int) -> RewardFunctionError:
    return RewardFunctionError(
        f"reward model `{model_name_or_path}`: expected one output label (a scalar score), found {num_labels}; load "
        "it with num_labels=1 or use a reward function."
    )


class RewardModel:
    """A sequence-classification reward model as a reward source (`fn(prompts, completions, **kwargs)`).

    Conversational rows are rendered with the reward model's own chat template (prompt + completion messages), text
    rows are concatenated; both are tokenized without adding special tokens and scored in batches of `batch_size`,
    right-padded, as GRPOTrainer scores them. The score is the model's single logit.
    """

    def __init__(
        self,
        model_name_or_path: str,
        batch_size: int = 8,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.__name__ = source_name(model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_name_or_path, dtype=dtype).eval()
        if self.model.config.num_labels != 1:
            raise _labels_error(model_name_or_path, self.model.config.num_labels)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if device is not None:
            self.model.to(device)
        self.batch_size = max(1, batch_size)
        self.chat_template_kwargs = chat_template_kwargs or {}

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        """What the reward model reads for each (prompt, completion)."""
        return reward_model_texts(self.tokenizer, prompts, completions, self.chat_template_kwargs)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        texts = self.texts(prompts, completions)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self.tokenizer(
                text=texts[start : start + self.batch_size],
                return_tensors="pt",
                padding=True,
                padding_side="right",
                add_special_tokens=False,
            ).to(self.model.device)
            scores.extend(self.model(**inputs).logits[:, 0].float().tolist())
        return scores

    def close(self) -> None:
        """Free the model."""
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_scores(name: str, scores: Any, rows: Sequence[int], positions: Sequence[int]) -> list[float | None]:
    """Validate one source's output for a batch of completions: one real number or `None` per completion.

    `rows[i]`/`positions[i]` locate completion `i` (prompt dataset row, index among that prompt's completions) for the
    error message. Bools count as 1/0. Raises `RewardFunctionError`.
    """
    if isinstance(scores, torch.Tensor):
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise RewardFunctionError(
            f"reward function `{name}` returned {type(scores).__name__}; expected a list, one score per completion."
        )
    if len(scores) != len(rows):
        raise RewardFunctionError(
            f"reward function `{name}` returned {len(scores)} scores for {len(rows)} completions (prompt rows "
            f"{min(rows)}-{max(rows)}); expected one score (or None) per completion."
        )
    checked: list[float | None] = []
    for score, row, position in zip(scores, rows, positions, strict=True):
        if score is None:
            checked.append(None)
            continue
        if isinstance(score, torch.Tensor) and score.numel() == 1:
            score = score.item()
        if not isinstance(score, numbers.Real) or not math.isfinite(float(score)):
            raise RewardFunctionError(
                f"reward function `{name}` returned {score!r} for row {row}, completion {position}; expected a finite "
                "number, or None for no score."
            )
        checked.append(float(score))
    return checked


def combine_scores(per_source: Sequence[Sequence[float | None]], weights: Sequence[float]) -> list[float | None]:
    """Weighted sum over the sources that scored each completion (GRPO's `nansum`); `None` if none did."""
    combined: list[float | None] = []
    for values in zip(*per_source, strict=True):
        scored = [w * v for v, w in zip(values, weights, strict=True) if v is not None]
        combined.append(math.fsum(scored) if scored else None)
    return combined


def call_source(
    name: str,
    source: RewardFunction,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Sequence[int]],
    columns: dict[str, Sequence[Any]],
    rows: Sequence[int],
    positions: Sequence[int],
    metrics: dict[str, list[float]] | None = None,
) -> list[float | None]:
    """Call one reward source with GRPOTrainer's arguments and validate its output (see the module docstring).

    `log_metric(name, value)` calls are collected in `metrics`; `log_extra` is accepted and ignored (there is no
    completions table to add a column to).
    """

    def log_metric(metric: str, value: float) -> None:
        if metrics is not None:
            metrics.setdefault(f"{name}/{metric}", []).append(float(value))

    def log_extra(column: str, values: list) -> None:
        return None

    scores = source(
        prompts=list(prompts),
        completions=list(completions),
        completion_ids=[list(ids) for ids in completion_ids],
        trainer_state=None,
        log_extra=log_extra,
        log_metric=log_metric,
        **{key: list(values) for key, values in columns.items()},
    )
    return check_scores(name, scores, rows, positions)


# ---------------------------------------------------------------------------------------------------------------------
# Checks before sampling: a reward source that cannot score must fail before a sampling pass, not after it
# ---------------------------------------------------------------------------------------------------------------------

#: The keyword arguments GRPOTrainer passes every reward function, besides the prompt dataset's other columns.
GRPO_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def placeholder_completion(prompt: Any) -> Any:
    """A one-token stand-in completion of `prompt` (an assistant message for a conversational prompt)."""
    return [{"role": "assistant", "content": "0"}] if isinstance(prompt, list) else "0"


def check_reward_model(spec: str, prompt: Any, chat_template_kwargs: dict[str, Any] | None = None) -> None:
    """Check a reward model without loading its weights: its config (found, one label) and its tokenizer, which must
    render `prompt` with a completion as `RewardModel` renders it. Raises `RewardFunctionError` (one line)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as error:
        if Path(spec).expanduser().is_dir():
            what = f"the folder holds no model config ({_first_line(error)})"
        else:
            what = f"no such folder, and no model of that id on the Hub ({_first_line(error)})"
        raise RewardFunctionError(
            f"reward model `{spec}`: {what}; `reward_funcs` takes reward-model folders or Hub ids, and reward "
            "functions as `module:function` or `path/to/file.py:function`."
        ) from None
    if config.num_labels != 1:
        raise _labels_error(spec, config.num_labels)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as error:
        raise RewardFunctionError(
            f"reward model `{spec}`: cannot load its tokenizer ({_first_line(error)})."
        ) from None
    try:
        reward_model_texts(tokenizer, [prompt], [placeholder_completion(prompt)], chat_template_kwargs)
    except Exception as error:
        raise RewardFunctionError(
            f"reward model `{spec}`: its tokenizer cannot render a prompt and its completion for scoring "
            f"({_first_line(error)}); give it a chat template."
        ) from None


def _where(function: Any) -> str:
    """`file:line` of a function's definition (what a user opens to fix it), or its name."""
    try:
        target = inspect.unwrap(function)
        if not (inspect.isfunction(target) or inspect.ismethod(target)):
            target = type(target).__call__ if not inspect.isclass(target) else target
        return f"{inspect.getsourcefile(target)}:{inspect.getsourcelines(target)[1]}"
    except (OSError, TypeError):
        return getattr(function, "__qualname__", None) or type(function).__name__


def check_reward_function(name: str, function: RewardFunction, prompt: Any, columns: dict[str, Any]) -> None:
    """Check that GRPOTrainer's call can reach `function`: every required parameter is a GRPO argument or one of the
    prompt dataset's `columns` (the first row's values), and every keyword argument is accepted (by name or by
    `**kwargs`). A function taking `**kwargs` whose source reads `kwargs["name"]` for a column the prompts lack is
    called once on a placeholder completion of the first prompt: a `KeyError` for that column is the error (a read
    guarded by `if "name" in kwargs` passes). Raises `RewardFunctionError` (one line)."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):  # a builtin or extension callable: nothing to read
        return
    passed = [*GRPO_ARGUMENTS, *columns]
    available = ", ".join(["prompt", *columns])
    kind = inspect.Parameter
    where = _where(function)
    for parameter in parameters:
        if parameter.kind is kind.POSITIONAL_ONLY and parameter.default is kind.empty:
            raise RewardFunctionError(
                f"reward function `{name}` ({where}) takes `{parameter.name}` as a positional-only parameter; "
                "GRPOTrainer passes every argument by keyword: make it an ordinary parameter."
            )
    named = {p.name for p in parameters if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY)}
    needed = [
        p.name
        for p in parameters
        if p.kind in (kind.POSITIONAL_OR_KEYWORD, kind.KEYWORD_ONLY) and p.default is kind.empty
    ]
    missing = [p for p in needed if p not in passed]
    if missing:
        raise RewardFunctionError(
            f"reward function `{name}` ({where}) needs the dataset column `{missing[0]}`, which the prompts lack "
            f"(columns: {available}); add it to the prompt dataset."
        )
    var_keyword = next((p.name for p in parameters if p.kind is kind.VAR_KEYWORD), None)
    if var_keyword is None:
        refused = [a for a in passed if a not in named]
        if refused:
            listed = ", ".join(f"`{a}`" for a in refused)
            raise RewardFunctionError(
                f"reward function `{name}` ({where}) cannot take the keyword arguments {listed} that GRPOTrainer "
                "passes (with the prompt dataset's columns); add `**kwargs` to its signature."
            )
        return
    # Columns read as kwargs["name"] do not show in the signature: look for such reads of a column the prompts lack,
    # and only then call the function once on a placeholder completion, to tell a read that fails from one guarded by
    # `if "name" in kwargs` (a function that reads no missing column is never called here).
    suspects = {key: line for key, line in _keyword_reads(function, var_keyword).items() if key not in passed}
    if not suspects:
        return
    try:
        function(
            prompts=[prompt],
            completions=[placeholder_completion(prompt)],
            completion_ids=[[]],
            trainer_state=None,
            log_extra=lambda column, values: None,
            log_metric=lambda metric, value: None,
            **{column: [value] for column, value in columns.items()},
        )
    except KeyError as error:
        key = error.args[0] if len(error.args) == 1 else None
        if isinstance(key, str) and key in suspects:
            raise RewardFunctionError(
                f"reward function `{name}` ({where}) reads the dataset column `{key}` (`{var_keyword}[{key!r}]` at "
                f"{suspects[key]}), which the prompts lack (columns: {available}); add it to the prompt dataset."
            ) from None
    except Exception:  # the placeholder completion may upset the function otherwise: not a reason to stop
        pass


def _keyword_reads(function: Any, var_keyword: str) -> dict[str, str]:
    """The keys a function reads from its `**kwargs` dict as `kwargs["key"]` or `kwargs.pop("key")` (no default),
    found in its source, each with the `file:line` of its first read; empty when the source is not available."""
    import ast
    import textwrap

    try:
        target = inspect.unwrap(function)
        lines, first = inspect.getsourcelines(target)
        tree = ast.parse(textwrap.dedent("".join(lines)))
        file = inspect.getsourcefile(target)
    except (OSError, TypeError, SyntaxError):  # no source (builtins, a lambda inside an expression, ...)
        return {}

    def is_kwargs(node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == var_keyword

    reads: dict[str, str] = {}
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) and is_kwargs(node.value):
            key = node.slice.value if isinstance(node.slice, ast.Constant) else None
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "pop"
            and is_kwargs(node.func.value)
            and len(node.args) == 1
            and not node.keywords
            and isinstance(node.args[0], ast.Constant)
        ):
            key = node.args[0].value
        if isinstance(key, str):
            location = f"{file}:{first + node.lineno - 1}"
            reads[key] = min(reads.get(key, location), location, key=lambda loc: int(loc.rsplit(":", 1)[1]))
    return reads
