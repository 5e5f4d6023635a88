#!/usr/bin/env python
"""How much torch's CPU thread count matters for small models on a shared CPU box.

Times 8 NCA steps of a tiny Mistral through the Python API (`NCATrainer`), each run in a fresh process, for each
thread count, and prints the median of `--repeats` runs::

    python scripts/cpu_threads.py --threads 0 1 2 --repeats 3      # 0 = torch's default

On a busy machine, torch's default (one thread per core) can be many times slower than one thread for models this
small: the threads wait for cores that other processes hold. See README, "Training on a CPU".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def time_steps(threads: int, steps: int) -> float:
    """Seconds for `steps` training steps with `threads` torch threads (0 = torch's default), in this process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch
    from datasets import Dataset

    from trl_nca import NCAConfig, NCATrainer
    from trl_nca.tiny import build_tiny_model, build_tokenizer

    if threads:
        torch.set_num_threads(threads)
    words = ["one", "two", "three", "blue", "green", "dog", "cat", "sky", "sea", "big"]
    rows = [
        {
            "prompt": f"what is {words[i % 10]} and {words[(i + 3) % 10]}?",
            "completions": [" " + " ".join(words[(i + j) % 10] for j in range(m + 1)) for m in range(4)],
            "rewards": [float((i * 7 + 3 * m) % 5) for m in range(4)],
        }
        for i in range(2 * steps)
    ]
    tokenizer = build_tokenizer()
    args = NCAConfig(output_dir="runs/cpu-threads", max_steps=steps, per_device_train_batch_size=2, bf16=False,
                     use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = NCATrainer(
        build_tiny_model(tokenizer),
        ref_model=build_tiny_model(tokenizer, seed=1),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    trainer.train()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1], help="thread counts (0 = torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs per thread count")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)  # one timing, in this process
    args = parser.parse_args(argv)
    if args.single is not None:
        print(json.dumps({"seconds": time_steps(args.single, args.steps)}))
        return 0
    results = {}
    for _ in range(args.repeats):  # interleaved, so load changes hit every setting alike
        for threads in args.threads:
            command = [sys.executable, __file__, "--single", str(threads), "--steps", str(args.steps)]
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.setdefault(threads, []).append(json.loads(output.strip().splitlines()[-1])["seconds"])
    for threads, seconds in results.items():
        label = "torch default" if threads == 0 else f"{threads} thread(s)"
        runs = ", ".join(f"{s:.2f}" for s in seconds)
        print(f"{label:>14}: median {statistics.median(seconds):.2f} s for {args.steps} steps  (runs: {runs})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"steps": args.steps, "seconds": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
