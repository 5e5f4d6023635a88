"""The layout is exact or it is not used: the first-batch self-check and its fallback, against the padded layout.

Oracle everywhere: the same model run in the padded layout (one right-padded row per response, a 2D mask), which is
TRL's own way and exact for every causal LM. The model the rules cannot see through is `layout_models`' Llama whose
backbone ignores the `position_ids` it takes (a `trust_remote_code`-style model): only the self-check catches it. The
real architectures the rules catch (OPT, MPT, RWKV, Bloom, Mamba, ...) are in `test_layout_zoo.py`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import cpu_args
from datasets import Dataset
from layout_models import BLIND_RANK_ENV, position_blind_llama
from test_shared_prompt import kway_rows, random_examples

import trl_nca.trainer as trainer_module
from trl_nca import DataCollatorForKWayReward, NCAConfig, NCATrainer
from trl_nca.layout import batch_layout, check_examples, grouped_examples, largest_excess

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = [("shared_prompt", False), ("shared_prompt", True), ("padded", False), ("padded", True)]


def blind_trainer(tmp_path, tokenizer, layout="auto", padding_free=False, ref_blind=None, **overrides):
    """An NCATrainer on `kway_rows()` whose policy ignores `position_ids` (`ignore_position_ids` on its config);
    the reference is a separate model (blind if `ref_blind`), or none (precompute) when `ref_blind` is None."""
    blind = overrides.pop("blind", True)
    model = position_blind_llama(len(tokenizer), seed=0, ignore_position_ids=blind)
    ref = None if ref_blind is None else position_blind_llama(len(tokenizer), seed=1, ignore_position_ids=ref_blind)
    args = cpu_args(
        NCAConfig,
        tmp_path / f"{layout}-{padding_free}",
        kway_layout=layout,
        padding_free=padding_free,
        beta=0.5,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        **overrides,
    )
    return NCATrainer(
        model, ref_model=ref, args=args, train_dataset=Dataset.from_list(kway_rows()), processing_class=tokenizer
    )


def first_batch(trainer) -> dict:
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return trainer._prepare_inputs(trainer.data_collator(rows))


def padded_logps(trainer, model, batch) -> torch.Tensor:
    """The oracle: `model`'s per-response log-probs of the batch's responses in the plain padded layout."""
    padded = dataclasses.replace(trainer.data_collator, layout="padded", padding_free=False)
    inputs = trainer._prepare_inputs(padded.collate_sequences(grouped_examples(batch)))
    inputs = {**{k: v for k, v in batch.items() if k in ("response_index", "response_mask")}, **inputs}
    with torch.no_grad():
        return trainer._forward_logps(model.eval(), inputs)[1]


@pytest.fixture
def fallback_lines(monkeypatch):
    lines = []
    original = trainer_module.logger.warning_once

    def record(message, *args, **kwargs):
        lines.append(str(message))
        return original(message, *args, **kwargs)

    monkeypatch.setattr(trainer_module.logger, "warning_once", record)
    return lines


# ------------------------------------------------------------------------------------------------ pure parts
@pytest.mark.parametrize("layout,padding_free", LAYOUTS)
@pytest.mark.parametrize("max_length", [None, 28])
def test_a_batch_gives_back_its_responses_in_every_layout(layout, padding_free, max_length):
    """`grouped_examples` inverts the collator: re-collating them in the padded layout gives the padded layout's
    tensors of the original rows (same truncation), and the scoring order is kept."""
    rng = random.Random(0)
    examples = random_examples(rng, n_prompts=6, max_prompt=20)
    collator = DataCollatorForKWayReward(
        pad_token_id=0, layout=layout, padding_free=padding_free, max_length=max_length, pad_to_multiple_of=8
    )
    batch = collator(examples)
    assert batch_layout(batch) == (
        "shared_prompt" if layout == "shared_prompt" else "packed" if padding_free else "padded"
    )
    rebuilt = grouped_examples(batch)
    assert [len(e["completion_ids"]) for e in rebuilt] == [len(e["completion_ids"]) for e in examples]
    oracle = DataCollatorForKWayReward(pad_token_id=0, max_length=max_length).collate_sequences(examples)
    again = DataCollatorForKWayReward(pad_token_id=0).collate_sequences(rebuilt)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(again[key], oracle[key]), key


def test_check_rows_have_two_responses_and_two_prompts():
    collator = DataCollatorForKWayReward(pad_token_id=0, layout="shared_prompt")
    one = collator([{"prompt_ids": [5, 6, 7], "completion_ids": [[8, 9, 10]], "rewards": [1.0]}])
    examples = check_examples(one)
    assert len(examples) == 2 and examples[0]["prompt_ids"] == examples[1]["prompt_ids"] == [5, 6, 7]
    assert examples[0]["completion_ids"] == [[8, 9, 10], [10, 9, 8]]
    single_token = collator([{"prompt_ids": [5, 6], "completion_ids": [[8]], "rewards": [1.0]}])
    assert check_examples(single_token)[0]["completion_ids"] == [[8], [8, 6]]


def test_the_tolerance_is_dtype_aware():
    reference = torch.tensor([[-30.0, -300.0]])
    n_tokens, mask = torch.tensor([[10, 100]]), torch.ones(1, 2, dtype=torch.bool)
    assert largest_excess(reference + 1e-4, reference, n_tokens, mask, half_precision=False)[1] < 0
    assert largest_excess(reference + 0.02, reference, n_tokens, mask, half_precision=False)[1] > 0
    assert largest_excess(reference + 0.1, reference, n_tokens, mask, half_precision=True)[1] < 0
    assert largest_excess(reference + 5.0, reference, n_tokens, mask, half_precision=True)[1] > 0
    nan = torch.tensor([[float("nan"), -300.0]])
    assert largest_excess(nan, reference, n_tokens, mask, half_precision=False)[1] == float("inf")


# ------------------------------------------------------------------------------------------------ the trainer
@pytest.mark.parametrize("padding_free", [False, True])
def test_a_model_that_ignores_position_ids_falls_back_and_trains_like_padded(
    tmp_path, tokenizer, fallback_lines, padding_free
):
    trainer = blind_trainer(tmp_path, tokenizer, padding_free=padding_free, ref_blind=True)
    assert trainer.data_collator.layout == "shared_prompt"  # the rules cannot see it
    batch = first_batch(trainer)
    with torch.no_grad():
        shared = trainer._forward_logps(trainer.model.eval(), batch)[1]
    oracle = padded_logps(trainer, trainer.model, batch)
    assert (shared - oracle).abs().max() > 0.1  # what training would have used without the check

    trainer.train()
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == ("padded", False)
    assert len(fallback_lines) == 1 and "\n" not in fallback_lines[0], fallback_lines
    assert "differs from the padded layout's" in fallback_lines[0] and "llama" in fallback_lines[0]
    packed = "not packed despite padding_free=True" in fallback_lines[0]
    assert packed == padding_free  # packing ignores positions too: the packed fallback is refused as well
    padded = blind_trainer(tmp_path / "oracle", tokenizer, layout="padded", ref_blind=True)
    padded.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    oracle_losses = [entry["loss"] for entry in padded.state.log_history if "loss" in entry]
    assert losses == pytest.approx(oracle_losses, rel=1e-5) and len(losses) == 2


def test_an_explicit_layout_that_is_not_exact_raises(tmp_path, tokenizer):
    trainer = blind_trainer(tmp_path, tokenizer, layout="shared_prompt", ref_blind=True)
    with pytest.raises(ValueError) as error:
        trainer.train()
    message = str(error.value)
    assert "\n" not in message and "kway_layout='shared_prompt' cannot be used" in message and "llama" in message
    trainer = blind_trainer(tmp_path, tokenizer, layout="padded", padding_free=True, ref_blind=True)
    with pytest.raises(ValueError, match="padding_free=True cannot be used"):
        trainer.train()


def test_the_check_can_be_switched_off(tmp_path, tokenizer, fallback_lines):
    trainer = blind_trainer(tmp_path, tokenizer, ref_blind=True, kway_layout_check=False)
    trainer.train()
    assert trainer.data_collator.layout == "shared_prompt" and not fallback_lines


def test_an_exact_model_keeps_its_layout_and_costs_one_check(tmp_path, tokenizer, fallback_lines, monkeypatch):
    trainer = blind_trainer(tmp_path, tokenizer, padding_free=True, ref_blind=False, blind=False)
    calls = []
    original = trainer._check_logps
    monkeypatch.setattr(trainer, "_check_logps", lambda *a: calls.append(a[2]) or original(*a))
    trainer.train()
    trainer.evaluate(Dataset.from_list(kway_rows()))
    assert (trainer.data_collator.layout, trainer.data_collator.padding_free) == ("shared_prompt", True)
    assert calls == [("padded", False), ("shared_prompt", True)] and not fallback_lines


def test_the_live_reference_forward_is_checked(tmp_path, tokenizer, fallback_lines):
    """An exact policy with a reference that is not: the reference's forward decides too."""
    trainer = blind_trainer(tmp_path, tokenizer, ref_blind=True, blind=False)
    batch = first_batch(trainer)
    checked = trainer._exact_layout([trainer.model, trainer.ref_model], batch)
    assert trainer.data_collator.layout == "padded" and batch_layout(checked) == "padded"
    ref = trainer._reference_logps(checked)
    assert torch.allclose(ref, padded_logps(trainer, trainer.ref_model, batch), rtol=1e-5, atol=1e-5)
    assert len(fallback_lines) == 1


@pytest.mark.parametrize("padding_free", [False, True])
def test_precomputed_references_are_checked(tmp_path, tokenizer, padding_free):
    trainer = blind_trainer(tmp_path, tokenizer, padding_free=padding_free, precompute_ref_log_probs=True)
    assert trainer.data_collator.layout == "padded"  # decided during the precompute, inside __init__
    precomputed = [trainer.train_dataset[i]["ref_logps"] for i in range(len(trainer.train_dataset))]
    oracle = padded_logps(trainer, trainer.model, first_batch(trainer))
    for row, values in enumerate(precomputed):
        assert values == pytest.approx(oracle[row, : len(values)].tolist(), rel=1e-5, abs=1e-5)


def test_batches_collated_before_the_fallback_are_re_laid_out(tmp_path, tokenizer):
    """Dataloader workers hold their own copy of the collator: their batches keep coming in the old layout."""
    trainer = blind_trainer(tmp_path, tokenizer, ref_blind=True)
    stale = DataCollatorForKWayReward(
        **{f.name: getattr(trainer.data_collator, f.name) for f in dataclasses.fields(trainer.data_collator)}
    )
    trainer._exact_layout([trainer.model, trainer.ref_model], first_batch(trainer))
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    late = trainer._prepare_inputs(stale(rows))
    assert batch_layout(late) == "shared_prompt"
    fixed = trainer._exact_layout([trainer.model, trainer.ref_model], late)
    assert batch_layout(fixed) == "padded"
    expected = trainer._prepare_inputs(trainer.data_collator(rows))
    for key in ("input_ids", "attention_mask", "completion_mask", "rewards", "response_index", "response_mask"):
        assert torch.equal(fixed[key], expected[key]), key


# ------------------------------------------------------------------------------------------------ two processes
PROBE = REPO / "tests" / "layout_check_probe.py"


def _launch(tmp_path, config: str | None, n_processes: int) -> list[dict]:
    from test_distributed import _env, _free_port

    out = tmp_path / (config or "single")
    env = _env(**{BLIND_RANK_ENV: "1"})
    if config is None:
        command = [sys.executable, str(PROBE), str(out)]
    else:
        command = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(REPO / "recipes" / "accelerate_configs" / config),
        ]
        command += [
            "--num_processes",
            str(n_processes),
            "--main_process_port",
            str(_free_port()),
            str(PROBE),
            str(out),
        ]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(n_processes)]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["cpu_ddp.yaml", "cpu_zero3.yaml"])
def test_every_process_takes_the_same_decision(tmp_path, config):
    """Only rank 1's model ignores positions: rank 0's own check passes (the 1-process run keeps the shared
    layout), yet both ranks fall back, and train the same steps."""
    (alone,) = _launch(tmp_path, None, 1)
    assert alone["layout"] == ["shared_prompt", False]
    records = _launch(tmp_path, config, 2)
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["layout"] for r in records] == [["padded", False], ["padded", False]]
    assert records[0]["losses"] == records[1]["losses"] and len(records[0]["losses"]) == 2
