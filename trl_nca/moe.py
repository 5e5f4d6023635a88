"""The MoE router load-balancing loss, computed by the trainer in every layout.

A model computes its load-balancing (aux) loss from its 2D padding mask; under the shared-prompt layout the attention
mask is 4D (or a `BlockMask`) and the last prompt token appears once per branch. The trainer therefore records each
MoE layer's router logits with forward hooks on the modules transformers itself records them from (the model's
`_can_record_outputs["router_logits"]`) and computes the loss over the tokens that count once each
(`trl_nca.attention.router_token_mask`, or the padding mask of padded rows) with transformers' own Switch-Transformer
loss, the one TRL's fused head uses.

Gradient checkpointing: a hook inside a checkpointed decoder layer fires in the checkpoint's first pass, which with
`use_reentrant=True` runs without grad (TRL forces reentrant checkpointing for PEFT + ZeRO-3), so the logits it sees
would carry no gradient and the aux loss would be a constant: the model's own `output_router_logits` loses its
gradient the same way. While recording, each checkpointed layer that holds a router therefore returns its router
logits as extra outputs of the checkpointed function, so they leave the checkpoint as its outputs do: with a gradient
under both reentrant and non-reentrant checkpointing, recomputed in the backward pass like the hidden states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils.output_capturing import OutputRecorder

Router = tuple[torch.nn.Module, "int | None"]  # a module whose forward output holds router logits, and their index


@contextlib.contextmanager
def record_router_logits(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the router logits of every MoE layer run inside the block, in call order (one tensor per layer), with
    their gradient in every gradient-checkpointing mode."""
    base = _base(model)
    routers = _routers(base)
    logits: list[torch.Tensor] = []
    inside_checkpoint = [0]  # > 0 while a checkpointed layer records its own routers (see `_through_checkpoint`)

    def record(recorded: list[torch.Tensor], index: int | None, skip_inside_checkpoint: bool):
        def hook(module, args, output):
            if not (skip_inside_checkpoint and inside_checkpoint[0]):
                recorded.append(output[index] if isinstance(output, (tuple, list)) and index is not None else output)

        return hook

    handles = [module.register_forward_hook(record(logits, index, True)) for module, index in routers]
    patched = []
    for layer in base.modules():
        if not (isinstance(layer, GradientCheckpointingLayer) and layer.gradient_checkpointing):
            continue
        inside = {id(module) for module in layer.modules()}
        layer_routers = [(module, index) for module, index in routers if id(module) in inside]
        if layer_routers:
            original = layer._gradient_checkpointing_func
            patched.append((layer, original))
            layer._gradient_checkpointing_func = _through_checkpoint(
                original, layer_routers, logits, inside_checkpoint, record
            )
    try:
        yield logits
    finally:
        for handle in handles:
            handle.remove()
        for layer, original in patched:
            layer._gradient_checkpointing_func = original


def declares_router_logits(model: torch.nn.Module) -> bool:
    """Whether transformers records `model`'s router logits (`_can_record_outputs["router_logits"]`), which
    `record_router_logits` needs."""
    return _router_spec(_base(model)) is not None


def _base(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _router_spec(base: torch.nn.Module):
    return (getattr(base, "_can_record_outputs", None) or {}).get("router_logits")


def _routers(base: torch.nn.Module) -> list[Router]:
    spec = _router_spec(base)
    if spec is None:
        raise ValueError(
            f"{type(base).__name__} declares no router logits (`_can_record_outputs['router_logits']`), so its MoE "
            "aux loss cannot be computed under the shared-prompt or packed layout. Set router_aux_loss_coef=0 or "
            "kway_layout='padded' with padding_free=False."
        )
    recorders = [item if isinstance(item, OutputRecorder) else OutputRecorder(item) for item in _as_list(spec)]
    return [
        (module, recorder.index)
        for name, module in base.named_modules()
        for recorder in recorders
        if _records(recorder, name, module)
    ]


def _through_checkpoint(
    checkpoint: Callable, routers: list[Router], sink: list[torch.Tensor], inside_checkpoint: list[int], record
) -> Callable:
    """A layer's `_gradient_checkpointing_func` whose checkpointed function also returns the layer's router logits.

    The hooks live in the checkpointed function itself, so the backward recompute (which runs after the recording
    block has closed) returns as many outputs as the first pass did."""

    def checkpointed(function, *args, **kwargs):
        structure = {}

        def run(*inputs):
            recorded: list[torch.Tensor] = []
            handles = [module.register_forward_hook(record(recorded, index, False)) for module, index in routers]
            inside_checkpoint[0] += 1
            try:
                output = function(*inputs)
            finally:
                inside_checkpoint[0] -= 1
                for handle in handles:
                    handle.remove()
            structure["tensor"] = isinstance(output, torch.Tensor)
            leaves = (output,) if structure["tensor"] else tuple(output)
            structure["n_outputs"] = len(leaves)
            return (*leaves, *recorded)

        results = checkpoint(run, *args, **kwargs)
        n_outputs = structure["n_outputs"]
        sink.extend(results[n_outputs:])
        return results[0] if structure["tensor"] else tuple(results[:n_outputs])

    return checkpointed


def _as_list(spec) -> list:
    return list(spec) if isinstance(spec, (list, tuple)) else [spec]


def _records(recorder: OutputRecorder, name: str, module: torch.nn.Module) -> bool:
    if recorder.layer_name is not None and not name.endswith(recorder.layer_name):
        return False
    if recorder.class_name is not None:
        return type(module).__name__.endswith(recorder.class_name)
    return recorder.target_class is not None and isinstance(module, recorder.target_class)


def load_balancing_loss(router_logits: list[torch.Tensor], token_mask: torch.Tensor, text_config) -> torch.Tensor:
    """The model's load-balancing loss over the tokens where `token_mask` `(B, L)` is True."""
    num_experts = getattr(text_config, "num_experts", None) or text_config.num_local_experts
    top_k = text_config.num_experts_per_tok
    layers = tuple(logits.reshape(-1, logits.size(-1)) for logits in router_logits)
    return load_balancing_loss_func(layers, num_experts, top_k, token_mask)
