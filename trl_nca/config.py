"""Configs: the K-way trainers' (`trl.DPOConfig` plus the reward temperature or the listwise options) and
`trl-nca generate`'s."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from trl import DPOConfig

# Options of DPOConfig that only make sense for DPO's pairwise losses; the K-way trainers refuse them rather than
# silently ignoring them. Each maps to (the neutral value, why it is refused).
_DPO_ONLY_OPTIONS = {
    "ld_alpha": (None, "LD-DPO length desensitisation splits a chosen/rejected pair into shared and tail tokens"),
    "use_weighting": (False, "WPO weighting multiplies the chosen and rejected weights of a pair"),
    "f_divergence_type": ("reverse_kl", "f-divergence scores are defined for DPO's pairwise margin"),
    "label_smoothing": (0.0, "label smoothing belongs to the robust/exo_pair/aot pairwise losses"),
}


#: Loss name -> (what it is called in the error, the config that trains with it).
_LOSS_CONFIGS = {
    "nca": ("NCA", "NCAConfig"),
    "nca_pair": ("NCA", "NCAConfig"),
    "infonca": ("InfoNCA", "InfoNCAConfig"),
    "plackett_luce": ("the listwise losses", "ListwiseConfig"),
    "lipo_lambda": ("the listwise losses", "ListwiseConfig"),
    "all_pairs": ("the listwise losses", "ListwiseConfig"),
}


def _config_hint(loss_types: list[str]) -> str:
    """`'; for NCA use NCAConfig'`-style hints for the K-way losses among `loss_types`."""
    hints = dict.fromkeys(_LOSS_CONFIGS[name] for name in loss_types if name in _LOSS_CONFIGS)
    return "".join(f"; for {subject} use {config}" for subject, config in hints)


@dataclass
class _KWayConfig(DPOConfig):
    r"""
    Shared fields of the K-way configs ([`NCAConfig`], [`InfoNCAConfig`], [`ListwiseConfig`]). Every
    [`~trl.DPOConfig`] field keeps its meaning; the batch size counts prompts (each with its K responses),
    `max_length` applies to each prompt+response sequence.

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            β of the model reward `β · (log π_θ(y|x) − log μ(y|x))`: the strength of the KL regularisation towards the
            reference model. The authors used 0.01 on UltraFeedback with Mistral-7B.
        kway_layout (`str`, *optional*, defaults to `"auto"`):
            How the K responses of a prompt are laid out for the forward pass. `"shared_prompt"` computes the prompt
            once, its responses as branches after it (per-token layout metadata from which the trainer builds the
            attention mask on the device: dense for sdpa/eager, a block-sparse `BlockMask` for flex_attention; with a
            MoE model the router aux loss counts each prompt token once); `"padded"` runs one prompt+response row per
            response (the prompt K times, the authors' layout). `"auto"` picks `"shared_prompt"` when the model
            supports it (sdpa, eager or flex_attention, no prompt-learning PEFT, `keep_start` truncation or
            `max_prompt_length`, positions from `position_ids` and tokens mixed only through attention: not ALiBi,
            recurrent, convolutional or state-space layers) and logs the reason once when it falls back to
            `"padded"`; with FlashAttention the fallback is packed (`padding_free`) so no padding is computed.
            `padding_free=True` packs each batch into one row in either layout (for the same models). A layout asked
            for explicitly (`"shared_prompt"`, or `"padded"` with `padding_free=True`) that cannot be exact raises.
        kway_layout_check (`bool`, *optional*, defaults to `True`):
            Check the chosen layout on the first batch the trainer computes (training, evaluation or reference
            precompute): one no-grad forward of up to two prompts in both that layout and the padded layout; if a
            response's log-prob differs beyond a dtype-aware tolerance (fp32: 1e-4 nats + 1e-5 relative), fall back
            to the padded layout with one logged line (raise, for a layout asked for explicitly). Every process takes
            the same decision. Costs one small extra forward, once. Set False for a model you know the layout is
            exact for.
        tie_break (`str`, *optional*, defaults to `"share"`):
            How the target weights treat responses tied on the top reward. `"share"`: equal rewards get equal weight
            (exactly `softmax(rewards / α)`; with α = 0 the tied best responses share the weight). `"first"`: the
            authors' code (`score_A0 + 0.01` in their `nca_loss`): 0.01 is added to the first response's reward
            before the softmax, so at small α a tie goes to the response listed first. Use it to reproduce their
            runs; preference rows are unaffected. The bonus goes to the row's first response whatever its reward:
            their data (the `authors_reward` format) and `prepare_reward_dataset` list the best response first.
        max_prompt_length (`int` or `None`, *optional*, defaults to `None`):
            The authors' truncation (TRL < 0.12's DPO rule, as in their code) instead of DPOConfig's per-sequence
            `truncation_mode`: when a prompt plus its longest response exceeds `max_length`, the prompt keeps its last
            `max_prompt_length` tokens, and if that is still too long every response keeps its first `max_length -
            max_prompt_length` tokens. The prompt is cut the same way for all K responses, so rows whose prompt alone
            exceeds `max_length` are kept (not dropped) and the shared-prompt layout stays available. Needs
            `max_length`; the authors used 512 with `max_length=1024`.
        loss_type (`list[str]`):
            The trainer's own loss (`"nca"` for [`NCATrainer`], `"infonca"` for [`InfoNCATrainer`], one or more of the
            listwise losses for [`ListwiseTrainer`]), optionally with `"sft"` (negative log-likelihood of each prompt's
            best response, averaged over its tokens), combined through `loss_weights`.
    """

    beta: float = field(
        default=0.1,
        metadata={"help": "β of the model reward β·(log π − log μ): KL regularisation strength."},
    )

    kway_layout: str = field(
        default="auto",
        metadata={
            "help": "Forward layout of the K responses: 'shared_prompt' (prompt computed once), 'padded' (one row per "
            "response), or 'auto' (shared_prompt when the model supports it).",
            "choices": ["auto", "shared_prompt", "padded"],
        },
    )

    kway_layout_check: bool = field(
        default=True,
        metadata={
            "help": "Check the layout on the first batch against the padded layout (one small no-grad forward) and "
            "fall back to padded when a log-prob differs."
        },
    )

    tie_break: str = field(
        default="share",
        metadata={
            "help": "Ties on the top reward: 'share' (equal weight) or 'first' (the authors' +0.01 on the first "
            "response's reward).",
            "choices": ["share", "first"],
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "The authors' truncation: when prompt + longest response exceeds max_length, keep the prompt's "
            "last max_prompt_length tokens, then cut each response to max_length - max_prompt_length."
        },
    )

    _own_losses: ClassVar[tuple[str, ...]] = ()  # the trainer's own loss names, set by the subclasses

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"`beta` must be a finite number > 0, got {self.beta!r}.")
        if self.tie_break not in ("share", "first"):
            raise ValueError(f"`tie_break` must be 'share' or 'first', got {self.tie_break!r}.")
        if self.max_prompt_length is not None:
            if self.max_length is None:
                raise ValueError("`max_prompt_length` needs `max_length` (the budget of prompt + response).")
            is_int = isinstance(self.max_prompt_length, int) and not isinstance(self.max_prompt_length, bool)
            if not (is_int and 0 < self.max_prompt_length < self.max_length):
                raise ValueError(
                    f"`max_prompt_length` must be an integer > 0 and < max_length={self.max_length} (responses keep "
                    f"max_length - max_prompt_length tokens), got {self.max_prompt_length!r}."
                )
        if self.kway_layout not in ("auto", "shared_prompt", "padded"):
            raise ValueError(f"`kway_layout` must be 'auto', 'shared_prompt' or 'padded', got {self.kway_layout!r}.")
        allowed = {*self._own_losses, "sft"}
        unknown = [name for name in self.loss_type if name not in allowed]
        if unknown or not any(name in self._own_losses for name in self.loss_type):
            own = " or ".join(repr(name) for name in self._own_losses)
            raise ValueError(
                f"{type(self).__name__} trains with loss_type {own}, optionally plus 'sft' (weighted by "
                f"`loss_weights`); got {self.loss_type}. For DPO's pairwise losses use trl.DPOConfig with "
                f"trl.DPOTrainer{_config_hint(unknown)}."
            )
        for name, (neutral, why) in _DPO_ONLY_OPTIONS.items():
            if getattr(self, name) != neutral:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` is a DPO-only option that has no meaning for K-way "
                    f"{'/'.join(self._own_losses)} ({why}). Leave it at its default ({neutral!r})."
                )


@dataclass
class _RewardAlignmentConfig(_KWayConfig):
    r"""
    Shared fields of [`NCAConfig`] and [`InfoNCAConfig`]: [`_KWayConfig`] plus the reward temperature.

    Parameters:
        alpha (`float`, *optional*, defaults to `1.0`):
            Reward temperature α. The target distribution over a prompt's K responses is `softmax(rewards / α)`: small
            α puts (almost) all the weight on the best response, large α spreads it evenly. `0` means hard labels
            (uniform over the responses that share the highest reward). Preference data (chosen/rejected) always uses
            hard labels, whatever `alpha` is. Pick α relative to the spread of your rewards: for UltraFeedback's 1-10
            scores, α = 1 gives the best of four typical responses most of the weight.
    """

    alpha: float = field(
        default=1.0,
        metadata={
            "help": "Reward temperature: target weights are softmax(rewards / alpha) over each prompt's responses. "
            "0 = hard labels on the best response. Preference data always uses hard labels."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"`alpha` (reward temperature) must be a finite number >= 0, got {self.alpha!r}.")


@dataclass
class NCAConfig(_RewardAlignmentConfig):
    r"""
    Configuration for [`NCATrainer`]: [`~trl.DPOConfig`] plus the reward temperature `alpha`.

    NCA optimises each response's absolute model reward: `−Σ_i w_i log σ(ρ_i) − (1/K) Σ_i log σ(−ρ_i)`, with
    `w = softmax(r / α)` and `ρ_i = β (log π_θ(y_i|x) − log μ(y_i|x))`. On preference data it equals TRL's
    `loss_type="nca_pair"`.

    Parameters:
        alpha (`float`, *optional*, defaults to `1.0`): reward temperature, see [`InfoNCAConfig`] for details.
        loss_type (`list[str]`, *optional*, defaults to `["nca"]`): `"nca"`, optionally plus `"sft"`.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["nca"],
        metadata={"help": "'nca', optionally with 'sft' (NLL of the best response), weighted by `loss_weights`."},
    )
    _own_losses: ClassVar[tuple[str, ...]] = ("nca",)


@dataclass
class InfoNCAConfig(_RewardAlignmentConfig):
    r"""
    Configuration for [`InfoNCATrainer`]: [`~trl.DPOConfig`] plus the reward temperature `alpha`.

    InfoNCA is the cross-entropy between the reward softmax and the model-reward softmax over a prompt's K responses:
    `−Σ_i w_i log softmax(ρ)_i`. On preference data it equals DPO (`loss_type="sigmoid"`).

    Parameters:
        alpha (`float`, *optional*, defaults to `1.0`):
            Reward temperature: `w = softmax(rewards / α)`; `0` = hard labels on the best response.
        loss_type (`list[str]`, *optional*, defaults to `["infonca"]`): `"infonca"`, optionally plus `"sft"`.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["infonca"],
        metadata={"help": "'infonca', optionally with 'sft' (NLL of the best response), weighted by `loss_weights`."},
    )
    _own_losses: ClassVar[tuple[str, ...]] = ("infonca",)


_BACKENDS = ("transformers", "vllm", "server")


LISTWISE_LOSSES = ("plackett_luce", "lipo_lambda", "all_pairs")


@dataclass
class ListwiseConfig(_KWayConfig):
    r"""
    Configuration for [`ListwiseTrainer`]: [`~trl.DPOConfig`] plus the listwise losses' options.

    The listwise losses train on the ranking the rewards give a prompt's K responses (ties included), with model
    rewards `ρ_i = β (log π_θ(y_i|x) − log μ(y_i|x))`:

    - `"plackett_luce"` (DPO paper, arXiv 2305.18290, appendix A.3): the negative log-likelihood of the ranking under
      the Plackett-Luce model on ρ, `−Σ_k log [exp(ρ_τ(k)) / Σ_{j ≥ k} exp(ρ_τ(j))]`; tied responses share a stage.
    - `"lipo_lambda"` (LiPO-λ, arXiv 2402.01878): `−Σ_{ψ_i > ψ_j} Δ_ij log σ(ρ_i − ρ_j)` with the LambdaRank weights
      `Δ_ij = |G_i − G_j| · |1/ln(1 + τ_i) − 1/ln(1 + τ_j)|`, `G = 2^ψ − 1`, τ the ranks under the current ρ.
    - `"all_pairs"`: DPO's `−log σ(ρ_i − ρ_j)` over every pair with `r_i > r_j`, averaged (or summed) per prompt.

    With K = 2 (preference pairs), `"plackett_luce"` and `"all_pairs"` equal DPO (`loss_type="sigmoid"`) and
    `"lipo_lambda"` equals `(1/ln 2 − 1/ln 3)` times DPO. Several listwise losses can be combined, weighted by
    `loss_weights`. The reward temperature α of NCA/InfoNCA has no role here: only the order of the rewards matters
    (and, for `"lipo_lambda"` and a gap-weighted `"all_pairs"`, their values).

    Parameters:
        loss_type (`list[str]`, *optional*, defaults to `["plackett_luce"]`):
            One or more of `"plackett_luce"`, `"lipo_lambda"`, `"all_pairs"`, optionally plus `"sft"`.
        plackett_luce_top_m (`int` or `None`, *optional*, defaults to `None`):
            The truncated top-m Plackett-Luce form: only the stages of responses with fewer than `m` responses rewarded
            strictly above them count (`1`: only the best response(s) against the rest, InfoNCA's hard-label form).
            `None` keeps every stage.
        lipo_label_normalization (`str`, *optional*, defaults to `"none"`):
            LiPO-λ's labels ψ: `"none"` uses the rewards as given (the paper's labels lie in [0, 1]), `"minmax"`
            rescales each prompt's rewards to [0, 1] (best 1, worst 0). Use `"minmax"` for rewards on a wider scale:
            with 1-10 ratings the gain `2^ψ − 1` reaches ~1000.
        all_pairs_reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` averages the pair losses of a prompt (each prompt weighs the same, as in DPO on one pair),
            `"sum"` adds them (prompts with more distinct rewards weigh more).
        all_pairs_gap_weighted (`bool`, *optional*, defaults to `False`):
            Weight each pair by its reward gap `r_i − r_j`.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["plackett_luce"],
        metadata={
            "help": "One or more of 'plackett_luce', 'lipo_lambda', 'all_pairs', optionally with 'sft', weighted by "
            "`loss_weights`."
        },
    )
    plackett_luce_top_m: int | None = field(
        default=None,
        metadata={"help": "Plackett-Luce over the top-m stages only (None: every stage)."},
    )
    lipo_label_normalization: str = field(
        default="none",
        metadata={
            "help": "LiPO-λ labels: 'none' (the rewards) or 'minmax' (each prompt's rewards rescaled to [0, 1]).",
            "choices": ["none", "minmax"],
        },
    )
    all_pairs_reduction: str = field(
        default="mean",
        metadata={"help": "All-pairs DPO per prompt: 'mean' or 'sum' over its pairs.", "choices": ["mean", "sum"]},
    )
    all_pairs_gap_weighted: bool = field(
        default=False,
        metadata={"help": "All-pairs DPO: weight each pair by its reward gap."},
    )
    _own_losses: ClassVar[tuple[str, ...]] = LISTWISE_LOSSES

    def __post_init__(self):
        super().__post_init__()
        top_m = self.plackett_luce_top_m
        if top_m is not None and (isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1):
            raise ValueError(f"`plackett_luce_top_m` must be a positive integer or None, got {top_m!r}.")
        if self.lipo_label_normalization not in ("none", "minmax"):
            raise ValueError(
                f"`lipo_label_normalization` must be 'none' or 'minmax', got {self.lipo_label_normalization!r}."
            )
        if self.all_pairs_reduction not in ("mean", "sum"):
            raise ValueError(f"`all_pairs_reduction` must be 'mean' or 'sum', got {self.all_pairs_reduction!r}.")
        # An option of a loss that does not train would be silently ignored: refuse it.
        for name, value, neutral, loss in (
            ("plackett_luce_top_m", top_m, None, "plackett_luce"),
            ("lipo_label_normalization", self.lipo_label_normalization, "none", "lipo_lambda"),
            ("all_pairs_reduction", self.all_pairs_reduction, "mean", "all_pairs"),
            ("all_pairs_gap_weighted", self.all_pairs_gap_weighted, False, "all_pairs"),
        ):
            if value != neutral and loss not in self.loss_type:
                raise ValueError(
                    f"`{name}={value!r}` only applies to loss_type {loss!r}, which is not in {self.loss_type}. "
                    f"Add {loss!r} to loss_type or leave `{name}` at its default ({neutral!r})."
                )


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
