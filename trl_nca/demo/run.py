"""`trl-nca demo`: the whole alignment pipeline on a CPU in a few minutes, offline.

    trl-nca demo [--output_dir DIR] [--trainer TRAINER] [--seed N] [--size tiny|small]
    trl-nca demo --compare [--output_dir DIR]     # the reproduction (see scripts/reproduce_results.py)

Multi-word flags are spelled with `_` like those of the other `trl-nca` commands, or with `-` (`--output-dir`).

Stages: tokenizer + Mistral-architecture model built in code → SFT warm start (`trl.SFTTrainer`) on imperfect
demonstrations of digit sorting → K=4 samples per training prompt scored by the ground-truth reward (DIR/reward_data)
→ alignment (TRAINER: `NCATrainer` by default, `InfoNCATrainer`, `trl.DPOTrainer` on best-vs-worst pairs or
`ListwiseTrainer`'s Plackett-Luce / LiPO-λ; see `TRAINER_CHOICES`) → held-out evaluation before/after. Writes
DIR/TRAINER/metrics.json, report.md and likelihood.png (one folder per trainer, so runs of other trainers in the same
DIR, which reuse its cached SFT model and reward data, never overwrite them).
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

TRAINER_CHOICES = ("nca", "infonca", "dpo", "dpo_all", "plackett_luce", "lipo_lambda")


_DEMO_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@contextlib.contextmanager
def demo_runtime(threads: int) -> Iterator[None]:
    """Offline mode, torch thread count and quieter libraries for the duration of a demo; everything (environment,
    threads, verbosity, progress-bar switches, warning filters) is restored on exit, so calling `main` in-process
    (tests, notebooks) leaves no trace."""
    import datasets
    import torch
    import transformers

    env = dict(_DEMO_ENV)
    if not torch.cuda.is_available():  # what DeepSpeed picks anyway, minus its "unable to detect" warning line
        env["DS_ACCELERATOR"] = "cpu"
    saved_env = {key: os.environ.get(key) for key in env}
    saved_threads = torch.get_num_threads()
    saved_verbosity = transformers.logging.get_verbosity()
    hf_bars = transformers.utils.logging.is_progress_bar_enabled()
    ds_bars = datasets.is_progress_bar_enabled()
    with warnings.catch_warnings():
        for key, value in env.items():
            os.environ.setdefault(key, value)
        if threads > 0:
            torch.set_num_threads(threads)
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()  # the "Loading weights" bar of every from_pretrained
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            yield
        finally:
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            torch.set_num_threads(saved_threads)
            transformers.logging.set_verbosity(saved_verbosity)
            if hf_bars:
                transformers.utils.logging.enable_progress_bar()
            if ds_bars:
                datasets.enable_progress_bars()


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
    hparams = P.DEFAULT_HPARAMS[size][trainer]
    overrides = {"learning_rate": learning_rate, "beta": beta, "alpha": alpha}
    hparams = replace(hparams, **{k: v for k, v in overrides.items() if v is not None})

    prepared = P.prepare(preset, seed, output_dir, show_progress=show_progress, log=log)
    tokenizer = prepared.tokenizer
    timings = dict(prepared.timings)
    sft_model = P.load_model(prepared.sft_dir)
    n_params = sum(p.numel() for p in sft_model.parameters())

    log(f"Evaluating the SFT model on {len(prepared.data['test'])} held-out prompts")
    t0 = time.perf_counter()
    reference = P.make_reference(sft_model, tokenizer, prepared.data["test"])
    before = P.evaluate_policy(sft_model, tokenizer, reference, preset, seed, show_progress, desc="SFT")
    eval_s = time.perf_counter() - t0
    del sft_model

    log(f"Aligning with {P.METHOD_LABELS[trainer]} ({preset.align_steps} steps, {hparams})")
    result = P.align(
        trainer,
        prepared.sft_dir,
        tokenizer,
        prepared.data["train"],
        prepared.data["val"],
        hparams,
        preset,
        seed,
        output_dir,
        show_progress=show_progress,
    )
    timings["align_s"] = result.wall_s
    t0 = time.perf_counter()
    after = P.evaluate_policy(result.model, tokenizer, reference, preset, seed, show_progress, desc="Aligned")
    timings["eval_s"] = eval_s + time.perf_counter() - t0

    metrics: dict[str, Any] = {
        "trainer": trainer,
        "seed": seed,
        "size": size,
        "K": P.K,
        "hparams": asdict(hparams),
        "reward_before": before["reward_sampled"],
        "reward_after": after["reward_sampled"],
        "reward_greedy_before": before["reward_greedy"],
        "reward_greedy_after": after["reward_greedy"],
        "exact_before": before["exact_sampled"],
        "exact_after": after["exact_sampled"],
        "best_logp_change": after["best_logp_change"],
        "rank_logp_change": after["rank_logp_change"],
        "ideal_logp_change": after["ideal_logp_change"],
        "ranking_accuracy": after["ranking_accuracy"],
        "reward_protocol": (
            f"mean ground-truth reward of {preset.eval_samples} samples per held-out prompt, temperature 1, no top-k/"
            "top-p, fixed seed; *_greedy: greedy decoding"
        ),
        "n_test": len(reference.rows),
        "eval_samples": preset.eval_samples,
        "model": {
            "architecture": "mistral",
            "parameters": n_params,
            "hidden_size": preset.hidden_size,
            "num_hidden_layers": preset.num_hidden_layers,
        },
        "sft": {"n_demos": preset.n_demos, "p_correct": preset.p_correct, "epochs": preset.sft_epochs},
        "align": {"steps": preset.align_steps, "batch": preset.align_batch},
        "dataset": {
            "n_train_prompts": len(prepared.data["train"]),
            "n_train_rows": result.n_train_rows,
            "train_stats": P.reward_stats(prepared.data["train"]),
            "path": str(output_dir / "reward_data"),
        },
        "likelihood": result.likelihood,
        "log_history": result.log_history,
        "before": before,
        "after": after,
        "timings": timings,
    }
    results_dir = output_dir / trainer
    results_dir.mkdir(parents=True, exist_ok=True)
    plot_likelihood(
        result.likelihood,
        results_dir / "likelihood.png",
        f"{P.METHOD_LABELS[trainer]}: held-out responses by reward rank (seed {seed})",
    )
    metrics["wall_s"] = time.perf_counter() - start
    (results_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_demo_report(metrics, results_dir / "report.md")
    return metrics


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
    parser.add_argument(
        "--output_dir", "--output-dir", default="trl-nca-demo", help="where to write artifacts (default: %(default)s)"
    )
    parser.add_argument(
        "--trainer",
        choices=TRAINER_CHOICES,
        default="nca",
        help="nca (default), infonca, dpo (trl.DPOTrainer on best-vs-worst pairs), dpo_all (best vs each other), "
        "plackett_luce or lipo_lambda (trl_nca.ListwiseTrainer on all K responses)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("tiny", "small"), default="small", help="tiny: seconds, for tests")
    parser.add_argument(
        "--learning_rate",
        "--learning-rate",
        type=float,
        default=None,
        help="override the learning rate (defaults per trainer: the values the reproduction selected, see "
        "docs/results.md)",
    )
    parser.add_argument("--beta", type=float, default=None, help="override β (KL strength)")
    parser.add_argument("--alpha", type=float, default=None, help="override α (reward temperature, NCA/InfoNCA)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these models are too small to gain much from more, and extra threads "
        "slow down badly on a busy machine; 0 = torch's default)",
    )
    parser.add_argument("--no_progress", "--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run the reproduction instead (all methods x 3 seeds, tuned on a validation split; writes results.md "
        "and plots to --output-dir); same as scripts/reproduce_results.py",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `trl-nca demo`. Returns the process exit code."""
    from trl_nca.cli_common import hold_optional_kernel_logs

    hold_optional_kernel_logs()  # the demo never quantizes: bitsandbytes' import-time kernel warnings are not for it
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.compare:
        from trl_nca.demo.compare import main as compare_main

        forwarded = ["--output-dir", args.output_dir, "--threads", str(args.threads), "--size", args.size, *rest]
        if args.no_progress:
            forwarded.append("--no-progress")
        return compare_main(forwarded)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    with demo_runtime(args.threads):
        metrics = run_demo(
            args.output_dir,
            trainer=args.trainer,
            seed=args.seed,
            size=args.size,
            learning_rate=args.learning_rate,
            beta=args.beta,
            alpha=args.alpha,
            show_progress=not args.no_progress,
        )
    print(summary_text(metrics, args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
