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

from trl_nca.arguments import ScriptParser
from trl_nca.cli_common import GENERATE_INTERRUPTED, exit_on_interrupt, exit_process, normalize_argv

if __name__ == "__main__":  # e.g. under `accelerate launch`: Ctrl-C while importing is one line too
    exit_on_interrupt(GENERATE_INTERRUPTED)
from trl_nca.generate_config import RewardDataConfig


def make_parser(prog: str | None = "trl-nca generate") -> ScriptParser:
    """``TrlParser`` over `RewardDataConfig`."""
    return ScriptParser((RewardDataConfig,), prog=prog)


def parse_args(argv: Sequence[str]) -> RewardDataConfig:
    """Parse ``[CONFIG.yaml] [--flag value ...]``; a mistake is a `trl_nca.cli.UsageError` naming the closest key."""
    from trl_nca.cli_common import UsageError

    args = normalize_argv(argv)
    if not args:
        raise UsageError("no config given: usage: trl-nca generate CONFIG.yaml [--flag value ...] (-h for the fields)")
    (config,) = make_parser().parse_strictly(args, what="config")
    if not config.reward_funcs:
        raise UsageError("`reward_funcs` is required: reward model ids/folders and/or `module:function` functions.")
    return config


def load_prompts(config: RewardDataConfig):
    """The prompt split as a `datasets.Dataset`, from any source `trl-nca train --dataset_name` reads."""
    from trl_nca.cli_common import DatasetError
    from trl_nca.sources import load_raw_datasets

    if not config.dataset_name:
        from trl_nca.cli_common import UsageError

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


#: The user errors of the generate stages, each with the module that defines it: printed as one line, exit status 2.
_STAGE_ERRORS = (
    ("trl_nca.reward_data", "ResumeError"),
    ("trl_nca.reward_data", "NoPromptKeptError"),
    ("trl_nca.scoring", "RewardFunctionError"),
    ("trl_nca.server", "ServerError"),
)


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that are the user's mistakes: the CLI's, and those of the stages imported so far (an
    error can only come from a module that was imported, so the heavy ones are not imported here)."""
    from trl_nca.cli_common import DatasetError, UsageError

    loaded = [getattr(sys.modules[module], name) for module, name in _STAGE_ERRORS if module in sys.modules]
    return (UsageError, DatasetError, *loaded)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``trl-nca generate``; returns the exit status (2 for a user error, printed as one line).

    The command line and the config are checked before torch, transformers or vLLM are imported, so a mistake is
    reported at once."""
    from trl_nca.cli_common import hold_optional_kernel_logs, is_main_process, quiet_warnings, restore_interrupt

    hold_optional_kernel_logs()  # bitsandbytes' optional 4-bit kernel: generate does not quantize
    quiet_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        make_parser().print_help()
        return 0
    try:
        config = parse_args(argv)
        from trl_nca.sources import check_generate_sources  # light: a missing path is one line before torch loads

        check_generate_sources(config)
        from trl_nca.reward_data import build_reward_dataset

        _only_our_progress_bars()
        prompts = load_prompts(config)
        restore_interrupt()  # from here on chunks are committed: an interruption is handled below
        _, stats = build_reward_dataset(config, prompts)
    except KeyboardInterrupt:
        print(GENERATE_INTERRUPTED, file=sys.stderr)
        return 130
    except user_errors() as error:
        if is_main_process():
            print(f"trl-nca generate: error: {error}", file=sys.stderr)
        return 2
    if stats:
        print(summary(stats, config.output_dir, config.min_completions))
    return 0


if __name__ == "__main__":
    exit_process(main())
