"""The listwise losses (Plackett-Luce, LiPO-lambda, all-pairs DPO) against their formulas written out per example in
plain Python (math/itertools, no torch), and the properties that pin them down: the K = 2 reductions to DPO, the
stages of the Plackett-Luce likelihood, LiPO's rank-dependent (and gradient-free) lambda weights."""

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from trl_nca.losses import all_pairs_dpo_loss, lipo_lambda_loss, plackett_luce_loss

LN2_MINUS_LN3 = 1 / math.log(2) - 1 / math.log(3)  # LiPO's Delta for labels (1, 0) and ranks (1, 2) or (2, 1)


# ------------------------------------------------------------------------------------------------------------ oracles
def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _rho(pi, mu, beta):
    return [beta * (p - m) for p, m in zip(pi, mu)]


def _pl_product(rho, rewards, top_m=None):
    """Distinct rewards: `-log prod_k exp(rho_tau(k)) / sum_{j >= k} exp(rho_tau(j))`, the literal product."""
    order = sorted(range(len(rho)), key=lambda i: -rewards[i])  # tau: best first
    stages = order if top_m is None else order[:top_m]
    likelihood = 1.0
    for k, i in enumerate(stages):
        rest = [rho[j] for j in order[k:]]
        top = max(rest)  # shift numerator and denominator alike, to keep exp() in range
        likelihood *= math.exp(rho[i] - top) / sum(math.exp(x - top) for x in rest)
    return -math.log(likelihood)


def _pl_risk_set(rho, rewards, top_m=None):
    """Breslow's rule: `-sum_{i counted} (rho_i - logsumexp_{j: r_j <= r_i} rho_j)`."""
    loss = 0.0
    for i, r_i in enumerate(rewards):
        n_better = sum(r > r_i for r in rewards)
        if top_m is not None and n_better >= top_m:
            continue
        loss -= rho[i] - _logsumexp([rho[j] for j, r in enumerate(rewards) if r <= r_i])
    return loss


def oracle_plackett_luce(pi, mu, rewards, beta, top_m=None):
    rho = _rho(pi, mu, beta)
    if len(set(rewards)) == len(rewards):
        return _pl_product(rho, rewards, top_m)
    return _pl_risk_set(rho, rewards, top_m)


def _pl_stage(pi, mu, rewards, beta, k):
    """The k-th (1-based) stage's term `-log(exp(rho_tau(k)) / sum_{j >= k} exp(rho_tau(j)))`, distinct rewards."""
    rho = _rho(pi, mu, beta)
    order = sorted(range(len(rho)), key=lambda i: -rewards[i])
    return -(rho[order[k - 1]] - _logsumexp([rho[j] for j in order[k - 1 :]]))


def _lipo_labels(rewards, label_normalization):
    if label_normalization == "none":
        return list(rewards)
    if label_normalization == "minmax":
        low, high = min(rewards), max(rewards)
        return [(r - low) / (high - low) if high > low else 0.0 for r in rewards]
    raise AssertionError(label_normalization)


def _lipo_deltas(rho, rewards, label_normalization):
    """`{(i, j): Delta_ij}` for every pair with psi_i > psi_j; tau from rho descending, ties to the lower index."""
    psi = _lipo_labels(rewards, label_normalization)
    order = sorted(range(len(rho)), key=lambda i: -rho[i])  # sorted() is stable: equal rho keeps index order
    tau = [0] * len(rho)
    for position, i in enumerate(order):
        tau[i] = position + 1
    gain = [2.0**p - 1 for p in psi]
    discount = [math.log(1 + t) for t in tau]
    return {
        (i, j): abs(gain[i] - gain[j]) * abs(1 / discount[i] - 1 / discount[j])
        for i, j in itertools.permutations(range(len(rho)), 2)
        if psi[i] > psi[j]
    }


def oracle_lipo_lambda(pi, mu, rewards, beta, label_normalization="none"):
    rho = _rho(pi, mu, beta)
    deltas = _lipo_deltas(rho, rewards, label_normalization)
    return -sum(d * _logsigmoid(rho[i] - rho[j]) for (i, j), d in deltas.items())


def oracle_lipo_grad(pi, mu, rewards, beta, label_normalization="none"):
    """d loss / d pi with every Delta held constant."""
    rho = _rho(pi, mu, beta)
    grad = [0.0] * len(rho)
    for (i, j), d in _lipo_deltas(rho, rewards, label_normalization).items():
        # d/dx [-log sigmoid(x)] = -sigmoid(-x)
        g = -d / (1 + math.exp(rho[i] - rho[j]))
        grad[i] += beta * g
        grad[j] -= beta * g
    return grad


def oracle_all_pairs(pi, mu, rewards, beta, reduction="mean", gap_weighted=False):
    rho = _rho(pi, mu, beta)
    terms = [
        -_logsigmoid(rho[i] - rho[j]) * ((rewards[i] - rewards[j]) if gap_weighted else 1.0)
        for i, j in itertools.permutations(range(len(rho)), 2)
        if rewards[i] > rewards[j]
    ]
    if not terms:
        return 0.0
    return sum(terms) / len(terms) if reduction == "mean" else sum(terms)


# ------------------------------------------------------------------------------------------------------------ helpers
def _random_rows(rng: random.Random, batch: int, k_max: int, ragged: bool, ties: bool, rho_ties: bool = False):
    rows = []
    for _ in range(batch):
        k = rng.randint(1, k_max) if ragged else k_max
        pi = [rng.uniform(-80, -5) for _ in range(k)]
        mu = [p + rng.uniform(-6, 6) for p in pi]
        if rho_ties:  # some responses with rho exactly 0: LiPO's rank tie-break by index
            mu = [p if rng.random() < 0.5 else m for p, m in zip(pi, mu)]
        r = [float(rng.randint(1, 3)) if ties else rng.uniform(-2, 3) for _ in range(k)]
        rows.append((pi, mu, r))
    return rows


def _to_tensors(rows, k_max, dtype=torch.float64):
    shape = (len(rows), k_max)
    pi, mu, r = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    mask = torch.zeros(shape, dtype=torch.bool)
    for b, (p, m, rr) in enumerate(rows):
        k = len(p)
        pi[b, :k], mu[b, :k], r[b, :k] = (torch.tensor(x, dtype=dtype) for x in (p, m, rr))
        mask[b, :k] = True
        # Garbage in the padding slots must not matter: huge model rewards, and rewards that would rank them first
        # (even rows) or last (odd rows).
        pi[b, k:], mu[b, k:], r[b, k:] = 1e4, -1e4, 1e9 if b % 2 == 0 else -1e9
    return pi, mu, r, mask


# (name, library call, oracle call) for every variant of the three losses.
VARIANTS = [
    *[
        (
            f"pl-top{m}",
            lambda *a, m=m, **kw: plackett_luce_loss(*a, top_m=m, **kw),
            lambda *a, m=m: oracle_plackett_luce(*a, top_m=m),
        )
        for m in (None, 1, 2, 3, 10)
    ],
    *[
        (
            f"lipo-{n}",
            lambda *a, n=n, **kw: lipo_lambda_loss(*a, label_normalization=n, **kw),
            lambda *a, n=n: oracle_lipo_lambda(*a, label_normalization=n),
        )
        for n in ("none", "minmax")
    ],
    *[
        (
            f"pairs-{red}{'-gap' if gap else ''}",
            lambda *a, red=red, gap=gap, **kw: all_pairs_dpo_loss(*a, reduction=red, gap_weighted=gap, **kw),
            lambda *a, red=red, gap=gap: oracle_all_pairs(*a, reduction=red, gap_weighted=gap),
        )
        for red in ("mean", "sum")
        for gap in (False, True)
    ],
]
LOSSES = {"pl": plackett_luce_loss, "lipo": lipo_lambda_loss, "pairs": all_pairs_dpo_loss}


def _close(got, expected, tol=1e-10):
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=got.dtype), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------ oracle self-checks
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_pl_oracle_is_a_distribution_over_rankings(k):
    """The PL likelihoods of all K! orderings sum to 1; truncated to the top m stages each prefix is counted (K-m)!
    times."""
    rng = random.Random(k)
    pi = [rng.uniform(-20, -5) for _ in range(k)]
    mu = [rng.uniform(-20, -5) for _ in range(k)]
    for top_m in (None, *range(1, k + 1)):
        total = 0.0
        for order in itertools.permutations(range(k)):
            rewards = [0.0] * k
            for position, i in enumerate(order):
                rewards[i] = float(k - position)
            total += math.exp(-oracle_plackett_luce(pi, mu, rewards, 0.7, top_m=top_m))
        m = k if top_m is None else min(top_m, k)
        assert total == pytest.approx(math.factorial(k - m), rel=1e-12)


def test_pl_oracle_product_and_risk_set_forms_agree_without_ties():
    rng = random.Random(3)
    for pi, mu, r in _random_rows(rng, batch=20, k_max=6, ragged=True, ties=False):
        rho = _rho(pi, mu, 0.4)
        for top_m in (None, 1, 2, 4):
            assert _pl_product(rho, r, top_m) == pytest.approx(_pl_risk_set(rho, r, top_m), rel=1e-12, abs=1e-12)


# ------------------------------------------------------------------------------------------- library against oracle
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
def test_loss_matches_formula(variant, k, ragged, ties):
    _, loss_fn, oracle = variant
    for seed in range(3):
        rng = random.Random(hash((k, ragged, ties, seed)) % 10_000)
        rows = _random_rows(rng, batch=6, k_max=k, ragged=ragged, ties=ties, rho_ties=seed == 2)
        pi, mu, r, mask = _to_tensors(rows, k)
        beta = (0.1, 0.5, 1.0)[seed]
        got = loss_fn(pi, mu, r, beta=beta, mask=mask)
        assert got.shape == (6,) and got.dtype == torch.float64
        _close(got, [oracle(p, m, rr, beta) for p, m, rr in rows])
        if not ragged:
            _close(loss_fn(pi, mu, r, beta=beta), got, tol=0)  # mask=None: every slot is real


def test_pl_ties_share_a_stage():
    """Rewards (2, 2, 1, 0): both best responses are scored against all four; the third against the last two."""
    rho = [0.3, -0.4, 1.1, 0.2]
    pi = torch.tensor([rho], dtype=torch.float64)
    mu = torch.zeros_like(pi)
    r = torch.tensor([[2.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    everyone = _logsumexp(rho)
    expected = -(rho[0] - everyone) - (rho[1] - everyone) - (rho[2] - _logsumexp(rho[2:]))
    _close(plackett_luce_loss(pi, mu, r, beta=1.0), [expected])
    # top_m=1: both tied best responses count, nothing else; top_m=2 adds nothing (two responses are above the third).
    top = -(rho[0] - everyone) - (rho[1] - everyone)
    _close(plackett_luce_loss(pi, mu, r, beta=1.0, top_m=1), [top])
    _close(plackett_luce_loss(pi, mu, r, beta=1.0, top_m=2), [top])
    _close(plackett_luce_loss(pi, mu, r, beta=1.0, top_m=3), [expected])


# ------------------------------------------------------------------------------------------------ K = 2: DPO itself
def _pair_batch(n=16, seed=0):
    torch.manual_seed(seed)
    pi = (torch.randn(n, 2, dtype=torch.float64) * 5).requires_grad_()
    mu = torch.randn(n, 2, dtype=torch.float64) * 5
    # The winner sits in either slot, with arbitrary reward values.
    winner_first = torch.rand(n) < 0.5
    high, low = torch.rand(n, dtype=torch.float64) * 3 + 1, torch.rand(n, dtype=torch.float64) - 1
    r = torch.where(winner_first.unsqueeze(-1), torch.stack([high, low], -1), torch.stack([low, high], -1))
    return pi, mu, r, winner_first


def _dpo(pi, mu, winner_first, beta):
    rho = beta * (pi - mu)
    margin = torch.where(winner_first, rho[:, 0] - rho[:, 1], rho[:, 1] - rho[:, 0])
    return -F.logsigmoid(margin)


@pytest.mark.parametrize(
    "loss_fn, scale",
    [
        (plackett_luce_loss, 1.0),
        (lambda *a, **kw: plackett_luce_loss(*a, top_m=1, **kw), 1.0),
        (all_pairs_dpo_loss, 1.0),
        (lambda *a, **kw: all_pairs_dpo_loss(*a, reduction="sum", **kw), 1.0),
        (lambda *a, **kw: lipo_lambda_loss(*a, label_normalization="minmax", **kw), LN2_MINUS_LN3),
    ],
    ids=["pl", "pl-top1", "pairs-mean", "pairs-sum", "lipo-minmax"],
)
def test_pairs_reduce_to_dpo_value_and_gradient(loss_fn, scale):
    pi, mu, r, winner_first = _pair_batch()
    beta = 0.3
    got = loss_fn(pi, mu, r, beta=beta)
    (got_grad,) = torch.autograd.grad(got.sum(), pi)
    dpo = scale * _dpo(pi, mu, winner_first, beta)
    (dpo_grad,) = torch.autograd.grad(dpo.sum(), pi)
    _close(got, dpo.detach(), tol=1e-12)
    _close(got_grad, dpo_grad, tol=1e-12)


def test_lipo_pair_with_labels_one_zero_is_scaled_dpo_whatever_the_ranks():
    pi, mu, _, winner_first = _pair_batch(seed=1)
    r = torch.where(winner_first.unsqueeze(-1), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).double()
    dpo = _dpo(pi, mu, winner_first, 0.3).detach()
    got = lipo_lambda_loss(pi, mu, r, beta=0.3)
    # The batch has pairs the policy ranks either way round.
    rho = 0.3 * (pi - mu).detach()
    agrees = (rho[:, 0] > rho[:, 1]) == winner_first
    assert agrees.any() and (~agrees).any()
    _close(got, LN2_MINUS_LN3 * dpo, tol=1e-12)


# ---------------------------------------------------------------------------------------------- LiPO's lambda weight
def test_lipo_gradient_holds_delta_constant():
    """Autograd against the analytic gradient with Delta fixed, and against central finite differences of the oracle
    (rho is far from ties, so a small step changes no rank and hence no Delta)."""
    rng = random.Random(5)
    rows = _random_rows(rng, batch=5, k_max=6, ragged=True, ties=True)
    pi, mu, r, mask = _to_tensors(rows, 6)
    for normalization in ("none", "minmax"):
        pi_ = pi.clone().requires_grad_()
        lipo_lambda_loss(pi_, mu, r, beta=0.5, mask=mask, label_normalization=normalization).sum().backward()
        for b, (p, m, rr) in enumerate(rows):
            k = len(p)
            expected = oracle_lipo_grad(p, m, rr, 0.5, normalization)
            _close(pi_.grad[b, :k], expected)
            assert (pi_.grad[b, k:] == 0).all()
            eps = 1e-6
            for i in range(k):
                up, down = list(p), list(p)
                up[i] += eps
                down[i] -= eps
                fd = (
                    oracle_lipo_lambda(up, m, rr, 0.5, normalization)
                    - oracle_lipo_lambda(down, m, rr, 0.5, normalization)
                ) / (2 * eps)
                assert pi_.grad[b, i].item() == pytest.approx(fd, abs=1e-7)


def test_lipo_weight_follows_the_policy_ranking():
    """Rewards (2, 1, 0), gains (3, 1, 0). Swapping the policy's order of responses 0 and 1 moves them between ranks
    1 and 2, which changes Delta_02 and Delta_12 (Delta_01 is symmetric in the two ranks)."""
    inv = [None, *(1 / math.log(1 + t) for t in (1, 2, 3))]  # inv[t] = 1 / D(t)
    r = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    mu = torch.zeros_like(r)

    def expected(rho, tau):
        d01 = 2 * abs(inv[tau[0]] - inv[tau[1]])
        d02 = 3 * abs(inv[tau[0]] - inv[tau[2]])
        d12 = 1 * abs(inv[tau[1]] - inv[tau[2]])
        return -(
            d01 * _logsigmoid(rho[0] - rho[1])
            + d02 * _logsigmoid(rho[0] - rho[2])
            + d12 * _logsigmoid(rho[1] - rho[2])
        )

    agree, swapped = [1.0, 0.5, -0.5], [0.5, 1.0, -0.5]
    got_agree = lipo_lambda_loss(torch.tensor([agree], dtype=torch.float64), mu, r, beta=1.0)
    got_swapped = lipo_lambda_loss(torch.tensor([swapped], dtype=torch.float64), mu, r, beta=1.0)
    _close(got_agree, [expected(agree, (1, 2, 3))])
    _close(got_swapped, [expected(swapped, (2, 1, 3))])
    _close(got_swapped - got_agree, [expected(swapped, (2, 1, 3)) - expected(agree, (1, 2, 3))])
    # Ranks from the rewards rather than from rho would give a different value.
    assert abs(expected(swapped, (2, 1, 3)) - expected(swapped, (1, 2, 3))) > 1e-3
    # Equal rho: the response listed first takes the better rank.
    tied = [0.2, 0.2, -0.5]
    _close(lipo_lambda_loss(torch.tensor([tied], dtype=torch.float64), mu, r, beta=1.0), [expected(tied, (1, 2, 3))])
    tied_r = torch.tensor([[1.0, 2.0, 0.0]], dtype=torch.float64)  # rewards swapped: the weights now use G = (1, 3, 0)
    _close(
        lipo_lambda_loss(torch.tensor([tied], dtype=torch.float64), mu, tied_r, beta=1.0),
        [oracle_lipo_lambda(tied, [0.0] * 3, [1.0, 2.0, 0.0], 1.0)],
    )


def test_lipo_minmax_is_invariant_to_positive_affine_rewards():
    rng = random.Random(8)
    rows = _random_rows(rng, batch=5, k_max=5, ragged=True, ties=True)
    pi, mu, r, mask = _to_tensors(rows, 5)
    base = lipo_lambda_loss(pi, mu, r, beta=0.5, mask=mask, label_normalization="minmax")
    _close(lipo_lambda_loss(pi, mu, 7 * r - 3, beta=0.5, mask=mask, label_normalization="minmax"), base, tol=1e-9)
    assert not torch.allclose(lipo_lambda_loss(pi, mu, 7 * r - 3, beta=0.5, mask=mask), base)


# ----------------------------------------------------------------------------------------------- mutation-style checks
@pytest.mark.parametrize("name", ["pl", "lipo", "pairs"])
def test_wrong_sign_or_reversed_ranking_costs_more(name):
    """A policy that agrees with the rewards: swapping policy and reference (rho -> -rho) or reversing the ranking
    (rewards -> -rewards) must both raise the loss."""
    loss_fn = LOSSES[name]
    pi = torch.tensor([[-10.0, -12.0, -14.0, -16.0]], dtype=torch.float64)
    mu = torch.full_like(pi, -13.0)  # rho = beta * (3, 1, -1, -3)
    r = torch.tensor([[0.9, 0.6, 0.3, 0.0]], dtype=torch.float64)
    good = loss_fn(pi, mu, r, beta=1.0)
    assert (loss_fn(mu, pi, r, beta=1.0) > good + 1.0).all()
    assert (loss_fn(pi, mu, -r, beta=1.0) > good + 1.0).all()
    oracle = {"pl": oracle_plackett_luce, "lipo": oracle_lipo_lambda, "pairs": oracle_all_pairs}[name]
    _close(loss_fn(pi, mu, -r, beta=1.0), [oracle(pi[0].tolist(), mu[0].tolist(), (-r[0]).tolist(), 1.0)])


def test_pl_top_m_drops_exactly_the_later_stages():
    rng = random.Random(11)
    for k in (2, 3, 5, 8):
        rows = _random_rows(rng, batch=4, k_max=k, ragged=False, ties=False)
        pi, mu, r, _ = _to_tensors(rows, k)
        full = plackett_luce_loss(pi, mu, r, beta=0.8)
        by_m = {m: plackett_luce_loss(pi, mu, r, beta=0.8, top_m=m) for m in range(1, k + 1)}
        # The last stage is log 1 = 0, so dropping it changes nothing; top_m >= K keeps all.
        _close(by_m[k - 1], full, tol=1e-12)
        _close(by_m[k], full, tol=0)
        _close(plackett_luce_loss(pi, mu, r, beta=0.8, top_m=k + 5), full, tol=0)
        for m in range(2, k + 1):
            stage = [_pl_stage(p, mm, rr, 0.8, m) for p, mm, rr in rows]
            _close(by_m[m] - by_m[m - 1], stage, tol=1e-12)
            if m < k:
                assert (torch.tensor(stage) > 0).all()


def test_pairs_mean_is_sum_over_pair_count():
    rng = random.Random(13)
    rows = _random_rows(rng, batch=12, k_max=6, ragged=True, ties=True)
    rows += [([-3.0, -4.0], [-3.5, -3.0], [2.0, 2.0])]  # a tied row: no pair
    pi, mu, r, mask = _to_tensors(rows, 6)
    for gap in (False, True):
        total = all_pairs_dpo_loss(pi, mu, r, beta=0.5, mask=mask, reduction="sum", gap_weighted=gap)
        mean = all_pairs_dpo_loss(pi, mu, r, beta=0.5, mask=mask, reduction="mean", gap_weighted=gap)
        counts = [sum(a > b for a, b in itertools.permutations(rr, 2)) for _, _, rr in rows]
        assert 0 in counts and max(counts) > 1
        _close(mean * torch.tensor(counts, dtype=torch.float64), total, tol=1e-12)


def test_rows_without_pairs_give_zero_loss_and_zero_gradient():
    """A fully tied row and a one-response row: all-pairs and LiPO give 0 (not NaN) and no gradient; PL is 0 for the
    lone response and Breslow's -sum_i (rho_i - logsumexp(rho)) for the tied row."""
    pi = torch.tensor(
        [[-3.0, -5.0, -4.0], [-2.0, 7.0, 7.0], [-1.0, -2.0, -3.0]], dtype=torch.float64, requires_grad=True
    )
    mu = torch.tensor([[-4.0, -4.0, -4.0], [-1.0, 7.0, 7.0], [-2.0, -2.0, -2.0]], dtype=torch.float64)
    r = torch.tensor([[2.0, 2.0, 2.0], [5.0, 1e9, -1e9], [1.0, 0.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, True]])
    for loss_fn in (
        all_pairs_dpo_loss,
        lambda *a, **kw: all_pairs_dpo_loss(*a, reduction="sum", gap_weighted=True, **kw),
        lipo_lambda_loss,
        lambda *a, **kw: lipo_lambda_loss(*a, label_normalization="minmax", **kw),
    ):
        loss = loss_fn(pi, mu, r, beta=0.5, mask=mask)
        _close(loss[:2], [0.0, 0.0], tol=0)
        assert loss[2] > 0  # the third row, with pairs, keeps the graph connected
        (grad,) = torch.autograd.grad(loss.sum(), pi)
        assert (grad[:2] == 0).all() and (grad[2] != 0).all()
    rho = [0.5, -0.5, 0.0]
    _close(plackett_luce_loss(pi, mu, r, beta=0.5, mask=mask)[:2], [-sum(x - _logsumexp(rho) for x in rho), 0.0])


# ---------------------------------------------------------------------------------------------- dtype and arguments
@pytest.mark.parametrize("name", ["pl", "lipo", "pairs"])
def test_dtypes(name):
    loss_fn = LOSSES[name]
    rows = _random_rows(random.Random(0), batch=4, k_max=4, ragged=True, ties=False)
    # Values exactly representable in bfloat16, so the bf16 and fp32 inputs are the same numbers.
    pi, mu, r, mask = (
        t.bfloat16().float() if t.is_floating_point() else t for t in _to_tensors(rows, 4, torch.float32)
    )
    expected = loss_fn(pi, mu, r, beta=0.1, mask=mask)
    assert expected.dtype == torch.float32
    got = loss_fn(pi.bfloat16(), mu.bfloat16(), r.bfloat16(), beta=0.1, mask=mask)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)  # the computation itself is fp32
    assert loss_fn(pi.double(), mu.double(), r.double(), beta=0.1, mask=mask).dtype == torch.float64


def test_invalid_arguments_raise():
    x = torch.zeros(2, 3)
    for top_m in (0, -1, 1.5):
        with pytest.raises(ValueError, match="top_m"):
            plackett_luce_loss(x, x, x, beta=0.1, top_m=top_m)
    with pytest.raises(ValueError, match="label_normalization"):
        lipo_lambda_loss(x, x, x, beta=0.1, label_normalization="zscore")
    with pytest.raises(ValueError, match="reduction"):
        all_pairs_dpo_loss(x, x, x, beta=0.1, reduction="max")
    for loss_fn in LOSSES.values():
        with pytest.raises(ValueError, match="shape"):
            loss_fn(x, torch.zeros(2, 2), x, beta=0.1)
        with pytest.raises(ValueError, match="at least one response"):
            loss_fn(x, x, x, beta=0.1, mask=torch.tensor([[True, True, False], [False, False, False]]))


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_gradcheck_and_masked_slots_get_no_gradient(variant):
    _, loss_fn, _ = variant
    rows = _random_rows(random.Random(21), batch=4, k_max=5, ragged=True, ties=True)
    rows[0] = ([-10.0, -11.0, -12.0, -13.0, -9.0], [-10.5, -10.0, -12.7, -11.0, -9.0], [3.0, 1.0, 2.0, 2.0, 0.0])
    pi, mu, r, mask = _to_tensors(rows, 5)
    pi.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: loss_fn(p, mu, r, beta=0.5, mask=mask), (pi,), eps=1e-6, atol=1e-7)
    loss_fn(pi, mu, r, beta=0.5, mask=mask).sum().backward()
    assert (pi.grad[~mask] == 0).all() and (pi.grad[mask] != 0).any()
