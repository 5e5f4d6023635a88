"""End to end on tiny Mistral/Mixtral models: formats, precompute, LoRA, GA, checkpoints, reload, model card."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_nca import InfoNCAConfig, InfoNCATrainer, ListwiseConfig, ListwiseTrainer, NCAConfig, NCATrainer

WORDS = ["one", "two", "three", "blue", "green", "dog", "cat", "sky", "sea", "big"]


def reward_rows(n: int = 8, k: int = 4, ragged: bool = False, chat: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        kk = 2 + (i % (k - 1)) if ragged else k
        prompt = f"what is {WORDS[i % 10]} and {WORDS[(i + 3) % 10]}?"
        completions = [" ".join(WORDS[(i + j) % 10] for j in range(m + 1)) for m in range(kk)]
        rewards = [float((i * 7 + 3 * m) % 5) for m in range(kk)]
        if chat:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completions": [[{"role": "assistant", "content": c}] for c in completions],
                    "rewards": rewards,
                }
            )
        else:
            rows.append({"prompt": prompt, "completions": [" " + c for c in completions], "rewards": rewards})
    return rows


def preference_rows(n: int = 8) -> list[dict]:
    return [
        {"prompt": f"say {WORDS[i % 10]}", "chosen": f" {WORDS[i % 10]}", "rejected": f" {WORDS[(i + 1) % 10]} no"}
        for i in range(n)
    ]


FORMATS = {
    "reward-text-k4": lambda: reward_rows(),
    "reward-chat-k4": lambda: reward_rows(chat=True),
    "reward-ragged": lambda: reward_rows(k=5, ragged=True),
    "preference": preference_rows,
}


@pytest.mark.parametrize("architecture", ["mistral", "mixtral"])
@pytest.mark.parametrize("data", sorted(FORMATS))
@pytest.mark.parametrize(
    "trainer_cls,config_cls",
    [(NCATrainer, NCAConfig), (InfoNCATrainer, InfoNCAConfig), (ListwiseTrainer, ListwiseConfig)],
)
def test_trains_and_evaluates(tmp_path, tokenizer, make_model, architecture, data, trainer_cls, config_cls):
    dataset = Dataset.from_list(FORMATS[data]())
    model = make_model(architecture)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = trainer_cls(
        model,
        ref_model=make_model(architecture),
        args=cpu_args(config_cls, tmp_path, eval_strategy="steps", eval_steps=2),
        train_dataset=dataset,
        eval_dataset={"a": dataset, "b": dataset.select(range(4))},
        processing_class=tokenizer,
    )
    trainer.train()
    logs = trainer.state.log_history
    train_logs = [log for log in logs if "loss" in log]
    assert len(train_logs) == 2 and all(math.isfinite(log["loss"]) for log in train_logs)
    k_max = max(len(row["completion_ids"]) for row in trainer.train_dataset)
    expected = {"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"}
    expected |= {"entropy", "num_tokens", "rewards/rank_0", "logps/rank_1"}
    if trainer_cls is not ListwiseTrainer:  # the listwise losses have no target weights
        expected.add("target_weights/entropy")
    assert expected <= set(train_logs[0])
    # The eval set holds every row, so every rank up to K_max is logged (for ragged K too). As in DPOTrainer, the
    # trainer's own metrics carry the plain `eval_` prefix, also for a dict of eval sets.
    expected |= {f"rewards/rank_{k}" for k in range(k_max)} | {f"logps/rank_{k}" for k in range(k_max)}
    eval_logs = [log for log in logs if "eval_a_loss" in log]
    assert eval_logs and {f"eval_{key}" for key in expected} <= set(eval_logs[-1])
    assert any("eval_b_loss" in log for log in logs)
    if architecture == "mixtral":
        assert "aux_loss" in train_logs[0]  # the router aux loss is added and logged
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "training did not update the model"


@pytest.mark.parametrize(
    "trainer_cls,config_cls",
    [(NCATrainer, NCAConfig), (InfoNCATrainer, InfoNCAConfig), (ListwiseTrainer, ListwiseConfig)],
)
def test_precompute_matches_live_reference(tmp_path, tokenizer, make_model, trainer_cls, config_cls):
    dataset = Dataset.from_list(reward_rows(k=4, ragged=True))
    first_losses = []
    for precompute in (False, True):
        trainer = trainer_cls(
            make_model(seed=0),
            ref_model=make_model(seed=1, initializer_range=0.1),
            args=cpu_args(config_cls, tmp_path / str(precompute), precompute_ref_log_probs=precompute, max_steps=1),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        if precompute:
            assert "ref_logps" in trainer.train_dataset.column_names
            lengths = [len(r) for r in trainer.train_dataset["ref_logps"]]
            assert lengths == [len(r) for r in trainer.train_dataset["completion_ids"]]
        trainer.train()
        first_losses.append(trainer.state.log_history[0]["loss"])
    assert first_losses[0] == pytest.approx(first_losses[1], rel=1e-5)


def test_precompute_with_policy_as_reference_caches(tmp_path, tokenizer, make_model):
    """No ref_model + precompute: the reference is the initial policy, so the first-step rewards are zero."""
    dataset = Dataset.from_list(reward_rows())
    trainer = NCATrainer(
        make_model(),
        args=cpu_args(NCAConfig, tmp_path, precompute_ref_log_probs=True, max_steps=1),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    assert trainer.ref_model is None
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(2 * math.log(2), rel=1e-5)  # rho = 0: -log s(0) - mean log s(0)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "trainer_cls,config_cls,loss_at_init",
    [(NCATrainer, NCAConfig, lambda k: 2 * math.log(2)), (InfoNCATrainer, InfoNCAConfig, math.log)],
)
def test_lora_uses_disabled_adapter_as_reference(
    tmp_path, tokenizer, make_model, trainer_cls, config_cls, loss_at_init
):
    from peft import LoraConfig

    dataset = Dataset.from_list(reward_rows(k=3))
    trainer = trainer_cls(
        make_model(),
        args=cpu_args(config_cls, tmp_path, max_steps=3, learning_rate=5e-2),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    assert trainer.ref_model is None
    base_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    # LoRA's B starts at zero: policy == reference, model rewards 0, loss at its closed form.
    assert logs[0]["loss"] == pytest.approx(loss_at_init(3), rel=1e-5)
    assert logs[-1]["rewards/rank_0"] != 0.0
    for name, param in trainer.model.named_parameters():
        if "lora" not in name:
            assert torch.equal(param.detach(), base_before[name]), name


def test_gradient_accumulation_equals_full_batch(tmp_path, tokenizer, make_model):
    """Two micro-batches of 1 prompt accumulated == one batch of 2 prompts (same data order, SGD)."""
    dataset = Dataset.from_list(reward_rows(n=4, k=4, ragged=True))
    params = []
    for bs, ga in ((2, 1), (1, 2)):
        trainer = NCATrainer(
            make_model(seed=0),
            ref_model=make_model(seed=1),
            args=cpu_args(
                NCAConfig,
                tmp_path / f"{bs}-{ga}",
                per_device_train_batch_size=bs,
                gradient_accumulation_steps=ga,
                max_steps=1,
                optim="sgd",
                learning_rate=0.5,
                lr_scheduler_type="constant",
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        params.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    torch.testing.assert_close(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_sft_term_and_loss_weights(tmp_path, tokenizer, make_model):
    dataset = Dataset.from_list(reward_rows(n=2))
    losses = {}
    for name, loss_type, weights in (("nca", ["nca"], None), ("both", ["nca", "sft"], [1.0, 0.5])):
        trainer = NCATrainer(
            make_model(),
            args=cpu_args(
                NCAConfig,
                tmp_path / name,
                loss_type=loss_type,
                loss_weights=weights,
                max_steps=1,
                precompute_ref_log_probs=True,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        losses[name] = trainer.state.log_history[0]["loss"]
    # Independent NLL of each prompt's best response (its mean per-token log-prob) with the plain model forward.
    model = make_model()
    nll_tokens = []
    for row in reward_rows(n=2):
        best = row["completions"][max(range(len(row["rewards"])), key=row["rewards"].__getitem__)]
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        ids = tokenizer(row["prompt"] + best + tokenizer.eos_token)["input_ids"]
        with torch.no_grad():
            logprobs = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        nll_tokens += [-logprobs[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids))]
    sft = sum(nll_tokens) / len(nll_tokens)
    assert losses["both"] == pytest.approx(losses["nca"] + 0.5 * sft, rel=1e-5)


def test_checkpoint_model_card_and_reload(tmp_path, tokenizer, make_model):
    dataset = Dataset.from_list(reward_rows())
    trainer = NCATrainer(
        make_model("mixtral"),
        ref_model=make_model("mixtral"),
        args=cpu_args(NCAConfig, tmp_path, save_strategy="steps", save_steps=2, max_steps=2),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").exists()
    card = (tmp_path / "README.md").read_text()
    assert "NCA" in card and "2402.05369" in card and "chen2024noise" in card
    assert "nca" in card.split("tags:")[1].split("---")[0]
    assert "- α (reward temperature, target weights softmax(r / α)): 1" in card
    assert "- β (KL strength of the model reward β·log π/μ): 0.1" in card
    assert "- responses per prompt K: 4" in card and "- trl-nca: " in card and "Cite TRL as" in card
    trainer.save_model(str(tmp_path / "final"))
    final = tmp_path / "final"
    assert {"model.safetensors", "training_args.bin", "tokenizer.json", "config.json"} <= {
        p.name for p in final.iterdir()
    }
    assert AutoTokenizer.from_pretrained(final)("the sky")["input_ids"] == tokenizer("the sky")["input_ids"]
    reloaded = AutoModelForCausalLM.from_pretrained(final)
    for (name, p), (_, q) in zip(trainer.model.named_parameters(), reloaded.named_parameters()):
        assert torch.equal(p.detach(), q.detach()), name
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert any("logps/rank_0" in log for log in state["log_history"])


def test_infonca_card_metadata(tmp_path, tokenizer, make_model):
    trainer = InfoNCATrainer(
        make_model(),
        args=cpu_args(InfoNCAConfig, tmp_path, precompute_ref_log_probs=True),
        train_dataset=Dataset.from_list(reward_rows(n=2)),
        processing_class=tokenizer,
    )
    trainer.create_model_card(model_name="m")
    card = Path(tmp_path / "README.md").read_text()
    assert "InfoNCA" in card and "infonca" in card and "2402.05369" in card


def test_streamed_dataset_trains(tmp_path, tokenizer, make_model):
    """An IterableDataset is validated and tokenized lazily and trains like a map-style one."""
    stream = Dataset.from_list(reward_rows(ragged=True)).to_iterable_dataset()
    trainer = NCATrainer(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(NCAConfig, tmp_path),
        train_dataset=stream,
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    with pytest.raises(ValueError, match="row 1, column `rewards"):
        bad = Dataset.from_list([reward_rows()[0], {**reward_rows()[1], "rewards": [1.0, 2.0, float("nan"), 0.0]}])
        NCATrainer(
            make_model(),
            ref_model=make_model(),
            args=cpu_args(NCAConfig, tmp_path / "bad"),
            train_dataset=bad.to_iterable_dataset(),
            processing_class=tokenizer,
        ).train()


def test_card_names_a_reference_model_other_than_the_policy(tmp_path, tokenizer, make_model):
    policy, ref = make_model(), make_model(seed=1)
    policy.config._name_or_path, ref.config._name_or_path = "org/policy", "org/initial-sft"
    trainer = NCATrainer(
        policy,
        ref_model=ref,
        args=cpu_args(NCAConfig, tmp_path),
        train_dataset=Dataset.from_list(reward_rows(n=2)),
        processing_class=tokenizer,
    )
    trainer.create_model_card(model_name="m")
    assert "`org/initial-sft` (frozen)" in (tmp_path / "README.md").read_text()
    ref.config._name_or_path = "org/policy"  # the usual case: a copy of the policy's starting weights
    trainer.create_model_card(model_name="m")
    assert "a frozen copy of the initial model" in (tmp_path / "README.md").read_text()
