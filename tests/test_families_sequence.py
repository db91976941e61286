"""GMPO, VESPO, Clip-Cov, KL-Cov and M2PO: values, references, exact oracles, aggregations, compile, fused head.

Peer equality (verl's geo_mean / clip_cov / kl_cov, TRL's vespo) is in tests/integrations/test_families_peers.py.
"""

import math

import pytest
import torch

import rpg
from rpg import testing as T
from rpg.correction import m2_rejected
from rpg.objectives import Ratios
from rpg.selection import CovarianceDrop, CovariancePenalty, covariance
from rpg.sequence import Gamma

from . import reference as R
from .conftest import make_batch, shift_to_logprobs

F64 = torch.float64
AGGS = rpg.AGG_MODES


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- hand-computed values on crafted tokens ---------------------------------------------------


def _one_row(log_w, adv, old=None):
    old = torch.tensor([old or [-1.0, -2.0, -0.5]], dtype=F64)
    logp = (old + torch.tensor([log_w], dtype=F64)).requires_grad_(True)
    return logp, old, torch.tensor([adv], dtype=F64), torch.ones(1, 3, dtype=torch.bool)


def test_gmpo_hand_computed():
    """log w = (0.5, −0.1, 0.2), A = +1, ε = 0.4: log m = (0.4, −0.1, 0.2), s = e^{0.5/3}, loss −s,
    gradient −s/3 at the two unclipped tokens and 0 at the clipped one. For A = −1, the lower bound
    −0.4 does not bind and the upper is off: s = e^{0.6/3}, gradient +s/3 everywhere."""
    logp, old, adv, mask = _one_row([0.5, -0.1, 0.2], 1.0)
    out = rpg.GMPOLoss()(logp, old, adv, mask)
    s = math.exp(0.5 / 3)
    assert out.loss.item() == pytest.approx(-s, abs=1e-14)
    torch.testing.assert_close(_grad(out.loss, logp), torch.tensor([[0.0, -s / 3, -s / 3]], dtype=F64))
    logp, old, adv, mask = _one_row([0.5, -0.1, 0.2], -1.0)
    out = rpg.GMPOLoss()(logp, old, adv, mask)
    s = math.exp(0.6 / 3)
    assert out.loss.item() == pytest.approx(s, abs=1e-14)
    torch.testing.assert_close(_grad(out.loss, logp), torch.full((1, 3), s / 3, dtype=F64))
    logp, old, adv, mask = _one_row([0.5, -0.6, 0.2], -1.0)  # −0.6 clipped to −0.4 on the A < 0 branch
    out = rpg.GMPOLoss()(logp, old, adv, mask)
    s = math.exp((0.5 - 0.4 + 0.2) / 3)
    assert out.loss.item() == pytest.approx(s, abs=1e-14)
    torch.testing.assert_close(_grad(out.loss, logp), torch.tensor([[s / 3, 0.0, s / 3]], dtype=F64))


def test_vespo_hand_computed():
    """log W = 0.6 (no length normalisation), A = +1: φ = exp(2·0.6 − 3·(e^{0.6} − 1)); token-mean over
    3 tokens: loss −φ·Σ logp / 3, gradient −φ/3; A = −0.5: (k, λ) = (3, 2)."""
    logp, old, adv, mask = _one_row([0.5, -0.1, 0.2], 1.0)
    out = rpg.VESPOLoss()(logp, old, adv, mask)
    phi = math.exp(2 * 0.6 - 3 * math.expm1(0.6))
    assert out.loss.item() == pytest.approx(-phi * logp.sum().item() / 3, abs=1e-14)
    torch.testing.assert_close(_grad(out.loss, logp), torch.full((1, 3), -phi / 3, dtype=F64))
    logp, old, adv, mask = _one_row([0.5, -0.1, 0.2], -0.5)
    out = rpg.VESPOLoss()(logp, old, adv, mask)
    phi = math.exp(3 * 0.6 - 2 * math.expm1(0.6))
    torch.testing.assert_close(_grad(out.loss, logp), torch.full((1, 3), 0.5 * phi / 3, dtype=F64))


def test_gamma_kernel_is_one_at_one_and_finite_for_long_sequences():
    k = Gamma()
    up = torch.tensor([True, False])
    torch.testing.assert_close(k.log_phi(torch.zeros(2, dtype=F64), up), torch.zeros(2, dtype=F64))
    huge = torch.tensor([800.0, -800.0], dtype=F64)  # W = e^800 overflows: φ = 0; W = e^-800: φ = 0
    assert torch.equal(k.log_phi(huge, up).exp(), torch.zeros(2, dtype=F64))
    zero_k = Gamma(0.0, 0.0, 0.0, 0.0)  # φ ≡ 1 even at W = 0 and W = ∞
    inf = torch.tensor([math.inf, -math.inf], dtype=F64)
    assert torch.equal(zero_k.log_phi(inf, up), torch.zeros(2, dtype=F64))
    # a 4000-token response far off-policy: finite loss and gradient
    old = torch.full((1, 4000), -2.0, dtype=F64)
    logp = (old + 0.3).requires_grad_(True)
    out = rpg.VESPOLoss()(logp, old, torch.ones(1, dtype=F64), None)
    assert torch.isfinite(out.loss) and torch.isfinite(_grad(out.loss, logp)).all()


def test_clip_cov_hand_computed():
    """Two sequences × 2 tokens, A = (+2, −2); one token alone has cov in (1, 5): it, and only it, loses its
    loss; the PPO term elsewhere."""
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=F64)
    logp = torch.tensor([[0.0, -2.0], [-1.0, -1.0]], dtype=F64).requires_grad_(True)
    adv = torch.tensor([2.0, -2.0], dtype=F64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    # mean A = 0, mean logp = −1: cov = A·(logp + 1) = (2, −2, 0, 0)
    cov = covariance(logp.detach(), adv[:, None], mask)
    torch.testing.assert_close(cov, torch.tensor([[2.0, -2.0], [0.0, 0.0]], dtype=F64))
    fn = rpg.ClipCovLoss(clip=None, fraction=0.25)
    out = fn(logp, old, adv, mask, generator=_gen())
    w = (logp.detach() - old).exp()
    want = torch.tensor([[0.0, -2 * w[0, 1].item()], [2.0, 2.0]], dtype=F64)
    torch.testing.assert_close(out.per_token.detach(), want)
    assert out.loss.item() == pytest.approx(want.sum().item() / 4, abs=1e-14)
    # the same token is clipped by PPO's ε = 0.2 (w = e > 1.2, A > 0): then nothing is a candidate
    out = rpg.ClipCovLoss(fraction=0.25)(logp, old, adv, mask, generator=_gen())
    assert out.per_token[0, 0].item() == pytest.approx(-2 * 1.2)


def test_kl_cov_hand_computed():
    """Same batch: the token of largest cov (2) gets coef·|log w| = 0.5·1 added, the others −w·A."""
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=F64)
    logp = torch.tensor([[0.0, -2.0], [-1.0, -1.0]], dtype=F64).requires_grad_(True)
    adv = torch.tensor([2.0, -2.0], dtype=F64)
    out = rpg.KLCovLoss(fraction=0.25, coef=0.5)(logp, old, adv, None)
    w = (logp.detach() - old).exp()
    want = -w * adv[:, None]
    want[0, 0] += 0.5 * 1.0
    torch.testing.assert_close(out.per_token.detach(), want)
    g = _grad(out.loss, logp)
    want_g = -w * adv[:, None] / 4
    want_g[0, 0] += 0.5 / 4  # d|log w|/dlogp = sign(log w) = +1
    torch.testing.assert_close(g, want_g)


def test_m2_filter_hand_computed():
    """(log ρ)² = (0.01, 0.25, 0.09, 0.0025): mean 0.088. τ = 0.05 drops 0.25 (rest 0.034); τ = 0.02 drops
    0.25 and 0.09 (rest 0.00625); τ = 0.001: no set reaches it, only the smallest token is kept."""
    log_rho = torch.tensor([[0.1, 0.5, -0.3, 0.05]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    assert m2_rejected(log_rho, mask, 0.05).tolist() == [[False, True, False, False]]
    assert m2_rejected(log_rho, mask, 0.02).tolist() == [[False, True, True, False]]
    assert m2_rejected(log_rho, mask, 0.001).tolist() == [[True, True, True, False]]
    assert m2_rejected(log_rho, mask, 1.0).tolist() == [[False] * 4]
    masked = torch.tensor([[True, False, True, True]])  # padding neither counts nor is rejected
    assert m2_rejected(log_rho, masked, 0.02).tolist() == [[False, False, True, False]]
    assert not m2_rejected(log_rho, torch.zeros_like(mask), 0.02).any()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tau", [0.01, 0.05, 0.2])
def test_m2_filter_equals_areals_rule(seed, tau):
    g = _gen(seed)
    log_rho = 0.3 * torch.randn(5, 7, generator=g, dtype=F64)
    mask = torch.rand(5, 7, generator=g) > 0.3
    keep = R.m2_keep(log_rho, mask, tau)
    got = mask & ~m2_rejected(torch.where(mask, log_rho, 0), mask, tau)
    assert torch.equal(got, keep)
    kept = (log_rho**2)[got]
    assert kept.mean() < tau or kept.numel() == 1


def test_m2_correction_in_a_loss_and_icepop_is_a_setting():
    """M2PO is RolloutCorrection(m2_upper=τ): rejected tokens leave the loss (and, with
    count_rejected=False as AReaL, the denominators). IcePop is RolloutCorrection(level="token",
    mode="mask", lower=α, upper=β): weight ρ inside [α, β], 0 outside."""
    logp, old, adv, mask, _ = make_batch(4, 8, seed=3)
    beh = old + 0.4 * torch.randn(4, 8, generator=_gen(1), dtype=F64)
    m2 = rpg.RolloutCorrection(mode="truncate", lower=1.0, upper=1.0, m2_upper=0.05, count_rejected=False)
    out = rpg.DAPOLoss(correction=m2)(logp, old, adv, mask, behavior_logp=beh)
    rejected = m2_rejected(torch.where(mask, old - beh, 0), mask, 0.05)
    keep = mask & ~rejected
    assert rejected.any() and keep.any()
    plain = rpg.DAPOLoss()(logp, old, adv, keep)
    torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=1e-14)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(plain.loss, logp), rtol=0, atol=1e-14)
    assert out.metrics["rollout_corr/rollout_rs_masked_fraction"] > 0
    icepop = rpg.RolloutCorrection(level="token", mode="mask", lower=0.5, upper=2.0)
    rho = (old - beh).exp()
    want = torch.where(mask & (rho >= 0.5) & (rho <= 2.0), rho, 0)
    assert ((rho < 0.5) & mask).any() or ((rho > 2.0) & mask).any()
    torch.testing.assert_close(icepop.weight(old, beh, mask), want, rtol=1e-14, atol=0)


def test_m2_correction_is_per_call():
    """The filter ranks the tokens of one call: two halves filter differently from the whole."""
    _, old, _, mask, _ = make_batch(6, 8, seed=4)
    spread = torch.tensor([0.6, 0.6, 0.6, 0.1, 0.1, 0.1], dtype=F64)[:, None]  # a stale half, a fresh half
    beh = old + spread * torch.randn(6, 8, generator=_gen(2), dtype=F64)
    c = rpg.RolloutCorrection(m2_upper=0.05)
    whole = c.keep(old, beh, mask)
    halves = torch.cat([c.keep(old[:3], beh[:3], mask[:3]), c.keep(old[3:], beh[3:], mask[3:])])
    assert not torch.equal(whole, halves)


# --- the kernel against the plain-autograd reference (1e-12) ----------------------------------


CLIPS = [None, rpg.Clip(0.2, 0.28, None), rpg.Clip(0.1, 0.1, 1.5), rpg.Clip(None, 0.05, None)]


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("adv_shape", ["seq", "tok"])
@pytest.mark.parametrize("agg", AGGS)
def test_geometric_ratio_equals_reference(clip, adv_shape, agg):
    logp, old, adv, mask, ref = make_batch(5, 7, seed=11, spread=0.4, adv_shape=adv_shape)
    weights = torch.rand(5, 7, generator=_gen(3), dtype=F64)
    fn = rpg.PolicyLoss(ratio="geometric", clip=clip, agg=agg, kl="rkl", beta=0.1)
    out = fn(logp, old, adv, mask, ref_logp=ref, weights=weights)
    per = (R.gmpo_per_token(logp, old, adv, mask, clip) + 0.1 * R.kl_surrogate("rkl", logp, old, ref)) * weights
    want = rpg.aggregate(per, mask, agg)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(want, logp), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("adv_shape", ["seq", "tok"])
@pytest.mark.parametrize("agg", AGGS)
def test_product_ratio_equals_reference(kernel, adv_shape, agg):
    logp, old, adv, mask, _ = make_batch(5, 7, seed=12, spread=0.3, adv_shape=adv_shape)
    weights = torch.rand(5, 7, generator=_gen(4), dtype=F64)
    fn = rpg.PolicyLoss(
        style="reinforce", ratio="product", kernel=Gamma(1.5, 2.5, 2.0, 1.0) if kernel else None, agg=agg
    )
    out = fn(logp, old, adv, mask, weights=weights)
    per = R.vespo_per_token(logp, old, adv, mask, 1.5, 2.5, 2.0, 1.0, kernel=kernel) * weights
    want = rpg.aggregate(per, mask, agg)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(want, logp), rtol=0, atol=1e-12)


@pytest.mark.parametrize("agg", AGGS)
def test_selection_rules_equal_reference(agg):
    logp, old, adv, mask, _ = make_batch(6, 8, seed=13, spread=0.5, adv_shape="tok")
    adv = 3 * adv
    weights = torch.rand(6, 8, generator=_gen(5), dtype=F64)
    clip = rpg.Clip(0.2, 0.2, None)
    fn = rpg.ClipCovLoss(clip, fraction=0.1, low=-1.0, high=4.0, agg=agg)
    drop, _ = fn.select.select(logp.detach(), old, adv, mask, clip, _gen(9))
    assert drop.sum() == rpg.selection.count(0.1, mask)
    out = fn(logp, old, adv, mask, weights=weights, generator=_gen(9))
    want = rpg.aggregate(R.clip_cov_per_token(logp, old, adv, mask, clip, drop) * weights, mask, agg)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(want, logp), rtol=0, atol=1e-12)
    fn = rpg.KLCovLoss(fraction=0.1, coef=0.3, agg=agg)
    _, pen = fn.select.select(logp.detach(), old, adv, mask, None)
    out = fn(logp, old, adv, mask, weights=weights)
    want = rpg.aggregate(R.kl_cov_per_token(logp, old, adv, mask, pen, 0.3) * weights, mask, agg)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(want, logp), rtol=0, atol=1e-12)


def test_kl_cov_selects_the_largest_covariance():
    logp, old, adv, mask, _ = make_batch(6, 8, seed=14, adv_shape="tok")
    _, pen = CovariancePenalty(0.1).select(logp.detach(), old, adv, mask, None)
    cov = covariance(logp.detach(), adv, mask)
    k = rpg.selection.count(0.1, mask)
    assert int(pen.sum()) == k
    assert cov[pen].min() >= cov[mask & ~pen].max()


# --- exact oracles: what each gradient is and is not -------------------------------------------


def _seq_problem(seed, scale=0.7):
    return T.random_sequence_problem(k=3, seed=seed, scale=scale)


def _gm_surrogate_gradient(p, clip):
    """−n·∇_θ Σ_y π_old(y)·s_θ(y)·R(y), n = 2 tokens, s the geometric mean of the clipped token ratios."""
    theta = p.logits.detach().clone().requires_grad_(True)
    lp = T.sequence_token_logp(theta)
    old = T.sequence_token_logp(p.old_logits).detach()
    per = R.gmpo_per_token(lp, old, p.rewards, torch.ones_like(lp, dtype=torch.bool), clip)
    # GMPO-token's per-token terms summed over a sequence have the gradient n·∇(−s·R)
    weighted = (old.sum(-1).exp()[:, None] * per).sum()
    (g,) = torch.autograd.grad(weighted, theta)
    return g


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmpo_on_policy_follows_expected_reward(seed):
    """On-policy (s = 1, no clip binds) and for equal lengths, Σ_t ∇ℓ_t has expectation −∇E[R(y)]."""
    p = _seq_problem(seed)
    got = T.sequence_expected_gradient(rpg.GMPOLoss(), p.logits, p.logits, p.rewards)
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [None, 0.4, 0.1])
def test_gmpo_off_policy_is_its_surrogate_not_expected_reward(eps):
    """Off-policy the expected gradient is exactly −∇ of GMPO's geometric-mean surrogate (clipped tokens
    passing none) and is not −∇E[R]: the geometric mean is not the sequence importance weight."""
    p = _seq_problem(5, scale=0.9)
    fn = rpg.GMPOLoss(eps, eps)
    got = T.sequence_expected_gradient(fn, p.logits, p.old_logits, p.rewards)
    torch.testing.assert_close(got, _gm_surrogate_gradient(p, fn.clip), rtol=0, atol=1e-10)
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, 0.0)
    assert (got - want).norm() / want.norm() > 1e-2


def test_product_ratio_is_exact_off_policy_and_vespo_is_not():
    """φ(W) = W (no kernel): E_old[Σ_t ∇ℓ_t] = −∇E_θ[R(y)] exactly off-policy; VESPO's kernel equals it
    on-policy (φ(1) = 1) and is biased off-policy."""
    p = _seq_problem(6, scale=0.9)
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, 0.0)
    exact = rpg.PolicyLoss(style="reinforce", ratio="product", agg="seq-mean-token-sum")
    got = T.sequence_expected_gradient(exact, p.logits, p.old_logits, p.rewards)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    on = T.sequence_expected_gradient(rpg.VESPOLoss(), p.logits, p.logits, p.rewards)
    torch.testing.assert_close(on, want, rtol=0, atol=1e-10)
    off = T.sequence_expected_gradient(rpg.VESPOLoss(), p.logits, p.old_logits, p.rewards)
    assert (off - want).norm() / want.norm() > 1e-2


def test_product_ratio_with_a_sequence_correction_is_exact_under_a_behaviour_policy():
    """Tokens from μ ≠ π_old: the untruncated sequence-level correction ρ_seq times W = π_θ/π_old is
    π_θ(y)/μ(y), the exact outcome-reward weight."""
    p = _seq_problem(7, scale=0.8)
    mu = p.ref_logits  # a third policy as the rollout engine
    fn = rpg.PolicyLoss(
        style="reinforce",
        ratio="product",
        agg="seq-mean-token-sum",
        correction=rpg.RolloutCorrection(level="sequence", upper=None),
    )
    got = T.sequence_expected_gradient(fn, p.logits, p.old_logits, p.rewards, behavior_logits=mu)
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_vespo_takes_a_token_correction_inside_w():
    """With μ, a token-level correction enters W as Π_t ρ̄_t (each ρ̄_t truncated, or 0 where masked: then
    φ = 0 for the whole sequence), and does not multiply the tokens' losses."""
    logp, old, adv, mask, _ = make_batch(5, 6, seed=22, spread=0.3)
    beh = (old + 0.4 * torch.randn(5, 6, generator=_gen(8), dtype=F64)).clamp(max=0.0)
    rho = torch.where(mask, (old - beh).exp(), 1.0)
    for c, rho_bar in [
        (rpg.RolloutCorrection(upper=1.5), rho.clamp(max=1.5)),
        (rpg.RolloutCorrection(mode="mask", lower=0.5, upper=2.0), torch.where((rho < 0.5) | (rho > 2.0), 0.0, rho)),
    ]:
        out = rpg.VESPOLoss(correction=c)(logp, old, adv, mask, behavior_logp=beh)
        log_w = torch.where(mask, logp.detach() - old, 0).sum(-1, keepdim=True) + rho_bar.log().sum(-1, keepdim=True)
        big_w = log_w.exp()
        up = adv[:, None] >= 0
        phi = torch.where(up, big_w**2 * torch.exp(-3 * (big_w - 1)), big_w**3 * torch.exp(-2 * (big_w - 1)))
        want = rpg.aggregate(-(phi * adv[:, None]) * logp, mask, "token-mean")
        torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-13)
        torch.testing.assert_close(_grad(out.loss, logp), _grad(want, logp), rtol=0, atol=1e-13)
    assert (rho_bar == 0).any()


def _with_gen(fn, seed=0):
    def call(*args, **kw):
        return fn(*args, generator=_gen(seed), **kw)

    return call


def test_kl_cov_on_policy_follows_expected_reward_and_off_policy_adds_its_penalty():
    """On-policy |log w| has derivative 0 (at log w = 0): −∇E[A] exactly. Off-policy the penalty adds
    coef·π_old(a)·sign(log w_a)·∇logp_a at the selected actions — exactly that, computed."""
    p = T.random_problem(k=6, seed=3)
    fn = rpg.KLCovLoss(fraction=0.34, coef=0.5)
    want = -T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, 0.0)
    torch.testing.assert_close(T.expected_gradient(fn, p.logits, p.logits, p.rewards), want, rtol=0, atol=1e-10)
    got = T.expected_gradient(fn, p.logits, p.old_logits, p.rewards)
    pg = T.expected_gradient(rpg.PolicyLoss(), p.logits, p.old_logits, p.rewards)
    torch.testing.assert_close(pg, want, rtol=0, atol=1e-10)
    theta = p.logits.clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    old = torch.log_softmax(p.old_logits, -1)
    _, pen = fn.select.select(
        lp.detach()[:, None], old[:, None], p.rewards[:, None], torch.ones(6, 1, dtype=torch.bool), None
    )
    assert 0 < int(pen.sum()) < 6
    penalty = (old.exp() * 0.5 * (lp - old).abs() * pen[:, 0]).sum()
    torch.testing.assert_close(got, pg + _grad(penalty, theta), rtol=0, atol=1e-10)
    assert (got - want).abs().max() > 1e-3


def test_clip_cov_drops_the_selected_tokens_from_the_gradient():
    """Even on-policy Clip-Cov is biased: its expected gradient is −Σ_{a kept} π_old(a)·A(a)·∇logp_a."""
    p = T.random_problem(k=8, seed=4, scale=0.8)
    fn = rpg.ClipCovLoss(clip=None, fraction=0.25, low=-10.0, high=10.0)
    got = T.expected_gradient(_with_gen(fn, 1), p.logits, p.logits, p.rewards)
    theta = p.logits.clone().requires_grad_(True)
    lp = torch.log_softmax(theta, -1)
    drop, _ = fn.select.select(
        lp.detach()[:, None],
        lp.detach()[:, None],
        p.rewards[:, None],
        torch.ones(8, 1, dtype=torch.bool),
        None,
        _gen(1),
    )
    assert int(drop.sum()) == 2
    kept = -(lp.detach().exp() * p.rewards * lp * (~drop[:, 0])).sum()
    torch.testing.assert_close(got, _grad(kept, theta), rtol=0, atol=1e-10)
    want = -T.objective_gradient("rkl", p.logits, p.ref_logits, p.rewards, 0.0)
    assert (got - want).abs().max() > 1e-3


# --- aggregation, global counts, settings -------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        rpg.GMPOLoss(0.2, 0.2),
        rpg.PolicyLoss(ratio="geometric", clip=rpg.Clip(0.2, 0.2, None), agg="token-mean"),
        rpg.VESPOLoss(),
        rpg.VESPOLoss(agg="seq-mean-token-sum"),
    ],
    ids=["gmpo", "geometric-token-mean", "vespo", "vespo-seq-sum"],
)
def test_row_shards_with_global_counts_sum_to_the_full_loss(fn):
    logp, old, adv, mask, _ = make_batch(6, 7, seed=15, spread=0.4)
    counts = dict(batch_num_tokens=int(mask.sum()), global_batch_size=6)
    full = fn(logp, old, adv, mask, **counts).loss
    parts = sum(fn(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], **counts).loss for i in (0, 2, 4))
    torch.testing.assert_close(parts, full, rtol=0, atol=1e-13)
    torch.testing.assert_close(_grad(parts, logp), _grad(full, logp), rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "make", [lambda: rpg.ClipCovLoss(fraction=0.1, low=-1.0, high=4.0), lambda: rpg.KLCovLoss(0.1)]
)
def test_selection_shards_are_per_shard_selections(make):
    """Documented behaviour: each call selects among its own tokens. With global counts the shards' losses
    sum to the full batch's loss with the union of the shards' selections — not to the full batch's call."""
    fn = make()
    logp, old, adv, mask, _ = make_batch(6, 8, seed=16, spread=0.5, adv_shape="tok")
    adv = 3 * adv
    counts = dict(batch_num_tokens=int(mask.sum()), global_batch_size=6)
    parts, union_drop, union_pen = 0, torch.zeros_like(mask), torch.zeros_like(mask)
    for i in (0, 3):
        rows = slice(i, i + 3)
        parts = parts + fn(logp[rows], old[rows], adv[rows], mask[rows], generator=_gen(i), **counts).loss
        drop, pen = fn.select.select(logp.detach()[rows], old[rows], adv[rows], mask[rows], fn.clip, _gen(i))
        if drop is not None:
            union_drop[rows] = drop
        if pen is not None:
            union_pen[rows] = pen
    if isinstance(fn.select, CovarianceDrop):
        per = R.clip_cov_per_token(logp, old, adv, mask, fn.clip, union_drop)
    else:
        per = R.kl_cov_per_token(logp, old, adv, mask, union_pen, fn.select.coef)
    want = per.sum() / counts["batch_num_tokens"]
    torch.testing.assert_close(parts, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(_grad(parts, logp), _grad(want, logp), rtol=0, atol=1e-13)
    full = fn(logp, old, adv, mask, generator=_gen(0), **counts).loss
    assert (full - parts).abs() > 1e-6


def test_entropy_bonus_and_behavior_logp_apply():
    logp, old, adv, mask, _ = make_batch(4, 6, seed=17)
    ent = torch.rand(4, 6, generator=_gen(6), dtype=F64).requires_grad_(True)
    beh = old + 0.3 * torch.randn(4, 6, generator=_gen(7), dtype=F64)
    for fn in [rpg.GMPOLoss(entropy_coef=0.1), rpg.VESPOLoss(entropy_coef=0.1), rpg.KLCovLoss(0.1, entropy_coef=0.1)]:
        base = fn.replace(entropy_coef=0.0)
        out = fn(logp, old, adv, mask, entropy=ent)
        want = base(logp, old, adv, mask).loss - 0.1 * rpg.aggregate(ent, mask, fn.agg)
        torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-13)
        c = rpg.RolloutCorrection(upper=None)
        weighted = fn.replace(correction=c, entropy_coef=0.0)(logp, old, adv, mask, behavior_logp=beh)
        rho = (old - beh).exp()
        if fn.ratio == "product":  # the correction enters W: W·Π_t ρ_t
            per = R.vespo_per_token(logp, old - torch.where(mask, old - beh, 0), adv, mask)
            explicit = rpg.aggregate(per, mask, fn.agg)
        else:
            explicit = base(logp, old, adv, mask, weights=rho).loss
        torch.testing.assert_close(weighted.loss, explicit, rtol=0, atol=1e-13)
        torch.testing.assert_close(_grad(weighted.loss, logp), _grad(explicit, logp), rtol=0, atol=1e-13)


def test_bf16_inputs_compute_in_float32():
    logp, old, adv, mask, _ = make_batch(3, 5, seed=18, dtype=torch.bfloat16)
    for fn in [rpg.GMPOLoss(), rpg.VESPOLoss(), rpg.ClipCovLoss(fraction=0.2, low=-5, high=5), rpg.KLCovLoss(0.2)]:
        out = fn(logp, old, adv, mask, generator=_gen())
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        assert _grad(out.loss, logp).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda: rpg.GMPOLoss(agg="token-mean"), ValueError, "seq-mean-token-mean"),
        (lambda: rpg.GMPOLoss(low=-0.1), ValueError, "GMPOLoss.low"),
        (lambda: rpg.GMPOLoss(high="x"), TypeError, "GMPOLoss.high"),
        (lambda: rpg.VESPOLoss(k_pos=-1.0), ValueError, "Gamma.k_pos"),
        (lambda: rpg.VESPOLoss(lambda_neg=math.inf), ValueError, "Gamma.lambda_neg"),
        (lambda: rpg.ClipCovLoss(fraction=0.0), ValueError, "CovarianceDrop.fraction"),
        (lambda: rpg.ClipCovLoss(low=5.0, high=1.0), ValueError, "CovarianceDrop.low"),
        (lambda: rpg.KLCovLoss(coef=-1.0), ValueError, "CovariancePenalty.coef"),
        (lambda: rpg.KLCovLoss(fraction=1.5), ValueError, "CovariancePenalty.fraction"),
        (lambda: rpg.RolloutCorrection(m2_upper=0.0), ValueError, "m2_upper"),
        (lambda: rpg.PolicyLoss(ratio="geometric", style="reinforce"), ValueError, "geometric"),
        (lambda: rpg.PolicyLoss(ratio="geometric", clip=rpg.TrustRegion()), ValueError, "rpg.Clip"),
        (lambda: rpg.PolicyLoss(ratio="product"), ValueError, "style='reinforce'"),
        (lambda: rpg.PolicyLoss(ratio="product", style="reinforce", clip=rpg.Truncate()), ValueError, "no clip"),
        (lambda: rpg.PolicyLoss(style="reinforce", kernel=Gamma()), ValueError, "ratio='product'"),
        (lambda: rpg.PolicyLoss(style="reinforce", ratio="product", kernel=1.0), TypeError, "kernel"),
        (lambda: rpg.PolicyLoss(select="clip_cov"), TypeError, "select"),
        (lambda: rpg.PolicyLoss(select=CovariancePenalty(), style="reinforce"), ValueError, "Clip-Cov"),
        (lambda: rpg.PolicyLoss(select=CovariancePenalty(), ratio="sequence"), ValueError, "Clip-Cov"),
    ],
)
def test_bad_settings_raise(build, exc, match):
    with pytest.raises(exc, match=match):
        build()


def test_bad_generator_raises_and_losses_stay_immutable_and_hashable():
    logp, old, adv, mask, _ = make_batch(2, 3)
    with pytest.raises(TypeError, match="generator"):
        rpg.ClipCovLoss()(logp, old, adv, mask, generator=0)
    for fn in [rpg.GMPOLoss(), rpg.VESPOLoss(), rpg.ClipCovLoss(), rpg.KLCovLoss()]:
        assert hash(fn) == hash(type(fn)()) and fn == type(fn)()
        with pytest.raises(AttributeError, match="immutable"):
            fn.agg = "token-sum"
        assert rpg.PolicyLoss(**fn.config) == fn


def test_clip_cov_seeded_generator_reproduces_the_draw():
    logp, old, adv, mask, _ = make_batch(6, 8, seed=19, adv_shape="tok")
    fn = rpg.ClipCovLoss(fraction=0.1, low=-5.0, high=5.0)
    a = fn(logp, old, 3 * adv, mask, generator=_gen(3)).loss
    b = fn(logp, old, 3 * adv, mask, generator=_gen(3)).loss
    assert torch.equal(a, b)
    others = [fn(logp, old, 3 * adv, mask, generator=_gen(s)).loss for s in range(10, 15)]
    assert max((o - a).abs() for o in others) > 1e-6


# --- torch.compile and the fused head -----------------------------------------------------------


@pytest.mark.parametrize(
    "fn, fullgraph",
    [(rpg.GMPOLoss(0.2, 0.2), True), (rpg.VESPOLoss(), True), (rpg.KLCovLoss(0.2), False)],
    ids=["gmpo", "vespo", "kl-cov"],
)
def test_compiled_equals_eager(fn, fullgraph):
    """GMPO and VESPO compile to one graph; the selection rules size their selection from the data (a
    graph break there, as verl's .item())."""
    torch._dynamo.reset()
    logp, old, adv, mask, _ = make_batch(4, 16, seed=7, dtype=torch.float32)
    logp = logp.detach().requires_grad_(True)

    def step(logp, old, adv, mask):
        return fn(logp, old, adv, mask).loss

    eager = step(logp, old, adv, mask)
    got = torch.compile(step, fullgraph=fullgraph)(logp, old, adv, mask)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_grad(got, logp), _grad(eager, logp), rtol=1e-6, atol=1e-6)


def test_compiled_clip_cov_with_a_generator_equals_eager():
    torch._dynamo.reset()
    logp, old, adv, mask, _ = make_batch(4, 16, seed=8, dtype=torch.float32, adv_shape="tok")
    fn = rpg.ClipCovLoss(fraction=0.1, low=-5.0, high=5.0)

    def step(logp, g):
        return fn(logp, old, 3 * adv, mask, generator=g).loss

    eager = step(logp, _gen(2))
    got = torch.compile(step)(logp, _gen(2))
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)


_REJECT = rpg.RolloutCorrection(mode="mask", lower=0.7, upper=1.4, count_rejected=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda: rpg.GMPOLoss(0.2, 0.2),
        lambda: rpg.VESPOLoss(),
        lambda: rpg.ClipCovLoss(fraction=0.1, low=-5.0, high=5.0),
        lambda: rpg.KLCovLoss(0.1),
        lambda: rpg.DAPOLoss(correction=rpg.RolloutCorrection(m2_upper=0.05, count_rejected=False)),
        lambda: rpg.PolicyLoss(
            style="reinforce", ratio="product", kernel=Gamma(), kl="rkl", beta=0.1, separate_kl=True
        ),
        lambda: rpg.GMPOLoss(0.2, 0.2, correction=_REJECT),
        lambda: rpg.KLCovLoss(0.1, correction=_REJECT),
    ],
    ids=["gmpo", "vespo", "clip-cov", "kl-cov", "m2po", "product-separate-kl", "gmpo-rejected", "kl-cov-rejected"],
)
@pytest.mark.parametrize("counts", [False, True])
def test_fused_head_equals_from_hidden(make, counts):
    fn = make()
    g = _gen(21)
    b, t, h, v = 4, 6, 8, 11
    hidden = torch.randn(b, t, h, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=F64, requires_grad=True)
    tokens = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    mask[:, 0] = True
    with torch.no_grad():
        logp0 = rpg.logprobs.from_hidden(hidden, weight, tokens)
    old = (logp0 + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=0.0)  # log-probs ≤ 0
    beh = (old + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).clamp(max=0.0)
    adv = 3 * torch.randn(b, t, generator=g, dtype=F64)
    kw = dict(batch_num_tokens=int(mask.sum()), global_batch_size=b) if counts else {}
    want = fn(
        rpg.logprobs.from_hidden(hidden, weight, tokens), old, adv, mask, behavior_logp=beh, generator=_gen(5), **kw
    )
    gh, gw = torch.autograd.grad(want.loss, (hidden, weight))
    fused = rpg.FusedLinearLoss(fn, chunk_size=5)
    got = fused(hidden, weight, tokens, old, adv, mask, behavior_logp=beh, generator=_gen(5), **kw)
    fh, fw = torch.autograd.grad(got.loss, (hidden, weight))
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=1e-10)
    torch.testing.assert_close(got.per_token, want.per_token.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(fh, gh, rtol=0, atol=1e-10)
    torch.testing.assert_close(fw, gw, rtol=0, atol=1e-10)


# --- the sequence ratios and selection rules beside the token families' settings --------------------


def _pieces(seed=3):
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 4
    logp = torch.randn(B, T, generator=g, dtype=torch.float64) - 1
    old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=torch.float64)
    beh = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    logp, old, beh = shift_to_logprobs(logp, old, beh)
    logp = logp.requires_grad_()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3] = False
    weights = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return logp, old, beh, adv, mask, weights


@pytest.mark.parametrize("weight_kl", [True, False])
@pytest.mark.parametrize("kernel", [None, rpg.sequence.Gamma()])
def test_product_ratio_with_a_separate_kl_term_is_the_sum_of_its_terms(kernel, weight_kl):
    """separate_kl=True under ratio='product': −sg(φ(W)·A)·logp (weighted) plus the differentiable KL term
    (weighted only with weight_kl=True) — not the folded weight, and the weights are not dropped."""
    logp, old, _, adv, mask, weights = _pieces()
    cfg = dict(style="reinforce", ratio="product", kernel=kernel, kl="rkl", beta=0.5, separate_kl=True)
    out = rpg.policy_loss(logp, old, adv, mask, weights=weights, weight_kl=weight_kl, **cfg)
    pg = rpg.policy_loss(logp, old, adv, mask, weights=weights, style="reinforce", ratio="product", kernel=kernel)
    kl = rpg.policy_loss(logp, old, None, mask, weights=weights if weight_kl else None, kl="rkl", beta=0.5)
    torch.testing.assert_close(out.per_token, pg.per_token + kl.per_token, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(pg.loss + kl.loss, logp), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("separate_kl", [False, True])
def test_product_ratio_kl_term_takes_the_token_correction_weight(separate_kl):
    """With a behaviour policy the correction enters W for the policy-gradient term; the per-token KL term
    still gets each token's correction weight ρ̄_t (weight_kl=True), as under ratio='token'."""
    logp, old, beh, adv, mask, _ = _pieces()
    corr = rpg.RolloutCorrection(upper=1.5)
    kw = dict(behavior_logp=beh, correction=corr)
    out = rpg.policy_loss(
        logp, old, adv, mask, style="reinforce", ratio="product", kl="rkl", beta=0.5, separate_kl=separate_kl, **kw
    )
    pg = rpg.policy_loss(logp, old, adv, mask, style="reinforce", ratio="product", **kw)
    kl_style = dict(style="reinforce", separate_kl=True) if separate_kl else dict(style="reinforce")
    kl = rpg.policy_loss(logp, old, None, mask, kl="rkl", beta=0.5, **kl_style, **kw)
    torch.testing.assert_close(out.per_token, pg.per_token + kl.per_token, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(pg.loss + kl.loss, logp), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "clip",
    [
        rpg.GradientPreservingClip(0.2, 0.2),
        rpg.SoftGate(),
        rpg.TrustRegion(0.1, 0.1),
        rpg.Clip(0.2, 0.2, dual=None),
    ],
    ids=lambda c: type(c).__name__,
)
def test_clip_cov_with_any_differentiable_clip_rule_drops_only_unclipped_tokens(clip):
    """Every candidate dropped (fraction 1, a band holding every cov): the tokens left with a loss are
    exactly those the clip rule already clips (its metric codes), for every differentiable-style rule."""
    logp, old, _, adv, mask, _ = _pieces()
    logp = (logp.detach() - 1.0).requires_grad_()  # old = logp ± 0.6 stays a log-probability
    old = logp.detach() + torch.linspace(-0.6, 0.6, 12, dtype=torch.float64).view(3, 4)
    rule = rpg.selection.CovarianceDrop(1.0, -1e9, 1e9)
    out = rpg.policy_loss(logp, old, adv, mask, clip=clip, select=rule, generator=_gen())
    full = rpg.policy_loss(logp, old, adv, mask, clip=clip)
    r = Ratios(logp.detach(), old)
    clipped = (clip.codes(r.w, adv[:, None].expand_as(r.w), r) != 0) & mask
    torch.testing.assert_close(out.per_token, torch.where(clipped, full.per_token, 0.0), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: rpg.GMPOLoss(),
        lambda: rpg.GSPOLoss(),
        lambda: rpg.VESPOLoss(),
        lambda: rpg.ClipCovLoss(fraction=0.3, low=-1e9, high=1e9),
        lambda: rpg.KLCovLoss(fraction=0.3),
    ],
    ids=["gmpo", "gspo", "vespo", "clip_cov", "kl_cov"],
)
def test_rejected_tokens_leave_the_sequence_and_the_selection_with_count_rejected_false(make):
    """count_rejected=False (verl's convention: the response mask shrinks): a rejected token is out of the
    sequence ratio, its length and the selection's batch statistics, exactly as if the mask lacked it."""
    logp, old, beh, adv, mask, _ = _pieces(5)
    reject = rpg.RolloutCorrection(mode="mask", lower=0.8, upper=1.25, count_rejected=False)
    keep = reject.keep(old, beh, mask)
    assert (keep != mask).any() and keep.any(-1).all()
    plain = rpg.RolloutCorrection(upper=None)  # the same weight ρ_t, nothing rejected
    loss = make()
    out = loss.replace(correction=reject)(logp, old, adv, mask, behavior_logp=beh, generator=_gen())
    ref = loss.replace(correction=plain)(logp, old, adv, keep, behavior_logp=beh, generator=_gen())
    torch.testing.assert_close(out.per_token, ref.per_token, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(out.loss, logp), _grad(ref.loss, logp), rtol=1e-12, atol=1e-12)


def test_kl_cov_penalty_at_a_zero_weight_is_exactly_zero():
    """A weight of 0 gives exactly 0 even where the penalty coef·|log w| is infinite (log π = −∞)."""
    logp, old, _, adv, mask, _ = _pieces()
    logp = logp.detach().clone()
    logp[1, 1] = -math.inf
    logp.requires_grad_(True)
    weights = torch.ones_like(old)
    weights[1, 1] = 0
    out = rpg.KLCovLoss(fraction=1.0)(logp, old, adv, mask, weights=weights)
    assert out.per_token[1, 1] == 0 and torch.isfinite(out.loss)
    assert torch.isfinite(_grad(out.loss, logp)).all()


@pytest.mark.parametrize("separate_kl", [False, True])
def test_product_ratio_with_a_kl_term_is_exact_under_a_behaviour_policy_on_one_token(separate_kl):
    """By enumeration: with the untruncated token correction, ratio='product' plus a reverse-KL term follows
    E[r] − β·KL exactly when the tokens come from μ ≠ π_old (the KL term needs its ρ_t: without it, 0.6 off)."""
    fn = rpg.PolicyLoss(
        style="reinforce",
        ratio="product",
        kl="rkl",
        beta=0.5,
        separate_kl=separate_kl,
        correction=rpg.RolloutCorrection(upper=None),
    )
    scenarios = tuple(s for s in T.SCENARIOS if s.tokens == 1 and s.behavior)
    assert scenarios
    a = T.audit(fn, objective="rkl", scenarios=scenarios)
    assert a.bias(where=scenarios[0].name) < 1e-10


def test_clip_cov_with_a_kl_term_keeps_the_kl_at_the_dropped_tokens():
    """verl's clip_cov zeroes the policy-gradient loss of the selected tokens (its ``corr``); the KL loss is a
    separate term over the whole response mask. So with β > 0 a dropped token keeps its β·KL: per token,
    clip_cov_per_token + β·KL-term, value and gradient (the batch of test_clip_cov_hand_computed, where
    token (0, 0) alone is selected), with and without weights."""
    old = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=F64)
    logp = torch.tensor([[-0.5, -2.0], [-1.0, -1.0]], dtype=F64).requires_grad_(True)
    ref = torch.tensor([[-1.5, -1.2], [-0.7, -1.0]], dtype=F64)
    adv = torch.tensor([4.0, -4.0], dtype=F64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    rule = CovarianceDrop(0.25, 1.0, 5.0)  # cov = A·(logp − mean logp) = (4·0.625 = 2.5, …): only (0, 0) in (1, 5)
    weights = torch.tensor([[0.5, 2.0], [1.0, 0.25]], dtype=F64)
    for w in (None, weights):
        fn = rpg.PolicyLoss(clip=None, select=rule, kl="urkl", beta=0.5)
        out = fn(logp, old, adv, mask, ref_logp=ref, weights=w, generator=_gen())
        drop = torch.tensor([[True, False], [False, False]])
        kl = rpg.policy_loss(logp, old, None, mask, ref_logp=ref, kl="urkl", beta=0.5).per_token
        want = R.clip_cov_per_token(logp, old, adv, mask, None, drop) + kl
        want = want if w is None else want * w
        assert want[0, 0].item() != 0.0  # the dropped token's KL term
        torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-14)
        torch.testing.assert_close(_grad(out.loss, logp), _grad(want.mean(), logp), rtol=0, atol=1e-14)
        assert out.metrics["select_frac"] == pytest.approx(0.25, abs=1e-15)


def test_select_frac_counts_the_selected_tokens():
    """``select_frac``: the fraction of the call's tokens the selection rule took (Clip-Cov dropped, KL-Cov
    penalised); verl logs Clip-Cov's as its pg_clipfrac. Absent without a selection rule."""
    logp, old, adv, mask, _ = make_batch(6, 8, seed=13, spread=0.5, adv_shape="tok")
    n = int(mask.sum())
    k = rpg.selection.count(0.1, mask)
    out = rpg.KLCovLoss(0.1)(logp, old, 3 * adv, mask)
    assert out.metrics["select_frac"] == pytest.approx(k / n, abs=1e-15)
    fn = rpg.ClipCovLoss(clip=None, fraction=0.1, low=-1e9, high=1e9)
    out = fn(logp, old, 3 * adv, mask, generator=_gen())
    assert out.metrics["select_frac"] == pytest.approx(k / n, abs=1e-15)
    assert out.summable_metrics["select_frac"] == pytest.approx(k / n, abs=1e-15)
    assert "select_frac" not in rpg.DAPOLoss()(logp, old, adv, mask).metrics
