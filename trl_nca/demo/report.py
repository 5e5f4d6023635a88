"""The report of a `trl-nca demo` run: `likelihood.png` (drawn by `trl_nca.plotting`) and `report.md`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trl_nca.demo.pipeline import METHOD_LABELS
from trl_nca.demo.task import PROMPT_PREFIX


def plot_likelihood(history: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """The demo's `likelihood.png`: mean log-likelihood of held-out responses per reward rank over training steps
    (left) and its change from the SFT model (right). `history` is `RankLikelihoodProbe.history`."""
    from trl_nca.plotting import draw_panels

    steps = [h["step"] for h in history]
    n = len(history[0]["logps_by_rank"])
    series = {
        f"rank {k}" + (" (best)" if k == 0 else " (worst)" if k == n - 1 else ""): [
            h["logps_by_rank"][k] for h in history
        ]
        for k in range(n)
    }
    absolute = [(label, steps, values, False) for label, values in series.items()]
    delta = [(label, steps, [x - values[0] for x in values], False) for label, values in series.items()]
    panels = [
        ("log π(y|x) by rank", "log-likelihood (nats, summed over tokens)", absolute),
        ("Δ log π(y|x) vs SFT", "change from the SFT model (nats)", delta),
    ]
    return draw_panels(path, title, panels)


def _f(x: float | None, spec: str = ".3f") -> str:
    """A number for a Markdown table; `None` → an en dash."""
    return "–" if x is None else format(x, spec)


def write_demo_report(metrics: dict[str, Any], path: str | Path) -> Path:
    """The demo's `report.md`: what ran, before/after metrics, the likelihood figure, example outputs."""
    before, after, hp, preset = metrics["before"], metrics["after"], metrics["hparams"], metrics["preset"]
    label = METHOD_LABELS.get(metrics["trainer"], metrics["trainer"])
    ranks, data, t = after["rank_logp_change"], metrics["dataset"], metrics["timings"]
    stats = data["train_stats"]
    alpha = f", α = {hp['alpha']}" if metrics["trainer"] in ("nca", "infonca") else ""
    lines = [
        f"# trl-nca demo: {label} on digit sorting (seed {metrics['seed']}, size `{metrics['size']}`)",
        "",
        f"Task: `{PROMPT_PREFIX} 7 3 9 3 1` → `1 3 3 7 9`; reward = LCS with the sorted list / length of the longer "
        f"(1.0 only for the exact answer). A Mistral-architecture model ({metrics['parameters']:,} parameters) was "
        f"built in code, warm-started with `trl.SFTTrainer` on {preset['n_demos']} imperfect demonstrations (correct "
        f"with probability {preset['p_correct']}), then sampled K={metrics['K']} times on {data['n_train_prompts']} "
        f"training prompts; those scored samples (`reward_data/train/data.jsonl`) were used to align it with {label}.",
        "",
        f"Hyper-parameters: learning rate {hp['learning_rate']}, β = {hp['beta']}{alpha}, {preset['align_steps']} "
        f"steps of {preset['align_batch']} prompts, cosine schedule.",
        "",
        "## Held-out results",
        "",
        f"{metrics['n_test']} held-out prompts. Sampled reward: {preset['eval_samples']} samples per prompt at "
        "temperature 1 (no top-k/top-p), fixed seed; greedy: one greedy decode per prompt.",
        "",
        "| | SFT | after alignment |",
        "|---|---|---|",
        f"| mean reward, sampled | {_f(before['reward_sampled'])} | {_f(after['reward_sampled'])} |",
        f"| exact answers, sampled | {_f(before['exact_sampled'])} | {_f(after['exact_sampled'])} |",
        f"| mean reward, greedy | {_f(before['reward_greedy'])} | {_f(after['reward_greedy'])} |",
        f"| ranking accuracy (implicit reward) | – | {_f(after['ranking_accuracy'])} |",
        "",
        "Change of the log-likelihood (nats, summed over the response tokens) of the SFT model's own held-out "
        "samples, by reward rank, relative to the SFT model:",
        "",
        "| best | " + " | ".join(f"rank {k}" for k in range(1, len(ranks))) + " | ideal answer |",
        "|" + "---|" * (len(ranks) + 1),
        "| " + " | ".join(_f(x, "+.2f") for x in [*ranks, after["ideal_logp_change"]]) + " |",
        "",
        "![likelihood](likelihood.png)",
        "",
        "`likelihood.png`: mean log-likelihood of the validation prompts' sampled responses, grouped by reward rank, "
        "over training (the quantity of the paper's Figure 2).",
        "",
        "## Reward data",
        "",
        f"Mean reward of the K samples {_f(stats['mean'])}, best of K {_f(stats['best'])}, worst of K "
        f"{_f(stats['worst'])}; {100 * stats['all_tied']:.1f}% of prompts have K tied rewards; "
        f"{data['n_train_rows']} training rows used by the trainer.",
        "",
        "## Examples (after alignment)",
        "",
        *(
            f"- `{ex['prompt']}` → greedy `{ex['greedy']}`; samples " + ", ".join(f"`{s}`" for s in ex["sampled"])
            for ex in after["examples"]
        ),
        "",
        f"Wall time {metrics['wall_s']:.0f} s (SFT {t.get('sft_s', 0):.0f} s, sampling {t.get('sampling_s', 0):.0f} "
        f"s, alignment {t['align_s']:.0f} s, evaluation {t['eval_s']:.0f} s).",
        "",
    ]
    Path(path).write_text("\n".join(lines))
    return Path(path)
