"""scripts/results_report.py: the results pages rendered from synthetic reproduction JSON with known per-seed values.

The oracle of every interval is the paired Student-t formula written out here, with t quantiles from printed tables.
"""

import copy
import json
import math
import random
import statistics
from pathlib import Path

import pytest
from conftest import load_script

from trl_nca.demo.pipeline import METHOD_LABELS

ROOT = Path(__file__).resolve().parents[1]
rr = load_script(ROOT / "scripts" / "results_report.py")

# t(0.975, dof) from printed tables (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2), more digits than the pages show.
T975 = {1: 12.706204736, 2: 4.302652730, 4: 2.776445105, 9: 2.262157163, 29: 2.045229642}

LABELS = METHOD_LABELS  # what the reproduction writes to every JSON's `labels`
SELF_METHODS = [
    "dpo",
    "dpo_all",
    "dpo_random",
    "nca_pair",
    "infonca_pair",
    "plackett_luce",
    "lipo_lambda",
    "infonca",
    "nca",
]
POOL_METHODS = ["nca", "infonca", "dpo", "dpo_all", "dpo_random"]
GRID = {"learning_rate": [1e-4, 1e-3, 3e-3], "beta": [0.1, 1.0], "alpha": 0.1}
SELECTED = {"learning_rate": 1e-3, "beta": 1.0, "alpha": 0.1}
REWARD = {"sft": 0.80, "dpo": 0.88, "dpo_all": 0.90, "dpo_random": 0.885, "nca_pair": 0.89, "infonca_pair": 0.885,
          "plackett_luce": 0.89, "lipo_lambda": 0.89, "infonca": 0.89}  # fmt: skip
LOGP = {"dpo": -0.2, "dpo_all": -0.3, "dpo_random": -0.25, "nca_pair": 0.0, "infonca_pair": -0.35,
        "plackett_luce": -0.1, "lipo_lambda": 0.05, "infonca": -0.4}  # fmt: skip
PRESET = {
    "name": "small", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "min_len": 3, "max_len": 7, "n_demos": 6000, "sft_epochs": 3, "sft_lr": 3e-3, "sft_batch": 64, "p_correct": 0.4,
    "n_train": 1024, "n_val": 128, "n_test": 256, "align_steps": 64, "align_batch": 16, "probe_every": 8,
    "eval_samples": 4, "pool_p_correct": [0.2, 0.4, 0.6, 0.8],
}  # fmt: skip
ROWS = {"dpo": 1000, "dpo_all": 2400, "dpo_random": 1000, "nca_pair": 1000, "infonca_pair": 1000}


def gauss(*key):
    """A deterministic standard normal draw per key."""
    return random.Random(repr(key)).gauss(0.0, 1.0)


def make_results(regime="self", nca_reward=0.02, nca_logp=0.1, noise=0.002, dip=0.1, best_is_greedy=0.9):
    """A results dict following the schema, with known per-seed values: NCA's sampled reward = DPO's + `nca_reward`
    (+ per-run noise of sd `noise`), NCA's final Δ log π(best) = `nca_logp` (+ noise), every method's trajectory dips
    `dip` below its final value mid-training."""
    pool = regime != "self"
    methods = POOL_METHODS if pool else SELF_METHODS
    test_seeds = list(range(5)) if pool else list(range(10))
    tuning_seeds = [] if pool else [1000, 1001]
    reward = {**REWARD, "nca": REWARD["dpo"] + nca_reward}
    logp = {**LOGP, "nca": nca_logp}
    records = []

    def record(stage, method, seed, split, hp, r, final, dip_):
        traj = (
            []
            if method == "sft"
            else [[0, 0.0], [8, 0.5 * final - dip_], [16, final - 2 * dip_], [24, final - dip_], [32, final]]
        )
        return {
            "stage": stage, "method": method, "seed": seed, "split": split, "hparams": dict(hp),
            "reward_sampled": r, "reward_sampled_by_sampling_seed": [r - 0.001, r + 0.001],
            "exact_sampled": r - 0.3, "reward_greedy": 0.98, "best_logp_change": final,
            "best_logp_min": None if method == "sft" else min(v for s, v in traj if s > 0),
            "best_logp_trajectory": traj, "rank_logp_change": [final, final - 0.5, final - 1.0, final - 1.5],
            "ideal_logp_change": final + 0.2, "ranking_accuracy": None if method == "sft" else 0.8,
            "kl": 0.0 if method == "sft" else 0.5 + 0.1 * gauss("kl", method, seed, stage),
            "n_train_rows": 0 if method == "sft" else ROWS.get(method, 1022),
            "batch": 48 if method == "dpo_all" else 16, "steps": 0 if method == "sft" else 64, "align_s": 1.0,
        }  # fmt: skip

    zero = {"learning_rate": 0.0, "beta": 0.0, "alpha": 0.0}
    for seed in test_seeds:
        shared = 0.01 * gauss("seed", seed)
        records.append(record("sft", "sft", seed, "test", zero, REWARD["sft"] + shared, 0.0, 0.0))
        for m in methods:
            r = reward[m] + shared + noise * gauss("r", m, seed)
            final = logp[m] + 0.05 * gauss("lp", m, seed)
            records.append(record("test", m, seed, "test", SELECTED, r, final, dip))
        if not pool:
            for m in ("nca", "infonca"):
                hp = {**SELECTED, "alpha": 0.0}
                r = reward[m] + shared + noise * gauss("ab", m, seed)
                records.append(record("ablation", m, seed, "test", hp, r, logp[m] - 0.1, dip))
    slice_methods = ["nca", "infonca", "dpo"] if not pool else ["nca", "infonca"]
    slice_points = [[1e-3, 1.0], [3e-3, 0.1]]
    for seed in (0, 1, 2):
        for m in slice_methods:
            hp = {"learning_rate": 3e-3, "beta": 0.1, "alpha": 0.1}
            final = {"nca": -0.1, "infonca": -0.8, "dpo": -1.0}[m] + 0.05 * gauss("slice", m, seed)
            records.append(record("slice", m, seed, "test", hp, 0.8, final, dip))
    for seed in tuning_seeds:
        records.append(record("sft", "sft", seed, "val", zero, 0.8, 0.0, 0.0))
        for m in methods:
            for i, lr in enumerate(GRID["learning_rate"]):
                for j, beta in enumerate(GRID["beta"]):
                    hp = {"learning_rate": lr, "beta": beta, "alpha": 0.1}
                    r = reward[m] - 0.01 * (abs(i - 1) + abs(j - 1)) + 0.001 * gauss("t", m, seed, i, j)
                    slope = 0.1 if m == "nca" else 1.0
                    final = 0.2 - slope * lr * 1000 / beta + 0.01 * gauss("tl", m, seed, i, j)
                    records.append(record("tuning", m, seed, "val", hp, r, final, dip))
    data = {}
    for seed in [*tuning_seeds, *test_seeds]:
        data[str(seed)] = {
            "n_prompts": 1024, "n_trainable": 1022,
            "n_pairs": {"best_worst": 1000, "best_all": 2400, "best_random": 1000},
            "reward_stats": {"mean": 0.8, "best": 0.95, "worst": 0.6, "all_tied": 0.02},
            "reward_by_model": {f"pool_{p}": {"mean": 0.6 + 0.3 * p} for p in (0.2, 0.8)} if pool else {},
            "rewritten": 0.3 if regime == "offpolicy" else 0.0,
            "sft_logp_best": -1.0 - 0.1 * gauss("lb", seed), "sft_logp_greedy": -0.8,
            "best_is_greedy": best_is_greedy, "timings": {"sft_s": 10.0, "sampling_s": 2.0},
        }  # fmt: skip
    return {
        "regime": regime, "size": "small", "preset": PRESET, "K": 4, "methods": methods,
        "labels": {m: LABELS[m] for m in ["sft", *methods]}, "grid": GRID, "tuning_seeds": tuning_seeds,
        "selected": {m: dict(SELECTED) for m in methods}, "selected_from": "self" if pool else "tuning",
        "test_seeds": test_seeds, "slice": {"seeds": [0, 1, 2], "points": slice_points, "methods": slice_methods},
        "sampling_seeds": [11, 12], "records": records, "data": data, "wall_s": 3000.0, "regime_wall_s": 1500.0,
        "machine": "x86_64, Linux", "workers": 2, "command": "python scripts/reproduce_results.py",
    }  # fmt: skip


def oracle(values, dof_table=T975):
    """mean, low, high of the 95% Student-t interval, written out."""
    n = len(values)
    mean = sum(values) / n
    s = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = dof_table[n - 1] * s / math.sqrt(n)
    return mean, mean - half, mean + half


def per_seed(results, method, key, stage="test"):
    return {r["seed"]: r[key] for r in results["records"] if r["stage"] == stage and r["method"] == method}


def expected_line(results, a, b, key, digits, stage="test", a_label=None):
    va, vb = per_seed(results, a, key, stage), per_seed(results, b, key)
    diffs = [va[s] - vb[s] for s in sorted(va)]
    mean, low, high = oracle(diffs)
    word = "higher" if low > 0 else "lower" if high < 0 else "not resolved"
    higher = sum(d > 0 for d in diffs)
    return (
        f"{a_label or LABELS[a]} − {LABELS[b]}: {mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}], "
        f"higher on {higher} of {len(diffs)} seeds: **{word}**"
    ), word


SOURCES = {r: f"docs/results/{r}.json" for r in ("self", "pool", "offpolicy")}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    docs = tmp_path_factory.mktemp("docs")
    results = {
        "self": make_results(),
        "pool": make_results("pool"),
        "offpolicy": make_results("offpolicy", best_is_greedy=0.1),
    }
    paths = rr.render_all(results, docs, SOURCES)
    return results, docs, paths


def test_t_quantile_matches_printed_tables():
    for dof, t in T975.items():
        assert rr.t_quantile(0.975, dof) == pytest.approx(t, abs=1e-6)
    assert rr.t_quantile(0.975, 9) == pytest.approx(2.262, abs=5e-4)
    assert rr.t_quantile(0.95, 4) == pytest.approx(2.131847, abs=1e-5)
    assert rr.t_quantile(0.025, 2) == pytest.approx(-4.302653, abs=1e-5)
    assert rr.t_cdf(0.0, 5) == pytest.approx(0.5)


def test_interval_and_verdict_words():
    values = [0.021, 0.018, 0.025, 0.019, 0.02]
    iv = rr.interval(values)
    mean, low, high = oracle(values)
    assert (iv.mean, iv.low, iv.high, iv.n, iv.n_higher) == (
        pytest.approx(mean),
        pytest.approx(low),
        pytest.approx(high),
        5,
        5,
    )
    assert rr.verdict(iv) == "higher"
    assert rr.verdict(rr.interval([-v for v in values])) == "lower"
    assert rr.verdict(rr.interval([0.03, -0.02, 0.01, -0.015])) == "not resolved"
    assert rr.verdict(rr.interval([0.5])) == "not resolved"  # one seed: no interval, no verdict
    assert rr.format_interval(rr.interval([0.5]), 2) == "+0.50 (1 seed, no interval)"
    assert rr.paired_interval({0: 1.0, 1: 2.0, 2: 4.0}, {0: 0.0, 1: 1.5, 2: 2.0, 7: 9.0}) == rr.interval(
        [1.0, 0.5, 2.0]
    )


def test_claim1_intervals_equal_the_paired_t_formula(rendered):
    results, docs, _ = rendered
    page = (docs / "results.md").read_text()
    res = results["self"]
    for a in ("nca", "infonca"):
        for b in ("dpo", "dpo_all", "dpo_random", "plackett_luce", "lipo_lambda"):
            assert expected_line(res, a, b, "reward_sampled", 3)[0] in page
        assert expected_line(res, a, f"{a}_pair", "reward_sampled", 3)[0] in page
        assert expected_line(res, f"{a}_pair", "dpo_random", "reward_sampled", 3)[0] in page
        for b in ("dpo", "dpo_all", "dpo_random"):
            line = expected_line(res, a, b, "reward_sampled", 3, "ablation", f"{LABELS[a]} (α = 0)")[0]
            assert line in page
    # NCA = DPO + 0.02 on every seed (noise 0.002): resolved as higher
    line, word = expected_line(res, "nca", "dpo", "reward_sampled", 3)
    assert word == "higher" and "higher on 10 of 10 seeds" in line


def claim1_text(**kwargs):
    return "\n".join(rr._claim1(rr._Regime(make_results(**kwargs), "x.json")))


def claim2_text(regime="self", **kwargs):
    return "\n".join(rr._claim2(rr._Regime(make_results(regime, **kwargs), "x.json"), "## c2"))


def test_claim1_words_follow_the_data():
    up, down, flat = (
        claim1_text(nca_reward=0.02),
        claim1_text(nca_reward=-0.02),
        claim1_text(nca_reward=0.0, noise=0.03),
    )
    assert "NCA − DPO (best vs worst): +0.0" in up and "seeds: **higher**" in up.split("NCA − DPO (best vs worst)")[1]
    assert "NCA − DPO (best vs worst): -0.0" in down
    assert "**lower**" in down.split("NCA − DPO (best vs worst)")[1].split("\n")[0]
    assert "**not resolved**" in flat.split("NCA − DPO (best vs worst)")[1].split("\n")[0]
    # NCA (0.90) vs dpo_all (0.90): not resolved; InfoNCA (0.89) vs dpo_all lower: partly, with the tally written out
    assert (
        "Verdict: **partly reproduced: NCA vs the DPO variants: 2 higher, 0 lower, 1 not resolved (of 3); "
        "InfoNCA vs the DPO variants: 2 higher, 1 lower, 0 not resolved (of 3)**" in up
    )
    assert "NCA vs the DPO variants: 0 higher, 3 lower" in down


def test_claim1_verdict_reproduced_and_not_reproduced():
    saved = dict(REWARD)
    try:
        REWARD.update(infonca=0.95)
        assert "Verdict: **reproduced" in claim1_text(nca_reward=0.1)
        REWARD.update(infonca=0.80)
        assert "Verdict: **not reproduced" in claim1_text(nca_reward=-0.1)
    finally:
        REWARD.clear()
        REWARD.update(saved)


def test_claim2_words_follow_the_data(monkeypatch):
    high = claim2_text(nca_logp=0.1, dip=0.0)
    # NCA − InfoNCA: +0.5 on every seed, highlighted
    assert "- final: **NCA − InfoNCA**: +0.5" in high
    assert "Verdict (final value): **reproduced**" in high
    # the others lower it, NCA lowers it more: only the first half of the claim holds
    low = claim2_text(nca_logp=-1.0, dip=0.0)
    assert "Verdict (final value): **partly reproduced**" in low and "NCA: lowers it. NCA is higher than none" in low
    assert "- final: **NCA − InfoNCA**: -0.5" in low
    assert "seeds: **lower**" in low.split("- final: **NCA − InfoNCA**")[1].split("\n")[0]
    # the minimum over the trajectory: the dip (2 × 0.3 nats below the final value) shows there only
    dipped = claim2_text(nca_logp=0.1, dip=0.3)
    assert "Verdict (final value): **reproduced**" in dipped
    assert "Verdict (minimum over the trajectory): **partly reproduced**" in dipped
    # nobody lowers it and NCA is the lowest: not reproduced
    monkeypatch.setattr(rr, "DPO_METHODS", rr.DPO_METHODS)
    monkeypatch.setitem(LOGP, "infonca", 0.3)
    for m in ("dpo", "dpo_all", "dpo_random"):
        monkeypatch.setitem(LOGP, m, 0.3)
    flat = claim2_text(nca_logp=0.0, dip=0.0)
    assert "Verdict (final value): **not reproduced**" in flat and "No DPO variant or InfoNCA is below 0" in flat


def test_claim2_minimum_column_equals_the_trajectory_minimum(rendered):
    results, docs, _ = rendered
    page = (docs / "results.md").read_text()
    res = results["self"]
    for m in ("nca", "infonca", "dpo"):
        finals = list(per_seed(res, m, "best_logp_change").values())
        minima = [min(v for s, v in traj if s > 0) for traj in per_seed(res, m, "best_logp_trajectory").values()]
        f, fl, fh = oracle(finals)
        mi, ml, mh = oracle(minima)
        row = f"| {LABELS[m]} | {f:+.2f} [{fl:+.2f}, {fh:+.2f}] | {sum(v < 0 for v in finals)} of 10 | {mi:+.2f} [{ml:+.2f}, {mh:+.2f}] |"
        assert row in page
        if m != "nca":
            line = expected_line(res, "nca", m, "best_logp_min", 2)[0]
            assert f"- minimum: {line.replace('NCA − InfoNCA:', '**NCA − InfoNCA**:')}" in page


def test_slice_uses_test_records_at_the_selected_point(rendered):
    results, docs, _ = rendered
    page = (docs / "results.md").read_text()
    res = results["self"]
    nca, info = per_seed(res, "nca", "best_logp_change"), per_seed(res, "infonca", "best_logp_change")
    diffs = [nca[s] - info[s] for s in (0, 1, 2)]  # slice seeds only, from the test stage
    mean, low, high = oracle(diffs)
    assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (3/3)" in page
    nca_s, info_s = (
        per_seed(res, "nca", "best_logp_change", "slice"),
        per_seed(res, "infonca", "best_logp_change", "slice"),
    )
    mean, low, high = oracle([nca_s[s] - info_s[s] for s in (0, 1, 2)])
    row = next(line for line in page.splitlines() if line.startswith("| 0.003 | 0.1 |") and "(3/3)" in line)
    assert f"{mean:+.2f} [{low:+.2f}, {high:+.2f}] (3/3)" in row
    assert "NCA − InfoNCA at identical settings, over the 2 slice points: final 2 higher, 0 lower" in page


def test_tuning_grid_and_selection(rendered):
    results, docs, _ = rendered
    page = (docs / "results.md").read_text()
    # NCA's slope is 10 times smaller: it is lowest of all methods nowhere except where every value is close
    assert "- NCA: lowest of all methods at 0 of 6 points" in page
    # everyone's minimum is at the largest lr and the smallest β
    assert "its minimum" in page and "at lr 0.003, β 0.1." in page
    assert "Selected on the edge of the grid: " in page and "(β = 1)" in page
    res = results["self"]
    vals = [r["reward_sampled"] for r in res["records"] if r["stage"] == "tuning" and r["method"] == "nca"
            and r["hparams"]["learning_rate"] == 1e-3 and r["hparams"]["beta"] == 1.0]  # fmt: skip
    assert f"**{statistics.fmean(vals):.3f}**" in page


def test_budget_table_epochs(rendered):
    _, docs, _ = rendered
    page = (docs / "results.md").read_text()
    assert f"| DPO (best vs each other) | 2400 (2400–2400) | 48 | 64 | {64 * 48 / 2400:.2f} (" in page
    assert f"| NCA | 1022 (1022–1022) | 16 | 64 | {64 * 16 / 1022:.2f} (" in page
    assert "the same number of optimizer steps (64)" in page
    assert "identical budget" not in page.lower() and "one epoch" not in page


def test_every_method_regime_and_figure_is_there(rendered):
    results, docs, paths = rendered
    page, pool = (docs / "results.md").read_text(), (docs / "results_pool.md").read_text()
    for m in ["sft", *SELF_METHODS]:
        assert f"| {LABELS[m]} |" in page
    for m in ["sft", *POOL_METHODS]:
        assert pool.count(f"| {LABELS[m]} |") >= 2  # one results table per regime
    assert "## Regime pool" in pool and "## Regime offpolicy" in pool
    for text in (page, pool):
        for image in (line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")):
            assert (docs / image).is_file(), image
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("self_final_metrics", "self_trajectories", "self_likelihood_vs_reward_kl", "self_equal_settings",
                 "pool_likelihood_vs_reward_kl", "offpolicy_likelihood_vs_reward_kl"):  # fmt: skip
        assert docs / "img" / f"{name}.png" in paths
    # header facts from the JSON
    assert "python scripts/reproduce_results.py" in page and "25.0 min of the whole command's 50.0 min" in page
    assert "test seeds 0–9 (10 seeds)" in page and "tuning seeds 1000, 1001" in page and "11, 12" in page
    assert (
        "python scripts/results_report.py docs/results/self.json docs/results/pool.json docs/results/offpolicy.json"
        in page
    )


def test_pool_page_data_stats(rendered):
    results, docs, _ = rendered
    pool = (docs / "results_pool.md").read_text()
    assert 'Δ log π(best) in "pool" mostly tracks the policy\'s own most likely answer' in pool
    assert "In the offpolicy regime the best response is the SFT model's own greedy answer on 10% of test" in pool
    assert 'offpolicy" mostly tracks' not in pool
    assert "selected in the self regime (`selected_from` = `self`)" in pool
    best = [results["pool"]["data"][str(s)]["sft_logp_best"] for s in range(5)]
    mean, _, high = oracle(best)
    assert f"| pool | {mean:.2f} ± {high - mean:.2f} | -0.80 ± 0.00 | 0.900 ± 0.000 | 0.000 ± 0.000 |" in pool
    assert "| offpolicy |" in pool and "0.300 ± 0.000 |" in pool
    assert "pool_0.2" in pool and "pool_0.8" in pool
    assert "Claim 1" not in pool


def write_jsons(tmp_path, results):
    paths = []
    for name, res in results.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(res))
        paths.append(str(path))
    return paths


def test_main_rerenders_byte_identically(tmp_path, capsys):
    paths = write_jsons(tmp_path, {"self": make_results(), "pool": make_results("pool")})
    docs = tmp_path / "docs"
    assert rr.main(["--docs-dir", str(docs), *paths]) == 0
    first = {p: p.read_bytes() for p in sorted(docs.rglob("*")) if p.is_file()}
    assert rr.main(["--docs-dir", str(docs), *reversed(paths)]) == 0
    second = {p: p.read_bytes() for p in sorted(docs.rglob("*")) if p.is_file()}
    assert first == second and docs / "results_pool.md" in first


def test_missing_key_is_one_line_naming_key_and_file(tmp_path, capsys):
    broken = make_results()
    del broken["records"][5]["kl"]
    paths = write_jsons(tmp_path, {"self": broken})
    assert rr.main(["--docs-dir", str(tmp_path / "docs"), *paths]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`kl`" in err and paths[0] in err and "records[5]" in err
    assert not (tmp_path / "docs" / "results.md").exists()

    pool = make_results("pool")
    del pool["data"]["3"]["best_is_greedy"]
    paths = write_jsons(tmp_path, {"self": make_results(), "pool": pool})
    assert rr.main(["--docs-dir", str(tmp_path / "docs"), *paths]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`best_is_greedy`" in err and "pool.json" in err

    top = copy.deepcopy(make_results())
    del top["selected_from"]
    paths = write_jsons(tmp_path, {"self": top})
    assert rr.main([*paths]) == 2
    assert "`selected_from`" in capsys.readouterr().err
    with pytest.raises(rr.ResultsError, match="`regime_wall_s`"):
        rr.render_all({"self": {k: v for k, v in make_results().items() if k != "regime_wall_s"}}, tmp_path, SOURCES)
