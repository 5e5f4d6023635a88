"""scripts/reproduce_results.py on the tiny preset: every regime's JSON, the selection rule, the off-policy rewrite, and
the numbers of a job run by the 2-worker pool against the same job run on its own in this process."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from tests.conftest import load_script
from trl_nca.demo import pipeline as P
from trl_nca.demo.task import ideal_answer, sort_reward

# imported by name (not `load_script`): the worker processes unpickle its functions as `reproduce_results.*`
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import reproduce_results as R  # noqa: E402

TIMING_KEYS = {"align_s", "job_s"}


def _sorting_row(rng: random.Random) -> dict:
    digits = [rng.randrange(10) for _ in range(rng.randint(3, 6))]
    prompt = P.user_message(digits)
    texts = [ideal_answer(digits), " ".join(map(str, digits)), ideal_answer(digits)[:-2], "9 9"]
    return {
        "prompt": prompt,
        "completions": [P.assistant_message(t) for t in texts],
        "rewards": [sort_reward(prompt[0]["content"], t) for t in texts],
    }


def test_offpolicy_rows_rewrite_exactly_the_exact_answers_and_keep_every_reward():
    rng = random.Random(0)
    rows = [_sorting_row(rng) for _ in range(50)]
    rewritten = P.offpolicy_rows(rows)
    n_rewritten = 0
    for row, new in zip(rows, rewritten, strict=True):
        assert new["rewards"] == row["rewards"] and new["prompt"] == row["prompt"]
        for old_c, new_c, reward in zip(row["completions"], new["completions"], row["rewards"], strict=True):
            # the reward of the rewritten text, recomputed, is the row's reward
            assert sort_reward(row["prompt"][0]["content"], new_c[0]["content"]) == reward
            if reward == 1.0:
                n_rewritten += 1
                assert new_c[0]["content"] == "\n".join(old_c[0]["content"].split()) != old_c[0]["content"]
            else:
                assert new_c == old_c
    assert n_rewritten >= 50  # at least the ideal answer of every row
    assert rows[0]["completions"][0][0]["content"].count("\n") == 0  # the input rows are not modified


def _tuning_record(method: str, seed: int, lr: float, beta: float, reward: float) -> dict:
    return {"stage": "tuning", "method": method, "seed": seed, "hparams": R._hp(lr, beta), "reward_sampled": reward}


def test_selection_is_the_best_mean_validation_reward_over_the_tuning_seeds():
    records = [
        # point A wins on seed 1000 only; point B has the higher mean
        _tuning_record("nca", 1000, 1e-3, 0.5, 0.90),
        _tuning_record("nca", 1001, 1e-3, 0.5, 0.70),
        _tuning_record("nca", 1000, 3e-4, 2.0, 0.85),
        _tuning_record("nca", 1001, 3e-4, 2.0, 0.84),
        # a test record never counts
        {**_tuning_record("nca", 0, 3e-3, 0.1, 0.99), "stage": "test"},
        _tuning_record("dpo", 1000, 1e-3, 0.5, 0.5),
        _tuning_record("dpo", 1001, 1e-3, 0.5, 0.5),
    ]
    assert R.select(records, ("nca", "dpo")) == {"nca": R._hp(3e-4, 2.0), "dpo": R._hp(1e-3, 0.5)}


@pytest.fixture(scope="module")
def tiny_reproduction(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    argv = [
        "--size", "tiny", "--output-dir", str(root / "runs"), "--docs-dir", str(root / "docs"),
        "--methods", "nca", "infonca", "dpo", "dpo_random", "nca_pair",
        "--test-seeds", "0", "1", "--tuning-seeds", "1000", "1001", "--pool-seeds", "0", "--slice-seeds", "0",
        "--lr-grid", "1e-3", "3e-3", "--beta-grid", "0.5", "--slice-points", "1e-3", "0.5",
        "--workers", "2", "--no-progress",
    ]  # fmt: skip
    assert R.main(argv) == 0
    return root, {r: json.loads((root / "docs" / "results" / f"{r}.json").read_text()) for r in R.REGIMES}


def test_every_regime_gets_its_json_with_the_protocol_it_ran(tiny_reproduction):
    root, results = tiny_reproduction
    self_ = results["self"]
    assert self_["methods"] == ["nca", "infonca", "dpo", "dpo_random", "nca_pair"]
    assert self_["selected_from"] == "tuning" and self_["tuning_seeds"] == [1000, 1001]
    tuning = [r for r in self_["records"] if r["stage"] == "tuning"]
    assert len(tuning) == 2 * 2 * 5  # seeds x grid points x methods
    assert self_["selected"] == R.select(tuning, tuple(self_["methods"]))
    for regime in ("pool", "offpolicy"):
        other = results[regime]
        assert other["selected_from"] == "self" and other["methods"] == ["nca", "infonca", "dpo", "dpo_random"]
        assert other["selected"] == {m: self_["selected"][m] for m in other["methods"]}
        assert {(r["stage"], r["seed"]) for r in other["records"]} == {("sft", 0), ("test", 0)}
    for result in results.values():
        tests = [r for r in result["records"] if r["stage"] == "test"]
        assert len(tests) == len(result["methods"]) * len(result["test_seeds"])
        for r in tests:
            assert r["hparams"] == result["selected"][r["method"]] and r["split"] == "test"
            assert r["steps"] == P.PRESETS["tiny"].align_steps and len(r["reward_sampled_by_sampling_seed"]) == 2
            assert r["reward_sampled"] == pytest.approx(sum(r["reward_sampled_by_sampling_seed"]) / 2)
            trajectory = r["best_logp_trajectory"]
            assert trajectory[0] == [0, 0.0] and trajectory[-1][0] == r["steps"]
            assert r["best_logp_min"] == min(v for step, v in trajectory[1:])
            # the last probe is the final evaluation: same model, same prompts
            assert trajectory[-1][1] == pytest.approx(r["best_logp_change"], abs=1e-3)
            pairs = result["data"][str(r["seed"])]["n_pairs"]
            expected_rows = {
                "dpo": pairs["best_worst"],
                "dpo_random": pairs["best_random"],
                "nca_pair": pairs["best_random"],
            }
            assert r["n_train_rows"] == expected_rows.get(r["method"], result["data"][str(r["seed"])]["n_trainable"])
    # the slice: one point, one seed; the runs at a point equal to a test run's are that test record, not repeated
    slice_keys = [(r["method"], r["seed"]) for r in self_["records"] if r["stage"] == "slice"]
    test_at_point = [
        (r["method"], r["seed"])
        for r in self_["records"]
        if r["stage"] == "test"
        and r["seed"] == 0
        and [r["hparams"]["learning_rate"], r["hparams"]["beta"]] == [1e-3, 0.5]
    ]
    assert sorted(slice_keys + test_at_point) == sorted((m, 0) for m in ("nca", "infonca", "dpo", "dpo_random"))
    # offpolicy: the pool's data with its exact answers rewritten, and nothing else changed
    assert results["offpolicy"]["data"]["0"]["n_pairs"] == results["pool"]["data"]["0"]["n_pairs"]
    assert results["pool"]["data"]["0"]["rewritten"] == 0.0
    assert (root / "docs" / "results.md").is_file() and (root / "docs" / "results_pool.md").is_file()


def test_a_job_gives_the_same_numbers_in_the_worker_pool_as_on_its_own(tiny_reproduction):
    root, results = tiny_reproduction
    R._init_worker(str(root / "runs"), "tiny")
    for regime, stage, method in (("self", "test", "nca_pair"), ("offpolicy", "test", "dpo_random")):
        pooled = next(
            r for r in results[regime]["records"] if (r["stage"], r["method"], r["seed"]) == (stage, method, 0)
        )
        alone = R.run_job(R._job(regime, stage, method, 0, "test", pooled["hparams"]))
        alone.pop("data_stats", None)
        for key, value in alone.items():
            if key not in TIMING_KEYS:
                assert (
                    pooled[key] == pytest.approx(value, abs=1e-6) if isinstance(value, float) else pooled[key] == value
                ), key


ROOT = Path(__file__).resolve().parent.parent
COMMITTED = {regime: f"docs/results/{regime}.json" for regime in R.REGIMES}


def test_the_committed_pages_are_the_rendering_of_the_committed_json(tmp_path):
    """docs/results.md and docs/results_pool.md quote only numbers computed from docs/results/*.json."""
    report = load_script(ROOT / "scripts" / "results_report.py")
    results = {regime: json.loads((ROOT / path).read_text()) for regime, path in COMMITTED.items()}
    report.render_all(results, tmp_path, COMMITTED)
    for page in ("results.md", "results_pool.md"):
        assert (tmp_path / page).read_text() == (ROOT / "docs" / page).read_text(), page
    assert {p.name for p in (tmp_path / "img").iterdir()} == {p.name for p in (ROOT / "docs" / "img").iterdir()}


def test_the_demo_defaults_are_the_hyper_parameters_the_reproduction_selected():
    selected = json.loads((ROOT / COMMITTED["self"]).read_text())["selected"]
    for method, hparams in P.DEFAULT_HPARAMS["small"].items():
        assert {"learning_rate": hparams.learning_rate, "beta": hparams.beta, "alpha": hparams.alpha} == selected[
            method
        ]
