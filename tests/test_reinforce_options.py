"""Two REINFORCE-style options: a KL term beside the policy-gradient term (``separate_kl=True``) and the
sequence ratio (``ratio="sequence"``, CISPO on s = exp(mean_t log w)) — crafted values, exact oracles, errors."""

import pytest
import torch

import rpg
from rpg import testing as T

from .conftest import make_batch


def _k3(logp, ref):
    t = ref - logp
    return torch.expm1(t) - t


@pytest.mark.parametrize("kl", ["k3", "urkl"])
def test_separate_kl_term_is_the_truncated_reinforce_term_plus_the_kl_surrogate(kl):
    """ℓ = −sg(min(w, cap))·A·logp + β·KL-surrogate; the cap acts on the first term only."""
    logp, old, adv, mask, ref = make_batch(4, 6, seed=2, spread=0.6)
    beta, cap = 0.3, 1.1
    fn = rpg.PolicyLoss(kl=kl, beta=beta, style="reinforce", clip=rpg.Truncate.at(None, cap), separate_kl=True)
    out = fn(logp, old, adv, mask, ref_logp=ref)
    x = logp.detach().clone().requires_grad_(True)
    w = (x - old).exp()
    surrogate = _k3(x, ref) if kl == "k3" else w * _k3(x, ref)
    want = -w.clamp(max=cap).detach() * adv[:, None] * x + beta * surrogate
    want = torch.where(mask, want, torch.zeros_like(want))
    assert ((w > cap) & mask).any() and ((w < cap) & mask).any()  # the cap binds on some tokens only
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-13)
    (g_want,) = torch.autograd.grad(want.sum(), x)
    (g_got,) = torch.autograd.grad(out.per_token.sum(), logp)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-13)
    # The KL term inside g (the default): −sg(g)·logp, another value; for urkl, whose derivative carries w,
    # the cap truncates the KL part too (another gradient); k3's derivative 1 − 1/ρ has no w: same gradient.
    inside = fn.replace(separate_kl=False)(logp, old, adv, mask, ref_logp=ref)
    (g_in,) = torch.autograd.grad(inside.per_token.sum(), logp)
    assert (inside.per_token - out.per_token).abs().max() > 1e-3
    if kl == "k3":
        torch.testing.assert_close(g_in, g_got, rtol=0, atol=1e-13)
    else:
        assert (g_in - g_got).abs().max() > 1e-3


@pytest.mark.parametrize("div", rpg.DIVERGENCES)
def test_separate_kl_term_keeps_the_exact_gradient_off_policy(div):
    """Without a clip, E_old[∇ℓ] = −∇J exactly (π_θ ≠ π_old ≠ π_ref, float64): only the split changed."""
    p = T.random_problem(k=6, seed=4)
    fn = rpg.RPGLoss(div, style="reinforce", beta=0.4, clip=None).replace(separate_kl=True)
    got = T.expected_gradient(fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits)
    want = -T.objective_gradient(div, p.logits, p.ref_logits, p.rewards, 0.4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_multipliers_leave_the_separate_kl_term_unweighted():
    logp, old, adv, mask, ref = make_batch(3, 5, seed=5)
    weights = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fn = rpg.PolicyLoss(
        kl="k3", beta=0.2, style="reinforce", clip=rpg.Truncate(None, 0.2), separate_kl=True, weight_kl=False
    )
    pg = fn.replace(kl=None, beta=0.0, separate_kl=False, weight_kl=True)(logp, old, adv, mask).per_token
    kl = rpg.PolicyLoss(kl="k3", beta=0.2)(logp, old, None, mask, ref_logp=ref).per_token
    got = fn(logp, old, adv, mask, ref_logp=ref, weights=weights).per_token
    torch.testing.assert_close(got, torch.where(mask, weights * pg + kl, torch.zeros_like(got)), rtol=0, atol=1e-14)


def test_second_derivative_of_a_separate_kl_term_is_refused_not_zero():
    logp, old, adv, mask, ref = make_batch(2, 3, seed=6)
    fn = rpg.PolicyLoss(kl="k3", beta=0.2, style="reinforce", separate_kl=True)
    (g,) = torch.autograd.grad(fn(logp, old, adv, mask, ref_logp=ref).loss, logp, create_graph=True)
    with pytest.raises(RuntimeError, match="separate_kl=True"):
        torch.autograd.grad(g.sum(), logp)


def test_sequence_ratio_reinforce_weights_every_token_by_the_truncated_sequence_ratio():
    logp, old, adv, mask, _ = make_batch(4, 6, seed=7, spread=0.4)
    cap = 1.05
    fn = rpg.PolicyLoss(style="reinforce", clip=rpg.Truncate.at(None, cap), ratio="sequence")
    out = fn(logp, old, adv, mask)
    m = mask.double()
    s = (((logp.detach() - old) * m).sum(-1) / m.sum(-1)).exp()
    assert (s > cap).any() and (s < cap).any()
    want = torch.where(mask, -s.clamp(max=cap)[:, None] * adv[:, None] * logp.detach(), torch.zeros_like(m))
    torch.testing.assert_close(out.per_token, want, rtol=0, atol=1e-13)
    (grad,) = torch.autograd.grad(out.per_token.sum(), logp)
    torch.testing.assert_close(grad, torch.where(mask, -s.clamp(max=cap)[:, None] * adv[:, None], 0 * m))
    # the metrics see the same ratio: every token of a truncated response counts
    truncated = ((s > cap)[:, None] & mask).sum().double() / mask.sum()
    assert out.metrics["clip_frac/high"] == pytest.approx(truncated.item(), abs=1e-12)


def test_sequence_ratio_reinforce_is_exact_on_policy_and_biased_off_policy():
    """Two-token sequences, outcome reward: s = 1 on-policy, so E[∇ℓ] = −∇E[R] exactly; off-policy the
    geometric-mean ratio is not the sequence's importance weight Π_t w_t, and the gradient misses."""
    p = T.random_sequence_problem(k=3, seed=1)
    fn = rpg.PolicyLoss(style="reinforce", ratio="sequence")
    want = -T.sequence_objective_gradient(p.logits, p.ref_logits, p.rewards, 0.0)
    on = T.sequence_expected_gradient(fn, p.logits, p.logits, p.rewards)
    torch.testing.assert_close(on, want, rtol=0, atol=1e-12)
    off = T.sequence_expected_gradient(fn, p.logits, p.old_logits, p.rewards)
    assert (off - want).norm() / want.norm() > 1e-2


def test_refused_combinations():
    with pytest.raises(ValueError, match="separate_kl=True"):
        rpg.PolicyLoss(kl="urkl", beta=0.1, style="reinforce", ratio="sequence")
    with pytest.raises(ValueError, match="fold_kl"):
        rpg.PolicyLoss(kl="urkl", beta=0.1, fold_kl=True, weight_kl=False)
    with pytest.raises(ValueError, match="fold_kl"):
        rpg.PolicyLoss(ratio="sequence", kl="urkl", beta=0.1, fold_kl=True)
    # accepted: no KL term, or a separate one
    rpg.PolicyLoss(style="reinforce", ratio="sequence", clip=rpg.Truncate.at(None, 5.0))
    rpg.PolicyLoss(kl="k3", beta=0.1, style="reinforce", ratio="sequence", separate_kl=True)


SEQUENCE_CISPO = rpg.PolicyLoss(style="reinforce", clip=rpg.Truncate.at(None, 1.05), ratio="sequence")
CISPO_K3 = rpg.PolicyLoss(
    kl="k3", beta=0.1, style="reinforce", clip=rpg.Truncate.at(None, 1.1), separate_kl=True, weight_kl=False
)
SEQUENCE_CISPO_K3 = CISPO_K3.replace(ratio="sequence")


@pytest.mark.parametrize(
    "loss_fn", [SEQUENCE_CISPO, CISPO_K3, SEQUENCE_CISPO_K3], ids=["sequence", "k3", "sequence-k3"]
)
def test_fused_head_equals_from_hidden_plus_loss(loss_fn):
    from .test_fused import assert_same, make

    assert_same(loss_fn, make(6), options=("weights", "behavior_logp"))


@pytest.mark.parametrize(
    "loss_fn", [SEQUENCE_CISPO, CISPO_K3, SEQUENCE_CISPO_K3], ids=["sequence", "k3", "sequence-k3"]
)
def test_compiled_equals_eager(loss_fn):
    torch._dynamo.reset()
    logp, old, adv, mask, ref = make_batch(4, 16, seed=7, dtype=torch.float32)
    logp = logp.detach().requires_grad_(True)

    def step(logp, old, adv, mask, ref):
        return loss_fn(logp, old, adv, mask, ref_logp=ref).loss

    eager = step(logp, old, adv, mask, ref)
    (g_eager,) = torch.autograd.grad(eager, logp)
    got = torch.compile(step, fullgraph=True)(logp, old, adv, mask, ref)
    (g_got,) = torch.autograd.grad(got, logp)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_eager, rtol=1e-6, atol=1e-6)


def test_product_ratio_with_a_separate_kl_term_is_the_vespo_term_plus_the_surrogate():
    """ratio='product' (VESPO) with separate_kl: −sg(φ(W)·A)·logp·weight + β·surrogate, the weights on the first."""
    logp, old, adv, mask, ref = make_batch(4, 6, seed=8, spread=0.3)
    weights = torch.rand(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    vespo = rpg.VESPOLoss()
    fn = vespo.replace(kl="urkl", beta=0.2, separate_kl=True, weight_kl=False)
    pg = vespo(logp, old, adv, mask).per_token
    kl = rpg.PolicyLoss(kl="urkl", beta=0.2)(logp, old, None, mask, ref_logp=ref).per_token
    out = fn(logp, old, adv, mask, ref_logp=ref, weights=weights)
    zero = torch.zeros_like(kl)
    torch.testing.assert_close(out.per_token, torch.where(mask, weights * pg + kl, zero), rtol=0, atol=1e-14)
    (g,) = torch.autograd.grad(out.per_token.sum(), logp)
    (g_pg,) = torch.autograd.grad((weights * pg).sum(), logp)
    (g_kl,) = torch.autograd.grad(kl.sum(), logp)
    torch.testing.assert_close(g, torch.where(mask, g_pg + g_kl, zero), rtol=0, atol=1e-14)
    # inside g (the default) the KL derivative is part of the REINFORCE weight: another value
    inside = vespo.replace(kl="urkl", beta=0.2)(logp, old, adv, mask, ref_logp=ref).per_token
    assert (inside - torch.where(mask, pg + kl, zero)).abs().max() > 1e-3
