"""MoE (Mixtral) with the router aux loss on, under the shared-prompt layout: the aux loss counts every real token once.

The oracle (`switch_aux_oracle` in test_shared_prompt.py) is the Switch-Transformer loss written out, computed from the
router logits of the *padded* layout's forward (recorded by our own hooks) over each unique token once: a prompt's tokens
from its first row, each response's tokens from its own row. It is checked against transformers' loss on the padded
layout's own token set first, so its normalisation is transformers'.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_shared_prompt import (
    ATTNS,
    MOE_COEF,
    VARIANTS,
    check_layouts,
    make_trainer,
    padded_baseline,
    random_examples,
    run_step,
    switch_aux_oracle,
    unique_token_mask,
)

from trl_nca import DataCollatorForKWayReward
from trl_nca.attention import router_token_mask

CASES = [("mixtral-aux", attn, variant) for attn in ATTNS for variant in VARIANTS]
CASES += [("mixtral-aux-output", "sdpa", "plain")]  # config.output_router_logits=True: the model asks for its own aux


@pytest.mark.parametrize("model_name,attn,variant", CASES, ids=["-".join(case) for case in CASES])
def test_shared_prompt_aux_loss_is_the_oracle(tmp_path, tokenizer, make_model, model_name, attn, variant):
    """Shared prompt (unpacked and packed): aux == oracle, loss == padded NCA loss + coef x oracle, and every gradient
    equals that of (padded NCA loss + coef x oracle on the padded run's router logits). Packed padded: the model's
    own aux, loss and gradients, as unpacked."""
    baseline, steps = check_layouts(tmp_path, tokenizer, make_model, model_name, attn, variant)
    padded = baseline.step
    assert padded.aux is not None and padded.coef == MOE_COEF
    # The two token sets really differ (prompt once per row vs once), so the check above discriminates.
    assert (baseline.shared.aux - padded.aux).abs() > 1e-3
    nca_loss = padded.loss.detach() - MOE_COEF * padded.aux.detach()
    shared_steps = [step for (layout, _), step in steps.items() if layout == "shared_prompt"]
    assert len(shared_steps) == 2  # unpacked and packed
    for step in shared_steps:  # (gradients: checked by check_layouts against baseline.shared.grads)
        torch.testing.assert_close(step.aux.detach(), baseline.shared.aux, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(step.loss.detach(), nca_loss + MOE_COEF * baseline.shared.aux, rtol=1e-4, atol=1e-6)


def test_auto_picks_the_shared_prompt_for_mixtral_with_aux(tmp_path, tokenizer, make_model):
    trainer = make_trainer(tmp_path, tokenizer, make_model, "mixtral-aux", layout="auto")
    assert trainer.data_collator.layout == "shared_prompt"
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == MOE_COEF
    # The architecture's own coefficient (tiny Mixtral: 0.01) also keeps the shared prompt.
    trainer = make_trainer(tmp_path, tokenizer, make_model, "mixtral-aux", layout="auto", router_aux_loss_coef=None)
    assert trainer.data_collator.layout == "shared_prompt"
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.01


@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("max_length", [None, 40])
def test_router_token_mask_selects_every_token_once(padding_free, max_length):
    """The tokens the shared layout's aux counts are, in order, those the oracle selects from the padded layout."""
    # prompts shorter than max_length, as the trainer keeps them (a longer one is dropped from the dataset)
    examples = random_examples(random.Random(f"{padding_free}-{max_length}"), n_prompts=6, max_prompt=39)
    examples[0]["completion_ids"][0] = []  # an empty response: its branch is the head only
    kwargs = dict(pad_token_id=0, max_length=max_length, pad_to_multiple_of=16)
    padded = DataCollatorForKWayReward(**kwargs)(examples)
    shared = DataCollatorForKWayReward(layout="shared_prompt", padding_free=padding_free, **kwargs)(examples)
    expected = padded["input_ids"][unique_token_mask(padded)]
    selected = shared["input_ids"][router_token_mask(shared)]
    assert torch.equal(selected, expected)


def test_router_hooks_record_the_policy_forward_only(tmp_path, tokenizer, make_model):
    """The shared layout's recorded logits are those of the policy forward (not the reference's): its aux is the
    oracle computed from its own router logits over `router_token_mask`."""
    trainer = make_trainer(tmp_path, tokenizer, make_model, "mixtral-aux")
    step = run_step(trainer, grad=False)
    config = trainer.model.config
    oracle = switch_aux_oracle(
        step.router_logits, router_token_mask(step.batch), config.num_local_experts, config.num_experts_per_tok
    )
    torch.testing.assert_close(step.aux, oracle)


def test_packed_padded_aux_loss_ignores_the_trailing_padding(tmp_path, tokenizer, make_model):
    baseline = padded_baseline(
        make_trainer(tmp_path, tokenizer, make_model, "mixtral-aux", layout="padded"), grad=False
    )
    trainer = make_trainer(
        tmp_path, tokenizer, make_model, "mixtral-aux", layout="padded", padding_free=True, pad_to_multiple_of=64
    )
    step = run_step(trainer, grad=False)
    assert step.batch["padding_mask"].eq(0).any()  # there is trailing padding
    torch.testing.assert_close(step.aux, baseline.padded.aux, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(step.loss, baseline.padded.loss, rtol=1e-4, atol=1e-6)
