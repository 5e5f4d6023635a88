"""A `trust_remote_code`-style model the architecture rules cannot see through: a Llama whose backbone takes
`position_ids` in its signature but ignores them (positions from the token index), as some remote-code models do.
Only the first-batch self-check can catch it. Importable by the multi-process test scripts (tests/ on PYTHONPATH).
"""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

BLIND_RANK_ENV = "TRL_NCA_BLIND_RANK"  # ignore positions only on this process rank (unset: on every rank)


def _blind(config) -> bool:
    rank = os.environ.get(BLIND_RANK_ENV)
    return getattr(config, "ignore_position_ids", True) and (rank is None or rank == os.environ.get("RANK", "0"))


class PositionBlindLlamaModel(LlamaModel):
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        position_ids = None if _blind(self.config) else position_ids
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


class PositionBlindLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model = PositionBlindLlamaModel(config)
        self.post_init()


def position_blind_llama(vocab_size: int, seed: int = 0, **overrides) -> PositionBlindLlamaForCausalLM:
    """A tiny one (fp32, sdpa) with attention sharp enough for positions to matter (initializer_range 0.2);
    `ignore_position_ids=False` makes it an ordinary Llama."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2)
    config = LlamaConfig(
        vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2, **{**sizes, **overrides}
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return PositionBlindLlamaForCausalLM(config).float()
