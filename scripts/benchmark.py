#!/usr/bin/env python
"""Benchmark the K-way layouts of trl-nca against the strongest baselines, on one machine, same data.

Every layout trains the same random-init Mistral-architecture policy (with a frozen reference model of the same shape)
through the real trainer, `trainer.train()`, on the same synthetic token rows (K = 4 responses per prompt), and a
callback timestamps each optimizer step. Layouts (`LAYOUT_SPECS`):

- `padded`: `NCATrainer`, `kway_layout="padded"` (the authors' layout: K right-padded prompt+response rows per prompt,
  the prompt computed K times).
- `padded_padding_free`: the same, `padding_free=True`: the B*K prompt+response sequences of the step concatenated in
  ONE row, `position_ids` restarting at 0 per sequence, no attention mask (transformers derives the packed causal
  mask from the positions). It computes K*P + sum(R) positions per prompt and no padding: the strongest baseline
  without prefix sharing.
- `padded_flash`, `padded_padding_free_flash`: the two above with `attn_implementation="flash_attention_2"`
  (variable-length kernels); CUDA only, and only where `flash_attn` is importable.
- `shared_prompt`: `kway_layout="shared_prompt"` (one row per prompt, the prompt once, the K responses as branches;
  the collator emits O(L) metadata and the trainer builds the mask on the device).
- `shared_prompt_packed`: the same, `padding_free=True` (all prompts of the step, each with its K branches, in one
  row). Per prompt it computes P - 1 + sum(R + 1) positions (the last prompt token heads every branch).
- `shared_prompt_flex`, `shared_prompt_packed_flex`: the two above with `attn_implementation="flex_attention"` (a
  `BlockMask`; transformers compiles flex_attention). CUDA only: torch has no FlexAttention backward on CPU.
- `trl_dpo_pairs`: TRL's own `trl.DPOTrainer` (`loss_type="sigmoid"`) on the best-vs-rest pairs of the same rows
  (K - 1 = 3 pairs per prompt). One step takes all the pairs of the same prompts as one K-way step (3 pairs per prompt,
  `3 * prompts_per_step` pairs per step), so a step covers the same prompts and the per-epoch cost per prompt is
  `step time / prompts_per_step` for every layout. The only change to DPOTrainer is that its dataset tokenization is
  skipped, because the rows are token ids already.
- `trl_dpo_precompute`: the same with `precompute_ref_log_probs=True`: the strongest TRL baseline (TRL 1.16's
  DPOTrainer turns `padding_free` off, "temporarily unavailable", so its pairs stay padded).
- `sft_floor`: the cost floor of a step, the unique tokens computed once: `NCATrainer`, `kway_layout="padded"`, on rows
  with ONE response that is the K responses concatenated (one right-padded row per prompt: the prompt once, then
  R_1 R_2 ... R_K, a plain causal mask, positions 0..L-1). It includes what the other layouts include: the policy
  forward+backward with TRL's fused LM head, a no-grad reference forward over the same tokens, the (now trivial) loss
  and metrics, gradient clipping and the AdamW step.
- `padded_precompute`, `shared_prompt_precompute`: as `padded` / `shared_prompt` with
  `precompute_ref_log_probs=True`: the reference pass runs once over the dataset when the trainer is built
  (`precompute_s`, not in the step time) and the steps run the policy only.
- `shared_prompt_plackett_luce`, `shared_prompt_lipo_lambda` (`LISTWISE_LAYOUTS`, issue #20): as `shared_prompt`, with
  `trl_nca.ListwiseTrainer` instead of `NCATrainer`: `loss_type=["plackett_luce"]`, and `["lipo_lambda"]` with
  `lipo_label_normalization="minmax"` (the rewards are 1-10 scores). Same forward, same data: only the loss on the
  (prompts, K) log-probs differs. Not in the presets: run them with `shared_prompt` in one group (`--layouts
  shared_prompt shared_prompt_plackett_luce shared_prompt_lipo_lambda`) so their steps interleave.

Layouts the device cannot run (flex and FlashAttention-2 on CPU; FlashAttention-2 in fp32 or where transformers'
`is_flash_attn_2_available()`, the check it makes when a model is loaded with it, is False) are skipped with a printed
line and recorded under `skipped` in the JSON, unless named in `--layouts`: then the script stops with a one-line
error. A layout that fails while it runs (a flash-attn wheel built for another torch, Triton without a compiler, out of
memory, a worker process killed) does not stop the others: its error, one line (the exception type and message), is
recorded under `mixes.<mix>.failed` and `failed` in the JSON and as a FAILED row of the table, and the script exits
non-zero only when every layout failed.

Data mixes (`--mix`, one result per mix in the JSON, under `mixes`): synthetic token ids, log-normal lengths
(`MIXES`), K = 4 responses per prompt:

- `ultrafeedback`: UltraFeedback-like, prompt:response median ratio 0.4. Full scale (`--scale full`, the GPU preset):
  prompt median 160 (sigma 0.8, at most 1024), response median 400 (sigma 0.6), max_length 2048.
- `long_prompt`: multi-turn / few-shot / retrieval-like, prompt:response median ratio 3. Full scale: prompt median 600
  (sigma 0.5, at most 1536), response median 200 (sigma 0.6), max_length 2048.

The CPU scale (`--scale cpu`, the CPU preset) multiplies both mixes' medians by 0.625 and clips them to max_length 768
(prompts to 512 / 640): UltraFeedback-like 100 / 250 (the v1 CPU defaults), long-prompt 375 / 125, ratios kept.
`--length-scale S` multiplies the medians, the prompt cap and max_length once more (tests, shorter runs); the
`--prompt-median` ... `--max-length` options override a field for every mix. Lengths are stratified (quantile
midpoints, shuffled) and clipped to `[--min-length, prompt cap]` for prompts and `[--min-length, max_length - prompt]`
for responses (every prompt+response fits max_length: the keep_start truncation a trainer would apply, done once up
front so every layout sees exactly the same tokens). Rewards are scores in [1, 10] (half points); they do not change
the cost. Token ids are uniform over the model's vocabulary (special ids excluded); the small BPE tokenizer of
`trl_nca.tiny` only supplies pad/EOS ids and never encodes anything.

How the layouts are run: each in its own fresh subprocess (so its memory is its own), `--group-size` of them alive
together and interleaved step by step: the driver lets one process at a time build its trainer, then run step 1, then
hands the machine to the next (order reversed on every other step), so step i of every layout runs within the same
minute and a change in the load of a shared machine hits all of them alike. Layouts of a group hold their memory at
the same time; only one computes. The script sets `OMP_WAIT_POLICY=PASSIVE` (unless the environment sets it): with
the default spinning OpenMP waits, torch on a CPU box shared with other processes loses whole time slices at every
parallel region. `--in-process` runs the layouts one after the other in the calling process (for tests: memory
figures are then not per layout).

Measurements, per layout (per mix):

- `step_s_median`: median over the timed steps of `on_step_begin` -> `on_step_end`: forward(s) + backward + grad clip +
  optimizer + scheduler step (the device attention mask is built inside it). `wall_step_s_median` is the interval
  between consecutive `on_step_end` events minus the wait for the turn (adds the batch collation and the trainer's
  logging). The first `--warmup` steps are not timed. `cost_per_prompt_s` = `step_s_median / prompts_per_step`.
- `collator_s_median`: time inside the data collator for the step's batch (it runs outside the step window);
  `collator_fraction` = collator / (step + collator).
- `host_tensor_max_bytes` / `_shape` / `_name`: the largest tensor the collator returns (over the timed steps);
  `host_tensor_max_over_input_ids`: its element count over that of `input_ids` (> 1 would mean a tensor that grows
  faster than the tokens, e.g. an (L, L) mask).
- `device_mask_bytes` / `_shape` / `_kind`: the largest attention mask the model's layers got in a step (what the
  Mistral model's `create_causal_mask` returns: the trainer's shared-prompt mask as passed in, or the mask
  transformers builds itself for the padded layouts: padding mask, packed-sequence mask, or None), measured with
  `trl_nca.attention.mask_nbytes` (a dense (B, 1, L, L) bool mask is B*L*L bytes, a BlockMask its index tensors).
  `mask_build_s_median`: time in the trainer's `_attention_mask` per step.
- `computed_tokens`: positions the policy forward runs over the timed steps, padding included (`input_ids.numel()`);
  `nonpad_tokens` without padding; `unique_tokens`: each prompt once plus each response once, equal for every layout
  (checked, with the prompts of every step). Per mix, `positions` gives the analytic counts of the timed steps:
  `padded_padding_free` K*P + sum(R), `shared_prompt` P - 1 + sum(R + 1), and `position_limit` = their ratio, the
  most prefix sharing can save over the packed padded baseline.
- `tokens_per_s` (unique tokens per step / median step), `computed_tokens_per_s`, and `mfu`: model FLOPs utilisation,
  `model_flops_per_step / step_s_median / peak`, with model FLOPs counted on the unique tokens U of a step:
  `(6 + 2r) * N * U + (12 + 4r) * n_layers * d_attn * A`, r = 1 when the reference forward runs in the step (0 when
  precomputed), N = the parameters less the input embedding (the LM head counts), d_attn = heads * head_dim, and
  A = the (query, key) pairs of causal attention over the unique tokens (prompt token i sees i keys, response token j
  sees P + j). Recomputation (gradient checkpointing) and padding do not count. The peak is the dense bf16 figure of
  the detected GPU (`GPU_PEAK_BF16_TFLOPS`, e.g. H100 SXM / H200 989.4 TFLOPs) or `--peak-tflops`; none on CPU.
- `peak_mem_mb` (CPU): the process's peak resident set size while `trainer.train()` runs (`VmHWM`, reset through
  `/proc/self/clear_refs` right before training; `ru_maxrss` when that is unavailable); `peak_mem_delta_mb` subtracts
  the resident set size just before training. On CUDA: `torch.cuda.max_memory_allocated` over training and its growth.
- `precompute_s` (precompute variants): the one-off reference pass over the `(warmup + steps) * prompts_per_step`
  prompts, timed around `_precompute_ref_logps`; `precompute_s_per_prompt` adds to `cost_per_prompt_s` per epoch.

Per mix, `ratios` and `targets` (issue #10): the best shared-prompt variant (fastest of `shared_prompt*`, precompute
excluded) >= 0.9 x `position_limit` faster per step than `padded_padding_free` and >= 1.8x faster than `padded`, its
collator <= 2% of the step, no collator tensor larger than `input_ids`, its peak memory <= `padded_padding_free`'s; on
CUDA the best flex variant >= 0.9 x `position_limit` over `padded_padding_free_flash`. `targets_v1` keeps the v1
checks of `shared_prompt`. The listwise layouts get `<loss>_over_nca_step` (ratio of the median steps),
`<loss>_over_nca_step_paired_median` (median over the timed steps of the per-step ratio: step i of both layouts ran
the same batch, interleaved), `<loss>_over_nca_step_paired_min` / `_max` and `<loss>_over_nca_peak_mem`, against
`shared_prompt` (issue #20: the same cost as NCA per step). Timings are reported, never asserted by the tests.

Presets (`--preset`; any option given explicitly wins):

- `cpu` (default): the `cpu` model (21.1M parameters, 16.4M of them in the 32k embedding and LM head), fp32, sdpa,
  2 prompts per step, CPU-scale mixes, 1 warm-up + 6 timed steps, groups of 4.
- `gpu`: the `gpu-1b` model (~0.98B, hidden 2048, 18 layers, 16 heads, 8 KV heads), bf16, 8 prompts per step, both
  mixes at full scale (max_length 2048), gradient checkpointing, 2 warm-up + 8 timed steps, one layout at a time,
  layouts led by the packed, FlashAttention-2 and (compiled) flex variants; prints tokens/s and MFU. With
  `--model-size micro` it runs on a CPU too (flex / FA2 layouts skipped), which the tests do.

Examples::

    python scripts/benchmark.py --json benchmark.json                      # CPU preset, both mixes
    python scripts/benchmark.py --preset gpu --json gpu.json               # on a CUDA machine
    python scripts/benchmark.py --mix ultrafeedback --steps 12 --layouts shared_prompt shared_prompt_plackett_luce \
        shared_prompt_lipo_lambda --json listwise.json                     # listwise vs NCA, interleaved
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
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
from accelerate.utils.memory import clear_device_cache  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from transformers.models.mistral import modeling_mistral  # noqa: E402
from transformers.utils import is_flash_attn_2_available  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from trl_nca import ListwiseConfig, ListwiseTrainer, NCAConfig, NCATrainer  # noqa: E402
from trl_nca.attention import mask_nbytes  # noqa: E402
from trl_nca.tiny import SPECIAL_TOKENS, build_tiny_model, build_tokenizer  # noqa: E402

K = 4

# What each layout runs: the trainer ("nca" = trl_nca.NCATrainer, "listwise" = trl_nca.ListwiseTrainer with the config
# options in `loss`, "dpo" = trl.DPOTrainer on pairs), the K-way layout, `padding_free`, `precompute_ref_log_probs`,
# the attention implementation (None = `--attn`) and the rows it trains on.
LAYOUT_SPECS: dict[str, dict[str, Any]] = {
    "padded": dict(trainer="nca", kway_layout="padded"),
    "padded_padding_free": dict(trainer="nca", kway_layout="padded", padding_free=True),
    "shared_prompt": dict(trainer="nca", kway_layout="shared_prompt"),
    "shared_prompt_packed": dict(trainer="nca", kway_layout="shared_prompt", padding_free=True),
    "sft_floor": dict(trainer="nca", kway_layout="padded", rows="sft_floor"),
    "trl_dpo_pairs": dict(trainer="dpo"),
    "padded_precompute": dict(trainer="nca", kway_layout="padded", precompute=True),
    "shared_prompt_precompute": dict(trainer="nca", kway_layout="shared_prompt", precompute=True),
    "trl_dpo_precompute": dict(trainer="dpo", precompute=True),
    "padded_flash": dict(trainer="nca", kway_layout="padded", attn="flash_attention_2"),
    "padded_padding_free_flash": dict(
        trainer="nca", kway_layout="padded", padding_free=True, attn="flash_attention_2"
    ),
    "shared_prompt_flex": dict(trainer="nca", kway_layout="shared_prompt", attn="flex_attention"),
    "shared_prompt_packed_flex": dict(
        trainer="nca", kway_layout="shared_prompt", padding_free=True, attn="flex_attention"
    ),
    "shared_prompt_plackett_luce": dict(
        trainer="listwise", kway_layout="shared_prompt", loss=dict(loss_type=["plackett_luce"])
    ),
    "shared_prompt_lipo_lambda": dict(
        trainer="listwise",
        kway_layout="shared_prompt",
        loss=dict(loss_type=["lipo_lambda"], lipo_label_normalization="minmax"),
    ),
}
LAYOUTS = tuple(LAYOUT_SPECS)
# The listwise objectives (issue #20), each compared with NCA on the same layout (`shared_prompt`); not in the presets.
LISTWISE_LAYOUTS = {"shared_prompt_plackett_luce": "plackett_luce", "shared_prompt_lipo_lambda": "lipo_lambda"}
TRAINER_NAMES = {"nca": "trl_nca.NCATrainer", "listwise": "trl_nca.ListwiseTrainer", "dpo": "trl.DPOTrainer"}
# The shared-prompt variants the issue-#10 targets compare (precompute excluded: the baselines run the reference too).
SHARED_VARIANTS = ("shared_prompt", "shared_prompt_packed", "shared_prompt_flex", "shared_prompt_packed_flex")
FLEX_VARIANTS = ("shared_prompt_flex", "shared_prompt_packed_flex")

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

# Length mixes at full scale (max_length 2048) and at the CPU scale (medians x 0.625, clipped to 768); see the module
# docstring. Keys are `sample_rows` arguments.
MIXES: dict[str, dict[str, dict[str, float]]] = {
    "ultrafeedback": {
        "full": dict(
            prompt_median=160,
            prompt_sigma=0.8,
            response_median=400,
            response_sigma=0.6,
            prompt_max=1024,
            max_length=2048,
        ),
        "cpu": dict(
            prompt_median=100,
            prompt_sigma=0.8,
            response_median=250,
            response_sigma=0.6,
            prompt_max=512,
            max_length=768,
        ),
    },
    "long_prompt": {
        "full": dict(
            prompt_median=600,
            prompt_sigma=0.5,
            response_median=200,
            response_sigma=0.6,
            prompt_max=1536,
            max_length=2048,
        ),
        "cpu": dict(
            prompt_median=375,
            prompt_sigma=0.5,
            response_median=125,
            response_sigma=0.6,
            prompt_max=640,
            max_length=768,
        ),
    },
}
DATA_OVERRIDES = ("prompt_median", "prompt_sigma", "response_median", "response_sigma", "prompt_max", "max_length")

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(
        model_size="cpu",
        dtype="fp32",
        scale="cpu",
        prompts_per_step=2,
        steps=6,
        warmup=1,
        group_size=4,
        gradient_checkpointing=False,
        mix=["ultrafeedback", "long_prompt"],
        layouts=[name for name in LAYOUTS if name not in LISTWISE_LAYOUTS],
    ),
    # One layout at a time on a GPU: processes of a group would each keep their allocator cache of a 1B model.
    "gpu": dict(
        model_size="gpu-1b",
        dtype="bf16",
        scale="full",
        prompts_per_step=8,
        steps=8,
        warmup=2,
        group_size=1,
        gradient_checkpointing=True,
        mix=["ultrafeedback", "long_prompt"],
        layouts=[
            "padded_padding_free",
            "padded_padding_free_flash",
            "shared_prompt_packed",
            "shared_prompt_packed_flex",
            "shared_prompt",
            "shared_prompt_flex",
            "padded",
            "padded_flash",
            "trl_dpo_precompute",
        ],
    ),
}

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, matched in this order against the CUDA device name.
GPU_PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.1),
)
MFU_FORMULA = (
    "MFU = model_flops_per_step / step_s / peak; model_flops_per_step = (6 + 2r) * N * U + (12 + 4r) * n_layers * "
    "d_attn * A, U = unique tokens, A = causal (query, key) pairs over them, N = parameters less the input embedding, "
    "r = 1 when the reference forward runs in the step (0 when precomputed)"
)


# ---------------------------------------------------------------------------------------------------------- data
def mix_settings(
    mix: str, scale: str = "cpu", length_scale: float = 1.0, overrides: dict[str, float | None] | None = None
) -> dict[str, Any]:
    """The length distribution of `mix` at `scale` ("cpu" | "full"), times `length_scale`, with `overrides` applied."""
    settings: dict[str, Any] = dict(MIXES[mix][scale])
    if length_scale != 1.0:
        for key in ("prompt_median", "response_median"):
            settings[key] = settings[key] * length_scale
        for key in ("prompt_max", "max_length"):
            settings[key] = max(1, round(settings[key] * length_scale))
    settings.update({key: value for key, value in (overrides or {}).items() if value is not None})
    for key in ("prompt_max", "max_length"):
        settings[key] = int(settings[key])
    return settings


def data_settings_from_args(args: argparse.Namespace, mix: str | None = None) -> dict[str, Any]:
    """The `sample_rows` keyword arguments (length distribution and seed) of `mix` (default: the first `--mix`)."""
    overrides = {key: getattr(args, key) for key in DATA_OVERRIDES}
    settings = mix_settings(mix or args.mix[0], args.scale, args.length_scale, overrides)
    return {**settings, "min_length": args.min_length, "seed": args.seed}


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


def step_batches(rows: Sequence[dict[str, Any]], prompts_per_step: int, warmup: int, steps: int) -> list[list[dict]]:
    """The K-way rows of each timed step (step i takes prompts `[i * B, (i + 1) * B)`, the warm-up steps first)."""
    return [rows[(warmup + i) * prompts_per_step : (warmup + i + 1) * prompts_per_step] for i in range(steps)]


def positions_of(batch: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Positions one step computes, without padding: the unique tokens (P + sum(R)), the packed padded layout
    (K * P + sum(R)) and the shared prompt (P - 1 + sum(R + 1): the last prompt token heads every branch)."""
    counts = {"unique": 0, "padded_padding_free": 0, "shared_prompt": 0}
    for row in batch:
        prompt, responses = len(row["prompt_ids"]), [len(c) for c in row["completion_ids"]]
        counts["unique"] += prompt + sum(responses)
        counts["padded_padding_free"] += len(responses) * prompt + sum(responses)
        counts["shared_prompt"] += prompt - 1 + sum(r + 1 for r in responses)
    return counts


def attention_pairs(batch: Sequence[dict[str, Any]]) -> int:
    """Causal (query, key) pairs over the unique tokens: prompt token i sees i keys, response token j sees P + j."""
    pairs = 0
    for row in batch:
        prompt = len(row["prompt_ids"])
        pairs += prompt * (prompt + 1) // 2
        pairs += sum(r * prompt + r * (r + 1) // 2 for r in (len(c) for c in row["completion_ids"]))
    return pairs


def step_model_flops(
    batch: Sequence[dict[str, Any]], n_params: int, n_layers: int, d_attn: int, reference_forward: bool
) -> float:
    """Model FLOPs of one step over its unique tokens (see `MFU_FORMULA`)."""
    r = 1 if reference_forward else 0
    unique = positions_of(batch)["unique"]
    return (6 + 2 * r) * n_params * unique + (12 + 4 * r) * n_layers * d_attn * attention_pairs(batch)


def peak_flops(device: str, override_tflops: float | None = None) -> tuple[float | None, str]:
    """The peak (dense bf16) FLOP/s MFU is measured against, and where the figure comes from."""
    if override_tflops:
        return override_tflops * 1e12, f"--peak-tflops {override_tflops:g}"
    if device != "cuda":
        return None, "no peak for a CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name()
    for key, tflops in GPU_PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense bf16 (table entry {key!r})"
    return None, f"{name}: not in the peak table (pass --peak-tflops)"


def unavailable_reason(layout: str, device: str, dtype: str) -> str | None:
    """Why `layout` cannot run here (None when it can)."""
    attn = LAYOUT_SPECS[layout].get("attn")
    if attn == "flex_attention" and device != "cuda":
        return (
            f"flex_attention has no backward pass on CPU in torch {torch.__version__} (NotImplementedError); "
            "flex layouts run on CUDA only"
        )
    if attn == "flash_attention_2":
        if device != "cuda":
            return "FlashAttention-2 runs on CUDA only"
        if not is_flash_attn_2_available():
            return (
                "FlashAttention-2 is not available: transformers.utils.is_flash_attn_2_available() is False (no "
                "flash-attn >= 2.3.3 installed that transformers would use)"
            )
        if dtype != "bf16":
            return "FlashAttention-2 needs bf16 (--dtype bf16)"
    return None


def error_line(error: BaseException) -> str:
    """`error` as one line: its type and the first line of its message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"


# ---------------------------------------------------------------------------------------------------------- worker
class _TimedPrecompute:
    """Records how long the reference log-prob precompute takes (`precompute_s`)."""

    precompute_s: float = 0.0

    def _precompute_ref_logps(self, dataset, name, batch_size):
        start = time.perf_counter()
        result = super()._precompute_ref_logps(dataset, name, batch_size)
        self.precompute_s += time.perf_counter() - start
        return result


class _PretokenizedDPOTrainer(_TimedPrecompute, DPOTrainer):
    """`trl.DPOTrainer` unchanged, except that dataset tokenization is skipped: the rows are token ids already."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


class _TimedMask:
    """Records how long the trainer's device attention mask takes (`mask_build_s`)."""

    mask_build_s: float = 0.0
    sync_cuda: bool = False

    def _attention_mask(self, model, inputs):
        start = time.perf_counter()
        mask = super()._attention_mask(model, inputs)
        if self.sync_cuda:
            torch.cuda.synchronize()
        self.mask_build_s += time.perf_counter() - start
        return mask


class _TimedNCATrainer(_TimedMask, _TimedPrecompute, NCATrainer):
    """`NCATrainer` that records how long the reference precompute and the device attention mask take."""


class _TimedListwiseTrainer(_TimedMask, _TimedPrecompute, ListwiseTrainer):
    """`ListwiseTrainer` that records how long the reference precompute and the device attention mask take."""


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


def _mask_info(mask) -> dict[str, Any]:
    """Bytes, shape and kind of an attention mask as the model's layers get it."""
    if mask is None:
        return {"bytes": 0, "shape": None, "kind": None}
    if isinstance(mask, dict):
        parts = [_mask_info(value) for value in mask.values()]
        largest = max(parts, key=lambda part: part["bytes"])
        return {**largest, "bytes": sum(part["bytes"] for part in parts)}
    if isinstance(mask, torch.Tensor):
        return {"bytes": mask_nbytes(mask), "shape": list(mask.shape), "kind": f"tensor {str(mask.dtype)[6:]}"}
    return {"bytes": mask_nbytes(mask), "shape": list(getattr(mask, "shape", ())), "kind": type(mask).__name__}


class _MaskProbe:
    """Records the attention mask every Mistral forward hands its layers (`create_causal_mask`'s result: the mask
    passed in, or the one transformers builds), per step. Installed by patching the model module, undone on exit."""

    NAMES = ("create_causal_mask", "create_sliding_window_causal_mask")

    def __init__(self):
        self.current: list[dict[str, Any]] = []
        self.per_step: list[dict[str, Any]] = []
        self.originals: dict[str, Any] = {}

    def __enter__(self):
        for name in self.NAMES:
            original = getattr(modeling_mistral, name)
            self.originals[name] = original

            def wrapped(*args, _original=original, **kwargs):
                mask = _original(*args, **kwargs)
                self.current.append(_mask_info(mask))
                return mask

            setattr(modeling_mistral, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(modeling_mistral, name, original)

    def begin_step(self) -> None:
        self.current = []

    def end_step(self) -> None:
        empty = {"bytes": 0, "shape": None, "kind": None}
        self.per_step.append(max(self.current, key=lambda info: info["bytes"], default=empty))


class _StepTimer(TrainerCallback):
    """Timestamps of every optimizer step's begin and end (after a device sync on CUDA), one turn per step."""

    def __init__(self, cuda: bool, turns: _Turns, probe: _MaskProbe | None = None, trainer=None):
        self.cuda = cuda
        self.turns = turns
        self.probe = probe
        self.trainer = trainer
        self.begin: list[float] = []
        self.end: list[float] = []
        self.waited: list[float] = []  # time spent waiting for the turn (other layouts' steps)
        self.mask_build_s: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        before = self._now()
        self.turns.wait()
        if self.probe is not None:
            self.probe.begin_step()
        if self.trainer is not None:
            self.trainer.mask_build_s = 0.0
        self.begin.append(self._now())
        self.waited.append(self.begin[-1] - before)

    def on_step_end(self, args, state, control, **kwargs):
        self.end.append(self._now())
        if self.probe is not None:
            self.probe.end_step()
        if self.trainer is not None:
            self.mask_build_s.append(self.trainer.mask_build_s)
        self.turns.done()


class _CountingCollator:
    """Wraps the trainer's collator: records, per training batch, its unique tokens, prompts, computed positions, the
    time spent collating and the largest tensor it returns."""

    def __init__(self, inner):
        self.inner = inner
        self.batches: list[dict[str, Any]] = []

    def __call__(self, examples):
        start = time.perf_counter()
        batch = self.inner(examples)
        collator_s = time.perf_counter() - start
        unique, prompts = batch_unique_tokens(examples)
        nonpad = batch["padding_mask"] if "padding_mask" in batch else batch["attention_mask"]
        tensors = {name: value for name, value in batch.items() if isinstance(value, torch.Tensor)}
        name, largest = max(tensors.items(), key=lambda item: item[1].numel() * item[1].element_size())
        self.batches.append(
            {
                "unique_tokens": unique,
                "prompts": prompts,
                "computed_tokens": int(batch["input_ids"].numel()),
                "nonpad_tokens": int(nonpad.sum()),
                "rows": int(batch["input_ids"].size(0)),
                "collator_s": collator_s,
                "host_tensor_max": {
                    "name": name,
                    "shape": list(largest.shape),
                    "bytes": largest.numel() * largest.element_size(),
                    "over_input_ids": largest.numel() / batch["input_ids"].numel(),
                },
                "host_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
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
    several layout processes can be interleaved step by step by the driver. `settings` may also set
    `gradient_checkpointing_kwargs` and `logging_steps` (scripts/gpu_check.py logs every step); the result carries the
    logged losses and gradient norms (`logged`) and the layout the trainer ended in (`trained_layout`).
    """
    turns = turns or _Turns()
    turns.wait()
    # Collect what earlier layouts left (in-process runs), then exempt the live heap (torch, transformers, ...) from
    # the cyclic collector: the trainer's `gc.collect()` calls then take milliseconds instead of a second.
    gc.collect()
    gc.freeze()
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    spec = LAYOUT_SPECS[layout]
    device = settings["device"]
    cuda = device == "cuda"
    bf16 = settings["dtype"] == "bf16"
    prompts_per_step = settings["prompts_per_step"]
    total_steps = settings["warmup"] + settings["steps"]
    rows = rows[: total_steps * prompts_per_step]
    precompute = bool(spec.get("precompute"))
    padding_free = bool(spec.get("padding_free"))
    attn = spec.get("attn") or settings["attn"]

    tokenizer = build_tokenizer()  # pad/EOS ids only: the rows are token ids already
    size = dict(MODEL_SIZES[settings["model_size"]])

    def model(seed: int):
        built = build_tiny_model(
            tokenizer,
            "mistral",
            attn_implementation=attn,
            seed=seed,
            max_position_embeddings=8192,  # the sft_floor rows hold a prompt and K responses
            **size,
        )
        return built.to(torch.bfloat16) if bf16 else built

    policy = model(seed=0)
    n_params = sum(p.numel() for p in policy.parameters())
    n_embedding = policy.get_input_embeddings().weight.numel()
    # Precompute variants keep no reference model during training (DPOTrainer drops it too): the precompute pass
    # scores the dataset with the initial policy, which has the same cost as a separate reference.
    ref = None if precompute else model(seed=1)

    common = dict(
        output_dir=settings["output_dir"],
        bf16=bf16,
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=bool(settings.get("gradient_checkpointing")),
        gradient_checkpointing_kwargs=settings.get("gradient_checkpointing_kwargs"),
        learning_rate=1e-6,
        beta=0.1,
        max_steps=total_steps,
        logging_steps=settings.get("logging_steps") or total_steps,
        max_length=None,  # rows are already cut to max_length per prompt+response
        train_sampling_strategy="sequential",  # step i takes prompts [i*B, (i+1)*B) in every layout
        disable_tqdm=True,
        dataloader_num_workers=0,
        precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=prompts_per_step,
        seed=0,
    )
    start = time.perf_counter()
    if spec["trainer"] == "dpo":
        pairs_per_step = (K - 1) * prompts_per_step
        trainer = _PretokenizedDPOTrainer(
            policy,
            ref_model=ref,
            args=DPOConfig(
                per_device_train_batch_size=pairs_per_step, **{**common, "precompute_ref_batch_size": pairs_per_step}
            ),
            train_dataset=Dataset.from_list(dpo_pair_rows(rows)),
            processing_class=tokenizer,
        )
    else:
        kway_layout = spec["kway_layout"]
        data = sft_floor_rows(rows) if spec.get("rows") == "sft_floor" else rows
        listwise = spec["trainer"] == "listwise"
        trainer_class = _TimedListwiseTrainer if listwise else _TimedNCATrainer
        config_class = ListwiseConfig if listwise else NCAConfig
        trainer = trainer_class(
            policy,
            ref_model=ref,
            args=config_class(
                per_device_train_batch_size=prompts_per_step,
                kway_layout=kway_layout,
                padding_free=padding_free,
                **spec.get("loss", {}),
                **common,
            ),
            train_dataset=Dataset.from_list(data),
            processing_class=tokenizer,
        )
        trainer.sync_cuda = cuda
        collator = trainer.data_collator
        if collator.layout != kway_layout or bool(getattr(collator, "padding_free", False)) != padding_free:
            raise RuntimeError(
                f"{layout}: expected the {kway_layout} collator with padding_free={padding_free}, got "
                f"{collator.layout} with padding_free={getattr(collator, 'padding_free', None)}."
            )
    init_s = time.perf_counter() - start
    turns.done()
    probe = _MaskProbe()
    timer = _StepTimer(cuda, turns, probe, trainer if isinstance(trainer, _TimedMask) else None)
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
    with probe:
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
    collator = trainer.data_collator.inner
    return {
        "trainer": TRAINER_NAMES[spec["trainer"]],
        "loss_type": list(trainer.args.loss_type),
        "collator_layout": getattr(collator, "layout", "trl.DataCollatorForPreference"),
        "padding_free": padding_free,
        # after training: the first-batch layout check may have fallen back (kway_layout="auto" only)
        "trained_layout": [getattr(collator, "layout", None), bool(getattr(collator, "padding_free", False))],
        # the trainer's logs (every `logging_steps`): loss and gradient norm (before clipping)
        "logged": [
            {key: log[key] for key in ("step", "loss", "grad_norm") if key in log}
            for log in trainer.state.log_history
            if "loss" in log
        ],
        "attn_implementation": attn,
        "reference_in_step": not precompute,
        "prompts_per_step": prompts_per_step,
        "step_s": [end - begin for begin, end in zip(timer.begin[warmup:], timer.end[warmup:])],
        # end-to-end per step (batch collation and logging included), the turn waits taken out
        "wall_step_s": [timer.end[i] - timer.end[i - 1] - timer.waited[i] for i in range(max(warmup, 1), total_steps)],
        "rows": [b["rows"] for b in timed],
        "unique_tokens": [b["unique_tokens"] for b in timed],
        "computed_tokens": [b["computed_tokens"] for b in timed],
        "nonpad_tokens": [b["nonpad_tokens"] for b in timed],
        "collator_s": [b["collator_s"] for b in timed],
        "host_tensor_max": [b["host_tensor_max"] for b in timed],
        "host_bytes": [b["host_bytes"] for b in timed],
        "device_mask": probe.per_step[warmup:total_steps],
        "mask_build_s": timer.mask_build_s[warmup:] if timer.mask_build_s else None,
        "prompts": [b["prompts"] for b in counter.batches[:total_steps]],
        "init_s": init_s,
        "precompute_s": getattr(trainer, "precompute_s", 0.0) if precompute else None,
        "precomputed_prompts": len(rows) if precompute else 0,
        "peak_mem_mb": peak_mb,
        "mem_baseline_mb": baseline_mb,
        "mem_method": mem_method,
        "torch_threads": torch.get_num_threads(),
        "model_parameters": n_params,
        "embedding_parameters": n_embedding,
    }


def summarize(part: dict[str, Any]) -> dict[str, Any]:
    """One layout's reported figures from its worker's raw measurements."""
    step_s, wall_s = part["step_s"], part["wall_step_s"]
    step_median = statistics.median(step_s)
    prompts_per_step = part["prompts_per_step"]
    unique = sum(part["unique_tokens"])
    computed = sum(part["computed_tokens"])
    precompute_s = part["precompute_s"]
    collator_median = statistics.median(part["collator_s"])
    host_max = max(part["host_tensor_max"], key=lambda info: info["bytes"])
    mask_max = max(part["device_mask"], key=lambda info: info["bytes"])
    return {
        "trainer": part["trainer"],
        "loss_type": part["loss_type"],
        "collator_layout": part["collator_layout"],
        "padding_free": part["padding_free"],
        "attn_implementation": part["attn_implementation"],
        "reference_in_step": part["reference_in_step"],
        "prompts_per_step": prompts_per_step,
        "rows_per_step": statistics.median(part["rows"]),
        "step_s": step_s,
        "step_s_median": step_median,
        "step_s_total": sum(step_s),
        "wall_step_s_median": statistics.median(wall_s) if wall_s else None,
        "cost_per_prompt_s": step_median / prompts_per_step,
        "collator_s": part["collator_s"],
        "collator_s_median": collator_median,
        "collator_fraction": collator_median / (step_median + collator_median),
        "host_tensor_max_bytes": host_max["bytes"],
        "host_tensor_max_shape": host_max["shape"],
        "host_tensor_max_name": host_max["name"],
        "host_tensor_max_over_input_ids": max(info["over_input_ids"] for info in part["host_tensor_max"]),
        "host_bytes_per_step_max": max(part["host_bytes"]),
        "device_mask_bytes": mask_max["bytes"],
        "device_mask_shape": mask_max["shape"],
        "device_mask_kind": mask_max["kind"],
        "device_mask_bytes_per_step": [info["bytes"] for info in part["device_mask"]],
        "mask_build_s_median": statistics.median(part["mask_build_s"]) if part["mask_build_s"] else None,
        "logged": part["logged"],
        "init_s": part["init_s"],
        "precompute_s": precompute_s,
        "precompute_s_per_prompt": None if precompute_s is None else precompute_s / part["precomputed_prompts"],
        "peak_mem_mb": part["peak_mem_mb"],
        "peak_mem_delta_mb": part["peak_mem_mb"] - part["mem_baseline_mb"],
        "mem_baseline_mb": part["mem_baseline_mb"],
        "mem_method": part["mem_method"],
        "unique_tokens": unique,
        "unique_tokens_per_step": part["unique_tokens"],
        "computed_tokens": computed,
        "computed_tokens_per_step": part["computed_tokens"],
        "nonpad_tokens": sum(part["nonpad_tokens"]),
        "nonpad_tokens_per_step": part["nonpad_tokens"],
        "computed_over_unique": computed / unique,
        "tokens_per_s": unique / len(step_s) / step_median,
        "computed_tokens_per_s": computed / len(step_s) / step_median,
        "timed_steps": len(step_s),
        "data_digest": hashlib.sha1(json.dumps(part["prompts"]).encode()).hexdigest(),
        "torch_threads": part["torch_threads"],
        "model_parameters": part["model_parameters"],
        "embedding_parameters": part["embedding_parameters"],
    }


def _worker(spec_path: str, result_path: str, go_fd: int | None = None, done_fd: int | None = None) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    with open(spec["rows_path"]) as f:
        rows = json.load(f)
    try:
        result = run_layout(spec["layout"], rows, spec["settings"], _Turns(go_fd, done_fd))
    except Exception as error:  # the driver records the error and goes on with the other layouts
        with open(result_path, "w") as f:
            json.dump({"error": error_line(error)}, f)
        raise
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
        "flash_attn": is_flash_attn_2_available(),
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


def _check(name: str, value: float | None, op: str, threshold: float | None, note: str = "") -> dict[str, Any]:
    met = None if value is None or threshold is None else (value >= threshold if op == ">=" else value <= threshold)
    return {"target": name, "value": value, "threshold": threshold, "op": op, "met": met, "note": note}


def best_of(layouts: dict[str, dict[str, Any]], names: Sequence[str]) -> str | None:
    """The fastest (median step) of `names` among the layouts that ran."""
    ran = [name for name in names if name in layouts]
    return min(ran, key=lambda name: layouts[name]["step_s_median"]) if ran else None


def compute_ratios(
    layouts: dict[str, dict[str, Any]], positions: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Headline ratios, the issue-#10 targets and the v1 targets (None where a layout was not run)."""

    def get(name: str | None, key: str) -> Any:
        return layouts.get(name, {}).get(key) if name else None

    def paired(a: str | None, b: str | None) -> float | None:
        steps_a, steps_b = get(a, "step_s"), get(b, "step_s")
        return statistics.median(x / y for x, y in zip(steps_a, steps_b)) if steps_a and steps_b else None

    limit = positions["position_limit"] if positions else None
    best = best_of(layouts, SHARED_VARIANTS)
    best_flex = best_of(layouts, FLEX_VARIANTS)
    ratios: dict[str, Any] = {
        "best_shared_variant": best,
        "position_limit": limit,
        "padded_padding_free_over_best_shared_step": _ratio(
            get("padded_padding_free", "step_s_median"), get(best, "step_s_median")
        ),
        "padded_padding_free_over_best_shared_step_paired_median": paired("padded_padding_free", best),
        "padded_over_best_shared_step": _ratio(get("padded", "step_s_median"), get(best, "step_s_median")),
        "padded_padding_free_over_best_shared_computed_tokens": _ratio(
            get("padded_padding_free", "computed_tokens"), get(best, "computed_tokens")
        ),
        "best_shared_over_padded_padding_free_peak_mem": _ratio(
            get(best, "peak_mem_mb"), get("padded_padding_free", "peak_mem_mb")
        ),
        "best_shared_collator_fraction": get(best, "collator_fraction"),
        "best_flex_variant": best_flex,
        "padded_padding_free_flash_over_best_flex_step": _ratio(
            get("padded_padding_free_flash", "step_s_median"), get(best_flex, "step_s_median")
        ),
        "padded_over_padded_padding_free_step": _ratio(
            get("padded", "step_s_median"), get("padded_padding_free", "step_s_median")
        ),
        "trl_dpo_precompute_over_best_shared_per_epoch": _ratio(
            get("trl_dpo_precompute", "cost_per_prompt_s"), get(best, "cost_per_prompt_s")
        ),
        # v1 ratios (shared_prompt, one row per prompt)
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
    for name, (a, b) in {
        "padded_over_shared_step": ("padded", "shared_prompt"),
        "shared_over_sft_floor_step": ("shared_prompt", "sft_floor"),
        "trl_dpo_over_shared_per_epoch": ("trl_dpo_pairs", "shared_prompt"),
    }.items():
        ratios[f"{name}_paired_median"] = paired(a, b)
    # Issue #20: each listwise objective against NCA on the same layout and batches (present when both ran).
    for layout, loss in LISTWISE_LAYOUTS.items():
        if layout in layouts and "shared_prompt" in layouts:
            nca, name = layouts["shared_prompt"], f"{loss}_over_nca"
            per_step = [x / y for x, y in zip(get(layout, "step_s"), nca["step_s"])]
            ratios[f"{name}_step"] = _ratio(get(layout, "step_s_median"), nca["step_s_median"])
            ratios[f"{name}_step_paired_median"] = statistics.median(per_step)
            ratios[f"{name}_step_paired_min"] = min(per_step)
            ratios[f"{name}_step_paired_max"] = max(per_step)
            ratios[f"{name}_peak_mem"] = _ratio(get(layout, "peak_mem_mb"), nca["peak_mem_mb"])

    speedup = ratios["padded_padding_free_over_best_shared_step"]
    shared_ran = [name for name in SHARED_VARIANTS if name in layouts]
    host_growth = max((layouts[name]["host_tensor_max_over_input_ids"] for name in shared_ran), default=None)
    of_limit = f"0.9 x position limit {limit:.3f}" if limit else "0.9 x position limit"
    targets = [
        _check(
            "best shared-prompt variant vs padded_padding_free, step speedup",
            speedup,
            ">=",
            0.9 * limit if limit and speedup is not None else None,
            f"{best}; {of_limit}",
        ),
        _check(
            "best shared-prompt variant >= 1.8x faster than padded", ratios["padded_over_best_shared_step"], ">=", 1.8
        ),
        _check(
            "collator <= 2% of the step (best shared variant)", ratios["best_shared_collator_fraction"], "<=", 0.02
        ),
        _check(
            "no collator tensor grows as L^2 (largest / input_ids elements, shared variants)", host_growth, "<=", 1.0
        ),
        _check(
            "best shared-prompt variant peak memory <= padded_padding_free's",
            ratios["best_shared_over_padded_padding_free_peak_mem"],
            "<=",
            1.0,
        ),
    ]
    flex_speedup = ratios["padded_padding_free_flash_over_best_flex_step"]
    if flex_speedup is not None:
        targets.append(
            _check(
                "best flex variant vs padded_padding_free_flash, step speedup (= tokens/s ratio)",
                flex_speedup,
                ">=",
                0.9 * limit if limit else None,
                f"{best_flex}; {of_limit}",
            )
        )
    targets_v1 = [
        _check("shared_prompt >= 1.5x faster than padded", ratios["padded_over_shared_step"], ">=", 1.5),
        _check("shared_prompt <= 1.10x the SFT floor", ratios["shared_over_sft_floor_step"], "<=", 1.10),
        _check(
            "shared_prompt >= 2x cheaper per epoch than TRL DPO", ratios["trl_dpo_over_shared_per_epoch"], ">=", 2.0
        ),
        _check("shared_prompt peak memory <= padded's", ratios["shared_over_padded_peak_mem"], "<=", 1.0),
    ]
    return ratios, targets, targets_v1


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _shape(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def format_table(mix_result: dict[str, Any]) -> str:
    """A Markdown table of one mix's per-layout figures."""
    header = (
        "| layout | step s (median) | step s (min-max) | s/prompt | collator ms (% step) | largest host tensor | "
        "device mask | computed pos | nonpad pos | unique tok | unique tok/s | MFU | peak MB | peak delta MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in mix_result["layouts"].items():
        mfu = row.get("mfu")
        mask = row["device_mask_bytes"]
        mask_cell = (
            "none" if not mask else f"{_fmt_bytes(mask)} {row['device_mask_kind']} {_shape(row['device_mask_shape'])}"
        )
        lines.append(
            f"| {name} | {row['step_s_median']:.3f} | {min(row['step_s']):.3f}-{max(row['step_s']):.3f} | "
            f"{row['cost_per_prompt_s']:.3f} | {1000 * row['collator_s_median']:.1f} "
            f"({100 * row['collator_fraction']:.2f}%) | {row['host_tensor_max_name']} "
            f"{_shape(row['host_tensor_max_shape'])} {_fmt_bytes(row['host_tensor_max_bytes'])} | {mask_cell} | "
            f"{row['computed_tokens']} | {row['nonpad_tokens']} | {row['unique_tokens']} | "
            f"{row['tokens_per_s']:.0f} | {'-' if mfu is None else f'{100 * mfu:.1f}%'} | "
            f"{row['peak_mem_mb']:.0f} | {row['peak_mem_delta_mb']:.0f} |"
        )
    n_cells = header.count("|") - 1
    for name, error in mix_result.get("failed", {}).items():
        cell = "FAILED: " + error.replace("|", "/")
        lines.append(f"| {name} | {cell} |" + " - |" * (n_cells - 2))
    return "\n".join(lines)


def _worker_failure(result_path: str, returncode: int) -> str:
    """Why a worker process gave no result: the error it recorded, else how it ended."""
    try:
        with open(result_path) as f:
            return json.load(f)["error"]
    except (OSError, ValueError, KeyError):
        pass
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"WorkerKilled: the worker process was killed by {name}{hint}"
    return f"WorkerExited: the worker process exited with code {returncode} without a result"


def _interleaved(
    layouts: Sequence[str], rows_path: str, settings: dict[str, Any], tmp: str, total_turns: int
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Run `layouts` in one subprocess each, alive together, and give them the machine one at a time.

    Turn 0 builds each trainer; turn i >= 1 runs each layout's step i, the order reversed on every other turn. Step i
    of every layout therefore runs within the same short window, so a change in the load of a shared machine hits all
    layouts alike. Only one worker computes at any time; the others block on a pipe. A worker that fails leaves the
    rotation and the others go on. Returns the results and the failures (layout -> one-line error).
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
        alive = list(workers)
        for turn in range(total_turns):
            for worker in list(alive if turn % 2 == 0 else reversed(alive)):
                try:
                    os.write(worker["go"], b"1")
                    handed_back = os.read(worker["done"], 1) == b"1"
                except OSError:  # the worker is gone (its pipe is closed)
                    handed_back = False
                if not handed_back:
                    alive.remove(worker)
        results, failures = {}, {}
        for worker in workers:
            returncode = worker["process"].wait()
            if returncode == 0:
                with open(worker["result"]) as f:
                    results[worker["layout"]] = json.load(f)
            else:
                failures[worker["layout"]] = _worker_failure(worker["result"], returncode)
        return results, failures
    finally:
        for worker in workers:
            os.close(worker["go"])
            os.close(worker["done"])
            if worker["process"].poll() is None:
                worker["process"].kill()
                worker["process"].wait()


def run_mix(
    mix: str, args: argparse.Namespace, layouts: Sequence[str], settings: dict[str, Any], peak: float | None
) -> dict[str, Any]:
    """Sample one mix's rows, run `layouts` on them and collect the figures, positions, ratios and targets."""
    size = MODEL_SIZES[args.model_size]
    prompts_per_step = settings["prompts_per_step"]
    data_settings = data_settings_from_args(args, mix)
    rows = sample_rows((args.warmup + args.steps) * prompts_per_step, vocab_size=size["vocab_size"], **data_settings)
    batches = step_batches(rows, prompts_per_step, args.warmup, args.steps)
    per_step = [positions_of(batch) for batch in batches]
    positions: dict[str, Any] = {
        key: sum(step[key] for step in per_step) for key in ("unique", "padded_padding_free", "shared_prompt")
    }
    positions["per_step"] = per_step
    positions["position_limit"] = positions["padded_padding_free"] / positions["shared_prompt"]
    positions["position_limit_per_step"] = [s["padded_padding_free"] / s["shared_prompt"] for s in per_step]
    positions["formula"] = "padded_padding_free: K*P + sum(R); shared_prompt: P - 1 + sum(R + 1); per prompt"
    groups = [list(layouts[i : i + args.group_size]) for i in range(0, len(layouts), args.group_size)]
    raw: dict[str, dict[str, Any]] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="trl-nca-bench-") as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        with open(rows_path, "w") as f:
            json.dump(rows, f)
        for layout in layouts if args.in_process else []:
            print(f"[benchmark] {mix}: {layout}: {args.warmup} warm-up + {args.steps} timed steps ...", flush=True)
            try:
                raw[layout] = run_layout(layout, rows, {**settings, "output_dir": os.path.join(tmp, layout)})
            except Exception as error:  # recorded; the other layouts still run
                traceback.print_exc()
                failed[layout] = error_line(error)
                clear_device_cache(garbage_collection=True)
        for group in [] if args.in_process else groups:
            print(
                f"[benchmark] {mix}: {', '.join(group)}: {args.warmup} warm-up + {args.steps} timed steps, interleaved"
            )
            group_settings = {**settings, "output_dir": os.path.join(tmp, "out")}
            results, failures = _interleaved(group, rows_path, group_settings, tmp, 1 + args.warmup + args.steps)
            raw.update(results)
            failed.update(failures)
    for layout, error in failed.items():
        print(f"[benchmark] {mix}: {layout} FAILED: {error}", flush=True)
    result: dict[str, Any] = {
        "data": {**data_settings, "distribution": "stratified log-normal lengths, clipped; random token ids"},
        "data_stats": length_stats(rows),
        "groups": None if args.in_process else groups,
        "positions": positions,
        "layouts": {},
        "failed": {layout: failed[layout] for layout in layouts if layout in failed},
    }
    for layout in layouts:
        if layout not in raw:
            continue
        row = summarize(raw[layout])
        n_params = row["model_parameters"] - row["embedding_parameters"]
        flops = [
            step_model_flops(b, n_params, size["num_hidden_layers"], size["hidden_size"], row["reference_in_step"])
            for b in batches
        ]
        row["model_flops_per_step"] = statistics.fmean(flops)
        row["model_flops_per_s"] = row["model_flops_per_step"] / row["step_s_median"]
        row["mfu"] = None if peak is None else row["model_flops_per_s"] / peak
        result["layouts"][layout] = row
        print(f"[benchmark] {mix}: {layout}: steps (s) {', '.join(f'{t:.2f}' for t in raw[layout]['step_s'])}")
    digests = {row["data_digest"] for row in result["layouts"].values()}
    uniques = {row["unique_tokens"] for row in result["layouts"].values()}
    result["same_data"] = len(digests) <= 1 and uniques <= {positions["unique"]}
    if not result["same_data"]:
        raise RuntimeError(
            f"{mix}: the layouts did not see the same data: digests {digests}, unique tokens {uniques}."
        )
    result["ratios"], result["targets"], result["targets_v1"] = compute_ratios(result["layouts"], positions)
    return result


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run every runnable layout on every mix (`run_mix`); layouts the device cannot run are skipped and recorded.

    Layouts run in groups of `--group-size` (in `--layouts` order); the layouts of a group are interleaved step by
    step (see `_interleaved`), each in its own process. `--in-process` runs them one after the other in this process.
    """
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    skipped = {name: why for name in args.layouts if (why := unavailable_reason(name, device, args.dtype))}
    if skipped and args.layouts_explicit:
        name, why = next(iter(skipped.items()))
        raise SystemExit(f"benchmark.py: error: layout {name} cannot run here: {why}.")
    for name, why in skipped.items():
        print(f"[benchmark] skipped {name}: {why}", flush=True)
    layouts = [name for name in args.layouts if name not in skipped]
    if not layouts:
        raise SystemExit("benchmark.py: error: no layout can run here.")
    peak, peak_source = peak_flops(device, args.peak_tflops)
    settings = dict(
        model_size=args.model_size,
        attn=args.attn,
        dtype=args.dtype,
        device=device,
        prompts_per_step=args.prompts_per_step,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    result: dict[str, Any] = {
        "config": {
            **settings,
            "preset": args.preset,
            "k": K,
            "mixes": list(args.mix),
            "scale": args.scale,
            "length_scale": args.length_scale,
            "layouts": layouts,
            "isolation": (
                "in-process, one layout after the other"
                if args.in_process
                else "one subprocess per layout; the layouts of a group interleaved step by step"
            ),
            "group_size": args.group_size,
            "model_shape": MODEL_SIZES[args.model_size],
        },
        "environment": environment(device),
        "skipped": skipped,
        "mfu": {"formula": MFU_FORMULA, "peak_flops": peak, "peak_source": peak_source},
        "mixes": {},
    }
    for mix in args.mix:
        result["mixes"][mix] = run_mix(mix, args, layouts, settings, peak)
    rows = [row for mix in result["mixes"].values() for row in mix["layouts"].values()]
    result["config"]["model_parameters"] = rows[0]["model_parameters"] if rows else None
    result["failed"] = {}
    for mix_name, mix in result["mixes"].items():
        for layout, error in mix["failed"].items():
            result["failed"].setdefault(layout, {})[mix_name] = error
    return result


def failure_summary(result: dict[str, Any]) -> str | None:
    """One line naming the failed layout runs (None when none failed)."""
    runs = [(layout, mix) for mix, part in result["mixes"].items() for layout in part["failed"]]
    if not runs:
        return None
    total = len(runs) + sum(len(part["layouts"]) for part in result["mixes"].values())
    names = ", ".join(f"{layout} ({mix})" for layout, mix in runs)
    return f"{len(runs)} of {total} layout runs failed: {names} (errors under `failed` in the JSON)"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring); unset options take the `--preset`'s values."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the full results here")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="defaults for the options below")
    parser.add_argument("--mix", nargs="+", choices=sorted(MIXES), default=None, help="length mix(es) (default both)")
    parser.add_argument("--scale", choices=["cpu", "full"], default=None, help="mix scale (cpu preset: cpu)")
    parser.add_argument("--length-scale", type=float, default=1.0, help="multiply the mix lengths (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per layout (cpu preset: 6)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per layout (cpu preset: 1)")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="layouts interleaved step by step at a time, each in its own process (cpu preset: 4, gpu: 1; all of a "
        "group's processes hold their memory at once)",
    )
    parser.add_argument("--prompts-per-step", type=int, default=None, help="prompts per step (cpu preset: 2, gpu: 8)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default=None)
    parser.add_argument(
        "--attn", choices=["sdpa", "eager"], default="sdpa", help="attention of the non-flex/FA2 layouts"
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None, help="(gpu preset: on)"
    )
    parser.add_argument(
        "--layouts", nargs="+", choices=LAYOUTS, default=None, help="(default: the preset's; the listwise ones: named)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: GPU table)")
    parser.add_argument("--prompt-median", type=float, default=None, help="override, every mix")
    parser.add_argument("--prompt-sigma", type=float, default=None, help="override, every mix")
    parser.add_argument("--response-median", type=float, default=None, help="override, every mix")
    parser.add_argument("--response-sigma", type=float, default=None, help="override, every mix")
    parser.add_argument("--min-length", type=int, default=8)
    parser.add_argument("--prompt-max", type=int, default=None, help="override, every mix")
    parser.add_argument("--max-length", type=int, default=None, help="max tokens per prompt+response; every mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the layouts in this process (fast, for tests); peak memory is then not isolated per layout",
    )
    parser.add_argument("--_worker", nargs="+", metavar="SPEC RESULT [GO_FD DONE_FD]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.layouts_explicit = args.layouts is not None
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, list(value) if isinstance(value, list) else value)
    if args.steps < 1 or args.warmup < 0 or args.group_size < 1 or args.length_scale <= 0:
        parser.error("--steps and --group-size must be >= 1, --warmup >= 0, --length-scale > 0.")
    return args


def print_report(result: dict[str, Any]) -> None:
    """The tables, ratios and targets of every mix, and how MFU was computed."""
    for name, why in result["skipped"].items():
        print(f"skipped {name}: {why}")
    for name, errors in result.get("failed", {}).items():
        for mix, error in errors.items():
            print(f"FAILED {name} ({mix}): {error}")
    mfu = result["mfu"]
    print(f"MFU: {mfu['formula']}; peak: {mfu['peak_source']}")
    for mix, mix_result in result["mixes"].items():
        stats = mix_result["data_stats"]
        print()
        print(
            f"## {mix}: prompt median {stats['prompt']['median']:.0f}, response median "
            f"{stats['response']['median']:.0f} (ratio {stats['prompt_response_median_ratio']:.2f}), max_length "
            f"{mix_result['data']['max_length']}"
        )
        print()
        print(format_table(mix_result))
        print()
        ratios = mix_result["ratios"]
        for name, value in ratios.items():
            shown = value if value is None or isinstance(value, str) else f"{value:.3f}"
            print(f"{name}: {'n/a' if shown is None else shown}")
        for label, targets in (("target", mix_result["targets"]), ("target (v1)", mix_result["targets_v1"])):
            for target in targets:
                status = "n/a" if target["met"] is None else ("MET" if target["met"] else "NOT MET")
                value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
                threshold = "n/a" if target["threshold"] is None else f"{target['threshold']:.3f}"
                note = f" [{target['note']}]" if target["note"] else ""
                print(f"{label}: {target['target']}: {value} ({target['op']} {threshold}){note} {status}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark, print the tables and write the JSON; returns the results (None in a worker process)."""
    args = parse_args(argv)
    if args._worker:
        spec_path, result_path, *fds = args._worker
        _worker(spec_path, result_path, *(int(fd) for fd in fds))
        return None
    result = run_benchmark(args)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    summary = failure_summary(result)
    if summary:
        print(summary)
    if not any(part["layouts"] for part in result["mixes"].values()):
        names = ", ".join(result["failed"])
        raise SystemExit(f"benchmark.py: error: every layout failed ({names}); the errors are in the table above.")
    return result


if __name__ == "__main__":
    main()
