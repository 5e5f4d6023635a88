"""`trl-nca demo`: the whole alignment pipeline on a CPU in a few minutes, offline.

    trl-nca demo [--output_dir DIR] [--trainer TRAINER] [--seed N] [--size tiny|small]

Multi-word flags are spelled with `_` like those of the other `trl-nca` commands, or with `-` (`--output-dir`).
Stages: tokenizer + Mistral-architecture model built in code → SFT warm start (`trl.SFTTrainer`) on imperfect
demonstrations of digit sorting → K=4 samples per training prompt scored by the ground-truth reward (DIR/reward_data)
→ alignment (TRAINER: `NCATrainer` by default, `InfoNCATrainer`, `trl.DPOTrainer` on best-vs-worst pairs or
`ListwiseTrainer`'s Plackett-Luce / LiPO-λ) → held-out evaluation before/after. Writes DIR/TRAINER/metrics.json,
report.md and likelihood.png (one folder per trainer: runs of other trainers in the same DIR reuse its cached SFT
model and reward data and never overwrite them). The reproduction behind docs/results.md is
`python scripts/reproduce_results.py` in a checkout of the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any
from unittest import mock

TRAINER_CHOICES = ("nca", "infonca", "dpo", "dpo_all", "plackett_luce", "lipo_lambda")
_DEMO_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def demo_runtime(threads: int) -> Iterator[None]:
    """Offline mode, torch thread count and quieter libraries for the duration of a demo; everything (environment,
    threads, verbosity, progress-bar switches, warning filters) is restored on exit, so calling `main` in-process
    (tests, notebooks) leaves no trace."""
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    env = dict(_DEMO_ENV, **({} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}))  # DeepSpeed's pick
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {k: os.environ.get(k, v) for k, v in env.items()}))
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", category=FutureWarning)
        stack.callback(torch.set_num_threads, torch.get_num_threads())
        if threads > 0:
            torch.set_num_threads(threads)
        stack.callback(hf_logging.set_verbosity, hf_logging.get_verbosity())
        hf_logging.set_verbosity_error()
        if hf_logging.is_progress_bar_enabled():  # the "Loading weights" bar of every from_pretrained
            stack.callback(hf_logging.enable_progress_bar)
        if datasets.is_progress_bar_enabled():
            stack.callback(datasets.enable_progress_bars)
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        yield


def run_demo(
    output_dir: str | Path,
    trainer: str = "nca",
    seed: int = 0,
    size: str = "small",
    learning_rate: float | None = None,
    beta: float | None = None,
    alpha: float | None = None,
    show_progress: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    """Run the demo end to end and write `metrics.json`, `report.md` and `likelihood.png` to `output_dir/trainer/`.
    Returns the metrics dict. The SFT model and reward data (`reward_data/`) are cached in `output_dir` (keyed on size
    and seed), so re-running with another `trainer` skips stages 1-3 and writes its results beside the first's."""
    from trl_nca.demo import pipeline as P
    from trl_nca.demo.report import plot_likelihood, write_demo_report

    if trainer not in TRAINER_CHOICES:
        raise ValueError(f"Unknown trainer {trainer!r}; choose from {TRAINER_CHOICES}.")
    if size not in P.PRESETS:
        raise ValueError(f"Unknown size {size!r}; choose from {sorted(P.PRESETS)}.")
    start = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    preset = P.PRESETS[size]
    overrides = {"learning_rate": learning_rate, "beta": beta, "alpha": alpha}
    hparams = replace(P.DEFAULT_HPARAMS[size][trainer], **{k: v for k, v in overrides.items() if v is not None})

    prepared = P.prepare(preset, seed, output_dir, show_progress=show_progress, log=log)
    tokenizer, train_rows, timings = prepared.tokenizer, prepared.data["train"], dict(prepared.timings)
    sft_model = P.load_model(prepared.sft_dir)
    log(f"Evaluating the SFT model on {len(prepared.data['test'])} held-out prompts")
    t0 = time.perf_counter()
    reference = P.make_reference(sft_model, tokenizer, prepared.data["test"])
    before = P.evaluate_policy(sft_model, tokenizer, reference, preset, seed, show_progress, desc="SFT")
    eval_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in sft_model.parameters())
    del sft_model

    log(f"Aligning with {P.METHOD_LABELS[trainer]} ({preset.align_steps} steps, {hparams})")
    result = P.align(
        trainer, prepared.sft_dir, tokenizer, train_rows, prepared.data["val"], hparams, preset, seed, output_dir,
        show_progress=show_progress,
    )  # fmt: skip
    t0 = time.perf_counter()
    after = P.evaluate_policy(result.model, tokenizer, reference, preset, seed, show_progress, desc="Aligned")
    timings.update(align_s=result.wall_s, eval_s=eval_s + time.perf_counter() - t0)

    # X_before / X_after from the two evaluations, then the aligned model's likelihood changes vs the SFT model
    renamed = {"reward": "reward_sampled", "reward_greedy": "reward_greedy", "exact": "exact_sampled"}
    sides = {"before": before, "after": after}
    metrics: dict[str, Any] = {
        "trainer": trainer, "seed": seed, "size": size, "K": P.K, "hparams": asdict(hparams),
        **{f"{name}_{when}": ev[key] for name, key in renamed.items() for when, ev in sides.items()},
        **{k: after[k] for k in ("best_logp_change", "rank_logp_change", "ideal_logp_change", "ranking_accuracy")},
        "n_test": len(reference.rows), "parameters": n_params, "preset": asdict(preset),
        "dataset": {
            "n_train_prompts": len(train_rows), "n_train_rows": result.n_train_rows,
            "train_stats": P.reward_stats(train_rows), "path": str(output_dir / "reward_data"),
        },
        "likelihood": result.likelihood, "log_history": result.log_history, "before": before, "after": after,
        "timings": timings,
    }  # fmt: skip
    results_dir = output_dir / trainer
    title = f"{P.METHOD_LABELS[trainer]}: held-out responses by reward rank (seed {seed})"
    plot_likelihood(result.likelihood, results_dir / "likelihood.png", title)
    metrics["wall_s"] = time.perf_counter() - start
    (results_dir / "metrics.json").write_text(text := json.dumps(metrics, indent=2))
    write_demo_report(metrics, results_dir / "report.md")
    return json.loads(text)  # what metrics.json holds (tuples as lists)


def summary_text(metrics: dict[str, Any], output_dir: str | Path) -> str:
    """The short summary printed at the end of a demo run."""
    from trl_nca.demo.pipeline import METHOD_LABELS

    ranks = ", ".join(f"{x:+.2f}" for x in metrics["rank_logp_change"])
    acc = metrics["ranking_accuracy"]
    report = Path(output_dir) / metrics["trainer"] / "report.md"
    return "\n".join(
        [
            "",
            f"trl-nca demo: {METHOD_LABELS[metrics['trainer']]}, seed {metrics['seed']}, size {metrics['size']}",
            f"  held-out reward (sampled) {metrics['reward_before']:.3f} -> {metrics['reward_after']:.3f}"
            f"   (greedy {metrics['reward_greedy_before']:.3f} -> {metrics['reward_greedy_after']:.3f})",
            f"  exact answers (sampled)   {metrics['exact_before']:.3f} -> {metrics['exact_after']:.3f}",
            f"  Δ log-likelihood of the best held-out response vs SFT: {metrics['best_logp_change']:+.2f} nats "
            f"(by rank, best..worst: {ranks})",
            f"  ranking accuracy of the implicit reward: {'n/a' if acc is None else f'{acc:.3f}'}",
            f"  wall time {metrics['wall_s']:.0f} s; wrote {report}, metrics.json, likelihood.png",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The `trl-nca demo` argument parser."""
    parser = argparse.ArgumentParser(
        prog="trl-nca demo",
        description="Offline CPU demo: SFT a tiny model on digit sorting, sample K=4 scored responses per prompt, "
        "align with NCA / InfoNCA / DPO, and measure reward and likelihood changes on held-out prompts.",
    )
    add = parser.add_argument
    add("--output_dir", "--output-dir", default="trl-nca-demo", help="where to write artifacts (default: %(default)s)")
    add("--trainer", choices=TRAINER_CHOICES, default="nca", help="nca (default), infonca, dpo (trl.DPOTrainer on "
        "best-vs-worst pairs), dpo_all (best vs each other), plackett_luce or lipo_lambda (trl_nca.ListwiseTrainer "
        "on all K responses)")  # fmt: skip
    add("--seed", type=int, default=0)
    add("--size", choices=("tiny", "small"), default="small", help="tiny: seconds, for tests")
    add("--learning_rate", "--learning-rate", type=float, help="override the learning rate (defaults per trainer: "
        "the values the reproduction selected, see docs/results.md)")  # fmt: skip
    add("--beta", type=float, help="override β (KL strength)")
    add("--alpha", type=float, help="override α (reward temperature, NCA/InfoNCA)")
    add("--threads", type=int, default=1, help="torch CPU threads (default 1: these models are too small to gain much "
        "from more, and extra threads slow down badly on a busy machine; 0 = torch's default)")  # fmt: skip
    add("--no_progress", "--no-progress", action="store_true", help="no progress bars")
    add("--compare", action="store_true", help=argparse.SUPPRESS)  # removed: `main` says where the reproduction is
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `trl-nca demo`. Returns the process exit code."""
    from trl_nca.cli_common import hold_optional_kernel_logs

    hold_optional_kernel_logs()  # the demo never quantizes: bitsandbytes' import-time kernel warnings are not for it
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.compare:
        print(
            "trl-nca demo: error: --compare was removed; the reproduction is `python scripts/reproduce_results.py` "
            "in a checkout of the trl-nca repository (protocol and results: docs/results.md).",
            file=sys.stderr,
        )
        return 2
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    with demo_runtime(args.threads):
        chosen = {k: getattr(args, k) for k in ("trainer", "seed", "size", "learning_rate", "beta", "alpha")}
        metrics = run_demo(args.output_dir, **chosen, show_progress=not args.no_progress)
    print(summary_text(metrics, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
