"""Figures and Markdown reports of the demo and of the reproduction.

matplotlib (the `plot` extra) is imported only when a figure is drawn, through its object-oriented API on an Agg
canvas, so the global pyplot state is never touched.
"""

from __future__ import annotations

import statistics
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trl_nca.demo.pipeline import METHOD_LABELS
from trl_nca.demo.task import PROMPT_PREFIX

RANK_COLORS = ("#1a9850", "#91cf60", "#fc8d59", "#d73027", "#7b3294", "#2c7bb6")


def _figure(ncols: int, width: float = 5.0, height: float = 3.6) -> tuple[Any, list[Any]]:
    from trl_nca.plotting import _import_matplotlib

    Figure, FigureCanvasAgg = _import_matplotlib()
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Any, path: str | Path, title: str) -> Path:
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def rank_label(k: int, n: int) -> str:
    """Legend label of reward rank k of n (0 = best)."""
    if k == 0:
        return "rank 0 (best)"
    return f"rank {k} (worst)" if k == n - 1 else f"rank {k}"


def plot_likelihood(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """The demo's `likelihood.png`: mean log-likelihood of held-out responses per reward rank over training steps
    (left) and its change from the SFT model (right). `history` is `RankLikelihoodProbe.history`."""
    steps = [h["step"] for h in history]
    values = [h["logps_by_rank"] for h in history]
    n_ranks = len(values[0])
    fig, (ax_abs, ax_delta) = _figure(2)
    for k in range(n_ranks):
        series = [v[k] for v in values]
        color = RANK_COLORS[k % len(RANK_COLORS)]
        ax_abs.plot(steps, series, marker="o", ms=3, color=color, label=rank_label(k, n_ranks))
        ax_delta.plot(steps, [x - series[0] for x in series], marker="o", ms=3, color=color)
    ax_abs.set(xlabel="training step", ylabel="log-likelihood (nats, summed over tokens)", title="log π(y|x) by rank")
    ax_delta.axhline(0.0, color="grey", lw=0.8, ls="--")
    ax_delta.set(xlabel="training step", ylabel="change from the SFT model (nats)", title="Δ log π(y|x) vs SFT")
    ax_abs.legend(fontsize=8)
    return _save(fig, path, title)


def plot_likelihood_by_method(histories: dict[str, list[list[dict[str, Any]]]], path: str | Path, title: str) -> Path:
    """One panel per method: change of the held-out log-likelihood per reward rank over training, mean over seeds
    (band: min..max over seeds). `histories[method]` is a list (one per seed) of probe histories."""
    methods = list(histories)
    fig, axes = _figure(len(methods), width=3.9, height=3.4)
    lows, highs = [], []
    for ax, method in zip(axes, methods):
        runs = histories[method]
        steps = [h["step"] for h in runs[0]]
        n_ranks = len(runs[0][0]["logps_by_rank"])
        for k in range(n_ranks):
            per_seed = [[h["logps_by_rank"][k] - run[0]["logps_by_rank"][k] for h in run] for run in runs]
            mean = [statistics.fmean(col) for col in zip(*per_seed)]
            low = [min(col) for col in zip(*per_seed)]
            high = [max(col) for col in zip(*per_seed)]
            color = RANK_COLORS[k % len(RANK_COLORS)]
            ax.plot(steps, mean, color=color, marker="o", ms=2.5, label=rank_label(k, n_ranks))
            ax.fill_between(steps, low, high, color=color, alpha=0.15, lw=0)
            lows.append(min(low))
            highs.append(max(high))
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set(title=METHOD_LABELS.get(method, method), xlabel="training step")
    axes[0].set_ylabel("Δ log-likelihood vs SFT (nats)")
    for ax in axes:
        ax.set_ylim(min(lows) - 0.3, max(highs) + 0.3)
    axes[0].legend(fontsize=7, loc="lower left")
    return _save(fig, path, title)


def plot_final_metrics(summary: dict[str, dict[str, list[float]]], path: str | Path, title: str) -> Path:
    """Bars (mean, with every seed as a dot) of the final sampled reward and of the best-response log-likelihood
    change, per method. `summary[method][metric]` is the list of per-seed values."""
    methods = list(summary)
    fig, axes = _figure(2, width=max(5.2, 0.95 * len(methods)), height=3.6)  # room for each method's label
    for ax, (key, label) in zip(
        axes,
        [("reward_sampled", "held-out reward (sampled, T=1)"), ("best_logp_change", "Δ log π(best) vs SFT (nats)")],
    ):
        xs = range(len(methods))
        vals = [summary[m][key] for m in methods]
        ax.bar(xs, [statistics.fmean(v) for v in vals], color="#9ecae1", edgecolor="#3182bd")
        for x, v in zip(xs, vals):
            ax.scatter([x] * len(v), v, color="#08519c", s=10, zorder=3)
        names = [textwrap.fill(METHOD_LABELS.get(m, m), 12) for m in methods]
        ax.set_xticks(list(xs), names, fontsize=7)
        ax.set_ylabel(label)
        if key == "reward_sampled":
            low = min(min(v) for v in vals)
            ax.set_ylim(max(0.0, low - 0.05), 1.0)
        else:
            ax.axhline(0.0, color="grey", lw=0.8)
    return _save(fig, path, title)


def plot_grid_likelihood(
    tuning: Sequence[dict[str, Any]], methods: Sequence[str], path: str | Path, title: str
) -> Path:
    """One panel per β: change of log π(best validation response) vs SFT against the learning rate, one line per
    method (the tuning runs, i.e. every method at the same hyper-parameters)."""
    betas = sorted({r["hparams"]["beta"] for r in tuning if r["method"] in methods})
    fig, axes = _figure(len(betas), width=3.6, height=3.3)
    colors = {"nca": "#1b7837", "infonca": "#5aae61", "dpo": "#c2a5cf", "dpo_all": "#762a83"}
    colors.update(plackett_luce="#e08214", lipo_lambda="#8c510a")
    for ax, beta in zip(axes, betas):
        for m in methods:
            points = sorted(
                (r["hparams"]["learning_rate"], r["best_logp_change"])
                for r in tuning
                if r["method"] == m and r["hparams"]["beta"] == beta
            )
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", ms=3, color=colors.get(m), label=METHOD_LABELS.get(m, m))
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set(title=f"β = {beta:g}", xlabel="learning rate")
    lows, highs = zip(*(ax.get_ylim() for ax in axes))
    for ax in axes:
        ax.set_ylim(min(lows), max(highs))
    axes[0].set_ylabel("Δ log π(best) vs SFT (nats)")
    axes[0].legend(fontsize=7, loc="lower left")
    return _save(fig, path, title)


def fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    """Format a number for a Markdown table; `None` → an en dash."""
    if x is None:
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def mean_std(values: Sequence[float | None], digits: int = 3, signed: bool = False) -> str:
    """`mean ± std` (sample std over seeds) for a Markdown table; `–` if no value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{fmt(statistics.fmean(vals), digits, signed)} ± {std:.{digits}f}"


def write_demo_report(metrics: dict[str, Any], path: str | Path) -> Path:
    """The demo's `report.md`: what ran, before/after metrics, the likelihood figure, example outputs."""
    before, after = metrics["before"], metrics["after"]
    hp = metrics["hparams"]
    label = METHOD_LABELS.get(metrics["trainer"], metrics["trainer"])
    ranks = after["rank_logp_change"]
    data = metrics["dataset"]
    stats = data["train_stats"]
    lines = [
        f"# trl-nca demo: {label} on digit sorting (seed {metrics['seed']}, size `{metrics['size']}`)",
        "",
        f"Task: `{PROMPT_PREFIX} 7 3 9 3 1` → `1 3 3 7 9`; reward = LCS with the sorted list / length of the longer "
        "(1.0 only for the exact answer). A Mistral-architecture model "
        f"({metrics['model']['parameters']:,} parameters) was built in code, warm-started with `trl.SFTTrainer` on "
        f"{metrics['sft']['n_demos']} imperfect demonstrations (correct with probability "
        f"{metrics['sft']['p_correct']}), then sampled K={metrics['K']} times on {data['n_train_prompts']} training "
        f"prompts; those scored samples (`reward_data/train/data.jsonl`) were used to align it with {label}.",
        "",
        f"Hyper-parameters: learning rate {hp['learning_rate']}, β = {hp['beta']}"
        + (f", α = {hp['alpha']}" if metrics["trainer"] in ("nca", "infonca") else "")
        + f", {metrics['align']['steps']} steps of {metrics['align']['batch']} prompts, cosine schedule.",
        "",
        "## Held-out results",
        "",
        f"{metrics['n_test']} held-out prompts. Sampled reward: {metrics['eval_samples']} samples per prompt at "
        "temperature 1 (no top-k/top-p), fixed seed; greedy: one greedy decode per prompt.",
        "",
        "| | SFT | after alignment |",
        "|---|---|---|",
        f"| mean reward, sampled | {fmt(before['reward_sampled'])} | {fmt(after['reward_sampled'])} |",
        f"| exact answers, sampled | {fmt(before['exact_sampled'])} | {fmt(after['exact_sampled'])} |",
        f"| mean reward, greedy | {fmt(before['reward_greedy'])} | {fmt(after['reward_greedy'])} |",
        f"| ranking accuracy (implicit reward) | – | {fmt(after['ranking_accuracy'])} |",
        "",
        "Change of the log-likelihood (nats, summed over the response tokens) of the SFT model's own held-out "
        "samples, by reward rank, relative to the SFT model:",
        "",
        "| best | " + " | ".join(f"rank {k}" for k in range(1, len(ranks))) + " | ideal answer |",
        "|" + "---|" * (len(ranks) + 1),
        "| " + " | ".join(fmt(x, 2, signed=True) for x in ranks) + f" | {fmt(after['ideal_logp_change'], 2, True)} |",
        "",
        "![likelihood](likelihood.png)",
        "",
        "`likelihood.png`: mean log-likelihood of the validation prompts' sampled responses, grouped by reward rank, "
        "over training (the quantity of the paper's Figure 2).",
        "",
        "## Reward data",
        "",
        f"Mean reward of the K samples {fmt(stats['mean'])}, best of K {fmt(stats['best'])}, worst of K "
        f"{fmt(stats['worst'])}; {fmt(100 * stats['all_tied'], 1)}% of prompts have K tied rewards; "
        f"{data['n_train_rows']} training rows used by the trainer.",
        "",
        "## Examples (after alignment)",
        "",
    ]
    for ex in after["examples"]:
        lines.append(
            f"- `{ex['prompt']}` → greedy `{ex['greedy']}`; samples " + ", ".join(f"`{s}`" for s in ex["sampled"])
        )
    t = metrics["timings"]
    lines += [
        "",
        f"Wall time {metrics['wall_s']:.0f} s (SFT {t.get('sft_s', 0):.0f} s, sampling "
        f"{t.get('sampling_s', 0):.0f} s, alignment {t['align_s']:.0f} s, evaluation {t['eval_s']:.0f} s).",
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(lines))
    return path
