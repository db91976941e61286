"""rpg.kl: estimator values, exact divergences, and which KL each estimator's gradient follows."""

import math

import pytest
import torch

from rpg import testing as T
from rpg.kl import divergence, forward_kl, k1, k2, k3, kl, reverse_kl, ukl

F64 = torch.float64


def test_estimator_values_by_hand():
    log_q = torch.tensor([math.log(0.5), math.log(0.25)], dtype=F64)
    log_p = torch.tensor([math.log(0.25), math.log(0.5)], dtype=F64)
    # r = p/q = 0.5 and 2
    torch.testing.assert_close(k1(log_q, log_p), torch.tensor([math.log(2), -math.log(2)], dtype=F64))
    torch.testing.assert_close(k2(log_q, log_p), torch.tensor([0.5 * math.log(2) ** 2] * 2, dtype=F64))
    torch.testing.assert_close(k3(log_q, log_p), torch.tensor([0.5 - 1 + math.log(2), 2 - 1 - math.log(2)], dtype=F64))


def test_argument_order_first_is_sampler():
    """E_{x~q}[k1(log q, log p)] = KL(q||p) exactly: the first argument is the sampling distribution."""
    q = torch.log_softmax(torch.tensor([0.3, -1.0, 2.0, 0.1], dtype=F64), -1)
    p = torch.log_softmax(torch.tensor([1.0, 0.2, -0.5, 0.0], dtype=F64), -1)
    for est in (k1, k3):
        torch.testing.assert_close((q.exp() * est(q, p)).sum(), kl(q, p), rtol=0, atol=1e-14)
    assert abs((q.exp() * k1(q, p)).sum() - kl(p, q)) > 1e-2  # and not the other direction


@pytest.mark.parametrize("d", [50.0, -50.0, 30.0, 1e-8])
def test_k3_is_not_clamped_and_has_no_cancellation(d):
    zero = torch.zeros((), dtype=F64)
    got = k3(zero, torch.tensor(d, dtype=F64))
    want = math.expm1(d) - d
    assert got.item() == pytest.approx(want, rel=1e-14)
    assert k3(zero.float(), torch.tensor(d)).item() == pytest.approx(want, rel=1e-5)


def test_half_precision_is_upcast():
    a = torch.tensor([0.0, -1.0], dtype=torch.bfloat16)
    b = torch.tensor([-1.0, 0.0], dtype=torch.bfloat16)
    for est in (k1, k2, k3):
        assert est(a, b).dtype == torch.float32


def test_exact_divergences_by_hand():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=F64)
    torch.testing.assert_close(kl(p.log(), q.log()), torch.tensor(math.log(2), dtype=F64))
    torch.testing.assert_close(ukl(p.log(), q.log()), torch.tensor(math.log(2), dtype=F64))
    half = p / 2  # an unnormalized measure of mass 1/2
    torch.testing.assert_close(ukl(half.log(), q.log()), (half * (half / q).log()).nansum() + 0.5)
    # directions
    logp, ref = q.log(), torch.tensor([0.2, 0.3, 0.5], dtype=F64).log()
    torch.testing.assert_close(forward_kl(logp, ref), kl(ref, logp))
    torch.testing.assert_close(reverse_kl(logp, ref), kl(logp, ref))
    torch.testing.assert_close(divergence("ufkl", half.log(), ref), ukl(ref, half.log()))
    torch.testing.assert_close(divergence("urkl", half.log(), ref), ukl(half.log(), ref))


def test_divergence_rejects_unknown_name():
    with pytest.raises(ValueError, match="valid options"):
        divergence("js", torch.zeros(2), torch.zeros(2))


# --- which KL does each estimator follow, used as a loss? (docs/estimators.md, exact enumeration) ---


def _expected_grad(term, theta, old_theta, ref_theta):
    """Σ_a π_old(a) ∇_θ term(a) for a per-action term(logp, old_logp, ref_logp)."""
    theta = theta.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    old = torch.log_softmax(old_theta, -1)
    ref = torch.log_softmax(ref_theta, -1)
    (g,) = torch.autograd.grad((old.exp() * term(logp, old, ref)).sum(), theta)
    return g


def _kl_grads(theta, ref_theta):
    fwd = T.objective_gradient("fkl", theta, ref_theta, torch.zeros_like(theta), beta=-1.0)
    rev = T.objective_gradient("rkl", theta, ref_theta, torch.zeros_like(theta), beta=-1.0)
    return fwd, rev  # J = +D when beta = -1, so these are ∇D


P = T.random_problem(k=7, seed=11, scale=0.6)

K3 = lambda lp, old, ref: k3(lp, ref)  # noqa: E731  GRPO: tokens treated as from π_θ
K2 = lambda lp, old, ref: k2(lp, ref)  # noqa: E731
K1 = lambda lp, old, ref: k1(lp, ref)  # noqa: E731
W_K3 = lambda lp, old, ref: (lp - old).exp() * k3(lp, ref)  # noqa: E731
SGW_K2 = lambda lp, old, ref: (lp - old).exp().detach() * k2(lp, ref)  # noqa: E731


def test_k3_as_loss_follows_forward_kl_on_policy():
    fwd, rev = _kl_grads(P.logits, P.ref_logits)
    got = _expected_grad(K3, P.logits, P.logits, P.ref_logits)
    torch.testing.assert_close(got, fwd, rtol=0, atol=1e-12)
    assert (got - rev).abs().max() > 1e-2


def test_k3_as_loss_follows_neither_kl_off_policy():
    fwd, rev = _kl_grads(P.logits, P.ref_logits)
    got = _expected_grad(K3, P.logits, P.old_logits, P.ref_logits)
    assert (got - fwd).abs().max() > 1e-2 and (got - rev).abs().max() > 1e-2


def test_k2_as_loss_follows_reverse_kl_on_policy_only():
    _fwd, rev = _kl_grads(P.logits, P.ref_logits)
    torch.testing.assert_close(_expected_grad(K2, P.logits, P.logits, P.ref_logits), rev, rtol=0, atol=1e-12)
    assert (_expected_grad(K2, P.logits, P.old_logits, P.ref_logits) - rev).abs().max() > 1e-2


def test_k1_as_loss_has_zero_gradient_on_policy():
    got = _expected_grad(K1, P.logits, P.logits, P.ref_logits)
    torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=1e-14)


@pytest.mark.parametrize("term", [W_K3, SGW_K2], ids=["w*k3", "sg(w)*k2"])
def test_weighted_estimators_follow_reverse_kl_off_policy(term):
    fwd, rev = _kl_grads(P.logits, P.ref_logits)
    got = _expected_grad(term, P.logits, P.old_logits, P.ref_logits)
    torch.testing.assert_close(got, rev, rtol=0, atol=1e-12)
    assert (got - fwd).abs().max() > 1e-2


def test_exact_kl_gradient_is_finite_off_support():
    """p = 0 somewhere: value is the KL on the support and the gradient has no NaN (where-NaN trap)."""
    log_p = torch.log(torch.tensor([1.0, 0.0], dtype=F64)).requires_grad_(True)
    log_q = torch.log(torch.tensor([0.5, 0.5], dtype=F64)).requires_grad_(True)
    for fn in (kl, ukl):
        value = fn(log_p, log_q)
        gp, gq = torch.autograd.grad(value, (log_p, log_q))
        assert torch.isfinite(gp).all() and torch.isfinite(gq).all()
    assert kl(log_p, log_q).item() == pytest.approx(math.log(2))
    assert gp[1] == 0
