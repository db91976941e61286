"""Bugs found by an adversarial review of the core: each test fails on the code it was written
against and states the correct behaviour (from the math, the call contract and docs/design.md)."""

import copy
import pickle

import pytest
import torch

import rpg

F64 = torch.float64


def _mismatch_batch():
    """Two sequences of four tokens; sequence 0 was sampled by an engine far from π_old (ρ = e³)."""
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(2, 4, generator=g, dtype=F64) * 0.3 - 1).clamp(max=-0.05)
    old = logp + 0.1 * torch.randn(2, 4, generator=g, dtype=F64)
    ref = logp + 0.2 * torch.randn(2, 4, generator=g, dtype=F64)
    beh = old.clone()
    beh[0] -= 3.0
    adv = torch.tensor([0.7, -1.3], dtype=F64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    return logp, old, ref, beh, adv, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_rejected_tokens_leave_the_kl_term_too_when_count_rejected_is_false(agg):
    """count_rejected=False with weight_kl=False: a rejected token leaves the denominators, but its
    unweighted KL term stayed in the numerator — half in, half out. Under seq-mean-token-mean a fully
    rejected sequence even added the *sum* of its KL terms (n_b = 0 → 1) to a mean over the other
    sequences. Correct: "the mask shrinks", so the loss equals the same loss on mask = keep with the
    correction weight as a plain per-token weight (verl drops rejected tokens from every term)."""
    logp, old, ref, beh, adv, mask = _mismatch_batch()
    corr = rpg.RolloutCorrection(mode="mask", lower=0.5, upper=2.0, count_rejected=False)
    fn = rpg.PolicyLoss(kl="k3", beta=0.5, clip=rpg.Clip(), agg=agg, correction=corr, weight_kl=False)
    keep = corr.keep(old, beh, mask)
    assert keep[1].all() and not keep[0].any()

    lp = logp.clone().requires_grad_(True)
    out = fn(lp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    out.loss.backward()

    lp_ref = logp.clone().requires_grad_(True)
    expected = fn(lp_ref, old, adv, keep, ref_logp=ref, weights=corr.weight(old, beh, mask))
    expected.loss.backward()

    torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(lp.grad, lp_ref.grad, rtol=0, atol=1e-12)


def test_metrics_with_count_rejected_false_and_the_documented_global_count():
    """With count_rejected=False the docs say to pass the count after rejection (keep.sum()) as
    batch_num_tokens. The metrics then sum over *all* response tokens but divide by the kept count:
    on-policy (w = 1 everywhere) ratio/mean reads 2.0 and rollout_rs_masked_fraction 1.0 when half
    the tokens were rejected. Correct: a mean over one set of tokens divided by that set's count
    (ratio/mean = 1 on-policy; rollout_rs_masked_fraction = 4/8 for this, the whole batch)."""
    old = torch.full((2, 4), -1.0, dtype=F64)
    logp = old.clone().requires_grad_(True)
    beh = old.clone()
    beh[0] -= 3.0
    mask = torch.ones(2, 4, dtype=torch.bool)
    corr = rpg.RolloutCorrection(mode="mask", lower=0.5, upper=2.0, count_rejected=False)
    keep = corr.keep(old, beh, mask)
    out = rpg.DAPOLoss(correction=corr)(
        logp, old, torch.tensor([1.0, -1.0], dtype=F64), mask, behavior_logp=beh, batch_num_tokens=int(keep.sum())
    )
    m = out.metrics
    assert m["ratio/mean"] == pytest.approx(1.0, abs=1e-12)
    assert m["rollout_corr/rollout_rs_masked_fraction"] == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("source", ["weights", "correction"])
def test_a_zero_weight_zeroes_the_policy_gradient_term_with_weight_kl_false(source):
    """docs/design.md: "a weight of 0 (weights= or a rejected token): that token's loss is exactly 0,
    even where ℓ is not finite". With weight_kl=False (TRL's convention) the policy-gradient term is
    multiplied by the weight instead (0·∞ = NaN), so one token with π_old = 0 (ρ = π_old/μ = 0) or an
    overflowing ratio makes the whole loss and gradient NaN. Correct: that token contributes only its
    unweighted KL term β·k3 (finite here), with gradient β·(1 − π_ref/π_θ)."""
    old = torch.tensor([[-float("inf"), -1.0]], dtype=F64)
    ref = torch.tensor([[-1.1, -1.0]], dtype=F64)
    logp = torch.tensor([[-1.0, -1.2]], dtype=F64, requires_grad=True)
    adv = torch.tensor([-1.0], dtype=F64)
    beta = 0.1
    fn = rpg.PolicyLoss(kl="k3", beta=beta, clip=rpg.Clip(0.2, 0.2, None), weight_kl=False)
    if source == "weights":  # an overflowing ratio (w = e^799 = inf in float64): −inf old_logp is refused here
        old = torch.tensor([[-800.0, -1.0]], dtype=F64)
        out = fn(logp, old, adv, ref_logp=ref, weights=torch.tensor([[0.0, 1.0]], dtype=F64))
    else:  # behavior_logp finite, old_logp = -inf: rho = 0, the default correction weight is 0
        out = fn(logp, old, adv, ref_logp=ref, behavior_logp=torch.tensor([[-1.0, -1.0]], dtype=F64))
    out.loss.backward()
    t = (ref - logp.detach())[0, 0]
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.per_token[0, 0].detach(), beta * (t.exp() - 1 - t), rtol=0, atol=1e-15)
    # the loss is a token-mean over 2 tokens
    torch.testing.assert_close(logp.grad[0, 0], beta * (1 - t.exp()) / 2, rtol=0, atol=1e-15)


# A token whose ratio overflows the dtype (float64: log w = 800) and which the rule must mask:
# p = π_θ(token) = e^-1, q = π_old(token) = e^-801, A = 1 (or A' = 1 - β·800 > 0), so p − q ≈ 0.37 and
# KL(Bern(q) ‖ Bern(p)) ≈ 0.46 exceed every threshold below on the side the advantage pushes.
OVERFLOW_MASKED = {
    "DPPO kl": rpg.DPPOLoss(divergence="kl", low=0.05, high=0.05),
    "DPPO tv": rpg.DPPOLoss(),
    "TrustRegion tv + urkl": rpg.PolicyLoss(kl="urkl", beta=1e-4, style="reinforce", clip=rpg.TrustRegion()),
    "differentiable TrustRegion kl": rpg.PolicyLoss(clip=rpg.TrustRegion(0.05, 0.05, "kl")),
}


@pytest.mark.parametrize("name", list(OVERFLOW_MASKED))
def test_trust_region_masks_a_token_whose_ratio_overflows(name):
    """TrustRegion recomputes log w as w.log() and p − q as q·expm1(log w): where w = ∞ (or q
    underflows to 0) these are inf/NaN, the NaN comparison says "inside the region", and a token the
    rule must mask keeps an infinite (or NaN) gradient that poisons the whole update; the branch on
    sign(g) is NaN too where g = ∞ − ∞ (urkl). Correct (and promised by docs/design.md for "a trust
    region" under overflow): the token is masked, its gradient exactly 0; decide with log w = logp −
    old_logp, p = exp(logp), q = exp(old_logp) and the sign of the finite A′."""
    fn = OVERFLOW_MASKED[name]
    old = torch.tensor([[-801.0, -1.0]], dtype=F64)
    logp = torch.tensor([[-1.0, -1.0]], dtype=F64, requires_grad=True)
    out = fn(logp, old, torch.tensor([1.0], dtype=F64))
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    torch.testing.assert_close(logp.grad[0, 1], torch.tensor(-0.5, dtype=F64))


def test_trust_region_value_stays_finite_where_w_overflows_float32():
    """docs/design.md: float32 with |log w| ≳ 88 under "a trust region": a clipped token keeps
    gradient 0 and a finite value. DPPOLoss gives per_token = inf (its fallback value at the region's
    edge, 1 + δ/q, overflows too), so a trainer's NaN/inf guard drops the batch."""
    old = torch.tensor([[-101.0, -1.0]], dtype=torch.float32)
    logp = torch.tensor([[-1.0, -1.0]], dtype=torch.float32, requires_grad=True)
    out = rpg.DPPOLoss()(logp, old, torch.tensor([1.0]))
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0
    assert torch.isfinite(out.per_token).all()


def test_clip_fraction_agrees_with_the_kernel_where_w_overflows():
    """RPG-Style Clip with a KL term where w = ∞: g = ∞·A − β·∞·log ρ = NaN. The kernel still clips
    the token (gradient 0, correctly: A′ = A − β·log ρ = 0.2 ≥ 0 and w ≥ 1 + ε_high), but the metrics
    branch on sign(NaN) and count it as not clipped — contradicting "clip fractions come from the
    same clip_view the loss kernel uses, so they cannot disagree with the loss". Correct: 1 of 2."""
    old = torch.tensor([[-801.0, -1.0]], dtype=F64)
    logp = torch.tensor([[-1.0, -1.0]], dtype=F64, requires_grad=True)
    out = rpg.PolicyLoss(kl="urkl", beta=1e-3, style="reinforce", clip=rpg.Clip())(
        logp, old, torch.tensor([1.0], dtype=F64)
    )
    out.loss.backward()
    assert logp.grad[0, 0].item() == 0.0  # the kernel clips it
    assert out.metrics["clip_frac"] == pytest.approx(0.5)


@pytest.mark.parametrize("roundtrip", ["pickle", "deepcopy", "copy"])
def test_copies_keep_the_loss_class_and_its_arguments(roundtrip):
    """PolicyLoss.__reduce__ rebuilds every loss as a plain PolicyLoss, so pickling (Ray workers in
    verl, multiprocessing), copy.copy and copy.deepcopy turn a GRPOLoss into a PolicyLoss: the repr
    changes, isinstance fails, and preset arguments vanish (RPGLoss.divergence, GRPOLoss.
    importance_weighted_kl raise AttributeError). Correct: a copy is the same class with the same
    arguments (rebuild with type(self) and the stored args)."""
    do = {"pickle": lambda x: pickle.loads(pickle.dumps(x)), "deepcopy": copy.deepcopy, "copy": copy.copy}[roundtrip]
    for loss in (rpg.GRPOLoss(importance_weighted_kl=True), rpg.RPGLoss("rkl", style="reinforce"), rpg.DrGRPOLoss(64)):
        twin = do(loss)
        assert type(twin) is type(loss)
        assert repr(twin) == repr(loss)
        assert twin == loss and hash(twin) == hash(loss)
    assert do(rpg.RPGLoss("ufkl")).divergence == "ufkl"
    assert do(rpg.GRPOLoss(importance_weighted_kl=True)).importance_weighted_kl is True
