"""Attention masks of the shared-prompt layout, built on the model's device from the collator's O(L) metadata.

The collator describes each token with three integers (see `trl_nca.collator`): `sequence_ids` (which prompt of its
row it belongs to, -1 for padding), `branch_ids` (0 for the prompt, k + 1 for the k-th response, -1 for padding) and
`position_ids`. One rule gives the mask: a query token attends a key token when both belong to the same prompt, the key
is in the prompt or in the query's own branch, and the key's position is not after the query's (within the sliding
window, for models that have one). A padding token sees itself only, which keeps every softmax row non-empty and, under
FlexAttention, costs one block per block of padding (the diagonal one) instead of every padding block against every
other.

The rule is evaluated as a dense `(B, 1, L, L)` mask for sdpa (bool) and eager (additive, in the model's dtype), or as
a FlexAttention `BlockMask` whose block sparsity skips the other prompts and the other branches. Nothing quadratic is
ever built on the host.

Compilation (past `torch._dynamo.config.recompile_limit`, 8, torch runs FlexAttention eagerly, which materialises
every score): our `BlockMask` builder is compiled once per process with dynamic lengths, and its `mask_mod` is one
closure for every sliding window (see `block_mask`). transformers compiles the `flex_attention` kernel itself, once per
process (`compile_friendly_flex_attention`, automatic dynamic shapes): a static graph for the first length, then one
dynamic graph for every later length, per grad mode (policy forward; reference and evaluation forwards); dynamo gives
a batch of one row or of one block a graph of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# FlexAttention's default block size. Rows are padded to a multiple of it under flex_attention: torch 2.13's compiled
# CPU kernel returns wrong values for the first queries when the length is not a multiple of the block size.
FLEX_BLOCK_SIZE = 128
LAYOUT_METADATA_KEYS = ("sequence_ids", "branch_ids", "position_ids")


def attends(seq_q, seq_k, branch_q, branch_k, pos_q, pos_k, q_idx, kv_idx, sliding_window=None):
    """The shared-prompt rule, elementwise on broadcastable tensors: True where the query may attend the key.

    `q_idx`/`kv_idx` are the tokens' indices in their row (a padding token sees itself only); `sliding_window` is None,
    an int, or a 0-dim tensor."""
    allowed = (seq_q >= 0) & (seq_q == seq_k) & ((branch_k == 0) | (branch_k == branch_q)) & (pos_k <= pos_q)
    if sliding_window is not None:
        allowed = allowed & (pos_q - pos_k < sliding_window)
    return allowed | (q_idx == kv_idx)


def dense_mask(
    sequence_ids: torch.Tensor,
    branch_ids: torch.Tensor,
    position_ids: torch.Tensor,
    sliding_window: int | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The `(B, 1, L, L)` mask on the metadata's device: bool (True = attend) or, with a float `dtype`, additive."""
    index = torch.arange(sequence_ids.size(1), device=sequence_ids.device)
    allowed = attends(
        sequence_ids.unsqueeze(2),
        sequence_ids.unsqueeze(1),
        branch_ids.unsqueeze(2),
        branch_ids.unsqueeze(1),
        position_ids.unsqueeze(2),
        position_ids.unsqueeze(1),
        index.unsqueeze(1),
        index.unsqueeze(0),
        sliding_window,
    ).unsqueeze(1)
    if dtype is None or dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _build_block_mask(sequence_ids, branch_ids, position_ids, window: torch.Tensor):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        return attends(
            sequence_ids[b, q_idx],
            sequence_ids[b, kv_idx],
            branch_ids[b, q_idx],
            branch_ids[b, kv_idx],
            position_ids[b, q_idx],
            position_ids[b, kv_idx],
            q_idx,
            kv_idx,
            window,
        )

    n_rows, length = sequence_ids.shape
    return create_block_mask(mask_mod, n_rows, None, length, length, device=sequence_ids.device)


_compiled_block_mask_builder: Callable | None = None


def _block_mask_builder() -> Callable:
    """`_build_block_mask` compiled once per process (as transformers' `WrappedFlexAttention` compiles
    `flex_attention`), not per batch: `create_block_mask(_compile=True)` wraps it anew and warns on every call."""
    global _compiled_block_mask_builder
    if _compiled_block_mask_builder is None:
        # dynamic=True: the lengths (multiples of the block size) are symbolic from the first batch, so one graph
        # serves them all; dynamo still specialises sizes of 1 (a single row, a single block), at most 4 graphs.
        _compiled_block_mask_builder = torch.compile(_build_block_mask, dynamic=True)
    return _compiled_block_mask_builder


def block_mask(
    sequence_ids: torch.Tensor,
    branch_ids: torch.Tensor,
    position_ids: torch.Tensor,
    sliding_window: int | None = None,
    compiled: bool | None = None,
):
    """A FlexAttention `BlockMask` for the rule, built on the metadata's device.

    `compiled` (default: on every device but the CPU) builds it with the compiled builder, which never materialises the
    full mask; the CPU builds it eagerly (torch 2.13 has no FlexAttention backward there, so flex only evaluates on a
    CPU, and inductor's C++ compile of the builder takes ~25 s). The window is a 0-dim tensor ("no window": the
    largest position): the returned `mask_mod` is then the same closure (to dynamo's guards) for every layer type, so
    the compiled `flex_attention` does not compile one graph per window.
    """
    if compiled is None:
        compiled = sequence_ids.device.type != "cpu"
    no_window = torch.iinfo(position_ids.dtype).max
    window = position_ids.new_full((), no_window if sliding_window is None else sliding_window)
    builder = _block_mask_builder() if compiled else _build_block_mask
    with torch.no_grad():  # one graph for the training, reference and evaluation forwards alike
        return builder(sequence_ids, branch_ids, position_ids, window)


def attention_windows(text_config) -> int | None | dict[str, int | None]:
    """The sliding window(s) the shared-prompt mask must apply for a model: None (full attention everywhere), the
    window of a model whose every layer slides (Mistral), or `{layer_type: window}` for models mixing both."""
    layer_types = set(getattr(text_config, "layer_types", None) or [])
    window = getattr(text_config, "sliding_window", None)
    if len(layer_types) > 1:
        return {kind: window if kind == "sliding_attention" else None for kind in sorted(layer_types)}
    return window if layer_types <= {"sliding_attention"} else None


def layout_attention_mask(
    inputs: Mapping[str, torch.Tensor],
    attn_implementation: str,
    dtype: torch.dtype,
    windows: int | None | dict[str, int | None] = None,
):
    """The attention mask the model needs for a batch of the shared-prompt layout, or None for other layouts.

    `windows` is the model's sliding window (None = full attention), or, for models whose layers mix attention types,
    a `{layer_type: window}` mapping; the mask is then a mapping too, which such models accept as `attention_mask`.
    """
    if not all(key in inputs for key in LAYOUT_METADATA_KEYS):
        return None
    metadata = [inputs[key] for key in LAYOUT_METADATA_KEYS]
    if isinstance(windows, dict):
        return {kind: layout_attention_mask(inputs, attn_implementation, dtype, w) for kind, w in windows.items()}
    if attn_implementation == "flex_attention":
        return block_mask(*metadata, sliding_window=windows)
    return dense_mask(*metadata, sliding_window=windows, dtype=torch.bool if attn_implementation == "sdpa" else dtype)


def mask_nbytes(mask) -> int:
    """Device bytes held by a mask from `layout_attention_mask` (a tensor, a `BlockMask`, a mapping, or None)."""
    if mask is None:
        return 0
    if isinstance(mask, torch.Tensor):
        return mask.numel() * mask.element_size()
    if isinstance(mask, Mapping):
        return sum(mask_nbytes(value) for value in mask.values())
    tensors = [value for value in vars(mask).values() if isinstance(value, torch.Tensor)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def router_token_mask(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`(B, L)` bool: the tokens of a batch that the MoE aux loss counts: the real tokens (`padding_mask`, or the 2D
    `attention_mask` of padded rows), less, in the shared-prompt layout, the copies of the last prompt token at the
    head of every branch after the first (the first copy stands for that token)."""
    real = inputs["padding_mask" if "padding_mask" in inputs else "attention_mask"].bool()
    if "branch_ids" not in inputs:
        return real
    return real & ~((inputs["branch_ids"] > 1) & (inputs["completion_mask"] == 0))
