"""Launched by `tests/test_dropin.py` under `accelerate launch` with 2 processes: evaluates the same eval rows as a
map-style `Dataset` and streamed (`IterableDataset`), in both layouts, and rank 0 writes the metrics to `argv[1]`.

Everything is built from seeds (tiny models, tokenizer and rows), so the test process can rebuild the same run alone.
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import Dataset
from distributed_probes import finish

from trl_nca import NCAConfig, NCATrainer
from trl_nca.tiny import build_tiny_model, build_tokenizer

WORDS = ["one", "two", "three", "blue", "green", "dog", "cat", "sky", "sea", "big"]


def rows(n: int = 8) -> list[dict]:
    """`n` prompts with K from 2 to 4 (ragged), rewards from a fixed formula."""
    out = []
    for i in range(n):
        k = 2 + i % 3
        completions = [" " + " ".join(WORDS[(i + j) % 10] for j in range(m + 1)) for m in range(k)]
        out.append({"prompt": f"what is {WORDS[i % 10]}?", "completions": completions,
                    "rewards": [float((i * 7 + 3 * m) % 5) for m in range(k)]})  # fmt: skip
    return out


def evaluate(layout: str, eval_dataset, output_dir: str) -> dict:
    tokenizer = build_tokenizer()
    args = NCAConfig(output_dir=output_dir, bf16=False, use_cpu=True, report_to="none", kway_layout=layout,
                     per_device_eval_batch_size=2, disable_tqdm=True, seed=0)  # fmt: skip
    trainer = NCATrainer(
        build_tiny_model(tokenizer, "mistral", seed=0),
        ref_model=build_tiny_model(tokenizer, "mistral", seed=1),
        args=args,
        train_dataset=Dataset.from_list(rows(2)),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()
    metrics["world_size"] = trainer.accelerator.num_processes
    return {key: value for key, value in metrics.items() if "runtime" not in key and "per_second" not in key}


def main(out: str) -> None:
    data = Dataset.from_list(rows())
    results = {
        f"{layout}/{kind}": evaluate(layout, data.to_iterable_dataset() if kind == "streamed" else data, out)
        for layout in ("padded", "shared_prompt")
        for kind in ("map", "streamed")
    }
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with open(f"{out}/metrics.json", "w") as handle:
            json.dump(results, handle)
    finish()


if __name__ == "__main__":
    main(sys.argv[1])
