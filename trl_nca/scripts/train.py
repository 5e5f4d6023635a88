"""Train a causal LM with NCA, InfoNCA or a listwise objective from a recipe YAML, the way ``trl dpo`` trains with DPO.

Usage (any launcher that ``accelerate`` supports; ``trl-nca train`` wraps the first form)::

    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml \
        -m trl_nca.scripts.train recipes/mistral-7b/nca_reward_full.yaml --learning_rate 1e-6
    python -m trl_nca.scripts.train recipes/tiny/nca_reward.yaml \
        --model_name_or_path path/to/tiny-model --dataset_name path/to/data

The YAML holds the defaults and command-line flags override them (``TrlParser``). Its keys are the fields of
[`NCAScriptArguments`] (below), of the trainer's config ([`~trl_nca.NCAConfig`], [`~trl_nca.InfoNCAConfig`] or
[`~trl_nca.ListwiseConfig`], i.e. every ``trl.DPOConfig`` / ``TrainingArguments`` field plus the loss's own options)
and of ``trl.ModelConfig``; an ``env:`` mapping is exported to the environment. The key
``trainer: nca | infonca | listwise`` picks the config class, so it is read before the
parser is built. Unknown keys and flags are errors.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trl_nca.cli_common import (
    TRAINERS,
    WATCH_PARENT_ENV,
    DatasetError,
    UsageError,
    did_you_mean,
    exit_on_interrupt,
    exit_process,
    hold_optional_kernel_logs,
    interrupted_line,
    interrupted_message,
    is_main_process,
    normalize_argv,
    peek_trainer,
    quiet_warnings,
    release_optional_kernel_logs,
    restore_interrupt,
)

if __name__ == "__main__":  # started by `trl-nca train`: Ctrl-C while importing torch and TRL is one line too
    exit_on_interrupt(lambda: interrupted_line("train", sys.argv[1:]))
hold_optional_kernel_logs()  # before trl imports peft and bitsandbytes: see `_quiet_optional_imports`

from trl import ModelConfig, ScriptArguments  # noqa: E402

from trl_nca.arguments import ScriptParser  # noqa: E402
from trl_nca.sources import (  # noqa: E402
    check_local_path,
    check_train_sources,
    load_model_config,
    load_raw_datasets,
)

if TYPE_CHECKING:
    from transformers import Trainer, TrainerCallback, TrainingArguments

logger = logging.getLogger(__name__)


#: ``dataset_format`` -> name of the row converter in ``trl_nca.converters`` (``None``: the trainers read it as is).
DATASET_FORMATS: dict[str, str | None] = {
    "reward": None,
    "preference": None,
    "ultrafeedback": "ultrafeedback_to_reward",
    "authors_reward": "authors_reward_to_reward",
    "authors_preference": "authors_preference_to_reward",
}

#: ``dataset_format`` -> the columns its rows must have (checked on the first row of each split before any conversion).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "reward": ("prompt", "completions", "rewards"),
    "preference": ("chosen", "rejected"),
    "ultrafeedback": ("instruction", "completions"),
    "authors_reward": ("A0", "score_A0"),
    "authors_preference": ("chosen", "rejected", "score_chosen", "score_rejected"),
}

#: Keys that only ``trl-nca train`` uses (to build the ``accelerate launch`` command); the script itself ignores them.
LAUNCHER_KEYS = ("accelerate_config", "num_processes")


@dataclass
class NCAScriptArguments(ScriptArguments):
    r"""
    Script arguments of ``trl_nca.scripts.train`` (on top of TRL's ``ScriptArguments``).

    Args:
        dataset_name (`str`):
            What to train on: a Hub dataset id, a local folder written by ``Dataset.save_to_disk`` /
            ``DatasetDict.save_to_disk``, a local folder of data files that ``datasets.load_dataset`` understands
            (``train.jsonl`` / ``test.jsonl``, ...), or a single ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file
            (or glob), which becomes the split named by ``dataset_train_split``.
        dataset_config (`str`, *optional*):
            Dataset configuration name (the ``name`` argument of ``datasets.load_dataset``).
        dataset_train_split (`str`, *optional*, defaults to `"train"`):
            Split to train on.
        dataset_test_split (`str`, *optional*, defaults to `"test"`):
            Split to evaluate on; only read when ``eval_strategy`` is not ``"no"``.
        dataset_streaming (`bool`, *optional*, defaults to `False`):
            Stream the dataset instead of downloading it (Hub datasets and data files only).
        ignore_bias_buffers (`bool`, *optional*, defaults to `False`):
            Let DDP ignore the model's boolean buffers (TRL's workaround for models that register causal masks).
        trainer (`str`, *optional*, defaults to `"nca"`):
            ``"nca"`` ([`~trl_nca.NCATrainer`] with [`~trl_nca.NCAConfig`]), ``"infonca"``
            ([`~trl_nca.InfoNCATrainer`] with [`~trl_nca.InfoNCAConfig`]) or ``"listwise"``
            ([`~trl_nca.ListwiseTrainer`] with [`~trl_nca.ListwiseConfig`]: Plackett-Luce, LiPO-λ, all-pairs DPO).
            Read before the other arguments, because it decides which config fields exist.
        dataset_format (`str`, *optional*, defaults to `"reward"`):
            Layout of the rows. ``"reward"`` (``prompt``, ``completions``, ``rewards``) and ``"preference"``
            (``prompt``/``chosen``/``rejected`` or implicit prompt) are read by the trainers directly.
            ``"ultrafeedback"`` (raw ``openbmb/UltraFeedback``), ``"authors_reward"`` (``A0..A3`` +
            ``score_A0..score_A3``, e.g. ``ChenDRAG/ultrafeedback_reward``) and ``"authors_preference"``
            (``ChenDRAG/ultrafeedback_preference``) are first converted to the reward format with
            ``trl_nca.converters``.
        callbacks (`list[str]`, *optional*):
            Extra ``transformers.TrainerCallback`` classes, as ``"module.path:ClassName"`` import strings; each is
            instantiated without arguments and added to the trainer.
        ref_model_name_or_path (`str`, *optional*):
            The reference model μ, when it is not the policy's own starting point: a Hub id or a local model folder,
            loaded with the policy's model arguments (``dtype``, ``attn_implementation``, ``trust_remote_code``,
            ``model_init_kwargs`` and the quantization of ``load_in_4bit`` / ``load_in_8bit``; not
            ``model_revision``, which names a revision of the policy's repository) and passed to the trainer as
            ``ref_model``. By default (unset) the reference is a frozen copy of the policy's initial weights, TRL's
            default (with PEFT: the base model with the adapter disabled). It must share the policy's vocabulary.
            It works under DeepSpeed and FSDP (the trainer wraps it as TRL's own reference) and with PEFT (the
            adapter then trains against this model instead of the adapter-free base, at the memory cost of a second
            copy, quantized like the policy). ``trl-nca iterate`` sets it for ``reference: initial``.
        accelerate_config (`str`, *optional*):
            Launcher-only: the accelerate config ``trl-nca train`` launches with, a path or a bundled name
            (``recipes/accelerate_configs/NAME.yaml``: ``zero3``, ``ddp``, ``cpu_zero3``, ...). Ignored by the script.
        num_processes (`int`, *optional*):
            Launcher-only: ``accelerate launch --num_processes``. The script only warns when the actual world size
            differs.
    """

    trainer: str = field(
        default="nca",
        metadata={"help": "Which trainer/config to use.", "choices": sorted(TRAINERS)},
    )
    dataset_format: str = field(
        default="reward",
        metadata={
            "help": "Row layout of the dataset; raw layouts are converted to the reward format first.",
            "choices": list(DATASET_FORMATS),
        },
    )
    callbacks: list[str] | None = field(
        default=None,
        metadata={"help": "Extra TrainerCallback classes as 'module.path:ClassName' (instantiated without args)."},
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Reference model (Hub id or folder), loaded like the policy; default: the policy's start."},
    )
    accelerate_config: str | None = field(
        default=None,
        metadata={"help": "Launcher-only (trl-nca train): accelerate config path or bundled name."},
    )
    num_processes: int | None = field(
        default=None,
        metadata={"help": "Launcher-only (trl-nca train): number of processes for accelerate launch."},
    )


def get_config_class(trainer: str) -> type[TrainingArguments]:
    """The config class (`NCAConfig`, `InfoNCAConfig` or `ListwiseConfig`) for a ``trainer`` name."""
    if trainer not in TRAINERS:
        raise ValueError(f"Unknown trainer {trainer!r}: choose one of {sorted(TRAINERS)}.")
    from trl_nca import config

    return getattr(config, TRAINERS[trainer][0])


def get_trainer_class(trainer: str) -> type:
    """The trainer class (`NCATrainer`, `InfoNCATrainer` or `ListwiseTrainer`) for a ``trainer`` name."""
    if trainer not in TRAINERS:
        raise ValueError(f"Unknown trainer {trainer!r}: choose one of {sorted(TRAINERS)}.")
    from trl_nca import trainer as trainer_module

    return getattr(trainer_module, TRAINERS[trainer][1])


def make_parser(trainer: str = "nca", prog: str | None = None) -> ScriptParser:
    """``TrlParser`` over (`NCAScriptArguments`, the trainer's config class, `trl.ModelConfig`)."""
    return ScriptParser((NCAScriptArguments, get_config_class(trainer), ModelConfig), prog=prog)


def parse_args(argv: Sequence[str] | None = None) -> tuple[NCAScriptArguments, TrainingArguments, ModelConfig]:
    """Parse ``[CONFIG.yaml] [--flag value ...]`` into (script args, trainer config, model config).

    Unknown YAML keys, unknown flags and invalid values raise `trl_nca.cli.UsageError` (with the closest known key),
    so typos in a recipe fail before any model is loaded.
    """
    args = normalize_argv(sys.argv[1:] if argv is None else argv)
    script_args, training_args, model_args = make_parser(peek_trainer(args)).parse_strictly(args)
    return script_args, training_args, model_args


def check_dataset_format(dataset: Any, dataset_format: str, split: str) -> str:
    """The format to read `split` with: `dataset_format` when its first row has that format's columns.

    Rows already in the reward format are read as such under a converter format (``ultrafeedback``, ``authors_*``),
    so data written by ``scripts/prepare_ultrafeedback.py`` trains with the recipes by changing only
    ``dataset_name`` (logged). Any other mismatch (reward rows given as ``preference``, raw UltraFeedback given as
    ``reward``, ...) is a `DatasetError` naming the format the columns look like.
    """
    from trl_nca.data import first_row

    columns = set(first_row(dataset, f"{split} split"))
    if set(FORMAT_COLUMNS[dataset_format]) <= columns:
        return dataset_format
    if DATASET_FORMATS[dataset_format] is not None and set(FORMAT_COLUMNS["reward"]) <= columns:
        logger.warning(
            "The %s split is already in the reward format (prompt, completions, rewards): reading it as "
            "dataset_format: reward instead of converting it from %s.",
            split,
            dataset_format,
        )
        return "reward"
    missing = [column for column in FORMAT_COLUMNS[dataset_format] if column not in columns]
    matching = [fmt for fmt, needed in FORMAT_COLUMNS.items() if fmt != dataset_format and set(needed) <= columns]
    hint = f"; the columns look like dataset_format: {matching[-1]}" if matching else ""
    raise DatasetError(
        f"dataset_format: {dataset_format} expects the columns {list(FORMAT_COLUMNS[dataset_format])}, but the "
        f"{split} split has {sorted(columns)} (missing {missing}){hint}. Set `dataset_format` to match the data."
    )


def convert_dataset_format(dataset: Any, dataset_format: str, num_proc: int | None = None) -> Any:
    """Map a raw layout (``ultrafeedback``, ``authors_*``) to the reward format; other formats pass through.

    ``dataset`` is a ``Dataset``/``IterableDataset`` or a dict of them; the original columns are dropped.
    """
    if dataset_format not in DATASET_FORMATS:
        raise ValueError(f"Unknown dataset_format {dataset_format!r}: choose one of {list(DATASET_FORMATS)}.")
    converter_name = DATASET_FORMATS[dataset_format]
    if converter_name is None:
        return dataset
    try:
        converters = importlib.import_module("trl_nca.converters")
    except ImportError as error:
        raise ImportError(
            f"dataset_format={dataset_format!r} needs `trl_nca.converters.{converter_name}`, which could not be "
            f"imported ({error}). Convert the data to the reward format (prompt, completions, rewards) yourself and "
            "use dataset_format='reward'."
        ) from error
    converter = getattr(converters, converter_name, None)
    if converter is None:
        raise ImportError(f"`trl_nca.converters` has no function {converter_name!r} for {dataset_format=}.")

    def _convert(split_dataset: Any) -> Any:
        from datasets import Dataset

        is_map_style = isinstance(split_dataset, Dataset)
        map_kwargs: dict[str, Any] = {"num_proc": num_proc} if is_map_style else {}
        converted = split_dataset.map(
            converter,
            remove_columns=split_dataset.column_names,
            **map_kwargs,
            **({"desc": f"Converting {dataset_format} rows to the reward format"} if is_map_style else {}),
        )
        # Converters drop responses without a usable score or text, so a row can end up with K < 2; such rows carry
        # no contrast and the trainers reject them.
        kept = converted.filter(
            lambda row: len(row["completions"]) >= 2,
            **map_kwargs,
            **({"desc": "Dropping rows with fewer than 2 scored responses"} if is_map_style else {}),
        )
        if is_map_style and len(kept) < len(converted):
            logger.warning(
                "Dropped %d of %d %s rows left with fewer than 2 scored, non-empty responses after conversion.",
                len(converted) - len(kept),
                len(converted),
                dataset_format,
            )
        return kept

    if isinstance(dataset, dict):
        return type(dataset)({split: _convert(split_dataset) for split, split_dataset in dataset.items()})
    return _convert(dataset)


def load_callbacks(specs: Sequence[str] | None) -> list[TrainerCallback]:
    """Instantiate ``"module.path:ClassName"`` callback specs (``transformers.TrainerCallback`` subclasses, created
    without arguments).

    A spec that gives no callback is a one-line `UsageError` naming it: not ``module:Class``, a module that is not
    found, a class the module lacks (with the closest name), a class that is no ``TrainerCallback`` or that needs
    arguments, and an error raised while the module is imported or the class created (with its file and line).
    """
    import inspect

    from transformers import TrainerCallback

    callbacks = []
    for spec in specs or []:
        module_name, _, class_name = spec.partition(":")
        if not module_name or not class_name.isidentifier():
            raise UsageError(f"callbacks: {spec!r} must look like 'module.path:ClassName' (a TrainerCallback class).")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name and (module_name + ".").startswith(error.name + "."):
                raise UsageError(
                    f"callbacks: {spec!r}: no module named {error.name!r} (run from the folder that holds it, add "
                    "that folder to PYTHONPATH, or install its package)."
                ) from None
            raise UsageError(f"callbacks: {spec!r}: importing {module_name} failed: {_raised(error)}") from None
        except Exception as error:  # the module itself raised: the user's code, one line with where
            raise UsageError(f"callbacks: {spec!r}: importing {module_name} failed: {_raised(error)}") from None
        callback_class = getattr(module, class_name, None)
        if callback_class is None:
            classes = [name for name, value in vars(module).items() if isinstance(value, type)]
            raise UsageError(
                f"callbacks: {spec!r}: {module_name} has no {class_name}{did_you_mean(class_name, classes)}."
            )
        if not (isinstance(callback_class, type) and issubclass(callback_class, TrainerCallback)):
            raise UsageError(f"callbacks: {spec!r}: {class_name} is not a transformers.TrainerCallback subclass.")
        try:
            inspect.signature(callback_class).bind()
        except TypeError as error:
            raise UsageError(
                f"callbacks: {spec!r}: {class_name}() cannot be created without arguments ({error}); callbacks are "
                "created with none: give its parameters defaults."
            ) from None
        except ValueError:  # no signature to read: let the call tell
            pass
        try:
            callbacks.append(callback_class())
        except Exception as error:
            raise UsageError(f"callbacks: {spec!r}: {class_name}() failed: {_raised(error)}") from None
    return callbacks


def _raised(error: BaseException) -> str:
    """``TypeName: first line of the message (file:line)``: the user's error in one line, where it was raised."""
    import traceback

    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    if isinstance(error, SyntaxError) and error.filename:
        return f"{text} ({error.filename}:{error.lineno})"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith("<")]
    return f"{text} ({frames[-1].filename}:{frames[-1].lineno})" if frames else text


def check_launch(training_args: TrainingArguments, expected_processes: int | None = None) -> None:
    """Fail loudly on the launch set-ups that exit 0 while training the wrong way.

    On a host without GPUs, ``accelerate launch`` with a MULTI_GPU config and no ``use_cpu``, or a DeepSpeed config
    without ``ddp_backend: gloo``, starts N processes that each train alone (duplicated, unsynchronised work), and
    an FSDP config silently falls back to no sharding. Each process compares the launcher's environment with the
    state accelerate actually built and raises if they disagree.
    """
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    _ = training_args.device  # builds accelerate's PartialState from the training arguments
    state = PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and state.num_processes != launched:
        raise RuntimeError(
            f"The launcher started {launched} processes but accelerate set up a {state.num_processes}-process "
            f"{state.distributed_type} run in each: every process would train alone on the full data. On a host "
            "without GPUs use `use_cpu: true` with a MULTI_GPU (DDP) accelerate config, or `ddp_backend: gloo` and "
            "`use_cpu: false` with a DeepSpeed config (recipes/accelerate_configs/cpu_ddp.yaml, cpu_zero3.yaml)."
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and (
        state.distributed_type != DistributedType.DEEPSPEED
    ):
        raise RuntimeError(
            f"The accelerate config asks for DeepSpeed but accelerate set up {state.distributed_type}. With DeepSpeed "
            "do not set `use_cpu: true`; on a host without GPUs set `ddp_backend: gloo` instead."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (
        state.distributed_type != DistributedType.FSDP
    ):
        raise RuntimeError(
            f"The accelerate config asks for FSDP but accelerate set up {state.distributed_type} (accelerate only "
            "applies FSDP on accelerators). Use a DeepSpeed ZeRO-3 config instead on this host."
        )
    if expected_processes is not None and expected_processes != state.num_processes:
        logger.warning(
            "The recipe asks for num_processes=%d but this run has %d process(es); the global batch size is "
            "per_device_train_batch_size x gradient_accumulation_steps x %d.",
            expected_processes,
            state.num_processes,
            state.num_processes,
        )


def _select_splits(raw: Any, script_args: NCAScriptArguments, training_args: TrainingArguments) -> tuple[Any, Any]:
    """The train split and, when evaluation is on, the test split of ``raw``; a `DatasetError` when one is missing."""
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split
    if train_split not in raw:
        raise DatasetError(
            f"dataset_train_split: {script_args.dataset_name} has no split {train_split!r}"
            f"{did_you_mean(train_split, raw)}; it has {sorted(raw)}."
        )
    train_dataset = raw[train_split]
    eval_dataset = None
    if training_args.eval_strategy != "no":
        if test_split not in raw:
            raise DatasetError(
                f"dataset_test_split: eval_strategy={training_args.eval_strategy!r} needs the split {test_split!r}"
                f"{did_you_mean(test_split, raw)}, but {script_args.dataset_name} has {sorted(raw)}. Set "
                "`dataset_test_split`, or `eval_strategy: no`."
            )
        eval_dataset = raw[test_split]
    return train_dataset, eval_dataset


def load_reference_model(name: str, training_args: TrainingArguments, model_args: ModelConfig) -> Any:
    """The reference model ``ref_model_name_or_path``, loaded as the trainer loads the policy.

    Same ``model_init_kwargs`` (dtype, attention, ``trust_remote_code``; without the policy's ``revision``), the same
    quantization config and, under DDP/DeepSpeed, ``device_map=None`` (as `trl.DPOTrainer` loads a model given by
    name; under ZeRO-3 it is partitioned as it loads, like the policy). A missing local folder, a Hub id that cannot
    be looked up (`trl_nca.sources.check_local_path`, `~trl_nca.sources.hub_lookup`) or a vocabulary that differs from
    the policy's is a `trl_nca.cli.UsageError`, raised before any weights are read.
    """
    from trl import get_quantization_config
    from trl.trainer.utils import create_model_from_path

    check_local_path(name, "ref_model_name_or_path")
    trust = training_args.trust_remote_code
    policy_config = load_model_config(
        model_args.model_name_or_path,
        "model_name_or_path",
        revision=model_args.model_revision,
        trust_remote_code=trust,
    )
    ref_config = load_model_config(name, "ref_model_name_or_path", trust_remote_code=trust)
    policy_vocab = getattr(policy_config.get_text_config(), "vocab_size", None)
    ref_vocab = getattr(ref_config.get_text_config(), "vocab_size", None)
    if policy_vocab != ref_vocab:
        raise UsageError(
            f"ref_model_name_or_path: {name} has a vocabulary of {ref_vocab} tokens and the policy "
            f"{model_args.model_name_or_path} one of {policy_vocab}; the reference scores the policy's tokens, so it "
            "must share its tokenizer."
        )
    kwargs = dict(training_args.model_init_kwargs or {})
    kwargs.pop("revision", None)  # a revision of the policy's repository
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if training_args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", trust)
    return create_model_from_path(name, **kwargs)


def main(script_args: NCAScriptArguments, training_args: TrainingArguments, model_args: ModelConfig) -> Trainer:
    """Load the data and the model, train with the chosen trainer, save (and push when asked); return the trainer."""
    from trl import get_peft_config, get_quantization_config

    from trl_nca.checkpoints import resolve_resume_checkpoint

    check_launch(training_args, script_args.num_processes)
    # A missing path, a Hub id that cannot load, an output_dir that is a file, a bad callback: one line each, at once.
    cache_dir = (training_args.model_init_kwargs or {}).get("cache_dir")
    check_train_sources(
        model_args.model_name_or_path,
        script_args.ref_model_name_or_path,
        script_args.dataset_name,
        training_args.output_dir,
        cache_dir=cache_dir,
        streaming=script_args.dataset_streaming,
    )
    callbacks = load_callbacks(script_args.callbacks)
    load_model_config(
        model_args.model_name_or_path,
        "model_name_or_path",
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        **({"cache_dir": cache_dir} if cache_dir else {}),
    )
    # A corrupt checkpoint fails here, named with the newest intact one, before any data or model is loaded.
    resume = resolve_resume_checkpoint(training_args.output_dir, training_args.resume_from_checkpoint)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    # The main process loads (downloads) and converts first; the others then read its cache files.
    with training_args.main_process_first(desc="loading and converting the dataset"):
        raw = load_raw_datasets(script_args)
        train_dataset, eval_dataset = _select_splits(raw, script_args, training_args)
        num_proc = training_args.dataset_num_proc
        fmt = script_args.dataset_format
        train_format = check_dataset_format(train_dataset, fmt, script_args.dataset_train_split)
        train_dataset = convert_dataset_format(train_dataset, train_format, num_proc)
        if eval_dataset is not None:
            eval_format = check_dataset_format(eval_dataset, fmt, script_args.dataset_test_split)
            eval_dataset = convert_dataset_format(eval_dataset, eval_format, num_proc)

    ref_model = None
    if script_args.ref_model_name_or_path:
        ref_model = load_reference_model(script_args.ref_model_name_or_path, training_args, model_args)
        reference = f"{script_args.ref_model_name_or_path} (ref_model_name_or_path)"
    else:
        reference = f"the initial weights of the policy {model_args.model_name_or_path}"
    if is_main_process():
        print(f"Reference model: {reference}", flush=True)

    trainer_cls = get_trainer_class(script_args.trainer)
    trainer = trainer_cls(
        model=model_args.model_name_or_path,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        callbacks=callbacks,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )

    if script_args.ignore_bias_buffers:
        import torch

        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]

    restore_interrupt()  # from here on an interruption names the last checkpoint (`run`)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if trainer.is_world_process_zero():
        # The log history next to the model, and the per-rank likelihood/reward/accuracy curves drawn from it.
        trainer.state.save_to_json(os.path.join(training_args.output_dir, "trainer_state.json"))
        try:
            from trl_nca.plotting import plot_run

            written = plot_run(training_args.output_dir)
            trainer.accelerator.print(f"Training curves: {', '.join(str(path) for path in written)}")
        except ImportError as error:  # matplotlib is the optional `plot` extra
            trainer.accelerator.print(f"Skipping the training curves: {error}")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to https://huggingface.co/{trainer.hub_model_id}.")
    # Every rank must be done (saving is collective under ZeRO-3, rank 0 still writes files) before the group goes.
    trainer.accelerator.wait_for_everyone()
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        trainer.end()
    return trainer


def _watch_parent() -> None:
    """Exit when the process that launched this one is gone (``trl-nca train`` killed): a daemon thread polls the
    parent pid every second, so no orphan keeps training and writing checkpoints."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(143)

    threading.Thread(target=watch, name="trl-nca-watch-parent", daemon=True).start()


def _quiet_optional_imports(model_args: ModelConfig) -> None:
    """bitsandbytes warns on import on some CPUs (its optional 4-bit CPU kernel is fetched from the Hub, which fails
    offline); peft imports it whenever it is installed. Those lines were held back since this module was imported:
    print them for runs that quantize, drop them for the others."""
    release_optional_kernel_logs(show=model_args.load_in_4bit or model_args.load_in_8bit)


def run(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and train; returns the exit status.

    A user error (command line, recipe, data, checkpoint) is printed as one line with status 2; an interruption
    (Ctrl-C) prints where the last checkpoint is and the command that resumes, with status 130.
    """
    from trl_nca.checkpoints import CheckpointError

    if os.environ.get(WATCH_PARENT_ENV) == "1":
        _watch_parent()
    quiet_warnings()
    output_dir = None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script_args, training_args, model_args = parse_args(argv)
        output_dir = training_args.output_dir
        _quiet_optional_imports(model_args)
        main(script_args, training_args, model_args)
    except (UsageError, DatasetError, CheckpointError) as error:
        if is_main_process():
            print(f"trl-nca train: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Under a multi-process launch the launcher prints this line once for all processes.
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            line = interrupted_message(output_dir) if output_dir else interrupted_line("train", argv)
            print(line, file=sys.stderr)
        return 130
    except Exception as error:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 or not lost_peer(error):
            raise
        # Another process of the run is gone (its machine died or was stopped, or the network failed): record the
        # error where torchrun's launcher reads it (its error file, traceback included) for `trl-nca train` to
        # report in one line, instead of a traceback from every surviving process.
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(error)
        return 1
    return 0


#: Words of the errors a collective raises when another process of the run is gone: gloo's and NCCL's for a closed
#: connection, a receive that timed out, a store (rendezvous) that cannot be reached.
LOST_PEER_WORDS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Connection refused",
    "Broken pipe",
    "remote process exited",
    "Timed out waiting",
    "Socket Timeout",
)


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` says that another process of a distributed run is gone (rather than a bug of this one)."""
    import torch.distributed as dist

    if isinstance(error, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(error, RuntimeError) and any(words in str(error) for words in LOST_PEER_WORDS)


if __name__ == "__main__":
    exit_process(run())
