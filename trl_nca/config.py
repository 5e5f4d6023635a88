"""Configs: the K-way trainers' (`trl.DPOConfig` plus the reward temperature or the listwise options) and
`trl-nca generate`'s."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from trl import DPOConfig

from trl_nca import default_deepspeed_accelerator
from trl_nca.generate_config import RewardDataConfig  # noqa: F401  (its home is the light module)

# Before a config (accelerate's state under a DeepSpeed launch) or a trainer imports DeepSpeed: no "Setting accelerator
# to CPU" line on CPU runs.
default_deepspeed_accelerator()

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
            tie-break; preference rows are unaffected. The bonus goes to the row's first response whatever its reward:
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
