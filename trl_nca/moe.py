"""The MoE router load-balancing loss under the shared-prompt layout.

A model computes its load-balancing (aux) loss from its 2D padding mask; under the shared-prompt layout the attention
mask is 4D (or a `BlockMask`) and the last prompt token appears once per branch. The trainer therefore records each
MoE layer's router logits with forward hooks on the modules transformers itself records them from (the model's
`_can_record_outputs["router_logits"]`) and computes the loss over the tokens that count once each
(`trl_nca.attention.router_token_mask`) with transformers' own Switch-Transformer loss, the one TRL's fused head uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils.output_capturing import OutputRecorder


@contextlib.contextmanager
def record_router_logits(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the router logits of every MoE layer run inside the block, in call order (one tensor per layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    spec = (getattr(base, "_can_record_outputs", None) or {}).get("router_logits")
    if spec is None:
        raise ValueError(
            f"{type(base).__name__} declares no router logits (`_can_record_outputs['router_logits']`), so its MoE "
            "aux loss cannot be computed under the shared-prompt layout. Set router_aux_loss_coef=0 or "
            "kway_layout='padded'."
        )
    recorders = [item if isinstance(item, OutputRecorder) else OutputRecorder(item) for item in _as_list(spec)]
    logits: list[torch.Tensor] = []
    handles = []
    for name, module in base.named_modules():
        for recorder in recorders:
            if _records(recorder, name, module):
                handles.append(module.register_forward_hook(_hook(logits, recorder.index)))
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()


def _as_list(spec) -> list:
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _records(recorder: OutputRecorder, name: str, module: torch.nn.Module) -> bool:
    if recorder.layer_name is not None and not name.endswith(recorder.layer_name):
        return False
    if recorder.class_name is not None:
        return type(module).__name__.endswith(recorder.class_name)
    return recorder.target_class is not None and isinstance(module, recorder.target_class)


def _hook(logits: list[torch.Tensor], index: int | None):
    def hook(module, args, output):
        logits.append(output[index] if isinstance(output, (tuple, list)) and index is not None else output)

    return hook


def load_balancing_loss(router_logits: list[torch.Tensor], token_mask: torch.Tensor, text_config) -> torch.Tensor:
    """The model's load-balancing loss over the tokens where `token_mask` `(B, L)` is True."""
    num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
    top_k = text_config.num_experts_per_tok
    layers = tuple(logits.reshape(-1, logits.size(-1)) for logits in router_logits)
    return load_balancing_loss_func(layers, num_experts, top_k, token_mask)
