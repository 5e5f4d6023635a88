"""K-way losses: NCA and InfoNCA (Chen et al., "Noise Contrastive Alignment of Language Models with Explicit Rewards")
and the listwise family (Plackett-Luce DPO, LiPO-λ, all-pairs DPO).

Pure tensor functions, no trainer state. Shapes: `(B, K)` = B prompts, K responses each. For prompt b and response i:

- model reward  `rho_i = beta * (log pi_theta(y_i|x) - log mu(y_i|x))` (sequence log-probs, summed over tokens);
- target weights `w = softmax(r / alpha)` over the prompt's responses (`alpha = 0`: all weight on the best response,
  shared equally among ties — the `alpha -> 0` limit, used for preference data);
- InfoNCA: `L = - sum_i w_i * log softmax(rho)_i`;
- NCA:     `L = - sum_i w_i * log sigmoid(rho_i) - (1/K) * sum_i log sigmoid(-rho_i)`.

Listwise losses rank the responses by their rewards instead of weighting them (see each function):

- Plackett-Luce: `L = - sum_i [rho_i - logsumexp_{j: r_j <= r_i} rho_j]` (one stage per response, tied responses share
  a stage), optionally over the top-m stages only;
- LiPO-λ:  `L = - sum_{r_i > r_j} Delta_ij log sigmoid(rho_i - rho_j)` with LambdaRank weights `Delta_ij`;
- all-pairs DPO: DPO's `-log sigmoid(rho_i - rho_j)` over every pair with `r_i > r_j`, averaged or summed.

Ragged K: `mask[b, i]` is False for padding slots. They get no weight, take no part in the softmax, and K in the
`1/K` term is the prompt's own number of responses. Everything is computed in at least float32 (float64 stays
float64), whatever the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "AUTHORS_FIRST_RESPONSE_BONUS",
    "all_pairs_dpo_loss",
    "favour_first_response",
    "infonca_loss",
    "lipo_lambda_loss",
    "model_rewards",
    "nca_loss",
    "plackett_luce_loss",
    "target_weights",
    "weight_entropy",
]

#: The authors' tie-break: `score_A0 + 0.01` before `softmax(scores / temperature_alpha)` (their `nca_loss`). Their
#: `temperature_alpha` divides the scores as our `alpha` does; a comment there says it is defined differently from the
#: paper's α, so their YAML's 1e-4 is our `alpha=1e-4`, not necessarily the paper's α.
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


# ------------------------------------------------------------------------------------------------------------ listwise
def _ordered_pairs(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, K, K)` bool: `[b, i, j]` is True when response i is rewarded strictly above response j (both real)."""
    real = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return (rewards.unsqueeze(-1) > rewards.unsqueeze(-2)) & real


def _pair_margins(rho: torch.Tensor) -> torch.Tensor:
    """`(B, K, K)`: `[b, i, j] = rho_i - rho_j`."""
    return rho.unsqueeze(-1) - rho.unsqueeze(-2)


def plackett_luce_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    mask: torch.Tensor | None = None,
    top_m: int | None = None,
) -> torch.Tensor:
    """Plackett-Luce DPO per-prompt loss (DPO paper, arXiv 2305.18290, appendix A.3), shape `(B,)`.

    The rewards rank the responses, best first; the loss is the negative log-likelihood of that ranking under the
    Plackett-Luce model on the model rewards ρ: `−Σ_k log [exp(ρ_τ(k)) / Σ_{j ≥ k} exp(ρ_τ(j))]`. Tied rewards share a
    stage (Breslow's rule for ties): each tied response is scored against the same set, itself, its tied peers and
    every worse response, so `L = −Σ_i [ρ_i − logsumexp_{j: r_j ≤ r_i} ρ_j]`. A lone last response contributes 0.

    Args:
        top_m: keep only the stages of responses with fewer than `top_m` responses rewarded strictly higher (the
            truncated top-m form; all tied best responses count for `top_m=1`). `None` keeps every stage.

    With K = 2 and distinct rewards this is exactly DPO's `−log σ(ρ_w − ρ_l)`.
    """
    if top_m is not None and (isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1):
        raise ValueError(f"top_m must be a positive integer or None, got {top_m!r}.")
    mask = _check_shapes(policy_logps, ref_logps, rewards, mask)
    rho = model_rewards(policy_logps, ref_logps, beta)
    rewards = rewards.to(rho.dtype)
    # risk[b, i, j]: response j is in response i's stage (r_j <= r_i, both real).
    risk = (rewards.unsqueeze(-2) <= rewards.unsqueeze(-1)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    risk |= torch.eye(rho.size(-1), dtype=torch.bool, device=rho.device)  # padding slots too: no all -inf logsumexp
    log_denominator = torch.logsumexp(rho.unsqueeze(-2).expand_as(risk).masked_fill(~risk, float("-inf")), dim=-1)
    counted = mask
    if top_m is not None:
        n_better = _ordered_pairs(rewards, mask).sum(dim=-2)  # [b, i]: real responses rewarded above i
        counted = mask & (n_better < top_m)
    stage = torch.where(counted, rho - log_denominator.masked_fill(~mask, 0.0), torch.zeros_like(rho))
    return -stage.sum(dim=-1)


def lipo_lambda_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    mask: torch.Tensor | None = None,
    label_normalization: str = "none",
) -> torch.Tensor:
    """LiPO-λ per-prompt loss (Liu et al., arXiv 2402.01878), shape `(B,)`.

    `−Σ_{ψ_i > ψ_j} Δ_ij log σ(ρ_i − ρ_j)` over every ordered pair of real responses, with the LambdaRank weight
    `Δ_ij = |G_i − G_j| · |1/D(τ_i) − 1/D(τ_j)|`, gain `G = 2^ψ − 1`, discount `D(τ) = ln(1 + τ)`, and `τ_i` the
    1-based rank of response i under the current model rewards ρ (descending; ties in ρ go to the response listed
    first). Δ is a weight, not differentiated (LambdaLoss). Tied labels form no pair.

    Args:
        label_normalization: `"none"`: ψ = the rewards as given (the paper's labels lie in [0, 1]; with rewards on a
            wider scale, e.g. 1-10 ratings, `G = 2^ψ − 1` grows to ~1000); `"minmax"`: ψ = the rewards rescaled to
            [0, 1] per prompt (best 1, worst 0).

    With K = 2 and labels (1, 0) this is `(1/ln 2 − 1/ln 3) · DPO` whatever the ranks.
    """
    if label_normalization not in ("none", "minmax"):
        raise ValueError(f"label_normalization must be 'none' or 'minmax', got {label_normalization!r}.")
    mask = _check_shapes(policy_logps, ref_logps, rewards, mask)
    rho = model_rewards(policy_logps, ref_logps, beta)
    labels = rewards.to(rho.dtype)
    if label_normalization == "minmax":
        low = labels.masked_fill(~mask, float("inf")).min(dim=-1, keepdim=True).values
        high = labels.masked_fill(~mask, float("-inf")).max(dim=-1, keepdim=True).values
        spread = high - low
        labels = torch.where(spread > 0, (labels - low) / torch.where(spread > 0, spread, 1.0), 0.0)
    labels = labels.masked_fill(~mask, 0.0)
    with torch.no_grad():
        # tau: 1 + the number of real responses ranked above by rho (ties to the lower index), as a stable sort gives.
        index = torch.arange(rho.size(-1), device=rho.device)
        above = (rho.unsqueeze(-2) > rho.unsqueeze(-1)) | (
            (rho.unsqueeze(-2) == rho.unsqueeze(-1)) & (index.unsqueeze(0) < index.unsqueeze(1))
        )  # above[b, i, j]: j is ranked before i
        tau = 1 + (above & mask.unsqueeze(-2)).sum(dim=-1).to(rho.dtype)
        inverse_discount = 1.0 / torch.log1p(tau)
        gain = torch.exp2(labels) - 1
        delta = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (
            inverse_discount.unsqueeze(-1) - inverse_discount.unsqueeze(-2)
        ).abs()
    pairs = _ordered_pairs(labels, mask)
    terms = torch.where(pairs, delta * F.logsigmoid(_pair_margins(rho)), torch.zeros_like(delta))
    return -terms.sum(dim=(-2, -1))


def all_pairs_dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    *,
    beta: float,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    gap_weighted: bool = False,
) -> torch.Tensor:
    """All-pairs DPO per-prompt loss, shape `(B,)`: DPO's `−log σ(ρ_i − ρ_j)` over every pair with `r_i > r_j`.

    Args:
        reduction: `"mean"`: divided by the prompt's number of such pairs; `"sum"`: summed. A prompt without any
            (all rewards tied, or one response) has loss 0 and no gradient.
        gap_weighted: multiply each pair's term by its reward gap `r_i − r_j`.

    With K = 2 and distinct rewards (unweighted) this is exactly DPO's sigmoid loss: TRL's DPOTrainer on the
    prompt's best-vs-each pairs, batched by prompt.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    mask = _check_shapes(policy_logps, ref_logps, rewards, mask)
    rho = model_rewards(policy_logps, ref_logps, beta)
    rewards = rewards.to(rho.dtype)
    pairs = _ordered_pairs(rewards, mask)
    terms = -F.logsigmoid(_pair_margins(rho))
    if gap_weighted:
        terms = terms * (rewards.unsqueeze(-1) - rewards.unsqueeze(-2)).masked_fill(~pairs, 0.0)
    total = torch.where(pairs, terms, torch.zeros_like(terms)).sum(dim=(-2, -1))
    if reduction == "sum":
        return total
    return total / pairs.sum(dim=(-2, -1)).clamp_min(1).to(total.dtype)
