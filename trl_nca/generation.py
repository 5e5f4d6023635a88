"""Sampling K completions per prompt from a causal LM, as GRPOTrainer samples them.

Prompts are standard (text) or conversational (chat messages); conversational prompts are rendered with the model's
chat template and the generation prompt, standard prompts are tokenized as they are (both as `trl.GRPOTrainer` does).
Completions are decoded without special tokens and cut at the first stop token (the tokenizer's EOS and the model's
`generation_config.eos_token_id`, which for chat models includes the end-of-turn token); a conversational prompt's
completion is an assistant message.

Randomness is keyed, not streamed: each call to `Sampler.sample` seeds the generator from `seed` and its `key` (the
chunk of prompts), so the completions of a chunk do not depend on which process samples it or on what was sampled
before. That is what makes `trl_nca.reward_data` resumable and identical on one or several processes.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils.memory import clear_device_cache
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging
from trl.data_utils import is_conversational

logger = logging.get_logger(__name__)

Prompt = str | list[dict[str, Any]]

# vLLM samples greedily below this temperature and then refuses `n > 1` (vllm/sampling_params.py: `_SAMPLING_EPS`,
# `SamplingParams._verify_greedy_sampling`).
_VLLM_GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingOptions:
    """How completions are sampled (the fields of the same names in `RewardDataConfig`).

    `top_k=0` and `top_p=1.0` switch truncation off (ancestral sampling at `temperature`); `do_sample=False` is greedy
    decoding (one distinct completion per prompt).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    do_sample: bool = True


@dataclass
class Sample:
    """One sampled completion: as text (standard prompt) or an assistant message list (conversational prompt), its
    token ids and whether it stopped before `max_new_tokens`.

    `completion_ids` end with the stop token when the completion stopped (as GRPOTrainer passes them to reward
    functions: its completion mask keeps the first EOS), and the text is decoded without it."""

    completion: str | list[dict[str, Any]]
    completion_ids: list[int]
    finished: bool


def keyed_seed(seed: int, *keys: Any) -> int:
    """A 63-bit seed derived from `seed` and `keys` (stable across processes, runs and Python versions)."""
    text = "/".join(str(part) for part in (seed, *keys))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def chunk_key(model_index: int, chunk_index: int) -> str:
    """The `Sampler.sample` key of a chunk of prompts sampled by the `model_index`-th model of a pool."""
    return f"model{model_index}/chunk{chunk_index}"


def completion_text(completion: str | list[dict[str, Any]]) -> str:
    """The text of a completion: the string itself, or the content of its (assistant) messages."""
    if isinstance(completion, str):
        return completion
    return "".join(str(message.get("content") or "") for message in completion)


def stop_token_ids(generation_config: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a completion: the tokenizer's EOS and every id of `generation_config.eos_token_id` (the
    model's generation config; `None` when the model has none)."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    if generation_config is not None:
        candidates.append(generation_config.eos_token_id)
    for candidate in candidates:
        for token in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def load_generation_config(model_name_or_path: str | None) -> Any:
    """The model's `generation_config.json` (its stop tokens), or `None` when it has none."""
    from transformers import GenerationConfig

    if not model_name_or_path:
        return None
    try:
        return GenerationConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError):
        return None


def vllm_request(options: SamplingOptions, num_samples: int) -> tuple[int, dict[str, Any]]:
    """How vLLM (engine or server) is asked for `num_samples` completions of a prompt: (copies, parameters).

    Greedy decoding (`do_sample=False` or a temperature below vLLM's greedy threshold) asks for one completion at
    temperature 0, to be repeated `copies = num_samples` times (vLLM refuses several greedy samples); sampling asks
    for all of them (`copies = 1`). `top_k=-1` is vLLM's "off"."""
    sampling = options.do_sample and options.temperature >= _VLLM_GREEDY_BELOW
    copies = 1 if sampling else num_samples
    return copies, dict(
        n=num_samples // copies,
        temperature=options.temperature if sampling else 0.0,
        top_p=options.top_p if sampling else 1.0,
        top_k=options.top_k if sampling and options.top_k > 0 else -1,
        max_tokens=options.max_new_tokens,
    )


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    tools: list | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
) -> list[list[int]]:
    """Token ids of each prompt, ready for generation (GRPOTrainer's rule): chat template with the generation prompt
    for conversational prompts, the tokenizer's default special tokens for standard ones."""
    if not prompts:
        return []
    if is_conversational({"prompt": prompts[0]}):
        return [
            list(
                tokenizer.apply_chat_template(
                    list(prompt),
                    tools=tools or None,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    **(chat_template_kwargs or {}),
                )["input_ids"]
            )
            for prompt in prompts
        ]
    return [list(ids) for ids in tokenizer(text=list(prompts))["input_ids"]]


def decode_sample(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], stop_ids: Sequence[int], conversational: bool
) -> Sample:
    """Cut generated ids after the first stop token (dropping the padding after it) and decode them, without the stop
    token and without special tokens."""
    stops = set(stop_ids)
    cut = next((i for i, token in enumerate(token_ids) if token in stops), None)
    ids = list(token_ids[: cut + 1]) if cut is not None else list(token_ids)
    text = tokenizer.decode(ids[:cut] if cut is not None else ids, skip_special_tokens=True)
    completion: str | list[dict[str, Any]] = [{"role": "assistant", "content": text}] if conversational else text
    return Sample(completion=completion, completion_ids=ids, finished=cut is not None)


class Sampler:
    """Samples completions from one model. Subclasses implement `_generate` for a backend."""

    name: str

    def sample(self, prompts: Sequence[Prompt], num_samples: int, seed: int, key: Any = 0) -> list[list[Sample]]:
        """`num_samples` completions for each prompt, deterministic under (`seed`, `key`)."""
        if not prompts or num_samples <= 0:
            return [[] for _ in prompts]
        return self._generate(prompts, num_samples, keyed_seed(seed, key))

    def _generate(self, prompts: Sequence[Prompt], num_samples: int, seed: int) -> list[list[Sample]]:
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (the next model of a pool then has the memory)."""


class TransformersSampler(Sampler):
    """Batched `model.generate` with left padding, `batch_size` prompts (each with all its samples) per call."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        options: SamplingOptions = SamplingOptions(),
        batch_size: int = 8,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list | None = None,
        name: str = "model",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = options
        self.batch_size = max(1, batch_size)
        self.chat_template_kwargs = chat_template_kwargs
        self.tools = tools
        self.name = name
        self.stop_ids = stop_token_ids(model.generation_config, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.stop_ids[0]

    @torch.no_grad()
    def _generate(self, prompts: Sequence[Prompt], num_samples: int, seed: int) -> list[list[Sample]]:
        from trl.trainer.utils import pad

        torch.manual_seed(seed)
        conversational = is_conversational({"prompt": prompts[0]})
        encoded = encode_prompts(self.tokenizer, prompts, self.tools, self.chat_template_kwargs)
        device = self.model.device
        sampling = (
            dict(
                do_sample=True,
                temperature=self.options.temperature,
                top_p=self.options.top_p,
                top_k=self.options.top_k,
            )
            if self.options.do_sample
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        )
        results: list[list[Sample]] = []
        for start in range(0, len(encoded), self.batch_size):
            batch = [torch.tensor(ids) for ids in encoded[start : start + self.batch_size]]
            input_ids = pad(batch, padding_value=self.pad_id, padding_side="left").to(device)
            attention_mask = pad([torch.ones_like(ids) for ids in batch], padding_value=0, padding_side="left")
            generated = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask.to(device),
                max_new_tokens=self.options.max_new_tokens,
                num_return_sequences=num_samples if self.options.do_sample else 1,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                **sampling,
            )[:, input_ids.shape[1] :].tolist()
            if not self.options.do_sample:  # greedy: the num_samples completions are one and the same
                generated = [ids for ids in generated for _ in range(num_samples)]
            samples = [decode_sample(self.tokenizer, ids, self.stop_ids, conversational) for ids in generated]
            results.extend(samples[i : i + num_samples] for i in range(0, len(samples), num_samples))
        return results

    def close(self) -> None:  # noqa: D102
        self.model = None
        clear_device_cache(garbage_collection=True)


@contextlib.contextmanager
def _keeping_default_process_group(keep: bool) -> Iterator[None]:
    """While tearing vLLM down, skip its destruction of torch's default process group when `keep` (the group is the
    launcher's: under `external_launcher` vLLM builds on it, and its in-process teardown,
    `cleanup_dist_env_and_memory`, destroys it, which would break the run's next barrier). Subgroups still go."""
    dist = torch.distributed
    if not keep:
        yield
        return
    destroy = dist.destroy_process_group

    def destroy_subgroups(group: Any = None) -> None:
        if group is not None and group is not dist.GroupMember.WORLD:
            destroy(group)

    dist.destroy_process_group = destroy_subgroups
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


class VLLMSampler(Sampler):
    """Sampling with vLLM (`pip install vllm`), as TRL's `use_vllm` does: prompts go in as token ids rendered by the
    same rules, completions come back as token ids decoded like the transformers backend's. Greedy decoding
    (`do_sample=False` or a temperature of 0) samples once per prompt and copies, as vLLM allows one greedy sample.
    `close()` shuts the engine down, so the next model of a pool (or a reward model) gets its memory."""

    def __init__(
        self,
        model_name_or_path: str,
        tokenizer: PreTrainedTokenizerBase,
        options: SamplingOptions = SamplingOptions(),
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.9,
        world_size: int = 1,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list | None = None,
        name: str = "model",
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise ImportError(
                "backend `vllm` needs vLLM: `pip install vllm` (or use backend `transformers`)."
            ) from None
        self.vllm = vllm
        kwargs: dict[str, Any] = dict(
            model=model_name_or_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization
        )
        if world_size > 1:  # one engine per process on its own GPU, as TRL's colocate mode starts them
            kwargs["distributed_executor_backend"] = "external_launcher"
        # A process group that exists before the engine is the launcher's, and must outlive it.
        self._keep_process_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = tokenizer
        self.options = options
        self.chat_template_kwargs = chat_template_kwargs
        self.tools = tools
        self.name = name
        self.stop_ids = stop_token_ids(load_generation_config(model_name_or_path), tokenizer)

    def _generate(self, prompts: Sequence[Prompt], num_samples: int, seed: int) -> list[list[Sample]]:
        conversational = is_conversational({"prompt": prompts[0]})
        encoded = encode_prompts(self.tokenizer, prompts, self.tools, self.chat_template_kwargs)
        copies, request = vllm_request(self.options, num_samples)
        # A seed per prompt, as the server backend sends (vLLM seeds a prompt's n samples with seed, seed + 1, ...):
        # one seed for the whole chunk would make its prompts draw the same random numbers, and copies of a prompt
        # in one chunk the same K samples.
        params = [
            self.vllm.SamplingParams(**request, stop_token_ids=self.stop_ids, seed=keyed_seed(seed, index) % (2**31))
            for index in range(len(encoded))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
        return [
            [
                decode_sample(self.tokenizer, list(o.token_ids), self.stop_ids, conversational)
                for o in output.outputs
                for _ in range(copies)
            ]
            for output in outputs
        ]

    def close(self) -> None:
        """Shut the engine down and free its memory. An in-process engine (`external_launcher`, or
        `VLLM_ENABLE_V1_MULTIPROCESSING=0`) holds the weights and KV cache until it is collected, and an engine process
        until its client is; the launcher's process group is kept. A failed shutdown is a warning, not an error."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        try:
            with _keeping_default_process_group(self._keep_process_group):
                llm.llm_engine.engine_core.shutdown()
                # vLLM's recipe for freeing an engine; a no-op in 0.32, whose in-process shutdown already did it.
                from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

                destroy_model_parallel()
                destroy_distributed_environment()
        except Exception as error:
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            logger.warning(
                f"vLLM engine of {self.name} did not shut down cleanly ({reason}); its memory may not be freed before "
                "the next model loads."
            )
        del llm
        clear_device_cache(garbage_collection=True)


def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Prompt],
    num_samples: int,
    *,
    seed: int,
    options: SamplingOptions = SamplingOptions(),
    batch_size: int = 64,
    chunk_size: int = 256,
    desc: str = "Sampling",
    show_progress: bool = True,
) -> list[list[Sample]]:
    """`num_samples` completions per prompt from an in-memory model, in chunks of `chunk_size` prompts keyed by their
    position (the same completions as `trl-nca generate` gives a single model with the same seed, chunk and batch
    sizes)."""
    sampler = TransformersSampler(model, tokenizer, options, batch_size=batch_size)
    results: list[list[Sample]] = []
    starts = range(0, len(prompts), chunk_size)
    for index, start in enumerate(tqdm(starts, desc=desc, disable=not show_progress, leave=False)):
        results.extend(sampler.sample(prompts[start : start + chunk_size], num_samples, seed, key=chunk_key(0, index)))
    return results
