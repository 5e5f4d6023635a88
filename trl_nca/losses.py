"""NCA and InfoNCA losses (Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards").

Pure tensor functions, no trainer state. Shapes: `(B, K)` = B prompts, K responses each. For prompt b and response i:

- model reward  `rho_i = beta * (log pi_theta(y_i|x) - log mu(y_i|x))` (sequence log-probs, summed over tokens);
- target weights `w = softmax(r / alpha)` over the prompt's responses (`alpha = 0`: all weight on the best response,
  shared equally among ties — the `alpha -> 0` limit, used for preference data);
- InfoNCA: `L = - sum_i w_i * log softmax(rho)_i`;
- NCA:     `L = - sum_i w_i * log sigmoid(rho_i) - (1/K) * sum_i log sigmoid(-rho_i)`.

Ragged K: `mask[b, i]` is False for padding slots. They get no weight, take no part in the softmax, and K in the
`1/K` term is the prompt's own number of responses. Everything is computed in at least float32 (float64 stays
float64), whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "AUTHORS_FIRST_RESPONSE_BONUS",
    "favour_first_response",
    "infonca_loss",
    "model_rewards",
    "nca_loss",
    "target_weights",
    "weight_entropy",
]

#: The authors' tie-break: `score_A0 + 0.01` before `softmax(scores / temperature_alpha)` (their `nca_loss`).
AUTHORS_FIRST_RESPONSE_BONUS = 0.01


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for tensor in tensors:
        if tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_shapes(policy_logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor, mask) -> torch.Tensor:
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must have shape (B, K), got {tuple(policy_logps.shape)}.")
    for name, tensor in (("ref_logps", ref_logps), ("rewards", rewards)):
        if tensor.shape != policy_logps.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}; expected {tuple(policy_logps.shape)}.")
    if mask is None:
        return torch.ones(policy_logps.shape, dtype=torch.bool, device=policy_logps.device)
    if mask.shape != policy_logps.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected {tuple(policy_logps.shape)}.")
    mask = mask.to(device=policy_logps.device, dtype=torch.bool)
    if not bool(mask.any(dim=-1).all()):
        raise ValueError("Every prompt needs at least one response: a row of `mask` is all False.")
    return mask


def target_weights(
    rewards: torch.Tensor, alpha: float | torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Soft target `softmax(rewards / alpha)` over each row's real responses.

    Args:
        rewards: `(B, K)` scalar rewards.
        alpha: reward temperature, a float or a `(B,)` tensor (per prompt). `0` selects hard labels: uniform weight on
            the responses sharing the row's highest reward (the `alpha -> 0` limit).
        mask: `(B, K)` bool, True = real response.

    Returns:
        `(B, K)` weights, zero on masked slots, each row summing to 1.
    """
    dtype = _compute_dtype(rewards)
    rewards = rewards.to(dtype)
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    alpha = torch.as_tensor(alpha, dtype=dtype, device=rewards.device)
    if alpha.dim() == 0:
        alpha = alpha.expand(rewards.size(0))
    if bool((alpha < 0).any()) or not bool(torch.isfinite(alpha).all()):
        raise ValueError(f"alpha must be finite and >= 0 (0 = hard labels), got {alpha.tolist()}.")
    masked = rewards.masked_fill(~mask, float("-inf"))
    best = masked.max(dim=-1, keepdim=True).values
    # Shift by the row maximum before dividing, so tiny alphas and huge rewards cannot overflow.
    shifted = (masked - best) / torch.where(alpha > 0, alpha, torch.ones_like(alpha)).unsqueeze(-1)
    soft = torch.softmax(shifted, dim=-1)
    is_best = (masked == best) & mask
    hard = is_best.to(dtype) / is_best.sum(dim=-1, keepdim=True).to(dtype)
    return torch.where((alpha > 0).unsqueeze(-1), soft, hard)


def favour_first_response(rewards: torch.Tensor, bonus: float = AUTHORS_FIRST_RESPONSE_BONUS) -> torch.Tensor:
    """`rewards` with `bonus` added to each row's first response, the authors' tie-break.

    Their code adds 0.01 to `A0` (the response listed first) before the softmax, so with UltraFeedback's scores a tie
    on the top reward gives the first response all the weight at small alpha, where `target_weights` alone shares it
    equally; at larger alpha it shifts the soft weights exactly as theirs. Hard-labelled preference rows (rewards
    (1, 0)) are unchanged.
    """
    dtype = _compute_dtype(rewards)
    bonus_row = torch.zeros(rewards.size(-1), dtype=dtype, device=rewards.device)
    bonus_row[0] = bonus
    return rewards.to(dtype) + bonus_row


def model_rewards(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """`beta * (policy_logps - ref_logps)` in at least float32."""
    dtype = _compute_dtype(policy_logps, ref_logps)
    return beta * (policy_logps.to(dtype) - ref_logps.to(dtype))


def weight_entropy(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row entropy `-sum_i w_i log w_i` of the target weights, `(B,)`."""
    terms = torch.where(weights > 0, weights * weights.clamp_min(1e-45).log(), torch.zeros_like(weights))
    if mask is not None:
        terms = terms.masked_fill(~mask.to(torch.bool), 0.0)
    return -terms.sum(dim=-1)


def _rewards_and_weights(policy_logps, ref_logps, rewards, beta, alpha, mask):
    """Shared preamble of both losses: checked mask, model rewards rho and target weights w, all `(B, K)`."""
    mask = _check_shapes(policy_logps, ref_logps, rewards, mask)
    rho = model_rewards(policy_logps, ref_logps, beta)
    return mask, rho, target_weights(rewards, alpha, mask).to(rho.dtype)


def infonca_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    alpha: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCA per-prompt loss `-sum_i w_i log softmax(rho)_i`, shape `(B,)`.

    With K = 2 and hard labels (alpha = 0, the chosen response rewarded higher) this is exactly DPO's
    `-log sigmoid(rho_w - rho_l)`.
    """
    mask, rho, weights = _rewards_and_weights(policy_logps, ref_logps, rewards, beta, alpha, mask)
    log_probs = torch.log_softmax(rho.masked_fill(~mask, float("-inf")), dim=-1)
    return -torch.where(mask, weights * log_probs, torch.zeros_like(log_probs)).sum(dim=-1)


def nca_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    alpha: float | torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """NCA per-prompt loss `-sum_i w_i log sigmoid(rho_i) - (1/K) sum_i log sigmoid(-rho_i)`, shape `(B,)`.

    With K = 2 and hard labels this is exactly TRL's `nca_pair`:
    `-log sigmoid(rho_w) - 1/2 log sigmoid(-rho_w) - 1/2 log sigmoid(-rho_l)`.
    """
    mask, rho, weights = _rewards_and_weights(policy_logps, ref_logps, rewards, beta, alpha, mask)
    zeros = torch.zeros_like(rho)
    attract = torch.where(mask, weights * F.logsigmoid(rho), zeros).sum(dim=-1)
    repel = torch.where(mask, F.logsigmoid(-rho), zeros).sum(dim=-1) / mask.sum(dim=-1).to(rho.dtype)
    return -attract - repel
