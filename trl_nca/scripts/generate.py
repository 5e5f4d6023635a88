"""``trl-nca generate``: prompts -> reward dataset (sample K completions per prompt, score them, write the rows).

    trl-nca generate CONFIG.yaml [--key value ...]
    accelerate launch -m trl_nca.scripts.generate CONFIG.yaml [--key value ...]     # prompts split across processes

CONFIG.yaml holds the fields of `trl_nca.RewardDataConfig` (flags override them), read by `TrlParser` as in
``trl-nca train``. A re-run of the same command resumes an interrupted run. The output's ``dataset/`` folder is what
``trl-nca train --dataset_name OUTPUT_DIR/dataset`` trains on.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from types import SimpleNamespace

from trl_nca.config import RewardDataConfig
from trl_nca.scripts.train import ScriptParser, normalize_argv


def make_parser(prog: str | None = "trl-nca generate") -> ScriptParser:
    """``TrlParser`` over `RewardDataConfig`."""
    return ScriptParser((RewardDataConfig,), prog=prog)


def parse_args(argv: Sequence[str]) -> RewardDataConfig:
    """Parse ``[CONFIG.yaml] [--flag value ...]``; a mistake is a `trl_nca.cli.UsageError` naming the closest key."""
    from trl_nca.cli import UsageError

    args = normalize_argv(argv)
    if not args:
        raise UsageError("no config given: usage: trl-nca generate CONFIG.yaml [--flag value ...] (-h for the fields)")
    (config,) = make_parser().parse_strictly(args, what="config")
    if not config.reward_funcs:
        raise UsageError("`reward_funcs` is required: reward model ids/folders and/or `module:function` functions.")
    return config


def load_prompts(config: RewardDataConfig):
    """The prompt split as a `datasets.Dataset`, from any source `trl-nca train --dataset_name` reads."""
    from trl_nca.data import DatasetError
    from trl_nca.scripts.train import load_raw_datasets

    if not config.dataset_name:
        from trl_nca.cli import UsageError

        raise UsageError("`dataset_name` is required: the prompts (a Hub id, a folder or a data file).")
    source = SimpleNamespace(
        dataset_name=config.dataset_name,
        dataset_config=config.dataset_config,
        dataset_train_split=config.dataset_split,
        dataset_streaming=False,
    )
    loaded = load_raw_datasets(source)
    if config.dataset_split not in loaded:
        raise DatasetError(
            f"dataset_name: {config.dataset_name} has no split `{config.dataset_split}` (splits: "
            f"{', '.join(loaded)}); set --dataset_split."
        )
    return loaded[config.dataset_split]


def summary(stats: dict, output_dir: str, min_completions: int = 2) -> str:
    """What the run wrote, in a few lines."""
    timings = stats.get("timings", {})
    # Rates are over the time spent sampling or scoring, without loading and closing the model (an engine's start-up
    # and shutdown).
    setup = stats.get("setup", {})
    working = {k: seconds - setup.get(k, 0.0) for k, seconds in timings.items()}
    complete = {k: stats["chunks_computed"][k.removesuffix("_s")] == stats["n_chunks"] for k in timings}
    scored = stats["completions_sampled"] - stats["completions_empty"] - stats["completions_duplicates"]
    parts = []
    for key, seconds in timings.items():
        part = f"{key.removesuffix('_s')} {seconds:.1f} s"
        if setup.get(key):
            part += f" ({setup[key]:.1f} s loading and closing)"
        if complete[key] and working[key] > 0 and key.startswith("scoring/"):
            part += f" ({scored / working[key]:.1f} completions/s)"
        parts.append(part)
    sampling_s = sum(v for k, v in working.items() if k.startswith("sampling/"))
    if sampling_s > 0 and all(v for k, v in complete.items() if k.startswith("sampling/")):
        parts.append(
            f"sampling {stats['completions_sampled'] / sampling_s:.1f} completions/s, "
            f"{stats['completion_tokens_sampled'] / sampling_s:.0f} tokens/s"
        )
    seconds = "; ".join(parts)
    train = f"train on it: trl-nca train RECIPE --dataset_name {output_dir}/dataset"
    if min_completions < 2:  # rows of one completion: SFT data or an evaluation set, not K-way training data
        train = "min_completions 1 keeps prompts with a single completion, which NCATrainer/InfoNCATrainer refuse"
    return (
        f"{stats['prompts_kept']} of {stats['prompts']} prompts kept, {stats['completions_kept']} completions "
        f"({stats['completions_sampled']} sampled; {stats['completions_duplicates']} duplicates, "
        f"{stats['completions_empty']} empty, {stats['completions_unscored']} unscored removed; "
        f"{stats['prompts_too_few']} prompts with too few left)\n"
        f"time: {seconds}\n"
        f"wrote {output_dir}/dataset ({train}), data.jsonl, README.md, stats.json"
    )


def _only_our_progress_bars() -> None:
    """Keep the labelled sampling/scoring bars; drop the per-load and per-save bars of transformers and datasets."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trl-nca generate``; returns the exit status (2 for a user error, printed as one line)."""
    from accelerate import PartialState

    from trl_nca.cli import UsageError, quiet_warnings
    from trl_nca.data import DatasetError
    from trl_nca.reward_data import NoPromptKeptError, ResumeError, build_reward_dataset
    from trl_nca.scoring import RewardFunctionError
    from trl_nca.server import ServerError

    quiet_warnings()
    _only_our_progress_bars()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        make_parser().print_help()
        return 0
    try:
        config = parse_args(argv)
        prompts = load_prompts(config)
        _, stats = build_reward_dataset(config, prompts)
    except (UsageError, DatasetError, ResumeError, RewardFunctionError, NoPromptKeptError, ServerError) as error:
        if PartialState().is_main_process:
            print(f"trl-nca generate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "trl-nca generate: interrupted; the finished chunks are kept, re-run the same command to resume.",
            file=sys.stderr,
        )
        return 130
    if stats:
        print(summary(stats, config.output_dir, config.min_completions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
