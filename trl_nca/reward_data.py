"""Prompts -> reward dataset: sample K completions per prompt, score them, write rows the K-way trainers train on.

`build_reward_dataset(config, prompts)` runs in stages, each over fixed chunks of `config.chunk_size` prompts:

1. **sampling**, model by model of the pool (one model in memory at a time);
2. **scoring**, source by source, of each chunk's distinct, non-empty completions;
3. **assembly** (main process): weighted rewards, drops, the dataset, its JSONL copy, card and statistics.

Every finished chunk of a stage is committed to `output_dir/chunks/` (written whole, then renamed). A re-run of the
same configuration skips committed chunks; a chunk interrupted mid-way is redone with the same seed, so a killed and
re-run job yields exactly the rows of an uninterrupted one. Under `accelerate launch`, the pending chunks of a stage
are dealt to the processes round by round and their results gathered to the main process, which alone writes; the
rows do not depend on the number of processes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from trl_nca.config import RewardDataConfig
from trl_nca.generation import Sampler, SamplingOptions, TransformersSampler, VLLMSampler, chunk_key, completion_text
from trl_nca.scoring import (
    RewardModel,
    call_source,
    combine_scores,
    is_function_spec,
    load_reward_function,
    source_name,
)

RESERVED_COLUMNS = ("completions", "rewards", "models")
STATE_FILE = "generate_config.json"
# Fields that do not change the committed chunks: a re-run may differ in them and still resume (changing the weights or
# `min_completions` re-assembles the dataset from the committed scores without sampling or scoring again).
_RUN_ONLY_FIELDS = (
    "min_completions",
    "reward_weights",
    "output_dir",
    "push_to_hub",
    "hub_dataset_id",
    "hub_private",
    "overwrite",
    "reward_batch_size",
    "vllm_gpu_memory_utilization",
)


class ResumeError(ValueError):
    """`output_dir` holds a run of a different configuration."""


# ---------------------------------------------------------------------------------------------------------------------
# Committed chunks
# ---------------------------------------------------------------------------------------------------------------------


class ChunkStore:
    """The committed work of a run: one JSON file per (stage, source, chunk) under `root`, written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, index: int, chunk: int) -> Path:
        return self.root / f"{stage}-{index}" / f"chunk-{chunk:06d}.json"

    def has(self, stage: str, index: int, chunk: int) -> bool:
        return self.path(stage, index, chunk).is_file()

    def write(self, stage: str, index: int, chunk: int, payload: Any) -> None:
        path = self.path(stage, index, chunk)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "w") as handle:
            json.dump(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def read(self, stage: str, index: int, chunk: int) -> Any:
        with open(self.path(stage, index, chunk)) as handle:
            return json.load(handle)


def check_resumable(config: RewardDataConfig, output_dir: Path, extra: dict[str, Any] | None = None) -> None:
    """Record the configuration (and `extra`, e.g. the names of reward sources given as callables) in `output_dir`, or
    check that it equals the recorded one (else `ResumeError`, or a fresh start with `overwrite`)."""
    import shutil

    settings = {k: v for k, v in asdict(config).items() if k not in _RUN_ONLY_FIELDS}
    settings.update(extra or {})
    state = output_dir / STATE_FILE
    if state.is_file():
        recorded = json.loads(state.read_text())
        changed = [k for k in sorted(set(settings) | set(recorded)) if settings.get(k) != recorded.get(k)]
        if not changed:
            return
        if not config.overwrite:
            key = changed[0]
            what = (
                "other prompts (`prompts_sha256`: the dataset's rows differ)"
                if key == "prompts_sha256"
                else f"a different configuration (`{key}`: {recorded.get(key)!r} there, {settings.get(key)!r} now)"
            )
            raise ResumeError(
                f"{output_dir} holds a run with {what}; re-run with the same settings to resume it, or pass "
                "--overwrite true or another --output_dir."
            )
        shutil.rmtree(output_dir / "chunks", ignore_errors=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# Distributed stages
# ---------------------------------------------------------------------------------------------------------------------


def run_stage(
    store: ChunkStore,
    stage: str,
    index: int,
    n_chunks: int,
    work: Callable[[int, Any], Any],
    state: Any,
    desc: str,
    show_progress: bool = True,
    before_work: Callable[[], None] | None = None,
    read_input: Callable[[int], Any] | None = None,
) -> int:
    """Run `work(chunk, input)` for every chunk not yet committed, dealt round-robin to the processes; the main process
    commits each result as it is gathered. `read_input(chunk)` (main process only: the other processes never read
    `output_dir`) supplies each chunk's input; `before_work` (e.g. loading a model) runs only if some chunk is pending.
    Returns the number of chunks computed now."""
    from accelerate.utils import broadcast_object_list, gather_object  # both pass through in a single process

    main = state.is_main_process
    uncommitted = [c for c in range(n_chunks) if not store.has(stage, index, c)] if main else None
    pending = broadcast_object_list([uncommitted])[0]
    if not pending:
        return 0
    if before_work is not None:
        before_work()
    world, rank = state.num_processes, state.process_index
    with tqdm(
        total=n_chunks,
        initial=n_chunks - len(pending),
        desc=desc,
        unit="chunk",
        disable=not (show_progress and state.is_main_process),
    ) as bar:  # closed before an error is printed
        for start in range(0, len(pending), world):
            chunks = pending[start : start + world]
            inputs = None
            if read_input is not None:
                inputs = broadcast_object_list([[read_input(c) for c in chunks] if main else None])[0]
            result = None
            if rank < len(chunks):
                result = (chunks[rank], work(chunks[rank], inputs[rank] if inputs is not None else None))
            for item in gather_object([result]):
                if item is not None and main:
                    store.write(stage, index, item[0], item[1])
            bar.update(len(chunks))
    state.wait_for_everyone()
    return len(pending)


# ---------------------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str) -> Any:
    import torch

    return name if name == "auto" else getattr(torch, name)


def load_sampler(config: RewardDataConfig, model_index: int, name: str, state: Any) -> Sampler:
    """The sampler of the pool's `model_index`-th model, on this process's device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = config.model_name_or_path[model_index]
    tokenizer = AutoTokenizer.from_pretrained(path)
    options = SamplingOptions(
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, max_new_tokens=config.max_new_tokens
    )
    if config.backend == "vllm":
        return VLLMSampler(
            path,
            tokenizer,
            options,
            dtype=config.dtype,
            gpu_memory_utilization=config.vllm_gpu_memory_utilization,
            world_size=state.num_processes,
            chat_template_kwargs=config.chat_template_kwargs,
            name=name,
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(config.dtype)).to(state.device)
    return TransformersSampler(
        model,
        tokenizer,
        options,
        batch_size=config.generation_batch_size,
        chat_template_kwargs=config.chat_template_kwargs,
        name=name,
    )


def model_labels(config: RewardDataConfig) -> list[str]:
    """The `models` column labels: `model_names`, or each model's folder/repository name (made unique)."""
    labels = list(config.model_names or [Path(p.rstrip("/")).name for p in config.model_name_or_path])
    return _unique(labels)


def _unique(names: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return out


def source_labels(reward_funcs: Sequence[Any]) -> list[str]:
    """Names of the reward sources (`rewards_<name>` columns), made unique."""
    return _unique([source_name(f) for f in reward_funcs])


def resolve_source(spec: Any, config: RewardDataConfig, state: Any) -> Any:
    """A callable reward source: functions as given, `module:function` imported, anything else a `RewardModel`."""
    if callable(spec):
        return spec
    if is_function_spec(spec):
        return load_reward_function(spec)
    return RewardModel(
        spec,
        batch_size=config.reward_batch_size,
        dtype=_torch_dtype(config.dtype),
        device=state.device,
        chat_template_kwargs=config.chat_template_kwargs,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------------------------


def merged_chunk(store: ChunkStore, labels: Sequence[str], chunk: int, deduplicate: bool) -> tuple[list, dict]:
    """A chunk's completions from every model, in pool order, minus empty ones and (optionally) duplicates.

    Returns (rows, counts): rows are {"row", "samples": [{"completion", "completion_ids", "model", "finished"}]}.
    """
    counts = {"sampled": 0, "empty": 0, "duplicates": 0, "truncated": 0, "tokens": 0}
    merged: dict[int, list[dict[str, Any]]] = {}
    for m, label in enumerate(labels):
        for entry in store.read("samples", m, chunk):
            bucket = merged.setdefault(entry["row"], [])
            for sample in entry["samples"]:
                counts["sampled"] += 1
                counts["truncated"] += not sample["finished"]
                counts["tokens"] += len(sample["completion_ids"])
                text = completion_text(sample["completion"])
                if not text.strip():
                    counts["empty"] += 1
                    continue
                if deduplicate and any(completion_text(s["completion"]) == text for s in bucket):
                    counts["duplicates"] += 1
                    continue
                bucket.append({**sample, "model": label})
    return [{"row": row, "samples": samples} for row, samples in sorted(merged.items())], counts


def _has_accelerator() -> bool:
    import torch

    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def distributed_state() -> Any:
    """accelerate's `PartialState`, on the CPU (gloo) when the host has no accelerator. A launch whose processes do
    not form one group (each would redo all the work and write the same files) is an error."""
    import os

    from accelerate import PartialState

    state = PartialState(cpu=not _has_accelerator())
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise RuntimeError(
            f"launched {launched} processes but accelerate formed a group of {state.num_processes}; check the "
            "accelerate config (on a host without GPUs use a MULTI_GPU config with ACCELERATE_USE_CPU=true)."
        )
    return state


def build_reward_dataset(
    config: RewardDataConfig,
    prompts: Any,
    reward_funcs: Sequence[Any] | None = None,
    show_progress: bool = True,
) -> tuple[Any, dict[str, Any]]:
    """Sample, score and assemble a reward dataset from the `prompts` dataset (see the module docstring).

    `reward_funcs` overrides `config.reward_funcs` with callables (or specs), as GRPOTrainer's `reward_funcs` accepts
    both. Returns (dataset, statistics) on the main process and (None, {}) on the others; the outputs are written to
    `config.output_dir` (see `RewardDataConfig`).
    """
    state = distributed_state()
    output_dir = Path(config.output_dir)
    sources = list(reward_funcs if reward_funcs is not None else config.reward_funcs)
    if not sources:
        raise ValueError("`reward_funcs` is required: reward models and/or `module:function` reward functions.")
    weights = list(config.reward_weights or [1.0] * len(sources))
    if len(weights) != len(sources):
        raise ValueError(f"`reward_weights` has {len(weights)} weights for {len(sources)} reward sources.")
    prompts = _checked_prompts(prompts, config)
    labels, names = model_labels(config), source_labels(sources)
    if state.is_main_process:
        check_resumable(config, output_dir, {"reward_sources": names, "prompts_sha256": _fingerprint(prompts)})
    state.wait_for_everyone()
    store = ChunkStore(output_dir / "chunks")
    columns = [c for c in prompts.column_names if c != "prompt"]
    n_prompts, size = len(prompts), config.chunk_size
    n_chunks = math.ceil(n_prompts / size)
    timings: dict[str, float] = {}
    work_done: dict[str, int] = {}

    def chunk_slice(chunk: int) -> tuple[range, dict[str, list]]:
        rows = range(chunk * size, min(n_prompts, (chunk + 1) * size))
        return rows, prompts[rows.start : rows.stop]

    for m, n_samples in enumerate(config.completions_per_model):
        holder: dict[str, Any] = {}

        def sample_chunk(chunk: int, _: Any, m: int = m, n_samples: int = n_samples, holder: dict = holder) -> list:
            rows, batch = chunk_slice(chunk)
            samples = holder["sampler"].sample(batch["prompt"], n_samples, config.seed, key=chunk_key(m, chunk))
            return [{"row": row, "samples": [vars(x) for x in xs]} for row, xs in zip(rows, samples, strict=True)]

        def load_model(m: int = m, holder: dict = holder) -> None:
            holder["sampler"] = load_sampler(config, m, labels[m], state)

        start = time.perf_counter()
        desc = f"Sampling ({labels[m]}, {n_samples} per prompt)"
        done = run_stage(store, "samples", m, n_chunks, sample_chunk, state, desc, show_progress, load_model)
        if "sampler" in holder:
            holder["sampler"].close()
        timings[f"sampling/{labels[m]}_s"] = time.perf_counter() - start
        work_done[f"sampling/{labels[m]}"] = done

    def merged(chunk: int) -> list[dict[str, Any]]:
        return merged_chunk(store, labels, chunk, config.deduplicate)[0]

    for s, spec in enumerate(sources):
        holder = {}

        def score_chunk(chunk: int, entries: list, s: int = s, holder: dict = holder) -> dict:
            rows, batch = chunk_slice(chunk)
            flat = [(e["row"] - rows.start, e["row"], k, x) for e in entries for k, x in enumerate(e["samples"])]
            metrics: dict[str, list[float]] = {}
            scores = (
                call_source(
                    names[s],
                    holder["source"],
                    prompts=[batch["prompt"][i] for i, _, _, _ in flat],
                    completions=[x["completion"] for _, _, _, x in flat],
                    completion_ids=[x["completion_ids"] for _, _, _, x in flat],
                    columns={c: [batch[c][i] for i, _, _, _ in flat] for c in columns},
                    rows=[row for _, row, _, _ in flat],
                    positions=[k for _, _, k, _ in flat],
                    metrics=metrics,
                )
                if flat
                else []
            )
            return {"scores": scores, "metrics": metrics}

        def load_source(spec: Any = spec, holder: dict = holder) -> None:
            holder["source"] = resolve_source(spec, config, state)

        start = time.perf_counter()
        done = run_stage(
            store,
            "scores",
            s,
            n_chunks,
            score_chunk,
            state,
            f"Scoring ({names[s]})",
            show_progress,
            load_source,
            read_input=merged,
        )
        if hasattr(holder.get("source"), "close"):
            holder["source"].close()
        timings[f"scoring/{names[s]}_s"] = time.perf_counter() - start
        work_done[f"scoring/{names[s]}"] = done

    if not state.is_main_process:
        state.wait_for_everyone()
        return None, {}
    dataset, stats = assemble(store, prompts, config, labels, names, weights, n_chunks, columns)
    stats.update(timings=timings, chunks_computed=work_done, n_chunks=n_chunks, processes=state.num_processes)
    specs = [spec if isinstance(spec, str) else f"{spec.__module__}:{source_name(spec)}" for spec in sources]
    write_outputs(dataset, stats, config, labels, list(zip(names, specs, weights, strict=True)), output_dir)
    state.wait_for_everyone()
    return dataset, stats


def _fingerprint(prompts: Any) -> str:
    """A hash of the prompts and their other columns: a resumed run must see the same rows."""
    import hashlib

    digest = hashlib.sha256()
    for batch in prompts.iter(batch_size=1024):
        digest.update(json.dumps(batch, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _checked_prompts(prompts: Any, config: RewardDataConfig) -> Any:
    """The prompt dataset with the prompt column named `prompt`, cut to `max_prompts` (clear errors otherwise)."""
    from datasets import Dataset

    from trl_nca.data import DatasetError

    if not isinstance(prompts, Dataset):
        raise TypeError(f"`prompts` must be a datasets.Dataset, got {type(prompts).__name__}.")
    if config.prompt_column not in prompts.column_names:
        raise DatasetError(
            f"prompt dataset: no column `{config.prompt_column}` (columns: {', '.join(prompts.column_names)}); "
            "set --prompt_column."
        )
    if config.prompt_column != "prompt":
        if "prompt" in prompts.column_names:
            prompts = prompts.remove_columns("prompt")
        prompts = prompts.rename_column(config.prompt_column, "prompt")
    clash = [c for c in RESERVED_COLUMNS if c in prompts.column_names]
    clash += [c for c in prompts.column_names if c.startswith("rewards_")]
    if clash:
        raise DatasetError(f"prompt dataset: column `{clash[0]}` would be overwritten by the output; rename it first.")
    if config.max_prompts is not None:
        prompts = prompts.select(range(min(config.max_prompts, len(prompts))))
    if len(prompts) == 0:
        raise DatasetError("prompt dataset: no rows.")
    return prompts


def assemble(
    store: ChunkStore,
    prompts: Any,
    config: RewardDataConfig,
    labels: Sequence[str],
    names: Sequence[str],
    weights: Sequence[float],
    n_chunks: int,
    columns: Sequence[str],
) -> tuple[Any, dict[str, Any]]:
    """Combine the committed samples and scores into reward rows; count what was dropped and why."""
    from datasets import Dataset

    rows: list[dict[str, Any]] = []
    counts = {"sampled": 0, "empty": 0, "duplicates": 0, "truncated": 0, "tokens": 0, "unscored": 0}
    counts["prompts_too_few"] = 0
    source_sums = {name: [0.0, 0] for name in names}
    metrics: dict[str, list[float]] = {}
    for chunk in range(n_chunks):
        merged, chunk_counts = merged_chunk(store, labels, chunk, config.deduplicate)
        for key, value in chunk_counts.items():
            counts[key] += value
        per_source = []
        for s in range(len(names)):
            payload = store.read("scores", s, chunk)
            per_source.append(payload["scores"])
            for key, values in payload["metrics"].items():
                metrics.setdefault(key, []).extend(values)
        flat_index = 0
        for entry in merged:
            n = len(entry["samples"])
            scores = [values[flat_index : flat_index + n] for values in per_source]
            flat_index += n
            combined = combine_scores(scores, weights)
            keep = [k for k in range(n) if combined[k] is not None]
            counts["unscored"] += n - len(keep)
            for name, values in zip(names, scores, strict=True):
                scored = [values[k] for k in keep if values[k] is not None]
                source_sums[name][0] += sum(scored)
                source_sums[name][1] += len(scored)
            if len(keep) < config.min_completions:
                counts["prompts_too_few"] += 1
                continue
            source = prompts[entry["row"]]
            row = {c: source[c] for c in columns}
            row.update(
                prompt=source["prompt"],
                completions=[entry["samples"][k]["completion"] for k in keep],
                rewards=[combined[k] for k in keep],
                models=[entry["samples"][k]["model"] for k in keep],
            )
            for name, values in zip(names, scores, strict=True):
                row[f"rewards_{name}"] = [values[k] for k in keep]
            rows.append(row)
    stats = {
        "prompts": len(prompts),
        "prompts_kept": len(rows),
        "completions_kept": sum(len(r["completions"]) for r in rows),
        **{f"completions_{k}": counts[k] for k in ("sampled", "empty", "duplicates", "unscored", "truncated")},
        "prompts_too_few": counts["prompts_too_few"],
        "completion_tokens_sampled": counts["tokens"],
        "mean_reward": {n: (total / count if count else None) for n, (total, count) in source_sums.items()},
        "reward_function_metrics": {k: sum(v) / len(v) for k, v in metrics.items()},
    }
    return Dataset.from_list(rows), stats


def write_outputs(
    dataset: Any,
    stats: dict[str, Any],
    config: RewardDataConfig,
    labels: Sequence[str],
    sources: Sequence[tuple[str, str, float]],
    output_dir: Path,
) -> None:
    """`dataset/` (save_to_disk), `data.jsonl`, `stats.json`, the `README.md` card; the Hub push if asked."""
    dataset.save_to_disk(str(output_dir / "dataset"))
    with open(output_dir / "data.jsonl", "w") as handle:  # json, not to_json: floats keep all their digits
        for row in dataset:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (output_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    card = dataset_card(config, labels, sources, stats)
    (output_dir / "README.md").write_text(card)
    if config.push_to_hub:
        from huggingface_hub import DatasetCard

        dataset.push_to_hub(config.hub_dataset_id, private=config.hub_private)
        DatasetCard(card).push_to_hub(config.hub_dataset_id)


def dataset_card(
    config: RewardDataConfig, labels: Sequence[str], sources: Sequence[tuple[str, str, float]], stats: dict
) -> str:
    """A dataset card (YAML metadata + Markdown) recording the models, sampling parameters and reward sources."""
    models = "\n".join(
        f"| {label} | `{path}` | {n} |"
        for label, path, n in zip(labels, config.model_name_or_path, config.completions_per_model, strict=True)
    )
    source_table = "\n".join(f"| `rewards_{name}` | `{spec}` | {weight:g} |" for name, spec, weight in sources)
    sampling = ", ".join(
        f"{key}={getattr(config, key)}"
        for key in (
            "backend",
            "temperature",
            "top_p",
            "top_k",
            "max_new_tokens",
            "seed",
            "generation_batch_size",
            "chunk_size",
            "dtype",
        )
    )
    dropped = (
        f"{stats['completions_sampled']} completions sampled; removed: {stats['completions_empty']} empty, "
        f"{stats['completions_duplicates']} duplicates, {stats['completions_unscored']} unscored; "
        f"{stats['prompts_too_few']} prompts with fewer than {config.min_completions} completions left dropped; "
        f"{stats['completions_truncated']} completions stopped at max_new_tokens (kept)."
    )
    return f"""---
tags:
- trl
- trl-nca
- reward-data
---

# Reward dataset

K = {config.num_completions} completions per prompt, sampled and scored by `trl-nca generate`, for trl-nca's
`NCATrainer` / `InfoNCATrainer` (columns `prompt`, `completions`, `rewards`).
{stats["prompts_kept"]} of {stats["prompts"]} prompts from `{config.dataset_name or "an in-memory dataset"}`
(split `{config.dataset_split}`, column `{config.prompt_column}`).

## Models (column `models` names the model of each completion)

| label | model | completions per prompt |
|---|---|---|
{models}

Sampling: {sampling}.

## Reward sources (`rewards` = weighted sum of the sources that scored a completion)

| column | source | weight |
|---|---|---|
{source_table}

## Filtering

{dropped}
"""
