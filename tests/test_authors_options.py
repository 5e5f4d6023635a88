"""Reproducing the authors' loss, tie-break (`score_A0 + 0.01`) and truncation rule; their collation (an empty system
turn, attention-masked EOS tokens, a second EOS after each response) is not reproduced (docs/usage.md).

Oracles are the authors' code written out per example (thu-ml/Noise-Contrastive-Alignment@cbb9248): `nca_loss` in
`reward_trainer.py` (soft labels `softmax([A0 + 0.01, A1, A2, A3] / temperature_alpha)`, NCA =
`-mean(logsigmoid(-r)) - sum(w * logsigmoid(r))`) and `tokenize_batch_element` in `data_utils.py` (prompt keeps its
last `max_prompt_length` tokens when prompt + longest response exceeds `max_length`, then every response keeps its
first `max_length - max_prompt_length`).
"""

import math

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from test_shared_prompt import gradients, run_step
from test_trainer import preference_rows, reward_rows

from trl_nca import DataCollatorForKWayReward, InfoNCAConfig, InfoNCATrainer, NCAConfig, NCATrainer
from trl_nca.collator import truncate_like_the_authors
from trl_nca.losses import favour_first_response, infonca_loss, nca_loss, target_weights


def _logps_loss_grads(trainer):
    """Per-response log-probs, loss and gradients of one step over the whole dataset."""
    step = run_step(trainer)
    return step.logps.detach(), step.loss.detach(), gradients(step.loss, step.params)


def authors_soft_labels(scores: list[float], temperature_alpha: float, bonus: float = 0.01) -> list[float]:
    shifted = [(s + (bonus if i == 0 else 0.0)) / temperature_alpha for i, s in enumerate(scores)]
    top = max(shifted)
    exps = [math.exp(s - top) for s in shifted]
    return [e / sum(exps) for e in exps]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------- tie-break
@pytest.mark.parametrize("alpha", [1e-4, 0.5, 1.0, 3.0])
def test_first_response_bonus_gives_the_authors_soft_labels(alpha):
    scores = [[8.0, 8.0, 6.5, 3.0], [7.0, 9.0, 9.0, 1.0], [5.0, 5.0, 5.0, 5.0], [2.0, 6.0, 4.0, 6.0]]
    weights = target_weights(favour_first_response(torch.tensor(scores)), alpha)
    for row, expected in zip(weights.tolist(), [authors_soft_labels(s, alpha) for s in scores]):
        assert row == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_ties_on_top_share_by_default_and_go_first_with_the_bonus():
    rewards = torch.tensor([[8.0, 8.0, 6.5, 3.0], [1.0, 0.0, 0.0, 0.0]])
    assert target_weights(rewards, 0.0)[0].tolist() == [0.5, 0.5, 0.0, 0.0]  # default: the tie is shared
    assert target_weights(favour_first_response(rewards), 0.0)[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert target_weights(favour_first_response(rewards), 1e-4)[0, 0] > 0.9999  # the authors' alpha
    # A hard-labelled preference row (1, 0) keeps its labels.
    assert target_weights(favour_first_response(rewards), 0.0)[1].tolist() == [1.0, 0.0, 0.0, 0.0]


def test_nca_and_infonca_with_the_bonus_equal_the_authors_formula_per_example():
    generator = torch.Generator().manual_seed(0)
    policy, ref = torch.randn(3, 4, generator=generator) * 5, torch.randn(3, 4, generator=generator) * 5
    scores = [[8.0, 8.0, 6.5, 3.0], [7.0, 9.0, 9.0, 1.0], [6.0, 6.0, 6.0, 2.0]]
    beta, alpha = 0.1, 0.5
    rewards = favour_first_response(torch.tensor(scores))
    nca = nca_loss(policy, ref, rewards, beta=beta, alpha=alpha).tolist()
    infonca = infonca_loss(policy, ref, rewards, beta=beta, alpha=alpha).tolist()
    for b, row in enumerate(scores):
        w = authors_soft_labels(row, alpha)
        r = [beta * (policy[b, i].item() - ref[b, i].item()) for i in range(4)]
        expected_nca = -sum(log_sigmoid(-x) for x in r) / 4 - sum(wi * log_sigmoid(x) for wi, x in zip(w, r))
        log_z = math.log(sum(math.exp(x) for x in r))
        expected_infonca = -sum(wi * (x - log_z) for wi, x in zip(w, r))
        assert nca[b] == pytest.approx(expected_nca, rel=1e-5)
        assert infonca[b] == pytest.approx(expected_infonca, rel=1e-5)


def authors_hard_labels(scores: list[float], bonus: float) -> list[float]:
    """The alpha -> 0 limit of the authors' soft labels: uniform over the responses with the top (shifted) score."""
    shifted = [s + (bonus if i == 0 else 0.0) for i, s in enumerate(scores)]
    top = [float(s == max(shifted)) for s in shifted]
    return [t / sum(top) for t in top]


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("trainer_cls,config_cls", [(NCATrainer, NCAConfig), (InfoNCATrainer, InfoNCAConfig)])
def test_trainer_loss_follows_the_tie_break(tmp_path, tokenizer, make_model, trainer_cls, config_cls, alpha):
    """The trainer's loss and its logged weight entropy equal the authors' formula for each tie_break, per prompt."""
    rows = reward_rows(n=2, k=4)
    rows[0]["rewards"] = [3.0, 3.0, 1.0, 0.0]  # tied on top, one of them listed first
    rows[1]["rewards"] = [2.0, 4.0, 4.0, 0.0]  # tied on top, neither listed first
    beta, losses, entropies = 0.5, {}, {}
    for tie_break, bonus in (("share", 0.0), ("first", 0.01)):
        trainer = trainer_cls(
            make_model(seed=0, initializer_range=0.1),
            ref_model=make_model(seed=1),
            args=cpu_args(config_cls, tmp_path / tie_break, alpha=alpha, beta=beta, tie_break=tie_break),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
        with torch.no_grad():
            _, policy = trainer._forward_logps(trainer.model, batch)
            ref = trainer._reference_logps(batch)
            losses[tie_break] = trainer.compute_loss(trainer.model, batch).item()
        mode = "train" if trainer.model.training else "eval"
        entropies[tie_break] = trainer._metrics[mode]["target_weights/entropy"][-1]

        expected_loss, expected_entropy = 0.0, 0.0
        for b, row in enumerate(rows):
            scores = row["rewards"]
            w = authors_hard_labels(scores, bonus) if alpha == 0 else authors_soft_labels(scores, alpha, bonus)
            r = [beta * (policy[b, i].item() - ref[b, i].item()) for i in range(4)]
            if trainer_cls is NCATrainer:
                loss = -sum(log_sigmoid(-x) for x in r) / 4 - sum(wi * log_sigmoid(x) for wi, x in zip(w, r))
            else:
                log_z = math.log(sum(math.exp(x) for x in r))
                loss = -sum(wi * (x - log_z) for wi, x in zip(w, r))
            expected_loss += loss / len(rows)
            expected_entropy -= sum(wi * math.log(wi) for wi in w if wi > 0) / len(rows)
        assert losses[tie_break] == pytest.approx(expected_loss, rel=1e-5), tie_break
        assert entropies[tie_break] == pytest.approx(expected_entropy, rel=1e-4, abs=1e-6), tie_break
    assert losses["first"] != pytest.approx(losses["share"], rel=1e-4)
    if alpha == 0:  # row 0's tie goes to its first response, row 1's stays shared
        assert entropies["first"] == pytest.approx(math.log(2) / 2)
        assert entropies["share"] == pytest.approx(math.log(2))


def test_tie_break_leaves_preference_rows_alone(tmp_path, tokenizer, make_model):
    results = {}
    for tie_break in ("share", "first"):
        trainer = NCATrainer(
            make_model(seed=0, initializer_range=0.1),
            ref_model=make_model(seed=1),
            args=cpu_args(NCAConfig, tmp_path / tie_break, alpha=3.0, tie_break=tie_break),
            train_dataset=Dataset.from_list(preference_rows(n=4)),
            processing_class=tokenizer,
        )
        results[tie_break] = _logps_loss_grads(trainer)
    assert results["first"][1].item() == results["share"][1].item()


# ---------------------------------------------------------------------------------------------- truncation
TRUNCATION_CASES = [
    # (prompt length, response lengths, max_length, max_prompt_length) -> (kept prompt slice, kept response lengths)
    ("fits", 4, [3, 5], 12, 6, (slice(0, 4), [3, 5])),
    ("long-prompt", 10, [2, 3], 12, 6, (slice(4, 10), [2, 3])),  # 10 + 3 > 12: prompt keeps its last 6
    ("both-long", 10, [2, 9], 12, 6, (slice(4, 10), [2, 6])),  # still 6 + 9 > 12: responses keep 12 - 6
    ("long-response", 3, [1, 11], 12, 6, (slice(0, 3), [1, 6])),  # the cut is max_length - max_prompt_length
]


@pytest.mark.parametrize("case", TRUNCATION_CASES, ids=[c[0] for c in TRUNCATION_CASES])
def test_truncation_follows_the_authors_rule(case):
    _, n_prompt, lengths, max_length, max_prompt, (prompt_slice, kept) = case
    prompt = list(range(100, 100 + n_prompt))
    completions = [list(range(200 + 20 * k, 200 + 20 * k + n)) for k, n in enumerate(lengths)]
    new_prompt, new_completions = truncate_like_the_authors(prompt, completions, max_length, max_prompt)
    assert new_prompt == prompt[prompt_slice]
    assert new_completions == [c[:n] for c, n in zip(completions, kept)]


def test_collator_applies_it_in_both_layouts():
    example = {"prompt_ids": list(range(1, 11)), "completion_ids": [[21, 22], list(range(31, 40))], "rewards": [1, 0]}
    padded = DataCollatorForKWayReward(pad_token_id=0, max_length=12, max_prompt_length=6)([example])
    # Prompt keeps 5..10; responses keep their first 12 - 6 = 6 tokens.
    assert padded["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, 10, 21, 22, 0, 0, 0, 0],
        [5, 6, 7, 8, 9, 10, 31, 32, 33, 34, 35, 36],
    ]
    assert padded["completion_mask"].tolist() == [[0] * 6 + [1, 1] + [0] * 4, [0] * 6 + [1] * 6]
    shared = DataCollatorForKWayReward(pad_token_id=0, max_length=12, max_prompt_length=6, layout="shared_prompt")
    row = shared([example])["input_ids"][0].tolist()
    assert row == [5, 6, 7, 8, 9] + [10, 21, 22] + [10, 31, 32, 33, 34, 35, 36]

    # A short prompt is kept whole, but the responses still keep only 12 - 6 tokens (not 12 - 3): their rule.
    example = {"prompt_ids": [1, 2, 3], "completion_ids": [[21], list(range(31, 42))], "rewards": [1, 0]}
    padded = DataCollatorForKWayReward(pad_token_id=0, max_length=12, max_prompt_length=6)([example])
    assert padded["input_ids"].tolist() == [[1, 2, 3, 21, 0, 0, 0, 0, 0], [1, 2, 3, 31, 32, 33, 34, 35, 36]]
    row = shared([example])["input_ids"][0].tolist()
    assert row == [1, 2] + [3, 21] + [3, 31, 32, 33, 34, 35, 36]


def test_shared_prompt_equals_padded_with_the_authors_truncation(tmp_path, tokenizer, make_model):
    results = {}
    for layout in ("padded", "shared_prompt"):
        trainer = NCATrainer(
            make_model(seed=0, initializer_range=0.1),
            ref_model=make_model(seed=1),
            args=cpu_args(
                NCAConfig,
                tmp_path / layout,
                kway_layout=layout,
                beta=0.5,
                max_length=14,
                max_prompt_length=9,
                truncation_mode="keep_end",
                tie_break="first",
            ),  # fmt: skip
            train_dataset=Dataset.from_list(reward_rows(n=4, k=4, ragged=True)),
            processing_class=tokenizer,
        )
        assert trainer.data_collator.layout == layout  # keep_end does not force the padded layout here
        results[layout] = _logps_loss_grads(trainer)
    (lp_a, loss_a, grads_a), (lp_b, loss_b, grads_b) = results["padded"], results["shared_prompt"]
    torch.testing.assert_close(lp_b, lp_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_trainer_keeps_long_prompts_and_trains_with_both_options(tmp_path, tokenizer, make_model):
    rows = reward_rows(n=4, k=4)
    rows[0] = {**rows[0], "prompt": "one two three four five six seven eight nine ten " * 3}
    trainer = NCATrainer(
        make_model(),
        ref_model=make_model(seed=1),
        args=cpu_args(NCAConfig, tmp_path, max_length=16, max_prompt_length=8, tie_break="first", max_steps=2),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    assert len(trainer.train_dataset) == 4  # the long prompt is cut, not dropped
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["padding_mask"].sum() <= 8 + 4 * (16 - 8)
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    trainer.create_model_card(model_name="m")
    card = (tmp_path / "README.md").read_text()
    assert "ties on the top reward: first" in card and "prompt's last 8 tokens" in card


def test_precomputed_reference_uses_the_authors_truncation(tmp_path, tokenizer, make_model):
    rows = reward_rows(n=4, k=4)
    rows[1] = {**rows[1], "prompt": "one two three four five six seven eight nine ten " * 3}
    ref_logps = {}
    for precompute in ({}, {"precompute_ref_log_probs": True}):
        trainer = NCATrainer(
            make_model(seed=0),
            ref_model=make_model(seed=1, initializer_range=0.1),
            args=cpu_args(NCAConfig, tmp_path / str(precompute), max_length=16, max_prompt_length=8, **precompute),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        with torch.no_grad():
            ref_logps[bool(precompute)] = trainer._reference_logps(batch)
    assert trainer.precompute_ref_logps
    torch.testing.assert_close(ref_logps[True], ref_logps[False], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"max_prompt_length": 8, "max_length": None}, "`max_prompt_length` needs `max_length`"),
        ({"max_prompt_length": 16, "max_length": 16}, "must be an integer > 0 and < max_length=16"),
        ({"max_prompt_length": 0, "max_length": 16}, "must be an integer > 0 and < max_length=16"),
        ({"max_prompt_length": 8.5, "max_length": 16}, "must be an integer > 0 and < max_length=16"),
        ({"tie_break": "last"}, "`tie_break` must be 'share' or 'first'"),
    ],
)
def test_invalid_options_are_refused(tmp_path, overrides, message):
    for config_cls in (NCAConfig, InfoNCAConfig):
        with pytest.raises(ValueError, match=message):
            cpu_args(config_cls, tmp_path, **overrides)


@pytest.mark.parametrize(
    "max_length,max_prompt_length,message",
    [(None, 8, "max_prompt_length needs max_length"), (16, 16, "must be > 0 and < max_length=16"), (16, 0, "> 0")],
)
def test_collator_refuses_an_impossible_prompt_budget(max_length, max_prompt_length, message):
    with pytest.raises(ValueError, match=message):
        DataCollatorForKWayReward(pad_token_id=0, max_length=max_length, max_prompt_length=max_prompt_length)


def test_recipes_that_claim_the_authors_setting_use_both_options():
    from pathlib import Path

    import yaml

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    claimed = [
        p for p in recipes.rglob("*.yaml") if "authors" in str(yaml.safe_load(p.read_text()).get("dataset_format"))
    ]
    assert len(claimed) >= 7
    for path in claimed:
        recipe = yaml.safe_load(path.read_text())
        assert (recipe["max_length"], recipe["max_prompt_length"]) == (1024, 512), path
        # The authors' tie-break belongs to their NCA/InfoNCA objective; the listwise recipes rank ties as ties.
        authors_objective = recipe["dataset_format"] == "authors_reward" and recipe["trainer"] != "listwise"
        assert recipe.get("tie_break") == ("first" if authors_objective else None), path
