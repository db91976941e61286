"""rpg.testing: the oracle itself is right (finite differences) and can tell a wrong loss apart."""

import math

import pytest
import torch

import rpg
from rpg import testing as T

F64 = torch.float64


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


# --- the calling convention: LossOutput or a bare scalar -----------------------------------


def _scalar(loss_fn):
    """The same loss, returning only out.loss (a bare scalar)."""

    def fn(logp, old_logp, advantages, mask, ref_logp=None, behavior_logp=None):
        return loss_fn(logp, old_logp, advantages, mask, ref_logp=ref_logp, behavior_logp=behavior_logp).loss

    return fn


@pytest.mark.parametrize(
    "agg,reduction", [("token-mean", "mean"), ("seq-mean-token-mean", "mean"), ("token-sum", "sum")]
)
def test_a_bare_scalar_gives_the_per_token_expected_gradient(agg, reduction):
    fn = rpg.RPGLoss("rkl", style="reinforce", beta=0.5, clip=None, agg=agg)
    p = T.random_problem(k=5, seed=1)
    one = [p.logits, p.old_logits, p.rewards]
    want = T.expected_gradient(fn, *one, ref_logits=p.ref_logits)
    got = T.expected_gradient(_scalar(fn), *one, ref_logits=p.ref_logits, reduction=reduction)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    s = T.random_sequence_problem(k=3, seed=2)
    seq = [s.logits, s.old_logits, s.rewards]
    mu = s.old_logits + 0.3 * torch.randn(s.old_logits.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    for behavior in (None, mu):
        want = T.sequence_expected_gradient(fn, *seq, ref_logits=s.ref_logits, behavior_logits=behavior)
        got = T.sequence_expected_gradient(
            _scalar(fn), *seq, ref_logits=s.ref_logits, behavior_logits=behavior, reduction=reduction
        )
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # the wrong reading of the scalar is off by the response length (2), and visibly so
    other = "sum" if reduction == "mean" else "mean"
    wrong = T.sequence_expected_gradient(_scalar(fn), *seq, ref_logits=s.ref_logits, reduction=other)
    assert (wrong - want).abs().max() > 1e-3


def test_correction_bias_accepts_a_bare_scalar():
    s = T.random_sequence_problem(k=3, seed=4)
    mu = s.logits + 0.3 * torch.randn(s.logits.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    fn = rpg.RPGLoss("rkl", style="reinforce", beta=0.0, clip=None, correction=rpg.RolloutCorrection(upper=None))
    for behavior in (True, False):
        want = T.correction_bias(fn, s, mu, behavior=behavior)
        assert T.correction_bias(_scalar(fn), s, mu, behavior=behavior) == pytest.approx(want, rel=1e-9, abs=1e-13)


def test_behavior_logp_is_passed_only_to_a_loss_that_takes_it():
    seen = []

    def plain(logp, old_logp, advantages, mask, ref_logp=None):
        seen.append("plain")
        return -((logp - old_logp).exp() * advantages[:, None] * mask).sum()

    def taking(logp, old_logp, advantages, mask, ref_logp=None, **kwargs):
        seen.append(sorted(kwargs))
        return plain(logp, old_logp, advantages, mask, ref_logp)

    p = T.random_problem(k=4, seed=3)
    for fn in (plain, taking):
        T.expected_gradient(fn, p.logits, p.old_logits, p.rewards, behavior_logits=p.ref_logits)
    assert "plain" in seen and ["behavior_logp"] in seen


@pytest.mark.parametrize(
    "ret,match",
    [
        (lambda logp: logp * 2, r"scalar tensor .*got a tensor of shape \(4, 1\)"),
        (lambda logp: {"loss": logp.sum()}, "got dict"),
        (lambda logp: type("O", (), {"per_token": logp[:2]})(), "per_token has shape"),
    ],
)
def test_an_unreadable_return_names_the_convention(ret, match):
    p = T.random_problem(k=4, seed=3)
    exc = ValueError if "per_token" in match else TypeError
    with pytest.raises(exc, match=match):
        T.expected_gradient(lambda logp, *a, **k: ret(logp), p.logits, p.old_logits, p.rewards)
    with pytest.raises(ValueError, match="reduction"):
        T.expected_gradient(rpg.DAPOLoss(), p.logits, p.old_logits, p.rewards, reduction="avg")


def test_a_scalar_for_the_batch_but_not_for_a_row_is_refused():
    def odd(logp, old_logp, advantages, mask, ref_logp=None):
        return logp.sum() if logp.shape[0] > 1 else logp

    p = T.random_problem(k=4, seed=3)
    with pytest.raises(TypeError, match="one row"):
        T.expected_gradient(odd, p.logits, p.old_logits, p.rewards)


@pytest.mark.parametrize("div", ["fkl", "rkl"])
@pytest.mark.parametrize("level", ["sequence", "token"])
def test_sequence_objectives_match_finite_differences_and_their_definition(div, level):
    p = T.random_sequence_problem(k=3, seed=8)
    g = T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, 0.7, divergence=div, level=level)
    eps = 1e-6
    for i in range(p.logits.numel() if level == "sequence" else 0):  # per token, the prefix law is sg(π_θ)
        e = torch.zeros_like(p.logits)
        e[i] = eps
        up = T.sequence_objective(p.logits + e, p.ref_logits, p.rewards, 0.7, divergence=div, level=level)
        down = T.sequence_objective(p.logits - e, p.ref_logits, p.rewards, 0.7, divergence=div, level=level)
        assert g[i].item() == pytest.approx(((up - down) / (2 * eps)).item(), abs=1e-8)
    # the value: the whole-response KL by its definition; per token, the chain rule's sum (same value)
    lp, ref = (T.sequence_token_logp(x).sum(-1) for x in (p.logits, p.ref_logits))
    kl = (lp.exp() * (lp - ref)).sum() if div == "rkl" else (ref.exp() * (ref - lp)).sum()
    want = (lp.exp() * p.rewards).sum() - 0.7 * kl
    j = T.sequence_objective(p.logits, p.ref_logits, p.rewards, 0.7, divergence=div, level=level)
    if level == "sequence" or div == "rkl":  # forward per token weights prefixes by π_θ, not π_ref
        torch.testing.assert_close(j, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="level"):
        T.sequence_objective(p.logits, p.ref_logits, p.rewards, 0.7, level="tokens")
