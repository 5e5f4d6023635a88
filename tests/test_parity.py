"""Oracles for the trainers: TRL's own DPOTrainer on the same preference batch, and a plain-forward recomputation."""

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from test_losses import oracle_infonca, oracle_nca
from trl import DPOConfig, DPOTrainer

from trl_nca import InfoNCAConfig, InfoNCATrainer, NCAConfig, NCATrainer

PREFERENCE_TEXT = [
    {"prompt": "the sky is", "chosen": " blue.", "rejected": " green and red."},
    {"prompt": "what is one plus two?", "chosen": " three", "rejected": " four five six"},
    {"prompt": "tell me a word", "chosen": " hello world", "rejected": " sad"},
    {"prompt": "sort 3 1 2", "chosen": " 1 2 3", "rejected": " 3 2 1 2"},
    {"prompt": "the cat", "chosen": " runs fast", "rejected": " jumps over the dog"},
    {"prompt": "good or bad?", "chosen": " good", "rejected": " bad bad"},
]
PREFERENCE_IMPLICIT_CHAT = [
    {
        "chosen": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["chosen"]}],
        "rejected": [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["rejected"]}],
    }
    for row in PREFERENCE_TEXT
]


def _grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _collate_all(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer.data_collator(rows)


@pytest.mark.parametrize(
    "ours,our_config,dpo_loss", [(InfoNCATrainer, InfoNCAConfig, "sigmoid"), (NCATrainer, NCAConfig, "nca_pair")]
)
@pytest.mark.parametrize("rows", [PREFERENCE_TEXT, PREFERENCE_IMPLICIT_CHAT], ids=["text", "implicit-chat"])
def test_pairwise_equals_trl_dpo(tmp_path, tokenizer, make_model, ours, our_config, dpo_loss, rows):
    dataset = Dataset.from_list(rows)
    common = dict(beta=0.5, max_length=64, per_device_eval_batch_size=3)
    dpo = DPOTrainer(
        make_model(seed=0),
        ref_model=make_model(seed=1),
        args=cpu_args(DPOConfig, tmp_path / "dpo", loss_type=dpo_loss, **common),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    mine = ours(
        make_model(seed=0),
        ref_model=make_model(seed=1),
        args=cpu_args(our_config, tmp_path / "ours", alpha=1.0, **common),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    dpo_eval, our_eval = dpo.evaluate(), mine.evaluate()
    assert our_eval["eval_loss"] == pytest.approx(dpo_eval["eval_loss"], rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert our_eval[f"eval_{key}"] == pytest.approx(dpo_eval[f"eval_{key}"], rel=1e-5, abs=1e-7), key

    dpo_loss_value, dpo_grads = _grads(dpo, _collate_all(dpo))
    our_loss_value, our_grads = _grads(mine, _collate_all(mine))
    torch.testing.assert_close(our_loss_value, dpo_loss_value, rtol=1e-6, atol=1e-7)
    assert our_grads.keys() == dpo_grads.keys()
    worst = max(((our_grads[n] - g).norm() / g.norm().clamp_min(1e-12)).item() for n, g in dpo_grads.items())
    assert worst <= 1e-5, worst


def _sequence_logps(model, tokenizer, prompt: str, completion: str) -> float:
    """Plain forward + log_softmax: log p(completion + eos | prompt), independent of the fused head."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(prompt + completion + tokenizer.eos_token)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([full_ids])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    return sum(logprobs[t - 1, full_ids[t]].item() for t in range(len(prompt_ids), len(full_ids)))


REWARD_ROWS = [
    {
        "prompt": "what is one plus two?",
        "completions": [" three", " four", " one two", " blue"],
        "rewards": [9, 4, 6, 1],
    },
    {"prompt": "the sky is", "completions": [" blue.", " green", " red and big"], "rewards": [8.5, 2.0, 2.0]},
    {"prompt": "hello", "completions": [" world", " sky"], "rewards": [0.3, 0.9]},
]


@pytest.mark.parametrize(
    "trainer_cls,config_cls,oracle",
    [(NCATrainer, NCAConfig, oracle_nca), (InfoNCATrainer, InfoNCAConfig, oracle_infonca)],
)
def test_kway_eval_loss_matches_independent_logps(tmp_path, tokenizer, make_model, trainer_cls, config_cls, oracle):
    # A wide init makes the random models far from uniform, so policy and reference disagree clearly.
    policy, ref = make_model(seed=0, initializer_range=0.3), make_model(seed=1, initializer_range=0.3)
    beta, alpha = 0.2, 2.0
    expected = []
    for row in REWARD_ROWS:
        pi = [_sequence_logps(policy, tokenizer, row["prompt"], c) for c in row["completions"]]
        mu = [_sequence_logps(ref, tokenizer, row["prompt"], c) for c in row["completions"]]
        assert max(abs(p - m) for p, m in zip(pi, mu)) > 0.5  # policy != ref, so the model rewards are not zero
        expected.append(oracle(pi, mu, [float(r) for r in row["rewards"]], beta, alpha))
    trainer = trainer_cls(
        policy,
        ref_model=ref,
        args=cpu_args(config_cls, tmp_path, beta=beta, alpha=alpha, per_device_eval_batch_size=len(REWARD_ROWS)),
        train_dataset=Dataset.from_list(REWARD_ROWS),
        eval_dataset=Dataset.from_list(REWARD_ROWS),
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
