"""Which forward layout is exact for a model: capability rules, and the first-batch self-check's pure parts.

The shared-prompt layout (and packing, `padding_free=True`, in either layout) is exact only for models whose positions
come from `position_ids` and whose layers mix tokens only through attention that takes the layout's mask. ALiBi biases
(Bloom, MPT) are computed from key indices, OPT-style models build their mask without looking at `position_ids` (so
packed sequences see each other), and recurrent, convolutional or state-space layers (RWKV, Mamba, LFM2's short
convolutions, hybrids) carry state across the branches of a row. `unsupported_reason` rules out what a model's class
and config show; what they cannot show (new architectures, `trust_remote_code` models) is not assumed fine: the trainer
runs one small forward of the first batch in both layouts and compares (`check_examples`, `response_sequences`,
`logps_tolerance` here; the glue is `_KWayRewardTrainer._exact_layout`).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping
from typing import Any

import torch

# Config fields that describe token mixers other than attention (hybrid layer patterns, state-space and convolution
# sizes). A config carrying one is not sent down the shared/packed layouts.
_NON_ATTENTION_CONFIG_KEYS = (
    "layers_block_type",
    "hybrid_override_pattern",
    "block_types",
    "layers_block_types",
    "attn_layer_indices",
    "attn_layer_period",
    "mamba_d_state",
    "mamba_d_conv",
    "ssm_state_size",
    "conv_kernel",
    "conv_L_cache",
    "linear_conv_kernel_dim",
    "lru_width",
)
# ALiBi: attention biases from key indices, not from `position_ids`.
_ALIBI_CONFIG_KEYS = ("alibi", "use_alibi", "alibi_bias_max")
# Module class names of recurrent / linear-attention / state-space token mixers (a name test only backs up the rules
# above and the self-check; convolutions are found by type).
_RECURRENT_MODULE = re.compile(
    r"Mamba|Rwkv|RWKV|Rglru|Recurrent|DeltaNet|Lightning|LinearAttention|xLSTM|Mlstm|Ssm|SSM"
)
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}


def unsupported_reason(config, model=None) -> str | None:
    """Why the shared-prompt layout (or packing) cannot be exact for a model, from its config and, when the model is
    already built, its class and modules; None when nothing rules it out (the first-batch self-check still runs)."""
    text_config = config.get_text_config()
    model_type = getattr(text_config, "model_type", None) or getattr(config, "model_type", "?")
    layer_types = set(getattr(text_config, "layer_types", None) or [])
    if not layer_types <= _ATTENTION_LAYER_TYPES:
        extra = sorted(layer_types - _ATTENTION_LAYER_TYPES)
        return f"{model_type} has layers that mix tokens other than through attention ({extra})"
    for key in _NON_ATTENTION_CONFIG_KEYS:
        if getattr(text_config, key, None) is not None:
            return f"{model_type} mixes tokens through recurrent/convolutional layers (config `{key}`)"
    attn_config = getattr(text_config, "attn_config", None)
    alibi = any(getattr(text_config, key, None) for key in _ALIBI_CONFIG_KEYS)
    alibi |= getattr(text_config, "position_embedding_type", None) == "alibi"
    alibi |= bool(attn_config.get("alibi") if isinstance(attn_config, Mapping) else getattr(attn_config, "alibi", 0))
    if alibi:
        return f"{model_type} uses ALiBi attention biases, which follow token indices, not `position_ids`"
    if model is None:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "position_ids" not in inspect.signature(type(base).forward).parameters:
        return f"{model_type}'s forward takes no `position_ids` (positions follow token indices or the mask)"
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    for module in (decoder or base).modules():
        # Token-mixing convolutions run along the sequence (Conv1d); 2D/3D ones are vision/audio patch embeddings.
        if isinstance(module, torch.nn.Conv1d) and module.kernel_size != (1,):
            return f"{model_type} mixes tokens through convolutions along the sequence ({type(module).__name__})"
        if _RECURRENT_MODULE.search(type(module).__name__):
            return f"{model_type} mixes tokens through recurrent or state-space layers ({type(module).__name__})"
    return None


def layout_kind(layout: str, padding_free: bool) -> str:
    """`"shared_prompt"` (packed or not), `"padded"`, or `"packed"` (the padded layout with `padding_free`)."""
    if layout == "shared_prompt":
        return layout
    return "packed" if padding_free else "padded"


def batch_layout(batch: Mapping[str, Any]) -> str:
    """The `layout_kind` of a collated batch, from its keys (see `trl_nca.collator`)."""
    if "branch_ids" in batch:
        return "shared_prompt"
    return "padded" if "attention_mask" in batch else "packed"


def _split(ids: list[int], is_completion: list[int]) -> tuple[list[int], list[int]]:
    return [t for t, c in zip(ids, is_completion) if not c], [t for t, c in zip(ids, is_completion) if c]


def response_sequences(batch: Mapping[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """`(prompt_ids, completion_ids)` of every response of a collated batch, in the order the layout scores them
    (`response_index`), as the model sees them (truncation already applied). Inverts the collator's layouts."""
    input_ids = batch["input_ids"].tolist()
    sequences: list[tuple[list[int], list[int]]] = []
    layout = batch_layout(batch)
    if layout == "shared_prompt":
        sequence_ids, branch_ids = batch["sequence_ids"].tolist(), batch["branch_ids"].tolist()
        for ids, seqs, branches in zip(input_ids, sequence_ids, branch_ids):
            prefixes: dict[int, list[int]] = {}
            branch_tokens: dict[tuple[int, int], list[int]] = {}
            for token, seq, branch in zip(ids, seqs, branches):
                if seq < 0:
                    continue
                if branch == 0:
                    prefixes.setdefault(seq, []).append(token)
                else:
                    branch_tokens.setdefault((seq, branch), []).append(token)
            # Each branch starts with the prompt's last token (see the collator), then the response.
            for (seq, _), tokens in sorted(branch_tokens.items()):
                sequences.append((prefixes.get(seq, []) + tokens[:1], tokens[1:]))
        return sequences
    completion = batch["completion_mask"].tolist()
    if layout == "padded":
        for ids, real, done in zip(input_ids, batch["attention_mask"].tolist(), completion):
            n = sum(real)
            sequences.append(_split(ids[:n], done[:n]))
        return sequences
    positions, real = batch["position_ids"][0].tolist(), batch["padding_mask"][0].tolist()
    starts = [i for i, position in enumerate(positions) if position == 0] + [len(positions)]
    for start, end in zip(starts, starts[1:]):
        if real[start]:  # the trailing padding forms a sequence of its own
            sequences.append(_split(input_ids[0][start:end], completion[0][start:end]))
    return sequences


def grouped_examples(batch: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
    """The batch's prompts as collator examples (`prompt_ids`, `completion_ids`), from its model inputs."""
    sequences = response_sequences(batch)
    k_max = batch["response_mask"].size(1)
    examples: dict[int, dict[str, Any]] = {}
    for (prompt, completion), slot in zip(sequences, batch["response_index"].tolist()):
        example = examples.setdefault(slot // k_max, {"prompt_ids": prompt, "completion_ids": []})
        example["completion_ids"].append(completion)
    return [examples[b] for b in sorted(examples)]


def check_examples(batch: Mapping[str, torch.Tensor], n_prompts: int = 2) -> list[dict[str, Any]]:
    """The self-check's rows: the first `n_prompts` prompts of a batch with their responses, each with at least two
    responses (a prompt with one gets its response reversed as a second, so that leakage between the branches of a
    row shows) and, for a one-prompt batch, the prompt twice (so that leakage between packed prompts shows)."""
    examples = grouped_examples(batch)[:n_prompts]
    for example in examples:
        if len(example["completion_ids"]) == 1:
            only = example["completion_ids"][0]
            example["completion_ids"].append(only[::-1] if len(only) > 1 else only + example["prompt_ids"][-1:])
    if len(examples) < n_prompts:
        examples = examples + [dict(examples[0])] * (n_prompts - len(examples))
    return [{**example, "rewards": [0.0] * len(example["completion_ids"])} for example in examples]


def logps_tolerance(reference: torch.Tensor, n_tokens: torch.Tensor, half_precision: bool) -> torch.Tensor:
    """How far a response's log-prob may be from the padded layout's and still count as equal.

    fp32: 1e-4 nats + 1e-5 relative (exact layouts agree within ~1e-7 relative on the zoo test's models). bf16/fp16:
    0.05 nats per token in quadrature (`0.05 * sqrt(n)`) + 1e-2 relative + 0.05 nats: above the rounding noise of
    two equal computations summed over a response (0.17 nats on a 4-layer bf16 Llama with sharp attention, where a
    model that ignores `position_ids` differs by 22 nats). A false fallback costs speed; a false pass, correctness.
    """
    if half_precision:
        return 0.05 * n_tokens.float().sqrt() + 1e-2 * reference.abs() + 0.05
    return 1e-4 + 1e-5 * reference.abs()


def largest_excess(
    candidate: torch.Tensor, reference: torch.Tensor, n_tokens: torch.Tensor, mask: torch.Tensor, half_precision: bool
) -> tuple[float, float]:
    """(largest |difference|, largest difference beyond the tolerance) over the real responses; NaN counts as
    infinitely different."""
    difference = (candidate.float() - reference.float()).abs()
    difference = torch.where(torch.isfinite(difference), difference, math.inf)[mask]
    excess = difference - logps_tolerance(reference.float(), n_tokens, half_precision)[mask]
    if difference.numel() == 0:
        return 0.0, -math.inf
    return difference.max().item(), excess.max().item()
