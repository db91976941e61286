"""Sequence level (Tang & Munos): which configurations follow ∇KL(π_θ(y) ‖ π_ref(y)) over whole responses.

Two-token responses, enumerated exactly (rpg.testing's sequence oracle), β large, float64.
"""

import functools

import pytest
import torch

import rpg
from rpg import advantages as A
from rpg import testing as T

BETA = 0.5


def _problem(seed):
    return T.random_sequence_problem(k=3, seed=seed, scale=0.7)


def _rpp(beta, estimator="k1"):
    return functools.partial(_rpp_adv, beta=beta, estimator=estimator)


def _rpp_adv(rewards, mask, old_logp, ref_logp, *, beta, estimator):
    return A.reinforce_pp(rewards, mask, old_logp, ref_logp, beta=beta, estimator=estimator, whiten_advantages=False)


def _partial_kl_objective(logits, ref_logits, rewards, beta):
    """E[R] − β·Σ_t E_{prefix ~ sg(π_θ)} KL_t: what a per-token reverse-KL loss differentiates on-policy."""
    k = 3
    lp, ref = T.sequence_token_logp(logits), T.sequence_token_logp(ref_logits)
    p_seq = lp.sum(-1).exp()
    first = torch.log_softmax(logits[:k], -1)
    ref_first = torch.log_softmax(ref_logits[:k], -1)
    kl1 = (first.exp() * (first - ref_first)).sum()
    second, ref_second = lp[:, 1].view(k, k), ref[:, 1].view(k, k)
    kl2 = (second.exp() * (second - ref_second)).sum(-1)  # per prefix a
    return (p_seq * rewards).sum() - beta * (kl1 + (first.exp().detach() * kl2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reinforce_pp_k1_returns_follow_the_sequence_reverse_kl_on_policy(seed):
    p = _problem(seed)
    fn = rpg.REINFORCEPlusPlusLoss(clip=None)
    got = T.sequence_expected_gradient(
        fn, p.logits, p.logits, p.rewards, ref_logits=p.ref_logits, advantages=_rpp(BETA)
    )
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, BETA)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_reinforce_pp_off_policy_needs_sequence_importance_weights():
    p = _problem(3)
    fn = rpg.REINFORCEPlusPlusLoss(clip=None)
    got = T.sequence_expected_gradient(
        fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits, advantages=_rpp(BETA)
    )
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, BETA)
    assert (got - want).abs().max() > 1e-3


def test_reinforce_pp_k2_in_reward_is_not_the_sequence_kl():
    p = _problem(4)
    fn = rpg.REINFORCEPlusPlusLoss(clip=None)
    got = T.sequence_expected_gradient(
        fn, p.logits, p.logits, p.rewards, ref_logits=p.ref_logits, advantages=_rpp(BETA, "k2")
    )
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, BETA)
    assert (got - want).abs().max() > 1e-3


@pytest.mark.parametrize("style", rpg.STYLES)
@pytest.mark.parametrize("div", ["rkl", "urkl"])
def test_per_token_reverse_kl_is_a_partial_gradient_of_the_sequence_kl(div, style):
    """On-policy, a per-token reverse-KL loss follows Σ_t E_prefix[∇KL_t] with the prefix law held
    fixed — not ∇KL(π_θ(y)‖π_ref(y)), which also moves the prefix distribution."""
    p = _problem(5)
    fn = rpg.RPGLoss(div, style=style, beta=BETA, clip=None)
    got = T.sequence_expected_gradient(fn, p.logits, p.logits, p.rewards, ref_logits=p.ref_logits)
    theta = p.logits.clone().requires_grad_(True)
    (partial,) = torch.autograd.grad(_partial_kl_objective(theta, p.ref_logits, p.rewards, BETA), theta)
    torch.testing.assert_close(got, -partial, rtol=0, atol=1e-10)
    full = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, BETA)
    assert (got - full).abs().max() > 1e-3


def test_grpo_k3_follows_neither_at_the_sequence_level():
    p = _problem(6)
    got = T.sequence_expected_gradient(
        rpg.GRPOLoss(beta=BETA, clip=None), p.logits, p.logits, p.rewards, ref_logits=p.ref_logits
    )
    full = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, BETA)
    theta = p.logits.clone().requires_grad_(True)
    (partial,) = torch.autograd.grad(_partial_kl_objective(theta, p.ref_logits, p.rewards, BETA), theta)
    assert (got - full).abs().max() > 1e-3 and (got + partial).abs().max() > 1e-3


def test_sequence_oracle_is_right():
    """The two-step objective's gradient against finite differences, and a bad logits size."""
    p = _problem(7)
    g = T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, BETA)
    eps = 1e-6
    for i in range(p.logits.numel()):
        e = torch.zeros_like(p.logits)
        e[i] = eps
        fd = (
            T.sequence_objective(p.logits + e, p.ref_logits, p.rewards, BETA)
            - T.sequence_objective(p.logits - e, p.ref_logits, p.rewards, BETA)
        ) / (2 * eps)
        assert g[i].item() == pytest.approx(fd.item(), abs=1e-8)
    assert torch.allclose(T.sequence_token_logp(p.logits).sum(-1).exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="K \\+ K\\^2"):
        T.sequence_token_logp(torch.zeros(5))
