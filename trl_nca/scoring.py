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

import importlib
import importlib.util
import math
import numbers
import re
import sys
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
    """Import the function named by `module:function` (an importable module) or `path/to/file.py:function`."""
    match = _FUNCTION_SPEC.match(spec)
    if match is None:
        raise RewardFunctionError(f"reward function `{spec}`: expected `module:function` or `file.py:function`.")
    module_name, name = match["module"], match["name"]
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RewardFunctionError(f"reward function `{spec}`: no file {path}.")
        module_spec = importlib.util.spec_from_file_location(f"_trl_nca_rewards_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise RewardFunctionError(f"reward function `{spec}`: cannot import `{module_name}` ({error}).") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardFunctionError(f"reward function `{spec}`: `{module_name}` has no function `{name}`.")
    return function


def source_name(source: Any) -> str:
    """A short name for a reward source: the function's name, or the reward model's folder/repository name."""
    if isinstance(source, str):
        return source.rsplit(":", 1)[-1] if is_function_spec(source) else Path(source.rstrip("/")).name
    return getattr(source, "__name__", None) or type(source).__name__


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
            raise RewardFunctionError(
                f"reward model {model_name_or_path}: expected one output label (a scalar score), found "
                f"{self.model.config.num_labels}; load it with num_labels=1 or use a reward function."
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if device is not None:
            self.model.to(device)
        self.batch_size = max(1, batch_size)
        self.chat_template_kwargs = chat_template_kwargs or {}

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        """What the reward model reads for each (prompt, completion)."""
        from trl.data_utils import apply_chat_template, is_conversational

        if prompts and is_conversational({"prompt": prompts[0]}):
            return [
                apply_chat_template({"messages": list(p) + list(c)}, self.tokenizer, **self.chat_template_kwargs)[
                    "text"
                ]
                for p, c in zip(prompts, completions, strict=True)
            ]
        return [p + c for p, c in zip(prompts, completions, strict=True)]

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
