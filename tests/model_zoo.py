"""Tiny random-init models for every model type in transformers' causal-LM auto mapping.

Nothing here touches a model hub: each config is built in code from its class' defaults with every size shrunk
(hidden size 64, 2 layers, 4 heads of 16 dims, 4 experts with top-2 routing, 8-token sliding windows, ...), so a test
can run every architecture that `AutoModelForCausalLM` knows through the trainers on a CPU box, in a few hundredths of
a second per model. Hybrids keep one layer of each kind their full-size config uses (sliding and full attention,
mamba / linear attention / convolution and attention, dense and MoE MLPs). `UNBUILDABLE` lists the types that cannot be
built or that fail the check below, with the reason.

`python tests/model_zoo.py [MODEL_TYPE ...] [--attn eager] [--probe]` builds each type, checks that the fused
log-prob forward TRL uses (`trl.trainer.utils.add_fused_lm_head`) runs and matches the log-softmax of the plain logits
on a right-padded batch, and prints a table. `--probe` also notes models that ignore `position_ids` or reject a 4D
attention mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

CAUSAL_LM_TYPES: list[str] = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 16
FFN = 128
EXPERT_FFN = 32
EXPERTS = 4
TOP_K = 2
MAX_POSITIONS = 512
# Shorter than test sequences, so sliding-window layers differ from full-attention ones
SLIDING_WINDOW = 8
# Fewer keys than test sequences have, so sparse (indexed) attention really selects
INDEX_TOP_K = 8

# Field name -> tiny value, applied to every config (and sub-config) class that declares the field.
_SIZES: dict[str, Any] = {
    # widths
    **dict.fromkeys(
        ("hidden_size", "d_model", "n_embd", "n_embed", "emb_dim", "embed_dim", "embedding_dim", "model_dim"), HIDDEN
    ),
    # depths
    **dict.fromkeys(
        (
            "num_hidden_layers",
            "n_layer",
            "n_layers",
            "num_layers",
            "decoder_layers",
            "encoder_layers",
            "num_decoder_layers",
            "num_encoder_layers",
            "num_blocks",
        ),
        LAYERS,
    ),
    # attention heads
    **dict.fromkeys(
        (
            "num_attention_heads",
            "n_head",
            "n_heads",
            "num_heads",
            "attention_heads",
            "decoder_attention_heads",
            "encoder_attention_heads",
            "num_decoder_attention_heads",
            "num_encoder_attention_heads",
            "swa_num_attention_heads",
        ),
        HEADS,
    ),
    **dict.fromkeys(
        (
            "num_key_value_heads",
            "num_kv_heads",
            "n_kv_heads",
            "kv_n_heads",
            "multi_query_group_num",
            "swa_num_key_value_heads",
        ),
        KV_HEADS,
    ),
    **dict.fromkeys(
        ("head_dim", "kv_channels", "d_head", "dim_head", "attention_head_size", "swa_head_dim", "d_kv"), HEAD_DIM
    ),
    # feed-forward
    **dict.fromkeys(
        (
            "intermediate_size",
            "ffn_dim",
            "decoder_ffn_dim",
            "encoder_ffn_dim",
            "n_inner",
            "d_ff",
            "d_inner",
            "dff",
            "dim_ff",
            "ffn_hidden_size",
            "feed_forward_size",
            "intermediate_size_mlp",
            "first_dense_intermediate_size",
            "dense_intermediate_size",
            "mlp_only_intermediate_size",
        ),
        FFN,
    ),
    # mixture of experts
    **dict.fromkeys(
        (
            "moe_intermediate_size",
            "expert_ffn_hidden_size",
            "shared_expert_intermediate_size",
            "shared_experts_intermediate_size",
            "shared_intermediate_size",
            "moe_shared_expert_intermediate_size",
        ),
        EXPERT_FFN,
    ),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), EXPERTS),
    **dict.fromkeys(("num_experts_per_tok", "moe_k", "moe_topk", "moe_top_k", "num_experts_per_token"), TOP_K),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    # one dense layer, then MoE layers
    "first_k_dense_replace": 1,
    # positions
    **dict.fromkeys(
        ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "context_length", "model_max_length"),
        MAX_POSITIONS,
    ),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "attention_window_size"), SLIDING_WINDOW),
    # multi-head latent attention and sparse indexers
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": HEAD_DIM,
    "qk_nope_head_dim": 16,
    "v_head_dim": HEAD_DIM,
    "rotary_dim": HEAD_DIM // 2,
    "index_head_dim": HEAD_DIM,
    "index_topk": INDEX_TOP_K,
    "index_n_heads": 2,
    "index_num_heads": 2,
    # state-space / linear-attention layers
    "mamba_d_state": 8,
    "mamba_n_heads": 8,
    "mamba_d_head": 16,
    "mamba_head_dim": 16,
    "mamba_num_heads": 8,
    "mamba_chunk_size": 16,
    "mamba_d_ssm": 2 * HIDDEN,
    "mamba_dt_rank": 8,
    "state_size": 8,
    "ssm_state_size": 8,
    "time_step_rank": 8,
    "linear_key_head_dim": HEAD_DIM,
    "linear_value_head_dim": HEAD_DIM,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": HEAD_DIM,
    "linear_num_heads": HEADS,
    "embedding_size": HIDDEN,
    "input_embedding_size": HIDDEN,
    "output_embedding_size": HIDDEN,
    # encoder/adapter widths that must match the text model
    "hidden_size_global": HIDDEN,
    "adapter_in_dim": HIDDEN,
    "adapter_out_dim": HIDDEN,
    "adapter_input_size": HIDDEN,
    "hidden_size_per_layer_input": 16,
    "laurel_rank": 8,
    # vision / audio towers of multimodal configs
    "mlp_dim": FFN,
    "output_channels": 16,
    "output_proj_dims": HIDDEN,
    "mm_embed_dim": HIDDEN,
    "mm_posemb_size": 16,
    "out_hidden_size": HIDDEN,
    "num_position_embeddings": 64,
    "audio_embed_dim": HIDDEN,
    "position_embedding_size": 64,
    "nemo_conv_channels": 16,
    "ext_pw_out_channel": HIDDEN,
    "depthwise_separable_out_channel": HIDDEN,
}

# Per-layer kind lists that `_cover_layer_kinds` keeps complete
_LAYER_KIND_FIELDS = ("layer_types", "mlp_layer_types", "layers_block_type")

# The sparse indexer of Qwen4-Exp's attention layers has no defaults; hyper-connections in low rank
_QWEN4_EXP_TEXT = {
    "hc_lowrank": 16,
    "indexer_n_heads": 2,
    "indexer_kv_heads": 1,
    "indexer_head_dim": HEAD_DIM,
    "indexer_budget": 8,
    "indexer_compress_ratio": 4,
}

# Dots 3 Note's sliding-window layers take their MLA sizes from `swa_*` constructor arguments
_DOTS3_NOTE_TEXT = {
    "swa_num_attention_heads": HEADS,
    "swa_num_key_value_heads": HEADS,
    "swa_q_lora_rank": 32,
    "swa_kv_lora_rank": 16,
    "swa_head_dim": 2 * HEAD_DIM,
    "swa_qk_nope_head_dim": HEAD_DIM,
    "swa_v_head_dim": HEAD_DIM,
}

# Per model type: extra config kwargs, applied after `_SIZES`. A dict value under a sub-config key (`text_config`,
# `vision_config`, ...) overrides that sub-config's kwargs.
_OVERRIDES: dict[str, dict[str, Any]] = {
    # One mamba and one attention layer (the default has no attention layer)
    "bamba": {"attn_layer_indices": [1]},
    "blt": {"encoder_hash_byte_group_vocab": 64},
    # RoPE parameters per layer type (the default has none, which the rotary embedding cannot read)
    "cohere_compass_text": {
        "layer_types": ["sliding_attention", "full_attention"],
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    },
    # DbrxAttention reads `attn_config.rope_theta` and cannot clamp with `clip_qkv=None`
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # Grouped low-rank output projection
    "deepseek_v4": {"o_groups": 2, "o_lora_rank": 16},
    # Input, recurrent (looped) and output sections of one layer each
    "dory": {
        "num_hidden_layers": 3,
        "n_input_layers": 1,
        "n_output_layers": 1,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    # The MoE layers' shared expert (the default has none, which the MoE block cannot size)
    "dots1": {"n_shared_experts": 1},
    "dots3_note": {"text_config": _DOTS3_NOTE_TEXT, "vision_config": {"pyramid_num_routed": [-1, 4]}},
    "dots3_note_text": _DOTS3_NOTE_TEXT,
    # A dense layer, then an MoE layer (the default makes the first two layers dense)
    "flint": {"mlp_only_layers": [0]},
    # Sliding and full attention, and two last layers that reuse the first two's KV cache
    "gemma3n_text": {
        "num_hidden_layers": 4,
        "layer_types": ["sliding_attention", "full_attention"] * 2,
        "num_kv_shared_layers": 2,
    },
    # `global_head_dim` (full-attention layers' head size) is a constructor argument, not a config field
    "gemma4": {"text_config": {"global_head_dim": 32}},
    "gemma4_text": {"global_head_dim": 32},
    "gemma4_unified": {"text_config": {"global_head_dim": 32}},
    "gemma4_unified_text": {"global_head_dim": 32},
    "got_ocr2": {"vision_config": {"image_size": 128, "global_attn_indexes": [1]}},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": SLIDING_WINDOW},
    # One mamba and one attention layer (the default has no attention layer)
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # Attention-residual blocks of one layer; Inkling 2 Loop runs its second layer twice
    "inkling2_loop_text": {
        "n_layers_per_attn_res_block": 1,
        "loop_layer_index_start": 1,
        "loop_layer_index_end": 2,
        "loop_num_passes": 2,
        "loop_gate_rank": 8,
    },
    "inkling2_text": {"n_layers_per_attn_res_block": 1},
    # A mamba layer with a dense MLP, then an attention layer with experts
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "kolibri1_1": {"mlp_only_layers": [0]},
    # A short-convolution layer and an attention layer (the LFM2 default is all attention)
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # num_heads * head_dim must be expand * hidden_size
    "mamba2": {"num_heads": 8, "n_groups": 1},
    "qwen4_exp": {"text_config": _QWEN4_EXP_TEXT},
    "qwen4_exp_text": _QWEN4_EXP_TEXT,
    # LSH attention draws new random hash rotations on every forward (or, with `hash_seed`, reseeds torch's global
    # RNG on every forward), so both layers use local attention. Training needs sequence lengths that are multiples of
    # the chunk length and, with axial position embeddings, exactly prod(axial_pos_shape) long: one-token chunks
    # that see the SLIDING_WINDOW - 1 chunks before them, and learned position embeddings, take any length.
    "reformer": {
        "attn_layers": ["local", "local"],
        "axial_pos_embds": False,
        "local_attn_chunk_length": 1,
        "local_num_chunks_before": SLIDING_WINDOW - 1,
    },
    # The second layer is a NoPE layer
    "smollm3": {"no_rope_layer_interval": 2},
    # XLM is a masked LM unless `causal`
    "xlm": {"causal": True},
    # The shared attention block's weights are tied across hybrid layers: it needs two of them
    "zamba": {"num_hidden_layers": 3, "layers_block_type": ["hybrid", "linear_attention", "hybrid"]},
    "zamba2": {"layers_block_type": ["linear_attention", "hybrid"]},
    # ZAYA supports top-1 routing only
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 32},
}

_HEAD_TRANSFORM = (
    "LM head runs a dense+GELU+LayerNorm transform before the vocab projection; TRL's fused head projects "
    "last_hidden_state straight through get_output_embeddings(), so its log-probs differ from the logits'"
)
_PREFIX_MISMATCH = (
    "base_model_prefix 'language_model' names no submodule (the decoder is `.model`), so `base_model` is the "
    "CausalLM itself and TRL's fused head gets a CausalLMOutput without last_hidden_state"
)
_SHARED_KV_DRAFTER = (
    "speculative-decoding drafter: every layer reuses the target model's KV states, so its forward needs "
    "shared_kv_states and inputs_embeds from a Gemma 4 target"
)

UNBUILDABLE: dict[str, str] = {
    "bert": _HEAD_TRANSFORM,
    "big_bird": _HEAD_TRANSFORM,
    "camembert": _HEAD_TRANSFORM,
    "cpmant": "CpmAntModel marks every input token as context, so its attention is bidirectional (not a next-token LM)",
    "data2vec-text": _HEAD_TRANSFORM,
    "electra": _HEAD_TRANSFORM,
    "ernie": _HEAD_TRANSFORM,
    "gemma3n": "the vision tower is a timm MobileNetV5 (TimmWrapperModel) and timm is not installed",
    "gemma4_assistant": _SHARED_KV_DRAFTER,
    "gemma4_unified_assistant": _SHARED_KV_DRAFTER,
    "inkling_text": (
        "the CausalLM divides the hidden states by logits_mup_width_multiplier before lm_head, which TRL's fused "
        "head does not apply"
    ),
    "llama4": _PREFIX_MISMATCH,
    "llama4_text": _PREFIX_MISMATCH,
    "megatron-bert": _HEAD_TRANSFORM,
    "mllama": _PREFIX_MISMATCH,
    "modernbert-decoder": _HEAD_TRANSFORM,
    "musicgen": (
        "AutoModelForCausalLM gets the composite MusicgenConfig but MusicgenForCausalLM needs its decoder config; "
        "the decoder predicts num_codebooks audio-code streams with one head each (no single LM head)"
    ),
    "musicgen_melody": (
        "AutoModelForCausalLM gets the composite MusicgenMelodyConfig but MusicgenMelodyForCausalLM needs its "
        "decoder config; the decoder predicts num_codebooks audio-code streams with one head each (no single LM head)"
    ),
    "prophetnet": (
        "next-token logits come from the first n-gram predicting stream, not last_hidden_state (the main stream) "
        "that TRL's fused head projects"
    ),
    "recurrent_gemma": "the CausalLM soft-caps the logits with logits_soft_cap, which TRL's fused head ignores",
    "rembert": _HEAD_TRANSFORM,
    "roberta": _HEAD_TRANSFORM,
    "roberta-prelayernorm": _HEAD_TRANSFORM,
    "roc_bert": _HEAD_TRANSFORM,
    "roformer": _HEAD_TRANSFORM,
    "xlm-roberta": _HEAD_TRANSFORM,
    "xlm-roberta-xl": _HEAD_TRANSFORM,
    "xlnet": (
        "permutation LM: attention is bidirectional with the default attn_type='bi', and with attn_type='uni' the "
        "forward crashes on any attention_mask (in-place broadcast of the padding mask)"
    ),
    "xlstm": "the CausalLM soft-caps the logits with output_logit_soft_cap, which TRL's fused head ignores",
    "xmod": _HEAD_TRANSFORM,
}


class Unbuildable(Exception):
    """The model type cannot be built and run generically here; the message says why."""


def _fields(config_class: type) -> set[str]:
    """The dataclass field names of a config class (its constructor arguments)."""
    try:
        return {field.name for field in dataclasses.fields(config_class)}
    except TypeError:
        return set()


def _sub_config_classes(config_class: type) -> dict[str, tuple[type, dict[str, Any]]]:
    """Sub-config key -> (config class, default init kwargs) of a composite config class."""
    result = {}
    for key, spec in getattr(config_class, "sub_configs_defaults", {}).items():
        sub_class = spec.config_class
        if sub_class is AutoConfig or not isinstance(sub_class, type) or not issubclass(sub_class, PretrainedConfig):
            sub_class = CONFIG_MAPPING[spec.model_type]
        result[key] = (sub_class, dict(spec.init_kwargs))
    # A few configs (DBRX, MPT) still declare plain `sub_configs` classes
    for key, sub_class in (getattr(config_class, "sub_configs", None) or {}).items():
        if key not in result and isinstance(sub_class, type) and issubclass(sub_class, PretrainedConfig):
            result[key] = (sub_class, {})
    return result


def _first_seen(values: list[Any]) -> list[Any]:
    """The distinct values of `values` in order of first appearance."""
    return list(dict.fromkeys(values))


def _cover_layer_kinds(
    config_class: type, config: PretrainedConfig, init_kwargs: dict[str, Any], fixed: set[str]
) -> dict[str, Any]:
    """Config kwargs that give a shrunk hybrid every layer kind its full-size default has.

    Two layers of a model that puts one full-attention layer after five sliding-window ones (or one attention layer
    among mamba layers, or dense layers before MoE ones) are all of the first kind. This lists each kind once, in
    the order the default config first uses it, and adds layers when there are more kinds than layers.
    """
    fields = _fields(config_class)
    names = [name for name in _LAYER_KIND_FIELDS if name in fields and name not in fixed]
    if not names:
        return {}
    try:
        default = config_class(**init_kwargs)
    except Exception:  # no default to compare with: keep the shrunk config as it is
        return {}
    lists, changed = {}, False
    for name in names:
        have, want = list(getattr(config, name, None) or []), _first_seen(list(getattr(default, name, None) or []))
        if want and not set(want) <= set(have):
            have, changed = want, True
        lists[name] = have
    if not changed:
        return {}
    layers_field = getattr(config_class, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    num_layers = max([getattr(config, layers_field)] + [len(values) for values in lists.values()])
    updates: dict[str, Any] = {layers_field: num_layers}
    for name, values in lists.items():
        if values:
            updates[name] = values + values[-1:] * (num_layers - len(values))
    return updates


def _make_config(
    config_class: type, vocab_size: int, overrides: dict[str, Any], init_kwargs: dict[str, Any] | None = None
) -> PretrainedConfig:
    """`config_class` with every size in `_SIZES` it declares, tiny sub-configs, then `overrides` on top."""
    fields = _fields(config_class)
    init_kwargs = dict(init_kwargs or {})
    kwargs: dict[str, Any] = dict(init_kwargs)
    kwargs.update({name: value for name, value in _SIZES.items() if name in fields})
    if "kv_lora_rank" in fields and "num_key_value_heads" in fields:
        # Multi-head latent attention expands its compressed keys/values to every query head
        kwargs["num_key_value_heads"] = HEADS
    if "is_decoder" in fields:
        # Encoder families (BERT, RoBERTa, ...) are causal LMs only with a causal self-attention mask
        kwargs["is_decoder"] = True
    token_ids = {
        "vocab_size": vocab_size,
        "unpadded_vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "cls_token_id": 1,
        "sep_token_id": 2,
        "decoder_start_token_id": 1,
    }
    kwargs.update({name: value for name, value in token_ids.items() if name in fields})
    overrides = dict(overrides)
    for key, (sub_class, sub_init) in _sub_config_classes(config_class).items():
        sub_overrides = overrides.pop(key, {})
        kwargs[key] = None if sub_overrides is None else _make_config(sub_class, vocab_size, sub_overrides, sub_init)
    attribute_map = getattr(config_class, "attribute_map", {})
    overrides = {attribute_map.get(name, name): value for name, value in overrides.items()}
    kwargs.update(overrides)
    # A first draft: its warnings (about layer kinds or RoPE context) are about what the updates below fix
    with _quiet_transformers():
        config = config_class(**kwargs)
        updates = _cover_layer_kinds(config_class, config, init_kwargs, set(overrides))
    updates.update(_rope_context(config_class, config, set(overrides)))
    return config_class(**{**kwargs, **updates}) if updates else config


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings for the duration."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def _rope_context(config_class: type, config: PretrainedConfig, fixed: set[str]) -> dict[str, Any]:
    """Keep the default `max_position_embeddings` where the default RoPE scaling extends a longer original context.

    YaRN / Llama 3 style `rope_parameters` name the pre-training context (`original_max_position_embeddings`, e.g.
    8192); a shorter `max_position_embeddings` contradicts them. RoPE models have no position parameters, so the
    default costs nothing.
    """
    rope = getattr(config, "rope_parameters", None)
    if "max_position_embeddings" in fixed or not isinstance(rope, dict):
        return {}
    nested = [value for value in rope.values() if isinstance(value, dict)]
    original = max((params.get("original_max_position_embeddings") or 0 for params in [rope, *nested]), default=0)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or original <= limit:
        return {}
    default = {field.name: field.default for field in dataclasses.fields(config_class)}.get("max_position_embeddings")
    return {"max_position_embeddings": default} if isinstance(default, int) and default >= original else {}


def tiny_config(model_type: str, vocab_size: int = 96) -> PretrainedConfig:
    """The config of a tiny random model of `model_type`; raises `Unbuildable` for the types in `UNBUILDABLE`."""
    if model_type in UNBUILDABLE:
        raise Unbuildable(f"{model_type}: {UNBUILDABLE[model_type]}")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{model_type!r} is not in transformers' causal-LM auto mapping")
    return _make_config(CONFIG_MAPPING[model_type], vocab_size, _OVERRIDES.get(model_type, {}))


def build_tiny_causal_lm(
    model_type: str, vocab_size: int = 96, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """A tiny random-init `AutoModelForCausalLM` of `model_type` in float32 and eval mode.

    A (sub-)model that does not support `attn_implementation` gets eager attention instead; the model's
    `config._attn_implementation` (and its sub-configs') say which one each part got. Raises `Unbuildable` for the
    types in `UNBUILDABLE`.
    """
    config = tiny_config(model_type, vocab_size)
    implementation: str | dict[str, str] = attn_implementation
    for _ in range(len(config.sub_configs) + 2):
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation, dtype=torch.float32)
        except ValueError as error:
            if implementation == "eager" or "does not support an attention implementation" not in str(error):
                raise
            implementation = _attn_fallback(config, implementation, str(error))
            continue
        return model.eval()
    raise AssertionError(f"{model_type}: no attention implementation fallback worked")


def check_unbuildable(model_type: str, vocab_size: int = 96) -> None:
    """Build a type of `UNBUILDABLE` anyway (eager attention) and run the fused-forward check on it; raises what
    makes it unbuildable, so a test can show that each listed reason still holds."""
    config = _make_config(CONFIG_MAPPING[model_type], vocab_size, _OVERRIDES.get(model_type, {}))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    if hasattr(model, "set_default_language"):  # X-MOD routes through per-language adapters
        model.set_default_language(next(iter(config.languages)))
    _check_fused_forward(model, vocab_size)


def _attn_fallback(config: PretrainedConfig, implementation: str | dict[str, str], error: str) -> str | dict[str, str]:
    """`implementation` with eager attention for the (sub-)model that `error` says does not support it."""
    model_class = getattr(transformers, error.split()[0], None)
    unsupported = getattr(model_class, "config_class", None)
    keys = [key for key in config.sub_configs if unsupported is not None and type(getattr(config, key)) is unsupported]
    if not keys:
        return "eager"
    if isinstance(implementation, str):
        implementation = {"": implementation, **dict.fromkeys(config.sub_configs, implementation)}
    return {**implementation, **dict.fromkeys(keys, "eager")}


def _check_fused_forward(model: PreTrainedModel, vocab_size: int) -> None:
    """The fused log-prob forward TRL uses runs, is finite and matches the plain logits' log-softmax."""
    from trl.trainer.utils import add_fused_lm_head

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        changed = ids.clone()
        changed[0, -1] = 3 + (changed[0, -1] - 2) % (vocab_size - 3)
        changed_logits = model(input_ids=changed, attention_mask=mask, use_cache=False).logits
        if not torch.allclose(changed_logits[0, :-1], logits[0, :-1], rtol=1e-4, atol=1e-5):
            raise AssertionError("not causal: changing the last token changes the earlier logits")
        add_fused_lm_head(model, outputs=("log_probs", "entropy"))
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True)
    if out.log_probs.shape != (2, 11):
        raise AssertionError(f"fused log_probs have shape {tuple(out.log_probs.shape)}, expected (2, 11)")
    if not torch.isfinite(out.log_probs).all():
        raise AssertionError("fused log_probs are not finite")
    shifted = labels[:, 1:]
    valid = shifted != -100
    expected = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, shifted.clamp(min=0)[..., None])[..., 0]
    if not torch.allclose(out.log_probs[valid], expected[valid], rtol=1e-4, atol=1e-5):
        diff = (out.log_probs[valid] - expected[valid]).abs().max().item()
        raise AssertionError(f"fused log_probs differ from the plain logits' log-softmax (max abs diff {diff:.3g})")


def _probe_inputs(model: PreTrainedModel, vocab_size: int) -> list[str]:
    """Notes on how the plain forward takes `position_ids` and a 4D attention mask (empty when as expected).

    Only the first `SLIDING_WINDOW` positions are compared, where sliding-window layers see every earlier token.
    """
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab_size, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    n = min(SLIDING_WINDOW, 8)
    notes = []
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        positions = torch.arange(12).repeat(2, 1)
        try:
            same = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            restarted = positions.clone()
            restarted[:, n // 2 :] -= n // 2
            moved = model(input_ids=ids, attention_mask=mask, position_ids=restarted, use_cache=False).logits
            if not torch.allclose(same[:, :n], logits[:, :n], rtol=1e-4, atol=1e-5):
                notes.append("explicit position_ids change the logits")
            elif torch.allclose(moved[:, n // 2 : n], logits[:, n // 2 : n], rtol=1e-4, atol=1e-5):
                notes.append("ignores position_ids")
        except Exception as error:
            notes.append(f"position_ids fail ({type(error).__name__})")
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        allowed = causal & mask.bool()[:, None, :]
        allowed |= torch.eye(12, dtype=torch.bool)  # padding queries see themselves: no empty softmax row
        allowed = allowed[:, None]
        if model.config.get_text_config()._attn_implementation == "eager":
            allowed = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        try:
            dense = model(input_ids=ids, attention_mask=allowed, use_cache=False).logits
            if not torch.allclose(dense[:, :n], logits[:, :n], rtol=1e-4, atol=1e-5):
                notes.append("4D attention_mask changes the logits")
        except Exception as error:
            notes.append(f"4D attention_mask fails ({type(error).__name__})")
    return notes


def _main() -> None:
    import argparse
    import time
    import traceback

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_types", nargs="*", help="model types to check (default: all)")
    parser.add_argument("--attn", default="sdpa", help="attention implementation to request (default: sdpa)")
    parser.add_argument("--vocab-size", type=int, default=96)
    parser.add_argument("--probe", action="store_true", help="also note how position_ids and 4D masks are taken")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the end of each failure's traceback")
    args = parser.parse_args()
    start = time.perf_counter()
    counts: dict[str, int] = {}
    print(f"{'model_type':26s} {'params':>9s} {'build':>6s} {'check':>6s} {'attn':6s} status")
    for model_type in args.model_types or CAUSAL_LM_TYPES:
        t0 = time.perf_counter()
        params, build_s, attn, notes = 0, 0.0, "", []
        try:
            model = build_tiny_causal_lm(model_type, args.vocab_size, args.attn)
            build_s = time.perf_counter() - t0
            params = sum(p.numel() for p in model.parameters())
            attn = str(model.config.get_text_config()._attn_implementation)
            if args.probe:
                notes = _probe_inputs(model, args.vocab_size)
            _check_fused_forward(model, args.vocab_size)
            status = "ok"
        except Unbuildable as error:
            status = f"unbuildable: {UNBUILDABLE[model_type]}" if model_type in UNBUILDABLE else str(error)
        except Exception as error:
            status = f"FAIL {type(error).__name__}: {(str(error).splitlines() or [''])[0][:160]}"
            if args.verbose:
                traceback.print_exc(limit=-3)
        check_s = time.perf_counter() - t0 - build_s
        kind = status.split(":")[0].split()[0]
        counts[kind] = counts.get(kind, 0) + 1
        note = f" [{'; '.join(notes)}]" if notes else ""
        print(f"{model_type:26s} {params:>9,d} {build_s:5.2f}s {check_s:5.2f}s {attn:6s} {status}{note}", flush=True)
    print(f"{len(args.model_types or CAUSAL_LM_TYPES)} types: {counts} in {time.perf_counter() - start:.1f}s")
    raise SystemExit(1 if counts.get("FAIL") else 0)


if __name__ == "__main__":
    _main()
