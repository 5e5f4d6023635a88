"""Prompts -> reward dataset: sample K completions per prompt, score them, write rows the K-way trainers train on.

`build_reward_dataset(config, prompts)` runs in stages, each over fixed chunks of `config.chunk_size` prompts:

1. **sampling**, model by model of the pool (one model in memory at a time);
2. **scoring**, source by source, of each chunk's distinct, non-empty completions;
3. **assembly** (main process): weighted rewards, drops, the dataset, its JSONL copy, card and statistics.

Every reward source is checked before the sampling stage starts (see `check_sources`), so that a source that cannot
score fails within seconds rather than after a sampling pass.

Every finished chunk of a stage is committed to `output_dir/chunks/` (written whole, then renamed). A re-run of the
same configuration skips committed chunks; a chunk interrupted mid-way is redone with the same seed, so a killed and
re-run job yields exactly the rows of an uninterrupted one. The resumption is keyed per stage: the samples by the
sampling settings (`generate_config.json`), the scores of each source by that source (`scores-<name>-<digest>/`), so a
re-run that changes only the reward sources keeps the committed samples and scores only the new sources. Under
`accelerate launch`, the pending chunks of a stage are dealt to the processes round by round and their results
gathered to the main process, which alone writes; the rows do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from trl_nca.config import RewardDataConfig
from trl_nca.generation import Sampler, SamplingOptions, TransformersSampler, VLLMSampler, chunk_key, completion_text
from trl_nca.scoring import (
    RewardFunctionError,
    RewardModel,
    call_source,
    check_reward_function,
    check_reward_model,
    combine_scores,
    is_function_spec,
    load_reward_function,
    source_name,
)

RESERVED_COLUMNS = ("completions", "rewards", "models")
STATE_FILE = "generate_config.json"
#: What a finished run writes next to `chunks/` (removed when a re-run's settings make them stale).
OUTPUT_FILES = ("dataset", "data.jsonl", "stats.json", "README.md")
#: Layout of the committed samples, recorded in `STATE_FILE`: 2 since `completion_ids` end with the stop token (as
#: GRPOTrainer passes them); runs recorded without it hold samples of the older layout and are not resumed.
SAMPLES_FORMAT = 2
#: Recorded settings that only the scoring stage depends on: a re-run may change them and keep the committed samples
#: (the scores of each source are keyed by the source itself, see `score_key`).
SCORING_KEYS = ("reward_funcs", "reward_sources", "deduplicate")
# Fields that do not change the committed chunks: a re-run may differ in them and still resume (changing the weights,
# `min_completions` or the models' labels re-assembles the dataset from the committed scores without sampling or
# scoring again).
_RUN_ONLY_FIELDS = (
    "min_completions",
    "reward_weights",
    "model_names",  # the labels of the `models` column
    "output_dir",
    "push_to_hub",
    "hub_dataset_id",
    "hub_private",
    "overwrite",
    "reward_batch_size",
    "vllm_gpu_memory_utilization",
    "server_base_url",
    "server_model_names",
    "server_api_key_env",
    "server_max_concurrency",
    "server_max_retries",
    "server_timeout",
)


#: `RewardDataConfig` fields a re-run may change and still keep the committed samples (`trl-nca iterate` allows them).
KEEPS_SAMPLES = frozenset(("reward_funcs", "deduplicate", *_RUN_ONLY_FIELDS))


class ResumeError(ValueError):
    """`output_dir` holds a run of a different configuration."""


class NoPromptKeptError(ValueError):
    """Every prompt was dropped (its completions unscored, empty, duplicates, or too few left): there is no dataset."""


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all: a temporary file beside it (`<stem>.tmp<pid>`), flushed to disk,
    then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Committed chunks
# ---------------------------------------------------------------------------------------------------------------------


class ChunkStore:
    """The committed work of a run: one JSON file per (stage, source, chunk) under `root`, written atomically."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, stage: str, index: int | str, chunk: int) -> Path:
        return self.root / f"{stage}-{index}" / f"chunk-{chunk:06d}.json"

    def has(self, stage: str, index: int | str, chunk: int) -> bool:
        return self.path(stage, index, chunk).is_file()

    def write(self, stage: str, index: int | str, chunk: int, payload: Any) -> None:
        write_atomic(self.path(stage, index, chunk), json.dumps(payload))

    def read(self, stage: str, index: int | str, chunk: int) -> Any:
        with open(self.path(stage, index, chunk)) as handle:
            return json.load(handle)

    def remove_temporary_files(self) -> int:
        """Delete the `chunk-*.tmp<pid>` files that a killed run left half-written; returns how many."""
        leftovers = list(self.root.glob("*/chunk-*.tmp*"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def prune(self, stage: str, keep: Sequence[int | str]) -> list[str]:
        """Delete the folders of `stage` other than those of `keep` (e.g. the scores of reward sources no longer in
        the configuration); returns their names."""
        kept = {f"{stage}-{index}" for index in keep}
        stale = [p for p in self.root.glob(f"{stage}-*") if p.is_dir() and p.name not in kept]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return sorted(p.name for p in stale)


def _read_state(state: Path) -> dict[str, Any] | str:
    """The recorded settings, or a description of why they cannot be read."""
    try:
        recorded = json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        return f"truncated or corrupt: {error}"
    return recorded if isinstance(recorded, dict) else f"a JSON {type(recorded).__name__}, not an object"


def remove_outputs(output_dir: Path) -> None:
    """Delete a previous run's `OUTPUT_FILES` (they no longer match the committed chunks)."""
    for name in OUTPUT_FILES:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def check_resumable(config: RewardDataConfig, output_dir: Path, extra: dict[str, Any] | None = None) -> list[str]:
    """Record the configuration (and `extra`: the prompts' hash, the reward sources, the samples' format) in
    `output_dir`, or check it against the recorded one, stage by stage; returns the recorded settings that changed.

    A change of the sampling settings, of the prompts, or samples of an older format, is a `ResumeError` (one line),
    or a fresh start with `overwrite` (the committed chunks are deleted). A change of the scoring settings only
    (`SCORING_KEYS`) keeps the committed samples: the caller prunes the scores of the sources that changed. Whenever
    the settings changed, the outputs of the previous run (`OUTPUT_FILES`) are deleted. The settings are written
    atomically; an unreadable record is a `ResumeError`, or a fresh start with `overwrite`.
    """
    settings = {k: v for k, v in asdict(config).items() if k not in _RUN_ONLY_FIELDS}
    settings.update(extra or {})
    settings = json.loads(json.dumps(settings))  # the JSON form, as recorded
    state = output_dir / STATE_FILE
    changed: list[str] = []
    if state.is_file():
        recorded = _read_state(state)
        start_over = None
        if isinstance(recorded, str):
            start_over = (
                f"{state} is unreadable ({recorded}), so the committed chunks cannot be matched to settings; pass "
                "--overwrite true to start over, or another --output_dir."
            )
            changed = ["generate_config.json"]
        elif recorded.get("samples_format") != settings.get("samples_format"):
            start_over = (
                f"{output_dir} holds chunks written by an older trl-nca (their `completion_ids` lack the stop token "
                "that GRPOTrainer keeps); re-run with --overwrite true to sample them again, or use another "
                "--output_dir."
            )
            changed = ["samples_format"]
        else:
            changed = [k for k in sorted(set(settings) | set(recorded)) if settings.get(k) != recorded.get(k)]
            sampling = [k for k in changed if k not in SCORING_KEYS]
            if sampling:
                key = sampling[0]
                what = (
                    "other prompts (`prompts_sha256`: the dataset's rows differ)"
                    if key == "prompts_sha256"
                    else f"a different configuration (`{key}`: {recorded.get(key)!r} there, {settings.get(key)!r} now)"
                )
                start_over = (
                    f"{output_dir} holds a run with {what}; re-run with the same sampling settings to resume it (the "
                    "reward sources may change), or pass --overwrite true or another --output_dir."
                )
        if start_over is not None:
            if not config.overwrite:
                raise ResumeError(start_over)
            shutil.rmtree(output_dir / "chunks", ignore_errors=True)
        if changed:
            remove_outputs(output_dir)
    if changed or not state.is_file():
        write_atomic(state, json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return changed


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

    from trl_nca.sources import hub_lookup

    path = config.model_name_or_path[model_index]
    with hub_lookup("model_name_or_path", path):  # a Hub id that does not exist (or no network): one line
        tokenizer = AutoTokenizer.from_pretrained(path)
    options = SamplingOptions(
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, max_new_tokens=config.max_new_tokens
    )
    if config.backend == "server":
        from trl_nca.server import ServerSampler

        return ServerSampler(
            config.server_base_url,
            (config.server_model_names or config.model_name_or_path)[model_index],
            tokenizer,
            options,
            api_key=os.environ.get(config.server_api_key_env) or None,
            token_ids=config.server_token_ids,
            max_concurrency=config.server_max_concurrency,
            max_retries=config.server_max_retries,
            timeout=config.server_timeout,
            chat_template_kwargs=config.chat_template_kwargs,
            name=name,
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


def source_identity(spec: Any, function: Any, name: str) -> dict[str, Any]:
    """What a source's committed scores depend on besides the samples: its name and spec (a reward model's id or
    folder, a function's `module:function` or `file.py:function`), and for a function a hash of its code (the whole
    file of a `file.py:function` spec), so an edited reward function is scored again."""
    if isinstance(spec, str) and not is_function_spec(spec):
        return {"name": name, "reward_model": spec}
    if isinstance(spec, str):
        label = spec
    else:
        label = f"{getattr(spec, '__module__', None) or type(spec).__module__}:"
        label += getattr(spec, "__qualname__", None) or type(spec).__qualname__
    file = Path(label.rsplit(":", 1)[0])
    if file.suffix == ".py" and file.is_file():
        code = file.read_bytes()
    else:
        import inspect

        try:
            code = inspect.getsource(function).encode()
        except (OSError, TypeError):
            code = None
    return {"name": name, "function": label, "code_sha256": hashlib.sha256(code).hexdigest() if code else None}


def score_key(identity: dict[str, Any], deduplicate: bool) -> str:
    """The folder suffix of a source's score chunks (`scores-<key>`): its name and a digest of its identity and of the
    settings that decide which completions it scores."""
    digest = hashlib.sha256(json.dumps([identity, deduplicate], sort_keys=True).encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', identity['name'])}-{digest}"


def check_sources(
    sources: Sequence[Any], names: Sequence[str], prompts: Any, config: RewardDataConfig
) -> list[dict[str, Any]]:
    """Check every reward source before anything is sampled, with the first prompt row (nothing loaded but configs,
    tokenizers and the reward functions' modules): a reward model's folder or id, its single label and its
    tokenizer's rendering; a reward function's module (syntax, import), its signature against GRPOTrainer's keyword
    arguments and the prompt dataset's columns (see `trl_nca.scoring.check_reward_function`). Returns each source's
    `source_identity`; a source that cannot score is a `RewardFunctionError` (one line)."""
    first = prompts[0]
    columns = {c: first[c] for c in prompts.column_names if c != "prompt"}
    identities = []
    for spec, name in zip(sources, names, strict=True):
        if isinstance(spec, RewardModel):
            identities.append(source_identity(spec, spec, name))
            continue
        if not callable(spec) and not is_function_spec(spec):
            check_reward_model(spec, first["prompt"], config.chat_template_kwargs)
            identities.append(source_identity(spec, None, name))
            continue
        function = spec if callable(spec) else load_reward_function(spec)
        check_reward_function(name, function, first["prompt"], columns)
        identities.append(source_identity(spec, function, name))
    return identities


def _on_main(state: Any, work: Callable[[], Any], share: bool = False) -> Any:
    """Run `work()` on the main process; its error is raised on every process (the others would otherwise wait for
    the main process forever). Returns its result, on every process with `share` (else None on the others)."""
    from accelerate.utils import broadcast_object_list

    from trl_nca.data import DatasetError

    known = (RewardFunctionError, ResumeError, NoPromptKeptError, DatasetError)
    result, failure, raised = None, None, None
    if state.is_main_process:
        try:
            result = work()
        except Exception as error:
            raised = error
            failure = (type(error) if isinstance(error, known) else RuntimeError, str(error))
    shared, failure = broadcast_object_list([(result if share else None, failure)])[0]
    if raised is not None:
        raise raised
    if failure is not None:
        kind, message = failure
        raise kind(message if kind is not RuntimeError else f"the main process failed: {message}")
    return result if state.is_main_process else shared


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
    from trl_nca.sources import check_output_dir

    check_output_dir(config.output_dir)  # a file there is one line, not a FileExistsError from the first write
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
    store = ChunkStore(output_dir / "chunks")

    def prepare() -> list[str]:  # main process: check the sources, then the committed work, before any sampling
        identities = check_sources(sources, names, prompts, config)
        extra = {
            "reward_sources": identities,
            "prompts_sha256": _fingerprint(prompts),
            "samples_format": SAMPLES_FORMAT,
        }
        check_resumable(config, output_dir, extra)
        keys = [score_key(identity, config.deduplicate) for identity in identities]
        store.remove_temporary_files()
        store.prune("scores", keys)  # the scores of sources no longer configured (or configured otherwise)
        return keys

    keys = _on_main(state, prepare, share=True)
    columns = [c for c in prompts.column_names if c != "prompt"]
    n_prompts, size = len(prompts), config.chunk_size
    n_chunks = math.ceil(n_prompts / size)
    timings: dict[str, float] = {}  # each stage's wall time (on the main process), its setup included
    setup: dict[str, float] = {}  # the part of it spent loading and closing the model or source (an engine's start-up)
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
            begin = time.perf_counter()
            holder["sampler"] = load_sampler(config, m, labels[m], state)
            setup[f"sampling/{labels[m]}_s"] = time.perf_counter() - begin

        start = time.perf_counter()
        desc = f"Sampling ({labels[m]}, {n_samples} per prompt)"
        done = run_stage(store, "samples", m, n_chunks, sample_chunk, state, desc, show_progress, load_model)
        if "sampler" in holder:
            begin = time.perf_counter()
            holder["sampler"].close()
            setup[f"sampling/{labels[m]}_s"] += time.perf_counter() - begin
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

        def load_source(spec: Any = spec, s: int = s, holder: dict = holder) -> None:
            begin = time.perf_counter()
            holder["source"] = resolve_source(spec, config, state)
            setup[f"scoring/{names[s]}_s"] = time.perf_counter() - begin

        start = time.perf_counter()
        done = run_stage(
            store,
            "scores",
            keys[s],
            n_chunks,
            score_chunk,
            state,
            f"Scoring ({names[s]})",
            show_progress,
            load_source,
            read_input=merged,
        )
        if hasattr(holder.get("source"), "close"):
            begin = time.perf_counter()
            holder["source"].close()
            setup[f"scoring/{names[s]}_s"] += time.perf_counter() - begin
        timings[f"scoring/{names[s]}_s"] = time.perf_counter() - start
        work_done[f"scoring/{names[s]}"] = done

    def finish() -> tuple[Any, dict[str, Any]]:  # main process
        dataset, stats = assemble(store, prompts, config, labels, names, keys, weights, n_chunks, columns)
        stats.update(
            timings=timings,
            setup=setup,
            chunks_computed=work_done,
            n_chunks=n_chunks,
            processes=state.num_processes,
        )
        if len(dataset) == 0:
            remove_outputs(output_dir)
            raise NoPromptKeptError(nothing_kept_message(stats, config))
        specs = [spec if isinstance(spec, str) else f"{spec.__module__}:{source_name(spec)}" for spec in sources]
        write_outputs(dataset, stats, config, labels, list(zip(names, specs, weights, strict=True)), output_dir)
        return dataset, stats

    result = _on_main(state, finish)
    return result if state.is_main_process else (None, {})


def nothing_kept_message(stats: dict[str, Any], config: RewardDataConfig) -> str:
    """Why a run kept no prompt, with the counts, in one line."""
    sampled, empty, duplicates = (stats[f"completions_{k}"] for k in ("sampled", "empty", "duplicates"))
    unscored = stats["completions_unscored"]
    candidates = sampled - empty - duplicates
    if candidates == 0:
        why = "every completion was empty or a duplicate" + (
            " (sample with a higher temperature, or set deduplicate false)" if duplicates else ""
        )
    elif unscored == candidates:
        why = "no reward source scored any completion (every score was None)"
    else:
        why = "raise num_completions, lower min_completions, or set deduplicate false"
    return (
        f"no prompt kept: all {stats['prompts']} prompts were left with fewer than min_completions="
        f"{config.min_completions} scored completions ({sampled} sampled; {empty} empty, {duplicates} duplicates, "
        f"{unscored} unscored removed): {why}; nothing was written to {config.output_dir}/dataset."
    )


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
    keys: Sequence[str],
    weights: Sequence[float],
    n_chunks: int,
    columns: Sequence[str],
) -> tuple[Any, dict[str, Any]]:
    """Combine the committed samples and scores (source `names[s]`'s under `scores-{keys[s]}`) into reward rows;
    count what was dropped and why."""
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
        for key in keys:
            payload = store.read("scores", key, chunk)
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
