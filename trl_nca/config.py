"""Configs for the NCA and InfoNCA trainers: `trl.DPOConfig` plus the reward temperature."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from trl import DPOConfig

# Options of DPOConfig that only make sense for DPO's pairwise losses; the K-way trainers refuse them rather than
# silently ignoring them. Each maps to (the neutral value, why it is refused).
_DPO_ONLY_OPTIONS = {
    "ld_alpha": (None, "LD-DPO length desensitisation splits a chosen/rejected pair into shared and tail tokens"),
    "use_weighting": (False, "WPO weighting multiplies the chosen and rejected weights of a pair"),
    "f_divergence_type": ("reverse_kl", "f-divergence scores are defined for DPO's pairwise margin"),
    "label_smoothing": (0.0, "label smoothing belongs to the robust/exo_pair/aot pairwise losses"),
}


@dataclass
class _RewardAlignmentConfig(DPOConfig):
    r"""
    Shared fields of [`NCAConfig`] and [`InfoNCAConfig`]. Every [`~trl.DPOConfig`] field keeps its meaning; the batch
    size counts prompts (each with its K responses), `max_length` applies to each prompt+response sequence.

    Parameters:
        alpha (`float`, *optional*, defaults to `1.0`):
            Reward temperature α. The target distribution over a prompt's K responses is `softmax(rewards / α)`: small
            α puts (almost) all the weight on the best response, large α spreads it evenly. `0` means hard labels
            (uniform over the responses that share the highest reward). Preference data (chosen/rejected) always uses
            hard labels, whatever `alpha` is. Pick α relative to the spread of your rewards: for UltraFeedback's 1-10
            scores, α = 1 gives the best of four typical responses most of the weight.
        beta (`float`, *optional*, defaults to `0.1`):
            β of the model reward `β · (log π_θ(y|x) − log μ(y|x))`: the strength of the KL regularisation towards the
            reference model. The authors used 0.01 on UltraFeedback with Mistral-7B.
        kway_layout (`str`, *optional*, defaults to `"auto"`):
            How the K responses of a prompt are laid out for the forward pass. `"shared_prompt"` computes the prompt
            once, its responses as branches after it (a 4D attention mask and explicit position ids); `"padded"` runs
            one padded prompt+response row per response (the prompt K times, the authors' layout). `"auto"` picks
            `"shared_prompt"` when the model supports it (sdpa or eager attention, no MoE router aux loss, no
            prompt-learning PEFT, `keep_start` truncation or `max_prompt_length`) and logs the reason once when it
            falls back to `"padded"`.
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
            The trainer's own loss (`"nca"` for [`NCATrainer`], `"infonca"` for [`InfoNCATrainer`]), optionally with
            `"sft"` (negative log-likelihood of each prompt's best response, averaged over its tokens), combined
            through `loss_weights`.
    """

    alpha: float = field(
        default=1.0,
        metadata={
            "help": "Reward temperature: target weights are softmax(rewards / alpha) over each prompt's responses. "
            "0 = hard labels on the best response. Preference data always uses hard labels."
        },
    )
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

    _own_loss: ClassVar[str] = ""  # the trainer's own loss name, set by the subclasses

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"`alpha` (reward temperature) must be a finite number >= 0, got {self.alpha!r}.")
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
        allowed = {self._own_loss, "sft"}
        unknown = [name for name in self.loss_type if name not in allowed]
        if unknown or self._own_loss not in self.loss_type:
            raise ValueError(
                f"{type(self).__name__} trains with loss_type {self._own_loss!r}, optionally plus 'sft' (weighted "
                f"by `loss_weights`); got {self.loss_type}. For DPO's pairwise losses use trl.DPOConfig with "
                f"trl.DPOTrainer{'; for InfoNCA use InfoNCAConfig' if 'infonca' in unknown else ''}"
                f"{'; for NCA use NCAConfig' if 'nca' in unknown or 'nca_pair' in unknown else ''}."
            )
        for name, (neutral, why) in _DPO_ONLY_OPTIONS.items():
            if getattr(self, name) != neutral:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` is a DPO-only option that has no meaning for K-way "
                    f"{self._own_loss.upper()} ({why}). Leave it at its default ({neutral!r})."
                )


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
    _own_loss: ClassVar[str] = "nca"


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
    _own_loss: ClassVar[str] = "infonca"
