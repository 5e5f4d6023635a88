#!/usr/bin/env python
"""Prepare UltraFeedback-style data for trl-nca: local json/jsonl/parquet files in, reward rows out.

Reads local files only (nothing is downloaded), converts them to trl-nca's reward format with
`trl_nca.converters.prepare_reward_dataset`, splits train/test and saves a `DatasetDict` with `save_to_disk`, plus
`prepare_report.json`: rows and completions read, kept and dropped, each drop with its reason. The splits are named
`train_prefs` / `test_prefs` (`--train-split`, `--test-split`), like the UltraFeedback sets on the Hub, so the output
trains with the Mistral/Mixtral recipes by changing only `--dataset_name`::

    trl-nca train recipes/mistral-7b/nca_reward_qlora.yaml --dataset_name data/uf_reward

Examples::

    # raw openbmb/UltraFeedback (parquet or json), conversational, ranked by overall_score
    python scripts/prepare_ultrafeedback.py --input uf/*.parquet --output data/uf_reward

    # the authors' ChenDRAG/ultrafeedback_reward, keeping their own test split
    python scripts/prepare_ultrafeedback.py --format authors_reward \\
        --input train_prefs.parquet --test-input test_prefs.parquet --output data/uf_reward_authors

Load the result with `datasets.load_from_disk(DIR)`; `DIR["train_prefs"]` goes straight to `NCATrainer`/
`InfoNCATrainer`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from trl_nca.converters import SOURCE_FORMATS, ULTRAFEEDBACK_SCORES, prepare_reward_dataset, split_dataset

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_files(paths: list[str], cache_dir: str | None = None) -> Dataset:
    """Load local json/jsonl/parquet files (one kind per call) as a single `Dataset`."""
    kinds = set()
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"No such input file: {path}")
        suffix = Path(path).suffix.lower()
        if suffix not in _BUILDERS:
            raise ValueError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet.")
        kinds.add(_BUILDERS[suffix])
    if len(kinds) != 1:
        raise ValueError(f"Mix of file types {sorted(kinds)}; pass files of one type per --input/--test-input.")
    return load_dataset(kinds.pop(), data_files=list(paths), split="train", cache_dir=cache_dir)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        description="Convert UltraFeedback-style files to trl-nca reward data (DatasetDict train/test).",
    )
    parser.add_argument("--input", nargs="+", required=True, help="json/jsonl/parquet file(s) of the source data.")
    parser.add_argument(
        "--test-input",
        nargs="+",
        default=None,
        help="file(s) to use as the test split (cleaned the same way); then --test-size is ignored.",
    )
    parser.add_argument(
        "--format",
        choices=SOURCE_FORMATS,
        default="ultrafeedback",
        help="source layout: raw openbmb/UltraFeedback, the authors' ChenDRAG/ultrafeedback_reward or "
        "ChenDRAG/ultrafeedback_preference, or TRL prompt/chosen/rejected (default: %(default)s).",
    )
    parser.add_argument(
        "--score",
        choices=ULTRAFEEDBACK_SCORES,
        default="overall_score",
        help="UltraFeedback reward source (--format ultrafeedback only; default: %(default)s, as the authors).",
    )
    parser.add_argument(
        "--text", action="store_true", help="plain-text prompt/completions instead of chat messages (the default)."
    )
    parser.add_argument("--min-k", type=int, default=2, help="drop prompts left with fewer responses (default: 2).")
    parser.add_argument(
        "--k",
        type=int,
        default=None,
        help="keep exactly K responses per prompt: prompts with fewer are dropped, prompts with more keep K chosen "
        "by --k-strategy. The authors used K=4 (prompts with exactly 4 responses).",
    )
    parser.add_argument(
        "--k-strategy",
        choices=("top", "spread"),
        default="top",
        help="with --k: 'top' keeps the K best; 'spread' keeps the best, the worst and evenly spaced ranks between.",
    )
    parser.add_argument("--drop-ties", action="store_true", help="drop prompts whose rewards are all equal.")
    parser.add_argument(
        "--dedupe",
        choices=("mean", "max", "first", "none"),
        default="mean",
        help="merge identical responses of a prompt, with the mean/max/first of their rewards (default: %(default)s).",
    )
    parser.add_argument(
        "--keep-empty", action="store_true", help="keep empty responses (the trainers reject them; default: drop)."
    )
    parser.add_argument(
        "--use-scores",
        action="store_true",
        help="--format authors_preference: use score_chosen/score_rejected as rewards instead of 1/0.",
    )
    parser.add_argument("--test-size", type=float, default=0.05, help="test fraction (<1) or row count (>=1).")
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/test shuffle (default: 42).")
    parser.add_argument("--cache-dir", default=None, help="datasets cache directory for loading the files.")
    parser.add_argument("--output", required=True, help="directory for DatasetDict.save_to_disk and the report.")
    parser.add_argument(
        "--train-split", default="train_prefs", help="name of the train split (default: train_prefs, as the recipes)."
    )
    parser.add_argument(
        "--test-split", default="test_prefs", help="name of the test split (default: test_prefs, as the recipes)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the preparation; returns the exit status."""
    args = build_parser().parse_args(argv)
    options = dict(
        source_format=args.format,
        score=args.score,
        conversational=not args.text,
        min_k=args.min_k,
        k=args.k,
        k_strategy=args.k_strategy,
        drop_ties=args.drop_ties,
        dedupe=None if args.dedupe == "none" else args.dedupe,
        drop_empty=not args.keep_empty,
        use_scores=args.use_scores,
    )
    source = load_files(args.input, args.cache_dir)
    train, report = prepare_reward_dataset(source, **options)
    report = {"inputs": [str(p) for p in args.input], **report}
    if args.test_input:
        test, test_report = prepare_reward_dataset(load_files(args.test_input, args.cache_dir), **options)
        if len(train) and len(test):
            test = test.cast(train.features)
        splits = DatasetDict({args.train_split: train, args.test_split: test})
        report = {"train_source": report, "test_source": {"inputs": [str(p) for p in args.test_input], **test_report}}
    else:
        split = split_dataset(train, args.test_size, args.seed)
        splits = DatasetDict({args.train_split: split["train"], args.test_split: split["test"]})
        report["test_size"] = args.test_size
        report["seed"] = args.seed
    report["splits"] = {name: len(split) for name, split in splits.items()}

    output = Path(args.output)
    # datasets writes no shard for an empty in-memory split (then `load_from_disk` fails): ask for one explicitly.
    splits.save_to_disk(str(output), num_shards={name: 1 for name, split in splits.items() if len(split) == 0})
    (output / "prepare_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"saved {report['splits']} to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
