"""The shared-prompt layout is exact: same per-response log-probs, gradients and losses as the padded layout."""

import logging

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from test_trainer import reward_rows

from trl_nca import DataCollatorForKWayReward, NCAConfig, NCATrainer


def _trainer(tmp_path, tokenizer, model, ref, layout, peft_config=None, **overrides):
    rows = reward_rows(n=4, k=4, ragged=True)
    return NCATrainer(
        model,
        ref_model=ref,
        args=cpu_args(NCAConfig, tmp_path / layout, kway_layout=layout, beta=0.5, **overrides),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def _logps_loss_grads(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.zero_grad()
    _, logps = trainer._forward_logps(trainer.model, batch)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return logps.detach(), loss.detach(), grads


CASES = [(arch, attn) for arch in ("llama", "mistral", "mixtral", "qwen2") for attn in ("sdpa", "eager")]


@pytest.mark.parametrize("architecture,attn", CASES, ids=[f"{a}-{b}" for a, b in CASES])
@pytest.mark.parametrize("variant", ["plain", "truncated", "lora"])
def test_shared_prompt_equals_padded(tmp_path, tokenizer, make_model, architecture, attn, variant):
    extra = {"router_aux_loss_coef": 0.0} if architecture == "mixtral" else {}
    overrides = {}
    if variant == "truncated":
        overrides["max_length"] = 16  # cuts the longer responses, keeps every prompt
    peft_config = None
    if variant == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    results = {}
    for layout in ("padded", "shared_prompt"):
        model = make_model(architecture, seed=0, attn_implementation=attn, initializer_range=0.1, **extra)
        ref = None if peft_config else make_model(architecture, seed=1, attn_implementation=attn, **extra)
        trainer = _trainer(tmp_path, tokenizer, model, ref, layout, peft_config=peft_config, **overrides)
        assert trainer.data_collator.layout == layout
        if peft_config is not None:  # move LoRA off its zero init so the adapter contributes
            with torch.no_grad():
                for name, param in trainer.model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        results[layout] = _logps_loss_grads(trainer)
    (lp_a, loss_a, grads_a), (lp_b, loss_b, grads_b) = results["padded"], results["shared_prompt"]
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_sliding_window_is_baked_into_the_mask(tmp_path, tokenizer, make_model):
    """A Mistral window shorter than the sequences: the 4D mask must apply it as the model's own mask does."""
    results = {}
    for layout in ("padded", "shared_prompt"):
        model = make_model("mistral", seed=0, sliding_window=5, initializer_range=0.1)
        trainer = _trainer(tmp_path, tokenizer, model, make_model("mistral", seed=1, sliding_window=5), layout)
        assert trainer.data_collator.sliding_window == (5 if layout == "shared_prompt" else None)
        results[layout] = _logps_loss_grads(trainer)
    torch.testing.assert_close(results["shared_prompt"][0], results["padded"][0], rtol=1e-5, atol=1e-5)


def test_training_steps_give_the_same_losses(tmp_path, tokenizer, make_model):
    losses = {}
    for layout in ("padded", "shared_prompt"):
        trainer = _trainer(
            tmp_path,
            tokenizer,
            make_model(seed=0),
            make_model(seed=1),
            layout,
            max_steps=3,
            per_device_train_batch_size=2,
        )
        trainer.train()
        losses[layout] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        tokens = trainer.state.log_history[-2]["num_tokens"]
        losses[f"{layout}-tokens"] = tokens
    assert losses["shared_prompt"] == pytest.approx(losses["padded"], rel=1e-5)
    assert losses["shared_prompt-tokens"] < losses["padded-tokens"]  # the prompt is counted once


def test_auto_layout_and_fallback_reasons(tmp_path, tokenizer, make_model, caplog):
    trainer = _trainer(tmp_path, tokenizer, make_model(), make_model(), "auto")
    assert trainer.data_collator.layout == "shared_prompt"
    with caplog.at_level(logging.WARNING):
        trainer = _trainer(tmp_path, tokenizer, make_model("mixtral"), make_model("mixtral"), "auto")
    assert trainer.data_collator.layout == "padded"
    with pytest.raises(ValueError, match="router aux loss"):
        _trainer(tmp_path, tokenizer, make_model("mixtral"), make_model("mixtral"), "shared_prompt")
    with pytest.raises(ValueError, match="keep_end"):
        _trainer(
            tmp_path, tokenizer, make_model(), make_model(), "shared_prompt", max_length=32, truncation_mode="keep_end"
        )
    assert (
        _trainer(
            tmp_path, tokenizer, make_model(), make_model(), "auto", max_length=32, truncation_mode="keep_end"
        ).data_collator.layout
        == "padded"
    )


def test_shared_prompt_collator_tensors():
    collator = DataCollatorForKWayReward(pad_token_id=0, layout="shared_prompt")
    batch = collator(
        [
            {"prompt_ids": [5, 6, 7], "completion_ids": [[8, 9], [10]], "rewards": [1.0, 0.0]},
            {"prompt_ids": [3], "completion_ids": [[4], [4, 4]], "rewards": [0.0, 1.0]},
        ]
    )
    # prompt[:-1] | prompt[-1] R1 | prompt[-1] R2
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10], [3, 4, 3, 4, 4, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1], [0, 1, 0, 1, 1, 0, 0]]
    assert batch["response_ids"].tolist() == [[-1, -1, -1, 0, 0, -1, 1], [-1, 2, -1, 3, 3, -1, -1]]
    assert batch["padding_mask"].tolist() == [[1] * 7, [1, 1, 1, 1, 1, 0, 0]]
    mask = batch["attention_mask"][0, 0].int().tolist()
    assert mask[5] == [1, 1, 0, 0, 0, 1, 0]  # branch 2's head sees the prompt prefix and itself, not branch 1
    assert mask[6] == [1, 1, 0, 0, 0, 1, 1]
    assert mask[4] == [1, 1, 1, 1, 1, 0, 0]
    assert batch["attention_mask"][1, 0, 6].tolist() == [False] * 5 + [True, True]  # padding sees padding only
