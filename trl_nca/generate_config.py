"""`trl-nca generate`'s config, in a module of its own: it imports nothing heavy, so `trl-nca generate` checks its
arguments before torch and transformers are loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: `backend` values: the samplers of `trl_nca.generation` and `trl_nca.server`.
_BACKENDS = ("transformers", "vllm", "server")


@dataclass
class RewardDataConfig:
    r"""
    Configuration of `trl-nca generate` ([`~trl_nca.reward_data.build_reward_dataset`]): sample K completions per
    prompt from one model or a pool of models, score them with reward models and/or reward functions, and write a
    reward dataset (`prompt`, `completions`, `rewards`) that [`NCATrainer`] and [`InfoNCATrainer`] train on.

    Parameters:
        output_dir (`str`):
            Where the run writes: `dataset/` (`Dataset.save_to_disk`, what `trl-nca train --dataset_name` reads),
            `data.jsonl`, `README.md` (the dataset card), `stats.json`, and `chunks/`, the committed work a re-run of
            the same command resumes from.
        dataset_name (`str`):
            The prompts: a Hub dataset id, a `save_to_disk` folder, a folder of data files or one `.json` / `.jsonl` /
            `.parquet` / `.csv` file.
        dataset_config (`str`, *optional*):
            Dataset configuration name (`datasets.load_dataset`'s `name`).
        dataset_split (`str`, *optional*, defaults to `"train"`):
            Split holding the prompts.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column with the prompts: text (standard) or a list of chat messages (conversational). Every other column is
            kept in the output and passed to the reward functions as keyword arguments.
        max_prompts (`int`, *optional*):
            Use only the first `max_prompts` prompts.
        model_name_or_path (`list[str]`):
            The model that samples, or a pool of models (UltraFeedback-style) that each write some of the K
            completions. Model ids or local folders; each model's own tokenizer and chat template are used.
        model_names (`list[str]`, *optional*):
            Labels recorded in the `models` column, one per model (defaults to each folder/repository name).
        num_completions (`int`, *optional*, defaults to `4`):
            K, completions sampled per prompt in all. With a pool, they are split as evenly as possible, earlier models
            taking the remainder, unless `completions_per_model` says otherwise.
        completions_per_model (`list[int]`, *optional*):
            Completions per prompt from each model of the pool (they sum to `num_completions`).
        backend (`str`, *optional*, defaults to `"transformers"`):
            `"transformers"` (batched `model.generate`), `"vllm"` (needs `pip install vllm`, as TRL's `use_vllm`) or
            `"server"` (OpenAI-compatible inference servers at `server_base_url`: `vllm serve`, `trl vllm-serve`,
            SGLang, TGI).
        dtype (`str`, *optional*, defaults to `"auto"`):
            Weights dtype of the sampling models and reward models (`"auto"`, `"bfloat16"`, `"float16"`, `"float32"`).
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold (`1.0`: off).
        top_k (`int`, *optional*, defaults to `0`):
            Top-k truncation (`0`: off).
        max_new_tokens (`int`, *optional*, defaults to `256`):
            Longest completion, in tokens; completions cut there are counted as `truncated` in `stats.json`.
        seed (`int`, *optional*, defaults to `0`):
            Sampling seed. Each chunk of prompts is seeded from it and its position, so the rows do not depend on the
            number of processes or on interruptions.
        generation_batch_size (`int`, *optional*, defaults to `8`):
            Prompts per `generate` call (each with all its samples). Part of the seed schedule: changing it changes
            the samples.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.9`):
            Fraction of GPU memory vLLM may take (backend `vllm`).
        server_base_url (`list[str]`, *optional*):
            Backend `server`: base URLs of OpenAI-compatible servers (e.g. `http://node1:8000/v1`). Requests are spread
            over the servers that serve each model of the pool (their `/v1/models`); several URLs spread one run over
            a cluster. Not part of the resumed configuration: a run may resume against other servers.
        server_model_names (`list[str]`, *optional*):
            Backend `server`: the name each model of the pool is served under (`vllm serve --served-model-name`);
            defaults to `model_name_or_path`. The tokenizer and chat template are still read from
            `model_name_or_path`.
        server_api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Backend `server`: environment variable holding the API key, sent as a bearer token when it is set.
        server_token_ids (`bool`, *optional*, defaults to `True`):
            Backend `server`: send prompts as token ids rendered by the local tokenizer (vLLM, SGLang), so the server
            sees exactly the tokens the transformers backend would; `False` sends the rendered text (servers that take
            text only).
        server_max_concurrency (`int`, *optional*, defaults to `32`):
            Backend `server`: requests in flight at once (one request = one prompt and its samples) per generate
            process, over all its servers.
        server_max_retries (`int`, *optional*, defaults to `8`):
            Backend `server`: retries of a request after a connection error, a timeout or a 5xx/429 answer, with
            exponential backoff (1, 2, 4, ... s, at most 60 s); then the run stops and a re-run resumes it.
        server_timeout (`float`, *optional*, defaults to `600`):
            Backend `server`: seconds to wait for one answer.
        chat_template_kwargs (`dict[str, Any]`, *optional*):
            Extra arguments of `apply_chat_template` for conversational prompts (e.g. `{"enable_thinking": false}`),
            for the samplers and the reward models.
        reward_funcs (`list[str]`):
            Reward sources, in order: reward models (a model id or folder with an
            `AutoModelForSequenceClassification` of one label) and reward functions with `trl.GRPOTrainer`'s signature
            given as `module:function` or `path/to/file.py:function`. Required, unless `build_reward_dataset` is given
            the sources as callables.
        reward_weights (`list[float]`, *optional*):
            Weight of each source in the `rewards` column (defaults to 1 each). Each source's raw scores are kept in a
            `rewards_<name>` column.
        reward_batch_size (`int`, *optional*, defaults to `8`):
            Completions per reward-model forward pass.
        chunk_size (`int`, *optional*, defaults to `64`):
            Prompts per committed chunk: the unit of resumption and of work per process. Part of the seed schedule.
        min_completions (`int`, *optional*, defaults to `2`):
            Prompts left with fewer scored, distinct, non-empty completions are dropped (the trainers need K >= 2).
        deduplicate (`bool`, *optional*, defaults to `True`):
            Keep one copy of identical completions of a prompt (the first model's).
        push_to_hub (`bool`, *optional*, defaults to `False`):
            Push the dataset and its card to the Hub as `hub_dataset_id`.
        hub_dataset_id (`str`, *optional*):
            Repository of the pushed dataset.
        hub_private (`bool`, *optional*, defaults to `False`):
            Create the Hub repository as private.
        overwrite (`bool`, *optional*, defaults to `False`):
            Start over when `output_dir` holds a run with different sampling settings, an older sample format or an
            unreadable `generate_config.json` (instead of refusing); a change of scoring settings needs no overwrite
            (the committed samples are rescored).
    """

    output_dir: str = field(metadata={"help": "Where the reward dataset and the resumable chunks are written."})
    dataset_name: str | None = field(default=None, metadata={"help": "Prompts: Hub id, folder or data file."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split holding the prompts."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts."})
    model_name_or_path: list[str] = field(
        default_factory=list, metadata={"help": "Sampling model, or a pool of models writing some of the K each."}
    )
    model_names: list[str] | None = field(default=None, metadata={"help": "Labels of the models (`models` column)."})
    num_completions: int = field(default=4, metadata={"help": "K: completions per prompt in all."})
    completions_per_model: list[int] | None = field(
        default=None, metadata={"help": "Completions per prompt from each model of the pool."}
    )
    backend: str = field(default="transformers", metadata={"help": "Sampling backend.", "choices": list(_BACKENDS)})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype of every model."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k truncation (0: off)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion in tokens."})
    seed: int = field(default=0, metadata={"help": "Sampling seed."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "GPU memory fraction for vLLM."})
    server_base_url: list[str] | None = field(
        default=None,
        metadata={"help": "Backend server: base URLs of OpenAI-compatible servers (http://host:8000/v1)."},
    )
    server_model_names: list[str] | None = field(
        default=None, metadata={"help": "Backend server: served name of each model (defaults to model_name_or_path)."}
    )
    server_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Backend server: environment variable holding the API key."}
    )
    server_token_ids: bool = field(default=True, metadata={"help": "Backend server: send prompts as token ids."})
    server_max_concurrency: int = field(default=32, metadata={"help": "Backend server: requests in flight at once."})
    server_max_retries: int = field(default=8, metadata={"help": "Backend server: retries of a failed request."})
    server_timeout: float = field(default=600.0, metadata={"help": "Backend server: seconds to wait for an answer."})
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Extra apply_chat_template arguments (a JSON object on the command line)."}
    )
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={"help": "Reward models (id or folder) and reward functions (module:function or file.py:function)."},
    )
    reward_weights: list[float] | None = field(default=None, metadata={"help": "Weight of each reward source."})
    reward_batch_size: int = field(default=8, metadata={"help": "Completions per reward-model forward pass."})
    chunk_size: int = field(default=64, metadata={"help": "Prompts per committed (resumable) chunk."})
    min_completions: int = field(default=2, metadata={"help": "Drop prompts left with fewer completions."})
    deduplicate: bool = field(default=True, metadata={"help": "Drop identical completions of a prompt."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the dataset and its card to the Hub."})
    hub_dataset_id: str | None = field(default=None, metadata={"help": "Hub repository of the pushed dataset."})
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    overwrite: bool = field(default=False, metadata={"help": "Start over if output_dir holds a different run."})

    def __post_init__(self):
        if isinstance(self.chat_template_kwargs, str):
            try:
                self.chat_template_kwargs = json.loads(self.chat_template_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"`chat_template_kwargs` must be a JSON object: {error}") from None
        if isinstance(self.model_name_or_path, str):
            self.model_name_or_path = [self.model_name_or_path]
        if isinstance(self.reward_funcs, str):
            self.reward_funcs = [self.reward_funcs]
        if not self.model_name_or_path:
            raise ValueError("`model_name_or_path` is required: the model that samples, or a list of models.")
        if self.backend not in _BACKENDS:
            raise ValueError(f"`backend` must be one of {_BACKENDS}, got {self.backend!r}.")
        n_models = len(self.model_name_or_path)
        if self.model_names is not None and len(self.model_names) != n_models:
            raise ValueError(f"`model_names` has {len(self.model_names)} names for {n_models} models.")
        if isinstance(self.server_base_url, str):
            self.server_base_url = [self.server_base_url]
        if self.backend == "server" and not self.server_base_url:
            raise ValueError(
                "backend `server` needs `server_base_url`: the base URL(s) of OpenAI-compatible servers, e.g. "
                "http://127.0.0.1:8000/v1."
            )
        if self.server_model_names is not None and len(self.server_model_names) != n_models:
            raise ValueError(f"`server_model_names` has {len(self.server_model_names)} names for {n_models} models.")
        if self.num_completions < 1:
            raise ValueError(f"`num_completions` must be at least 1, got {self.num_completions}.")
        if self.min_completions < 1:
            raise ValueError(f"`min_completions` must be at least 1, got {self.min_completions}.")
        if self.num_completions < self.min_completions:
            fix = (
                "raise num_completions, or set min_completions 1 to ask for single samples (SFT data or an "
                "evaluation set: NCATrainer and InfoNCATrainer need K >= 2 completions per prompt)"
                if self.num_completions == 1
                else f"raise num_completions or lower min_completions to at most {self.num_completions}"
            )
            raise ValueError(
                f"`num_completions` ({self.num_completions}) is below `min_completions` ({self.min_completions}): "
                f"every prompt would be dropped; {fix}."
            )
        if self.completions_per_model is None:
            base, extra = divmod(self.num_completions, n_models)
            self.completions_per_model = [base + (i < extra) for i in range(n_models)]
        elif len(self.completions_per_model) != n_models:
            raise ValueError(
                f"`completions_per_model` has {len(self.completions_per_model)} entries for {n_models} models."
            )
        elif sum(self.completions_per_model) != self.num_completions or min(self.completions_per_model) < 0:
            raise ValueError(
                f"`completions_per_model` {self.completions_per_model} must be non-negative and sum to "
                f"`num_completions` ({self.num_completions})."
            )
        if (
            self.reward_funcs
            and self.reward_weights is not None
            and len(self.reward_weights) != len(self.reward_funcs)
        ):
            raise ValueError(
                f"`reward_weights` has {len(self.reward_weights)} weights for {len(self.reward_funcs)} reward sources."
            )
        for name in (
            "chunk_size",
            "generation_batch_size",
            "reward_batch_size",
            "max_new_tokens",
            "server_max_concurrency",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.server_max_retries < 0 or self.server_timeout <= 0:
            raise ValueError(
                f"`server_max_retries` must be >= 0 and `server_timeout` > 0, got {self.server_max_retries} and "
                f"{self.server_timeout}."
            )
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"`max_prompts` must be at least 1, got {self.max_prompts}.")
        if self.push_to_hub and not self.hub_dataset_id:
            raise ValueError("`push_to_hub` needs `hub_dataset_id` (the dataset repository to push to).")
