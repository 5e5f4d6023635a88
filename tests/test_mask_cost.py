"""What the shared-prompt masks cost: padding isolated to the diagonal (FlexAttention skips the rest), rows aligned for
sdpa's kernels, and the FlexAttention mask builder and kernel compiled a bounded number of times over batches of
varying length (past `torch._dynamo.config.recompile_limit` torch falls back to eager FlexAttention, which
materialises the whole score matrix)."""

from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch
from test_shared_prompt import make_trainer, random_examples, run_step

from trl_nca import DataCollatorForKWayReward
from trl_nca import attention as attention_module
from trl_nca.attention import FLEX_BLOCK_SIZE, LAYOUT_METADATA_KEYS, block_mask, dense_mask

BLOCK = FLEX_BLOCK_SIZE


def metadata(batch: dict) -> tuple[torch.Tensor, ...]:
    return tuple(batch[key] for key in LAYOUT_METADATA_KEYS)


def oracle_mask(batch: dict, window: int | None = None) -> torch.Tensor:
    """`(B, 1, L, L)` bool, written out token by token from the layout's definition: a real token sees the earlier
    tokens (positions) of its own prompt's prefix and of its own branch, within the window; padding sees itself."""
    seqs, branches, positions = (batch[key].tolist() for key in LAYOUT_METADATA_KEYS)
    rows, length = len(seqs), len(seqs[0])
    mask = torch.zeros(rows, 1, length, length, dtype=torch.bool)
    for b in range(rows):
        for q in range(length):
            for k in range(length):
                if seqs[b][q] < 0:
                    mask[b, 0, q, k] = q == k
                    continue
                same_part = branches[b][k] == 0 or branches[b][k] == branches[b][q]
                in_window = window is None or positions[b][q] - positions[b][k] < window
                visible = seqs[b][k] == seqs[b][q] and same_part and positions[b][k] <= positions[b][q]
                mask[b, 0, q, k] = visible and in_window
    return mask


@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("window", [None, 3])
def test_padding_sees_only_itself(padding_free, window):
    from torch.nn.attention.flex_attention import create_mask

    examples = [
        {"prompt_ids": [5, 6, 7], "completion_ids": [[8, 9], [10]], "rewards": [1.0, 0.0]},
        {"prompt_ids": [3], "completion_ids": [[4], [4, 4]], "rewards": [0.0, 1.0]},
    ]
    collator = DataCollatorForKWayReward(
        pad_token_id=0, layout="shared_prompt", padding_free=padding_free, pad_to_multiple_of=16
    )
    batch = collator(examples)
    assert (batch["sequence_ids"] < 0).sum() >= 4  # several padding tokens in a row
    expected = oracle_mask(batch, window)
    dense = dense_mask(*metadata(batch), sliding_window=window)
    assert torch.equal(dense, expected)
    assert dense.any(-1).all()  # no empty softmax row
    rows, length = batch["input_ids"].shape
    blocks = block_mask(*metadata(batch), sliding_window=window)
    assert torch.equal(create_mask(blocks.mask_mod, rows, 1, length, length), expected)
    additive = dense_mask(*metadata(batch), sliding_window=window, dtype=torch.float32)
    assert torch.equal(additive == 0, expected)


def preset_shaped_examples(rng: random.Random) -> list[dict]:
    """8 prompts of K = 4 like the GPU preset's batch: the longest row is 3456 tokens (27 blocks), the others are
    ragged, so most rows end in whole blocks of padding."""
    examples = []
    for index in range(8):
        prompt = rng.randint(100, 700)
        row_length = 3456 if index == 0 else rng.randint(900, 3300)
        response_tokens = row_length - (prompt - 1) - 4  # the row: prompt[:-1], then 4 x (prompt[-1], response)
        responses = [response_tokens // 4 + (k < response_tokens % 4) for k in range(4)]
        examples.append(
            {
                "prompt_ids": [rng.randint(3, 99) for _ in range(prompt)],
                "completion_ids": [[rng.randint(3, 99) for _ in range(n)] for n in responses],
                "rewards": [rng.random() for _ in responses],
            }
        )
    return examples


def test_padding_costs_only_its_diagonal_blocks():
    """On a batch shaped like the GPU preset's, the blocks whose queries are all padding are computed once each (the
    diagonal block a padding token sees itself in), not every padding block against every other: O(L/128), not
    O((L/128)^2)."""
    collator = DataCollatorForKWayReward(pad_token_id=0, layout="shared_prompt", pad_to_multiple_of=BLOCK)
    batch = collator(preset_shaped_examples(random.Random(0)))
    rows, length = batch["input_ids"].shape
    assert (rows, length) == (8, 3456)
    blocks = block_mask(*metadata(batch))
    computed = (blocks.kv_num_blocks + blocks.full_kv_num_blocks)[:, 0]  # (rows, query blocks)
    padding_queries = (batch["padding_mask"].view(rows, length // BLOCK, BLOCK) == 0).all(-1)
    n_padding_blocks = int(padding_queries.sum())
    assert n_padding_blocks >= 2 * rows  # the batch does have whole blocks of padding
    assert int(computed[padding_queries].sum()) == n_padding_blocks
    # ... and each is the diagonal block
    diagonal = torch.arange(length // BLOCK).expand(rows, -1)
    assert torch.equal(blocks.kv_indices[:, 0, :, 0][padding_queries], diagonal[padding_queries].int())
    # the real tokens' blocks are the same as without any padding in the rule (a pad key is never seen by them)
    real_queries = ~padding_queries
    dense_blocks = dense_mask(*metadata(batch)).view(rows, 1, length // BLOCK, BLOCK, length // BLOCK, BLOCK)
    assert torch.equal(blocks.to_dense().bool()[:, 0][real_queries], dense_blocks.any(dim=(3, 5))[:, 0][real_queries])


# ------------------------------------------------------------------------------------------------ sdpa alignment
@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "packed"])
def test_sdpa_rows_are_aligned_to_8_and_logps_do_not_change(tmp_path, tokenizer, make_model, padding_free):
    trainer = make_trainer(tmp_path, tokenizer, make_model, attn="sdpa", padding_free=padding_free)
    collator = trainer.data_collator
    assert (collator.layout, collator.pad_to_multiple_of) == ("shared_prompt", 8)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    unaligned = dataclasses.replace(collator, pad_to_multiple_of=None)
    assert unaligned(rows)["input_ids"].size(1) % 8 != 0  # the data alone would not be aligned
    aligned_step = run_step(trainer, grad=False)
    assert aligned_step.batch["input_ids"].size(1) % 8 == 0
    trainer.data_collator = unaligned
    torch.testing.assert_close(aligned_step.logps, run_step(trainer, grad=False).logps, rtol=1e-6, atol=1e-6)


def test_pad_multiple_by_attention_and_layout(tmp_path, tokenizer, make_model):
    def multiple(**kwargs):
        return make_trainer(tmp_path, tokenizer, make_model, **kwargs).data_collator.pad_to_multiple_of

    assert multiple(attn="sdpa", pad_to_multiple_of=12) == 24  # the user's multiple, aligned
    assert multiple(attn="sdpa", layout="padded") is None  # transformers builds the padded rows' masks itself
    assert multiple(attn="eager") is None  # eager's matmuls need no alignment
    assert multiple(attn="flex_attention") == BLOCK


# ------------------------------------------------------------------------------------------------ compilations
@pytest.fixture
def counting_compile(monkeypatch):
    """Every `torch.compile` from now on uses a counting backend (dynamo traces and guards as for inductor; the graph
    then runs eagerly, which works on CPU). Dynamo's caches are cleared before and after. Yields the counter and the
    list of `torch.compile` calls."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter, calls = CompileCounter(), []
    real_compile = torch.compile

    def compile_counting(model=None, **kwargs):
        calls.append(kwargs)
        return real_compile(model, **{**kwargs, "backend": counter})

    monkeypatch.setattr(torch, "compile", compile_counting)
    # the mask builder is compiled lazily, once per process: start without it, and leave none behind
    monkeypatch.setattr(attention_module, "_compiled_block_mask_builder", None, raising=False)
    yield counter, calls
    torch._dynamo.reset()


def length_classes(rng: random.Random, n_batches: int, n_prompts: int = 2) -> list[dict]:
    """`n_batches` shared-prompt batches padded to the block size, of at least two blocks and distinct lengths."""
    collator = DataCollatorForKWayReward(pad_token_id=0, layout="shared_prompt", pad_to_multiple_of=BLOCK)
    batches, lengths = [], set()
    while len(batches) < n_batches:
        batch = collator(random_examples(rng, n_prompts=n_prompts, scale=3, max_prompt=80))
        if batch["input_ids"].size(1) >= 2 * BLOCK and batch["input_ids"].size(1) not in lengths:
            lengths.add(batch["input_ids"].size(1))
            batches.append(batch)
    return batches


def test_block_mask_builder_compiles_once_over_lengths_windows_and_grad_modes(counting_compile):
    """The mask builder is compiled once per process with dynamic lengths: batches of 5 lengths, both grad modes and
    two windows reuse one graph (today: a new `torch.compile` and a deprecation warning per batch, and a recompile per
    grad mode and for the second length)."""
    from torch.nn.attention.flex_attention import create_mask

    counter, calls = counting_compile
    batches = length_classes(random.Random(0), 5)
    for index, batch in enumerate(batches):
        for window in (None, 3):
            with torch.set_grad_enabled(index % 2 == 0), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                blocks = block_mask(*metadata(batch), sliding_window=window, compiled=True)
            assert not [w for w in caught if issubclass(w.category, DeprecationWarning)], [str(w) for w in caught]
            rows, length = batch["input_ids"].shape
            eager = block_mask(*metadata(batch), sliding_window=window, compiled=False)
            assert torch.equal(blocks.to_dense(), eager.to_dense())
            assert torch.equal(
                create_mask(blocks.mask_mod, rows, 1, length, length),
                dense_mask(*metadata(batch), sliding_window=window),
            )
    assert len(calls) == 1, calls  # torch.compile called once, not per batch
    assert counter.frame_count == 1, f"{counter.frame_count} compilations over {len(batches)} lengths"
    # a batch of one row (packed, or the last batch) is the one other graph (dynamo specialises sizes of 1)
    single = length_classes(random.Random(1), 2, n_prompts=1)
    for batch in single:
        block_mask(*metadata(batch), compiled=True)
    assert counter.frame_count == 2


@pytest.mark.parametrize("compiled", [False, True], ids=["eager-masks", "compiled-masks"])
def test_flex_kernel_compiles_once_for_every_window(counting_compile, monkeypatch, compiled):
    """transformers compiles `flex_attention` once (`compile_friendly_flex_attention`, automatic dynamic shapes: the
    first length static, then one dynamic graph); dynamo guards on the mask_mod's closure, so a window passed as a
    Python value (None for full-attention layers, an int for sliding ones) doubled the graphs of a model mixing both.
    `compiled`: the masks come from the compiled builder, as on a GPU (one more graph: the builder's). No grad here:
    torch 2.13 has no FlexAttention backward on CPU; training adds the same graphs once more for the grad mode."""
    import transformers.integrations.flex_attention as flex_integration

    counter, _ = counting_compile
    wrapper = flex_integration.WrappedFlexAttention
    monkeypatch.setattr(wrapper, "_instance", None)
    monkeypatch.setattr(wrapper, "_is_flex_compiled", False)
    monkeypatch.setattr(wrapper, "_compiled_flex_attention", None)
    batches = length_classes(random.Random(2), 4)
    generator = torch.Generator().manual_seed(0)
    options = {"compiled": True} if compiled else {}  # the CPU's default: eager
    with torch.no_grad():
        for batch in batches:
            rows, length = batch["input_ids"].shape
            query, key, value = torch.randn(3, rows, 2, length, 8, generator=generator)
            for window in (None, 3):
                blocks = block_mask(*metadata(batch), sliding_window=window, **options)
                out = flex_integration.compile_friendly_flex_attention(query, key, value, block_mask=blocks)
                reference = torch.nn.functional.scaled_dot_product_attention(
                    query, key, value, attn_mask=dense_mask(*metadata(batch), sliding_window=window)
                )
                torch.testing.assert_close(out, reference)
    kernel_graphs = counter.frame_count - compiled
    assert kernel_graphs == 2, (
        f"{kernel_graphs} compilations of flex_attention over {len(batches)} lengths x 2 windows"
    )
