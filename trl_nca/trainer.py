"""NCATrainer, InfoNCATrainer and ListwiseTrainer: `trl.DPOTrainer` subclasses that train on K scored responses per
prompt.

They reuse everything DPOTrainer does (model/ref-model/PEFT/quantization setup, DeepSpeed and FSDP handling of the
reference model, the fused LM head, metrics logging, evaluation, checkpoints and the model card) and override only the
hooks that hard-code chosen/rejected pairs: dataset preparation, signature columns, reference log-prob
(pre)computation and the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import textwrap
from collections.abc import Callable

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, is_peft_model
from datasets import Dataset, IterableDataset, concatenate_datasets
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin
from transformers.utils import logging
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import get_config_model_id, use_adapter

from . import losses
from .attention import FLEX_BLOCK_SIZE, attention_windows, layout_attention_mask, router_token_mask
from .callbacks import label_progress_bars
from .checkpoints import resolve_resume_checkpoint
from .collator import DataCollatorForKWayReward
from .config import InfoNCAConfig, ListwiseConfig, NCAConfig, _KWayConfig
from .data import first_row, prepare_dataset
from .layout import (
    batch_layout,
    check_examples,
    grouped_examples,
    largest_excess,
    layout_kind,
    unsupported_reason,
)
from .moe import declares_router_logits, load_balancing_loss, record_router_logits

logger = logging.get_logger(__name__)

# The packed padded layout's sequence boundaries (`collator.varlen_kwargs`) go to the model too: FlashAttention would
# otherwise re-derive them from `position_ids` with device syncs in every layer; other attention ignores them.
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", *_VARLEN_KEYS)
_MASKABLE_ATTENTION = ("sdpa", "eager", "flex_attention")
# Model-input keys of the layouts (see `trl_nca.collator`); the other batch keys are per prompt.
_LAYOUT_KEYS = (*_MODEL_INPUT_KEYS, "completion_mask", "sequence_ids", "branch_ids", "response_ids", "padding_mask")


def resolve_layout(args: _KWayConfig, model, peft_config=None) -> tuple[str, bool]:
    """Pick the collator layout for `args.kway_layout` and the model; returns (layout, padding_free).

    `"auto"` falls back to `"padded"` (logging why) when the shared-prompt layout cannot be exact; a layout asked for
    explicitly that cannot be exact (`"shared_prompt"`, or `"padded"` with `padding_free=True`) raises with the same
    reason. A fallback caused by FlashAttention is packed (`padding_free`): FlashAttention's variable-length path then
    computes no padding. A fallback caused by the architecture (`layout.unsupported_reason`) is never packed: packing
    needs what sharing needs. The trainer checks the choice again on the first batch (`_exact_layout`).
    """
    padding_free = bool(args.padding_free)
    if args.kway_layout == "padded" and not padding_free:
        return "padded", False
    if isinstance(model, str):
        config = AutoConfig.from_pretrained(model, trust_remote_code=args.trust_remote_code)
    else:
        config = model.config
    architecture = unsupported_reason(config, None if isinstance(model, str) else model)
    if args.kway_layout == "padded":
        if architecture is not None:
            raise ValueError(f"padding_free=True cannot be exact here: {architecture}. Set padding_free=False.")
        return "padded", True
    attn = _attn_implementation(args, model)
    peft_type = getattr(peft_config, "is_prompt_learning", False) or getattr(
        getattr(model, "active_peft_config", None), "is_prompt_learning", False
    )
    reason = architecture or _sharing_obstacle(args, config, attn, peft_type)
    if reason is None:
        return "shared_prompt", padding_free
    if args.kway_layout == "shared_prompt":
        raise ValueError(f"kway_layout='shared_prompt' cannot be used here: {reason}.")
    packed = (padding_free or "flash" in attn) and architecture is None
    _log_fallback(("padded", packed), reason, unpacked=padding_free and not packed)
    return "padded", packed


def _sharing_obstacle(args: _KWayConfig, config, attn: str, prompt_learning: bool) -> str | None:
    """Why the shared-prompt layout cannot be used beyond the architecture: attention kernel, PEFT, truncation."""
    if attn not in _MASKABLE_ATTENTION:
        return f"attn_implementation={attn!r} takes no custom attention mask (use sdpa, eager or flex_attention)"
    if prompt_learning:
        return "prompt-learning PEFT prepends virtual tokens, which the shared-prompt positions do not account for"
    if args.max_length is not None and args.truncation_mode != "keep_start" and args.max_prompt_length is None:
        return "truncation_mode='keep_end' would keep a different part of the prompt for each response"
    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder models are not supported by the shared-prompt layout"
    return None


def _log_fallback(layout: tuple[str, bool], reason: str, unpacked: bool = False) -> None:
    packed = ", packed" if layout[1] else (", not packed despite padding_free=True" if unpacked else "")
    logger.warning_once(
        f"Using the padded K-way layout (the prompt is computed once per response{packed}) because {reason}."
    )


def _attn_implementation(args: _KWayConfig, model) -> str:
    if isinstance(model, str):
        return (args.model_init_kwargs or {}).get("attn_implementation") or "sdpa"
    return getattr(model.config, "_attn_implementation", None) or "sdpa"


# torch's memory-efficient sdpa kernel needs the mask's row stride to be a multiple of 8 elements, or it pads the mask
# into a new buffer on every call: `preprocess_mask` (`mem_eff_alignment = 8`) in
# aten/src/ATen/native/transformers/attention.cpp; inductor mirrors it (`ALIGNMENT = 8`, torch/_inductor/lowering.py).
_SDPA_MASK_ALIGNMENT = 8


def _pad_multiple(args: _KWayConfig, model, layout: str) -> int | None:
    """`pad_to_multiple_of`, rounded up to what the attention kernel wants of the rows: FlexAttention's block size
    under flex_attention (see `attention`), sdpa's mask alignment for the shared-prompt layout's mask under sdpa."""
    attn = _attn_implementation(args, model)
    if attn == "flex_attention":
        return math.lcm(args.pad_to_multiple_of or 1, FLEX_BLOCK_SIZE)
    if attn == "sdpa" and layout == "shared_prompt":
        return math.lcm(args.pad_to_multiple_of or 1, _SDPA_MASK_ALIGNMENT)
    return args.pad_to_multiple_of


def _vocabulary_size(model) -> int | None:
    """A model's vocabulary size: its text config's `vocab_size` (which `resize_token_embeddings` keeps up to date, and
    which stays whole where ZeRO-3 partitions the embedding or PEFT wraps the model), else the rows of its output
    embedding (their logical shape under ZeRO-3); None when it has neither."""
    config = getattr(model, "config", None)
    size = getattr(config.get_text_config(), "vocab_size", None) if config is not None else None
    if size is not None:
        return int(size)
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        return None
    return int((getattr(weight, "ds_shape", None) or weight.shape)[0])


def _check_reference_vocabulary(model, ref_model, args: _KWayConfig) -> None:
    """A `ValueError` naming both sizes when `ref_model` and the policy `model` (an instance or a name, read from its
    config) have vocabularies of different sizes: the reference scores the policy's token ids, so it must share the
    policy's tokenizer (as `trl-nca train` checks for `ref_model_name_or_path`)."""
    if isinstance(model, str):
        init_kwargs = args.model_init_kwargs or {}
        model = AutoConfig.from_pretrained(
            model, revision=init_kwargs.get("revision"), trust_remote_code=args.trust_remote_code
        )
        policy_size = getattr(model.get_text_config(), "vocab_size", None)
    else:
        policy_size = _vocabulary_size(model)
    ref_size = _vocabulary_size(ref_model)
    if policy_size is not None and ref_size is not None and policy_size != ref_size:
        raise ValueError(
            f"The reference model `ref_model` has a vocabulary of {ref_size} tokens and the policy one of "
            f"{policy_size}: the reference scores the policy's tokens, so it must share the policy's tokenizer. Pass "
            "a reference of the policy's model family, or no `ref_model` (the policy's initial weights)."
        )


def count_tied_rows(rewards) -> int:
    """The number of rows of a `rewards` list column (a pyarrow `ChunkedArray` or `Array` of lists of numbers) whose
    rewards are all equal, computed over the Arrow buffers (one numpy reduction, no Python copy of the rows)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = rewards.chunks if isinstance(rewards, pa.ChunkedArray) else [rewards]
    tied = 0
    for chunk in chunks:
        lengths = pc.list_value_length(chunk).to_numpy(zero_copy_only=False)
        values = pc.list_flatten(chunk).to_numpy(zero_copy_only=False)
        starts = (np.cumsum(lengths) - lengths)[lengths > 0]
        if starts.size:
            tied += int(np.count_nonzero(np.minimum.reduceat(values, starts) == np.maximum.reduceat(values, starts)))
    return tied


_NCA_CITATION = textwrap.dedent(
    """\
    @inproceedings{chen2024noise,
        title        = {{Noise Contrastive Alignment of Language Models with Explicit Rewards}},
        author       = {Huayu Chen and Guande He and Lifan Yuan and Ganqu Cui and Hang Su and Jun Zhu},
        year         = 2024,
        booktitle    = {Advances in Neural Information Processing Systems 38 (NeurIPS 2024)},
        eprint       = {arXiv:2402.05369},
    }"""
)


class _KWayRewardTrainer(DPOTrainer):
    """Shared base of the K-way trainers; they differ only in their losses (`_per_prompt_loss`) and card metadata."""

    _config_class: type[_KWayConfig]
    _loss_fn: Callable[..., torch.Tensor]
    _paper = {
        "title": "Noise Contrastive Alignment of Language Models with Explicit Rewards",
        "id": "2402.05369",
        "citation": _NCA_CITATION,
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: _KWayConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self._config_class(f"{model_name.split('/')[-1]}-{self._name}")
        if not isinstance(args, self._config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self._config_class.__name__} (a DPOConfig subclass), got "
                f"{type(args).__name__}. Replace `DPOConfig(...)` with "
                f"`{self._config_class.__name__}(...)`; every DPOConfig field keeps its meaning."
            )
        if isinstance(train_dataset, (Dataset, IterableDataset)):
            sample = first_row(train_dataset, "train")
            if "image" in sample or "images" in sample:
                raise ValueError(
                    "The dataset appears to be vision-related (contains 'image' or 'images' keys), but "
                    f"{type(self).__name__} does not support vision-language models or image inputs."
                )
        if ref_model is not None:
            _check_reference_vocabulary(model, ref_model, args)
        # Batches hold per-prompt and per-sequence tensors of different lengths, which accelerate's batch dispatching
        # (its default for streamed datasets) would slice alike; each process reads its own batches instead.
        if args.accelerator_config.dispatch_batches is True:
            logger.warning(
                f"`dispatch_batches=True` is not supported by {type(self).__name__} (its batches mix per-prompt and "
                "per-sequence tensors) and is set to False. Unset `dispatch_batches` to remove this warning."
            )
        args.accelerator_config.dispatch_batches = False

        # The collator must exist before DPOTrainer.__init__, which precomputes reference log-probs with it, so the
        # tokenizer (and its pad token) is resolved here the way DPOTrainer resolves it.
        if processing_class is None:
            model_id = model if isinstance(model, str) else get_config_model_id(model.config)
            processing_class = AutoProcessor.from_pretrained(model_id, trust_remote_code=args.trust_remote_code)
        if isinstance(processing_class, ProcessorMixin):
            tokenizer = processing_class.tokenizer
        elif isinstance(processing_class, PreTrainedTokenizerBase):
            tokenizer = processing_class
        else:
            raise TypeError("The `processing_class` must be either a `PreTrainedTokenizerBase` or a `ProcessorMixin`")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if data_collator is None:
            pad_token = args.pad_token or tokenizer.pad_token
            if pad_token not in tokenizer.get_vocab():
                raise ValueError(
                    f"The specified `pad_token` ('{pad_token}') is not found in the vocabulary of the given "
                    f"`processing_class` ({processing_class.__class__.__name__}). Ensure that the `pad_token` exists "
                    "in the vocabulary before using it as a padding token."
                )
            layout, packed = resolve_layout(args, model, peft_config)
            data_collator = DataCollatorForKWayReward(
                pad_token_id=tokenizer.convert_tokens_to_ids(pad_token),
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=_pad_multiple(args, model, layout),
                layout=layout,
                padding_free=packed,
                max_prompt_length=args.max_prompt_length,
            )
        self.alpha = getattr(args, "alpha", None)  # NCA/InfoNCA reward temperature; None for listwise losses
        self._mask_cache: tuple | None = None
        self._layout_checked: set[int] = set()  # ids of the models the layout was checked for (`_exact_layout`)
        # DPOTrainer 1.16 turns `padding_free` off with a warning ("temporarily unavailable"); the K-way collator
        # implements it, so the parent is shown False and the user's value is restored afterwards.
        padding_free, args.padding_free = args.padding_free, False
        try:
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        finally:
            args.padding_free = padding_free
        self.padding_free = padding_free
        label_progress_bars(self, f"{self._name} training")

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, with the checkpoint to resume from checked first: a truncated or corrupt checkpoint raises
        a `CheckpointError` naming it and the newest intact checkpoint instead of failing inside the loader."""
        resume_from_checkpoint = resolve_resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
        attn = getattr(self.accelerator.unwrap_model(self.model).config, "_attn_implementation", None)
        if attn == "flex_attention" and self.accelerator.device.type == "cpu":
            raise ValueError(
                f"attn_implementation='flex_attention' cannot train on CPU: torch {torch.__version__} has no "
                "FlexAttention backward pass there. Train on a GPU, or load the model with attn_implementation='sdpa'."
            )
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    # ------------------------------------------------------------------------------------------------ model card
    def _reference_description(self) -> str:
        """The reference model for the card: the policy's starting weights, or the other model the user passed."""
        names = []
        for model in (self.model, self.ref_model):
            config = getattr(self.accelerator.unwrap_model(model), "config", None)
            names.append(getattr(config, "_name_or_path", "") or "")
        policy_name, ref_name = names
        if not ref_name or ref_name == policy_name:
            return "a frozen copy of the initial model"
        return f"`{ref_name}` (frozen)"

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        """TRL's model card plus the NCA/InfoNCA hyper-parameters (α, β, K, losses, layout) and trl-nca's version."""
        super().create_model_card(model_name=model_name, dataset_name=dataset_name, tags=tags)
        path = os.path.join(self.args.output_dir, "README.md")
        if not self.is_world_process_zero() or not os.path.exists(path):
            return
        from . import __version__

        if self.precompute_ref_logps:
            reference = "precomputed once from the reference model"
        elif self.ref_model is None:
            reference = "the base model with the adapter disabled"
        else:
            reference = self._reference_description()
        ks = self._responses_per_prompt()
        layout = getattr(self.data_collator, "layout", "custom collator")
        global_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        global_batch *= self.args.world_size
        section = "\n".join(
            [
                "### Training hyper-parameters",
                "",
                f"- loss: {' + '.join(f'{w:g} × {t}' for t, w in zip(self.loss_types, self.loss_weights))}",
                *self._card_loss_lines(),
                f"- β (KL strength of the model reward β·log π/μ): {self.beta:g}",
                f"- responses per prompt K: {ks}",
                f"- reference model: {reference}",
                f"- forward layout: {layout}",
                f"- ties on the top reward: {self.args.tie_break}"
                + (" (the authors' +0.01 on the first response)" if self.args.tie_break == "first" else ""),
                "- truncation: "
                + (
                    f"the authors' (prompt's last {self.args.max_prompt_length} tokens, then responses), "
                    f"max_length {self.args.max_length}"
                    if self.args.max_prompt_length is not None
                    else f"{self.args.truncation_mode}, max_length {self.args.max_length}"
                ),
                f"- learning rate {self.args.learning_rate:g}, {self.args.num_train_epochs:g} epoch(s), global batch "
                f"{global_batch} prompts",
                "",
                "### Framework versions",
                "",
                f"- trl-nca: {__version__}",
            ]
        )
        with open(path, encoding="utf-8") as handle:
            card = handle.read()
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(card.replace("### Framework versions\n", section, 1))

    def _card_loss_lines(self) -> list[str]:
        """The model card's lines on the loss's own hyper-parameters."""
        return [f"- α (reward temperature, target weights softmax(r / α)): {self.alpha:g}"]

    def _responses_per_prompt(self) -> str:
        """K over the training set, read from the Arrow column lengths (no Python copy of the token lists)."""
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset) or "completion_ids" not in dataset.column_names:
            return "unknown (streamed dataset)"
        import pyarrow.compute as pc

        lengths = pc.list_value_length(dataset.data.column("completion_ids"))
        low, high = pc.min(lengths).as_py(), pc.max(lengths).as_py()
        return str(low) if low == high else f"{low} to {high} (mean {pc.mean(lengths).as_py():.2f})"

    # ------------------------------------------------------------------------------------------------ data hooks
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        dataset = prepare_dataset(
            dataset,
            processing_class,
            eos_token=self._tokenizer.eos_token,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            num_proc=args.dataset_num_proc,
            dataset_name=dataset_name,
            max_prompt_length=args.max_prompt_length,
        )
        if dataset_name == "train":
            self._warn_if_all_rewards_tied(dataset, args)
        return dataset

    def _warn_if_all_rewards_tied(self, dataset: Dataset | IterableDataset, args: _KWayConfig) -> None:
        """Warn once (main process) when every training row has all its rewards equal: the K-way losses then get no
        preference signal (NCA, InfoNCA and Plackett-Luce: zero gradient while the policy equals the reference, i.e.
        from the start with the default reference, and no step ever moves it; LiPO-λ and all-pairs: no pair, zero
        gradient always).

        A `Dataset` is counted in full over its Arrow `rewards` column. A stream is not read in full: the rows of the
        first optimizer step (`per_device_train_batch_size * gradient_accumulation_steps`) are checked, and the
        warning says so. With `tie_break="first"` the first response gets a bonus, so nothing is tied."""
        if args.tie_break == "first" or not PartialState().is_main_process:
            return
        if isinstance(dataset, Dataset):
            if "rewards" not in dataset.column_names or len(dataset) == 0:
                return
            n_rows, tied = len(dataset), count_tied_rows(dataset.with_format("arrow")["rewards"])
            what = f"All {n_rows} rows of the train dataset"
        else:
            n_rows = args.per_device_train_batch_size * args.gradient_accumulation_steps
            rows = [row["rewards"] for row in itertools.islice(dataset, n_rows) if row.get("rewards") is not None]
            n_rows, tied = len(rows), sum(1 for rewards in rows if len(set(rewards)) == 1)
            what = f"The first {n_rows} rows of the streamed train dataset (a stream is not read in full)"
        if n_rows == 0 or tied < n_rows:
            return
        losses = " + ".join(name for name in args.loss_type if name != "sft")
        logger.warning(
            f"{what} have all their rewards tied (every response of a prompt has the same reward): the {losses} loss "
            "gets no preference signal from such rows (its gradient is zero while the policy equals the reference), "
            "so training will not move the model toward better responses. Check the `rewards` column (a reward that "
            "is constant on this data?)."
        )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", "rewards", "hard_labels", "ref_logps"]

    # ------------------------------------------------------------------------------------------------ log-probs
    def _model_inputs(self, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The layout's model inputs, with the attention mask the model's attention implementation needs."""
        kwargs = {key: inputs[key] for key in _MODEL_INPUT_KEYS if key in inputs}
        mask = self._attention_mask(model, inputs)
        if mask is not None:
            kwargs["attention_mask"] = mask
        # The model never computes its own MoE aux loss (it would lose its gradient under reentrant checkpointing, and
        # shared-prompt and packed rows give it no 2D padding mask): `_forward_logps` computes it where it is wanted.
        config = self.accelerator.unwrap_model(model).config.get_text_config()
        if hasattr(config, "output_router_logits"):
            kwargs["output_router_logits"] = False
        return kwargs

    def _attention_mask(self, model, inputs: dict[str, torch.Tensor]):
        """The shared-prompt layout's attention mask for `model`, built on the device from the collator's metadata;
        None for the other layouts. Built once per batch: the policy and the reference forward share it (unless their
        attention implementation or dtype differ)."""
        unwrapped = self.accelerator.unwrap_model(model)
        attn = getattr(unwrapped.config, "_attn_implementation", None) or "sdpa"
        dtype = getattr(unwrapped, "dtype", torch.float32)
        dtype = dtype if dtype.is_floating_point else torch.float32
        key = (attn, dtype)
        cached = self._mask_cache
        if cached is not None and cached[0] is inputs["input_ids"] and cached[1] == key:
            return cached[2]
        windows = attention_windows(unwrapped.config.get_text_config())
        mask = layout_attention_mask(inputs, attn, dtype, windows)
        self._mask_cache = (inputs["input_ids"], key, mask)
        return mask

    @staticmethod
    def _token_response_ids(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """For each scored position (labels shifted by one), the ordinal of its response, or -1."""
        if "response_ids" in inputs:
            return inputs["response_ids"][:, 1:]
        completion_mask = inputs["completion_mask"][:, 1:]
        rows = torch.arange(completion_mask.size(0), device=completion_mask.device).unsqueeze(1)
        return torch.where(completion_mask.bool(), rows, -1)

    def _forward_logps(self, model, inputs: dict[str, torch.Tensor], aux_loss: bool = False):
        """One forward through the fused LM head; returns the outputs and per-response log-probs `(B, K_max)`.

        With `aux_loss`, `outputs.aux_loss` is the MoE load-balancing loss over the batch's real tokens, computed from
        the recorded router logits (`trl_nca.moe`, with their gradient under any checkpointing) over the tokens of
        `router_token_mask`: for padded rows those of the 2D mask, as the model's own loss counts them; under the
        shared prompt each prompt token once. A model whose router logits transformers does not record (llama4)
        computes its own, on padded rows only.
        """
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        model_inputs = self._model_inputs(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        record = aux_loss and ("padding_mask" in inputs or declares_router_logits(unwrapped))
        if aux_loss and not record:
            model_inputs["output_router_logits"] = True
        with record_router_logits(unwrapped) if record else contextlib.nullcontext() as router_logits:
            outputs = model(**model_inputs, use_cache=False, labels=labels, fused_lm_head=True)
        if record:
            token_mask = router_token_mask(inputs)
            outputs.aux_loss = load_balancing_loss(router_logits, token_mask, unwrapped.config.get_text_config())
        response_ids = self._token_response_ids(inputs)
        # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens.
        per_token = outputs.log_probs[:, -response_ids.size(1) :]
        scored = response_ids >= 0
        n_responses = inputs["response_index"].numel()
        logps = per_token.new_zeros(n_responses).index_add(0, response_ids[scored], per_token[scored])
        return outputs, self._place_responses(logps, inputs)

    @staticmethod
    def _place_responses(values: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scatter the N per-response values of a layout into `(B, K_max)` (zero on padding slots)."""
        shape = inputs["response_mask"].shape
        flat = values.new_zeros(shape.numel()).index_copy(0, inputs["response_index"].to(values.device), values)
        return flat.view(shape)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs `(B, K_max)` of one batch, without gradient (adapter disabled for PEFT)."""
        adapter_context = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter_context = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            adapter_context,
            self.accelerator.autocast(),
        ):
            _, ref_logps = self._forward_logps(model, inputs)
        return ref_logps

    def _reference_logps(self, inputs):
        if self.precompute_ref_logps:
            return inputs["ref_logps"]
        if self.ref_model is None and is_peft_model(self.model):
            return self.compute_ref_log_probs(self.model, inputs)
        return self.compute_ref_log_probs(self.ref_model, inputs)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """Compute the reference log-probs of every response once, cached on disk like DPOTrainer's (`ref_logps`)."""
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"`precompute_ref_log_probs=True` is not supported with IterableDataset (the {name} dataset is "
                "streamed). Please use a map-style Dataset or set `precompute_ref_log_probs=False`."
            )
        if "ref_logps" in dataset.column_names:
            return dataset
        # TRL's model hash covers the weights only: two architectures with the same parameter shapes and values (tiny
        # random models) would share a cache file, so the model class and config go in the key, and so do the layout
        # and whether it is checked (a cache computed with `kway_layout_check=False` is not reused with the check on).
        reference = self.accelerator.unwrap_model(self.ref_model or self.model)
        reference = reference.get_base_model() if is_peft_model(reference) else reference
        config = {
            k: v for k, v in reference.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")
        }
        key = (type(reference).__qualname__, config, self.data_collator.layout, self.data_collator.padding_free)
        key += (self.args.kway_layout_check,)
        # Rank-dependent inputs (ZeRO-3 shards the model): share rank 0's fingerprint so all ranks use one cache file.
        fingerprint = [Hasher.hash((dataset._fingerprint, self._precompute_model_hash, key, "trl_nca.ref_logps"))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset._get_cache_file_path(fingerprint[0])
        if not os.path.exists(cache_file):
            loader = self.accelerator.prepare(
                DataLoader(
                    dataset,
                    batch_size=batch_size,
                    collate_fn=self.data_collator,
                    num_workers=self.args.dataloader_num_workers,
                    pin_memory=self.args.dataloader_pin_memory,
                    shuffle=False,
                )
            )
            if self.ref_model is None and self.is_deepspeed_enabled:
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            else:
                model = self.ref_model or self.model
            rows: list[list[float]] = []
            for batch in tqdm(
                loader,
                desc=f"Computing reference log probs for {name} dataset",
                disable=bool(os.environ.get("TQDM_DISABLE", "")),
            ):
                batch = self._exact_layout([model], batch)
                ref_logps = self.compute_ref_log_probs(model, batch)
                mask = batch["response_mask"]
                # Pad K across ranks before gathering: batches on different ranks may have different K_max.
                ref_logps, mask = self.accelerator.pad_across_processes((ref_logps, mask.long()), dim=1)
                ref_logps, mask = self.accelerator.gather_for_metrics((ref_logps, mask))
                for values, row_mask in zip(ref_logps.float().cpu(), mask.bool().cpu()):
                    rows.append(values[row_mask].tolist())
            if self.accelerator.is_main_process:
                dataset.map(
                    lambda _, index: {"ref_logps": rows[index]},
                    with_indices=True,
                    remove_columns=dataset.column_names,
                    new_fingerprint=fingerprint[0],
                    cache_file_name=cache_file,
                    desc=f"Caching reference log probs for {name} dataset",
                )
            self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    # ------------------------------------------------------------------------------------------------ layout check
    def _exact_layout(self, models: list, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`inputs` in a layout proven exact for `models` (the forwards this batch goes through).

        The first batch a model meets decides (`_check_layout`): the architecture rules with the built model, then
        the self-check. After a fallback, batches already collated in the old layout (prefetched, or by dataloader
        workers holding their own copy of the collator) are re-laid out in the padded layout."""
        collator = self.data_collator
        if not isinstance(collator, DataCollatorForKWayReward):
            return inputs
        unchecked = [m for m in models if id(self.accelerator.unwrap_model(m)) not in self._layout_checked]
        if unchecked and (collator.layout, collator.padding_free) != ("padded", False):
            self._check_layout(unchecked, inputs)
        self._layout_checked.update(id(self.accelerator.unwrap_model(m)) for m in models)
        wanted = layout_kind(collator.layout, collator.padding_free)
        if batch_layout(inputs) == wanted:
            return inputs
        padded = self._layout_collator(("padded", wanted == "packed"))
        kept = {key: value for key, value in inputs.items() if key not in _LAYOUT_KEYS}
        return {**kept, **self._prepare_inputs(padded.collate_sequences(grouped_examples(inputs)))}

    def _layout_collator(self, layout: tuple[str, bool]) -> DataCollatorForKWayReward:
        """The trainer's collator in another (layout, padding_free), for rows that are already truncated."""
        return dataclasses.replace(
            self.data_collator, layout=layout[0], padding_free=layout[1], max_length=None, max_prompt_length=None
        )

    def _check_layout(self, models: list, inputs: dict[str, torch.Tensor]) -> None:
        """Keep the collator's layout if it is exact for `models`, else fall back to the padded layout (packed where
        that is exact and wanted) with one logged line, or raise when the layout was asked for explicitly."""
        collator = self.data_collator
        candidate = (collator.layout, collator.padding_free)
        unwrapped = [self.accelerator.unwrap_model(model) for model in models]
        architecture = next(filter(None, (unsupported_reason(m.config, m) for m in unwrapped)), None)
        examples = check_examples(inputs) if self.args.kway_layout_check else []
        reason = architecture
        if reason is None and examples:
            reason = self._layout_difference(models, examples, candidate)
        if reason is None:
            return
        what = "kway_layout='shared_prompt'" if candidate[0] == "shared_prompt" else "padding_free=True"
        if self.args.kway_layout != "auto":
            raise ValueError(f"{what} cannot be used with this model: {reason}. Use kway_layout='auto' or 'padded'.")
        fallback = ("padded", False)
        attn = getattr(unwrapped[0].config, "_attn_implementation", None) or "sdpa"
        if candidate[0] == "shared_prompt" and architecture is None and (candidate[1] or "flash" in attn):
            if self._layout_difference(models, examples, ("padded", True)) is None:
                fallback = ("padded", True)
        if self.accelerator.is_main_process:
            _log_fallback(fallback, reason, unpacked=bool(self.args.padding_free) and not fallback[1])
        collator.layout, collator.padding_free = fallback

    def _layout_difference(self, models: list, examples: list[dict], layout: tuple[str, bool]) -> str | None:
        """None if every response's log-prob under `layout` equals the padded layout's (within `logps_tolerance`) for
        every model, on every process; else why not. One no-grad forward per model and layout, in eval mode."""
        reference, padded = self._check_logps(models, examples, ("padded", False))
        n_tokens = self._place_responses(padded["completion_mask"].sum(-1), padded)
        half = self.args.bf16 or self.args.fp16
        half = half or any(self.accelerator.unwrap_model(m).dtype in (torch.bfloat16, torch.float16) for m in models)
        failure = None
        try:
            candidate, _ = self._check_logps(models, examples, layout)
        except Exception as error:  # a foreign forward that cannot take the layout's inputs: not exact
            failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            candidate = [torch.full_like(logps, math.nan) for logps in reference]
        mask = padded["response_mask"]
        stats = [largest_excess(c, r, n_tokens, mask, half) for c, r in zip(candidate, reference)]
        local = torch.tensor([[max(d for d, _ in stats), max(e for _, e in stats)]], device=self.accelerator.device)
        difference, excess = self.accelerator.gather(local).max(dim=0).values.tolist()
        if excess <= 0:
            return None
        model_types = sorted({self.accelerator.unwrap_model(m).config.get_text_config().model_type for m in models})
        name = ("shared-prompt layout" if layout[0] == "shared_prompt" else "padded layout") + (
            " packed (padding_free)" if layout[1] else ""
        )
        if failure is not None or not math.isfinite(difference):
            failure = failure or "on another process"
            return f"the {name} fails for {'/'.join(model_types)} on the first batch ({failure})"
        return (
            f"a response's log-prob under the {name} differs from the padded layout's by {difference:.3g} nats on the "
            f"first batch ({'/'.join(model_types)}, {'bf16/fp16' if half else 'fp32'} tolerance)"
        )

    def _check_logps(self, models: list, examples: list[dict], layout: tuple[str, bool]) -> tuple[list, dict]:
        """Per-response log-probs `(B, K)` of `examples` under `layout` for each model, and the collated batch."""
        batch = self._prepare_inputs(self._layout_collator(layout)(examples))
        results = []
        for model in models:
            was_training = model.training
            model.eval()  # no dropout or router noise: both layouts must see the same function
            try:
                with torch.no_grad(), self.accelerator.autocast():
                    results.append(self._forward_logps(model, batch)[1])
            finally:
                model.train(was_training)
        return results, batch

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer's loop, with the loss averaged over the prompts actually evaluated.

        `Trainer` weights each batch's loss by `per_device_eval_batch_size` and relies on accelerate to trim the last
        batch, which it can only do for datasets with a length: a streamed eval set whose size is not a multiple of
        the batch size would get a different loss than the same rows as a `Dataset`. The batch losses recorded by
        `_compute_loss` carry their real prompt count, so both give the same number.
        """
        self._eval_loss_totals = [0.0, 0]
        try:
            output = super().evaluation_loop(
                dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
            )
            loss_sum, n_prompts = self._eval_loss_totals
        finally:
            self._eval_loss_totals = None
        key = f"{metric_key_prefix}_loss"
        if n_prompts and key in output.metrics:
            output.metrics[key] = loss_sum / n_prompts
        return output

    def _record_eval_loss(self, loss: torch.Tensor, n_prompts: int) -> None:
        """Accumulate one eval batch's loss, weighted by its prompts, over all processes (see `evaluation_loop`)."""
        if getattr(self, "_eval_loss_totals", None) is None:  # called outside `evaluation_loop`
            return
        per_prompt = self.accelerator.gather_for_metrics(loss.detach().float().reshape(1).repeat(n_prompts))
        self._eval_loss_totals[0] += per_prompt.sum().item()
        self._eval_loss_totals[1] += per_prompt.numel()

    # ------------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        live_reference = self.ref_model is not None and not self.precompute_ref_logps
        inputs = self._exact_layout([model, self.ref_model] if live_reference else [model], inputs)
        outputs, policy_logps = self._forward_logps(model, inputs, aux_loss=self.aux_loss_enabled)
        ref_logps = self._reference_logps(inputs).to(policy_logps.device)
        rewards, mask = inputs["rewards"], inputs["response_mask"]
        if self.args.tie_break == "first":
            rewards = losses.favour_first_response(rewards)
        alpha = self._reward_temperature(inputs)

        loss = policy_logps.new_zeros((), dtype=torch.float32)
        for loss_type, weight in zip(self.loss_types, self.loss_weights):
            if loss_type == "sft":
                loss = loss + weight * self._best_response_nll(outputs, inputs)
            else:
                per_prompt = self._per_prompt_loss(loss_type, policy_logps, ref_logps, rewards, mask, alpha)
                loss = loss + weight * per_prompt.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())

        self._log_metrics(mode, outputs, inputs, policy_logps.detach(), ref_logps, alpha, rewards)
        if mode == "eval":
            self._record_eval_loss(loss, rewards.size(0))
        if return_outputs:
            # The fused head does not build logits; compute_metrics needs them, so recompute them (as DPOTrainer does).
            with torch.no_grad():
                outputs = model(**self._model_inputs(model, inputs), use_cache=False)
            return loss, outputs
        return loss

    def _reward_temperature(self, inputs) -> torch.Tensor | None:
        """Per-prompt α: 0 (hard labels) for preference rows, the config's α for reward rows; None without α."""
        if self.alpha is None:
            return None
        return torch.where(inputs["hard_labels"], 0.0, float(self.alpha)).to(inputs["rewards"].device)

    def _per_prompt_loss(self, loss_type, policy_logps, ref_logps, rewards, mask, alpha) -> torch.Tensor:
        """The `(B,)` loss `loss_type` (one of the config's own losses) of each prompt."""
        return type(self)._loss_fn(policy_logps, ref_logps, rewards, beta=self.beta, alpha=alpha, mask=mask)

    def _best_response_nll(self, outputs, inputs) -> torch.Tensor:
        """Negative log-likelihood of each prompt's best-rewarded response, averaged over its tokens (TRL's `sft`)."""
        rewards = inputs["rewards"].masked_fill(~inputs["response_mask"], float("-inf"))
        best_slots = rewards.argmax(dim=-1) + torch.arange(rewards.size(0), device=rewards.device) * rewards.size(1)
        slot_ordinal = torch.full((rewards.numel(),), -1, dtype=torch.long, device=rewards.device)
        slot_ordinal[inputs["response_index"]] = torch.arange(inputs["response_index"].numel(), device=rewards.device)
        response_ids = self._token_response_ids(inputs)
        token_mask = torch.isin(response_ids, slot_ordinal[best_slots]) & (response_ids >= 0)
        per_token = outputs.log_probs[:, -token_mask.size(1) :]
        return -per_token[token_mask].mean()

    # ------------------------------------------------------------------------------------------------ metrics
    def _log_metrics(self, mode, outputs, inputs, policy_logps, ref_logps, alpha, target_rewards) -> None:
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        mask, given = inputs["response_mask"], inputs["rewards"]
        token_mask = inputs["completion_mask"][:, 1:]
        per_token_entropy = outputs.entropy[:, -token_mask.size(1) :].detach()
        entropy_sum = gather((per_token_entropy * token_mask).sum()).sum()
        n_tokens = gather(token_mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / n_tokens).item() if n_tokens > 0 else 0.0)
        if mode == "train":
            real_tokens = (inputs["padding_mask"] if "padding_mask" in inputs else inputs["attention_mask"]).sum()
            self._total_train_tokens += gather(real_tokens).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        model_reward = losses.model_rewards(policy_logps, ref_logps, self.beta)
        if alpha is not None:
            weights = losses.target_weights(target_rewards, alpha, mask)
            metrics["target_weights/entropy"].append(gather(losses.weight_entropy(weights, mask)).mean().item())

        # Responses ranked by their given reward (rank 0 = best); ties keep the dataset order.
        order = given.masked_fill(~mask, float("-inf")).argsort(dim=-1, descending=True, stable=True)
        ranked_reward, ranked_logps = model_reward.gather(1, order), policy_logps.float().gather(1, order)
        ranked_mask = mask.gather(1, order)
        per_rank = torch.stack(
            [(ranked_reward * ranked_mask).sum(0), (ranked_logps * ranked_mask).sum(0), ranked_mask.sum(0).float()]
        )
        per_rank = self.accelerator.pad_across_processes(per_rank, dim=1)
        per_rank = self.accelerator.gather(per_rank).view(-1, *per_rank.shape).sum(0)
        for k in range(per_rank.size(1)):
            if per_rank[2, k] > 0:
                metrics[f"rewards/rank_{k}"].append((per_rank[0, k] / per_rank[2, k]).item())
                metrics[f"logps/rank_{k}"].append((per_rank[1, k] / per_rank[2, k]).item())

        # "chosen" = the best response, "rejected" = the mean of the others, so TRL dashboards keep working.
        n_others = (mask.sum(-1) - 1).clamp_min(1)
        best_reward, best_logps = ranked_reward[:, 0], ranked_logps[:, 0]
        rest_reward = (ranked_reward * ranked_mask)[:, 1:].sum(-1) / n_others
        rest_logps = (ranked_logps * ranked_mask)[:, 1:].sum(-1) / n_others
        # Ranking accuracy: the best-rewarded response(s) get a higher model reward than every worse response.
        top = given.masked_fill(~mask, float("-inf")).max(-1, keepdim=True).values
        is_top = (given == top) & mask
        is_worse = mask & ~is_top
        top_model = model_reward.masked_fill(~is_top, float("-inf")).max(-1).values
        worse_model = model_reward.masked_fill(~is_worse, float("-inf")).max(-1).values
        accuracy = torch.where(is_worse.any(-1), (top_model > worse_model).float(), torch.nan)
        stats = gather(torch.stack([best_reward, rest_reward, best_logps, rest_logps, accuracy], dim=1))
        best_reward, rest_reward, best_logps, rest_logps, accuracy = stats.unbind(1)
        metrics["rewards/chosen"].append(best_reward.mean().item())
        metrics["rewards/rejected"].append(rest_reward.mean().item())
        metrics["rewards/margins"].append((best_reward - rest_reward).mean().item())
        metrics["logps/chosen"].append(best_logps.mean().item())
        metrics["logps/rejected"].append(rest_logps.mean().item())
        if not bool(torch.isnan(accuracy).all()):
            metrics["rewards/accuracies"].append(accuracy.nanmean().item())


class NCATrainer(_KWayRewardTrainer):
    """Trainer for NCA (Noise Contrastive Alignment) on K scored responses per prompt, or on preference pairs.

    A drop-in replacement for `trl.DPOTrainer` (same constructor) that takes an [`NCAConfig`]. Per prompt, with
    model rewards `ρ_i = β (log π_θ(y_i|x) − log μ(y_i|x))` and target weights `w = softmax(r / α)`, the loss is
    `−Σ_i w_i log σ(ρ_i) − (1/K) Σ_i log σ(−ρ_i)`. Unlike DPO/InfoNCA it optimises each response's absolute
    likelihood ratio rather than only their differences. The paper reports that this keeps the likelihood of the best
    responses from falling. Our reproduction on an offline task finds a weaker version: at equal learning rate and β it
    lowers that likelihood at fewer settings than DPO and InfoNCA, but not never, it can dip mid-training and recover,
    and with chosen responses the policy finds very unlikely every method raises it, NCA least; see docs/results.md
    and docs/results_pool.md for the numbers and their intervals.

    Datasets: reward rows (`prompt`, `completions`, `rewards`; K may vary per row) or preference rows (`prompt`/
    `chosen`/`rejected`, or implicit prompt), standard text or conversational. On preference data the loss equals
    TRL's `loss_type="nca_pair"`.

    Example:
    ```python
    from datasets import Dataset
    from trl_nca import NCAConfig, NCATrainer

    dataset = Dataset.from_list([
        {"prompt": "2+2=", "completions": ["4", "5", "22"], "rewards": [1.0, 0.2, 0.0]},
    ])
    trainer = NCATrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=NCAConfig("out", alpha=0.5), train_dataset=dataset)
    trainer.train()
    ```
    """

    _config_class = NCAConfig
    _loss_fn = staticmethod(losses.nca_loss)
    _tag_names = ["trl", "nca"]
    _name = "NCA"


class InfoNCATrainer(_KWayRewardTrainer):
    """Trainer for InfoNCA on K scored responses per prompt, or on preference pairs.

    A drop-in replacement for `trl.DPOTrainer` (same constructor) that takes an [`InfoNCAConfig`]. Per prompt the
    loss is the cross-entropy `−Σ_i w_i log softmax(ρ)_i` between the reward softmax `w = softmax(r / α)` and the
    model-reward softmax, with `ρ_i = β (log π_θ(y_i|x) − log μ(y_i|x))`. On preference data it equals DPO
    (`loss_type="sigmoid"`).
    """

    _config_class = InfoNCAConfig
    _loss_fn = staticmethod(losses.infonca_loss)
    _tag_names = ["trl", "infonca"]
    _name = "InfoNCA"


_DPO_CITATION = textwrap.dedent(
    """\
    @inproceedings{rafailov2023direct,
        title        = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
        author       = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and
                        Stefano Ermon and Chelsea Finn},
        year         = 2023,
        booktitle    = {Advances in Neural Information Processing Systems 36 (NeurIPS 2023)},
        eprint       = {arXiv:2305.18290},
    }"""
)
_LIPO_CITATION = textwrap.dedent(
    """\
    @article{liu2024lipo,
        title        = {{LiPO: Listwise Preference Optimization through Learning-to-Rank}},
        author       = {Tianqi Liu and Zhen Qin and Junru Wu and Jiaming Shen and Misha Khalman and
                        Rishabh Joshi and Yao Zhao and Mohammad Saleh and Simon Baumgartner and Jialu Liu and
                        Peter J. Liu and Xuanhui Wang},
        year         = 2024,
        journal      = {arXiv preprint},
        eprint       = {arXiv:2402.01878},
    }"""
)
_DPO_PAPER = {
    "title": "Direct Preference Optimization: Your Language Model is Secretly a Reward Model",
    "id": "2305.18290",
    "citation": _DPO_CITATION,
}
_LIPO_PAPER = {
    "title": "LiPO: Listwise Preference Optimization through Learning-to-Rank",
    "id": "2402.01878",
    "citation": _LIPO_CITATION,
}


@dataclasses.dataclass(frozen=True)
class _ListwiseLoss:
    """One listwise loss: its function, the `ListwiseConfig` fields it reads (its keyword -> the field), its name in
    progress bars and the card, its Hub tag and its paper."""

    fn: Callable[..., torch.Tensor]
    options: dict[str, str]
    name: str
    tag: str
    paper: dict[str, str]


_LISTWISE_LOSSES = {
    "plackett_luce": _ListwiseLoss(
        losses.plackett_luce_loss, {"top_m": "plackett_luce_top_m"}, "Plackett-Luce DPO", "plackett-luce", _DPO_PAPER
    ),
    "lipo_lambda": _ListwiseLoss(
        losses.lipo_lambda_loss, {"label_normalization": "lipo_label_normalization"}, "LiPO-λ", "lipo", _LIPO_PAPER
    ),
    "all_pairs": _ListwiseLoss(
        losses.all_pairs_dpo_loss,
        {"reduction": "all_pairs_reduction", "gap_weighted": "all_pairs_gap_weighted"},
        "All-pairs DPO",
        "all-pairs-dpo",
        _DPO_PAPER,
    ),
}


class ListwiseTrainer(_KWayRewardTrainer):
    """Trainer for the listwise objectives on K ranked or scored responses per prompt: Plackett-Luce DPO, LiPO-λ and
    all-pairs DPO (see [`ListwiseConfig`]), on the same data, layouts and machinery as [`NCATrainer`].

    A drop-in replacement for `trl.DPOTrainer` (same constructor) that takes a [`ListwiseConfig`]. With model rewards
    `ρ_i = β (log π_θ(y_i|x) − log μ(y_i|x))`, per prompt:

    - `"plackett_luce"`: `−Σ_k log [exp(ρ_τ(k)) / Σ_{j ≥ k} exp(ρ_τ(j))]`, τ the order of the rewards (ties share a
      stage), optionally over the top-m stages;
    - `"lipo_lambda"`: `−Σ_{r_i > r_j} Δ_ij log σ(ρ_i − ρ_j)` with LiPO-λ's LambdaRank weights Δ;
    - `"all_pairs"`: DPO's `−log σ(ρ_i − ρ_j)` averaged (or summed, optionally gap-weighted) over the pairs
      `r_i > r_j`.

    On preference pairs `"plackett_luce"` and `"all_pairs"` equal DPO (`loss_type="sigmoid"`).

    Example:
    ```python
    from datasets import Dataset
    from trl_nca import ListwiseConfig, ListwiseTrainer

    dataset = Dataset.from_list([
        {"prompt": "2+2=", "completions": ["4", "5", "22"], "rewards": [1.0, 0.2, 0.0]},
    ])
    args = ListwiseConfig("out", loss_type=["plackett_luce"])
    trainer = ListwiseTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset)
    trainer.train()
    ```
    """

    _config_class = ListwiseConfig

    @property
    def _listwise_losses(self) -> list[_ListwiseLoss]:
        args = getattr(self, "args", None)  # None while the default config is built
        return [_LISTWISE_LOSSES[name] for name in (args.loss_type if args is not None else ()) if name != "sft"]

    @property
    def _name(self) -> str:
        """The objective's name (progress bars, model card): e.g. "Plackett-Luce DPO", or "Listwise" before `args`."""
        return " + ".join(loss.name for loss in self._listwise_losses) or "Listwise"

    @property
    def _tag_names(self) -> list[str]:
        return ["trl", "listwise", *(loss.tag for loss in self._listwise_losses)]

    @property
    def _paper(self) -> dict[str, str]:
        """The first listwise loss's paper, citing the papers of every listwise loss used (TRL's card takes one)."""
        papers = list({id(loss.paper): loss.paper for loss in self._listwise_losses}.values())
        return dict(papers[0], citation="\n\n".join(paper["citation"] for paper in papers))

    def _per_prompt_loss(self, loss_type, policy_logps, ref_logps, rewards, mask, alpha) -> torch.Tensor:
        loss = _LISTWISE_LOSSES[loss_type]
        options = {keyword: getattr(self.args, field) for keyword, field in loss.options.items()}
        return loss.fn(policy_logps, ref_logps, rewards, beta=self.beta, mask=mask, **options)

    def _card_loss_lines(self) -> list[str]:
        args = self.args
        lines = []
        if "plackett_luce" in args.loss_type:
            stages = "every stage" if args.plackett_luce_top_m is None else f"top {args.plackett_luce_top_m} stages"
            lines.append(f"- Plackett-Luce: {stages}, tied rewards share a stage")
        if "lipo_lambda" in args.loss_type:
            lines.append(f"- LiPO-λ labels: {args.lipo_label_normalization} normalisation")
        if "all_pairs" in args.loss_type:
            weighting = ", weighted by the reward gap" if args.all_pairs_gap_weighted else ""
            reduction = args.all_pairs_reduction
            lines.append(f"- all-pairs DPO: {reduction} over the pairs with different rewards{weighting}")
        return lines
