#!/usr/bin/env python
"""Benchmark the K-way layouts of trl-nca against TRL's pairwise DPO and an SFT floor, on one machine, same data.

Every layout trains the same random-init Mistral-architecture policy (with a frozen reference model of the same shape)
through the real trainer, `trainer.train()`, on the same synthetic token rows (K = 4 responses per prompt), and a
callback timestamps each optimizer step. Layouts:

- `padded`: `NCATrainer`, `kway_layout="padded"` (the authors' layout: K right-padded prompt+response rows per prompt,
  the prompt computed K times).
- `shared_prompt`: `NCATrainer`, `kway_layout="shared_prompt"` (one row per prompt, the prompt once, the K responses
  as branches behind a 4D mask).
- `trl_dpo_pairs`: TRL's own `trl.DPOTrainer` (`loss_type="sigmoid"`) on the best-vs-rest pairs of the same rows
  (K - 1 = 3 pairs per prompt). One step takes all the pairs of the same prompts as one K-way step (3 pairs per prompt,
  `3 * prompts_per_step` pairs per step), so a step covers the same prompts and the per-epoch cost per prompt is
  `step time / prompts_per_step` for every layout. The only change to DPOTrainer is that its dataset tokenization is
  skipped, because the rows are token ids already.
- `sft_floor`: the cost floor of a step, the unique tokens computed once: `NCATrainer`, `kway_layout="padded"`, on rows
  with ONE response that is the K responses concatenated (one right-padded row per prompt: the prompt once, then
  R_1 R_2 ... R_K, a plain causal mask, no K-way mask, positions 0..L-1). It includes what the other layouts include:
  the policy forward+backward with TRL's fused LM head, a no-grad reference forward over the same tokens, the (now
  trivial) loss and metrics, gradient clipping and the AdamW step.
- `padded_precompute`, `shared_prompt_precompute`: as `padded` / `shared_prompt` with
  `precompute_ref_log_probs=True`: the reference pass runs once over the dataset when the trainer is built
  (`precompute_s`, not in the step time) and the steps run the policy only.

Packing several prompts into one row (`shared_prompt_packed`) is not built.

How the layouts are run: each in its own fresh subprocess (so its memory is its own), `--group-size` of them (default
4) alive together and interleaved step by step: the driver lets one process at a time build its trainer, then run
step 1, then hands the machine to the next (order reversed on every other step), so step i of every layout runs
within the same minute and a change in the load of a shared machine hits all of them alike. Layouts of a group hold
their memory at the same time; only one computes. The script sets `OMP_WAIT_POLICY=PASSIVE` (unless the environment
sets it): with the default spinning OpenMP waits, torch on a CPU box shared with other processes loses whole time
slices at every parallel region. `--in-process` runs the layouts one after the other in the calling process (for
tests: memory figures are then not per layout).

Measurements, per layout:

- `step_s_median`: median over the timed steps of `on_step_begin` -> `on_step_end`: forward(s) + backward + grad clip +
  optimizer + scheduler step. `wall_step_s_median` is the interval between consecutive `on_step_end` events minus the
  wait for the turn (adds the batch collation and the trainer's logging). The first `--warmup` steps are not timed.
  `cost_per_prompt_s` = `step_s_median / prompts_per_step`: the per-epoch cost per prompt.
- `peak_mem_mb` (CPU): the process's peak resident set size while `trainer.train()` runs (the kernel's high-water mark
  `VmHWM`, reset through `/proc/self/clear_refs` right before training; `ru_maxrss` when that is unavailable). It is
  process-wide: Python, torch, both models, gradients, AdamW state, activations, the LM-head tiles and allocator
  slack. `peak_mem_delta_mb` subtracts the resident set size just before training (models built, trainer ready). On
  CUDA: `torch.cuda.max_memory_allocated` over training and its growth.
- `unique_tokens`: over the timed steps, each prompt once plus each distinct response once; the same for every layout
  (the benchmark checks it, and that every layout saw the same prompts in the same steps). `computed_tokens`:
  positions the policy forward runs over the timed steps, padding included (`input_ids.numel()` of the collated
  batches; the reference forward runs the same positions unless precomputed); `nonpad_tokens`: the same without
  padding. `tokens_per_s`: unique tokens per timed step (mean) / `step_s_median`.
- `precompute_s` (precompute variants): the one-off reference pass over the `(warmup + steps) * prompts_per_step`
  prompts, timed around `_precompute_ref_logps`; `precompute_s_per_prompt` adds to `cost_per_prompt_s` per epoch.

Data: synthetic token ids with an UltraFeedback-like length mix (scaled down for a CPU): prompt and response lengths
are log-normal (medians `--prompt-median` / `--response-median`, sigma `--prompt-sigma` / `--response-sigma`),
clipped to `[--min-length, --prompt-max]` for prompts and `[--min-length, --max-length - prompt]` for responses (every
prompt+response fits `--max-length`: the keep_start truncation a trainer would apply, done once up front so every
layout sees exactly the same tokens). Rewards are UltraFeedback-like scores in [1, 10] (half points); they do not
change the cost. Token ids are uniform over the model's vocabulary (special ids excluded): the model has a 32k
vocabulary and is fed these ids directly; the small BPE tokenizer of `trl_nca.tiny` only supplies pad/EOS ids and
never encodes anything.

Example (the CPU run of docs/benchmarks.md)::

    python scripts/benchmark.py --json benchmark.json

A GPU path exists (`--model-size gpu-1b --dtype bf16`, CUDA picked automatically; peak memory from torch.cuda), not
measured yet: no GPU was available where this script was written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

# A micro run must not wait on the hub or spam progress bars; set before transformers/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
# OpenMP threads that spin while waiting (the library default) lose their time slices to other processes on a shared
# CPU box and stall every parallel region; blocking waits keep the measurement closer to a machine of one's own. Set
# before torch loads its OpenMP runtime; an explicit OMP_WAIT_POLICY in the environment wins (it is recorded).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_nca import NCAConfig, NCATrainer  # noqa: E402
from trl_nca.tiny import SPECIAL_TOKENS, build_tiny_model, build_tokenizer  # noqa: E402

K = 4
LAYOUTS = (
    "padded",
    "shared_prompt",
    "trl_dpo_pairs",
    "sft_floor",
    "padded_precompute",
    "shared_prompt_precompute",
)

# Mistral-architecture shapes (GQA, untied LM head, full attention). `cpu`: 21.1M parameters, 16.4M of them in the 32k
# embedding and LM head (sized so a step takes seconds on 2 CPU cores); `gpu-1b`: ~0.98B; `micro` is for the test.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "micro": dict(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=1000,
    ),
    "cpu": dict(
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        vocab_size=32000,
    ),
    "gpu-1b": dict(
        hidden_size=2048,
        num_hidden_layers=18,
        num_attention_heads=16,
        num_key_value_heads=8,
        intermediate_size=5632,
        vocab_size=32000,
    ),
}
DEFAULT_PROMPTS_PER_STEP = {"micro": 2, "cpu": 2, "gpu-1b": 8}


# ---------------------------------------------------------------------------------------------------------- data
def data_settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `sample_rows` keyword arguments (length distribution and seed) given on the command line."""
    return dict(
        prompt_median=args.prompt_median,
        prompt_sigma=args.prompt_sigma,
        response_median=args.response_median,
        response_sigma=args.response_sigma,
        min_length=args.min_length,
        prompt_max=args.prompt_max,
        max_length=args.max_length,
        seed=args.seed,
    )


def stratified_lognormal_lengths(
    n: int, median: float, sigma: float, low: int, high: int, rng: random.Random
) -> list[int]:
    """`n` log-normal lengths taken at the quantile midpoints `(i + 0.5) / n`, clipped to `[low, high]`, shuffled.

    Stratified rather than drawn at random, so that the few prompts a CPU run can afford follow the distribution
    (median, tail) instead of the luck of a dozen draws.
    """
    normal = statistics.NormalDist()
    lengths = [
        int(min(max(round(median * math.exp(sigma * normal.inv_cdf((i + 0.5) / n))), low), high)) for i in range(n)
    ]
    rng.shuffle(lengths)
    return lengths


def sample_rows(
    n_prompts: int,
    *,
    vocab_size: int,
    prompt_median: float,
    prompt_sigma: float,
    response_median: float,
    response_sigma: float,
    min_length: int,
    prompt_max: int,
    max_length: int,
    seed: int,
) -> list[dict[str, Any]]:
    """Tokenized K-way reward rows (`prompt_ids`, `completion_ids`, `rewards`, `hard_labels`) with random token ids.

    Lengths are stratified log-normal (see `stratified_lognormal_lengths`): prompts clipped to
    `[min_length, prompt_max]`, responses to `[min_length, max_length - prompt length]` (the keep_start truncation).
    """
    if prompt_max + min_length > max_length:
        raise ValueError(f"--prompt-max ({prompt_max}) + --min-length ({min_length}) must fit --max-length.")
    rng = random.Random(seed)
    first_id = len(SPECIAL_TOKENS)  # no pad/BOS/EOS/chat-marker ids inside the content

    def tokens(n: int) -> list[int]:
        return [rng.randrange(first_id, vocab_size) for _ in range(n)]

    prompt_lens = stratified_lognormal_lengths(n_prompts, prompt_median, prompt_sigma, min_length, prompt_max, rng)
    response_lens = stratified_lognormal_lengths(
        K * n_prompts, response_median, response_sigma, min_length, max_length, rng
    )
    rows = []
    for i, prompt_len in enumerate(prompt_lens):
        lens = [min(n, max_length - prompt_len) for n in response_lens[K * i : K * (i + 1)]]
        rows.append(
            {
                "prompt_ids": tokens(prompt_len),
                "completion_ids": [tokens(n) for n in lens],
                "rewards": [round(rng.uniform(1.0, 10.0) * 2) / 2 for _ in range(K)],
                "hard_labels": False,
            }
        )
    return rows


def length_stats(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median / p90 / max of the prompt and response lengths, and the prompt:response median ratio."""

    def describe(values: list[int]) -> dict[str, float]:
        ordered = sorted(values)
        return {
            "median": float(statistics.median(ordered)),
            "p90": float(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]),
            "max": float(ordered[-1]),
            "mean": float(statistics.fmean(ordered)),
        }

    prompts = [len(row["prompt_ids"]) for row in rows]
    responses = [len(c) for row in rows for c in row["completion_ids"]]
    stats = {"prompt": describe(prompts), "response": describe(responses)}
    stats["prompt_response_median_ratio"] = stats["prompt"]["median"] / stats["response"]["median"]
    return stats


def dpo_pair_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best-vs-rest preference pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`): K - 1 per prompt, prompt-major."""
    pairs = []
    for row in rows:
        best = max(range(len(row["rewards"])), key=lambda k: row["rewards"][k])
        for k, rejected in enumerate(row["completion_ids"]):
            if k != best:
                pairs.append(
                    {
                        "prompt_ids": row["prompt_ids"],
                        "chosen_ids": row["completion_ids"][best],
                        "rejected_ids": rejected,
                    }
                )
    return pairs


def sft_floor_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One response per prompt: the K responses concatenated (the unique tokens, one causal row behind the prompt)."""
    return [
        {
            "prompt_ids": row["prompt_ids"],
            "completion_ids": [[token for completion in row["completion_ids"] for token in completion]],
            "rewards": [0.0],
            "hard_labels": False,
        }
        for row in rows
    ]


def batch_unique_tokens(examples: Sequence[dict[str, Any]]) -> tuple[int, list[tuple[int, ...]]]:
    """Unique tokens of a batch of rows (each distinct prompt once, each distinct response of it once) and its prompts.

    Works for K-way rows, DPO pair rows and SFT-floor rows alike, so every layout counts the same quantity.
    """
    responses: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
    for example in examples:
        seen = responses.setdefault(tuple(example["prompt_ids"]), set())
        if "completion_ids" in example:
            seen.update(tuple(c) for c in example["completion_ids"])
        else:
            seen.update((tuple(example["chosen_ids"]), tuple(example["rejected_ids"])))
    total = sum(len(prompt) + sum(len(r) for r in seen) for prompt, seen in responses.items())
    return total, sorted(responses)


# ---------------------------------------------------------------------------------------------------------- worker
class _PretokenizedDPOTrainer(DPOTrainer):
    """`trl.DPOTrainer` unchanged, except that dataset tokenization is skipped: the rows are token ids already."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class _TimedNCATrainer(NCATrainer):
    """`NCATrainer` that records how long the reference log-prob precompute takes (`precompute_s`)."""

    precompute_s: float = 0.0

    def _precompute_ref_logps(self, dataset, name, batch_size):
        start = time.perf_counter()
        result = super()._precompute_ref_logps(dataset, name, batch_size)
        self.precompute_s += time.perf_counter() - start
        return result


class _Turns:
    """Turn-taking with the driver process: `wait()` blocks until the driver says go, `done()` hands the turn back.

    Without file descriptors (in-process runs) both are no-ops.
    """

    def __init__(self, go_fd: int | None = None, done_fd: int | None = None):
        self.go_fd, self.done_fd = go_fd, done_fd

    def wait(self) -> None:
        if self.go_fd is not None and os.read(self.go_fd, 1) != b"1":
            raise RuntimeError("The benchmark driver went away.")

    def done(self) -> None:
        if self.done_fd is not None:
            os.write(self.done_fd, b"1")


class _StepTimer(TrainerCallback):
    """Timestamps of every optimizer step's begin and end (after a device sync on CUDA), one turn per step."""

    def __init__(self, cuda: bool, turns: _Turns):
        self.cuda = cuda
        self.turns = turns
        self.begin: list[float] = []
        self.end: list[float] = []
        self.waited: list[float] = []  # time spent waiting for the turn (other layouts' steps)

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        before = self._now()
        self.turns.wait()
        self.begin.append(self._now())
        self.waited.append(self.begin[-1] - before)

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append(self._now())
        self.turns.done()


class _CountingCollator:
    """Wraps the trainer's collator: records, per training batch, its unique tokens, prompts and computed positions."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[dict[str, Any]] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        unique, prompts = batch_unique_tokens(examples)
        nonpad = batch["padding_mask"] if "padding_mask" in batch else batch["attention_mask"]
        self.batches.append(
            {
                "unique_tokens": unique,
                "prompts": prompts,
                "computed_tokens": int(batch["input_ids"].numel()),
                "nonpad_tokens": int(nonpad.sum()),
                "rows": int(batch["input_ids"].size(0)),
            }
        )
        return batch


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def run_layout(
    layout: str, rows: list[dict[str, Any]], settings: dict[str, Any], turns: _Turns | None = None
) -> dict[str, Any]:
    """Train `warmup + steps` steps of one layout through its real trainer and return its timings and counts.

    With `turns`, building the trainer (and any reference precompute) is one turn and every step is one turn, so
    several layout processes can be interleaved step by step by the driver.
    """
    turns = turns or _Turns()
    turns.wait()
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    device = settings["device"]
    cuda = device == "cuda"
    bf16 = settings["dtype"] == "bf16"
    prompts_per_step = settings["prompts_per_step"]
    total_steps = settings["warmup"] + settings["steps"]
    rows = rows[: total_steps * prompts_per_step]
    precompute = layout.endswith("_precompute")

    tokenizer = build_tokenizer()  # pad/EOS ids only: the rows are token ids already
    size = dict(MODEL_SIZES[settings["model_size"]])

    def model(seed: int):
        built = build_tiny_model(
            tokenizer,
            "mistral",
            attn_implementation=settings["attn"],
            seed=seed,
            max_position_embeddings=8192,  # the sft_floor rows hold a prompt and K responses
            **size,
        )
        return built.to(torch.bfloat16) if bf16 else built

    policy = model(seed=0)
    n_params = sum(p.numel() for p in policy.parameters())
    # Precompute variants keep no reference model during training (DPOTrainer drops it too): the precompute pass
    # scores the dataset with the initial policy, which has the same cost as a separate reference.
    ref = None if precompute else model(seed=1)

    common = dict(
        output_dir=settings["output_dir"],
        bf16=bf16,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        learning_rate=1e-6,
        beta=0.1,
        max_steps=total_steps,
        logging_steps=total_steps,
        max_length=None,  # rows are already cut to --max-length per prompt+response
        train_sampling_strategy="sequential",  # step i takes prompts [i*B, (i+1)*B) in every layout
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    start = time.perf_counter()
    if layout == "trl_dpo_pairs":
        trainer = _PretokenizedDPOTrainer(
            policy,
            ref_model=ref,
            args=DPOConfig(per_device_train_batch_size=(K - 1) * prompts_per_step, **common),
            train_dataset=Dataset.from_list(dpo_pair_rows(rows)),
            processing_class=tokenizer,
        )
    else:
        kway_layout = "padded" if layout in ("sft_floor", "padded_precompute") else layout
        kway_layout = "shared_prompt" if layout == "shared_prompt_precompute" else kway_layout
        data = sft_floor_rows(rows) if layout == "sft_floor" else rows
        trainer = _TimedNCATrainer(
            policy,
            ref_model=ref,
            args=NCAConfig(
                per_device_train_batch_size=prompts_per_step,
                kway_layout=kway_layout,
                precompute_ref_log_probs=precompute,
                precompute_ref_batch_size=prompts_per_step,
                **common,
            ),
            train_dataset=Dataset.from_list(data),
            processing_class=tokenizer,
        )
        if trainer.data_collator.layout != kway_layout:
            raise RuntimeError(f"{layout}: expected the {kway_layout} collator, got {trainer.data_collator.layout}.")
    init_s = time.perf_counter() - start
    turns.done()
    timer = _StepTimer(cuda, turns)
    trainer.add_callback(timer)
    trainer.remove_callback(PrinterCallback)  # no per-step log dicts on stdout
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    del policy, ref  # the trainer holds what training needs

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline_mb = torch.cuda.memory_allocated() / 2**20
        mem_method = "torch.cuda.max_memory_allocated during trainer.train()"
    else:
        baseline_mb = (_proc_status_kb("VmRSS") or 0) / 1024
        if _reset_peak_rss() and _proc_status_kb("VmHWM") is not None:
            mem_method = "peak RSS (VmHWM, reset via /proc/self/clear_refs) during trainer.train(), fresh process"
        else:
            mem_method = "ru_maxrss of the process (includes model construction), fresh process"
    trainer.train()
    if cuda:
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    elif mem_method.startswith("peak RSS"):
        peak_mb = _proc_status_kb("VmHWM") / 1024
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    if len(timer.end) != total_steps or len(counter.batches) < total_steps:
        raise RuntimeError(f"{layout}: expected {total_steps} steps, timed {len(timer.end)}.")
    warmup = settings["warmup"]
    timed = counter.batches[warmup:total_steps]
    return {
        "trainer": "trl.DPOTrainer" if layout == "trl_dpo_pairs" else "trl_nca.NCATrainer",
        "collator_layout": getattr(trainer.data_collator.inner, "layout", "trl.DataCollatorForPreference"),
        "prompts_per_step": prompts_per_step,
        "step_s": [end - begin for begin, end in zip(timer.begin[warmup:], timer.end[warmup:])],
        # end-to-end per step (batch collation and logging included), the turn waits taken out
        "wall_step_s": [timer.end[i] - timer.end[i - 1] - timer.waited[i] for i in range(max(warmup, 1), total_steps)],
        "rows": [b["rows"] for b in timed],
        "unique_tokens": [b["unique_tokens"] for b in timed],
        "computed_tokens": [b["computed_tokens"] for b in timed],
        "nonpad_tokens": [b["nonpad_tokens"] for b in timed],
        "prompts": [b["prompts"] for b in counter.batches[:total_steps]],
        "init_s": init_s,
        "precompute_s": getattr(trainer, "precompute_s", 0.0) if precompute else None,
        "precomputed_prompts": len(rows) if precompute else 0,
        "peak_mem_mb": peak_mb,
        "mem_baseline_mb": baseline_mb,
        "mem_method": mem_method,
        "torch_threads": torch.get_num_threads(),
        "model_parameters": n_params,
    }


def summarize(part: dict[str, Any]) -> dict[str, Any]:
    """One layout's reported figures from its worker's raw measurements."""
    step_s, wall_s = part["step_s"], part["wall_step_s"]
    step_median = statistics.median(step_s)
    prompts_per_step = part["prompts_per_step"]
    unique = sum(part["unique_tokens"])
    precompute_s = part["precompute_s"]
    return {
        "trainer": part["trainer"],
        "collator_layout": part["collator_layout"],
        "prompts_per_step": prompts_per_step,
        "rows_per_step": statistics.median(part["rows"]),
        "step_s": step_s,
        "step_s_median": step_median,
        "step_s_total": sum(step_s),
        "wall_step_s_median": statistics.median(wall_s) if wall_s else None,
        "cost_per_prompt_s": step_median / prompts_per_step,
        "init_s": part["init_s"],
        "precompute_s": precompute_s,
        "precompute_s_per_prompt": None if precompute_s is None else precompute_s / part["precomputed_prompts"],
        "peak_mem_mb": part["peak_mem_mb"],
        "peak_mem_delta_mb": part["peak_mem_mb"] - part["mem_baseline_mb"],
        "mem_baseline_mb": part["mem_baseline_mb"],
        "mem_method": part["mem_method"],
        "unique_tokens": unique,
        "unique_tokens_per_step": part["unique_tokens"],
        "computed_tokens": sum(part["computed_tokens"]),
        "nonpad_tokens": sum(part["nonpad_tokens"]),
        "tokens_per_s": unique / len(step_s) / step_median,
        "timed_steps": len(step_s),
        "data_digest": hashlib.sha1(json.dumps(part["prompts"]).encode()).hexdigest(),
        "torch_threads": part["torch_threads"],
        "model_parameters": part["model_parameters"],
    }


def _worker(spec_path: str, result_path: str, go_fd: int | None = None, done_fd: int | None = None) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["rows_path"]) as f:
        rows = json.load(f)
    result = run_layout(spec["layout"], rows, spec["settings"], _Turns(go_fd, done_fd))
    with open(result_path, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------------------------------------------------- driver
def environment(device: str) -> dict[str, Any]:
    """Versions, threads and the processor the numbers were measured on."""
    cpu_model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            match = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        cpu_model = match.group(1).strip() if match else cpu_model
    except OSError:
        pass
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "device": device,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def compute_ratios(layouts: dict[str, dict[str, Any]]) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """The headline ratios and the pass/fail of each performance target (None where a layout was not run)."""

    def get(name: str, key: str) -> float | None:
        return layouts.get(name, {}).get(key)

    ratios = {
        "padded_over_shared_step": _ratio(get("padded", "step_s_median"), get("shared_prompt", "step_s_median")),
        "shared_over_sft_floor_step": _ratio(get("shared_prompt", "step_s_median"), get("sft_floor", "step_s_median")),
        "padded_over_sft_floor_step": _ratio(get("padded", "step_s_median"), get("sft_floor", "step_s_median")),
        "trl_dpo_over_shared_per_epoch": _ratio(
            get("trl_dpo_pairs", "cost_per_prompt_s"), get("shared_prompt", "cost_per_prompt_s")
        ),
        "trl_dpo_over_padded_per_epoch": _ratio(
            get("trl_dpo_pairs", "cost_per_prompt_s"), get("padded", "cost_per_prompt_s")
        ),
        "shared_over_padded_peak_mem": _ratio(get("shared_prompt", "peak_mem_mb"), get("padded", "peak_mem_mb")),
        "shared_over_padded_peak_mem_delta": _ratio(
            get("shared_prompt", "peak_mem_delta_mb"), get("padded", "peak_mem_delta_mb")
        ),
        "shared_over_trl_dpo_peak_mem": _ratio(
            get("shared_prompt", "peak_mem_mb"), get("trl_dpo_pairs", "peak_mem_mb")
        ),
        "padded_over_shared_computed_tokens": _ratio(
            get("padded", "computed_tokens"), get("shared_prompt", "computed_tokens")
        ),
        "shared_precompute_over_shared_step": _ratio(
            get("shared_prompt_precompute", "step_s_median"), get("shared_prompt", "step_s_median")
        ),
        "padded_precompute_over_shared_precompute_step": _ratio(
            get("padded_precompute", "step_s_median"), get("shared_prompt_precompute", "step_s_median")
        ),
    }
    # Paired: the layouts run the same batches in the same order, so step i of one layout and step i of another did
    # the same work; the median of the per-step ratios is less sensitive to a noisy box than a ratio of medians.
    pairs = {
        "padded_over_shared_step": ("padded", "shared_prompt"),
        "shared_over_sft_floor_step": ("shared_prompt", "sft_floor"),
        "trl_dpo_over_shared_per_epoch": ("trl_dpo_pairs", "shared_prompt"),
    }
    for name, (a, b) in pairs.items():
        steps_a, steps_b = get(a, "step_s"), get(b, "step_s")
        ratios[f"{name}_paired_median"] = (
            statistics.median(x / y for x, y in zip(steps_a, steps_b)) if steps_a and steps_b else None
        )
    targets = [
        ("shared_prompt >= 1.5x faster than padded", ratios["padded_over_shared_step"], ">=", 1.5),
        ("shared_prompt <= 1.10x the SFT floor", ratios["shared_over_sft_floor_step"], "<=", 1.10),
        ("shared_prompt >= 2x cheaper per epoch than TRL DPO", ratios["trl_dpo_over_shared_per_epoch"], ">=", 2.0),
        ("shared_prompt peak memory <= padded's", ratios["shared_over_padded_peak_mem"], "<=", 1.0),
    ]
    checked = [
        {
            "target": name,
            "value": value,
            "threshold": f"{op} {threshold}",
            "met": None if value is None else (value >= threshold if op == ">=" else value <= threshold),
        }
        for name, value, op, threshold in targets
    ]
    return ratios, checked


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the per-layout figures."""
    header = (
        "| layout | step s (median) | step s (min-max) | wall s/step | s/prompt | unique tok | computed tok | "
        "unique tok/s | peak MB | peak delta MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in result["layouts"].items():
        wall = row["wall_step_s_median"]
        lines.append(
            f"| {name} | {row['step_s_median']:.3f} | {min(row['step_s']):.3f}-{max(row['step_s']):.3f} | "
            f"{'-' if wall is None else f'{wall:.3f}'} | {row['cost_per_prompt_s']:.3f} | {row['unique_tokens']} | "
            f"{row['computed_tokens']} | {row['tokens_per_s']:.0f} | {row['peak_mem_mb']:.0f} | "
            f"{row['peak_mem_delta_mb']:.0f} |"
        )
    return "\n".join(lines)


def _interleaved(
    layouts: Sequence[str], rows_path: str, settings: dict[str, Any], tmp: str, total_turns: int
) -> dict[str, dict[str, Any]]:
    """Run `layouts` in one subprocess each, alive together, and give them the machine one at a time.

    Turn 0 builds each trainer; turn i >= 1 runs each layout's step i, the order reversed on every other turn. Step i
    of every layout therefore runs within the same short window, so a change in the load of a shared machine hits all
    layouts alike. Only one worker computes at any time; the others block on a pipe.
    """
    workers = []
    try:
        for layout in layouts:
            spec_path, result_path = os.path.join(tmp, f"{layout}.spec.json"), os.path.join(tmp, f"{layout}.json")
            with open(spec_path, "w") as f:
                json.dump({"layout": layout, "rows_path": rows_path, "settings": settings}, f)
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            command = [sys.executable, os.path.abspath(__file__), "--_worker", spec_path, result_path]
            process = subprocess.Popen([*command, str(go_r), str(done_w)], pass_fds=(go_r, done_w))
            os.close(go_r)
            os.close(done_w)
            workers.append({"layout": layout, "process": process, "go": go_w, "done": done_r, "result": result_path})
        for turn in range(total_turns):
            for worker in workers if turn % 2 == 0 else reversed(workers):
                os.write(worker["go"], b"1")
                if os.read(worker["done"], 1) != b"1":
                    raise RuntimeError(f"The {worker['layout']} worker exited during turn {turn}.")
        results = {}
        for worker in workers:
            if worker["process"].wait() != 0:
                raise RuntimeError(f"The {worker['layout']} worker failed (exit code {worker['process'].returncode}).")
            with open(worker["result"]) as f:
                results[worker["layout"]] = json.load(f)
        return results
    finally:
        for worker in workers:
            os.close(worker["go"])
            os.close(worker["done"])
            if worker["process"].poll() is None:
                worker["process"].kill()
                worker["process"].wait()


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Sample the rows once, run every layout on them and collect the figures.

    Layouts run in groups of `--group-size` (in `--layouts` order); the layouts of a group are interleaved step by
    step (see `_interleaved`), each in its own process. `--in-process` runs them one after the other in this process.
    """
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = MODEL_SIZES[args.model_size]
    prompts_per_step = args.prompts_per_step or DEFAULT_PROMPTS_PER_STEP[args.model_size]
    n_prompts = (args.warmup + args.steps) * prompts_per_step
    data_settings = data_settings_from_args(args)
    rows = sample_rows(n_prompts, vocab_size=size["vocab_size"], **data_settings)
    settings = dict(
        model_size=args.model_size,
        attn=args.attn,
        dtype=args.dtype,
        device=device,
        prompts_per_step=prompts_per_step,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
    )
    groups = [args.layouts[i : i + args.group_size] for i in range(0, len(args.layouts), args.group_size)]
    result: dict[str, Any] = {
        "config": {
            **settings,
            "k": K,
            "layouts": list(args.layouts),
            "isolation": (
                "in-process, one layout after the other"
                if args.in_process
                else "one subprocess per layout; the layouts of a group interleaved step by step"
            ),
            "groups": None if args.in_process else groups,
            "model_shape": size,
            "n_prompts": n_prompts,
            "data": {**data_settings, "distribution": "stratified log-normal lengths, clipped; random token ids"},
        },
        "data_stats": length_stats(rows),
        "environment": environment(device),
        "layouts": {},
        "not_built": ["shared_prompt_packed (several prompts packed into one row)"],
    }
    raw: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="trl-nca-bench-") as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        with open(rows_path, "w") as f:
            json.dump(rows, f)
        for layout in args.layouts if args.in_process else []:
            print(f"[benchmark] {layout}: {args.warmup} warm-up + {args.steps} timed steps ...", flush=True)
            raw[layout] = run_layout(layout, rows, {**settings, "output_dir": os.path.join(tmp, layout)})
        for group in [] if args.in_process else groups:
            print(f"[benchmark] {', '.join(group)}: {args.warmup} warm-up + {args.steps} timed steps, interleaved")
            group_settings = {**settings, "output_dir": os.path.join(tmp, "out")}
            raw.update(_interleaved(group, rows_path, group_settings, tmp, 1 + args.warmup + args.steps))
    for layout in args.layouts:
        result["layouts"][layout] = summarize(raw[layout])
        print(f"[benchmark] {layout}: steps (s) {', '.join(f'{t:.2f}' for t in raw[layout]['step_s'])}", flush=True)
    result["config"]["model_parameters"] = next(iter(result["layouts"].values()))["model_parameters"]
    digests = {row["data_digest"] for row in result["layouts"].values()}
    uniques = {row["unique_tokens"] for row in result["layouts"].values()}
    result["same_data"] = len(digests) == 1 and len(uniques) == 1
    if not result["same_data"]:
        raise RuntimeError(f"The layouts did not see the same data: digests {digests}, unique tokens {uniques}.")
    result["ratios"], result["targets"] = compute_ratios(result["layouts"])
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per layout (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per layout (default 1)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=4,
        help="layouts interleaved step by step at a time, each in its own process (default 4; all of a group's "
        "processes hold their memory at once)",
    )
    parser.add_argument(
        "--prompts-per-step", type=int, default=None, help="prompts per step (default: 2 on cpu, 8 on gpu-1b)"
    )
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="cpu")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--prompt-median", type=float, default=100.0)
    parser.add_argument("--prompt-sigma", type=float, default=0.8)
    parser.add_argument("--response-median", type=float, default=250.0)
    parser.add_argument("--response-sigma", type=float, default=0.6)
    parser.add_argument("--min-length", type=int, default=8)
    parser.add_argument("--prompt-max", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=768, help="max tokens per prompt+response")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the layouts in this process (fast, for tests); peak memory is then not isolated per layout",
    )
    parser.add_argument("--_worker", nargs="+", metavar="SPEC RESULT [GO_FD DONE_FD]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.group_size < 1:
        parser.error("--steps and --group-size must be >= 1, --warmup >= 0.")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark, print the table and write the JSON; returns the results (None in a worker process)."""
    args = parse_args(argv)
    if args._worker:
        spec_path, result_path, *fds = args._worker
        _worker(spec_path, result_path, *(int(fd) for fd in fds))
        return None
    result = run_benchmark(args)
    print()
    print(format_table(result))
    print()
    for name, value in result["ratios"].items():
        print(f"{name}: {'n/a' if value is None else f'{value:.3f}'}")
    for target in result["targets"]:
        status = "n/a" if target["met"] is None else ("MET" if target["met"] else "MISSED")
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        print(f"target: {target['target']}: {value} ({target['threshold']}) {status}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
