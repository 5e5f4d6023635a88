"""The losses against the paper's formulas written out per example in plain Python (math module, no torch)."""

import math
import random

import pytest
import torch

from trl_nca.losses import infonca_loss, nca_loss, target_weights


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _weights(rewards: list[float], alpha: float) -> list[float]:
    if alpha == 0:
        best = max(rewards)
        ties = [r == best for r in rewards]
        return [t / sum(ties) for t in ties]
    top = max(r / alpha for r in rewards)
    exps = [math.exp(r / alpha - top) for r in rewards]
    return [e / sum(exps) for e in exps]


def oracle_infonca(pi, mu, r, beta, alpha):
    rho = [beta * (p - m) for p, m in zip(pi, mu)]
    top = max(rho)
    log_z = top + math.log(sum(math.exp(x - top) for x in rho))
    return -sum(w * (x - log_z) for w, x in zip(_weights(r, alpha), rho))


def oracle_nca(pi, mu, r, beta, alpha):
    rho = [beta * (p - m) for p, m in zip(pi, mu)]
    k = len(rho)
    return -sum(w * _logsigmoid(x) for w, x in zip(_weights(r, alpha), rho)) - sum(_logsigmoid(-x) for x in rho) / k


ORACLES = {infonca_loss: oracle_infonca, nca_loss: oracle_nca}


def _random_batch(rng: random.Random, batch: int, k_max: int, ragged: bool, ties: bool):
    rows = []
    for _ in range(batch):
        k = rng.randint(2, k_max) if ragged else k_max
        pi = [rng.uniform(-80, -5) for _ in range(k)]
        mu = [p + rng.uniform(-6, 6) for p in pi]
        r = [float(rng.randint(1, 3)) if ties else rng.uniform(-2, 10) for _ in range(k)]
        rows.append((pi, mu, r))
    return rows


def _to_tensors(rows, k_max):
    shape = (len(rows), k_max)
    pi, mu, r = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    mask = torch.zeros(shape, dtype=torch.bool)
    for b, (p, m, rr) in enumerate(rows):
        k = len(p)
        pi[b, :k], mu[b, :k], r[b, :k] = torch.tensor(p), torch.tensor(m), torch.tensor(rr)
        mask[b, :k] = True
        # Garbage in the padding slots must not matter.
        pi[b, k:], mu[b, k:], r[b, k:] = 1e4, -1e4, 1e9
    return pi, mu, r, mask


@pytest.mark.parametrize("loss_fn", [infonca_loss, nca_loss], ids=["infonca", "nca"])
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("ragged", [False, True], ids=["fixed", "ragged"])
@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 5.0])
def test_loss_matches_formula(loss_fn, k, ragged, ties, alpha):
    rng = random.Random(hash((k, ragged, ties, alpha)) % 1000)
    rows = _random_batch(rng, batch=6, k_max=k, ragged=ragged, ties=ties)
    pi, mu, r, mask = _to_tensors(rows, k)
    beta = 0.1
    got = loss_fn(pi, mu, r, beta=beta, alpha=alpha, mask=mask)
    assert got.shape == (6,) and got.dtype == torch.float32
    expected = [ORACLES[loss_fn](p, m, rr, beta, alpha) for p, m, rr in rows]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_fn", [infonca_loss, nca_loss], ids=["infonca", "nca"])
def test_extreme_rewards_and_temperatures_stay_finite(loss_fn):
    pi = torch.tensor([[-10.0, -12.0, -11.0], [-300.0, -1.0, -50.0]])
    mu = torch.tensor([[-11.0, -10.0, -11.0], [-1.0, -300.0, -50.0]])
    r = torch.tensor([[1e30, -1e30, 0.0], [1e6, 1e6, -1e6]])
    for alpha in (1e-8, 1e-4, 1.0, 1e8):
        got = loss_fn(pi, mu, r, beta=1.0, alpha=alpha)
        assert torch.isfinite(got).all()
    # alpha -> 0 tends to the hard-label loss; huge model rewards keep log-sigmoids finite.
    torch.testing.assert_close(
        loss_fn(pi, mu, r, beta=1.0, alpha=1e-8), loss_fn(pi, mu, r, beta=1.0, alpha=0.0), rtol=1e-6, atol=1e-6
    )


def test_ties_share_weight_equally():
    w = target_weights(torch.tensor([[3.0, 3.0, 1.0, 3.0]]), 0.0)
    torch.testing.assert_close(w, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))
    w = target_weights(torch.tensor([[2.0, 2.0, 0.0]]), 0.5)
    assert w[0, 0] == w[0, 1] and w[0, 2] < w[0, 0]


def test_per_prompt_alpha_mixes_hard_and_soft_rows():
    r = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w = target_weights(r, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(w[0], torch.tensor([1.0, 0.0]))
    e = math.e
    torch.testing.assert_close(w[1], torch.tensor([e / (e + 1), 1 / (e + 1)]))


@pytest.mark.parametrize("loss_fn", [infonca_loss, nca_loss], ids=["infonca", "nca"])
def test_low_precision_inputs_are_upcast(loss_fn):
    rng = random.Random(0)
    pi, mu, r, mask = _to_tensors(_random_batch(rng, 4, 3, ragged=True, ties=False), 3)
    expected = loss_fn(pi, mu, r, beta=0.1, alpha=1.0, mask=mask)
    got = loss_fn(pi.bfloat16(), mu.bfloat16(), r.bfloat16(), beta=0.1, alpha=1.0, mask=mask)
    assert got.dtype == torch.float32
    # bf16 rounding of ~-50 log-probs moves the loss a little; the computation itself is fp32.
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("loss_fn", [infonca_loss, nca_loss], ids=["infonca", "nca"])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_gradcheck_float64(loss_fn, alpha):
    torch.manual_seed(0)
    pi = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(3, 4, dtype=torch.float64)
    r = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert loss_fn(pi, mu, r, beta=0.5, alpha=alpha, mask=mask).dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda p: loss_fn(p, mu, r, beta=0.5, alpha=alpha, mask=mask), (pi,), eps=1e-6, atol=1e-7
    )
    # Padding slots receive no gradient.
    loss_fn(pi, mu, r, beta=0.5, alpha=alpha, mask=mask).sum().backward()
    assert (pi.grad[~mask] == 0).all() and (pi.grad[mask] != 0).any()


def test_pairwise_hard_labels_equal_dpo_and_nca_pair_formulas():
    torch.manual_seed(1)
    pi, mu = torch.randn(8, 2) * 5, torch.randn(8, 2) * 5
    r = torch.tensor([[1.0, 0.0]]).expand(8, 2)
    beta = 0.3
    rho_w, rho_l = beta * (pi[:, 0] - mu[:, 0]), beta * (pi[:, 1] - mu[:, 1])
    dpo = -torch.nn.functional.logsigmoid(rho_w - rho_l)
    logsig = torch.nn.functional.logsigmoid
    nca_pair = -logsig(rho_w) - 0.5 * logsig(-rho_w) - 0.5 * logsig(-rho_l)
    torch.testing.assert_close(infonca_loss(pi, mu, r, beta=beta, alpha=0.0), dpo)
    torch.testing.assert_close(nca_loss(pi, mu, r, beta=beta, alpha=0.0), nca_pair)


def test_invalid_inputs_raise():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="alpha"):
        nca_loss(x, x, x, beta=0.1, alpha=-1.0)
    with pytest.raises(ValueError, match="shape"):
        nca_loss(x, torch.zeros(2, 2), x, beta=0.1, alpha=1.0)
    with pytest.raises(ValueError, match="at least one response"):
        nca_loss(x, x, x, beta=0.1, alpha=1.0, mask=torch.tensor([[True, True, True], [False, False, False]]))
