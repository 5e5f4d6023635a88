"""Render docs/results.md and docs/results_pool.md, and their figures, from the reproduction's JSON.

    python scripts/results_report.py [--docs-dir DIR] docs/results/self.json [docs/results/pool.json
        docs/results/offpolicy.json]

re-renders the pages (`DIR`, default `docs`) and their figures (`DIR/img/`) from the per-seed results that
`scripts/reproduce_results.py` writes (it calls :func:`render_all` after its runs). Every number on the pages is
computed here from the JSON; none is written by hand.

Statistics: every comparison of two methods is a paired per-seed difference (the same seed means the same SFT model
and the same reward data), reported as `mean [95% CI low, high]` with a Student-t interval (t quantile with n - 1
degrees of freedom) and "higher on k of n seeds". Each comparison gets a word from its interval: "higher" when the
interval lies above 0, "lower" when it lies below 0, "not resolved" otherwise; the verdict sentences are built from
these words.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "ResultsError",
    "Interval",
    "t_cdf",
    "t_quantile",
    "interval",
    "paired_interval",
    "verdict",
    "format_interval",
    "validate",
    "render_results_md",
    "render_pool_md",
    "render_all",
    "main",
]

REGIMES = ("self", "pool", "offpolicy")
DEFAULT_SOURCES = {regime: f"docs/results/{regime}.json" for regime in REGIMES}
CONFIDENCE = 0.95
# The paper's claim-1 baselines (DPO on pairs binarized from the same K responses), the listwise baselines (not in the
# paper), and the methods whose α is a hyper-parameter.
DPO_METHODS = ("dpo", "dpo_all", "dpo_random")
LISTWISE_METHODS = ("plackett_luce", "lipo_lambda")
ALPHA_METHODS = ("nca", "infonca", "nca_pair", "infonca_pair")
METHOD_COLORS = {
    "sft": "#737373",
    "dpo": "#c2a5cf",
    "dpo_all": "#762a83",
    "dpo_random": "#de77ae",
    "plackett_luce": "#e08214",
    "lipo_lambda": "#8c510a",
    "infonca_pair": "#92c5de",
    "nca_pair": "#a6dba0",
    "infonca": "#2166ac",
    "nca": "#1b7837",
}

TOP_KEYS = (
    "regime", "size", "preset", "K", "methods", "labels", "grid", "tuning_seeds", "selected", "selected_from",
    "test_seeds", "slice", "sampling_seeds", "records", "data", "wall_s", "regime_wall_s", "machine", "workers",
    "command",
)  # fmt: skip
PRESET_KEYS = (
    "hidden_size", "num_hidden_layers", "min_len", "max_len", "n_demos", "p_correct", "sft_epochs", "n_train",
    "n_val", "n_test", "align_steps", "align_batch", "probe_every", "eval_samples", "pool_p_correct",
)  # fmt: skip
GRID_KEYS = ("learning_rate", "beta", "alpha")
HPARAM_KEYS = ("learning_rate", "beta", "alpha")
SLICE_KEYS = ("seeds", "points", "methods")
RECORD_KEYS = (
    "stage", "method", "seed", "split", "hparams", "reward_sampled", "reward_sampled_by_sampling_seed",
    "exact_sampled", "reward_greedy", "best_logp_change", "best_logp_min", "best_logp_trajectory", "rank_logp_change",
    "ideal_logp_change", "ranking_accuracy", "kl", "n_train_rows", "batch", "steps", "align_s",
)  # fmt: skip
DATA_KEYS = (
    "n_prompts", "n_trainable", "n_pairs", "reward_stats", "reward_by_model", "rewritten", "sft_logp_best",
    "sft_logp_greedy", "best_is_greedy", "timings",
)  # fmt: skip
STAGES = ("tuning", "test", "ablation", "slice", "sft")


class ResultsError(ValueError):
    """A results JSON that cannot be rendered (a missing key, a method without test records); the message is one line
    naming the file and the key."""


# ---------------------------------------------------------------------------------------------------------- statistics


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz's method)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: int) -> float:
    """P(T <= t) for Student's t distribution with `dof` degrees of freedom."""
    tail = 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with `dof` degrees of freedom (bisection on :func:`t_cdf`), e.g.
    `t_quantile(0.975, 9)` = 2.262."""
    if not 0.0 < p < 1.0 or dof < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and dof >= 1, got p={p}, dof={dof}.")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    low, high = 0.0, 1.0
    while t_cdf(high, dof) < p:
        high *= 2.0
    while high - low > 1e-12 * max(1.0, high):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, dof) < p else (low, mid)
    return 0.5 * (low + high)


class Interval(NamedTuple):
    """Mean of n values with its Student-t confidence interval (`low`/`high` are None for a single value) and how many
    values are above (below) 0."""

    mean: float
    low: float | None
    high: float | None
    n: int
    n_higher: int
    n_lower: int


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and two-sided Student-t interval of `values`: mean ± t((1 + confidence) / 2, n - 1) · s / √n."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("interval of no values")
    mean = statistics.fmean(vals)
    higher, lower = sum(v > 0 for v in vals), sum(v < 0 for v in vals)
    if len(vals) < 2:
        return Interval(mean, None, None, len(vals), higher, lower)
    half = t_quantile((1.0 + confidence) / 2.0, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return Interval(mean, mean - half, mean + half, len(vals), higher, lower)


def paired_interval(a: dict[int, float], b: dict[int, float]) -> Interval | None:
    """The interval of the per-seed differences a - b over the seeds both have (None when they share none)."""
    seeds = sorted(set(a) & set(b))
    return interval([a[s] - b[s] for s in seeds]) if seeds else None


def verdict(iv: Interval | None) -> str:
    """The word of an interval: "higher" when it lies above 0, "lower" when below, "not resolved" otherwise (and
    without an interval)."""
    if iv is None or iv.low is None or iv.high is None:
        return "not resolved"
    if iv.low > 0:
        return "higher"
    if iv.high < 0:
        return "lower"
    return "not resolved"


def format_interval(iv: Interval | None, digits: int = 3) -> str:
    """`+0.027 [+0.018, +0.036]` (signed mean and 95% interval); `–` for None, no interval for a single value."""
    if iv is None:
        return "–"
    if iv.low is None or iv.high is None:
        return f"{iv.mean:+.{digits}f} (1 seed, no interval)"
    return f"{iv.mean:+.{digits}f} [{iv.low:+.{digits}f}, {iv.high:+.{digits}f}]"


def _mean_half(values: Sequence[float | None], digits: int = 3, signed: bool = False) -> str:
    """`mean ± half-width of the 95% interval` for a table cell; `–` without values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    iv = interval(vals)
    mean = f"{iv.mean:+.{digits}f}" if signed else f"{iv.mean:.{digits}f}"
    return mean if iv.high is None else f"{mean} ± {iv.high - iv.mean:.{digits}f}"


def _seeds_text(iv: Interval) -> str:
    return f"higher on {iv.n_higher} of {iv.n} seeds"


# ------------------------------------------------------------------------------------------------------------- checks


def _require(mapping: Any, keys: Sequence[str], source: str, where: str) -> None:
    if not isinstance(mapping, dict):
        raise ResultsError(f"{source}: {where} is not a JSON object.")
    for key in keys:
        if key not in mapping:
            raise ResultsError(f"{source}: missing key `{key}` in {where}; re-run scripts/reproduce_results.py.")


def validate(results: dict[str, Any], source: str) -> None:
    """Check that a regime's JSON has every key the pages read (see the schema in `scripts/reproduce_results.py`).

    Raises:
        ResultsError: one line naming `source` and the first missing key.
    """
    _require(results, TOP_KEYS, source, "the top level")
    _require(results["preset"], PRESET_KEYS, source, "`preset`")
    _require(results["grid"], GRID_KEYS, source, "`grid`")
    _require(results["slice"], SLICE_KEYS, source, "`slice`")
    for method in results["methods"]:
        if method not in results["labels"]:
            raise ResultsError(f"{source}: missing key `{method}` in `labels`.")
        _require(results["selected"], [method], source, "`selected`")
        _require(results["selected"][method], HPARAM_KEYS, source, f"`selected.{method}`")
    _require(results["labels"], ["sft"], source, "`labels`")
    for i, record in enumerate(results["records"]):
        _require(record, RECORD_KEYS, source, f"`records[{i}]`")
        _require(record["hparams"], HPARAM_KEYS, source, f"`records[{i}].hparams`")
        if record["stage"] not in STAGES:
            raise ResultsError(
                f"{source}: `records[{i}].stage` is {record['stage']!r}, not one of {', '.join(STAGES)}."
            )
    for seed in [*results["tuning_seeds"], *results["test_seeds"]]:
        _require(results["data"], [str(seed)], source, "`data`")
        # the SFT likelihoods of the best and greedy answers are measured on the test split: test seeds only
        keys = DATA_KEYS if seed in results["test_seeds"] else DATA_KEYS[: DATA_KEYS.index("sft_logp_best")]
        _require(results["data"][str(seed)], keys + ("timings",), source, f"`data.{seed}`")
    tests = {(r["method"], r["seed"]) for r in results["records"] if r["stage"] == "test"}
    sft = {r["seed"] for r in results["records"] if r["stage"] == "sft" and r["split"] == "test"}
    for seed in results["test_seeds"]:
        if seed not in sft:
            raise ResultsError(f"{source}: no `records` entry with stage `sft`, split `test` for test seed {seed}.")
        for method in results["methods"]:
            if (method, seed) not in tests:
                raise ResultsError(f"{source}: no `records` entry with stage `test` for `{method}` on seed {seed}.")


# ------------------------------------------------------------------------------------------------------------ records


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-15)


def _same_point(record: dict[str, Any], lr: float, beta: float) -> bool:
    return _close(record["hparams"]["learning_rate"], lr) and _close(record["hparams"]["beta"], beta)


class _Regime:
    """One regime's JSON with lookups of its records by stage, method and seed."""

    def __init__(self, results: dict[str, Any], source: str) -> None:
        self.r = results
        self.source = source
        self.name = results["regime"]
        self.methods = list(results["methods"])
        self.labels = results["labels"]
        self.records = results["records"]

    def label(self, method: str) -> str:
        return self.labels.get(method, method)

    def by_seed(self, stage: str, method: str, split: str | None = None) -> dict[int, dict[str, Any]]:
        """{seed: record} of one stage and method (for `tuning`/`slice` use :meth:`at_point`)."""
        return {
            r["seed"]: r
            for r in self.records
            if r["stage"] == stage and r["method"] == method and (split is None or r["split"] == split)
        }

    def test(self, method: str) -> dict[int, dict[str, Any]]:
        """The test-stage records of `method` ("sft": the SFT model on the test split), by seed."""
        if method == "sft":
            return {s: r for s, r in self.by_seed("sft", "sft", "test").items() if s in self.r["test_seeds"]}
        return self.by_seed("test", method)

    def values(self, method: str, key: str, stage: str = "test") -> dict[int, float]:
        """{seed: record[key]} of the method's test (or ablation) records, None values left out."""
        runs = self.test(method) if stage == "test" else self.by_seed(stage, method)
        return {s: r[key] for s, r in runs.items() if r[key] is not None}

    def reward_gained(self, method: str) -> dict[int, float]:
        """Sampled reward minus the SFT model's on the same seed and split."""
        sft = self.values("sft", "reward_sampled")
        return {s: v - sft[s] for s, v in self.values(method, "reward_sampled").items() if s in sft}

    def at_point(self, stages: Sequence[str], method: str, lr: float, beta: float, seeds: Sequence[int] | None = None):
        """{seed: record} of `method` at (lr, β) among `stages`."""
        out: dict[int, dict[str, Any]] = {}
        for r in self.records:
            if r["stage"] in stages and r["method"] == method and _same_point(r, lr, beta):
                if seeds is None or r["seed"] in seeds:
                    out.setdefault(r["seed"], r)
        return out

    def slice_runs(self, method: str, lr: float, beta: float) -> dict[int, dict[str, Any]]:
        """The equal-settings slice at (lr, β): stage "slice" records plus "test" records at that point (a slice run
        whose hyper-parameters equal the test stage's is not repeated), on the slice's seeds."""
        return self.at_point(("slice", "test"), method, lr, beta, self.r["slice"]["seeds"])

    def grid_points(self) -> list[tuple[float, float]]:
        grid = self.r["grid"]
        return [(lr, beta) for lr in grid["learning_rate"] for beta in grid["beta"]]

    def tuning_mean(self, method: str, lr: float, beta: float, key: str) -> float | None:
        """Mean over the tuning seeds of `key` at one grid point (None when not run)."""
        runs = self.at_point(("tuning",), method, lr, beta)
        vals = [r[key] for r in runs.values() if r[key] is not None]
        return statistics.fmean(vals) if vals else None


def _g(x: float) -> str:
    return f"{x:g}"


def _seed_list(seeds: Sequence[int]) -> str:
    """`0–9` for a run of consecutive seeds, else `0, 3, 5`."""
    seeds = sorted(seeds)
    if not seeds:
        return "none"
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]} ({len(seeds)} seeds)"
    return ", ".join(map(str, seeds)) + f" ({len(seeds)} seed{'s' if len(seeds) != 1 else ''})"


def _hp_text(reg: _Regime, method: str, hp: dict[str, float]) -> str:
    text = f"{_g(hp['learning_rate'])} / {_g(hp['beta'])}"
    return text + (f" / {_g(hp['alpha'])}" if method in ALPHA_METHODS else "")


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# ------------------------------------------------------------------------------------------------------------ figures


def _figure(nrows: int, ncols: int, width: float, height: float, sharey: bool = False) -> tuple[Any, list[Any]]:
    from trl_nca.plotting import _import_matplotlib

    figure_cls, canvas_cls = _import_matplotlib()
    fig = figure_cls(figsize=(width * ncols, height * nrows), layout="constrained")
    canvas_cls(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=sharey)
    return fig, [ax for row in axes for ax in row]


def _save(fig: Any, path: Path, title: str) -> Path:
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def _color(method: str, i: int) -> str:
    return METHOD_COLORS.get(method, f"C{i % 10}")


def plot_trajectories(reg: _Regime, path: Path) -> Path:
    """One panel per method: Δ log π(best held-out response) vs the SFT model over training steps, mean over the test
    seeds (line), each seed (thin lines)."""
    methods = reg.methods
    ncols = min(len(methods), 5)
    nrows = math.ceil(len(methods) / ncols)
    fig, axes = _figure(nrows, ncols, 3.0, 2.7, sharey=True)
    for i, (ax, method) in enumerate(zip(axes, methods)):
        runs = [r["best_logp_trajectory"] for _, r in sorted(reg.test(method).items()) if r["best_logp_trajectory"]]
        for run in runs:
            ax.plot([s for s, _ in run], [v for _, v in run], color=_color(method, i), lw=0.6, alpha=0.35)
        if runs:
            steps = [s for s, _ in runs[0]]
            same = [run for run in runs if [s for s, _ in run] == steps]
            mean = [statistics.fmean(col) for col in zip(*[[v for _, v in run] for run in same])]
            ax.plot(steps, mean, color=_color(method, i), lw=2.0, marker="o", ms=2.5)
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(textwrap.fill(reg.label(method), 26), fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
    for ax in axes[len(methods) :]:
        ax.set_visible(False)
    for row in range(nrows):
        axes[row * ncols].set_ylabel("Δ log π(best) vs SFT (nats)", fontsize=8)
    n = len(reg.r["test_seeds"])
    return _save(fig, path, f"{reg.name} regime: best held-out response during training (thick: mean of {n} seeds)")


def plot_final(reg: _Regime, path: Path) -> Path:
    """Bars (mean over test seeds) with one dot per seed: sampled reward, final Δ log π(best) and its minimum over the
    trajectory, per method (SFT included for the reward)."""
    panels = [
        ("reward_sampled", "held-out reward (sampled, T=1)", ["sft", *reg.methods]),
        ("best_logp_change", "final Δ log π(best) vs SFT (nats)", reg.methods),
        ("best_logp_min", "min over training of Δ log π(best) (nats)", reg.methods),
    ]
    fig, axes = _figure(1, 3, max(4.5, 0.62 * (len(reg.methods) + 1)), 3.8)
    for ax, (key, ylabel, methods) in zip(axes, panels):
        vals = [list(reg.values(m, key).values()) for m in methods]
        xs = list(range(len(methods)))
        ax.bar(xs, [statistics.fmean(v) if v else 0.0 for v in vals], color="#9ecae1", edgecolor="#3182bd")
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, color="#08519c", s=9, zorder=3)
        ax.set_xticks(xs, [textwrap.fill(reg.label(m), 12) for m in methods], fontsize=6.5, rotation=90)
        ax.set_ylabel(ylabel, fontsize=8)
        if key == "reward_sampled":
            low = min(min(v) for v in vals if v)
            ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(max(v) for v in vals if v) + 0.02))
        else:
            ax.axhline(0.0, color="grey", lw=0.8)
    n = len(reg.r["test_seeds"])
    return _save(fig, path, f"{reg.name} regime, test split, {n} seeds (bars: mean, dots: seeds)")


def plot_likelihood_vs_reward_kl(reg: _Regime, path: Path) -> Path:
    """Two panels, one point per (method, test seed): final Δ log π(best) against the sampled reward gained over the
    SFT model (same seed and split), and against the sampled KL(π‖μ) estimate."""
    fig, axes = _figure(1, 2, 4.8, 3.9)
    for i, method in enumerate(reg.methods):
        delta = reg.values(method, "best_logp_change")
        for ax, xs in zip(axes, (reg.reward_gained(method), reg.values(method, "kl"))):
            seeds = sorted(set(delta) & set(xs))
            ax.scatter([xs[s] for s in seeds], [delta[s] for s in seeds], s=14, color=_color(method, i),
                       label=reg.label(method), alpha=0.85)  # fmt: skip
    for ax, xlabel in zip(axes, ("reward gained over SFT (sampled)", "sampled KL(π‖μ) per response (nats)")):
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("final Δ log π(best) vs SFT (nats)")
    axes[1].legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return _save(fig, path, f"{reg.name} regime: one point per (method, test seed)")


def plot_equal_settings(reg: _Regime, path: Path) -> Path:
    """One panel per β: mean over the tuning seeds of Δ log π(best validation response) against the learning rate, one
    line per method (every method at the same hyper-parameters)."""
    grid = reg.r["grid"]
    fig, axes = _figure(1, len(grid["beta"]), max(3.4, 9.0 / len(grid["beta"])), 3.4, sharey=True)
    for ax, beta in zip(axes, grid["beta"]):
        for i, method in enumerate(reg.methods):
            points = [(lr, reg.tuning_mean(method, lr, beta, "best_logp_change")) for lr in grid["learning_rate"]]
            points = [(lr, v) for lr, v in points if v is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, color=_color(method, i), label=reg.label(method))
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set(title=f"β = {_g(beta)}", xlabel="learning rate")
    axes[0].set_ylabel("Δ log π(best) vs SFT (nats)")
    axes[0].legend(fontsize=6, loc="lower left")
    seeds = ", ".join(map(str, reg.r["tuning_seeds"]))
    return _save(fig, path, f"Equal settings: best validation response, mean over tuning seeds {seeds}")


# ----------------------------------------------------------------------------------------------------------- sections


def _header(reg: _Regime, title: str, rerender: str, intro: str) -> list[str]:
    r = reg.r
    return [
        f"# {title}",
        "",
        f"Generated by `scripts/results_report.py` from {intro}, the raw per-seed results written by the command "
        f"below (`{rerender}` re-renders this page from them); every number on this page is computed from that JSON. "
        "Task, model and protocol: [demo.md](demo.md).",
        "",
        "```",
        r["command"],
        "```",
        "",
    ]


def _run_facts(reg: _Regime) -> list[str]:
    r = reg.r
    tuning = (
        f"tuning seeds {_seed_list(r['tuning_seeds'])}"
        if r["selected_from"] == "tuning"
        else f"hyper-parameters selected in the {r['selected_from']} regime (no tuning runs here)"
    )
    return [
        f"- {reg.name} regime: wall time {_minutes(r['regime_wall_s'])} of the whole command's "
        f"{_minutes(r['wall_s'])} ({r['machine']}, {r['workers']} worker processes); test seeds "
        f"{_seed_list(r['test_seeds'])}; {tuning}; sampling seeds {', '.join(map(str, r['sampling_seeds']))} (the "
        "sampled reward is the mean over them).",
    ]


def _budget_table(reg: _Regime) -> list[str]:
    """Rows trained on, rows per step, steps and epochs per method (test stage, over the test seeds)."""
    lines = [
        "| method | rows trained on (mean, min–max over seeds) | rows per step | optimizer steps | epochs (mean, "
        "min–max) |",
        "|---|---|---|---|---|",
    ]
    epochs_by_method = {}
    for method in reg.methods:
        runs = list(reg.test(method).values())
        rows = [r["n_train_rows"] for r in runs]
        epochs = [r["steps"] * r["batch"] / r["n_train_rows"] for r in runs if r["n_train_rows"]]
        epochs_by_method[method] = statistics.fmean(epochs) if epochs else None
        batches = sorted({r["batch"] for r in runs})
        steps = sorted({r["steps"] for r in runs})
        lines.append(
            f"| {reg.label(method)} | {statistics.fmean(rows):.0f} ({min(rows)}–{max(rows)}) "
            f"| {', '.join(map(str, batches))} | {', '.join(map(str, steps))} "
            + (f"| {statistics.fmean(epochs):.2f} ({min(epochs):.2f}–{max(epochs):.2f}) |" if epochs else "| – |")
        )
    all_steps = sorted({r["steps"] for m in reg.methods for r in reg.test(m).values()})
    measured = {m: e for m, e in epochs_by_method.items() if e is not None}
    if not measured:
        return [*lines, ""]
    low, high = min(measured, key=measured.get), max(measured, key=measured.get)
    steps_text = (
        f"the same number of optimizer steps ({all_steps[0]})"
        if len(all_steps) == 1
        else f"optimizer steps {', '.join(map(str, all_steps))} (not the same for every method)"
    )
    return [
        *lines,
        "",
        f"Every method makes {steps_text}, each on the rows of {reg.r['preset']['align_batch']} prompts, but not the "
        "same number of passes over its data: epochs = steps × rows per step / rows trained on, from "
        f"{measured[low]:.2f} ({reg.label(low)}) to {measured[high]:.2f} ({reg.label(high)}). The pairwise methods "
        "train on pairs: DPO skips the prompts whose K rewards all tie (they carry no preference), and best-vs-each "
        "repeats the best response in each of its up to K − 1 pairs per prompt.",
        "",
    ]


def _results_table(reg: _Regime, methods: Sequence[str], stage: str = "test", suffix: str = "") -> list[str]:
    """Mean ± 95% CI half-width over the test seeds of every metric, one row per method."""
    lines = [
        "| method | lr / β / α | reward (sampled) | exact (sampled) | reward (greedy) | Δ log π(best) final | "
        "Δ log π(best) min | Δ log π(ideal) | ranking acc. | KL(π‖μ) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        runs = reg.test(method) if stage == "test" else reg.by_seed(stage, method)
        if not runs:
            continue
        rs = [runs[s] for s in sorted(runs)]
        hp = "–" if method == "sft" else _hp_text(reg, method, rs[0]["hparams"])

        def cell(key: str, digits: int = 3, signed: bool = False, rs=rs) -> str:
            return _mean_half([r[key] for r in rs], digits, signed)

        lines.append(
            f"| {reg.label(method)}{suffix if method != 'sft' else ''} | {hp} | {cell('reward_sampled')} "
            f"| {cell('exact_sampled')} | {cell('reward_greedy')} | {cell('best_logp_change', 2, True)} "
            f"| {cell('best_logp_min', 2, True)} | {cell('ideal_logp_change', 2, True)} | {cell('ranking_accuracy')} "
            f"| {cell('kl', 2)} |"
        )
    return lines


def _comparison(
    reg: _Regime, a: str, b: str, key: str, digits: int, a_stage: str = "test", a_label: str = ""
) -> tuple:
    """(line, interval) of the paired per-seed difference a − b of `key`."""
    iv = paired_interval(reg.values(a, key, a_stage), reg.values(b, key))
    if iv is None:
        return None, None
    name = a_label or reg.label(a)
    return f"{name} − {reg.label(b)}: {format_interval(iv, digits)}, {_seeds_text(iv)}: **{verdict(iv)}**", iv


def _tally(words: Sequence[str]) -> str:
    return (
        f"{words.count('higher')} higher, {words.count('lower')} lower, {words.count('not resolved')} not resolved "
        f"(of {len(words)})"
    )


def _claim1(reg: _Regime) -> list[str]:
    """Claim 1: NCA/InfoNCA minus each baseline (sampled reward), the data-vs-loss split and the α = 0 ablation."""
    have = set(reg.methods)
    kway = [m for m in ("nca", "infonca") if m in have]
    dpos = [m for m in DPO_METHODS if m in have]
    listwise = [m for m in LISTWISE_METHODS if m in have]
    n = len(reg.r["test_seeds"])
    lines = [
        "## Claim 1: using all K scored responses aligns better than DPO",
        "",
        "Paper (Table 2): InfoNCA and NCA, which use all K scored responses, align better than DPO on preference "
        "pairs binarized from the same data. Paired per-seed differences of the held-out sampled reward over "
        f"{n} test seeds (mean [95% CI]); the word is **higher** when the interval lies above 0, **lower** when "
        "below, **not resolved** otherwise.",
        "",
    ]
    words: dict[str, list[str]] = {m: [] for m in kway}
    for a in kway:
        for b in dpos:
            line, iv = _comparison(reg, a, b, "reward_sampled", 3)
            if line:
                lines.append(f"- {line}")
                words[a].append(verdict(iv))
    everything = [w for ws in words.values() for w in ws]
    if everything:
        if all(w == "higher" for w in everything):
            text = "reproduced: NCA and InfoNCA are each higher than every DPO variant (every interval above 0)"
        elif "higher" not in everything:
            text = "not reproduced: no interval of NCA or InfoNCA minus a DPO variant lies above 0"
        else:
            text = "partly reproduced: " + "; ".join(
                f"{reg.label(a)} vs the DPO variants: {_tally(words[a])}" for a in kway
            )
        lines += ["", f"Verdict: **{text}**.", ""]
    if listwise:
        lw_words = []
        lines.append(
            "Against the listwise baselines, which also train on all K responses but from their ranking "
            "(Plackett-Luce DPO, LiPO-λ: `trl_nca.ListwiseTrainer`; not in the paper, not in the verdict):"
        )
        lines.append("")
        for a in kway:
            for b in listwise:
                line, iv = _comparison(reg, a, b, "reward_sampled", 3)
                if line:
                    lines.append(f"- {line}")
                    lw_words.append(verdict(iv))
        lines += ["", f"NCA/InfoNCA vs the listwise baselines: {_tally(lw_words)}.", ""]
    lines += _data_vs_loss(reg)
    lines += _ablation(reg, kway, dpos)
    return lines


_EFFECT = {"higher": "raises the sampled reward", "lower": "lowers the sampled reward", "not resolved": "has no "
           "resolved effect on the sampled reward"}  # fmt: skip


def _data_vs_loss(reg: _Regime) -> list[str]:
    """The data-vs-loss split: X − X_pair ("uses all K responses") and X_pair − DPO best-vs-random ("uses the X loss
    on the same pairs")."""
    have = set(reg.methods)
    lines, sentences = [], []
    for a in ("nca", "infonca"):
        pair = f"{a}_pair"
        if not {a, pair, "dpo_random"} <= have:
            continue
        data_line, data_iv = _comparison(reg, a, pair, "reward_sampled", 3)
        loss_line, loss_iv = _comparison(reg, pair, "dpo_random", "reward_sampled", 3)
        lines += [
            f"- uses all K responses: {data_line}",
            f"- uses the {reg.label(a)} loss on the same pairs: {loss_line}",
        ]
        sentences.append(
            f"for {reg.label(a)}, training on all K responses instead of {reg.label('dpo_random')}'s pairs "
            f"{_EFFECT[verdict(data_iv)]}, and its loss on exactly those pairs instead of DPO's "
            f"{_EFFECT[verdict(loss_iv)]}"
        )
    if not lines:
        return []
    return [
        "Data or loss? The same comparison split in two: the method on all K responses minus the same loss on "
        f"{reg.label('dpo_random')}'s pairs (K = 2, rewards = the pair's rewards), and that minus DPO on those pairs:",
        "",
        *lines,
        "",
        "So " + "; ".join(sentences) + ".",
        "",
    ]


def _ablation(reg: _Regime, kway: Sequence[str], dpos: Sequence[str]) -> list[str]:
    ablated = [m for m in kway if reg.by_seed("ablation", m)]
    if not ablated:
        return []
    lines = [
        "With hard labels (α = 0: all target weight on the best response, which is what the authors' released "
        "`temperature_alpha: 1e-4` amounts to), at the learning rate and β selected for α = "
        + f"{_g(reg.r['grid']['alpha'])}:",
        "",
    ]
    for a in ablated:
        for b in dpos:
            line, _ = _comparison(reg, a, b, "reward_sampled", 3, "ablation", f"{reg.label(a)} (α = 0)")
            if line:
                lines.append(f"- {line}")
    return [*lines, ""]


def _one_sample_word(iv: Interval | None) -> str:
    return {"higher": "raises it", "lower": "lowers it", "not resolved": "no resolved change"}[verdict(iv)]


def _claim2(reg: _Regime, heading: str) -> list[str]:
    """Claim 2 in one regime: final and minimum Δ log π(best) per method, NCA − each other method, NCA − InfoNCA, the
    verdicts, and the equal-settings checks."""
    n = len(reg.r["test_seeds"])
    lines = [
        heading,
        "",
        "Paper (Figure 2 and abstract): DPO and InfoNCA lower the likelihood of the preferred responses while NCA "
        "keeps it from decreasing. Δ log π(best) = change of the summed log-likelihood of each held-out prompt's best "
        f"response vs the SFT model (nats), at the selected hyper-parameters, over {n} test seeds (mean [95% CI], "
        "'below 0 on k of n seeds'); *final* = after training, *minimum* = the lowest value over the training "
        f"trajectory (probes every {reg.r['preset']['probe_every']} steps, step 0 excluded).",
        "",
        "| method | final Δ log π(best) | below 0 | minimum over the trajectory | below 0 |",
        "|---|---|---|---|---|",
    ]
    per_method: dict[str, dict[str, Interval]] = {}
    for method in reg.methods:
        final = interval(list(reg.values(method, "best_logp_change").values()))
        low = reg.values(method, "best_logp_min")
        minimum = interval(list(low.values())) if low else None
        per_method[method] = {"final": final, "min": minimum}
        lines.append(
            f"| {reg.label(method)} | {format_interval(final, 2)} | {final.n_lower} of {final.n} "
            f"| {format_interval(minimum, 2)} | " + (f"{minimum.n_lower} of {minimum.n} |" if minimum else "– |")
        )
    lines.append("")
    if "nca" not in reg.methods:
        return lines
    others = [m for m in ("infonca", *reg.methods) if m in reg.methods and m != "nca"]
    others = list(dict.fromkeys(others))  # NCA − InfoNCA first
    paired: dict[str, dict[str, Interval | None]] = {}
    lines += ["Paired per-seed differences, NCA − each other method (nats):", ""]
    for key, name in (("best_logp_change", "final"), ("best_logp_min", "minimum")):
        for other in others:
            line, iv = _comparison(reg, "nca", other, key, 2)
            paired.setdefault(other, {})[name] = iv
            if line:
                line = line.replace("NCA − InfoNCA:", "**NCA − InfoNCA**:", 1) if other == "infonca" else line
                lines.append(f"- {name}: {line}")
    lines.append("")
    claimed = [m for m in ("infonca", *DPO_METHODS) if m in reg.methods]
    for name in ("final", "min"):
        key = "final" if name == "final" else "minimum"
        others_words = {m: verdict(per_method[m][name]) for m in claimed}
        nca_word = verdict(per_method["nca"][name])
        above = {m: verdict(paired[m][key]) for m in claimed}
        lowered = [reg.label(m) for m in claimed if others_words[m] == "lower"]
        not_lowered = [reg.label(m) for m in claimed if others_words[m] != "lower"]
        nca_above = [reg.label(m) for m in claimed if above[m] == "higher"]
        all_lower = bool(lowered) and not not_lowered
        above_all = len(nca_above) == len(claimed)
        if all_lower and above_all and nca_word != "lower":
            word = "reproduced"
        elif all_lower or above_all:
            word = "partly reproduced"
        else:
            word = "not reproduced"
        what = "final value" if name == "final" else "minimum over the trajectory"
        lines.append(
            f"Verdict ({what}): **{word}**. "
            + (f"Below 0 (interval): {', '.join(lowered)}. " if lowered else "No DPO variant or InfoNCA is below 0. ")
            + (f"Not below 0: {', '.join(not_lowered)}. " if not_lowered and lowered else "")
            + f"NCA: {_one_sample_word(per_method['nca'][name])}. NCA is higher than "
            + (", ".join(nca_above) if nca_above else "none of them")
            + f" ({len(nca_above)} of {len(claimed)})."
        )
        lines.append("")
    lines += _slice_section(reg)
    if reg.r["tuning_seeds"]:
        lines += _grid_section(reg)
    return lines


def _slice_section(reg: _Regime) -> list[str]:
    """(a) the equal-settings slice with intervals: final Δ per method and point, and NCA − InfoNCA per point."""
    sl = reg.r["slice"]
    methods = [m for m in sl["methods"] if m in reg.labels]
    if not sl["points"] or not methods:
        return []
    both = "nca" in methods and "infonca" in methods
    lines = [
        f"### Equal settings (a): the slice, {len(sl['points'])} points × seeds {_seed_list(sl['seeds'])}",
        "",
        "Every method of the slice trained at the same learning rate and β on the same seeds (test split); final "
        "Δ log π(best) in nats, mean [95% CI]" + ("; the last columns are paired NCA − InfoNCA." if both else "."),
        "",
        "| lr | β | "
        + " | ".join(reg.label(m) for m in methods)
        + (" | NCA − InfoNCA (final) | NCA − InfoNCA (minimum) |" if both else " |"),
        "|---|---|" + "---|" * (len(methods) + (2 if both else 0)),
    ]
    diff_words: dict[str, list[str]] = {"final": [], "minimum": []}
    below: dict[str, list[str]] = {m: [] for m in methods}
    for lr, beta in sl["points"]:
        runs = {m: reg.slice_runs(m, lr, beta) for m in methods}
        cells = []
        for m in methods:
            vals = [r["best_logp_change"] for r in runs[m].values()]
            iv = interval(vals) if vals else None
            cells.append(format_interval(iv, 2))
            if verdict(iv) == "lower":
                below[m].append(f"lr {_g(lr)}, β {_g(beta)}")
        if both:
            for key, name in (("best_logp_change", "final"), ("best_logp_min", "minimum")):
                a = {s: r[key] for s, r in runs["nca"].items() if r[key] is not None}
                b = {s: r[key] for s, r in runs["infonca"].items() if r[key] is not None}
                iv = paired_interval(a, b)
                diff_words[name].append(verdict(iv))
                cells.append(f"{format_interval(iv, 2)} ({iv.n_higher}/{iv.n})" if iv else "–")
        lines.append(f"| {_g(lr)} | {_g(beta)} | " + " | ".join(cells) + " |")
    lines.append("")
    if both:
        lines.append(
            f"NCA − InfoNCA at identical settings, over the {len(sl['points'])} slice points: final "
            f"{_tally(diff_words['final'])}; "
            f"minimum over the trajectory {_tally(diff_words['minimum'])}."
        )
        lines.append("")
    lines.append(
        "Final Δ log π(best) below 0 (interval) at a slice point: "
        + "; ".join(f"{reg.label(m)}: " + (", ".join(below[m]) if below[m] else "none") for m in methods)
        + "."
    )
    return [*lines, ""]


def _where(points: Sequence[tuple[float, float]]) -> str:
    """`lr 0.001–0.003, β 0.1–0.5` (the range of learning rates and of β of the points)."""
    lrs, betas = sorted({lr for lr, _ in points}), sorted({b for _, b in points})

    def span(xs: list[float]) -> str:
        return _g(xs[0]) if len(xs) == 1 else f"{_g(xs[0])}–{_g(xs[-1])}"

    return f"lr {span(lrs)}, β {span(betas)}"


def _grid_section(reg: _Regime) -> list[str]:
    """(b) the tuning grid: mean Δ log π(best) per grid point over the tuning seeds; where each method is lowest."""
    points = reg.grid_points()
    methods = reg.methods
    means = {(m, p): reg.tuning_mean(m, *p, "best_logp_change") for m in methods for p in points}
    if all(v is None for v in means.values()):
        return []
    seeds = reg.r["tuning_seeds"]
    lines = [
        f"### Equal settings (b): the whole tuning grid, mean over tuning seeds {', '.join(map(str, seeds))}",
        "",
        f"Δ log π(best validation response) vs SFT in nats, every method at every grid point, mean over {len(seeds)} "
        "tuning seeds (validation split; no interval: the slice above has them):",
        "",
        "| lr | β | " + " | ".join(reg.label(m) for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for p in points:
        cells = ["–" if means[(m, p)] is None else f"{means[(m, p)]:+.2f}" for m in methods]
        lines.append(f"| {_g(p[0])} | {_g(p[1])} | " + " | ".join(cells) + " |")
    lines += ["", "Where each method is lowest:", ""]
    for m in methods:
        measured = [p for p in points if means[(m, p)] is not None]
        if not measured:
            continue
        lowest_of_all = [
            p for p in measured if all(means[(o, p)] is None or means[(m, p)] <= means[(o, p)] for o in methods)
        ]
        negative = [p for p in measured if means[(m, p)] < 0]
        worst = min(measured, key=lambda p: means[(m, p)])
        lines.append(
            f"- {reg.label(m)}: lowest of all methods at {len(lowest_of_all)} of {len(measured)} points"
            + (f" ({_where(lowest_of_all)})" if lowest_of_all else "")
            + f"; below 0 at {len(negative)}"
            + (f" ({_where(negative)})" if negative else "")
            + f"; its minimum {means[(m, worst)]:+.2f} at lr {_g(worst[0])}, β {_g(worst[1])}."
        )
    return [*lines, "", f"![likelihood at equal settings](img/{reg.name}_equal_settings.png)", ""]


def _tuning_section(reg: _Regime) -> list[str]:
    """Mean validation reward per grid point over the tuning seeds (selected in bold), and the grid's edges."""
    seeds = reg.r["tuning_seeds"]
    sft = [r["reward_sampled"] for s, r in reg.by_seed("sft", "sft", "val").items() if s in seeds]
    lines = [
        f"## Tuning (validation split of tuning seeds {', '.join(map(str, seeds))})",
        "",
        f"Mean sampled validation reward over the {len(seeds)} tuning seeds per grid point"
        + (f" (SFT model: {statistics.fmean(sft):.3f})" if sft else "")
        + "; the selected point (highest mean) in bold. α = "
        + f"{_g(reg.r['grid']['alpha'])} (fixed, not tuned) for the NCA/InfoNCA methods.",
        "",
        "| lr | β | " + " | ".join(reg.label(m) for m in reg.methods) + " |",
        "|---|---|" + "---|" * len(reg.methods),
    ]
    for lr, beta in reg.grid_points():
        cells = []
        for m in reg.methods:
            value = reg.tuning_mean(m, lr, beta, "reward_sampled")
            sel = reg.r["selected"][m]
            text = "–" if value is None else f"{value:.3f}"
            chosen = _close(sel["learning_rate"], lr) and _close(sel["beta"], beta)
            cells.append(f"**{text}**" if chosen else text)
        lines.append(f"| {_g(lr)} | {_g(beta)} | " + " | ".join(cells) + " |")
    edges = []
    for m in reg.methods:
        for key in ("learning_rate", "beta"):
            axis = reg.r["grid"][key]
            value = reg.r["selected"][m][key]
            if len(axis) > 1 and (_close(value, min(axis)) or _close(value, max(axis))):
                edges.append(f"{reg.label(m)} ({'lr' if key == 'learning_rate' else 'β'} = {_g(value)})")
    lines.append("")
    lines.append(
        "Selected on the edge of the grid: " + ", ".join(edges) + ". A wider grid might move these methods."
        if edges
        else "Every selected point is inside the grid in both learning rate and β."
    )
    return [*lines, ""]


def _rank_table(reg: _Regime) -> list[str]:
    k = reg.r["K"]
    lines = [
        "Change of the held-out log-likelihood by reward rank of the responses (nats, mean over the test seeds; "
        "rank 0 = best):",
        "",
        "| method | " + " | ".join(f"rank {i}" for i in range(k)) + " |",
        "|---|" + "---|" * k,
    ]
    for m in reg.methods:
        cols = list(zip(*[r["rank_logp_change"] for r in reg.test(m).values()]))
        lines.append(f"| {reg.label(m)} | " + " | ".join(f"{statistics.fmean(c):+.2f}" for c in cols) + " |")
    return [*lines, ""]


def _setup(reg: _Regime) -> list[str]:
    p, r = reg.r["preset"], reg.r
    grid = r["grid"]
    selection = (
        "selected by the mean sampled validation reward over the tuning seeds "
        f"({', '.join(map(str, r['tuning_seeds']))}; "
        f"{p['n_val']} validation prompts each); selection never looks at the likelihood"
        if r["selected_from"] == "tuning"
        else f"the hyper-parameters selected in the {r['selected_from']} regime, not re-tuned here"
    )
    data = [r["data"][str(s)] for s in r["test_seeds"]]
    dropped = sorted({d["n_prompts"] - d["n_trainable"] for d in data})
    return [
        "## Setup",
        "",
        f"- Task: sort {p['min_len']}-{p['max_len']} digits; reward = LCS with the sorted list / length of the longer "
        "(graded, 1.0 only for the exact answer).",
        f"- Model: Mistral architecture built in code (hidden {p['hidden_size']}, {p['num_hidden_layers']} layers), "
        f"SFT with `trl.SFTTrainer` on {p['n_demos']} imperfect demonstrations (correct with probability "
        f"{_g(p['p_correct'])}), {p['sft_epochs']} epochs. One SFT model per seed, shared by every method.",
        f"- Reward data: K={r['K']} responses for each of {p['n_train']} training prompts, "
        + _writers(reg)
        + ", scored by the reward; the same rows for every method. Prompts with an empty response are dropped for "
        f"every method ({', '.join(map(str, dropped))} per seed). DPO (best vs worst) trains on the best and worst "
        "response of each prompt, DPO (best vs each other) on the best against each strictly worse one, DPO (best vs "
        "random) on the best against a uniformly drawn strictly worse one (the paper's UltraFeedback binarisation); "
        "the *_pair methods train NCA/InfoNCA on exactly those best-vs-random pairs; prompts whose K rewards all tie "
        "carry no preference and give no pair.",
        f"- Budget: the same number of optimizer steps ({p['align_steps']}) for every method, each on the data of "
        f"{p['align_batch']} prompts (DPO best-vs-each-other: {(r['K'] - 1) * p['align_batch']} pairs per step), "
        "AdamW, cosine schedule; reference model = the SFT model. Rows and epochs per method below.",
        f"- Hyper-parameters: grid learning rate ∈ {{{', '.join(map(_g, grid['learning_rate']))}}} × β ∈ "
        f"{{{', '.join(map(_g, grid['beta']))}}}, the same for every method; α = {_g(grid['alpha'])} (fixed) for the "
        f"NCA/InfoNCA methods; {selection}.",
        f"- Evaluation on {p['n_test']} test prompts per seed: reward of {p['eval_samples']} samples per prompt at "
        f"temperature 1, mean over the sampling seeds {', '.join(map(str, r['sampling_seeds']))}, and of greedy "
        "decoding; exact = fraction of samples that are the sorted list; Δ log π(best) = change of the summed "
        "log-likelihood of each test prompt's best response vs the SFT model; Δ log π(ideal) = the same for the "
        "sorted list; ranking accuracy = fraction of test prompts (with distinct rewards) where the implicit reward "
        "log π/μ is highest on a best-rewarded response; KL(π‖μ) = mean over the evaluation samples y ~ π of "
        "log π(y|x) − log μ(y|x) (nats per response).",
        *_run_facts(reg),
        "",
        *_budget_table(reg),
    ]


def _writers(reg: _Regime) -> str:
    p = reg.r["preset"]
    if reg.name == "self":
        return "sampled from the SFT model (temperature 1)"
    pool = ", ".join(_g(x) for x in p["pool_p_correct"])
    text = (
        f"one from each of {len(p['pool_p_correct'])} other SFT models (trained like the policy on demonstrations "
        f"correct with probability {pool}; the policy is not in the pool)"
    )
    if reg.name == "offpolicy":
        text += (
            ", every response with reward 1.0 rewritten one digit per line (the reward accepts it, the policy, which "
            "only saw space-separated answers, finds it unlikely; the held-out responses get the same rewrite)"
        )
    return text


# -------------------------------------------------------------------------------------------------------------- pages


def _rerender_command(sources: dict[str, str], present: Sequence[str]) -> str:
    return "python scripts/results_report.py " + " ".join(sources[r] for r in REGIMES if r in present)


def render_results_md(
    reg: _Regime, rerender: str, img: Path, others: dict[str, _Regime]
) -> tuple[list[str], list[Path]]:
    """The self regime's page (claims 1 and 2) and its figures in `img`."""
    figures = [
        plot_final(reg, img / "self_final_metrics.png"),
        plot_trajectories(reg, img / "self_trajectories.png"),
        plot_likelihood_vs_reward_kl(reg, img / "self_likelihood_vs_reward_kl.png"),
    ]
    if reg.r["tuning_seeds"]:
        figures.append(plot_equal_settings(reg, img / f"{reg.name}_equal_settings.png"))
    ablated = [m for m in ("infonca", "nca") if reg.by_seed("ablation", m)]
    n = len(reg.r["test_seeds"])
    lines = [
        *_header(
            reg, "Results: NCA and InfoNCA vs DPO and listwise baselines on the demo task", rerender, f"`{reg.source}`"
        ),  # fmt: skip
        *_setup(reg),
        f"## Test results (mean ± 95% CI half-width over {n} test seeds)",
        "",
        *_results_table(reg, ["sft", *reg.methods]),
        "",
        "![final metrics](img/self_final_metrics.png)",
        "",
        *_rank_table(reg),
        *(
            [
                "Hard labels (α = 0) at the learning rate and β selected for α = "
                f"{_g(reg.r['grid']['alpha'])} (stage `ablation`):",
                "",
                *_results_table(reg, ablated, "ablation", " (α = 0)"),
                "",
            ]
            if ablated
            else []
        ),
        *_claim1(reg),
        *_claim2(reg, "## Claim 2: the likelihood of the preferred response"),
        "Δ log π(best) during training, per method (the minimum above is the lowest point of each seed's line):",
        "",
        "![likelihood trajectories](img/self_trajectories.png)",
        "",
        "Is a lower likelihood the price of a higher reward, or of moving further from the SFT model? Δ log π(best) "
        "against the sampled reward gained over the SFT model (same seed and split) and against the sampled "
        "KL(π‖μ), one point per method and test seed:",
        "",
        "![likelihood vs reward and KL](img/self_likelihood_vs_reward_kl.png)",
        "",
        *_others_pointer(others),
        *(_tuning_section(reg) if reg.r["tuning_seeds"] else []),
        "## Caveats",
        "",
        "- The responses are the SFT model's own samples (on-policy), unlike UltraFeedback's responses from other "
        "models: the best of K samples is often already the SFT model's most likely answer, so its likelihood has "
        "little room to rise (log π ≤ 0) and a fall is easier to see than a rise. The ideal answer's column shows the "
        "likelihood of the optimum itself; [results_pool.md](results_pool.md) repeats claim 2 with responses written "
        "by other models.",
        "- Greedy decoding of the SFT model is already close to optimal on this task, so the greedy column can only "
        "show damage; the sampled reward measures how much probability mass alignment moves onto good answers.",
        "- Hyper-parameters are selected per method on the tuning seeds; the claim-1 intervals are over test seeds "
        "at those selected settings and do not include the selection's own uncertainty.",
        "- A ~10⁵-parameter model, an exact reward and short answers: this tests the mechanics of the losses, not the "
        "paper's results on 7B chat models (MT-bench, AlpacaEval).",
        "",
    ]
    return lines, figures


def _others_pointer(others: dict[str, _Regime]) -> list[str]:
    if not others:
        return []
    lines = [
        "## Claim 2 with responses written by other models",
        "",
        "[results_pool.md](results_pool.md) repeats claim 2 with every response written by other models (pool) and "
        "with those responses' correct answers rewritten in a form the policy finds unlikely (offpolicy). NCA − "
        "InfoNCA there:",
        "",
    ]
    for name, reg in others.items():
        if {"nca", "infonca"} <= set(reg.methods):
            final = _comparison(reg, "nca", "infonca", "best_logp_change", 2)[0]
            minimum = _comparison(reg, "nca", "infonca", "best_logp_min", 2)[0]
            lines.append(f"- {name}: final {final}; minimum {minimum}")
    return [*lines, ""]


def _data_stats_table(regs: dict[str, _Regime]) -> list[str]:
    lines = [
        "| regime | SFT log π(best response) | SFT log π(greedy answer) | best response is the greedy answer | "
        "training responses rewritten |",
        "|---|---|---|---|---|",
    ]
    for name, reg in regs.items():
        data = [reg.r["data"][str(s)] for s in reg.r["test_seeds"]]

        def cell(key: str, digits: int = 2, data=data) -> str:
            return _mean_half([d[key] for d in data], digits)

        lines.append(
            f"| {name} | {cell('sft_logp_best')} | {cell('sft_logp_greedy')} | {cell('best_is_greedy', 3)} "
            f"| {cell('rewritten', 3)} |"
        )
    return [*lines, ""]


def _writers_table(regs: dict[str, _Regime]) -> list[str]:
    writers = sorted(
        {w for reg in regs.values() for s in reg.r["test_seeds"] for w in reg.r["data"][str(s)]["reward_by_model"]}
    )
    if not writers:
        return []
    lines = ["| regime | " + " | ".join(writers) + " |", "|---|" + "---|" * len(writers)]
    for name, reg in regs.items():
        data = [reg.r["data"][str(s)]["reward_by_model"] for s in reg.r["test_seeds"]]
        cells = [_mean_half([d[w]["mean"] for d in data if w in d], 3) for w in writers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _greedy_sentence(reg: _Regime) -> str:
    data = [reg.r["data"][str(s)] for s in reg.r["test_seeds"]]
    share = statistics.fmean(d["best_is_greedy"] for d in data)
    best = statistics.fmean(d["sft_logp_best"] for d in data)
    greedy = statistics.fmean(d["sft_logp_greedy"] for d in data)
    facts = (
        f"In the {reg.name} regime the best response is the SFT model's own greedy answer on {share:.0%} of test "
        f"prompts (SFT log π of the best response {best:+.2f} nats, of the greedy answer {greedy:+.2f})"
    )
    if share >= 0.5:
        return (
            facts + f': Δ log π(best) in "{reg.name}" mostly tracks the policy\'s own most likely answer, not an '
            "unlikely response written by another model as in the paper's Figure 2."
        )
    return facts + ": the best response there is mostly not the policy's own most likely answer."


def render_pool_md(
    regs: dict[str, _Regime], self_reg: _Regime, rerender: str, img: Path
) -> tuple[list[str], list[Path]]:
    """The pool and offpolicy regimes' page (claim 2) and its figures in `img`."""
    figures: list[Path] = []
    first = next(iter(regs.values()))
    sources = " and ".join(f"`{reg.source}`" for reg in regs.values())
    lines = [
        *_header(first, "Results, claim 2 with responses written by other models", rerender, sources),
        "The paper's Figure 2 tracks the likelihood of responses written by other models, not the policy's own "
        "samples. This page repeats the claim-2 check of [results.md](results.md) in two regimes:",
        "",
    ]
    for name, reg in regs.items():
        lines.append(f"- **{name}**: K={reg.r['K']} responses per training prompt, {_writers(reg)}.")
    lines.append("")
    for reg in regs.values():
        if reg.r["selected_from"] == "self":
            lines.append(
                f"The {reg.name} regime's hyper-parameters are those selected in the self regime (`selected_from` = "
                "`self`), not tuned on its own data."
            )
        else:
            lines.append(
                f"The {reg.name} regime's hyper-parameters are selected on its own tuning seeds "
                f"({', '.join(map(str, reg.r['tuning_seeds']))})."
            )
    lines += ["", "## Data", "", "Mean over the test seeds ± 95% CI half-width (nats for log π):", ""]
    lines += _data_stats_table({"self": self_reg, **regs})
    for reg in regs.values():
        lines += [_greedy_sentence(reg), ""]
    writers = _writers_table(regs)
    if writers:
        lines += ["Mean reward of each writer's training responses (mean over the test seeds):", "", *writers]
    for name, reg in regs.items():
        if reg.r["tuning_seeds"]:
            figures.append(plot_equal_settings(reg, img / f"{name}_equal_settings.png"))
        figures += [
            plot_trajectories(reg, img / f"{name}_trajectories.png"),
            plot_likelihood_vs_reward_kl(reg, img / f"{name}_likelihood_vs_reward_kl.png"),
        ]
        lines += [
            f"## Regime {name}",
            "",
            *_run_facts(reg),
            "",
            *_results_table(reg, ["sft", *reg.methods]),
            "",
            *_budget_table(reg),
            *_claim2(reg, f"### Claim 2 ({name})"),
            f"![{name} trajectories](img/{name}_trajectories.png)",
            "",
            f"![{name} likelihood vs reward and KL](img/{name}_likelihood_vs_reward_kl.png)",
            "",
        ]
    lines += [
        "## Caveats",
        "",
        "- The pool's models are the policy's siblings (same architecture, tokenizer, SFT recipe and kinds of "
        "mistakes), far closer to it than the LLMs behind UltraFeedback are to a 7B SFT model.",
        "- The offpolicy rewrite changes only the surface form of the correct answers (one digit per line), which the "
        "reward ignores: a response the policy finds unlikely by construction, not a different content.",
        "- A ~10⁵-parameter model, an exact reward and short answers: this tests the mechanics of the losses, not the "
        "paper's results on 7B chat models.",
        "",
    ]
    return lines, figures


def render_all(results: dict[str, dict], docs_dir: Path, sources: dict[str, str]) -> list[Path]:
    """Write `docs_dir/results.md` (self regime: claims 1 and 2), `docs_dir/results_pool.md` (pool and offpolicy
    regimes: claim 2; only when one of them is given) and their figures in `docs_dir/img/`.

    Args:
        results: {"self": self_json, "pool": pool_json, "offpolicy": offpolicy_json}; pool/offpolicy may be missing.
        docs_dir: where the pages go.
        sources: the repository-relative path of each regime's JSON, quoted in the pages (missing ones default to
            `docs/results/<regime>.json`).

    Returns:
        the written pages and figures.

    Raises:
        ResultsError: a JSON without a key the pages need (one line naming the file and the key).
    """
    docs_dir = Path(docs_dir)
    sources = {**DEFAULT_SOURCES, **sources}
    if "self" not in results:
        raise ResultsError("render_all needs the self regime's results (key `self`).")
    for name, res in results.items():
        if name not in REGIMES:
            raise ResultsError(f"unknown regime `{name}` (expected one of {', '.join(REGIMES)}).")
        validate(res, sources[name])
    regs = {name: _Regime(results[name], sources[name]) for name in REGIMES if name in results}
    rerender = _rerender_command(sources, list(regs))
    img = docs_dir / "img"
    others = {name: reg for name, reg in regs.items() if name != "self"}
    lines, written = render_results_md(regs["self"], rerender, img, others)
    page = docs_dir / "results.md"
    page.write_text("\n".join(lines), encoding="utf-8")
    written.insert(0, page)
    if others:
        lines, figures = render_pool_md(others, regs["self"], rerender, img)
        pool_page = docs_dir / "results_pool.md"
        pool_page.write_text("\n".join(lines), encoding="utf-8")
        written += [pool_page, *figures]
    return written


# ---------------------------------------------------------------------------------------------------------------- CLI


def _source_name(path: str) -> str:
    """The path as given, relative to the working directory when it lies under it."""
    absolute = os.path.abspath(path)
    cwd = os.getcwd()
    if os.path.isabs(path) and absolute.startswith(cwd + os.sep):
        return os.path.relpath(absolute, cwd)
    return path


def _load(path: str) -> dict[str, Any]:
    import json

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such file.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsError(f"{path}: not JSON ({error}).") from None
    if not isinstance(data, dict) or "regime" not in data:
        raise ResultsError(f"{path}: missing key `regime` in the top level; re-run scripts/reproduce_results.py.")
    return data


def main(argv: list[str] | None = None) -> int:
    """`python scripts/results_report.py [--docs-dir DIR] SELF.json [POOL.json OFFPOLICY.json]`: re-render the pages
    and figures; each file's regime is read from its `regime` key. Returns the exit status (2 for a bad file, with one
    line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs-dir", default="docs", help="where results.md, results_pool.md and img/ go")
    parser.add_argument("json", nargs="+", help="self.json, optionally pool.json and offpolicy.json")
    args = parser.parse_args(argv)
    try:
        results: dict[str, dict] = {}
        sources: dict[str, str] = {}
        for path in args.json:
            data = _load(path)
            regime = data["regime"]
            if regime not in REGIMES:
                raise ResultsError(f"{path}: `regime` is {regime!r}, not one of {', '.join(REGIMES)}.")
            if regime in results:
                raise ResultsError(f"{path}: a second `{regime}` regime (the first is {sources[regime]}).")
            results[regime], sources[regime] = data, _source_name(path)
        if "self" not in results:
            raise ResultsError("no JSON with `regime` = `self` among " + ", ".join(args.json) + ".")
        written = render_all(results, Path(args.docs_dir), sources)
    except ResultsError as error:
        print(f"results_report.py: error: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
