"""rpg.correction: the behaviour policy μ of the rollout engine — exactness by enumeration, the weight
formulas on crafted tokens, filters, denominators, metrics and errors."""

import math

import pytest
import torch

import rpg
from rpg import testing as T
from rpg.correction import correction_weight

from .conftest import ALL_LOSSES, F64, make_batch

EXACT = rpg.RolloutCorrection(upper=None)


def _mu(logits, scale=0.4, seed=11):
    g = torch.Generator().manual_seed(seed)
    return logits + scale * torch.randn(logits.shape, generator=g, dtype=logits.dtype)


@pytest.mark.parametrize("div,style", ALL_LOSSES)
@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "measures"])
def test_token_weight_is_exact_under_a_behaviour_policy(div, style, normalized):
    """E_μ[ρ·∇ℓ] = −∇J for every RPG loss, with μ ≠ π_old ≠ π_ref ≠ π_θ, to 1e-10 in float64."""
    p = T.random_problem(k=7, seed=3)
    mu = _mu(p.old_logits)
    fn = rpg.RPGLoss(div, style=style, beta=0.4, clip=None, correction=EXACT)
    got = T.expected_gradient(
        fn, p.logits, p.old_logits, p.rewards, ref_logits=p.ref_logits, behavior_logits=mu, normalized=normalized
    )
    want = -T.objective_gradient(div, p.logits, p.ref_logits, p.rewards, 0.4, normalized=normalized)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # Without the correction the same samples give a wrong gradient: the test can fail.
    plain = rpg.RPGLoss(div, style=style, beta=0.4, clip=None)
    theta = p.logits.clone().requires_grad_(True)
    logp = T.log_policy(theta, normalized)[:, None]
    old = T.log_policy(p.old_logits, normalized)[:, None]
    ref = T.log_policy(p.ref_logits, normalized)[:, None]
    out = plain(logp, old, p.rewards, torch.ones_like(logp, dtype=torch.bool), ref_logp=ref)
    (wrong,) = torch.autograd.grad((T.log_policy(mu, normalized).exp()[:, None] * out.per_token).sum(), theta)
    assert (wrong - want).abs().max() > 1e-4


def test_sequence_weight_is_exact_for_an_outcome_reward_and_the_token_weight_is_not():
    p = T.random_sequence_problem(k=3, seed=0)
    mu = _mu(p.logits, 0.5, seed=1)
    base = dict(clip=None, agg="token-sum")
    seq = rpg.PolicyLoss(correction=rpg.RolloutCorrection(level="sequence", upper=None), **base)
    tok = rpg.PolicyLoss(correction=EXACT, **base)
    assert T.correction_bias(seq, p, mu) < 1e-12
    assert T.correction_bias(tok, p, mu) > 1e-3
    assert T.correction_bias(rpg.PolicyLoss(**base), p, mu, behavior=False) > 1e-2


@pytest.mark.parametrize(
    "name,fn",
    [
        ("rpg", rpg.RPGLoss("urkl", style="reinforce", beta=0.2)),
        ("grpo", rpg.GRPOLoss()),
        ("gspo", rpg.GSPOLoss()),
        ("cispo", rpg.CISPOLoss()),
        ("dppo", rpg.DPPOLoss()),
        ("seq-mask", rpg.DAPOLoss(correction=rpg.RolloutCorrection("sequence", "mask", 0.5, 2.0))),
    ],
)
def test_behavior_equal_to_old_changes_nothing(name, fn):
    logp, old, adv, mask, ref = make_batch(4, 6, seed=7, ref=True)
    a = fn(logp, old, adv, mask, ref_logp=ref)
    b = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=old.clone())
    torch.testing.assert_close(b.per_token, a.per_token, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(a.loss, logp)
    (gb,) = torch.autograd.grad(b.loss, logp)
    torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def _weights(corr, old, beh, mask=None):
    mask = torch.ones_like(old, dtype=torch.bool) if mask is None else mask
    return correction_weight(old, beh, mask, corr)


def test_token_truncate_and_mask_on_crafted_tokens():
    rho = torch.tensor([[0.1, 0.5, 1.0, 2.0, 5.0]], dtype=F64)
    old, beh = rho.log(), torch.zeros_like(rho)
    w, keep, rej = _weights(rpg.RolloutCorrection(lower=0.5, upper=2.0), old, beh)
    torch.testing.assert_close(w, torch.tensor([[0.5, 0.5, 1.0, 2.0, 2.0]], dtype=F64))
    assert keep.all() and not rej.any()
    w, keep, rej = _weights(rpg.RolloutCorrection(mode="mask", lower=0.5, upper=2.0), old, beh)
    torch.testing.assert_close(w, torch.tensor([[0.0, 0.5, 1.0, 2.0, 0.0]], dtype=F64))
    assert rej.tolist() == [[True, False, False, False, True]]
    w, *_ = _weights(EXACT, old, beh)
    torch.testing.assert_close(w, rho)


def test_sequence_level_uses_the_product_over_unmasked_tokens_only():
    rho = torch.tensor([[2.0, 1.5, 9.0], [0.5, 0.5, 0.5]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    beh = torch.full_like(rho, -1.0)
    old = beh + rho.log()
    old[0, 2] = float("nan")  # padding is inert
    w, *_ = _weights(rpg.RolloutCorrection("sequence", upper=None), old, beh, mask)
    torch.testing.assert_close(w, torch.tensor([[3.0, 3.0, 0.0], [0.125] * 3], dtype=F64))
    w, *_ = _weights(rpg.RolloutCorrection("sequence", upper=2.0), old, beh, mask)
    torch.testing.assert_close(w, torch.tensor([[2.0, 2.0, 0.0], [0.125] * 3], dtype=F64))
    w, _, rej = _weights(rpg.RolloutCorrection("sequence", "mask", lower=0.2, upper=2.0), old, beh, mask)
    torch.testing.assert_close(w, torch.zeros_like(w))
    assert rej.tolist() == [[True, True, False], [True, True, True]]


def test_geometric_and_worst_token_filters_reject_whole_sequences():
    rho = torch.tensor([[1.1, 1.1, 1.1], [3.0, 1 / 3, 1.0], [1.0, 1.0, 1.6]], dtype=F64)
    old, beh = rho.log(), torch.zeros_like(rho)
    geo = rpg.RolloutCorrection(upper=None, geo_lower=0.95, geo_upper=1.05)
    w, _, rej = _weights(geo, old, beh)
    assert rej.any(-1).tolist() == [True, False, True]  # geometric means 1.1, 1.0, 1.17
    torch.testing.assert_close(w[1], rho[1])
    worst = rpg.RolloutCorrection(upper=None, token_lower=0.5, token_upper=2.0)
    w, _, rej = _weights(worst, old, beh)
    assert rej.any(-1).tolist() == [False, True, False]
    assert (rej.any(-1, keepdim=True) == rej).all()  # whole sequences


def test_the_weight_multiplies_the_whole_per_token_loss_and_gets_no_gradient():
    logp, old, adv, mask, ref = make_batch(3, 5, seed=8, ref=True)
    beh = (old + 0.3 * torch.randn_like(old)).requires_grad_(True)
    old = old.clone().requires_grad_(True)
    fn = rpg.RPGLoss("rkl", beta=0.5, correction=rpg.RolloutCorrection(lower=0.8, upper=1.25))
    out = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    base = fn(logp, old, adv, mask, ref_logp=ref)
    w, *_ = correction_weight(old.detach(), beh.detach(), mask, fn.correction)
    torch.testing.assert_close(out.per_token, w * base.per_token, rtol=0, atol=1e-14)
    out.loss.backward()
    assert old.grad is None and beh.grad is None


def test_weight_kl_false_leaves_the_kl_term_unweighted():
    logp, old, adv, mask, ref = make_batch(3, 5, seed=9, ref=True)
    beh = old + 0.3 * torch.randn_like(old)
    fn = rpg.GRPOLoss(beta=0.3, correction=EXACT)
    split = fn.replace(weight_kl=False)
    pg = rpg.GRPOLoss(beta=0.0)(logp, old, adv, mask)
    kl = rpg.PolicyLoss(kl="k3", beta=0.3, agg="seq-mean-token-mean")(logp, old, None, mask, ref_logp=ref)
    w, *_ = correction_weight(old, beh, mask, EXACT)
    got = split(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    torch.testing.assert_close(got.per_token, w * pg.per_token + kl.per_token, rtol=0, atol=1e-13)
    whole = fn(logp, old, adv, mask, ref_logp=ref, behavior_logp=beh)
    torch.testing.assert_close(whole.per_token, w * (pg.per_token + kl.per_token), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="weight_kl"):
        rpg.RPGLoss("rkl", style="reinforce", correction=EXACT).replace(weight_kl=False)


def test_default_correction_is_token_truncation_at_two():
    logp, old, adv, mask, _ = make_batch(3, 5, seed=10)
    beh = old + torch.randn_like(old)
    fn = rpg.RPGLoss("urkl", style="reinforce")
    a = fn(logp, old, adv, mask, behavior_logp=beh)
    b = fn.replace(correction=rpg.RolloutCorrection("token", "truncate", None, 2.0))(
        logp, old, adv, mask, behavior_logp=beh
    )
    torch.testing.assert_close(a.per_token, b.per_token, rtol=0, atol=0)
    assert rpg.RolloutCorrection() == rpg.RolloutCorrection("token", "truncate", None, 2.0)


def test_rejected_tokens_in_or_out_of_the_denominator():
    logp, old, adv, mask, _ = make_batch(2, 4, seed=12, mask_p=0.0)
    beh = old.clone()
    beh[0, 0] = old[0, 0] - 5  # ρ = e^5: rejected by the mask
    keep_in = rpg.DAPOLoss(correction=rpg.RolloutCorrection(mode="mask", upper=2.0))
    drop = rpg.DAPOLoss(correction=rpg.RolloutCorrection(mode="mask", upper=2.0, count_rejected=False))
    a = keep_in(logp, old, adv, mask, behavior_logp=beh)
    b = drop(logp, old, adv, mask, behavior_logp=beh)
    torch.testing.assert_close(a.loss * 8, b.loss * 7, rtol=0, atol=1e-14)
    keep = drop.correction.keep(old, beh, mask.bool())
    assert keep.sum() == 7 and not keep[0, 0]
    # With count_rejected=False, global counts computed from keep() give shards that sum to the full batch.
    n = int(keep.sum())
    shards = sum(
        drop(
            logp[i : i + 1],
            old[i : i + 1],
            adv[i : i + 1],
            mask[i : i + 1],
            behavior_logp=beh[i : i + 1],
            batch_num_tokens=n,
        ).loss
        for i in range(2)
    )
    torch.testing.assert_close(shards, b.loss, rtol=0, atol=1e-14)


def test_metrics_report_the_mismatch():
    old = torch.tensor([[-1.0, -2.0, -0.5]], dtype=F64)
    beh = torch.tensor([[-1.5, -1.0, -0.5]], dtype=F64)
    logp = old.clone().requires_grad_(True)
    m = rpg.DAPOLoss(correction=rpg.RolloutCorrection(upper=1.5))(
        logp, old, torch.ones(1, dtype=F64), behavior_logp=beh
    ).metrics
    log_rho = old - beh
    assert m["rollout_corr/kl"] == pytest.approx((-log_rho).mean().item())
    assert m["rollout_corr/k3_kl"] == pytest.approx((log_rho.exp() - 1 - log_rho).mean().item())
    assert m["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(1 / 3)  # ρ = e^0.5 > 1.5
    assert m["rollout_corr/rollout_rs_masked_fraction"] == 0.0
    assert m["rollout_corr/ppl_ratio"] == pytest.approx(math.exp((beh - old).mean().item()))  # one sequence
    assert m["rollout_corr/training_ppl"] == pytest.approx(math.exp(-old.mean().item()))
    assert m["rollout_corr/chi2_token"] == pytest.approx((log_rho.exp() ** 2 - 1).mean().item())
    assert "rollout_corr/kl" not in rpg.DAPOLoss()(logp, old, torch.ones(1, dtype=F64)).metrics


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(level="seq"), ValueError, "level"),
        (dict(mode="clip"), ValueError, "mode"),
        (dict(lower=-0.1), ValueError, "lower"),
        (dict(upper=0.0), ValueError, "upper"),
        (dict(lower=3.0, upper=2.0), ValueError, "lower"),
        (dict(upper=float("nan")), ValueError, "upper"),
        (dict(upper="2"), TypeError, "upper"),
        (dict(geo_lower=1.2, geo_upper=1.1), ValueError, "geo_lower"),
        (dict(count_rejected=1), TypeError, "count_rejected"),
    ],
)
def test_bad_settings(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rpg.RolloutCorrection(**kwargs)


def test_bad_behavior_logp():
    logp, old, adv, mask, _ = make_batch(3, 5, seed=13)
    fn = rpg.RPGLoss("rkl")
    with pytest.raises(ValueError, match="behavior_logp"):
        fn(logp, old, adv, mask, behavior_logp=old[:, :4])
    with pytest.raises(TypeError, match="behavior_logp"):
        fn(logp, old, adv, mask, behavior_logp=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="correction"):
        rpg.RPGLoss("rkl", correction=2.0)


def test_the_oracle_handles_a_sampler_without_full_support():
    """A top-p engine never samples some responses: the expectation runs over its support (no 0·∞ = NaN),
    and then even the exact sequence weight is biased — π_old's mass outside the support is lost."""
    p = T.random_sequence_problem(k=4, seed=0)
    mu = p.logits.clone()
    mu[0] = -float("inf")  # the first token 0 is never sampled
    seq = rpg.PolicyLoss(clip=None, agg="token-sum", correction=rpg.RolloutCorrection(level="sequence", upper=None))
    bias = T.correction_bias(seq, p, mu)
    assert math.isfinite(bias) and bias > 1e-3
    got = T.expected_gradient(
        rpg.RPGLoss("rkl", beta=0.3, clip=None, correction=EXACT),
        p.logits[:4],
        p.old_logits[:4],
        p.rewards[:4],
        behavior_logits=torch.tensor([0.0, 0.0, 0.0, -float("inf")], dtype=F64),
    )
    assert torch.isfinite(got).all()
