"""The packed padded layout hands variable-length attention its sequence boundaries from the collator.

Without them, transformers' FlashAttention path re-derives `cu_seq_lens`/`max_length` from `position_ids` in every
layer of every forward (`_is_packed_sequence`, then `prepare_fa_kwargs_from_position_ids`: two device syncs per layer,
and a tensor `max_length` the kernel syncs on again), for the policy forward, its gradient-checkpoint recompute and the
reference forward. FlashAttention cannot run on a CPU, so two pure-torch stand-ins are registered with transformers'
`AttentionInterface`: a varlen attention that attends per sequence from the passed `cu_seq_lens` only (raising when
they are missing), and a flash-like implementation that goes through transformers' own `flash_attention_forward` with a
pure-torch `flash_attn_varlen_func`. Oracles: transformers' `prepare_fa_kwargs_from_position_ids` for the boundaries,
and the same weights under sdpa in the plain padded layout for the log-probs.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F
import transformers.modeling_flash_attention_utils as fa_utils
import transformers.modeling_utils as modeling_utils
from conftest import cpu_args
from datasets import Dataset
from test_shared_prompt import kway_rows, random_examples
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

from trl_nca import DataCollatorForKWayReward, NCAConfig, NCATrainer

VARLEN = "trl_nca_test_varlen"
FLASH_LIKE = "trl_nca_test_flash"  # "flash" in the name: transformers and the trainer treat it as FlashAttention
N_LAYERS = 2
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
VARLEN_CALLS: list[bool] = []  # one entry per call of a varlen stand-in: whether grad was on


def causal_attention(query, key, value, scale):
    """Causal attention of one sequence: query `(heads, T, d)`, key/value `(kv_heads, T, d)` (GQA repeated here)."""
    groups = query.size(0) // key.size(0)
    key, value = key.repeat_interleave(groups, 0), value.repeat_interleave(groups, 0)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)


def per_sequence(query, key, value, bounds: list[int], scale):
    """Causal attention run separately on each `[bounds[i], bounds[i + 1])` slice of the token axis (dim -2)."""
    parts = [
        causal_attention(query[..., s:e, :], key[..., s:e, :], value[..., s:e, :], scale)
        for s, e in zip(bounds, bounds[1:])
    ]
    return torch.cat(parts, dim=-2)


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An `AttentionInterface` function for packed rows that knows the sequences only from `cu_seq_lens`."""
    missing = [key for key in VARLEN_KEYS if kwargs.get(key) is None]
    if missing:
        raise RuntimeError(f"varlen attention called without {missing}")
    assert query.size(0) == 1 and attention_mask is None
    assert torch.equal(kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"])
    VARLEN_CALLS.append(torch.is_grad_enabled())
    out = per_sequence(query[0], key[0], value[0], kwargs["cu_seq_lens_q"].tolist(), scaling)
    return out.transpose(0, 1).unsqueeze(0), None


def torch_flash_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True
):
    """`flash_attn_varlen_func` in torch: `(total, heads, d)` tokens, `int32` boundaries and a host `int` max length
    (a tensor would make the real kernel sync with the device)."""
    assert causal and cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int), type(max_seqlen_q)
    VARLEN_CALLS.append(torch.is_grad_enabled())
    bounds = cu_seqlens_q.tolist()
    assert max_seqlen_q == max(e - s for s, e in zip(bounds, bounds[1:]))
    out = per_sequence(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), bounds, softmax_scale)
    return out.transpose(0, 1)


def torch_flash(q, k, v, softmax_scale=None, causal=True):
    """`flash_attn_func` in torch: `(batch, T, heads, d)`, causal, no padding."""
    rows = [
        causal_attention(qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), softmax_scale)
        for qi, ki, vi in zip(q, k, v)
    ]
    return torch.stack(rows).transpose(1, 2)


@pytest.fixture
def registered():
    """Both stand-ins registered with transformers (and removed again afterwards)."""
    VARLEN_CALLS.clear()
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionInterface.register(FLASH_LIKE, flash_attention_forward)
    for name in (VARLEN, FLASH_LIKE):
        AttentionMaskInterface.register(name, flash_attention_mask)
    yield
    for name in (VARLEN, FLASH_LIKE):
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)


@pytest.fixture
def torch_flash_kernels(monkeypatch, registered):
    """transformers' FlashAttention path with the torch kernels above; re-deriving the boundaries from
    `position_ids` (`_is_packed_sequence`, `prepare_fa_kwargs_from_position_ids`) raises."""
    kernels = (torch_flash, torch_flash_varlen, None, fa_utils._pad_input, fa_utils._unpad_input)
    process = (fa_utils._lazy_define_process_function(torch_flash_varlen), dict)

    def lazy_import(implementation, *args, **kwargs):
        assert implementation == FLASH_LIKE, implementation
        return kernels, process

    def derived(*args, **kwargs):
        raise AssertionError("sequence boundaries re-derived from position_ids on the device")

    for module in (fa_utils, modeling_utils):
        monkeypatch.setattr(module, "lazy_import_flash_attention", lazy_import)
    monkeypatch.setattr(fa_utils, "_is_packed_sequence", derived)
    monkeypatch.setattr(fa_utils, "prepare_fa_kwargs_from_position_ids", derived)


# ------------------------------------------------------------------------------------------------ the collator
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("max_length", [None, 28])
def test_the_packed_collator_gives_the_boundaries_transformers_derives(pad_to_multiple_of, max_length):
    rng = random.Random(0)
    for _ in range(5):
        examples = random_examples(rng, n_prompts=rng.randint(1, 6), max_prompt=20)
        batch = DataCollatorForKWayReward(
            pad_token_id=0, padding_free=True, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of
        )(examples)
        (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
        assert batch["cu_seq_lens_q"].dtype == batch["cu_seq_lens_k"].dtype == torch.int32
        assert torch.equal(batch["cu_seq_lens_q"], cu_q) and torch.equal(batch["cu_seq_lens_k"], cu_k)
        # Host ints: a tensor here would be moved to the device and synced on by the kernel in every layer.
        assert type(batch["max_length_q"]) is int and type(batch["max_length_k"]) is int
        assert batch["max_length_q"] == batch["max_length_k"] == int(max_q) == int(max_k)


@pytest.mark.parametrize("layout,padding_free", [("padded", False), ("shared_prompt", False), ("shared_prompt", True)])
def test_only_the_packed_padded_layout_has_boundaries(layout, padding_free):
    """The shared-prompt rows need their branch mask; a boundary-only kernel would attend across branches."""
    examples = random_examples(random.Random(1), n_prompts=3, max_prompt=10)
    batch = DataCollatorForKWayReward(pad_token_id=0, layout=layout, padding_free=padding_free)(examples)
    assert not set(VARLEN_KEYS) & batch.keys()


# ------------------------------------------------------------------------------------------------ the trainer
def make_trainer(tmp_path, tokenizer, make_model, attn, **overrides):
    """NCATrainer on `kway_rows()` with a live reference model and gradient checkpointing: every forward the
    boundaries must reach (policy, recompute, reference) runs."""
    model = make_model("llama", seed=0, attn_implementation=attn, num_hidden_layers=N_LAYERS, initializer_range=0.1)
    ref = make_model("llama", seed=1, attn_implementation=attn, num_hidden_layers=N_LAYERS)
    args = cpu_args(
        NCAConfig, tmp_path / attn, beta=0.5, per_device_train_batch_size=4, gradient_checkpointing=True, **overrides
    )
    return NCATrainer(
        model, ref_model=ref, args=args, train_dataset=Dataset.from_list(kway_rows()), processing_class=tokenizer
    )


def packed_and_padded_sdpa_logps(trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs of the whole dataset in the trainer's packed layout and attention, and (the oracle) in the
    plain padded layout under sdpa."""
    model = trainer.model.eval()
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with torch.no_grad():
        packed = trainer._forward_logps(model, batch)[1]
    attn = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"
    try:
        padded_collator = dataclasses.replace(trainer.data_collator, padding_free=False)
        padded = trainer._prepare_inputs(padded_collator(rows))
        assert "cu_seq_lens_q" not in padded
        with torch.no_grad():
            oracle = trainer._forward_logps(model, padded)[1]
    finally:
        model.config._attn_implementation = attn
    model.train()
    return packed, oracle


def test_a_varlen_attention_scores_and_trains_from_the_collators_boundaries(
    tmp_path, tokenizer, make_model, registered
):
    trainer = make_trainer(
        tmp_path, tokenizer, make_model, VARLEN, kway_layout="padded", padding_free=True, kway_layout_check=False
    )
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == ("padded", True)
    packed, oracle = packed_and_padded_sdpa_logps(trainer)
    torch.testing.assert_close(packed, oracle, rtol=0, atol=1e-5)

    VARLEN_CALLS.clear()
    steps = trainer.args.max_steps
    trainer.train()
    # Per step and layer: the policy forward, its checkpoint recompute (grad on) and the reference forward.
    assert len(VARLEN_CALLS) == 3 * N_LAYERS * steps
    assert sum(VARLEN_CALLS) >= N_LAYERS * steps


def test_flash_attention_gets_the_boundaries_instead_of_deriving_them(
    tmp_path, tokenizer, make_model, torch_flash_kernels
):
    """The default (`kway_layout="auto"`) under FlashAttention: packed padded layout, first-batch self-check, and no
    forward (policy, recompute, reference) re-derives the boundaries from `position_ids`."""
    trainer = make_trainer(tmp_path, tokenizer, make_model, FLASH_LIKE)
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == ("padded", True)
    VARLEN_CALLS.clear()
    trainer.train()
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == ("padded", True)  # check passed
    # Every layer of the policy forward, its recompute and the reference forward ran the varlen kernel (the
    # first-batch self-check adds its own forwards).
    assert len(VARLEN_CALLS) >= 3 * N_LAYERS * trainer.args.max_steps
    packed, oracle = packed_and_padded_sdpa_logps(trainer)
    torch.testing.assert_close(packed, oracle, rtol=0, atol=1e-5)
