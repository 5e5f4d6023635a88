"""The MoE router aux loss keeps its gradient under gradient checkpointing, reentrant or not, in every layout.

With `use_reentrant=True` (what TRL forces for PEFT + DeepSpeed ZeRO-3 + gradient checkpointing: both Mixtral recipes)
a checkpointed layer's first pass runs without grad, so router logits recorded there by forward hooks, ours or
transformers' own `output_router_logits`, carry no gradient and the aux loss is a constant. The oracle here is the
same trainer on the same batch without checkpointing: checkpointing must not change any gradient. The aux loss's own
gradient (the gradient with the aux coefficient on minus the one with it off) is checked to be far above the tolerance,
so a constant aux loss cannot pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from test_distributed import deepspeed_ops  # noqa: F401  (fixture)
from test_shared_prompt import MOE_COEF, checked, make_trainer

from trl_nca.moe import record_router_logits

LAYOUTS = {"padded": ("padded", False), "padded-packed": ("padded", True), "shared": ("shared_prompt", False)}
LAYOUTS["shared-packed"] = ("shared_prompt", True)
CHECKPOINTING = {"off": None, "reentrant": True, "non-reentrant": False}


def router_lora():
    """LoRA on attention plus a trainable copy of every router (`nca_reward_lora.yaml`'s `lora_modules_to_save`)."""
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["gate"], task_type="CAUSAL_LM"
    )


def gradients(tmp_path, tokenizer, make_model, layout, checkpointing, coef, peft) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient of one `compute_loss` on the whole dataset (`loss.backward()`, the only
    way reentrant checkpointing can be differentiated), in training mode."""
    kway_layout, padding_free = LAYOUTS[layout]
    trainer = make_trainer(
        tmp_path / f"{checkpointing}-{coef}",
        tokenizer,
        make_model,
        "mixtral-aux",
        "sdpa",
        kway_layout,
        padding_free,
        "lora" if peft else "plain",
        peft_config=router_lora(),
        router_aux_loss_coef=coef,
        gradient_checkpointing=CHECKPOINTING[checkpointing] is not None,
        gradient_checkpointing_kwargs={"use_reentrant": CHECKPOINTING[checkpointing]},
    )
    policy = trainer.model
    if CHECKPOINTING[checkpointing] is not None:  # as `Trainer.train` does before the first step
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs)
        policy.enable_input_require_grads()
    assert trainer.aux_loss_enabled == (coef != 0)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = checked(trainer, trainer._prepare_inputs(trainer.data_collator(rows)))
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == (kway_layout, padding_free)
    policy.train()
    policy.zero_grad()
    trainer.compute_loss(policy, batch).backward()
    grads = {name: p.grad.clone() for name, p in policy.named_parameters() if p.requires_grad and p.grad is not None}
    assert any(".gate." in name for name in grads), "the routers are trainable and get a gradient"
    return grads


@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora-router"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_aux_gradient_survives_checkpointing(tmp_path, tokenizer, make_model, layout, peft):
    reference = gradients(tmp_path, tokenizer, make_model, layout, "off", MOE_COEF, peft)
    without_aux = gradients(tmp_path, tokenizer, make_model, layout, "off", 0.0, peft)
    router_names = [name for name in reference if ".gate." in name]
    aux_part = torch.cat([(reference[name] - without_aux[name]).flatten() for name in router_names])
    assert aux_part.norm() > 1e-3, aux_part.norm()  # the aux loss moves the routers, far above the tolerance below
    for mode in ("reentrant", "non-reentrant"):
        grads = gradients(tmp_path, tokenizer, make_model, layout, mode, MOE_COEF, peft)
        assert grads.keys() == reference.keys(), mode
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{mode}: grad of {name}")


def test_recorded_router_logits_carry_their_gradient_out_of_a_reentrant_checkpoint(tokenizer, make_model):
    """The unit under the trainer: in training mode with reentrant checkpointing the recorded logits require grad (a
    plain forward hook sees them without), and the backward recompute returns them again after the block closed."""
    model = make_model("mixtral", seed=0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    input_ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with record_router_logits(model) as logits:
        model(input_ids=input_ids, use_cache=False)
    assert len(logits) == model.config.num_hidden_layers
    assert all(layer.requires_grad for layer in logits)
    sum(layer.float().pow(2).sum() for layer in logits).backward()
    gate = model.model.layers[0].mlp.gate.weight
    assert gate.grad is not None and gate.grad.norm() > 0
    # nothing is left behind: the checkpoint function is the model's own again, and no hooks remain
    layer = model.model.layers[0]
    assert "checkpointed" not in getattr(layer._gradient_checkpointing_func, "__name__", "")
    assert not layer.mlp.gate._forward_hooks


# ------------------------------------------------------------------------------------------------ 2-process ZeRO-3
PROBE = Path(__file__).resolve().parent / "moe_checkpointing_probe.py"


def _zero3_step(tmp_path, checkpointing: str, coef: float) -> tuple[dict, dict]:
    """One SGD step under 2-process ZeRO-3 (`moe_checkpointing_probe.py`): rank 0's summary and trained weights."""
    from test_distributed import REPO, _env, _free_port

    out = tmp_path / f"{checkpointing}-{coef}"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(REPO / "recipes" / "accelerate_configs" / "cpu_zero3.yaml"), "--num_processes", "2"]
    command += ["--main_process_port", str(_free_port()), str(PROBE), str(out), checkpointing, str(coef)]
    result = subprocess.run(command, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    summaries = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["world_size"] for s in summaries] == [2, 2] and all(s["zero3"] for s in summaries)
    weights = [torch.load(out / f"rank{rank}.pt") for rank in (0, 1)]
    for name, weight in weights[0].items():  # the ranks gathered the same full weights
        assert torch.equal(weight, weights[1][name]), name
    return summaries[0], weights[0]


@pytest.mark.slow
@pytest.mark.usefixtures("deepspeed_ops")
def test_zero3_peft_reentrant_step_equals_the_unchecked_step(tmp_path):
    """PEFT + ZeRO-3 + checkpointing, where TRL forces reentrant checkpointing (both Mixtral recipes): one SGD step
    trains the same weights, routers included, as the same step without checkpointing."""
    checked_run, checked_weights = _zero3_step(tmp_path, "on", MOE_COEF)
    assert checked_run["gradient_checkpointing"] and checked_run["use_reentrant"] is True  # TRL forced it
    _, plain_weights = _zero3_step(tmp_path, "off", MOE_COEF)
    _, no_aux_weights = _zero3_step(tmp_path, "off", 0.0)
    assert checked_run["aux_losses"] and checked_run["aux_losses"][0] > 0
    routers = [name for name in plain_weights if ".gate." in name]
    assert routers
    aux_effect = max((plain_weights[name] - no_aux_weights[name]).abs().max().item() for name in routers)
    assert aux_effect > 1e-3, aux_effect  # the aux loss moves the routers in one step, far above the tolerance
    for name, weight in plain_weights.items():
        torch.testing.assert_close(checked_weights[name], weight, rtol=1e-5, atol=aux_effect * 1e-3, msg=name)
