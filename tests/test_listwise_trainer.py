"""ListwiseTrainer (Plackett-Luce DPO, LiPO-λ, all-pairs DPO) on the K-way machinery, against independent oracles.

- TRL's own DPOTrainer: on preference pairs Plackett-Luce and all-pairs equal its sigmoid loss (LiPO-λ a constant
  multiple of it), loss and every gradient; all-pairs DPO on K-way rows equals DPOTrainer on each prompt's pairs.
- The paper formulas per example (`test_listwise_losses`' oracles) on log-probs from a plain model forward.
- Every layout (shared prompt, packed) against the padded one; precompute against the live reference; `sft`.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from test_listwise_losses import oracle_all_pairs, oracle_lipo_lambda, oracle_plackett_luce
from test_parity import PREFERENCE_TEXT, REWARD_ROWS, _collate_all, _grads, _sequence_logps
from test_shared_prompt import PACKINGS, Target, assert_step_matches, gradients, make_trainer, run_step
from test_trainer import reward_rows
from trl import DPOConfig, DPOTrainer

from trl_nca import ListwiseConfig, ListwiseTrainer
from trl_nca.scripts.train import get_config_class, get_trainer_class

LISTWISE = ("plackett_luce", "lipo_lambda", "all_pairs")
LIPO_PAIR_WEIGHT = 1 / math.log(2) - 1 / math.log(3)  # Δ of a two-response list with labels (1, 0)


def _relative_gap(ours: dict, theirs: dict, scale: float = 1.0) -> float:
    assert ours.keys() == theirs.keys()
    return max(((ours[n] - scale * g).norm() / (scale * g).norm().clamp_min(1e-12)).item() for n, g in theirs.items())


# ------------------------------------------------------------------------------------------------ against TRL's DPO
@pytest.mark.parametrize("loss_type,scale", [("plackett_luce", 1.0), ("all_pairs", 1.0), ("lipo_lambda", None)])
def test_preference_pairs_equal_trl_dpo(tmp_path, tokenizer, make_model, loss_type, scale):
    """K = 2: loss, metrics and gradients equal DPOTrainer's sigmoid loss (LiPO-λ: times 1/ln 2 − 1/ln 3)."""
    scale = scale or LIPO_PAIR_WEIGHT
    dataset = Dataset.from_list(PREFERENCE_TEXT)
    common = dict(beta=0.5, max_length=64, per_device_eval_batch_size=3)
    dpo = DPOTrainer(
        make_model(seed=0),
        ref_model=make_model(seed=1),
        args=cpu_args(DPOConfig, tmp_path / "dpo", loss_type="sigmoid", **common),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    mine = ListwiseTrainer(
        make_model(seed=0),
        ref_model=make_model(seed=1),
        args=cpu_args(ListwiseConfig, tmp_path / "ours", loss_type=[loss_type], **common),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    dpo_eval, our_eval = dpo.evaluate(), mine.evaluate()
    assert our_eval["eval_loss"] == pytest.approx(scale * dpo_eval["eval_loss"], rel=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert our_eval[f"eval_{key}"] == pytest.approx(dpo_eval[f"eval_{key}"], rel=1e-5, abs=1e-7), key
    assert "eval_target_weights/entropy" not in our_eval  # no reward temperature in the listwise losses

    dpo_loss, dpo_grads = _grads(dpo, _collate_all(dpo))
    our_loss, our_grads = _grads(mine, _collate_all(mine))
    torch.testing.assert_close(our_loss, scale * dpo_loss, rtol=1e-6, atol=1e-7)
    assert _relative_gap(our_grads, dpo_grads, scale) <= 1e-5


ALL_PAIRS_ROWS = [  # three distinct rewards per prompt: three pairs each, so per-prompt means equal the pair mean
    {"prompt": "what is one plus two?", "completions": [" three", " four", " blue sky"], "rewards": [1.0, 0.25, 0.0]},
    {"prompt": "the sky is", "completions": [" green", " blue.", " red and big"], "rewards": [0.5, 2.0, -1.0]},
]


def _pairs_of(rows: list[dict]) -> list[tuple[dict, float]]:
    """Every (pair, reward gap) with a higher-rewarded chosen response."""
    return [
        ({"prompt": row["prompt"], "chosen": row["completions"][i], "rejected": row["completions"][j]}, gap)
        for row in rows
        for i, j in itertools.permutations(range(len(row["rewards"])), 2)
        if (gap := row["rewards"][i] - row["rewards"][j]) > 0
    ]


@pytest.mark.parametrize("reduction,gap_weighted", [("mean", False), ("sum", False), ("mean", True), ("sum", True)])
def test_all_pairs_equals_trl_dpo_on_every_pair(tmp_path, tokenizer, make_model, reduction, gap_weighted):
    """K = 3: one forward per prompt gives the loss and gradients of DPOTrainer run on each of the prompts' pairs
    alone, combined with the reduction's weights (mean: 1/3 per pair, sum: 1, gap-weighted: times the gap), averaged
    over the two prompts."""
    pairs = _pairs_of(ALL_PAIRS_ROWS)
    assert len(pairs) == 6
    dpo = DPOTrainer(
        make_model(seed=0),
        ref_model=make_model(seed=1),
        args=cpu_args(DPOConfig, tmp_path / "dpo", beta=0.5, loss_type="sigmoid"),
        train_dataset=Dataset.from_list([pair for pair, _ in pairs]),
        processing_class=tokenizer,
    )
    expected_loss, expected_grads = 0.0, {}
    for index, (_, gap) in enumerate(pairs):
        weight = (gap if gap_weighted else 1.0) / (3 if reduction == "mean" else 1) / len(ALL_PAIRS_ROWS)
        loss, grads = _grads(dpo, dpo.data_collator([dpo.train_dataset[index]]))
        expected_loss += weight * loss
        for name, grad in grads.items():
            expected_grads[name] = expected_grads.get(name, 0) + weight * grad
    mine = ListwiseTrainer(
        make_model(seed=0),
        ref_model=make_model(seed=1),
        args=cpu_args(
            ListwiseConfig,
            tmp_path / "ours",
            beta=0.5,
            loss_type=["all_pairs"],
            all_pairs_reduction=reduction,
            all_pairs_gap_weighted=gap_weighted,
        ),
        train_dataset=Dataset.from_list(ALL_PAIRS_ROWS),
        processing_class=tokenizer,
    )
    our_loss, our_grads = _grads(mine, _collate_all(mine))
    torch.testing.assert_close(our_loss, expected_loss, rtol=1e-6, atol=1e-7)
    assert _relative_gap(our_grads, expected_grads) <= 1e-5


# ------------------------------------------------------------------------------------------------ the paper formulas
ORACLE_OPTIONS = [
    ("plackett_luce", {}, lambda pi, mu, r, beta: oracle_plackett_luce(pi, mu, r, beta)),
    ("plackett_luce", {"plackett_luce_top_m": 1}, lambda pi, mu, r, beta: oracle_plackett_luce(pi, mu, r, beta, 1)),
    ("lipo_lambda", {}, lambda pi, mu, r, beta: oracle_lipo_lambda(pi, mu, r, beta)),
    (
        "lipo_lambda",
        {"lipo_label_normalization": "minmax"},
        lambda pi, mu, r, beta: oracle_lipo_lambda(pi, mu, r, beta, "minmax"),
    ),
    ("all_pairs", {}, lambda pi, mu, r, beta: oracle_all_pairs(pi, mu, r, beta)),
    (
        "all_pairs",
        {"all_pairs_reduction": "sum", "all_pairs_gap_weighted": True},
        lambda pi, mu, r, beta: oracle_all_pairs(pi, mu, r, beta, "sum", True),
    ),
]


@pytest.mark.parametrize("loss_type,options,oracle", ORACLE_OPTIONS, ids=lambda v: str(v) if v else "defaults")
def test_eval_loss_matches_the_formula_on_independent_logps(
    tmp_path, tokenizer, make_model, loss_type, options, oracle
):
    """Ragged K with tied rewards (`REWARD_ROWS`); log-probs from a plain forward, the loss from the per-example formula."""
    policy, ref = make_model(seed=0, initializer_range=0.3), make_model(seed=1, initializer_range=0.3)
    beta = 0.2
    rows = REWARD_ROWS
    expected = []
    for row in rows:
        pi = [_sequence_logps(policy, tokenizer, row["prompt"], c) for c in row["completions"]]
        mu = [_sequence_logps(ref, tokenizer, row["prompt"], c) for c in row["completions"]]
        expected.append(oracle(pi, mu, [float(r) for r in row["rewards"]], beta))
    trainer = ListwiseTrainer(
        policy,
        ref_model=ref,
        args=cpu_args(
            ListwiseConfig, tmp_path, beta=beta, loss_type=[loss_type], per_device_eval_batch_size=len(rows), **options
        ),
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


# ------------------------------------------------------------------------------------------------ layouts, reference, sft
@pytest.mark.parametrize("loss_type", LISTWISE)
def test_every_layout_equals_the_padded_layout(tmp_path, tokenizer, make_model, loss_type):
    """Shared prompt (rows and packed) and packed padded rows: log-probs, loss and every gradient as the padded rows."""

    def step(layout, packed):
        trainer = make_trainer(
            tmp_path, tokenizer, make_model, "mistral-window", "sdpa", layout, packed,
            trainer_cls=ListwiseTrainer, loss_type=[loss_type],
        )  # fmt: skip
        assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == (layout, packed)
        return run_step(trainer)

    padded = step("padded", False)
    target = Target(padded.logps.detach(), padded.loss.detach(), None, gradients(padded.loss, padded.params))
    assert target.loss > 0 and all(grad.norm() > 0 for grad in target.grads.values())
    for layout, packed in PACKINGS:
        assert_step_matches(step(layout, packed), target, f"{loss_type}-{layout}-{packed}")


def test_losses_combine_through_loss_weights(tmp_path, tokenizer, make_model):
    """Each listwise loss and `sft` enter with their `loss_weights`: the combined first-step loss is the weighted sum
    of the single-loss runs' (the reference is the initial policy, so every run starts from the same point)."""

    def first_loss(loss_type, weights=None):
        trainer = ListwiseTrainer(
            make_model(),
            args=cpu_args(
                ListwiseConfig,
                tmp_path / "-".join(loss_type) / str(weights),
                loss_type=loss_type,
                loss_weights=weights,
                precompute_ref_log_probs=True,
                max_steps=1,
            ),
            train_dataset=Dataset.from_list(reward_rows(n=2)),
            processing_class=tokenizer,
        )
        trainer.train()
        return trainer.state.log_history[0]["loss"]

    single = {name: first_loss([name]) for name in LISTWISE}
    # rho = 0 at the start: each pair's DPO loss is log 2, so is their mean.
    assert single["all_pairs"] == pytest.approx(math.log(2), rel=1e-5)
    sft = first_loss(["plackett_luce", "sft"], [0.0, 1.0])
    assert sft > 0
    combined = first_loss([*LISTWISE, "sft"], [1.0, 0.5, 2.0, 0.25])
    expected = single["plackett_luce"] + 0.5 * single["lipo_lambda"] + 2.0 * single["all_pairs"] + 0.25 * sft
    assert combined == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ config, card, CLI
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(loss_type=["nca"]), "for NCA use NCAConfig"),
        (dict(loss_type=["sft"]), "ListwiseConfig trains with loss_type"),
        (dict(loss_type=["plackett_luce", "sigmoid"]), "trl.DPOTrainer"),
        (dict(plackett_luce_top_m=0), "plackett_luce_top_m"),
        (dict(loss_type=["lipo_lambda"], plackett_luce_top_m=2), "only applies to loss_type 'plackett_luce'"),
        (dict(lipo_label_normalization="zscore", loss_type=["lipo_lambda"]), "lipo_label_normalization"),
        (dict(all_pairs_gap_weighted=True), "only applies to loss_type 'all_pairs'"),
        (dict(all_pairs_reduction="max", loss_type=["all_pairs"]), "all_pairs_reduction"),
        (dict(ld_alpha=0.5), "DPO-only option"),
    ],
)
def test_config_refuses_what_it_cannot_honour(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cpu_args(ListwiseConfig, tmp_path, **overrides)


def test_nca_config_points_to_the_listwise_config(tmp_path):
    from trl_nca import NCAConfig

    with pytest.raises(ValueError, match="for the listwise losses use ListwiseConfig"):
        cpu_args(NCAConfig, tmp_path, loss_type=["plackett_luce"])


def test_card_names_and_cites_the_losses_used(tmp_path, tokenizer, make_model):
    trainer = ListwiseTrainer(
        make_model(),
        args=cpu_args(
            ListwiseConfig,
            tmp_path,
            loss_type=["lipo_lambda", "plackett_luce"],
            plackett_luce_top_m=2,
            lipo_label_normalization="minmax",
            precompute_ref_log_probs=True,
        ),
        train_dataset=Dataset.from_list(reward_rows(n=2)),
        processing_class=tokenizer,
    )
    assert trainer._name == "LiPO-λ + Plackett-Luce DPO"
    trainer.create_model_card(model_name="m")
    card = (tmp_path / "README.md").read_text()
    tags = card.split("tags:")[1].split("---")[0]
    assert all(tag in tags for tag in ("listwise", "lipo", "plackett-luce")) and "nca" not in tags
    assert "liu2024lipo" in card and "rafailov2023direct" in card and "2402.01878" in card
    assert "- Plackett-Luce: top 2 stages, tied rewards share a stage" in card
    assert "- LiPO-λ labels: minmax normalisation" in card and "α" not in card


def test_train_script_knows_the_listwise_trainer():
    assert get_config_class("listwise") is ListwiseConfig and get_trainer_class("listwise") is ListwiseTrainer
