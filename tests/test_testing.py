"""rpg.testing: the oracle itself is right (finite differences) and can tell a wrong loss apart."""

import math

import pytest
import torch

import rpg
from rpg import testing as T


@pytest.mark.parametrize("div", rpg.DIVERGENCES)
@pytest.mark.parametrize("normalized", [True, False])
def test_objective_gradient_matches_finite_differences(div, normalized):
    p = T.random_problem(k=5, seed=2)
    grad = T.objective_gradient(div, p.logits, p.ref_logits, p.rewards, 0.4, normalized=normalized)
    eps = 1e-6
    for i in range(5):
        e = torch.zeros(5, dtype=torch.float64)
        e[i] = eps
        up = T.objective(div, p.logits + e, p.ref_logits, p.rewards, 0.4, normalized=normalized)
        down = T.objective(div, p.logits - e, p.ref_logits, p.rewards, 0.4, normalized=normalized)
        assert grad[i].item() == pytest.approx(((up - down) / (2 * eps)).item(), abs=1e-8)


def test_objective_by_hand():
    logits = torch.log(torch.tensor([0.25, 0.75], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.5, 0.5], dtype=torch.float64))
    rewards = torch.tensor([1.0, 0.0], dtype=torch.float64)
    rkl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    got = T.objective("rkl", logits, ref, rewards, beta=2.0)
    assert got.item() == pytest.approx(0.25 - 2.0 * rkl, rel=1e-12)


def test_random_problem_is_reproducible_and_off_policy():
    a, b = T.random_problem(seed=3), T.random_problem(seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
    assert not torch.allclose(a.logits, a.old_logits) and not torch.allclose(a.old_logits, a.ref_logits)


class _GRPOStyleK3:
    """A user's loss: −w·A + β·k3(logp → ref), unweighted (GRPO's KL term)."""

    def __init__(self, beta):
        self.beta = beta

    def __call__(self, logp, old_logp, advantages, mask, ref_logp=None):
        ref_logp = old_logp if ref_logp is None else ref_logp
        per_token = -(logp - old_logp).exp() * advantages[:, None] + self.beta * rpg.k3(logp, ref_logp)
        return type("Out", (), {"per_token": per_token})()


def test_oracle_flags_a_loss_that_follows_the_wrong_kl():
    p = T.random_problem(k=6, seed=5)
    got = T.expected_gradient(_GRPOStyleK3(0.5), p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
    for div in rpg.DIVERGENCES:
        want = -T.objective_gradient(div, p.logits, p.ref_logits, p.rewards, 0.5)
        assert (got - want).abs().max() > 1e-3
    # On-policy it follows the forward KL, as docs/estimators.md says.
    got = T.expected_gradient(_GRPOStyleK3(0.5), p.logits, p.logits, p.rewards, ref_logits=p.ref_logits)
    want = -T.objective_gradient("fkl", p.logits, p.ref_logits, p.rewards, 0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
